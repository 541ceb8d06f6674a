//! What the NVIDIA driver says about a GPU, through the CUDA driver API (`libcuda.so.1`, loaded
//! at run time: nothing here links CUDA).
use std::ffi::{CStr, c_char, c_int, c_uint};

use serde::{Deserialize, Serialize};

/// A GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// The card's name (`NVIDIA H200`), or `cpu`.
    pub name: String,
    /// Compute capability, `major.minor` (`9.0`).
    pub compute_capability: String,
    /// The driver's CUDA version (`13.0`).
    pub driver_cuda: String,
    /// Device memory in bytes.
    pub memory_bytes: u64,
}

impl GpuInfo {
    pub(crate) fn cpu() -> Self {
        Self { name: "cpu".into(), compute_capability: String::new(), driver_cuda: String::new(), memory_bytes: 0 }
    }
}

const COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const COMPUTE_CAPABILITY_MINOR: c_int = 76;

/// Asks the driver about GPU `ordinal`. The error says what failed (no driver, no such GPU).
pub fn gpu_info(ordinal: i32) -> Result<GpuInfo, String> {
    use libloading::{Library, Symbol};
    // SAFETY: libcuda's initializers are safe to run; the functions below are called with the
    // signatures of the CUDA driver API (cuda.h), which has kept them stable since CUDA 4.
    unsafe {
        let lib = Library::new("libcuda.so.1").map_err(|e| {
            let why = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_else(|| e.to_string());
            format!("libcuda.so.1 could not be loaded: {why}")
        })?;
        let sym = |name: &[u8]| -> Result<Symbol<'_, unsafe extern "C" fn()>, String> {
            lib.get(name).map_err(|e| format!("libcuda.so.1 has no {}: {e}", String::from_utf8_lossy(name)))
        };
        type Init = unsafe extern "C" fn(c_uint) -> c_int;
        type OutInt = unsafe extern "C" fn(*mut c_int) -> c_int;
        type DeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
        type Name = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
        type Attribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
        type TotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
        let init: Init = std::mem::transmute(*sym(b"cuInit\0")?);
        let count: OutInt = std::mem::transmute(*sym(b"cuDeviceGetCount\0")?);
        let driver_version: OutInt = std::mem::transmute(*sym(b"cuDriverGetVersion\0")?);
        let device_get: DeviceGet = std::mem::transmute(*sym(b"cuDeviceGet\0")?);
        let name: Name = std::mem::transmute(*sym(b"cuDeviceGetName\0")?);
        let attribute: Attribute = std::mem::transmute(*sym(b"cuDeviceGetAttribute\0")?);
        let total_mem: TotalMem = std::mem::transmute(*sym(b"cuDeviceTotalMem_v2\0")?);
        let check = |what: &str, status: c_int| {
            if status == 0 { Ok(()) } else { Err(format!("{what} failed with CUDA error {status}")) }
        };
        check("cuInit", init(0))?;
        let mut n = 0;
        check("cuDeviceGetCount", count(&mut n))?;
        if ordinal < 0 || ordinal >= n {
            return Err(format!("GPU {ordinal} asked for, the driver sees {n}"));
        }
        let mut device = 0;
        check("cuDeviceGet", device_get(&mut device, ordinal))?;
        let mut buf = [0 as c_char; 256];
        check("cuDeviceGetName", name(buf.as_mut_ptr(), buf.len() as c_int, device))?;
        let (mut major, mut minor, mut version, mut bytes) = (0, 0, 0, 0usize);
        check("cuDeviceGetAttribute", attribute(&mut major, COMPUTE_CAPABILITY_MAJOR, device))?;
        check("cuDeviceGetAttribute", attribute(&mut minor, COMPUTE_CAPABILITY_MINOR, device))?;
        check("cuDriverGetVersion", driver_version(&mut version))?;
        check("cuDeviceTotalMem", total_mem(&mut bytes, device))?;
        Ok(GpuInfo {
            name: CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned(),
            compute_capability: format!("{major}.{minor}"),
            driver_cuda: format!("{}.{}", version / 1000, (version % 1000) / 10),
            memory_bytes: bytes as u64,
        })
    }
}
