//! `decoder.onnx`: the LLaMA decoder with an explicit KV cache, standard operators only.
//!
//! Inputs: `inputs_embeds` [batch, sequence, hidden], `attention_mask` [batch, total] (int64,
//! 1 = attend), `position_ids` [batch, sequence], `logits_to_keep` [1] (how many last positions
//! get logits), `past_key_values.{i}.key|value` [batch, kv_heads, past, head_dim].
//! Outputs: `logits` [batch, logits_to_keep, vocab], `present.{i}.key|value`
//! [batch, kv_heads, total, head_dim] (past followed by this call's keys and values).
use vl_runtime::manifest::{DType, Dim, TensorSpec};

use super::nn::{LinearOpts, activation, linear, rms_norm, to_act, to_f32};
use crate::checkpoint::{Activation, Checkpoint, TextConfig, Weights};
use crate::error::Result;
use crate::onnx::{Attr, GraphBuilder, Numerics, WeightFormat};

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

/// Values shared by every layer: rotary cos/sin and the additive attention bias.
struct Shared {
    cos: String,
    sin: String,
    bias: String,
}

/// cos/sin [batch, 1, sequence, head_dim] from `position_ids`.
fn rotary(b: &mut GraphBuilder, t: &TextConfig, position_ids: &str) -> (String, String) {
    let pos = b.op("Cast", &[position_ids], vec![("to", Attr::Int(1))]);
    let axes2 = b.const_i64(&[2], &[1]);
    let pos3 = b.op("Unsqueeze", &[&pos, &axes2], vec![]);
    let freqs_c = b.const_f32(&inv_freq(t), &[(t.head_dim / 2) as i64]);
    let freqs = b.op("Mul", &[&pos3, &freqs_c], vec![]);
    let emb = b.op("Concat", &[&freqs, &freqs], vec![("axis", Attr::Int(-1))]);
    let axes1 = b.const_i64(&[1], &[1]);
    let cos = b.op("Cos", &[&emb], vec![]);
    let sin = b.op("Sin", &[&emb], vec![]);
    let (cos, sin) = (to_act(b, &cos), to_act(b, &sin));
    (b.op("Unsqueeze", &[&cos, &axes1], vec![]), b.op("Unsqueeze", &[&sin, &axes1], vec![]))
}

/// Additive bias [batch, 1, 1, sequence, total]: 0 where a query may attend a key (causal by
/// cache position, and the key is not padding), the lowest float elsewhere.
fn attention_bias(b: &mut GraphBuilder, embeds: &str, mask: &str) -> String {
    let idx = b.const_i64(&[1], &[]);
    let total_1d = b.op("Shape", &[mask], vec![]);
    let total = b.op("Gather", &[&total_1d, &idx], vec![("axis", Attr::Int(0))]);
    let seq_1d = b.op("Shape", &[embeds], vec![]);
    let seq = b.op("Gather", &[&seq_1d, &idx], vec![("axis", Attr::Int(0))]);
    let past = b.op("Sub", &[&total, &seq], vec![]);
    let zero = b.const_i64(&[0], &[]);
    let one = b.const_i64(&[1], &[]);
    let key_pos = b.op("Range", &[&zero, &total, &one], vec![]);
    let query_pos = b.op("Range", &[&past, &total, &one], vec![]);
    let axes_last = b.const_i64(&[1], &[1]);
    let query_col = b.op("Unsqueeze", &[&query_pos, &axes_last], vec![]);
    let causal = b.op("LessOrEqual", &[&key_pos, &query_col], vec![]);
    let keep = b.op("Cast", &[mask], vec![("to", Attr::Int(9))]);
    let axes_keep = b.const_i64(&[1, 2, 3], &[3]);
    let keep5 = b.op("Unsqueeze", &[&keep, &axes_keep], vec![]);
    let allowed = b.op("And", &[&causal, &keep5], vec![]);
    let open = b.const_f32(&[0.0], &[]);
    let closed = b.const_f32(&[f32::MIN], &[]);
    b.op("Where", &[&allowed, &open, &closed], vec![])
}

/// `x * cos + rotate_half(x) * sin` for x [batch, heads, sequence, head_dim].
fn apply_rotary(b: &mut GraphBuilder, s: &Shared, x: &str, head_dim: usize) -> String {
    let half = (head_dim / 2) as i64;
    let sizes = b.const_i64(&[half, half], &[2]);
    let parts = b.op_n("Split", &[x, &sizes], vec![("axis", Attr::Int(-1))], 2);
    let neg = b.op("Neg", &[&parts[1]], vec![]);
    let rotated = b.op("Concat", &[&neg, &parts[0]], vec![("axis", Attr::Int(-1))]);
    let a = b.op("Mul", &[x, &s.cos], vec![]);
    let r = b.op("Mul", &[&rotated, &s.sin], vec![]);
    b.op("Add", &[&a, &r], vec![])
}

/// [batch, sequence, heads·head_dim] → [batch, heads, sequence, head_dim].
fn heads_first(b: &mut GraphBuilder, x: &str, heads: usize, head_dim: usize) -> String {
    let shape = b.const_i64(&[0, 0, heads as i64, head_dim as i64], &[4]);
    let x4 = b.op("Reshape", &[x, &shape], vec![]);
    b.op("Transpose", &[&x4], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))])
}

