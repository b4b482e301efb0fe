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

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};

use super::invalidation::{Invalidation, InvalidationSubscriber, SubscriptionId};
use super::page_source::{PageData, PageSource, PageSourceError};
use super::page_state::{PageState, PageStateTable};
use super::uffd::{Event, Features, FillOutcome, RangeIoctls, RegisterMode, Uffd, UffdError};
use super::{GuestRange, RegionBacking, Regions, UffdMode, PAGE_2M};

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
    /// A handler thread could not be started, or an eventfd/poll failed.
    #[error("fault engine setup failed: {0}")]
    Os(#[from] std::io::Error),
}

/// The kinds of fault, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// A missing page (COPY / ZEROPAGE).
    Missing,
    /// A minor fault (CONTINUE).
    Minor,
    /// A write to a write-protected page.
    WriteProtect,
}

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
    pub on_failure: Option<Arc<dyn Fn(&FaultEngineError) + Send + Sync>>,
}

impl Default for FaultEngineConfig {
    fn default() -> Self {
        Self { handler_threads: 2, batch: 64, non_cooperative_events: true, on_failure: None }
    }
}

/// Per-kind latency figures (nanoseconds, message read → installed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySummary {
    /// Fault kind.
    pub kind: FaultKind,
    /// Page size in bytes.
    pub page_bytes: u64,
    /// Faults resolved.
    pub count: u64,
    /// Median latency.
    pub p50_ns: u64,
    /// 99th percentile latency.
    pub p99_ns: u64,
    /// Largest latency.
    pub max_ns: u64,
}

/// Counters and latency histograms of an engine.
#[derive(Debug, Clone)]
pub struct EngineStats {
    /// Latency per (kind, page size), index `kind * 2 + huge`.
    pub latency_ns: Vec<Histogram<u64>>,
    /// Fills that found the page already present (EEXIST) and woke the waiter.
    pub eexist: u64,
    /// Fills refused because the address space was changing (EAGAIN).
    pub eagain: u64,
    /// Resolutions dropped by `read_retry` and started again.
    pub retries: u64,
    /// Faults deferred because an invalidation of their page was in progress.
    pub deferred: u64,
    /// REMOVE / UNMAP events read.
    pub remove_events: u64,
    /// REMOVE / UNMAP events not caused by our own invalidations (invalidated here).
    pub external_removes: u64,
}

impl EngineStats {
    /// Summaries of every (kind, page size) that saw faults.
    pub fn summaries(&self) -> Vec<LatencySummary> {
        let kinds = [FaultKind::Missing, FaultKind::Minor, FaultKind::WriteProtect];
        let mut out = Vec::new();
        for (i, h) in self.latency_ns.iter().enumerate() {
            if h.is_empty() {
                continue;
            }
            out.push(LatencySummary {
                kind: kinds[i / 2],
                page_bytes: if i % 2 == 1 { PAGE_2M } else { 4096 },
                count: h.len(),
                p50_ns: h.value_at_quantile(0.5),
                p99_ns: h.value_at_quantile(0.99),
                max_ns: h.max(),
            });
        }
        out
    }

    /// Faults resolved of one kind (all page sizes).
    pub fn resolved(&self, kind: FaultKind) -> u64 {
        let k = kind as usize;
        self.latency_ns[k * 2].len() + self.latency_ns[k * 2 + 1].len()
    }
}

fn new_histograms() -> Vec<Histogram<u64>> {
    (0..6).map(|_| Histogram::new(3).expect("3 significant figures is valid")).collect()
}

