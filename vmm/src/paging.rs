//! Demand paging of guest RAM: connects the memory layer's regions to the smmu.
//!
//! Per zone, its [`PagingMode`] decides how pages get populated:
//! - `kernel`: nothing registered, the kernel fills a page on its first touch;
//! - `prefault`: the whole zone populated up front (`MADV_POPULATE_WRITE`);
//! - `uffd-missing`: registered for MISSING faults, resolved by the fault engine from the
//!   page source (zeros for a fresh VM) with UFFDIO_COPY / ZEROPAGE;
//! - `uffd-minor`: the page cache is filled first (as a restore from a shared image would
//!   find it), the zone is registered for MINOR faults, and the engine maps pages with
//!   UFFDIO_CONTINUE.
//!
//! [`GuestPaging`] owns the state table, the invalidation layer, the engine and the
//! discarder for all of guest RAM; it must be started before anything (the kernel loader
//! included) touches guest RAM, so the table sees every population.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::SeekFrom;
use rustix::mm::{madvise, mmap, munmap, Advice, MapFlags, ProtFlags};

use crate::config::{Backend, FaultEngineOptions, PagingMode, ZoneConfig, HUGEPAGE_2M};
use crate::memory::{GuestRam, RamRegion};
use crate::smmu::access::GuestAccess;
use crate::smmu::coherence::{self, CoherenceError, CoherenceReport};
use crate::smmu::discard::DiscardError;
use crate::smmu::discard::Discarder;
use crate::smmu::fault_engine::{EngineStats, FaultEngine, FaultEngineConfig, FaultEngineError, LatencySummary};
use crate::smmu::invalidation::Invalidation;
use crate::smmu::page_source::PageSource;
use crate::smmu::page_state::{PageStateError, PageStateTable, PageStateTableState};
use crate::smmu::GuestRange;
use crate::smmu::{RegionBacking, Regions, UffdMode, UffdRegion};

