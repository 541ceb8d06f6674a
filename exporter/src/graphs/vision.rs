//! `vision.onnx` (video tower + projector) and `image.onnx` (image tower + projector).
use vl_runtime::manifest::{DType, Dim, TensorSpec};

use super::nn::{LinearOpts, activation, dim_of, layer_norm, linear, softmax, to_act, to_f32};
use crate::checkpoint::{Checkpoint, SelectStrategy, Temporal, VisionConfig, Weights};
use crate::error::Result;
use crate::onnx::{Attr, GraphBuilder};

fn sym(s: &str) -> Dim {
    Dim::Symbolic(s.into())
}

/// CLIP embeddings: patch convolution, CLS, positions, then `pre_layrnorm`. `x` is [N, 3, H, W].
fn embeddings(b: &mut GraphBuilder, w: &Weights, cfg: &VisionConfig, x: &str) -> Result<String> {
    let (h, p, c) = (cfg.hidden, cfg.patch_size, cfg.channels);
    let e = w.pp("embeddings");
    let patch_w = e.pp("patch_embedding");
    let conv_w = b.weight_act(
        &patch_w.name("weight"),
        &[h as i64, c as i64, p as i64, p as i64],
        &patch_w.f32("weight", &[h, c, p, p])?,
    )?;
    let conv = b.op("Conv", &[x, &conv_w], vec![("strides", Attr::Ints(vec![p as i64, p as i64]))]);
    let flat_shape = b.const_i64(&[0, h as i64, -1], &[3]);
    let flat = b.op("Reshape", &[&conv, &flat_shape], vec![]);
    let patches = b.op("Transpose", &[&flat], vec![("perm", Attr::Ints(vec![0, 2, 1]))]);
    let cls = b.weight_act(&e.name("class_embedding"), &[1, 1, h as i64], &e.f32("class_embedding", &[h])?)?;
    let n = dim_of(b, x, 0);
    let tail = b.const_i64(&[1, h as i64], &[2]);
    let cls_shape = b.op("Concat", &[&n, &tail], vec![("axis", Attr::Int(0))]);
    let cls_n = b.op("Expand", &[&cls, &cls_shape], vec![]);
    let tokens = b.op("Concat", &[&cls_n, &patches], vec![("axis", Attr::Int(1))]);
    let t = cfg.tokens();
    let pos_w = e.pp("position_embedding");
    let pos = b.weight_act(&pos_w.name("weight"), &[t as i64, h as i64], &pos_w.f32("weight", &[t, h])?)?;
    let with_pos = b.op("Add", &[&tokens, &pos], vec![]);
    layer_norm(b, &w.pp("pre_layrnorm"), &with_pos, h, cfg.ln_eps)
}

