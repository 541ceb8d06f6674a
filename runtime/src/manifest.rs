//! `manifest.yaml`: the contract `vl-export` writes and the runtime checks graphs against.
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::preprocess::{PreprocessConfig, PreprocessRecipe};

/// The manifest schema this runtime reads and the exporter writes.
pub const SCHEMA_VERSION: u32 = 3;
/// The manifest's file name inside an engine directory.
pub const MANIFEST_FILE: &str = "manifest.yaml";

/// Everything the runtime needs to know about an engine directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Bumped on incompatible changes.
    pub schema_version: u32,
    /// Version of the toolkit that wrote it.
    pub toolkit_version: String,
    /// Where the weights came from.
    pub source: Source,
    /// Dimensions of the model.
    pub model: ModelDims,
    /// Numeric precision of the graphs.
    pub precision: Precision,
    /// Which runtime the graphs are written for.
    pub target: Target,
    /// Graph files by role.
    pub graphs: Graphs,
    /// Special token ids.
    pub tokens: SpecialTokens,
    /// How prompts are laid out.
    pub chat_template: ChatTemplate,
    /// How frames are sampled and turned into pixel values.
    pub preprocess: Preprocess,
    /// Longest sequence (prompt and answer) the decoder accepts.
    pub max_sequence_length: usize,
    /// The tokenizer file, relative to the engine directory.
    pub tokenizer: String,
    /// Default sampling from the checkpoint's `generation_config.json`, if it has one. Optional:
    /// manifests written before it load with `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationDefaults>,
    /// Choices made where the checkpoint was silent, one line each.
    #[serde(default)]
    pub assumptions: Vec<String>,
    /// How the precision was realized (what stays in fp32, quantization settings), one line each.
    #[serde(default)]
    pub numerics: Vec<String>,
    /// Graphs compiled ahead of time for a GPU (`vl-export compile`), with what they were
    /// built for. Optional: absent until a compilation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compiled: Vec<Compilation>,
}

/// One compilation of an engine directory's graphs for one device kind, ahead of time on a GPU
/// (`crate::device::compile_engine`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compilation {
    /// `tensorrt` or `tensorrt-rtx`.
    pub device: String,
    /// The GPU it was built on (`NVIDIA H200`).
    pub gpu: String,
    /// Its compute capability (`9.0`).
    pub compute_capability: String,
    /// TensorRT's version (`10.13.0`; for TensorRT-RTX, its own version).
    pub tensorrt_version: String,
    /// ONNX Runtime's version (`1.31.1`).
    pub onnxruntime_version: String,
    /// The compiled graphs.
    pub graphs: Vec<CompiledGraph>,
}

/// One compiled graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompiledGraph {
    /// The manifest role (`vision`, `decoder`, ...).
    pub role: String,
    /// The EP-context model, relative to the engine directory.
    pub file: String,
}

/// Where the weights came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Source {
    /// Checkpoint directory as given to the exporter.
    pub path: String,
    /// Checkpoint layout.
    pub layout: CheckpointLayout,
    /// The `architectures[0]` of its config.
    pub architecture: String,
    /// Data type of the checkpoint's weights.
    pub weight_dtype: String,
}

/// Checkpoint layouts the exporter reads.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointLayout {
    /// Hugging Face port saved by transformers 5 (`video_tower.encoder...`).
    HfV5,
    /// Hugging Face port saved by transformers 4 (`video_tower.vision_model.encoder...`).
    HfV4,
    /// The original Video-LLaVA checkpoint (`LlavaLlamaForCausalLM`: `model.layers...`,
    /// `model.mm_projector.{0,2}`, LanguageBind towers under `model.{video,image}_tower.*`).
    Original,
}

