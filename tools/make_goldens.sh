#!/usr/bin/env bash
# Regenerates tests/fixtures/{tiny,tiny-gqa,tiny-original} with transformers, from checkpoints synthesized by
# vl-export with the same specs as tests/support.rs, then checks the exported graphs live.
# Needs `make setup oracle-setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.oracle/bin/python
BIN=./target/release/vl-export
WORK=work/goldens
mkdir -p "$WORK"
declare -A CASES=(
  [tiny]=""
  [tiny-gqa]="--kv-heads 2 --feature-layer=-3,-1"
)
for name in "${!CASES[@]}"; do
  # shellcheck disable=SC2086
  $BIN synth --preset tiny ${CASES[$name]} --out "$WORK/$name"
  $PY tools/oracle.py goldens --model "$WORK/$name" --out "tests/fixtures/$name"
  sed -i "s#--model $WORK/$name#--model $WORK/$name  (made by: $BIN synth --preset tiny ${CASES[$name]})#" "tests/fixtures/$name/README.md"
  $BIN build --model "$WORK/$name" --out "$WORK/$name-engine"
  $PY tools/oracle.py check --engine "$WORK/$name-engine"
  $PY tools/oracle.py compare --engine "$WORK/$name-engine" --fixture "tests/fixtures/$name"
done
# The original Video-LLaVA layout (LanguageBind video tower with temporal attention): its own
# PyTorch reference, the same fixture format, the same engine checks.
name=tiny-original
$BIN synth --preset tiny --layout original --out "$WORK/$name"
$PY tools/oracle_original.py goldens --model "$WORK/$name" --out "tests/fixtures/$name"
sed -i "s#--model $WORK/$name#--model $WORK/$name  (made by: $BIN synth --preset tiny --layout original)#" "tests/fixtures/$name/README.md"
$BIN build --model "$WORK/$name" --out "$WORK/$name-engine"
$PY tools/oracle.py check --engine "$WORK/$name-engine"
$PY tools/oracle.py compare --engine "$WORK/$name-engine" --fixture "tests/fixtures/$name"
