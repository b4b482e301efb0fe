//! The per-page state table of guest RAM: populated, write-protected, dirty, discarded.
//!
//! Four bits per page (per huge page for hugetlb regions: the granule is the region's page
//! size), sixteen pages per `AtomicU64`. Updates are single atomic read-modify-write
//! operations on a word, so faults on different pages never wait for one another here.
//! Ordering against invalidations is not this table's job: the fault engine marks pages
//! while holding the invalidation layer's lock for the range (see [`super::invalidation`]),
//! and invalidators mark between `invalidate_range_start` and `invalidate_range_end`.
//!
//! A snapshot saves the table's discarded and write-protected ranges
//! ([`PageStateTableState`]); a restore applies them (`GuestPaging::restore_page_state`).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::GuestRange;

/// Errors from the state table.
#[derive(Debug, thiserror::Error)]
pub enum PageStateError {
    /// A region is not a whole number of granules.
    #[error("region at gpa {gpa:#x} of {len:#x} bytes is not a multiple of its {granule:#x}-byte page size; fix the memory layout")]
    Misaligned {
        /// Region start.
        gpa: u64,
        /// Region length.
        len: u64,
        /// Page size of the region.
        granule: u64,
    },
}

/// A set of page state bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageState(pub u8);

impl PageState {
    /// A page is mapped on the host (installed by the fault engine or known present).
    pub const POPULATED: PageState = PageState(1);
    /// Writes to the page raise a write-protect fault.
    pub const WRITE_PROTECTED: PageState = PageState(2);
    /// The page was written since it was last write-protected.
    pub const DIRTY: PageState = PageState(4);
    /// The page was given back (discarded); it reads as zeros until written.
    pub const DISCARDED: PageState = PageState(8);
    /// No bits.
    pub const EMPTY: PageState = PageState(0);

    /// Both sets' bits.
    pub const fn union(self, o: PageState) -> PageState {
        PageState(self.0 | o.0)
    }

    /// Whether every bit of `o` is set.
    pub const fn contains(self, o: PageState) -> bool {
        self.0 & o.0 == o.0
    }
}

const BITS_PER_PAGE: u64 = 4;
const PAGES_PER_WORD: u64 = 64 / BITS_PER_PAGE;

/// `bits` repeated in every page's slot of a word.
const fn spread(bits: PageState) -> u64 {
    (bits.0 as u64 & 0xf) * 0x1111_1111_1111_1111
}

#[derive(Debug)]
struct RegionTable {
    gpa: u64,
    len: u64,
    granule: u64,
    words: Vec<AtomicU64>,
}

impl RegionTable {
    fn pages(&self) -> u64 {
        self.len / self.granule
    }
}

/// The state table for all guest RAM regions.
#[derive(Debug)]
pub struct PageStateTable {
    regions: Vec<RegionTable>,
}

impl PageStateTable {
    /// A table for regions given as `(gpa, len, granule)`; every page starts empty
    /// (not populated).
    pub fn new(regions: &[(u64, u64, u64)]) -> Result<Self, PageStateError> {
        let mut out = Vec::with_capacity(regions.len());
        for &(gpa, len, granule) in regions {
            if granule == 0 || len % granule != 0 || gpa % granule != 0 {
                return Err(PageStateError::Misaligned { gpa, len, granule });
            }
            let words = (len / granule).div_ceil(PAGES_PER_WORD);
            out.push(RegionTable { gpa, len, granule, words: (0..words).map(|_| AtomicU64::new(0)).collect() });
        }
        Ok(Self { regions: out })
    }

    fn region(&self, gpa: u64) -> Option<&RegionTable> {
        self.regions.iter().find(|r| gpa >= r.gpa && gpa - r.gpa < r.len)
    }

    /// The page size (granule) at `gpa`, if it is guest RAM.
    pub fn granule(&self, gpa: u64) -> Option<u64> {
        self.region(gpa).map(|r| r.granule)
    }

    /// The state of the page containing `gpa` (empty if outside guest RAM).
    pub fn get(&self, gpa: u64) -> PageState {
        let Some(r) = self.region(gpa) else {
            return PageState::EMPTY;
        };
        let page = (gpa - r.gpa) / r.granule;
        let word = r.words[(page / PAGES_PER_WORD) as usize].load(Ordering::Acquire);
        PageState(((word >> ((page % PAGES_PER_WORD) * BITS_PER_PAGE)) & 0xf) as u8)
    }

    /// Marks `range` discarded: not populated, not dirty, not write-protected.
    pub fn mark_discarded(&self, range: GuestRange) {
        let gone = PageState::POPULATED.union(PageState::DIRTY).union(PageState::WRITE_PROTECTED);
        self.update(range, PageState::DISCARDED, gone);
    }

