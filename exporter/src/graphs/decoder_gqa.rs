//! `decoder.onnx` for target `onnxruntime`: the LLaMA decoder with ONNX Runtime's
//! `GroupQueryAttention` (`com.microsoft`) and a KV cache that is read and written in place.
//!
//! Inputs: `inputs_embeds` [batch, sequence, hidden], `attention_mask` [batch, total] (int64, all
//! ones: its length is the number of positions after this call), `logits_to_keep` [1],
//! `past_key_values.{i}.key|value` [batch, kv_heads, capacity, head_dim].
//! Outputs: `logits` [batch, logits_to_keep, vocab], `present.{i}.key|value`
//! [batch, kv_heads, capacity, head_dim]: the runtime binds each to the same buffer as its
//! `past_key_values` twin, and the operator writes the new positions into it
//! (`past_present_share_buffer`), so no step copies the cache. Positions are implicit (the
//! cached length), and rotary embedding happens inside the operator from cos/sin caches stored
//! as initializers. The MLP, norms and head are those of [`super::decoder`].
use vl_runtime::manifest::{DType, Dim, TensorSpec};

use super::decoder::{inv_freq, kv_spec, lm_head, mlp, sym};
use super::nn::{LinearOpts, linear, rms_norm, to_act, to_f32};
use crate::checkpoint::{Checkpoint, TextConfig, Weights};
use crate::error::{Error, Result};
use crate::onnx::{Attr, GraphBuilder};

/// ONNX `TensorProto.DataType` code of int32 (`GroupQueryAttention`'s lengths).
const INT32: i64 = 6;

/// The symbolic length of the shared KV buffers.
const CAPACITY: &str = "kv_capacity";

/// What every layer's attention reads besides its own weights.
struct Shared {
    /// Index of the last valid position per batch row after this call, int32 [batch].
    seqlens_k: String,
    /// Positions after this call, int32 scalar.
    total: String,
    /// cos/sin of position × inverse frequency, [max_positions, head_dim / 2].
    cos: String,
    sin: String,
}

/// `seqlens_k` and `total_sequence_length` from `attention_mask` [batch, total].
fn lengths(b: &mut GraphBuilder, mask: &str) -> (String, String) {
    let axes = b.const_i64(&[1], &[1]);
    let sum = b.op("ReduceSum", &[mask, &axes], vec![("keepdims", Attr::Int(0))]);
    let one = b.const_i64(&[1], &[]);
    let last = b.op("Sub", &[&sum, &one], vec![]);
    let seqlens_k = b.op("Cast", &[&last], vec![("to", Attr::Int(INT32))]);
    let total_1d = b.op("Shape", &[mask], vec![("start", Attr::Int(1)), ("end", Attr::Int(2))]);
    let axes0 = b.const_i64(&[0], &[1]);
    let total = b.op("Squeeze", &[&total_1d, &axes0], vec![]);
    let total = b.op("Cast", &[&total], vec![("to", Attr::Int(INT32))]);
    (seqlens_k, total)
}

