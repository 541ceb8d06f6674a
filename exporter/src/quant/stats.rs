//! Activation statistics and the three ways of turning them into a clipping threshold: the
//! largest magnitude seen (`max`), a percentile of the magnitudes, and TensorRT's entropy
//! calibration (the threshold whose 128-level quantization loses the least information, by
//! KL divergence, about the histogram of magnitudes).
//!
//! Histograms are of |x| over a range fixed in advance (the exact maximum from the first
//! calibration pass), so every sample falls in one of [`BINS`] equal bins and no re-binning
//! is ever needed.
use serde::{Deserialize, Serialize};

/// Bins of a magnitude histogram (TensorRT's entropy calibrator uses 2048).
pub const BINS: usize = 2048;
/// Quantization levels of one sign in int8 (the candidate distribution of entropy calibration).
pub const LEVELS: usize = 128;
/// The probability given to an empty bin of the candidate distribution.
const EMPTY_BIN: f64 = 1e-4;

/// How a tensor's clipping threshold is chosen from its statistics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The largest magnitude seen: nothing is clipped.
    Max,
    /// The given percentile (0–100] of the magnitudes.
    Percentile(f64),
    /// TensorRT's entropy calibration (`EntropyCalibration2`).
    Entropy,
    /// The threshold of least mean squared quantization error (rounding inside, clipping
    /// outside) over the histogram of magnitudes.
    Mse,
}

impl Method {
    /// Whether the threshold needs a histogram (a second calibration pass).
    pub fn needs_histogram(self) -> bool {
        !matches!(self, Method::Max)
    }

    /// A short name for reports and file headers (`percentile-99.99`).
    pub fn label(self) -> String {
        match self {
            Method::Max => "max".into(),
            Method::Percentile(p) => format!("percentile-{p}"),
            Method::Entropy => "entropy".into(),
            Method::Mse => "mse".into(),
        }
    }
}

/// Largest magnitude of each channel (the last axis) of row-major `values` with `channels`
/// columns, folded into `into` (which must be `channels` long).
pub fn channel_amax(values: &[f32], channels: usize, into: &mut [f32]) {
    debug_assert_eq!(into.len(), channels);
    for row in values.chunks_exact(channels) {
        for (m, &v) in into.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
}

/// A histogram of magnitudes over `[0, range]` in [`BINS`] equal bins.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper end of the last bin.
    pub range: f32,
    /// Count per bin.
    pub counts: Vec<u64>,
}

impl Histogram {
    /// An empty histogram over `[0, range]`.
    pub fn new(range: f32) -> Self {
        Self { range, counts: vec![0; BINS] }
    }

    /// Width of one bin.
    pub fn bin_width(&self) -> f64 {
        f64::from(self.range) / BINS as f64
    }

    /// Adds the magnitudes of `values` (values past the range land in the last bin).
    pub fn add(&mut self, values: &[f32]) {
        let per_unit = if self.range > 0.0 { BINS as f32 / self.range } else { 0.0 };
        for &v in values {
            let bin = ((v.abs() * per_unit) as usize).min(BINS - 1);
            self.counts[bin] += 1;
        }
    }

    /// Adds the magnitudes of `values` (row-major, `divisors.len()` channels) divided per
    /// channel by `divisors`: the histogram of a smoothed tensor, from the original.
    pub fn add_scaled(&mut self, values: &[f32], divisors: &[f32]) {
        let per_unit = if self.range > 0.0 { BINS as f32 / self.range } else { 0.0 };
        let factors: Vec<f32> = divisors.iter().map(|d| per_unit / d).collect();
        for row in values.chunks_exact(divisors.len()) {
            for (&v, &f) in row.iter().zip(&factors) {
                let bin = ((v.abs() * f) as usize).min(BINS - 1);
                self.counts[bin] += 1;
            }
        }
    }

    /// Number of values added.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// The clipping threshold of a tensor whose largest magnitude is `amax`, by `method`
/// (`hist` is needed for the percentile and entropy methods).
pub fn threshold(method: Method, amax: f32, hist: Option<&Histogram>) -> f32 {
    match (method, hist) {
        (Method::Max, _) | (_, None) => amax,
        (Method::Percentile(p), Some(h)) => percentile_threshold(h, p).min(amax),
        (Method::Entropy, Some(h)) => entropy_threshold(h).min(amax),
        (Method::Mse, Some(h)) => mse_threshold(h).min(amax),
    }
}

/// Candidates below this many bins are not considered by [`mse_threshold`]: clipping past
/// 15/16 of the range is never the least-error choice for the tensors calibrated here, and
/// the lower bound keeps a histogram of a few values from picking a degenerate threshold.
const MSE_MIN_BINS: usize = 128;

/// The threshold `t` (an upper bin edge) whose int8 quantization (step `t / 127`, values past
/// `t` clipped to it) has the least squared error summed over the histogram, each bin's
/// values taken at its center. Ties go to the larger threshold.
pub fn mse_threshold(hist: &Histogram) -> f32 {
    let width = hist.bin_width();
    let mut best = (f64::INFINITY, hist.range);
    for edge in (MSE_MIN_BINS..=BINS).rev() {
        let t = edge as f64 * width;
        let step = t / f64::from(crate::weight_codes::int8::QMAX);
        let mut err = 0.0;
        for (i, &c) in hist.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let x = (i as f64 + 0.5) * width;
            let e = if x > t { x - t } else { x - step * (x / step).round() };
            err += c as f64 * e * e;
        }
        if err < best.0 {
            best = (err, t as f32);
        }
    }
    best.1
}

