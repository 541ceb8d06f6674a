//! The original Video-LLaVA checkpoint (`LlavaLlamaForCausalLM`, `model_type: llava`): the
//! LLaMA fields at the top of `config.json`, `mm_*` fields for the projector and the towers, and
//! LanguageBind towers whose own configs (`num_frames`, `add_time_attn`, `hidden_act`, ...) live
//! in separate directories (`mm_video_tower`, `mm_image_tower`).
//!
//! Tower configs are taken from `--video-tower` / `--image-tower` when given, else from a
//! directory named by the `mm_*_tower` field (a path, or its last component inside the
//! checkpoint directory), else inferred from the weights; every inference is recorded as an
//! assumption for the manifest.
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vl_runtime::manifest::CheckpointLayout;

use super::config::{Activation, Fields, ModelConfig, RawText, RawVision, SelectStrategy, Temporal, VisionConfig};
use super::tokenizer_convert::{SpmSemantics, TokenizerSource};
use super::{Checkpoint, Roots, TensorStore, find_root};
use crate::error::{Error, Result};

/// The architecture of the original checkpoint's `config.json`.
pub const ORIGINAL_ARCHITECTURE: &str = "LlavaLlamaForCausalLM";
/// The token the original prompt splits on, one per frame or image.
pub const IMAGE_MARKER: &str = "<image>";
/// Head width assumed when a tower's config is missing (LanguageBind's ViT-L/14: 1024 / 16).
const ASSUMED_HEAD_DIM: usize = 64;

/// Where the LanguageBind towers' own config directories are (`--video-tower`, `--image-tower`).
#[derive(Debug, Clone, Default)]
pub struct TowerDirs {
    /// The video tower's directory (holding `config.json`).
    pub video: Option<PathBuf>,
    /// The image tower's directory.
    pub image: Option<PathBuf>,
}

/// Whether a parsed `config.json` is an original Video-LLaVA checkpoint's.
pub fn is_original(config: &serde_json::Value) -> bool {
    let arch = config.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str());
    let model_type = config.get("model_type").and_then(|m| m.as_str());
    arch == Some(ORIGINAL_ARCHITECTURE)
        || (model_type == Some("llava")
            && config.get("text_config").is_none()
            && config.get("mm_video_tower").is_some())
}

#[derive(Deserialize)]
struct RawOriginal {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    mm_video_tower: Option<String>,
    #[serde(default)]
    mm_image_tower: Option<String>,
    #[serde(default = "default_projector")]
    mm_projector_type: String,
    #[serde(default)]
    mm_hidden_size: Option<usize>,
    #[serde(default = "default_select_layer")]
    mm_vision_select_layer: i64,
    #[serde(default = "default_select_feature")]
    mm_vision_select_feature: String,
    #[serde(default)]
    image_aspect_ratio: Option<String>,
    #[serde(default)]
    mm_use_im_start_end: bool,
    #[serde(default)]
    tokenizer_model_max_length: Option<usize>,
}

fn default_projector() -> String {
    "linear".into()
}
fn default_select_layer() -> i64 {
    -2
}
fn default_select_feature() -> String {
    "patch".into()
}
fn default_frames() -> usize {
    8
}

/// A LanguageBind tower config: CLIP vision fields plus the temporal ones, either at the top
/// level or under `vision_config` (as `LanguageBindVideoConfig` writes them).
#[derive(Deserialize)]
struct RawTower {
    #[serde(default)]
    add_time_attn: bool,
    #[serde(default = "default_frames")]
    num_frames: usize,
}

/// A LanguageBind tower's CLIP vision fields (its `model_type` names the LanguageBind config).
fn tower_vision(vision: &serde_json::Value, file: &Path, prefix: &str) -> Result<RawVision> {
    Ok(RawVision { model_type: None, ..RawVision::read(&Fields::of(vision, prefix, file)?)? })
}

/// Which tower, for names and messages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tower {
    Video,
    Image,
}

impl Tower {
    fn name(self) -> &'static str {
        match self {
            Tower::Video => "video",
            Tower::Image => "image",
        }
    }
    fn flag(self) -> &'static str {
        match self {
            Tower::Video => "--video-tower",
            Tower::Image => "--image-tower",
        }
    }
}

