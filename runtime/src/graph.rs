//! One ONNX Runtime session per graph, checked against the manifest when it is created.
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{Outlet, TensorElementType, ValueType};

use crate::device::{self, Device, TensorRtOptions};
use crate::error::{Error, Result};
use crate::manifest::{DType, Dim, GraphEntry, Manifest, TensorSpec};
use crate::ort_env;

/// ONNX Runtime's session option allowing QDQ fusions with int8 (signed) activations.
pub const QDQ_INT8_ALLOWED: &str = "session.qdqisint8allowed";

/// Session settings shared by all graphs.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Where to run.
    pub device: Device,
    /// Intra-op threads (`None` = ONNX Runtime's default: one per core).
    pub threads: Option<usize>,
    /// ONNX Runtime's memory arena (faster, holds on to peak memory).
    pub arena: bool,
    /// TensorRT's profiles, caches and compiled graphs (the TensorRT devices only).
    pub tensorrt: TensorRtOptions,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, threads: None, arena: true, tensorrt: TensorRtOptions::default() }
    }
}

/// A loaded graph. ONNX Runtime's `Run` is thread-safe but `ort` takes `&mut Session`, so
/// concurrent requests take turns per call (one decode step at a time), never per answer.
pub struct Graph {
    role: &'static str,
    session: Mutex<Session>,
}

fn dtype_of(ty: TensorElementType) -> Option<DType> {
    match ty {
        TensorElementType::Float32 => Some(DType::F32),
        TensorElementType::Float16 => Some(DType::F16),
        TensorElementType::Int64 => Some(DType::I64),
        _ => None,
    }
}

/// Describes how `outlet` differs from `spec`, if it does.
fn mismatch(outlet: &Outlet, spec: &TensorSpec) -> Option<String> {
    let ValueType::Tensor { ty, shape, .. } = outlet.dtype() else {
        return Some(format!("{} is not a tensor", outlet.name()));
    };
    if dtype_of(*ty) != Some(spec.dtype) {
        return Some(format!("{} has element type {ty:?}, the manifest says {:?}", outlet.name(), spec.dtype));
    }
    let dims_ok = shape.len() == spec.shape.len()
        && shape.iter().zip(&spec.shape).all(|(&got, want)| match want {
            Dim::Fixed(n) => got == *n,
            Dim::Symbolic(_) => got < 0,
        });
    if !dims_ok {
        return Some(format!("{} has shape {:?}, the manifest says {spec}", outlet.name(), &shape[..]));
    }
    None
}

fn check_interface(file: &Path, kind: &str, outlets: &[Outlet], specs: &[TensorSpec]) -> Result<()> {
    let bad = |message: String| Err(Error::GraphMismatch { path: file.to_path_buf(), message });
    if outlets.len() != specs.len() {
        let names: Vec<&str> = outlets.iter().map(Outlet::name).collect();
        return bad(format!("{} {kind}s {names:?}, the manifest lists {}", outlets.len(), specs.len()));
    }
    for (outlet, spec) in outlets.iter().zip(specs) {
        if outlet.name() != spec.name {
            return bad(format!("{kind} {} where the manifest expects {}", outlet.name(), spec.name));
        }
        if let Some(m) = mismatch(outlet, spec) {
            return bad(m);
        }
    }
    Ok(())
}

impl Graph {
    /// Creates the session for graph `role` of `manifest` (its `entry`) in `dir` on
    /// `opts.device` and checks its interface against the manifest. A compiled graph made for
    /// this GPU and these versions (`vl-export compile`) is loaded instead of the ONNX one.
    pub fn load(
        dir: &Path,
        role: &'static str,
        entry: &GraphEntry,
        opts: &SessionOptions,
        manifest: &Manifest,
    ) -> Result<Self> {
        let env = ort_env::environment()?;
        let device = match opts.device {
            Device::Auto => Device::Auto.resolve(&ort_env::library_path()?)?.device,
            d => d,
        };
        let file = match device::compiled_file(dir, role, device, manifest, &opts.tensorrt)? {
            Some(compiled) => compiled,
            None => entry.file.clone(),
        };
        let path = dir.join(&file);
        let ort_err = |e: ort::Error| Error::Session { path: path.clone(), source: e };
        let builder = Session::builder(env)
            .and_then(|b| b.with_optimization_level(GraphOptimizationLevel::Level3).map_err(ort::Error::from))
            .and_then(|b| b.with_memory_pattern(opts.arena).map_err(ort::Error::from))
            // Lets the CPU provider fuse int8 QDQ pairs (int8 engines) into integer matmuls on
            // x86 too, where ONNX Runtime otherwise fuses only uint8 activations; no effect on
            // graphs without QDQ nodes.
            .and_then(|b| b.with_config_entry(QDQ_INT8_ALLOWED, "1").map_err(ort::Error::from))
            .map_err(ort_err)?;
        let mut builder =
            device::configure(builder, device, dir, role, entry, manifest, &opts.tensorrt).map_err(|e| match e {
                Error::Ort(source) => Error::Session { path: path.clone(), source },
                other => other,
            })?;
        if let Some(n) = opts.threads {
            builder = builder.with_intra_threads(n).map_err(|e| ort_err(e.into()))?;
        }
        let session = builder.commit_from_file(&path).map_err(ort_err)?;
        check_interface(&path, "input", session.inputs(), &entry.inputs)?;
        check_interface(&path, "output", session.outputs(), &entry.outputs)?;
        Ok(Self { role, session: Mutex::new(session) })
    }

    /// The graph's role in the manifest.
    pub fn role(&self) -> &'static str {
        self.role
    }

    /// Exclusive use of the session for one run.
    pub fn lock(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
