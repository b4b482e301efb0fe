//! `--memory-restore uffd-socket:PATH`: guest RAM is registered for userfaultfd MISSING
//! faults on a userfaultfd that faultline does not serve. It is handed, with the region
//! table, to an external handler listening on the Unix socket PATH, exactly as
//! Firecracker hands it over (so handlers written for Firecracker work unchanged): one
//! `sendmsg` whose data is a JSON array of [`GuestRegionUffdMapping`] and whose
//! `SCM_RIGHTS` carries the userfaultfd.
//!
//! **Offsets.** Firecracker's memory file is one flat file; a snapshot here has one image
//! per zone. `offset` is the region's offset in the *flat memory file*: the zones' images
//! laid end to end in zone order ([`flat_bases`]). For a one-zone full snapshot that file
//! is `zone-0.img` itself, so a Firecracker handler can be pointed at it directly;
//! `faultline page-server` reads any snapshot (diff chains too) through the same mapping.
//!
//! **A handler that dies or never answers.** The [`Watchdog`] ends the VM with a clear
//! error instead of leaving its threads blocked forever: at once when the handler process
//! exits (a pidfd of the socket peer; where the peer's pid is not known, the socket's
//! hang-up), and when a thread of the VMM has waited on one guest page fault longer than
//! the stall timeout (threads sleeping in `handle_userfault`, from `/proc/self/task/*/wchan`)
//! or fault messages stayed unread that long. It then unregisters guest RAM so the waiting
//! threads return and the VM can be torn down.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::exit::VmExit;
use crate::memory::RamRegion;
use crate::smmu::uffd::{Features, RegisterMode, Uffd, UffdError};
use crate::vstate::VmControl;

/// One guest memory region as Firecracker describes it to its page-fault handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Host virtual address where the region is mapped (and registered).
    pub base_host_virt_addr: u64,
    /// The region's size in bytes.
    pub size: u64,
    /// Offset of the region's contents in the flat memory file ([`flat_bases`]).
    pub offset: u64,
    /// The region's page size in bytes (4096, or 2 MiB for hugetlb).
    pub page_size: u64,
}

/// Errors handing guest RAM to an external page-fault handler.
#[derive(Debug, thiserror::Error)]
pub enum UffdSocketError {
    /// The userfaultfd could not be opened or guest RAM registered.
    #[error("uffd-socket: {0}")]
    Uffd(#[from] UffdError),
    /// Nobody listens on the socket.
    #[error("uffd-socket:{path}: cannot connect to the page-fault handler: {source}; start it first (e.g. `faultline page-server --socket {path} --from DIR`)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The region table and userfaultfd could not be sent.
    #[error("uffd-socket:{path}: sending the region table and the userfaultfd failed: {source}")]
    Send {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A zone's backend cannot be handed out.
    #[error("uffd-socket: memory zone {zone} is backend={backend}; an external handler can page anon, memfd and hugetlb zones (a file zone's data would be mapped without a fault); restore it with -m size=...,backend=anon")]
    Backend {
        /// Zone index.
        zone: usize,
        /// Its backend.
        backend: &'static str,
    },
}

/// Refuses zones an external handler cannot page, by name (before guest RAM exists).
pub fn check_zones(zones: &[crate::config::ZoneConfig]) -> Result<(), UffdSocketError> {
    match zones.iter().position(|z| z.backend == crate::config::Backend::File) {
        Some(zone) => Err(UffdSocketError::Backend { zone, backend: zones[zone].backend.name() }),
        None => Ok(()),
    }
}

/// Where each zone starts in the flat memory file: the zones laid end to end.
pub fn flat_bases(zone_sizes: &[u64]) -> Vec<u64> {
    zone_sizes
        .iter()
        .scan(0u64, |at, size| {
            let base = *at;
            *at += size;
            Some(base)
        })
        .collect()
}

/// The region table of guest RAM `regions` (zones of `zone_sizes` bytes).
pub fn region_table(regions: &[RamRegion], zone_sizes: &[u64]) -> Vec<GuestRegionUffdMapping> {
    let bases = flat_bases(zone_sizes);
    regions
        .iter()
        .map(|r| GuestRegionUffdMapping {
            base_host_virt_addr: r.host_addr,
            size: r.size_bytes,
            offset: bases[r.zone] + r.fd_offset,
            page_size: r.page_bytes,
        })
        .collect()
}

/// Guest RAM handed to an external handler: the userfaultfd (our copy of it), the
/// connection, and how to tell the handler died.
pub struct ExternalPager {
    uffd: Uffd,
    stream: UnixStream,
    path: PathBuf,
    ranges: Vec<(u64, u64)>,
    peer: Option<(i32, OwnedFd)>,
    stall: Duration,
}

impl std::fmt::Debug for ExternalPager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalPager").field("path", &self.path).field("peer", &self.peer).finish()
    }
}

