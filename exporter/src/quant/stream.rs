//! What streamed calibration keeps between blocks: the activations of the calibration set
//! (in memory up to a budget, spilled to the scratch directory past it), and what it measures
//! of itself (peak anonymous memory, peak scratch disk).
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};

/// Default bytes of activations held in memory between blocks.
pub const DEFAULT_MEMORY_BUDGET: usize = 1 << 30;

/// One sample's activations.
enum Slot {
    Empty,
    Memory(Vec<f32>),
    /// Spilled to this file, this many values.
    Disk(PathBuf, usize),
}

/// The current activations of every sample, held in memory up to `budget` bytes and spilled
/// to files under `dir` past it.
pub struct Activations {
    dir: PathBuf,
    budget: usize,
    held: usize,
    slots: Vec<Slot>,
    spilled: u64,
}

impl Activations {
    /// `samples` empty slots; spills go to `dir`.
    pub fn new(dir: &Path, samples: usize, budget: usize) -> Self {
        Self { dir: dir.to_path_buf(), budget, held: 0, slots: (0..samples).map(|_| Slot::Empty).collect(), spilled: 0 }
    }

    /// Stores sample `i`'s activations (in memory while they fit in the budget).
    pub fn put(&mut self, i: usize, values: Vec<f32>) -> Result<()> {
        let bytes = values.len() * 4;
        let slot = if self.held + bytes <= self.budget {
            self.held += bytes;
            Slot::Memory(values)
        } else {
            let path = self.dir.join(format!("activations-{i}.f32"));
            let mut file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            file.write_all(bytemuck::cast_slice(&values)).map_err(|e| Error::io(&path, e))?;
            self.spilled += bytes as u64;
            Slot::Disk(path, values.len())
        };
        self.slots[i] = slot;
        Ok(())
    }

    /// Takes sample `i`'s activations out (a spilled file is read and removed).
    pub fn take(&mut self, i: usize) -> Result<Vec<f32>> {
        match std::mem::replace(&mut self.slots[i], Slot::Empty) {
            Slot::Memory(v) => {
                self.held -= v.len() * 4;
                Ok(v)
            }
            Slot::Disk(path, len) => {
                let mut v = vec![0f32; len];
                let mut file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
                file.read_exact(bytemuck::cast_slice_mut(&mut v)).map_err(|e| Error::io(&path, e))?;
                drop(file);
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                Ok(v)
            }
            Slot::Empty => Err(Error::Invalid(format!("calibration sample {i} has no activations"))),
        }
    }

    /// Bytes written to spill files so far.
    pub fn spilled(&self) -> u64 {
        self.spilled
    }
}

/// Samples this process's `RssAnon` every 50 ms on a thread until dropped; the peak stays
/// readable.
pub struct AnonSampler {
    stop: Arc<AtomicBool>,
    peak_kb: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AnonSampler {
    /// Starts sampling.
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kb = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak_kb.clone());
        let thread = std::thread::Builder::new()
            .name("calib-rss".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Some(mb) = vl_runtime::memory::rss_anon_mb() {
                        p.fetch_max((mb * 1024.0) as u64, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
            .ok();
        Self { stop, peak_kb, thread }
    }

    /// The largest `RssAnon` seen, in MB (`None` where `/proc` does not say).
    pub fn peak_mb(&self) -> Option<f64> {
        if let Some(mb) = vl_runtime::memory::rss_anon_mb() {
            self.peak_kb.fetch_max((mb * 1024.0) as u64, Ordering::Relaxed);
        }
        let kb = self.peak_kb.load(Ordering::Relaxed);
        (kb > 0).then(|| kb as f64 / 1024.0)
    }
}

impl Drop for AnonSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes of the files directly in `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_past_the_budget_are_spilled_and_come_back() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut a = Activations::new(dir.path(), 3, 40);
        let ok = |r: Result<()>| r.unwrap_or_else(|e| panic!("{e}"));
        ok(a.put(0, vec![1.0; 8]));
        ok(a.put(1, vec![2.0; 4]));
        ok(a.put(2, vec![3.0; 2]));
        assert_eq!(a.spilled(), 16, "the second sample does not fit beside the first");
        assert_eq!(dir_bytes(dir.path()), 16);
        let take = |a: &mut Activations, i| a.take(i).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(take(&mut a, 1), vec![2.0; 4]);
        assert_eq!(dir_bytes(dir.path()), 0, "a spill file read back is removed");
        assert_eq!(take(&mut a, 0), vec![1.0; 8]);
        assert_eq!(take(&mut a, 2), vec![3.0; 2]);
        assert!(a.take(2).is_err(), "taken twice");
    }
}
