//! The post-copy source: connect (and, with the preempt channel, connect a second
//! time), handshake, send the configuration, pause, send the table of the pages that
//! exist (the rest are zero on the destination) and the machine state — no memory in the
//! downtime — and hand the VM over (the destination's `Ack`, ours back). From then on
//! the destination runs it; this end answers its page requests first (on the preempt
//! channel, or between background batches on the main connection) and pushes every page
//! not sent yet in the background, from the last requested page onward. When the
//! destination says every page is in (`Ack`), the VM ends here `migrated`.
//!
//! Memory is read while the VM is paused and devices are held still, so every copy of a
//! page is its final contents: it does not matter which path delivers it first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::handshake::{self, Summary};
use super::memory::{max_batch, PageCounts, Zones};
use super::metrics::MigrationStatus;
use super::source::Progress;
use super::stream::{Frame, FrameReader, FrameType, FrameWriter, StreamError, MAX_PAYLOAD};
use super::transport::{Link, MigrationUri};
use super::MigrationError;
use crate::api::protocol::MigrateRequest;
use crate::machine::Machine;

/// How long the source waits for the destination's handshake and acknowledgements.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// A write that blocks this long means the destination stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the reader threads pass to the pusher.
enum Event {
    /// A page request that came on the main connection (no preempt channel).
    Request(Result<(usize, u64), MigrationError>),
    /// Any other frame from the destination, or the link's end.
    Frame(Result<Frame, StreamError>),
    /// The preempt channel's answerer stopped with this error.
    Preempt(MigrationError),
}

/// Which units exist and which were sent, per zone (one bit per unit).
struct Sent {
    existing: Vec<Vec<u64>>,
    sent: Mutex<Vec<Vec<u64>>>,
    /// The last requested unit + 1 (zone << 40 | unit), 0: none since last looked.
    last_request: AtomicU64,
    requests: AtomicU64,
}

impl Sent {
    fn new(existing: &[Vec<u64>], zones: &Zones) -> Self {
        let bitmaps: Vec<Vec<u64>> = existing
            .iter()
            .enumerate()
            .map(|(z, units)| {
                let mut map = vec![0u64; zones.unit_count(z).div_ceil(64) as usize];
                for &u in units {
                    map[(u / 64) as usize] |= 1 << (u % 64);
                }
                map
            })
            .collect();
        let sent = bitmaps.iter().map(|m| vec![0u64; m.len()]).collect();
        Sent { existing: bitmaps, sent: Mutex::new(sent), last_request: AtomicU64::new(0), requests: AtomicU64::new(0) }
    }

    fn mark(&self, zone: usize, first: u64, count: u64) {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        for u in first..first + count {
            sent[zone][(u / 64) as usize] |= 1 << (u % 64);
        }
    }

    /// The next run of existing, unsent units at or after `(zone, unit)` (wrapping
    /// around to the zones before), at most `limit(zone)` long, marked sent; `None` when
    /// every unit went.
    fn next_run(&self, cursor: (usize, u64), limit: impl Fn(usize) -> u64) -> Option<(usize, u64, u64)> {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        let zones = self.existing.len();
        for step in 0..=zones {
            let zone = (cursor.0 + step) % zones.max(1);
            let end = self.existing.get(zone).map_or(0, |m| m.len() as u64 * 64);
            let (from, to) = match step {
                0 => (cursor.1.min(end), end),
                s if s == zones => (0, cursor.1.min(end)),
                _ => (0, end),
            };
            if let Some((first, count)) = self.find_run(&mut sent[zone], zone, from, to, limit(zone)) {
                return Some((zone, first, count));
            }
        }
        None
    }

    /// The first run in `from..to` of zone `zone`, marked in `sent`.
    fn find_run(&self, sent: &mut [u64], zone: usize, from: u64, to: u64, limit: u64) -> Option<(u64, u64)> {
        let existing = &self.existing[zone];
        let wanted = |sent: &[u64], u: u64| {
            let (w, b) = ((u / 64) as usize, 1u64 << (u % 64));
            existing[w] & !sent[w] & b != 0
        };
        let mut u = from;
        while u < to {
            let w = (u / 64) as usize;
            if existing[w] & !sent[w] & (!0u64 << (u % 64)) == 0 {
                u = (w as u64 + 1) * 64;
                continue;
            }
            if !wanted(sent, u) {
                u += 1;
                continue;
            }
            let mut count = 1;
            while count < limit && u + count < to && wanted(sent, u + count) {
                count += 1;
            }
            for v in u..u + count {
                sent[(v / 64) as usize] |= 1 << (v % 64);
            }
            return Some((u, count));
        }
        None
    }
}