impl ExternalPager {
    /// Registers every region of `regions` for MISSING faults on a new userfaultfd,
    /// connects to `path` and sends the region table with the userfaultfd. Nothing may
    /// have touched guest RAM yet (a populated page would never fault).
    pub fn hand_off(
        path: &Path,
        regions: &[RamRegion],
        zone_sizes: &[u64],
        stall: Duration,
    ) -> Result<Self, UffdSocketError> {
        // As Firecracker: REMOVE events (balloon discards) are always on.
        let optional = Features::MISSING_HUGETLBFS.union(Features::MISSING_SHMEM);
        let uffd = Uffd::open(Features::EVENT_REMOVE, optional)?;
        let mode = RegisterMode { missing: true, ..RegisterMode::default() };
        let mut ranges = Vec::with_capacity(regions.len());
        for r in regions {
            uffd.register(r.host_addr, r.size_bytes, mode)?;
            ranges.push((r.host_addr, r.size_bytes));
        }
        let table = region_table(regions, zone_sizes);
        let json = serde_json::to_string(&table).expect("the region table serializes");
        let stream = UnixStream::connect(path)
            .map_err(|source| UffdSocketError::Connect { path: path.to_path_buf(), source })?;
        let peer = peer_pidfd(&stream);
        stream
            .send_with_fd(json.as_bytes(), uffd.as_fd().as_raw_fd())
            .map_err(|e| UffdSocketError::Send { path: path.to_path_buf(), source: io::Error::from(e) })?;
        tracing::debug!("handed {} region(s) to the page-fault handler on {}: {json}", table.len(), path.display());
        Ok(ExternalPager { uffd, stream, path: path.to_path_buf(), ranges, peer, stall })
    }

    /// Starts watching the handler; a dead or stalled handler ends the VM through
    /// `control`. Dropping the watchdog stops it and closes the connection (the
    /// handler's sign that the VM went away).
    pub fn watch(self, control: Arc<VmControl>) -> Watchdog {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fl-pager-watch".into())
            .spawn(move || {
                if let Some(reason) = self.watch_until(&flag) {
                    control.end(VmExit::FaultEngineFailed { reason });
                    // Release every thread blocked on a fault nobody will answer.
                    for &(start, len) in &self.ranges {
                        if let Err(e) = self.uffd.unregister(start, len) {
                            tracing::warn!("uffd-socket: unregistering guest RAM failed: {e}");
                        }
                    }
                }
                self
            })
            .ok();
        Watchdog { stop, thread }
    }

