//! `decoder.onnx`: the LLaMA decoder with an explicit KV cache, built by one layer loop with
//! the attention of the engine's KV layout.
//!
//! - [`standard`]: standard operators only (TensorRT-parsable); the cache is concatenated.
//! - [`gqa`]: ONNX Runtime's `GroupQueryAttention`; the cache is one buffer written in place.
//!
//! Both take `inputs_embeds` [batch, sequence, hidden], `attention_mask` [batch, total] (int64),
//! `logits_to_keep` [1] (how many last positions get logits) and
//! `past_key_values.{i}.key|value` [batch, kv_heads, len, head_dim], and return `logits`
//! [batch, logits_to_keep, vocab] and `present.{i}.key|value`; the MLP, norms and head are
//! shared.
pub mod gqa;
pub mod standard;

use vl_runtime::manifest::{DType, Dim, KvLayout, TensorSpec};

use super::nn::{LinearOpts, activation, linear, rms_norm, to_act, to_f32};
use crate::checkpoint::{Activation, Checkpoint, TextConfig, Weights};
use crate::error::Result;
use crate::onnx::{Attr, GraphBuilder, Numerics, WeightFormat};

/// One attention variant: the inputs it adds, what all layers share, and one layer's attention.
trait Attention {
    /// Symbolic length of `past_key_values.*`.
    fn past_len(&self) -> &'static str;
    /// Symbolic length of `present.*`.
    fn present_len(&self) -> &'static str;
    /// Declares the inputs the variant needs between `attention_mask` and `logits_to_keep`.
    fn declare_inputs(&mut self, b: &mut GraphBuilder, t: &TextConfig);
    /// Builds what every layer reads (rotary tables, masks, lengths).
    fn prepare(&mut self, b: &mut GraphBuilder, t: &TextConfig, embeds: &str, mask: &str) -> Result<()>;
    /// One layer's self attention on `x`; returns its output and the present key and value.
    fn layer(
        &self,
        b: &mut GraphBuilder,
        w: &Weights,
        t: &TextConfig,
        x: &str,
        past: (&str, &str),
    ) -> Result<(String, String, String)>;
}

pub(super) fn sym(s: &str) -> Dim {
    Dim::Symbolic(s.into())
}

pub(super) fn kv_spec(name: String, t: &TextConfig, dtype: DType, len: &str) -> TensorSpec {
    TensorSpec::new(
        name,
        dtype,
        vec![sym("batch"), Dim::Fixed(t.kv_heads as i64), sym(len), Dim::Fixed(t.head_dim as i64)],
    )
}

/// The inverse frequencies of the rotary embedding, computed in f32 as transformers does.
pub(super) fn inv_freq(t: &TextConfig) -> Vec<f32> {
    let dim = t.head_dim as f32;
    (0..t.head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim;
            let f = 1.0 / (t.rope.theta as f32).powf(exponent);
            f / t.rope.linear_factor as f32
        })
        .collect()
}

/// The q, k and v projections of one layer.
fn qkv(b: &mut GraphBuilder, w: &Weights, t: &TextConfig, x: &str) -> Result<(String, String, String)> {
    let (h, hd, nh, kvh, bias) = (t.hidden, t.head_dim, t.heads, t.kv_heads, t.attention_bias);
    let q = linear(b, &w.pp("q_proj"), x, LinearOpts::new(h, nh * hd, bias))?;
    let k = linear(b, &w.pp("k_proj"), x, LinearOpts::new(h, kvh * hd, bias))?;
    let v = linear(b, &w.pp("v_proj"), x, LinearOpts::new(h, kvh * hd, bias))?;
    Ok((q, k, v))
}

/// The attention's output projection.
fn o_proj(b: &mut GraphBuilder, w: &Weights, t: &TextConfig, ctx: &str) -> Result<String> {
    linear(b, &w.pp("o_proj"), ctx, LinearOpts::new(t.heads * t.head_dim, t.hidden, t.attention_bias))
}

