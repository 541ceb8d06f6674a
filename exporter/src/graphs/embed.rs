//! `embed.onnx`: `input_ids` → `inputs_embeds`, a gather that keeps the table on the device.
use vl_runtime::manifest::{DType, Dim, TensorSpec};

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::onnx::GraphBuilder;

/// Builds the embedding lookup.
pub fn build(b: &mut GraphBuilder, ck: &Checkpoint) -> Result<()> {
    let t = &ck.config.text;
    let w = ck.weights(&ck.roots.text_body).pp("embed_tokens");
    let table =
        b.weight_f32(&w.name("weight"), &[t.vocab as i64, t.hidden as i64], &w.f32("weight", &[t.vocab, t.hidden])?)?;
    let ids = b.input(TensorSpec::new(
        "input_ids",
        DType::I64,
        vec![Dim::Symbolic("batch".into()), Dim::Symbolic("sequence".into())],
    ));
    let out = b.op("Gather", &[&table, &ids], vec![]);
    let out = super::nn::to_f32(b, &out);
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
