//! One loaded engine directory: manifest, tokenizer, sessions (checked against the manifest)
//! and the visual feature cache. The serving engine and [`crate::Pipeline`] are built on it.
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use ndarray::{Array4, Array5};
use ort::memory::MemoryInfo;
use ort::value::Tensor;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::features::{Features, device_memory};
use crate::generate::{LanguageModel, ms};
use crate::graph::Graph;
use crate::graph::SessionOptions;
use crate::kv_cache;
use crate::manifest::{FrameSamplingRule, KvLayout, MANIFEST_FILE, Manifest, PlaceholderStyle};
use crate::preprocess::load_pixel_values_npy;
use crate::prompt::VisualSlot;
use crate::verify::{Verify, verify_engine};
use crate::video::{DecodeOptions, FrameSampling, load_image_with, load_video_with};

/// How to load an engine directory.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Sessions: device, threads, arena.
    pub session: SessionOptions,
    /// How to check the graph files against the manifest.
    pub verify: Verify,
    /// Visual features kept for reuse (by content), across conversations.
    pub feature_cache_entries: usize,
    /// Which decoder graph to run.
    pub decoder: DecoderChoice,
    /// How video and image files are decoded: ffmpeg's time limit, the largest frame.
    pub decode: DecodeOptions,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            session: SessionOptions::default(),
            verify: Verify::Cached,
            feature_cache_entries: 8,
            decoder: DecoderChoice::Auto,
            decode: DecodeOptions::default(),
        }
    }
}

/// Which of an engine's decoder graphs to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DecoderChoice {
    /// The in-place decoder (`decoder_in_place.onnx`: KV slots, batched decode steps) where
    /// the engine has one and the device runs ONNX Runtime's kernels (CPU, CUDA); the
    /// standard-operator `decoder.onnx` under TensorRT or when it is the only one.
    #[default]
    Auto,
    /// `decoder.onnx` (and an int8 engine's `vision.onnx` and `image.onnx`, not their
    /// uint8-activation twins), whatever the device: the graphs TensorRT runs.
    Standard,
    /// `decoder_in_place.onnx`; an error for an engine without one.
    InPlace,
}

/// Points `manifest.graphs.decoder` and `model.kv_layout` at the decoder `choice` picks for
/// `device`, so everything downstream reads one decoder from the manifest.
fn pick_decoder(dir: &Path, manifest: &mut Manifest, choice: DecoderChoice, device: &Device) -> Result<()> {
    let Some(in_place) = manifest.graphs.decoder_in_place.clone() else {
        if choice == DecoderChoice::InPlace {
            return Err(Error::Manifest {
                path: dir.join(MANIFEST_FILE),
                message: "the engine has no in-place decoder (decoder_in_place); re-export it with this toolkit".into(),
            });
        }
        return Ok(());
    };
    let take = match choice {
        DecoderChoice::Auto => !device.is_tensorrt(),
        DecoderChoice::Standard => false,
        DecoderChoice::InPlace => true,
    };
    if take {
        manifest.graphs.decoder = in_place;
        manifest.model.kv_layout = KvLayout::SharedBuffer;
    }
    Ok(())
}

/// Points `manifest.graphs.vision` and `image` at an int8 engine's uint8-activation twins
/// where ONNX Runtime's own kernels run them (every device but TensorRT), unless `choice`
/// asks for the standard graphs.
fn pick_vision(manifest: &mut Manifest, choice: DecoderChoice, device: &Device) {
    if choice == DecoderChoice::Standard || device.is_tensorrt() {
        return;
    }
    let g = &mut manifest.graphs;
    if let Some(v) = g.vision_uint8.clone() {
        g.vision = v;
    }
    if let Some(i) = g.image_uint8.clone() {
        g.image = i;
    }
}

/// What a conversation is about.
#[derive(Debug, Clone)]
pub enum Media {
    /// A video file, decoded and sampled per the manifest.
    VideoFile(PathBuf),
    /// An image file.
    ImageFile(PathBuf),
    /// Preprocessed video pixels `[1, frames, 3, H, W]`.
    VideoPixels(Arc<Array5<f32>>),
    /// Preprocessed image pixels `[1, 3, H, W]`.
    ImagePixels(Arc<Array4<f32>>),
    /// A `.npy` of video pixel values (`[F, 3, H, W]` or `[1, F, 3, H, W]`).
    PixelValuesFile(PathBuf),
    /// No visual input.
    Text,
}