    /// Marks `range` evicted: missing again as it was before it was first populated (not
    /// discarded either, so its next fault asks the page source instead of reading zeros).
    pub fn mark_evicted(&self, range: GuestRange) {
        let gone = PageState::POPULATED.union(PageState::DIRTY).union(PageState::WRITE_PROTECTED);
        self.update(range, PageState::EMPTY, gone.union(PageState::DISCARDED));
    }

    /// For every page touching `range`: sets the bits of `set`, then clears those of
    /// `clear` (each word in one atomic step).
    pub fn update(&self, range: GuestRange, set: PageState, clear: PageState) {
        for r in &self.regions {
            let Some(part) = r.guest_range_intersect(range) else {
                continue;
            };
            let first = (part.gpa - r.gpa) / r.granule;
            let last = (part.end() - 1 - r.gpa) / r.granule;
            let mut page = first;
            while page <= last {
                let w = page / PAGES_PER_WORD;
                let in_word_last = last.min((w + 1) * PAGES_PER_WORD - 1);
                let (mut set_mask, mut keep_mask) = (0u64, !0u64);
                for p in page..=in_word_last {
                    let shift = (p % PAGES_PER_WORD) * BITS_PER_PAGE;
                    set_mask |= (set.0 as u64 & !(clear.0 as u64)) << shift;
                    keep_mask &= !((clear.0 as u64) << shift);
                }
                let word = &r.words[w as usize];
                // One RMW per word so concurrent updates of other pages in it are kept.
                let _ =
                    word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| Some((old & keep_mask) | set_mask));
                page = in_word_last + 1;
            }
        }
    }

    /// Sets `bits` on every page touching `range`.
    pub fn set(&self, range: GuestRange, bits: PageState) {
        self.update(range, bits, PageState::EMPTY);
    }

    /// Clears `bits` on every page touching `range`.
    pub fn clear(&self, range: GuestRange, bits: PageState) {
        self.update(range, PageState::EMPTY, bits);
    }

    /// Number of pages (granules) that have all of `bits`.
    pub fn count(&self, bits: PageState) -> u64 {
        if bits.0.count_ones() == 1 {
            // One bit: a popcount per word (16 pages) instead of a test per page. The
            // table is scanned under a pause (snapshot, migration), so this matters.
            let mask = spread(bits);
            return self
                .regions
                .iter()
                .flat_map(|r| r.words.iter())
                .map(|w| (w.load(Ordering::Acquire) & mask).count_ones() as u64)
                .sum();
        }
        self.pages().filter(|(_, _, s)| s.contains(bits)).count() as u64
    }

    /// Maximal guest ranges whose pages all have every bit of `bits` (e.g. dirty ranges).
    pub fn ranges_with(&self, bits: PageState) -> Vec<GuestRange> {
        let mut out: Vec<GuestRange> = Vec::new();
        let any_of = spread(bits);
        for r in &self.regions {
            for (w, word) in r.words.iter().enumerate() {
                let word = word.load(Ordering::Acquire);
                // A word with none of the bits holds no page with all of them: skip its
                // 16 pages at once (most words, when discards are few).
                if word & any_of == 0 {
                    continue;
                }
                let first = w as u64 * PAGES_PER_WORD;
                for p in first..(first + PAGES_PER_WORD).min(r.pages()) {
                    let s = PageState(((word >> ((p % PAGES_PER_WORD) * BITS_PER_PAGE)) & 0xf) as u8);
                    if !s.contains(bits) {
                        continue;
                    }
                    let gpa = r.gpa + p * r.granule;
                    match out.last_mut() {
                        Some(last) if last.end() == gpa => last.len += r.granule,
                        _ => out.push(GuestRange::new(gpa, r.granule)),
                    }
                }
            }
        }
        out
    }

    /// Every page as `(gpa, granule, state)`, in address order within each region.
    pub fn pages(&self) -> impl Iterator<Item = (u64, u64, PageState)> + '_ {
        self.regions.iter().flat_map(|r| {
            (0..r.pages()).map(move |p| {
                let word = r.words[(p / PAGES_PER_WORD) as usize].load(Ordering::Acquire);
                let s = (word >> ((p % PAGES_PER_WORD) * BITS_PER_PAGE)) & 0xf;
                (r.gpa + p * r.granule, r.granule, PageState(s as u8))
            })
        })
    }
}

