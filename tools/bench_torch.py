#!/usr/bin/env python3
"""The Python half of `vl-bench`: the PyTorch baseline and the machine's physical limits.

`vl-bench` (bench/src/main.rs) runs this script as a child process, once per
subcommand, so that each system's peak memory is its own. Each subcommand writes one JSON file.

Subcommands:
  limits   memory bandwidth (read, copy) and peak fp32 GEMM rate with torch at N threads
  torch    the baseline: transformers VideoLlavaForConditionalGeneration, eager attention, fp32,
           torch.inference_mode(), KV cache on, greedy `generate()`; per-stage timings, peak
           memory and scaling curves, in the schema vl-bench writes for its own engines
  plot     bench/results.json -> bench/bench.png (matplotlib)

The inputs come from vl-bench so that both systems see the same thing: the pixel values
(`pixel_values.npy`, preprocessed by vl from the benchmark clip), the prompt token ids
(`prompt.json`), and the clip for the decode + preprocessing stage, which each system does
its own way (here: PyAV + VideoLlavaProcessor, as the model card shows).

The schema (one "system run"):
  {"system": "pytorch", "label", "precision", "threads", "versions", "load_ms", "warmup", "reps",
   "prompt_tokens", "new_tokens", "frames",
   "samples": {"preprocess_ms": [..], "vision_ms": [..], "prefill_ms": [..], "ttft_ms": [..],
               "decode_ms_per_token": [..], "answer_ms": [..]},
   "peak_rss_mb", "decode_weight_bytes", "kv_bytes_per_position", "tokens": [..],
   "scaling": {"vision_vs_frames": [{"x", "ms"}], "prefill_vs_prompt": [...],
               "decode_vs_context": [...]},
   "notes": [..]}
"""

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np


def now():
    return time.perf_counter()


def ms_since(t0):
    return (time.perf_counter() - t0) * 1000.0


def peak_rss_mb():
    """Peak resident set size of this process so far (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_json(path, obj):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")


def set_threads(n):
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (interop threads can only be set once)
        pass


# ----------------------------------------------------------------------------- limits


def measure_limits(args):
    """Memory bandwidth and GEMM rate, best of several runs, with `args.threads` threads."""
    import torch

    set_threads(args.threads)
    gib = 1 << 30
    n = args.bandwidth_mib * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing
    reads, copies = [], []
    for _ in range(args.bandwidth_reps):
        t0 = now()
        src.sum()
        reads.append(src.numel() * 4 / (time.perf_counter() - t0))
        t0 = now()
        dst.copy_(src)
        copies.append(2 * src.numel() * 4 / (time.perf_counter() - t0))  # read + write
    del src, dst

    def gemm(m, k, n, reps):
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)  # warm-up
        best = 0.0
        for _ in range(reps):
            t0 = now()
            torch.mm(a, b)
            best = max(best, 2.0 * m * k * n / (time.perf_counter() - t0))
        return best

    square = gemm(4096, 4096, 4096, args.gemm_reps)
    prefill = gemm(2079, 4096, 11008, args.gemm_reps)
    out = {
        "threads": args.threads,
        "tool": f"torch {torch.__version__}",
        "bandwidth_read_gbs": max(reads) / 1e9,
        "bandwidth_read_samples_gbs": [r / 1e9 for r in reads],
        "bandwidth_copy_gbs": max(copies) / 1e9,
        "bandwidth_copy_samples_gbs": [c / 1e9 for c in copies],
        "bandwidth_buffer_gib": n * 4 / gib,
        "gemm_square_4096_gflops": square / 1e9,
        "gemm_prefill_shape_gflops": prefill / 1e9,
        "gemm_peak_gflops": max(square, prefill) / 1e9,
        "cpu": cpu_name(),
    }
    write_json(args.out, out)
    print(
        f"[limits] read {out['bandwidth_read_gbs']:.1f} GB/s, copy {out['bandwidth_copy_gbs']:.1f} GB/s, "
        f"GEMM {out['gemm_peak_gflops']:.0f} GFLOP/s ({args.threads} threads)",
        file=sys.stderr,
    )
    return 0


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# ----------------------------------------------------------------------------- the baseline


class TokenClock:
    """A `generate()` streamer that only timestamps: put() is called with the prompt, then once
    per new token, synchronously on CPU."""

    def __init__(self):
        self.times = []
        self.tokens = []

    def put(self, value):
        self.times.append(now())
        self.tokens.append(value.reshape(-1).tolist())

    def end(self):
        pass


class StageClock:
    """Forward hooks that timestamp the vision tower's start and the projector's end."""

    def __init__(self, model):
        self.vision_start = None
        self.vision_end = None
        inner = model.model
        self.handles = [
            inner.video_tower.register_forward_pre_hook(self._start),
            inner.multi_modal_projector.register_forward_hook(self._end),
        ]

    def _start(self, *_):
        if self.vision_start is None:
            self.vision_start = now()

    def _end(self, *_):
        self.vision_end = now()

    def reset(self):
        self.vision_start = self.vision_end = None

    def remove(self):
        for h in self.handles:
            h.remove()


def read_frames_pyav(path, n):
    """Decodes the frames at numpy.linspace(0, total - 1, n).astype(int), as vl samples them,
    the way the Video-LLaVA model card reads video (PyAV, decode in order, keep the wanted)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        total = stream.frames
        if total <= 0:  # containers without a frame count: count by decoding
            total = sum(1 for _ in container.decode(video=0))
            container.seek(0)
        indices = np.linspace(0, total - 1, n).astype(int)
        wanted = set(indices.tolist())
        picked = {}
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                picked[i] = frame.to_ndarray(format="rgb24")
            if i >= indices[-1]:
                break
    return np.stack([picked[i] for i in indices])


