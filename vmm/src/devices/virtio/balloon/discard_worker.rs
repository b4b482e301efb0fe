//! A second host thread for the balloon's large discards.
//!
//! The kernel's zap of the host page tables is most of an inflation's cost, and two
//! threads zapping disjoint ranges run in parallel (the invalidation layer and the kernel
//! both allow it). The thread is started once, on the first large discard, and then
//! parked: a thread spawned per batch starts late, because its start maps a signal stack,
//! which waits for the mmap lock the caller's own `MADV_DONTNEED` holds.
//!
//! Work is shared, not split in halves: the runs are cut into [`CHUNK_BYTES`] pieces that
//! both threads take in turn, so when the worker has no CPU (a shared host) the caller
//! does all of it and waits at most for the one piece the worker holds. The caller never
//! waits for a worker that has not picked the batch up yet.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::smmu::discard::{DiscardError, Discarder};
use crate::smmu::{GuestRange, PAGE_4K};

/// Discards are handed out in pieces of this many bytes (128 `madvise` calls per GiB).
pub(super) const CHUNK_BYTES: u64 = 8 << 20;

/// What the discards of one batch did.
#[derive(Debug, Default)]
pub(super) struct BatchOutcome {
    /// Bytes the host freed.
    pub freed: u64,
    /// Discards that failed, with their errors.
    pub errors: Vec<DiscardError>,
}

/// One batch: pieces to discard and what was done with them.
struct Batch {
    pieces: Vec<GuestRange>,
    next: AtomicUsize,
    freed: AtomicU64,
    errors: Mutex<Vec<DiscardError>>,
}

impl Batch {
    /// Takes and discards pieces until none is left.
    fn run(&self, discarder: &Discarder) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&piece) = self.pieces.get(i) else { return };
            match discarder.discard(piece) {
                Ok(report) => {
                    self.freed.fetch_add(report.freed.iter().map(|r| r.len).sum(), Ordering::Relaxed);
                }
                Err(e) => lock(&self.errors).push(e),
            }
        }
    }
}

#[derive(Default)]
struct Slot {
    /// A batch the worker may join; the caller takes it back when it is done.
    offered: Option<Arc<Batch>>,
    /// The worker is discarding pieces of a batch.
    busy: bool,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    slot: Mutex<Slot>,
    changed: Condvar,
}

/// The balloon's discard helper thread (started on first use, joined on drop).
#[derive(Default)]
pub(super) struct DiscardWorker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DiscardWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscardWorker").field("started", &self.thread.is_some()).finish()
    }
}

impl DiscardWorker {
    /// Discards `runs` (4 KiB-aligned ranges) with this thread and the worker; returns
    /// when every piece is done, the worker's included.
    pub fn discard(&mut self, discarder: &Discarder, runs: Vec<GuestRange>) -> BatchOutcome {
        let batch = Arc::new(Batch {
            pieces: pieces(runs),
            next: AtomicUsize::new(0),
            freed: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
        });
        let offered = batch.pieces.len() > 1 && self.ensure_started(discarder);
        if offered {
            lock(&self.shared.slot).offered = Some(batch.clone());
            self.shared.changed.notify_all();
        }
        batch.run(discarder);
        if offered {
            let mut slot = lock(&self.shared.slot);
            slot.offered = None;
            while slot.busy {
                slot = self.shared.changed.wait(slot).unwrap_or_else(|e| e.into_inner());
            }
        }
        let errors = std::mem::take(&mut *lock(&batch.errors));
        BatchOutcome { freed: batch.freed.load(Ordering::Relaxed), errors }
    }

    /// Starts the thread if it is not running; false if it cannot be started (the caller
    /// then does all the work).
    fn ensure_started(&mut self, discarder: &Discarder) -> bool {
        if self.thread.is_some() {
            return true;
        }
        let (shared, discarder) = (self.shared.clone(), discarder.clone());
        let spawned = std::thread::Builder::new()
            .name("fl-balloon-discard".into())
            .stack_size(256 << 10)
            .spawn(move || serve(&shared, &discarder));
        match spawned {
            Ok(thread) => {
                self.thread = Some(thread);
                true
            }
            Err(e) => {
                tracing::warn!("balloon: no discard helper thread ({e}); discarding on one thread");
                false
            }
        }
    }
}

impl Drop for DiscardWorker {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        lock(&self.shared.slot).stop = true;
        self.shared.changed.notify_all();
        let _ = thread.join();
    }
}

/// The worker's loop: join each offered batch once, until told to stop.
fn serve(shared: &Shared, discarder: &Discarder) {
    let mut slot = lock(&shared.slot);
    loop {
        if slot.stop {
            return;
        }
        let Some(batch) = slot.offered.take() else {
            slot = shared.changed.wait(slot).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        slot.busy = true;
        drop(slot);
        batch.run(discarder);
        slot = lock(&shared.slot);
        slot.busy = false;
        shared.changed.notify_all();
    }
}

/// Cuts runs into pieces of at most [`CHUNK_BYTES`], in order.
fn pieces(runs: Vec<GuestRange>) -> Vec<GuestRange> {
    let mut out = Vec::with_capacity(runs.len());
    for run in runs {
        let mut gpa = run.gpa;
        while gpa < run.end() {
            let len = (run.end() - gpa).min(CHUNK_BYTES / PAGE_4K * PAGE_4K);
            out.push(GuestRange::new(gpa, len));
            gpa += len;
        }
    }
    out
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_runs_exactly_in_bounded_parts() {
        let runs = vec![GuestRange::new(0, PAGE_4K), GuestRange::new(1 << 30, CHUNK_BYTES * 2 + 3 * PAGE_4K)];
        let out = pieces(runs.clone());
        assert!(out.iter().all(|p| p.len > 0 && p.len <= CHUNK_BYTES && p.len % PAGE_4K == 0));
        assert_eq!(out.iter().map(|p| p.len).sum::<u64>(), runs.iter().map(|r| r.len).sum::<u64>());
        assert_eq!(out.len(), 4);
        assert_eq!(out[1], GuestRange::new(1 << 30, CHUNK_BYTES));
        assert_eq!(out[3].end(), runs[1].end());
    }
}
