//! Discarding and write-protecting guest RAM, through the invalidation layer.
//!
//! Each operation runs as an invalidation of its range (see [`super::invalidation`]):
//! start → host operation → mark the state table → end. When `discard` returns, the host
//! no longer maps the old contents, no subscriber caches them, and no fault resolution that
//! read them before the discard can install them.
//!
//! Host operation per backend:
//! - private anon: `MADV_DONTNEED` (the next touch reads zeros, or faults to the engine);
//! - shared memfd / file: `fallocate(PUNCH_HOLE | KEEP_SIZE)`, which frees the blocks and
//!   unmaps the range from every mapping (shmem and the page cache zap mappings before
//!   freeing), so no extra `madvise` is needed;
//! - hugetlb: only whole 2 MiB pages can be freed (punch hole for file-backed hugetlb,
//!   `MADV_DONTNEED` for anonymous hugetlb); the parts of partially covered huge pages are
//!   left untouched and listed in [`DiscardReport::partial_huge_pages`].
//!
//! With the engine's REMOVE events on, `MADV_DONTNEED` blocks until a handler thread reads
//! the REMOVE event, so discarding private anon memory needs a live fault engine.

use std::sync::Arc;

use rustix::fs::{fallocate, FallocateFlags};
use rustix::mm::{madvise, Advice};

use super::fault_engine::EngineLink;
use super::invalidation::Invalidation;
use super::page_state::{PageState, PageStateTable};
use super::uffd::{Uffd, UffdError};
use super::vmm_writes::VmmWrites;
use super::{GuestRange, RegionBacking, Regions, UffdMode, UffdRegion};

/// Errors from discard and write-protect.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// Part of the range is not guest RAM.
    #[error("[{:#x}, +{:#x}) is not entirely guest RAM; discard only ranges inside memory regions", .0.gpa, .0.len)]
    NotGuestRam(GuestRange),
    /// The range is not aligned to the backing's page size.
    #[error("[{:#x}, +{:#x}) is not aligned to the {granule:#x}-byte pages of its region", .range.gpa, .range.len)]
    Misaligned {
        /// The offending range.
        range: GuestRange,
        /// The region's page size.
        granule: u64,
    },
    /// The host operation failed.
    #[error("{op} on guest range [{:#x}, +{:#x}) failed: {source}", .range.gpa, .range.len)]
    Host {
        /// Which operation.
        op: &'static str,
        /// The range.
        range: GuestRange,
        /// The OS error.
        source: std::io::Error,
    },
    /// Write protection was asked for memory not registered for it.
    #[error("guest range at {0:#x} is not registered for write-protect faults; set write_protect on its region (needs a userfaultfd)")]
    NotWriteProtectable(u64),
    /// A userfaultfd operation failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
}

/// What a discard did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscardReport {
    /// Ranges whose memory was given back to the host.
    pub freed: Vec<GuestRange>,
    /// Parts of huge pages the range only partly covered: not freed, contents kept.
    pub partial_huge_pages: Vec<GuestRange>,
}

/// Discards and write-protects guest RAM through the invalidation layer.
#[derive(Debug, Clone)]
pub struct Discarder {
    regions: Arc<Regions>,
    table: Arc<PageStateTable>,
    inv: Arc<Invalidation>,
    uffd: Option<Arc<Uffd>>,
    link: Option<EngineLink>,
    writes: Arc<VmmWrites>,
}

impl Discarder {
    /// A discarder over `regions`; `engine` links it to the running fault engine (needed
    /// for write protection, and so handlers recognise our own REMOVE events).
    pub fn new(
        regions: Arc<Regions>,
        table: Arc<PageStateTable>,
        inv: Arc<Invalidation>,
        engine: Option<EngineLink>,
    ) -> Self {
        let uffd = engine.as_ref().map(|l| l.uffd.clone());
        let writes = Arc::new(VmmWrites::new(&regions));
        Self { regions, table, inv, uffd, link: engine, writes }
    }

    /// The pages the VMM changed behind the guest's back (every discard lands here;
    /// devices that write guest RAM mark what they write): what a diff snapshot adds to
    /// KVM's dirty log. Shared by every clone of this discarder.
    pub fn vmm_writes(&self) -> &Arc<VmmWrites> {
        &self.writes
    }

    fn check_covered(&self, range: GuestRange) -> Result<(), DiscardError> {
        let covered: u64 = self.regions.split(range).map(|(_, p)| p.len).sum();
        if covered != range.len {
            return Err(DiscardError::NotGuestRam(range));
        }
        Ok(())
    }

    /// Gives `range` back to the host: afterwards it reads as zeros and no mapping of its
    /// old contents remains. 4 KiB regions need 4 KiB alignment; hugetlb regions free only
    /// the huge pages the range fully covers.
    pub fn discard(&self, range: GuestRange) -> Result<DiscardReport, DiscardError> {
        self.give_back(range, PageStateTable::mark_discarded)
    }

    /// Frees `range` on the host as [`Discarder::discard`] does, but leaves its pages
    /// missing instead of discarded: their next fault asks the page source again. A
    /// hybrid migration's destination evicts the pages a pre-copy round brought that the
    /// guest wrote again on the source before the switch, so post-copy fetches them anew.
    pub fn evict(&self, range: GuestRange) -> Result<DiscardReport, DiscardError> {
        self.give_back(range, PageStateTable::mark_evicted)
    }