    /// Polls until `stop` is set (None) or the handler is found dead or stalled (why).
    fn watch_until(&self, stop: &AtomicBool) -> Option<String> {
        let tick = Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
        let mut unread_since: Option<Instant> = None;
        let mut waiting: std::collections::HashMap<u32, Instant> = std::collections::HashMap::new();
        let who = format!("the page-fault handler on {}", self.path.display());
        while !stop.load(Ordering::SeqCst) {
            let peer_fd = self.peer.as_ref().map_or(self.stream.as_fd(), |(_, fd)| fd.as_fd());
            let peer_events = if self.peer.is_some() { PollFlags::IN } else { PollFlags::RDHUP };
            let mut fds = [PollFd::from_borrowed_fd(peer_fd, peer_events), PollFd::new(&self.uffd, PollFlags::IN)];
            if let Err(e) = rustix::event::poll(&mut fds, Some(&tick)) {
                if e != rustix::io::Errno::INTR {
                    return Some(format!("watching {who} failed: {e}"));
                }
                continue;
            }
            let peer_gone = fds[0].revents().intersects(PollFlags::IN | PollFlags::HUP | PollFlags::RDHUP);
            if peer_gone {
                return Some(match &self.peer {
                    Some((pid, _)) => format!("{who} (pid {pid}) exited; the guest pages it had not served cannot be read; restore again with a live handler"),
                    None => format!("{who} closed its connection; the guest pages it had not served cannot be read; restore again with a live handler"),
                });
            }
            let now = Instant::now();
            if fds[1].revents().contains(PollFlags::IN) {
                let since = *unread_since.get_or_insert(now);
                if now - since > self.stall {
                    return Some(format!(
                        "{who} left page faults unread for {:.1} s (--page-server-timeout {}); it is stuck or not reading its userfaultfd",
                        (now - since).as_secs_f64(),
                        self.stall.as_secs_f64()
                    ));
                }
            } else {
                unread_since = None;
            }
            let blocked = threads_waiting_on_userfaults();
            waiting.retain(|tid, _| blocked.contains(tid));
            for tid in blocked {
                let since = *waiting.entry(tid).or_insert(now);
                if now - since > self.stall {
                    return Some(format!(
                        "thread {tid} ({}) waited {:.1} s on a guest page fault that {who} did not answer (--page-server-timeout {})",
                        thread_name(tid),
                        (now - since).as_secs_f64(),
                        self.stall.as_secs_f64()
                    ));
                }
            }
        }
        None
    }
}

/// Watches an [`ExternalPager`] while the VM runs.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<ExternalPager>>,
}

impl Watchdog {
    /// Stops watching and closes the connection to the handler.
    pub fn finish(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if let Ok(pager) = thread.join() {
                let _ = pager.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// A pidfd of the process on the other end of `stream` (None when its pid is not known
/// here, e.g. in another pid namespace).
fn peer_pidfd(stream: &UnixStream) -> Option<(i32, OwnedFd)> {
    let cred = rustix::net::sockopt::socket_peercred(stream).ok()?;
    let fd = rustix::process::pidfd_open(cred.pid, rustix::process::PidfdFlags::empty()).ok()?;
    Some((cred.pid.as_raw_nonzero().get(), fd))
}

/// Threads of this process sleeping in the kernel's userfaultfd wait.
fn threads_waiting_on_userfaults() -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    tasks
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let wchan = std::fs::read_to_string(entry.path().join("wchan")).ok()?;
            (wchan.trim() == "handle_userfault").then_some(tid)
        })
        .collect()
}

fn thread_name(tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).map_or_else(|_| "?".into(), |s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_lie_end_to_end_in_the_flat_file() {
        assert_eq!(flat_bases(&[64 << 20, 32 << 20, 8 << 20]), vec![0, 64 << 20, 96 << 20]);
        let region = |zone, fd_offset, size_bytes| RamRegion {
            zone,
            backend: crate::config::Backend::Anon,
            gpa: 0,
            size_bytes,
            host_addr: 0x7f00_0000_0000 + fd_offset,
            page_bytes: 4096,
            fd: None,
            fd_offset,
            path: None,
        };
        let table = region_table(
            &[region(0, 0, 1 << 30), region(1, 0, 1 << 20), region(1, 1 << 20, 1 << 20)],
            &[1 << 30, 2 << 20],
        );
        let offsets: Vec<u64> = table.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, vec![0, 1 << 30, (1 << 30) + (1 << 20)]);
        let json = serde_json::to_string(&table[..1]).unwrap();
        assert_eq!(json, r#"[{"base_host_virt_addr":139637976727552,"size":1073741824,"offset":0,"page_size":4096}]"#);
    }
}
