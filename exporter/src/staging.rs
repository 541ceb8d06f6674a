//! Staging and scratch directories that a killed `vl-export` left behind.
//!
//! An export writes into `.vl-export-XXXX` beside its destination and renames it into place at
//! the end (the previous engine is parked as `.vl-export-XXXX.old` during the swap). Beside the
//! directory, `.vl-export-XXXX.owner` names the process and the destination while the export
//! runs. A process killed with SIGKILL cannot clean up, so each export first removes what
//! processes that no longer run left behind, putting back a parked engine whose destination
//! was left empty.
//!
//! Calibration's scratch directories (`vl-calib-XXXX` in the system's temporary directory) are
//! claimed the same way. An export interrupted by SIGINT or SIGTERM (once
//! [`remove_on_signals`] is installed, as `vl-export` does) removes its staging and scratch
//! directories itself and exits with 128 + the signal's number.
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, Result};

/// Prefix of export staging directories (beside the destination).
pub const PREFIX: &str = ".vl-export-";
/// Prefix of calibration scratch directories (in the system's temporary directory).
pub const CALIB_PREFIX: &str = "vl-calib-";
/// How old a staging directory without an owner file must be to count as abandoned (another
/// export may have created it an instant ago).
const GRACE: Duration = Duration::from_secs(60);

/// The staging and scratch directories (and owner files) of this process, which an interrupt
/// removes.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn register(path: &Path) {
    live().push(path.to_path_buf());
}

fn unregister(path: &Path) {
    let mut l = live();
    if let Some(i) = l.iter().rposition(|p| p == path) {
        l.remove(i);
    }
}

/// Held by an engine swap, which an interrupt's cleanup waits for.
static SWAP: Mutex<()> = Mutex::new(());

/// Holds off interrupts' cleanup while the guard lives (an engine swap must not be cut between
/// its renames: the handler waits, then finds the new engine in place and nothing to remove).
pub fn hold_interrupts() -> MutexGuard<'static, ()> {
    SWAP.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes every registered directory and owner file (directories first); returns how many
/// were there.
fn remove_live(paths: &mut Vec<PathBuf>) -> usize {
    let n = paths.len();
    paths.sort_by_key(|p| p.extension().is_some_and(|e| e == "owner"));
    for p in paths.drain(..) {
        if p.is_dir() {
            let _ = std::fs::remove_dir_all(&p);
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
    n
}

/// Installs SIGINT and SIGTERM handling: the process removes its staging and scratch
/// directories, says so on stderr, and exits with 128 + the signal's number. (A thread of
/// signal-hook's waits for the signals, so the cleanup runs outside the signal handler, while
/// ONNX Runtime may be computing on the others; SIGKILL leaves the owner files, and the next
/// export removes what they name.)
pub fn remove_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| Error::io(Path::new("signal handler"), e))?;
    std::thread::Builder::new()
        .name("vl-export-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _swap = hold_interrupts();
                let mut paths = live();
                let n = remove_live(&mut paths);
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                eprintln!("vl-export: interrupted ({name}); removed {n} temporary file(s) and directories");
                // Not `std::process::exit`: its C++ destructors would race ONNX Runtime's threads.
                signal_hook::low_level::exit(128 + sig);
            }
        })
        .map_err(|e| Error::io(Path::new("signal handler thread"), e))?;
    Ok(())
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The parked previous engine of staging directory `staging`.
pub fn parked(staging: &Path) -> PathBuf {
    sibling(staging, ".old")
}

/// This process's claim on a staging directory; dropping it removes the owner file (the
/// export finished, or failed and removed its directory).
#[derive(Debug)]
pub struct Claim {
    owner: PathBuf,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.owner);
        unregister(&self.owner);
    }
}

/// Records that this process owns `staging`, exporting to `out`.
pub fn claim(staging: &Path, out: &Path) -> Result<Claim> {
    let owner = sibling(staging, ".owner");
    let text = format!("{}\n{}", std::process::id(), out.display());
    register(&owner);
    if let Err(e) = std::fs::write(&owner, text) {
        unregister(&owner);
        return Err(Error::io(&owner, e));
    }
    Ok(Claim { owner })
}

/// An export's staging directory: its owner file is written before the directory exists, so
/// no moment leaves a directory that a later export cannot attribute. Dropped without
/// [`Staging::keep`], it removes the directory and the owner file.
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
    claim: Option<Claim>,
    kept: bool,
}

impl Staging {
    /// Creates a fresh staging directory in `parent` for an export to `out`.
    pub fn create(parent: &Path, out: &Path) -> Result<Self> {
        Self::create_named(parent, PREFIX, out)
    }

    /// Creates a fresh scratch directory in `parent` named after `prefix` (calibration's
    /// [`CALIB_PREFIX`]), removed when dropped, and by [`clean_stale`] once this process is gone.
    pub fn scratch(parent: &Path, prefix: &str) -> Result<Self> {
        Self::create_named(parent, prefix, Path::new(""))
    }

