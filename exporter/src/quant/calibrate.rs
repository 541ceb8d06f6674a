//! Calibration: the fp32 graphs, built with every linear's input as an extra output, run in
//! ONNX Runtime over the calibration set, streamed: one graph at a time, and the decoder one
//! block of layers at a time (one layer by default). A block's graph and weights are written
//! to the scratch directory, every sample's hidden states go through it (kept in memory up to
//! a budget, spilled to the scratch directory past it), and the block is removed before the
//! next one is built, so memory and scratch disk hold one layer and the calibration set's
//! activations, whatever the depth of the model (as the sequential pipelines of GPTQ and
//! llm-compressor do). Each block computes the rotary tables and causal mask from the same
//! `position_ids` and `attention_mask` the whole decoder takes, so its taps see the values the
//! whole decoder's would; the table names the whole decoder's tensors (from its structure,
//! built without weights).
//!
//! - Pass 1 takes the per-channel maximum magnitude of every recorded tensor. SmoothQuant
//!   factors follow from it for the language model's linears that read an RMSNorm's output.
//! - Pass 2 (percentile and entropy methods) fills a 2048-bin histogram of magnitudes per
//!   tensor over the range pass 1 found. Both passes run block by block: a block's maxima, and
//!   so its factors and ranges, are known before pass 2 runs it. Smoothing divides a tensor's channels by its factors
//!   and changes nothing else in the graph (the linears' outputs are the same), so pass 2 runs
//!   the same graphs and divides the recorded values itself, which is exact.
//!
//! The result is keyed by a hash of the spec, its media and the checkpoint, and saved as JSON
//! and TensorRT caches; a later build with the same key reuses it.
//!
//! For the weight-only precisions' GPTQ, pass 1 also sums each tapped input's `X^T X`, and each
//! block's linears are quantized when the block closes ([`gptq_codes`]); the codes are kept
//! beside the table, under the same key.
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, Array4, Array5};
use ort::ep;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session, SessionInputValue, SessionOutputs};
use ort::value::{Tensor, TensorRef};
use sha2::{Digest, Sha256};
use vl_runtime::generate::features_2d;
use vl_runtime::manifest::{ChatTemplate, DType, KvLayout, Preprocess, SpecialTokens};
use vl_runtime::prompt::{PromptBuilder, VisualSlot};
use vl_runtime::video::{FrameSampling, load_image, load_video};

use super::calib::{CalibSpec, MediaSource, check_alpha, materialize};
use super::gptq_codes::{self, CodeDir, GptqRequest};
use super::hessian::Hessian;
use super::sensitivity;
use super::smooth;
use super::stats::{self, Histogram, Method};
use super::stream;
use super::table::{self, BlockSensitivity, FORMAT, FoldKind, QuantTable, SmoothEntry, TensorEntry};
use crate::checkpoint::{Checkpoint, TextConfig};
use crate::contract::MediaContract;
use crate::error::{Error, Result};
use crate::graphs::GraphKind;
use crate::graphs::decoder::{self, Part};
use crate::onnx::{ExternalData, GraphBuilder, Numerics, SmoothSource, Tap, WeightFormat};
use crate::staging;

/// How to calibrate.
#[derive(Debug, Clone, Default)]
pub struct CalibOptions {
    /// The spec (`None`: the built-in `calib/default.yaml`).
    pub spec: Option<PathBuf>,
    /// Override of the spec's SmoothQuant strength.
    pub alpha: Option<f32>,
    /// Override of the spec's threshold method.
    pub method: Option<Method>,
    /// Where tables go (default: `tables/` beside the spec; `calib/tables` for the built-in one).
    pub table_dir: Option<PathBuf>,
    /// Show progress bars (on a terminal).
    pub progress: bool,
    /// Intra-op threads of the calibration sessions (default: one per core).
    pub threads: Option<usize>,
    /// Decoder layers per calibration block (default [`DEFAULT_BLOCK_LAYERS`]); the model's
    /// layer count or more runs the whole decoder as one graph, the reference the blocks are
    /// tested against (it holds the whole fp32 decoder in memory).
    pub block_layers: Option<usize>,
    /// Bytes of activations held in memory between decoder blocks; past it they are spilled to
    /// the scratch directory (default [`stream::DEFAULT_MEMORY_BUDGET`]).
    pub memory_budget: Option<usize>,
    /// Also quantize the linears by GPTQ (weight-only precisions), from pass 1's Hessians.
    pub gptq: Option<GptqRequest>,
}

/// A calibration's table and where it lies.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// The table.
    pub table: QuantTable,
    /// Its JSON file.
    pub path: PathBuf,
    /// The TensorRT caches, one per graph.
    pub trt_caches: Vec<PathBuf>,
    /// Whether an existing table was reused (nothing was run).
    pub reused: bool,
    /// What the calibration run measured (`None` when the table was reused).
    pub report: Option<CalibReport>,
    /// GPTQ's codes, when asked for.
    pub codes: Option<CodeDir>,
}

/// The graphs that hold linear layers, as the table names them.
const GRAPHS: [GraphKind; 3] = [GraphKind::Vision, GraphKind::Image, GraphKind::Decoder];

