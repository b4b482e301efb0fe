//! Live snapshots (`snapshot create DIR --live`): the VM pauses only to save its vCPU
//! and device state and write-protect guest RAM, runs on while every page is copied out,
//! and the image is still the guest at the instant of the pause.
//!
//! How: a fresh userfaultfd, opened for this snapshot only, is registered in
//! write-protect mode over every zone before the pause (QEMU's background-snapshot does
//! the same). In the pause the VM's state is saved, each zone is write-protected whole
//! (`UFFDIO_WRITEPROTECT`; with `WP_UNPOPULATED` for anonymous zones, so never-touched
//! pages are protected too; shmem and hugetlb get the kernel's PTE markers) and KVM's
//! dirty log is reset. Then the vCPUs resume. A background pass lists the pages that
//! exist (SEEK_DATA / pagemap, as for a full snapshot; after the resume, to keep the
//! pause short: a page only comes into existence by a write, and every write faults
//! first) and copies them into the image in order, unprotecting each chunk once it is
//! copied; a write (by a vCPU through KVM, or by the VMM) to a page not yet copied blocks
//! in the kernel, and this module's fault thread copies that page first (a page that did
//! not exist reads as zeros: a hole), then clears its protection and wakes the writer.
//!
//! Why a separate userfaultfd: a zone paged by the kernel has none, and registering WP on
//! demand for the snapshot's duration costs nothing while no snapshot runs (no fault
//! engine, no state table). A range can be registered on one userfaultfd only, so zones
//! already paged by the fault engine (`uffd-missing`, `uffd-minor`, a lazy restore) are
//! refused with a message rather than merged into their engine; so are `file` zones,
//! which userfaultfd cannot write-protect.
//!
//! Devices stay quiesced (`Machine::quiesce`) until the copy is done, as in an ordinary
//! snapshot: the balloon cannot discard (`MADV_DONTNEED` drops a page whatever its
//! protection, which would lose a page not yet copied) or write guest RAM meanwhile; a
//! guest that touches the balloon's registers waits for the snapshot to finish. The
//! VMM's other writes to guest RAM go through the host page tables and fault like the
//! guest's.
//!
//! The result is an ordinary full snapshot (same images, same state file): `faultline
//! restore --from DIR` restores it, and KVM's dirty log is reset in the pause, so a diff
//! on top of it carries exactly what the guest wrote after the pause.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::config::{Backend, PagingMode};
use crate::machine::{Machine, RunState};
use crate::smmu::uffd::{msg_buffer, Event, Features, RegisterMode, Uffd, UffdError};

use super::chunks::ChunkSums;
use super::format::{self, SnapshotKind, ZoneImage};
use super::image::{self, ZoneView};
use super::{PauseBreakdown, SnapshotError, SnapshotHistory, SnapshotSummary};

/// Pages copied per step of the background pass (then unprotected in one call).
const CHUNK_BYTES: u64 = 2 << 20;
/// How long the fault thread waits for a fault before it looks whether to stop.
const POLL_MS: i32 = 20;

/// Errors of a live snapshot.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// A zone cannot be write-protected for a live snapshot.
    #[error("zone {zone} ({what}) cannot be snapshotted live: {reason}; take an ordinary snapshot (without --live)")]
    Unsupported {
        /// The zone.
        zone: usize,
        /// Its backend and paging.
        what: String,
        /// Why.
        reason: &'static str,
    },
    /// userfaultfd refused something.
    #[error("live snapshot: {0}; take an ordinary snapshot (without --live)")]
    Uffd(#[from] UffdError),
    /// Writing a page into the image failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The image file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Listing the pages that exist failed.
    #[error(transparent)]
    Image(Box<image::ImageError>),
    /// The fault thread failed (the message says how).
    #[error("live snapshot: the write-fault thread failed: {0}")]
    FaultThread(String),
}

/// What a page of a zone is in during the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    /// Not copied yet (still write-protected, so as it was at the pause).
    Pending,
    /// Zero at the pause (absent then, or all zeros): a hole in the image.
    Hole,
    /// Copied: its checksum.
    Data(u32),
}

/// One zone being copied.
struct ZoneCopy {
    view: ZoneView,
    file: File,
    path: PathBuf,
    pages: Mutex<Vec<Page>>,
}

