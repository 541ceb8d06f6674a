//! Registering a device's execution providers on a session, and picking a compiled graph.
use std::path::Path;
use std::sync::OnceLock;

use ort::ep;
use ort::session::builder::SessionBuilder;

use super::compiled::{Compilation, CompiledCheck, check_compiled};
use super::probe::{self, RTX_EP_NAME};
use super::tensorrt::{self, ShapeLimits, TensorRtOptions};
use super::{Device, cuda_driver};
use crate::error::{Error, Result};
use crate::manifest::{GraphEntry, Manifest};
use crate::ort_env;

/// The name a TensorRT device goes by in manifests and cache directories.
pub fn kind(device: Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Auto => "auto",
        Device::Cuda { .. } => "cuda",
        Device::TensorRt { .. } => "tensorrt",
        Device::TensorRtRtx { .. } => "tensorrt-rtx",
    }
}

fn unavailable(device: Device, reason: impl std::fmt::Display) -> Error {
    Error::DeviceUnavailable { device: device.to_string(), reason: reason.to_string() }
}

/// Registers `device`'s providers on `builder` for graph `role` of `manifest` (`entry`).
/// Every provider fails the session when it cannot load: no silent CPU run.
pub fn configure(
    builder: SessionBuilder,
    device: Device,
    dir: &Path,
    role: &str,
    entry: &GraphEntry,
    manifest: &Manifest,
    options: &TensorRtOptions,
) -> Result<SessionBuilder> {
    let library = ort_env::library_path()?;
    probe::check_libraries(device, &library).map_err(|m| unavailable(device, m))?;
    let limits = ShapeLimits::new(manifest, options);
    let cache = tensorrt::cache_dir(dir, options, kind(device));
    let providers = match device {
        Device::Cpu | Device::Auto => vec![ep::CPU::default().build().error_on_failure()],
        Device::Cuda { device_id } => vec![ep::CUDA::default().with_device_id(device_id).build().error_on_failure()],
        Device::TensorRt { device_id } => {
            std::fs::create_dir_all(&cache).map_err(|e| Error::io(&cache, e))?;
            vec![
                tensorrt::classic_provider(device_id, role, entry, &limits, manifest.precision, &cache, options)?,
                ep::CUDA::default().with_device_id(device_id).build().error_on_failure(),
            ]
        }
        Device::TensorRtRtx { device_id } => {
            std::fs::create_dir_all(&cache).map_err(|e| Error::io(&cache, e))?;
            let rtx_options = tensorrt::rtx_options(role, entry, &limits, &cache, options)?;
            return with_rtx(builder, device, device_id, &library, &rtx_options);
        }
    };
    Ok(builder.with_execution_providers(providers).map_err(ort::Error::from)?)
}

/// The RTX plugin is registered with the environment once per process.
fn register_rtx(library: &Path) -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let plugin = probe::rtx_provider(library).map_err(|m| m.to_string())?;
            let env = ort_env::environment().map_err(|e| e.to_string())?;
            env.register_ep_library(RTX_EP_NAME, &plugin).map_err(|e| format!("{}: {e}", plugin.display()))
        })
        .clone()
}

fn with_rtx(
    builder: SessionBuilder,
    device: Device,
    ordinal: i32,
    library: &Path,
    options: &[(String, String)],
) -> Result<SessionBuilder> {
    register_rtx(library).map_err(|e| unavailable(device, e))?;
    let env = ort_env::environment()?;
    let mut gpus: Vec<_> = env.devices().filter(|d| d.ep().is_ok_and(|name| name == RTX_EP_NAME)).collect();
    gpus.sort_by_key(|d| d.hardware_device().id());
    let count = gpus.len();
    let Some(gpu) = gpus.into_iter().nth(ordinal.max(0) as usize) else {
        return Err(unavailable(device, format!("the TensorRT for RTX provider sees {count} GPU(s)")));
    };
    Ok(builder.with_devices([gpu], Some(options)).map_err(ort::Error::from)?)
}

/// TensorRT's version as its library reports it (`getInferLibVersion`), once loaded.
fn tensorrt_version(device: Device) -> String {
    let soname = match device {
        Device::TensorRt { .. } => "libnvinfer.so.10",
        Device::TensorRtRtx { .. } => "libtensorrt_rtx.so.1",
        _ => return String::new(),
    };
    // SAFETY: the library is already loaded by the device check; `getInferLibVersion` takes no
    // arguments and returns an int (NvInferRuntime.h).
    unsafe {
        let Ok(lib) = libloading::Library::new(soname) else { return "unknown".into() };
        let Ok(get) = lib.get::<unsafe extern "C" fn() -> i32>(b"getInferLibVersion\0") else {
            return "unknown".into();
        };
        let v = get();
        format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
    }
}

/// This machine as a [`Compilation`] for `device` (no graphs): what a compiled graph must
/// have been built for to be used here.
pub fn this_machine(device: Device) -> Result<Compilation> {
    let library = ort_env::library_path()?;
    let ordinal = device.gpu().ok_or_else(|| unavailable(device, "not a GPU device"))?;
    probe::check_libraries(device, &library).map_err(|m| unavailable(device, m))?;
    let gpu = cuda_driver::gpu_info(ordinal).map_err(|e| unavailable(device, probe::Missing::Driver(e)))?;
    Ok(Compilation {
        device: kind(device).into(),
        gpu: gpu.name,
        compute_capability: gpu.compute_capability,
        tensorrt_version: tensorrt_version(device),
        onnxruntime_version: ort_env::version_of(&library),
        graphs: Vec::new(),
    })
}

/// The compiled graph to load for `role` on `device`, if the engine has one made for this
/// machine; `None` to build from the ONNX graph. A compilation for another machine is rebuilt
/// from the ONNX graph (with a warning on stderr) or refused, per `options.compiled`.
pub fn compiled_file(
    dir: &Path,
    role: &str,
    device: Device,
    manifest: &Manifest,
    options: &TensorRtOptions,
) -> Result<Option<String>> {
    if !device.is_tensorrt() || !manifest.compiled.iter().any(|c| c.device == kind(device)) {
        return Ok(None);
    }
    let here = this_machine(device)?;
    match check_compiled(&manifest.compiled, kind(device), &here, options.compiled) {
        Ok(CompiledCheck::Use(c)) => Ok(c.graphs.iter().find(|g| g.role == role).map(|g| g.file.clone())),
        Ok(CompiledCheck::None) => Ok(None),
        Ok(CompiledCheck::Rebuild(why)) => {
            eprintln!("warning: {}: {why}; building TensorRT engines from the ONNX graphs", dir.display());
            Ok(None)
        }
        Err(why) => Err(Error::Manifest {
            path: dir.join(crate::manifest::MANIFEST_FILE),
            message: format!("{why} (CompiledPolicy::Fail)"),
        }),
    }
}