/// A request's payload: zone (u32) and unit (u64).
pub(super) fn encode_request(zone: usize, unit: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..4].copy_from_slice(&(zone as u32).to_le_bytes());
    out[4..].copy_from_slice(&unit.to_le_bytes());
    out
}

fn decode_request(payload: &[u8], zones: &Zones) -> Result<(usize, u64), MigrationError> {
    let bad = |reason: String| MigrationError::Malformed { what: "a PageRequest frame".into(), reason };
    if payload.len() != 12 {
        return Err(bad(format!("{} bytes, not 12", payload.len())));
    }
    let zone = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
    let unit = u64::from_le_bytes(payload[4..].try_into().expect("8 bytes"));
    if zone >= zones.len() || unit >= zones.unit_count(zone) {
        return Err(bad(format!("zone {zone} page {unit} is not guest RAM of this VM")));
    }
    Ok((zone, unit))
}

/// The `Present` payload of one zone: zone (u32), units (u64), one bit per unit.
fn encode_present(zone: usize, units: u64, existing: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + units.div_ceil(8) as usize);
    out.extend_from_slice(&(zone as u32).to_le_bytes());
    out.extend_from_slice(&units.to_le_bytes());
    let mut map = vec![0u8; units.div_ceil(8) as usize];
    for &u in existing {
        map[(u / 8) as usize] |= 1 << (u % 8);
    }
    out.extend(map);
    out
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> MigrationError {
    move |source| MigrationError::Stream(StreamError::Io { what, source })
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The post-copy transfer (`--mode postcopy`).
pub fn postcopy(
    machine: &Machine,
    uri: &MigrationUri,
    request: &MigrateRequest,
    progress: &Progress,
) -> Result<(), MigrationError> {
    let main = uri.connect()?;
    progress.set_link(main.try_clone().map_err(io("cloning the link"))?);
    if progress.is_cancelled() {
        return Err(MigrationError::Cancelled);
    }
    let mut summary = Summary::of(&machine.config);
    summary.mode = "postcopy".into();
    summary.preempt = request.postcopy_preempt;
    let mut session = Session::handshake(machine, uri, main, &summary, progress)?;
    let result = session.run(machine, progress);
    session.shutdown();
    result
}

/// Post-copy with the preempt channel (`summary.preempt`): connects a second time and
/// greets on it (after the main connection's handshake: the destination accepts it
/// then).
pub(super) fn connect_preempt(
    uri: &MigrationUri,
    summary: &Summary,
) -> Result<Option<(Link, FrameWriter<Link>)>, MigrationError> {
    if !summary.preempt {
        return Ok(None);
    }
    let link = uri.connect()?;
    link.set_timeouts(None, Some(WRITE_TIMEOUT));
    let mut writer = FrameWriter::new(link.try_clone().map_err(io("cloning the preempt channel"))?);
    writer.write(FrameType::Hello, &[&handshake::encode(summary)])?;
    Ok(Some((link, writer)))
}

/// The connections of one post-copy, handshaken.
pub(super) struct Session {
    main: Link,
    writer: Mutex<FrameWriter<Link>>,
    reader: Option<FrameReader<Link>>,
    preempt: Option<Link>,
    /// The preempt channel's writer (its Hello sent).
    preempt_writer: Option<FrameWriter<Link>>,
}

impl Session {
    fn handshake(
        machine: &Machine,
        uri: &MigrationUri,
        main: Link,
        summary: &Summary,
        progress: &Progress,
    ) -> Result<Session, MigrationError> {
        let setup_started = Instant::now();
        main.set_timeouts(Some(ANSWER_TIMEOUT), Some(WRITE_TIMEOUT));
        let mut writer = FrameWriter::new(main.try_clone().map_err(io("cloning the link"))?);
        let mut reader = FrameReader::new(main.try_clone().map_err(io("cloning the link"))?);
        let hello = handshake::encode(summary);
        writer.write(FrameType::Hello, &[&hello])?;
        let welcome = expect(&mut reader, FrameType::Welcome, "handshaking")?;
        let _: serde_json::Value = handshake::decode("destination", &welcome.payload)?;
        let config = serde_json::to_vec(&machine.config).expect("configs serialize");
        writer.write(FrameType::Config, &[&config])?;
        let (preempt, preempt_writer) = connect_preempt(uri, summary)?.unzip();
        // The pause waits until the destination has built the VM: building it (mapping
        // the RAM, the vCPU threads) would otherwise share the CPUs with the switch-over
        // and stretch the downtime.
        let ready = expect(&mut reader, FrameType::Welcome, "building the VM")?;
        let ready: serde_json::Value = handshake::decode("destination", &ready.payload)?;
        if ready["ready"] != true {
            return Err(MigrationError::Malformed {
                what: "the destination's second Welcome".into(),
                reason: format!("{ready} does not say ready"),
            });
        }
        let zones = Zones::new(&machine.ram, &machine.config.zones);
        let page_size = (0..zones.len()).map(|z| zones.unit(z)).max().unwrap_or(4096);
        progress.update(|m| {
            m.setup_time = ms(setup_started.elapsed());
            m.status = MigrationStatus::Active;
            m.page_size = page_size;
            m.mode = summary.mode.clone();
            m.postcopy_preempt = summary.preempt;
        });
        Ok(Session { main, writer: Mutex::new(writer), reader: Some(reader), preempt, preempt_writer })
    }

    /// A session on a link whose handshake and pre-copy rounds went already (hybrid):
    /// `writer` goes on numbering the main connection's frames.
    pub(super) fn resume(
        writer: FrameWriter<Link>,
        preempt: Option<(Link, FrameWriter<Link>)>,
    ) -> Result<Self, MigrationError> {
        let main = writer.get_ref().try_clone().map_err(io("cloning the link"))?;
        let (preempt, preempt_writer) = preempt.unzip();
        Ok(Session { main, writer: Mutex::new(writer), reader: None, preempt, preempt_writer })
    }

    /// Shuts every connection down (their readers end).
    pub(super) fn shutdown(&self) {
        self.main.shutdown();
        if let Some(preempt) = &self.preempt {
            preempt.shutdown();
        }
    }

    fn write(&self, kind: FrameType, parts: &[&[u8]]) -> Result<(), StreamError> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).write(kind, parts)
    }

    fn main_bytes(&self) -> u64 {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).bytes_written()
    }

    fn run(&mut self, machine: &Machine, progress: &Progress) -> Result<(), MigrationError> {
        // A lazily restored VM holds pages it has not brought in yet: they must go too.
        machine
            .bring_in_lazy_memory()
            .map_err(|e| MigrationError::Memory(format!("cannot bring in the pages of the lazy restore: {e}")))?;
        // Which pages exist is asked while the guest still runs (the query walks the page
        // tables of all guest RAM: milliseconds per GiB), with the dirty tracker on; the
        // pages written meanwhile, found by a harvest in the pause, are added to it.
        let zones = Zones::new(&machine.ram, &machine.config.zones);
        super::source::start_tracking(machine, progress)?;
        let scanned = zones.existing_units()?;
        let paused_at = Instant::now();
        progress.update(|m| m.status = MigrationStatus::Device);
        machine.pause()?;
        // Nothing writes guest RAM from here to the end: every page read is final.
        let quiet = machine.quiesce();
        let (written, _) = super::source::harvest(machine, &zones, progress)?;
        let existing = super::source::union(scanned, written);
        let mut reader = self.reader.take().expect("read once");
        let frames = std::iter::from_fn(move || Some(reader.read()));
        self.switch_over(machine, progress, &quiet, &existing, frames, (paused_at, 0))
    }

    /// With the VM paused and held still (`quiet`): sends the table of the units still to
    /// come (`listed`; the rest are on the destination already, or zero) and the machine
    /// state, hands the VM over, answers the destination's requests and pushes the listed
    /// units until every one is in. `frames` are the main connection's frames from the
    /// destination; `paused_at` when the VM paused, and the stream bytes sent before
    /// (pre-copy rounds, hybrid).
    pub(super) fn switch_over(
        &mut self,
        machine: &Machine,
        progress: &Progress,
        quiet: &crate::machine::Quiesced,
        listed: &[Vec<u64>],
        frames: impl Iterator<Item = Result<Frame, StreamError>> + Send,
        (paused_at, precopy_bytes): (Instant, u64),
    ) -> Result<(), MigrationError> {
        let zones = Zones::new(&machine.ram, &machine.config.zones);
        let harvested = paused_at.elapsed();
        for (zone, units) in listed.iter().enumerate() {
            let payload = encode_present(zone, zones.unit_count(zone), units);
            if payload.len() > MAX_PAYLOAD as usize {
                return Err(MigrationError::Unsupported(format!(
                    "zone {zone} has {} pages, more than one post-copy page table frame lists; use pre-copy",
                    zones.unit_count(zone)
                )));
            }
            self.write(FrameType::Present, &[&payload])?;
        }
        let state = machine.save_state_quiesced(quiet)?;
        let state = serde_json::to_vec(&state).expect("machine states serialize");
        self.write(FrameType::State, &[&state])?;
        tracing::debug!(
            "post-copy switch-over: table ready {:.1} ms after the pause, state sent after {:.1} ms",
            ms(harvested),
            ms(paused_at.elapsed())
        );
        let switch_bytes = self.main_bytes();
        let sent = Sent::new(listed, &zones);
        let listed_bytes: u64 = listed.iter().enumerate().map(|(z, u)| u.len() as u64 * zones.unit(z)).sum();
        let table_pages = listed.iter().map(|u| u.len() as u64).sum();
        progress.update(|m| {
            m.postcopy_table_pages = table_pages;
            m.remaining = listed_bytes;
            m.downtime_bytes = switch_bytes - precopy_bytes;
        });
        // After the handover the destination may stay silent for as long as the push
        // runs: the waits below bound the silence instead.
        self.main.set_timeouts(None, Some(WRITE_TIMEOUT));
        // Requests are answered from here on: restoring the state on the destination may
        // already touch guest RAM.
        let (events_in, events) = mpsc::channel();
        let preempt_bytes = AtomicU64::new(0);
        let answered = std::thread::scope(|scope| {
            {
                let events_in = events_in.clone();
                let zones_ref = &machine.config.zones;
                let ram = &machine.ram;
                scope.spawn(move || read_main(frames, events_in, Zones::new(ram, zones_ref)));
            }
            if let (Some(link), Some(writer)) = (&self.preempt, self.preempt_writer.take()) {
                let link = link.try_clone().map_err(io("cloning the preempt channel"))?;
                let (sent, bytes, events_in) = (&sent, &preempt_bytes, events_in.clone());
                scope.spawn(move || {
                    if let Err(e) = answer_preempt(link, writer, machine, sent, bytes) {
                        let _ = events_in.send(Event::Preempt(e));
                    }
                });
            }
            drop(events_in);
            let result = self.serve(machine, progress, &zones, &sent, &events, paused_at, switch_bytes);
            // Unblocks the reader threads before the scope joins them.
            self.main.shutdown();
            if let Some(link) = &self.preempt {
                link.shutdown();
            }
            result
        });
        let requests = sent.requests.load(Ordering::Relaxed);
        let postcopy_bytes = self.main_bytes().saturating_sub(switch_bytes) + preempt_bytes.load(Ordering::Relaxed);
        progress.update(|m| {
            m.postcopy_requests = requests;
            m.postcopy_bytes = postcopy_bytes;
            m.transferred = switch_bytes + postcopy_bytes;
        });
        answered
    }

    #[allow(clippy::too_many_arguments)]
    fn serve(
        &self,
        machine: &Machine,
        progress: &Progress,
        zones: &Zones,
        sent: &Sent,
        events: &Receiver<Event>,
        paused_at: Instant,
        switch_bytes: u64,
    ) -> Result<(), MigrationError> {
        let mut buffer = Vec::with_capacity(super::memory::BATCH_HEADER + 128 + (4 << 20));
        let mut counts = PageCounts::default();
        // The handover: the destination restored the state; once it has our Ack it runs.
        self.wait(events, machine, zones, sent, &mut buffer, &mut counts, "restoring the VM")?;
        progress.commit();
        self.write(FrameType::Ack, &[])?;
        let downtime = ms(paused_at.elapsed());
        tracing::debug!("post-copy switch-over: the destination took the VM after {downtime:.1} ms");
        progress.update(|m| {
            m.downtime = downtime;
            m.status = MigrationStatus::PostcopyActive;
        });
        let mut cursor = (0usize, 0u64);
        let mut last_progress = Instant::now();
        loop {
            while let Ok(event) = events.try_recv() {
                self.handle(event, machine, zones, sent, &mut buffer, &mut counts, false)?;
            }
            let last = sent.last_request.swap(0, Ordering::Relaxed);
            if last != 0 {
                cursor = (((last - 1) >> 40) as usize, (last - 1) & ((1 << 40) - 1));
            }
            let Some((zone, first, count)) = sent.next_run(cursor, |z| max_batch(zones.unit(z))) else { break };
            counts.add(zones.encode(zone, first, count, &[], &mut buffer));
            self.write(FrameType::Pages, &[&buffer])?;
            cursor = (zone, first + count);
            if last_progress.elapsed() > Duration::from_millis(100) {
                last_progress = Instant::now();
                let bytes = self.main_bytes() - switch_bytes;
                progress.update(|m| {
                    m.postcopy_bytes = bytes;
                    m.postcopy_requests = sent.requests.load(Ordering::Relaxed);
                    m.normal = counts.normal;
                    m.duplicate = counts.zero;
                    m.normal_bytes = counts.normal_bytes;
                });
            }
        }
        self.write(FrameType::Complete, &[])?;
        progress.update(|m| {
            m.remaining = 0;
            m.normal = counts.normal;
            m.duplicate = counts.zero;
            m.normal_bytes = counts.normal_bytes;
        });
        // The destination answers once every page is in (it waits for the requests
        // still on their way); requests keep coming meanwhile.
        self.wait(events, machine, zones, sent, &mut buffer, &mut counts, "installing the last pages")?;
        let elapsed = progress.started().elapsed().as_secs_f64().max(1e-6);
        progress.update(|m| {
            m.normal = counts.normal;
            m.duplicate = counts.zero;
            m.normal_bytes = counts.normal_bytes;
            m.mbps = (self.main_bytes() as f64) * 8.0 / 1e6 / elapsed;
            m.pages_per_second = (counts.normal + counts.zero) as f64 / elapsed;
        });
        Ok(())
    }

    /// Handles events until the destination's `Ack` (answering requests on the main
    /// connection meanwhile), for at most [`ANSWER_TIMEOUT`] of silence.
    #[allow(clippy::too_many_arguments)]
    fn wait(
        &self,
        events: &Receiver<Event>,
        machine: &Machine,
        zones: &Zones,
        sent: &Sent,
        buffer: &mut Vec<u8>,
        counts: &mut PageCounts,
        what: &'static str,
    ) -> Result<(), MigrationError> {
        loop {
            let event = match events.recv_timeout(ANSWER_TIMEOUT) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(MigrationError::NoAnswer {
                        peer: "destination",
                        seconds: ANSWER_TIMEOUT.as_secs(),
                        what,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(StreamError::Closed.into()),
            };
            if self.handle(event, machine, zones, sent, buffer, counts, true)? {
                return Ok(());
            }
        }
    }

    /// One event: a request answered, or the destination's `Ack` (true; only where
    /// `ack_due`), or the error that ends the migration.
    #[allow(clippy::too_many_arguments)]
    fn handle(
        &self,
        event: Event,
        _machine: &Machine,
        zones: &Zones,
        sent: &Sent,
        buffer: &mut Vec<u8>,
        counts: &mut PageCounts,
        ack_due: bool,
    ) -> Result<bool, MigrationError> {
        match event {
            Event::Request(request) => {
                let (zone, unit) = request?;
                sent.requests.fetch_add(1, Ordering::Relaxed);
                sent.mark(zone, unit, 1);
                sent.last_request.store(((zone as u64) << 40 | unit) + 2, Ordering::Relaxed);
                counts.add(zones.encode(zone, unit, 1, &[], buffer));
                self.write(FrameType::Pages, &[buffer])?;
                Ok(false)
            }
            Event::Frame(Ok(frame)) if frame.kind == FrameType::Ack && ack_due => Ok(true),
            Event::Frame(Ok(frame)) if frame.kind == FrameType::Refuse => Err(MigrationError::Refused {
                peer: "destination",
                reason: String::from_utf8_lossy(&frame.payload).into_owned(),
            }),
            Event::Frame(Ok(frame)) => Err(MigrationError::Unexpected {
                got: format!("{:?}", frame.kind),
                wanted: if ack_due { "Ack".into() } else { "PageRequest".into() },
            }),
            Event::Frame(Err(e)) => Err(e.into()),
            Event::Preempt(e) => Err(e),
        }
    }
}

