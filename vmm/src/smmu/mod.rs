//! The secondary MMU: per-page state of guest RAM, the invalidation layer that keeps every
//! user of guest memory coherent with host page-table changes, and the userfaultfd fault
//! engine that populates guest RAM on demand (the invariant and its retry protocol are
//! stated in [`invalidation`]).
//!
//! - [`uffd`]: a small safe wrapper over the userfaultfd uapi (linux-raw-sys bindings).
//! - [`page_state`]: the per-page state table (populated, write-protected, dirty, discarded).
//! - [`invalidation`]: `invalidate_range_start/end`, the sequence count and the retry
//!   protocol (`read_begin` / `read_retry`), and invalidation subscribers.
//! - [`page_source`]: where the contents of a missing page come from (zero, file, ...),
//!   synchronously or "later"; [`page_installer`]: the completion path of a "later" page
//!   (and of background pushes), under the same retry protocol.
//! - [`fault_engine`]: handler threads that resolve userfaultfd faults under the protocol;
//!   [`fault_stats`]: their latency histograms and counters; [`engine_tuning`]: the
//!   engine's measurable options (and the textbook reference handler that benchmarks
//!   compare it with), including fault-around.
//! - [`discard`]: discard and write-protect ranges of guest RAM through the invalidation
//!   layer, with the right host operation per backend.
//! - [`host_pages`]: which pages of a region the host holds contents for now.
//! - [`vmm_writes`]: the pages the VMM itself wrote or discarded (what a diff snapshot
//!   adds to KVM's dirty log).
//!
//! All ranges in this layer are guest-physical ([`GuestRange`]); [`Regions`] translates
//! between guest-physical and host-virtual addresses.

pub mod access;
pub mod coherence;
pub mod discard;
mod engine_shared;
pub mod engine_tuning;
mod fault_around;
pub mod fault_engine;
mod fault_handler;
mod fault_stats;
pub mod host_pages;
pub mod invalidation;
mod minimal_handler;
pub mod page_installer;
pub mod page_source;
pub mod page_state;
mod reference_handler;
pub mod swapped;
pub mod uffd;
mod uffd_types;
pub mod vmm_writes;

#[cfg(test)]
mod tests;

use std::os::fd::OwnedFd;
use std::sync::Arc;

/// 4 KiB: the base page size.
pub const PAGE_4K: u64 = 4096;
/// 2 MiB: the huge page size of hugetlb regions.
pub const PAGE_2M: u64 = 2 << 20;

/// A half-open range of guest-physical addresses `[gpa, gpa + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestRange {
    /// First guest-physical address of the range.
    pub gpa: u64,
    /// Length of the range in bytes.
    pub len: u64,
}

impl GuestRange {
    /// The range `[gpa, gpa + len)`.
    pub const fn new(gpa: u64, len: u64) -> Self {
        Self { gpa, len }
    }

    /// One past the last address of the range.
    pub const fn end(&self) -> u64 {
        self.gpa + self.len
    }

    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &GuestRange) -> bool {
        self.len != 0 && other.len != 0 && self.gpa < other.end() && other.gpa < self.end()
    }

    /// The common part of two ranges, if any.
    pub fn intersect(&self, other: &GuestRange) -> Option<GuestRange> {
        let start = self.gpa.max(other.gpa);
        let end = self.end().min(other.end());
        (start < end).then(|| GuestRange::new(start, end - start))
    }
}

