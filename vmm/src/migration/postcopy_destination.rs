//! The post-copy destination: guest RAM is registered for userfaultfd MISSING faults
//! with a [`RemoteSource`]. A fault on a page the source's table lists becomes a request
//! (the handler thread hands it to a channel and answers "later", it never touches the
//! network); a request thread sends it on the preempt channel (or the main connection),
//! once per page however many faults wait. Receiver threads, one per connection, install
//! every page that arrives through the fault engine's [`PageInstaller`]: a page somebody
//! waits for completes those waits; any other page (the background push) is installed
//! only if the table holds it neither populated nor discarded, and the installer's retry
//! protocol keeps a discard in between from being undone. Pages the table does not list
//! are zero and answered at once without a request.
//!
//! When the source has sent every page (`Complete` on the main connection) and every
//! request is answered, the driver checks that every listed page is in, says so (`Ack`)
//! and closes both connections. Nothing waits for ever: a request unanswered for
//! [`REQUEST_TIMEOUT`], a broken or silent link, or a malformed frame stops the fault
//! engine with the reason, which ends the VM with that error.

use super::blocktime::Blocktime;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::destination::{check_round_end, expect, refused, unexpected, Incoming};
use super::memory::{PageBatch, PageCounts, Zones};
use super::metrics::{MigrationMetrics, MigrationStatus};
use super::stream::{Frame, FrameReader, FrameType, FrameWriter, StreamError};
use super::transport::Link;
use super::MigrationError;
use crate::config::ZoneConfig;
use crate::machine::{Machine, MachineState};
use crate::memory::{GuestRam, RamRegion};
use crate::smmu::page_installer::{Completion, PageInstaller};
use crate::smmu::page_source::{PageData, PageRequest, PageSource, PageSourceError};
use crate::smmu::GuestRange;

/// A page request unanswered this long ends the migration (and the VM).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Buckets of the latency histogram (powers of two of microseconds).
const BUCKETS: usize = 40;

/// Where each zone's units are in guest-physical memory.
#[derive(Debug, Clone)]
struct Layout {
    /// (zone, gpa, size, offset in the zone) per RAM region.
    slots: Vec<(usize, u64, u64, u64)>,
    /// Transfer unit per zone.
    units: Vec<u64>,
}

impl Layout {
    fn new(regions: &[RamRegion], zones: &[ZoneConfig]) -> Self {
        Layout {
            slots: regions.iter().map(|r| (r.zone, r.gpa, r.size_bytes, r.fd_offset)).collect(),
            units: zones.iter().map(super::memory::unit_bytes).collect(),
        }
    }

    /// The (zone, unit) of guest-physical `gpa`.
    fn unit_of(&self, gpa: u64) -> Option<(usize, u64)> {
        let &(zone, base, _, offset) = self.slots.iter().find(|s| gpa >= s.1 && gpa - s.1 < s.2)?;
        Some((zone, (offset + gpa - base) / self.units[zone]))
    }

    /// The guest-physical address of unit `unit` of `zone`.
    fn gpa_of(&self, zone: usize, unit: u64) -> Option<u64> {
        let at = unit.checked_mul(*self.units.get(zone)?)?;
        let &(_, base, _, offset) = self.slots.iter().find(|s| s.0 == zone && at >= s.3 && at - s.3 < s.2)?;
        Some(base + (at - offset))
    }
}

/// The destination's page source during post-copy: zero for pages the source does not
/// hold, "later" (a request) for the others.
pub struct RemoteSource {
    layout: OnceLock<Layout>,
    present: OnceLock<Vec<Vec<u64>>>,
    requests: Mutex<Sender<PageRequest>>,
    finished: AtomicBool,
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource").finish_non_exhaustive()
    }
}

impl RemoteSource {
    /// A source whose requests come out of the receiver (for [`Incoming::start_postcopy`]).
    pub fn new() -> (Arc<Self>, Receiver<PageRequest>) {
        let (tx, rx) = mpsc::channel();
        let source = RemoteSource {
            layout: OnceLock::new(),
            present: OnceLock::new(),
            requests: Mutex::new(tx),
            finished: AtomicBool::new(false),
        };
        (Arc::new(source), rx)
    }

