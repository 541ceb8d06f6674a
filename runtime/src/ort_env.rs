//! Finding and loading the ONNX Runtime shared library, and execution providers.
//!
//! The library is looked up in this order: `ORT_DYLIB_PATH`; the project's `.venv` (where
//! `make setup` installs the `onnxruntime` wheel); beside the executable. A missing library is
//! an error that says how to get one, never the panic `ort` gives on its own.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::error::{Error, Result};

static ENVIRONMENT: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();

fn is_ort_library(name: &str) -> bool {
    name.starts_with("libonnxruntime.so") || name == "libonnxruntime.dylib" || name == "onnxruntime.dll"
}

fn library_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(is_ort_library))
        .map(|e| e.path())
        .collect();
    found.sort();
    found.pop()
}

fn venv_library(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    lib.filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/onnxruntime/capi"))
        .find_map(|capi| library_in(&capi))
}

/// The places searched, in order, each with what was found there.
pub fn candidates() -> Vec<(String, Option<PathBuf>)> {
    let mut out = Vec::new();
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) => {
            let p = PathBuf::from(p);
            let found = p.is_file().then(|| p.clone());
            out.push((format!("ORT_DYLIB_PATH={}", p.display()), found));
        }
        None => out.push(("ORT_DYLIB_PATH (unset)".into(), None)),
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv");
    out.push((format!("project venv {}", venv.display()), venv_library(&venv)));
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        out.push((format!("beside the executable {}", dir.display()), library_in(&dir)));
    }
    out
}

/// The ONNX Runtime library this process would load.
pub fn find_library() -> Result<PathBuf> {
    let places = candidates();
    if let Some(found) = places.iter().find_map(|(_, f)| f.clone()) {
        return Ok(found);
    }
    let looked: Vec<String> = places.into_iter().map(|(p, _)| p).collect();
    Err(Error::OrtLoad(format!(
        "libonnxruntime not found; looked in: {}. Run `make setup` (installs the onnxruntime==1.31.1 \
         wheel into .venv) or set ORT_DYLIB_PATH to a libonnxruntime.so of version 1.31 or newer",
        looked.join("; ")
    )))
}

/// The library [`environment`] loaded (or would load).
pub fn library_path() -> Result<PathBuf> {
    static LOADED: OnceLock<PathBuf> = OnceLock::new();
    if let Some(p) = LOADED.get() {
        return Ok(p.clone());
    }
    let found = find_library()?;
    Ok(LOADED.get_or_init(|| found).clone())
}

/// ONNX Runtime's version, from the library's file name (`libonnxruntime.so.1.31.1`), or
/// `unknown`.
pub fn version_of(library: &Path) -> String {
    let name = library.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    match name.split_once(".so.") {
        Some((_, v)) if !v.is_empty() => v.to_string(),
        _ => "unknown".into(),
    }
}

/// Loads ONNX Runtime once per process and returns its environment.
pub fn environment() -> Result<&'static Environment> {
    let env = ENVIRONMENT.get_or_init(|| {
        let path = library_path().map_err(|e| e.to_string())?;
        let builder = ort::init_from(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        builder.with_name("vl").build().map_err(|e| format!("{}: {e}", path.display()))
    });
    env.as_ref().map_err(|e| Error::OrtLoad(e.clone()))
}
