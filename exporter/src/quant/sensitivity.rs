//! The sensitivity scan: each decoder block is run again with its linears in int8 (the
//! table's scales and SmoothQuant factors) on the same inputs as its fp32 run, and the
//! relative change of its output is its sensitivity. The blocks that change most keep their
//! linears in float. The measure is local (each block sees the fp32 model's inputs), so it
//! costs one extra run of each block, not one whole-model evaluation per candidate.
use super::table::BlockSensitivity;

/// Sum over the rows (`width` values each) of `|q - r| / |r|` (L2 norms; a zero row of `r`
/// counts by `|q|` alone), and the number of rows.
pub fn relative_error(reference: &[f32], quantized: &[f32], width: usize) -> (f64, usize) {
    let mut sum = 0.0;
    let mut rows = 0;
    for (r, q) in reference.chunks_exact(width).zip(quantized.chunks_exact(width)) {
        let (mut diff, mut norm) = (0f64, 0f64);
        for (&a, &b) in r.iter().zip(q) {
            diff += f64::from(b - a).powi(2);
            norm += f64::from(a).powi(2);
        }
        sum += diff.sqrt() / norm.sqrt().max(f64::MIN_POSITIVE.sqrt());
        rows += 1;
    }
    (sum, rows)
}

/// Marks the `keep` blocks of largest error as kept in float (ties: the later block).
pub fn keep_most_sensitive(blocks: &mut [BlockSensitivity], keep: usize) {
    let mut order: Vec<usize> = (0..blocks.len()).collect();
    order.sort_by(|&a, &b| blocks[b].error.total_cmp(&blocks[a].error).then(b.cmp(&a)));
    for &i in order.iter().take(keep) {
        blocks[i].kept_float = true;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn error_is_relative_per_row() {
        let r = [3.0, 4.0, 0.0, 1.0];
        let q = [3.0, 4.5, 0.0, 1.0];
        let (sum, rows) = relative_error(&r, &q, 2);
        assert_eq!(rows, 2);
        assert!((sum - 0.5 / 5.0).abs() < 1e-12);
    }

    #[test]
    fn the_largest_errors_are_kept() {
        let mut blocks: Vec<BlockSensitivity> = [0.1, 0.5, 0.2, 0.5]
            .iter()
            .enumerate()
            .map(|(i, &error)| BlockSensitivity {
                first_layer: i,
                end_layer: i + 1,
                head: false,
                error,
                kept_float: false,
            })
            .collect();
        keep_most_sensitive(&mut blocks, 2);
        let kept: Vec<usize> = blocks.iter().filter(|b| b.kept_float).map(|b| b.first_layer).collect();
        assert_eq!(kept, [1, 3]);
    }
}
