//! `embed.onnx`: token ids and visual features → `inputs_embeds`, on the device.
//!
//! Inputs: `input_ids` [batch, sequence], `visual_features` [visual_batch, visual_rows, hidden]
//! (a video's or image's features as the vision graph left them, rows numbered across its batch;
//! zero rows when there are none) and `visual_index` [batch, sequence]: the feature row each
//! position takes, or -1 for a position that takes its token's embedding. The splice happens here, so a GPU runtime sends token ids
//! and row numbers to the device and never brings the features or embeddings back to the host.
use vl_runtime::manifest::{DType, Dim, TensorSpec};

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::onnx::{Attr, GraphBuilder};

/// Builds the embedding lookup with the visual splice.
pub fn build(b: &mut GraphBuilder, ck: &Checkpoint) -> Result<()> {
    let t = &ck.config.text;
    let w = ck.weights(&ck.roots.text_body).pp("embed_tokens");
    let table =
        b.weight_f32(&w.name("weight"), &[t.vocab as i64, t.hidden as i64], &w.f32("weight", &[t.vocab, t.hidden])?)?;
    let positions = || vec![Dim::Symbolic("batch".into()), Dim::Symbolic("sequence".into())];
    let ids = b.input(TensorSpec::new("input_ids", DType::I64, positions()));
    let features = b.input(TensorSpec::new(
        "visual_features",
        DType::F32,
        vec![Dim::Symbolic("visual_batch".into()), Dim::Symbolic("visual_rows".into()), Dim::Fixed(t.hidden as i64)],
    ));
    let flat = b.const_i64(&[-1, t.hidden as i64], &[2]);
    let features = b.op("Reshape", &[&features, &flat], vec![]);
    let index = b.input(TensorSpec::new("visual_index", DType::I64, positions()));
    let text = b.op("Gather", &[&table, &ids], vec![]);
    let text = super::nn::to_f32(b, &text);
    // Row 0 of the padded table is a zero row that text positions (index -1) gather, so the
    // gather stays in range with no features at all.
    let zero = b.const_f32(&vec![0.0; t.hidden], &[1, t.hidden as i64]);
    let padded = b.op("Concat", &[&zero, &features], vec![("axis", Attr::Int(0))]);
    let one = b.const_i64(&[1], &[1]);
    let rows = b.op("Add", &[&index, &one], vec![]);
    let visual = b.op("Gather", &[&padded, &rows], vec![]);
    let none = b.const_i64(&[-1], &[1]);
    let is_visual = b.op("Greater", &[&index, &none], vec![]);
    let axes = b.const_i64(&[2], &[1]);
    let is_visual = b.op("Unsqueeze", &[&is_visual, &axes], vec![]);
    let out = b.op("Where", &[&is_visual, &visual, &text], vec![]);
    b.output(
        &out,
        TensorSpec::new(
            "inputs_embeds",
            DType::F32,
            vec![Dim::Symbolic("batch".into()), Dim::Symbolic("sequence".into()), Dim::Fixed(t.hidden as i64)],
        ),
    );
    Ok(())
}
