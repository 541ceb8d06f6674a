//! `vl-export build`: checkpoint in, self-contained engine directory out.
//!
//! Everything is written into a temporary directory beside the destination and renamed into
//! place at the end, so a failed or interrupted export never leaves a directory that looks valid.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use vl_runtime::manifest::{
    DataFile, GraphEntry, Graphs, KvLayout, Manifest, ModelDims, Precision, SCHEMA_VERSION, Source, Target,
};

use crate::checkpoint::{Checkpoint, TowerDirs};
use crate::contract::{MediaContract, TOKENIZER_FILE};
use crate::error::{Error, Result};
use crate::graphs::{GraphKind, decoder, vision};
use crate::onnx::{ExternalData, FinishedGraph, GraphBuilder};
use crate::precision::{Plan, WeightMethod};
use crate::quant::calibrate::{CalibOptions, CalibReport, calibrate};
use crate::staging;
use crate::weight_codes::grid::GridFit;

fn is_weight_only(precision: Precision) -> bool {
    matches!(precision, Precision::Int8Weight | Precision::Int4Weight)
}

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
    /// How the weight-only precisions make their codes (GPTQ calibrates first).
    pub weight_method: WeightMethod,
    /// How GPTQ fits each block's range (`GridFit::Mse`: the reference's clipping search).
    pub weight_grid: GridFit,
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
            weight_method: WeightMethod::default(),
            weight_grid: GridFit::default(),
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
    /// What calibrating took (time, peak memory, scratch disk), when this build calibrated.
    pub calibration: Option<CalibReport>,
}