/// The main connection's reader: requests (no preempt channel) and the destination's
/// other frames, until the link ends.
fn read_main(frames: impl Iterator<Item = Result<Frame, StreamError>>, events: Sender<Event>, zones: Zones) {
    for frame in frames {
        let event = match frame {
            Ok(frame) if frame.kind == FrameType::PageRequest => Event::Request(decode_request(&frame.payload, &zones)),
            other => {
                let end = other.is_err();
                let _ = events.send(Event::Frame(other));
                if end {
                    return;
                }
                continue;
            }
        };
        if events.send(event).is_err() {
            return;
        }
    }
}

/// The preempt channel's answerer: each `PageRequest` answered at once with a one-page
/// `Pages` frame, until the link ends (Ok) or breaks (the error).
fn answer_preempt(
    link: Link,
    mut writer: FrameWriter<Link>,
    machine: &Machine,
    sent: &Sent,
    bytes: &AtomicU64,
) -> Result<(), MigrationError> {
    let zones = Zones::new(&machine.ram, &machine.config.zones);
    let mut reader = FrameReader::new(link);
    let mut buffer = Vec::with_capacity(super::memory::BATCH_HEADER + 8 + (2 << 20));
    loop {
        let frame = match reader.read() {
            Ok(frame) => frame,
            Err(StreamError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if frame.kind != FrameType::PageRequest {
            return Err(MigrationError::Unexpected { got: format!("{:?}", frame.kind), wanted: "PageRequest".into() });
        }
        let (zone, unit) = decode_request(&frame.payload, &zones)?;
        sent.requests.fetch_add(1, Ordering::Relaxed);
        sent.mark(zone, unit, 1);
        sent.last_request.store(((zone as u64) << 40 | unit) + 2, Ordering::Relaxed);
        zones.encode(zone, unit, 1, &[], &mut buffer);
        writer.write(FrameType::Pages, &[&buffer])?;
        bytes.store(writer.bytes_written(), Ordering::Relaxed);
    }
}

fn expect(reader: &mut FrameReader<Link>, wanted: FrameType, what: &'static str) -> Result<Frame, MigrationError> {
    let frame = reader.read().map_err(|e| match e {
        StreamError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
        {
            MigrationError::NoAnswer { peer: "destination", seconds: ANSWER_TIMEOUT.as_secs(), what }
        }
        other => other.into(),
    })?;
    match frame.kind {
        kind if kind == wanted => Ok(frame),
        FrameType::Refuse => Err(MigrationError::Refused {
            peer: "destination",
            reason: String::from_utf8_lossy(&frame.payload).into_owned(),
        }),
        other => Err(MigrationError::Unexpected { got: format!("{other:?}"), wanted: format!("{wanted:?}") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent_of(existing: Vec<Vec<u64>>, units: &[u64]) -> Sent {
        let bitmaps = existing
            .iter()
            .zip(units)
            .map(|(e, &n)| {
                let mut map = vec![0u64; n.div_ceil(64) as usize];
                for &u in e {
                    map[(u / 64) as usize] |= 1 << (u % 64);
                }
                map
            })
            .collect::<Vec<_>>();
        let sent = bitmaps.iter().map(|m| vec![0u64; m.len()]).collect();
        Sent { existing: bitmaps, sent: Mutex::new(sent), last_request: AtomicU64::new(0), requests: AtomicU64::new(0) }
    }

    #[test]
    fn runs_start_at_the_cursor_wrap_around_and_skip_what_was_sent() {
        let sent = sent_of(vec![vec![1, 2, 3, 70, 71, 130], vec![0, 5]], &[200, 10]);
        sent.mark(0, 71, 1);
        let mut runs = Vec::new();
        let mut cursor = (0, 65);
        while let Some(run) = sent.next_run(cursor, |_| 2) {
            runs.push(run);
            cursor = (run.0, run.1 + run.2);
        }
        assert_eq!(runs, vec![(0, 70, 1), (0, 130, 1), (1, 0, 1), (1, 5, 1), (0, 1, 2), (0, 3, 1)]);
        assert_eq!(sent.next_run((1, 3), |_| 8), None);
    }
}
