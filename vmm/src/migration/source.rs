//! The pre-copy source: connect and handshake, send the configuration, switch KVM's
//! dirty log on, send every existing page while the guest runs (round 0), then rounds
//! of the pages dirtied meanwhile until the estimated downtime (dirty bytes at the
//! measured bandwidth) is under the limit, then stop-and-copy: pause, the last dirty
//! pages, the machine state, completion, and the destination's acknowledgement. On any
//! failure the VM resumes here with its memory untouched (the source only reads it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::handshake::{self, Summary};
use super::memory::{max_batch, PageCounts, Zones};
use super::metrics::{MigrationMetrics, MigrationStatus};
use super::stream::{Frame, FrameReader, FrameType, FrameWriter, StreamError};
use super::transport::{Link, MigrationUri};
use super::MigrationError;
use crate::api::protocol::MigrateRequest;
use crate::exit::VmExit;
use crate::machine::{Machine, RunState};

/// How long the source waits for the destination's handshake and acknowledgement.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// A write that blocks this long means the destination stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pre-copy rounds after round 0 before the stop-and-copy is forced.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;

/// A running migration's shared state: its figures, the cancel flag and the link (shut
/// down to unblock the sender on cancel).
pub struct Progress {
    metrics: Mutex<MigrationMetrics>,
    cancelled: AtomicBool,
    /// Post-copy: the destination runs the VM; this end must never resume it.
    committed: AtomicBool,
    link: Mutex<Option<Link>>,
    started: Instant,
}

impl Progress {
    /// Figures at the start.
    pub(super) fn new(uri: &MigrationUri, machine: &Machine, request: &MigrateRequest) -> Self {
        let metrics = MigrationMetrics {
            role: "source".into(),
            uri: uri.to_string(),
            total: machine.ram.size_bytes(),
            downtime_limit: request.downtime_ms as f64,
            ..MigrationMetrics::default()
        };
        Progress {
            metrics: Mutex::new(metrics),
            cancelled: AtomicBool::new(false),
            committed: AtomicBool::new(false),
            link: Mutex::new(None),
            started: Instant::now(),
        }
    }

    /// The figures now.
    pub fn metrics(&self) -> MigrationMetrics {
        let mut metrics = self.lock().clone();
        if !matches!(metrics.status, MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled)
        {
            metrics.total_time = ms(self.started.elapsed());
        }
        metrics
    }