/// Opens an original-layout checkpoint whose `config.json` (at `path`) is `value`.
pub(super) fn open(dir: &Path, path: &Path, value: serde_json::Value, towers: &TowerDirs) -> Result<Checkpoint> {
    let bad = |message: String| Error::Config { path: path.to_path_buf(), message };
    // `LlavaConfig` extends `LlamaConfig`: the LLaMA fields sit at the top level, with its defaults
    // (the top-level `model_type` is `llava`, not the text model's).
    let raw_text = RawText { model_type: None, ..RawText::read(&Fields::of(&value, "", path)?)? };
    let raw: RawOriginal = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    if raw.mm_video_tower.is_none() {
        return Err(bad("no mm_video_tower: a LLaVA checkpoint without a video tower is not Video-LLaVA".into()));
    }
    if raw.mm_use_im_start_end {
        return Err(bad("mm_use_im_start_end = true is not supported (Video-LLaVA does not use it)".into()));
    }
    if raw.mm_projector_type != "mlp2x_gelu" {
        return Err(bad(format!("mm_projector_type {:?} is not supported (mlp2x_gelu is)", raw.mm_projector_type)));
    }
    let select = match raw.mm_vision_select_feature.as_str() {
        "patch" => SelectStrategy::Default,
        "cls_patch" => SelectStrategy::Full,
        other => return Err(bad(format!("mm_vision_select_feature {other:?} (patch or cls_patch)"))),
    };
    let text = raw_text.resolve(path, "", None)?;
    let store = TensorStore::open(dir)?;
    let missing = |probe: &str| Error::MissingTensor { name: probe.to_string(), dir: dir.to_path_buf() };
    let root = |name: &str| {
        let candidates = [
            format!("model.{name}.{name}."),
            format!("model.{name}.{name}.vision_model."),
            format!("model.{name}."),
            format!("{name}."),
        ];
        let refs: Vec<&str> = candidates.iter().map(String::as_str).collect();
        find_root(&store, &refs, "embeddings.patch_embedding.weight")
            .ok_or_else(|| missing(&format!("model.{name}.{name}.embeddings.patch_embedding.weight")))
    };
    let video_root = root("video_tower")?;
    let image_root = root("image_tower")?;
    let projector = find_root(&store, &["model.mm_projector.", "mm_projector."], "0.weight")
        .ok_or_else(|| missing("model.mm_projector.0.weight"))?;
    let text_body =
        find_root(&store, &["model."], "embed_tokens.weight").ok_or_else(|| missing("model.embed_tokens.weight"))?;
    let lm_head = find_root(&store, &["lm_head."], "weight").unwrap_or_default();
    if lm_head.is_empty() && !text.tie_embeddings {
        return Err(missing("lm_head.weight"));
    }

    let mut assumptions = Vec::new();
    let video = TowerContext { dir, store: &store, assumptions: &mut assumptions }.tower(
        Tower::Video,
        &video_root,
        towers.video.as_deref(),
        raw.mm_video_tower.as_deref(),
    )?;
    let image = TowerContext { dir, store: &store, assumptions: &mut assumptions }.tower(
        Tower::Image,
        &image_root,
        towers.image.as_deref(),
        raw.mm_image_tower.as_deref(),
    )?;
    if let Some(mm) = raw.mm_hidden_size
        && (mm != video.hidden || mm != image.hidden)
    {
        return Err(bad(format!(
            "mm_hidden_size {mm} differs from the towers' widths (video {}, image {})",
            video.hidden, image.hidden
        )));
    }
    if video.hidden != image.hidden || video.image_size != image.image_size {
        return Err(bad(format!(
            "the towers differ: video {} wide at {} px, image {} wide at {} px (one projector and one input size \
             serve both)",
            video.hidden, video.image_size, image.hidden, image.image_size
        )));
    }

    let placeholder = placeholder_id(dir, &text, &mut assumptions)?;
    assumptions.push(
        "prompt: llava_v1 with its system line; a video is one <image> marker per frame joined by single spaces \
         (the README and eval scripts; videollava/serve/cli.py joins them without spaces)"
            .into(),
    );
    match raw.image_aspect_ratio.as_deref() {
        Some("pad") => {}
        other => assumptions.push(format!(
            "image_aspect_ratio {other:?}: images are padded to a square with the mean color anyway (Video-LLaVA's pad)"
        )),
    }
    if let Some(n) = raw.tokenizer_model_max_length {
        assumptions.push(format!(
            "the original code truncates the spliced prompt to tokenizer_model_max_length {n}; vl-runtime does not \
             truncate (its limit is max_position_embeddings {})",
            text.max_positions
        ));
    }
    let (image_seq_length, video_seq_length) =
        (image.grid() * image.grid(), video.tokens() * video.temporal.map_or(8, |t| t.frames));
    let config = ModelConfig {
        architecture: raw.architectures.first().cloned().unwrap_or_else(|| ORIGINAL_ARCHITECTURE.into()),
        vision: video,
        image_vision: image,
        text,
        feature_layers: vec![raw.mm_vision_select_layer],
        select,
        image_token: placeholder,
        video_token: placeholder,
        projector_act: Activation::Gelu,
        projector_bias: true,
        image_seq_length,
        video_seq_length,
    };
    config.check_feature_layers(&config.vision, "video tower", path)?;
    config.check_feature_layers(&config.image_vision, "image tower", path)?;
    let notice = match config.vision.temporal {
        Some(t) => format!(
            "original Video-LLaVA checkpoint: the video tower has temporal attention over {} frames in each of its {} \
             layers",
            t.frames, config.vision.layers
        ),
        None => "original Video-LLaVA checkpoint: its video tower config has no temporal attention".to_string(),
    };
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        config,
        store,
        layout: CheckpointLayout::Original,
        roots: Roots {
            video_tower: video_root,
            image_tower: image_root,
            projector,
            projector_layers: ["0".into(), "2".into()],
            text_body,
            lm_head,
        },
        assumptions,
        notice,
    })
}

