//! The calibration table: per quantized tensor its statistics and scale, and the SmoothQuant
//! factors, saved as JSON (reused by later builds with the same key) and as TensorRT
//! calibration caches.
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::QuantParams;
use crate::error::{Error, Result};

/// Version of the table format and of the calibration algorithm: a table of another version
/// is recomputed, never reused.
pub const FORMAT: u32 = 1;

/// Statistics and scale of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Range {
    /// Largest magnitude seen.
    pub amax: f32,
    /// Clipping threshold chosen by the method.
    pub threshold: f32,
    /// The int8 scale, `threshold / 127`.
    pub scale: f32,
}

/// One quantized tensor: the input of one or more linear layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// The graph it belongs to (`vision`, `image`, `decoder`).
    pub graph: String,
    /// Its name in the fp32 graph.
    pub tensor: String,
    /// Weight names of the linears that read it.
    pub consumers: Vec<String>,
    /// Channels on its last axis.
    pub channels: usize,
    /// Range as quantized in the int8 graph (after SmoothQuant, when smoothed).
    pub range: Range,
    /// Range of the tensor in the plain fp32 graph, when SmoothQuant changed it (the
    /// TensorRT caches describe the fp32 graph).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsmoothed: Option<Range>,
}

/// What a SmoothQuant division is folded into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FoldKind {
    /// An RMSNorm's weight.
    Norm,
    /// A linear's weight rows and bias (the input is proportional to its outputs).
    Rows,
}

/// SmoothQuant factors folded into one producer and the linears it feeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmoothEntry {
    /// The graph.
    pub graph: String,
    /// What the division is folded into.
    pub kind: FoldKind,
    /// Weight name of the norm, or of the linear, divided by the factors.
    pub divided: String,
    /// Weight names of the linears whose input columns are multiplied by them.
    pub linears: Vec<String>,
    /// One factor per channel.
    pub factors: Vec<f32>,
}

/// Everything a calibration produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantTable {
    /// [`FORMAT`].
    pub format: u32,
    /// SHA-256 over the spec, its media and the checkpoint: a build with the same key reuses
    /// the table.
    pub key: String,
    /// The spec it came from.
    pub spec: String,
    /// The checkpoint directory.
    pub checkpoint: String,
    /// Threshold method (`max`, `percentile-99.99`, `entropy`).
    pub method: String,
    /// SmoothQuant migration strength.
    pub smoothquant_alpha: f32,
    /// Samples through the language model.
    pub samples: usize,
    /// TensorRT version of the cache headers.
    pub trt_version: u32,
    /// The quantized tensors.
    pub tensors: Vec<TensorEntry>,
    /// The SmoothQuant factors.
    pub smoothing: Vec<SmoothEntry>,
    /// Weight names of the linears kept in float (the spec's `exclude`, and the layers the
    /// sensitivity scan keeps).
    #[serde(default)]
    pub excluded: Vec<String>,
    /// The sensitivity scan's measure of each decoder block (empty: no scan).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensitivity: Vec<BlockSensitivity>,
}

/// How much int8 changes one decoder block's output, on the calibration set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockSensitivity {
    /// First layer of the block.
    pub first_layer: usize,
    /// One past its last layer.
    pub end_layer: usize,
    /// Whether the block ends with the output head (its output is then the logits).
    pub head: bool,
    /// Mean over positions of `|int8 output - fp32 output| / |fp32 output|` (L2 norms), the
    /// block run on the fp32 model's inputs with the table's scales.
    pub error: f64,
    /// Whether the scan keeps the block's linears in float.
    pub kept_float: bool,
}

