//! `faultline page-server --socket PATH --from DIR`: an external page-fault handler for
//! a restore by `--memory-restore uffd-socket:PATH` — and for Firecracker, whose handoff
//! is the same (see [`super::uffd_socket`]).
//!
//! It listens on PATH, takes one connection, receives the region table and the
//! userfaultfd in one message, checks the table against the snapshot (a bad table is an
//! error naming the region and field), then serves MISSING faults from the snapshot
//! chain: UFFDIO_COPY for pages an image carries, UFFDIO_ZEROPAGE for the rest (a copy of
//! zeros on hugetlb, which has no ZEROPAGE). EEXIST means the page is there already
//! (wake the waiter); EAGAIN means a REMOVE is pending (read events, then retry). Pages
//! a REMOVE event (a balloon discard) dropped are zero from then on, never the image's
//! old contents. `--prefetch background` installs every carried page while no fault
//! waits, one at a time between events: COPY never overwrites an installed page, and a
//! discarded range is known before it could be refilled (the kernel refuses fills with
//! EAGAIN until its REMOVE event has been read). The server ends when the VM goes away
//! (the connection closes).

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use rustix::event::{PollFd, PollFlags, Timespec};
use serde::Serialize;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::lazy::ChainSource;
use super::uffd_socket::{flat_bases, GuestRegionUffdMapping};
use super::{Chain, SnapshotError};
use crate::smmu::page_source::{PageData, PageSourceError};
use crate::smmu::uffd::{msg_buffer, Event, FillOutcome, Uffd, UffdError};
use crate::smmu::{PAGE_2M, PAGE_4K};

