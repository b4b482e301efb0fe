//! The fault engine: userfaultfd handler threads that populate guest RAM on demand.
//!
//! Each handler thread polls the userfaultfd (plus a shutdown eventfd and its own wake
//! eventfd), reads events in batches, and resolves every page fault under the retry
//! protocol of [`super::invalidation`]:
//! `try_read_begin` → page source read (no locks) → `lock` → `read_retry`? drop and retry :
//! install (COPY / ZEROPAGE for MISSING, CONTINUE for MINOR, WRITEPROTECT-clear for WP) →
//! mark the state table → unlock.
//!
//! A handler never *waits* for an invalidation: the invalidator may itself be waiting for
//! a handler to read the kernel's REMOVE event (MADV_DONTNEED blocks until it is read), so
//! a fault that meets an invalidation in progress is deferred and retried when the
//! invalidation ends (the engine subscribes to the layer and gets a wake-up). A fill that
//! returns `EAGAIN` (the kernel says the address space is changing) is deferred too, and
//! retried after the pending events are read. `EEXIST` means another resolver won: wake the
//! faulting thread.
//!
//! A handler that panics or hits a fatal error stores the error, signals
//! [`FaultEngine::failure_fd`] (and the optional callback) and stops all handlers; the
//! owner then ends the VM. [`FaultEngine::shutdown`] unregisters every region, which wakes
//! any thread still blocked on a fault so nothing hangs.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};

use super::engine_tuning::{EngineTuning, HandlerKind};
use super::fault_handler::handler_main;
use super::fault_stats::{new_histograms, Counters};
pub use super::fault_stats::{EngineStats, FaultKind, LatencySummary};
use super::invalidation::{Invalidation, InvalidationSubscriber, SubscriptionId};
use super::page_source::{PageSource, PageSourceError};
use super::page_state::PageStateTable;
use super::uffd::{Features, RangeIoctls, RegisterMode, Uffd, UffdError};
use super::{GuestRange, RegionBacking, Regions, UffdMode};
use hdrhistogram::Histogram;

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
    /// The reference handler met a fault it does not resolve.
    #[error("the reference handler does not resolve {0}; use the default engine for this workload")]
    ReferenceUnsupported(&'static str),
    /// A handler thread could not be started, or an eventfd/poll failed.
    #[error("fault engine setup failed: {0}")]
    Os(#[from] std::io::Error),
}

/// Called once, from the failing handler thread, when the engine dies, with the error's
/// message ([`FaultEngine::failure`] already returns it when this runs).
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

/// Writes the wake eventfd of every handler when an invalidation ends.
struct EndWaker {
    wake_fds: Vec<Arc<OwnedFd>>,
}

impl InvalidationSubscriber for EndWaker {
    fn invalidate(&self, _range: GuestRange) {}
    fn invalidate_end(&self, _range: GuestRange) {
        for fd in &self.wake_fds {
            signal(fd);
        }
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

/// What a [`super::discard::Discarder`] needs from a running engine.
#[derive(Debug, Clone)]
pub struct EngineLink {
    /// The engine's userfaultfd (for write protection).
    pub uffd: Arc<Uffd>,
    /// Where to announce our own MADV_DONTNEEDs (`None` when REMOVE events are off).
    pub expected_removes: Option<Arc<ExpectedRemoves>>,
}

/// Running fault handler threads for a set of registered regions.
pub struct FaultEngine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    subscription: SubscriptionId,
}

impl std::fmt::Debug for FaultEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultEngine").field("threads", &self.threads.len()).finish_non_exhaustive()
    }
}