/// Loads the table for `ck` and the spec in `opts` if one with the same key exists, else
/// calibrates and saves it.
pub fn calibrate(ck: &Checkpoint, opts: &CalibOptions) -> Result<Calibration> {
    let mut spec = match &opts.spec {
        Some(p) => CalibSpec::load(p)?,
        None => CalibSpec::builtin()?,
    };
    if let Some(a) = opts.alpha {
        check_alpha(a).map_err(Error::Invalid)?;
        spec.alpha = a;
    }
    if let Some(m) = opts.method {
        spec.method = m;
    }
    let key = key(ck, &spec)?;
    let dir = match (&opts.table_dir, &opts.spec) {
        (Some(d), _) => d.clone(),
        (None, Some(p)) => p.parent().unwrap_or(Path::new(".")).join("tables"),
        (None, None) => PathBuf::from("calib/tables"),
    };
    let base = dir.join(format!("{}-{}", spec.stem, &key[..16]));
    let path = base.with_extension("json");
    let trt_caches: Vec<PathBuf> =
        GRAPHS.iter().map(|g| PathBuf::from(format!("{}.{}.trt-cache", base.display(), g.name()))).collect();
    let codes = opts.gptq.map(|r| CodeDir::new(r.dir(&base)));
    if let Ok(table) = QuantTable::load(&path)
        && codes.as_ref().is_none_or(CodeDir::is_complete)
        && table.format == FORMAT
        && table.key == key
        && table.check().is_ok()
    {
        write_caches(&table, &trt_caches)?;
        return Ok(Calibration { table, path, trt_caches, reused: true, report: None, codes });
    }
    let gptq = match (opts.gptq, &codes) {
        (Some(r), Some(dir)) => {
            dir.start()?;
            Some((r, dir))
        }
        _ => None,
    };
    let (table, report) = run(ck, &spec, key, opts, gptq)?;
    table.check()?;
    table.save(&path)?;
    write_caches(&table, &trt_caches)?;
    if let Some(dir) = &codes {
        dir.finish()?;
    }
    Ok(Calibration { table, path, trt_caches, reused: false, report: Some(report), codes })
}

fn write_caches(table: &QuantTable, paths: &[PathBuf]) -> Result<()> {
    for (g, p) in GRAPHS.iter().zip(paths) {
        if !p.is_file() {
            table::write_atomic(p, &table.trt_cache(g.name()))?;
        }
    }
    Ok(())
}

/// Bytes hashed whole; larger files are sampled.
const FULL_HASH_LIMIT: u64 = 64 << 20;
/// Sampled files: 1 MiB every 64 MiB, and the last 1 MiB.
const SAMPLE: u64 = 1 << 20;

/// Hashes `path`'s name, size and contents (whole up to 64 MiB, else 1 MiB of every 64 MiB
/// plus the tail: a changed weight file changes its bytes everywhere it was rewritten).
fn hash_file(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    h.update(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; SAMPLE as usize];
    if len <= FULL_HASH_LIMIT {
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
            if n == 0 {
                return Ok(());
            }
            h.update(&buf[..n]);
        }
    }
    let mut offsets: Vec<u64> = (0..len).step_by(FULL_HASH_LIMIT as usize).collect();
    offsets.push(len - SAMPLE);
    for at in offsets {
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(at)).map_err(|e| Error::io(path, e))?;
        let n = (len - at).min(SAMPLE) as usize;
        file.read_exact(&mut buf[..n]).map_err(|e| Error::io(path, e))?;
        h.update(&buf[..n]);
    }
    Ok(())
}

/// The table key: the calibration algorithm's version, the resolved spec, its media files'
/// contents, and the checkpoint (resolved config, tokenizer, weight files).
pub fn key(ck: &Checkpoint, spec: &CalibSpec) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!("vl-export calibration format {FORMAT}\n"));
    h.update(spec.canonical());
    for m in spec.videos.iter().chain(&spec.images) {
        if let MediaSource::File(p) = m {
            hash_file(&mut h, p)?;
        }
    }
    h.update(format!("{:?}", ck.config));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&ck.dir)
        .map_err(|e| Error::io(&ck.dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.ends_with(".safetensors")
                || ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "added_tokens.json", "config.json"]
                    .contains(&name)
        })
        .collect();
    files.sort();
    for f in &files {
        hash_file(&mut h, f)?;
    }
    Ok(hex::encode(h.finalize()))
}

/// A calibration graph (a whole graph, or a block of one) and its session, in the scratch
/// directory until [`CalibGraph::close`] removes it.
struct CalibGraph {
    session: Session,
    taps: Vec<Tap>,
    stats: Vec<TapStats>,
    /// Its `.onnx` and `.onnx.data` files.
    files: [PathBuf; 2],
}

/// What is known of one recorded tensor.
struct TapStats {
    /// Per-channel maximum magnitude (pass 1).
    amax: Vec<f32>,
    /// SmoothQuant factors dividing its channels, if smoothed.
    factors: Option<Arc<[f32]>>,
    /// Histogram of the tensor as quantized (pass 2).
    hist: Option<Histogram>,
    /// Histogram of the unsmoothed tensor, when smoothed (pass 2).
    raw_hist: Option<Histogram>,
    /// `X^T X` for GPTQ (pass 1), when asked for; taken when its block closes.
    hessian: Option<Hessian>,
}

impl TapStats {
    /// A copy of the statistics that the table is made of (not the GPTQ Hessian).
    fn without_hessian(&self) -> TapStats {
        TapStats {
            amax: self.amax.clone(),
            factors: self.factors.clone(),
            hist: self.hist.clone(),
            raw_hist: self.raw_hist.clone(),
            hessian: None,
        }
    }

    fn amax(&self) -> f32 {
        self.amax.iter().copied().fold(0.0, f32::max)
    }

    fn smoothed_amax(&self) -> f32 {
        match &self.factors {
            Some(f) => self.amax.iter().zip(f.iter()).map(|(a, s)| a / s).fold(0.0, f32::max),
            None => self.amax(),
        }
    }

    /// Empty histograms over the range pass 1 found (before pass 2).
    fn start_histograms(&mut self) {
        self.hist = Some(Histogram::new(self.smoothed_amax()));
        if self.factors.is_some() {
            self.raw_hist = Some(Histogram::new(self.amax()));
        }
    }
}

