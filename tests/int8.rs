//! `--precision int8` on the tiny preset: SmoothQuant folding alone leaves the fp32 model's
//! outputs unchanged, a calibration table is reused by a second build with the same key and
//! only by it, its TensorRT caches name tensors of the fp32 graph, and ONNX Runtime's CPU
//! provider fuses every QDQ linear into an integer matmul. (Accuracy against the transformers
//! goldens is in tests/precision.rs with the other precisions.)
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::Path;

use ndarray::{ArrayD, Ix5};
use ndarray_npy::read_npy;
use prost::Message;
use serde_json::Value;
use vl_e2e::{built, fixture_dir, max_abs_diff};
use vl_export::checkpoint::Checkpoint;
use vl_export::export::{BuildOptions, build};
use vl_export::onnx::proto::ModelProto;
use vl_export::quant::calibrate::{CalibOptions, calibrate};
use vl_export::quant::fusion::fusion_report;
use vl_export::quant::stats::Method;
use vl_export::quant::table::QuantTable;
use vl_runtime::generate::Splice;
use vl_runtime::kv_cache::KvCache;
use vl_runtime::manifest::{Precision, Target};
use vl_runtime::{DecoderChoice, Media, Pipeline, PipelineOptions};

/// A quick spec: two generated videos, one image, three samples, both kinds of smoothing.
const SPEC: &str = "\
samples: 3
method: max
smoothquant_down_proj: true
videos:
  - generated: testsrc2=size=160x120:rate=10
    seconds: 1
  - generated: mandelbrot=size=160x120:rate=10
    seconds: 1
images:
  - generated: smptehdbars=size=160x120
prompts:
  - What is happening in this video?
  - Describe the colors.
";

fn spec_in(dir: &Path, extra: &str) -> CalibOptions {
    let path = dir.join("spec.yaml");
    std::fs::write(&path, format!("{SPEC}{extra}")).unwrap();
    CalibOptions { spec: Some(path), table_dir: Some(dir.join("tables")), ..CalibOptions::default() }
}

/// Video features and the logits of every prompt position for the golden inputs.
fn run_golden(engine: &Path) -> (Vec<f32>, Vec<f32>) {
    run_golden_on(engine, DecoderChoice::Auto)
}

/// [`run_golden`] on the graphs `choice` picks (`Standard`: the TensorRT-form ones).
fn run_golden_on(engine: &Path, choice: DecoderChoice) -> (Vec<f32>, Vec<f32>) {
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir("tiny").join("golden.json")).unwrap()).unwrap();
    let prompt: Vec<u32> = golden["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let px: ArrayD<f32> = read_npy(fixture_dir("tiny").join("pixel_values_videos.npy")).unwrap();
    let px = std::sync::Arc::new(px.into_dimensionality::<Ix5>().unwrap());
    let p = Pipeline::load(engine, PipelineOptions { decoder: choice, ..Default::default() }).unwrap();
    let visual = p.visual(&Media::VideoPixels(px)).unwrap().unwrap();
    let splice = Splice { token: p.manifest().tokens.video, features: &visual.features, first: 0 };
    let mut kv = KvCache::new(&p.manifest().model).unwrap();
    let logits = p.language_model().forward_logits(&mut kv, &prompt, Some(&splice), prompt.len()).unwrap();
    (visual.features.to_host().unwrap().iter().copied().collect(), logits)
}

#[test]
fn smoothquant_folding_alone_leaves_fp32_outputs_unchanged() {
    let base = built("tiny");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fp32-smoothed");
    let opts = BuildOptions {
        calib: Some(spec_in(dir.path(), "")),
        ..BuildOptions::new(base.checkpoint.clone(), out.clone())
    };
    let report = build(&opts).unwrap();
    assert_eq!(report.manifest.precision, Precision::Fp32);
    assert!(report.manifest.numerics.iter().any(|n| n.contains("SmoothQuant")), "{:?}", report.manifest.numerics);
    let (feat_ref, logits_ref) = run_golden(&base.engine);
    let (feat, logits) = run_golden(&out);
    assert_eq!(feat, feat_ref, "the vision graphs are not smoothed");
    let scale = logits_ref.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(&logits, &logits_ref);
    eprintln!("smoothed fp32: max logit difference {diff:.2e} (logits up to {scale:.2})");
    assert!(diff <= 1e-5 * scale.max(1.0), "smoothing changed the logits by {diff}");
}

