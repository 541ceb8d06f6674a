#!/usr/bin/env bash
# `make gpu-pack`, on a machine with the package registries: what tools/gpu-check.sh needs on a GPU machine that has
# none, in pieces of at most 60 MiB (work/gpu-pack/part-NN, with SHA256SUMS): the release binaries and the devices
# test (stripped), and the GPU build of ONNX Runtime with NVIDIA's TensorRT for RTX provider (from their PyPI wheels).
# Carry one piece per call to the GPU machine: `bash tools/gpu-check.sh receive work/gpu-pack/part-NN`.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=${ORT_VERSION:-1.31.1}
RTX_VERSION=${RTX_VERSION:-0.5.0}
WHEELS=work/gpu-wheels
STAGE=work/gpu-pack.stage
OUT=work/gpu-pack
mkdir -p "$WHEELS"
ls "$WHEELS"/onnxruntime_gpu-"$ORT_VERSION"-*.whl >/dev/null 2>&1 \
  || python3 -m pip download -q --no-deps "onnxruntime-gpu==$ORT_VERSION" -d "$WHEELS"
ls "$WHEELS"/onnxruntime_ep_nv_tensorrt_rtx_cu13-"$RTX_VERSION"-*.whl >/dev/null 2>&1 \
  || python3 -m pip download -q --no-deps "onnxruntime-ep-nv-tensorrt-rtx-cu13==$RTX_VERSION" -d "$WHEELS"
rm -rf "$STAGE" "$OUT" && mkdir -p "$STAGE/bin" "$STAGE/ort" "$STAGE/rtx" "$OUT"
python3 - "$WHEELS" "$STAGE" "$ORT_VERSION" "$RTX_VERSION" <<'PY'
import sys, zipfile, glob, os
wheels, stage, ort, rtx = sys.argv[1:]
for pattern, prefix, dest in [(f"onnxruntime_gpu-{ort}-*.whl", "onnxruntime/capi/", "ort"),
                              (f"onnxruntime_ep_nv_tensorrt_rtx_cu13-{rtx}-*.whl", "onnxruntime_ep_nv_tensorrt_rtx/", "rtx")]:
    with zipfile.ZipFile(glob.glob(os.path.join(wheels, pattern))[0]) as z:
        for name in z.namelist():
            base = name[len(prefix):]
            if name.startswith(prefix) and ".so" in base and "pybind11" not in base and "/" not in base:
                with z.open(name) as src, open(os.path.join(stage, dest, base), "wb") as dst:
                    dst.write(src.read())
PY
for b in vl-run vl-export vl-bench; do strip -o "$STAGE/bin/$b" "target/release/$b"; done
test_bin=$(ls -t target/release/deps/devices-* | grep -v '\.d$' | head -n 1)
strip -o "$STAGE/bin/devices-test" "$test_bin"
cp tools/gpu_torch_baseline.py "$STAGE/bin/"
tar -C "$STAGE" -cf - . | zstd -q "-${ZSTD_LEVEL:-19}" -T0 > "$OUT/payload.tar.zst"
split -b 60M -d "$OUT/payload.tar.zst" "$OUT/part-"
rm "$OUT/payload.tar.zst" && rm -rf "$STAGE"
(cd "$OUT" && sha256sum part-* > SHA256SUMS)
ls -l "$OUT"
