//! The destination: `faultline restore --incoming URI` listens, takes one source,
//! checks the handshake, receives the configuration (the VMM builds the machine from
//! it, vCPUs paused), then pages straight into guest RAM and the machine state, and
//! acknowledges once the state is restored. Every frame is checked (number, checksum,
//! type, order, ranges) before it is applied; anything wrong ends the migration with a
//! `Refuse` frame to the source and an error here, and the VM is never started.

use std::io::Read;
use std::time::{Duration, Instant};

use super::handshake;
use super::memory::{Applier, PageCounts, Zones};
use super::metrics::{MigrationMetrics, MigrationStatus};
use super::stream::{Frame, FrameReader, FrameType, FrameWriter};

use super::transport::{Link, Listener, MigrationUri};
use super::MigrationError;
use crate::config::VmConfig;
use crate::machine::{Machine, MachineState};

/// A source silent this long is given up on.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// After a refusal, how long the destination reads on so its message is not lost to a
/// connection reset.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A source connected, handshaken, and its VM's configuration received.
pub struct Incoming {
    pub(super) link: Link,
    pub(super) reader: FrameReader<Link>,
    pub(super) writer: FrameWriter<Link>,
    config: VmConfig,
    pub(super) metrics: MigrationMetrics,
    pub(super) started: Instant,
    stop_and_copy_began: Option<Instant>,
    /// `fd-local:`: the zones' fds handed over (until the VMM takes them).
    local: Option<Vec<std::os::fd::OwnedFd>>,
    /// What the source said in its handshake.
    pub(super) summary: Option<handshake::Summary>,
    /// Post-copy with the preempt channel: the second connection.
    pub(super) preempt: Option<(Link, FrameReader<Link>)>,
    /// Post-copy: when the page table began to arrive (the source had paused).
    pub(super) postcopy_began: Option<Instant>,
}

impl Incoming {
    /// Listens on `uri`, takes the first source, answers its handshake and reads the
    /// configuration. A source that does not fit is refused (it is told why).
    pub fn accept(uri: &str) -> Result<Incoming, MigrationError> {
        let uri = MigrationUri::parse(uri)?;
        let listener = uri.listen()?;
        let link = listener.accept()?;
        let started = Instant::now();
        link.set_timeouts(Some(IDLE_TIMEOUT), Some(IDLE_TIMEOUT));
        let clone = |link: &Link| link.try_clone().map_err(|e| MigrationError::Accept { source: e });
        let reader = FrameReader::new(clone(&link)?);
        let writer = FrameWriter::new(clone(&link)?);
        let metrics = MigrationMetrics {
            role: "destination".into(),
            uri: uri.to_string(),
            status: MigrationStatus::Setup,
            ..MigrationMetrics::default()
        };
        let mut incoming = Incoming {
            link,
            reader,
            writer,
            config: VmConfig::default(),
            metrics,
            started,
            stop_and_copy_began: None,
            local: None,
            summary: None,
            preempt: None,
            postcopy_began: None,
        };
        let local = uri.is_local();
        let handshake = incoming.handshake(local).and_then(|config| match local {
            true => {
                let socket = incoming.link.unix().expect("fd-local: links are Unix sockets");
                incoming.local = Some(super::local::receive_fds(socket, &config.zones)?);
                Ok(config)
            }
            false => Ok(config),
        });
        let handshake = handshake.and_then(|config| {
            if incoming.summary.as_ref().is_some_and(|s| s.is_postcopy() && s.preempt) {
                incoming.preempt = Some(accept_preempt(&listener)?);
            }
            Ok(config)
        });
        drop(listener);
        match handshake {
            Ok(config) => {
                incoming.config = config;
                incoming.metrics.setup_time = ms(started.elapsed());
                incoming.metrics.status = MigrationStatus::Active;
                Ok(incoming)
            }
            Err(e) => Err(incoming.refuse(e)),
        }
    }

    fn handshake(&mut self, local: bool) -> Result<VmConfig, MigrationError> {
        let hello = self.expect(FrameType::Hello)?;
        let summary: handshake::Summary = handshake::decode("source", &hello.payload)?;
        if summary.is_postcopy() && local {
            return Err(MigrationError::Unsupported("post-copy over fd-local: (the memory is shared already)".into()));
        }
        self.summary = Some(summary.clone());
        self.writer
            .write(FrameType::Welcome, &[&handshake::encode(&serde_json::json!({ "writer": handshake::writer() }))])?;
        let frame = self.expect(FrameType::Config)?;
        let config: VmConfig = serde_json::from_slice(&frame.payload)
            .map_err(|e| MigrationError::Malformed { what: "the Config frame".into(), reason: e.to_string() })?;
        let sizes: Vec<u64> = config.zones.iter().map(|z| z.size_bytes).collect();
        if config.vcpus != summary.vcpus || sizes != summary.zones.iter().map(|z| z.size_bytes).collect::<Vec<_>>() {
            return Err(MigrationError::Malformed {
                what: "the Config frame".into(),
                reason: "it disagrees with the handshake's summary (vCPUs or zone sizes)".into(),
            });
        }
        if !local && config.zones.iter().any(|z| z.backend == crate::config::Backend::File) {
            return Err(MigrationError::Unsupported("file zones are not migrated".into()));
        }
        Ok(config)
    }