#[test]
fn a_table_is_reused_only_under_the_same_key() {
    let base = built("tiny");
    let ck = Checkpoint::open(&base.checkpoint).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = spec_in(dir.path(), "");
    let first = calibrate(&ck, &opts).unwrap();
    assert!(!first.reused);
    let again = calibrate(&ck, &opts).unwrap();
    assert!(again.reused, "same spec and checkpoint: the table is reused");
    assert_eq!(again.table, first.table);
    assert_eq!(again.path, first.path);
    let other = calibrate(&ck, &CalibOptions { alpha: Some(0.8), ..opts.clone() }).unwrap();
    assert!(!other.reused && other.path != first.path, "another alpha is another table");
    let entropy = calibrate(&ck, &CalibOptions { method: Some(Method::Entropy), ..opts.clone() }).unwrap();
    assert!(!entropy.reused && entropy.table.method == "entropy");
    for t in &entropy.table.tensors {
        assert!(t.range.threshold <= t.range.amax && t.range.threshold > 0.0, "{t:?}");
    }

    // The TensorRT caches name tensors of the plain fp32 graphs.
    for cache in &first.trt_caches {
        let text = std::fs::read_to_string(cache).unwrap();
        let graph = cache.to_string_lossy().rsplit('.').nth(1).unwrap().to_string();
        let mut lines = text.lines();
        assert!(lines.next().unwrap().starts_with("TRT-101300-"), "{text}");
        let model =
            ModelProto::decode(std::fs::read(base.engine.join(format!("{graph}.onnx"))).unwrap().as_slice()).unwrap();
        let names: HashSet<String> = model.graph.unwrap().node.into_iter().flat_map(|n| n.output.into_iter()).collect();
        let mut count = 0;
        for line in lines {
            let (name, hex) = line.rsplit_once(": ").unwrap();
            assert!(names.contains(name), "{graph}: {name} is not a tensor of the fp32 graph");
            assert_eq!(hex.len(), 8);
            assert!(f32::from_bits(u32::from_str_radix(hex, 16).unwrap()) > 0.0);
            count += 1;
        }
        assert!(count > 0, "{graph}: empty cache");
    }
}

/// Both targets fuse every linear: the standard graph (int8 activations, for TensorRT) with
/// `session.qdqisint8allowed`, which vl-runtime sets; the ONNX Runtime graph (uint8
/// activations) without it.
#[test]
fn onnx_runtime_fuses_every_qdq_linear() {
    let base = built("tiny");
    let dir = tempfile::tempdir().unwrap();
    for (target, int8_allowed) in [(Target::Standard, true), (Target::OnnxRuntime, false)] {
        let out = dir.path().join(format!("int8-{target:?}"));
        let opts = BuildOptions {
            precision: Precision::Int8,
            calib: Some(spec_in(dir.path(), "")),
            target: Some(target),
            ..BuildOptions::new(base.checkpoint.clone(), out.clone())
        };
        let report = build(&opts).unwrap();
        assert_eq!(report.manifest.target, target);
        let table = calibrate(&Checkpoint::open(&base.checkpoint).unwrap(), &spec_in(dir.path(), "")).unwrap();
        assert!(table.reused);
        for graph in ["vision", "image", "decoder"] {
            let linears: usize =
                table.table.tensors.iter().filter(|t| t.graph == graph).map(|t| t.consumers.len()).sum();
            let scratch = tempfile::tempdir().unwrap();
            let r = fusion_report(&out.join(format!("{graph}.onnx")), scratch.path(), int8_allowed).unwrap();
            eprintln!("{target:?} {graph}: {r:?}");
            assert_eq!(r.integer_matmuls, linears, "{target:?} {graph}: every linear runs as an integer matmul");
            assert_eq!(r.dequantized_matmuls, 0, "{target:?} {graph}");
            assert!(!r.ops.contains_key("DequantizeLinear"), "{target:?} {graph}: {:?}", r.ops);
        }
        let (features, logits) = run_golden(&out);
        assert!(logits.iter().all(|v| v.is_finite()));
        if target == Target::Standard {
            uint8_twins_are_the_cpu_graphs(&out, &table.table, &features, &logits);
        }
    }
}

