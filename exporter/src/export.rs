//! `vl-export build`: checkpoint in, self-contained engine directory out.
//!
//! Everything is written into a temporary directory beside the destination and renamed into
//! place at the end, so a failed or interrupted export never leaves a directory that looks valid.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use vl_runtime::manifest::{
    ChatTemplate, CheckpointLayout, DataFile, FrameSamplingRule, GraphEntry, Graphs, KvLayout, Manifest, ModelDims,
    PlaceholderStyle, Precision, Preprocess, SCHEMA_VERSION, Source, SpecialTokens, Target,
};
use vl_runtime::preprocess::{CLIP_MEAN, CLIP_STD, PreprocessConfig, PreprocessRecipe, Resample};

use crate::checkpoint::{Checkpoint, IMAGE_MARKER, TowerDirs};
use crate::error::{Error, Result};
use crate::graphs::{GraphKind, decoder_gqa, vision};
use crate::onnx::{ExternalData, GraphBuilder};
use crate::precision::Plan;
use crate::quant::calibrate::{CalibOptions, calibrate};

/// Frames per video in Video-LLaVA.
pub const NUM_FRAMES: usize = 8;
/// The tokenizer file name in checkpoints and engines.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// What to export and where.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Checkpoint directory.
    pub model: PathBuf,
    /// Engine directory to create.
    pub out: PathBuf,
    /// Numeric precision.
    pub precision: Precision,
    /// Weights per quantization block for the weight-only precisions.
    pub block_size: usize,
    /// Show a progress bar (only on a terminal).
    pub progress: bool,
    /// Tower config directories of an original-layout checkpoint (`--video-tower`, `--image-tower`).
    pub towers: TowerDirs,
    /// Calibration of an int8 build (`None`: the built-in spec). With fp32, `Some` folds the
    /// SmoothQuant factors alone into the weights.
    pub calib: Option<CalibOptions>,
    /// Operator set (`None`: the one the precision needs; `Some(OnnxRuntime)` also switches the
    /// decoder to `GroupQueryAttention` with a shared KV buffer).
    pub target: Option<Target>,
}

impl BuildOptions {
    /// fp32 export of `model` into `out`.
    pub fn new(model: PathBuf, out: PathBuf) -> Self {
        Self {
            model,
            out,
            precision: Precision::Fp32,
            block_size: 32,
            progress: false,
            towers: TowerDirs::default(),
            calib: None,
            target: None,
        }
    }
}

/// What a build produced.
#[derive(Debug)]
pub struct BuildReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// Per graph: file and time taken.
    pub graphs: Vec<(String, Duration)>,
    /// Wall time.
    pub elapsed: Duration,
    /// One line about the checkpoint's layout for the user (also in the manifest's assumptions).
    pub notice: String,
}

/// Exports the checkpoint in `opts.model` to `opts.out`.
pub fn build(opts: &BuildOptions) -> Result<BuildReport> {
    let started = Instant::now();
    let mut plan = Plan::new(opts.precision, opts.block_size)?;
    if let Some(target) = opts.target {
        plan = plan.with_target(target)?;
    }
    let ck = Checkpoint::open_with(&opts.model, &opts.towers)?;
    if opts.precision == Precision::Int8 || opts.calib.is_some() {
        let calib =
            opts.calib.clone().unwrap_or_else(|| CalibOptions { progress: opts.progress, ..Default::default() });
        let calibration = calibrate(&ck, &calib)?;
        if opts.progress {
            let verb = if calibration.reused { "reused" } else { "wrote" };
            eprintln!("{verb} calibration table {}", calibration.path.display());
        }
        plan = plan.with_calibration(calibration)?;
    }
    let tokenizer_src = opts.model.join(TOKENIZER_FILE);
    if !tokenizer_src.is_file() {
        return Err(Error::Invalid(format!("{}: missing (the engine needs the tokenizer)", tokenizer_src.display())));
    }
    check_destination(&opts.out)?;
    let parent = parent_dir(&opts.out);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = tempfile::Builder::new().prefix(".vl-export-").tempdir_in(&parent).map_err(|e| Error::io(&parent, e))?;

    let bar = progress_bar(opts.progress);
    let mut timings = Vec::new();
    let mut entries = Vec::new();
    for kind in GraphKind::ALL {
        let t0 = Instant::now();
        bar.set_message(format!("{}.onnx", kind.name()));
        entries.push(write_graph(kind, &ck, &plan, tmp.path(), &bar)?);
        let took = t0.elapsed();
        if bar.is_hidden() && opts.progress {
            eprintln!("wrote {}.onnx in {:.1} s", kind.name(), took.as_secs_f64());
        }
        timings.push((format!("{}.onnx", kind.name()), took));
    }
    bar.finish_and_clear();
    let [vision, image, embed, decoder]: [GraphEntry; 4] =
        entries.try_into().map_err(|_| Error::Invalid("graph count mismatch".into()))?;

    let tokenizer_dst = tmp.path().join(TOKENIZER_FILE);
    std::fs::copy(&tokenizer_src, &tokenizer_dst).map_err(|e| Error::io(&tokenizer_dst, e))?;
    let manifest = manifest(&ck, opts, &plan, Graphs { vision, image, embed, decoder })?;
    manifest.save(tmp.path())?;
    move_into_place(tmp, &opts.out)?;
    Ok(BuildReport { manifest, graphs: timings, elapsed: started.elapsed(), notice: ck.notice.clone() })
}

fn parent_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Refuses to replace a directory that is not an engine (so a typo cannot delete user data).
fn check_destination(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(Error::Invalid(format!("{}: exists and is not a directory", out.display())));
    }
    let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    let empty = entries.next().is_none();
    if empty || out.join(vl_runtime::manifest::MANIFEST_FILE).exists() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{}: exists, is not empty and holds no manifest.yaml; refusing to replace it",
        out.display()
    )))
}

