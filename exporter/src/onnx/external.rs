//! Streams initializer bytes into one `.onnx.data` file per graph, hashing as it writes.
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
}

/// Where one tensor's bytes landed.
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
