//! `vl-export`: export Video-LLaVA checkpoints to ONNX engines, or synthesize test checkpoints.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use vl_export::checkpoint::TowerDirs;
use vl_export::eval::{EvalOptions, evaluate, parse_prompts};
use vl_export::export::{BuildOptions, build};
use vl_export::precision::WeightMethod;
use vl_export::quant::calibrate::CalibOptions;
use vl_export::quant::fusion::fusion_report;
use vl_export::quant::stats::Method;
use vl_export::synth::{Preset, SynthSpec, SynthTokenizer, WeightDtype, WeightsFormat, synthesize};
use vl_export::weight_codes::grid::GridFit;
use vl_runtime::manifest::{CheckpointLayout, Precision, Target};

#[derive(Parser)]
#[command(version, about = "Export Video-LLaVA checkpoints to ONNX graphs for vl-runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export a checkpoint directory to an engine directory.
    Build {
        /// Checkpoint directory (config.json, safetensors, tokenizer.json or tokenizer.model).
        #[arg(long, env = "VL_MODEL")]
        model: PathBuf,
        /// Engine directory to write (replaced if it already holds an engine).
        #[arg(long, default_value = "engines")]
        out: PathBuf,
        /// Numeric precision of the graphs.
        #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
        precision: PrecisionArg,
        /// Weights per quantization block (int8-weight, int4-weight).
        #[arg(long, default_value_t = 32)]
        block_size: usize,
        /// How int8-weight and int4-weight make their codes: `gptq` calibrates first (the
        /// calibration set of --calib, default calib/default.yaml) and is the most accurate.
        #[arg(long, value_enum, default_value_t = WeightMethodArg::GptqActOrder)]
        weight_method: WeightMethodArg,
        /// How GPTQ fits each block's range: `minmax` (the block's range) or `mse` (GPTQ's
        /// reference clipping search: the range shrunk by up to 20%, least error).
        #[arg(long, value_enum, default_value_t = WeightGridArg::Minmax)]
        weight_grid: WeightGridArg,
        /// Runtime the graphs are written for (default: standard, or onnxruntime where the
        /// precision needs it). `onnxruntime` also writes the decoder with ONNX Runtime's
        /// GroupQueryAttention and a KV cache shared in place between steps.
        #[arg(long, value_enum)]
        target: Option<TargetArg>,
        /// Original layout: the LanguageBind video tower's directory (its config.json gives
        /// num_frames, add_time_attn, hidden_act...); found in the checkpoint or inferred otherwise.
        #[arg(long)]
        video_tower: Option<PathBuf>,
        /// Original layout: the LanguageBind image tower's directory.
        #[arg(long)]
        image_tower: Option<PathBuf>,
        #[command(flatten)]
        calib: CalibArgs,
    },
    /// Write a checkpoint with random weights (Hugging Face port or original layout).
    Synth {
        /// Size preset.
        #[arg(long, value_enum, default_value_t = PresetArg::Tiny)]
        preset: PresetArg,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// RNG seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Override: vision layers.
        #[arg(long)]
        vision_layers: Option<usize>,
        /// Override: decoder layers.
        #[arg(long)]
        text_layers: Option<usize>,
        /// Override: attention heads of the decoder.
        #[arg(long)]
        heads: Option<usize>,
        /// Override: key/value heads (fewer than heads = grouped-query attention).
        #[arg(long)]
        kv_heads: Option<usize>,
        /// Override: vision_feature_layer, one index or several separated by commas.
        #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
        feature_layer: Option<Vec<i64>>,
        /// Keep CLS for images (`vision_feature_select_strategy: full`).
        #[arg(long)]
        keep_cls: bool,
        /// Tie lm_head to the embeddings.
        #[arg(long)]
        tie_embeddings: bool,
        /// Linear rope scaling factor.
        #[arg(long)]
        rope_linear: Option<f64>,
        /// Weight dtype (default: the preset's).
        #[arg(long, value_enum)]
        dtype: Option<DtypeArg>,
        /// Write transformers 4.x tensor names (`video_tower.vision_model...`).
        #[arg(long, conflicts_with = "layout")]
        v4_names: bool,
        /// Checkpoint layout: the Hugging Face port (transformers 5 or 4 names) or the original
        /// Video-LLaVA checkpoint (with LanguageBind tower configs and temporal attention).
        #[arg(long, value_enum)]
        layout: Option<LayoutArg>,
        /// Write the published LanguageBind/Video-LLaVA-7B-hf shape: a sparse config.json
        /// (transformers' defaults left out), transformers 4 names in safetensors shards with an
        /// index, no video_preprocessor_config.json, a generation_config.json.
        #[arg(long, conflicts_with = "layout")]
        published: bool,
        /// Weight files: `model.safetensors`, or PyTorch `.bin` shards with
        /// `pytorch_model.bin.index.json` (read by `torch.load(weights_only=True)`).
        #[arg(long, value_enum, default_value_t = WeightsFormatArg::Safetensors)]
        weights_format: WeightsFormatArg,
        /// Tokenizer file: tokenizer.json, or SentencePiece's tokenizer.model only (as the
        /// published checkpoints may ship it).
        #[arg(long, value_enum, default_value = "json")]
        tokenizer: TokenizerArg,
    },
    /// Compare an engine with a reference engine (accuracy of a precision): video-feature cosine,
    /// KL and top-1 agreement of next-token distributions, perplexity, greedy common prefix.
    Eval(EvalArgs),
    /// Optimize an engine's graphs as ONNX Runtime's CPU provider does and count the operators
    /// left: shows whether an int8 engine's QDQ pairs were fused into integer matmuls.
    Fusion {
        /// Engine directory.
        #[arg(long)]
        engine: PathBuf,
        /// Leave `session.qdqisint8allowed` off (ONNX Runtime's x86 default: int8 activations are
        /// then not fused).
        #[arg(long)]
        no_int8_allowed: bool,
    },
    /// On a machine with an NVIDIA GPU: build the TensorRT engines of an engine directory's
    /// graphs now and keep them (EP-context models in `trt/`), recording the GPU and the
    /// TensorRT and ONNX Runtime versions in the manifest; a load on another GPU or version
    /// rebuilds (or fails, if the service says so), never uses them.
    Compile {
        /// Engine directory.
        #[arg(long)]
        engine: PathBuf,
        /// tensorrt[:N] or tensorrt-rtx[:N].
        #[arg(long)]
        device: vl_runtime::Device,
        /// Decoder rows per call the engines cover (the serving engine's max_active).
        #[arg(long, default_value_t = 8)]
        max_batch: usize,
        /// Prompt chunk length TensorRT tunes for (the serving engine's prefill chunk).
        #[arg(long, default_value_t = 512)]
        opt_sequence: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LayoutArg {
    #[value(name = "hf-v5")]
    HfV5,
    #[value(name = "hf-v4")]
    HfV4,
    Original,
}

#[derive(Clone, Copy, ValueEnum)]
enum TokenizerArg {
    /// tokenizer.json.
    Json,
    /// tokenizer.model (SentencePiece) only.
    Spm,
}

/// Calibration of `--precision int8` (and of GPTQ under the weight-only precisions).
#[derive(clap::Args)]
struct CalibArgs {
    /// Calibration spec (YAML: videos, images, prompts, samples, method); default: the built-in
    /// calib/default.yaml (generated test patterns: point it at your own data). With fp32,
    /// folds the SmoothQuant factors alone into the weights (the model is unchanged).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Override the spec's SmoothQuant migration strength (0 to 1).
    #[arg(long)]
    smoothquant_alpha: Option<f32>,
    /// Override the spec's threshold method.
    #[arg(long, value_enum)]
    calib_method: Option<CalibMethodArg>,
    /// Percentile of the `percentile` method.
    #[arg(long, default_value_t = 99.99)]
    calib_percentile: f64,
    /// Where calibration tables are saved and looked up (default: tables/ beside the spec).
    #[arg(long)]
    calib_tables: Option<PathBuf>,
    /// Decoder layers per calibration block (each block's fp32 weights are in memory and on
    /// the scratch disk at a time).
    #[arg(long, default_value_t = vl_export::quant::calibrate::DEFAULT_BLOCK_LAYERS)]
    calib_block_layers: usize,
    /// MB of calibration activations held in memory between blocks; the rest is spilled to
    /// the scratch directory.
    #[arg(long, default_value_t = vl_export::quant::stream::DEFAULT_MEMORY_BUDGET >> 20)]
    calib_memory_mb: usize,
}

impl CalibArgs {
    fn options(self, precision: Precision) -> Option<CalibOptions> {
        let given = self.calib.is_some()
            || self.smoothquant_alpha.is_some()
            || self.calib_method.is_some()
            || self.calib_tables.is_some();
        if precision != Precision::Int8 && !given {
            return None;
        }
        let method = self.calib_method.map(|m| match m {
            CalibMethodArg::Max => Method::Max,
            CalibMethodArg::Percentile => Method::Percentile(self.calib_percentile),
            CalibMethodArg::Entropy => Method::Entropy,
            CalibMethodArg::Mse => Method::Mse,
        });
        Some(CalibOptions {
            spec: self.calib,
            alpha: self.smoothquant_alpha,
            method,
            table_dir: self.calib_tables,
            progress: true,
            threads: None,
            block_layers: Some(self.calib_block_layers),
            memory_budget: Some(self.calib_memory_mb << 20),
            gptq: None,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightGridArg {
    /// Each block's range.
    Minmax,
    /// GPTQ's reference MSE search over shrunk ranges.
    Mse,
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightMethodArg {
    /// GPTQ with act-order (columns by decreasing Hessian diagonal, static groups), asymmetric
    /// blocks (zero points), from the calibration set's Hessians.
    #[value(name = "gptq-act-order")]
    GptqActOrder,
    /// GPTQ, columns in order.
    Gptq,
    /// Round to nearest on asymmetric blocks (zero points); no calibration.
    #[value(name = "rtn-asym")]
    RtnAsym,
    /// Round to nearest, symmetric blocks; no calibration.
    #[value(name = "rtn-sym")]
    RtnSym,
}

#[derive(Clone, Copy, ValueEnum)]
enum CalibMethodArg {
    Max,
    Percentile,
    Entropy,
    Mse,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    Fp32,
    Fp16,
    /// W8A8 with calibration and SmoothQuant (explicit QDQ graphs).
    Int8,
    #[value(name = "int8-weight")]
    Int8Weight,
    #[value(name = "int4-weight")]
    Int4Weight,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    /// Standard ONNX operators only (TensorRT's parser included).
    Standard,
    /// ONNX Runtime contrib operators (MatMulNBits, GroupQueryAttention).
    Onnxruntime,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Engine under test.
    #[arg(long)]
    engine: PathBuf,
    /// Reference engine (e.g. the fp32 build of the same checkpoint).
    #[arg(long)]
    reference: PathBuf,
    /// Text set for perplexity and teacher-forced comparison (default: calib/eval_text.txt, built in).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Questions about the video, one per line (default: calib/eval_prompts.txt, built in).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// A video whose features are compared and that the prompts ask about (repeatable).
    #[arg(long)]
    video: Vec<PathBuf>,
    /// Seeded random pixel inputs whose features are compared.
    #[arg(long, default_value_t = 3)]
    pixel_inputs: usize,
    /// Seed of the random pixel inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most tokens of each greedy answer.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Tokens per forward pass over the text set.
    #[arg(long, default_value_t = 512)]
    chunk_tokens: usize,
    /// Score only the first N tokens of the text set.
    #[arg(long)]
    max_text_tokens: Option<usize>,
    /// Intra-op threads (default: one per core).
    #[arg(long, env = "VL_THREADS")]
    threads: Option<usize>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum PresetArg {
    Tiny,
    Small,
    #[value(name = "vl7b-slice")]
    Vl7bSlice,
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightsFormatArg {
    Safetensors,
    Bin,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let mut opts = EvalOptions::new(a.engine, a.reference);
    if let Some(p) = &a.data {
        opts.text = read(p)?;
    }
    if let Some(p) = &a.prompts {
        opts.prompts = parse_prompts(&read(p)?);
    }
    opts.videos = a.video;
    opts.pixel_inputs = a.pixel_inputs;
    opts.seed = a.seed;
    opts.max_new_tokens = a.max_new_tokens;
    opts.chunk_tokens = a.chunk_tokens;
    opts.max_text_tokens = a.max_text_tokens;
    opts.session.threads = a.threads;
    opts.progress = true;
    let report = evaluate(&opts)?;
    println!("{report}");
    if let Some(path) = a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Build {
            model,
            out,
            precision,
            block_size,
            weight_method,
            weight_grid,
            target,
            video_tower,
            image_tower,
            calib,
        } => {
            let precision = match precision {
                PrecisionArg::Fp32 => Precision::Fp32,
                PrecisionArg::Fp16 => Precision::Fp16,
                PrecisionArg::Int8 => Precision::Int8,
                PrecisionArg::Int8Weight => Precision::Int8Weight,
                PrecisionArg::Int4Weight => Precision::Int4Weight,
            };
            let towers = TowerDirs { video: video_tower, image: image_tower };
            if let Some(a) = calib.smoothquant_alpha
                && !(0.0..=1.0).contains(&a)
            {
                anyhow::bail!("--smoothquant-alpha {a}: must be in [0, 1]");
            }
            let calib = calib.options(precision);
            let opts = BuildOptions {
                precision,
                block_size,
                weight_method: match weight_method {
                    WeightMethodArg::Gptq => WeightMethod::Gptq,
                    WeightMethodArg::GptqActOrder => WeightMethod::GptqActOrder,
                    WeightMethodArg::RtnAsym => WeightMethod::RtnAsymmetric,
                    WeightMethodArg::RtnSym => WeightMethod::RtnSymmetric,
                },
                weight_grid: match weight_grid {
                    WeightGridArg::Minmax => GridFit::MinMax,
                    WeightGridArg::Mse => GridFit::Mse,
                },
                progress: true,
                towers,
                calib,
                target: target.map(|t| match t {
                    TargetArg::Standard => Target::Standard,
                    TargetArg::Onnxruntime => Target::OnnxRuntime,
                }),
                ..BuildOptions::new(model, out.clone())
            };
            vl_export::staging::remove_on_signals()?;
            let report = build(&opts)?;
            println!("note: {}", report.notice);
            if let Some(c) = &report.calibration {
                println!("{c}");
            }
            let rss = vl_runtime::memory::peak_rss_mb().map(|m| format!(", peak RSS {m:.0} MB")).unwrap_or_default();
            println!(
                "exported {} ({}) to {} in {:.1} s{rss}",
                report.manifest.source.path,
                report.manifest.precision,
                out.display(),
                report.elapsed.as_secs_f64()
            );
        }
        Command::Synth {
            preset,
            out,
            seed,
            vision_layers,
            text_layers,
            heads,
            kv_heads,
            feature_layer,
            keep_cls,
            tie_embeddings,
            rope_linear,
            dtype,
            v4_names,
            layout,
            published,
            weights_format,
            tokenizer,
        } => {
            let preset = match preset {
                PresetArg::Tiny => Preset::Tiny,
                PresetArg::Small => Preset::Small,
                PresetArg::Vl7bSlice => Preset::Vl7bSlice,
            };
            let mut spec = SynthSpec { seed, keep_cls, tie_embeddings, rope_linear, ..SynthSpec::preset(preset) };
            spec.vision_layers = vision_layers.unwrap_or(spec.vision_layers);
            spec.text_layers = text_layers.unwrap_or(spec.text_layers);
            spec.heads = heads.unwrap_or(spec.heads);
            spec.kv_heads = kv_heads.unwrap_or(spec.kv_heads);
            spec.feature_layers = feature_layer.unwrap_or(spec.feature_layers);
            if let Some(d) = dtype {
                spec.dtype = match d {
                    DtypeArg::F32 => WeightDtype::F32,
                    DtypeArg::F16 => WeightDtype::F16,
                    DtypeArg::Bf16 => WeightDtype::Bf16,
                };
            }
            if v4_names || published {
                spec.layout = CheckpointLayout::HfV4;
            }
            spec.published = published;
            if let Some(layout) = layout {
                spec.layout = match layout {
                    LayoutArg::HfV5 => CheckpointLayout::HfV5,
                    LayoutArg::HfV4 => CheckpointLayout::HfV4,
                    LayoutArg::Original => CheckpointLayout::Original,
                };
            }
            spec.weights_format = match weights_format {
                WeightsFormatArg::Safetensors => WeightsFormat::Safetensors,
                WeightsFormatArg::Bin => WeightsFormat::TorchBin,
            };
            spec.tokenizer = match tokenizer {
                TokenizerArg::Json => SynthTokenizer::Json,
                TokenizerArg::Spm => SynthTokenizer::SentencePiece,
            };
            synthesize(&spec, &out)?;
            println!("wrote a {:?} checkpoint to {}", preset, out.display());
        }
        Command::Eval(args) => run_eval(args)?,
        Command::Compile { engine, device, max_batch, opt_sequence } => {
            let options = vl_runtime::device::TensorRtOptions { max_batch, opt_sequence, ..Default::default() };
            let t0 = std::time::Instant::now();
            let c = vl_runtime::device::compile_engine(&engine, device, &options)
                .with_context(|| format!("compiling {} for {device}", engine.display()))?;
            println!(
                "compiled {} graphs for {} on {} (compute capability {}, TensorRT {}, ONNX Runtime {}) in {:.1} s",
                c.graphs.len(),
                c.device,
                c.gpu,
                c.compute_capability,
                c.tensorrt_version,
                c.onnxruntime_version,
                t0.elapsed().as_secs_f64()
            );
        }
        Command::Fusion { engine, no_int8_allowed } => {
            let manifest = vl_runtime::manifest::Manifest::load(&engine)?;
            let scratch = tempfile::tempdir()?;
            for (role, entry) in manifest.graphs.iter() {
                let r = fusion_report(&engine.join(&entry.file), scratch.path(), !no_int8_allowed)?;
                let ops: Vec<String> = r.ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
                println!(
                    "{role}: {} integer matmuls, {} matmuls on dequantized inputs; {}",
                    r.integer_matmuls,
                    r.dequantized_matmuls,
                    ops.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// Errors are printed as one chain (`error: what: why`), without a backtrace, and exit with 1.
fn main() -> std::process::ExitCode {
    vl_runtime::exit::exit_code(run())
}
