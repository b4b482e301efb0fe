//! What the fault engine and its handler threads share: the engine's error type and
//! settings, the [`Shared`] state every handler thread works on, the ledger of our own
//! REMOVEs, and the pieces every handler design uses alike (non-fault events, latency
//! recording, dying cleanly).
//!
//! A leaf of the engine's modules: [`super::fault_engine`] (the owner) and the handler
//! designs ([`super::fault_handler`], [`super::fault_around`],
//! [`super::reference_handler`], [`super::minimal_handler`]) all build on it, and it uses
//! none of them, so the engine has no import cycle.

use std::os::fd::OwnedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdrhistogram::Histogram;

use super::engine_tuning::EngineTuning;
use super::fault_stats::{Counters, FaultKind};
use super::invalidation::Invalidation;
use super::page_source::{PageSource, PageSourceError};
use super::page_state::PageStateTable;
use super::uffd::{Event, RangeIoctls, Uffd, UffdError};
use super::{GuestRange, Regions, PAGE_2M};

/// Errors from the fault engine.
#[derive(Debug, thiserror::Error)]
pub enum FaultEngineError {
    /// A userfaultfd operation failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The page source failed: the guest cannot get its page.
    #[error("fault at gpa {gpa:#x} cannot be resolved: {source}")]
    Source {
        /// The faulting page.
        gpa: u64,
        /// The source's error.
        source: PageSourceError,
    },
    /// The kernel reported a fault outside every registered region.
    #[error("userfaultfd fault at host address {0:#x} is outside every guest RAM region; the region list given to the engine is wrong")]
    UnknownAddress(u64),
    /// A region's mode does not fit its backing.
    #[error("region at gpa {gpa:#x}: {what}; pick another paging mode for it")]
    BadRegion {
        /// Region start.
        gpa: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// A handler thread panicked.
    #[error("fault handler thread {thread} panicked: {message}; the VM cannot make progress and was stopped")]
    HandlerPanicked {
        /// Handler index.
        thread: usize,
        /// The panic payload, if it was a string.
        message: String,
    },
    /// A yardstick handler (reference, minimal) met a fault it does not resolve.
    #[error("the {handler} handler does not resolve {what}; use the default engine for this workload")]
    HandlerUnsupported {
        /// The handler design.
        handler: &'static str,
        /// The kind of fault.
        what: &'static str,
    },
    /// A handler thread could not be started, or an eventfd/poll failed.
    #[error("fault engine setup failed: {0}")]
    Os(#[from] std::io::Error),
}

/// Called once, from the failing handler thread, when the engine dies, with the error's
/// message ([`super::fault_engine::FaultEngine::failure`] already returns it when this runs).
pub type FailureCallback = Arc<dyn Fn(&str) + Send + Sync>;

/// Engine settings.
#[derive(Clone)]
pub struct FaultEngineConfig {
    /// Number of handler threads (at least 1).
    pub handler_threads: usize,
    /// Messages read per `read()`.
    pub batch: usize,
    /// Ask for REMOVE / UNMAP / REMAP events (non-cooperative mode). With them, a
    /// MADV_DONTNEED of registered memory blocks until a handler reads the event.
    pub non_cooperative_events: bool,
    /// Called once, from the failing thread, when a handler dies.
    pub on_failure: Option<FailureCallback>,
}

impl Default for FaultEngineConfig {
    fn default() -> Self {
        Self { handler_threads: 2, batch: 64, non_cooperative_events: true, on_failure: None }
    }
}

/// Signals an eventfd.
pub(super) fn signal(fd: &OwnedFd) {
    // An eventfd write only fails if the counter would overflow, i.e. it is signalled.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// State shared by the engine and its handler threads.
pub(super) struct Shared {
    pub(super) uffd: Arc<Uffd>,
    pub(super) regions: Arc<Regions>,
    pub(super) ioctls: Vec<RangeIoctls>,
    pub(super) table: Arc<PageStateTable>,
    pub(super) inv: Arc<Invalidation>,
    pub(super) source: Arc<dyn PageSource>,
    pub(super) config: FaultEngineConfig,
    pub(super) tuning: EngineTuning,
    pub(super) shutdown_fd: OwnedFd,
    pub(super) failure_fd: OwnedFd,
    pub(super) expected_removes: Arc<ExpectedRemoves>,
    pub(super) failure: Mutex<Option<FaultEngineError>>,
    pub(super) counters: Counters,
    pub(super) histograms: Vec<Mutex<Vec<Histogram<u64>>>>,
    /// Latency of the faults a source answered later (recorded by the completion path).
    pub(super) pending_latency: Mutex<Histogram<u64>>,
}

/// Host ranges that our own discards are about to `MADV_DONTNEED`, so that handlers
/// recognise the kernel's REMOVE events for them. Reading an event lets the remover go on,
/// so a handler may process the event after the discard returned: "is an invalidation in
/// progress?" cannot tell ours from others, this ledger can.
#[derive(Debug, Default)]
pub struct ExpectedRemoves {
    /// `(start, end, bytes not yet reported)`; one madvise over several VMAs is reported
    /// as one event per VMA.
    ranges: Mutex<Vec<(u64, u64, u64)>>,
}

impl ExpectedRemoves {
    /// Announces a REMOVE of host range `[start, end)`.
    pub fn expect(&self, start: u64, end: u64) {
        self.lock().push((start, end, end - start));
    }

    /// Withdraws an announcement whose madvise failed (no event will come).
    pub fn cancel(&self, start: u64, end: u64) {
        let mut v = self.lock();
        if let Some(i) = v.iter().position(|&(s, e, _)| s == start && e == end) {
            v.swap_remove(i);
        }
    }

    /// Consumes the announcement covering an event; false if none does.
    pub(super) fn take(&self, start: u64, end: u64) -> bool {
        let mut v = self.lock();
        let Some(i) = v.iter().position(|&(s, e, _)| s <= start && end <= e) else {
            return false;
        };
        v[i].2 = v[i].2.saturating_sub(end - start);
        if v[i].2 == 0 {
            v.swap_remove(i);
        }
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64, u64)>> {
        self.ranges.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Unregisters every region the engine registered.
pub(super) fn unregister_all(shared: &Shared) {
    for (r, io) in shared.regions.iter().zip(&shared.ioctls) {
        if io.0 != 0 {
            if let Err(e) = shared.uffd.unregister(r.host_addr, r.len) {
                tracing::warn!("unregistering guest RAM at {:#x}: {e}", r.guest_addr);
            }
        }
    }
}

/// After a handler died, releases every thread that would wait for it: unregistering
/// guest RAM wakes the threads waiting on a fault (their retry is filled by the kernel),
/// and reading the pending events completes the `MADV_DONTNEED`s that block until their
/// REMOVE is read. Unregistering and queueing an event both hold the mmap lock, so no
/// event can be queued after the unregister and one drain is enough.
pub(super) fn release_after_failure(shared: &Shared) {
    unregister_all(shared);
    let mut msgs = super::uffd::msg_buffer(64);
    let mut events = Vec::new();
    while let Ok(n) = shared.uffd.read_events(&mut msgs, &mut events) {
        if n == 0 {
            break;
        }
    }
}

/// Runs the body of handler thread `idx` (whichever handler design it is) until shutdown;
/// if it fails or panics, records the failure, releases every thread waiting on the engine,
/// tells the owner and stops the other handlers.
pub(super) fn run_guarded(shared: &Shared, idx: usize, body: impl FnOnce() -> Result<(), FaultEngineError>) {
    let result = catch_unwind(AssertUnwindSafe(body));
    let err = match result {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            FaultEngineError::HandlerPanicked { thread: idx, message }
        }
    };
    tracing::error!("fault handler {idx} died: {err}");
    fail(shared, err);
}

/// Stops the engine for `err`: records it, releases every thread waiting on the engine,
/// tells the owner and stops the handlers. Used by a dying handler and by a source that
/// cannot complete a page it answered "later" for.
pub(super) fn fail(shared: &Shared, err: FaultEngineError) {
    // Recorded before the callback runs, so whoever the callback wakes finds the reason.
    let message = err.to_string();
    shared.failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(err);
    // The owner ends the VM (and kicks its vCPUs) before the waiting threads are
    // released: a vCPU woken by the unregistration would otherwise map a zero page where
    // its page failed and run on it (a lazy restore from a corrupted image triple-faulted
    // that way before the VM was ended).
    if let Some(cb) = &shared.config.on_failure {
        cb(&message);
    }
    release_after_failure(shared);
    signal(&shared.failure_fd);
    signal(&shared.shutdown_fd); // stop the other handlers too
}

/// Every event but a page fault: REMOVE / UNMAP (invalidate), REMAP (log), FORK (close).
/// Shared by every handler design.
/// The single-threaded handlers' wait (reference, minimal): `poll` the userfaultfd and the
/// shutdown eventfd, then `read` one message. `None` at shutdown.
pub(super) fn next_event(
    s: &Shared,
    msg: &mut [super::uffd::RawMsg],
    events: &mut Vec<Event>,
) -> Result<Option<Event>, FaultEngineError> {
    use rustix::event::{poll, PollFd, PollFlags};
    loop {
        let mut fds = [PollFd::new(&*s.uffd, PollFlags::IN), PollFd::new(&s.shutdown_fd, PollFlags::IN)];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
        if !fds[1].revents().is_empty() {
            return Ok(None);
        }
        if s.uffd.read_events(msg, events)? > 0 {
            return Ok(events.pop());
        }
    }
}

pub(super) fn on_other_event(s: &Shared, ev: Event) {
    match ev {
        Event::PageFault { .. } => unreachable!("page faults are resolved by the caller"),
        Event::Remove { start, end } | Event::Unmap { start, end } => {
            s.counters.remove_events.fetch_add(1, Ordering::Relaxed);
            on_remove(s, start, end, matches!(ev, Event::Unmap { .. }));
        }
        Event::Remap { from, to, len } => {
            tracing::error!(
                "guest RAM moved by mremap ({from:#x} -> {to:#x}, {len:#x} bytes); faults there will be refused"
            );
        }
        Event::Fork { child_uffd } => {
            // We never ask for EVENT_FORK; if one comes, close the child's fd.
            // SAFETY: the kernel installed this fd for us with the message; we own it.
            drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(child_uffd) });
        }
    }
}

/// A REMOVE/UNMAP from the kernel. Our own discards announced theirs in
/// [`ExpectedRemoves`] and did the invalidation themselves; anything
/// else is invalidated here.
fn on_remove(shared: &Shared, start: u64, end: u64, unmap: bool) {
    if !unmap && shared.expected_removes.take(start, end) {
        return;
    }
    for r in shared.regions.iter() {
        let s = start.max(r.host_addr);
        let e = end.min(r.host_addr + r.len);
        if s >= e {
            continue;
        }
        let range = GuestRange::new(r.gpa_of(s), e - s);
        // Processed after the kernel let the remover go on (reading the event completes
        // it), so a page may already have been refaulted: the marks below are a best
        // effort. All of the VMM's own discards go through the expected path above.
        shared.counters.external_removes.fetch_add(1, Ordering::Relaxed);
        if unmap {
            tracing::warn!("guest RAM [{:#x}, +{:#x}) was unmapped behind the smmu", range.gpa, range.len);
        }
        let _g = shared.inv.invalidate(range);
        shared.table.mark_discarded(range);
    }
}

/// Records one resolved fault's latency (message read → installed) in handler `idx`'s
/// histograms.
pub(super) fn record_latency(s: &Shared, idx: usize, kind: FaultKind, page_bytes: u64, read_at: Instant) {
    let ns = read_at.elapsed().as_nanos().min(u64::MAX as u128) as u64;
    let slot = kind as usize * 2 + usize::from(page_bytes >= PAGE_2M);
    let mut h = s.histograms[idx].lock().unwrap_or_else(|p| p.into_inner());
    h[slot].saturating_record(ns.max(1));
}
