//! Calibration: the fp32 graphs, built with every linear's input as an extra output, run in
//! ONNX Runtime over the calibration set.
//!
//! - Pass 1 takes the per-channel maximum magnitude of every recorded tensor. SmoothQuant
//!   factors follow from it for the language model's linears that read an RMSNorm's output.
//! - Pass 2 (percentile and entropy methods) fills a 2048-bin histogram of magnitudes per
//!   tensor over the range pass 1 found. Smoothing divides a tensor's channels by its factors
//!   and changes nothing else in the graph (the linears' outputs are the same), so pass 2 runs
//!   the same graphs and divides the recorded values itself, which is exact.
//!
//! The result is keyed by a hash of the spec, its media and the checkpoint, and saved as JSON
//! and TensorRT caches; a later build with the same key reuses it.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, Array3, Array4, Array5};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session, SessionInputValue, SessionOutputs};
use ort::value::{Tensor, TensorRef};
use sha2::{Digest, Sha256};
use vl_runtime::generate::features_2d;
use vl_runtime::manifest::{ChatTemplate, KvLayout, Preprocess, SpecialTokens};
use vl_runtime::prompt::{PromptBuilder, VisualSlot};
use vl_runtime::video::{FrameSampling, load_image, load_video};

use super::calib::{CalibSpec, MediaSource, check_alpha, materialize};
use super::smooth;
use super::stats::{self, Histogram, Method};
use super::table::{self, FORMAT, FoldKind, QuantTable, SmoothEntry, TensorEntry};
use crate::checkpoint::Checkpoint;
use crate::contract::MediaContract;
use crate::error::{Error, Result};
use crate::graphs::GraphKind;
use crate::onnx::{ExternalData, GraphBuilder, SmoothSource, Tap};
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
    if let Ok(table) = QuantTable::load(&path)
        && table.format == FORMAT
        && table.key == key
        && table.check().is_ok()
    {
        write_caches(&table, &trt_caches)?;
        return Ok(Calibration { table, path, trt_caches, reused: true });
    }
    let table = run(ck, &spec, key, opts)?;
    table.check()?;
    table.save(&path)?;
    write_caches(&table, &trt_caches)?;
    Ok(Calibration { table, path, trt_caches, reused: false })
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

/// A calibration graph and its session.
struct CalibGraph {
    kind: GraphKind,
    session: Session,
    taps: Vec<Tap>,
    stats: Vec<TapStats>,
    /// Pass 1 asks for the per-channel maxima (and the graph's features output) only, pass 2
    /// for the whole tensors only: ONNX Runtime then keeps nothing else.
    select_max: RunOptions<HasSelectedOutputs>,
    select_full: RunOptions<HasSelectedOutputs>,
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
}

impl TapStats {
    fn amax(&self) -> f32 {
        self.amax.iter().copied().fold(0.0, f32::max)
    }

    fn smoothed_amax(&self) -> f32 {
        match &self.factors {
            Some(f) => self.amax.iter().zip(f.iter()).map(|(a, s)| a / s).fold(0.0, f32::max),
            None => self.amax(),
        }
    }
}

fn ort<T>(r: std::result::Result<T, ort::Error>) -> Result<T> {
    r.map_err(|e| Error::Runtime(e.into()))
}

impl CalibGraph {
    /// Builds the fp32 graph of `kind` with taps into `dir` and opens it.
    fn new(kind: GraphKind, ck: &Checkpoint, dir: &Path, threads: Option<usize>) -> Result<Self> {
        let file = dir.join(format!("{}.onnx", kind.name()));
        let data = ExternalData::create(&dir.join(format!("{}.onnx.data", kind.name())))?;
        let mut b = GraphBuilder::new(kind.name(), data);
        b.enable_taps();
        // Calibration runs the standard decoder: its taps see every activation.
        kind.build(&mut b, ck, KvLayout::Concat)?;
        let done = b.finish(env!("CARGO_PKG_VERSION"))?;
        std::fs::write(&file, &done.model_bytes).map_err(|e| Error::io(&file, e))?;
        let env = vl_runtime::ort_env::environment()?;
        let mut builder = ort(Session::builder(env))?;
        builder = builder
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(ort::Error::from)
            .map_err(|e| Error::Runtime(e.into()))?;
        if let Some(n) = threads {
            builder = builder.with_intra_threads(n).map_err(ort::Error::from).map_err(|e| Error::Runtime(e.into()))?;
        }
        let session = ort(builder.commit_from_file(&file))?;
        let stats = done
            .taps
            .iter()
            .map(|t| TapStats { amax: vec![0.0; t.channels], factors: None, hist: None, raw_hist: None })
            .collect();
        let mut max = OutputSelector::no_default();
        let mut full = OutputSelector::no_default();
        for t in &done.taps {
            max = max.with(t.amax_output.as_str());
            full = full.with(t.output.as_str());
        }
        for o in done.outputs.iter().filter(|o| o.name.ends_with("_features")) {
            max = max.with(o.name.as_str());
        }
        let select_max = ort(RunOptions::new())?.with_outputs(max);
        let select_full = ort(RunOptions::new())?.with_outputs(full);
        Ok(Self { kind, session, taps: done.taps, stats, select_max, select_full })
    }