/// Self attention with the cache; returns the attention output and the present key/value.
/// Grouped-query attention folds the query heads that share a key/value head into one
/// broadcast MatMul, so keys and values are never repeated in memory.
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
    let q = heads_first(b, &q, nh, hd);
    let k = heads_first(b, &k, kvh, hd);
    let v = heads_first(b, &v, kvh, hd);
    let q = apply_rotary(b, s, &q, hd);
    let k = apply_rotary(b, s, &k, hd);
    let present_k = b.op("Concat", &[past.0, &k], vec![("axis", Attr::Int(2))]);
    let present_v = b.op("Concat", &[past.1, &v], vec![("axis", Attr::Int(2))]);
    let scale = b.const_act(&[(hd as f32).powf(-0.5)], &[]);
    let q = b.op("Mul", &[&q, &scale], vec![]);
    let group = b.const_i64(&[0, kvh as i64, (nh / kvh) as i64, -1, hd as i64], &[5]);
    let q5 = b.op("Reshape", &[&q, &group], vec![]);
    let axes = b.const_i64(&[2], &[1]);
    let k5 = b.op("Unsqueeze", &[&present_k, &axes], vec![]);
    let v5 = b.op("Unsqueeze", &[&present_v, &axes], vec![]);
    let kt = b.op("Transpose", &[&k5], vec![("perm", Attr::Ints(vec![0, 1, 2, 4, 3]))]);
    let scores = b.op("MatMul", &[&q5, &kt], vec![]);
    let scores = to_f32(b, &scores);
    let masked = b.op("Add", &[&scores, &s.bias], vec![]);
    let probs = b.op("Softmax", &[&masked], vec![("axis", Attr::Int(-1))]);
    let probs = to_act(b, &probs);
    let ctx5 = b.op("MatMul", &[&probs, &v5], vec![]);
    let ungroup = b.const_i64(&[0, nh as i64, -1, hd as i64], &[4]);
    let ctx = b.op("Reshape", &[&ctx5, &ungroup], vec![]);
    let ctx_t = b.op("Transpose", &[&ctx], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
    let merge = b.const_i64(&[0, 0, (nh * hd) as i64], &[3]);
    let merged = b.op("Reshape", &[&ctx_t, &merge], vec![]);
    let out = linear(b, &w.pp("o_proj"), &merged, LinearOpts::new(nh * hd, h, bias))?;
    Ok((out, present_k, present_v))
}

/// The SiLU-gated MLP.
pub(super) fn mlp(b: &mut GraphBuilder, w: &Weights, t: &TextConfig, x: &str) -> Result<String> {
    let (h, m, bias) = (t.hidden, t.intermediate, t.mlp_bias);
    let gate = linear(b, &w.pp("gate_proj"), x, LinearOpts::new(h, m, bias))?;
    let up = linear(b, &w.pp("up_proj"), x, LinearOpts::new(h, m, bias))?;
    let act = activation(b, &gate, Activation::Silu);
    let prod = b.op("Mul", &[&act, &up], vec![]);
    b.note_row_scaled(&prod, &w.pp("up_proj").name("weight"));
    linear(b, &w.pp("down_proj"), &prod, LinearOpts::new(m, h, bias))
}

/// Builds the decoder.
pub fn build(b: &mut GraphBuilder, ck: &Checkpoint) -> Result<()> {
    let t = &ck.config.text;
    let kv_dtype = b.numerics().act;
    let body = ck.weights(&ck.roots.text_body);
    let embeds = b.input(TensorSpec::new(
        "inputs_embeds",
        DType::F32,
        vec![sym("batch"), sym("sequence"), Dim::Fixed(t.hidden as i64)],
    ));
    let mask = b.input(TensorSpec::new("attention_mask", DType::I64, vec![sym("batch"), sym("total_sequence")]));
    let positions = b.input(TensorSpec::new("position_ids", DType::I64, vec![sym("batch"), sym("sequence")]));
    let keep = b.input(TensorSpec::new("logits_to_keep", DType::I64, vec![Dim::Fixed(1)]));
    let mut past = Vec::new();
    for i in 0..t.layers {
        let k = b.input(kv_spec(format!("past_key_values.{i}.key"), t, kv_dtype, "past_sequence"));
        let v = b.input(kv_spec(format!("past_key_values.{i}.value"), t, kv_dtype, "past_sequence"));
        past.push((k, v));
    }
    let (cos, sin) = rotary(b, t, &positions);
    let bias = attention_bias(b, &embeds, &mask);
    let shared = Shared { cos, sin, bias };
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
        b.output(k, kv_spec(format!("present.{i}.key"), t, kv_dtype, "total_sequence"));
        b.output(v, kv_spec(format!("present.{i}.value"), t, kv_dtype, "total_sequence"));
    }
    Ok(())
}

/// The output head. Under 4-bit weights it keeps 8 bits, as llama.cpp's 4-bit formats keep
/// `output.weight` wider: the logits are what every token is chosen from.
pub(super) fn lm_head(b: &mut GraphBuilder, w: &Weights, t: &TextConfig, x: &str) -> Result<String> {
    let saved = b.numerics();
    if let WeightFormat::Blocks { bits: 4, block } = saved.weights {
        b.set_numerics(Numerics { weights: WeightFormat::Blocks { bits: 8, block }, ..saved });
    }
    let logits = linear(b, w, x, LinearOpts::new(t.hidden, t.vocab, false));
    b.set_numerics(saved);
    logits
}