/// Numeric precision of the exported graphs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// 32-bit float weights and activations.
    Fp32,
    /// 16-bit float weights and activations; norms and softmax in fp32.
    Fp16,
    /// INT8 weights (per channel) and activations (per tensor, calibrated), SmoothQuant in the LLM.
    Int8,
    /// INT8 weights per block, float activations.
    Int8Weight,
    /// INT4 weights per block, float activations.
    Int4Weight,
}

impl Precision {
    /// The name used on the command line and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
            Precision::Int8Weight => "int8-weight",
            Precision::Int4Weight => "int4-weight",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The operator set the graphs restrict themselves to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Standard ONNX operators only (opset 17) that TensorRT's ONNX parser supports.
    Standard,
    /// Standard operators plus ONNX Runtime contrib operators (`MatMulNBits`): ONNX Runtime's
    /// CPU and CUDA providers run it; TensorRT does not parse it.
    OnnxRuntime,
}

/// Model dimensions the runtime relies on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelDims {
    /// Frames per video.
    pub num_frames: usize,
    /// Visual tokens per frame for videos (patches + CLS).
    pub tokens_per_frame: usize,
    /// Visual tokens per image (patches, plus CLS with the `full` strategy).
    pub tokens_per_image: usize,
    /// Width of the text model.
    pub text_hidden: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Key/value heads (fewer than `num_heads` with grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Rows of the logits.
    pub vocab_size: usize,
    /// Input image side in pixels.
    pub image_size: usize,
    /// Side of one patch in pixels.
    pub patch_size: usize,
    /// Width of the vision tower.
    pub vision_hidden: usize,
    /// MLP width of the vision tower.
    pub vision_intermediate: usize,
    /// Encoder layers in the checkpoint's vision tower.
    pub vision_layers: usize,
    /// Encoder layers the vision graphs run (up to the deepest feature layer).
    pub vision_layers_run: usize,
    /// Encoder layers whose outputs are concatenated into the projector.
    pub vision_feature_layers: usize,
    /// MLP width of the text model.
    pub text_intermediate: usize,
    /// Element type of the KV cache (`past_key_values.*`, `present.*`).
    #[serde(default = "default_kv_dtype")]
    pub kv_dtype: DType,
    /// How the decoder takes and returns its KV cache.
    #[serde(default)]
    pub kv_layout: KvLayout,
}

/// How the decoder's KV cache crosses its interface.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum KvLayout {
    /// Standard operators: `past_key_values.*` [batch, kv_heads, past, head_dim] in,
    /// `present.*` [batch, kv_heads, past + new, head_dim] out (a new tensor each step), with
    /// `position_ids` as an input.
    #[default]
    Concat,
    /// ONNX Runtime's `GroupQueryAttention`: `past_key_values.*` and `present.*` are the same
    /// buffers [batch, kv_heads, capacity, head_dim], written in place at the positions after
    /// the cached ones; the number of cached positions is `attention_mask`'s length minus the
    /// new tokens, positions are implicit (no `position_ids`), and `attention_mask` must be all
    /// ones. Needs target `onnxruntime`.
    SharedBuffer,
}

fn default_kv_dtype() -> DType {
    DType::F32
}

/// One graph file and its interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GraphEntry {
    /// File name of the `.onnx` graph, relative to the engine directory.
    pub file: String,
    /// Its SHA-256 (hex).
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// The external data file, if the weights live beside the graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataFile>,
    /// Graph inputs in order.
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs in order.
    pub outputs: Vec<TensorSpec>,
}

