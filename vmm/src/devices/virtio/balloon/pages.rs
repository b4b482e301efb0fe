//! Which 4 KiB pages of guest RAM are in the balloon: one bit per page per RAM region,
//! with the per-huge-page counts that decide when a hugetlb page (2 MiB or 1 GiB) can be
//! freed, and the coalescing of page lists into contiguous runs for the discarder.

use crate::smmu::{GuestRange, Regions, PAGE_4K};

/// Errors looking up a balloon page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    /// The page is not guest RAM (beyond RAM, in the MMIO hole, or not 4 KiB aligned).
    #[error("guest page {0:#x} is not in guest RAM; the driver sent a bad PFN")]
    NotRam(u64),
}

#[derive(Debug)]
struct RegionBits {
    gpa: u64,
    len: u64,
    /// The region's page size: 4 KiB, or its huge page size for hugetlb.
    granule: u64,
    bits: Vec<u64>,
}

impl RegionBits {
    fn index(&self, gpa: u64) -> Option<usize> {
        (gpa >= self.gpa && gpa - self.gpa < self.len).then(|| ((gpa - self.gpa) / PAGE_4K) as usize)
    }

    fn huge(&self) -> bool {
        self.granule > PAGE_4K
    }

    /// The bitmap words of one huge page (a 64-page multiple: 2 MiB is 8 words).
    fn words_per_huge(&self) -> usize {
        (self.granule / PAGE_4K / 64) as usize
    }
}

/// The balloon's pages, by guest RAM region.
#[derive(Debug)]
pub struct BalloonPages {
    regions: Vec<RegionBits>,
    count: u64,
}

impl BalloonPages {
    /// An empty balloon over `regions` (hugetlb regions are those with 2 MiB pages).
    pub fn new(regions: &Regions) -> Self {
        let regions = regions
            .iter()
            .map(|r| RegionBits {
                gpa: r.guest_addr,
                len: r.len,
                granule: r.page_bytes.max(PAGE_4K),
                bits: vec![0; (r.len / PAGE_4K).div_ceil(64) as usize],
            })
            .collect();
        Self { regions, count: 0 }
    }

    fn locate(&mut self, gpa: u64) -> Result<(&mut RegionBits, usize), PageError> {
        if !gpa.is_multiple_of(PAGE_4K) {
            return Err(PageError::NotRam(gpa));
        }
        self.regions.iter_mut().find_map(|r| r.index(gpa).map(|i| (r, i))).ok_or(PageError::NotRam(gpa))
    }

    /// Whether any region has huge pages (else [`Self::huge_page_of`] is always `None`).
    pub fn has_huge_regions(&self) -> bool {
        self.regions.iter().any(RegionBits::huge)
    }

    /// The huge page containing `gpa`, if `gpa` is in a hugetlb region.
    pub fn huge_page_of(&self, gpa: u64) -> Option<GuestRange> {
        let r = self.regions.iter().find(|r| r.huge() && r.index(gpa).is_some())?;
        Some(GuestRange::new(r.gpa + (gpa - r.gpa) / r.granule * r.granule, r.granule))
    }

    /// Puts the page at `gpa` in the balloon; `Ok(true)` if it was not there yet.
    pub fn insert(&mut self, gpa: u64) -> Result<bool, PageError> {
        let (region, i) = self.locate(gpa)?;
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let new = region.bits[word] & bit == 0;
        region.bits[word] |= bit;
        self.count += new as u64;
        Ok(new)
    }

    /// Takes the page at `gpa` out of the balloon; `Ok(true)` if it was there.
    pub fn remove(&mut self, gpa: u64) -> Result<bool, PageError> {
        let (region, i) = self.locate(gpa)?;
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let was = region.bits[word] & bit != 0;
        region.bits[word] &= !bit;
        self.count -= was as u64;
        Ok(was)
    }

    /// Whether every 4 KiB page of the huge page `huge` (from [`Self::huge_page_of`]) is
    /// in the balloon.
    pub fn huge_page_full(&self, huge: GuestRange) -> bool {
        self.regions.iter().find(|r| r.huge() && r.index(huge.gpa).is_some()).is_some_and(|r| {
            let first = ((huge.gpa - r.gpa) / PAGE_4K / 64) as usize;
            r.bits.get(first..first + r.words_per_huge()).is_some_and(|w| w.iter().all(|&x| x == u64::MAX))
        })
    }

    /// Pages in the balloon.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Hugetlb pages of which some, but not all, 4 KiB pages are in the balloon: memory
    /// the guest gave back that the host cannot free.
    pub fn partial_huge_pages(&self) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.huge())
            .flat_map(|r| r.bits.chunks(r.words_per_huge()).map(|words| (words, r.granule / PAGE_4K)))
            .filter(|(words, pages)| {
                let set: u64 = words.iter().map(|w| w.count_ones() as u64).sum();
                set > 0 && set < *pages
            })
            .count() as u64
    }

    /// Bytes the balloon frees by its bookkeeping: every ballooned page of a 4 KiB region,
    /// and every huge page all of whose pages are ballooned.
    pub fn freed_bytes(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| match r.huge() {
                false => r.bits.iter().map(|w| w.count_ones() as u64).sum::<u64>() * PAGE_4K,
                true => {
                    let full = r.bits.chunks(r.words_per_huge()).filter(|w| w.iter().all(|&x| x == u64::MAX)).count();
                    full as u64 * r.granule
                }
            })
            .sum()
    }

    /// The pages in the balloon as sorted runs of contiguous 4 KiB pages.
    pub fn ranges(&self) -> Vec<GuestRange> {
        let mut out: Vec<GuestRange> = Vec::new();
        for r in &self.regions {
            for (index, &word) in r.bits.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let bit = bits.trailing_zeros() as u64;
                    let gpa = r.gpa + (index as u64 * 64 + bit) * PAGE_4K;
                    match out.last_mut() {
                        Some(last) if last.end() == gpa => last.len += PAGE_4K,
                        _ => out.push(GuestRange::new(gpa, PAGE_4K)),
                    }
                    bits &= bits - 1;
                }
            }
        }
        out
    }

    /// Empties the balloon (device reset: the guest owns all its memory again).
    pub fn clear(&mut self) {
        for r in &mut self.regions {
            r.bits.fill(0);
        }
        self.count = 0;
    }
}