    /// Whether the page at `gpa` is in the source's table (then `Some(zone, unit)`).
    fn listed(&self, gpa: u64) -> Result<Option<(usize, u64)>, PageSourceError> {
        let failed = |reason: &str| PageSourceError::Failed { gpa, reason: reason.into() };
        let (Some(layout), Some(present)) = (self.layout.get(), self.present.get()) else {
            return Err(failed("post-copy: the source's page table has not arrived yet"));
        };
        let Some((zone, unit)) = layout.unit_of(gpa) else {
            return Err(failed("post-copy: not guest RAM of the migrated VM"));
        };
        let bit = present[zone].get((unit / 64) as usize).is_some_and(|w| w & (1 << (unit % 64)) != 0);
        Ok(bit.then_some((zone, unit)))
    }
}

impl PageSource for RemoteSource {
    fn read_page(&self, gpa: u64, _buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        match self.listed(gpa)? {
            None => Ok(PageData::Zero),
            // Only the fault path may wait for the source (fault-around skips it).
            Some(_) => Err(PageSourceError::Failed { gpa, reason: "post-copy pages are only answered later".into() }),
        }
    }

    fn request_page(&self, req: PageRequest, _buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        if self.listed(req.gpa())?.is_none() {
            return Ok(PageData::Zero);
        }
        let lost = |reason: &str| PageSourceError::Failed { gpa: req.gpa(), reason: reason.into() };
        if self.finished.load(Ordering::SeqCst) {
            return Err(lost("post-copy ended, yet a page of the source's table is still missing"));
        }
        // Unbounded and non-blocking: the handler never waits for the network.
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(req)
            .map_err(|_| lost("post-copy: the page channel to the source is closed"))?;
        Ok(PageData::Pending)
    }
}

/// Faults waiting for one page.
struct Waiting {
    since: Instant,
    requests: Vec<PageRequest>,
}

/// What the post-copy threads share.
struct Shared {
    layout: Layout,
    present: Vec<Vec<u64>>,
    installer: PageInstaller,
    waiting: Mutex<HashMap<(usize, u64), Waiting>>,
    /// The run is over (success, or the VM ended): link errors are expected.
    done: AtomicBool,
    failure: Mutex<Option<String>>,
    requests: AtomicU64,
    bytes: AtomicU64,
    faults: AtomicU64,
    blocked_ns: AtomicU64,
    blocktime: Blocktime,
    latency: [AtomicU64; BUCKETS],
}

