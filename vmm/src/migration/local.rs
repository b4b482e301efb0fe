//! `fd-local:PATH`: migration to another faultline on the same host without copying
//! guest RAM. The source hands every zone's fd (memfd, hugetlb memfd, file) over the
//! Unix socket by `SCM_RIGHTS`; the destination maps the same fds (`MAP_SHARED`, offset
//! 0) and only the machine state travels in the stream. Private anonymous RAM cannot be
//! shared, so anon zones are refused up front.
//!
//! Both processes map the same pages, so at no time may both run the guest. The order:
//!
//! 1. source: `Hello`; destination: `Welcome`; source: `Config`, then one `sendmsg`
//!    of 4 bytes (the fd count, u32 LE) carrying the fds;
//! 2. destination: builds the machine on those fds (vCPUs paused), then a second
//!    `Welcome` ("ready");
//! 3. source: pauses, saves the state, `State`, `Complete`;
//! 4. destination: restores it, `Ack` ("restored"), and waits;
//! 5. source: `Ack` back ("released"): from this write on the source never resumes;
//!    the destination runs its vCPUs only once it has read it.
//!
//! Up to step 5 the destination has run no vCPU and has written no guest page (the
//! page-state restore only re-punches holes the source's discards already made), so a
//! destination that dies or refuses leaves the source free to resume on intact memory.
//! After the source's write of step 5 succeeded it ends as migrated even if the
//! destination then dies before reading it: the guest is then lost, never run twice.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};

use super::handshake::{self, Summary};
use super::metrics::MigrationStatus;
use super::source::Progress;
use super::stream::{Frame, FrameReader, FrameType, FrameWriter, StreamError};
use super::transport::{Link, MigrationUri};
use super::MigrationError;
use crate::config::{Backend, ZoneConfig};
use crate::machine::Machine;

/// How long the source waits for each answer of the destination.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many zones (fds in one message).
const MAX_ZONES: usize = 64;

/// Refuses zones whose memory cannot be handed over (private anonymous RAM).
pub fn check_shareable(zones: &[ZoneConfig]) -> Result<(), MigrationError> {
    if let Some((index, _)) = zones.iter().enumerate().find(|(_, z)| z.backend == Backend::Anon) {
        return Err(MigrationError::Unsupported(format!(
            "fd-local: hands the zones' memory over and zone {index} is anon (private memory cannot be shared); \
             start the VM with memfd, hugetlb or file zones (e.g. -m size=512M,backend=memfd), or migrate over unix:PATH, which copies the pages"
        )));
    }
    if zones.len() > MAX_ZONES {
        return Err(MigrationError::Unsupported(format!("fd-local: hands over at most {MAX_ZONES} zones")));
    }
    Ok(())
}

/// Sends the zones' fds, in zone order, in one message.
pub fn send_fds(socket: &UnixStream, fds: &[BorrowedFd<'_>]) -> Result<(), MigrationError> {
    let count = (fds.len() as u32).to_le_bytes();
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_ZONES))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(MigrationError::Unsupported(format!("fd-local: {} fds do not fit one message", fds.len())));
    }
    let sent = sendmsg(socket, &[IoSlice::new(&count)], &mut control, SendFlags::NOSIGNAL)
        .map_err(|e| io_error("handing the zones' fds over", e.into()))?;
    if sent != count.len() {
        return Err(io_error("handing the zones' fds over", std::io::ErrorKind::WriteZero.into()));
    }
    Ok(())
}

/// Receives the fds of `zones` (one message), checking that every zone has one.
pub fn receive_fds(socket: &UnixStream, zones: &[ZoneConfig]) -> Result<Vec<OwnedFd>, MigrationError> {
    check_shareable(zones)?;
    let mut count = [0u8; 4];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_ZONES))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(socket, &mut [IoSliceMut::new(&mut count)], &mut control, RecvFlags::CMSG_CLOEXEC)
        .map_err(|e| io_error("receiving the zones' fds", e.into()))?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let malformed = |reason: String| MigrationError::Malformed { what: "the fd-local handover".into(), reason };
    if got.bytes != count.len() || got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(malformed(format!(
            "{} bytes, control data truncated: {}",
            got.bytes,
            got.flags.contains(rustix::net::ReturnFlags::CTRUNC)
        )));
    }
    let declared = u32::from_le_bytes(count) as usize;
    if declared != fds.len() || fds.len() != zones.len() {
        return Err(malformed(format!(
            "{} fds arrived ({declared} announced) for {} zones; the source must send one per zone",
            fds.len(),
            zones.len()
        )));
    }
    Ok(fds)
}

