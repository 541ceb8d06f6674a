//! Checks engine files against the manifest's SHA-256, remembering files already verified
//! (by size and modification time) so a multi-gigabyte engine is not rehashed on every start.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// The cache file inside the engine directory.
pub const CACHE_FILE: &str = ".vl-verified.json";

/// How thoroughly to check graph files at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Hash files not seen before (or changed since, by size or mtime).
    #[default]
    Cached,
    /// Hash every file.
    Always,
    /// Only check that files exist with the manifest's sizes.
    SizesOnly,
}

#[derive(Serialize, Deserialize, PartialEq, Clone)]
struct Stamp {
    bytes: u64,
    mtime_ns: u128,
    sha256: String,
}

fn stamp_of(path: &Path) -> Result<(u64, u128)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos());
    Ok((meta.len(), mtime.unwrap_or_default()))
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Every file the manifest hashes: (file name, bytes, sha256).
fn files(manifest: &Manifest) -> Vec<(&str, u64, &str)> {
    let mut out = Vec::new();
    for (_, g) in manifest.graphs.iter() {
        out.push((g.file.as_str(), g.bytes, g.sha256.as_str()));
        if let Some(d) = &g.data {
            out.push((d.file.as_str(), d.bytes, d.sha256.as_str()));
        }
    }
    out
}

/// Checks every graph and data file of `manifest` in `dir`.
pub fn verify_engine(dir: &Path, manifest: &Manifest, mode: Verify) -> Result<()> {
    let cache_path = dir.join(CACHE_FILE);
    let mut cache: BTreeMap<String, Stamp> = match mode {
        Verify::Cached => {
            std::fs::read_to_string(&cache_path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
        }
        _ => BTreeMap::new(),
    };
    let before = cache.clone();
    for (file, bytes, sha) in files(manifest) {
        let path = dir.join(file);
        let (len, mtime_ns) = stamp_of(&path)?;
        if len != bytes {
            return Err(Error::Checksum {
                path,
                expected: format!("{sha} ({bytes} bytes)"),
                found: format!("a file of {len} bytes"),
            });
        }
        if mode == Verify::SizesOnly {
            continue;
        }
        let known = cache.get(file).is_some_and(|s| s.bytes == len && s.mtime_ns == mtime_ns && s.sha256 == sha);
        if known {
            continue;
        }
        let found = sha256_file(&path)?;
        if found != sha {
            return Err(Error::Checksum { path, expected: sha.to_string(), found });
        }
        cache.insert(file.to_string(), Stamp { bytes: len, mtime_ns, sha256: found });
    }
    if cache != before {
        // A read-only engine directory only loses the cache, not the check.
        if let Ok(text) = serde_json::to_string_pretty(&cache) {
            let _ = std::fs::write(&cache_path, text);
        }
    }
    Ok(())
}
