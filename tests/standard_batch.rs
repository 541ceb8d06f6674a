//! The standard-operator decoder (`decoder.onnx`, what TensorRT runs) decodes several
//! sequences of different lengths in one call: each row's cache right-padded to the longest,
//! the padding closed by `attention_mask`, and each row's own `position_ids`. Every row's
//! logits equal the same step run alone (within 1e-4), on the tiny fixture engine.
#![allow(clippy::unwrap_used)]

use std::borrow::Cow;

use ndarray::{Array3, Array4, Axis, concatenate, s};
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vl_e2e::{built, max_abs_diff};
use vl_runtime::SessionOptions;
use vl_runtime::graph::Graph;
use vl_runtime::manifest::{KvLayout, Manifest};

const TOLERANCE: f32 = 1e-4;

/// One decoder call: logits `[batch, vocab]` of the last position, and each layer's present
/// key and value.
struct Step {
    logits: Vec<Vec<f32>>,
    present: Vec<(Array4<f32>, Array4<f32>)>,
}

fn run(
    session: &mut Session,
    embeds: Array3<f32>,
    mask: Vec<Vec<i64>>,
    positions: Vec<i64>,
    past: &[(Array4<f32>, Array4<f32>)],
) -> Step {
    let (batch, seq) = (embeds.shape()[0], embeds.shape()[1]);
    let total = mask[0].len();
    let flat_mask: Vec<i64> = mask.concat();
    let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
        ("inputs_embeds".into(), Tensor::from_array(embeds).unwrap().into()),
        ("attention_mask".into(), Tensor::from_array(([batch, total], flat_mask)).unwrap().into()),
        ("position_ids".into(), Tensor::from_array(([batch, seq], positions)).unwrap().into()),
        ("logits_to_keep".into(), Tensor::from_array(([1usize], vec![1i64])).unwrap().into()),
    ];
    for (i, (k, v)) in past.iter().enumerate() {
        inputs.push((format!("past_key_values.{i}.key").into(), Tensor::from_array(k.clone()).unwrap().into()));
        inputs.push((format!("past_key_values.{i}.value").into(), Tensor::from_array(v.clone()).unwrap().into()));
    }
    let outputs = session.run(inputs).unwrap();
    let logits = outputs["logits"].try_extract_array::<f32>().unwrap();
    let logits = (0..batch).map(|b| logits.slice(s![b, -1, ..]).to_vec()).collect();
    let present = (0..past.len())
        .map(|i| {
            let k = outputs[format!("present.{i}.key").as_str()].try_extract_array::<f32>().unwrap();
            let v = outputs[format!("present.{i}.value").as_str()].try_extract_array::<f32>().unwrap();
            (k.into_dimensionality().unwrap().to_owned(), v.into_dimensionality().unwrap().to_owned())
        })
        .collect();
    Step { logits, present }
}

/// `x` [1, heads, len, dim] zero-padded along the sequence to `to` positions.
fn pad(x: &Array4<f32>, to: usize) -> Array4<f32> {
    let mut out = Array4::zeros((1, x.shape()[1], to, x.shape()[3]));
    out.slice_mut(s![.., .., ..x.shape()[2], ..]).assign(x);
    out
}

#[test]
fn rows_of_different_lengths_decode_together_as_they_do_alone() {
    let dir = &built("tiny").engine;
    let manifest = Manifest::load(dir).unwrap();
    assert_eq!(manifest.model.kv_layout, KvLayout::Concat);
    let dims = &manifest.model;
    let graph = Graph::load(dir, "decoder", &manifest.graphs.decoder, &SessionOptions::default(), &manifest).unwrap();
    let mut session = graph.lock();
    let mut rng = StdRng::seed_from_u64(7);
    let mut embeds = |n: usize| Array3::from_shape_fn((1, n, dims.text_hidden), |_| rng.random_range(-1.0f32..1.0));
    let empty: Vec<_> = (0..dims.num_layers)
        .map(|_| {
            let e = Array4::<f32>::zeros((1, dims.num_kv_heads, 0, dims.head_dim));
            (e.clone(), e)
        })
        .collect();

    // Prompts of 11 and 4 positions, each prefilled alone, then one step each alone.
    let lens = [11usize, 4];
    let (prompts, news): (Vec<_>, Vec<_>) = lens.iter().map(|&n| (embeds(n), embeds(1))).unzip();
    let mut caches = Vec::new();
    let mut alone = Vec::new();
    for ((&n, prompt), new) in lens.iter().zip(&prompts).zip(&news) {
        let prefill = run(&mut session, prompt.clone(), vec![vec![1; n]], (0..n as i64).collect(), &empty);
        let step = run(&mut session, new.clone(), vec![vec![1; n + 1]], vec![n as i64], &prefill.present);
        caches.push(prefill.present);
        alone.push(step.logits[0].clone());
    }

    // Both rows in one call: caches right-padded to the longest, padding masked out.
    let longest = lens[0];
    let past: Vec<_> = (0..dims.num_layers)
        .map(|layer| {
            let ks: Vec<_> = caches.iter().map(|c| pad(&c[layer].0, longest)).collect();
            let vs: Vec<_> = caches.iter().map(|c| pad(&c[layer].1, longest)).collect();
            let views = |xs: &[Array4<f32>]| concatenate(Axis(0), &xs.iter().map(|x| x.view()).collect::<Vec<_>>());
            (views(&ks).unwrap(), views(&vs).unwrap())
        })
        .collect();
    let mask: Vec<Vec<i64>> =
        lens.iter().map(|&n| (0..=longest).map(|p| i64::from(p < n || p == longest)).collect()).collect();
    let new = concatenate(Axis(0), &[news[0].view(), news[1].view()]).unwrap();
    let batched = run(&mut session, new, mask, lens.iter().map(|&n| n as i64).collect(), &past);
    for (row, want) in alone.iter().enumerate() {
        let d = max_abs_diff(&batched.logits[row], want);
        assert!(d <= TOLERANCE, "row {row} (prompt of {}) differs by {d} from its step alone", lens[row]);
    }
}