/// The SiLU-gated MLP.
fn mlp(b: &mut GraphBuilder, w: &Weights, t: &TextConfig, x: &str) -> Result<String> {
    let (h, m, bias) = (t.hidden, t.intermediate, t.mlp_bias);
    let gate = linear(b, &w.pp("gate_proj"), x, LinearOpts::new(h, m, bias))?;
    let up = linear(b, &w.pp("up_proj"), x, LinearOpts::new(h, m, bias))?;
    let act = activation(b, &gate, Activation::Silu);
    let prod = b.op("Mul", &[&act, &up], vec![]);
    b.note_row_scaled(&prod, &w.pp("up_proj").name("weight"));
    linear(b, &w.pp("down_proj"), &prod, LinearOpts::new(m, h, bias))
}

/// Bits of the output head's weights under the weight-only precisions.
pub const HEAD_BITS: u8 = 8;

/// The output head. Under 4-bit weights it keeps 8 bits, as llama.cpp's 4-bit formats keep
/// `output.weight` wider: the logits are what every token is chosen from.
fn lm_head(b: &mut GraphBuilder, w: &Weights, t: &TextConfig, x: &str) -> Result<String> {
    let saved = b.numerics();
    if let WeightFormat::Blocks { bits, block, zero_points } = saved.weights
        && bits != HEAD_BITS
    {
        b.set_numerics(Numerics { weights: WeightFormat::Blocks { bits: HEAD_BITS, block, zero_points }, ..saved });
    }
    let logits = linear(b, w, x, LinearOpts::new(t.hidden, t.vocab, false));
    b.set_numerics(saved);
    logits
}

/// Whether ONNX Runtime's `GroupQueryAttention` can run this model (the in-place decoder).
pub fn in_place_supported(t: &TextConfig) -> Result<()> {
    gqa::check_supported(t)
}

/// Builds the decoder whose KV cache crosses the interface as `layout` says.
pub fn build(b: &mut GraphBuilder, ck: &Checkpoint, layout: KvLayout) -> Result<()> {
    match layout {
        KvLayout::Concat => build_with(b, ck, &mut standard::ConcatAttention::default()),
        KvLayout::SharedBuffer => {
            gqa::check_supported(&ck.config.text)?;
            build_with(b, ck, &mut gqa::GroupQueryAttention::default())
        }
    }
}

/// Which part of the decoder a graph holds: the whole decoder is layers `0..layers` with the
/// head; calibration runs it block by block ([`build_calibration_block`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The layers, in order.
    pub layers: std::ops::Range<usize>,
    /// Whether the final norm and the output head follow them (`logits`), rather than the hidden
    /// states leaving the graph as `hidden_states`.
    pub head: bool,
}

/// Builds a standard-attention graph of `part` of the decoder, for calibration: its inputs are
/// the whole decoder's (`inputs_embeds` holds the hidden states entering the first layer, and
/// `past_key_values.*` are those of its layers), its output `hidden_states` [batch, sequence,
/// hidden] (or `logits`, with the head). Rotary tables and the causal mask are computed from
/// `position_ids` and `attention_mask` in every block, as the whole decoder computes them once.
pub fn build_calibration_block(b: &mut GraphBuilder, ck: &Checkpoint, part: &Part) -> Result<()> {
    if part.layers.end > ck.config.text.layers || (part.layers.is_empty() && !part.head) {
        return Err(crate::error::Error::Invalid(format!(
            "decoder block {:?} of a {}-layer model",
            part.layers, ck.config.text.layers
        )));
    }
    build_part(b, ck, &mut standard::ConcatAttention::default(), part)
}

fn build_with(b: &mut GraphBuilder, ck: &Checkpoint, attn: &mut dyn Attention) -> Result<()> {
    build_part(b, ck, attn, &Part { layers: 0..ck.config.text.layers, head: true })
}

