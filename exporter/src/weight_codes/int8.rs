//! Symmetric int8 weights, one scale per output channel, laid out for a QDQ `MatMul`: codes
//! `[inp, out]` (the transposed PyTorch weight) with `DequantizeLinear(axis = 1)`.
//!
//! Codes span [-127, 127]: the symmetric range TensorRT requires of weights.

/// Largest weight code.
pub const QMAX: f32 = 127.0;

/// A quantized `Linear` weight.
pub struct Int8Weight {
    /// Codes `[inp, out]`, row-major.
    pub codes: Vec<i8>,
    /// One scale per output channel `[out]`.
    pub scales: Vec<f32>,
}

/// Quantizes row-major `w` of shape `[out, inp]` (a PyTorch `Linear` weight).
pub fn quantize(w: &[f32], out: usize, inp: usize) -> Int8Weight {
    let mut codes = vec![0i8; out * inp];
    let mut scales = vec![0f32; out];
    for (o, row) in w.chunks_exact(inp).enumerate() {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        // An all-zero row gets scale 1: any nonzero scale dequantizes its zero codes exactly.
        let scale = if amax > 0.0 { amax / QMAX } else { 1.0 };
        let inv = 1.0 / scale;
        for (j, &v) in row.iter().enumerate() {
            codes[j * out + o] = (v * inv).round().clamp(-QMAX, QMAX) as i8;
        }
        scales[o] = scale;
    }
    Int8Weight { codes, scales }
}

/// The activation scale for clipping threshold `threshold` (codes [-128, 127], zero point 0).
/// A tensor that was zero throughout calibration gets a tiny positive scale, never 0.
pub fn activation_scale(threshold: f32) -> f32 {
    (threshold / QMAX).max(f32::MIN_POSITIVE * 1e6)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_within_half_a_step_and_layout_is_transposed() {
        let (out, inp) = (3, 5);
        let w: Vec<f32> = (0..out * inp).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1 * (1 + i / inp) as f32).collect();
        let q = quantize(&w, out, inp);
        for o in 0..out {
            let step = q.scales[o];
            let amax = w[o * inp..(o + 1) * inp].iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((step * QMAX - amax).abs() <= 1e-6 * amax.max(1.0));
            for j in 0..inp {
                let back = f32::from(q.codes[j * out + o]) * step;
                assert!((back - w[o * inp + j]).abs() <= 0.5 * step + 1e-6);
            }
        }
        let zero = quantize(&[0.0; 4], 1, 4);
        assert!(zero.codes.iter().all(|&c| c == 0) && zero.scales[0] > 0.0);
    }
}
