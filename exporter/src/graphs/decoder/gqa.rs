//! Attention for target `onnxruntime`: ONNX Runtime's `GroupQueryAttention` (`com.microsoft`)
//! with a KV cache that is read and written in place.
//!
//! `attention_mask` [batch, total] (int64, all ones: its length is the number of positions
//! after this call); `past_key_values.*` and `present.*` are [batch, kv_heads, capacity,
//! head_dim]: the runtime binds each `present.*` to the same buffer as its
//! `past_key_values` twin, and the operator writes the new positions into it
//! (`past_present_share_buffer`), so no step copies the cache. Positions are implicit (the
//! cached length), and rotary embedding happens inside the operator from cos/sin caches stored
//! as initializers.
use super::{Attention, inv_freq, o_proj, qkv};
use crate::checkpoint::{TextConfig, Weights};
use crate::error::{Error, Result};
use crate::onnx::{Attr, GraphBuilder};

/// ONNX `TensorProto.DataType` code of int32 (`GroupQueryAttention`'s lengths).
const INT32: i64 = 6;

/// The symbolic length of the shared KV buffers.
const CAPACITY: &str = "kv_capacity";

/// The `GroupQueryAttention` variant; fields are filled as the graph is built.
#[derive(Default)]
pub(super) struct GroupQueryAttention {
    /// Index of the last valid position per batch row after this call, int32 [batch].
    seqlens_k: String,
    /// Positions after this call, int32 scalar.
    total: String,
    /// cos/sin of position × inverse frequency, [max_positions, head_dim / 2].
    cos: String,
    sin: String,
}

impl Attention for GroupQueryAttention {
    fn past_len(&self) -> &'static str {
        CAPACITY
    }

    fn present_len(&self) -> &'static str {
        CAPACITY
    }

    fn declare_inputs(&mut self, _b: &mut GraphBuilder, _t: &TextConfig) {}

    fn prepare(&mut self, b: &mut GraphBuilder, t: &TextConfig, _embeds: &str, mask: &str) -> Result<()> {
        (self.seqlens_k, self.total) = lengths(b, mask);
        (self.cos, self.sin) = rotary_caches(b, t)?;
        Ok(())
    }

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
        let outs = b.ms_op_n(
            "GroupQueryAttention",
            &[&q, &k, &v, past.0, past.1, &self.seqlens_k, &self.total, &self.cos, &self.sin],
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
        let out = o_proj(b, w, t, &ctx)?;
        Ok((out, present_k, present_v))
    }
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

/// What ONNX Runtime's CPU `GroupQueryAttention` accepts, checked before anything is written.
pub(super) fn check_supported(t: &TextConfig) -> Result<()> {
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
