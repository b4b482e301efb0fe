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

use super::engine_shared::{run_guarded, signal, unregister_all, Shared};
pub use super::engine_shared::{ExpectedRemoves, FailureCallback, FaultEngineConfig, FaultEngineError};
use super::engine_tuning::{EngineTuning, HandlerKind};
use super::fault_stats::{new_histograms, Counters};
pub use super::fault_stats::{EngineStats, FaultKind, LatencySummary};
use super::invalidation::{Invalidation, InvalidationSubscriber, SubscriptionId};
use super::page_installer::PageInstaller;
use super::page_source::PageSource;
use super::page_state::PageStateTable;
use super::uffd::{Features, RangeIoctls, RegisterMode, Uffd, UffdError};
use super::{fault_handler, minimal_handler, reference_handler};
use super::{GuestRange, RegionBacking, Regions, UffdMode};

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
    // Cheap, and lets a page source tell which vCPU waits (post-copy's blocktime).
    opt = opt.union(Features::THREAD_ID);
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
        let n = if tuning.handler.single_threaded() { 1 } else { config.handler_threads.max(1) };
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
            pending_latency: Mutex::new(new_histograms().swap_remove(0)),
        });
        let all = GuestRange::new(0, u64::MAX);
        let subscription = inv.subscribe(all, Arc::new(EndWaker { wake_fds: wake_fds.clone() }));
        let mut engine = FaultEngine { shared: shared.clone(), threads: Vec::new(), subscription };
        for (i, wake) in wake_fds.into_iter().enumerate() {
            let shared = shared.clone();
            let t = std::thread::Builder::new().name(format!("smmu-fault-{i}")).spawn(move || {
                run_guarded(&shared, i, || match shared.tuning.handler {
                    HandlerKind::Engine => fault_handler::run(&shared, i, &wake),
                    HandlerKind::Reference => reference_handler::run(&shared),
                    HandlerKind::Minimal => minimal_handler::run(&shared),
                })
            })?;
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

    /// The completion path for a source that answers "later": hand it to the source
    /// (see [`super::page_source`]) after the engine started.
    pub fn installer(&self) -> PageInstaller {
        PageInstaller::new(self.shared.clone())
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
            pending: c.pending.load(Ordering::Relaxed),
            completed: c.completed.load(Ordering::Relaxed),
            completions_dropped: c.completions_dropped.load(Ordering::Relaxed),
            pending_latency_ns: self.shared.pending_latency.lock().unwrap_or_else(|p| p.into_inner()).clone(),
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

impl Drop for FaultEngine {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}
