//! Random weights with the real tensor names and shapes, written as one safetensors file (or
//! handed to the `.bin` writer).
use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;
use safetensors::{Dtype, tensor::TensorView};
use vl_runtime::manifest::CheckpointLayout;

use super::{NamedTensor, SynthSpec, WeightDtype};
use crate::contract::NUM_FRAMES;
use crate::error::{Error, Result};

/// How a tensor is initialized. Scales keep activations near unit size through the layers
/// and spread the logits, so that greedy decoding is not decided by rounding noise.
#[derive(Clone, Copy)]
enum Init {
    Normal(f32),
    AroundOne,
}

struct Plan(BTreeMap<String, (Vec<usize>, Init)>);

impl Plan {
    fn add(&mut self, name: String, shape: Vec<usize>, init: Init) {
        self.0.insert(name, (shape, init));
    }
    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) {
        self.add(format!("{prefix}.weight"), vec![out, inp], Init::Normal((inp as f32).powf(-0.5)));
        if bias {
            self.add(format!("{prefix}.bias"), vec![out], Init::Normal(0.1));
        }
    }
    fn layer_norm(&mut self, prefix: &str, dim: usize) {
        self.add(format!("{prefix}.weight"), vec![dim], Init::AroundOne);
        self.add(format!("{prefix}.bias"), vec![dim], Init::Normal(0.1));
    }
}

/// A CLIP vision tower under `root`; with `frames`, LanguageBind's temporal attention in every
/// layer (`temporal_embedding`, `temporal_attn`, `temporal_layer_norm1`).
fn tower(plan: &mut Plan, root: &str, s: &SynthSpec, frames: Option<usize>) {
    let (h, m, p) = (s.vision_hidden, s.vision_intermediate, s.patch_size);
    let tokens = (s.image_size / p).pow(2) + 1;
    plan.add(format!("{root}embeddings.class_embedding"), vec![h], Init::Normal(1.0));
    plan.add(
        format!("{root}embeddings.patch_embedding.weight"),
        vec![h, 3, p, p],
        Init::Normal((3.0 * (p * p) as f32).powf(-0.5)),
    );
    plan.add(format!("{root}embeddings.position_embedding.weight"), vec![tokens, h], Init::Normal(0.5));
    plan.layer_norm(&format!("{root}pre_layrnorm"), h);
    plan.layer_norm(&format!("{root}post_layernorm"), h);
    for i in 0..s.vision_layers {
        let l = format!("{root}encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            plan.linear(&format!("{l}.self_attn.{proj}"), h, h, true);
        }
        plan.layer_norm(&format!("{l}.layer_norm1"), h);
        plan.layer_norm(&format!("{l}.layer_norm2"), h);
        plan.linear(&format!("{l}.mlp.fc1"), m, h, true);
        plan.linear(&format!("{l}.mlp.fc2"), h, m, true);
        if let Some(f) = frames {
            plan.add(format!("{l}.temporal_embedding"), vec![1, f, h], Init::Normal(0.5));
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                plan.linear(&format!("{l}.temporal_attn.{proj}"), h, h, true);
            }
            plan.layer_norm(&format!("{l}.temporal_layer_norm1"), h);
        }
    }
}