fn ort<T>(r: std::result::Result<T, ort::Error>) -> Result<T> {
    r.map_err(|e| Error::Runtime(e.into()))
}

fn ort_opt(r: std::result::Result<SessionBuilder, ort::Error<SessionBuilder>>) -> Result<SessionBuilder> {
    r.map_err(ort::Error::from).map_err(|e| Error::Runtime(e.into()))
}

impl CalibGraph {
    /// Builds the fp32 graph that `build` describes, with taps, into `dir` as `name.onnx` and
    /// opens it. The session keeps no memory arena: a block's buffers go with it.
    fn new(
        name: &str,
        dir: &Path,
        threads: Option<usize>,
        taps: bool,
        build: impl FnOnce(&mut GraphBuilder) -> Result<()>,
    ) -> Result<Self> {
        let file = dir.join(format!("{name}.onnx"));
        let data_file = dir.join(format!("{name}.onnx.data"));
        let data = ExternalData::create(&data_file)?;
        let mut b = GraphBuilder::new(name, data);
        if taps {
            b.enable_taps();
        }
        build(&mut b)?;
        let done = b.finish(env!("CARGO_PKG_VERSION"))?;
        std::fs::write(&file, &done.model_bytes).map_err(|e| Error::io(&file, e))?;
        let env = vl_runtime::ort_env::environment()?;
        let mut builder = ort(Session::builder(env))?;
        builder = ort_opt(builder.with_optimization_level(GraphOptimizationLevel::Level3))?;
        builder = ort_opt(builder.with_memory_pattern(false))?;
        builder =
            ort_opt(builder.with_execution_providers([
                ep::CPU::default().with_arena_allocator(false).build().error_on_failure(),
            ]))?;
        if let Some(n) = threads {
            builder = ort_opt(builder.with_intra_threads(n))?;
        }
        let session = ort(builder.commit_from_file(&file))?;
        let stats = done
            .taps
            .iter()
            .map(|t| TapStats { amax: vec![0.0; t.channels], factors: None, hist: None, raw_hist: None, hessian: None })
            .collect();
        Ok(Self { session, taps: done.taps, stats, files: [file, data_file] })
    }

    /// Pass 1 asks for the per-channel maxima only (and the whole tensors whose Hessians are
    /// summed), pass 2 for the whole tensors only (ONNX Runtime then keeps nothing else), each
    /// with `output` when given.
    fn select(&self, pass: Pass, output: Option<&str>) -> Result<RunOptions<HasSelectedOutputs>> {
        let mut s = OutputSelector::no_default();
        for (t, st) in self.taps.iter().zip(&self.stats) {
            s = s.with(if pass == Pass::Max { t.amax_output.as_str() } else { t.output.as_str() });
            if pass == Pass::Max && st.hessian.is_some() {
                s = s.with(t.output.as_str());
            }
        }
        if let Some(o) = output {
            s = s.with(o);
        }
        Ok(ort(RunOptions::new())?.with_outputs(s))
    }

    /// Runs `inputs`, folds the taps into this pass's statistics, and returns `output` if asked.
    fn run(
        &mut self,
        inputs: Vec<(std::borrow::Cow<'_, str>, SessionInputValue<'_>)>,
        pass: Pass,
        output: Option<&str>,
    ) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let select = self.select(pass, output)?;
        let outputs = ort(self.session.run_with_options(inputs, &select))?;
        Observer { taps: &self.taps, stats: &mut self.stats }.observe(&outputs, pass)?;
        match output {
            Some(o) => {
                let (shape, values) = ort(outputs[o].try_extract_tensor::<f32>())?;
                Ok(Some((shape.iter().map(|&d| d as usize).collect(), values.to_vec())))
            }
            None => Ok(None),
        }
    }

    fn run_pixels<D: ndarray::Dimension + 'static>(
        &mut self,
        input: &str,
        output: &str,
        px: &ndarray::Array<f32, D>,
        pass: Pass,
    ) -> Result<Option<Array2<f32>>> {
        let value = ort(TensorRef::from_array_view(px.view()))?;
        let want = (pass == Pass::Max).then_some(output);
        match self.run(vec![(input.into(), value.into())], pass, want)? {
            Some((shape, values)) => {
                let a = ndarray::ArrayD::from_shape_vec(shape, values)
                    .map_err(|e| Error::Invalid(format!("{output}: {e}")))?;
                Ok(Some(features_2d(&a.view())?))
            }
            None => Ok(None),
        }
    }

    /// Runs `inputs` for `output` alone (no statistics are taken).
    fn output(
        &mut self,
        inputs: Vec<(std::borrow::Cow<'_, str>, SessionInputValue<'_>)>,
        output: &str,
    ) -> Result<Vec<f32>> {
        let select = ort(RunOptions::new())?.with_outputs(OutputSelector::no_default().with(output));
        let outputs = ort(self.session.run_with_options(inputs, &select))?;
        let (_, values) = ort(outputs[output].try_extract_tensor::<f32>())?;
        Ok(values.to_vec())
    }

    /// Closes the session and removes the graph's files; returns its taps and statistics.
    fn close(self) -> Result<(Vec<Tap>, Vec<TapStats>)> {
        drop(self.session);
        for f in &self.files {
            std::fs::remove_file(f).map_err(|e| Error::io(f, e))?;
        }
        Ok((self.taps, self.stats))
    }
}

/// Folds the recorded tensors of one run into the statistics of a pass (over the graph's
/// parts: the session stays borrowed by its outputs meanwhile).
struct Observer<'a> {
    taps: &'a [Tap],
    stats: &'a mut [TapStats],
}

