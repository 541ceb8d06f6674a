"""Copies a checkpoint with Gaussian noise added to its language model's linear weights, so their
values are no longer on a 4-bit grid (work/smollm2-vl's LLM weights come from a Q4_1 GGUF: every
block of 32 already holds at most 16 distinct values, on a grid with a float scale and minimum,
which a block-32 quantizer can come close to reproducing).

Each row of every `language_model.model.layers.*.{self_attn,mlp}.*_proj.weight` gets noise of
std = FACTOR x that row's std (default 0.1: about 0.4 of a Q4_1 step, which spreads values
across the grid; 0.25 left a model with perplexity 4,371 on calib/eval_text.txt, no longer a
language model), seeded; other tensors (vision towers, projector, embeddings, which are also
the tied output head, norms) are copied unchanged, as are the config and tokenizer files. The noisy model is a different model: compare quantizations of it with its
own fp32 engine.

    .oracle/bin/python tools/noisy_checkpoint.py --model work/smollm2-vl --out work/smollm2-vl-noisy
"""
import argparse
import glob
import os
import re
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

LINEAR = re.compile(r"^language_model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--factor", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for f in sorted(os.listdir(args.model)):
        src = os.path.join(args.model, f)
        if os.path.isfile(src) and not f.endswith(".safetensors"):
            shutil.copyfile(src, os.path.join(args.out, f))
    changed = 0
    for path in sorted(glob.glob(os.path.join(args.model, "*.safetensors"))):
        tensors = load_file(path)
        for name in sorted(tensors):
            if LINEAR.match(name):
                w = tensors[name]
                w32 = w.astype(np.float32)
                std = w32.std(axis=1, keepdims=True)
                tensors[name] = (w32 + rng.normal(0.0, 1.0, w32.shape).astype(np.float32) * args.factor * std).astype(w.dtype)
                changed += 1
        save_file(tensors, os.path.join(args.out, os.path.basename(path)), metadata={"format": "pt"})
    print(f"{changed} linear weights perturbed (std {args.factor} x row std, seed {args.seed}) -> {args.out}")


if __name__ == "__main__":
    main()