/// How a region of guest RAM is backed on the host: decides the host operation that
/// frees memory (see [`discard`]) and which userfaultfd modes the region supports.
#[derive(Debug, Clone)]
pub enum RegionBacking {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`), 4 KiB pages.
    PrivateAnon,
    /// A shared mapping of a memfd (shmem) or a regular file, 4 KiB pages.
    Shared {
        /// The backing file.
        fd: Arc<OwnedFd>,
        /// Offset in the file of the region's first byte.
        file_offset: u64,
    },
    /// Hugetlb memory, 2 MiB pages: a hugetlbfs file / hugetlb memfd mapped shared, or
    /// anonymous `MAP_HUGETLB` memory (`fd: None`).
    Hugetlb {
        /// The backing hugetlb file, if any.
        fd: Option<Arc<OwnedFd>>,
        /// Offset in the file of the region's first byte.
        file_offset: u64,
    },
}

/// Which userfaultfd mode resolves first touches of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdMode {
    /// Not registered for MISSING or MINOR faults (the kernel fills on fault).
    None,
    /// MISSING faults, resolved with UFFDIO_COPY / UFFDIO_ZEROPAGE from a page source.
    Missing,
    /// MINOR faults (shared / hugetlb backings only): the page cache already holds the
    /// data; resolved with UFFDIO_CONTINUE. Also registered for MISSING faults, so that a
    /// page discarded later (no longer in the page cache) is filled by the engine too.
    Minor,
}

/// One region of guest RAM as the smmu sees it. The memory layer produces these; the smmu
/// does not depend on its types.
#[derive(Debug, Clone)]
pub struct UffdRegion {
    /// Guest-physical address of the region's first byte.
    pub guest_addr: u64,
    /// Host-virtual address where the region is mapped.
    pub host_addr: u64,
    /// Length in bytes (a multiple of `page_bytes`).
    pub len: u64,
    /// Page size of the backing: [`PAGE_4K`] or [`PAGE_2M`] (hugetlb).
    pub page_bytes: u64,
    /// The host backing.
    pub backing: RegionBacking,
    /// The userfaultfd mode that resolves first touches.
    pub mode: UffdMode,
    /// Also register for write-protect faults (needed by `write_protect`).
    pub write_protect: bool,
}

impl UffdRegion {
    /// A private-anon region description with no host mapping behind it, for tests of
    /// pure logic (range picking, page bookkeeping).
    #[cfg(test)]
    pub(crate) fn unmapped_for_tests(guest_addr: u64, len: u64, page_bytes: u64, write_protect: bool) -> Self {
        UffdRegion {
            guest_addr,
            host_addr: 0,
            len,
            page_bytes,
            backing: RegionBacking::PrivateAnon,
            mode: UffdMode::None,
            write_protect,
        }
    }

    /// The region's guest-physical range.
    pub fn guest_range(&self) -> GuestRange {
        GuestRange::new(self.guest_addr, self.len)
    }

    /// Host address of a guest-physical address inside this region.
    pub fn host_of(&self, gpa: u64) -> u64 {
        self.host_addr + (gpa - self.guest_addr)
    }

    /// Guest-physical address of a host address inside this region.
    pub fn gpa_of(&self, hva: u64) -> u64 {
        self.guest_addr + (hva - self.host_addr)
    }
}

/// The set of guest RAM regions, with lookups by guest-physical and host-virtual address.
#[derive(Debug, Clone, Default)]
pub struct Regions {
    regions: Vec<UffdRegion>,
}

impl Regions {
    /// Wraps a list of non-overlapping regions.
    pub fn new(regions: Vec<UffdRegion>) -> Self {
        Self { regions }
    }

    /// All regions.
    pub fn iter(&self) -> impl Iterator<Item = &UffdRegion> {
        self.regions.iter()
    }

    /// The region containing a guest-physical address.
    pub fn by_gpa(&self, gpa: u64) -> Option<&UffdRegion> {
        self.regions.iter().find(|r| gpa >= r.guest_addr && gpa - r.guest_addr < r.len)
    }

    /// The region containing a host-virtual address.
    pub fn by_host(&self, hva: u64) -> Option<&UffdRegion> {
        self.regions.iter().find(|r| hva >= r.host_addr && hva - r.host_addr < r.len)
    }

    /// The parts of `range` that fall inside regions, each with its region.
    pub fn split<'a>(&'a self, range: GuestRange) -> impl Iterator<Item = (&'a UffdRegion, GuestRange)> + 'a {
        self.regions.iter().filter_map(move |r| r.guest_range().intersect(&range).map(|p| (r, p)))
    }
}
