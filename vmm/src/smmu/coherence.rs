//! The coherence checker: compares the page-state table with what the host's page tables
//! really hold (`/proc/self/pagemap`, and `mincore` for the page cache of shared memory)
//! and reports every disagreement.
//!
//! Only regions the fault engine tracks (mode `Missing` or `Minor`) are checked: in the
//! other modes the kernel fills pages behind the table's back by design.
//!
//! Per tracked granule, with the granule's invalidation lock held (so no fault resolution
//! or invalidation of it is half done while we look):
//! - **mapped behind the smmu**: the host maps the page (pagemap present or swapped, a pte
//!   marker not counting) but
//!   the table says it is not populated — a fault that never reached the engine;
//! - **lost**: the table says populated, but the host neither maps it nor holds it in the
//!   page cache (shared memory) — contents the smmu believes in are gone;
//! - **write protection**: for a mapped page, the pte's uffd-wp bit (pagemap bit 57)
//!   differs from the table's write-protected bit.
//!
//! The check reads 8 bytes of pagemap per 4 KiB page (and one mincore byte), so a 1 GiB
//! guest costs about 2 MiB of reads: cheap enough to run at the end of every run.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::invalidation::Invalidation;
use super::page_state::{PageState, PageStateTable};
use super::{GuestRange, RegionBacking, Regions, UffdMode, UffdRegion, PAGE_4K};

/// pagemap: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// pagemap: the page is swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// pagemap: the pte is write-protected by userfaultfd.
const PM_UFFD_WP: u64 = 1 << 57;
/// pagemap: the frame field (pfn, or swap type + offset), zero when hidden from us.
const PM_FRAME_BITS: u64 = (1 << 55) - 1;
/// pagemap: the swap type of a swapped entry (bits 0–4).
const PM_SWAP_TYPE: u64 = 0x1f;
/// The swap type Linux gives pte markers (the last one: `SWP_PTE_MARKER`). A marker —
/// e.g. the uffd-wp marker a write-protect leaves on a page that is then discarded — is
/// reported with the swapped bit but holds no contents. Other swap entries (swap, and
/// migration entries of a page being moved) do.
const PTE_MARKER_SWAP_TYPE: u64 = 0x1f;
/// Granules checked under one lock (bounded so the guest is never held up for long).
const GRANULES_PER_STEP: u64 = 64;

/// Errors running the checker.
#[derive(Debug, thiserror::Error)]
pub enum CoherenceError {
    /// `/proc/self/pagemap` cannot be read.
    #[error("cannot read /proc/self/pagemap ({0}); the coherence checker needs procfs")]
    Pagemap(std::io::Error),
    /// `mincore` failed on guest RAM.
    #[error("mincore on guest RAM at {hva:#x} failed: {source}")]
    Mincore {
        /// Host address.
        hva: u64,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What disagreed about one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Disagreement {
    /// Host maps it; the table says not populated.
    MappedBehindSmmu,
    /// The table says populated; the host holds no contents.
    Lost,
    /// The pte is write-protected; the table says writable.
    UnexpectedWriteProtect,
    /// The table says write-protected; the pte is writable.
    MissingWriteProtect,
}

impl Disagreement {
    /// What it means, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Disagreement::MappedBehindSmmu => "the host maps a page the smmu holds unpopulated",
            Disagreement::Lost => "the smmu holds the page populated but the host has lost it",
            Disagreement::UnexpectedWriteProtect => "the page is write-protected but the smmu holds it writable",
            Disagreement::MissingWriteProtect => "the smmu holds the page write-protected but it is writable",
        }
    }
}

/// One disagreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    /// Guest-physical address of the granule.
    pub gpa: u64,
    /// What disagreed.
    pub kind: Disagreement,
    /// The table's bits for the granule.
    pub table_bits: u8,
    /// The pagemap entry of the granule's first 4 KiB page.
    pub pagemap: u64,
}

/// Result of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CoherenceReport {
    /// Granules compared.
    pub granules_checked: u64,
    /// Of those, populated according to the table.
    pub granules_populated: u64,
    /// Disagreements found (all of them are counted; the first 32 are listed).
    pub mismatch_count: u64,
    /// The first disagreements.
    pub mismatches: Vec<Mismatch>,
    /// Pages lost behind the VMM's back during the run that the fault engine has since
    /// refilled with zeros (a MISSING fault on a page the table held populated): the host
    /// and the table agree again, but the guest's data there is gone.
    pub lost_and_refilled: u64,
}

impl CoherenceReport {
    /// Whether the table and the host agree everywhere and no page was lost on the way.
    pub fn is_clean(&self) -> bool {
        self.mismatch_count == 0 && self.lost_and_refilled == 0
    }

    /// One line for people: "clean (...)" or what disagreed, without Rust debug output.
    pub fn describe(&self) -> String {
        if self.is_clean() {
            return format!("clean ({} pages checked, {} populated)", self.granules_checked, self.granules_populated);
        }
        let mut parts = Vec::new();
        if self.mismatch_count > 0 {
            let first = self
                .mismatches
                .first()
                .map_or_else(String::new, |m| format!(", first at gpa {:#x}: {}", m.gpa, m.kind.describe()));
            parts.push(format!("{} DISAGREEMENTS{first}", self.mismatch_count));
        }
        if self.lost_and_refilled > 0 {
            parts.push(format!(
                "{} pages LOST behind the VMM's back and refilled with zeros (the guest's data there is gone)",
                self.lost_and_refilled
            ));
        }
        parts.join("; ")
    }

    fn record(&mut self, m: Mismatch) {
        self.mismatch_count += 1;
        if self.mismatches.len() < 32 {
            self.mismatches.push(m);
        }
    }
}

