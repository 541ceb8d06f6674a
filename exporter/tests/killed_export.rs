//! `vl-export build` killed (SIGKILL) at random moments, again and again: the destination is
//! always either the previous complete engine or a new complete one (its manifest loads and
//! every file hashes as the manifest says), never a partial one, and the next export removes
//! what the killed ones left behind.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vl_runtime::manifest::Manifest;
use vl_runtime::verify::{Verify, verify_engine};

const BIN: &str = env!("CARGO_BIN_EXE_vl-export");
const ROUNDS: usize = 24;

fn build(model: &Path, out: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["build", "--model"]).arg(model).arg("--out").arg(out).stdout(Stdio::null()).stderr(Stdio::null());
    c
}

/// The engine at `out` is complete: its manifest loads and every file has the manifest's hash.
fn assert_complete(out: &Path, when: &str) {
    let manifest = Manifest::load(out).unwrap_or_else(|e| panic!("{when}: {e}"));
    verify_engine(out, &manifest, Verify::Always).unwrap_or_else(|e| panic!("{when}: {e}"));
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".vl-export-"))
        .collect()
}

#[test]
fn a_killed_export_leaves_the_previous_engine_or_a_complete_one_and_no_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("ckpt");
    let status = Command::new(BIN).args(["synth", "--preset", "tiny", "--out"]).arg(&model).status().unwrap();
    assert!(status.success());
    let parent = dir.path().join("engines");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("tiny");

    // How long a whole export takes (replacing an engine), the median of three.
    let mut times: Vec<Duration> = (0..3)
        .map(|_| {
            let t0 = Instant::now();
            assert!(build(&model, &out).status().unwrap().success());
            t0.elapsed()
        })
        .collect();
    times.sort();
    let whole = times[1];
    assert_complete(&out, "the first exports");

    let mut rng = StdRng::seed_from_u64(11);
    let (mut killed, mut mid_write) = (0, 0);
    for round in 0..ROUNDS {
        let delay = Duration::from_secs_f64(whole.as_secs_f64() * rng.random_range(0.0..1.5));
        let mut child = build(&model, &out).spawn().unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        mid_write += usize::from(!leftovers(&parent).is_empty());
        assert_complete(&out, &format!("after round {round} (killed after {delay:?})"));
    }
    eprintln!("{killed} of {ROUNDS} exports killed, {mid_write} of them while writing (a whole export took {whole:?})");
    assert!(mid_write > 0, "no kill landed while an export was writing: the test tested nothing");
    assert!(build(&model, &out).status().unwrap().success());
    assert_complete(&out, "the export after the kills");
    assert_eq!(leftovers(&parent), Vec::<String>::new(), "the next export did not clean up");
}