/// An external data file of a graph.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataFile {
    /// File name relative to the engine directory.
    pub file: String,
    /// Its SHA-256 (hex).
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// The graphs of an engine by role.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Graphs {
    /// Video tower + projector.
    pub vision: GraphEntry,
    /// Image tower + projector.
    pub image: GraphEntry,
    /// Token embedding lookup.
    pub embed: GraphEntry,
    /// The language model with its KV cache, laid out as [`ModelDims::kv_layout`] says.
    pub decoder: GraphEntry,
    /// The same language model with ONNX Runtime's `GroupQueryAttention` over KV buffers
    /// shared in place ([`KvLayout::SharedBuffer`]; contrib operators, whatever the manifest's
    /// target), on `decoder`'s weights file. Written beside a concatenating `decoder`, so one
    /// engine directory serves ONNX Runtime's CPU and CUDA providers (batched, in place) and
    /// TensorRT (standard operators); the runtime picks per device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_in_place: Option<GraphEntry>,
    /// `vision` with uint8 activation codes (zero point 128; `vision` has int8 ones with zero
    /// point 0, the same grid), on `vision`'s weights file: what ONNX Runtime's providers run
    /// of an int8 engine for TensorRT (its x86 integer kernels are fast on uint8 activations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_uint8: Option<GraphEntry>,
    /// `image`'s twin with uint8 activation codes, as `vision_uint8` is `vision`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_uint8: Option<GraphEntry>,
}

impl Graphs {
    /// All graphs with their role names.
    pub fn iter(&self) -> Vec<(&'static str, &GraphEntry)> {
        let mut all =
            vec![("vision", &self.vision), ("image", &self.image), ("embed", &self.embed), ("decoder", &self.decoder)];
        all.extend(self.decoder_in_place.as_ref().map(|g| ("decoder_in_place", g)));
        all.extend(self.vision_uint8.as_ref().map(|g| ("vision_uint8", g)));
        all.extend(self.image_uint8.as_ref().map(|g| ("image_uint8", g)));
        all
    }
}

/// Element types at graph boundaries.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// 64-bit signed integer.
    I64,
}

/// One axis of a tensor: a fixed size or a named symbolic size.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Dim {
    /// A size fixed in the graph.
    Fixed(i64),
    /// A size chosen at run time, by name.
    Symbolic(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
        }
    }
}

/// Name, element type and shape of a graph input or output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name in the graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, axis by axis.
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    /// A spec from a name, a type and axes.
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<Dim>) -> Self {
        Self { name: name.into(), dtype, shape }
    }
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(ToString::to_string).collect();
        write!(f, "{} {:?} [{}]", self.name, self.dtype, dims.join(", "))
    }
}

/// Special token ids.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SpecialTokens {
    /// Beginning of sequence, prepended to the first turn.
    pub bos: u32,
    /// End of sequence, ends an answer.
    pub eos: u32,
    /// Padding.
    #[serde(default)]
    pub pad: Option<u32>,
    /// The image placeholder.
    pub image: u32,
    /// The video placeholder.
    pub video: u32,
}

/// Default sampling settings a checkpoint ships (`generation_config.json`); each `None` where
/// the file leaves it out (transformers' `GenerationConfig` then uses greedy decoding).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GenerationDefaults {
    /// `do_sample`: sample rather than decode greedily.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    /// `temperature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// `top_p`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// `top_k`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// `max_new_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
}

/// How prompts are laid out (llava_v1 style in the Hugging Face port).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatTemplate {
    /// Optional system line put before the first turn.
    #[serde(default)]
    pub system: String,
    /// First turn with a video; `{video}` marks the visual tokens, `{question}` the question.
    pub first_turn_video: String,
    /// First turn with an image.
    pub first_turn_image: String,
    /// First turn with text only.
    pub first_turn_text: String,
    /// Appended after an answer to ask a follow-up question.
    pub next_turn: String,
    /// Text that ends an answer in the conversation history.
    pub answer_end: String,
    /// The placeholder text that the tokenizer maps to the video token.
    pub video_placeholder: String,
    /// The placeholder text that the tokenizer maps to the image token.
    pub image_placeholder: String,
    /// How placeholders become visual token positions (older manifests: one per token).
    #[serde(default)]
    pub placeholders: PlaceholderStyle,
}

