//! The pages of guest RAM the VMM itself changed: written (a device's used ring, a
//! zeroed balloon page) or discarded (balloon, free page reporting, any
//! [`Discarder::discard`](super::discard::Discarder::discard)).
//!
//! KVM's dirty log sees only the guest's own writes; a diff snapshot must also carry
//! every page the VMM changed behind the guest's back, or a chain would restore the
//! parent's old bytes there. The snapshot layer unites this set with the dirty log in
//! the same pause and takes both ([`VmmWrites::take`]), so nothing falls between two
//! snapshots.
//!
//! One bit per 4 KiB page (hugetlb regions too: the snapshot rounds to its unit), set
//! with one atomic OR per word, so vCPU threads and device threads never wait for one
//! another here.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{GuestRange, Regions, PAGE_4K};

#[derive(Debug)]
struct RegionBits {
    gpa: u64,
    len: u64,
    words: Vec<AtomicU64>,
}

/// The set of 4 KiB pages the VMM wrote or discarded since the last [`VmmWrites::take`].
#[derive(Debug)]
pub struct VmmWrites {
    regions: Vec<RegionBits>,
}

impl VmmWrites {
    /// An empty set over `regions`.
    pub fn new(regions: &Regions) -> Self {
        let regions = regions
            .iter()
            .map(|r| RegionBits {
                gpa: r.guest_addr,
                len: r.len,
                words: (0..(r.len / PAGE_4K).div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            })
            .collect();
        Self { regions }
    }

    /// Records that the VMM changed every 4 KiB page touching `range` (parts outside
    /// guest RAM are ignored).
    pub fn mark(&self, range: GuestRange) {
        if range.len == 0 {
            return;
        }
        for r in &self.regions {
            let Some(part) = GuestRange::new(r.gpa, r.len).intersect(&range) else { continue };
            let first = (part.gpa - r.gpa) / PAGE_4K;
            let last = (part.end() - 1 - r.gpa) / PAGE_4K;
            let mut page = first;
            while page <= last {
                let word = page / 64;
                let in_word_last = last.min(word * 64 + 63);
                let bits = if in_word_last - page == 63 {
                    u64::MAX
                } else {
                    ((1u64 << (in_word_last - page + 1)) - 1) << (page % 64)
                };
                r.words[word as usize].fetch_or(bits, Ordering::AcqRel);
                page = in_word_last + 1;
            }
        }
    }

    /// The marked pages' guest-physical addresses (sorted within each region, regions
    /// in order), clearing the set.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for r in &self.regions {
            for (index, word) in r.words.iter().enumerate() {
                let mut bits = word.swap(0, Ordering::AcqRel);
                while bits != 0 {
                    let bit = bits.trailing_zeros() as u64;
                    out.push(r.gpa + (index as u64 * 64 + bit) * PAGE_4K);
                    bits &= bits - 1;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smmu::UffdRegion;

    #[test]
    fn marks_round_out_to_pages_span_words_and_take_clears() {
        let regions = Regions::new(vec![
            UffdRegion::unmapped_for_tests(0, 1 << 20, PAGE_4K, false),
            UffdRegion::unmapped_for_tests(4 << 30, 1 << 20, PAGE_4K, false),
        ]);
        let writes = VmmWrites::new(&regions);
        writes.mark(GuestRange::new(0x1800, 0x10)); // inside page 1
        writes.mark(GuestRange::new(62 * PAGE_4K, 4 * PAGE_4K)); // pages 62..66, two words
        writes.mark(GuestRange::new((1 << 20) - PAGE_4K, 2 * PAGE_4K)); // last page, then not RAM
        writes.mark(GuestRange::new(4 << 30, 1)); // the second region
        let want: Vec<u64> = [1, 62, 63, 64, 65, 255].iter().map(|p| p * PAGE_4K).chain([4 << 30]).collect();
        assert_eq!(writes.take(), want);
        assert!(writes.take().is_empty(), "take clears the set");
        writes.mark(GuestRange::new(0, 64 * PAGE_4K)); // a whole word at once
        assert_eq!(writes.take().len(), 64);
    }
}
