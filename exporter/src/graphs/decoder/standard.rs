//! Attention with standard operators only: `position_ids` is an input, rotary embedding and the
//! causal mask are computed in the graph, and each step's `present.*` is the past concatenated
//! with the new positions ([batch, kv_heads, past + sequence, head_dim]).
use vl_runtime::manifest::{DType, TensorSpec};

use super::{Attention, inv_freq, o_proj, qkv, sym};
use crate::checkpoint::{TextConfig, Weights};
use crate::error::{Error, Result};
use crate::graphs::nn::{to_act, to_f32};
use crate::onnx::{Attr, GraphBuilder};

/// The concatenating variant; fields are filled as the graph is built.
#[derive(Default)]
pub(super) struct ConcatAttention {
    /// `position_ids` [batch, sequence].
    positions: String,
    /// cos/sin [batch, 1, sequence, head_dim] and the additive bias [batch, 1, 1, sequence, total].
    cos: String,
    sin: String,
    bias: String,
}

impl Attention for ConcatAttention {
    fn past_len(&self) -> &'static str {
        "past_sequence"
    }

    fn present_len(&self) -> &'static str {
        "total_sequence"
    }

    fn declare_inputs(&mut self, b: &mut GraphBuilder, _t: &TextConfig) {
        self.positions = b.input(TensorSpec::new("position_ids", DType::I64, vec![sym("batch"), sym("sequence")]));
    }

    fn prepare(&mut self, b: &mut GraphBuilder, t: &TextConfig, embeds: &str, mask: &str) -> Result<()> {
        if self.positions.is_empty() {
            return Err(Error::Invalid("position_ids must be declared before the rotary tables".into()));
        }
        let (cos, sin) = rotary(b, t, &self.positions);
        self.cos = cos;
        self.sin = sin;
        self.bias = attention_bias(b, embeds, mask);
        Ok(())
    }

    /// Grouped-query attention folds the query heads that share a key/value head into one
    /// broadcast MatMul, so keys and values are never repeated in memory.
    fn layer(
        &self,
        b: &mut GraphBuilder,
        w: &Weights,
        t: &TextConfig,
        x: &str,
        past: (&str, &str),
    ) -> Result<(String, String, String)> {
        let (hd, nh, kvh) = (t.head_dim, t.heads, t.kv_heads);
        let (q, k, v) = qkv(b, w, t, x)?;
        let q = heads_first(b, &q, nh, hd);
        let k = heads_first(b, &k, kvh, hd);
        let v = heads_first(b, &v, kvh, hd);
        let q = self.apply_rotary(b, &q, hd);
        let k = self.apply_rotary(b, &k, hd);
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
        let masked = b.op("Add", &[&scores, &self.bias], vec![]);
        let probs = b.op("Softmax", &[&masked], vec![("axis", Attr::Int(-1))]);
        let probs = to_act(b, &probs);
        let ctx5 = b.op("MatMul", &[&probs, &v5], vec![]);
        let ungroup = b.const_i64(&[0, nh as i64, -1, hd as i64], &[4]);
        let ctx = b.op("Reshape", &[&ctx5, &ungroup], vec![]);
        let ctx_t = b.op("Transpose", &[&ctx], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
        let merge = b.const_i64(&[0, 0, (nh * hd) as i64], &[3]);
        let merged = b.op("Reshape", &[&ctx_t, &merge], vec![]);
        let out = o_proj(b, w, t, &merged)?;
        Ok((out, present_k, present_v))
    }
}

impl ConcatAttention {
    /// `x * cos + rotate_half(x) * sin` for x [batch, heads, sequence, head_dim].
    fn apply_rotary(&self, b: &mut GraphBuilder, x: &str, head_dim: usize) -> String {
        let half = (head_dim / 2) as i64;
        let sizes = b.const_i64(&[half, half], &[2]);
        let parts = b.op_n("Split", &[x, &sizes], vec![("axis", Attr::Int(-1))], 2);
        let neg = b.op("Neg", &[&parts[1]], vec![]);
        let rotated = b.op("Concat", &[&neg, &parts[0]], vec![("axis", Attr::Int(-1))]);
        let a = b.op("Mul", &[x, &self.cos], vec![]);
        let r = b.op("Mul", &[&rotated, &self.sin], vec![]);
        b.op("Add", &[&a, &r], vec![])
    }
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

/// [batch, sequence, heads·head_dim] → [batch, heads, sequence, head_dim].
fn heads_first(b: &mut GraphBuilder, x: &str, heads: usize, head_dim: usize) -> String {
    let shape = b.const_i64(&[0, 0, heads as i64, head_dim as i64], &[4]);
    let x4 = b.op("Reshape", &[x, &shape], vec![]);
    b.op("Transpose", &[&x4], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))])
}
