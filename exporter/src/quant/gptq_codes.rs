//! GPTQ during calibration, and the codes it leaves for the graph builder.
//!
//! Each linear input's Hessian (`X^T X`, [`Hessian`]) is summed while calibration runs the
//! graph or decoder block that computes it (pass 1); when that block closes, every linear
//! reading the input is quantized by GPTQ from the checkpoint's weight, its codes written to
//! the code directory, and the Hessians dropped. So memory holds one block's Hessians at a
//! time, never the model's: at 7B size, one layer's q/k/v, o, gate/up (4096²) and down
//! (11008²) sums in f32 are 0.7 GB, and factoring down_proj's takes two f64 buffers of 11008²
//! (1.9 GB) and its transposed weight in f64 (0.4 GB): about 3 GB at the peak (estimated from
//! the sizes; measured only at 135M: peak RssAnon 0.5 GB).
//!
//! The code directory lies beside the calibration table (same key: spec, media, checkpoint)
//! and names GPTQ's version, the bits and the block size; a build asking for the same reuses it (its `complete`
//! file says it was finished). One file per graph and weight: a 24-byte header (magic
//! `VLGPTQ1\0`, n, k, bits, block as u32 LE) then the packed codes, the f32 scales and the
//! packed zero points, in `MatMulNBits`' layout.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::quant::hessian::Hessian;
use crate::weight_codes::blocks::{BlockShape, QuantizedBlocks};
use crate::weight_codes::gptq::{self, Factor};
use crate::weight_codes::grid::GridFit;

const MAGIC: &[u8; 8] = b"VLGPTQ1\0";
/// Bumped when GPTQ's arithmetic or options change, so codes of an older one are not reused.
const GPTQ_VERSION: u32 = 1;
/// The file whose presence says the directory was completed.
const COMPLETE: &str = "complete";

/// What GPTQ should produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptqRequest {
    /// Bits of the linears (4 or 8).
    pub bits: u8,
    /// Bits of the output head (kept at 8 under 4-bit weights: see the decoder's `lm_head`).
    pub head_bits: u8,
    /// Columns per group (the `MatMulNBits` block).
    pub block: usize,
    /// Columns in decreasing order of the Hessian's diagonal, with groups fitted beforehand.
    pub act_order: bool,
    /// How each group's range is chosen.
    pub grid: GridFit,
}

impl GptqRequest {
    /// The directory's name beside the table `<base>.json`: the algorithm's version, bits
    /// (linears, head) and block size.
    pub fn dir(&self, base: &Path) -> PathBuf {
        PathBuf::from(format!(
            "{}.gptq{GPTQ_VERSION}-w{}h{}-g{}{}{}",
            base.display(),
            self.bits,
            self.head_bits,
            self.block,
            if self.act_order { "-act-order" } else { "" },
            if self.grid == GridFit::Mse { "-mse" } else { "" }
        ))
    }
}

/// GPTQ codes on disk, per graph and weight name.
#[derive(Debug, Clone)]
pub struct CodeDir {
    dir: PathBuf,
}

fn file_name(graph: &str, weight: &str) -> String {
    format!("{graph}.{weight}.codes")
}

impl CodeDir {
    /// The directory `dir` (created when written to).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Where it lies.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether a calibration finished writing it.
    pub fn is_complete(&self) -> bool {
        self.dir.join(COMPLETE).is_file()
    }