fn build_part(b: &mut GraphBuilder, ck: &Checkpoint, attn: &mut dyn Attention, part: &Part) -> Result<()> {
    let t = &ck.config.text;
    let kv_dtype = b.numerics().act;
    let body = ck.weights(&ck.roots.text_body);
    let embeds = b.input(TensorSpec::new(
        "inputs_embeds",
        DType::F32,
        vec![sym("batch"), sym("sequence"), Dim::Fixed(t.hidden as i64)],
    ));
    let mask = b.input(TensorSpec::new("attention_mask", DType::I64, vec![sym("batch"), sym("total_sequence")]));
    attn.declare_inputs(b, t);
    let keep = part.head.then(|| b.input(TensorSpec::new("logits_to_keep", DType::I64, vec![Dim::Fixed(1)])));
    let mut past = Vec::new();
    for i in part.layers.clone() {
        let k = b.input(kv_spec(format!("past_key_values.{i}.key"), t, kv_dtype, attn.past_len()));
        let v = b.input(kv_spec(format!("past_key_values.{i}.value"), t, kv_dtype, attn.past_len()));
        past.push((i, k, v));
    }
    attn.prepare(b, t, &embeds, &mask)?;
    let mut x = to_act(b, &embeds);
    let mut presents = Vec::new();
    for (i, pk, pv) in &past {
        b.set_scope(&format!("layer{i}"));
        let w = body.pp("layers").pp(*i);
        let normed = rms_norm(b, &w.pp("input_layernorm"), &x, t.hidden, t.rms_eps)?;
        let (out, k, v) = attn.layer(b, &w.pp("self_attn"), t, &normed, (pk, pv))?;
        let h = b.op("Add", &[&x, &out], vec![]);
        let normed = rms_norm(b, &w.pp("post_attention_layernorm"), &h, t.hidden, t.rms_eps)?;
        let m = mlp(b, &w.pp("mlp"), t, &normed)?;
        x = b.op("Add", &[&h, &m], vec![]);
        presents.push((*i, k, v));
    }
    b.set_scope("");
    match keep {
        Some(keep) => {
            let normed = rms_norm(b, &body.pp("norm"), &x, t.hidden, t.rms_eps)?;
            let start = b.op("Neg", &[&keep], vec![]);
            let end = b.const_i64(&[i64::MAX], &[1]);
            let axis = b.const_i64(&[1], &[1]);
            let last = b.op("Slice", &[&normed, &start, &end, &axis], vec![]);
            b.note_same_channels(&last, &normed);
            let head =
                if ck.roots.lm_head.is_empty() { body.pp("embed_tokens") } else { ck.weights(&ck.roots.lm_head) };
            let logits = lm_head(b, &head, t, &last)?;
            let logits = to_f32(b, &logits);
            b.output(
                &logits,
                TensorSpec::new(
                    "logits",
                    DType::F32,
                    vec![sym("batch"), sym("logits_len"), Dim::Fixed(t.vocab as i64)],
                ),
            );
            // Greedy decoding reads this alone: one id per row leaves the device, not the
            // vocabulary's logits (ties: the lowest id, as the runtime's own argmax).
            // (`output` renamed the logits' tensor to its own name.)
            let next = b.op("ArgMax", &["logits"], vec![("axis", Attr::Int(-1)), ("keepdims", Attr::Int(0))]);
            b.output(&next, TensorSpec::new("next_token", DType::I64, vec![sym("batch"), sym("logits_len")]));
        }
        None => {
            let hidden = to_f32(b, &x);
            b.output(
                &hidden,
                TensorSpec::new(
                    "hidden_states",
                    DType::F32,
                    vec![sym("batch"), sym("sequence"), Dim::Fixed(t.hidden as i64)],
                ),
            );
        }
    }
    for (i, k, v) in &presents {
        b.output(k, kv_spec(format!("present.{i}.key"), t, kv_dtype, attn.present_len()));
        b.output(v, kv_spec(format!("present.{i}.value"), t, kv_dtype, attn.present_len()));
    }
    Ok(())
}