/// The `fd-local:` source: hands the zones over, pauses, sends the state, and ends
/// here once the destination restored it (module docs for the order).
pub fn migrate(
    machine: &Machine,
    uri: &MigrationUri,
    _request: &crate::api::protocol::MigrateRequest,
    progress: &Progress,
) -> Result<(), MigrationError> {
    check_shareable(&machine.config.zones)?;
    let setup_started = Instant::now();
    let link = uri.connect()?;
    link.set_timeouts(Some(ANSWER_TIMEOUT), Some(ANSWER_TIMEOUT));
    let clone = |link: &Link| link.try_clone().map_err(|e| io_error("cloning the link", e));
    progress.set_link(clone(&link)?);
    let mut writer = FrameWriter::new(clone(&link)?);
    let mut reader = FrameReader::new(clone(&link)?);
    let step = |progress: &Progress| match progress.is_cancelled() {
        true => Err(MigrationError::Cancelled),
        false => match machine.control.exit() {
            Some(exit) => Err(MigrationError::VmEnded(exit.describe())),
            None => Ok(()),
        },
    };
    let answer =
        |reader: &mut FrameReader<Link>, wanted: FrameType, what: &'static str| answer(reader, wanted, what, progress);
    step(progress)?;
    writer.write(FrameType::Hello, &[&handshake::encode(&Summary::of(&machine.config))])?;
    let welcome = answer(&mut reader, FrameType::Welcome, "handshaking")?;
    let _: serde_json::Value = handshake::decode("destination", &welcome.payload)?;
    let config = serde_json::to_vec(&machine.config).expect("configs serialize");
    writer.write(FrameType::Config, &[&config])?;
    let fds: Vec<BorrowedFd<'_>> = machine
        .ram
        .zone_mappings()
        .iter()
        .map(|m| m.borrowed_fd().ok_or_else(|| MigrationError::Unsupported("a zone has no fd".into())))
        .collect::<Result<_, _>>()?;
    send_fds(link.unix().expect("fd-local: links are Unix sockets"), &fds)?;
    let page_size = machine.config.zones.iter().map(super::memory::unit_bytes).max().unwrap_or(4096);
    progress.update(|m| {
        m.setup_time = setup_started.elapsed().as_secs_f64() * 1e3;
        m.status = MigrationStatus::Active;
        m.page_size = page_size;
    });
    answer(&mut reader, FrameType::Welcome, "mapping the zones")?;
    step(progress)?;

    // Stop: from the pause to the destination's Ack nothing of guest RAM moves.
    let paused_at = Instant::now();
    progress.update(|m| m.status = MigrationStatus::Device);
    machine.pause()?;
    let quiet = machine.quiesce();
    let state = machine.save_state_quiesced(&quiet)?;
    let state = serde_json::to_vec(&state).expect("machine states serialize");
    writer.write(FrameType::State, &[&state])?;
    writer.write(FrameType::Complete, &[])?;
    answer(&mut reader, FrameType::Ack, "restoring the VM")?;
    step(progress)?;
    // The release: once this write went out, the destination may run the guest on the
    // shared memory, so the source must never resume (the caller ends the VM here).
    writer.write(FrameType::Ack, &[])?;
    let downtime = paused_at.elapsed().as_secs_f64() * 1e3;
    drop(quiet);
    let sent = writer.bytes_written();
    progress.update(|m| {
        m.downtime = downtime;
        m.downtime_bytes = sent;
        m.transferred = sent;
        m.rounds = 0;
        m.converged = true;
    });
    Ok(())
}

/// The destination's next frame, which must be `wanted` (a `Refuse` says why not).
fn answer(
    reader: &mut FrameReader<Link>,
    wanted: FrameType,
    what: &'static str,
    progress: &Progress,
) -> Result<Frame, MigrationError> {
    match reader.read() {
        Ok(frame) if frame.kind == wanted => Ok(frame),
        Ok(frame) if frame.kind == FrameType::Refuse => Err(MigrationError::Refused {
            peer: "destination",
            reason: String::from_utf8_lossy(&frame.payload).into_owned(),
        }),
        Ok(frame) => {
            Err(MigrationError::Unexpected { got: format!("{:?}", frame.kind), wanted: format!("{wanted:?}") })
        }
        Err(_) if progress.is_cancelled() => Err(MigrationError::Cancelled),
        Err(StreamError::Io { source, .. })
            if matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
        {
            Err(MigrationError::NoAnswer { peer: "destination", seconds: ANSWER_TIMEOUT.as_secs(), what })
        }
        Err(e) => Err(e.into()),
    }
}

fn io_error(what: &'static str, source: std::io::Error) -> MigrationError {
    MigrationError::Stream(StreamError::Io { what, source })
}
