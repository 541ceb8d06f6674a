//! `vl-export compile`: builds the TensorRT engines of an engine directory's graphs on the GPU
//! it runs on and writes them as ONNX Runtime EP-context models (`trt/<role>_ctx.onnx` beside
//! the engine files), recording in the manifest the GPU, its compute capability and the
//! TensorRT and ONNX Runtime versions, so that a later load uses them only on a match.
use std::path::Path;

use ort::session::Session;

use super::compiled::{Compilation, CompiledGraph};
use super::session::{configure, kind, this_machine};
use super::{Device, TensorRtOptions};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::ort_env;

/// The directory of compiled graphs inside an engine directory.
pub const COMPILED_DIR: &str = "trt";

/// Compiles every graph TensorRT runs (vision, image, embed and the standard decoder) of the
/// engine in `dir` for `device` (a TensorRT device), and records the compilation in the
/// manifest, replacing an earlier one for the same device kind.
pub fn compile_engine(dir: &Path, device: Device, options: &TensorRtOptions) -> Result<Compilation> {
    if !device.is_tensorrt() {
        return Err(Error::DeviceUnavailable {
            device: device.to_string(),
            reason: "only the TensorRT devices (tensorrt, tensorrt-rtx) compile ahead of time".into(),
        });
    }
    let mut here = this_machine(device)?;
    let mut manifest = Manifest::load(dir)?;
    let out = dir.join(COMPILED_DIR);
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let g = &manifest.graphs;
    for (role, entry) in [("vision", &g.vision), ("image", &g.image), ("embed", &g.embed), ("decoder", &g.decoder)] {
        let file = format!("{COMPILED_DIR}/{role}_{}_ctx.onnx", kind(device));
        compile_graph(dir, role, entry, &manifest, device, options, &dir.join(&file))?;
        here.graphs.push(CompiledGraph { role: role.into(), file });
    }
    manifest.compiled.retain(|c| c.device != here.device);
    manifest.compiled.push(here.clone());
    manifest.save(dir)?;
    Ok(here)
}

fn compile_graph(
    dir: &Path,
    role: &str,
    entry: &crate::manifest::GraphEntry,
    manifest: &Manifest,
    device: Device,
    options: &TensorRtOptions,
    context: &Path,
) -> Result<()> {
    let path = dir.join(&entry.file);
    let ort_err = |e: ort::Error| Error::Session { path: path.clone(), source: e };
    let env = ort_env::environment()?;
    let context_path = context.to_string_lossy().into_owned();
    // ONNX Runtime's EP-context options: the session writes a model whose nodes hold the built
    // engine (embed mode 0: the engine in its own file beside it).
    let builder = Session::builder(env)
        .and_then(|b| b.with_config_entry("ep.context_enable", "1").map_err(ort::Error::from))
        .and_then(|b| b.with_config_entry("ep.context_file_path", &context_path).map_err(ort::Error::from))
        .and_then(|b| b.with_config_entry("ep.context_embed_mode", "0").map_err(ort::Error::from))
        .map_err(ort_err)?;
    let mut builder = configure(builder, device, dir, role, entry, manifest, options)?;
    let session = builder.commit_from_file(&path).map_err(ort_err)?;
    drop(session);
    if !context.is_file() {
        return Err(Error::Manifest {
            path: path.clone(),
            message: format!("ONNX Runtime built the {role} graph but wrote no EP-context model at {context_path}"),
        });
    }
    Ok(())
}