/// The id that marks visual positions. The original code uses `IMAGE_TOKEN_INDEX` (-200), outside
/// the vocabulary; the engine's embedding lookup needs a real row, so `<unk>` stands in (its
/// embedding is always replaced by visual features, and text never encodes to it).
fn placeholder_id(dir: &Path, text: &super::TextConfig, assumptions: &mut Vec<String>) -> Result<u32> {
    let path = dir.join("config.json");
    let unk = match TokenizerSource::find(dir, SpmSemantics::Slow) {
        Ok(source) => source.load()?.token_to_id("<unk>"),
        Err(_) => None,
    };
    let (id, what) = match (unk, text.pad) {
        (Some(id), _) => (id, "<unk>"),
        (None, Some(pad)) => (pad, "the pad token"),
        (None, None) => (0, "id 0"),
    };
    if id as usize >= text.vocab {
        return Err(Error::Config {
            path,
            message: format!("placeholder id {id} ({what}) is outside the vocabulary of {}", text.vocab),
        });
    }
    assumptions.push(format!(
        "visual positions: the original marks them with IMAGE_TOKEN_INDEX (-200), outside the vocabulary; the engine \
         uses id {id} ({what}), whose embedding is always replaced by the visual features"
    ));
    Ok(id)
}

struct TowerContext<'a> {
    dir: &'a Path,
    store: &'a TensorStore,
    assumptions: &'a mut Vec<String>,
}

