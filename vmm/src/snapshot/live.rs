//! Live snapshots (`snapshot create DIR --live`): the VM pauses only to save its vCPU
//! and device state and write-protect guest RAM, runs on while every page is copied out,
//! and the image is still the guest at the instant of the pause.
//!
//! How: a fresh userfaultfd, opened for this snapshot only, is registered in
//! write-protect mode over every zone (QEMU's background-snapshot does the same). KVM's
//! dirty log and the VMM's write set are reset, then, while the guest runs, each zone is
//! write-protected (`UFFDIO_WRITEPROTECT`, 16 MiB at a time; with `WP_UNPOPULATED` for
//! anonymous zones, so never-touched pages are protected too; shmem and hugetlb get the
//! kernel's PTE markers). A write fault in this window only unprotects its page and
//! records it; rounds protect again what was written since (the records, the dirty log,
//! the VMM's set) until little is left. In the pause the VM's state is saved and the
//! pages written since the last round are protected again; then the vCPUs resume. Every
//! page is now protected and as it was at the pause. A background pass lists the pages
//! that exist (SEEK_DATA / pagemap, as for a full snapshot; after the resume, to keep the
//! pause short: a page only comes into existence by a write, and every write faults
//! first) and copies them into the image in order, unprotecting each chunk once it is
//! copied; a write (by a vCPU through KVM, or by the VMM) to a page not yet copied blocks
//! in the kernel, and this module's fault thread copies that page first (a page that did
//! not exist reads as zeros: a hole), then clears its protection and wakes the writer.
//! docs/snapshots.md says which mechanism sees which writes.
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
//! restore --from DIR` restores it, and KVM's dirty log and the VMM's set are taken in
//! the pause, so a diff on top of it carries exactly what was written after the pause.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
/// The write-protect before the pause goes this much at a time.
const PROTECT_SLICE_BYTES: u64 = 16 << 20;
/// Threads of the background pass, at most (fewer on a host with fewer cores).
const COPY_THREADS: usize = 2;
/// Pages a write fault copies at once in an anonymous zone (see [`ZoneCopy::fault_block`]).
const FAULT_BLOCK_PAGES: u64 = 64;
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
    /// Pages per chunk (2 MiB, or one huge page).
    per_chunk: u64,
    /// Per chunk, its pages' states; the lock is held while a chunk's pages are read
    /// and written into the image, so a write fault on one of them waits until its
    /// bytes are in the file before it unprotects the page.
    chunks: Vec<Mutex<Vec<Page>>>,
}

impl ZoneCopy {
    fn new(view: ZoneView, file: File, path: PathBuf) -> ZoneCopy {
        let per_chunk = (CHUNK_BYTES / view.page_bytes).max(1);
        let chunks = (0..view.pages().div_ceil(per_chunk))
            .map(|chunk| {
                let pages = per_chunk.min(view.pages() - chunk * per_chunk);
                Mutex::new(vec![Page::Pending; pages as usize])
            })
            .collect();
        ZoneCopy { view, file, path, per_chunk, chunks }
    }