/// The userfaultfd features the regions need.
fn required_features(regions: &Regions, non_coop: bool) -> (Features, Features) {
    let mut req = Features(0);
    let mut opt = Features(0);
    for r in regions.iter() {
        let hugetlb = matches!(r.backing, RegionBacking::Hugetlb { .. });
        let shared = matches!(r.backing, RegionBacking::Shared { .. });
        req = match (r.mode, hugetlb, shared) {
            (UffdMode::Missing, true, _) => req.union(Features::MISSING_HUGETLBFS),
            (UffdMode::Missing, _, true) => req.union(Features::MISSING_SHMEM),
            (UffdMode::Minor, true, _) => req.union(Features::MINOR_HUGETLBFS).union(Features::MISSING_HUGETLBFS),
            (UffdMode::Minor, _, true) => req.union(Features::MINOR_SHMEM).union(Features::MISSING_SHMEM),
            _ => req,
        };
        if r.write_protect {
            req = req.union(Features::WP);
            if hugetlb || shared {
                req = req.union(Features::WP_HUGETLBFS_SHMEM);
            } else {
                opt = opt.union(Features::WP_UNPOPULATED);
            }
        }
    }
    if non_coop {
        req = req.union(Features::EVENT_REMOVE).union(Features::EVENT_UNMAP);
        req = req.union(Features::EVENT_REMAP);
    }
    (req, opt)
}

impl FaultEngine {
    /// Opens a userfaultfd, registers every region whose mode or `write_protect` asks for
    /// it, and starts the handler threads with the default tuning.
    pub fn start(
        regions: Arc<Regions>,
        table: Arc<PageStateTable>,
        inv: Arc<Invalidation>,
        source: Arc<dyn PageSource>,
        config: FaultEngineConfig,
    ) -> Result<FaultEngine, FaultEngineError> {
        Self::start_tuned(regions, table, inv, source, config, EngineTuning::default())
    }

