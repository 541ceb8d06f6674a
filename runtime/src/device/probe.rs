//! Checks that a GPU device can be used before any session is made, and names what is missing.
//!
//! The GPU build of ONNX Runtime (`onnxruntime-gpu`) keeps each provider in its own library
//! beside `libonnxruntime.so`; those link the NVIDIA driver (`libcuda.so.1`), CUDA 13, cuDNN 9
//! and, for TensorRT, `libnvinfer.so.10`. `make setup-gpu` installs the CUDA and cuDNN
//! libraries as pip packages (`site-packages/nvidia/*/lib`), which nothing puts on the loader's
//! path: they are loaded here by full path first, as onnxruntime's own `preload_dlls()` does, so
//! the provider's dependencies resolve to them. Loading the provider library is the test: the
//! loader names the first library it cannot find, and that name says what to install.
use std::fmt;
use std::path::{Path, PathBuf};

use super::Device;
use super::cuda_driver::{self, GpuInfo};

/// The provider libraries of ONNX Runtime's GPU build.
pub const CUDA_PROVIDER: &str = "libonnxruntime_providers_cuda.so";
/// TensorRT's provider library in ONNX Runtime's GPU build.
pub const TENSORRT_PROVIDER: &str = "libonnxruntime_providers_tensorrt.so";
/// What every provider library of ONNX Runtime links.
pub const SHARED_PROVIDER: &str = "libonnxruntime_providers_shared.so";
/// The TensorRT for RTX plugin provider (PyPI `onnxruntime-ep-nv-tensorrt-rtx-cu13`).
pub const RTX_PROVIDER: &str = "libonnxruntime_providers_nv_tensorrt_rtx.so";
/// The Python package directory that wheel installs.
pub const RTX_PACKAGE: &str = "onnxruntime_ep_nv_tensorrt_rtx";
/// The execution provider name the RTX plugin registers.
pub const RTX_EP_NAME: &str = "NvTensorRTRTXExecutionProvider";

/// Why a GPU device cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// The ONNX Runtime library has no provider library for the device beside it.
    CpuOnlyOrt {
        /// The ONNX Runtime library in use.
        library: PathBuf,
        /// The provider library that is not beside it.
        provider: &'static str,
    },
    /// The NVIDIA driver (`libcuda.so.1`) cannot be loaded, or has no GPU for the ordinal.
    Driver(String),
    /// CUDA or cuDNN libraries the provider links are missing.
    CudaLibraries(String),
    /// TensorRT 10 (`libnvinfer.so.10`, `libnvonnxparser.so.10`) is missing.
    TensorRt(String),
    /// The TensorRT for RTX plugin provider is not installed.
    RtxProvider {
        /// Where it was looked for.
        looked: Vec<PathBuf>,
    },
    /// A provider library exists but cannot be loaded for another reason.
    Provider(String),
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::CpuOnlyOrt { library, provider } => write!(
                f,
                "the ONNX Runtime library {} is a CPU-only build ({provider} is not beside it): run `make setup-gpu` \
                 (installs onnxruntime-gpu 1.31.1 for CUDA 13 into .venv) or set ORT_DYLIB_PATH to a GPU build",
                library.display()
            ),
            Missing::Driver(detail) => write!(
                f,
                "no usable NVIDIA driver: {detail} (install the NVIDIA driver for CUDA 13, version 580 or newer)"
            ),
            Missing::CudaLibraries(detail) => write!(
                f,
                "CUDA 13 / cuDNN 9 libraries are missing: {detail} (run `make setup-gpu`, which installs them into \
                 .venv, or install CUDA 13 and cuDNN 9 on the loader's path)"
            ),
            Missing::TensorRt(detail) => write!(
                f,
                "TensorRT 10 is missing: {detail} (install TensorRT 10.x from NVIDIA so that libnvinfer.so.10 is on \
                 the loader's path; PyPI's tensorrt packages download from NVIDIA's index)"
            ),
            Missing::RtxProvider { looked } => {
                let looked: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
                write!(
                    f,
                    "the TensorRT for RTX provider ({RTX_PROVIDER}) is not installed; looked in: {}. Run `make \
                     setup-gpu` (installs onnxruntime-ep-nv-tensorrt-rtx-cu13 into .venv) or set VL_TENSORRT_RTX_DIR",
                    looked.join("; ")
                )
            }
            Missing::Provider(detail) => write!(f, "the provider library cannot be loaded: {detail}"),
        }
    }
}

