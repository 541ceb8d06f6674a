//! `vl-export`: export Video-LLaVA checkpoints to ONNX engines, or synthesize test checkpoints.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use vl_export::export::{BuildOptions, build};
use vl_export::synth::{Preset, SynthSpec, WeightDtype, synthesize};
use vl_runtime::manifest::{CheckpointLayout, Precision};

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
        /// Checkpoint directory (config.json, safetensors, tokenizer.json).
        #[arg(long, env = "VL_MODEL")]
        model: PathBuf,
        /// Engine directory to write (replaced if it already holds an engine).
        #[arg(long, default_value = "engines")]
        out: PathBuf,
        /// Numeric precision of the graphs.
        #[arg(long, value_enum, default_value_t = PrecisionArg::Fp32)]
        precision: PrecisionArg,
    },
    /// Write a checkpoint with random weights in the Hugging Face layout.
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
        #[arg(long)]
        v4_names: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    Fp32,
}

#[derive(Clone, Copy, ValueEnum)]
enum PresetArg {
    Tiny,
    Small,
    #[value(name = "vl7b-slice")]
    Vl7bSlice,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Build { model, out, precision } => {
            let precision = match precision {
                PrecisionArg::Fp32 => Precision::Fp32,
            };
            let opts = BuildOptions { precision, progress: true, ..BuildOptions::new(model, out.clone()) };
            let report = build(&opts)?;
            let rss = peak_rss_mb().map(|m| format!(", peak RSS {m:.0} MB")).unwrap_or_default();
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
            if v4_names {
                spec.layout = CheckpointLayout::HfV4;
            }
            synthesize(&spec, &out)?;
            println!("wrote a {:?} checkpoint to {}", preset, out.display());
        }
    }
    Ok(())
}