    /// The chunk count.
    fn chunk_count(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Copies the pending pages among `first..end` (page indices, inside one chunk) into
    /// the image; they are write-protected, so they still hold what they held at the
    /// pause. With `existing` (sorted page indices that exist in the host now), a pending
    /// page not in it is marked a hole without being read: it did not exist at the pause
    /// either (no page comes into existence without a write, and a write to a pending
    /// page waits for [`ZoneCopy::copy`] in the fault thread; discards wait for the
    /// quiesced devices), so it was zero then.
    fn copy(&self, first: u64, end: u64, existing: Option<&[u64]>) -> Result<(), LiveError> {
        let chunk = first / self.per_chunk;
        debug_assert!(end > first && (end - 1) / self.per_chunk == chunk, "a copy stays inside one chunk");
        let base = chunk * self.per_chunk;
        let page_bytes = self.view.page_bytes;
        let mut pages = self.chunks[chunk as usize].lock().unwrap_or_else(|e| e.into_inner());
        // The run of contiguous non-zero pages waiting to be written: (first page, pages).
        let mut run: Option<(u64, u64)> = None;
        for index in first..end {
            let slot = &mut pages[(index - base) as usize];
            if *slot != Page::Pending {
                continue;
            }
            if existing.is_some_and(|e| e.binary_search(&index).is_err()) {
                *slot = Page::Hole;
                continue;
            }
            // SAFETY: the page lies inside the zone's live mapping (index < pages()); it
            // is write-protected and not yet unprotected (Pending, under its chunk's
            // lock, which whoever unprotects it takes first), so nothing writes it while
            // this shared view lives. Reading it needs no fault handler (the zone is
            // paged by the kernel, and WP never stops reads); a page that does not exist
            // reads as zeros.
            let bytes = unsafe {
                std::slice::from_raw_parts(self.view.host_addr.add((index * page_bytes) as usize), page_bytes as usize)
            };
            if image::is_zero(bytes) {
                *slot = Page::Hole;
                continue;
            }
            *slot = Page::Data(crc32fast::hash(bytes));
            run = match run {
                Some((start, len)) if start + len == index => Some((start, len + 1)),
                pending => {
                    if let Some((start, len)) = pending {
                        self.write_run(start, len)?;
                    }
                    Some((index, 1))
                }
            };
        }
        if let Some((start, len)) = run {
            self.write_run(start, len)?;
        }
        Ok(())
    }

    /// Writes `len` pages from `first` into the image straight from guest RAM; the
    /// caller holds their chunk's lock and they are still write-protected.
    fn write_run(&self, first: u64, len: u64) -> Result<(), LiveError> {
        let offset = first * self.view.page_bytes;
        // SAFETY: as in `copy`: inside the live mapping, write-protected, and nobody can
        // unprotect them while the caller holds their chunk's lock.
        let bytes = unsafe {
            std::slice::from_raw_parts(self.view.host_addr.add(offset as usize), (len * self.view.page_bytes) as usize)
        };
        self.file.write_all_at(bytes, offset).map_err(|source| LiveError::Io {
            path: self.path.clone(),
            what: "write a page",
            source,
        })
    }

    /// The image's carried ranges and checksum, in offset order (once every page is done).
    fn finish(&self) -> ZoneImage {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut crc = crc32fast::Hasher::new();
        let mut sums = ChunkSums::new(self.view.size_bytes, self.view.page_bytes);
        for (chunk, pages) in self.chunks.iter().enumerate() {
            let pages = pages.lock().unwrap_or_else(|e| e.into_inner());
            for (at, page) in pages.iter().enumerate() {
                let Page::Data(sum) = *page else { continue };
                let index = chunk as u64 * self.per_chunk + at as u64;
                let offset = index * self.view.page_bytes;
                crc.combine(&crc32fast::Hasher::new_with_initial_len(sum, self.view.page_bytes));
                sums.add_crc(offset, sum, self.view.page_bytes);
                match ranges.last_mut() {
                    Some(last) if last.0 + last.1 == offset => last.1 += self.view.page_bytes,
                    _ => ranges.push((offset, self.view.page_bytes)),
                }
            }
        }
        let (chunk_bytes, chunk_crc32) = sums.finish();
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

    /// The pages a write fault on `index` copies: [`FAULT_BLOCK_PAGES`] around it in an
    /// anonymous zone of 4 KiB pages, the page alone elsewhere (reading a page a memfd or
    /// hugetlb zone does not hold would allocate it).
    fn fault_block(&self, index: u64) -> (u64, u64) {
        if self.view.backend != Backend::Anon || self.view.page_bytes != 4096 {
            return (index, index + 1);
        }
        let first = index - index % FAULT_BLOCK_PAGES;
        (first, (first + FAULT_BLOCK_PAGES).min(self.view.pages()))
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

/// Rounds of protecting again, before the pause, at most.
const MAX_ROUNDS: u64 = 8;
/// A round that had at most this many pages to protect again is the last before the
/// pause (what was written during it is protected again in the pause).
const FEW_PAGES: usize = 64;

/// The write faults' bookkeeping before the pause: while it holds a set, a write fault
/// only unprotects its page and records it (per zone, page indices), to be protected
/// again by the next round or in the pause; once the pause took it (`None`), a write
/// fault copies its page first.
struct Window {
    marks: Mutex<Option<Vec<Vec<u64>>>>,
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
            Ok(ZoneCopy::new(*view, file, path))
        })
        .collect::<Result<Vec<_>, LiveError>>()?;
    let window = Window { marks: Mutex::new(Some(vec![Vec::new(); zones.len()])) };
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let fault_thread = scope.spawn(|| serve_write_faults(uffd, &zones, &window, &stop));
        let result = protect_pause_copy(machine, uffd, &zones, &window, &stop);
        stop.store(true, Ordering::Relaxed);
        let faults = fault_thread.join().unwrap_or_else(|_| Err(LiveError::FaultThread("it panicked".into())));
        // The fault thread's error first: it is why the rest stopped early.
        let write_faults = faults?;
        let (state, stopping, pause, breakdown, quiet) = result?;
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
    })
}

type Protected<'m> = (
    crate::machine::MachineState,
    std::time::Duration,
    std::time::Duration,
    PauseBreakdown,
    crate::machine::Quiesced<'m>,
);

