//! GPTQ (Frantar et al. 2022) as the reference `GPTQ.fasterquant` of IST-DASLab/gptq runs it
//! with `groupsize = block`, `actorder = False`, `static_groups = False`: columns are
//! quantized left to right on each group's asymmetric [`Grid`], and each column's rounding
//! error is spread over the columns not yet quantized through the upper Cholesky factor of
//! the inverse Hessian `H = 2/n X^T X` (dampened by 1% of its mean diagonal), with lazy
//! updates of 128 columns. A group's grid is fitted when its first column comes, on the
//! weights as the last lazy update left them (the reference's `W[:, i:i+groupsize]`).
//!
//! With act-order (the reference's `actorder=True, static_groups=True`), columns are quantized in
//! decreasing order of the Hessian's diagonal and each group's grid is fitted beforehand on the
//! original weights, so groups stay the contiguous blocks `MatMulNBits` reads.
//!
//! Arithmetic is f64; codes, scales and zero points come out in `MatMulNBits`' layout.
use ndarray::{ArrayView2, ArrayViewMut2, s};

use super::blocks::{BlockShape, QuantizedBlocks, pack};
use super::cholesky::{NotPositiveDefinite, upper_cholesky_of_inverse};
use super::grid::{Grid, GridFit};

/// The reference's dampening: this fraction of the mean diagonal is added to it.
pub const DAMP: f64 = 0.01;
/// Columns per lazy batch update (the reference's `blocksize`).
pub const BATCH: usize = 128;

/// The inverse Hessian of one linear input, factored: what every linear reading that input
/// (q/k/v, gate/up) is quantized with.
pub struct Factor {
    k: usize,
    /// Upper Cholesky factor of the dampened `H^-1`, row-major `k x k`.
    u: Vec<f64>,
    /// Input channels that were zero throughout calibration (their weights are set to 0).
    dead: Vec<bool>,
    /// Column `p` of the factored problem is input channel `order[p]` (act-order), or the
    /// identity.
    order: Vec<usize>,
    act_order: bool,
}

