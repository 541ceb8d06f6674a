//! `vl-export build --precision int8` interrupted mid-calibration: by SIGINT or SIGTERM it
//! removes its scratch and staging directories, says so and exits non-zero, leaving the
//! previous engine as it was; killed by SIGKILL, it leaves its scratch directory, which the
//! next export removes.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vl_runtime::manifest::{Manifest, Precision};
use vl_runtime::verify::{Verify, verify_engine};

const BIN: &str = env!("CARGO_BIN_EXE_vl-export");

struct Setup {
    _dir: tempfile::TempDir,
    model: PathBuf,
    /// The process's temporary directory (`TMPDIR`), where calibration scratch goes.
    tmp: PathBuf,
    tables: PathBuf,
    parent: PathBuf,
    out: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("ckpt");
    let status = Command::new(BIN).args(["synth", "--preset", "tiny", "--out"]).arg(&model).status().unwrap();
    assert!(status.success());
    let (tmp, tables, parent) = (dir.path().join("tmp"), dir.path().join("tables"), dir.path().join("engines"));
    std::fs::create_dir(&tmp).unwrap();
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("tiny");
    let status = Command::new(BIN).args(["build", "--model"]).arg(&model).arg("--out").arg(&out).status().unwrap();
    assert!(status.success(), "the previous (fp32) engine");
    Setup { model, tmp, tables, parent, out, _dir: dir }
}

impl Setup {
    fn int8(&self) -> Command {
        let mut c = Command::new(BIN);
        c.args(["build", "--precision", "int8", "--model"])
            .arg(&self.model)
            .arg("--out")
            .arg(&self.out)
            .arg("--calib-tables")
            .arg(&self.tables)
            .env("TMPDIR", &self.tmp)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// Entries of `dir` whose names start with `prefix` (the temporary directory gets other
    /// files too: ONNX Runtime leaves a `.ses` there).
    fn leftovers(dir: &Path, prefix: &str) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(prefix))
            .collect()
    }

    /// Waits until `child` runs a calibration graph (a `.onnx` file in its scratch directory).
    fn wait_for_calibration(&self, child: &mut Child) {
        let t0 = Instant::now();
        loop {
            assert!(child.try_wait().unwrap().is_none(), "the export ended before its calibration ran a graph");
            assert!(t0.elapsed() < Duration::from_secs(120), "no calibration graph appeared");
            for d in Self::leftovers(&self.tmp, "vl-calib-") {
                let scratch = self.tmp.join(d);
                if scratch.is_dir() && Self::leftovers(&scratch, "").iter().any(|f| f.ends_with(".onnx")) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn assert_previous_engine(&self, when: &str) {
        let manifest = Manifest::load(&self.out).unwrap_or_else(|e| panic!("{when}: {e}"));
        verify_engine(&self.out, &manifest, Verify::Always).unwrap_or_else(|e| panic!("{when}: {e}"));
        assert_eq!(manifest.precision, Precision::Fp32, "{when}: the previous engine was replaced");
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").arg(format!("-{name}")).arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
}

#[test]
fn an_interrupted_calibration_removes_its_temporary_files() {
    let s = setup();
    for (name, code) in [("INT", 130), ("TERM", 143)] {
        let mut child = s.int8().spawn().unwrap();
        s.wait_for_calibration(&mut child);
        signal(&child, name);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "SIG{name}: {stderr}");
        assert!(stderr.contains("interrupted"), "SIG{name}: {stderr}");
        assert_eq!(Setup::leftovers(&s.tmp, "vl-calib-"), Vec::<String>::new(), "SIG{name}: scratch left behind");
        assert_eq!(Setup::leftovers(&s.parent, ".vl-export-"), Vec::<String>::new(), "SIG{name}");
        let tables = if s.tables.is_dir() { Setup::leftovers(&s.tables, "") } else { Vec::new() };
        assert_eq!(tables, Vec::<String>::new(), "SIG{name}: no table from an interrupted calibration");
        s.assert_previous_engine(&format!("after SIG{name}"));
    }

    // SIGKILL cannot be handled: the scratch directory stays, with its owner file naming a
    // process that is gone, and the next export removes it.
    let mut child = s.int8().spawn().unwrap();
    s.wait_for_calibration(&mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!Setup::leftovers(&s.tmp, "vl-calib-").is_empty(), "SIGKILL left nothing: the test tests nothing");
    s.assert_previous_engine("after SIGKILL");
    let done = s.int8().stderr(Stdio::null()).status().unwrap();
    assert!(done.success());
    assert_eq!(Setup::leftovers(&s.tmp, "vl-calib-"), Vec::<String>::new(), "the next export did not clean up");
    let manifest = Manifest::load(&s.out).unwrap();
    assert_eq!(manifest.precision, Precision::Int8);
}