/// Tensor-name roots of one layout: towers, projector and its two linears, LLaMA body, head.
struct Names {
    video: &'static str,
    image: &'static str,
    projector: [&'static str; 2],
    body: &'static str,
    lm_head: &'static str,
}

fn names(layout: CheckpointLayout) -> Names {
    let hf = |video, image| Names {
        video,
        image,
        projector: ["multi_modal_projector.linear_1", "multi_modal_projector.linear_2"],
        body: "language_model.model",
        lm_head: "language_model.lm_head.weight",
    };
    match layout {
        CheckpointLayout::HfV5 => hf("video_tower.", "image_tower."),
        CheckpointLayout::HfV4 => hf("video_tower.vision_model.", "image_tower.vision_model."),
        CheckpointLayout::Original => Names {
            video: "model.video_tower.video_tower.",
            image: "model.image_tower.image_tower.",
            projector: ["model.mm_projector.0", "model.mm_projector.2"],
            body: "model",
            lm_head: "lm_head.weight",
        },
    }
}

fn plan(s: &SynthSpec, vocab: usize) -> Plan {
    let mut plan = Plan(BTreeMap::new());
    let n = names(s.layout);
    let temporal = (s.layout == CheckpointLayout::Original).then_some(NUM_FRAMES);
    tower(&mut plan, n.video, s, temporal);
    tower(&mut plan, n.image, s, None);
    let th = s.text_hidden;
    plan.linear(n.projector[0], th, s.vision_hidden * s.feature_layers.len(), true);
    plan.linear(n.projector[1], th, th, true);
    let body = n.body;
    plan.add(format!("{body}.embed_tokens.weight"), vec![vocab, th], Init::Normal(1.0));
    plan.add(format!("{body}.norm.weight"), vec![th], Init::AroundOne);
    let hd = th / s.heads;
    for i in 0..s.text_layers {
        let l = format!("{body}.layers.{i}");
        plan.linear(&format!("{l}.self_attn.q_proj"), s.heads * hd, th, false);
        plan.linear(&format!("{l}.self_attn.k_proj"), s.kv_heads * hd, th, false);
        plan.linear(&format!("{l}.self_attn.v_proj"), s.kv_heads * hd, th, false);
        plan.linear(&format!("{l}.self_attn.o_proj"), th, s.heads * hd, false);
        plan.linear(&format!("{l}.mlp.gate_proj"), s.text_intermediate, th, false);
        plan.linear(&format!("{l}.mlp.up_proj"), s.text_intermediate, th, false);
        plan.linear(&format!("{l}.mlp.down_proj"), th, s.text_intermediate, false);
        plan.add(format!("{l}.input_layernorm.weight"), vec![th], Init::AroundOne);
        plan.add(format!("{l}.post_attention_layernorm.weight"), vec![th], Init::AroundOne);
    }
    if !s.tie_embeddings {
        plan.add(n.lm_head.into(), vec![vocab, th], Init::Normal(4.0 * (th as f32).powf(-0.5)));
    }
    plan
}

fn encode(values: impl Iterator<Item = f32>, dtype: WeightDtype) -> Vec<u8> {
    match dtype {
        WeightDtype::F32 => values.flat_map(f32::to_le_bytes).collect(),
        WeightDtype::F16 => values.flat_map(|v| f16::from_f32(v).to_le_bytes()).collect(),
        WeightDtype::Bf16 => values.flat_map(|v| bf16::from_f32(v).to_le_bytes()).collect(),
    }
}

/// Every tensor of `s`, in name order, from one seeded stream.
pub fn generate(s: &SynthSpec, vocab: usize) -> Vec<NamedTensor> {
    let mut rng = StdRng::seed_from_u64(s.seed);
    let mut tensors = Vec::new();
    for (name, (shape, init)) in plan(s, vocab).0 {
        let n: usize = shape.iter().product();
        let rng = &mut rng;
        let values = (0..n).map(move |_| {
            let z: f32 = rng.sample(StandardNormal);
            match init {
                Init::Normal(std) => z * std,
                Init::AroundOne => 1.0 + 0.1 * z,
            }
        });
        tensors.push((name, shape, encode(values, s.dtype)));
    }
    tensors
}

/// The safetensors dtype of `s`'s weights.
pub fn dtype(s: &SynthSpec) -> Dtype {
    match s.dtype {
        WeightDtype::F32 => Dtype::F32,
        WeightDtype::F16 => Dtype::F16,
        WeightDtype::Bf16 => Dtype::BF16,
    }
}

/// Writes `tensors` as one safetensors file at `path`.
pub fn write_safetensors(s: &SynthSpec, tensors: Vec<NamedTensor>, path: &Path) -> Result<()> {
    let dtype = dtype(s);
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Invalid(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, metadata, path)
        .map_err(|e| Error::Safetensors { path: path.to_path_buf(), message: e.to_string() })
}

/// The same tensors split in name order over `shards` files as transformers names them
/// (`model-00001-of-00002.safetensors`), with `model.safetensors.index.json`.
pub fn write_sharded_safetensors(s: &SynthSpec, tensors: Vec<NamedTensor>, out: &Path, shards: usize) -> Result<()> {
    let per = tensors.len().div_ceil(shards.max(1)).max(1);
    let mut weight_map = Vec::new();
    let mut total = 0u64;
    let mut rest = tensors;
    let mut i = 0;
    while !rest.is_empty() {
        let tail = rest.split_off(per.min(rest.len()));
        let chunk = std::mem::replace(&mut rest, tail);
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        for (name, _, bytes) in &chunk {
            weight_map.push((name.clone(), file.clone()));
            total += bytes.len() as u64;
        }
        write_safetensors(s, chunk, &out.join(&file))?;
        i += 1;
    }
    super::published::write_index(out, &weight_map, total)
}