def bench_torch(args):
    t_import = now()
    import torch
    import transformers
    from transformers import VideoLlavaProcessor

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from oracle import load_model

    set_threads(args.threads)
    notes = list(args.note or [])
    prompt = json.loads(Path(args.prompt_json).read_text())
    ids = prompt["input_ids"]
    pixels = np.load(args.pixels)
    if pixels.ndim == 4:
        pixels = pixels[None]
    frames = pixels.shape[1]

    t0 = now()
    model = load_model(args.model)
    load_ms = ms_since(t0)
    config = model.config
    text = config.text_config
    processor = VideoLlavaProcessor.from_pretrained(args.model)
    print(f"[torch] imports {t0 - t_import:.1f} s, model loaded in {load_ms / 1000:.1f} s", file=sys.stderr)

    # Is the prompt the processor would build the one vl built? (informational)
    check = processor(text=prompt["text"], videos=[read_frames_pyav(args.video, frames)], return_tensors="pt")
    if check["input_ids"][0].tolist() != ids:
        notes.append("VideoLlavaProcessor's input_ids differ from vl's prompt ids; the ids from vl were used")

    samples = {k: [] for k in ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "answer_ms")}

    # Stage 1: video decode + preprocessing (PyAV + VideoLlavaProcessor), on its own.
    for i in range(args.warmup + args.preprocess_reps):
        t0 = now()
        out = processor(text=prompt["text"], videos=[read_frames_pyav(args.video, frames)], return_tensors="pt")
        elapsed = ms_since(t0)
        assert out["pixel_values_videos"].shape[1] == frames
        if i >= args.warmup:
            samples["preprocess_ms"].append(elapsed)

    # Stages 2-4: one greedy generate() per repetition, from the same pixel values and ids.
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)
    px = torch.from_numpy(pixels)
    stages = StageClock(model)
    tokens = []
    with torch.inference_mode():
        for i in range(args.warmup + args.reps):
            n_new = args.warmup_tokens if i < args.warmup else args.new_tokens
            clock = TokenClock()
            stages.reset()
            t0 = now()
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                pixel_values_videos=px,
                max_new_tokens=n_new,
                do_sample=False,
                streamer=clock,
            )
            answer_ms = ms_since(t0)
            new = out[0, len(ids) :].tolist()
            if len(new) != n_new or len(clock.times) != n_new + 1:
                raise RuntimeError(f"generate made {len(new)} tokens, {len(clock.times)} stream events")
            if i < args.warmup:
                continue
            first = clock.times[1]
            samples["vision_ms"].append((stages.vision_end - stages.vision_start) * 1000.0)
            samples["prefill_ms"].append((first - stages.vision_end) * 1000.0)
            samples["ttft_ms"].append((first - t0) * 1000.0)
            samples["decode_ms_per_token"].append((clock.times[-1] - first) * 1000.0 / (n_new - 1))
            samples["answer_ms"].append(answer_ms)
            tokens = new
            print(
                f"[torch] rep {i - args.warmup + 1}/{args.reps}: vision {samples['vision_ms'][-1]:.0f} ms, "
                f"prefill {samples['prefill_ms'][-1]:.0f} ms, {samples['decode_ms_per_token'][-1]:.1f} ms/token",
                file=sys.stderr,
            )
    stages.remove()
    peak = peak_rss_mb()

    lm = model.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    weight_bytes += sum(p.numel() * p.element_size() for p in model.lm_head.parameters())
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_pos = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 4

    scaling = None
    if not args.no_scaling:
        scaling = run_scaling(args, model, px, text)

    result = {
        "system": "pytorch",
        "label": "PyTorch fp32 (eager)",
        "precision": "fp32",
        "engine": None,
        "threads": args.threads,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "load_ms": load_ms,
        "warmup": args.warmup,
        "reps": args.reps,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "frames": frames,
        "samples": samples,
        "peak_rss_mb": peak,
        "decode_weight_bytes": weight_bytes,
        "kv_bytes_per_position": kv_per_pos,
        "tokens": tokens,
        "scaling": scaling,
        "notes": notes,
    }
    write_json(args.out, result)
    return 0


