//! vl-e2e: end-to-end tests across `vl-export` and `vl-runtime`; this library holds their shared
//! helpers (the fixture checkpoints, built once per process). It may depend on every library
//! package of the workspace; only tests depend on it (`vl-run`'s CLI tests included).
#![allow(clippy::unwrap_used)]

pub mod batching;
pub mod real;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vl_export::export::{BuildOptions, build};
use vl_export::synth::{Preset, SynthSpec, synthesize};

/// The fixture cases: name and the synth spec the goldens were made from.
/// `make goldens` synthesizes the same specs with `vl-export synth` (see tools/make_goldens.sh).
pub fn case_spec(name: &str) -> SynthSpec {
    let tiny = SynthSpec::preset(Preset::Tiny);
    match name {
        "tiny" => tiny,
        "tiny-gqa" => SynthSpec { kv_heads: 2, feature_layers: vec![-3, -1], ..tiny },
        "tiny-original" => SynthSpec { layout: vl_runtime::manifest::CheckpointLayout::Original, ..tiny },
        other => panic!("unknown fixture case {other}"),
    }
}

/// `tests/fixtures/NAME`.
pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// The `tiny` fixture's video pixels (8 frames of 56 px, tests/fixtures/tiny/pixel_values_videos.npy),
/// read once: what every engine with the tiny vision tower (the real-weight one too) can take.
pub fn fixture_video() -> vl_runtime::model::Media {
    static PIXELS: OnceLock<std::sync::Arc<ndarray::Array5<f32>>> = OnceLock::new();
    let px = PIXELS.get_or_init(|| {
        std::sync::Arc::new(ndarray_npy::read_npy(fixture_dir("tiny").join("pixel_values_videos.npy")).unwrap())
    });
    vl_runtime::model::Media::VideoPixels(px.clone())
}

/// A checkpoint and its exported engine, in a directory that lives as long as the process.
pub struct Built {
    /// Checkpoint directory.
    pub checkpoint: PathBuf,
    /// Engine directory.
    pub engine: PathBuf,
}

/// A per-process directory under `$TMPDIR/vl-e2e/`. Statics are never dropped, so each test
/// process removes the directories of earlier processes that are no longer running.
pub(crate) fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = std::env::temp_dir().join("vl-e2e");
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let pid = entry.file_name().to_string_lossy().parse::<u32>().ok();
                if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = root.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    })
}

/// Synthesizes and exports fixture case `name` once per test process.
pub fn built(name: &str) -> &'static Built {
    built_for(name, None)
}

/// Like [`built`], exported for `target` (`None`: the default).
pub fn built_for(name: &str, target: Option<vl_runtime::manifest::Target>) -> &'static Built {
    static CASES: OnceLock<std::sync::Mutex<std::collections::HashMap<String, &'static Built>>> = OnceLock::new();
    let cases = CASES.get_or_init(Default::default);
    let mut cases = cases.lock().unwrap();
    let key = match target {
        None => name.to_string(),
        Some(t) => format!("{name}-{t:?}"),
    };
    if let Some(b) = cases.get(&key) {
        return b;
    }
    let checkpoint = scratch().join(format!("{key}-ckpt"));
    let engine = scratch().join(format!("{key}-engine"));
    synthesize(&case_spec(name), &checkpoint).expect("synthesize");
    build(&BuildOptions { target, ..BuildOptions::new(checkpoint.clone(), engine.clone()) }).expect("export");
    let b: &'static Built = Box::leak(Box::new(Built { checkpoint, engine }));
    cases.insert(key, b);
    b
}

/// Largest absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The engine's stats once its scheduler has published the end of every request (stats are
/// published at the start of each step, so a read right after `Done` can be one step old).
/// Gives up after 30 s and returns what it last read, for the caller's assertion to show.
pub fn settled(engine: &vl_runtime::engine::Engine) -> vl_runtime::engine::EngineStats {
    let t0 = std::time::Instant::now();
    loop {
        let s = engine.stats();
        if (s.active == 0 && s.waiting == 0) || t0.elapsed().as_secs() > 30 {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
