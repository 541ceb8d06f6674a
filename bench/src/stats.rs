//! Summaries of repeated measurements and ratios computed pair by pair.
use serde::{Deserialize, Serialize};

/// Median, minimum and maximum of a set of samples.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarizes `samples`; `None` when there are none (or any is not finite).
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() || samples.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
        Some(Self { n, median, min: s[0], max: s[n - 1] })
    }

    /// The same summary with every value mapped by `f` (monotonically decreasing `f`, such as a
    /// reciprocal, swaps min and max).
    pub fn map(self, f: impl Fn(f64) -> f64) -> Self {
        let (a, b) = (f(self.min), f(self.max));
        Self { n: self.n, median: f(self.median), min: a.min(b), max: a.max(b) }
    }
}

/// `numerator[i] / denominator[i]` for each repetition both have, summarized. Pairing by
/// repetition (rather than dividing medians) keeps slow phases of the machine from flattering
/// either side when the two were measured one after the other.
pub fn pairwise_ratio(numerator: &[f64], denominator: &[f64]) -> Option<Summary> {
    let ratios: Vec<f64> = numerator.iter().zip(denominator).filter(|(_, d)| **d > 0.0).map(|(n, d)| n / d).collect();
    Summary::of(&ratios)
}

/// `a[i] + b[i]` for each repetition both have.
pub fn pairwise_sum(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).expect("summary");
        assert_eq!((s.n, s.median, s.min, s.max), (3, 2.0, 1.0, 3.0));
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).expect("summary");
        assert_eq!(s.median, 2.5);
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[1.0, f64::NAN]).is_none());
    }

    #[test]
    fn ratios_pair_by_repetition() {
        // The first system is twice as slow in every pair, whatever the drift between reps.
        let r = pairwise_ratio(&[200.0, 400.0, 300.0], &[100.0, 200.0, 150.0, 999.0]).expect("ratio");
        assert_eq!((r.n, r.median, r.min, r.max), (3, 2.0, 2.0, 2.0));
    }

    #[test]
    fn reciprocal_map_swaps_the_range() {
        let s = Summary::of(&[10.0, 20.0, 40.0]).expect("summary").map(|ms| 1000.0 / ms);
        assert_eq!((s.median, s.min, s.max), (50.0, 25.0, 100.0));
    }
}