impl Factor {
    /// Factors `h` (row-major `k x k`, `X^T X` up to a positive factor); with `act_order`,
    /// its columns are taken in decreasing order of its diagonal.
    pub fn new(mut h: Vec<f64>, k: usize, act_order: bool) -> Result<Self, NotPositiveDefinite> {
        let mut dead = vec![false; k];
        for (i, d) in dead.iter_mut().enumerate() {
            if h[i * k + i] == 0.0 {
                *d = true;
                h[i * k + i] = 1.0;
            }
        }
        let mut order: Vec<usize> = (0..k).collect();
        if act_order {
            // Stable, as the reference's argsort(descending=True, stable=True).
            order.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
            let mut p = vec![0f64; k * k];
            for (i, &oi) in order.iter().enumerate() {
                for (j, &oj) in order.iter().enumerate() {
                    p[i * k + j] = h[oi * k + oj];
                }
            }
            h = p;
        }
        let damp = DAMP * (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
        for i in 0..k {
            h[i * k + i] += damp;
        }
        let u = upper_cholesky_of_inverse(h, k).map_err(|e| NotPositiveDefinite { column: order[e.column], ..e })?;
        Ok(Self { k, u, dead, order, act_order })
    }

    /// Input channels.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// Quantizes row-major `w` (`[n, k]`, a PyTorch `Linear` weight) by GPTQ with `factor` (of
/// its input's Hessian), `bits` per code and one grid per `block` columns of a row.
pub fn quantize(w: &[f32], n: usize, factor: &Factor, bits: u8, block: usize, fit: GridFit) -> QuantizedBlocks {
    let k = factor.k;
    let shape = BlockShape { n, k, bits, block };
    let kb = shape.k_blocks();
    let order = &factor.order;
    let value = |r: usize, c: usize| if factor.dead[c] { 0.0 } else { f64::from(w[r * k + c]) };
    // Transposed, in the factored order: wt[p * n + r] is w[r][order[p]], so a column is
    // contiguous.
    let mut wt = vec![0f64; k * n];
    for r in 0..n {
        for (p, &c) in order.iter().enumerate() {
            wt[p * n + r] = value(r, c);
        }
    }
    let u = &factor.u;
    let mut codes = vec![0u8; n * k];
    let mut grids = vec![Grid { scale: 0.0, zero: 0, max_code: 0 }; n * kb];
    // One group's values, reused for every grid fitted.
    let mut group = Vec::with_capacity(block);
    if factor.act_order {
        for r in 0..n {
            for g in 0..kb {
                group.clear();
                group.extend((g * block..((g + 1) * block).min(k)).map(|c| value(r, c)));
                grids[r * kb + g] = fit.fit(&group, bits);
            }
        }
    }
    for i1 in (0..k).step_by(BATCH) {
        let i2 = (i1 + BATCH).min(k);
        let count = i2 - i1;
        let mut w1 = wt[i1 * n..i2 * n].to_vec();
        let mut err1 = vec![0f64; count * n];
        for i in 0..count {
            let col = i1 + i;
            let channel = order[col];
            if !factor.act_order && col % block == 0 {
                let g = col / block;
                let end = (col + block).min(k);
                for r in 0..n {
                    group.clear();
                    group.extend((col..end).map(|c| wt[c * n + r]));
                    grids[r * kb + g] = fit.fit(&group, bits);
                }
            }
            let d = u[col * k + col];
            let (head, tail) = w1.split_at_mut((i + 1) * n);
            let wcol = &head[i * n..];
            let e = &mut err1[i * n..(i + 1) * n];
            for r in 0..n {
                let grid = &grids[r * kb + channel / block];
                let q = grid.code(wcol[r]);
                codes[r * k + channel] = q;
                e[r] = (wcol[r] - grid.value(q)) / d;
            }
            for (j, rest) in tail.chunks_exact_mut(n).enumerate() {
                let h = u[col * k + col + 1 + j];
                if h != 0.0 {
                    rest.iter_mut().zip(e.iter()).for_each(|(v, e)| *v -= e * h);
                }
            }
        }
        if i2 < k {
            // wt[i2..] -= U[i1..i2, i2..]^T · err1
            let (Ok(ub), Ok(eb), Ok(mut rest)) = (
                ArrayView2::from_shape((count, k), &u[i1 * k..i2 * k]),
                ArrayView2::from_shape((count, n), &err1[..]),
                ArrayViewMut2::from_shape((k - i2, n), &mut wt[i2 * n..]),
            ) else {
                unreachable!("the shapes are those of the slices")
            };
            ndarray::linalg::general_mat_mul(-1.0, &ub.slice(s![.., i2..]).t(), &eb, 1.0, &mut rest);
        }
    }
    pack(&codes, &grids, shape)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::weight_codes::blocks::{dequantize, quantize_asym};

    /// ||X (W - Q)^T||² for row-major x `[t, k]`.
    fn output_error(x: &[f32], w: &[f32], q: &[f32], n: usize, k: usize) -> f64 {
        let mut total = 0f64;
        for xr in x.chunks_exact(k) {
            for r in 0..n {
                let d: f64 = (0..k).map(|c| f64::from(xr[c]) * f64::from(w[r * k + c] - q[r * k + c])).sum();
                total += d * d;
            }
        }
        total
    }

    #[test]
    fn beats_round_to_nearest_on_correlated_inputs() {
        let (n, k, t) = (8, 64, 256);
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..n * k).map(|_| next() as f32).collect();
        let base: Vec<f64> = (0..t).map(|_| next()).collect();
        let x: Vec<f32> =
            (0..t * k).map(|i| (base[i / k] * 2.0 + next() * if i % k == 3 { 10.0 } else { 0.5 }) as f32).collect();
        let mut h = vec![0f64; k * k];
        for xr in x.chunks_exact(k) {
            for a in 0..k {
                for b in 0..k {
                    h[a * k + b] += 2.0 / t as f64 * f64::from(xr[a]) * f64::from(xr[b]);
                }
            }
        }
        let r = dequantize(&quantize_asym(&w, n, k, 4, 32), n, k, 4, 32);
        let er = output_error(&x, &w, &r, n, k);
        for act_order in [false, true] {
            let f = Factor::new(h.clone(), k, act_order).unwrap();
            let g = dequantize(&quantize(&w, n, &f, 4, 32, GridFit::MinMax), n, k, 4, 32);
            let eg = output_error(&x, &w, &g, n, k);
            assert!(eg < 0.8 * er, "GPTQ (act-order {act_order}) {eg} vs RTN {er}");
        }
    }
}
