//! Coherent access to guest RAM for VMM-side readers and writers (devices, snapshot,
//! migration, tests).
//!
//! A reader must never see a mix of a page's contents from before and after an
//! invalidation, and must not keep a view of a page across one. [`GuestAccess`] copies
//! each page under the invalidation layer's retry protocol:
//!
//! 1. if the fault engine tracks the page and it is not populated (never touched, or
//!    discarded), or it is write-protected and we want to write, populate it with
//!    `MADV_POPULATE_READ/WRITE` — with **no lock held**, because that raises a userfaultfd
//!    fault which a handler thread resolves under the same lock;
//! 2. take the lock at a moment no invalidation of the page is in progress
//!    (`lock_stable`); if the page is not in the wanted state (invalidated again since
//!    step 1), start again;
//! 3. copy under the lock, so no invalidation of the page can run during the copy.
//!
//! The copy is volatile (vCPUs may write the page at the same time; the copy is then as
//! torn as any concurrent read of guest memory, but never mixes in contents from before
//! an invalidation). It cannot fault into the engine: the page is populated and its
//! invalidations wait for our lock. One assumption: nobody outside the VMM
//! `MADV_DONTNEED`s guest RAM behind the smmu (such a REMOVE is only seen afterwards).
//!
//! Copies go through raw host addresses for the duration of one page only; nothing is
//! cached or pinned, which is what keeps devices coherent without mmu-notifier-style
//! callbacks (see ARCHITECTURE.md).

use std::sync::Arc;

use rustix::mm::{madvise, Advice};

use super::invalidation::Invalidation;
use super::page_state::{PageState, PageStateTable};
use super::{GuestRange, Regions, UffdMode, UffdRegion};

/// Attempts per page before giving up: each failed attempt means the page was invalidated
/// again right after being populated, or nobody resolves its faults any more.
const MAX_ATTEMPTS: u32 = 10_000;

/// Errors from coherent accesses.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// Part of the range is not guest RAM.
    #[error("guest access [{gpa:#x}, +{len:#x}) is not entirely guest RAM")]
    NotGuestRam {
        /// First address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Populating a page failed (the fault engine died, or the host is out of memory).
    #[error("cannot populate guest page {gpa:#x} for a VMM {what}: {source}")]
    Populate {
        /// The page.
        gpa: u64,
        /// Read or write.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The page never became accessible.
    #[error("guest page {gpa:#x} never became accessible: it is invalidated as fast as it is populated, or the fault engine stopped resolving faults")]
    NeverReady {
        /// The page.
        gpa: u64,
    },
}

/// Reads and writes guest RAM under the retry protocol.
#[derive(Debug, Clone)]
pub struct GuestAccess {
    regions: Arc<Regions>,
    table: Arc<PageStateTable>,
    inv: Arc<Invalidation>,
}

impl GuestAccess {
    /// An accessor over `regions`, following `inv` and the state in `table`.
    pub fn new(regions: Arc<Regions>, table: Arc<PageStateTable>, inv: Arc<Invalidation>) -> Self {
        Self { regions, table, inv }
    }

    /// Copies `buf.len()` bytes of guest RAM at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        self.for_each_page(gpa, buf.len() as u64, false, |hva, at, len| {
            for (i, byte) in buf[at..at + len].iter_mut().enumerate() {
                // SAFETY: `hva..hva+len` lies in a live guest RAM mapping (checked by
                // for_each_page), populated, with its invalidation lock held, so the read
                // cannot fault to the engine or race a discard; volatile because vCPUs may
                // write guest RAM meanwhile (never borrowed by Rust references).
                *byte = unsafe { std::ptr::read_volatile((hva as *const u8).add(i)) };
            }
        })
    }

    /// Copies `data` into guest RAM at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), AccessError> {
        self.for_each_page(gpa, data.len() as u64, true, |hva, at, len| {
            for (i, &byte) in data[at..at + len].iter().enumerate() {
                // SAFETY: as in `read`; the page is also not write-protected (checked under
                // the lock), so the write cannot raise a userfaultfd fault.
                unsafe { std::ptr::write_volatile((hva as *mut u8).add(i), byte) };
            }
        })
    }

    /// Runs `copy(hva, offset_in_buffer, len)` for each page piece of `[gpa, gpa + len)`
    /// under the retry protocol.
    fn for_each_page(
        &self,
        gpa: u64,
        len: u64,
        write: bool,
        mut copy: impl FnMut(u64, usize, usize),
    ) -> Result<(), AccessError> {
        let covered: u64 = self.regions.split(GuestRange::new(gpa, len)).map(|(_, p)| p.len).sum();
        if covered != len {
            return Err(AccessError::NotGuestRam { gpa, len });
        }
        let mut at = gpa;
        while at < gpa + len {
            let region = self.regions.by_gpa(at).expect("covered above");
            let page = GuestRange::new(at / region.page_bytes * region.page_bytes, region.page_bytes);
            let piece = (page.end().min(gpa + len) - at) as usize;
            self.with_page(region, page, write, || copy(region.host_of(at), (at - gpa) as usize, piece))?;
            at += piece as u64;
        }
        Ok(())
    }

    /// Steps 1–4 of the protocol for one page.
    fn with_page(
        &self,
        region: &UffdRegion,
        page: GuestRange,
        write: bool,
        copy: impl FnOnce(),
    ) -> Result<(), AccessError> {
        let tracked = region.mode != UffdMode::None;
        let ready = |state: PageState| {
            (!tracked || state.contains(PageState::POPULATED)) && !(write && state.contains(PageState::WRITE_PROTECTED))
        };
        for _ in 0..MAX_ATTEMPTS {
            if !ready(self.table.get(page.gpa)) {
                self.populate(region, page, write)?;
            }
            let _lock = self.inv.lock_stable(page);
            if !ready(self.table.get(page.gpa)) {
                continue;
            }
            copy();
            return Ok(());
        }
        Err(AccessError::NeverReady { gpa: page.gpa })
    }

    /// Faults the page in through the engine (no lock held).
    fn populate(&self, region: &UffdRegion, page: GuestRange, write: bool) -> Result<(), AccessError> {
        let advice = if write { Advice::LinuxPopulateWrite } else { Advice::LinuxPopulateRead };
        // SAFETY: the page lies inside a live guest RAM mapping; populating only faults
        // pages in (through userfaultfd where registered), it changes no contents.
        unsafe { madvise(region.host_of(page.gpa) as *mut _, page.len as usize, advice) }.map_err(|e| {
            AccessError::Populate { gpa: page.gpa, what: if write { "write" } else { "read" }, source: e.into() }
        })
    }
}