    /// [`FaultEngine::start`] with explicit tuning options.
    pub fn start_tuned(
        regions: Arc<Regions>,
        table: Arc<PageStateTable>,
        inv: Arc<Invalidation>,
        source: Arc<dyn PageSource>,
        config: FaultEngineConfig,
        tuning: EngineTuning,
    ) -> Result<FaultEngine, FaultEngineError> {
        if tuning != EngineTuning::default() {
            tracing::info!("fault engine tuning: {}", tuning.name());
        }
        let (req, opt) = required_features(&regions, config.non_cooperative_events);
        let uffd = Arc::new(Uffd::open(req, opt)?);
        let mut ioctls = Vec::new();
        for r in regions.iter() {
            let is_anon = matches!(r.backing, RegionBacking::PrivateAnon);
            if r.mode == UffdMode::Minor && is_anon {
                return Err(FaultEngineError::BadRegion {
                    gpa: r.guest_addr,
                    what: "MINOR faults need a shared (memfd/file) or hugetlb backing",
                });
            }
            let mode = RegisterMode {
                // A MINOR region is registered for MISSING faults too: a page discarded
                // (hole punched) after start is in neither the page cache nor the page
                // tables, and its next touch must still reach the engine (which fills it
                // with zeros) instead of being filled behind the state table's back.
                missing: r.mode != UffdMode::None,
                minor: r.mode == UffdMode::Minor,
                wp: r.write_protect,
            };
            if mode == RegisterMode::default() {
                ioctls.push(RangeIoctls(0));
                continue;
            }
            let got = uffd.register(r.host_addr, r.len, mode)?;
            let unsupported = |op| UffdError::Unsupported { op, start: r.host_addr, len: r.len };
            if mode.missing && !got.copy() {
                return Err(unsupported("UFFDIO_COPY").into());
            }
            if mode.minor && !got.continue_() {
                return Err(unsupported("UFFDIO_CONTINUE").into());
            }
            if mode.wp && !got.writeprotect() {
                return Err(unsupported("UFFDIO_WRITEPROTECT").into());
            }
            ioctls.push(got);
        }
        let efd = || eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK);
        let n = if tuning.handler == HandlerKind::Reference { 1 } else { config.handler_threads.max(1) };
        let wake_fds: Vec<Arc<OwnedFd>> =
            (0..n).map(|_| efd().map(Arc::new)).collect::<Result<_, _>>().map_err(std::io::Error::from)?;
        let shared = Arc::new(Shared {
            uffd,
            regions: regions.clone(),
            ioctls,
            table,
            inv: inv.clone(),
            source,
            config,
            tuning,
            expected_removes: Arc::new(ExpectedRemoves::default()),
            shutdown_fd: efd().map_err(std::io::Error::from)?,
            failure_fd: efd().map_err(std::io::Error::from)?,
            failure: Mutex::new(None),
            counters: Counters::default(),
            histograms: (0..n).map(|_| Mutex::new(new_histograms())).collect(),
        });
        let all = GuestRange::new(0, u64::MAX);
        let subscription = inv.subscribe(all, Arc::new(EndWaker { wake_fds: wake_fds.clone() }));
        let mut engine = FaultEngine { shared: shared.clone(), threads: Vec::new(), subscription };
        for (i, wake) in wake_fds.into_iter().enumerate() {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("smmu-fault-{i}"))
                .spawn(move || handler_main(&shared, i, &wake))?;
            engine.threads.push(t);
        }
        Ok(engine)
    }

    /// The tuning options the engine runs with.
    pub fn tuning(&self) -> EngineTuning {
        self.shared.tuning
    }

    /// The userfaultfd (for write-protect and discard operations).
    pub fn uffd(&self) -> &Arc<Uffd> {
        &self.shared.uffd
    }

    /// What a [`super::discard::Discarder`] needs from this engine.
    pub fn link(&self) -> EngineLink {
        EngineLink {
            uffd: self.shared.uffd.clone(),
            expected_removes: self.shared.config.non_cooperative_events.then(|| self.shared.expected_removes.clone()),
        }
    }

    /// The ioctls the kernel supports on each region, in region order.
    pub fn region_ioctls(&self) -> &[RangeIoctls] {
        &self.shared.ioctls
    }

    /// An eventfd that becomes readable when a handler thread died; poll it from the VMM's
    /// event loop and end the VM with [`FaultEngine::failure`].
    pub fn failure_fd(&self) -> BorrowedFd<'_> {
        self.shared.failure_fd.as_fd()
    }

    /// The error that stopped the engine, if one did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|e| e.to_string())
    }

    /// Waits up to `timeout` for a handler failure; returns its message.
    pub fn wait_failure(&self, timeout: Duration) -> Option<String> {
        let ts = Timespec::try_from(timeout).ok();
        let mut fds = [PollFd::new(&self.shared.failure_fd, PollFlags::IN)];
        let _ = poll(&mut fds, ts.as_ref());
        self.failure()
    }

    /// Counters and merged latency histograms so far.
    pub fn stats(&self) -> EngineStats {
        let mut latency_ns = new_histograms();
        for h in &self.shared.histograms {
            let h = h.lock().unwrap_or_else(|p| p.into_inner());
            for (dst, src) in latency_ns.iter_mut().zip(h.iter()) {
                let _ = dst.add(src);
            }
        }
        let c = &self.shared.counters;
        EngineStats {
            latency_ns,
            eexist: c.eexist.load(Ordering::Relaxed),
            eagain: c.eagain.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            deferred: c.deferred.load(Ordering::Relaxed),
            remove_events: c.remove_events.load(Ordering::Relaxed),
            external_removes: c.external_removes.load(Ordering::Relaxed),
            fault_around_pages: c.fault_around_pages.load(Ordering::Relaxed),
            lost_refilled: c.lost_refilled.load(Ordering::Relaxed),
        }
    }

    /// Stops the handlers, unregisters every region (waking any thread still blocked on a
    /// fault: it then gets ordinary kernel handling) and returns the failure that stopped
    /// the engine, if any.
    pub fn shutdown(mut self) -> Result<EngineStats, FaultEngineError> {
        self.stop();
        let stats = self.stats();
        match self.shared.failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    fn stop(&mut self) {
        signal(&self.shared.shutdown_fd);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.shared.inv.unsubscribe(self.subscription);
        unregister_all(&self.shared);
    }
}

/// Unregisters every region the engine registered.
fn unregister_all(shared: &Shared) {
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

impl Drop for FaultEngine {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}