/// Visual features ready to splice, with how they were obtained.
#[derive(Debug, Clone)]
pub struct Visual {
    /// `[tokens, hidden]`, where the vision graph left them (device memory on a GPU).
    pub features: Arc<Features>,
    /// Whether the features are a video's (else an image's).
    pub is_video: bool,
    /// Decode + preprocessing time.
    pub preprocess_ms: f64,
    /// Vision graph time (0 when cached).
    pub vision_ms: f64,
}

type FeatureCache = Mutex<VecDeque<([u8; 32], Arc<Features>)>>;

/// The loaded graphs, tokenizer and feature cache of one engine directory, shared (in an `Arc`)
/// by the serving engine's threads and the callers that drive the decoder themselves.
pub struct Model {
    dir: PathBuf,
    manifest: Manifest,
    tokenizer: Tokenizer,
    options: ModelOptions,
    device: crate::device::Resolved,
    vision: Graph,
    image: OnceLock<Graph>,
    embed: Graph,
    decoder: Graph,
    mask_ones: Vec<i64>,
    /// Where values passed between graphs stay (the device's memory).
    memory: MemoryInfo<'static>,
    /// `embed.onnx`'s `visual_features` for calls without visual rows.
    no_features: Tensor<f32>,
    cache: FeatureCache,
}

