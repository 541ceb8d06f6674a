//! Which weight files a checkpoint directory holds: safetensors (preferred, as transformers
//! prefers them) or PyTorch `.bin` zips, each single or sharded with an index whose
//! `weight_map` names the shard of every tensor.
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::error::{Error, Result};

/// The format of a checkpoint's weight files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// `model.safetensors` or `model-0000K-of-0000N.safetensors`.
    Safetensors,
    /// `pytorch_model.bin` or `pytorch_model-0000K-of-0000N.bin` (`torch.save` zips).
    TorchBin,
}

/// The weight files of a checkpoint and their format.
#[derive(Debug)]
pub struct Shards {
    /// Their format.
    pub format: WeightsFormat,
    /// The files, in name order.
    pub files: Vec<PathBuf>,
}

/// A tensor found in a shard: dtype, shape and the byte range of its elements in the file.
pub(super) struct Located {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// First byte in the file.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// The shard files an index names, each checked to exist.
fn from_index(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Config { path: index.to_path_buf(), message: e.to_string() })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Config { path: index.to_path_buf(), message: "no weight_map object".into() })?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(Error::MissingShard { shard: missing.clone(), index: index.to_path_buf() });
    }
    Ok(files)
}

/// The weight files in `dir`: an index or a single file, safetensors first.
pub fn find(dir: &Path) -> Result<Shards> {
    let kinds = [
        (WeightsFormat::Safetensors, "model.safetensors.index.json", "model.safetensors"),
        (WeightsFormat::TorchBin, "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ];
    for (format, index, single) in kinds {
        let index = dir.join(index);
        if index.exists() {
            return Ok(Shards { format, files: from_index(dir, &index)? });
        }
        let single = dir.join(single);
        if single.exists() {
            return Ok(Shards { format, files: vec![single] });
        }
    }
    Err(Error::Invalid(format!(
        "{}: no weights: no model.safetensors(.index.json) and no pytorch_model.bin(.index.json)",
        dir.display()
    )))
}