/// The saved page-state table: what a restored VM must know about pages that do not
/// come from the snapshot's images.
///
/// - Discarded pages (ballooned, reported free, ...) must come back as zeros and
///   unpopulated, whatever an older link of a snapshot chain holds for them: restore
///   discards them again, which also marks them discarded, so a fault engine under
///   userfaultfd MISSING paging fills them with zeros instead of reading its page source.
/// - Populated pages are not restored as populated: in the new process they are mapped
///   by the eager load (whose writes the fault engine or the kernel maps, marking them)
///   or, on a lazy restore, by the first fault, which reads them from the images
///   ("populated from source"). Their count is kept for `snapshot inspect`-style checks.
/// - Write-protected pages are write-protected again (only VMs with write-protect
///   tracking have any).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageStateTableState {
    /// The table's regions as `(gpa, len, granule)` when saved (a restore onto another
    /// backend may have other granules: discarding again rounds to them).
    pub regions: Vec<(u64, u64, u64)>,
    /// Pages populated when saved.
    pub populated_pages: u64,
    /// Discarded guest ranges `(gpa, len)`, granule-aligned, sorted.
    pub discarded: Vec<(u64, u64)>,
    /// Write-protected guest ranges `(gpa, len)`, sorted.
    pub write_protected: Vec<(u64, u64)>,
}

impl PageStateTable {
    /// The table as saved (see [`PageStateTableState`]).
    pub fn save_state(&self) -> PageStateTableState {
        let pairs = |ranges: Vec<GuestRange>| ranges.into_iter().map(|r| (r.gpa, r.len)).collect();
        PageStateTableState {
            regions: self.regions.iter().map(|r| (r.gpa, r.len, r.granule)).collect(),
            populated_pages: self.count(PageState::POPULATED),
            discarded: pairs(self.ranges_with(PageState::DISCARDED)),
            write_protected: pairs(self.ranges_with(PageState::WRITE_PROTECTED)),
        }
    }
}

impl RegionTable {
    fn guest_range_intersect(&self, range: GuestRange) -> Option<GuestRange> {
        GuestRange::new(self.gpa, self.len).intersect(&range)
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn bits_per_page_are_independent_and_ranges_merge() {
        let t = PageStateTable::new(&[(0, 64 * 4096, 4096), (1 << 32, 4 << 21, 2 << 20)]).unwrap();
        t.set(GuestRange::new(4096 * 15, 4096 * 3), PageState::POPULATED.union(PageState::DIRTY));
        t.clear(GuestRange::new(4096 * 16, 1), PageState::DIRTY);
        assert_eq!(t.get(4096 * 15), PageState(5));
        assert_eq!(t.get(4096 * 16), PageState::POPULATED);
        assert_eq!(t.get(4096 * 18), PageState::EMPTY);
        assert_eq!(t.count(PageState::POPULATED), 3);
        // A 4 KiB range inside a huge page marks the whole huge page.
        t.set(GuestRange::new((1 << 32) + (2 << 20) + 4096, 4096), PageState::DIRTY);
        assert_eq!(t.get((1 << 32) + (2 << 20)), PageState::DIRTY);
        assert_eq!(
            t.ranges_with(PageState::DIRTY),
            vec![
                GuestRange::new(4096 * 15, 4096),
                GuestRange::new(4096 * 17, 4096),
                GuestRange::new((1 << 32) + (2 << 20), 2 << 20)
            ]
        );
    }

    #[test]
    fn the_saved_state_lists_discarded_and_protected_ranges() {
        let t = PageStateTable::new(&[(0, 64 * 4096, 4096), (1 << 32, 4 << 21, 2 << 20)]).unwrap();
        t.set(GuestRange::new(0, 8 * 4096), PageState::POPULATED);
        t.mark_discarded(GuestRange::new(2 * 4096, 3 * 4096));
        t.mark_discarded(GuestRange::new((1 << 32) + (2 << 20), 2 << 20));
        t.set(GuestRange::new(10 * 4096, 4096), PageState::WRITE_PROTECTED);
        let saved = t.save_state();
        assert_eq!(saved.populated_pages, 5);
        assert_eq!(saved.discarded, vec![(2 * 4096, 3 * 4096), ((1 << 32) + (2 << 20), 2 << 20)]);
        assert_eq!(saved.write_protected, vec![(10 * 4096, 4096)]);
    }

    #[test]
    fn concurrent_updates_of_neighbouring_pages_are_not_lost() {
        let t = std::sync::Arc::new(PageStateTable::new(&[(0, 16 * 4096, 4096)]).unwrap());
        let hs: Vec<_> = (0..4u64)
            .map(|i| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for n in 0..2000 {
                        for p in (i * 4)..(i * 4 + 4) {
                            let r = GuestRange::new(p * 4096, 4096);
                            if n % 2 == 0 {
                                t.set(r, PageState::POPULATED);
                            } else {
                                t.update(r, PageState::DIRTY, PageState::EMPTY);
                            }
                        }
                    }
                })
            })
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(t.count(PageState::POPULATED.union(PageState::DIRTY)), 16);
    }
}
