#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, its driver, CUDA 13 and PyTorch but no package registry and no GPU build of
# ONNX Runtime: checks vl there from what `make gpu-pack` made elsewhere.
#   bash tools/gpu-check.sh receive work/gpu-pack/part-NN   # once per piece (each call can carry 64 MiB)
#   bash tools/gpu-check.sh run                             # reassemble, test, benchmark; prints a table
# `run` does, in order: the GPU as the driver sees it; the devices test (its CUDA cases run instead of skipping:
# greedy tokens on CUDA equal the CPU's on the tiny preset); TensorRT-RTX on the tiny engine (whether it builds an
# engine on this GPU); vl7b-slice fp16: vision, prefill and decode at 1 and 8 concurrent streams on CUDA, against
# PyTorch fp16 on the same GPU (tools/gpu_torch_baseline.py; skipped if transformers is not importable).
set -uo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=${VL_GPU_DIR:-/tmp/vl-gpu}
mkdir -p "$HOME_DIR/parts"
case "${1:-run}" in
  receive)
    shift
    for p in "$@"; do cp "$p" "$HOME_DIR/parts/"; cp "$(dirname "$p")/SHA256SUMS" "$HOME_DIR/parts/" 2>/dev/null; done
    ls -l "$HOME_DIR/parts"; exit 0 ;;
  run) ;;
  *) echo "usage: $0 receive PART... | run" >&2; exit 2 ;;
esac

(cd "$HOME_DIR/parts" && sha256sum -c --quiet SHA256SUMS) || { echo "pieces missing or damaged" >&2; exit 1; }
rm -rf "$HOME_DIR/pack" && mkdir -p "$HOME_DIR/pack"
cat "$HOME_DIR"/parts/part-* | zstd -q -d | tar -C "$HOME_DIR/pack" -xf - || exit 1
P=$HOME_DIR/pack
BIN=$P/bin
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader || { echo "no NVIDIA GPU here" >&2; exit 1; }
# CUDA 13 and cuDNN from PyTorch's pip packages; the ONNX Runtime GPU build and the RTX provider from the pack.
NV_LIBS=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    dirs.update(os.path.dirname(p) for p in glob.glob(os.path.join(sp, "nvidia", "*", "lib", "*.so*")))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$NV_LIBS:${LD_LIBRARY_PATH:-}"
export ORT_DYLIB_PATH=$(ls "$P"/ort/libonnxruntime.so.* | head -n 1)
export VL_TENSORRT_RTX_DIR=$P/rtx
W=$HOME_DIR/work && mkdir -p "$W"

echo "== devices test (CUDA cases run here)"
"$BIN/devices-test" --test-threads 1 2>&1 | tail -n 25

echo "== tiny engine on each device"
"$BIN/vl-export" synth --preset tiny --out "$W/tiny" >/dev/null && "$BIN/vl-export" build --model "$W/tiny" --out "$W/tiny-engine" >/dev/null
for d in cpu cuda tensorrt tensorrt-rtx; do
  echo "-- $d"; timeout 600 "$BIN/vl-run" --engine "$W/tiny-engine" --device "$d" --prompt "hello" --max-new-tokens 8 --stats 2>&1 | tail -n 3
done

echo "== vl7b-slice fp16"
test -f "$W/vl7b-slice/config.json" || "$BIN/vl-export" synth --preset vl7b-slice --out "$W/vl7b-slice" >/dev/null
test -f "$W/vl7b-fp16/manifest.yaml" || "$BIN/vl-export" build --model "$W/vl7b-slice" --precision fp16 --out "$W/vl7b-fp16" >/dev/null
"$BIN/vl-bench" concurrency --engine "$W/vl7b-fp16" --device cuda --streams 1,8 --new-tokens 64 --threads 4 --out "$W/concurrency-cuda.json" 2>&1 | tail -n 6
"$BIN/vl-run" --engine "$W/vl7b-fp16" --device cuda --prompt "Describe a video." --max-new-tokens 64 --ignore-eos --stats 2>&1 | grep stats
if python3 -c "import transformers" 2>/dev/null; then
  python3 "$BIN/gpu_torch_baseline.py" --model "$W/vl7b-slice" --new-tokens 64
else
  echo "PyTorch baseline skipped: transformers is not installed here"
fi
