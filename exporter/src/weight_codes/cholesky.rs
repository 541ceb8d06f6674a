//! The one factorization GPTQ needs: the upper Cholesky factor `U` of `H^-1`
//! (`H^-1 = U^T U`), from `H` itself.
//!
//! With `J` the reversal permutation, if `J H J = L L^T` (lower `L`) then `H = R R^T` with
//! `R = J L J` upper, so `H^-1 = R^-T R^-1` and `U = R^-1 = J L^-1 J`: one Cholesky and one
//! triangular inverse, where the reference (`torch.linalg.cholesky`, `cholesky_inverse`,
//! `cholesky(upper=True)`) does two Cholesky factorizations and a product. Rows are contiguous
//! in both loops (f64, row-major).

/// `H` was not positive definite (after dampening): the pivot of this column was not positive.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("the Hessian is not positive definite (pivot {pivot:e} at column {column})")]
pub struct NotPositiveDefinite {
    /// The column (of `H`) where the factorization stopped.
    pub column: usize,
    /// Its pivot.
    pub pivot: f64,
}

/// The upper Cholesky factor of the inverse of row-major `h` (`k x k`, symmetric), which it
/// consumes: at most two `k x k` buffers are alive at once.
pub fn upper_cholesky_of_inverse(mut h: Vec<f64>, k: usize) -> Result<Vec<f64>, NotPositiveDefinite> {
    // Reversing the flat buffer is J h J.
    h.reverse();
    cholesky_rows(&mut h, k)?;
    let mut x = lower_inverse(&h, k);
    drop(h);
    // J L^-1 J: upper.
    x.reverse();
    Ok(x)
}

/// In-place lower Cholesky factor of the lower triangle of row-major `m`.
fn cholesky_rows(m: &mut [f64], k: usize) -> Result<(), NotPositiveDefinite> {
    for i in 0..k {
        let (done, rest) = m.split_at_mut(i * k);
        let ri = &mut rest[..k];
        for j in 0..i {
            let rj = &done[j * k..j * k + j + 1];
            let s: f64 = ri[..j].iter().zip(&rj[..j]).map(|(a, b)| a * b).sum();
            ri[j] = (ri[j] - s) / rj[j];
        }
        let d = ri[i] - ri[..i].iter().map(|v| v * v).sum::<f64>();
        if d.is_nan() || d <= 0.0 {
            return Err(NotPositiveDefinite { column: k - 1 - i, pivot: d });
        }
        ri[i] = d.sqrt();
    }
    Ok(())
}

/// The inverse of lower-triangular row-major `l`, row by row: row `i` is
/// `(e_i - sum_{p<i} l[i][p] * row p) / l[i][i]`.
fn lower_inverse(l: &[f64], k: usize) -> Vec<f64> {
    let mut x = vec![0f64; k * k];
    for i in 0..k {
        let (done, rest) = x.split_at_mut(i * k);
        let xi = &mut rest[..k];
        xi[i] = 1.0;
        for p in 0..i {
            let c = l[i * k + p];
            if c != 0.0 {
                for (a, b) in xi[..=p].iter_mut().zip(&done[p * k..p * k + p + 1]) {
                    *a -= c * b;
                }
            }
        }
        let d = l[i * k + i];
        xi[..=i].iter_mut().for_each(|v| *v /= d);
    }
    x
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn factor_times_its_transpose_is_the_inverse() {
        let k = 7;
        // A symmetric positive definite matrix: B B^T + I.
        let b: Vec<f64> = (0..k * k).map(|i| ((i * 31 % 17) as f64 - 8.0) / 5.0).collect();
        let mut h = vec![0f64; k * k];
        for i in 0..k {
            for j in 0..k {
                h[i * k + j] = (0..k).map(|p| b[i * k + p] * b[j * k + p]).sum::<f64>() + f64::from(u8::from(i == j));
            }
        }
        let u = upper_cholesky_of_inverse(h.clone(), k).unwrap();
        // (U^T U) H = I
        for i in 0..k {
            for j in 0..k {
                assert!(u[i * k + j] == 0.0 || j >= i);
                let hinv_row = |r: usize, c: usize| (0..k).map(|p| u[p * k + r] * u[p * k + c]).sum::<f64>();
                let v: f64 = (0..k).map(|p| hinv_row(i, p) * h[p * k + j]).sum();
                assert!((v - f64::from(u8::from(i == j))).abs() < 1e-9, "({i},{j}) = {v}");
            }
        }
        assert!(upper_cholesky_of_inverse(vec![1.0, 2.0, 2.0, 1.0], 2).is_err());
    }
}