    fn create_named(parent: &Path, prefix: &str, out: &Path) -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = parent.join(format!("{prefix}{}-{n}-{nanos}", std::process::id()));
        let claim = claim(&path, out)?;
        register(&path);
        if let Err(e) = std::fs::create_dir(&path) {
            unregister(&path);
            return Err(Error::io(&path, e));
        }
        Ok(Self { path, claim: Some(claim), kept: false })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory became the engine (renamed into place): nothing to remove. The returned
    /// claim keeps the owner file until dropped (after the parked engine is removed), so that a
    /// kill in between still leaves the parked engine attributable.
    pub fn keep(mut self) -> Option<Claim> {
        self.kept = true;
        unregister(&self.path);
        self.claim.take()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_dir_all(&self.path);
            unregister(&self.path);
        }
        drop(self.claim.take());
    }
}

fn alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists()
}

fn older_than(path: &Path, age: Duration) -> bool {
    std::fs::symlink_metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a > age))
}

fn remove_dir(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// Removes what dead processes left in `parent` under `prefix`: their staging directories,
/// parked engines (put back first where the destination is missing: the process died between
/// its two renames) and owner files; and staging directories without an owner file older
/// than a minute. Returns the staging directories removed.
pub fn clean_stale(parent: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(Vec::new()) };
    let names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| n.starts_with(prefix))
        .collect();
    let mut removed = Vec::new();
    for name in &names {
        let path = parent.join(name);
        if let Some(stem) = name.strip_suffix(".owner") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let (pid, out) = text.split_once('\n').unwrap_or((&text, ""));
            // The name holds the pid too (`PREFIX{pid}-...`): an owner file cut short by a
            // kill while it was written is still attributed.
            let named = stem.strip_prefix(prefix).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok());
            let dead = match named.ok_or(()).or_else(|()| pid.trim().parse::<u32>().map_err(|_| ())) {
                Ok(pid) => !alive(pid),
                Err(_) => older_than(&path, GRACE),
            };
            if !dead {
                continue;
            }
            let staging = parent.join(stem);
            let old = parked(&staging);
            if old.is_dir() {
                let out = Path::new(out);
                if staging.is_dir() && !out.as_os_str().is_empty() && !out.exists() {
                    std::fs::rename(&old, out).map_err(|e| Error::io(&old, e))?;
                } else {
                    remove_dir(&old)?;
                }
            }
            if staging.is_dir() {
                remove_dir(&staging)?;
                removed.push(staging);
            }
            let _ = std::fs::remove_file(&path);
        } else if !name.ends_with(".old") {
            let path_owner = sibling(&path, ".owner");
            if !path_owner.exists() && path.is_dir() && older_than(&path, GRACE) {
                remove_dir(&path)?;
                removed.push(path);
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok<T, E: std::fmt::Display>(r: std::result::Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn stale_staging_goes_and_a_parked_engine_comes_back() {
        let parent = ok(tempfile::tempdir());
        let p = parent.path();
        // A dead process killed between its two renames: the old engine is parked.
        let out = p.join("engine");
        let dead = p.join(format!("{PREFIX}dead"));
        ok(std::fs::create_dir(&dead));
        ok(std::fs::write(sibling(&dead, ".owner"), format!("{}\n{}", u32::MAX, out.display())));
        ok(std::fs::create_dir(parked(&dead)));
        ok(std::fs::write(parked(&dead).join("manifest.yaml"), "x"));
        // A dead process killed after its swap: only the parked engine and the owner are left.
        let done = p.join(format!("{PREFIX}done"));
        ok(std::fs::write(sibling(&done, ".owner"), format!("{}\n{}", u32::MAX, p.join("other").display())));
        ok(std::fs::create_dir(parked(&done)));
        // A live export (this process) and a fresh directory without an owner yet stay.
        let live = p.join(format!("{PREFIX}live"));
        ok(std::fs::create_dir(&live));
        let claim = ok(claim(&live, &p.join("third")));
        let fresh = p.join(format!("{PREFIX}fresh"));
        ok(std::fs::create_dir(&fresh));

        let removed = ok(clean_stale(p, PREFIX));
        assert_eq!(removed, vec![dead.clone()]);
        assert!(out.join("manifest.yaml").exists(), "the parked engine was not put back");
        assert!(!dead.exists() && !parked(&dead).exists() && !sibling(&dead, ".owner").exists());
        assert!(!parked(&done).exists() && !sibling(&done, ".owner").exists());
        assert!(live.exists() && fresh.exists() && sibling(&live, ".owner").exists());
        drop(claim);
        assert!(!sibling(&live, ".owner").exists(), "dropping the claim leaves its owner file");
    }
}