#[derive(Default)]
struct Counters {
    eexist: AtomicU64,
    eagain: AtomicU64,
    retries: AtomicU64,
    deferred: AtomicU64,
    remove_events: AtomicU64,
    external_removes: AtomicU64,
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

fn signal(fd: &OwnedFd) {
    // An eventfd write only fails if the counter would overflow, i.e. it is signalled.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

struct Shared {
    uffd: Arc<Uffd>,
    regions: Arc<Regions>,
    ioctls: Vec<RangeIoctls>,
    table: Arc<PageStateTable>,
    inv: Arc<Invalidation>,
    source: Arc<dyn PageSource>,
    config: FaultEngineConfig,
    shutdown_fd: OwnedFd,
    failure_fd: OwnedFd,
    expected_removes: Arc<ExpectedRemoves>,
    failure: Mutex<Option<FaultEngineError>>,
    counters: Counters,
    histograms: Vec<Mutex<Vec<Histogram<u64>>>>,
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
    fn take(&self, start: u64, end: u64) -> bool {
        let mut v = self.lock();
        let Some(i) = v.iter().position(|&(s, e, _)| s <= start && end <= e) else { return false };
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
            (UffdMode::Minor, true, _) => req.union(Features::MINOR_HUGETLBFS),
            (UffdMode::Minor, _, true) => req.union(Features::MINOR_SHMEM),
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
    /// it, and starts the handler threads.
    pub fn start(
        regions: Arc<Regions>,
        table: Arc<PageStateTable>,
        inv: Arc<Invalidation>,
        source: Arc<dyn PageSource>,
        config: FaultEngineConfig,
    ) -> Result<FaultEngine, FaultEngineError> {
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
                missing: r.mode == UffdMode::Missing,
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
        let n = config.handler_threads.max(1);
        let wake_fds: Vec<Arc<OwnedFd>> = (0..n).map(|_| efd().map(Arc::new)).collect::<Result<_, _>>()
            .map_err(std::io::Error::from)?;
        let shared = Arc::new(Shared {
            uffd,
            regions: regions.clone(),
            ioctls,
            table,
            inv: inv.clone(),
            source,
            config,
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

    /// The userfaultfd (for write-protect and discard operations).
    pub fn uffd(&self) -> &Arc<Uffd> {
        &self.shared.uffd
    }

    /// What a [`super::discard::Discarder`] needs from this engine.
    pub fn link(&self) -> EngineLink {
        EngineLink {
            uffd: self.shared.uffd.clone(),
            expected_removes: self
                .shared
                .config
                .non_cooperative_events
                .then(|| self.shared.expected_removes.clone()),
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
        for (r, io) in self.shared.regions.iter().zip(&self.shared.ioctls) {
            if io.0 != 0 {
                if let Err(e) = self.shared.uffd.unregister(r.host_addr, r.len) {
                    tracing::warn!("unregistering guest RAM at {:#x}: {e}", r.guest_addr);
                }
            }
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

/// A fault waiting to be resolved.
#[derive(Debug, Clone, Copy)]
struct Fault {
    region: usize,
    /// Granule-aligned host address.
    hva: u64,
    kind: FaultKind,
    write: bool,
    read_at: Instant,
}

/// Why a fault was put aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defer {
    /// An invalidation of the page is in progress: retry when one ends.
    Invalidation,
    /// EAGAIN: read pending events, then retry.
    MmChanging,
}

fn handler_main(shared: &Arc<Shared>, idx: usize, wake: &OwnedFd) {
    let result = catch_unwind(AssertUnwindSafe(|| Handler::new(shared, idx).run(wake)));
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
    if let Some(cb) = &shared.config.on_failure {
        cb(&err);
    }
    {
        let mut slot = shared.failure.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(err);
    }
    signal(&shared.failure_fd);
    signal(&shared.shutdown_fd); // stop the other handlers too
}

struct Handler<'a> {
    s: &'a Shared,
    idx: usize,
    buf: Vec<u8>,
    deferred: VecDeque<Fault>,
}

impl<'a> Handler<'a> {
    fn new(s: &'a Shared, idx: usize) -> Self {
        let max_page = s.regions.iter().map(|r| r.page_bytes).max().unwrap_or(4096);
        Self { s, idx, buf: vec![0u8; max_page as usize], deferred: VecDeque::new() }
    }

    fn run(&mut self, wake: &OwnedFd) -> Result<(), FaultEngineError> {
        let mut msgs = super::uffd::msg_buffer(self.s.config.batch.max(1));
        let mut events = Vec::new();
        let mut mm_changing = false;
        loop {
            // With EAGAIN-deferred faults, wake soon even if nothing arrives: the kernel
            // ends "mm changing" without an event once the remover resumes.
            let short = Timespec { tv_sec: 0, tv_nsec: 200_000 };
            let timeout = mm_changing.then_some(&short);
            let mut fds = [
                PollFd::new(&*self.s.uffd, PollFlags::IN),
                PollFd::new(&self.s.shutdown_fd, PollFlags::IN),
                PollFd::new(wake, PollFlags::IN),
            ];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
            if !fds[1].revents().is_empty() {
                return Ok(());
            }
            if !fds[2].revents().is_empty() {
                let mut b = [0u8; 8];
                let _ = rustix::io::read(wake, &mut b);
            }
            loop {
                let n = self.s.uffd.read_events(&mut msgs, &mut events)?;
                let read_at = Instant::now();
                for ev in events.drain(..) {
                    self.on_event(ev, read_at)?;
                }
                if n < msgs.len() {
                    break;
                }
            }
            mm_changing = false;
            for _ in 0..self.deferred.len() {
                let f = self.deferred.pop_front().expect("counted");
                mm_changing |= self.resolve(f)? == Some(Defer::MmChanging);
            }
        }
    }

    fn on_event(&mut self, ev: Event, read_at: Instant) -> Result<(), FaultEngineError> {
        match ev {
            Event::PageFault { address, write, wp, minor } => {
                let (region, r) = self
                    .s
                    .regions
                    .iter()
                    .enumerate()
                    .find(|(_, r)| address >= r.host_addr && address - r.host_addr < r.len)
                    .ok_or(FaultEngineError::UnknownAddress(address))?;
                let kind = if wp {
                    FaultKind::WriteProtect
                } else if minor {
                    FaultKind::Minor
                } else {
                    FaultKind::Missing
                };
                let hva = address & !(r.page_bytes - 1);
                self.resolve(Fault { region, hva, kind, write, read_at })?;
            }
            Event::Remove { start, end } | Event::Unmap { start, end } => {
                self.s.counters.remove_events.fetch_add(1, Ordering::Relaxed);
                self.on_remove(start, end, matches!(ev, Event::Unmap { .. }));
            }
            Event::Remap { from, to, len } => {
                tracing::error!("guest RAM moved by mremap ({from:#x} -> {to:#x}, {len:#x} bytes); faults there will be refused");
            }
            Event::Fork { child_uffd } => {
                // We never ask for EVENT_FORK; if one comes, close the child's fd.
                // SAFETY: the kernel installed this fd for us with the message; we own it.
                drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(child_uffd) });
            }
        }
        Ok(())
    }

    /// A REMOVE/UNMAP from the kernel. Our own discards announced theirs in
    /// [`ExpectedRemoves`] and did the invalidation themselves; anything else is
    /// invalidated here.
    fn on_remove(&self, start: u64, end: u64, unmap: bool) {
        if !unmap && self.s.expected_removes.take(start, end) {
            return;
        }
        for r in self.s.regions.iter() {
            let s = start.max(r.host_addr);
            let e = end.min(r.host_addr + r.len);
            if s >= e {
                continue;
            }
            let range = GuestRange::new(r.gpa_of(s), e - s);
            // Processed after the kernel let the remover go on (reading the event completes
            // it), so a page may already have been refaulted: the marks below are a best
            // effort. All of the VMM's own discards go through the expected path above.
            self.s.counters.external_removes.fetch_add(1, Ordering::Relaxed);
            if unmap {
                tracing::warn!("guest RAM [{:#x}, +{:#x}) was unmapped behind the smmu", range.gpa, range.len);
            }
            let _g = self.s.inv.invalidate(range);
            let gone = PageState::POPULATED.union(PageState::DIRTY).union(PageState::WRITE_PROTECTED);
            self.s.table.update(range, PageState::DISCARDED, gone);
        }
    }

    /// Resolves one fault under the retry protocol; `Some` if it was put aside.
    fn resolve(&mut self, f: Fault) -> Result<Option<Defer>, FaultEngineError> {
        let s = self.s;
        let r = s.regions.iter().nth(f.region).expect("fault region index is valid");
        let page = r.page_bytes;
        let gpa = r.gpa_of(f.hva);
        let range = GuestRange::new(gpa, page);
        let ioctls = s.ioctls[f.region];
        let outcome = loop {
            let Some(seq) = s.inv.try_read_begin(range) else {
                s.counters.deferred.fetch_add(1, Ordering::Relaxed);
                self.deferred.push_back(f);
                return Ok(Some(Defer::Invalidation));
            };
            // Step 2: read the source, no locks held. A discarded page reads as zeros.
            let state = s.table.get(gpa);
            // A page write-protected before it was populated is installed protected.
            let wp = state.contains(PageState::WRITE_PROTECTED);
            let data = if f.kind != FaultKind::Missing || state.contains(PageState::DISCARDED) {
                PageData::Zero
            } else {
                s.source
                    .read_page(gpa, &mut self.buf[..page as usize])
                    .map_err(|source| FaultEngineError::Source { gpa, source })?
            };
            let lock = s.inv.lock(range);
            if lock.read_retry(seq) {
                s.counters.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Step 4, under the lock: mark first, because a successful fill wakes the
            // faulting thread, which must not see its page unmarked; undo if refused.
            let (set, clear) = match f.kind {
                FaultKind::WriteProtect => (PageState::DIRTY, PageState::WRITE_PROTECTED),
                _ if f.write => (PageState::POPULATED.union(PageState::DIRTY), PageState::DISCARDED),
                _ => (PageState::POPULATED, PageState::DISCARDED),
            };
            let before = s.table.get(gpa);
            s.table.update(range, set, clear);
            let outcome = match (f.kind, data) {
                (FaultKind::Missing, PageData::Zero) if ioctls.zeropage() && !wp => {
                    s.uffd.zeropage(f.hva, page, false)
                }
                (FaultKind::Missing, data) => {
                    if data == PageData::Zero {
                        self.buf[..page as usize].fill(0);
                    }
                    s.uffd.copy(f.hva, &self.buf[..page as usize], wp, false)
                }
                (FaultKind::Minor, _) => s.uffd.continue_(f.hva, page, wp, false),
                (FaultKind::WriteProtect, _) => {
                    s.uffd.write_protect(f.hva, page, false, false).map(|()| FillOutcome::Filled)
                }
            };
            if !matches!(outcome, Ok(FillOutcome::Filled | FillOutcome::AlreadyFilled)) {
                let restore = PageState(before.0 & clear.0);
                s.table.update(range, restore, PageState(set.0 & !before.0));
            }
            let outcome = outcome?;
            drop(lock);
            break outcome;
        };
        match outcome {
            FillOutcome::Filled => {}
            FillOutcome::AlreadyFilled => {
                s.counters.eexist.fetch_add(1, Ordering::Relaxed);
                s.uffd.wake(f.hva, page)?;
            }
            FillOutcome::MmChanging { .. } => {
                // One granule per fill, so nothing was filled; had part of it been, the
                // whole-granule retry meets EEXIST and wakes the waiter.
                s.counters.eagain.fetch_add(1, Ordering::Relaxed);
                self.deferred.push_back(f);
                return Ok(Some(Defer::MmChanging));
            }
        }
        let ns = f.read_at.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        let slot = f.kind as usize * 2 + usize::from(page >= PAGE_2M);
        let mut h = s.histograms[self.idx].lock().unwrap_or_else(|p| p.into_inner());
        h[slot].saturating_record(ns.max(1));
        Ok(None)
    }
}
