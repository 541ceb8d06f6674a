//! GPU devices on a machine without one (CI): every missing piece is an error that names it and
//! says how to get it, never a panic or a silent CPU run; `auto` takes the CPU and says why; the
//! TensorRT profiles cover every shape the runtime feeds.
//!
//! The missing-library cases load real shared libraries: stand-ins for ONNX Runtime's provider
//! libraries, compiled here with the C compiler and linked against stub libraries that are then
//! deleted, so the loader reports exactly what it would on a machine without CUDA or TensorRT.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use vl_runtime::device::probe::{self, CUDA_PROVIDER, Missing, TENSORRT_PROVIDER};
use vl_runtime::device::tensorrt::{ShapeLimits, TensorRtOptions, profile};
use vl_runtime::manifest::Manifest;
use vl_runtime::model::{Model, ModelOptions};
use vl_runtime::{Device, Error, Pipeline, PipelineOptions, SessionOptions};

fn options(device: Device) -> PipelineOptions {
    PipelineOptions { session: SessionOptions { device, ..SessionOptions::default() }, ..PipelineOptions::default() }
}

#[test]
fn a_cpu_only_onnx_runtime_refuses_gpu_devices_by_name() {
    let library = vl_runtime::ort_env::library_path().unwrap();
    if library.with_file_name(CUDA_PROVIDER).exists() {
        eprintln!("skipped: {} is a GPU build", library.display());
        return;
    }
    let engine = &vl_e2e::built("tiny").engine;
    for device in [Device::Cuda { device_id: 0 }, Device::TensorRt { device_id: 1 }] {
        let Err(err) = Pipeline::load(engine, options(device)) else { panic!("{device} loaded on a CPU-only build") };
        let Error::DeviceUnavailable { device: name, reason } = &err else { panic!("{device}: {err}") };
        assert_eq!(name, &device.to_string());
        assert!(reason.contains("CPU-only build") && reason.contains("make setup-gpu"), "{err}");
    }
}

#[test]
fn auto_takes_cuda_where_it_can_else_the_cpu_and_says_why() {
    let engine = &vl_e2e::built("tiny").engine;
    let session = SessionOptions { device: Device::Auto, ..SessionOptions::default() };
    let model = Model::load(engine, ModelOptions { session, ..ModelOptions::default() }).unwrap();
    let library = vl_runtime::ort_env::library_path().unwrap();
    let reason = &model.device().reason;
    match probe::check(Device::Cuda { device_id: 0 }, &library) {
        Ok(gpu) => {
            assert_eq!(model.device().device, Device::Cuda { device_id: 0 });
            assert!(reason.contains(&gpu.name), "{reason}");
        }
        Err(why) => {
            assert_eq!(model.device().device, Device::Cpu);
            assert!(reason.starts_with("auto: the CPU, since") && reason.contains(&why.to_string()), "{reason}");
        }
    }
}

#[test]
fn tensorrt_rtx_without_its_wheel_names_the_wheel() {
    let library = vl_runtime::ort_env::library_path().unwrap();
    if probe::rtx_candidates(&library).iter().any(|d| d.join(probe::RTX_PROVIDER).is_file()) {
        eprintln!("skipped: the TensorRT-RTX provider is installed here");
        return;
    }
    let Err(missing) = probe::check_libraries(Device::TensorRtRtx { device_id: 0 }, &library) else { panic!() };
    assert!(matches!(missing, Missing::RtxProvider { .. }), "{missing}");
    assert!(missing.to_string().contains("onnxruntime-ep-nv-tensorrt-rtx-cu13"), "{missing}");
}

/// Compiles `source` into the shared library `out` (with soname `soname`), linked to `libs`.
fn cc(out: &Path, soname: &str, source: &str, libs: &[PathBuf]) {
    let c = out.with_extension("c");
    std::fs::write(&c, source).unwrap();
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(out)
        .arg(format!("-Wl,-soname,{soname},--no-as-needed"))
        .arg(&c)
        .args(libs)
        .status()
        .expect("the C compiler (cc) runs");
    assert!(status.success(), "cc {}", out.display());
}