/// The TensorRT-form int8 engine's twins for ONNX Runtime (`vision_uint8`, `image_uint8`,
/// `decoder_in_place`) fuse every linear without `session.qdqisint8allowed`, i.e. their
/// activations are uint8; the runtime runs them by default on the CPU, and they compute what
/// the int8-activation graphs compute (the same grid, so equal up to float summation order).
fn uint8_twins_are_the_cpu_graphs(out: &Path, table: &QuantTable, features: &[f32], logits: &[f32]) {
    for (file, graph) in [("vision_uint8", "vision"), ("image_uint8", "image"), ("decoder_in_place", "decoder")] {
        let linears: usize = table.tensors.iter().filter(|t| t.graph == graph).map(|t| t.consumers.len()).sum();
        let scratch = tempfile::tempdir().unwrap();
        let r = fusion_report(&out.join(format!("{file}.onnx")), scratch.path(), false).unwrap();
        assert_eq!(r.integer_matmuls, linears, "{file}: every linear fused with uint8 activations: {r:?}");
        assert!(!r.ops.contains_key("DequantizeLinear"), "{file}: {:?}", r.ops);
    }
    // The runtime picks the twins on the CPU by default, and the TensorRT-form graphs when asked.
    for (choice, vision, image, decoder) in [
        (DecoderChoice::Auto, "vision_uint8.onnx", "image_uint8.onnx", "decoder_in_place.onnx"),
        (DecoderChoice::Standard, "vision.onnx", "image.onnx", "decoder.onnx"),
    ] {
        let p = Pipeline::load(out, PipelineOptions { decoder: choice, ..Default::default() }).unwrap();
        let g = &p.manifest().graphs;
        assert_eq!((g.vision.file.as_str(), g.image.file.as_str(), g.decoder.file.as_str()), (vision, image, decoder));
    }
    let (std_features, std_logits) = run_golden_on(out, DecoderChoice::Standard);
    for (what, a, b) in [("video features", features, &std_features[..]), ("logits", logits, &std_logits[..])] {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        let diff = max_abs_diff(a, b);
        eprintln!("uint8 twins vs int8 graphs: {what} differ by at most {diff:.2e} (values up to {scale:.2})");
        assert!(diff <= 1e-4 * scale, "{what}: the uint8 twins differ from the int8 graphs by {diff}");
    }
}

#[test]
fn excluded_linears_stay_in_float() {
    let base = built("tiny");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("int8-partial");
    let calib = spec_in(dir.path(), "exclude: [down_proj, lm_head]\n");
    let opts = BuildOptions {
        precision: Precision::Int8,
        calib: Some(calib),
        ..BuildOptions::new(base.checkpoint.clone(), out.clone())
    };
    build(&opts).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let r = fusion_report(&out.join("decoder.onnx"), scratch.path(), true).unwrap();
    // 2 layers x (q, k, v, o, gate, up) quantized; down_proj x 2 and lm_head in fp32.
    assert_eq!(r.integer_matmuls, 12, "{r:?}");
    let (_, logits) = run_golden(&out);
    assert!(logits.iter().all(|v| v.is_finite()));
}

/// `a` and `b` within `rel` of each other (relative to the larger magnitude).
fn close(a: f32, b: f32, rel: f32) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) + f32::MIN_POSITIVE
}

fn assert_same_table(streamed: &QuantTable, whole: &QuantTable, rel: f32) {
    assert_eq!(streamed.key, whole.key);
    assert_eq!(streamed.excluded, whole.excluded);
    assert_eq!(streamed.tensors.len(), whole.tensors.len());
    for (s, w) in streamed.tensors.iter().zip(&whole.tensors) {
        let what = format!("{} {} ({:?})", w.graph, w.tensor, w.consumers);
        assert_eq!((&s.graph, &s.tensor, &s.consumers, s.channels), (&w.graph, &w.tensor, &w.consumers, w.channels));
        let ranges = [(Some(s.range), Some(w.range)), (s.unsmoothed, w.unsmoothed)];
        for (a, b) in ranges {
            assert_eq!(a.is_some(), b.is_some(), "{what}");
            if let (Some(a), Some(b)) = (a, b) {
                for (x, y) in [(a.amax, b.amax), (a.threshold, b.threshold), (a.scale, b.scale)] {
                    assert!(close(x, y, rel), "{what}: {a:?} streamed, {b:?} whole");
                }
            }
        }
    }
    assert_eq!(streamed.smoothing.len(), whole.smoothing.len());
    for (s, w) in streamed.smoothing.iter().zip(&whole.smoothing) {
        assert_eq!((&s.graph, s.kind, &s.divided, &s.linears), (&w.graph, w.kind, &w.divided, &w.linears));
        for (x, y) in s.factors.iter().zip(&w.factors) {
            assert!(close(*x, *y, rel), "{}: factor {x} streamed, {y} whole", s.divided);
        }
    }
}