impl Observer<'_> {
    fn observe(&mut self, outputs: &SessionOutputs<'_>, pass: Pass) -> Result<()> {
        for (tap, st) in self.taps.iter().zip(self.stats.iter_mut()) {
            let name = if pass == Pass::Max { &tap.amax_output } else { &tap.output };
            let (_, values) = ort(outputs[name.as_str()].try_extract_tensor::<f32>())?;
            if values.len() % tap.channels != 0 {
                return Err(Error::Invalid(format!(
                    "{}: {} values for {} channels",
                    tap.tensor,
                    values.len(),
                    tap.channels
                )));
            }
            match pass {
                Pass::Max => {
                    stats::channel_amax(values, tap.channels, &mut st.amax);
                    if let Some(h) = st.hessian.as_mut() {
                        let (_, x) = ort(outputs[tap.output.as_str()].try_extract_tensor::<f32>())?;
                        h.add(x)?;
                    }
                }
                Pass::Histogram => {
                    if let Some(h) = st.hist.as_mut() {
                        match st.factors.as_ref() {
                            Some(f) => h.add_scaled(values, f),
                            None => h.add(values),
                        }
                    }
                    if let Some(h) = st.raw_hist.as_mut() {
                        h.add(values);
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pass {
    Max,
    Histogram,
}

/// A language-model sample: which media's features, and the prompt.
struct Sample {
    ids: Vec<u32>,
    /// Index into the features list and the placeholder id, if the sample shows media.
    visual: Option<(usize, u32)>,
    /// Positions after the last visual token (whose logits, and lm_head inputs, are taken).
    keep: usize,
}

impl Sample {
    /// The hidden states entering the first layer, [n, hidden] row-major: the token
    /// embeddings, with the media's features at its placeholders.
    fn embeds(&self, embed: &[f32], hidden: usize, features: &[Array2<f32>]) -> Result<Vec<f32>> {
        let n = self.ids.len();
        let mut embeds = Array2::<f32>::zeros((n, hidden));
        for (row, &id) in self.ids.iter().enumerate() {
            let start = id as usize * hidden;
            let src = embed.get(start..start + hidden).ok_or_else(|| {
                Error::Invalid(format!("token id {id} is past the embedding table (calibration prompt)"))
            })?;
            embeds.row_mut(row).assign(&ndarray::ArrayView1::from(src));
        }
        if let Some((f, token)) = self.visual {
            let feats = &features[f];
            let slots = self.ids.iter().enumerate().filter(|(_, t)| **t == token).map(|(i, _)| i);
            for (row, pos) in feats.rows().into_iter().zip(slots) {
                embeds.row_mut(pos).assign(&row);
            }
        }
        Ok(embeds.into_raw_vec_and_offset().0)
    }

    /// Runs `g` (the decoder `part`) on this sample's hidden states `x`; returns the hidden
    /// states leaving it when `out` (and the block has no head).
    fn run(
        &self,
        g: &mut CalibGraph,
        t: &TextConfig,
        part: &Part,
        x: &[f32],
        pass: Pass,
        out: bool,
    ) -> Result<Option<Vec<f32>>> {
        let output = (out && !part.head).then_some("hidden_states");
        Ok(g.run(self.inputs(t, part, x)?, pass, output)?.map(|(_, v)| v))
    }

    /// The inputs of the decoder `part` for this sample's hidden states `x`.
    fn inputs<'a>(
        &self,
        t: &TextConfig,
        part: &Part,
        x: &'a [f32],
    ) -> Result<Vec<(std::borrow::Cow<'a, str>, SessionInputValue<'a>)>> {
        let n = self.ids.len();
        let mask = vec![1i64; n];
        let positions: Vec<i64> = (0..n as i64).collect();
        let keep = vec![self.keep as i64];
        let mut inputs: Vec<(std::borrow::Cow<'a, str>, SessionInputValue<'a>)> = vec![
            ("inputs_embeds".into(), ort(TensorRef::from_array_view(([1usize, n, t.hidden], x)))?.into()),
            ("attention_mask".into(), ort(Tensor::from_array(([1usize, n], mask)))?.into_dyn().into()),
            ("position_ids".into(), ort(Tensor::from_array(([1usize, n], positions)))?.into_dyn().into()),
        ];
        if part.head {
            inputs.push(("logits_to_keep".into(), ort(Tensor::from_array(([1usize], keep)))?.into_dyn().into()));
        }
        for layer in part.layers.clone() {
            for kv in ["key", "value"] {
                let empty = ort(Tensor::<f32>::from_array(([1usize, t.kv_heads, 0, t.head_dim], Vec::new())))?;
                inputs.push((format!("past_key_values.{layer}.{kv}").into(), empty.into_dyn().into()));
            }
        }
        Ok(inputs)
    }
}

fn progress(enabled: bool, len: u64) -> ProgressBar {
    if !enabled || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{spinner} calibration {msg} [{bar:30}] {pos}/{len} ({elapsed})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Pixel inputs of the calibration set.
struct Pixels {
    videos: Vec<Array5<f32>>,
    /// The spec's images, then the middle frame of each video.
    images: Vec<Array4<f32>>,
    /// How many of `images` are the spec's own (the rest are video frames).
    spec_images: usize,
}

fn pixels(spec: &CalibSpec, pre: &Preprocess, dir: &Path) -> Result<Pixels> {
    vl_runtime::video::ensure_ffmpeg().map_err(|e| Error::Runtime(e.into()))?;
    let (videos, images) = materialize(spec, dir)?;
    let mut out = Pixels { videos: Vec::new(), images: Vec::new(), spec_images: images.len() };
    let mut frames = Vec::new();
    for v in &videos {
        let sampled = load_video(v, FrameSampling::Uniform, pre.frames).map_err(|e| Error::Runtime(e.into()))?;
        out.videos.push(pre.recipe.video(&sampled.frames, &pre.image).map_err(|e| Error::Runtime(e.into()))?);
        let mid = sampled.frames.len() / 2;
        frames.push(pre.recipe.image(&sampled.frames[mid], &pre.image).map_err(|e| Error::Runtime(e.into()))?);
    }
    for i in &images {
        let img = load_image(i).map_err(|e| Error::Runtime(e.into()))?;
        out.images.push(pre.recipe.image(&img, &pre.image).map_err(|e| Error::Runtime(e.into()))?);
    }
    out.images.extend(frames);
    Ok(out)
}

/// The language-model samples: sample `i` shows media `i mod M` (videos, then the spec's
/// images) and asks prompt `i mod P`.
fn samples(
    spec: &CalibSpec,
    ck: &Checkpoint,
    media: &[(usize, bool)],
    features: &[Array2<f32>],
    template: &ChatTemplate,
    tokens: &SpecialTokens,
) -> Result<Vec<Sample>> {
    let tokenizer = ck.tokenizer_source()?.load()?;
    let builder = PromptBuilder::new(&tokenizer, template, tokens);
    let mut out = Vec::new();
    for i in 0..spec.samples {
        let (f, is_video) = media[i % media.len()];
        let rows = features[f].nrows();
        let (slot, token) = if is_video {
            (VisualSlot::Video { tokens: rows }, tokens.video)
        } else {
            (VisualSlot::Image { tokens: rows }, tokens.image)
        };
        let question = &spec.prompts[i % spec.prompts.len()];
        let ids = builder.first_turn(slot, question).map_err(Error::Runtime)?;
        let last_visual = ids.iter().rposition(|&t| t == token).unwrap_or(0);
        let keep = (ids.len() - last_visual - 1).max(1);
        if ids.len() > ck.config.text.max_positions {
            return Err(Error::Invalid(format!(
                "calibration sample {i} is {} tokens long, past the model's {} positions",
                ids.len(),
                ck.config.text.max_positions
            )));
        }
        out.push(Sample { ids, visual: Some((f, token)), keep });
    }
    for (i, text) in spec.texts.iter().enumerate() {
        let enc = tokenizer.encode(text.as_str(), true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(ck.config.text.max_positions);
        if ids.is_empty() {
            return Err(Error::Invalid(format!("calibration text {i} is empty")));
        }
        out.push(Sample { keep: ids.len(), ids, visual: None });
    }
    Ok(out)
}

/// Decoder layers per calibration block by default: one layer's weights at a time.
pub const DEFAULT_BLOCK_LAYERS: usize = 1;

/// What a calibration run measured of itself.
#[derive(Debug, Clone, Copy)]
pub struct CalibReport {
    /// Wall time.
    pub elapsed: Duration,
    /// Graphs built and run (whole vision graphs, decoder blocks).
    pub blocks: usize,
    /// Peak anonymous resident memory of the process while calibrating, in MB (Linux).
    pub peak_rss_anon_mb: Option<f64>,
    /// Peak bytes in the scratch directory (the current block's graph, spilled activations).
    pub peak_scratch_bytes: u64,
    /// Bytes of activations spilled to disk.
    pub spilled_bytes: u64,
}

impl std::fmt::Display for CalibReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "calibrated in {:.1} s ({} graphs", self.elapsed.as_secs_f64(), self.blocks)?;
        if let Some(mb) = self.peak_rss_anon_mb {
            write!(f, ", peak RssAnon {mb:.0} MB")?;
        }
        write!(f, ", peak scratch {:.0} MB", self.peak_scratch_bytes as f64 / 1e6)?;
        if self.spilled_bytes > 0 {
            write!(f, ", {:.0} MB of activations spilled", self.spilled_bytes as f64 / 1e6)?;
        }
        write!(f, ")")
    }
}

/// The statistics of the taps of one graph, in the graph's order.
struct GraphStats {
    kind: GraphKind,
    taps: Vec<(Tap, TapStats)>,
}

/// A decoder block's sensitivity and the weight names of its linears.
type ScannedBlock = (BlockSensitivity, Vec<String>);

/// The running calibration: its scratch directory and what it has measured.
struct Run<'a> {
    ck: &'a Checkpoint,
    spec: &'a CalibSpec,
    opts: &'a CalibOptions,
    dir: &'a Path,
    bar: ProgressBar,
    passes: Vec<Pass>,
    blocks: usize,
    peak_scratch: u64,
    spilled: u64,
    block_started: Instant,
    /// GPTQ's request and where its codes go.
    gptq: Option<(GptqRequest, &'a CodeDir)>,
}

impl Run<'_> {
    fn note_scratch(&mut self) {
        self.peak_scratch = self.peak_scratch.max(stream::dir_bytes(self.dir));
    }

    fn label(pass: Pass) -> &'static str {
        if pass == Pass::Max { "pass 1 (max)" } else { "pass 2 (histograms)" }
    }

    /// Opens the graph `build` describes, counting it.
    fn open(&mut self, name: &str, build: impl FnOnce(&mut GraphBuilder) -> Result<()>) -> Result<CalibGraph> {
        self.bar.set_message(format!("building {name}"));
        self.block_started = Instant::now();
        let mut g = CalibGraph::new(name, self.dir, self.opts.threads, true, build)?;
        if self.gptq.is_some() {
            for (t, st) in g.taps.iter().zip(g.stats.iter_mut()) {
                st.hessian = Some(Hessian::new(t.channels));
            }
        }
        self.blocks += 1;
        self.note_scratch();
        Ok(g)
    }

    /// Closes `g` (graph `graph`, or a block of it), quantizing its linears by GPTQ when asked,
    /// and says how long its block took when progress is shown without a bar.
    fn close(&mut self, graph: GraphKind, name: &str, g: CalibGraph) -> Result<(Vec<Tap>, Vec<TapStats>)> {
        let (taps, mut stats) = g.close()?;
        if let Some((req, dir)) = self.gptq {
            self.bar.set_message(format!("GPTQ: {name}"));
            let inputs: Vec<(&[String], Hessian)> = taps
                .iter()
                .zip(stats.iter_mut())
                .filter_map(|(t, st)| Some((t.consumers.as_slice(), st.hessian.take()?)))
                .collect();
            gptq_codes::quantize_block(self.ck, graph.name(), inputs, &head_name(self.ck), req, dir)?;
        }
        let closed = (taps, stats);
        if self.bar.is_hidden() && self.opts.progress {
            let anon = vl_runtime::memory::rss_anon_mb().map(|m| format!(", RssAnon {m:.0} MB")).unwrap_or_default();
            eprintln!("calibration: {name} in {:.1} s{anon}", self.block_started.elapsed().as_secs_f64());
        }
        Ok(closed)
    }

    /// Runs a vision graph (whole) over `pixels`, both passes; returns its statistics and the
    /// features of the first `keep` inputs.
    fn vision<D: ndarray::Dimension + 'static>(
        &mut self,
        kind: GraphKind,
        (input, output): (&str, &str),
        pixels: &[ndarray::Array<f32, D>],
        keep: usize,
    ) -> Result<(GraphStats, Vec<Array2<f32>>)> {
        let ck = self.ck;
        let mut g = self.open(kind.name(), |b| kind.build(b, ck, KvLayout::Concat))?;
        let mut features = Vec::new();
        for pass in self.passes.clone() {
            for (i, px) in pixels.iter().enumerate() {
                self.bar.set_message(format!("{}: {} input {}", Self::label(pass), kind.name(), i + 1));
                if let Some(f) = g.run_pixels(input, output, px, pass)?
                    && i < keep
                {
                    features.push(f);
                }
                self.bar.inc(1);
            }
            if pass == Pass::Max && self.passes.len() > 1 {
                g.stats.iter_mut().for_each(TapStats::start_histograms);
            }
        }
        let (taps, stats) = self.close(kind, kind.name(), g)?;
        Ok((GraphStats { kind, taps: taps.into_iter().zip(stats).collect() }, features))
    }

    /// Runs the language-model samples through the decoder block by block; returns the
    /// statistics of the whole decoder's taps in its order, and the sensitivity scan's
    /// measure of each block (when the spec asks for the scan).
    fn decoder(&mut self, samples: &[Sample], features: &[Array2<f32>]) -> Result<(GraphStats, Vec<ScannedBlock>)> {
        let (ck, t) = (self.ck, &self.ck.config.text);
        let budget = self.opts.memory_budget.unwrap_or(stream::DEFAULT_MEMORY_BUDGET);
        let scan = self.spec.keep_float_layers > 0;
        // The scan keeps each block's inputs too: the budget is shared by the two stores.
        let budget = if scan { budget / 2 } else { budget };
        let mut acts = stream::Activations::new(self.dir, samples.len(), budget);
        let mut block_in = scan.then(|| stream::Activations::new(self.dir, samples.len(), budget));
        let mut sensitivity = Vec::new();
        {
            let embed = ck.weights(&ck.roots.text_body).pp("embed_tokens").f32("weight", &[t.vocab, t.hidden])?;
            for (i, s) in samples.iter().enumerate() {
                acts.put(i, s.embeds(&embed, t.hidden, features)?)?;
            }
        }
        let per_block = self.opts.block_layers.unwrap_or(DEFAULT_BLOCK_LAYERS).max(1);
        let starts: Vec<usize> = (0..t.layers).step_by(per_block).collect();
        let mut found: HashMap<String, (Tap, TapStats)> = HashMap::new();
        for (n, &start) in starts.iter().enumerate() {
            let last = n + 1 == starts.len();
            let part = Part { layers: start..(start + per_block).min(t.layers), head: last };
            let name = format!("decoder-{}-{}", part.layers.start, part.layers.end);
            let mut g = self.open(&name, |b| decoder::build_calibration_block(b, ck, &part))?;
            for (p, &pass) in self.passes.clone().iter().enumerate() {
                let advance = p + 1 == self.passes.len();
                for (i, s) in samples.iter().enumerate() {
                    self.bar.set_message(format!(
                        "{}: layers {}..{} sample {} ({} tokens)",
                        Self::label(pass),
                        part.layers.start,
                        part.layers.end,
                        i + 1,
                        s.ids.len()
                    ));
                    let x = acts.take(i)?;
                    if let (true, Some(inputs)) = (advance, block_in.as_mut()) {
                        inputs.put(i, x.clone())?;
                    }
                    let next = s.run(&mut g, t, &part, &x, pass, advance)?;
                    acts.put(i, next.unwrap_or(x))?;
                    self.note_scratch();
                    self.bar.inc(1);
                }
                if pass == Pass::Max {
                    if self.spec.smoothquant {
                        smooth(ck, &g.taps, &mut g.stats, self.spec.alpha, self.spec.smooth_down_proj)?;
                    }
                    if self.passes.len() > 1 {
                        g.stats.iter_mut().for_each(TapStats::start_histograms);
                    }
                }
            }
            if let Some(inputs) = block_in.as_mut() {
                let error = self.block_error(&mut g, &part, samples, inputs, &mut acts)?;
                let linears = g.taps.iter().flat_map(|t| t.consumers.iter().cloned()).collect();
                let block = BlockSensitivity {
                    first_layer: part.layers.start,
                    end_layer: part.layers.end,
                    head: part.head,
                    error,
                    kept_float: false,
                };
                sensitivity.push((block, linears));
            }
            let (taps, stats) = self.close(GraphKind::Decoder, &name, g)?;
            for (tap, st) in taps.into_iter().zip(stats) {
                let first = tap.consumers.first().cloned().unwrap_or_default();
                found.insert(first, (tap, st));
            }
        }
        self.spilled = acts.spilled() + block_in.as_ref().map_or(0, stream::Activations::spilled);
        // The taps as the whole decoder names them (its structure alone, built without weights).
        let skeleton = self.dir.join("decoder-skeleton.onnx.data");
        let mut b = GraphBuilder::new("decoder", ExternalData::create(&skeleton)?);
        b.enable_taps();
        b.set_skeleton();
        decoder::build(&mut b, ck, KvLayout::Concat)?;
        let whole = b.finish(env!("CARGO_PKG_VERSION"))?;
        std::fs::remove_file(&skeleton).map_err(|e| Error::io(&skeleton, e))?;
        let mut taps = Vec::new();
        for tap in whole.taps {
            let first = tap.consumers.first().cloned().unwrap_or_default();
            let (block_tap, st) = found.remove(&first).ok_or_else(|| {
                Error::Invalid(format!("calibration: no decoder block recorded the input of {first}"))
            })?;
            if block_tap.consumers != tap.consumers
                || block_tap.channels != tap.channels
                || block_tap.source != tap.source
            {
                return Err(Error::Invalid(format!(
                    "calibration: the input of {first} differs between the decoder and its block ({:?} vs {:?})",
                    tap.consumers, block_tap.consumers
                )));
            }
            taps.push((tap, st));
        }
        if let Some(extra) = found.keys().next() {
            return Err(Error::Invalid(format!("calibration: {extra} is in a decoder block but not in the decoder")));
        }
        Ok((GraphStats { kind: GraphKind::Decoder, taps }, sensitivity))
    }

    /// The sensitivity of block `g` (see [`sensitivity`]): the block built again with its
    /// linears in int8 as the statistics so far say, run on the inputs its fp32 run had
    /// (`inputs`), against its fp32 outputs (`acts`, or the logits of `g` for the head block).
    fn block_error(
        &mut self,
        g: &mut CalibGraph,
        part: &Part,
        samples: &[Sample],
        inputs: &mut stream::Activations,
        acts: &mut stream::Activations,
    ) -> Result<f64> {
        let (ck, t) = (self.ck, &self.ck.config.text);
        let taps = g.taps.iter().cloned().zip(g.stats.iter().map(TapStats::without_hessian)).collect();
        let block = GraphStats { kind: GraphKind::Decoder, taps };
        let params = Arc::new(table_of(ck, self.spec, String::new(), &[block], &[]).params("decoder", true));
        let name = format!("decoder-{}-{}-int8", part.layers.start, part.layers.end);
        self.bar.set_message(format!("sensitivity: {name}"));
        let mut q = CalibGraph::new(&name, self.dir, self.opts.threads, false, |b| {
            b.set_numerics(Numerics { act: DType::F32, weights: WeightFormat::Int8Qdq { unsigned_act: true } });
            b.set_quant(params);
            decoder::build_calibration_block(b, ck, part)
        })?;
        self.note_scratch();
        let (output, width) = if part.head { ("logits", t.vocab) } else { ("hidden_states", t.hidden) };
        let (mut sum, mut rows) = (0.0, 0);
        for (i, s) in samples.iter().enumerate() {
            let x = inputs.take(i)?;
            let reference = if part.head {
                g.output(s.inputs(t, part, &x)?, output)?
            } else {
                let r = acts.take(i)?;
                acts.put(i, r.clone())?;
                r
            };
            let quantized = q.output(s.inputs(t, part, &x)?, output)?;
            let (e, n) = sensitivity::relative_error(&reference, &quantized, width);
            sum += e;
            rows += n;
        }
        q.close()?;
        Ok(sum / rows.max(1) as f64)
    }
}