/// Renames the staged engine to `out`, replacing an engine there. On failure the old engine is
/// back at `out` and the staging directory is removed (when `tmp` drops).
fn move_into_place(tmp: tempfile::TempDir, out: &Path) -> Result<()> {
    // The old engine is parked under the staging directory's name plus `.old`: unique, since
    // tempfile reserved that name for this export alone.
    let mut parked = tmp.path().as_os_str().to_owned();
    parked.push(".old");
    let old = out.exists().then(|| PathBuf::from(parked));
    if let Some(old) = &old {
        std::fs::rename(out, old).map_err(|e| Error::io(out, e))?;
    }
    if let Err(e) = std::fs::rename(tmp.path(), out) {
        if let Some(old) = &old {
            std::fs::rename(old, out).map_err(|e| Error::io(old, e))?;
        }
        return Err(Error::io(out, e));
    }
    let _ = tmp.keep();
    if let Some(old) = &old {
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    Ok(())
}

fn progress_bar(enabled: bool) -> ProgressBar {
    if !enabled || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}: {bytes} of weights written ({bytes_per_sec})") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn write_graph(kind: GraphKind, ck: &Checkpoint, plan: &Plan, dir: &Path, bar: &ProgressBar) -> Result<GraphEntry> {
    let file = format!("{}.onnx", kind.name());
    let data_file = format!("{file}.data");
    let data = ExternalData::create(&dir.join(&data_file))?;
    let mut b = GraphBuilder::new(kind.name(), data);
    b.set_progress(bar.clone());
    b.set_numerics(plan.numerics(kind));
    if let Some(params) = plan.quant_params(kind) {
        b.set_quant(params);
    }
    if kind == GraphKind::Decoder && plan.kv_layout() == KvLayout::SharedBuffer {
        decoder_gqa::build(&mut b, ck)?;
    } else {
        kind.build(&mut b, ck)?;
    }
    let done = b.finish(env!("CARGO_PKG_VERSION"))?;
    let path = dir.join(&file);
    std::fs::write(&path, &done.model_bytes).map_err(|e| Error::io(&path, e))?;
    Ok(GraphEntry {
        sha256: sha256_file(&path)?,
        bytes: done.model_bytes.len() as u64,
        file,
        data: Some(DataFile { file: data_file, sha256: done.data_sha256, bytes: done.data_bytes }),
        inputs: done.inputs,
        outputs: done.outputs,
    })
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

/// What an engine of `ck` feeds its graphs with: preprocessing, chat template and special
/// tokens, as the manifest will say (calibration runs the graphs the same way).
pub(crate) fn media_contract(ck: &Checkpoint) -> Result<(Preprocess, ChatTemplate, SpecialTokens)> {
    let (c, t) = (&ck.config, &ck.config.text);
    let mut unused = Vec::new();
    let frames = c.vision.temporal.map_or(NUM_FRAMES, |t| t.frames);
    let (image, recipe, template) = if ck.layout == CheckpointLayout::Original {
        (original_preprocess_config(ck, &mut unused), PreprocessRecipe::Original, original_chat_template(frames))
    } else {
        (preprocess_config(ck, &mut unused)?, PreprocessRecipe::HfProcessor, hf_chat_template())
    };
    let tokens = SpecialTokens { bos: t.bos, eos: t.eos, pad: t.pad, image: c.image_token, video: c.video_token };
    Ok((Preprocess { frames, sampling: FrameSamplingRule::LinspaceTruncate, image, recipe }, template, tokens))
}

fn manifest(ck: &Checkpoint, opts: &BuildOptions, plan: &Plan, graphs: Graphs) -> Result<Manifest> {
    let c = &ck.config;
    let t = &c.text;
    let mut assumptions = vec![ck.notice.clone()];
    assumptions.extend(ck.assumptions.iter().cloned());
    let original = ck.layout == CheckpointLayout::Original;
    let frames = c.vision.temporal.map_or(NUM_FRAMES, |t| t.frames);
    let (image, recipe, chat_template) = if original {
        (original_preprocess_config(ck, &mut assumptions), PreprocessRecipe::Original, original_chat_template(frames))
    } else {
        (preprocess_config(ck, &mut assumptions)?, PreprocessRecipe::HfProcessor, hf_chat_template())
    };
    Ok(Manifest {
        schema_version: SCHEMA_VERSION,
        toolkit_version: env!("CARGO_PKG_VERSION").into(),
        source: Source {
            path: opts.model.display().to_string(),
            layout: ck.layout,
            architecture: c.architecture.clone(),
            weight_dtype: ck.store.dominant_dtype(),
        },
        model: ModelDims {
            num_frames: frames,
            tokens_per_frame: c.vision.tokens(),
            tokens_per_image: vision::image_tokens(ck),
            text_hidden: t.hidden,
            num_layers: t.layers,
            num_heads: t.heads,
            num_kv_heads: t.kv_heads,
            head_dim: t.head_dim,
            vocab_size: t.vocab,
            image_size: c.vision.image_size,
            kv_dtype: plan.kv_dtype(),
            kv_layout: plan.kv_layout(),
        },
        precision: opts.precision,
        target: plan.target(),
        graphs,
        tokens: SpecialTokens { bos: t.bos, eos: t.eos, pad: t.pad, image: c.image_token, video: c.video_token },
        chat_template,
        preprocess: Preprocess { frames, sampling: FrameSamplingRule::LinspaceTruncate, image, recipe },
        max_sequence_length: t.max_positions,
        tokenizer: TOKENIZER_FILE.into(),
        assumptions,
        numerics: plan.notes(),
    })
}
