//! Graphs compiled ahead of time for one GPU (`vl-export compile`): ONNX Runtime "EP context"
//! models that embed a TensorRT engine. An engine is only valid for the GPU architecture and
//! the TensorRT and ONNX Runtime versions it was built with, so the manifest records them and
//! the runtime compares before using one: on a mismatch it rebuilds from the ONNX graphs or
//! fails, as the service chose, and never loads an engine made for something else.
pub use crate::manifest::{Compilation, CompiledGraph};

/// What to do when the compiled graphs were made for another GPU or version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompiledPolicy {
    /// Build from the ONNX graphs (minutes, once: the engine cache keeps the result).
    #[default]
    Rebuild,
    /// Fail with an error saying what differs.
    Fail,
}

/// What the runtime does with an engine directory's compilations on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompiledCheck<'a> {
    /// No compilation for this device kind: build from the ONNX graphs.
    None,
    /// The compilation matches this GPU and these versions: load its graphs.
    Use(&'a Compilation),
    /// It does not: build from the ONNX graphs; the text says what differs.
    Rebuild(String),
}

/// Compares the compilations for `device` (`tensorrt` or `tensorrt-rtx`) with the machine
/// `here` (same fields; `graphs` ignored).
pub fn check_compiled<'a>(
    compilations: &'a [Compilation],
    device: &str,
    here: &Compilation,
    policy: CompiledPolicy,
) -> std::result::Result<CompiledCheck<'a>, String> {
    let mut differences = Vec::new();
    for c in compilations.iter().filter(|c| c.device == device) {
        let mut differs = Vec::new();
        let mut cmp = |what: &str, built: &str, now: &str| {
            if built != now {
                differs.push(format!("{what} {built} (built) vs {now} (here)"));
            }
        };
        cmp("compute capability", &c.compute_capability, &here.compute_capability);
        cmp("TensorRT", &c.tensorrt_version, &here.tensorrt_version);
        cmp("ONNX Runtime", &c.onnxruntime_version, &here.onnxruntime_version);
        if differs.is_empty() {
            return Ok(CompiledCheck::Use(c));
        }
        differences.push(format!("{} on {}: {}", c.device, c.gpu, differs.join(", ")));
    }
    if differences.is_empty() {
        return Ok(CompiledCheck::None);
    }
    let why = format!("the compiled graphs were made for another machine ({})", differences.join("; "));
    match policy {
        CompiledPolicy::Rebuild => Ok(CompiledCheck::Rebuild(why)),
        CompiledPolicy::Fail => Err(why),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn made(cc: &str, trt: &str, ort: &str) -> Compilation {
        Compilation {
            device: "tensorrt".into(),
            gpu: "NVIDIA H100".into(),
            compute_capability: cc.into(),
            tensorrt_version: trt.into(),
            onnxruntime_version: ort.into(),
            graphs: vec![CompiledGraph { role: "decoder".into(), file: "trt/decoder_ctx.onnx".into() }],
        }
    }

    #[test]
    fn an_engine_is_used_only_on_the_machine_it_was_built_for() {
        let built = [made("9.0", "10.13.0", "1.31.1")];
        let here = made("9.0", "10.13.0", "1.31.1");
        assert_eq!(check_compiled(&built, "tensorrt", &here, CompiledPolicy::Fail), Ok(CompiledCheck::Use(&built[0])));
        assert_eq!(check_compiled(&built, "tensorrt-rtx", &here, CompiledPolicy::Fail), Ok(CompiledCheck::None));
        for other in
            [made("8.9", "10.13.0", "1.31.1"), made("9.0", "10.12.0", "1.31.1"), made("9.0", "10.13.0", "1.32.0")]
        {
            let Ok(CompiledCheck::Rebuild(why)) = check_compiled(&built, "tensorrt", &other, CompiledPolicy::Rebuild)
            else {
                panic!("a mismatch must rebuild");
            };
            assert!(why.contains("(built) vs"), "{why}");
            let err = check_compiled(&built, "tensorrt", &other, CompiledPolicy::Fail).unwrap_err();
            assert!(err.contains("another machine"), "{err}");
        }
    }
}
