//! `vl_export::eval` on tiny engines: an engine measured against itself shows no difference at
//! all, and an engine synthesized with another seed shows one in every figure.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use vl_export::eval::{EvalOptions, EvalReport, evaluate};
use vl_export::export::{BuildOptions, build};
use vl_export::synth::{Preset, SynthSpec, synthesize};

/// A shorter run than the CLI's defaults: 3 prompts, 12-token answers, 2 pixel inputs and the
/// first 700 tokens of the text set (two chunks with the tiny engine's 512-token context).
fn quick(engine: &Path, reference: &Path) -> EvalReport {
    let mut opts = EvalOptions::new(engine.to_path_buf(), reference.to_path_buf());
    opts.prompts.truncate(3);
    opts.max_new_tokens = 12;
    opts.pixel_inputs = 2;
    opts.max_text_tokens = Some(700);
    evaluate(&opts).unwrap()
}

#[test]
fn an_engine_against_itself_shows_no_difference() {
    let engine = &vl_e2e::built("tiny").engine;
    let r = quick(engine, engine);
    assert_eq!(r.vision.inputs.len(), 2);
    assert!((r.vision.cosine_mean - 1.0).abs() < 1e-9 && (r.vision.cosine_min - 1.0).abs() < 1e-9, "{:?}", r.vision);
    for d in [&r.prompts, &r.text] {
        assert!(d.positions > 0);
        assert!(d.kl_max <= 1e-6, "KL {d:?}");
        assert_eq!(d.top1_agreement, 1.0, "{d:?}");
    }
    assert_eq!(r.perplexity.chunks, 2);
    assert_eq!(r.perplexity.tokens, 700, "BOS opens each chunk (511 + 189 tokens), so every token is scored");
    assert!(r.perplexity.engine.is_finite() && r.perplexity.engine > 1.0);
    assert_eq!(r.perplexity.engine, r.perplexity.reference);
    assert_eq!(r.greedy.cases.len(), 3);
    assert_eq!(r.greedy.identical, 3);
    for c in &r.greedy.cases {
        assert_eq!(c.common_prefix, c.reference_tokens);
        assert_eq!(c.engine_text, c.reference_text);
    }
    assert_eq!(r.prompts.positions, r.greedy.cases.iter().map(|c| c.reference_tokens).sum::<usize>());
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["text"]["top1_agreement"], 1.0);
    assert!(json["settings"]["text_sha256"].as_str().unwrap().len() == 64);
    assert!(r.to_string().contains("top-1 agreement"));
}

#[test]
fn an_engine_of_another_seed_differs() {
    let dir = tempfile::tempdir().unwrap();
    let (checkpoint, engine) = (dir.path().join("ckpt"), dir.path().join("engine"));
    synthesize(&SynthSpec { seed: 1, ..SynthSpec::preset(Preset::Tiny) }, &checkpoint).unwrap();
    build(&BuildOptions::new(checkpoint, engine.clone())).unwrap();
    let reference = &vl_e2e::built("tiny").engine;
    let r = quick(&engine, reference);
    assert!(r.vision.cosine_mean < 0.9, "{:?}", r.vision);
    for d in [&r.prompts, &r.text] {
        assert!(d.kl_mean > 1e-3, "{d:?}");
        assert!(d.top1_agreement < 1.0, "{d:?}");
    }
    assert_ne!(r.perplexity.engine, r.perplexity.reference);
    assert!(r.greedy.common_prefix_mean < r.greedy.reference_tokens_mean, "{:?}", r.greedy);
}