/// Coalesces page addresses (any order, duplicates allowed) into sorted contiguous runs.
pub fn runs(mut gpas: Vec<u64>) -> Vec<GuestRange> {
    gpas.sort_unstable();
    gpas.dedup();
    let mut out: Vec<GuestRange> = Vec::new();
    for gpa in gpas {
        match out.last_mut() {
            Some(last) if last.end() == gpa => last.len += PAGE_4K,
            _ => out.push(GuestRange::new(gpa, PAGE_4K)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smmu::{UffdRegion, PAGE_2M};

    /// 4 KiB pages in a 2 MiB huge page.
    const PAGES_PER_HUGE: u64 = PAGE_2M / PAGE_4K;

    fn region(gpa: u64, len: u64, page_bytes: u64) -> UffdRegion {
        UffdRegion::unmapped_for_tests(gpa, len, page_bytes, false)
    }

    #[test]
    fn runs_sort_dedup_and_merge_adjacent_pages() {
        let gpas = vec![0x5000, 0x3000, 0x4000, 0x4000, 0x9000, 0x1000];
        let want =
            vec![GuestRange::new(0x1000, 0x1000), GuestRange::new(0x3000, 0x3000), GuestRange::new(0x9000, 0x1000)];
        assert_eq!(runs(gpas), want);
        assert!(runs(Vec::new()).is_empty());
    }

    #[test]
    fn insert_remove_count_and_reject_non_ram() {
        let regions = Regions::new(vec![region(0, 1 << 20, PAGE_4K), region(4 << 30, 1 << 20, PAGE_4K)]);
        let mut pages = BalloonPages::new(&regions);
        assert_eq!(pages.insert(0x1000), Ok(true));
        assert_eq!(pages.insert(0x1000), Ok(false));
        assert_eq!(pages.insert((4 << 30) + 0xff000), Ok(true));
        assert_eq!(pages.count(), 2);
        assert_eq!(pages.insert(1 << 20), Err(PageError::NotRam(1 << 20)));
        assert_eq!(pages.insert(0xc000_0000), Err(PageError::NotRam(0xc000_0000)));
        assert_eq!(pages.insert(0x1800), Err(PageError::NotRam(0x1800)));
        assert_eq!(pages.remove(0x1000), Ok(true));
        assert_eq!(pages.remove(0x1000), Ok(false));
        assert_eq!(pages.count(), 1);
        pages.clear();
        assert_eq!(pages.count(), 0);
    }

    #[test]
    fn huge_page_is_full_only_with_all_512_pages_and_partial_ones_are_counted() {
        let regions = Regions::new(vec![region(0, 2 * PAGE_2M, PAGE_2M), region(2 * PAGE_2M, PAGE_2M, PAGE_4K)]);
        let mut pages = BalloonPages::new(&regions);
        for i in 0..PAGES_PER_HUGE - 1 {
            pages.insert(i * PAGE_4K).unwrap();
        }
        let first = GuestRange::new(0, PAGE_2M);
        assert_eq!(pages.huge_page_of(0x1f_f000), Some(first));
        assert!(!pages.huge_page_full(first));
        assert_eq!(pages.partial_huge_pages(), 1);
        pages.insert((PAGES_PER_HUGE - 1) * PAGE_4K).unwrap();
        assert!(pages.huge_page_full(first));
        assert_eq!(pages.partial_huge_pages(), 0);
        assert_eq!(pages.freed_bytes(), PAGE_2M);
        pages.insert(PAGE_2M + 0x5000).unwrap();
        assert_eq!(pages.partial_huge_pages(), 1);
        // 4 KiB regions are never "huge", however full.
        for i in 0..PAGES_PER_HUGE {
            pages.insert(2 * PAGE_2M + i * PAGE_4K).unwrap();
        }
        assert_eq!(pages.huge_page_of(2 * PAGE_2M), None);
        assert!(!pages.huge_page_full(GuestRange::new(2 * PAGE_2M, PAGE_2M)));
        assert_eq!(pages.partial_huge_pages(), 1);
        pages.remove(0x3000).unwrap();
        assert_eq!(pages.partial_huge_pages(), 2);
    }

    #[test]
    fn one_gib_huge_pages_need_all_262144_pages() {
        const GIB: u64 = 1 << 30;
        let regions = Regions::new(vec![region(GIB, GIB, GIB)]);
        let mut pages = BalloonPages::new(&regions);
        let huge = GuestRange::new(GIB, GIB);
        assert_eq!(pages.huge_page_of(GIB + 0x1234_5000), Some(huge));
        for i in 0..GIB / PAGE_4K - 1 {
            pages.insert(GIB + i * PAGE_4K).unwrap();
        }
        assert!(!pages.huge_page_full(huge));
        assert_eq!(pages.partial_huge_pages(), 1);
        pages.insert(2 * GIB - PAGE_4K).unwrap();
        assert!(pages.huge_page_full(huge));
        assert_eq!(pages.partial_huge_pages(), 0);
    }
}