/// Write-protects guest RAM while the guest runs, pauses it to save its state and
/// protect again the pages written since, resumes it and copies every page out.
fn protect_pause_copy<'m>(
    machine: &'m Machine,
    uffd: &Uffd,
    zones: &[ZoneCopy],
    window: &Window,
    stop: &AtomicBool,
) -> Result<Protected<'m>, SnapshotError> {
    let mut breakdown = PauseBreakdown::default();
    // KVM's dirty log and the VMM's write set start clean before the first protect:
    // from here on, every page the guest or the VMM changes is in one of them (or, once
    // protected, faults), until the pause takes them.
    let at = Instant::now();
    {
        let mut vm = machine.vm();
        vm.enable_dirty_log()?;
        for slot in 0..machine.ram.regions().len() {
            vm.take_dirty_pages(slot)?;
        }
        machine.paging.discarder().vmm_writes().take();
    }
    breakdown.dirty_log_reset_before_ns = at.elapsed().as_nanos() as u64;

    // The long part, while the guest runs: every zone whole.
    let at = Instant::now();
    // In slices, yielding between them: one call over a whole GiB keeps KVM's
    // invalidations going back to back for its whole length, and the guest's own page
    // faults (which KVM retries while an invalidation is in progress) made no progress
    // until it ended.
    for zone in zones {
        let slice = PROTECT_SLICE_BYTES.max(zone.view.page_bytes);
        let mut offset = 0;
        while offset < zone.view.size_bytes {
            check_stop(stop)?;
            let len = slice.min(zone.view.size_bytes - offset);
            uffd.write_protect(zone.view.host_addr as u64 + offset, len, true, false).map_err(LiveError::from)?;
            offset += len;
            std::thread::yield_now();
        }
    }
    breakdown.pre_protect_ns = at.elapsed().as_nanos() as u64;
    // Rounds: what was written meanwhile is protected again, until few pages are left.
    while breakdown.rounds < MAX_ROUNDS {
        check_stop(stop)?;
        let set = take_written(machine, zones, window, false)?;
        let pages = protect_again(uffd, zones, &set)?;
        breakdown.rounds += 1;
        breakdown.round_pages += pages as u64;
        if pages <= FEW_PAGES {
            break;
        }
    }
    check_stop(stop)?;

    let was_running = machine.run_state() == RunState::Running;
    let pause_started = Instant::now();
    let stopping = machine.pause()?;
    let quiet = machine.quiesce();
    breakdown.stop_ns = pause_started.elapsed().as_nanos() as u64;
    let in_pause = (|| -> Result<_, SnapshotError> {
        let at = Instant::now();
        let state = machine.save_state_quiesced(&quiet)?;
        breakdown.save_state_ns = at.elapsed().as_nanos() as u64;
        let at = Instant::now();
        let set = take_written(machine, zones, window, true)?;
        breakdown.harvest_ns = at.elapsed().as_nanos() as u64;
        let at = Instant::now();
        breakdown.pause_pages = protect_again(uffd, zones, &set)? as u64;
        breakdown.write_protect_ns = at.elapsed().as_nanos() as u64;
        Ok(state)
    })();
    let at = Instant::now();
    let resumed = if was_running { machine.resume().map_err(SnapshotError::from) } else { Ok(()) };
    breakdown.resume_ns = at.elapsed().as_nanos() as u64;
    let pause = pause_started.elapsed();
    let state = in_pause?;
    resumed?;
    background_copy(uffd, zones, stop)?;
    check_stop(stop)?;
    Ok((state, stopping, pause, breakdown, quiet))
}

/// An error if the fault thread stopped (its own error is the one reported).
fn check_stop(stop: &AtomicBool) -> Result<(), LiveError> {
    if stop.load(Ordering::Relaxed) {
        return Err(LiveError::FaultThread("it stopped early".into()));
    }
    Ok(())
}

/// The pages (per zone, sorted page indices) written since the last call: the write
/// faults' marks, KVM's dirty log (the guest's writes) and the VMM's write set (its
/// writes and discards), each taken and reset. With `last`, the write faults copy from
/// now on instead of marking.
fn take_written(
    machine: &Machine,
    zones: &[ZoneCopy],
    window: &Window,
    last: bool,
) -> Result<Vec<Vec<u64>>, SnapshotError> {
    let mut set = {
        let mut marks = window.marks.lock().unwrap_or_else(|e| e.into_inner());
        let taken = if last {
            marks.take()
        } else {
            marks.as_mut().map(|m| std::mem::replace(m, vec![Vec::new(); zones.len()]))
        };
        taken.unwrap_or_else(|| vec![Vec::new(); zones.len()])
    };
    let mut add = |gpa: u64| {
        if let Some((zone, offset)) = super::zone_offset(machine, gpa) {
            if let Some(copy) = zones.get(zone) {
                set[zone].push(offset / copy.view.page_bytes);
            }
        }
    };
    {
        let vm = machine.vm();
        for (slot, region) in machine.ram.regions().iter().enumerate() {
            vm.take_dirty_pages(slot)?.into_iter().for_each(|page| add(region.gpa + page * 4096));
        }
    }
    machine.paging.discarder().vmm_writes().take().into_iter().for_each(&mut add);
    for pages in &mut set {
        pages.sort_unstable();
        pages.dedup();
    }
    Ok(set)
}