    /// `fd-local:`: the zones' fds the source handed over, in zone order, for the VMM to
    /// map instead of making fresh memory (taken once).
    pub fn take_zone_fds(&mut self) -> Option<Vec<std::os::fd::OwnedFd>> {
        self.local.take()
    }

    /// The VM's configuration, as the source sent it.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Receives guest memory into `machine`'s fresh RAM (its vCPUs not started) and
    /// returns the machine state, once the source said it is complete.
    pub fn receive(&mut self, machine: &Machine) -> Result<MachineState, MigrationError> {
        if self.is_local() {
            // fd-local: the machine is built on the shared zones; the source may stop now.
            self.say_ready()?;
        }
        let mut applier = Applier::new(Zones::new(&machine.ram, &machine.config.zones));
        let received = receive_memory(&mut self.reader, &mut applier)?;
        let state = serde_json::from_slice::<MachineState>(&received.state)
            .map_err(|e| MigrationError::Malformed { what: "the State frame".into(), reason: e.to_string() })?;
        self.stop_and_copy_began = Some(received.last_round_end);
        let m = &mut self.metrics;
        m.rounds = received.rounds;
        m.dirty_sync_count = received.rounds;
        m.duplicate = received.counts.zero;
        m.normal = received.counts.normal;
        m.normal_bytes = received.counts.normal_bytes;
        m.transferred = self.reader.bytes_read();
        m.total = machine.ram.size_bytes();
        m.page_size = machine.config.zones.iter().map(super::memory::unit_bytes).max().unwrap_or(4096);
        Ok(state)
    }

    /// Tells the source the machine is built here (a second `Welcome`, `{"ready": true}`):
    /// a source that is about to pause waits for it, so its downtime does not include
    /// this end building the VM (fd-local:, post-copy).
    pub(super) fn say_ready(&mut self) -> Result<(), MigrationError> {
        self.writer.write(FrameType::Welcome, &[&handshake::encode(&serde_json::json!({ "ready": true }))])?;
        Ok(())
    }

    /// Tells the source the VM runs here now; returns this end's figures.
    pub fn acknowledge(mut self) -> Result<MigrationMetrics, MigrationError> {
        self.writer.write(FrameType::Ack, &[])?;
        if self.is_local() {
            // The memory is shared: no vCPU may run here before the source has let go of
            // it (its own Ack back); without it the source may resume (docs/migration.md).
            expect(&mut self.reader, FrameType::Ack).map_err(|e| {
                MigrationError::Unsupported(format!(
                    "the source did not release the VM ({e}); it runs on there, nothing was started here"
                ))
            })?;
        }
        self.link.shutdown_write();
        if let Some(began) = self.stop_and_copy_began {
            self.metrics.downtime = ms(began.elapsed());
        }
        let elapsed = self.started.elapsed();
        self.metrics.status = MigrationStatus::Completed;
        self.metrics.total_time = ms(elapsed);
        let seconds = elapsed.as_secs_f64().max(1e-6);
        self.metrics.mbps = self.metrics.transferred as f64 * 8.0 / 1e6 / seconds;
        self.metrics.pages_per_second = (self.metrics.duplicate + self.metrics.normal) as f64 / seconds;
        Ok(self.metrics)
    }