/// With one placeholder per visual token, each placeholder must be a single token of the
/// manifest's id: otherwise prompts would carry no (or misplaced) visual positions.
/// They must also stay one id each when repeated; the exporter runs this check too, so a bad
/// tokenizer fails the export rather than the first video.
pub fn check_placeholders(tokenizer: &Tokenizer, manifest: &Manifest, tok_path: &Path) -> Result<()> {
    let t = &manifest.chat_template;
    if t.placeholders != PlaceholderStyle::RepeatPerToken {
        return Ok(());
    }
    let (video, image) = (manifest.tokens.video, manifest.tokens.image);
    for (placeholder, id, field) in [(&t.video_placeholder, video, "video"), (&t.image_placeholder, image, "image")] {
        let found = tokenizer.token_to_id(placeholder);
        if found != Some(id) {
            let found = found.map_or_else(|| "is not one of its tokens".to_string(), |f| format!("is token {f}"));
            return Err(Error::Tokenizer(format!(
                "{}: the {field} placeholder {placeholder} {found}, but manifest.yaml's tokens.{field} is {id}",
                tok_path.display()
            )));
        }
        // The prompt repeats the placeholder once per visual token, so repeated placeholders
        // must tokenize to one id each. A placeholder added as a normalized, non-special token
        // does not (the normalizer's prefix glues to the first copy only): refuse at load, not
        // at the first video.
        let repeated = tokenizer
            .encode(format!("A {placeholder}{placeholder}{placeholder} B").as_str(), false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let count = repeated.get_ids().iter().filter(|&&i| i == id).count();
        if count != 3 {
            return Err(Error::Tokenizer(format!(
                "{}: three {placeholder} in a row tokenize to {count} placeholder ids, not 3: the prompt's repeated \
                 {field} placeholders would not each become one id (make {placeholder} a special, non-normalized \
                 added token, as the published checkpoint's tokenizer has it)",
                tok_path.display()
            )));
        }
    }
    Ok(())
}

impl Model {
    /// Loads the engine in `dir`: manifest, file checks, tokenizer, sessions (checked against
    /// the manifest). The image graph is loaded on first use.
    pub fn load(dir: impl AsRef<Path>, options: ModelOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let mut manifest = Manifest::load(&dir)?;
        verify_engine(&dir, &manifest, options.verify)?;
        let resolved = options.session.device.resolve(&crate::ort_env::library_path()?)?;
        let mut options = options;
        options.session.device = resolved.device;
        pick_decoder(&dir, &mut manifest, options.decoder, &options.session.device)?;
        pick_vision(&mut manifest, options.decoder, &options.session.device);
        let tok_path = dir.join(&manifest.tokenizer);
        let tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        check_placeholders(&tokenizer, &manifest, &tok_path)?;
        let g = &manifest.graphs;
        let vision = Graph::load(&dir, "vision", &g.vision, &options.session, &manifest)?;
        let embed = Graph::load(&dir, "embed", &g.embed, &options.session, &manifest)?;
        let decoder = Graph::load(&dir, "decoder", &g.decoder, &options.session, &manifest)?;
        // The KV cache mode (concatenated or shared buffers) comes from the manifest; its
        // interface is checked here, once the graph has been checked against the manifest.
        kv_cache::check_decoder(&dir, &manifest)?;
        let mask_ones = vec![1i64; manifest.max_sequence_length];
        let memory = device_memory(&options.session.device)?;
        let no_features = Tensor::from_array(([1usize, 0, manifest.model.text_hidden], Vec::<f32>::new()))?;
        Ok(Self {
            dir,
            manifest,
            tokenizer,
            options,
            device: resolved,
            vision,
            image: OnceLock::new(),
            embed,
            decoder,
            mask_ones,
            memory,
            no_features,
            cache: Mutex::new(VecDeque::new()),
        })
    }

    /// The engine's manifest, as loaded for this device: `graphs.decoder` and
    /// `model.kv_layout` describe the decoder that runs (see [`DecoderChoice`]).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The device the graphs run on, and why it was chosen (`auto` resolves here).
    pub fn device(&self) -> &crate::device::Resolved {
        &self.device
    }

    /// The engine's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The decoder graph (the serving engine's scheduler thread is its only user while serving).
    pub(crate) fn decoder(&self) -> &Graph {
        &self.decoder
    }

    fn image_graph(&self) -> Result<&Graph> {
        if let Some(g) = self.image.get() {
            return Ok(g);
        }
        let g = Graph::load(&self.dir, "image", &self.manifest.graphs.image, &self.options.session, &self.manifest)?;
        Ok(self.image.get_or_init(|| g))
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Arc<Features>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let pos = cache.iter().position(|(k, _)| k == key)?;
        let entry = cache.remove(pos)?;
        let features = entry.1.clone();
        cache.push_front(entry);
        Some(features)
    }

    fn remember(&self, key: [u8; 32], features: Arc<Features>) {
        if self.options.feature_cache_entries == 0 {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|(k, _)| *k != key);
        cache.push_front((key, features));
        cache.truncate(self.options.feature_cache_entries);
    }

    /// Number of visual tokens `media` will take, known before anything is decoded.
    pub fn slot(&self, media: &Media) -> VisualSlot {
        let m = &self.manifest.model;
        match media {
            Media::VideoFile(_) | Media::PixelValuesFile(_) => {
                VisualSlot::Video { tokens: self.manifest.preprocess.frames * m.tokens_per_frame }
            }
            Media::VideoPixels(px) => VisualSlot::Video { tokens: px.shape()[1] * m.tokens_per_frame },
            Media::ImageFile(_) | Media::ImagePixels(_) => VisualSlot::Image { tokens: m.tokens_per_image },
            Media::Text => VisualSlot::None,
        }
    }

    /// Decodes, preprocesses and runs the vision graph for `media` (or takes cached features).
    pub fn visual(&self, media: &Media) -> Result<Option<Visual>> {
        let t0 = Instant::now();
        let pre = &self.manifest.preprocess;
        let (pixels, is_video): (PixelTensor, bool) = match media {
            Media::Text => return Ok(None),
            Media::VideoFile(path) => {
                let sampling = match pre.sampling {
                    FrameSamplingRule::LinspaceTruncate => FrameSampling::Uniform,
                };
                let video = load_video_with(path, sampling, pre.frames, &self.options.decode)?;
                (PixelTensor::Video(Arc::new(pre.recipe.video(&video.frames, &pre.image)?)), true)
            }
            Media::PixelValuesFile(path) => (PixelTensor::Video(Arc::new(load_pixel_values_npy(path)?)), true),
            Media::VideoPixels(px) => (PixelTensor::Video(px.clone()), true),
            Media::ImageFile(path) => (
                PixelTensor::Image(Arc::new(
                    pre.recipe.image(&load_image_with(path, &self.options.decode)?, &pre.image)?,
                )),
                false,
            ),
            Media::ImagePixels(px) => (PixelTensor::Image(px.clone()), false),
        };
        let preprocess_ms = ms(t0.elapsed());
        self.check_pixels(&pixels)?;
        let key = pixels.key();
        if let Some(features) = self.cached(&key) {
            return Ok(Some(Visual { features, is_video, preprocess_ms, vision_ms: 0.0 }));
        }
        let t1 = Instant::now();
        let features = Arc::new(self.run_vision(&pixels)?);
        let vision_ms = ms(t1.elapsed());
        self.remember(key, features.clone());
        Ok(Some(Visual { features, is_video, preprocess_ms, vision_ms }))
    }

    fn check_pixels(&self, pixels: &PixelTensor) -> Result<()> {
        let side = self.manifest.model.image_size;
        let shape = pixels.shape();
        let ok = match pixels {
            PixelTensor::Video(_) => shape.len() == 5 && shape[0] == 1 && shape[1] > 0 && shape[2..] == [3, side, side],
            PixelTensor::Image(_) => shape.len() == 4 && shape[0] == 1 && shape[1..] == [3, side, side],
        };
        if !ok {
            return Err(Error::Request(format!("pixel values of shape {shape:?} do not fit {side}x{side} frames")));
        }
        Ok(())
    }

    /// Runs the vision graph with its output bound to the device's memory, where it stays.
    fn run_vision(&self, pixels: &PixelTensor) -> Result<Features> {
        // Owned copies: `IoBinding::bind_input` would clone a borrowed tensor itself (through a
        // session of its own), and the pixels are small next to the graph's work.
        let (graph, input, output, pixels) = match pixels {
            PixelTensor::Video(px) => (
                &self.vision,
                "pixel_values_videos",
                "video_features",
                Tensor::from_array(px.as_ref().clone())?.into_dyn(),
            ),
            PixelTensor::Image(px) => (
                self.image_graph()?,
                "pixel_values",
                "image_features",
                Tensor::from_array(px.as_ref().clone())?.into_dyn(),
            ),
        };
        let mut session = graph.lock();
        let mut binding = session.create_binding()?;
        binding.bind_input(input, &pixels)?;
        binding.bind_output_to_device(output, &self.memory)?;
        let mut outputs = session.run_binding(&binding)?;
        let value =
            outputs.remove(output).ok_or_else(|| Error::Request(format!("the vision graph gave no {output}")))?;
        Features::from_value(value, output)
    }

    /// The embedding and decoder graphs, for callers that drive the decoder themselves
    /// (evaluation, benchmarks).
    pub fn language_model(&self) -> LanguageModel<'_> {
        LanguageModel {
            embed: &self.embed,
            decoder: &self.decoder,
            mask_ones: &self.mask_ones,
            vocab: self.manifest.model.vocab_size,
            memory: &self.memory,
            no_features: &self.no_features,
        }
    }
}

enum PixelTensor {
    Video(Arc<Array5<f32>>),
    Image(Arc<Array4<f32>>),
}

impl PixelTensor {
    fn shape(&self) -> &[usize] {
        match self {
            PixelTensor::Video(a) => a.shape(),
            PixelTensor::Image(a) => a.shape(),
        }
    }

    /// The cache key: a hash of the pixel values (so the same content hits the cache whatever
    /// file name or container it came in).
    fn key(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([matches!(self, PixelTensor::Video(_)) as u8]);
        for d in self.shape() {
            h.update((*d as u64).to_le_bytes());
        }
        let mut feed = |v: &[f32]| h.update(bytemuck_f32(v));
        match self {
            PixelTensor::Video(a) => match a.as_slice() {
                Some(s) => feed(s),
                None => a.iter().for_each(|x| feed(std::slice::from_ref(x))),
            },
            PixelTensor::Image(a) => match a.as_slice() {
                Some(s) => feed(s),
                None => a.iter().for_each(|x| feed(std::slice::from_ref(x))),
            },
        }
        h.finalize().into()
    }
}

fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