impl Shared {
    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, u64), Waiting>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the post-copy with `reason`: the fault engine stops, which ends the VM.
    fn fail(&self, gpa: u64, reason: String) {
        if !self.done.load(Ordering::SeqCst) {
            self.fail_always(gpa, reason);
        }
    }

    /// As [`Shared::fail`], even after the run was marked done.
    fn fail_always(&self, gpa: u64, reason: String) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if failure.is_some() {
            return;
        }
        let reason = format!(
            "post-copy migration failed: {reason}; the source keeps the VM paused with all its memory and state"
        );
        tracing::warn!("{reason}");
        *failure = Some(reason.clone());
        drop(failure);
        self.installer.fail(gpa, PageSourceError::Failed { gpa, reason });
    }

    fn record(&self, req: &PageRequest) {
        self.blocktime.record(req.thread(), req.started());
        let ns = req.started().elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.blocked_ns.fetch_add(ns, Ordering::Relaxed);
        let us = (ns / 1000).max(1);
        let bucket = ((64 - us.leading_zeros()) as usize).min(BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Installs every unit of `batch`.
    fn install(&self, batch: &PageBatch<'_>) -> Result<(), String> {
        for (unit, data) in batch.units() {
            let gpa = self
                .layout
                .gpa_of(batch.zone, unit)
                .ok_or_else(|| format!("zone {} page {unit} is not mapped here", batch.zone))?;
            let waiters = self.waiting().remove(&(batch.zone, unit));
            let engine = |e: crate::smmu::fault_engine::FaultEngineError| format!("installing gpa {gpa:#x}: {e}");
            match waiters {
                Some(waiting) => {
                    for req in waiting.requests {
                        match self.installer.complete(req, data).map_err(engine)? {
                            Completion::Installed | Completion::AlreadyPresent => self.record(&req),
                            // The waiter was woken and faults again (a new request).
                            Completion::Retry | Completion::Discarded => {}
                        }
                    }
                }
                None => {
                    for _ in 0..16 {
                        if self.installer.settled(gpa) {
                            break;
                        }
                        let req = self.installer.begin(gpa).ok_or_else(|| format!("gpa {gpa:#x} is not guest RAM"))?;
                        if self.installer.complete(req, data).map_err(engine)? != Completion::Retry {
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Pages of the table neither installed nor discarded.
    fn missing(&self) -> u64 {
        let mut missing = 0;
        for (zone, map) in self.present.iter().enumerate() {
            for (w, &word) in map.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let unit = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    if self.layout.gpa_of(zone, unit).is_none_or(|gpa| !self.installer.settled(gpa)) {
                        missing += 1;
                    }
                }
            }
        }
        missing
    }

    fn histogram(&self) -> Vec<(u64, u64)> {
        (0..BUCKETS)
            .filter_map(|b| {
                let n = self.latency[b].load(Ordering::Relaxed);
                (n > 0).then_some((1u64 << b, n))
            })
            .collect()
    }
}

/// A post-copy running on the destination, until [`PostcopyRun::finish`].
pub struct PostcopyRun {
    shared: Arc<Shared>,
    source: Arc<RemoteSource>,
    links: Vec<Link>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for PostcopyRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyRun").finish_non_exhaustive()
    }
}

impl PostcopyRun {
    /// After the VM ended: stops whatever still runs (the source sees the link close)
    /// and waits for the threads.
    pub fn finish(mut self) {
        self.shared.done.store(true, Ordering::SeqCst);
        self.source.finished.store(true, Ordering::SeqCst);
        for link in &self.links {
            link.shutdown();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Reports the destination's figures as they change (the VMM records them for
/// `migrate status` and the run report).
pub type Report = Box<dyn Fn(MigrationMetrics) + Send>;

impl Incoming {
    /// Post-copy: reads the source's page table (one `Present` frame per zone) and the
    /// machine state, and points `source` at them. Guest RAM of `machine` is registered
    /// MISSING with `source` as its page source.
    ///
    /// Hybrid: pre-copy rounds come first; their pages are written straight into guest
    /// RAM through `installer` (no vCPU runs yet), and once the table arrived the pages
    /// it lists that a round brought are evicted, so the guest's first touch fetches
    /// them anew.
    pub fn receive_postcopy(
        &mut self,
        machine: &Machine,
        source: &RemoteSource,
        installer: &PageInstaller,
    ) -> Result<MachineState, MigrationError> {
        let mut began = Instant::now();
        let zones = Zones::new(&machine.ram, &machine.config.zones);
        let layout = Layout::new(machine.ram.regions(), &machine.config.zones);
        let mode = self.summary.as_ref().map_or("postcopy", |s| s.mode.as_str()).to_string();
        let mut first = None;
        if mode == "postcopy" {
            self.say_ready()?;
            // The source pauses after the ready (and a scan): the downtime starts at its
            // page table.
            first = Some(expect(&mut self.reader, FrameType::Present)?);
            began = Instant::now();
        }
        if mode == "hybrid" {
            let rounds = receive_rounds(&mut self.reader, &zones, &layout, installer)?;
            let m = &mut self.metrics;
            (m.rounds, m.dirty_sync_count) = (rounds.rounds, rounds.rounds);
            (m.duplicate, m.normal, m.normal_bytes) =
                (rounds.counts.zero, rounds.counts.normal, rounds.counts.normal_bytes);
            m.precopy_bytes = self.reader.bytes_read();
            began = rounds.last_round_end;
            first = Some(rounds.table);
        }
        let mut present = Vec::with_capacity(zones.len());
        for zone in 0..zones.len() {
            let frame = match first.take() {
                Some(frame) => frame,
                None => expect(&mut self.reader, FrameType::Present)?,
            };
            present.push(decode_present(&frame.payload, zone, zones.unit_count(zone))?);
        }
        if mode == "hybrid" {
            evict_listed(machine, &layout, &present, installer)?;
        }
        let state = expect(&mut self.reader, FrameType::State)?;
        let state = serde_json::from_slice::<MachineState>(&state.payload)
            .map_err(|e| MigrationError::Malformed { what: "the State frame".into(), reason: e.to_string() })?;
        let table_pages = present.iter().flatten().map(|w| u64::from(w.count_ones())).sum();
        let _ = source.layout.set(layout);
        let _ = source.present.set(present);
        let downtime_bytes = self.reader.bytes_read() - self.metrics.precopy_bytes;
        let m = &mut self.metrics;
        m.mode = mode;
        m.postcopy_table_pages = table_pages;
        m.postcopy_preempt = self.preempt.is_some();
        m.total = machine.ram.size_bytes();
        m.page_size = machine.config.zones.iter().map(super::memory::unit_bytes).max().unwrap_or(4096);
        m.downtime_bytes = downtime_bytes;
        self.stop_and_copy_began_at(began);
        Ok(state)
    }

    fn stop_and_copy_began_at(&mut self, at: Instant) {
        self.metrics.downtime = at.elapsed().as_secs_f64() * 1e3;
        self.postcopy_began = Some(at);
    }

    /// Post-copy: starts the page channel (before the state is restored, which may touch
    /// guest RAM already), for the faults of `installer`'s engine raised by `source`.
    pub fn start_postcopy(
        &mut self,
        machine: &Machine,
        source: &Arc<RemoteSource>,
        requests: Receiver<PageRequest>,
        installer: PageInstaller,
    ) -> Result<PostcopyChannel, MigrationError> {
        let clone = |link: &Link| link.try_clone().map_err(|source| MigrationError::Accept { source });
        let shared = Arc::new(Shared {
            layout: source.layout.get().cloned().expect("receive_postcopy set it"),
            present: source.present.get().cloned().expect("receive_postcopy set it"),
            installer,
            waiting: Mutex::new(HashMap::new()),
            done: AtomicBool::new(false),
            failure: Mutex::new(None),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            blocked_ns: AtomicU64::new(0),
            blocktime: Blocktime::new(machine.config.vcpus as usize),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        });
        let mut threads = Vec::new();
        let mut links = vec![clone(&self.link)?];
        // Requests go on the preempt channel if there is one, else on the main link
        // (whose writer the final Ack shares).
        // The writer and readers go on numbering where the handshake left them.
        let writer = std::mem::replace(&mut self.writer, FrameWriter::new(clone(&self.link)?));
        let main_writer = Arc::new(Mutex::new(writer));
        let (request_writer, preempt_reader) = match self.preempt.take() {
            Some((link, reader)) => {
                links.push(clone(&link)?);
                (Arc::new(Mutex::new(FrameWriter::new(link))), Some(reader))
            }
            None => (main_writer.clone(), None),
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.into()).spawn(f).map_err(|source| {
                MigrationError::Stream(StreamError::Io { what: "starting a post-copy thread", source })
            })
        };
        {
            let shared = shared.clone();
            threads.push(spawn("fl-pc-requests", Box::new(move || send_requests(&shared, requests, &request_writer)))?);
        }
        let ram = machine.ram.clone();
        let zone_configs = machine.config.zones.clone();
        if let Some(reader) = preempt_reader {
            let (shared, ram, zone_configs) = (shared.clone(), ram.clone(), zone_configs.clone());
            threads
                .push(spawn("fl-pc-preempt", Box::new(move || receive(&shared, reader, None, &ram, &zone_configs)))?);
        }
        let (complete_in, complete) = mpsc::channel();
        let main_reader = std::mem::replace(&mut self.reader, FrameReader::new(clone(&self.link)?));
        // The main link's reads keep the idle timeout: the background push never pauses
        // for long, and a silent source is a dead one.
        {
            let shared = shared.clone();
            threads.push(spawn(
                "fl-pc-pages",
                Box::new(move || receive(&shared, main_reader, Some(complete_in), &ram, &zone_configs)),
            )?);
        }
        Ok(PostcopyChannel { shared, source: source.clone(), links, threads, main_writer, complete })
    }
}

/// The page channel started, before the handover (see [`PostcopyChannel::hand_over`]).
pub struct PostcopyChannel {
    shared: Arc<Shared>,
    source: Arc<RemoteSource>,
    links: Vec<Link>,
    threads: Vec<JoinHandle<()>>,
    main_writer: Arc<Mutex<FrameWriter<Link>>>,
    complete: Receiver<Result<(), String>>,
}

impl PostcopyChannel {
    /// After the state is restored: tells the source (`Ack`) and waits for its `Ack`
    /// back (from then on the VM is this end's); then starts the driver that ends the
    /// post-copy when every page is in, reporting through `report`.
    pub fn hand_over(self, incoming: Incoming, report: Report) -> Result<PostcopyRun, MigrationError> {
        let PostcopyChannel { shared, source, links, mut threads, main_writer, complete } = self;
        let stop = |e: MigrationError| {
            shared.done.store(true, Ordering::SeqCst);
            for link in &links {
                link.shutdown();
            }
            e
        };
        let Incoming { mut metrics, started, postcopy_began, .. } = incoming;
        main_writer.lock().unwrap_or_else(|e| e.into_inner()).write(FrameType::Ack, &[]).map_err(|e| stop(e.into()))?;
        // The source's Ack comes on the main link, read by the pages thread.
        match complete.recv_timeout(super::destination::IDLE_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                return Err(stop(MigrationError::Unsupported(format!(
                    "the source did not release the VM ({reason}); it keeps it, nothing was started here"
                ))))
            }
            Err(_) => {
                return Err(stop(MigrationError::NoAnswer {
                    peer: "source",
                    seconds: super::destination::IDLE_TIMEOUT.as_secs(),
                    what: "releasing the VM",
                }))
            }
        }
        if let Some(began) = postcopy_began {
            metrics.downtime = began.elapsed().as_secs_f64() * 1e3;
        }
        metrics.status = MigrationStatus::PostcopyActive;
        report(metrics.clone());
        let driver = {
            let (shared, source) = (shared.clone(), source.clone());
            let links: Vec<Link> = links.iter().filter_map(|l| l.try_clone().ok()).collect();
            std::thread::Builder::new()
                .name("fl-postcopy".into())
                .spawn(move || drive(&shared, &source, &complete, &main_writer, &links, metrics, started, report))
                .map_err(|source| {
                    MigrationError::Stream(StreamError::Io { what: "starting a post-copy thread", source })
                })?
        };
        threads.push(driver);
        Ok(PostcopyRun { shared, source, links, threads })
    }
}

/// Waits for the source's `Complete` and the last answers, checks every page is in,
/// acknowledges and closes; reports the outcome.
#[allow(clippy::too_many_arguments)]
fn drive(
    shared: &Shared,
    source: &RemoteSource,
    complete: &Receiver<Result<(), String>>,
    main_writer: &Mutex<FrameWriter<Link>>,
    links: &[Link],
    mut metrics: MigrationMetrics,
    started: Instant,
    report: Report,
) {
    let outcome = (|| -> Result<(), String> {
        match complete.recv() {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(reason),
            Err(_) => return Err("the page receiver ended".into()),
        }
        let until = Instant::now() + REQUEST_TIMEOUT;
        while !shared.waiting().is_empty() {
            if shared.done.load(Ordering::SeqCst) {
                return Err("the VM ended before every page arrived".into());
            }
            if Instant::now() >= until {
                return Err(format!(
                    "page requests still unanswered {} s after the source finished",
                    REQUEST_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let missing = shared.missing();
        if missing > 0 {
            return Err(format!("{missing} pages of the source's table never arrived"));
        }
        source.finished.store(true, Ordering::SeqCst);
        // From here on the links' end is expected.
        shared.done.store(true, Ordering::SeqCst);
        main_writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(FrameType::Ack, &[])
            .map_err(|e| format!("acknowledging the last page: {e}"))
    })();
    if let Err(reason) = &outcome {
        // A VM that ended already (`PostcopyRun::finish`) needs no failure.
        if !shared.done.load(Ordering::SeqCst) || source.finished.load(Ordering::SeqCst) {
            shared.fail_always(0, reason.clone());
        }
    }
    shared.done.store(true, Ordering::SeqCst);
    for link in links {
        link.shutdown();
    }
    let elapsed = started.elapsed();
    metrics.total_time = elapsed.as_secs_f64() * 1e3;
    metrics.postcopy_requests = shared.requests.load(Ordering::Relaxed);
    metrics.postcopy_bytes = shared.bytes.load(Ordering::Relaxed);
    metrics.postcopy_faults = shared.faults.load(Ordering::Relaxed);
    metrics.postcopy_fault_wait = shared.blocked_ns.load(Ordering::Relaxed) as f64 / 1e6;
    let blocktime = shared.blocktime.summary();
    metrics.postcopy_blocktime = blocktime.all_vcpus_ms;
    metrics.postcopy_vcpu_blocktime = blocktime.per_vcpu_ms;
    metrics.postcopy_other_blocktime = blocktime.other_threads_ms;
    metrics.postcopy_latency_us = shared.histogram();
    metrics.postcopy_missing = shared.missing();
    metrics.transferred = metrics.downtime_bytes + metrics.postcopy_bytes;
    metrics.mbps = metrics.transferred as f64 * 8.0 / 1e6 / elapsed.as_secs_f64().max(1e-6);
    match outcome {
        Ok(()) => metrics.status = MigrationStatus::Completed,
        Err(reason) => {
            metrics.status = MigrationStatus::Failed;
            metrics.error = Some(shared.failure.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or(reason));
        }
    }
    report(metrics);
}

/// Sends each page's first request; watches for requests left unanswered.
fn send_requests(shared: &Shared, requests: Receiver<PageRequest>, writer: &Mutex<FrameWriter<Link>>) {
    loop {
        match requests.recv_timeout(Duration::from_millis(100)) {
            Ok(req) => {
                let Some(key) = shared.layout.unit_of(req.gpa()) else {
                    shared.fail(req.gpa(), format!("a fault at gpa {:#x} outside guest RAM", req.gpa()));
                    return;
                };
                let first = {
                    let mut waiting = shared.waiting();
                    let entry =
                        waiting.entry(key).or_insert_with(|| Waiting { since: Instant::now(), requests: Vec::new() });
                    entry.requests.push(req);
                    entry.requests.len() == 1
                };
                if first {
                    shared.requests.fetch_add(1, Ordering::Relaxed);
                    let payload = super::postcopy_source::encode_request(key.0, key.1);
                    let sent =
                        writer.lock().unwrap_or_else(|e| e.into_inner()).write(FrameType::PageRequest, &[&payload]);
                    if let Err(e) = sent {
                        shared.fail(req.gpa(), format!("sending a page request: {e}"));
                        return;
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if shared.done.load(Ordering::SeqCst) {
            return;
        }
        let oldest = shared.waiting().values().map(|w| w.since).min();
        if oldest.is_some_and(|since| since.elapsed() > REQUEST_TIMEOUT) {
            shared.fail(0, format!("the source did not answer a page request within {} s", REQUEST_TIMEOUT.as_secs()));
            return;
        }
    }
}

/// Installs the pages arriving on one connection; on the main one also passes the
/// source's `Ack` (the handover) and `Complete` on to `complete`.
fn receive(
    shared: &Shared,
    mut reader: FrameReader<Link>,
    complete: Option<Sender<Result<(), String>>>,
    ram: &GuestRam,
    zone_configs: &[ZoneConfig],
) {
    let zones = Zones::new(ram, zone_configs);
    let tell = |result: Result<(), String>| {
        if let Some(complete) = &complete {
            let _ = complete.send(result);
        }
    };
    loop {
        let before = reader.bytes_read();
        let frame = match reader.read() {
            Ok(frame) => frame,
            Err(e) => {
                let reason = format!("the link to the source broke: {e}");
                tell(Err(reason.clone()));
                shared.fail(0, reason);
                return;
            }
        };
        let result = match frame.kind {
            FrameType::Pages => PageBatch::parse(&zones, &frame.payload)
                .map_err(|e| e.to_string())
                .and_then(|batch| shared.install(&batch)),
            FrameType::Ack | FrameType::Complete if complete.is_some() => {
                tell(Ok(()));
                Ok(())
            }
            FrameType::Refuse => Err(format!("the source gave up: {}", String::from_utf8_lossy(&frame.payload))),
            other => Err(format!("a {other:?} frame came where pages were due")),
        };
        shared.bytes.fetch_add(reader.bytes_read() - before, Ordering::Relaxed);
        if let Err(reason) = result {
            tell(Err(reason.clone()));
            shared.fail(0, reason);
            return;
        }
    }
}

/// What the pre-copy rounds of a hybrid migration brought.
struct HybridRounds {
    counts: PageCounts,
    rounds: u64,
    last_round_end: Instant,
    /// The first `Present` frame, which ended the rounds.
    table: Frame,
}

/// Hybrid: reads `Pages` and `RoundEnd` frames up to the first `Present` frame, writing
/// each page into guest RAM through `installer` (every frame checked first).
fn receive_rounds(
    reader: &mut FrameReader<Link>,
    zones: &Zones,
    layout: &Layout,
    installer: &PageInstaller,
) -> Result<HybridRounds, MigrationError> {
    let mut counts = PageCounts::default();
    let (mut rounds, mut last_round_end) = (0u64, Instant::now());
    loop {
        let frame = reader.read()?;
        match frame.kind {
            FrameType::Pages => {
                let batch = PageBatch::parse(zones, &frame.payload)?;
                for (unit, data) in batch.units() {
                    let gpa = layout.gpa_of(batch.zone, unit).ok_or_else(|| MigrationError::Malformed {
                        what: "a Pages frame".into(),
                        reason: format!("zone {} page {unit} is not mapped here", batch.zone),
                    })?;
                    installer
                        .write_owned(gpa, data)
                        .map_err(|e| MigrationError::Memory(format!("writing gpa {gpa:#x}: {e}")))?;
                    match data {
                        Some(_) => {
                            (counts.normal, counts.normal_bytes) = (counts.normal + 1, counts.normal_bytes + batch.unit)
                        }
                        None => counts.zero += 1,
                    }
                }
            }
            FrameType::RoundEnd => {
                check_round_end(&frame, rounds)?;
                rounds += 1;
                last_round_end = Instant::now();
            }
            FrameType::Present if rounds > 0 => {
                return Ok(HybridRounds { counts, rounds, last_round_end, table: frame })
            }
            FrameType::Refuse => return Err(refused(&frame)),
            other => return Err(unexpected(other, "Pages, RoundEnd or (after round 0) Present")),
        }
    }
}

/// Hybrid: evicts the units of `present` a pre-copy round brought (or a zero marker
/// cleared), in runs, so they are missing again and fetched from the source.
fn evict_listed(
    machine: &Machine,
    layout: &Layout,
    present: &[Vec<u64>],
    installer: &PageInstaller,
) -> Result<(), MigrationError> {
    let discarder = machine.paging.discarder();
    let mut run: Option<GuestRange> = None;
    let flush = |run: &mut Option<GuestRange>| -> Result<(), MigrationError> {
        match run.take() {
            Some(range) => discarder.evict(range).map(drop).map_err(|e| MigrationError::Memory(e.to_string())),
            None => Ok(()),
        }
    };
    for (zone, map) in present.iter().enumerate() {
        for (w, &word) in map.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let unit = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let gpa = layout.gpa_of(zone, unit).expect("decode_present checked the units");
                if !installer.settled(gpa) {
                    continue;
                }
                let len = layout.units[zone];
                match &mut run {
                    Some(r) if r.end() == gpa => r.len += len,
                    _ => {
                        flush(&mut run)?;
                        run = Some(GuestRange::new(gpa, len));
                    }
                }
            }
        }
    }
    flush(&mut run)
}

/// One zone's `Present` payload: zone (u32), units (u64), one bit per unit.
fn decode_present(payload: &[u8], zone: usize, units: u64) -> Result<Vec<u64>, MigrationError> {
    let bad = |reason: String| MigrationError::Malformed { what: "a Present frame".into(), reason };
    if payload.len() < 12 {
        return Err(bad(format!("{} bytes, shorter than its 12-byte header", payload.len())));
    }
    let got_zone = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
    let got_units = u64::from_le_bytes(payload[4..12].try_into().expect("8 bytes"));
    if got_zone != zone || got_units != units {
        return Err(bad(format!("zone {got_zone} of {got_units} pages where zone {zone} of {units} pages was due")));
    }
    let map = &payload[12..];
    if map.len() as u64 != units.div_ceil(8) {
        return Err(bad(format!("{} bytes of page map for {units} pages", map.len())));
    }
    if !units.is_multiple_of(8) && map[map.len() - 1] >> (units % 8) != 0 {
        return Err(bad("its map marks pages past the zone's end".into()));
    }
    let mut words = vec![0u64; units.div_ceil(64) as usize];
    for (i, &byte) in map.iter().enumerate() {
        words[i / 8] |= u64::from(byte) << ((i % 8) * 8);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_maps_round_trip_and_bad_ones_are_refused() {
        let mut payload = Vec::new();
        payload.extend_from_slice(&1u32.to_le_bytes());
        payload.extend_from_slice(&70u64.to_le_bytes());
        let mut map = vec![0u8; 9];
        map[0] = 0b101;
        map[8] = 0b10_0000; // unit 69
        payload.extend(&map);
        let words = decode_present(&payload, 1, 70).unwrap();
        assert_eq!(words, vec![0b101, 1 << 5]);
        assert!(decode_present(&payload, 0, 70).unwrap_err().to_string().contains("zone 1"));
        let mut past = payload.clone();
        *past.last_mut().unwrap() = 0b100_0000; // unit 70: past the end
        assert!(decode_present(&past, 1, 70).unwrap_err().to_string().contains("past"));
    }

    #[test]
    fn the_layout_maps_units_to_addresses_across_regions() {
        let region = |zone, gpa, size_bytes, fd_offset| RamRegion {
            zone,
            backend: crate::config::Backend::Anon,
            gpa,
            size_bytes,
            host_addr: 0,
            page_bytes: 4096,
            fd: None,
            fd_offset,
            path: None,
        };
        let layout = Layout {
            slots: [region(0, 0, 0x8000, 0), region(0, 0x10_0000, 0x4000, 0x8000)]
                .iter()
                .map(|r| (r.zone, r.gpa, r.size_bytes, r.fd_offset))
                .collect(),
            units: vec![4096],
        };
        assert_eq!(layout.unit_of(0x10_1000), Some((0, 9)));
        assert_eq!(layout.gpa_of(0, 9), Some(0x10_1000));
        assert_eq!(layout.gpa_of(0, 3), Some(0x3000));
        assert_eq!(layout.gpa_of(0, 12), None);
        assert_eq!(layout.unit_of(0x9000), None);
    }
}