/// Runs the calibration and returns the table and what the run measured.
fn run(
    ck: &Checkpoint,
    spec: &CalibSpec,
    key: String,
    opts: &CalibOptions,
    gptq: Option<(GptqRequest, &CodeDir)>,
) -> Result<(QuantTable, CalibReport)> {
    let started = Instant::now();
    let sampler = stream::AnonSampler::start();
    let scratch = std::env::temp_dir();
    staging::clean_stale(&scratch, staging::CALIB_PREFIX)?;
    let work = staging::Staging::scratch(&scratch, staging::CALIB_PREFIX)?;
    let MediaContract { preprocess: pre, chat_template: template, tokens, .. } =
        MediaContract::of(ck, &mut Vec::new())?;
    let px = pixels(spec, &pre, work.path())?;
    let passes: Vec<Pass> =
        if spec.method.needs_histogram() { vec![Pass::Max, Pass::Histogram] } else { vec![Pass::Max] };
    let per_block = opts.block_layers.unwrap_or(DEFAULT_BLOCK_LAYERS).max(1);
    let lm_items = (spec.samples + spec.texts.len()) * ck.config.text.layers.div_ceil(per_block);
    let per_pass = px.videos.len() + px.images.len() + lm_items;
    let bar = progress(opts.progress, (passes.len() * per_pass) as u64);
    if bar.is_hidden() && opts.progress {
        eprintln!(
            "calibration ({}): {} videos, {} images, {} samples, {} texts ({}), decoder {} layer(s) at a time",
            passes.iter().map(|p| Run::label(*p)).collect::<Vec<_>>().join(", "),
            px.videos.len(),
            px.images.len(),
            spec.samples,
            spec.texts.len(),
            spec.origin,
            per_block
        );
    }
    let mut r = Run {
        ck,
        spec,
        opts,
        dir: work.path(),
        bar,
        passes,
        blocks: 0,
        peak_scratch: 0,
        spilled: 0,
        block_started: Instant::now(),
        gptq,
    };
    r.note_scratch();
    let (vision, videos) =
        r.vision(GraphKind::Vision, ("pixel_values_videos", "video_features"), &px.videos, px.videos.len())?;
    let (image, images) = r.vision(GraphKind::Image, ("pixel_values", "image_features"), &px.images, px.spec_images)?;
    let mut media: Vec<(usize, bool)> = (0..videos.len()).map(|i| (i, true)).collect();
    media.extend((0..images.len()).map(|i| (videos.len() + i, false)));
    let features: Vec<Array2<f32>> = videos.into_iter().chain(images).collect();
    let list = samples(spec, ck, &media, &features, &template, &tokens)?;
    let (decoder, mut scanned) = r.decoder(&list, &features)?;
    let mut blocks: Vec<BlockSensitivity> = scanned.iter().map(|(b, _)| b.clone()).collect();
    sensitivity::keep_most_sensitive(&mut blocks, spec.keep_float_layers);
    for ((b, _), kept) in scanned.iter_mut().zip(&blocks) {
        b.kept_float = kept.kept_float;
    }
    r.bar.finish_and_clear();
    let report = CalibReport {
        elapsed: started.elapsed(),
        blocks: r.blocks,
        peak_rss_anon_mb: sampler.peak_mb(),
        peak_scratch_bytes: r.peak_scratch,
        spilled_bytes: r.spilled,
    };
    Ok((table_of(ck, spec, key, &[vision, image, decoder], &scanned), report))
}