/// Write-protects the pages of `set` again (contiguous pages in one call); returns how
/// many pages that was.
fn protect_again(uffd: &Uffd, zones: &[ZoneCopy], set: &[Vec<u64>]) -> Result<usize, LiveError> {
    let mut count = 0;
    for (zone, pages) in zones.iter().zip(set) {
        let page_bytes = zone.view.page_bytes;
        let mut runs = pages.iter().peekable();
        while let Some(&first) = runs.next() {
            let mut end = first + 1;
            while runs.peek().is_some_and(|&&next| next == end) {
                runs.next();
                end += 1;
            }
            uffd.write_protect(
                zone.view.host_addr as u64 + first * page_bytes,
                (end - first) * page_bytes,
                true,
                false,
            )?;
            count += (end - first) as usize;
        }
    }
    Ok(count)
}

/// Copies every pending page, chunk by chunk, unprotecting each chunk once it is in the
/// image, on up to [`COPY_THREADS`] threads (the copy into the page cache is most of the
/// cost, as for a full snapshot). Stops early if the fault thread failed.
fn background_copy(uffd: &Uffd, zones: &[ZoneCopy], stop: &AtomicBool) -> Result<(), LiveError> {
    let existing = zones
        .iter()
        .map(|zone| image::existing_pages(&zone.view).map_err(|e| LiveError::Image(Box::new(e))))
        .collect::<Result<Vec<_>, _>>()?;
    // Chunks in zone order, handed out one at a time.
    let work: Vec<(usize, u64)> = zones
        .iter()
        .enumerate()
        .flat_map(|(zone, copy)| (0..copy.chunk_count()).map(move |chunk| (zone, chunk)))
        .collect();
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let worker = || -> Result<(), LiveError> {
        loop {
            if stop.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed) {
                return Ok(()); // the failing thread's error is the one to report
            }
            let Some(&(zone_index, chunk)) = work.get(next.fetch_add(1, Ordering::Relaxed) as usize) else {
                return Ok(());
            };
            let zone = &zones[zone_index];
            let first = chunk * zone.per_chunk;
            let end = (first + zone.per_chunk).min(zone.view.pages());
            let done = zone.copy(first, end, Some(&existing[zone_index])).and_then(|()| {
                let start = zone.view.host_addr as u64 + first * zone.view.page_bytes;
                Ok(uffd.write_protect(start, (end - first) * zone.view.page_bytes, false, false)?)
            });
            if done.is_err() {
                failed.store(true, Ordering::Relaxed);
                return done;
            }
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, COPY_THREADS);
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(worker)).collect();
        let mine = worker();
        helpers
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(LiveError::FaultThread("a copy thread panicked".into()))))
            .fold(mine, |result, other| result.and(other))
    })
}

/// Answers write faults until `stop`: copies the faulting page if it is still pending,
/// then unprotects it and wakes the writer. Returns how many faults it served; on an
/// error it sets `stop` itself.
fn serve_write_faults(uffd: &Uffd, zones: &[ZoneCopy], window: &Window, stop: &AtomicBool) -> Result<u64, LiveError> {
    let result = fault_loop(uffd, zones, window, stop);
    if result.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    result
}

fn fault_loop(uffd: &Uffd, zones: &[ZoneCopy], window: &Window, stop: &AtomicBool) -> Result<u64, LiveError> {
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
            let position = zones
                .iter()
                .position(|zone| zone.contains(address))
                .ok_or_else(|| LiveError::FaultThread(format!("a fault at {address:#x} outside guest RAM")))?;
            let zone = &zones[position];
            let index = (address - zone.view.host_addr as u64) / zone.view.page_bytes;
            let start = zone.view.host_addr as u64 + index * zone.view.page_bytes;
            {
                // Before the pause: unprotect and record, under the lock the pause takes
                // the records with (so none is lost between the two).
                let mut marks = window.marks.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(marks) = marks.as_mut() {
                    uffd.write_protect(start, zone.view.page_bytes, false, false)?;
                    marks[position].push(index);
                    continue;
                }
            }
            // A block around the page where reading a page that does not exist costs
            // nothing (anonymous memory maps the shared zero page): a writer going through
            // memory in order then waits once per block, not once per page.
            let (first, end) = zone.fault_block(index);
            zone.copy(first, end, None)?;
            let start = zone.view.host_addr as u64 + first * zone.view.page_bytes;
            uffd.write_protect(start, (end - first) * zone.view.page_bytes, false, false)?;
            served += 1;
        }
    }
    Ok(served)
}
