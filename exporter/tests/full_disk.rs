//! `vl-export build` onto a full disk: small tmpfs mounts (this needs root; without the right
//! to mount, the test says why and returns). Whether the engine, its staging copy or the int8
//! calibration scratch (in TMPDIR) finds no space, the export fails with an error saying the
//! disk is full and naming the path, leaves nothing on the disk, and a previous engine at the
//! destination stays complete.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vl_runtime::manifest::Manifest;
use vl_runtime::verify::{Verify, verify_engine};

const BIN: &str = env!("CARGO_BIN_EXE_vl-export");

/// A tmpfs of `size` mounted on `dir` while it lives.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts; `None` (after saying why) where mounting is not permitted.
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).output();
        match out {
            Ok(o) if o.status.success() => Some(Self { dir: dir.to_path_buf() }),
            Ok(o) => {
                eprintln!("skipping: cannot mount a tmpfs: {}", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("skipping: cannot run mount: {e}");
                None
            }
        }
    }

    /// What is on it (names at its top level).
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(&self.dir).status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("could not unmount {}", self.dir.display());
        }
    }
}

fn export(model: &Path, out: &Path, extra: &[&str], tmpdir: Option<&Path>) -> Output {
    let mut c = Command::new(BIN);
    c.args(["build", "--model"]).arg(model).arg("--out").arg(out).args(extra);
    if let Some(t) = tmpdir {
        c.env("TMPDIR", t);
    }
    c.output().unwrap()
}

/// The export failed, saying the disk is full and naming a path under `disk`.
fn assert_disk_full(o: &Output, disk: &Path, when: &str) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{when}: the export succeeded on a full disk");
    let error =
        stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{when}: no error: {stderr}"));
    eprintln!("{when}: {error}");
    assert!(error.contains("disk is full") || error.contains("No space left"), "{when}: {error}");
    assert!(error.contains(&*disk.to_string_lossy()), "{when}: the error names no path on the disk: {error}");
    error.to_string()
}

fn assert_complete(out: &Path, when: &str) {
    let manifest = Manifest::load(out).unwrap_or_else(|e| panic!("{when}: {e}"));
    verify_engine(out, &manifest, Verify::Always).unwrap_or_else(|e| panic!("{when}: {e}"));
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("ckpt");
    let synth = Command::new(BIN).args(["synth", "--preset", "tiny", "--out"]).arg(&model).output().unwrap();
    assert!(synth.status.success(), "{}", String::from_utf8_lossy(&synth.stderr));
    // The tiny engine takes about 1.3 MB.

    // Too small for the engine: nothing is left on it.
    let Some(disk) = Tmpfs::mount(&dir.path().join("small"), "512k") else { return };
    let out = disk.dir.join("engine");
    let error = assert_disk_full(&export(&model, &out, &[], None), &disk.dir, "no room for the engine");
    assert!(error.contains(&*out.to_string_lossy()), "the error does not name the destination: {error}");
    assert_eq!(disk.entries(), Vec::<String>::new());
    drop(disk);

    // Room for one engine but not for the staging copy of the next: the first stays whole.
    let Some(disk) = Tmpfs::mount(&dir.path().join("one"), "2m") else { return };
    let out = disk.dir.join("engine");
    let first = export(&model, &out, &[], None);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert_disk_full(&export(&model, &out, &["--precision", "fp32"], None), &disk.dir, "no room for a second copy");
    assert_eq!(disk.entries(), ["engine"]);
    assert_complete(&out, "after the failed replacement");
    drop(disk);

    // int8 calibration with TMPDIR on a full disk: its scratch goes, the destination is untouched.
    // 64k: ffmpeg cannot write the calibration media (about 1.3 MB). 1700k: the media fit, the
    // block graphs and the activations spilled to disk (no memory budget) do not.
    for size in ["64k", "1700k"] {
        let Some(scratch) = Tmpfs::mount(&dir.path().join(format!("tmp-{size}")), size) else { return };
        let out = dir.path().join(format!("int8-{size}"));
        // Fresh tables, so that it calibrates.
        let tables = dir.path().join(format!("tables-{size}"));
        let args = ["--precision", "int8", "--calib-tables", tables.to_str().unwrap(), "--calib-memory-mb", "0"];
        let o = export(&model, &out, &args, Some(&scratch.dir));
        assert_disk_full(&o, &scratch.dir, &format!("calibration scratch on {size}"));
        // ONNX Runtime keeps a session-id file, `.ses`, in TMPDIR; nothing of the export stays.
        let left: Vec<String> = scratch.entries().into_iter().filter(|n| n != ".ses").collect();
        assert_eq!(left, Vec::<String>::new(), "calibration scratch on {size}");
        assert!(!out.exists(), "calibration scratch on {size}: {} was written", out.display());
    }
}