/// How a chat template's placeholders become the positions visual features are spliced into.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PlaceholderStyle {
    /// `{video}` / `{image}` become the placeholder text repeated once per visual token, and the
    /// prompt is tokenized whole (the Hugging Face processor).
    #[default]
    RepeatPerToken,
    /// The first-turn templates hold literal markers (`video_placeholder`, `image_placeholder`):
    /// one per video frame, or one for the image. The prompt is split on the marker, each chunk is
    /// tokenized with special tokens, only the first chunk's BOS is kept, and each marker becomes
    /// one frame's (or the image's) visual tokens, as LLaVA's `tokenizer_image_token` does.
    SplitOnMarker,
}

/// Frame sampling rules.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FrameSamplingRule {
    /// `numpy.linspace(0, n - 1, frames).astype(int)`, as the original Video-LLaVA.
    LinspaceTruncate,
}

/// How inputs become pixel values.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Preprocess {
    /// Frames sampled per video.
    pub frames: usize,
    /// Which frames.
    pub sampling: FrameSamplingRule,
    /// Resize, crop and normalization.
    pub image: PreprocessConfig,
    /// Which implementation applies `image` (older manifests: the Hugging Face processors').
    #[serde(default)]
    pub recipe: PreprocessRecipe,
}

/// Largest `manifest.yaml` read (a 7B engine's is about 20 KB).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Deepest `[`/`{` nesting read: the YAML parser's time grows with its square (100 000 deep
/// takes a minute), and vl-export writes none.
const MAX_FLOW_DEPTH: usize = 32;