/// Checks every tracked region of `regions` against the host's page tables.
pub fn check(regions: &Regions, table: &PageStateTable, inv: &Invalidation) -> Result<CoherenceReport, CoherenceError> {
    let pagemap = File::open("/proc/self/pagemap").map_err(CoherenceError::Pagemap)?;
    let mut report = CoherenceReport::default();
    for region in regions.iter().filter(|r| r.mode != UffdMode::None) {
        let step = GRANULES_PER_STEP * region.page_bytes;
        let mut gpa = region.guest_addr;
        while gpa < region.guest_addr + region.len {
            let len = step.min(region.guest_addr + region.len - gpa);
            check_step(&pagemap, region, table, inv, GuestRange::new(gpa, len), &mut report)?;
            gpa += len;
        }
    }
    Ok(report)
}

/// Checks one run of granules with their invalidation lock held.
fn check_step(
    pagemap: &File,
    region: &UffdRegion,
    table: &PageStateTable,
    inv: &Invalidation,
    range: GuestRange,
    report: &mut CoherenceReport,
) -> Result<(), CoherenceError> {
    let granule = region.page_bytes;
    // No invalidation of the range is half done while we hold this (see lock_stable).
    let _lock = inv.lock_stable(range);
    let hva = region.host_of(range.gpa);
    let entries = read_pagemap(pagemap, hva, range.len)?;
    let resident = match region.backing {
        RegionBacking::PrivateAnon => None,
        _ => Some(mincore(hva, range.len)?),
    };
    let per_granule = (granule / PAGE_4K) as usize;
    for i in 0..(range.len / granule) as usize {
        let gpa = range.gpa + i as u64 * granule;
        let state = table.get(gpa);
        let entry = entries[i * per_granule];
        let mapped = holds_contents(entry);
        let in_cache = resident.as_ref().is_some_and(|r| r[i * per_granule] & 1 != 0);
        let populated = state.contains(PageState::POPULATED);
        report.granules_checked += 1;
        report.granules_populated += u64::from(populated);
        let mismatch = |kind| Mismatch { gpa, kind, table_bits: state.0, pagemap: entry };
        if mapped && !populated {
            report.record(mismatch(Disagreement::MappedBehindSmmu));
        } else if populated && !mapped && !in_cache && !swapped_out(region, gpa, granule) {
            report.record(mismatch(Disagreement::Lost));
        } else if entry & PM_PRESENT != 0 {
            let pte_wp = entry & PM_UFFD_WP != 0;
            let table_wp = state.contains(PageState::WRITE_PROTECTED);
            if pte_wp && !table_wp {
                report.record(mismatch(Disagreement::UnexpectedWriteProtect));
            } else if table_wp && !pte_wp {
                report.record(mismatch(Disagreement::MissingWriteProtect));
            }
        }
    }
    Ok(())
}

/// A shared page neither mapped nor cached may have been swapped out of the page cache
/// (shmem) by the host: still the guest's page.
fn swapped_out(region: &UffdRegion, gpa: u64, granule: u64) -> bool {
    match &region.backing {
        RegionBacking::Shared { fd, file_offset } => {
            super::swapped::file_has_data(&**fd, file_offset + (gpa - region.guest_addr), granule)
        }
        _ => false,
    }
}

/// Whether a pagemap entry stands for contents: present, or swapped out (or migrating) —
/// but not a pte marker. Without CAP_SYS_ADMIN the kernel hides the frame field (and so
/// the swap type); a swapped entry with the uffd-wp bit and a hidden frame is then taken
/// for the uffd-wp marker it almost always is here (no swap device is needed for it).
pub(super) fn holds_contents(entry: u64) -> bool {
    if entry & PM_PRESENT != 0 {
        return true;
    }
    if entry & PM_SWAPPED == 0 {
        return false;
    }
    let marker =
        entry & PM_SWAP_TYPE == PTE_MARKER_SWAP_TYPE || (entry & PM_FRAME_BITS == 0 && entry & PM_UFFD_WP != 0);
    !marker
}

/// The pagemap entries of the 4 KiB pages of `[hva, hva + len)`.
fn read_pagemap(pagemap: &File, hva: u64, len: u64) -> Result<Vec<u64>, CoherenceError> {
    let pages = (len / PAGE_4K) as usize;
    let mut bytes = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut bytes, hva / PAGE_4K * 8).map_err(CoherenceError::Pagemap)?;
    Ok(bytes.chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// Page-cache residency of the 4 KiB pages of `[hva, hva + len)` (bit 0 of each byte).
fn mincore(hva: u64, len: u64) -> Result<Vec<u8>, CoherenceError> {
    let mut vec = vec![0u8; (len / PAGE_4K) as usize];
    // rustix has no mincore; libc's is the plain syscall.
    // SAFETY: `hva..hva+len` is inside a live guest RAM mapping (page aligned), and `vec`
    // has one byte per 4 KiB page of it, as mincore requires.
    let rc = unsafe { libc::mincore(hva as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(CoherenceError::Mincore { hva, source: std::io::Error::last_os_error() });
    }
    Ok(vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pte_markers_are_not_contents_whether_or_not_frames_are_visible() {
        assert!(holds_contents(PM_PRESENT | 0x1234));
        assert!(!holds_contents(0));
        // Seen on this host (root): swapped, uffd-wp, swap type 31, offset 1.
        assert!(!holds_contents(0x4200_0000_0000_003f));
        // The same marker read without CAP_SYS_ADMIN: frame hidden.
        assert!(!holds_contents(PM_SWAPPED | PM_UFFD_WP));
        // A real swap entry (type 0, some offset), protected or not, holds contents.
        assert!(holds_contents(PM_SWAPPED | (77 << 5)));
        assert!(holds_contents(PM_SWAPPED | PM_UFFD_WP | (77 << 5)));
    }
}
