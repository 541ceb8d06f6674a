"""Reference GPTQ and asymmetric round-to-nearest for the Rust tests (exporter/src/weight_codes).

Follows IST-DASLab/gptq: `Quantizer.find_params(perchannel=True, sym=False)` (the range widened
to include 0, scale = (max - min) / maxq, zero = round(-min / scale)) and `GPTQ.fasterquant`
(H = 2/n X^T X, dead channels, 1% dampening, Cholesky of H^-1 upper, lazy batches of 128
columns, a group's parameters found on `W[:, i:i+groupsize]` when it starts, static_groups=False,
no act-order; and with actorder=True, static_groups=True: columns by decreasing diag(H), every
group's parameters found on the original W first), in torch float64 on the CPU. The one deliberate difference: the scale is
rounded to float32 before codes are taken (it is stored as float32 in the engine), as the Rust
code does.

Writes tests/fixtures/gptq/: a seeded problem (W 48x256, X 512x256 with outlier channels) and
for 4-bit groups of 32 and 128 the codes, scales and zero points of GPTQ and of RTN.

    .oracle/bin/python tools/gptq_reference.py --out tests/fixtures/gptq   (make gptq-goldens)
"""
import argparse
import math
import os

import numpy as np
import torch

BITS = 4
GROUPS = (32, 128)
BLOCKSIZE = 128
PERCDAMP = 0.01


def find_params(x, maxq, mse=False, norm=2.4, grid=100, maxshrink=0.8):
    """Per row of x: (scale float32-rounded, zero), as Quantizer.find_params(weight=True), with
    Quantizer(mse=True)'s search when asked: the range shrunk by 1 - i/grid, least sum |q - x|^norm."""
    xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0], dtype=x.dtype))
    xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0], dtype=x.dtype))
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = ((xmax - xmin) / maxq).to(torch.float32).to(x.dtype)
    zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    if mse:
        best = torch.full([x.shape[0]], float("inf"), dtype=x.dtype)
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            xmin1, xmax1 = p * xmin, p * xmax
            scale1 = ((xmax1 - xmin1) / maxq).to(torch.float32).to(x.dtype)
            zero1 = torch.clamp(torch.round(-xmin1 / scale1), 0, maxq)
            _, deq = quantize(x, scale1.unsqueeze(1), zero1.unsqueeze(1), maxq)
            err = (deq - x).abs().pow(norm).sum(1)
            tmp = err < best
            best[tmp] = err[tmp]
            scale[tmp] = scale1[tmp]
            zero[tmp] = zero1[tmp]
    return scale, zero


def quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


def rtn(W, group, maxq, mse=False):
    rows, cols = W.shape
    codes = torch.zeros_like(W)
    scales, zeros = [], []
    for c in range(0, cols, group):
        scale, zero = find_params(W[:, c:c + group], maxq, mse)
        codes[:, c:c + group], _ = quantize(W[:, c:c + group], scale.unsqueeze(1), zero.unsqueeze(1), maxq)
        scales.append(scale)
        zeros.append(zero)
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1)


def fasterquant(W, H, group, maxq, actorder=False, mse=False):
    W = W.clone()
    H = H.clone()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    codes = torch.zeros_like(W)
    scales = torch.zeros(rows, math.ceil(columns / group), dtype=W.dtype)
    zeros = torch.zeros_like(scales)
    groups = []
    if actorder:  # static_groups=True
        for i in range(0, columns, group):
            scale, zero = find_params(W[:, i:(i + group)], maxq, mse)
            groups.append((scale, zero))
            scales[:, i // group] = scale
            zeros[:, i // group] = zero
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    damp = PERCDAMP * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    scale = zero = None
    for i1 in range(0, columns, BLOCKSIZE):
        i2 = min(i1 + BLOCKSIZE, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if actorder:
                scale, zero = groups[perm[i1 + i] // group]
            elif (i1 + i) % group == 0:
                scale, zero = find_params(W[:, (i1 + i):(i1 + i + group)], maxq, mse)
                scales[:, (i1 + i) // group] = scale
                zeros[:, (i1 + i) // group] = zero
            q, deq = quantize(w, scale, zero, maxq)
            codes[:, i1 + i] = q
            err1 = (w - deq) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        codes = codes[:, invperm]
    return codes, scales, zeros


def problem(seed=0):
    rng = np.random.default_rng(seed)
    n, k, t = 48, 256, 512
    W = rng.normal(0, 0.05, (n, k)).astype(np.float32)
    # Correlated inputs (a shared low-rank part) with a few outlier channels, as LLM activations.
    X = (rng.normal(0, 1, (t, 8)) @ rng.normal(0, 1, (8, k)) * 0.5 + rng.normal(0, 1, (t, k))).astype(np.float32)
    X[:, [5, 77, 200]] *= 20.0
    X[:, 130] = 0.0  # a dead channel
    return W, X


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/gptq")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    W, X = problem()
    np.save(os.path.join(args.out, "w.npy"), W)
    np.save(os.path.join(args.out, "x.npy"), X)
    Wd, Xd = torch.from_numpy(W).double(), torch.from_numpy(X).double()
    H = 2.0 / Xd.shape[0] * Xd.t().matmul(Xd)
    maxq = 2**BITS - 1
    lines = []
    for group in GROUPS:
        for name, (codes, scales, zeros) in (
            ("gptq", fasterquant(Wd, H, group, maxq)),
            ("gptq_ao", fasterquant(Wd, H, group, maxq, actorder=True)),
            ("rtn", rtn(Wd, group, maxq)),
            ("gptq_ao_mse", fasterquant(Wd, H, group, maxq, actorder=True, mse=True)),
            ("rtn_mse", rtn(Wd, group, maxq, mse=True)),
        ):
            np.save(os.path.join(args.out, f"{name}_g{group}_codes.npy"), codes.numpy().astype(np.uint8))
            np.save(os.path.join(args.out, f"{name}_g{group}_scales.npy"), scales.numpy().astype(np.float32))
            np.save(os.path.join(args.out, f"{name}_g{group}_zeros.npy"), zeros.numpy().astype(np.uint8))
            deq = (codes - zeros.repeat_interleave(group, 1)[:, :W.shape[1]]) * scales.repeat_interleave(group, 1)[:, :W.shape[1]]
            err = torch.linalg.norm(Xd @ (Wd - deq).t()).item()
            lines.append(f"- {name}, group {group}: ||X W^T - X Q^T||_F = {err:.6f}")
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write("# GPTQ and asymmetric RTN reference\n\n")
        f.write("Made by `make gptq-goldens`:\n\n    .oracle/bin/python tools/gptq_reference.py --out tests/fixtures/gptq\n\n")
        f.write(f"torch {torch.__version__}, numpy {np.__version__}; float64 on the CPU; {BITS} bits, groups {GROUPS}.\n")
        f.write("Inputs: `w.npy` (48x256), `x.npy` (512x256, outlier channels 5, 77, 200; channel 130 zero), seed 0.\n")
        f.write("Outputs: `{gptq,gptq_ao,rtn,gptq_ao_mse,rtn_mse}_g{32,128}_{codes,scales,zeros}.npy` (codes [48, 256],\n")
        f.write("scales and zeros [48, 256/g]); `gptq_ao` is GPTQ with actorder=True, static_groups=True; `_mse` fits each\n")
        f.write("group's range by Quantizer(mse=True)'s search (norm 2.4, grid 100, maxshrink 0.8).\n\n")
        f.write("Output error of each on X:\n\n" + "\n".join(lines) + "\n\nDo not edit by hand; regenerate.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