/// Multi-head self attention over the tokens of each frame; `x` is [N, T, hidden].
fn self_attention(b: &mut GraphBuilder, w: &Weights, cfg: &VisionConfig, x: &str) -> Result<String> {
    let (h, heads) = (cfg.hidden, cfg.heads);
    let hd = h / heads;
    let scaled = LinearOpts { scale: (hd as f32).powf(-0.5), ..LinearOpts::new(h, h, true) };
    let q = linear(b, &w.pp("q_proj"), x, scaled)?;
    let k = linear(b, &w.pp("k_proj"), x, LinearOpts::new(h, h, true))?;
    let v = linear(b, &w.pp("v_proj"), x, LinearOpts::new(h, h, true))?;
    let split = b.const_i64(&[0, 0, heads as i64, hd as i64], &[4]);
    let q4 = b.op("Reshape", &[&q, &split], vec![]);
    let k4 = b.op("Reshape", &[&k, &split], vec![]);
    let v4 = b.op("Reshape", &[&v, &split], vec![]);
    let qh = b.op("Transpose", &[&q4], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
    let kt = b.op("Transpose", &[&k4], vec![("perm", Attr::Ints(vec![0, 2, 3, 1]))]);
    let vh = b.op("Transpose", &[&v4], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
    let scores = b.op("MatMul", &[&qh, &kt], vec![]);
    let probs = softmax(b, &scores);
    let ctx = b.op("MatMul", &[&probs, &vh], vec![]);
    let ctx_t = b.op("Transpose", &[&ctx], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
    let merge = b.const_i64(&[0, 0, h as i64], &[3]);
    let merged = b.op("Reshape", &[&ctx_t, &merge], vec![]);
    linear(b, &w.pp("out_proj"), &merged, LinearOpts::new(h, h, true))
}

/// LanguageBind's temporal step, run before a video tower layer's spatial attention: the frames
/// of each token position are regrouped into one sequence, the layer's `temporal_embedding`
/// (one vector per frame) is added, and that sum is both the residual and, after
/// `temporal_layer_norm1`, the input of `temporal_attn` (attention across frames, no mask).
/// `x` and the result are [batch·frames, tokens, hidden].
fn temporal_attention(b: &mut GraphBuilder, w: &Weights, cfg: &VisionConfig, t: Temporal, x: &str) -> Result<String> {
    let (h, f, n) = (cfg.hidden as i64, t.frames as i64, cfg.tokens() as i64);
    let by_frame = b.const_i64(&[-1, f, n, h], &[4]);
    let x4 = b.op("Reshape", &[x, &by_frame], vec![]);
    let swapped = b.op("Transpose", &[&x4], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
    let across = b.const_i64(&[-1, f, h], &[3]);
    let mut seq = b.op("Reshape", &[&swapped, &across], vec![]);
    if t.frames != 1 {
        // The original adds it only when there is more than one frame.
        let values = w.f32("temporal_embedding", &[1, t.frames, cfg.hidden])?;
        let emb = b.weight_act(&w.name("temporal_embedding"), &[1, f, h], &values)?;
        seq = b.op("Add", &[&seq, &emb], vec![]);
    }
    let normed = layer_norm(b, &w.pp("temporal_layer_norm1"), &seq, cfg.hidden, cfg.ln_eps)?;
    let attn = self_attention(b, &w.pp("temporal_attn"), cfg, &normed)?;
    let out = b.op("Add", &[&seq, &attn], vec![]);
    let by_token = b.const_i64(&[-1, n, f, h], &[4]);
    let o4 = b.op("Reshape", &[&out, &by_token], vec![]);
    let back = b.op("Transpose", &[&o4], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
    let frames = b.const_i64(&[-1, n, h], &[3]);
    Ok(b.op("Reshape", &[&back, &frames], vec![]))
}

/// One CLIP encoder layer, with LanguageBind's temporal step first when the tower has one.
fn encoder_layer(b: &mut GraphBuilder, w: &Weights, cfg: &VisionConfig, x: &str) -> Result<String> {
    let h = cfg.hidden;
    let temporal = match cfg.temporal {
        Some(t) => Some(temporal_attention(b, w, cfg, t, x)?),
        None => None,
    };
    let x = temporal.as_deref().unwrap_or(x);
    let n1 = layer_norm(b, &w.pp("layer_norm1"), x, h, cfg.ln_eps)?;
    let attn = self_attention(b, &w.pp("self_attn"), cfg, &n1)?;
    let x = b.op("Add", &[x, &attn], vec![]);
    let n2 = layer_norm(b, &w.pp("layer_norm2"), &x, h, cfg.ln_eps)?;
    let mlp = w.pp("mlp");
    let up = linear(b, &mlp.pp("fc1"), &n2, LinearOpts::new(h, cfg.intermediate, true))?;
    let act = activation(b, &up, cfg.act);
    let down = linear(b, &mlp.pp("fc2"), &act, LinearOpts::new(cfg.intermediate, h, true))?;
    Ok(b.op("Add", &[&x, &down], vec![]))
}

/// Runs the tower `cfg` on [N, 3, H, W] and returns the feature hidden states concatenated on
/// the last axis, optionally without CLS. Layers past the last feature layer are not built.
fn tower_features(
    b: &mut GraphBuilder,
    ck: &Checkpoint,
    cfg: &VisionConfig,
    root: &str,
    x: &str,
    drop_cls: bool,
) -> Result<String> {
    let w = ck.weights(root);
    let wanted = ck.config.feature_indices_for(cfg);
    let mut states = vec![embeddings(b, &w, cfg, x)?];
    for i in 0..wanted.iter().copied().max().unwrap_or(0) {
        b.set_scope(&format!("{root}layer{i}"));
        let prev = states[i].clone();
        states.push(encoder_layer(b, &w.pp("encoder.layers").pp(i), cfg, &prev)?);
    }
    b.set_scope("");
    let mut picked: Vec<String> = wanted.iter().map(|&i| states[i].clone()).collect();
    if drop_cls {
        let (start, end, axis) = (b.const_i64(&[1], &[1]), b.const_i64(&[i64::MAX], &[1]), b.const_i64(&[1], &[1]));
        picked = picked.iter().map(|s| b.op("Slice", &[s, &start, &end, &axis], vec![])).collect();
    }
    if picked.len() == 1 {
        return Ok(picked.remove(0));
    }
    let refs: Vec<&str> = picked.iter().map(String::as_str).collect();
    Ok(b.op("Concat", &refs, vec![("axis", Attr::Int(-1))]))
}

/// The `mlp2x_gelu` projector: Linear, activation, Linear.
fn projector(b: &mut GraphBuilder, ck: &Checkpoint, x: &str) -> Result<String> {
    let c = &ck.config;
    let w = ck.weights(&ck.roots.projector);
    let inp = c.vision.hidden * c.feature_layers.len();
    let th = c.text.hidden;
    let [first, second] = &ck.roots.projector_layers;
    let h = linear(b, &w.pp(first), x, LinearOpts::new(inp, th, c.projector_bias))?;
    let a = activation(b, &h, c.projector_act);
    linear(b, &w.pp(second), &a, LinearOpts::new(th, th, c.projector_bias))
}

/// `pixel_values_videos` [batch, frames, 3, H, W] → `video_features` [batch, frames·tokens, text_hidden].
pub fn build_video(b: &mut GraphBuilder, ck: &Checkpoint) -> Result<()> {
    let v = &ck.config.vision;
    let side = v.image_size as i64;
    // A tower with temporal attention takes exactly its `num_frames` frames per video.
    let frames_dim = match v.temporal {
        Some(t) => Dim::Fixed(t.frames as i64),
        None => sym("frames"),
    };
    let x = b.input(TensorSpec::new(
        "pixel_values_videos",
        DType::F32,
        vec![sym("batch"), frames_dim, Dim::Fixed(v.channels as i64), Dim::Fixed(side), Dim::Fixed(side)],
    ));
    let frames_shape = b.const_i64(&[-1, v.channels as i64, side, side], &[4]);
    let frames = b.op("Reshape", &[&x, &frames_shape], vec![]);
    let frames = to_act(b, &frames);
    let feats = tower_features(b, ck, v, &ck.roots.video_tower, &frames, false)?;
    let projected = projector(b, ck, &feats)?;
    let batch = dim_of(b, &x, 0);
    let tail = b.const_i64(&[-1, ck.config.text.hidden as i64], &[2]);
    let out_shape = b.op("Concat", &[&batch, &tail], vec![("axis", Attr::Int(0))]);
    let out = b.op("Reshape", &[&projected, &out_shape], vec![]);
    let out = to_f32(b, &out);
    b.output(
        &out,
        TensorSpec::new(
            "video_features",
            DType::F32,
            vec![sym("batch"), sym("video_tokens"), Dim::Fixed(ck.config.text.hidden as i64)],
        ),
    );
    Ok(())
}

/// `pixel_values` [batch, 3, H, W] → `image_features` [batch, tokens, text_hidden].
pub fn build_image(b: &mut GraphBuilder, ck: &Checkpoint) -> Result<()> {
    let v = &ck.config.image_vision;
    let side = v.image_size as i64;
    let x = b.input(TensorSpec::new(
        "pixel_values",
        DType::F32,
        vec![sym("batch"), Dim::Fixed(v.channels as i64), Dim::Fixed(side), Dim::Fixed(side)],
    ));
    let drop_cls = ck.config.select == SelectStrategy::Default;
    let x = to_act(b, &x);
    let feats = tower_features(b, ck, v, &ck.roots.image_tower, &x, drop_cls)?;
    let out = projector(b, ck, &feats)?;
    let out = to_f32(b, &out);
    let tokens = image_tokens(ck);
    b.output(
        &out,
        TensorSpec::new(
            "image_features",
            DType::F32,
            vec![sym("batch"), Dim::Fixed(tokens as i64), Dim::Fixed(ck.config.text.hidden as i64)],
        ),
    );
    Ok(())
}

/// Visual tokens per image under the config's select strategy.
pub fn image_tokens(ck: &Checkpoint) -> usize {
    let t = ck.config.image_vision.tokens();
    if ck.config.select == SelectStrategy::Default { t - 1 } else { t }
}