impl ZoneCopy {
    /// Copies the pending pages among `first..end` (page indices) into the image; they
    /// are write-protected, so they still hold what they held at the pause. With
    /// `existing` (sorted page indices that exist in the host now), a pending page not in
    /// it is marked a hole without being read: it did not exist at the pause either (no
    /// page comes into existence without a write, and a write to a pending page waits
    /// for [`ZoneCopy::copy`] in the fault thread; discards wait for the quiesced
    /// devices), so it was zero then.
    fn copy(&self, first: u64, end: u64, existing: Option<&[u64]>) -> Result<(), LiveError> {
        let page_bytes = self.view.page_bytes as usize;
        let mut taken: Vec<(u64, Vec<u8>)> = Vec::new();
        {
            let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
            for index in first..end {
                if pages[index as usize] != Page::Pending {
                    continue;
                }
                if existing.is_some_and(|e| e.binary_search(&index).is_err()) {
                    pages[index as usize] = Page::Hole;
                    continue;
                }
                // SAFETY: the page lies inside the zone's live mapping (index < pages());
                // it is write-protected and not yet unprotected (Pending, under the lock),
                // so nothing writes it while this shared view lives. Reading it needs no
                // fault handler (the zone is paged by the kernel, and WP never stops
                // reads); a page that does not exist reads as zeros.
                let bytes = unsafe {
                    std::slice::from_raw_parts(
                        self.view.host_addr.add((index * self.view.page_bytes) as usize),
                        page_bytes,
                    )
                };
                if image::is_zero(bytes) {
                    pages[index as usize] = Page::Hole;
                } else {
                    pages[index as usize] = Page::Data(crc32fast::hash(bytes));
                    // Contiguous pages go to the file in one write.
                    match taken.last_mut() {
                        Some((start, run)) if *start + (run.len() / page_bytes) as u64 == index => {
                            run.extend_from_slice(bytes)
                        }
                        _ => taken.push((index, bytes.to_vec())),
                    }
                }
            }
        }
        for (index, bytes) in taken {
            self.file.write_all_at(&bytes, index * self.view.page_bytes).map_err(|source| LiveError::Io {
                path: self.path.clone(),
                what: "write a page",
                source,
            })?;
        }
        Ok(())
    }

    /// The image's carried ranges and checksum, in offset order (once every page is done).
    fn finish(&self) -> ZoneImage {
        let pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut crc = crc32fast::Hasher::new();
        let mut chunks = ChunkSums::new(self.view.size_bytes, self.view.page_bytes);
        for (index, page) in pages.iter().enumerate() {
            let Page::Data(sum) = *page else { continue };
            let offset = index as u64 * self.view.page_bytes;
            crc.combine(&crc32fast::Hasher::new_with_initial_len(sum, self.view.page_bytes));
            chunks.add_crc(offset, sum, self.view.page_bytes);
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 == offset => last.1 += self.view.page_bytes,
                _ => ranges.push((offset, self.view.page_bytes)),
            }
        }
        let (chunk_bytes, chunk_crc32) = chunks.finish();
        ZoneImage {
            zone: self.view.zone,
            file: format::image_file_name(self.view.zone),
            size_bytes: self.view.size_bytes,
            page_bytes: self.view.page_bytes,
            ranges,
            crc32: crc.finalize(),
            chunk_bytes,
            chunk_crc32,
        }
    }

    fn contains(&self, address: u64) -> bool {
        let start = self.view.host_addr as u64;
        address >= start && address - start < self.view.size_bytes
    }
}

/// Checks that every zone can be write-protected here; returns the features to ask for.
fn features_for(machine: &Machine) -> Result<Features, LiveError> {
    let mut features = Features::WP;
    for (zone, config) in machine.config.zones.iter().enumerate() {
        let what = format!("{} backend, {} paging", config.backend.name(), config.paging.name());
        let refuse = |reason| Err(LiveError::Unsupported { zone, what: what.clone(), reason });
        if config.paging != PagingMode::Kernel && config.paging != PagingMode::Prefault {
            return refuse("it is paged by the fault engine's userfaultfd, and a range takes only one");
        }
        features = match config.backend {
            Backend::Anon => features.union(Features::WP_UNPOPULATED),
            Backend::Memfd | Backend::Hugetlb => features.union(Features::WP_HUGETLBFS_SHMEM),
            Backend::File => return refuse("userfaultfd cannot write-protect a shared file mapping"),
        };
    }
    Ok(features)
}

