"""Turns work/accuracy/*.json (vl-export eval, vl-run --json) into the README's Markdown table."""
import json
import sys
from pathlib import Path


def load(path):
    return json.loads(path.read_text()) if path.exists() else None


def main():
    out, reference, precisions = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    rows = ["| precision | top-1 agreement (text) | mean KL (text) | perplexity (Δ vs fp32) | greedy prefix kept | "
            "video-feature cosine (min) | prefill ms (speed-up) | decode ms/token (speed-up) | engine MB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for p in [reference] + precisions:
        runs = [load(out / f"{p}.speed.{k}.json") for k in (1, 2, 3)]
        runs = [r["timings"] for r in runs if r]
        engine = Path(f"engines/smollm2-{p}")
        size = sum(f.stat().st_size for f in engine.glob("*.onnx*")) / 1e6 if engine.exists() else float("nan")
        prefill_ms = min((t["prefill_ms"] for t in runs), default=float("nan"))
        decode_ms = min((t["decode_ms"] / max(t["decode_steps"], 1) for t in runs), default=float("nan"))
        if p == reference:
            base = (prefill_ms, decode_ms)
        prefill = f"{prefill_ms:.0f} ({base[0] / prefill_ms:.2f}x)"
        decode = f"{decode_ms:.1f} ({base[1] / decode_ms:.2f}x)"
        if p == reference:
            rows.append(f"| {p} (reference) | 100% | 0 | — | 100% | 1 | {prefill} | {decode} | {size:.0f} |")
            continue
        ev = load(out / f"{p}.json")
        if ev is None:
            rows.append(f"| {p} | not built | | | | | | | |")
            continue
        ppl = ev["perplexity"]
        cases = ev["greedy"]["cases"]
        kept = sum(c["common_prefix"] for c in cases) / max(sum(c["reference_tokens"] for c in cases), 1)
        rows.append(
            f"| {p} | {ev['text']['top1_agreement'] * 100:.2f}% | {ev['text']['kl_mean']:.2e} | "
            f"{ppl['engine']:.3f} ({ppl['relative_change'] * 100:+.2f}%) | {kept * 100:.1f}% | "
            f"{ev['vision']['cosine_min']:.5f} | {prefill} | {decode} | {size:.0f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
