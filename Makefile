# vl: Video-LLaVA export and runtime. Each target is one line of intent.
SHELL := /bin/bash
VENV := .venv
ORACLE := .oracle
ORT_VERSION := 1.31.1
CARGO ?= cargo
WORK := work

.PHONY: setup oracle-setup build demo test parity goldens bench fmt lint clean

# System ffmpeg, the ONNX Runtime shared library (PyPI wheel) in .venv, and a release build.
setup:
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null)
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	@$(VENV)/bin/python -c "import onnxruntime" 2>/dev/null || $(VENV)/bin/pip install -q onnxruntime==$(ORT_VERSION)
	$(CARGO) build --release --workspace

# The Python reference (torch + transformers, ~3 GB), kept out of `make test`.
oracle-setup:
	@test -x $(ORACLE)/bin/python || python3 -m venv $(ORACLE)
	$(ORACLE)/bin/pip install -q torch torchvision transformers safetensors accelerate pillow numpy onnx onnxruntime==$(ORT_VERSION) tokenizers

build:
	$(CARGO) build --release --workspace

# Synthesize a small checkpoint, export it, make a short video and ask about it.
demo: setup
	./target/release/vl-export synth --preset small --out $(WORK)/small
	./target/release/vl-export build --model $(WORK)/small --out engines/small
	ffmpeg -loglevel error -y -f lavfi -i testsrc2=size=320x240:rate=25:duration=4 -pix_fmt yuv420p $(WORK)/demo.mp4
	./target/release/vl-run --engine engines/small --video $(WORK)/demo.mp4 --prompt "What happens in this video?" --max-new-tokens 24 --stats

test:
	$(CARGO) test --release --workspace

# Regenerate the golden fixtures with transformers, then compare live (needs oracle-setup).
goldens:
	bash tools/make_goldens.sh

parity: goldens
	$(CARGO) test --release --workspace --test parity

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --all-targets -- -D warnings

clean:
	rm -rf $(WORK) target
