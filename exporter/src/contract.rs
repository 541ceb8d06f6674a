//! What an engine feeds its graphs with, decided once from the checkpoint: preprocessing, the
//! chat template, the special tokens and the tokenizer file. The exporter writes it into the
//! manifest; calibration runs the graphs on exactly the same inputs.
//!
//! May depend on `checkpoint` and `vl_runtime`'s manifest types; nothing that builds graphs.
use std::path::Path;

use vl_runtime::manifest::{
    ChatTemplate, CheckpointLayout, FrameSamplingRule, GenerationDefaults, PlaceholderStyle, Preprocess, SpecialTokens,
};
use vl_runtime::preprocess::{CLIP_MEAN, CLIP_STD, PreprocessConfig, PreprocessRecipe, Resample};

use crate::checkpoint::{Checkpoint, GENERATION_CONFIG_FILE, GenerationConfig, IMAGE_MARKER};
use crate::error::{Error, Result};

/// Frames per video in Video-LLaVA.
pub const NUM_FRAMES: usize = 8;
/// The tokenizer file name in checkpoints and engines.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The media and prompt side of the manifest.
#[derive(Debug, Clone)]
pub struct MediaContract {
    /// Frame sampling, resize, crop and normalization.
    pub preprocess: Preprocess,
    /// How prompts are laid out.
    pub chat_template: ChatTemplate,
    /// Special token ids (`generation_config.json`'s where it gives them).
    pub tokens: SpecialTokens,
    /// Default sampling from `generation_config.json`, if it sets any.
    pub generation: Option<GenerationDefaults>,
}

impl MediaContract {
    /// The contract of an engine of `ck`; choices made where the checkpoint is silent are
    /// appended to `assumptions` (the manifest records them).
    pub fn of(ck: &Checkpoint, assumptions: &mut Vec<String>) -> Result<Self> {
        let (c, t) = (&ck.config, &ck.config.text);
        let frames = c.vision.temporal.map_or(NUM_FRAMES, |t| t.frames);
        let (image, recipe, chat_template) = if ck.layout == CheckpointLayout::Original {
            (original_preprocess_config(ck, assumptions), PreprocessRecipe::Original, original_chat_template(frames))
        } else {
            (preprocess_config(ck, assumptions)?, PreprocessRecipe::HfProcessor, hf_chat_template())
        };
        let mut tokens =
            SpecialTokens { bos: t.bos, eos: t.eos, pad: t.pad, image: c.image_token, video: c.video_token };
        let generation = match GenerationConfig::load(&ck.dir)? {
            Some(g) => {
                apply_generation_tokens(&g, &mut tokens, assumptions);
                g.has_sampling().then_some(g.sampling)
            }
            None => None,
        };
        Ok(Self {
            preprocess: Preprocess { frames, sampling: FrameSamplingRule::LinspaceTruncate, image, recipe },
            chat_template,
            tokens,
            generation,
        })
    }
}

/// `generation_config.json`'s token ids win over `config.json`'s, as in `generate()`.
fn apply_generation_tokens(g: &GenerationConfig, tokens: &mut SpecialTokens, assumptions: &mut Vec<String>) {
    tokens.bos = g.bos.unwrap_or(tokens.bos);
    tokens.pad = g.pad.or(tokens.pad);
    if let Some((&first, rest)) = g.eos.as_deref().and_then(<[u32]>::split_first) {
        tokens.eos = first;
        if !rest.is_empty() {
            assumptions.push(format!(
                "{GENERATION_CONFIG_FILE}: eos_token_id {:?}: answers end at {first} only (the engine has one eos)",
                g.eos.as_deref().unwrap_or_default()
            ));
        }
    }
}

/// The chat template of the Hugging Face port (llava_v1 without the system line).
pub fn hf_chat_template() -> ChatTemplate {
    ChatTemplate {
        system: String::new(),
        first_turn_video: "USER: {video}\n{question} ASSISTANT:".into(),
        first_turn_image: "USER: {image}\n{question} ASSISTANT:".into(),
        first_turn_text: "USER: {question} ASSISTANT:".into(),
        next_turn: "USER: {question} ASSISTANT:".into(),
        answer_end: "</s>".into(),
        video_placeholder: "<video>".into(),
        image_placeholder: "<image>".into(),
        placeholders: PlaceholderStyle::RepeatPerToken,
    }
}

/// llava_v1's system line, as the original Video-LLaVA prompt starts (with its separator).
pub const LLAVA_V1_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. \
                                   The assistant gives helpful, detailed, and polite answers to the human's questions. ";

/// The original Video-LLaVA prompt (llava_v1): the system line, then `USER: `, one `<image>`
/// marker per frame joined by single spaces (or one for an image), `\n`, the question and
/// ` ASSISTANT:`; the prompt is split on the markers (`tokenizer_image_token`).
pub fn original_chat_template(frames: usize) -> ChatTemplate {
    let video = vec![IMAGE_MARKER; frames].join(" ");
    ChatTemplate {
        system: LLAVA_V1_SYSTEM.into(),
        first_turn_video: format!("USER: {video}\n{{question}} ASSISTANT:"),
        first_turn_image: format!("USER: {IMAGE_MARKER}\n{{question}} ASSISTANT:"),
        first_turn_text: "USER: {question} ASSISTANT:".into(),
        next_turn: "USER: {question} ASSISTANT:".into(),
        answer_end: "</s>".into(),
        video_placeholder: IMAGE_MARKER.into(),
        image_placeholder: IMAGE_MARKER.into(),
        placeholders: PlaceholderStyle::SplitOnMarker,
    }
}