/// Takes a live snapshot of `machine` into `dir` (which must not exist, or be empty): a
/// full snapshot of the guest at the pause, written while the VM runs on. A VM that was
/// paused stays paused. On any error the directory is removed and guest RAM is left
/// unprotected.
pub fn create(machine: &Machine, history: &SnapshotHistory, dir: &Path) -> Result<SnapshotSummary, SnapshotError> {
    let started = Instant::now();
    let features = features_for(machine)?;
    let uffd = Uffd::open(features, Features(0)).map_err(LiveError::from)?;
    let views = super::zone_views(&machine.ram, &machine.config.zones);
    let registered = views.iter().try_for_each(|view| {
        let mode = RegisterMode { wp: true, ..Default::default() };
        uffd.register(view.host_addr as u64, view.size_bytes, mode).map(|_| ()).map_err(LiveError::from)
    });
    // The directory is ours to remove on failure only once prepare_dir made it ours.
    let mut prepared = false;
    let result = registered.map_err(SnapshotError::from).and_then(|()| super::prepare_dir(dir)).and_then(|()| {
        prepared = true;
        copy_live(machine, &uffd, &views, dir, started)
    });
    // Every zone, registered or not (unregistering a range never registered is a no-op).
    for view in &views {
        // Unregistering clears what protection is left and wakes any writer still waiting.
        let _ = uffd.write_protect(view.host_addr as u64, view.size_bytes, false, false);
        let _ = uffd.unregister(view.host_addr as u64, view.size_bytes);
    }
    match result {
        Ok(summary) => {
            *history.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.to_path_buf());
            Ok(summary)
        }
        Err(e) => {
            if prepared {
                let _ = std::fs::remove_dir_all(dir);
            }
            Err(e)
        }
    }
}

/// The pause, the resume and the copy.
fn copy_live(
    machine: &Machine,
    uffd: &Uffd,
    views: &[ZoneView],
    dir: &Path,
    started: Instant,
) -> Result<SnapshotSummary, SnapshotError> {
    let zones = views
        .iter()
        .map(|view| {
            let path = dir.join(format::image_file_name(view.zone));
            let io = |what| {
                let path = path.clone();
                move |source| LiveError::Io { path, what, source }
            };
            let file = File::options().write(true).create_new(true).open(&path).map_err(io("create"))?;
            file.set_len(view.size_bytes).map_err(io("set its length"))?;
            Ok(ZoneCopy { view: *view, file, path, pages: Mutex::new(vec![Page::Pending; view.pages() as usize]) })
        })
        .collect::<Result<Vec<_>, LiveError>>()?;

    // As after a full snapshot, the dirty log and the VMM's own write set start clean,
    // here just before the pause rather than in it (a pass over every slot's bitmap):
    // a later diff carries what was written after the pause, plus the few pages written
    // between this reset and the pause, again (harmless: a diff may carry a page twice).
    let mut breakdown = PauseBreakdown::default();
    let reset = Instant::now();
    {
        let mut vm = machine.vm();
        vm.enable_dirty_log()?;
        for slot in 0..machine.ram.regions().len() {
            vm.take_dirty_pages(slot)?;
        }
        machine.paging.discarder().vmm_writes().take();
    }
    breakdown.dirty_log_reset_before_ns = reset.elapsed().as_nanos() as u64;

    let was_running = machine.run_state() == RunState::Running;
    let pause_started = Instant::now();
    let stopping = machine.pause()?;
    let quiet = machine.quiesce();
    breakdown.stop_ns = pause_started.elapsed().as_nanos() as u64;
    let in_pause = (|| -> Result<_, SnapshotError> {
        let at = Instant::now();
        let state = machine.save_state_quiesced(&quiet)?;
        breakdown.save_state_ns = at.elapsed().as_nanos() as u64;
        // Every page is protected and pending; which exist is asked after the resume.
        let at = Instant::now();
        for zone in &zones {
            uffd.write_protect(zone.view.host_addr as u64, zone.view.size_bytes, true, false)
                .map_err(LiveError::from)?;
        }
        breakdown.write_protect_ns = at.elapsed().as_nanos() as u64;
        Ok(state)
    })();
    let at = Instant::now();
    let resumed = if was_running { machine.resume().map_err(SnapshotError::from) } else { Ok(()) };
    breakdown.resume_ns = at.elapsed().as_nanos() as u64;
    let pause = pause_started.elapsed();
    let state = in_pause?;
    resumed?;

    let stop = AtomicBool::new(false);
    let (copied, faults) = std::thread::scope(|scope| {
        let fault_thread = scope.spawn(|| serve_write_faults(uffd, &zones, &stop));
        let copied = background_copy(uffd, &zones, &stop);
        stop.store(true, Ordering::Relaxed);
        let faults = fault_thread.join().unwrap_or_else(|_| Err(LiveError::FaultThread("it panicked".into())));
        (copied, faults)
    });
    copied?;
    let write_faults = faults?;
    drop(quiet);

    let images: Vec<ZoneImage> = zones.iter().map(ZoneCopy::finish).collect();
    let state_bytes = super::write_state_file(machine, dir, &images, state, None)?;
    tracing::info!(write_faults, "live snapshot {} written", dir.display());
    Ok(SnapshotSummary {
        dir: dir.to_path_buf(),
        kind: SnapshotKind::Full,
        memory_bytes: images.iter().map(ZoneImage::carried_bytes).sum(),
        state_bytes,
        pause_ns: stopping.as_nanos() as u64,
        guest_pause_ns: Some(pause.as_nanos() as u64),
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        write_faults: Some(write_faults),
        pause_breakdown: Some(breakdown),
    })
}