/// The `site-packages` directory a wheel's `onnxruntime/capi/libonnxruntime.so` lies in.
pub fn site_packages_of(ort_library: &Path) -> Option<PathBuf> {
    let capi = ort_library.parent()?;
    let package = capi.parent()?;
    (capi.file_name()? == "capi").then(|| package.parent().map(Path::to_path_buf))?
}

/// The libraries of the `nvidia-*` pip packages (`site-packages/nvidia/*/lib`), sorted.
fn pip_cuda_libraries(site_packages: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(packages) = std::fs::read_dir(site_packages.join("nvidia")) else { return found };
    for package in packages.filter_map(|e| e.ok()) {
        let Ok(libs) = std::fs::read_dir(package.path().join("lib")) else { continue };
        found.extend(
            libs.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(".so"))),
        );
    }
    found.sort();
    found
}

/// Loads `path` for the rest of the process, its symbols global (so later libraries that link
/// its soname resolve to it).
fn load_global(path: &Path) -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_LAZY};
    // SAFETY: loading a shared library runs its initializers; the libraries loaded here are
    // the ONNX Runtime providers and NVIDIA's libraries, which the sessions load anyway.
    let lib = unsafe { Library::open(Some(path), RTLD_LAZY | RTLD_GLOBAL) }.map_err(|e| {
        // libloading's message is "dlopen failed"; the loader's own words are its source.
        match std::error::Error::source(&e) {
            Some(source) => source.to_string(),
            None => e.to_string(),
        }
    })?;
    // Kept loaded: ONNX Runtime loads the same library later and must find these symbols.
    std::mem::forget(lib);
    Ok(())
}

/// Loads what a pip-installed CUDA brings, in an order where dependencies come first
/// (runtime, then BLAS, then cuDNN and the rest); a library that fails is left to the check
/// of the provider, which names what is missing.
fn preload_pip_cuda(site_packages: &Path) {
    let rank = |p: &PathBuf| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        ["libcudart", "libnvrtc", "libcublasLt", "libcublas", "libcurand", "libcufft", "libnvJitLink", "libcudnn"]
            .iter()
            .position(|prefix| name.starts_with(prefix))
            .unwrap_or(usize::MAX)
    };
    let mut libs = pip_cuda_libraries(site_packages);
    libs.sort_by_key(rank);
    for lib in libs {
        let _ = load_global(&lib);
    }
}

/// Sorts a loader error into what is missing.
fn classify(detail: String) -> Missing {
    let first = detail.split(':').map(str::trim).find(|part| part.starts_with("lib") && part.contains(".so"));
    let lib = first.unwrap_or_default();
    if lib.starts_with("libcuda.so") || lib.starts_with("libnvidia-ml") {
        Missing::Driver(detail)
    } else if lib.starts_with("libnvinfer") || lib.starts_with("libnvonnxparser") {
        Missing::TensorRt(detail)
    } else if ["libcudart", "libcublas", "libcudnn", "libcurand", "libcufft", "libnvrtc", "libnvJitLink"]
        .iter()
        .any(|prefix| lib.starts_with(prefix))
    {
        Missing::CudaLibraries(detail)
    } else {
        Missing::Provider(detail)
    }
}