    /// Removes what an unfinished run left and creates the directory.
    pub fn start(&self) -> Result<()> {
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))
    }

    /// Marks it finished.
    pub fn finish(&self) -> Result<()> {
        let p = self.dir.join(COMPLETE);
        std::fs::write(&p, b"").map_err(|e| Error::io(&p, e))
    }

    /// Writes the codes of `weight` in graph `graph`.
    pub fn write(&self, graph: &str, weight: &str, s: BlockShape, q: &QuantizedBlocks) -> Result<()> {
        let mut bytes = MAGIC.to_vec();
        for v in [s.n, s.k, usize::from(s.bits), s.block] {
            bytes.extend_from_slice(&(v as u32).to_le_bytes());
        }
        bytes.extend_from_slice(&q.codes);
        q.scales.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
        bytes.extend_from_slice(q.zero_points.as_deref().unwrap_or_default());
        let p = self.dir.join(file_name(graph, weight));
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
    }

    /// The codes of `weight` in graph `graph`, which must have shape `s` (`None`: none were
    /// written for it).
    pub fn read(&self, graph: &str, weight: &str, s: BlockShape) -> Result<Option<QuantizedBlocks>> {
        let p = self.dir.join(file_name(graph, weight));
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&p, e)),
        };
        let bad = |what: String| Error::Invalid(format!("{}: {what} (remove the directory to redo GPTQ)", p.display()));
        let header: Vec<usize> = bytes
            .get(8..24)
            .filter(|_| bytes.starts_with(MAGIC))
            .ok_or_else(|| bad("not a GPTQ code file".into()))?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .collect();
        if header != [s.n, s.k, usize::from(s.bits), s.block] {
            return Err(bad(format!(
                "holds [n, k, bits, block] {header:?}, the graph needs {:?}",
                [s.n, s.k, usize::from(s.bits), s.block]
            )));
        }
        let kb = s.k_blocks();
        let (nc, ns, nz) = (s.n * kb * s.blob(), s.n * kb * 4, s.n * s.zero_row_bytes());
        if bytes.len() != 24 + nc + ns + nz {
            return Err(bad(format!("{} bytes, expected {}", bytes.len(), 24 + nc + ns + nz)));
        }
        let body = &bytes[24..];
        Ok(Some(QuantizedBlocks {
            codes: body[..nc].to_vec(),
            scales: body[nc..nc + ns].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            zero_points: Some(body[nc + ns..].to_vec()),
            k_blocks: kb,
        }))
    }
}

/// The codes of one graph: what its builder reads.
#[derive(Debug, Clone)]
pub struct GraphCodes {
    /// The directory.
    pub dir: CodeDir,
    /// The graph's name (`vision`, `image`, `decoder`).
    pub graph: String,
}

impl crate::onnx::BlockCodes for GraphCodes {
    /// The codes of `weight`, which must have shape `s`; an error if GPTQ left none for it.
    fn read(&self, weight: &str, s: BlockShape) -> Result<QuantizedBlocks> {
        self.dir.read(&self.graph, weight, s)?.ok_or_else(|| {
            Error::Invalid(format!(
                "GPTQ left no codes for {weight} in {} ({}): calibration did not tap its input",
                self.graph,
                self.dir.path().display()
            ))
        })
    }
}

/// Quantizes, by GPTQ, every linear reading each of `inputs` (its consumers' weight names and
/// its Hessian) from the checkpoint's weights, and writes the codes under graph `graph`.
/// `head` is the output head's weight name (it takes `req.head_bits`).
pub fn quantize_block(
    ck: &Checkpoint,
    graph: &str,
    inputs: Vec<(&[String], Hessian)>,
    head: &str,
    req: GptqRequest,
    out: &CodeDir,
) -> Result<()> {
    let mut done: HashMap<&str, ()> = HashMap::new();
    for (consumers, h) in inputs {
        let k = h.k();
        let factor = Factor::new(h.finish(), k, req.act_order)
            .map_err(|source| Error::Gptq { weight: consumers.join(", "), source })?;
        for w in consumers {
            if done.insert(w.as_str(), ()).is_some() {
                continue;
            }
            let shape =
                ck.store.shape(w).ok_or_else(|| Error::MissingTensor { name: w.clone(), dir: ck.dir.clone() })?;
            let [n, kw] = shape[..] else {
                return Err(Error::Invalid(format!("GPTQ: {w} has shape {shape:?}, not a linear weight")));
            };
            if kw != k {
                return Err(Error::Invalid(format!("GPTQ: {w} has {kw} inputs, its tapped input {k} channels")));
            }
            let values = ck.store.f32(w, &[n, k])?;
            let bits = if w == head { req.head_bits } else { req.bits };
            let q = gptq::quantize(&values, n, &factor, bits, req.block, req.grid);
            out.write(graph, w, BlockShape { n, k, bits, block: req.block }, &q)?;
        }
    }
    Ok(())
}