/// cos/sin caches [max_positions, head_dim / 2] in the activation type, computed in f32 as
/// transformers computes them (position × inverse frequency, then cos and sin).
fn rotary_caches(b: &mut GraphBuilder, t: &TextConfig) -> Result<(String, String)> {
    let freqs = inv_freq(t);
    let half = freqs.len();
    let (mut cos, mut sin) = (Vec::with_capacity(t.max_positions * half), Vec::with_capacity(t.max_positions * half));
    for pos in 0..t.max_positions {
        for f in &freqs {
            let angle = pos as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let dims = [t.max_positions as i64, half as i64];
    Ok((b.weight_act("rotary.cos_cache", &dims, &cos)?, b.weight_act("rotary.sin_cache", &dims, &sin)?))
}

/// Self attention through `GroupQueryAttention`; returns its output and the present key/value.
fn attention(
    b: &mut GraphBuilder,
    w: &Weights,
    t: &TextConfig,
    s: &Shared,
    x: &str,
    past: (&str, &str),
) -> Result<(String, String, String)> {
    let (h, hd, nh, kvh) = (t.hidden, t.head_dim, t.heads, t.kv_heads);
    let bias = t.attention_bias;
    let q = linear(b, &w.pp("q_proj"), x, LinearOpts::new(h, nh * hd, bias))?;
    let k = linear(b, &w.pp("k_proj"), x, LinearOpts::new(h, kvh * hd, bias))?;
    let v = linear(b, &w.pp("v_proj"), x, LinearOpts::new(h, kvh * hd, bias))?;
    let outs = b.ms_op_n(
        "GroupQueryAttention",
        &[&q, &k, &v, past.0, past.1, &s.seqlens_k, &s.total, &s.cos, &s.sin],
        vec![
            ("num_heads", Attr::Int(nh as i64)),
            ("kv_num_heads", Attr::Int(kvh as i64)),
            ("do_rotary", Attr::Int(1)),
            // LLaMA's rotate_half pairs dimension i with i + head_dim / 2.
            ("rotary_interleaved", Attr::Int(0)),
            ("scale", Attr::Float((hd as f32).powf(-0.5))),
        ],
        3,
    );
    let [ctx, present_k, present_v]: [String; 3] =
        outs.try_into().map_err(|_| Error::Invalid("GroupQueryAttention has three outputs".into()))?;
    let out = linear(b, &w.pp("o_proj"), &ctx, LinearOpts::new(nh * hd, h, bias))?;
    Ok((out, present_k, present_v))
}

/// What ONNX Runtime's CPU `GroupQueryAttention` accepts, checked before anything is written.
fn check_supported(t: &TextConfig) -> Result<()> {
    if !t.head_dim.is_multiple_of(16) {
        return Err(Error::Invalid(format!(
            "--target onnxruntime: ONNX Runtime's GroupQueryAttention needs head_dim a multiple of 16, the model has {}",
            t.head_dim
        )));
    }
    if !t.heads.is_multiple_of(t.kv_heads) {
        return Err(Error::Invalid(format!("{} attention heads for {} key/value heads", t.heads, t.kv_heads)));
    }
    Ok(())
}

/// Builds the decoder with `GroupQueryAttention` and shared KV buffers.
pub fn build(b: &mut GraphBuilder, ck: &Checkpoint) -> Result<()> {
    let t = &ck.config.text;
    check_supported(t)?;
    let kv_dtype = b.numerics().act;
    let body = ck.weights(&ck.roots.text_body);
    let embeds = b.input(TensorSpec::new(
        "inputs_embeds",
        DType::F32,
        vec![sym("batch"), sym("sequence"), Dim::Fixed(t.hidden as i64)],
    ));
    let mask = b.input(TensorSpec::new("attention_mask", DType::I64, vec![sym("batch"), sym("total_sequence")]));
    let keep = b.input(TensorSpec::new("logits_to_keep", DType::I64, vec![Dim::Fixed(1)]));
    let mut past = Vec::new();
    for i in 0..t.layers {
        let k = b.input(kv_spec(format!("past_key_values.{i}.key"), t, kv_dtype, CAPACITY));
        let v = b.input(kv_spec(format!("past_key_values.{i}.value"), t, kv_dtype, CAPACITY));
        past.push((k, v));
    }
    let (seqlens_k, total) = lengths(b, &mask);
    let (cos, sin) = rotary_caches(b, t)?;
    let shared = Shared { seqlens_k, total, cos, sin };
    let mut x = to_act(b, &embeds);
    let mut presents = Vec::new();
    for (i, (pk, pv)) in past.iter().enumerate() {
        b.set_scope(&format!("layer{i}"));
        let w = body.pp("layers").pp(i);
        let normed = rms_norm(b, &w.pp("input_layernorm"), &x, t.hidden, t.rms_eps)?;
        let (attn, k, v) = attention(b, &w.pp("self_attn"), t, &shared, &normed, (pk, pv))?;
        let h = b.op("Add", &[&x, &attn], vec![]);
        let normed = rms_norm(b, &w.pp("post_attention_layernorm"), &h, t.hidden, t.rms_eps)?;
        let m = mlp(b, &w.pp("mlp"), t, &normed)?;
        x = b.op("Add", &[&h, &m], vec![]);
        presents.push((k, v));
    }
    b.set_scope("");
    let normed = rms_norm(b, &body.pp("norm"), &x, t.hidden, t.rms_eps)?;
    let start = b.op("Neg", &[&keep], vec![]);
    let end = b.const_i64(&[i64::MAX], &[1]);
    let axis = b.const_i64(&[1], &[1]);
    let last = b.op("Slice", &[&normed, &start, &end, &axis], vec![]);
    b.note_same_channels(&last, &normed);
    let head = if ck.roots.lm_head.is_empty() { body.pp("embed_tokens") } else { ck.weights(&ck.roots.lm_head) };
    let logits = lm_head(b, &head, t, &last)?;
    let logits = to_f32(b, &logits);
    b.output(
        &logits,
        TensorSpec::new("logits", DType::F32, vec![sym("batch"), sym("logits_len"), Dim::Fixed(t.vocab as i64)]),
    );
    for (i, (k, v)) in presents.iter().enumerate() {
        b.output(k, kv_spec(format!("present.{i}.key"), t, kv_dtype, CAPACITY));
        b.output(v, kv_spec(format!("present.{i}.value"), t, kv_dtype, CAPACITY));
    }
    Ok(())
}