/// tmpfs / shmem (`statfs.f_type`).
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// hugetlbfs.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Errors setting up demand paging.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// userfaultfd paging of a file that is not on tmpfs/hugetlbfs.
    #[error("memory zone {zone}: paging={mode} needs the file {path} on tmpfs or hugetlbfs (the kernel's userfaultfd only handles anonymous, shmem and hugetlb memory); put it under /dev/shm or use paging=kernel")]
    FileNotShmem {
        /// Zone index.
        zone: usize,
        /// Mode name.
        mode: &'static str,
        /// The file.
        path: String,
    },
    /// uffd-missing on a file that already holds data.
    #[error("memory zone {zone}: paging=uffd-missing needs an empty file, but {path} holds data (its pages would be mapped without a fault reaching the engine); truncate it, or use paging=uffd-minor to serve its contents")]
    FileHasData {
        /// Zone index.
        zone: usize,
        /// The file.
        path: String,
    },
    /// userfaultfd paging with 1 GiB pages.
    #[error("memory zone {zone}: paging={mode} with 1 GiB huge pages is not supported (each fault would copy 1 GiB); use hugepage=2M")]
    GiantPages {
        /// Zone index.
        zone: usize,
        /// Mode name.
        mode: &'static str,
    },
    /// Populating or pre-filling a zone failed.
    #[error("memory zone {zone}: {what} failed: {source}; check free memory (or the hugepage pool for hugetlb)")]
    Populate {
        /// Zone index.
        zone: usize,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The state table could not be built.
    #[error(transparent)]
    Table(#[from] PageStateError),
    /// The fault engine could not start.
    #[error(transparent)]
    Engine(#[from] FaultEngineError),
    /// The coherence check could not run.
    #[error(transparent)]
    Coherence(#[from] CoherenceError),
    /// Which pages the host holds could not be read for the saved page state.
    #[error("saving the page-state table: cannot read which guest pages the host holds: {0}")]
    HostPages(std::io::Error),
    /// A saved page state could not be applied to the restored VM.
    #[error("restoring the page-state table: {0}; restore onto zones of the sizes the snapshot was taken with")]
    RestorePageState(#[from] DiscardError),
}

/// Called once when the fault engine dies, with its error (the VMM ends the VM).
pub type EngineFailureHook = Arc<dyn Fn(String) + Send + Sync>;

/// What demand paging did during a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FaultReport {
    /// Paging mode of each zone, in order.
    pub modes: Vec<&'static str>,
    /// The fault engine's tuning (`default`, `reference`, `dontwake+around=16`, ...).
    pub engine: String,
    /// Engine-side latency (message read → page installed) per fault kind and page size.
    pub latency: Vec<LatencySummary>,
    /// Fills that found the page already there (EEXIST): the waiter was woken.
    pub eexist: u64,
    /// Fills refused because the address space was changing (EAGAIN), retried.
    pub eagain: u64,
    /// Resolutions dropped by the retry protocol and started again.
    pub retries: u64,
    /// Faults put aside while an invalidation of their page ran.
    pub deferred: u64,
    /// REMOVE / UNMAP events read from the kernel.
    pub remove_events: u64,
    /// The coherence check at the end (None when no zone is tracked, or the engine died).
    pub coherence: Option<CoherenceReport>,
    /// Why the engine stopped, if it failed.
    pub engine_failure: Option<String>,
}

impl FaultReport {
    fn add_engine_stats(&mut self, stats: &EngineStats) {
        self.latency = stats.summaries();
        self.eexist = stats.eexist;
        self.eagain = stats.eagain;
        self.retries = stats.retries;
        self.deferred = stats.deferred;
        self.remove_events = stats.remove_events;
    }

    /// Lines for the run summary.
    pub fn summary_lines(&self) -> Vec<String> {
        let mut out = vec![format!("paging: {} (fault engine: {})", self.modes.join(", "), self.engine)];
        for l in &self.latency {
            let page = if l.page_bytes >= HUGEPAGE_2M { "2M" } else { "4K" };
            out.push(format!(
                "  {:?} {page} faults: {} resolved, engine latency p50 {:.1} µs p99 {:.1} µs max {:.1} µs",
                l.kind,
                l.count,
                l.p50_ns as f64 / 1e3,
                l.p99_ns as f64 / 1e3,
                l.max_ns as f64 / 1e3
            ));
        }
        if self.eexist + self.eagain + self.retries + self.deferred + self.remove_events > 0 {
            out.push(format!(
                "  races: {} EEXIST, {} EAGAIN, {} retries, {} deferred, {} REMOVE events",
                self.eexist, self.eagain, self.retries, self.deferred, self.remove_events
            ));
        }
        if let Some(c) = &self.coherence {
            out.push(format!("  coherence: {}", c.describe()));
        }
        out
    }
}

/// Demand paging of all of guest RAM.
pub struct GuestPaging {
    regions: Arc<Regions>,
    table: Arc<PageStateTable>,
    inv: Arc<Invalidation>,
    engine: Option<FaultEngine>,
    discarder: Discarder,
    modes: Vec<&'static str>,
    tuning: String,
}

impl GuestPaging {
    /// Sets up every zone's paging mode, and starts the fault engine when a zone pages
    /// through userfaultfd or `write_protect` asks for write-protect faults on all RAM.
    /// `source` fills MISSING faults; `on_failure` is called if the engine dies.
    pub fn start(
        ram: &GuestRam,
        zones: &[ZoneConfig],
        options: &FaultEngineOptions,
        write_protect: bool,
        source: Arc<dyn PageSource>,
        on_failure: EngineFailureHook,
    ) -> Result<Self, PagingError> {
        check_zones(ram, zones)?;
        let mut regions = Vec::with_capacity(ram.regions().len());
        for r in ram.regions() {
            let paging = zones[r.zone].paging;
            match paging {
                PagingMode::Prefault => populate(r.zone, r.host_addr, r.size_bytes, "populating it up front")?,
                PagingMode::UffdMinor => fill_page_cache(r)?,
                PagingMode::Kernel | PagingMode::UffdMissing => {}
            }
            regions.push(UffdRegion {
                guest_addr: r.gpa,
                host_addr: r.host_addr,
                len: r.size_bytes,
                page_bytes: r.page_bytes,
                backing: backing_of(r)?,
                mode: match paging {
                    PagingMode::Kernel | PagingMode::Prefault => UffdMode::None,
                    PagingMode::UffdMissing => UffdMode::Missing,
                    PagingMode::UffdMinor => UffdMode::Minor,
                },
                write_protect,
            });
        }
        let spans: Vec<_> = regions.iter().map(|r| (r.guest_addr, r.len, r.page_bytes)).collect();
        let table = Arc::new(PageStateTable::new(&spans)?);
        let inv = Arc::new(Invalidation::new());
        let regions = Arc::new(Regions::new(regions));
        let needs_engine = regions.iter().any(|r| r.mode != UffdMode::None || r.write_protect);
        let engine =
            if needs_engine { Some(start_engine(&regions, &table, &inv, options, source, on_failure)?) } else { None };
        let discarder = Discarder::new(regions.clone(), table.clone(), inv.clone(), engine.as_ref().map(|e| e.link()));
        let modes = zones.iter().map(|z| z.paging.name()).collect();
        let tuning = options.tuning.name();
        Ok(GuestPaging { regions, table, inv, engine, discarder, modes, tuning })
    }

    /// Discards and write-protects guest RAM through the invalidation layer.
    pub fn discarder(&self) -> &Discarder {
        &self.discarder
    }

    /// Coherent VMM-side reads and writes of guest RAM.
    pub fn access(&self) -> GuestAccess {
        GuestAccess::new(self.regions.clone(), self.table.clone(), self.inv.clone())
    }

    /// Installs pages a source delivers later (post-copy), if the fault engine runs.
    pub fn installer(&self) -> Option<crate::smmu::page_installer::PageInstaller> {
        self.engine.as_ref().map(|e| e.installer())
    }

    /// Guest RAM as the smmu sees it.
    pub fn regions(&self) -> &Arc<Regions> {
        &self.regions
    }

    /// The page-state table.
    pub fn table(&self) -> &Arc<PageStateTable> {
        &self.table
    }

    /// The invalidation layer (for subscribers).
    pub fn invalidation(&self) -> &Arc<Invalidation> {
        &self.inv
    }

    /// The page-state table as a snapshot saves it: its discarded ranges are only those
    /// the host holds nothing for (a region paged by the kernel is not tracked page by
    /// page, so a page the guest touched again after a discard may still be marked; it is
    /// the guest's again, and restoring must not discard it).
    pub fn save_page_state(&self) -> Result<PageStateTableState, PagingError> {
        let mut state = self.table.save_state();
        let mut discarded: Vec<(u64, u64)> = Vec::new();
        for &(gpa, len) in &state.discarded {
            for (region, part) in self.regions.split(GuestRange::new(gpa, len)) {
                let granule = region.page_bytes;
                let held = crate::smmu::host_pages::held(region, part).map_err(PagingError::HostPages)?;
                for (i, _) in held.iter().enumerate().filter(|(_, &held)| !held) {
                    let at = part.gpa + i as u64 * granule;
                    match discarded.last_mut() {
                        Some(last) if last.0 + last.1 == at => last.1 += granule,
                        _ => discarded.push((at, granule)),
                    }
                }
            }
        }
        state.discarded = discarded;
        Ok(state)
    }

    /// Applies a saved page-state table to a freshly restored VM (memory loaded or to be
    /// paged in, vCPUs not started): discarded pages are discarded again (holes that read
    /// as zeros, marked discarded, so userfaultfd MISSING faults on them get zeros and
    /// not the images' bytes), write-protected pages are write-protected again.
    pub fn restore_page_state(&self, state: &PageStateTableState) -> Result<(), PagingError> {
        for &(gpa, len) in &state.discarded {
            self.discarder.discard(GuestRange::new(gpa, len))?;
        }
        for &(gpa, len) in &state.write_protected {
            self.discarder.write_protect(GuestRange::new(gpa, len))?;
        }
        Ok(())
    }

    /// Compares the state table with the host's page tables now.
    pub fn check_coherence(&self) -> Result<CoherenceReport, PagingError> {
        let mut report = coherence::check(&self.regions, &self.table, &self.inv)?;
        // Pages lost behind our back stay reported even after a refill made the table and
        // the host agree again.
        report.lost_and_refilled = self.engine.as_ref().map_or(0, |e| e.stats().lost_refilled);
        Ok(report)
    }

    /// Ends paging after the vCPUs stopped: checks coherence, stops the engine, and says
    /// what happened. Guest RAM must still be mapped.
    pub fn finish(mut self) -> Result<FaultReport, PagingError> {
        let mut report =
            FaultReport { modes: self.modes.clone(), engine: self.tuning.clone(), ..FaultReport::default() };
        let Some(engine) = self.engine.take() else {
            return Ok(report);
        };
        report.engine_failure = engine.failure();
        let tracked = self.regions.iter().any(|r| r.mode != UffdMode::None);
        if tracked && report.engine_failure.is_none() {
            let mut coherence = self.check_coherence()?;
            coherence.lost_and_refilled = engine.stats().lost_refilled;
            report.coherence = Some(coherence);
        }
        // Taken before shutdown, which returns only the error when the engine failed.
        report.add_engine_stats(&engine.stats());
        match engine.shutdown() {
            Ok(stats) => report.add_engine_stats(&stats),
            Err(e) => {
                report.engine_failure.get_or_insert(e.to_string());
            }
        }
        Ok(report)
    }

    /// What paging did so far, while the VM runs (no coherence check).
    pub fn live_report(&self) -> FaultReport {
        let mut report =
            FaultReport { modes: self.modes.clone(), engine: self.tuning.clone(), ..FaultReport::default() };
        if let Some(engine) = &self.engine {
            report.add_engine_stats(&engine.stats());
            report.engine_failure = engine.failure();
        }
        report
    }
}

/// Starts the engine; if it dies, `on_failure` ends the VM (the engine itself releases
/// every thread waiting on it: see `fault_engine::release_after_failure`).
fn start_engine(
    regions: &Arc<Regions>,
    table: &Arc<PageStateTable>,
    inv: &Arc<Invalidation>,
    options: &FaultEngineOptions,
    source: Arc<dyn PageSource>,
    on_failure: EngineFailureHook,
) -> Result<FaultEngine, PagingError> {
    let config = FaultEngineConfig {
        handler_threads: crate::smmu::engine_tuning::useful_handler_threads(options.handler_threads),
        batch: options.batch,
        non_cooperative_events: true,
        on_failure: Some(Arc::new(move |message: &str| on_failure(message.to_string()))),
    };
    Ok(FaultEngine::start_tuned(regions.clone(), table.clone(), inv.clone(), source, config, options.tuning)?)
}

/// Checks what the kernel's userfaultfd can page, per zone.
fn check_zones(ram: &GuestRam, zones: &[ZoneConfig]) -> Result<(), PagingError> {
    for (index, zone) in zones.iter().enumerate() {
        let mode = zone.paging.name();
        if !zone.paging.uses_userfaultfd() {
            continue;
        }
        if zone.backend == Backend::Hugetlb && zone.hugepage_bytes > HUGEPAGE_2M {
            return Err(PagingError::GiantPages { zone: index, mode });
        }
        if zone.backend != Backend::File {
            continue;
        }
        let Some(region) = ram.regions().iter().find(|r| r.zone == index) else { continue };
        let path = zone.path.as_ref().map_or_else(String::new, |p| p.display().to_string());
        let fd = borrowed_fd(region);
        let fs = rustix::fs::fstatfs(fd).map_err(|e| PagingError::Populate {
            zone: index,
            what: "statfs of the backing file",
            source: e.into(),
        })?;
        if !matches!(fs.f_type as i64, TMPFS_MAGIC | HUGETLBFS_MAGIC) {
            return Err(PagingError::FileNotShmem { zone: index, mode, path });
        }
        if zone.paging == PagingMode::UffdMissing {
            // ENXIO: no data at or after offset 0.
            if let Ok(at) = rustix::fs::seek(fd, SeekFrom::Data(0)) {
                if at < zone.size_bytes {
                    return Err(PagingError::FileHasData { zone: index, path });
                }
            }
        }
    }
    Ok(())
}

fn borrowed_fd(region: &RamRegion) -> BorrowedFd<'_> {
    let fd = region.fd.expect("shared backends have an fd");
    // SAFETY: the fd belongs to the zone mapping owned by GuestRam, which outlives every
    // use of `region` borrowed from it.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// The smmu's view of a region's backing (the fd is duplicated: the smmu owns its copy).
fn backing_of(r: &RamRegion) -> Result<RegionBacking, PagingError> {
    let dup = |r: &RamRegion| -> Result<Arc<OwnedFd>, PagingError> {
        let fd = borrowed_fd(r).try_clone_to_owned().map_err(|source| PagingError::Populate {
            zone: r.zone,
            what: "duplicating the backing fd",
            source,
        })?;
        Ok(Arc::new(fd))
    };
    Ok(match r.backend {
        Backend::Anon => RegionBacking::PrivateAnon,
        Backend::Memfd | Backend::File => RegionBacking::Shared { fd: dup(r)?, file_offset: r.fd_offset },
        Backend::Hugetlb => RegionBacking::Hugetlb { fd: Some(dup(r)?), file_offset: r.fd_offset },
    })
}

/// `MADV_POPULATE_WRITE` over `[host_addr, +len)`.
fn populate(zone: usize, host_addr: u64, len: u64, what: &'static str) -> Result<(), PagingError> {
    // SAFETY: the range is a live guest RAM mapping (or our own alias of it); populating
    // only faults pages in, it does not change contents.
    unsafe { madvise(host_addr as *mut _, len as usize, Advice::LinuxPopulateWrite) }
        .map_err(|e| PagingError::Populate { zone, what, source: e.into() })
}

/// Fills the page cache of a shared region without mapping it in guest RAM: through a
/// temporary second mapping of the same file range, populated then unmapped. MINOR faults
/// then find every page in the cache.
fn fill_page_cache(r: &RamRegion) -> Result<(), PagingError> {
    let fd = borrowed_fd(r);
    // SAFETY: a new shared mapping of the zone's own file range; nothing else refers to it
    // and it is unmapped below.
    let alias = unsafe {
        mmap(
            std::ptr::null_mut(),
            r.size_bytes as usize,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            fd.as_fd(),
            r.fd_offset,
        )
    }
    .map_err(|e| PagingError::Populate {
        zone: r.zone,
        what: "mapping the page cache to fill it",
        source: e.into(),
    })?;
    let filled = populate(r.zone, alias as u64, r.size_bytes, "filling the page cache");
    // SAFETY: `alias` is the mapping made above, of this length, used by nothing else.
    let _ = unsafe { munmap(alias, r.size_bytes as usize) };
    filled
}
