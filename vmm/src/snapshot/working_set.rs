//! Working sets of lazy restores (REAP, ASPLOS'21): `restore --memory-restore
//! uffd-missing --record-working-set` records the pages the restored guest touched
//! first, in first-touch order, during the first `--working-set-ms` after the restore,
//! and writes them beside the snapshot (`DIR/working-set.json`); a later restore with
//! `--prefetch working-set` brings exactly those pages in, in that order and merged into
//! runs, from the prefetch thread that starts before the vCPUs (the rest on demand).
//!
//! Pages are recorded as `(zone, offset in the zone, length)`, not guest-physical or host
//! addresses, so a working set recorded with one backend (4 KiB pages) serves a restore
//! into another (2 MiB hugetlb pages).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::memory::RamRegion;
use crate::smmu::page_source::{PageData, PageSource, PageSourceError};

/// The working-set file beside a snapshot's state file.
pub const FILE: &str = "working-set.json";

/// Errors reading or writing a working set.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// The file cannot be read or written.
    #[error(
        "{path}: {what}: {source}; record one first with restore --memory-restore uffd-missing --record-working-set"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a working set.
    #[error("{path}: not a working set ({reason}); record it again with --record-working-set")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A recorded working set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkingSet {
    /// How long after the restore pages were recorded, ms.
    pub window_ms: u64,
    /// `(zone, offset, len)` in first-touch order.
    pub pages: Vec<(usize, u64, u64)>,
}

impl WorkingSet {
    /// Reads `dir/working-set.json`.
    pub fn load(dir: &Path) -> Result<WorkingSet, WorkingSetError> {
        let path = dir.join(FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| WorkingSetError::Io {
            path: path.clone(),
            what: "read",
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| WorkingSetError::Format { path, reason: e.to_string() })
    }

    /// Host ranges of guest RAM `regions` holding the set's pages, in first-touch
    /// order, consecutive pages merged; pages outside every region are left out.
    pub fn host_ranges(&self, regions: &[RamRegion]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &(zone, offset, len) in &self.pages {
            let Some(r) =
                regions.iter().find(|r| r.zone == zone && offset >= r.fd_offset && offset - r.fd_offset < r.size_bytes)
            else {
                continue;
            };
            let start = (offset / r.page_bytes) * r.page_bytes;
            let end = (offset + len).div_ceil(r.page_bytes) * r.page_bytes;
            let end = end.min(r.fd_offset + r.size_bytes);
            let host = r.host_addr + (start - r.fd_offset);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == host => last.1 += end - start,
                Some(last) if host >= last.0 && host + (end - start) <= last.0 + last.1 => {}
                _ => out.push((host, end - start)),
            }
        }
        out
    }
}

/// A page source that records the pages it is asked for, then asks `inner`.
pub struct Recorder {
    inner: Arc<dyn PageSource>,
    started: OnceLock<Instant>,
    window: Duration,
    pages: Mutex<Vec<(u64, u64)>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("window", &self.window).finish()
    }
}

impl Recorder {
    /// Records first touches during `window` after [`Recorder::start`].
    pub fn new(inner: Arc<dyn PageSource>, window: Duration) -> Self {
        Recorder { inner, started: OnceLock::new(), window, pages: Mutex::new(Vec::new()) }
    }

    /// The window starts now (when the vCPUs are let go).
    pub fn start(&self) {
        let _ = self.started.set(Instant::now());
    }

    /// Writes the recorded pages into `dir/working-set.json` as zone offsets of
    /// `regions`; returns how many pages.
    pub fn save(&self, dir: &Path, regions: &[RamRegion]) -> Result<usize, WorkingSetError> {
        let recorded = self.pages.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut set =
            WorkingSet { window_ms: self.window.as_millis() as u64, pages: Vec::with_capacity(recorded.len()) };
        let mut seen = std::collections::HashSet::new();
        // A page read again (a retry of the protocol, an EAGAIN) keeps its first place.
        for (gpa, len) in recorded.into_iter().filter(|&(gpa, _)| seen.insert(gpa)) {
            if let Some(r) = regions.iter().find(|r| gpa >= r.gpa && gpa - r.gpa < r.size_bytes) {
                set.pages.push((r.zone, r.fd_offset + (gpa - r.gpa), len));
            }
        }
        let path = dir.join(FILE);
        let tmp = dir.join(format!("{FILE}.tmp"));
        let text = serde_json::to_string(&set).expect("a working set serializes");
        std::fs::write(&tmp, text).map_err(|source| WorkingSetError::Io {
            path: path.clone(),
            what: "write",
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| WorkingSetError::Io { path, what: "rename", source })?;
        Ok(set.pages.len())
    }
}

impl PageSource for Recorder {
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        if self.started.get().is_some_and(|at| at.elapsed() <= self.window) {
            self.pages.lock().unwrap_or_else(|e| e.into_inner()).push((gpa, buf.len() as u64));
        }
        self.inner.read_page(gpa, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_map_to_host_runs_in_first_touch_order() {
        let region = RamRegion {
            zone: 0,
            backend: crate::config::Backend::Anon,
            gpa: 0,
            size_bytes: 1 << 20,
            host_addr: 0x10_0000_0000,
            page_bytes: 4096,
            fd: None,
            fd_offset: 0,
            path: None,
        };
        let set = WorkingSet {
            window_ms: 1,
            pages: vec![(0, 0x5000, 4096), (0, 0x6000, 4096), (0, 0x1000, 4096), (1, 0, 4096)],
        };
        assert_eq!(set.host_ranges(&[region]), vec![(0x10_0000_5000, 0x2000), (0x10_0000_1000, 0x1000)]);
    }
}
