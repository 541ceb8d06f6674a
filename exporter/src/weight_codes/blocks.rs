//! Block quantization of linear weights, in the layout of ONNX Runtime's `MatMulNBits`: for
//! each output row, blocks of `block` inputs share one scale; codes are unsigned, packed low
//! bits first. Two schemes:
//!
//! - symmetric ([`quantize`]): the implicit zero point 2^(bits-1); as llama.cpp's Q4_0 does,
//!   the scale maps the block's value of largest magnitude exactly to the most negative code,
//!   so the wider half of the code range is used where the extreme is;
//! - asymmetric ([`quantize_asym`], and GPTQ's codes through [`pack`]): one zero point per
//!   block (the [`Grid`] of its values), given to `MatMulNBits` as its `zero_points` input.
use super::grid::Grid;

/// Quantized blocks of a `[n, k]` matrix.
pub struct QuantizedBlocks {
    /// Packed codes `[n, k_blocks, block * bits / 8]`.
    pub codes: Vec<u8>,
    /// Scales `[n, k_blocks]`.
    pub scales: Vec<f32>,
    /// Zero points as `MatMulNBits` takes them (`None`: the implicit 2^(bits-1)): for each row,
    /// `ceil(k_blocks * bits / 8)` bytes; at 4 bits two per byte, low nibble first.
    pub zero_points: Option<Vec<u8>>,
    /// Blocks per row.
    pub k_blocks: usize,
}

/// The shape of a block-quantized `[n, k]` matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    /// Rows (outputs).
    pub n: usize,
    /// Columns (inputs).
    pub k: usize,
    /// 4 or 8.
    pub bits: u8,
    /// Columns per block.
    pub block: usize,
}

impl BlockShape {
    /// Blocks per row.
    pub fn k_blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// Bytes of one block's packed codes.
    pub fn blob(&self) -> usize {
        self.block * self.bits as usize / 8
    }

    /// Bytes of one row's packed zero points.
    pub fn zero_row_bytes(&self) -> usize {
        (self.k_blocks() * self.bits as usize).div_ceil(8)
    }
}

/// Quantizes row-major `w` of shape `[n, k]` (a PyTorch `Linear` weight: rows are outputs),
/// symmetric.
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
            pack_codes(&q, bits, out);
        }
    }
    QuantizedBlocks { codes, scales, zero_points: None, k_blocks }
}

/// Quantizes row-major `w` of shape `[n, k]` round-to-nearest on each block's asymmetric
/// [`Grid`] (scale and zero point).
pub fn quantize_asym(w: &[f32], n: usize, k: usize, bits: u8, block: usize) -> QuantizedBlocks {
    let shape = BlockShape { n, k, bits, block };
    let kb = shape.k_blocks();
    let mut codes = vec![0u8; n * k];
    let mut grids = Vec::with_capacity(n * kb);
    for (row, out) in w.chunks_exact(k).zip(codes.chunks_exact_mut(k)) {
        for (values, out) in row.chunks(block).zip(out.chunks_mut(block)) {
            let g = Grid::fit(values.iter().map(|&v| f64::from(v)), bits);
            for (c, &v) in out.iter_mut().zip(values) {
                *c = g.code(f64::from(v));
            }
            grids.push(g);
        }
    }
    pack(&codes, &grids, shape)
}

/// Packs unpacked codes `[n, k]` (one per byte) and the grid of each block `[n, k_blocks]`
/// into `MatMulNBits`' layout, with zero points.
pub fn pack(codes: &[u8], grids: &[Grid], s: BlockShape) -> QuantizedBlocks {
    let (kb, blob, zrow) = (s.k_blocks(), s.blob(), s.zero_row_bytes());
    let mut packed = vec![0u8; s.n * kb * blob];
    let mut zero_points = vec![0u8; s.n * zrow];
    let mut q = vec![0u8; s.block];
    for row in 0..s.n {
        for b in 0..kb {
            let start = b * s.block;
            let end = (start + s.block).min(s.k);
            q.iter_mut().for_each(|c| *c = 0);
            q[..end - start].copy_from_slice(&codes[row * s.k + start..row * s.k + end]);
            pack_codes(&q, s.bits, &mut packed[(row * kb + b) * blob..][..blob]);
        }
        let zeros: Vec<u8> = grids[row * kb..(row + 1) * kb].iter().map(|g| g.zero).collect();
        pack_codes_padded(&zeros, s.bits, &mut zero_points[row * zrow..(row + 1) * zrow]);
    }
    QuantizedBlocks {
        codes: packed,
        scales: grids.iter().map(|g| g.scale).collect(),
        zero_points: Some(zero_points),
        k_blocks: kb,
    }
}