/// A directory that looks like ONNX Runtime's GPU build: a library file and provider libraries
/// linking `needs` (sonames whose stubs are deleted after linking).
fn fake_gpu_build(root: &Path, name: &str, providers: &[(&str, &[&str])]) -> PathBuf {
    let dir = root.join(name);
    let stubs = root.join(format!("{name}-stubs"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&stubs).unwrap();
    let library = dir.join("libonnxruntime.so.1.31.1");
    std::fs::write(&library, b"").unwrap();
    for (provider, needs) in providers {
        let mut libs = Vec::new();
        for soname in *needs {
            let stub = stubs.join(soname);
            cc(&stub, soname, "int vl_stub(void) { return 1; }\n", &[]);
            libs.push(stub);
        }
        let out = dir.join(provider);
        cc(&out, provider, &format!("int vl_{}(void) {{ return 2; }}\n", provider.len()), &libs);
    }
    std::fs::remove_dir_all(&stubs).unwrap();
    library
}

#[test]
fn each_missing_gpu_library_is_named_with_what_to_install() {
    if Command::new("cc").arg("--version").output().is_err() {
        panic!("this test needs a C compiler (cc): it builds stand-in provider libraries");
    }
    let root = tempfile::tempdir().unwrap();
    let cuda = Device::Cuda { device_id: 0 };
    let trt = Device::TensorRt { device_id: 0 };

    let libs = fake_gpu_build(root.path(), "no-cublas", &[(CUDA_PROVIDER, &["libcublasLt.so.13"])]);
    let missing = probe::check_libraries(cuda, &libs).unwrap_err();
    assert!(matches!(missing, Missing::CudaLibraries(_)), "{missing}");
    assert!(missing.to_string().contains("libcublasLt.so.13") && missing.to_string().contains("make setup-gpu"));

    let libs =
        fake_gpu_build(root.path(), "no-tensorrt", &[(TENSORRT_PROVIDER, &["libnvinfer.so.10"]), (CUDA_PROVIDER, &[])]);
    let missing = probe::check_libraries(trt, &libs).unwrap_err();
    assert!(matches!(missing, Missing::TensorRt(_)), "{missing}");
    assert!(missing.to_string().contains("libnvinfer.so.10"), "{missing}");

    // The same directory has the CUDA provider but not TensorRT's: CUDA passes the library check.
    let libs = fake_gpu_build(root.path(), "cuda-only", &[(CUDA_PROVIDER, &[])]);
    probe::check_libraries(cuda, &libs).unwrap();
    let missing = probe::check_libraries(trt, &libs).unwrap_err();
    assert!(matches!(missing, Missing::CpuOnlyOrt { provider: TENSORRT_PROVIDER, .. }), "{missing}");
    // ... and the driver check comes next: there is no NVIDIA driver on this machine.
    if no_nvidia_driver_installed() {
        let missing = probe::check(cuda, &libs).unwrap_err();
        assert!(matches!(missing, Missing::Driver(_)), "{missing}");
        assert!(missing.to_string().contains("libcuda.so.1"), "{missing}");

        let libs = fake_gpu_build(root.path(), "no-driver", &[(CUDA_PROVIDER, &["libcuda.so.1"])]);
        let missing = probe::check_libraries(cuda, &libs).unwrap_err();
        assert!(matches!(missing, Missing::Driver(_)), "{missing}");
    } else {
        eprintln!("an NVIDIA driver is installed here: the missing-driver cases are skipped");
    }
}

fn no_nvidia_driver_installed() -> bool {
    !Path::new("/proc/driver/nvidia/version").exists()
        && !["/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib64/libcuda.so.1", "/usr/lib/libcuda.so.1"]
            .iter()
            .any(|p| Path::new(p).exists())
}

#[test]
fn tensorrt_profiles_cover_every_shape_the_runtime_feeds() {
    let manifest = Manifest::load(&vl_e2e::built("tiny").engine).unwrap();
    let options = TensorRtOptions { max_batch: 4, opt_sequence: 64, ..TensorRtOptions::default() };
    let limits = ShapeLimits::new(&manifest, &options);
    let s = manifest.max_sequence_length;
    let (heads, dim) = (manifest.model.num_kv_heads, manifest.model.head_dim);
    let hidden = manifest.model.text_hidden;

    let decoder = profile("decoder", &manifest.graphs.decoder, &limits).unwrap().unwrap();
    let min: Vec<&str> = decoder.min.split(',').collect();
    let max: Vec<&str> = decoder.max.split(',').collect();
    assert!(min.contains(&format!("inputs_embeds:1x1x{hidden}").as_str()), "{}", decoder.min);
    assert!(max.contains(&format!("inputs_embeds:4x{s}x{hidden}").as_str()), "{}", decoder.max);
    assert!(min.contains(&format!("past_key_values.0.key:1x{heads}x0x{dim}").as_str()), "{}", decoder.min);
    assert!(max.contains(&format!("past_key_values.1.value:4x{heads}x{}x{dim}", s - 1).as_str()), "{}", decoder.max);
    assert!(decoder.opt.contains("attention_mask:1x65"), "{}", decoder.opt);
    // Every input with a symbolic dimension is in the profile, once.
    let dynamic = manifest.graphs.decoder.inputs.iter().filter(|i| i.name != "logits_to_keep").count();
    assert_eq!(min.len(), dynamic, "{}", decoder.min);

    let vision = profile("vision", &manifest.graphs.vision, &limits).unwrap().unwrap();
    let frames = manifest.preprocess.frames;
    let size = manifest.model.image_size;
    assert_eq!(vision.max, format!("pixel_values_videos:1x{frames}x3x{size}x{size}"));

    // A dimension nobody gave a range for is refused, not guessed.
    let mut odd = manifest.graphs.embed.clone();
    odd.inputs[0].shape[1] = vl_runtime::manifest::Dim::Symbolic("mystery".into());
    let err = profile("embed", &odd, &limits).unwrap_err();
    assert!(err.to_string().contains("mystery"), "{err}");
}

/// Greedy tokens of `engine` on `device` for a text prompt.
fn greedy(engine: &Path, device: Device) -> Vec<u32> {
    let pipeline = Pipeline::load(engine, options(device)).unwrap();
    let mut chat = pipeline.conversation(vl_runtime::Media::Text).unwrap();
    let opts = vl_runtime::GenerateOptions { max_new_tokens: 16, ..Default::default() };
    chat.ask("Describe the weather.", &opts, &mut |_| vl_runtime::Flow::Continue).unwrap().token_ids
}

/// Runs where a GPU and ONNX Runtime's GPU build are at hand (tools/gpu-check.sh); says why not
/// elsewhere.
#[test]
fn on_a_gpu_cuda_greedy_tokens_equal_the_cpu_run() {
    let library = vl_runtime::ort_env::library_path().unwrap();
    let cuda = Device::Cuda { device_id: 0 };
    if let Err(why) = probe::check(cuda, &library) {
        eprintln!("skipped (no usable GPU): {why}");
        return;
    }
    let engine = &vl_e2e::built("tiny").engine;
    let cpu = greedy(engine, Device::Cpu);
    assert_eq!(greedy(engine, cuda), cpu, "CUDA and CPU greedy tokens differ");
    eprintln!("CUDA greedy tokens equal the CPU's: {cpu:?}");
}
