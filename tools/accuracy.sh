#!/usr/bin/env bash
# Accuracy and CPU speed of each precision against fp32, on the real-weight checkpoint
# (SmolLM2-135M LLM + synthesized vision tower; `make real-model`). Writes
# work/accuracy/<precision>.json (vl-export eval) and bench/accuracy.md (the README's table).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
MODEL=work/smollm2-vl
OUT=work/accuracy
# A label is a precision, or a weight-only precision and a method other than the default
# (GPTQ): `int4-weight-rtn` is round-to-nearest symmetric (no calibration), `-rtn-asym` with
# zero points.
PRECISIONS=${PRECISIONS:-"fp16 int8 int8-weight int8-weight-rtn int4-weight int4-weight-rtn"}
THREADS=${THREADS:-2}
# What made the table, read before anything here is written.
COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo ' (with uncommitted changes)')"
mkdir -p "$OUT" bench
test -f "$MODEL/config.json" || { echo "no $MODEL: run make real-model first" >&2; exit 1; }
test -f "$OUT/demo.mp4" || ffmpeg -loglevel error -y -f lavfi -i testsrc2=size=320x240:rate=25:duration=4 -pix_fmt yuv420p "$OUT/demo.mp4"

engine() { echo "engines/smollm2-$1"; }
build() {
  local p=$1 precision=$1 extra=()
  case "$p" in
    int8) extra=(--calib calib/default.yaml) ;;
    *-weight-rtn-asym) precision=${p%-rtn-asym}; extra=(--weight-method rtn-asym) ;;
    *-weight-rtn) precision=${p%-rtn}; extra=(--weight-method rtn-sym) ;;
  esac
  $BIN/vl-export build --model "$MODEL" --out "$(engine "$p")" --precision "$precision" "${extra[@]}"
}
# Three runs each (the table takes the fastest): a question about the video, 64 tokens.
speed() {
  for k in 1 2 3; do
    $BIN/vl-run --engine "$(engine "$1")" --video "$OUT/demo.mp4" --prompt "Describe the video in detail." \
      --max-new-tokens 64 --ignore-eos --threads "$THREADS" --json | tail -n 1 > "$OUT/$1.speed.$k.json"
  done
}

build fp32
speed fp32
for p in $PRECISIONS; do
  if ! build "$p"; then echo "skipping $p: it does not build" >&2; continue; fi
  $BIN/vl-export eval --engine "$(engine "$p")" --reference "$(engine fp32)" --video "$OUT/demo.mp4" \
    --threads "$THREADS" --json "$OUT/$p.json" > "$OUT/$p.txt"
  speed "$p"
done
python3 tools/accuracy_table.py "$OUT" fp32 $PRECISIONS > bench/accuracy.md
{
  echo
  echo "Made by \`make accuracy\` at commit $COMMIT on $(date -u +%Y-%m-%d),"
  echo "$(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $THREADS threads, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end;"
  echo "checkpoint $MODEL (model.safetensors sha256 $(sha256sum "$MODEL/model.safetensors" | cut -c1-12)), text calib/eval_text.txt"
  echo "(sha256 $(sha256sum calib/eval_text.txt | cut -c1-12)), prompts calib/eval_prompts.txt, video: ffmpeg testsrc2 (4 s)."
} >> bench/accuracy.md
cat bench/accuracy.md
