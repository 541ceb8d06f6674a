//! SmoothQuant (Xiao et al., 2023): an LLM's activations have a few channels of much larger
//! magnitude than the rest, which a per-tensor int8 scale cannot serve. Dividing channel `j` of
//! the activations by `s_j` and multiplying column `j` of every weight that reads them by `s_j`
//! leaves the product unchanged and moves part of the difficulty into the weights, which are
//! quantized per output channel:
//!
//! `s_j = max|X_j|^α / max|W_{:,j}|^(1-α)`, the weight maximum taken over every linear that
//! shares the input (q, k and v; gate and up).
//!
//! The division is folded into the weight of the norm that produces the activations, so the
//! smoothed graph has no extra operator.

/// Bounds of a smoothing factor (as the reference implementation clamps them).
const MIN_FACTOR: f32 = 1e-5;
const MAX_FACTOR: f32 = 1e5;

/// Largest magnitude of each input column of a PyTorch `Linear` weight stored `[out, inp]`,
/// folded into `into` (`inp` long).
pub fn column_amax(weight: &[f32], inp: usize, into: &mut [f32]) {
    crate::quant::stats::channel_amax(weight, inp, into);
}

/// The smoothing factors of one group: `act_amax` per channel of the shared input,
/// `weight_amax` per input column over the group's weights, migration strength `alpha`.
/// Channels never active (or with all-zero weights) keep factor 1.
pub fn factors(act_amax: &[f32], weight_amax: &[f32], alpha: f32) -> Vec<f32> {
    act_amax
        .iter()
        .zip(weight_amax)
        .map(|(&a, &w)| {
            if a <= 0.0 || w <= 0.0 || !a.is_finite() || !w.is_finite() {
                return 1.0;
            }
            (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(MIN_FACTOR, MAX_FACTOR)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn factors_balance_activation_and_weight_maxima() {
        let act = [100.0f32, 1.0, 0.0];
        let w = [0.01f32, 1.0, 3.0];
        let s = factors(&act, &w, 0.5);
        // After smoothing, max|X_j| / s_j equals max|W_j| * s_j at alpha 0.5.
        for j in 0..2 {
            let (x, ww) = (act[j] / s[j], w[j] * s[j]);
            assert!((x - ww).abs() <= 1e-4 * x.max(ww), "channel {j}: {x} vs {ww}");
        }
        assert_eq!(s[2], 1.0, "an inactive channel is left alone");
        assert!(factors(&act, &w, 1.0).iter().zip(&act).all(|(s, a)| *a == 0.0 || (s - a).abs() < 1e-4));
    }

    #[test]
    fn column_amax_reads_input_columns() {
        // [out = 2, inp = 3]
        let w = [1.0f32, -4.0, 0.5, -2.0, 3.0, 0.25];
        let mut m = vec![0f32; 3];
        column_amax(&w, 3, &mut m);
        assert_eq!(m, vec![2.0, 4.0, 0.5]);
    }
}