    /// Ends the migration with `error`: the source is told (a `Refuse` frame, unless the
    /// source is the one that refused), then the link is closed. Returns the error.
    pub fn refuse(mut self, error: MigrationError) -> MigrationError {
        if !matches!(error, MigrationError::Refused { .. }) {
            let _ = self.writer.write(FrameType::Refuse, &[error.to_string().as_bytes()]);
        }
        self.link.shutdown_write();
        // Read on until the source closes (or a short while), so the refusal is not
        // discarded by a reset of a connection with unread data.
        self.link.set_timeouts(Some(DRAIN_TIMEOUT), None);
        let until = Instant::now() + DRAIN_TIMEOUT;
        let mut sink = [0u8; 64 << 10];
        while Instant::now() < until {
            match std::io::Read::read(&mut self.link, &mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        error
    }

    /// Whether the source migrates by post-copy (the VM runs here before its memory came).
    pub fn is_postcopy(&self) -> bool {
        self.summary.as_ref().is_some_and(|s| s.is_postcopy())
    }

    fn is_local(&self) -> bool {
        self.metrics.uri.starts_with("fd-local:")
    }

    fn expect(&mut self, wanted: FrameType) -> Result<Frame, MigrationError> {
        expect(&mut self.reader, wanted)
    }
}

/// How long the destination waits for the source's second connection.
const PREEMPT_ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Takes the source's preempt channel (its second connection, post-copy) and checks its
/// greeting; the reader goes on numbering after it.
fn accept_preempt(listener: &Listener) -> Result<(Link, FrameReader<Link>), MigrationError> {
    let link = listener.accept_within(PREEMPT_ACCEPT_TIMEOUT)?;
    link.set_timeouts(Some(PREEMPT_ACCEPT_TIMEOUT), None);
    let mut reader = FrameReader::new(link.try_clone().map_err(|source| MigrationError::Accept { source })?);
    let hello = expect(&mut reader, FrameType::Hello)?;
    let _: handshake::Summary = handshake::decode("source", &hello.payload)?;
    // Idle while the guest faults on nothing: a silent source shows as an unanswered
    // request instead (`postcopy_destination::REQUEST_TIMEOUT`).
    link.set_timeouts(None, Some(IDLE_TIMEOUT));
    Ok((link, reader))
}

/// What the memory part of the stream brought.
pub struct Received {
    /// The `State` frame's payload (JSON).
    pub state: Vec<u8>,
    /// Pages received.
    pub counts: PageCounts,
    /// Pre-copy rounds ended.
    pub rounds: u64,
    /// When the last round ended (the stop-and-copy began after it).
    pub last_round_end: Instant,
}

/// Reads `Pages` and `RoundEnd` frames, applying each page range, up to the `State`
/// frame and the `Complete` after it. Every frame is checked before it is applied.
pub fn receive_memory(reader: &mut FrameReader<impl Read>, applier: &mut Applier) -> Result<Received, MigrationError> {
    let mut counts = PageCounts::default();
    let mut rounds = 0u64;
    let mut last_round_end = Instant::now();
    let state = loop {
        let frame = reader.read()?;
        match frame.kind {
            FrameType::Pages => counts.add(applier.apply(&frame.payload)?),
            FrameType::RoundEnd => {
                check_round_end(&frame, rounds)?;
                rounds += 1;
                last_round_end = Instant::now();
            }
            FrameType::State => break frame.payload,
            FrameType::Refuse => return Err(refused(&frame)),
            other => return Err(unexpected(other, "Pages, RoundEnd or State")),
        }
    };
    let complete = expect(reader, FrameType::Complete)?;
    if !complete.payload.is_empty() {
        return Err(MigrationError::Malformed { what: "the Complete frame".into(), reason: "it is not empty".into() });
    }
    Ok(Received { state, counts, rounds, last_round_end })
}

/// Checks that a `RoundEnd` frame ends round `due` (the rounds are numbered from 0).
pub(super) fn check_round_end(frame: &Frame, due: u64) -> Result<(), MigrationError> {
    let number = <[u8; 4]>::try_from(&frame.payload[..]).map(u32::from_le_bytes).map_err(|_| {
        MigrationError::Malformed { what: "a RoundEnd frame".into(), reason: "it is not 4 bytes".into() }
    })?;
    if u64::from(number) != due {
        return Err(MigrationError::Malformed {
            what: "a RoundEnd frame".into(),
            reason: format!("round {number} ended where round {due} was due"),
        });
    }
    Ok(())
}

/// The next frame, which must be `wanted` (a `Refuse` carries the source's reason).
pub fn expect(reader: &mut FrameReader<impl Read>, wanted: FrameType) -> Result<Frame, MigrationError> {
    let frame = reader.read()?;
    match frame.kind {
        kind if kind == wanted => Ok(frame),
        FrameType::Refuse => Err(refused(&frame)),
        other => Err(unexpected(other, &format!("{wanted:?}"))),
    }
}

pub(super) fn refused(frame: &Frame) -> MigrationError {
    MigrationError::Refused { peer: "source", reason: String::from_utf8_lossy(&frame.payload).into_owned() }
}

pub(super) fn unexpected(got: FrameType, wanted: &str) -> MigrationError {
    MigrationError::Unexpected { got: format!("{got:?}"), wanted: wanted.to_string() }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