/// Options of `faultline page-server`.
#[derive(Debug, Args, Clone)]
pub struct PageServerArgs {
    /// Listen on this Unix socket (it must not exist).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The snapshot to serve (a full snapshot, or the last diff of a chain).
    #[arg(long = "from", value_name = "DIR")]
    pub from: PathBuf,
    /// `background`: install every page the snapshot carries while no fault waits.
    #[arg(long, value_enum, default_value_t = Prefetch::None)]
    pub prefetch: Prefetch,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What is installed without a fault asking for it (the page server, and restores by
/// `uffd-missing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prefetch {
    /// Only what faults ask for.
    #[default]
    None,
    /// Every carried page, in address order, while the guest runs.
    Background,
    /// The pages a restore recorded with `--record-working-set`, in first-touch order,
    /// from before the vCPUs start (restores by `uffd-missing` only).
    WorkingSet,
}

/// Errors of the page server.
#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    /// The snapshot cannot be read.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The socket cannot be made.
    #[error("page-server: {path}: {what}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// An option the page server does not serve.
    #[error("page-server: {0}")]
    Unsupported(&'static str),
    /// The socket path is taken.
    #[error("page-server: {0} exists; remove it or give another --socket")]
    SocketExists(PathBuf),
    /// The handoff message is not a region table with a userfaultfd.
    #[error("page-server: the handoff message {0}")]
    Message(String),
    /// The region table does not fit the snapshot.
    #[error("page-server: region {index} of the table ({region}) {reason}")]
    Table {
        /// The region's index in the table.
        index: usize,
        /// The region as received.
        region: String,
        /// What is wrong.
        reason: String,
    },
    /// A userfaultfd operation failed.
    #[error("page-server: {0}")]
    Uffd(#[from] UffdError),
    /// A page could not be read from the snapshot.
    #[error("page-server: guest page at host {host:#x} (zone {zone}, offset {offset:#x}): {source}; the VM cannot go on without it")]
    Page {
        /// The host address of the page.
        host: u64,
        /// Its zone.
        zone: usize,
        /// Its offset in the zone.
        offset: u64,
        /// The read error.
        source: PageSourceError,
    },
}

/// What the page server did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PageServerReport {
    /// Regions in the table received.
    pub regions: usize,
    /// Page faults read.
    pub faults: u64,
    /// Pages installed from the images (by faults).
    pub copied_pages: u64,
    /// Pages installed as zeros (by faults).
    pub zero_pages: u64,
    /// Pages installed by the background prefetch.
    pub prefetched_pages: u64,
    /// Fills that found the page installed already (EEXIST).
    pub eexist: u64,
    /// Fills refused while the address space changed (EAGAIN), retried.
    pub eagain: u64,
    /// REMOVE events read, and the bytes they dropped.
    pub remove_events: u64,
    /// Bytes REMOVE events dropped.
    pub removed_bytes: u64,
    /// Time from the handoff to the VM going away, ms.
    pub served_ms: f64,
}

impl PageServerReport {
    /// One line for people.
    pub fn summary(&self) -> String {
        format!(
            "page-server: {} region(s), {} faults ({} copied, {} zero pages), {} prefetched, {} EEXIST, {} EAGAIN, {} REMOVE events ({} KiB), {:.0} ms\n",
            self.regions,
            self.faults,
            self.copied_pages,
            self.zero_pages,
            self.prefetched_pages,
            self.eexist,
            self.eagain,
            self.remove_events,
            self.removed_bytes >> 10,
            self.served_ms
        )
    }
}

/// One region of the table, checked and placed in the snapshot.
#[derive(Debug, Clone, Copy)]
struct Served {
    host: u64,
    size: u64,
    page: u64,
    zone: usize,
    zone_offset: u64,
}

/// Checks a received region table against zones of `zone_sizes` bytes laid out as the
/// flat memory file; returns each region placed in its zone.
fn check_table(table: &[GuestRegionUffdMapping], zone_sizes: &[u64]) -> Result<Vec<Served>, PageServerError> {
    if table.is_empty() {
        return Err(PageServerError::Message("holds an empty region table".into()));
    }
    let bases = flat_bases(zone_sizes);
    let total: u64 = zone_sizes.iter().sum();
    let mut served = Vec::with_capacity(table.len());
    for (index, m) in table.iter().enumerate() {
        let bad = |reason: String| PageServerError::Table {
            index,
            region: serde_json::to_string(m).unwrap_or_default(),
            reason,
        };
        if m.page_size != PAGE_4K && m.page_size != PAGE_2M {
            return Err(bad(format!("has page_size {}; 4096 or 2097152 (hugetlb) are served", m.page_size)));
        }
        if m.size == 0 {
            return Err(bad("has size 0".into()));
        }
        for (field, value) in [("base_host_virt_addr", m.base_host_virt_addr), ("size", m.size), ("offset", m.offset)] {
            if value % m.page_size != 0 {
                return Err(bad(format!("has {field} {value:#x}, not a multiple of its page_size {:#x}", m.page_size)));
            }
        }
        let end = m.offset.checked_add(m.size).filter(|&end| end <= total).ok_or_else(|| {
            bad(format!("ends past the snapshot's memory, which is {total:#x} bytes (zones {zone_sizes:?} end to end)"))
        })?;
        let zone = bases.partition_point(|&base| base <= m.offset) - 1;
        if end > bases[zone] + zone_sizes[zone] {
            return Err(bad(format!("spans zones {zone} and {}; a region lies inside one zone", zone + 1)));
        }
        if m.base_host_virt_addr.checked_add(m.size).is_none() {
            return Err(bad("wraps around the address space".into()));
        }
        served.push(Served {
            host: m.base_host_virt_addr,
            size: m.size,
            page: m.page_size,
            zone,
            zone_offset: m.offset - bases[zone],
        });
    }
    let mut by_host = served.clone();
    by_host.sort_by_key(|s| s.host);
    for pair in by_host.windows(2) {
        if pair[0].host + pair[0].size > pair[1].host {
            let index = table.iter().position(|m| m.base_host_virt_addr == pair[1].host).unwrap_or(0);
            return Err(PageServerError::Table {
                index,
                region: serde_json::to_string(&table[index]).unwrap_or_default(),
                reason: format!("overlaps the region at host {:#x} in host addresses", pair[0].host),
            });
        }
    }
    Ok(served)
}

/// `faultline page-server`: serves, then prints the report (stderr, or JSON on stdout).
/// Exit codes: 0 the VM went away after being served; 2 an error (named on stderr).
pub fn main(args: &PageServerArgs) -> std::process::ExitCode {
    match run(args) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report).expect("the report serializes"));
            } else {
                eprint!("{}", report.summary());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("faultline: error: {err}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Runs `faultline page-server` to the end of the VM it serves.
pub fn run(args: &PageServerArgs) -> Result<PageServerReport, PageServerError> {
    if args.prefetch == Prefetch::WorkingSet {
        return Err(PageServerError::Unsupported(
            "--prefetch working-set is served by restore --memory-restore uffd-missing, not by the page server yet; use --prefetch background",
        ));
    }
    let chain = Chain::read(&args.from)?;
    let zone_sizes: Vec<u64> = chain.top().config.zones.iter().map(|z| z.size_bytes).collect();
    let source = ChainSource::open(&chain)?;
    let listener = listen(&args.socket)?;
    let accepted = listener.accept();
    let _ = std::fs::remove_file(&args.socket);
    let (stream, _) = accepted.map_err(|source| socket_error(&args.socket, "accept", source))?;
    let (table, uffd) = receive(&stream)?;
    let regions = check_table(&table, &zone_sizes)?;
    let mut server = Server::new(uffd, regions, source, args.prefetch);
    server.report.regions = table.len();
    let started = Instant::now();
    server.serve(&stream)?;
    server.report.served_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(server.report)
}

fn socket_error(path: &Path, what: &'static str, source: std::io::Error) -> PageServerError {
    PageServerError::Socket { path: path.to_path_buf(), what, source }
}

/// Binds and listens under a temporary name, then renames into place: whoever sees the
/// socket can connect.
fn listen(path: &Path) -> Result<UnixListener, PageServerError> {
    if path.symlink_metadata().is_ok() {
        return Err(PageServerError::SocketExists(path.to_path_buf()));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| socket_error(path, "bind", e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        socket_error(path, "rename into place", e)
    })?;
    Ok(listener)
}

/// Reads the one handoff message: the JSON table and the userfaultfd.
fn receive(stream: &UnixStream) -> Result<(Vec<GuestRegionUffdMapping>, Uffd), PageServerError> {
    let mut buf = vec![0u8; 1 << 16];
    let (len, file) = stream
        .recv_with_fd(&mut buf)
        .map_err(|e| PageServerError::Message(format!("could not be received: {}", std::io::Error::from(e))))?;
    let text = std::str::from_utf8(&buf[..len]).map_err(|_| PageServerError::Message("is not UTF-8".into()))?;
    let table: Vec<GuestRegionUffdMapping> = serde_json::from_str(text).map_err(|e| {
        PageServerError::Message(format!(
            "is not a JSON array of {{base_host_virt_addr, size, offset, page_size}}: {e} (received {text:?})"
        ))
    })?;
    let Some(file) = file else {
        return Err(PageServerError::Message(
            "came without a file descriptor (SCM_RIGHTS); send the userfaultfd with it".into(),
        ));
    };
    let fd = OwnedFd::from(file);
    let kind = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if kind != "anon_inode:[userfaultfd]" {
        return Err(PageServerError::Message(format!("carried a descriptor that is not a userfaultfd ({kind})")));
    }
    Ok((table, Uffd::from_received(fd)))
}

/// The serving loop's state.
struct Server {
    uffd: Uffd,
    regions: Vec<Served>,
    source: ChainSource,
    /// Host ranges a REMOVE dropped: zero from then on.
    removed: Vec<(u64, u64)>,
    /// Faults read but not yet resolved (an EAGAIN put them back).
    pending: VecDeque<u64>,
    /// Background prefetch: what is left, as host ranges with their region.
    prefetch: VecDeque<(usize, u64, u64)>,
    buf: Vec<u8>,
    report: PageServerReport,
}

impl Server {
    fn new(uffd: Uffd, regions: Vec<Served>, source: ChainSource, prefetch: Prefetch) -> Self {
        let mut todo = VecDeque::new();
        if prefetch == Prefetch::Background {
            for (index, r) in regions.iter().enumerate() {
                for (from, to) in source.carried_within(r.zone, r.zone_offset, r.size, r.page) {
                    todo.push_back((index, r.host + (from - r.zone_offset), r.host + (to - r.zone_offset)));
                }
            }
        }
        Server {
            uffd,
            regions,
            source,
            removed: Vec::new(),
            pending: VecDeque::new(),
            prefetch: todo,
            buf: vec![0u8; PAGE_2M as usize],
            report: PageServerReport::default(),
        }
    }

    fn serve(&mut self, stream: &UnixStream) -> Result<(), PageServerError> {
        let mut msgs = msg_buffer(64);
        let mut events = Vec::new();
        loop {
            // A fault put back by EAGAIN: look again soon; prefetch work: do not wait.
            let wait = if !self.pending.is_empty() {
                Timespec { tv_sec: 0, tv_nsec: 1_000_000 }
            } else if !self.prefetch.is_empty() {
                Timespec { tv_sec: 0, tv_nsec: 0 }
            } else {
                Timespec { tv_sec: 1, tv_nsec: 0 }
            };
            let mut fds = [
                PollFd::new(&self.uffd, PollFlags::IN),
                PollFd::from_borrowed_fd(stream.as_fd(), PollFlags::IN | PollFlags::RDHUP),
            ];
            match rustix::event::poll(&mut fds, Some(&wait)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(UffdError::Read(e.into()).into()),
            }
            if !fds[1].revents().is_empty() {
                // The VMM sends nothing after the handoff: readable means closed.
                return Ok(());
            }
            while self.uffd.read_events(&mut msgs, &mut events)? > 0 {
                for event in events.drain(..) {
                    match event {
                        Event::PageFault { address, .. } => {
                            self.report.faults += 1;
                            self.pending.push_back(address);
                        }
                        Event::Remove { start, end } => {
                            self.report.remove_events += 1;
                            self.report.removed_bytes += end - start;
                            self.removed.push((start, end));
                        }
                        Event::Unmap { .. } | Event::Remap { .. } | Event::Fork { .. } => {}
                    }
                }
            }
            while let Some(&address) = self.pending.front() {
                if !self.resolve(address, false)? {
                    break; // EAGAIN: read events first
                }
                self.pending.pop_front();
            }
            if self.pending.is_empty() {
                self.prefetch_one()?;
            }
        }
    }

    /// Installs the page holding `address`; false if the kernel said EAGAIN (retry after
    /// reading events). A prefetch leaves zero pages to faults.
    fn resolve(&mut self, address: u64, prefetch: bool) -> Result<bool, PageServerError> {
        let Some(region) = self.regions.iter().find(|r| address >= r.host && address - r.host < r.size).copied() else {
            return Err(PageServerError::Message(format!(
                "region table does not cover the faulting host address {address:#x}"
            )));
        };
        let start = address / region.page * region.page;
        let len = region.page as usize;
        let removed = self.removed.iter().any(|&(from, to)| start < to && start + region.page > from);
        let data = if removed {
            self.buf[..len].fill(0);
            PageData::Zero
        } else {
            let offset = region.zone_offset + (start - region.host);
            self.source
                .read_zone(region.zone, offset, &mut self.buf[..len])
                .map_err(|source| PageServerError::Page { host: start, zone: region.zone, offset, source })?
        };
        if prefetch && (data == PageData::Zero) {
            return Ok(true);
        }
        let outcome = if data == PageData::Zero && region.page == PAGE_4K {
            self.uffd.zeropage(start, region.page, false)?
        } else {
            self.uffd.copy(start, &self.buf[..len], false, false)?
        };
        match outcome {
            FillOutcome::Filled => {
                if prefetch {
                    self.report.prefetched_pages += 1;
                } else if data == PageData::Zero {
                    self.report.zero_pages += 1;
                } else {
                    self.report.copied_pages += 1;
                }
                Ok(true)
            }
            FillOutcome::AlreadyFilled => {
                self.report.eexist += 1;
                if !prefetch {
                    self.uffd.wake(start, region.page)?;
                }
                Ok(true)
            }
            FillOutcome::MmChanging { .. } => {
                self.report.eagain += 1;
                Ok(false)
            }
        }
    }

    /// Installs the next carried page not yet installed (the kernel's EEXIST says which).
    fn prefetch_one(&mut self) -> Result<(), PageServerError> {
        let Some(&(index, from, to)) = self.prefetch.front() else { return Ok(()) };
        let page = self.regions[index].page;
        if !self.resolve(from, true)? {
            return Ok(());
        }
        self.prefetch.pop_front();
        if from + page < to {
            self.prefetch.push_front((index, from + page, to));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(base: u64, size: u64, offset: u64, page_size: u64) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping { base_host_virt_addr: base, size, offset, page_size }
    }

    #[test]
    fn a_table_that_fits_the_snapshot_is_placed_in_its_zones() {
        let zones = [64 << 20, 32 << 20];
        let served = check_table(
            &[mapping(0x7f00_0000_0000, 64 << 20, 0, 4096), mapping(0x7e00_0000_0000, 32 << 20, 64 << 20, 4096)],
            &zones,
        )
        .unwrap();
        assert_eq!((served[1].zone, served[1].zone_offset), (1, 0));
    }

    #[test]
    fn bad_tables_name_the_region_and_what_is_wrong() {
        let zones = [64 << 20];
        let cases: [(&[GuestRegionUffdMapping], &str); 6] = [
            (&[], "empty region table"),
            (&[mapping(0x1000, 64 << 20, 0, 8192)], "page_size 8192"),
            (&[mapping(0x1000, 64 << 20, 0x800, 4096)], "offset 0x800"),
            (&[mapping(0x1000, 128 << 20, 0, 4096)], "ends past the snapshot's memory"),
            (&[mapping(0x1000, 0, 0, 4096)], "size 0"),
            (&[mapping(0x10_0000, 32 << 20, 0, 4096), mapping(0x20_0000, 4096, 32 << 20, 4096)], "overlaps"),
        ];
        for (table, expect) in cases {
            let err = check_table(table, &zones).unwrap_err().to_string();
            assert!(err.contains(expect), "{table:?}: {err}");
        }
        let err = check_table(&[mapping(0x1000, 64 << 20, 32 << 20, 4096)], &[64 << 20, 64 << 20]).unwrap_err();
        assert!(err.to_string().contains("spans zones 0 and 1"), "{err}");
    }
}