    /// Asks the migration to stop (and unblocks it).
    pub fn cancel(&self) {
        if self.is_committed() {
            // Post-copy after the switch-over: the guest runs on the destination and
            // needs this end's pages; there is nothing to go back to.
            return;
        }
        self.cancelled.store(true, Ordering::SeqCst);
        if let Some(link) = self.link.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            link.shutdown();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MigrationMetrics> {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn update(&self, change: impl FnOnce(&mut MigrationMetrics)) {
        change(&mut self.lock());
    }

    /// Keeps a handle on the link, for [`Progress::cancel`] to shut it down.
    pub(super) fn set_link(&self, link: Link) {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link);
    }

    /// Post-copy: the destination has the VM's state and runs it from now on.
    pub(super) fn commit(&self) {
        self.committed.store(true, Ordering::SeqCst);
    }

    /// Whether the switch-over of a post-copy happened.
    pub(super) fn is_committed(&self) -> bool {
        self.committed.load(Ordering::SeqCst)
    }

    /// When the migration started.
    pub(super) fn started(&self) -> Instant {
        self.started
    }

    /// Whether `migrate cancel` asked to stop.
    pub(super) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

impl super::metrics::Figures for Progress {
    fn update_figures(&self, change: &mut dyn FnMut(&mut MigrationMetrics)) {
        change(&mut self.lock());
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Migrates `machine` to `uri` and records the outcome: on success the VM ends here
/// ([`VmExit::Migrated`]); on failure it runs on as before.
pub fn migrate(
    machine: &Machine,
    uri: MigrationUri,
    request: &MigrateRequest,
    progress: &Progress,
    transfer: Transfer,
) {
    let was_running = machine.run_state() == RunState::Running;
    // fd-local: hands the zones over instead (`super::local`, chosen by the caller).
    let result = transfer(machine, &uri, request, progress);
    if let Some(link) = progress.link.lock().unwrap_or_else(|e| e.into_inner()).take() {
        link.shutdown();
    }
    let total_time = ms(progress.started.elapsed());
    match result {
        Ok(()) => {
            let downtime_us = (progress.lock().downtime * 1e3) as u64;
            progress.update(|m| {
                m.status = MigrationStatus::Completed;
                m.total_time = total_time;
                m.remaining = 0;
            });
            machine.control.end(VmExit::Migrated { to: uri.to_string(), downtime_us });
        }
        Err(error) if progress.is_committed() => {
            // Post-copy broke after the switch-over: the destination ran the guest, so
            // resuming here would fork it. The VM stays paused with all its memory and
            // state (docs/migration.md, "When post-copy fails").
            tracing::warn!("post-copy migration to {uri} failed after the switch-over: {error}");
            progress.update(|m| {
                m.status = MigrationStatus::Failed;
                m.error = Some(format!(
                    "{error}; the switch-over had happened: the VM stays paused here with all its memory and state (the destination's copy is lost); `faultline ctl resume` runs it on from the switch-over"
                ));
                m.total_time = total_time;
            });
        }
        Err(error) => {
            // The source only read guest memory: resuming is all it takes to go on.
            let resumed = match was_running && machine.run_state() == RunState::Paused {
                true => machine.resume().err().map(|e| format!("; resuming the VM failed too: {e}")),
                false => None,
            };
            tracing::warn!("migration to {uri} failed: {error}");
            let cancelled = matches!(error, MigrationError::Cancelled) || progress.cancelled.load(Ordering::SeqCst);
            progress.update(|m| {
                m.status = if cancelled { MigrationStatus::Cancelled } else { MigrationStatus::Failed };
                m.error = Some(match cancelled {
                    true => MigrationError::Cancelled.to_string(),
                    false => format!("{error}{}", resumed.unwrap_or_default()),
                });
                m.total_time = total_time;
            });
        }
    }
}

/// The sending side: frames out, the destination's answers in (on a reader thread).
/// A hybrid migration takes the writer and the answers over for its post-copy part
/// ([`Sender::take_link`]); the sender is not used after that.
pub(super) struct Sender<'a> {
    writer: Option<FrameWriter<Link>>,
    answers: Option<Receiver<Result<Frame, StreamError>>>,
    zones: Zones,
    machine: &'a Machine,
    progress: &'a Progress,
    bandwidth_limit: Option<u64>,
    deadline: Option<(Instant, f64)>,
    buffer: Vec<u8>,
    counts: PageCounts,
    /// Per zone, the units being sent that the VMM discarded (sorted): zero markers.
    absent: Vec<Vec<u64>>,
    /// When the memory transfer began, and the stream bytes written before it: the
    /// bandwidth is what went since, over wall time (reading guest RAM, harvesting and
    /// the link all count, as they will in the stop-and-copy).
    active_since: (Instant, u64),
    /// The throttle when the rounds do not converge (`--auto-converge`).
    converge: super::converge::AutoConverge,
}

/// How the VM moves: [`precopy`] or `fd-local:`'s handover.
pub type Transfer = fn(&Machine, &MigrationUri, &MigrateRequest, &Progress) -> Result<(), MigrationError>;

/// The pre-copy transfer.
pub fn precopy(
    machine: &Machine,
    uri: &MigrationUri,
    request: &MigrateRequest,
    progress: &Progress,
) -> Result<(), MigrationError> {
    with_sender(machine, uri, request, progress, |sender| sender.run(request))
}

/// Connects to `uri` and runs `work` with a [`Sender`] on the link, whose reader thread
/// passes the destination's frames to it; the link is shut down before the reader is
/// joined, whatever `work` returned.
pub(super) fn with_sender<T>(
    machine: &Machine,
    uri: &MigrationUri,
    request: &MigrateRequest,
    progress: &Progress,
    work: impl FnOnce(&mut Sender<'_>) -> Result<T, MigrationError>,
) -> Result<T, MigrationError> {
    let link = uri.connect()?;
    link.set_timeouts(None, Some(WRITE_TIMEOUT));
    *progress.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.try_clone().map_err(io("cloning the link"))?);
    if progress.cancelled.load(Ordering::SeqCst) {
        return Err(MigrationError::Cancelled);
    }
    let reader_link = link.try_clone().map_err(io("cloning the link"))?;
    let shutdown_link = link.try_clone().map_err(io("cloning the link"))?;
    let (answers_in, answers) = mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut reader = FrameReader::new(reader_link);
            loop {
                let frame = reader.read();
                let end = frame.is_err();
                if answers_in.send(frame).is_err() || end {
                    break;
                }
            }
        });
        let mut sender = Sender {
            writer: Some(FrameWriter::new(link)),
            answers: Some(answers),
            zones: Zones::new(&machine.ram, &machine.config.zones),
            machine,
            progress,
            bandwidth_limit: request.bandwidth_bytes_per_s.filter(|&b| b > 0),
            deadline: request.timeout_ms.map(|t| (Instant::now() + Duration::from_millis(t), t as f64 / 1e3)),
            buffer: Vec::with_capacity(super::memory::BATCH_HEADER + 128 + (4 << 20)),
            counts: PageCounts::default(),
            absent: Vec::new(),
            active_since: (Instant::now(), 0),
            converge: super::converge::AutoConverge::new(machine, request),
        };
        let result = work(&mut sender);
        // Unblocks the reader thread (it ends on the error) before the scope joins it.
        shutdown_link.shutdown();
        result
    })
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> MigrationError {
    move |source| MigrationError::Stream(StreamError::Io { what, source })
}