/// Where the TensorRT for RTX plugin may be: `VL_TENSORRT_RTX_DIR`, else its wheel's package
/// directory in the site-packages of the ONNX Runtime library in use, else in the project's
/// `.venv`.
pub fn rtx_candidates(ort_library: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("VL_TENSORRT_RTX_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    if let Some(site) = site_packages_of(ort_library) {
        dirs.push(site.join(RTX_PACKAGE));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
    if let Ok(pythons) = std::fs::read_dir(venv) {
        dirs.extend(pythons.filter_map(|e| e.ok()).map(|e| e.path().join("site-packages").join(RTX_PACKAGE)));
    }
    dirs.dedup();
    dirs
}

/// The RTX plugin library, once its bundled TensorRT-RTX and CUDA runtime libraries are loaded.
pub fn rtx_provider(ort_library: &Path) -> Result<PathBuf, Missing> {
    let looked = rtx_candidates(ort_library);
    let Some(dir) = looked.iter().find(|d| d.join(RTX_PROVIDER).is_file()).cloned() else {
        return Err(Missing::RtxProvider { looked });
    };
    // The wheel ships versioned files (libtensorrt_rtx.so.1.7.1) without the soname links
    // (libtensorrt_rtx.so.1) the plugin links; loading them by path first satisfies it.
    let mut bundled: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|it| it.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    bundled.retain(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        name.contains(".so.") && (name.starts_with("libcudart") || name.starts_with("libtensorrt"))
    });
    bundled.sort_by_key(|p| !p.to_string_lossy().contains("libcudart"));
    for lib in &bundled {
        let _ = load_global(lib);
    }
    let plugin = dir.join(RTX_PROVIDER);
    load_global(&plugin).map_err(classify)?;
    Ok(plugin)
}

/// Checks that `device` can run with the ONNX Runtime library at `ort_library` and returns
/// the GPU it will use. The CPU (and `auto`, which resolves elsewhere) always pass.
pub fn check(device: Device, ort_library: &Path) -> Result<GpuInfo, Missing> {
    let Some(ordinal) = device.gpu() else {
        return Ok(GpuInfo::cpu());
    };
    check_libraries(device, ort_library)?;
    cuda_driver::gpu_info(ordinal).map_err(Missing::Driver)
}

/// The library part of [`check`]: the provider libraries of `device` beside `ort_library` load,
/// with every library they link.
pub fn check_libraries(device: Device, ort_library: &Path) -> Result<(), Missing> {
    let dir = ort_library.parent().unwrap_or(Path::new("."));
    let providers: &[&'static str] = match device {
        Device::Cpu | Device::Auto => return Ok(()),
        Device::Cuda { .. } => &[CUDA_PROVIDER],
        Device::TensorRt { .. } => &[TENSORRT_PROVIDER, CUDA_PROVIDER],
        Device::TensorRtRtx { .. } => {
            rtx_provider(ort_library)?;
            return Ok(());
        }
    };
    for provider in providers {
        if !dir.join(provider).is_file() {
            return Err(Missing::CpuOnlyOrt { library: ort_library.to_path_buf(), provider });
        }
    }
    if let Some(site) = site_packages_of(ort_library) {
        preload_pip_cuda(&site);
    }
    let shared = dir.join(SHARED_PROVIDER);
    if shared.is_file() {
        load_global(&shared).map_err(Missing::Provider)?;
    }
    for provider in providers {
        load_global(&dir.join(provider)).map_err(classify)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_errors_name_what_to_install() {
        let err = |lib: &str| format!("/x/{CUDA_PROVIDER}: {lib}: cannot open shared object file: No such file");
        assert!(matches!(classify(err("libcuda.so.1")), Missing::Driver(_)));
        assert!(matches!(classify(err("libcublasLt.so.13")), Missing::CudaLibraries(_)));
        assert!(matches!(classify(err("libcudnn.so.9")), Missing::CudaLibraries(_)));
        assert!(matches!(classify(err("libnvinfer.so.10")), Missing::TensorRt(_)));
        assert!(matches!(classify("/x/y.so: invalid ELF header".into()), Missing::Provider(_)));
    }

    #[test]
    fn site_packages_is_found_from_a_wheels_library() {
        let lib = Path::new("/v/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1");
        assert_eq!(site_packages_of(lib), Some(PathBuf::from("/v/lib/python3.11/site-packages")));
        assert_eq!(site_packages_of(Path::new("/usr/lib/libonnxruntime.so")), None);
    }
}
