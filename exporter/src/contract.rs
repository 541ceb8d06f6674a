//! What an engine feeds its graphs with, decided once from the checkpoint: preprocessing, the
//! chat template, the special tokens and the tokenizer file. The exporter writes it into the
//! manifest; calibration runs the graphs on exactly the same inputs.
//!
//! May depend on `checkpoint` and `vl_runtime`'s manifest types; nothing that builds graphs.
use vl_runtime::manifest::{
    ChatTemplate, CheckpointLayout, FrameSamplingRule, PlaceholderStyle, Preprocess, SpecialTokens,
};
use vl_runtime::preprocess::{CLIP_MEAN, CLIP_STD, PreprocessConfig, PreprocessRecipe, Resample};

use crate::checkpoint::{Checkpoint, IMAGE_MARKER};
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
    /// Special token ids.
    pub tokens: SpecialTokens,
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
        Ok(Self {
            preprocess: Preprocess { frames, sampling: FrameSamplingRule::LinspaceTruncate, image, recipe },
            chat_template,
            tokens: SpecialTokens { bos: t.bos, eos: t.eos, pad: t.pad, image: c.image_token, video: c.video_token },
        })
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

/// Preprocessing from `preprocessor_config.json` when present; CLIP's defaults otherwise.
fn preprocess_config(ck: &Checkpoint, assumptions: &mut Vec<String>) -> Result<PreprocessConfig> {
    let side = ck.config.vision.image_size as u32;
    let mut cfg = PreprocessConfig {
        size: side,
        crop: side,
        mean: CLIP_MEAN,
        std: CLIP_STD,
        rescale: 1.0 / 255.0,
        resample: Resample::Bicubic,
    };
    let path = ck.dir.join("preprocessor_config.json");
    if !path.is_file() {
        assumptions.push(format!("no preprocessor_config.json: CLIP mean/std, bicubic, shortest edge {side}"));
        return Ok(cfg);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Config { path: path.clone(), message: e.to_string() })?;
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
            return Err(Error::Config { path, message: format!("resample {other} is not supported (2, 3 are)") });
        }
    };
    if cfg.crop as usize != ck.config.vision.image_size {
        return Err(Error::Config {
            path,
            message: format!(
                "crop size {} differs from the tower's image_size {}",
                cfg.crop, ck.config.vision.image_size
            ),
        });
    }
    Ok(cfg)
}