/// Where the pre-copy rounds ended.
pub(super) struct Rounds {
    /// Units written since the last round was sent (the last harvest), per zone.
    pub dirty: UnitLists,
    /// Of those, the ones the VMM changed.
    pub ours: UnitLists,
    /// The estimated downtime was under the limit.
    pub converged: bool,
    /// Rounds sent after round 0.
    pub round: u64,
}

impl Sender<'_> {
    fn run(&mut self, request: &MigrateRequest) -> Result<(), MigrationError> {
        self.handshake(&Summary::of(&self.machine.config))?;
        let max_rounds = u64::from(request.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS));
        let rounds = self.rounds(request, max_rounds)?;

        // Stop-and-copy.
        let paused_at = Instant::now();
        let precopy_bytes = self.stop(&rounds)?;
        // Device threads stay still from here to the Ack: nothing writes guest RAM behind
        // the last harvest (the balloon's notifier would, serving a kick). On failure the
        // guard goes before the VM resumes.
        let quiet = self.machine.quiesce();
        let (last, last_ours) = self.harvest()?;
        let merged = union(rounds.dirty, last);
        let ours = union(rounds.ours, last_ours);
        self.send_all(&merged, &ours)?;
        let state = self.machine.save_state_quiesced(&quiet)?;
        let state = serde_json::to_vec(&state).expect("machine states serialize");
        self.writer().write(FrameType::State, &[&state])?;
        self.writer().write(FrameType::Complete, &[])?;
        let downtime_bytes = self.bytes_written() - precopy_bytes;
        self.answer(FrameType::Ack, "restoring the VM")?;
        let downtime = ms(paused_at.elapsed());
        drop(quiet);
        self.progress.update(|m| {
            m.downtime = downtime;
            m.downtime_bytes = downtime_bytes;
            m.transferred = precopy_bytes + downtime_bytes;
        });
        Ok(())
    }

    /// Says hello with `summary`, checks the welcome and sends the configuration.
    pub(super) fn handshake(&mut self, summary: &Summary) -> Result<(), MigrationError> {
        let setup_started = Instant::now();
        self.writer().write(FrameType::Hello, &[&handshake::encode(summary)])?;
        let welcome = self.answer(FrameType::Welcome, "handshaking")?;
        let _: serde_json::Value = handshake::decode("destination", &welcome.payload)?;
        let config = serde_json::to_vec(&self.machine.config).expect("configs serialize");
        self.writer().write(FrameType::Config, &[&config])?;
        let page_size = (0..self.zones.len()).map(|z| self.zones.unit(z)).max().unwrap_or(4096);
        self.progress.update(|m| {
            m.setup_time = ms(setup_started.elapsed());
            m.status = MigrationStatus::Active;
            m.page_size = page_size;
        });
        Ok(())
    }

    /// Switches dirty tracking on, sends every existing page while the guest runs
    /// (round 0), then rounds of the pages dirtied meanwhile until the estimated downtime
    /// is under the limit or `max_rounds` rounds went after round 0. The pages dirtied in
    /// the last round are not sent: they are in the result.
    pub(super) fn rounds(&mut self, request: &MigrateRequest, max_rounds: u64) -> Result<Rounds, MigrationError> {
        // From here on every guest write is logged, and every write of the VMM's own
        // (the balloon's) noted: round 0 sends every page that exists, whoever wrote it.
        start_tracking(self.machine, self.progress)?;
        self.active_since = (Instant::now(), self.bytes_written());
        // A lazily restored VM holds pages it has not brought in yet: they must go too.
        self.machine
            .bring_in_lazy_memory()
            .map_err(|e| MigrationError::Memory(format!("cannot bring in the pages of the lazy restore: {e}")))?;
        let existing = self.zones.existing_units()?;
        let mut round_started = Instant::now();
        self.send_all(&existing, &[])?;
        self.end_round(0)?;
        let mut round = 0u64;
        loop {
            let (dirty, ours) = self.harvest()?;
            let elapsed = round_started.elapsed().as_secs_f64().max(1e-6);
            round_started = Instant::now();
            let bytes = self.bytes_of(&dirty);
            let pages: usize = dirty.iter().map(Vec::len).sum();
            let bandwidth = self.bandwidth();
            let expected_ms = bytes as f64 / bandwidth * 1e3;
            self.progress.update(|m| {
                m.expected_downtime = expected_ms;
                m.remaining = bytes;
                m.dirty_pages_rate = pages as f64 / elapsed;
            });
            let converged = expected_ms <= request.downtime_ms as f64;
            if converged || round >= max_rounds {
                return Ok(Rounds { dirty, ours, converged, round });
            }
            self.converge.after_harvest(expected_ms, request.downtime_ms as f64, self.progress);
            round += 1;
            self.send_all(&dirty, &ours)?;
            self.end_round(round)?;
        }
    }

    /// Pauses the VM after `rounds` and records where the pre-copy stood; returns the
    /// stream bytes sent until then.
    pub(super) fn stop(&mut self, rounds: &Rounds) -> Result<u64, MigrationError> {
        let precopy_bytes = self.bytes_written();
        self.progress.update(|m| {
            m.status = MigrationStatus::Device;
            m.converged = rounds.converged;
            m.rounds = rounds.round + 1;
            m.precopy_bytes = precopy_bytes;
        });
        self.machine.pause()?;
        Ok(precopy_bytes)
    }

    /// The stream's writer and the destination's frames, for the post-copy part of a
    /// hybrid migration (taken once).
    pub(super) fn take_link(&mut self) -> (FrameWriter<Link>, Receiver<Result<Frame, StreamError>>) {
        (self.writer.take().expect("taken once"), self.answers.take().expect("taken once"))
    }

    fn answers(&self) -> &Receiver<Result<Frame, StreamError>> {
        self.answers.as_ref().expect("the link was not taken")
    }

    fn writer(&mut self) -> &mut FrameWriter<Link> {
        self.writer.as_mut().expect("the link was not taken")
    }

    /// Stream bytes written so far.
    pub(super) fn bytes_written(&self) -> u64 {
        self.writer.as_ref().map_or(0, FrameWriter::bytes_written)
    }

    /// Waits for the destination's next frame, which must be `wanted` (a `Refuse` says why not).
    fn answer(&mut self, wanted: FrameType, what: &'static str) -> Result<Frame, MigrationError> {
        let frame = match self.answers().recv_timeout(ANSWER_TIMEOUT) {
            Ok(frame) => frame,
            Err(RecvTimeoutError::Timeout) => {
                return Err(MigrationError::NoAnswer { peer: "destination", seconds: ANSWER_TIMEOUT.as_secs(), what })
            }
            Err(RecvTimeoutError::Disconnected) => Err(StreamError::Closed),
        };
        match frame {
            Err(_) if self.progress.cancelled.load(Ordering::SeqCst) => Err(MigrationError::Cancelled),
            Err(e) => Err(e.into()),
            Ok(frame) if frame.kind == wanted => Ok(frame),
            Ok(frame) => Err(unexpected_answer(frame, wanted)),
        }
    }

    /// Between frames: cancelled, refused by the destination, out of time, VM ended?
    fn check(&mut self) -> Result<(), MigrationError> {
        if self.progress.cancelled.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        if let Some((deadline, seconds)) = self.deadline {
            if Instant::now() >= deadline {
                return Err(MigrationError::TimedOut { seconds });
            }
        }
        if let Some(exit) = self.machine.control.exit() {
            return Err(MigrationError::VmEnded(exit.describe()));
        }
        match self.answers().try_recv() {
            Ok(Ok(frame)) => Err(unexpected_answer(frame, FrameType::Ack)),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Ok(()),
        }
    }

    /// Sends the listed units of every zone, in contiguous runs. Of those the VMM changed
    /// (`ours`, sorted per zone), the ones that no longer exist (discarded: the balloon)
    /// go as zero markers without being read, so the destination clears them and the
    /// source does not bring them back; a page discarded or refilled after this query is
    /// in the next harvest.
    pub(super) fn send_all(&mut self, units: &[Vec<u64>], ours: &[Vec<u64>]) -> Result<(), MigrationError> {
        self.absent = vec![Vec::new(); self.zones.len()];
        if ours.iter().any(|list| !list.is_empty()) {
            let existing = self.zones.existing_units()?;
            for (zone, list) in ours.iter().enumerate() {
                self.absent[zone] = list.iter().copied().filter(|u| existing[zone].binary_search(u).is_err()).collect();
            }
        }
        for (zone, list) in units.iter().enumerate() {
            let batch = max_batch(self.zones.unit(zone));
            let mut at = 0;
            while at < list.len() {
                let first = list[at];
                let mut count = 1;
                while at + (count as usize) < list.len() && list[at + count as usize] == first + count && count < batch
                {
                    count += 1;
                }
                self.send_range(zone, first, count)?;
                at += count as usize;
            }
        }
        Ok(())
    }

    fn send_range(&mut self, zone: usize, first: u64, count: u64) -> Result<(), MigrationError> {
        self.check()?;
        let counts = self.zones.encode(zone, first, count, &self.absent[zone], &mut self.buffer);
        let write = self.writer.as_mut().expect("the link was not taken").write(FrameType::Pages, &[&self.buffer]);
        if write.is_err() && self.progress.cancelled.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        if let Err(e) = write {
            // The destination may have said why it stopped reading.
            return match self.answers().recv_timeout(Duration::from_millis(500)) {
                Ok(Ok(frame)) => Err(unexpected_answer(frame, FrameType::Ack)),
                _ => Err(e.into()),
            };
        }
        self.counts.add(counts);
        self.pace();
        let (sent, elapsed) = (self.bytes_written(), self.progress.started.elapsed().as_secs_f64());
        let bandwidth = self.bandwidth();
        let counts = self.counts;
        self.progress.update(|m| {
            m.transferred = sent;
            m.duplicate = counts.zero;
            m.normal = counts.normal;
            m.normal_bytes = counts.normal_bytes;
            m.mbps = bandwidth * 8.0 / 1e6;
            m.pages_per_second = (counts.zero + counts.normal) as f64 / elapsed.max(1e-6);
        });
        Ok(())
    }

    /// Sleeps as long as `--bandwidth` asks.
    fn pace(&mut self) {
        let Some(limit) = self.bandwidth_limit else { return };
        let (since, before) = self.active_since;
        let due = Duration::from_secs_f64((self.bytes_written() - before) as f64 / limit as f64);
        let elapsed = since.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }

    /// Bytes per second moved since the transfer began (the pacing included).
    fn bandwidth(&self) -> f64 {
        let (since, before) = self.active_since;
        let measured = (self.bytes_written() - before) as f64 / since.elapsed().as_secs_f64().max(1e-6);
        match self.bandwidth_limit {
            Some(limit) => measured.min(limit as f64),
            None => measured,
        }
    }

    fn end_round(&mut self, round: u64) -> Result<(), MigrationError> {
        self.check()?;
        self.writer().write(FrameType::RoundEnd, &[&(round as u32).to_le_bytes()])?;
        Ok(())
    }

    /// The units written since the last harvest, per zone (sorted), with the log and the
    /// VMM's write set reset: the union of both, and apart the units the VMM changed.
    pub(super) fn harvest(&mut self) -> Result<(UnitLists, UnitLists), MigrationError> {
        harvest(self.machine, &self.zones, self.progress)
    }

    fn bytes_of(&self, units: &[Vec<u64>]) -> u64 {
        units.iter().enumerate().map(|(zone, list)| list.len() as u64 * self.zones.unit(zone)).sum()
    }
}