fn pack_codes(q: &[u8], bits: u8, out: &mut [u8]) {
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

/// As [`pack_codes`], for a count that may be odd at 4 bits (the last high nibble stays 0).
fn pack_codes_padded(q: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(q),
        _ => {
            for (i, &c) in q.iter().enumerate() {
                out[i / 2] |= (c & 0x0f) << (4 * (i % 2));
            }
        }
    }
}

fn unpack(bytes: &[u8], bits: u8, i: usize) -> u8 {
    match bits {
        8 => bytes[i],
        _ => (bytes[i / 2] >> (4 * (i % 2))) & 0x0f,
    }
}

/// The codes `[n, k]`, one per byte, and the zero point of each block `[n, k_blocks]`.
pub fn unpack_codes(qb: &QuantizedBlocks, s: BlockShape) -> (Vec<u8>, Vec<u8>) {
    let (blob, zrow) = (s.blob(), s.zero_row_bytes());
    let implicit = 1u8 << (s.bits - 1);
    let mut codes = vec![0u8; s.n * s.k];
    let mut zeros = vec![implicit; s.n * qb.k_blocks];
    for row in 0..s.n {
        for b in 0..qb.k_blocks {
            let bytes = &qb.codes[(row * qb.k_blocks + b) * blob..][..blob];
            for i in 0..s.block.min(s.k - b * s.block) {
                codes[row * s.k + b * s.block + i] = unpack(bytes, s.bits, i);
            }
            if let Some(z) = &qb.zero_points {
                zeros[row * qb.k_blocks + b] = unpack(&z[row * zrow..], s.bits, b);
            }
        }
    }
    (codes, zeros)
}

/// Dequantizes back to `[n, k]` (for tests and error measurement).
pub fn dequantize(qb: &QuantizedBlocks, n: usize, k: usize, bits: u8, block: usize) -> Vec<f32> {
    let s = BlockShape { n, k, bits, block };
    let (codes, zeros) = unpack_codes(qb, s);
    let mut w = vec![0f32; n * k];
    for row in 0..n {
        for i in 0..k {
            let b = row * qb.k_blocks + i / block;
            w[row * k + i] = (i32::from(codes[row * k + i]) - i32::from(zeros[b])) as f32 * qb.scales[b];
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
    fn asymmetric_round_trip_is_within_half_a_step_and_zero_points_pack_per_row() {
        for bits in [4u8, 8] {
            // 3 blocks per row: an odd count, so each row's 4-bit zero points end half a byte early.
            let (n, k, block) = (3, 80, 32);
            let w = sample(n, k);
            let qb = quantize_asym(&w, n, k, bits, block);
            let s = BlockShape { n, k, bits, block };
            assert_eq!(qb.zero_points.as_ref().unwrap().len(), n * s.zero_row_bytes());
            let back = dequantize(&qb, n, k, bits, block);
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let step = qb.scales[(i / k) * qb.k_blocks + (i % k) / block];
                assert!((a - b).abs() <= 0.5 * step * (1.0 + 1e-5), "bits {bits}: {a} vs {b}, step {step}");
            }
        }
        let w: Vec<f32> = (0..96).map(|i| i as f32).collect();
        let qb = quantize_asym(&w, 1, 96, 4, 32);
        // All positive: every block's range is [0, max], zero point 0.
        assert_eq!(qb.zero_points.unwrap(), vec![0, 0]);
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
