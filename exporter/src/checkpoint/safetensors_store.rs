//! Memory-mapped weight shards, safetensors or PyTorch `.bin` (single file or sharded with an
//! index), read tensor by tensor.
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::shards::{self, Located, WeightsFormat};
use super::torch_store;
use crate::error::{Error, Result};

struct Shard {
    path: PathBuf,
    map: Mmap,
}

struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// All tensors of a checkpoint directory, memory-mapped; nothing is read until asked for.
pub struct TensorStore {
    dir: PathBuf,
    format: WeightsFormat,
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
}

/// Why the safetensors parser rejected `file`, naming the tensor at fault where one can be found.
///
/// The parser checks offsets in file order, so a tensor pointing past the end is reported as a
/// bad offset of its neighbour and a truncated file as "not fully covered"; both are worded here.
fn explain(file: &[u8], err: safetensors::SafeTensorError) -> String {
    let header_len = file.get(..8).and_then(|n| n.try_into().ok()).map(u64::from_le_bytes);
    let Some(header_len) = header_len.and_then(|n| usize::try_from(n).ok()) else {
        return format!("{} bytes, too short for a header ({err})", file.len());
    };
    let Some(header) = file.get(8..).and_then(|rest| rest.get(..header_len)) else {
        return format!(
            "header of {header_len} bytes runs past the end of the {}-byte file; truncated? ({err})",
            file.len()
        );
    };
    let data_len = (file.len() - 8 - header_len) as u64;
    let Ok(tensors) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(header) else {
        return err.to_string();
    };
    let offsets = |info: &serde_json::Value| -> Option<(u64, u64)> {
        let o = info.get("data_offsets")?;
        Some((o.get(0)?.as_u64()?, o.get(1)?.as_u64()?))
    };
    let past_end = tensors
        .iter()
        .filter_map(|(name, info)| offsets(info).map(|(start, end)| (name, start, end)))
        .filter(|&(_, _, end)| end > data_len)
        .min_by_key(|&(_, start, _)| start);
    match past_end {
        Some((name, start, end)) => format!(
            "tensor {name} lies at data bytes {start}..{end}, past the end of the {data_len} bytes of data; truncated?"
        ),
        None => err.to_string(),
    }
}

/// Name, dtype, shape and byte range of every tensor of the safetensors file `map` (at `path`).
fn safetensors_entries(path: &Path, map: &[u8]) -> Result<Vec<(String, Located)>> {
    let bad =
        |e: safetensors::SafeTensorError| Error::Safetensors { path: path.to_path_buf(), message: explain(map, e) };
    let (header_len, metadata) = SafeTensors::read_metadata(map).map_err(bad)?;
    let base = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let (start, end) = info.data_offsets;
        if base + end > map.len() {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                message: format!("tensor {name} ends past the end of the file"),
            });
        }
        out.push((
            name,
            Located { dtype: info.dtype, shape: info.shape.clone(), start: base + start, end: base + end },
        ));
    }
    Ok(out)
}

impl TensorStore {
    /// Maps every shard of the checkpoint in `dir` and indexes its tensors.
    pub fn open(dir: &Path) -> Result<Self> {
        let found = shards::find(dir)?;
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        for path in found.files {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the map is read-only; a checkpoint changed on disk while we export is
            // the user's race, and at worst gives wrong weights, never memory unsafety in Rust.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let shard = shards.len();
            let found = match found.format {
                WeightsFormat::Safetensors => safetensors_entries(&path, &map)?,
                WeightsFormat::TorchBin => torch_store::read(&path, &map)?,
            };
            for (name, Located { dtype, shape, start, end }) in found {
                entries.insert(name, Entry { shard, dtype, shape, start, end });
            }
            shards.push(Shard { path, map });
        }
        Ok(Self { dir: dir.to_path_buf(), format: found.format, shards, entries })
    }

    /// The format of the checkpoint's weight files.
    pub fn format(&self) -> WeightsFormat {
        self.format
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The dtype of the first tensor, as the checkpoint's weight type.
    pub fn dominant_dtype(&self) -> String {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for e in self.entries.values() {
            *counts.entry(format!("{:?}", e.dtype).to_lowercase()).or_default() += 1;
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d).unwrap_or_default()
    }

    /// Reads `name` as f32, checking it has `expected` shape.
    pub fn f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.to_string(), dir: self.dir.clone() })?;
        if entry.shape != expected {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let shard = &self.shards[entry.shard];
        let bytes = &shard.map[entry.start..entry.end];
        let count: usize = expected.iter().product();
        let width = match entry.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(Error::UnsupportedDtype { name: name.to_string(), dtype: format!("{other:?}") });
            }
        };
        if bytes.len() != count * width {
            return Err(Error::Safetensors {
                path: shard.path.clone(),
                message: format!("tensor {name} holds {} bytes for {count} elements", bytes.len()),
            });
        }
        let values = match entry.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        Ok(values)
    }
}
