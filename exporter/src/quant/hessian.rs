//! GPTQ's Hessian of one linear input, `H = 2/n X^T X` over the calibration tokens, summed as
//! calibration runs (f32, through a matrix product per run) and handed to GPTQ in f64.
use ndarray::{ArrayView2, ArrayViewMut2};

use crate::error::{Error, Result};

/// `X^T X` of one tensor, summed over runs.
pub struct Hessian {
    k: usize,
    sum: Vec<f32>,
    rows: usize,
}

impl Hessian {
    /// An empty sum for `k` channels.
    pub fn new(k: usize) -> Self {
        Self { k, sum: vec![0.0; k * k], rows: 0 }
    }

    /// Adds the rows of row-major `x` (`[rows, k]`).
    pub fn add(&mut self, x: &[f32]) -> Result<()> {
        let rows = x.len() / self.k;
        let (Ok(xv), Ok(mut sv)) =
            (ArrayView2::from_shape((rows, self.k), x), ArrayViewMut2::from_shape((self.k, self.k), &mut self.sum))
        else {
            return Err(Error::Invalid(format!("{} values are not rows of {} channels", x.len(), self.k)));
        };
        ndarray::linalg::general_mat_mul(1.0, &xv.t(), &xv, 1.0, &mut sv);
        self.rows += rows;
        Ok(())
    }

    /// Channels.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Rows added so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `2/n X^T X` in f64, row-major `k x k` (zero when nothing was added).
    pub fn finish(self) -> Vec<f64> {
        let f = if self.rows > 0 { 2.0 / self.rows as f64 } else { 0.0 };
        self.sum.into_iter().map(|v| f64::from(v) * f).collect()
    }
}