/// Exports the checkpoint in `opts.model` to `opts.out`.
pub fn build(opts: &BuildOptions) -> Result<BuildReport> {
    let started = Instant::now();
    if opts.weight_grid == GridFit::Mse && !(opts.weight_method.gptq() && is_weight_only(opts.precision)) {
        return Err(Error::Invalid(format!(
            "--weight-grid mse fits GPTQ's blocks: it needs --precision int4-weight or int8-weight with a gptq \
             --weight-method (got {:?} with {})",
            opts.precision,
            opts.weight_method.label()
        )));
    }
    let mut plan =
        Plan::new(opts.precision, opts.block_size)?.with_method(opts.weight_method).with_grid(opts.weight_grid);
    if let Some(target) = opts.target {
        plan = plan.with_target(target)?;
    }
    let ck = Checkpoint::open_with(&opts.model, &opts.towers)?;
    let mut calib_report = None;
    if plan.needs_calibration() || opts.calib.is_some() {
        let mut calib =
            opts.calib.clone().unwrap_or_else(|| CalibOptions { progress: opts.progress, ..Default::default() });
        calib.gptq = plan.gptq_request();
        let calibration = calibrate(&ck, &calib).map_err(|e| {
            e.on_full_disk(|| format!("calibration scratch (TMPDIR {})", std::env::temp_dir().display()))
        })?;
        calib_report = calibration.report;
        if opts.progress {
            let verb = if calibration.reused { "reused" } else { "wrote" };
            eprintln!("{verb} calibration table {}", calibration.path.display());
        }
        plan = plan.with_calibration(calibration)?;
    }
    let tokenizer_src = ck.tokenizer_source()?;
    check_destination(&opts.out)?;
    let parent = parent_dir(&opts.out);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    staging::clean_stale(&parent, staging::PREFIX)?;
    // Staged, then renamed into place; on an error the staging directory is removed when the
    // closure (which owns it) drops, and the previous engine stays.
    let staged = || -> Result<(Manifest, Vec<(String, Duration)>)> {
        let tmp = staging::Staging::create(&parent, &opts.out)?;

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
        let [vision, image, embed, decoder]: [(GraphEntry, Option<GraphEntry>); 4] =
            entries.try_into().map_err(|_| Error::Invalid("graph count mismatch".into()))?;
        let (decoder, decoder_in_place) = decoder;
        let graphs = Graphs {
            vision: vision.0,
            image: image.0,
            embed: embed.0,
            decoder,
            decoder_in_place,
            vision_uint8: vision.1,
            image_uint8: image.1,
        };

        let tokenizer_dst = tmp.path().join(TOKENIZER_FILE);
        let tokenizer_note = tokenizer_src.write_engine_file(&tokenizer_dst)?;
        let mut manifest = manifest(&ck, opts, &plan, graphs)?;
        manifest.assumptions.extend(tokenizer_note);
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_dst)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_dst.display())))?;
        vl_runtime::model::check_placeholders(&tokenizer, &manifest, &tokenizer_dst)?;
        manifest.save(tmp.path())?;
        move_into_place(tmp, &opts.out)?;
        Ok((manifest, timings))
    };
    let (manifest, timings) = staged().map_err(|e| e.on_full_disk(|| format!("the engine {}", opts.out.display())))?;
    Ok(BuildReport {
        manifest,
        graphs: timings,
        elapsed: started.elapsed(),
        notice: ck.notice.clone(),
        calibration: calib_report,
    })
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
fn move_into_place(tmp: staging::Staging, out: &Path) -> Result<()> {
    let _swap = staging::hold_interrupts();
    // The old engine is parked under the staging directory's name plus `.old`: unique, since
    // the staging name is this process's alone.
    let old = out.exists().then(|| staging::parked(tmp.path()));
    if let Some(old) = &old {
        std::fs::rename(out, old).map_err(|e| Error::io(out, e))?;
    }
    if let Err(e) = std::fs::rename(tmp.path(), out) {
        if let Some(old) = &old {
            std::fs::rename(old, out).map_err(|e| Error::io(old, e))?;
        }
        return Err(Error::io(out, e));
    }
    let claim = tmp.keep();
    if let Some(old) = &old {
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    drop(claim);
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

/// Writes graph `kind` and, where the plan has one, its twin on the same data file (the
/// weights are on disk once): for a decoder with a concatenated cache the in-place one
/// (`GroupQueryAttention`, for ONNX Runtime's CPU and CUDA providers), and for int8 vision
/// graphs the one with uint8 activation codes ([`Plan::uint8_twin`]), so one engine
/// directory serves every device.
fn write_graph(
    kind: GraphKind,
    ck: &Checkpoint,
    plan: &Plan,
    dir: &Path,
    bar: &ProgressBar,
) -> Result<(GraphEntry, Option<GraphEntry>)> {
    let data_file = format!("{}.onnx.data", kind.name());
    let data = ExternalData::create(&dir.join(&data_file))?;
    let builder = |data: ExternalData, numerics| {
        let mut b = GraphBuilder::new(kind.name(), data);
        b.set_progress(bar.clone());
        b.set_numerics(numerics);
        if let Some(params) = plan.quant_params(kind) {
            b.set_quant(params);
        }
        b
    };
    let mut b = builder(data, plan.numerics(kind));
    kind.build(&mut b, ck, plan.kv_layout())?;
    let Some((twin_file, twin_layout)) = twin(kind, ck, plan) else {
        let done = b.finish(env!("CARGO_PKG_VERSION"))?;
        return Ok((entry(dir, format!("{}.onnx", kind.name()), &done, &data_file)?, None));
    };
    let (first, data) = b.finish_sharing(env!("CARGO_PKG_VERSION"));
    let mut b = builder(data, plan.uint8_twin(kind).unwrap_or_else(|| plan.numerics(kind)));
    kind.build(&mut b, ck, twin_layout)?;
    let second = b.finish(env!("CARGO_PKG_VERSION"))?;
    let shared = |g: FinishedGraph| FinishedGraph {
        data_bytes: second.data_bytes,
        data_sha256: second.data_sha256.clone(),
        ..g
    };
    let first = entry(dir, format!("{}.onnx", kind.name()), &shared(first), &data_file)?;
    let second = entry(dir, twin_file, &second, &data_file)?;
    Ok((first, Some(second)))
}

/// The file and KV layout of graph `kind`'s twin, if the plan gives it one.
fn twin(kind: GraphKind, ck: &Checkpoint, plan: &Plan) -> Option<(String, KvLayout)> {
    match kind {
        GraphKind::Decoder => (plan.kv_layout() == KvLayout::Concat
            && decoder::in_place_supported(&ck.config.text).is_ok())
        .then(|| (IN_PLACE_DECODER_FILE.to_string(), KvLayout::SharedBuffer)),
        GraphKind::Vision | GraphKind::Image => {
            plan.uint8_twin(kind).map(|_| (format!("{}_uint8.onnx", kind.name()), plan.kv_layout()))
        }
        GraphKind::Embed => None,
    }
}

/// The in-place twin of `decoder.onnx` (its weights are in `decoder.onnx.data`).
const IN_PLACE_DECODER_FILE: &str = "decoder_in_place.onnx";

/// Writes a finished graph's `.onnx` file and describes it for the manifest.
fn entry(dir: &Path, file: String, done: &FinishedGraph, data_file: &str) -> Result<GraphEntry> {
    let path = dir.join(&file);
    std::fs::write(&path, &done.model_bytes).map_err(|e| Error::io(&path, e))?;
    Ok(GraphEntry {
        sha256: sha256_file(&path)?,
        bytes: done.model_bytes.len() as u64,
        file,
        data: Some(DataFile { file: data_file.to_string(), sha256: done.data_sha256.clone(), bytes: done.data_bytes }),
        inputs: done.inputs.clone(),
        outputs: done.outputs.clone(),
    })
}

fn manifest(ck: &Checkpoint, opts: &BuildOptions, plan: &Plan, graphs: Graphs) -> Result<Manifest> {
    let c = &ck.config;
    let t = &c.text;
    let mut assumptions = vec![ck.notice.clone()];
    assumptions.extend(ck.assumptions.iter().cloned());
    let media = MediaContract::of(ck, &mut assumptions)?;
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
            num_frames: media.preprocess.frames,
            tokens_per_frame: c.vision.tokens(),
            tokens_per_image: vision::image_tokens(ck),
            text_hidden: t.hidden,
            num_layers: t.layers,
            num_heads: t.heads,
            num_kv_heads: t.kv_heads,
            head_dim: t.head_dim,
            vocab_size: t.vocab,
            image_size: c.vision.image_size,
            patch_size: c.vision.patch_size,
            vision_hidden: c.vision.hidden,
            vision_intermediate: c.vision.intermediate,
            vision_layers: c.vision.layers,
            vision_layers_run: c.vision_layers_needed(),
            vision_feature_layers: c.feature_layers.len(),
            text_intermediate: t.intermediate,
            kv_dtype: plan.kv_dtype(),
            kv_layout: plan.kv_layout(),
        },
        precision: opts.precision,
        target: plan.target(),
        graphs,
        tokens: media.tokens,
        chat_template: media.chat_template,
        preprocess: media.preprocess,
        max_sequence_length: t.max_positions,
        tokenizer: TOKENIZER_FILE.into(),
        generation: media.generation,
        assumptions,
        numerics: plan.notes(),
        compiled: Vec::new(),
    })
}
