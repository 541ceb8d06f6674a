//! Streams initializer bytes into one `.onnx.data` file per graph, hashing as it writes.
//!
//! Two graphs may share one file (the decoder's two attention variants): a tensor written once
//! under a name is referenced again, not written twice.
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// ONNX Runtime memory-maps external data whose offsets are page aligned.
const ALIGN: u64 = 4096;

/// The writer of a graph's external data file.
pub struct ExternalData {
    path: PathBuf,
    file_name: String,
    out: BufWriter<File>,
    hasher: Sha256,
    offset: u64,
    written: HashMap<String, Written>,
}

/// A tensor already in the file: its ONNX element type, shape and bytes.
#[derive(Debug, Clone)]
pub struct Written {
    /// `TensorProto.DataType` code.
    pub data_type: i32,
    /// Shape.
    pub dims: Vec<i64>,
    /// Where its bytes are.
    pub extent: Extent,
}

/// Where one tensor's bytes landed.
#[derive(Debug, Clone, Copy)]
pub struct Extent {
    /// Byte offset in the data file.
    pub offset: u64,
    /// Byte length.
    pub length: u64,
}

impl ExternalData {
    /// Creates `path` (its file name is what the graph will reference).
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Invalid(format!("{}: not a valid file name", path.display())))?
            .to_string();
        Ok(Self {
            path: path.to_path_buf(),
            file_name,
            out: BufWriter::with_capacity(1 << 22, file),
            hasher: Sha256::new(),
            offset: 0,
            written: HashMap::new(),
        })
    }

    /// The file name the graph's tensors reference (relative to the graph).
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    /// Appends `bytes` at the next aligned offset.
    pub fn append(&mut self, bytes: &[u8]) -> Result<Extent> {
        let pad = (ALIGN - self.offset % ALIGN) % ALIGN;
        if pad > 0 {
            self.write(&vec![0u8; pad as usize])?;
        }
        let offset = self.offset;
        self.write(bytes)?;
        Ok(Extent { offset, length: bytes.len() as u64 })
    }

    /// Appends tensor `name`, or returns where it already is when an earlier graph wrote it.
    /// A name written again with another type or shape is an error, never a silent reuse.
    pub fn tensor(&mut self, name: &str, data_type: i32, dims: &[i64], bytes: &[u8]) -> Result<Extent> {
        if let Some(w) = self.written(name, data_type, dims)? {
            if w.extent.length != bytes.len() as u64 {
                return Err(Error::Invalid(format!(
                    "{}: tensor {name} written with {} bytes, now {}",
                    self.path.display(),
                    w.extent.length,
                    bytes.len()
                )));
            }
            return Ok(w.extent);
        }
        let extent = self.append(bytes)?;
        self.written.insert(name.to_string(), Written { data_type, dims: dims.to_vec(), extent });
        Ok(extent)
    }

    /// Tensor `name` if it is in the file already; an error if it is there with another type
    /// or shape.
    pub fn written(&self, name: &str, data_type: i32, dims: &[i64]) -> Result<Option<Written>> {
        match self.written.get(name) {
            None => Ok(None),
            Some(w) if w.data_type == data_type && w.dims == dims => Ok(Some(w.clone())),
            Some(w) => Err(Error::Invalid(format!(
                "{}: tensor {name} written as type {} {:?}, asked again as type {data_type} {dims:?}",
                self.path.display(),
                w.data_type,
                w.dims
            ))),
        }
    }

    /// Whether tensor `name` is in the file already.
    pub fn holds(&self, name: &str) -> bool {
        self.written.contains_key(name)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| Error::io(&self.path, e))?;
        self.hasher.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Flushes the file and returns its size and SHA-256 (hex).
    pub fn finish(mut self) -> Result<(u64, String)> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        let file = self.out.into_inner().map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok((self.offset, hex::encode(self.hasher.finalize())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_written_again_is_referenced_and_a_conflicting_one_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut data = ExternalData::create(&dir.path().join("g.onnx.data")).unwrap_or_else(|e| panic!("{e}"));
        let a = data.tensor("w", 1, &[2], &[0u8; 8]).unwrap_or_else(|e| panic!("{e}"));
        let b = data.tensor("v", 1, &[1], &[1u8; 4]).unwrap_or_else(|e| panic!("{e}"));
        let again = data.tensor("w", 1, &[2], &[0u8; 8]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((again.offset, again.length), (a.offset, a.length));
        assert_eq!(b.offset, ALIGN);
        assert!(data.tensor("w", 10, &[2], &[0u8; 4]).is_err(), "another type under the same name");
        assert!(data.tensor("w", 1, &[2], &[0u8; 4]).is_err(), "another length under the same name");
        let (bytes, _) = data.finish().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bytes, ALIGN + 4, "nothing was written twice");
    }
}