/// The table of the statistics `graphs` hold, with the sensitivity scan's blocks (and the
/// linears of each).
fn table_of(
    ck: &Checkpoint,
    spec: &CalibSpec,
    key: String,
    graphs: &[GraphStats],
    scanned: &[ScannedBlock],
) -> QuantTable {
    let kept: HashSet<&String> =
        scanned.iter().filter(|(b, _)| b.kept_float).flat_map(|(_, linears)| linears.iter()).collect();
    let mut tensors = Vec::new();
    let mut smoothing = Vec::new();
    for g in graphs {
        for (tap, st) in &g.taps {
            let amax = st.smoothed_amax();
            let range = table::range(amax, stats::threshold(spec.method, amax, st.hist.as_ref()));
            let unsmoothed = st.factors.as_ref().map(|_| {
                let raw = st.amax();
                table::range(raw, stats::threshold(spec.method, raw, st.raw_hist.as_ref()))
            });
            if let (Some(f), Some(source)) = (&st.factors, &tap.source) {
                let (kind, divided) = match source {
                    SmoothSource::Norm(n) => (FoldKind::Norm, n.clone()),
                    SmoothSource::Rows(w) => (FoldKind::Rows, w.clone()),
                };
                smoothing.push(SmoothEntry {
                    graph: g.kind.name().into(),
                    kind,
                    divided,
                    linears: tap.consumers.clone(),
                    factors: f.to_vec(),
                });
            }
            tensors.push(TensorEntry {
                graph: g.kind.name().into(),
                tensor: tap.tensor.clone(),
                consumers: tap.consumers.clone(),
                channels: tap.channels,
                range,
                unsmoothed,
            });
        }
    }
    QuantTable {
        format: FORMAT,
        key,
        spec: spec.origin.clone(),
        checkpoint: ck.dir.display().to_string(),
        method: spec.method.label(),
        smoothquant_alpha: if spec.smoothquant { spec.alpha } else { 0.0 },
        samples: spec.samples,
        trt_version: spec.trt_version,
        excluded: tensors
            .iter()
            .flat_map(|t: &TensorEntry| &t.consumers)
            .filter(|c| excluded(ck, &spec.exclude, c) || kept.contains(c))
            .cloned()
            .collect(),
        sensitivity: scanned.iter().map(|(b, _)| b.clone()).collect(),
        tensors,
        smoothing,
    }
}