/// Switches the dirty tracker on (a log left on by an earlier migration is reset) and
/// forgets the VMM's own writes: from here on every change to guest RAM is in the next
/// [`harvest`].
pub(super) fn start_tracking(machine: &Machine, progress: &Progress) -> Result<(), MigrationError> {
    {
        let mut vm = machine.vm();
        vm.enable_dirty_log()?;
        for slot in 0..machine.ram.regions().len() {
            vm.take_dirty_pages(slot)?;
        }
        machine.paging.discarder().vmm_writes().take();
    }
    super::dirty_tracker::record(machine, progress)
}

/// The units written since the last harvest, per zone (sorted), with the log and the
/// VMM's write set reset: the union of both, and apart the units the VMM changed.
pub(super) fn harvest(
    machine: &Machine,
    zones: &Zones,
    progress: &Progress,
) -> Result<(UnitLists, UnitLists), MigrationError> {
    let mut dirty: Vec<Vec<u64>> = vec![Vec::new(); zones.len()];
    let mut ours: Vec<Vec<u64>> = vec![Vec::new(); zones.len()];
    {
        let vm = machine.vm();
        let regions = machine.ram.regions();
        for (slot, region) in regions.iter().enumerate() {
            let unit = zones.unit(region.zone);
            for page in vm.take_dirty_pages(slot)? {
                dirty[region.zone].push((region.fd_offset + page * 4096) / unit);
            }
        }
        for gpa in machine.paging.discarder().vmm_writes().take() {
            let Some(region) = regions.iter().find(|r| gpa >= r.gpa && gpa - r.gpa < r.size_bytes) else {
                continue;
            };
            let unit = (region.fd_offset + gpa - region.gpa) / zones.unit(region.zone);
            ours[region.zone].push(unit);
            dirty[region.zone].push(unit);
        }
    }
    for list in dirty.iter_mut().chain(ours.iter_mut()) {
        list.sort_unstable();
        list.dedup();
    }
    progress.update(|m| m.dirty_sync_count += 1);
    super::dirty_tracker::record(machine, progress)?;
    Ok((dirty, ours))
}

/// Units per zone, each list sorted.
pub(super) type UnitLists = Vec<Vec<u64>>;

/// Per zone, the sorted union of two sorted lists.
pub(super) fn union(a: Vec<Vec<u64>>, b: Vec<Vec<u64>>) -> Vec<Vec<u64>> {
    a.into_iter()
        .zip(b)
        .map(|(mut a, b)| {
            a.extend(b);
            a.sort_unstable();
            a.dedup();
            a
        })
        .collect()
}

/// A destination frame other than the one due: its `Refuse` message, or the surprise.
fn unexpected_answer(frame: Frame, wanted: FrameType) -> MigrationError {
    match frame.kind {
        FrameType::Refuse => MigrationError::Refused {
            peer: "destination",
            reason: String::from_utf8_lossy(&frame.payload).into_owned(),
        },
        other => MigrationError::Unexpected { got: format!("{other:?}"), wanted: format!("{wanted:?}") },
    }
}
