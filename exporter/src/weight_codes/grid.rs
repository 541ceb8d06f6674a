//! The asymmetric grid of one quantization group, as GPTQ's reference `Quantizer` (IST-DASLab,
//! `perchannel=True, sym=False`) finds it: the range `[min(x), max(x)]` widened to include 0,
//! `scale = (max - min) / (2^bits - 1)`, `zero = round(-min / scale)`, so a value `w` is stored
//! as `q = clamp(round(w / scale) + zero, 0, 2^bits - 1)` and read back as `(q - zero) * scale`
//! (ONNX Runtime's `MatMulNBits` with zero points). The scale is rounded to f32 first, as it is
//! stored, and codes use it; ties round to even, as torch and numpy do.

/// One group's scale and zero point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    /// Step between codes (an f32, as stored).
    pub scale: f32,
    /// The code of 0.0.
    pub zero: u8,
    /// Largest code (2^bits - 1).
    pub max_code: u8,
}

impl Grid {
    /// The grid of `values` (any order) for `bits`-bit codes. A group that is all zeros gets
    /// the range [-1, 1], as the reference does.
    pub fn fit(values: impl IntoIterator<Item = f64>, bits: u8) -> Self {
        let (lo, hi) = range(values);
        Self::from_range(lo, hi, bits)
    }

    /// The grid spanning `[lo, hi]` (which includes 0).
    fn from_range(lo: f64, hi: f64, bits: u8) -> Self {
        let max_code = ((1u16 << bits) - 1) as u8;
        let scale = ((hi - lo) / f64::from(max_code)) as f32;
        let zero = (-lo / f64::from(scale)).round_ties_even().clamp(0.0, f64::from(max_code)) as u8;
        Self { scale, zero, max_code }
    }

    /// The code of `v`.
    pub fn code(&self, v: f64) -> u8 {
        ((v / f64::from(self.scale)).round_ties_even() + f64::from(self.zero)).clamp(0.0, f64::from(self.max_code))
            as u8
    }

    /// The value code `q` stands for.
    pub fn value(&self, q: u8) -> f64 {
        (f64::from(q) - f64::from(self.zero)) * f64::from(self.scale)
    }
}

/// `[min, max]` of `values` widened to include 0; `[-1, 1]` for all zeros, as the reference has it.
fn range(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (0f64, 0f64);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo == 0.0 && hi == 0.0 { (-1.0, 1.0) } else { (lo, hi) }
}

/// How a group's range is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GridFit {
    /// The range of the values (widened to include 0).
    #[default]
    MinMax,
    /// GPTQ's reference `Quantizer(mse=True)`: that range shrunk by `1 - i/100` for `i` in
    /// 0..80, keeping the grid of least `sum |dequantized - value|^2.4` over the group.
    Mse,
}

/// Shrink steps of the MSE search, and the error's exponent (the reference's `grid`,
/// `maxshrink` and `norm`).
const MSE_GRID: usize = 100;
const MSE_MAX_SHRINK: f64 = 0.8;
const MSE_NORM: f64 = 2.4;

impl GridFit {
    /// The grid of `values` for `bits`-bit codes.
    pub fn fit(self, values: &[f64], bits: u8) -> Grid {
        let (lo, hi) = range(values.iter().copied());
        let full = Grid::from_range(lo, hi, bits);
        if self == GridFit::MinMax {
            return full;
        }
        let error = |g: &Grid| values.iter().map(|&v| (g.value(g.code(v)) - v).abs().powf(MSE_NORM)).sum::<f64>();
        let mut best = (error(&full), full);
        for i in 1..(MSE_MAX_SHRINK * MSE_GRID as f64) as usize {
            let p = 1.0 - i as f64 / MSE_GRID as f64;
            let g = Grid::from_range(p * lo, p * hi, bits);
            let e = error(&g);
            if e < best.0 {
                best = (e, g);
            }
        }
        best.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_of_the_range_map_to_the_end_codes_and_zero_is_exact() {
        let g = Grid::fit([-0.3, 0.1, 1.2], 4);
        assert_eq!(g.max_code, 15);
        assert!((f64::from(g.scale) - 1.5 / 15.0).abs() < 1e-7);
        assert_eq!(g.zero, 3);
        assert_eq!(g.code(1.2), 15);
        assert_eq!(g.code(0.0), 3);
        assert_eq!(g.value(g.code(0.0)), 0.0);
        assert_eq!(g.code(-5.0), 0, "clamped");
        // All positive: the range includes 0, whose code is 0.
        let pos = Grid::fit([0.5, 2.0], 4);
        assert_eq!(pos.zero, 0);
        let zeros = Grid::fit([0.0; 4], 8);
        assert_eq!(zeros.max_code, 255);
        assert!((127..=128).contains(&zeros.zero), "the middle of [-1, 1]");
    }

    #[test]
    fn the_mse_search_clips_an_outlier_and_never_does_worse() {
        // 31 values on a 0.01 grid and one at 0.5: shrinking the range 3% clips the outlier a
        // little and gives the others a finer step (checked with numpy: least error at 0.97).
        let mut values: Vec<f64> = (0..31).map(|i| (i as f64 - 15.0) / 100.0).collect();
        values.push(0.5);
        let (full, searched) = (GridFit::MinMax.fit(&values, 4), GridFit::Mse.fit(&values, 4));
        assert_eq!(full, Grid::fit(values.iter().copied(), 4));
        assert!(searched.scale < full.scale, "the range shrinks: {searched:?} against {full:?}");
        let (e_searched, e_full) = (err_of(&values, searched), err_of(&values, full));
        assert!(e_searched < e_full, "{e_searched} against {e_full}");
        let plain = [-0.5, -0.1, 0.2, 0.4];
        assert!(err_of(&plain, GridFit::Mse.fit(&plain, 4)) <= err_of(&plain, GridFit::MinMax.fit(&plain, 4)));
    }

    fn err_of(values: &[f64], g: Grid) -> f64 {
        values.iter().map(|&v| (g.value(g.code(v)) - v).abs().powf(MSE_NORM)).sum()
    }
}