/// Whether the linear with weight `name` stays in float: its name contains one of
/// `patterns`, or it is the output head and `lm_head` is one of them (a head tied to the
/// embeddings is named after them).
fn excluded(ck: &Checkpoint, patterns: &[String], name: &str) -> bool {
    let head = head_name(ck);
    patterns.iter().any(|p| name.contains(p.as_str()) || (p == "lm_head" && name == head))
}

/// The output head's weight name (the embeddings' when tied).
fn head_name(ck: &Checkpoint) -> String {
    if ck.roots.lm_head.is_empty() {
        format!("{}embed_tokens.weight", ck.roots.text_body)
    } else {
        format!("{}weight", ck.roots.lm_head)
    }
}

/// SmoothQuant factors for every decoder tensor an RMSNorm produced (and `silu(gate) * up`
/// when `mlp_down`), from pass 1's maxima and the weights of the linears that read it.
fn smooth(ck: &Checkpoint, taps: &[Tap], stats: &mut [TapStats], alpha: f32, mlp_down: bool) -> Result<()> {
    for (tap, st) in taps.iter().zip(stats.iter_mut()) {
        match &tap.source {
            Some(SmoothSource::Norm(_)) => {}
            Some(SmoothSource::Rows(_)) if mlp_down => {}
            _ => continue,
        }
        let mut wmax = vec![0f32; tap.channels];
        for c in &tap.consumers {
            let shape = ck
                .store
                .shape(c)
                .ok_or_else(|| Error::MissingTensor { name: c.clone(), dir: ck.dir.clone() })?
                .to_vec();
            smooth::column_amax(&ck.store.f32(c, &shape)?, tap.channels, &mut wmax);
        }
        st.factors = Some(smooth::factors(&st.amax, &wmax, alpha).into());
    }
    Ok(())
}