/// Streamed calibration (the decoder one layer at a time, every activation spilled to disk)
/// writes the table that running each whole graph writes, for the max and entropy methods,
/// with both kinds of smoothing, with and without grouped-query attention; and it measures
/// itself.
#[test]
fn streamed_calibration_equals_whole_graph_calibration() {
    for (case, method) in [("tiny", Method::Entropy), ("tiny-gqa", Method::Max), ("tiny", Method::Max)] {
        let base = built(case);
        let ck = Checkpoint::open(&base.checkpoint).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let opts = CalibOptions { method: Some(method), ..spec_in(dir.path(), "") };
        let whole = calibrate(
            &ck,
            &CalibOptions { block_layers: Some(usize::MAX), table_dir: Some(dir.path().join("whole")), ..opts.clone() },
        )
        .unwrap();
        let streamed =
            calibrate(&ck, &CalibOptions { block_layers: Some(1), memory_budget: Some(0), ..opts.clone() }).unwrap();
        assert!(!whole.reused && !streamed.reused);
        let report = streamed.report.unwrap();
        eprintln!("{case} {method:?}: streamed {report}, whole {}", whole.report.unwrap());
        assert_eq!(report.blocks, 2 + ck.config.text.layers, "two vision graphs and one block per layer");
        assert!(report.spilled_bytes > 0 && report.peak_scratch_bytes > 0, "{report:?}");
        assert_same_table(&streamed.table, &whole.table, 1e-5);
    }
}

/// `keep_float_layers: 1`: the scan measures every decoder block (the last one with the head),
/// keeps the one int8 changes most in float, and the built graph has exactly the other
/// linears as integer matmuls; the manifest says what the scan kept.
#[test]
fn the_sensitivity_scan_keeps_the_most_changed_layer_in_float() {
    let base = built("tiny");
    let ck = Checkpoint::open(&base.checkpoint).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plain = calibrate(&ck, &spec_in(dir.path(), "")).unwrap();
    assert!(plain.table.sensitivity.is_empty());
    let scanned = calibrate(&ck, &spec_in(dir.path(), "keep_float_layers: 1\n")).unwrap();
    assert!(!scanned.reused, "the scan is part of the key");
    let blocks = &scanned.table.sensitivity;
    let layers = ck.config.text.layers;
    assert_eq!(blocks.len(), layers, "{blocks:?}");
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!((b.first_layer, b.end_layer, b.head), (i, i + 1, i + 1 == layers));
        assert!(b.error.is_finite() && b.error > 0.0 && b.error < 1.0, "{b:?}");
    }
    let kept: Vec<_> = blocks.iter().filter(|b| b.kept_float).collect();
    assert_eq!(kept.len(), 1);
    assert!(blocks.iter().all(|b| b.error <= kept[0].error), "{blocks:?}");
    let prefix = format!("layers.{}.", kept[0].first_layer);
    let table = &scanned.table;
    let decoder_linears: Vec<&String> =
        table.tensors.iter().filter(|t| t.graph == "decoder").flat_map(|t| &t.consumers).collect();
    for c in &decoder_linears {
        let in_block = c.contains(&prefix) || (kept[0].head && c.contains("lm_head"));
        assert_eq!(table.excluded.contains(*c), in_block, "{c}: kept in float iff in the kept block");
    }
    assert_eq!(plain.table.excluded.len(), 0);

    let out = dir.path().join("int8-scanned");
    let opts = BuildOptions {
        precision: Precision::Int8,
        calib: Some(spec_in(dir.path(), "keep_float_layers: 1\n")),
        ..BuildOptions::new(base.checkpoint.clone(), out.clone())
    };
    let report = build(&opts).unwrap();
    let note = report.manifest.numerics.iter().find(|n| n.starts_with("sensitivity scan")).unwrap();
    assert!(note.contains(&format!("layer {}", kept[0].first_layer)), "{note}");
    let scratch = tempfile::tempdir().unwrap();
    let r = fusion_report(&out.join("decoder_in_place.onnx"), scratch.path(), false).unwrap();
    let quantized = decoder_linears.iter().filter(|c| !table.excluded.contains(**c)).count();
    assert_eq!(r.integer_matmuls, quantized, "{r:?}");
    let (_, logits) = run_golden(&out);
    assert!(logits.iter().all(|v| v.is_finite()));
}