    fn run_pixels<D: ndarray::Dimension + 'static>(
        &mut self,
        input: &str,
        output: &str,
        px: &ndarray::Array<f32, D>,
        pass: Pass,
    ) -> Result<Option<Array2<f32>>> {
        let value = ort(TensorRef::from_array_view(px.view()))?;
        let select = if pass == Pass::Max { &self.select_max } else { &self.select_full };
        let outputs = ort(self.session.run_with_options(ort::inputs![input => value], select))?;
        Observer { taps: &self.taps, stats: &mut self.stats }.observe(&outputs, pass)?;
        match pass {
            Pass::Max => Ok(Some(features_2d(&ort(outputs[output].try_extract_array::<f32>())?)?)),
            Pass::Histogram => Ok(None),
        }
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
                Pass::Max => stats::channel_amax(values, tap.channels, &mut st.amax),
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

#[derive(Clone, Copy, PartialEq, Eq)]
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

/// Everything the language-model samples need.
struct Lm<'a> {
    embed: &'a [f32],
    hidden: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    features: &'a [Array2<f32>],
}

impl Lm<'_> {
    fn run(&self, g: &mut CalibGraph, s: &Sample, pass: Pass) -> Result<()> {
        let n = s.ids.len();
        let mut embeds = Array3::<f32>::zeros((1, n, self.hidden));
        for (row, &id) in s.ids.iter().enumerate() {
            let start = id as usize * self.hidden;
            let src = self.embed.get(start..start + self.hidden).ok_or_else(|| {
                Error::Invalid(format!("token id {id} is past the embedding table (calibration prompt)"))
            })?;
            embeds.slice_mut(ndarray::s![0, row, ..]).assign(&ndarray::ArrayView1::from(src));
        }
        if let Some((f, token)) = s.visual {
            let feats = &self.features[f];
            let slots = s.ids.iter().enumerate().filter(|(_, t)| **t == token).map(|(i, _)| i);
            for (row, pos) in feats.rows().into_iter().zip(slots) {
                embeds.slice_mut(ndarray::s![0, pos, ..]).assign(&row);
            }
        }
        let mask = vec![1i64; n];
        let positions: Vec<i64> = (0..n as i64).collect();
        let keep = [s.keep as i64];
        let mut inputs: Vec<(std::borrow::Cow<'_, str>, SessionInputValue<'_>)> = vec![
            ("inputs_embeds".into(), ort(TensorRef::from_array_view(&embeds))?.into()),
            ("attention_mask".into(), ort(TensorRef::from_array_view(([1usize, n], mask.as_slice())))?.into()),
            ("position_ids".into(), ort(TensorRef::from_array_view(([1usize, n], positions.as_slice())))?.into()),
            ("logits_to_keep".into(), ort(TensorRef::from_array_view(([1usize], &keep[..])))?.into()),
        ];
        for layer in 0..self.layers {
            for part in ["key", "value"] {
                let empty = ort(Tensor::<f32>::from_array(([1usize, self.kv_heads, 0, self.head_dim], Vec::new())))?;
                inputs.push((format!("past_key_values.{layer}.{part}").into(), empty.into_dyn().into()));
            }
        }
        let select = if pass == Pass::Max { &g.select_max } else { &g.select_full };
        let outputs = ort(g.session.run_with_options(inputs, select))?;
        let mut o = Observer { taps: &g.taps, stats: &mut g.stats };
        o.observe(&outputs, pass)
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

/// Runs the calibration and returns the table.
fn run(ck: &Checkpoint, spec: &CalibSpec, key: String, opts: &CalibOptions) -> Result<QuantTable> {
    let scratch = std::env::temp_dir();
    staging::clean_stale(&scratch, staging::CALIB_PREFIX)?;
    let work = tempfile::Builder::new()
        .prefix(staging::CALIB_PREFIX)
        .tempdir_in(&scratch)
        .map_err(|e| Error::io(&scratch, e))?;
    let _claim = staging::claim(work.path(), Path::new(""))?;
    let MediaContract { preprocess: pre, chat_template: template, tokens, .. } =
        MediaContract::of(ck, &mut Vec::new())?;
    let px = pixels(spec, &pre, work.path())?;
    let passes: u64 = if spec.method.needs_histogram() { 2 } else { 1 };
    let per_pass = (px.videos.len() + px.images.len() + spec.samples + spec.texts.len()) as u64;
    let bar = progress(opts.progress, passes * per_pass + 3);
    let mut graphs = Vec::new();
    for kind in GRAPHS {
        bar.set_message(format!("building {}.onnx", kind.name()));
        graphs.push(CalibGraph::new(kind, ck, work.path(), opts.threads)?);
        bar.inc(1);
    }
    let [vision, image, decoder]: &mut [CalibGraph; 3] =
        (&mut graphs[..]).try_into().map_err(|_| Error::Invalid("graph count".into()))?;
    let t = &ck.config.text;
    let embed = ck.weights(&ck.roots.text_body).pp("embed_tokens").f32("weight", &[t.vocab, t.hidden])?;
    let mut features = Vec::new();
    let mut media = Vec::new();
    for pass in [Pass::Max, Pass::Histogram].into_iter().take(passes as usize) {
        let label = if pass == Pass::Max { "pass 1 (max)" } else { "pass 2 (histograms)" };
        if bar.is_hidden() && opts.progress {
            eprintln!(
                "calibration {label}: {} videos, {} images, {} samples, {} texts ({})",
                px.videos.len(),
                px.images.len(),
                spec.samples,
                spec.texts.len(),
                spec.origin
            );
        }
        for (i, v) in px.videos.iter().enumerate() {
            bar.set_message(format!("{label}: video {}", i + 1));
            if let Some(f) = vision.run_pixels("pixel_values_videos", "video_features", v, pass)? {
                media.push((features.len(), true));
                features.push(f);
            }
            bar.inc(1);
        }
        for (i, im) in px.images.iter().enumerate() {
            bar.set_message(format!("{label}: image {}", i + 1));
            if let Some(f) = image.run_pixels("pixel_values", "image_features", im, pass)?
                && i < px.spec_images
            {
                media.push((features.len(), false));
                features.push(f);
            }
            bar.inc(1);
        }
        let lm = Lm {
            embed: &embed,
            hidden: t.hidden,
            layers: t.layers,
            kv_heads: t.kv_heads,
            head_dim: t.head_dim,
            features: &features,
        };
        let list = samples(spec, ck, &media, &features, &template, &tokens)?;
        for (i, s) in list.iter().enumerate() {
            bar.set_message(format!("{label}: sample {} ({} tokens)", i + 1, s.ids.len()));
            lm.run(decoder, s, pass)?;
            bar.inc(1);
        }
        if pass == Pass::Max {
            if spec.smoothquant {
                smooth_decoder(ck, decoder, spec.alpha, spec.smooth_down_proj)?;
            }
            if spec.method.needs_histogram() {
                for g in [&mut *vision, &mut *image, &mut *decoder] {
                    for st in &mut g.stats {
                        st.hist = Some(Histogram::new(st.smoothed_amax()));
                        if st.factors.is_some() {
                            st.raw_hist = Some(Histogram::new(st.amax()));
                        }
                    }
                }
            }
        }
    }
    bar.finish_and_clear();
    let mut tensors = Vec::new();
    let mut smoothing = Vec::new();
    for g in [&*vision, &*image, &*decoder] {
        for (tap, st) in g.taps.iter().zip(&g.stats) {
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
    Ok(QuantTable {
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
            .filter(|c| excluded(ck, &spec.exclude, c))
            .cloned()
            .collect(),
        tensors,
        smoothing,
    })
}

/// Whether the linear with weight `name` stays in float: its name contains one of
/// `patterns`, or it is the output head and `lm_head` is one of them (a head tied to the
/// embeddings is named after them).
fn excluded(ck: &Checkpoint, patterns: &[String], name: &str) -> bool {
    let head = if ck.roots.lm_head.is_empty() {
        format!("{}embed_tokens.weight", ck.roots.text_body)
    } else {
        format!("{}weight", ck.roots.lm_head)
    };
    patterns.iter().any(|p| name.contains(p.as_str()) || (p == "lm_head" && name == head))
}

/// SmoothQuant factors for every decoder tensor an RMSNorm produced, from pass 1's maxima and
/// the weights of the linears that read it.
fn smooth_decoder(ck: &Checkpoint, g: &mut CalibGraph, alpha: f32, mlp_down: bool) -> Result<()> {
    for (tap, st) in g.taps.iter().zip(g.stats.iter_mut()) {
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
