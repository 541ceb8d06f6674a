//! Reading Video-LLaVA checkpoints: config, tensor store, and the name layout (the Hugging Face
//! port, or the original `LlavaLlamaForCausalLM` checkpoint, told apart by `config.json`), and
//! the tokenizer (`tokenizer.json`, or SentencePiece's `tokenizer.model` converted). Weights
//! are safetensors or PyTorch `.bin` zips, read without running any pickled code.
mod config;
mod generation;
mod original;
mod safetensors_store;
pub mod sentencepiece;
mod shards;
pub mod tokenizer_convert;
mod torch_pickle;
mod torch_store;
mod torch_zip;

use std::path::{Path, PathBuf};

pub use config::{Activation, ModelConfig, Rope, SelectStrategy, Temporal, TextConfig, VisionConfig, defaults};
pub use generation::{GENERATION_CONFIG_FILE, GenerationConfig};
pub use original::{IMAGE_MARKER, ORIGINAL_ARCHITECTURE, TowerDirs};
pub use safetensors_store::TensorStore;
pub use shards::WeightsFormat;
use tokenizer_convert::{SpmSemantics, TokenizerSource};
use vl_runtime::manifest::CheckpointLayout;

use crate::error::{Error, Result};

/// Tensor-name roots of each part of the model in one checkpoint.
#[derive(Debug, Clone)]
pub struct Roots {
    /// Video tower (CLIP vision transformer).
    pub video_tower: String,
    /// Image tower.
    pub image_tower: String,
    /// The two-layer projector.
    pub projector: String,
    /// Names of the projector's two linears under `projector` (`linear_1`/`linear_2` in the
    /// Hugging Face port, `0`/`2` in the original `nn.Sequential`).
    pub projector_layers: [String; 2],
    /// The LLaMA body (embeddings, layers, norm).
    pub text_body: String,
    /// The output head.
    pub lm_head: String,
}

/// An opened checkpoint.
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Resolved config.
    pub config: ModelConfig,
    /// Memory-mapped tensors.
    pub store: TensorStore,
    /// Which name layout it uses.
    pub layout: CheckpointLayout,
    /// Where each part lives.
    pub roots: Roots,
    /// Choices made while reading it where the checkpoint was silent, one line each (for the
    /// manifest's `assumptions`).
    pub assumptions: Vec<String>,
    /// One line about the layout for the user (also recorded in the manifest).
    pub notice: String,
}

/// The line every Hugging Face port export prints and records: the conversion to the port
/// loads the video tower as a plain CLIP vision model, dropping the original LanguageBind
/// tower's temporal attention (PKU-YuanGroup/Video-LLaVA issue 223).
fn hf_port_notice(config: &serde_json::Value) -> String {
    let from = config
        .get("_name_or_path")
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    format!(
        "Hugging Face port of Video-LLaVA{from}: its video tower has no temporal attention (the conversion drops the \
         original LanguageBind tower's temporal layers); export the original checkpoint to keep them"
    )
}

fn find_root(store: &TensorStore, candidates: &[&str], probe: &str) -> Option<String> {
    candidates.iter().find(|c| store.contains(&format!("{c}{probe}"))).map(|c| c.to_string())
}

impl Checkpoint {
    /// Where the engine's tokenizer comes from: `tokenizer.json`, else `tokenizer.model` read as
    /// the layout's code reads it (the fast tokenizer for the port, the slow one for the original).
    pub fn tokenizer_source(&self) -> Result<TokenizerSource> {
        let semantics = if self.layout == CheckpointLayout::Original { SpmSemantics::Slow } else { SpmSemantics::Fast };
        TokenizerSource::find(&self.dir, semantics)
    }

    /// Opens the checkpoint in `dir` and works out its layout.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, &TowerDirs::default())
    }

    /// Opens the checkpoint in `dir`, taking original-layout tower configs from `towers`.
    pub fn open_with(dir: &Path, towers: &TowerDirs) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Invalid(format!("{}: not a checkpoint directory", dir.display())));
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Config { path: path.clone(), message: e.to_string() })?;
        if original::is_original(&value) {
            return original::open(dir, &path, value, towers);
        }
        if towers.video.is_some() || towers.image.is_some() {
            return Err(Error::Invalid(format!(
                "{}: --video-tower and --image-tower apply to original Video-LLaVA checkpoints; this one is a \
                 Hugging Face port",
                dir.display()
            )));
        }
        let config = ModelConfig::parse(&text, &path)?;
        let store = TensorStore::open(dir)?;
        let missing = |probe: &str| Error::MissingTensor { name: probe.to_string(), dir: dir.to_path_buf() };
        let tower = |name: &str| {
            let candidates = [
                format!("{name}."),
                format!("{name}.vision_model."),
                format!("model.{name}."),
                format!("model.{name}.vision_model."),
            ];
            let refs: Vec<&str> = candidates.iter().map(String::as_str).collect();
            find_root(&store, &refs, "embeddings.patch_embedding.weight")
                .ok_or_else(|| missing(&format!("{name}.embeddings.patch_embedding.weight")))
        };
        let video_tower = tower("video_tower")?;
        let image_tower = tower("image_tower")?;
        let projector =
            find_root(&store, &["multi_modal_projector.", "model.multi_modal_projector."], "linear_1.weight")
                .ok_or_else(|| missing("multi_modal_projector.linear_1.weight"))?;
        let text_body = find_root(
            &store,
            &["language_model.model.", "model.language_model.", "language_model."],
            "embed_tokens.weight",
        )
        .ok_or_else(|| missing("language_model.model.embed_tokens.weight"))?;
        let lm_head = find_root(&store, &["language_model.lm_head.", "lm_head."], "weight").unwrap_or_default();
        if lm_head.is_empty() && !config.text.tie_embeddings {
            return Err(missing("language_model.lm_head.weight"));
        }
        let layout =
            if video_tower.ends_with("vision_model.") { CheckpointLayout::HfV4 } else { CheckpointLayout::HfV5 };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            store,
            layout,
            roots: Roots {
                video_tower,
                image_tower,
                projector,
                projector_layers: ["linear_1".into(), "linear_2".into()],
                text_body,
                lm_head,
            },
            assumptions: Vec::new(),
            notice: hf_port_notice(&value),
        })
    }

    /// A view of the tensors under `root`.
    pub fn weights(&self, root: &str) -> Weights<'_> {
        Weights { store: &self.store, prefix: root.to_string() }
    }
}

/// Tensors looked up by prefix, so graph code reads like the architecture.
#[derive(Clone)]
pub struct Weights<'a> {
    store: &'a TensorStore,
    prefix: String,
}

impl<'a> Weights<'a> {
    /// The view one level down (`pp("mlp")` → `...mlp.`).
    pub fn pp(&self, part: impl std::fmt::Display) -> Weights<'a> {
        Weights { store: self.store, prefix: format!("{}{part}.", self.prefix) }
    }

    /// The full name of `leaf` under this view.
    pub fn name(&self, leaf: &str) -> String {
        format!("{}{leaf}", self.prefix)
    }

    /// Reads `leaf` as f32 with the expected shape.
    pub fn f32(&self, leaf: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.store.f32(&self.name(leaf), shape)
    }

    /// Whether `leaf` exists.
    pub fn has(&self, leaf: &str) -> bool {
        self.store.contains(&self.name(leaf))
    }
}
