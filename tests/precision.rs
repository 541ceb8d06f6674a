//! Every precision builds from the same checkpoint, runs on CPU, and stays within tolerances of
//! the fp32 reference (transformers goldens of the tiny preset). The tolerances are the errors
//! measured on this random-weight model with a margin of about 3x; random weights are a worst
//! case for quantization (flat logits, no outlier structure), and the figures for a trained
//! model are in the README's accuracy table (`make accuracy`).
#![allow(clippy::unwrap_used)]

use ndarray::{Array2, ArrayD, Ix2, Ix3};
use ndarray_npy::read_npy;
use serde_json::Value;
use vl_e2e::{built, fixture_dir};
use vl_export::export::{BuildOptions, build};
use vl_export::quant::calibrate::CalibOptions;
use vl_runtime::generate::Splice;
use vl_runtime::kv_cache::KvCache;
use vl_runtime::manifest::Precision;
use vl_runtime::{Media, Pipeline, PipelineOptions};

struct Tolerance {
    precision: Precision,
    min_feature_cosine: f32,
    max_mean_kl: f32,
    min_top1: f32,
}

const TOLERANCES: [Tolerance; 4] = [
    Tolerance { precision: Precision::Fp16, min_feature_cosine: 0.9999, max_mean_kl: 1e-4, min_top1: 0.98 },
    Tolerance { precision: Precision::Int8, min_feature_cosine: 0.996, max_mean_kl: 0.02, min_top1: 0.9 },
    Tolerance { precision: Precision::Int8Weight, min_feature_cosine: 0.998, max_mean_kl: 0.01, min_top1: 0.9 },
    Tolerance { precision: Precision::Int4Weight, min_feature_cosine: 0.85, max_mean_kl: 1.0, min_top1: 0.4 },
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
        let out = dir.path().join(tol.precision.name());
        // Int8 calibrates on the built-in spec; its table goes to the scratch directory.
        let calib = (tol.precision == Precision::Int8)
            .then(|| CalibOptions { table_dir: Some(dir.path().join("tables")), ..CalibOptions::default() });
        let opts =
            BuildOptions { precision: tol.precision, calib, ..BuildOptions::new(base.checkpoint.clone(), out.clone()) };
        build(&opts).unwrap();
        let p = Pipeline::load(&out, PipelineOptions::default()).unwrap();
        assert_eq!(p.manifest().precision, tol.precision);

        let visual = p.visual(&Media::VideoPixels(px.clone())).unwrap().unwrap();
        let min_cos = visual
            .features
            .rows()
            .into_iter()
            .zip(ref_feat.rows())
            .map(|(a, b)| a.dot(&b) / (a.dot(&a).sqrt() * b.dot(&b).sqrt()))
            .fold(1.0f32, f32::min);
        assert!(min_cos >= tol.min_feature_cosine, "{}: feature cosine {min_cos}", tol.precision);

        let splice = Splice { token: p.manifest().tokens.video, features: visual.features.view() };
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
        assert!(mean_kl <= tol.max_mean_kl, "{}: mean KL {mean_kl}", tol.precision);
        assert!(top1 >= tol.min_top1, "{}: top-1 agreement {top1}", tol.precision);
        eprintln!("{}: feature cosine ≥ {min_cos:.6}, mean KL {mean_kl:.2e}, top-1 {top1:.3}", tol.precision);
    }
}