/// The original transforms' settings: CLIP mean/std, `x / 255`, short side and crop at the
/// tower's image size (224 for the 7B). Images and video frames share them.
fn original_preprocess_config(ck: &Checkpoint, assumptions: &mut Vec<String>) -> PreprocessConfig {
    let side = ck.config.vision.image_size as u32;
    assumptions.push(format!(
        "preprocessing: the original transforms at {side} px (video: x/255, normalize, bilinear short-side resize \
         without antialias, center crop; image: pad to a square with the mean color, bicubic, crop, normalize), \
         without the original's random horizontal flip of video frames"
    ));
    PreprocessConfig {
        size: side,
        crop: side,
        mean: CLIP_MEAN,
        std: CLIP_STD,
        rescale: 1.0 / 255.0,
        resample: Resample::Bilinear,
    }
}

/// `VideoLlavaImageProcessor`'s defaults for what `preprocessor_config.json` leaves out
/// (`size.shortest_edge`, `crop_size`: 224; bicubic; `1/255`; OpenAI CLIP mean/std).
pub const PROCESSOR_DEFAULT_SIDE: u32 = 224;

/// The image processor's file; videos follow it when there is no [`VIDEO_PROCESSOR_FILE`].
pub const IMAGE_PROCESSOR_FILE: &str = "preprocessor_config.json";
/// The video processor's file (transformers 4.5x+ writes it; the published 7B has none).
pub const VIDEO_PROCESSOR_FILE: &str = "video_preprocessor_config.json";

/// Preprocessing from `preprocessor_config.json` when present; CLIP's defaults at the tower's
/// side otherwise. Without `video_preprocessor_config.json`, video frames follow the image
/// processor's settings, as transformers does (`VideoLlavaImageProcessor` preprocesses videos
/// in 4.x; 5.x's video processor loads `preprocessor_config.json` when its own file is
/// missing); with one, it must agree, the engine having one recipe for both.
fn preprocess_config(ck: &Checkpoint, assumptions: &mut Vec<String>) -> Result<PreprocessConfig> {
    let side = ck.config.vision.image_size as u32;
    let path = ck.dir.join(IMAGE_PROCESSOR_FILE);
    if !path.is_file() {
        assumptions.push(format!("no {IMAGE_PROCESSOR_FILE}: CLIP mean/std, bicubic, shortest edge {side}"));
        return Ok(PreprocessConfig {
            size: side,
            crop: side,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            rescale: 1.0 / 255.0,
            resample: Resample::Bicubic,
        });
    }
    let cfg = read_processor(&path)?;
    if cfg.crop as usize != ck.config.vision.image_size {
        return Err(Error::Config {
            path,
            message: format!(
                "crop size {} differs from the tower's image_size {}",
                cfg.crop, ck.config.vision.image_size
            ),
        });
    }
    let video_path = ck.dir.join(VIDEO_PROCESSOR_FILE);
    if !video_path.is_file() {
        assumptions
            .push(format!("no {VIDEO_PROCESSOR_FILE}: video frames use {IMAGE_PROCESSOR_FILE}, as transformers does"));
        return Ok(cfg);
    }
    let video = read_processor(&video_path)?;
    if video != cfg {
        return Err(Error::Config {
            path: video_path,
            message: format!(
                "video preprocessing {video:?} differs from {IMAGE_PROCESSOR_FILE}'s {cfg:?}; an engine has one \
                 preprocessing config for images and frames"
            ),
        });
    }
    Ok(cfg)
}

/// One processor config file, with `VideoLlavaImageProcessor`'s defaults for what it omits.
fn read_processor(path: &Path) -> Result<PreprocessConfig> {
    let mut cfg = PreprocessConfig {
        size: PROCESSOR_DEFAULT_SIDE,
        crop: PROCESSOR_DEFAULT_SIDE,
        mean: CLIP_MEAN,
        std: CLIP_STD,
        rescale: 1.0 / 255.0,
        resample: Resample::Bicubic,
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Config { path: path.into(), message: e.to_string() })?;
    if let Some(s) = v.pointer("/size/shortest_edge").and_then(|s| s.as_u64()) {
        cfg.size = s as u32;
    }
    if let Some(c) = v.pointer("/crop_size/height").and_then(|s| s.as_u64()) {
        cfg.crop = c as u32;
    }
    let triple = |key: &str| -> Option<[f32; 3]> {
        let a = v.get(key)?.as_array()?;
        let f: Vec<f32> = a.iter().filter_map(|x| x.as_f64().map(|x| x as f32)).collect();
        f.try_into().ok()
    };
    if let Some(m) = triple("image_mean") {
        cfg.mean = m;
    }
    if let Some(s) = triple("image_std") {
        cfg.std = s;
    }
    if let Some(r) = v.get("rescale_factor").and_then(|r| r.as_f64()) {
        cfg.rescale = r as f32;
    }
    cfg.resample = match v.get("resample").and_then(|r| r.as_u64()) {
        Some(2) => Resample::Bilinear,
        Some(3) | None => Resample::Bicubic,
        Some(other) => {
            return Err(Error::Config {
                path: path.into(),
                message: format!("resample {other} is not supported (2, 3 are)"),
            });
        }
    };
    Ok(cfg)
}
