//! Symmetric block quantization of linear weights, in the layout of ONNX Runtime's
//! `MatMulNBits`: for each output row, blocks of `block` inputs share one scale; codes are
//! unsigned with the implicit zero point 2^(bits-1), packed low bits first.
//!
//! As llama.cpp's Q4_0 does, the scale maps the block's value of largest magnitude exactly to
//! the most negative code, so the wider half of the code range is used where the extreme is.

/// Quantized blocks of a `[n, k]` matrix.
pub struct QuantizedBlocks {
    /// Packed codes `[n, k_blocks, block * bits / 8]`.
    pub codes: Vec<u8>,
    /// Scales `[n, k_blocks]`.
    pub scales: Vec<f32>,
    /// Blocks per row.
    pub k_blocks: usize,
}

/// Quantizes row-major `w` of shape `[n, k]` (a PyTorch `Linear` weight: rows are outputs).
pub fn quantize(w: &[f32], n: usize, k: usize, bits: u8, block: usize) -> QuantizedBlocks {
    let k_blocks = k.div_ceil(block);
    let blob = block * bits as usize / 8;
    let zero = 1i32 << (bits - 1);
    let max_code = (1i32 << bits) - 1;
    let mut codes = vec![0u8; n * k_blocks * blob];
    let mut scales = vec![0f32; n * k_blocks];
    let mut q = vec![0u8; block];
    for row in 0..n {
        for b in 0..k_blocks {
            let start = b * block;
            let end = (start + block).min(k);
            let values = &w[row * k + start..row * k + end];
            let extreme = values.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let scale = extreme / -(zero as f32);
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            q.iter_mut().for_each(|c| *c = zero as u8);
            for (c, &v) in q.iter_mut().zip(values) {
                *c = ((v * inv).round() as i32 + zero).clamp(0, max_code) as u8;
            }
            scales[row * k_blocks + b] = scale;
            let out = &mut codes[(row * k_blocks + b) * blob..][..blob];
            pack(&q, bits, out);
        }
    }
    QuantizedBlocks { codes, scales, k_blocks }
}

fn pack(q: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(q),
        4 => {
            for (o, pair) in out.iter_mut().zip(q.chunks_exact(2)) {
                *o = (pair[0] & 0x0f) | (pair[1] << 4);
            }
        }
        _ => unreachable!("only 4 and 8 bits are offered"),
    }
}

/// Dequantizes back to `[n, k]` (for tests and error measurement).
pub fn dequantize(qb: &QuantizedBlocks, n: usize, k: usize, bits: u8, block: usize) -> Vec<f32> {
    let blob = block * bits as usize / 8;
    let zero = 1i32 << (bits - 1);
    let mut w = vec![0f32; n * k];
    for row in 0..n {
        for b in 0..qb.k_blocks {
            let scale = qb.scales[row * qb.k_blocks + b];
            let bytes = &qb.codes[(row * qb.k_blocks + b) * blob..][..blob];
            for i in 0..block.min(k - b * block) {
                let code = match bits {
                    8 => bytes[i],
                    _ => (bytes[i / 2] >> (4 * (i % 2))) & 0x0f,
                };
                w[row * k + b * block + i] = (code as i32 - zero) as f32 * scale;
            }
        }
    }
    w
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample(n: usize, k: usize) -> Vec<f32> {
        (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32)).collect()
    }

    #[test]
    fn round_trip_error_is_within_half_a_step_except_at_the_clamped_end() {
        for bits in [4u8, 8] {
            let (n, k, block) = (3, 80, 32);
            let w = sample(n, k);
            let qb = quantize(&w, n, k, bits, block);
            let back = dequantize(&qb, n, k, bits, block);
            for row in 0..n {
                for b in 0..qb.k_blocks {
                    let step = qb.scales[row * qb.k_blocks + b].abs();
                    for i in b * block..((b + 1) * block).min(k) {
                        let err = (w[row * k + i] - back[row * k + i]).abs();
                        // Codes span [-2^(b-1), 2^(b-1) - 1]: a value as large as the extreme
                        // but of the other sign is clamped by at most one step.
                        let clamped = (w[row * k + i] / step).abs() > (1 << (bits - 1)) as f32 - 1.0;
                        let bound = if clamped { step } else { step * 0.5 };
                        assert!(err <= bound + 1e-5, "bits {bits}: error {err} > {bound}");
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_maps_exactly_and_zero_block_is_zero() {
        let mut w = vec![0.5f32; 32];
        w[3] = -2.0;
        let qb = quantize(&w, 1, 32, 4, 32);
        let back = dequantize(&qb, 1, 32, 4, 32);
        assert_eq!(back[3], -2.0);
        let zeros = quantize(&[0.0; 32], 1, 32, 4, 32);
        assert!(dequantize(&zeros, 1, 32, 4, 32).iter().all(|&v| v == 0.0));
    }
}