/// Copies every pending page, chunk by chunk, unprotecting each chunk once it is in the
/// image. Stops early (with the error) if the fault thread failed.
fn background_copy(uffd: &Uffd, zones: &[ZoneCopy], stop: &AtomicBool) -> Result<(), LiveError> {
    for zone in zones {
        let per_chunk = (CHUNK_BYTES / zone.view.page_bytes).max(1);
        let existing = image::existing_pages(&zone.view).map_err(|e| LiveError::Image(Box::new(e)))?;
        let mut first = 0;
        while first < zone.view.pages() {
            if stop.load(Ordering::Relaxed) {
                return Ok(()); // the fault thread failed; its error is the one to report
            }
            let end = (first + per_chunk).min(zone.view.pages());
            zone.copy(first, end, Some(&existing))?;
            let start = zone.view.host_addr as u64 + first * zone.view.page_bytes;
            uffd.write_protect(start, (end - first) * zone.view.page_bytes, false, false)?;
            first = end;
        }
    }
    Ok(())
}

/// Answers write faults until `stop`: copies the faulting page if it is still pending,
/// then unprotects it and wakes the writer. Returns how many faults it served; on an
/// error it sets `stop` itself.
fn serve_write_faults(uffd: &Uffd, zones: &[ZoneCopy], stop: &AtomicBool) -> Result<u64, LiveError> {
    let result = fault_loop(uffd, zones, stop);
    if result.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    result
}

fn fault_loop(uffd: &Uffd, zones: &[ZoneCopy], stop: &AtomicBool) -> Result<u64, LiveError> {
    let mut buffer = msg_buffer(64);
    let mut events = Vec::new();
    let mut served = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut poll = libc::pollfd { fd: uffd.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: `poll` is one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, POLL_MS) };
        if ready <= 0 {
            continue; // timeout or EINTR: look at `stop` again
        }
        uffd.read_events(&mut buffer, &mut events)?;
        for event in &events {
            let Event::PageFault { address, .. } = *event else {
                continue; // no other events were asked for
            };
            let zone = zones
                .iter()
                .find(|zone| zone.contains(address))
                .ok_or_else(|| LiveError::FaultThread(format!("a fault at {address:#x} outside guest RAM")))?;
            let index = (address - zone.view.host_addr as u64) / zone.view.page_bytes;
            zone.copy(index, index + 1, None)?;
            let start = zone.view.host_addr as u64 + index * zone.view.page_bytes;
            uffd.write_protect(start, zone.view.page_bytes, false, false)?;
            served += 1;
        }
    }
    Ok(served)
}