impl TowerContext<'_> {
    /// The tower's config: from `explicit`, a directory `named` by config.json, or the weights.
    fn tower(mut self, which: Tower, root: &str, explicit: Option<&Path>, named: Option<&str>) -> Result<VisionConfig> {
        let config_file = match explicit {
            Some(dir) => {
                let file = if dir.is_file() { dir.to_path_buf() } else { dir.join("config.json") };
                if !file.is_file() {
                    return Err(Error::Invalid(format!("{} {}: no config.json there", which.flag(), dir.display())));
                }
                Some(file)
            }
            None => named.and_then(|n| self.discover(n)),
        };
        let has_temporal = self.store.contains(&format!("{root}encoder.layers.0.temporal_embedding"));
        let mut cfg = match &config_file {
            Some(file) => self.read_config(which, file, has_temporal)?,
            None => self.infer(which, root, named, has_temporal)?,
        };
        if which == Tower::Image && cfg.temporal.take().is_some() {
            self.assumptions.push("image tower: add_time_attn ignored (an image is a single frame)".into());
        }
        Ok(cfg)
    }

    /// `named` as a directory (absolute, or relative to the checkpoint), or its last component
    /// inside the checkpoint directory (where `vl-export synth` writes the tower configs).
    fn discover(&self, named: &str) -> Option<PathBuf> {
        let as_path = Path::new(named);
        let mut candidates = vec![self.dir.join(as_path)];
        if let Some(last) = as_path.file_name() {
            candidates.push(self.dir.join(last));
        }
        candidates.into_iter().map(|d| d.join("config.json")).find(|f| f.is_file())
    }

    fn read_config(&mut self, which: Tower, file: &Path, has_temporal: bool) -> Result<VisionConfig> {
        let bad = |message: String| Error::Config { path: file.to_path_buf(), message };
        let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let (prefix, vision) = match value.get("vision_config") {
            Some(v) => ("vision_config.", v.clone()),
            None => ("", value),
        };
        let raw_vision = tower_vision(&vision, file, prefix)?;
        let raw: RawTower = serde_json::from_value(vision).map_err(|e| bad(e.to_string()))?;
        let mut cfg = raw_vision.resolve(file, prefix)?;
        if raw.add_time_attn {
            if raw.num_frames == 0 {
                return Err(bad(format!("{prefix}num_frames must be positive")));
            }
            cfg.temporal = Some(Temporal { frames: raw.num_frames });
        } else if has_temporal && which == Tower::Video {
            self.assumptions.push(format!(
                "video tower: {} sets no add_time_attn, so its temporal weights are not used",
                file.display()
            ));
        }
        Ok(cfg)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.store
            .shape(name)
            .map(<[usize]>::to_vec)
            .ok_or_else(|| Error::MissingTensor { name: name.to_string(), dir: self.dir.to_path_buf() })
    }

    /// The tower's config from its tensor shapes; what the weights cannot show is assumed.
    fn infer(&mut self, which: Tower, root: &str, named: Option<&str>, has_temporal: bool) -> Result<VisionConfig> {
        let bad = |message: String| Error::Invalid(format!("{} tower weights under {root}: {message}", which.name()));
        let hidden = match self.shape(&format!("{root}embeddings.class_embedding"))?.as_slice() {
            [h] => *h,
            other => return Err(bad(format!("class_embedding has shape {other:?}"))),
        };
        let (channels, patch) = match self.shape(&format!("{root}embeddings.patch_embedding.weight"))?.as_slice() {
            [_, c, p, q] if p == q && *p > 0 => (*c, *p),
            other => return Err(bad(format!("patch_embedding.weight has shape {other:?}"))),
        };
        let positions = self.shape(&format!("{root}embeddings.position_embedding.weight"))?;
        let tokens = positions.first().copied().unwrap_or(0);
        let grid = (1..=tokens).take_while(|g| g * g < tokens).last().unwrap_or(0);
        if grid == 0 || grid * grid + 1 != tokens {
            return Err(bad(format!("{tokens} positions are not a square grid of patches plus CLS")));
        }
        let layers =
            (0..).take_while(|i| self.store.contains(&format!("{root}encoder.layers.{i}.layer_norm1.weight"))).count();
        let intermediate = match self.shape(&format!("{root}encoder.layers.0.mlp.fc1.weight"))?.as_slice() {
            [m, _] => *m,
            other => return Err(bad(format!("mlp.fc1.weight has shape {other:?}"))),
        };
        if hidden < ASSUMED_HEAD_DIM || !hidden.is_multiple_of(ASSUMED_HEAD_DIM) {
            return Err(bad(format!(
                "the head count cannot be inferred for width {hidden}; pass {} DIR (the LanguageBind tower's config)",
                which.flag()
            )));
        }
        let heads = hidden / ASSUMED_HEAD_DIM;
        let temporal = match has_temporal && which == Tower::Video {
            true => match self.shape(&format!("{root}encoder.layers.0.temporal_embedding"))?.as_slice() {
                [1, f, h] if *h == hidden && *f > 0 => Some(Temporal { frames: *f }),
                other => return Err(bad(format!("temporal_embedding has shape {other:?}"))),
            },
            false => None,
        };
        let temporal_note = match temporal {
            Some(t) => format!("; temporal attention over {} frames (temporal weights present)", t.frames),
            None => String::new(),
        };
        self.assumptions.push(format!(
            "{} tower: no config for {} (pass {} DIR); from the weights: {layers} layers, width {hidden}, patch {patch}, \
             image {}; assumed {heads} heads of {ASSUMED_HEAD_DIM}, gelu, layer_norm_eps 1e-5{temporal_note}",
            which.name(),
            named.unwrap_or("the tower"),
            which.flag(),
            grid * patch
        ));
        Ok(VisionConfig {
            hidden,
            intermediate,
            layers,
            heads,
            image_size: grid * patch,
            patch_size: patch,
            channels,
            act: Activation::Gelu,
            ln_eps: 1e-5,
            temporal,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_original_config_only() {
        let original = serde_json::json!({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava"});
        assert!(is_original(&original));
        let by_type =
            serde_json::json!({"model_type": "llava", "mm_video_tower": "LanguageBind/LanguageBind_Video_merge"});
        assert!(is_original(&by_type));
        let hf_llava = serde_json::json!({"model_type": "llava", "text_config": {}, "vision_config": {}});
        assert!(!is_original(&hf_llava));
        let hf = serde_json::json!({"architectures": ["VideoLlavaForConditionalGeneration"]});
        assert!(!is_original(&hf));
    }

    #[test]
    fn tower_configs_read_nested_and_flat() -> Result<()> {
        let nested = serde_json::json!({"vision_config": {"hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 56, "patch_size": 14,
            "hidden_act": "gelu", "add_time_attn": true, "num_frames": 8}});
        let raw: RawTower =
            serde_json::from_value(nested["vision_config"].clone()).map_err(|e| Error::Invalid(e.to_string()))?;
        assert!(raw.add_time_attn);
        assert_eq!(raw.num_frames, 8);
        let cfg = tower_vision(&nested["vision_config"], Path::new("config.json"), "vision_config.")?
            .resolve(Path::new("config.json"), "vision_config.")?;
        assert_eq!(cfg.act, Activation::Gelu);
        assert_eq!(cfg.tokens(), 17);
        Ok(())
    }
}