/// How deep `[` and `{` nest in `text`, counting those inside quoted strings too (so an
/// over-estimate, which only matters for absurd strings).
fn flow_depth(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    for b in text.bytes() {
        match b {
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Upper bounds of [`Manifest::check_values`]: far above any model vl-export handles, far
/// below what would exhaust memory when the runtime sizes its tables from them.
const MAX_FRAMES: usize = 1024;
const MAX_SEQUENCE: usize = 1 << 22;
const MAX_WIDTH: usize = 1 << 16;
const MAX_LAYERS: usize = 1024;
const MAX_HEADS: usize = 1024;
const MAX_VOCAB: usize = 1 << 22;
const MAX_IMAGE_SIDE: usize = 1 << 14;

impl Manifest {
    /// Reads and validates `manifest.yaml` in `engine_dir`.
    pub fn load(engine_dir: &Path) -> Result<Self> {
        let path = engine_dir.join(MANIFEST_FILE);
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_MANIFEST_BYTES + 1), &mut text)
            .map_err(|e| Error::io(&path, e))?;
        let bad = |message: String| Error::Manifest { path: path.clone(), message };
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(bad(format!("larger than {MAX_MANIFEST_BYTES} bytes: not a manifest vl-export wrote")));
        }
        if flow_depth(&text) > MAX_FLOW_DEPTH {
            return Err(bad(format!(
                "brackets nested more than {MAX_FLOW_DEPTH} deep: not a manifest vl-export wrote"
            )));
        }
        // The version first: a manifest of another schema fails on it, not on a field it lacks.
        #[derive(Deserialize)]
        struct Versioned {
            schema_version: u32,
        }
        let version: Versioned = serde_norway::from_str(&text)
            .map_err(|e| Error::Manifest { path: path.clone(), message: e.to_string() })?;
        if version.schema_version != SCHEMA_VERSION {
            return Err(Error::Manifest {
                path,
                message: format!(
                    "schema version {} but this runtime reads {SCHEMA_VERSION}; re-export with this toolkit",
                    version.schema_version
                ),
            });
        }
        let manifest: Manifest = serde_norway::from_str(&text)
            .map_err(|e| Error::Manifest { path: path.clone(), message: e.to_string() })?;
        manifest.check_values().map_err(bad)?;
        Ok(manifest)
    }

    /// Refuses values no exported model has (zero widths, a trillion layers), naming the field,
    /// before anything is allocated from them (the attention mask, KV buffers, name tables).
    fn check_values(&self) -> std::result::Result<(), String> {
        let m = &self.model;
        let fields = [
            ("model.num_frames", m.num_frames, MAX_FRAMES),
            ("model.tokens_per_frame", m.tokens_per_frame, MAX_SEQUENCE),
            ("model.tokens_per_image", m.tokens_per_image, MAX_SEQUENCE),
            ("model.text_hidden", m.text_hidden, MAX_WIDTH),
            ("model.num_layers", m.num_layers, MAX_LAYERS),
            ("model.num_heads", m.num_heads, MAX_HEADS),
            ("model.num_kv_heads", m.num_kv_heads, MAX_HEADS),
            ("model.head_dim", m.head_dim, MAX_WIDTH),
            ("model.vocab_size", m.vocab_size, MAX_VOCAB),
            ("model.image_size", m.image_size, MAX_IMAGE_SIDE),
            ("model.patch_size", m.patch_size, MAX_IMAGE_SIDE),
            ("model.vision_hidden", m.vision_hidden, MAX_WIDTH),
            ("model.vision_intermediate", m.vision_intermediate, 4 * MAX_WIDTH),
            ("model.vision_layers", m.vision_layers, MAX_LAYERS),
            ("model.vision_layers_run", m.vision_layers_run, MAX_LAYERS),
            ("model.vision_feature_layers", m.vision_feature_layers, MAX_LAYERS),
            ("model.text_intermediate", m.text_intermediate, 4 * MAX_WIDTH),
            ("max_sequence_length", self.max_sequence_length, MAX_SEQUENCE),
        ];
        for (field, value, max) in fields {
            if value == 0 || value > max {
                return Err(format!("{field} is {value}; a model vl-export writes has 1 to {max}"));
            }
        }
        if !m.num_heads.is_multiple_of(m.num_kv_heads) {
            return Err(format!(
                "model.num_kv_heads ({}) does not divide model.num_heads ({})",
                m.num_kv_heads, m.num_heads
            ));
        }
        if m.patch_size > m.image_size {
            return Err(format!("model.patch_size ({}) exceeds model.image_size ({})", m.patch_size, m.image_size));
        }
        if m.vision_layers_run > m.vision_layers {
            return Err(format!(
                "model.vision_layers_run ({}) exceeds model.vision_layers ({})",
                m.vision_layers_run, m.vision_layers
            ));
        }
        let t = &self.tokens;
        // `pad` is left out: the runtime never feeds it, and some checkpoints name one past the end.
        for (field, id) in
            [("tokens.bos", t.bos), ("tokens.eos", t.eos), ("tokens.image", t.image), ("tokens.video", t.video)]
        {
            if id as usize >= m.vocab_size {
                return Err(format!("{field} is {id}, outside the vocabulary of model.vocab_size = {}", m.vocab_size));
            }
        }
        Ok(())
    }

    /// Writes it as `manifest.yaml` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_norway::to_string(self)
            .map_err(|e| Error::Manifest { path: path.clone(), message: e.to_string() })?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    }

    /// The decoder's past key/value inputs by layer, checked to follow the naming convention.
    pub fn kv_input_names(&self) -> Vec<(String, String)> {
        (0..self.model.num_layers)
            .map(|i| (format!("past_key_values.{i}.key"), format!("past_key_values.{i}.value")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    /// The tiny engine's manifest (`tests/fixtures/manifest/README.md`).
    pub(crate) const FIXTURE: &str = include_str!("../../tests/fixtures/manifest/manifest.yaml");

    /// Writes `bytes` as the manifest of a temp engine dir and loads it.
    fn load(bytes: &[u8]) -> Result<Manifest> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST_FILE), bytes).unwrap();
        let loaded = Manifest::load(dir.path());
        if let Err(e) = &loaded {
            assert!(matches!(e, Error::Manifest { .. } | Error::Io { .. }), "{e:?}");
            assert!(e.to_string().contains(MANIFEST_FILE), "{e}");
        }
        loaded
    }

    #[test]
    fn the_fixture_loads_and_every_truncation_is_handled() {
        let whole = load(FIXTURE.as_bytes()).unwrap();
        assert_eq!(whole.tokens.video, 601);
        // One directory for all the cuts: a YAML document cut short is an error, or (cut at the
        // end of a line after the last required key) a manifest; never a panic.
        let dir = tempfile::tempdir().unwrap();
        for end in 0..FIXTURE.len() {
            std::fs::write(dir.path().join(MANIFEST_FILE), &FIXTURE.as_bytes()[..end]).unwrap();
            let _ = Manifest::load(dir.path());
        }
    }

    #[test]
    fn hostile_yaml_is_an_error() {
        // Alias expansion ("billion laughs"), deep nesting, huge and negative numbers.
        let mut laughs = String::from("schema_version: 3\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let prev = format!("*a{}", i - 1);
            laughs.push_str(&format!("a{i}: &a{i} [{}]\n", [prev.as_str(); 10].join(", ")));
        }
        assert!(load(laughs.as_bytes()).is_err());
        // Deep flow nesting: 100 000 brackets used to take a minute (twice) before this was bounded.
        let deep = format!("schema_version: 3\nmodel: {}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(load(deep.as_bytes()).unwrap_err().to_string().contains("nested"));
        let deep = format!("schema_version: 3\nmodel: {}", "{a: ".repeat(100_000));
        assert!(load(deep.as_bytes()).unwrap_err().to_string().contains("nested"));
        let big = format!("schema_version: 3\n#{}", "x".repeat(2 << 20));
        assert!(load(big.as_bytes()).unwrap_err().to_string().contains("larger than"));
        for (field, value) in
            [("num_layers", "18446744073709551616"), ("num_layers", "-1"), ("vocab_size", "1e400"), ("bos", "x")]
        {
            let text = FIXTURE.replacen(&format!("{field}: "), &format!("{field}: {value} #"), 1);
            let err = load(text.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
        assert!(load(b"schema_version: 4294967296\n").is_err());
        assert!(load(b"\xff\xfe not UTF-8").is_err());
    }

    #[test]
    fn absurd_values_are_refused_naming_the_field() {
        for (field, value) in [
            ("num_layers", "1000000000000"),
            ("max_sequence_length", "0"),
            ("max_sequence_length", "1000000000000"),
            ("head_dim", "0"),
            ("num_kv_heads", "0"),
            ("num_kv_heads", "3"),
            ("vocab_size", "100"),
            ("num_frames", "0"),
            ("patch_size", "1000"),
            ("vision_layers_run", "7"),
        ] {
            let line = format!("\n  {field}: ");
            let line = if FIXTURE.contains(&line) { line } else { format!("\n{field}: ") };
            assert!(FIXTURE.contains(&line), "the fixture has no {field}");
            let text = FIXTURE.replacen(&line, &format!("{line}{value} #"), 1);
            let err = load(text.as_bytes()).unwrap_err();
            assert!(matches!(err, Error::Manifest { .. }), "{field}: {value}: {err:?}");
            assert!(err.to_string().contains(field), "{field}: {value}: {err}");
        }
    }

    proptest! {
        #![proptest_config(crate::proptest_cases::config(500))]

        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = load(&data);
        }

        #[test]
        fn arbitrary_text_after_the_version_never_panics(text in "[a-z_:\\- \\n\\[\\]{}&*!|>'\"0-9#,.]{0,300}") {
            let _ = load(format!("schema_version: 3\n{text}").as_bytes());
        }

        #[test]
        fn flipped_bytes_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
            let mut data = FIXTURE.as_bytes().to_vec();
            for (at, byte) in flips {
                let i = at.index(data.len());
                data[i] = byte;
            }
            let _ = load(&data);
        }
    }
}
