//! `restore --memory-restore uffd-missing --prefetch background`: a thread that brings
//! every page the snapshot chain carries into guest RAM while the guest runs.
//!
//! It does not fill pages itself: it asks the kernel to populate the guest's own mapping
//! (`MADV_POPULATE_READ`, 2 MiB at a time), so every page it brings in is one MISSING
//! fault resolved by the fault engine under the retry protocol like any other. That gives
//! the two guarantees a prefetch needs for free: a page already installed raises no fault
//! (the prefetch never overwrites what the guest was given), and a page discarded since
//! the restore is filled with zeros by the engine (its state table says DISCARDED), so a
//! discard is never undone by a late fill. Faults the guest takes meanwhile are served
//! by the engine's other threads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use rustix::mm::{madvise, Advice};

use super::lazy::ChainSource;
use crate::memory::RamRegion;

/// How much is populated per call (a stop request is seen between calls).
const STEP: u64 = 2 << 20;

/// The background prefetch of a lazy restore.
pub struct Prefetcher {
    stop: Arc<AtomicBool>,
    done_bytes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// Host ranges of guest RAM `regions` that `source` carries data for, page-aligned.
pub fn carried_host_ranges(source: &ChainSource, regions: &[RamRegion]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for r in regions {
        for (from, to) in source.carried_within(r.zone, r.fd_offset, r.size_bytes, r.page_bytes) {
            out.push((r.host_addr + (from - r.fd_offset), to - from));
        }
    }
    out
}

impl Prefetcher {
    /// Starts populating `ranges` (host addresses of guest RAM registered for MISSING
    /// faults, served by a running fault engine).
    pub fn start(ranges: Vec<(u64, u64)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done_bytes = Arc::new(AtomicU64::new(0));
        let (flag, done) = (stop.clone(), done_bytes.clone());
        let thread = std::thread::Builder::new()
            .name("fl-prefetch".into())
            .spawn(move || {
                let started = Instant::now();
                let total: u64 = ranges.iter().map(|r| r.1).sum();
                for (start, len) in ranges {
                    let mut at = start;
                    while at < start + len {
                        if flag.load(Ordering::SeqCst) {
                            return;
                        }
                        let step = STEP.min(start + len - at);
                        // SAFETY: [at, at + step) lies inside guest RAM's live mapping, which
                        // outlives this thread (the Vmm stops it before tearing RAM down);
                        // populating only faults pages in through the fault engine, it
                        // changes no contents the guest has.
                        if let Err(e) = unsafe { madvise(at as *mut _, step as usize, Advice::LinuxPopulateRead) } {
                            tracing::debug!("prefetch stopped at {at:#x}: {e}");
                            return;
                        }
                        done.fetch_add(step, Ordering::Relaxed);
                        at += step;
                    }
                }
                tracing::info!("prefetch: {} MiB in {:.1} ms", total >> 20, started.elapsed().as_secs_f64() * 1e3);
            })
            .ok();
        Prefetcher { stop, done_bytes, thread }
    }

    /// Bytes populated so far.
    pub fn done_bytes(&self) -> u64 {
        self.done_bytes.load(Ordering::Relaxed)
    }

    /// Stops the thread (between two steps) and waits for it; returns the bytes done.
    pub fn finish(mut self) -> u64 {
        self.stop_and_join();
        self.done_bytes()
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