    fn give_back(
        &self,
        range: GuestRange,
        mark: fn(&PageStateTable, GuestRange),
    ) -> Result<DiscardReport, DiscardError> {
        self.check_covered(range)?;
        let mut report = DiscardReport::default();
        for (region, part) in self.regions.split(range) {
            let g = region.page_bytes;
            let start = part.gpa.next_multiple_of(g);
            let end = part.end() / g * g;
            let is_huge = matches!(region.backing, RegionBacking::Hugetlb { .. });
            if !is_huge && (start != part.gpa || end != part.end()) {
                return Err(DiscardError::Misaligned { range: part, granule: g });
            }
            if start >= end {
                report.partial_huge_pages.push(part);
                continue;
            }
            if start > part.gpa {
                report.partial_huge_pages.push(GuestRange::new(part.gpa, start - part.gpa));
            }
            if end < part.end() {
                report.partial_huge_pages.push(GuestRange::new(end, part.end() - end));
            }
            let aligned = GuestRange::new(start, end - start);
            let _inv = self.inv.invalidate(aligned);
            // Marked first: a host operation that fails half way may have freed some.
            self.writes.mark(aligned);
            self.free_host(region, aligned)?;
            mark(&self.table, aligned);
            report.freed.push(aligned);
        }
        Ok(report)
    }

    fn wp_parts(&self, range: GuestRange) -> Result<Vec<(UffdRegion, GuestRange)>, DiscardError> {
        self.check_covered(range)?;
        let mut parts = Vec::new();
        for (region, part) in self.regions.split(range) {
            if !region.write_protect || self.uffd.is_none() {
                return Err(DiscardError::NotWriteProtectable(part.gpa));
            }
            let g = region.page_bytes;
            if part.gpa % g != 0 || part.len % g != 0 {
                return Err(DiscardError::Misaligned { range: part, granule: g });
            }
            parts.push((region.clone(), part));
        }
        Ok(parts)
    }

    /// Write-protects `range` (regions registered with `write_protect`): the next write to
    /// each page raises a WP fault the engine resolves, marking the page dirty. Clears the
    /// dirty bits. Runs as an invalidation, so subscribers drop writable views.
    pub fn write_protect(&self, range: GuestRange) -> Result<(), DiscardError> {
        let uffd = self.uffd.as_ref().ok_or(DiscardError::NotWriteProtectable(range.gpa))?;
        for (region, part) in self.wp_parts(range)? {
            let _inv = self.inv.invalidate(part);
            retry_mm_changing(|| uffd.write_protect(region.host_of(part.gpa), part.len, true, false))?;
            self.table.update(part, PageState::WRITE_PROTECTED, PageState::DIRTY);
        }
        Ok(())
    }

    /// Removes write protection from `range` and wakes writers blocked on it. Adding
    /// permission invalidates nothing, so this is not an invalidation.
    pub fn unprotect(&self, range: GuestRange) -> Result<(), DiscardError> {
        let uffd = self.uffd.as_ref().ok_or(DiscardError::NotWriteProtectable(range.gpa))?;
        for (region, part) in self.wp_parts(range)? {
            // Under the range's lock, so the pte and the table change together for a
            // fault handler or the coherence checker (the lock is dropped between retries).
            retry_mm_changing(|| {
                let _lock = self.inv.lock(part);
                uffd.write_protect(region.host_of(part.gpa), part.len, false, false)?;
                self.table.clear(part, PageState::WRITE_PROTECTED);
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// Runs a write-protect ioctl again while it fails with EAGAIN: another thread's
/// MADV_DONTNEED has a REMOVE event pending, which a handler thread reads shortly. Gives
/// up (returning the EAGAIN) after about a second, when no handler reads events any more.
fn retry_mm_changing(mut op: impl FnMut() -> Result<(), UffdError>) -> Result<(), UffdError> {
    let mut tries = 0u32;
    loop {
        match op() {
            Err(e) if e.is_mm_changing() && tries < 10_000 => {
                tries += 1;
                if tries < 100 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
            }
            other => return other,
        }
    }
}

impl Discarder {
    /// The host operation that frees `range` of `region` (granule-aligned).
    fn free_host(&self, region: &UffdRegion, range: GuestRange) -> Result<(), DiscardError> {
        let hva = region.host_of(range.gpa);
        let host_err = |op, e: rustix::io::Errno| DiscardError::Host { op, range, source: e.into() };
        let (fd, file_offset) = match &region.backing {
            RegionBacking::PrivateAnon | RegionBacking::Hugetlb { fd: None, .. } => {
                // The engine registered this region, so the kernel will report a REMOVE:
                // announce it as ours.
                let registered = region.mode != UffdMode::None || region.write_protect;
                let ledger = self.link.as_ref().and_then(|l| l.expected_removes.as_ref());
                let ledger = ledger.filter(|_| registered);
                if let Some(l) = ledger {
                    l.expect(hva, hva + range.len);
                }
                // SAFETY: `hva..hva+len` lies inside the region's mapping, which the memory
                // layer keeps mapped for the VM's lifetime; DONTNEED only drops its pages
                // (guest RAM is never referenced by Rust borrows: the smmu invariant).
                let r = unsafe { madvise(hva as *mut _, range.len as usize, Advice::LinuxDontNeed) };
                if let (Err(e), Some(l)) = (r, ledger) {
                    l.cancel(hva, hva + range.len);
                    return Err(host_err("madvise(MADV_DONTNEED)", e));
                }
                return r.map_err(|e| host_err("madvise(MADV_DONTNEED)", e));
            }
            RegionBacking::Shared { fd, file_offset } => (fd, *file_offset),
            RegionBacking::Hugetlb { fd: Some(fd), file_offset } => (fd, *file_offset),
        };
        let offset = file_offset + (range.gpa - region.guest_addr);
        fallocate(&**fd, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, range.len)
            .map_err(|e| host_err("fallocate(PUNCH_HOLE)", e))
    }
}