def filler_ids(n, bos, vocab):
    """Text-only prompt ids for the scaling curves; the same formula as vl-bench's."""
    span = min(max(vocab // 2, 1), 997)
    return [bos] + [3 + (i * 7919) % span for i in range(1, n)]


def run_scaling(args, model, px, text):
    """Vision time against frames; prefill time against prompt length (text only, fresh
    cache); decode ms/token against context length (the cache filled by a prefill, extended
    in chunks to the longer contexts)."""
    import torch
    from transformers import DynamicCache

    out = {"vision_vs_frames": [], "prefill_vs_prompt": [], "decode_vs_context": []}
    bos = text.bos_token_id if text.bos_token_id is not None else 1
    layer = model.config.vision_feature_layer
    with torch.inference_mode():
        for f in args.scaling_frames:
            sub = px[:, : min(f, px.shape[1])]
            if sub.shape[1] != f:
                sub = px[:, :1].repeat(1, f, 1, 1, 1)
            t0 = now()
            model.model.get_video_features(pixel_values_videos=sub, vision_feature_layer=layer)
            out["vision_vs_frames"].append({"x": f, "ms": ms_since(t0)})
        print(f"[torch] scaling: vision {out['vision_vs_frames']}", file=sys.stderr)

        def forward(ids, cache):
            return model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)

        def decode_point(cache, context):
            times = []
            for _ in range(args.decode_steps):
                t0 = now()
                forward([42], cache)
                times.append(ms_since(t0))
            out["decode_vs_context"].append({"x": context, "ms": float(np.median(times))})

        contexts = sorted(args.decode_contexts)
        fresh = sorted(set(args.prefill_lengths))
        cache = None
        held = 0
        for n in fresh:
            cache = DynamicCache(config=model.config.text_config)
            t0 = now()
            forward(filler_ids(n, bos, text.vocab_size), cache)
            out["prefill_vs_prompt"].append({"x": n, "ms": ms_since(t0)})
            held = n
            if n in contexts:
                decode_point(cache, n)
                held += args.decode_steps
            print(f"[torch] scaling: prefill {n} tokens {out['prefill_vs_prompt'][-1]['ms']:.0f} ms", file=sys.stderr)
        for c in contexts:
            if c in fresh:
                continue
            if cache is None or c < held:
                cache = DynamicCache(config=model.config.text_config)
                held = 0
            if c > held:
                chunk = filler_ids(c - held + 1, bos, text.vocab_size)[1:]
                forward(chunk, cache)
                held = c
            decode_point(cache, c)
            held += args.decode_steps
            print(f"[torch] scaling: decode at {c}: {out['decode_vs_context'][-1]['ms']:.1f} ms", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- plot


def plot(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(args.results).read_text())
    systems = results["systems"]
    if not systems:
        print("nothing to plot", file=sys.stderr)
        return 1
    raw = {r["label"]: r for r in results.get("raw", [])}
    new_tokens = next(iter(raw.values()), {}).get("new_tokens", 64)
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    colors = {s["label"]: f"C{k}" for k, s in enumerate(systems)}
    labels = [s["label"] for s in systems]

    def bars(ax, entries, scale, ylabel, title):
        """entries: per stage name, per system a summary (or None); grouped bars with min-max."""
        width = 0.8 / len(systems)
        for k, s in enumerate(systems):
            xs, ys, lo, hi = [], [], [], []
            for j, (_, per_system) in enumerate(entries):
                st = per_system[k]
                if not st:
                    continue
                xs.append(j + k * width)
                ys.append(st["median"] * scale)
                lo.append((st["median"] - st["min"]) * scale)
                hi.append((st["max"] - st["median"]) * scale)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=s["label"], color=colors[s["label"]])
        ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(entries))], [e[0] for e in entries])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)

    def stage(key):
        return [s["stages"].get(key) for s in systems]

    def reciprocal(summary):
        if not summary:
            return None
        return {"median": 1.0 / summary["median"], "min": 1.0 / summary["max"], "max": 1.0 / summary["min"]}

    bars(
        axes[0][0],
        [("decode +\npreprocess", stage("preprocess_ms")), ("vision", stage("vision_ms")),
         ("prefill", stage("prefill_ms")), (f"{new_tokens}-token\nanswer", stage("answer_ms"))],
        1e-3, "seconds (median, min-max)", "Per stage",
    )
    axes[0][0].legend(fontsize=8)

    ax = axes[0][1]
    for k, s in enumerate(systems):
        st = s["stages"].get("decode_ms_per_token")
        if st:
            ax.bar(k, st["median"], 0.6, yerr=[[st["median"] - st["min"]], [st["max"] - st["median"]]], capsize=3,
                   color=colors[s["label"]])
        if s.get("decode_bound_ms"):
            ax.hlines(s["decode_bound_ms"], k - 0.4, k + 0.4, colors="k", linestyles="dashed")
    ax.set_xticks(range(len(systems)), labels, fontsize=8, rotation=15)
    ax.set_ylabel("ms per token (dashed: memory-bandwidth bound)")
    ax.set_title("Decode")
    ax.grid(axis="y", alpha=0.3)

    bars(
        axes[0][2],
        [("vision", [s.get("vision_share_of_peak") for s in systems]),
         ("prefill", [s.get("prefill_share_of_peak") for s in systems]),
         ("decode: bound ÷ time", [reciprocal(s.get("decode_x_bound")) for s in systems])],
        100.0, "% of the machine's limit", "Against the physical limits",
    )
    axes[0][2].axhline(100, color="k", lw=0.8)

    curves = [
        ("decode_vs_context", axes[1][0], "context length (tokens)", "decode ms/token", 1.0,
         "Decode against context length"),
        ("prefill_vs_prompt", axes[1][1], "prompt length (tokens, text only)", "prefill s", 1e-3,
         "Time to first token against prompt length"),
        ("vision_vs_frames", axes[1][2], "frames", "vision s", 1e-3, "Vision against frames"),
    ]
    for key, ax, xlabel, ylabel, scale, title in curves:
        for s in systems:
            pts = (s.get("scaling") or {}).get(key) or []
            if pts:
                ax.plot([p["x"] for p in pts], [p["ms"] * scale for p in pts], "o-", label=s["label"],
                        color=colors[s["label"]])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    machine = results.get("machine") or {}
    fig.suptitle(
        f"{results.get('model', '')} on {machine.get('cpu', 'CPU')}, {results.get('threads', '')} threads per system"
        + ("  (SMOKE RUN: noisy, not for the README)" if results.get("smoke") else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- main


def int_list(text):
    return [int(x) for x in text.split(",") if x]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("limits", help="memory bandwidth and peak GEMM rate")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bandwidth-mib", type=int, default=1024)
    p.add_argument("--bandwidth-reps", type=int, default=5)
    p.add_argument("--gemm-reps", type=int, default=3)

    p = sub.add_parser("torch", help="the PyTorch baseline")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--pixels", required=True, help="pixel values .npy [1, F, 3, H, W]")
    p.add_argument("--prompt-json", required=True, help="{text, input_ids} written by vl-bench")
    p.add_argument("--video", required=True, help="the clip, for the decode + preprocessing stage")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--warmup-tokens", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--preprocess-reps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--scaling-frames", type=int_list, default=[1, 2, 4, 8])
    p.add_argument("--prefill-lengths", type=int_list, default=[128, 256, 512, 1024, 2048])
    p.add_argument("--decode-contexts", type=int_list, default=[512, 1024, 2048, 3072, 4088])
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--note", action="append", help="a line to record in the output's notes")

    p = sub.add_parser("plot", help="plot bench/results.json")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True)

    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "limits":
        return measure_limits(args)
    if args.command == "torch":
        if args.new_tokens < 2:
            parser.error("--new-tokens must be at least 2 (decode is timed after the first token)")
        return bench_torch(args)
    return plot(args)


if __name__ == "__main__":
    sys.exit(main())