/// The upper edge of the first bin at which the cumulative count reaches `p` percent.
pub fn percentile_threshold(hist: &Histogram, p: f64) -> f32 {
    let total = hist.total();
    if total == 0 {
        return hist.range;
    }
    let wanted = (p / 100.0 * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0u64;
    for (i, &c) in hist.counts.iter().enumerate() {
        seen += c;
        if seen >= wanted {
            return ((i + 1) as f64 * hist.bin_width()) as f32;
        }
    }
    hist.range
}

/// TensorRT's entropy calibration: for each candidate `i` from 128 to 2048 bins, the
/// reference distribution P is the first `i` bins with every count past them added to the
/// last one (the clipped outliers); the candidate Q merges those `i` bins into 128 levels
/// and spreads each level's count evenly over its non-empty bins (an empty bin of Q under a
/// non-empty one of P counts as probability 1e-4). The threshold is the
/// upper edge of bin `i - 1` for the `i` of least KL(P || Q) (the largest such `i` on ties).
pub fn entropy_threshold(hist: &Histogram) -> f32 {
    let bins: Vec<f64> = hist.counts.iter().map(|&c| c as f64).collect();
    let total: f64 = bins.iter().sum();
    if total == 0.0 {
        return hist.range;
    }
    let mut best = (f64::INFINITY, BINS);
    let mut p = vec![0f64; BINS];
    let mut q = vec![0f64; BINS];
    let mut level_sum = vec![0f64; LEVELS];
    let mut level_nonzero = vec![0usize; LEVELS];
    let mut outliers: f64 = bins[LEVELS..].iter().sum();
    for i in LEVELS..=BINS {
        // `outliers` holds the counts of bins i.. (updated at the end of the loop).
        p[..i].copy_from_slice(&bins[..i]);
        p[i - 1] += outliers;
        level_sum.fill(0.0);
        level_nonzero.fill(0);
        for (k, &c) in bins[..i].iter().enumerate() {
            let level = k * LEVELS / i;
            level_sum[level] += c;
            level_nonzero[level] += usize::from(c > 0.0);
        }
        for (k, &c) in bins[..i].iter().enumerate() {
            let level = k * LEVELS / i;
            q[k] = if c > 0.0 { level_sum[level] / level_nonzero[level] as f64 } else { 0.0 };
        }
        let (p_sum, q_sum) = (total, bins[..i].iter().sum::<f64>());
        let mut kl = 0.0;
        for k in 0..i {
            if p[k] == 0.0 {
                continue;
            }
            // Only the last bin (where the clipped outliers were added) can be empty in Q and
            // not in P; as MXNet's and ONNX Runtime's calibrators do, a small epsilon stands
            // in for the empty bin, so clipping a lone outlier costs a finite divergence.
            let (pk, qk) = (p[k] / p_sum, (q[k] / q_sum).max(EMPTY_BIN));
            kl += pk * (pk / qk).ln();
        }
        if kl <= best.0 {
            best = (kl, i);
        }
        if i < BINS {
            outliers -= bins[i];
        }
    }
    (best.1 as f64 * hist.bin_width()) as f32
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    use super::*;

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 1.0).unwrap();
        (0..n).map(|_| normal.sample(&mut rng)).collect()
    }

    /// Squared error of quantizing `values` with threshold `t` (step t/127, clipped past t).
    fn sq_error(values: &[f32], t: f32) -> f64 {
        let step = t / 127.0;
        values.iter().map(|&v| f64::from(v - (v / step).round().clamp(-127.0, 127.0) * step).powi(2)).sum()
    }

    #[test]
    fn mse_clips_a_lone_outlier_and_keeps_a_dense_range() {
        let mut values = gaussian(100_000, 3);
        let plain_max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut hist = Histogram::new(plain_max);
        hist.add(&values);
        let t = mse_threshold(&hist);
        // A Gaussian's least-error int8 threshold is well inside its maximum (about 4 sigma).
        assert!(t < 0.95 * plain_max, "{t} of {plain_max}");
        assert!(sq_error(&values, t) < sq_error(&values, plain_max));
        // With a far outlier the balance moves, but the choice still beats the other candidates.
        values.push(100.0 * plain_max);
        let mut hist = Histogram::new(100.0 * plain_max);
        hist.add(&values);
        let t = mse_threshold(&hist);
        for other in [0.1f32, 0.5, 0.9, 1.0] {
            let o = other * 100.0 * plain_max;
            assert!(sq_error(&values, t) <= sq_error(&values, o) * 1.01, "{t} vs {o}");
        }
        // A uniform spread is best served by its whole range.
        let uniform: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        let mut hist = Histogram::new(1.0);
        hist.add(&uniform);
        assert!(mse_threshold(&hist) > 0.99);
    }

    fn hist_of(values: &[f32]) -> (f32, Histogram) {
        let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut h = Histogram::new(amax);
        h.add(values);
        (amax, h)
    }

    #[test]
    fn entropy_clips_a_far_outlier_of_a_gaussian() {
        let mut values = gaussian(200_000, 1);
        values.push(100.0);
        let (amax, h) = hist_of(&values);
        let t = entropy_threshold(&h);
        assert_eq!(amax, 100.0);
        // All the Gaussian sits in the first ~100 bins; entropy calibration stretches the 128
        // levels over the Gaussian and leaves the outlier clipped.
        assert!(t > 2.5 && t < 8.0, "threshold {t}");
    }

    #[test]
    fn entropy_keeps_the_whole_range_of_a_uniform_distribution() {
        let values: Vec<f32> = (0..100_000).map(|i| (i as f32 / 100_000.0) * 2.0 - 1.0).collect();
        let (amax, h) = hist_of(&values);
        let t = entropy_threshold(&h);
        assert!(t >= 0.97 * amax, "threshold {t} of {amax}");
    }

    #[test]
    fn entropy_of_a_gaussian_is_a_few_sigma() {
        // Published figures for TensorRT-style entropy calibration on N(0, 1) put the
        // threshold around 3–5 sigma for int8.
        let (amax, h) = hist_of(&gaussian(400_000, 2));
        let t = entropy_threshold(&h);
        assert!(t > 2.5 && t <= amax, "threshold {t} (amax {amax})");
    }

    #[test]
    fn percentile_matches_the_sorted_values() {
        let values = gaussian(100_000, 3);
        let (_, h) = hist_of(&values);
        let mut mags: Vec<f32> = values.iter().map(|v| v.abs()).collect();
        mags.sort_by(f32::total_cmp);
        let exact = mags[(0.999 * mags.len() as f64) as usize];
        let t = percentile_threshold(&h, 99.9);
        // Within one bin of the exact order statistic.
        assert!((t - exact).abs() <= 1.5 * h.bin_width() as f32, "{t} vs {exact}");
        assert_eq!(percentile_threshold(&h, 100.0), h.range);
    }

    #[test]
    fn scaled_histogram_equals_the_histogram_of_scaled_values() {
        let values: Vec<f32> = gaussian(4 * 1000, 4);
        let divisors = [0.5f32, 2.0, 1.0, 4.0];
        let scaled: Vec<f32> =
            values.chunks_exact(4).flat_map(|r| r.iter().zip(&divisors).map(|(v, d)| v / d)).collect();
        let (amax, expected) = hist_of(&scaled);
        let mut got = Histogram::new(amax);
        got.add_scaled(&values, &divisors);
        let differing: u64 = got.counts.iter().zip(&expected.counts).map(|(a, b)| a.abs_diff(*b)).sum();
        // Rounding of v/d versus v*(1/d) may move a value across a bin edge, rarely.
        assert!(differing <= 4, "{differing} values binned differently");
        assert_eq!(got.total(), expected.total());
    }

    #[test]
    fn channel_amax_takes_the_last_axis() {
        let mut m = vec![0f32; 3];
        channel_amax(&[1.0, -5.0, 2.0, -3.0, 4.0, 0.5], 3, &mut m);
        assert_eq!(m, vec![3.0, 5.0, 2.0]);
    }

    #[test]
    fn threshold_never_exceeds_amax_and_max_is_amax() {
        let (amax, h) = hist_of(&gaussian(10_000, 5));
        assert_eq!(threshold(Method::Max, amax, Some(&h)), amax);
        for m in [Method::Entropy, Method::Percentile(99.99), Method::Percentile(100.0)] {
            assert!(threshold(m, amax, Some(&h)) <= amax);
        }
        let empty = Histogram::new(0.0);
        assert_eq!(threshold(Method::Entropy, 0.0, Some(&empty)), 0.0);
    }
}
