//! Where the graphs run: the CPU, or an NVIDIA GPU through CUDA, TensorRT (ONNX Runtime's
//! classic provider, TensorRT 10) or TensorRT for RTX (NVIDIA's plugin provider).
//!
//! A GPU device is checked before any session is made ([`probe`]): the driver, a GPU build of
//! ONNX Runtime, the CUDA, cuDNN and TensorRT libraries it links. What is missing is named in a
//! [`Error::DeviceUnavailable`] with how to get it, never a silent CPU run. `auto` takes CUDA
//! when it can be used and the CPU otherwise, and says why ([`Resolved::reason`]); TensorRT is
//! never chosen by `auto`, since its first run of a graph builds an engine for minutes.
mod compile;
mod compiled;
mod cuda_driver;
pub mod probe;
mod session;
pub mod tensorrt;

use std::fmt;
use std::str::FromStr;

pub use compile::{COMPILED_DIR, compile_engine};
pub use compiled::{Compilation, CompiledCheck, CompiledGraph, CompiledPolicy, check_compiled};
pub use cuda_driver::{GpuInfo, gpu_info};
pub use session::{compiled_file, configure, kind, this_machine};
pub use tensorrt::{ShapeLimits, TensorRtOptions};

use crate::error::{Error, Result};

/// Where ONNX Runtime runs the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU provider (always available).
    #[default]
    Cpu,
    /// NVIDIA GPU through the CUDA provider (needs the `onnxruntime-gpu` library).
    Cuda {
        /// GPU ordinal.
        device_id: i32,
    },
    /// NVIDIA GPU through ONNX Runtime's TensorRT provider (needs the GPU library and
    /// TensorRT 10's `libnvinfer.so.10`); nodes TensorRT cannot take run on CUDA.
    TensorRt {
        /// GPU ordinal.
        device_id: i32,
    },
    /// NVIDIA GPU through the TensorRT for RTX plugin provider (the
    /// `onnxruntime-ep-nv-tensorrt-rtx-cu13` wheel; Ampere and later RTX GPUs).
    TensorRtRtx {
        /// GPU ordinal.
        device_id: i32,
    },
    /// CUDA where it can be used, else the CPU ([`Device::resolve`] says which and why).
    Auto,
}

/// The device [`Device::resolve`] settled on, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Never [`Device::Auto`].
    pub device: Device,
    /// One line: why this device (for `auto`, why not the others).
    pub reason: String,
}

impl Device {
    /// The GPU ordinal, for GPU devices.
    pub fn gpu(self) -> Option<i32> {
        match self {
            Device::Cuda { device_id } | Device::TensorRt { device_id } | Device::TensorRtRtx { device_id } => {
                Some(device_id)
            }
            Device::Cpu | Device::Auto => None,
        }
    }

    /// Whether ONNX Runtime's TensorRT builds the engines (standard-operator graphs only).
    pub fn is_tensorrt(self) -> bool {
        matches!(self, Device::TensorRt { .. } | Device::TensorRtRtx { .. })
    }

    /// Checks that this device can be used with the ONNX Runtime library at `ort_library`
    /// and, for `auto`, picks one. An explicit device that cannot be used is an error naming
    /// what is missing.
    pub fn resolve(self, ort_library: &std::path::Path) -> Result<Resolved> {
        match self {
            Device::Cpu => Ok(Resolved { device: self, reason: "the CPU was asked for".into() }),
            Device::Auto => {
                let cuda = Device::Cuda { device_id: 0 };
                match probe::check(cuda, ort_library) {
                    Ok(info) => Ok(Resolved { device: cuda, reason: format!("auto: CUDA on GPU 0 ({})", info.name) }),
                    Err(why) => Ok(Resolved { device: Device::Cpu, reason: format!("auto: the CPU, since {why}") }),
                }
            }
            gpu => match probe::check(gpu, ort_library) {
                Ok(info) => Ok(Resolved { device: gpu, reason: format!("{gpu} was asked for ({})", info.name) }),
                Err(why) => Err(Error::DeviceUnavailable { device: gpu.to_string(), reason: why.to_string() }),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, id) = match *self {
            Device::Cpu => return f.write_str("cpu"),
            Device::Auto => return f.write_str("auto"),
            Device::Cuda { device_id } => ("cuda", device_id),
            Device::TensorRt { device_id } => ("tensorrt", device_id),
            Device::TensorRtRtx { device_id } => ("tensorrt-rtx", device_id),
        };
        if id == 0 { f.write_str(name) } else { write!(f, "{name}:{id}") }
    }
}

/// A device name that is not one of `cpu`, `cuda[:N]`, `tensorrt[:N]`, `tensorrt-rtx[:N]`, `auto`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device {0:?}: expected cpu, cuda[:N], tensorrt[:N], tensorrt-rtx[:N] or auto")]
pub struct ParseDeviceError(String);

impl FromStr for Device {
    type Err = ParseDeviceError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || ParseDeviceError(s.to_string());
        let (name, id) = match s.split_once(':') {
            Some((name, id)) => (name, id.parse::<i32>().ok().filter(|n| *n >= 0).ok_or_else(bad)?),
            None => (s, 0),
        };
        let device = match name.to_ascii_lowercase().as_str() {
            "cpu" if id == 0 => Device::Cpu,
            "auto" if id == 0 => Device::Auto,
            "cuda" => Device::Cuda { device_id: id },
            "tensorrt" | "trt" => Device::TensorRt { device_id: id },
            "tensorrt-rtx" | "nvtensorrtrtx" => Device::TensorRtRtx { device_id: id },
            _ => return Err(bad()),
        };
        Ok(device)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in ["cpu", "auto", "cuda", "cuda:1", "tensorrt", "tensorrt:3", "tensorrt-rtx", "tensorrt-rtx:2"] {
            assert_eq!(name.parse::<Device>().unwrap().to_string(), name);
        }
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda { device_id: 0 });
        for bad in ["", "gpu", "cuda:", "cuda:-1", "cuda:x", "cpu:1", "tensorrt-rtx:1:2"] {
            assert!(bad.parse::<Device>().is_err(), "{bad:?} parsed");
        }
    }
}
