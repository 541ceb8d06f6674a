//! Every precision builds from the same checkpoint, runs on CPU, and stays within tolerances of
//! the fp32 reference (transformers goldens of the tiny preset). The tolerances are the errors
//! measured on this random-weight model with a margin of about 3x; random weights are a worst
//! case for quantization (flat logits, no outlier structure), and the figures for a trained
//! model are in the README's accuracy table (`make accuracy`).
#![allow(clippy::unwrap_used)]

use ndarray::{Array2, ArrayD, Ix2, Ix3};
use ndarray_npy::read_npy;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use vl_e2e::{built, fixture_dir};
use vl_export::export::{BuildOptions, build};
use vl_export::onnx::{Attr, ExternalData, GraphBuilder};
use vl_export::precision::WeightMethod;
use vl_export::quant::calibrate::CalibOptions;
use vl_export::weight_codes::blocks::{self, BlockShape};
use vl_runtime::generate::Splice;
use vl_runtime::kv_cache::KvCache;
use vl_runtime::manifest::{DType, Dim, Precision, TensorSpec};
use vl_runtime::{Media, Pipeline, PipelineOptions};

struct Tolerance {
    precision: Precision,
    method: WeightMethod,
    min_feature_cosine: f32,
    max_mean_kl: f32,
    min_top1: f32,
}

const GPTQ: WeightMethod = WeightMethod::GptqActOrder;

const TOLERANCES: [Tolerance; 7] = [
    Tolerance {
        precision: Precision::Fp16,
        method: GPTQ,
        min_feature_cosine: 0.9999,
        max_mean_kl: 1e-4,
        min_top1: 0.98,
    },
    Tolerance { precision: Precision::Int8, method: GPTQ, min_feature_cosine: 0.996, max_mean_kl: 0.02, min_top1: 0.9 },
    Tolerance {
        precision: Precision::Int8Weight,
        method: GPTQ,
        min_feature_cosine: 0.998,
        max_mean_kl: 0.01,
        min_top1: 0.9,
    },
    Tolerance {
        precision: Precision::Int4Weight,
        method: GPTQ,
        min_feature_cosine: 0.85,
        max_mean_kl: 1.0,
        min_top1: 0.4,
    },
    Tolerance {
        precision: Precision::Int4Weight,
        method: WeightMethod::Gptq,
        min_feature_cosine: 0.85,
        max_mean_kl: 1.0,
        min_top1: 0.4,
    },
    Tolerance {
        precision: Precision::Int4Weight,
        method: WeightMethod::RtnAsymmetric,
        min_feature_cosine: 0.85,
        max_mean_kl: 1.0,
        min_top1: 0.4,
    },
    Tolerance {
        precision: Precision::Int4Weight,
        method: WeightMethod::RtnSymmetric,
        min_feature_cosine: 0.85,
        max_mean_kl: 1.0,
        min_top1: 0.4,
    },
];

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|&x| x as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
}

