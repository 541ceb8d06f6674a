//! GPTQ (with and without act-order) and asymmetric round-to-nearest against the Python reference (tools/gptq_reference.py,
//! which follows IST-DASLab/gptq's `fasterquant` in torch float64): tests/fixtures/gptq, made
//! by `make gptq-goldens` (see its README.md).
#![allow(clippy::unwrap_used)]
use std::path::PathBuf;

use ndarray::{Array1, Array2};
use ndarray_npy::read_npy;
use vl_export::quant::hessian::Hessian;
use vl_export::weight_codes::blocks::{BlockShape, QuantizedBlocks, dequantize, pack, quantize_asym, unpack_codes};
use vl_export::weight_codes::gptq::{self, Factor};
use vl_export::weight_codes::grid::GridFit;

const BITS: u8 = 4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gptq").join(name)
}

fn load2<T: ndarray_npy::ReadableElement>(name: &str) -> Array2<T> {
    read_npy(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// ||X W^T - X Q^T||_F.
fn output_error(x: &Array2<f32>, w: &Array2<f32>, q: &Array2<f32>) -> f64 {
    let d = (w - q).mapv(f64::from);
    x.mapv(f64::from).dot(&d.t()).mapv(|v| v * v).sum().sqrt()
}

struct Compared {
    equal: f64,
    max_code_diff: i32,
    max_deq_diff: f32,
}

/// Codes, zero points and scales of `qb` against the reference's `{name}_g{group}_*`.
fn compare(qb: &QuantizedBlocks, s: BlockShape, name: &str) -> (Compared, Array2<f32>) {
    let g = s.block;
    let codes: Array2<u8> = load2(&format!("{name}_g{g}_codes.npy"));
    let scales: Array2<f32> = load2(&format!("{name}_g{g}_scales.npy"));
    let zeros: Array2<u8> = load2(&format!("{name}_g{g}_zeros.npy"));
    let (ours, our_zeros) = unpack_codes(qb, s);
    let mut equal = 0usize;
    let mut max_code_diff = 0;
    for (a, b) in ours.iter().zip(codes.iter()) {
        equal += usize::from(a == b);
        max_code_diff = max_code_diff.max((i32::from(*a) - i32::from(*b)).abs());
    }
    let their = Array2::from_shape_fn((s.n, s.k), |(r, c)| {
        let b = c / g;
        (f32::from(codes[[r, c]]) - f32::from(zeros[[r, b]])) * scales[[r, b]]
    });
    let mine = Array2::from_shape_vec((s.n, s.k), dequantize(qb, s.n, s.k, s.bits, g)).unwrap();
    let max_deq_diff = (&mine - &their).iter().fold(0f32, |m, v| m.max(v.abs()));
    let zeros_equal = our_zeros.iter().zip(zeros.iter()).filter(|(a, b)| a == b).count();
    let scale_rel = Array1::from(qb.scales.clone())
        .iter()
        .zip(scales.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs() / b.abs().max(1e-12)));
    assert!(zeros_equal * 100 >= 99 * our_zeros.len(), "{name} g{g}: {zeros_equal}/{} zero points equal", zeros.len());
    // Scales are fitted on weights that GPTQ's updates changed, or picked by a search among
    // near-ties (`_mse`): they follow the codes' agreement.
    assert!(
        scale_rel < 1e-3 || name == "gptq" || name.ends_with("_mse"),
        "{name} g{g}: scales differ by {scale_rel} (relative)"
    );
    (Compared { equal: equal as f64 / ours.len() as f64, max_code_diff, max_deq_diff }, mine)
}

#[test]
fn gptq_and_asymmetric_rtn_match_the_reference_and_gptq_has_the_smaller_output_error() {
    let w: Array2<f32> = load2("w.npy");
    let x: Array2<f32> = load2("x.npy");
    let (n, k) = w.dim();
    let mut h = Hessian::new(k);
    // In two runs, as calibration samples come.
    let xs = x.as_slice().unwrap();
    h.add(&xs[..200 * k]).unwrap();
    h.add(&xs[200 * k..]).unwrap();
    assert_eq!(h.rows(), x.nrows());
    let hessian = h.finish();
    let factor = Factor::new(hessian.clone(), k, false).unwrap();
    let act_order = Factor::new(hessian, k, true).unwrap();
    let ws = w.as_slice().unwrap();
    for group in [32usize, 128] {
        let s = BlockShape { n, k, bits: BITS, block: group };
        let (rtn, rtn_q) = compare(&quantize_asym(ws, n, k, BITS, group), s, "rtn");
        // Round-to-nearest is deterministic: every code equal (a tie decided by the last bit
        // of a scale aside).
        assert!(rtn.equal >= 0.999 && rtn.max_code_diff <= 1, "rtn g{group}: {:.4} equal", rtn.equal);
        assert!(rtn.max_deq_diff <= 1e-5, "rtn g{group}: dequantized weights differ by {}", rtn.max_deq_diff);
        let (g, g_q) = compare(&gptq::quantize(ws, n, &factor, BITS, group, GridFit::MinMax), s, "gptq");
        // GPTQ's error feedback carries rounding differences (f32 Hessian sums here, f64 there)
        // to later columns: at least 99% of codes equal, the rest one step apart.
        assert!(
            g.equal >= 0.99 && g.max_code_diff <= 1,
            "gptq g{group}: {:.4} equal, max diff {}",
            g.equal,
            g.max_code_diff
        );
        let (eg, er) = (output_error(&x, &w, &g_q), output_error(&x, &w, &rtn_q));
        let (ao, ao_q) = compare(&gptq::quantize(ws, n, &act_order, BITS, group, GridFit::MinMax), s, "gptq_ao");
        assert!(ao.equal >= 0.99 && ao.max_code_diff <= 1, "act-order g{group}: {:.4} equal", ao.equal);
        let ea = output_error(&x, &w, &ao_q);
        eprintln!(
            "group {group}: codes equal rtn {:.4} gptq {:.4} act-order {:.4}; ||XW^T - XQ^T|| rtn {er:.4} gptq {eg:.4} \
             act-order {ea:.4}",
            rtn.equal, g.equal, ao.equal
        );
        assert!(eg < 0.7 * er, "group {group}: GPTQ's output error {eg} is not well below RTN's {er}");
        assert!(ea < 0.7 * er, "group {group}: act-order GPTQ's output error {ea} is not well below RTN's {er}");
    }
}

/// Round-to-nearest on grids fitted by `fit`, block by block.
fn rtn_with(w: &[f32], n: usize, k: usize, group: usize, fit: GridFit) -> QuantizedBlocks {
    let mut codes = vec![0u8; n * k];
    let mut grids = Vec::new();
    for (row, out) in w.chunks_exact(k).zip(codes.chunks_exact_mut(k)) {
        for (values, out) in row.chunks(group).zip(out.chunks_mut(group)) {
            let values: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
            let g = fit.fit(&values, BITS);
            out.iter_mut().zip(&values).for_each(|(c, &v)| *c = g.code(v));
            grids.push(g);
        }
    }
    pack(&codes, &grids, BlockShape { n, k, bits: BITS, block: group })
}

#[test]
fn the_mse_range_search_matches_the_reference_and_lowers_round_to_nearests_weight_error() {
    let w: Array2<f32> = load2("w.npy");
    let x: Array2<f32> = load2("x.npy");
    let (n, k) = w.dim();
    let mut h = Hessian::new(k);
    h.add(x.as_slice().unwrap()).unwrap();
    let act_order = Factor::new(h.finish(), k, true).unwrap();
    let ws = w.as_slice().unwrap();
    for group in [32usize, 128] {
        let s = BlockShape { n, k, bits: BITS, block: group };
        // The search compares sums of |error|^2.4 (f64 both sides, summed in another order): a
        // near-tie may pick a neighbouring shrink, so a few blocks may differ.
        let (rtn, rtn_q) = compare(&rtn_with(ws, n, k, group, GridFit::Mse), s, "rtn_mse");
        assert!(rtn.equal >= 0.995 && rtn.max_deq_diff <= 1e-5, "rtn mse g{group}: {:.4} equal", rtn.equal);
        let (_, plain_q) = compare(&rtn_with(ws, n, k, group, GridFit::MinMax), s, "rtn");
        let (ao, ao_q) = compare(&gptq::quantize(ws, n, &act_order, BITS, group, GridFit::Mse), s, "gptq_ao_mse");
        assert!(ao.equal >= 0.99 && ao.max_code_diff <= 1, "act-order mse g{group}: {:.4} equal", ao.equal);
        let (_, ao_plain_q) = compare(&gptq::quantize(ws, n, &act_order, BITS, group, GridFit::MinMax), s, "gptq_ao");
        let err = |q: &Array2<f32>| output_error(&x, &w, q);
        eprintln!(
            "group {group}: ||XW^T - XQ^T|| rtn {:.4} rtn-mse {:.4} act-order {:.4} act-order-mse {:.4}",
            err(&plain_q),
            err(&rtn_q),
            err(&ao_plain_q),
            err(&ao_q)
        );
        let wd = |q: &Array2<f32>| (&w - q).mapv(|v| f64::from(v).powi(2)).sum();
        assert!(wd(&rtn_q) < wd(&plain_q), "group {group}: the search did not lower RTN's weight error");
    }
}