impl QuantTable {
    /// Reads a table written by [`Self::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Config { path: path.to_path_buf(), message: e.to_string() })
    }

    /// Writes the table as JSON (atomically: a temporary file renamed into place).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Invalid(format!("calibration table: {e}")))?;
        write_atomic(path, &(text + "\n"))
    }

    /// What graph `graph` looks up: SmoothQuant factors, and activation scales when
    /// `quantize` (an fp32 build with SmoothQuant folded takes the factors alone).
    pub fn params(&self, graph: &str, quantize: bool) -> QuantParams {
        let mut p = QuantParams::default();
        for s in self.smoothing.iter().filter(|s| s.graph == graph) {
            let f: Arc<[f32]> = s.factors.clone().into();
            match s.kind {
                FoldKind::Norm => p.norm_divisors.insert(s.divided.clone(), f.clone()),
                FoldKind::Rows => p.row_divisors.insert(s.divided.clone(), f.clone()),
            };
            for l in &s.linears {
                p.column_factors.insert(l.clone(), f.clone());
            }
        }
        if quantize {
            for t in self.tensors.iter().filter(|t| t.graph == graph) {
                for c in &t.consumers {
                    if self.excluded.contains(c) {
                        p.float_linears.insert(c.clone());
                    } else {
                        p.act_scales.insert(c.clone(), t.range.scale);
                    }
                }
            }
        }
        p
    }

    /// The graphs the table has entries for.
    pub fn graphs(&self) -> Vec<&str> {
        let mut g: Vec<&str> = self.tensors.iter().map(|t| t.graph.as_str()).collect();
        g.dedup();
        g
    }

    /// TensorRT's calibration cache for `graph` (implicit quantization of the fp32 graph):
    /// `TRT-<version>-<algorithm>`, then `tensor: <scale as big-endian IEEE-754 hex>` lines.
    /// Only the linears' inputs are listed; TensorRT keeps other tensors in higher precision.
    pub fn trt_cache(&self, graph: &str) -> String {
        let algorithm = if self.method == "max" {
            "MinMaxCalibration"
        } else if self.method == "entropy" {
            "EntropyCalibration2"
        } else {
            "LegacyCalibration"
        };
        let mut s = format!("TRT-{}-{algorithm}\n", self.trt_version);
        for t in self.tensors.iter().filter(|t| t.graph == graph) {
            let range = t.unsmoothed.unwrap_or(t.range);
            let _ = writeln!(s, "{}: {}", t.tensor, scale_hex(range.scale));
        }
        s
    }

    /// Consumers with no entry, or with two (a sign the table and graph disagree).
    pub fn check(&self) -> Result<()> {
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        for t in &self.tensors {
            if !(t.range.scale > 0.0 && t.range.scale.is_finite()) {
                return Err(Error::Invalid(format!("calibration table: {} has scale {}", t.tensor, t.range.scale)));
            }
            for c in &t.consumers {
                *seen.entry((&t.graph, c)).or_default() += 1;
            }
        }
        if let Some(((g, c), _)) = seen.iter().find(|(_, n)| **n > 1) {
            return Err(Error::Invalid(format!("calibration table: {g} lists {c} twice")));
        }
        Ok(())
    }
}

/// `f32` bits as 8 lowercase hex digits (what TensorRT writes: the big-endian bytes).
pub fn scale_hex(scale: f32) -> String {
    format!("{:08x}", scale.to_bits())
}

/// The int8 range of a threshold.
pub fn range(amax: f32, threshold: f32) -> Range {
    Range { amax, threshold, scale: crate::weight_codes::int8::activation_scale(threshold) }
}

/// Writes `text` to `path` through a temporary file in the same directory.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn table() -> QuantTable {
        QuantTable {
            format: FORMAT,
            key: "k".into(),
            spec: "s".into(),
            checkpoint: "c".into(),
            method: "entropy".into(),
            smoothquant_alpha: 0.5,
            samples: 1,
            trt_version: 101300,
            tensors: vec![
                TensorEntry {
                    graph: "decoder".into(),
                    tensor: "layer0/Mul_9".into(),
                    consumers: vec!["q.weight".into(), "k.weight".into()],
                    channels: 4,
                    range: range(2.0, 1.27),
                    unsmoothed: Some(range(8.0, 6.35)),
                },
                TensorEntry {
                    graph: "vision".into(),
                    tensor: "LayerNormalization_3".into(),
                    consumers: vec!["fc1.weight".into()],
                    channels: 4,
                    range: range(1.0, 1.0),
                    unsmoothed: None,
                },
            ],
            smoothing: vec![SmoothEntry {
                graph: "decoder".into(),
                kind: FoldKind::Norm,
                divided: "ln.weight".into(),
                linears: vec!["q.weight".into(), "k.weight".into()],
                factors: vec![1.0, 2.0, 0.5, 1.0],
            }],
            excluded: Vec::new(),
            sensitivity: Vec::new(),
        }
    }

    #[test]
    fn trt_cache_lines_are_big_endian_hex_of_the_unsmoothed_scale() {
        let t = table();
        let cache = t.trt_cache("decoder");
        let mut lines = cache.lines();
        assert_eq!(lines.next(), Some("TRT-101300-EntropyCalibration2"));
        // 6.35 / 127 = 0.05 → 0x3d4ccccd.
        assert_eq!(lines.next(), Some("layer0/Mul_9: 3d4ccccd"));
        assert_eq!(lines.next(), None);
        assert_eq!(scale_hex(1.0), "3f800000");
    }

    #[test]
    fn params_per_graph_and_json_round_trip() {
        let t = table();
        let p = t.params("decoder", true);
        assert_eq!(p.act_scales.len(), 2);
        assert!((p.act_scales["k.weight"] - 0.01).abs() < 1e-7);
        assert_eq!(&*p.column_factors["q.weight"], &[1.0, 2.0, 0.5, 1.0]);
        assert!(p.norm_divisors.contains_key("ln.weight"));
        assert!(t.params("decoder", false).act_scales.is_empty());
        assert!(t.params("vision", true).norm_divisors.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        t.save(&path).unwrap();
        assert_eq!(QuantTable::load(&path).unwrap(), t);
        t.check().unwrap();
    }
}