#[test]
fn every_precision_stays_close_to_fp32() {
    let base = built("tiny");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir("tiny").join("golden.json")).unwrap()).unwrap();
    let prompt: Vec<u32> = golden["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let px: ArrayD<f32> = read_npy(fixture_dir("tiny").join("pixel_values_videos.npy")).unwrap();
    let px = std::sync::Arc::new(px.into_dimensionality().unwrap());
    let ref_feat: Array2<f32> = {
        let a: ArrayD<f32> = read_npy(fixture_dir("tiny").join("video_features.npy")).unwrap();
        a.into_dimensionality::<Ix3>().unwrap().index_axis_move(ndarray::Axis(0), 0)
    };
    let ref_logits: Array2<f32> = {
        let a: ArrayD<f32> = read_npy(fixture_dir("tiny").join("logits.npy")).unwrap();
        a.into_dimensionality::<Ix2>().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    for tol in TOLERANCES {
        let label = format!("{} {}", tol.precision.name(), tol.method.label());
        let out = dir.path().join(label.replace(' ', "-"));
        // Int8 and GPTQ calibrate on the built-in spec; the table goes to the scratch directory.
        let calibrated = tol.precision == Precision::Int8
            || (matches!(tol.precision, Precision::Int8Weight | Precision::Int4Weight) && tol.method.gptq());
        let calib =
            calibrated.then(|| CalibOptions { table_dir: Some(dir.path().join("tables")), ..CalibOptions::default() });
        let opts = BuildOptions {
            precision: tol.precision,
            weight_method: tol.method,
            calib,
            ..BuildOptions::new(base.checkpoint.clone(), out.clone())
        };
        build(&opts).unwrap();
        let p = Pipeline::load(&out, PipelineOptions::default()).unwrap();
        assert_eq!(p.manifest().precision, tol.precision);

        let visual = p.visual(&Media::VideoPixels(px.clone())).unwrap().unwrap();
        let min_cos = visual
            .features
            .to_host()
            .unwrap()
            .rows()
            .into_iter()
            .zip(ref_feat.rows())
            .map(|(a, b)| a.dot(&b) / (a.dot(&a).sqrt() * b.dot(&b).sqrt()))
            .fold(1.0f32, f32::min);
        assert!(min_cos >= tol.min_feature_cosine, "{label}: feature cosine {min_cos}");

        let splice = Splice { token: p.manifest().tokens.video, features: &visual.features, first: 0 };
        let mut kv = KvCache::new(&p.manifest().model).unwrap();
        let logits = p.language_model().forward_logits(&mut kv, &prompt, Some(&splice), prompt.len()).unwrap();
        let vocab = p.manifest().model.vocab_size;
        let (mut kl, mut agree) = (0.0f64, 0usize);
        for (row, reference) in logits.chunks_exact(vocab).zip(ref_logits.rows()) {
            let reference = reference.as_slice().unwrap();
            let (lp, lq) = (log_softmax(reference), log_softmax(row));
            kl += lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
            agree += usize::from(argmax(row) == argmax(reference));
        }
        let mean_kl = (kl / prompt.len() as f64) as f32;
        let top1 = agree as f32 / prompt.len() as f32;
        assert!(mean_kl <= tol.max_mean_kl, "{label}: mean KL {mean_kl}");
        assert!(top1 >= tol.min_top1, "{label}: top-1 agreement {top1}");
        eprintln!("{label}: feature cosine ≥ {min_cos:.6}, mean KL {mean_kl:.2e}, top-1 {top1:.3}");
        let notes = p.manifest().numerics.join("\n");
        if tol.precision == Precision::Int4Weight {
            assert!(notes.contains(&format!("weight method {}", tol.method.label())), "{label}: {notes}");
        }
    }
}

/// A `MatMulNBits` with zero points, as the weight-only graphs write it, computes in ONNX
/// Runtime what the dequantized weights do: `x @ ((q - zero) * scale)^T`. 80 inputs in blocks
/// of 32 and 16 make 3 and 5 blocks per row, so 4-bit zero points end half a byte early on
/// each row (the padding the operator's layout asks for). accuracy_level 0 (fp32 arithmetic):
/// only float rounding differs, so the bound is 1e-4 relative to the largest output.
#[test]
fn blocks_with_zero_points_run_in_onnx_runtime_as_their_dequantized_weights() {
    let (n, k, m) = (24usize, 80usize, 5usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let w: Vec<f32> = (0..n * k).map(|i| rng.random_range(-1.0..1.0f32) + if i % 7 == 0 { 0.5 } else { 0.0 }).collect();
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
    let dir = tempfile::tempdir().unwrap();
    for (bits, block) in [(4u8, 32usize), (4, 16), (8, 32)] {
        let q = blocks::quantize_asym(&w, n, k, bits, block);
        let deq = blocks::dequantize(&q, n, k, bits, block);
        let s = BlockShape { n, k, bits, block };
        let name = format!("nbits-{bits}-{block}");
        let mut b =
            GraphBuilder::new(&name, ExternalData::create(&dir.path().join(format!("{name}.onnx.data"))).unwrap());
        let fixed = |d: &[i64]| d.iter().map(|&d| Dim::Fixed(d)).collect::<Vec<_>>();
        let xi = b.input(TensorSpec::new("x", DType::F32, fixed(&[m as i64, k as i64])));
        let (kb, blob) = (s.k_blocks() as i64, s.blob() as i64);
        let codes = b.weight_u8("w.codes", &[n as i64, kb, blob], &q.codes).unwrap();
        let scales = b.weight_f32("w.scales", &[n as i64 * kb], &q.scales).unwrap();
        let zeros = q.zero_points.as_ref().unwrap();
        assert_eq!(zeros.len(), n * s.zero_row_bytes());
        let zp = b.weight_u8("w.zero_points", &[zeros.len() as i64], zeros).unwrap();
        let y = b.ms_op(
            "MatMulNBits",
            &[&xi, &codes, &scales, &zp],
            vec![
                ("K", Attr::Int(k as i64)),
                ("N", Attr::Int(n as i64)),
                ("bits", Attr::Int(i64::from(bits))),
                ("block_size", Attr::Int(block as i64)),
                ("accuracy_level", Attr::Int(0)),
            ],
        );
        b.output(&y, TensorSpec::new("y", DType::F32, fixed(&[m as i64, n as i64])));
        let done = b.finish("test").unwrap();
        let file = dir.path().join(format!("{name}.onnx"));
        std::fs::write(&file, &done.model_bytes).unwrap();
        let env = vl_runtime::ort_env::environment().unwrap();
        let mut session = ort::session::Session::builder(env).unwrap().commit_from_file(&file).unwrap();
        let input = ort::value::TensorRef::from_array_view(([m, k], x.as_slice())).unwrap();
        let out = session.run(ort::inputs!["x" => input]).unwrap();
        let (_, got) = out["y"].try_extract_tensor::<f32>().unwrap();
        let want: Vec<f32> =
            (0..m * n).map(|i| (0..k).map(|c| x[(i / n) * k + c] * deq[(i % n) * k + c]).sum::<f32>()).collect();
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(worst <= 1e-4 * scale, "{bits} bits, block {block}: off by {worst} (outputs up to {scale})");
    }
}
