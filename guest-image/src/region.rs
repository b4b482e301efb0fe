//! The workload region: all RAM at or above `WORKLOAD_MIN_GPA`, as one linear space of
//! page indices laid over one or more physical ranges (memory zones, RAM above the
//! 3–4 GiB hole).

use core::fmt;

use faultline_abi::{PAGE_SIZE, WORKLOAD_MIN_GPA};

use crate::pvh::{MemmapEntry, MEMMAP_TYPE_RAM};

/// Most physical ranges the region is made of.
pub const MAX_RANGES: usize = 32;

/// A run of pages at consecutive guest physical addresses.
#[derive(Clone, Copy, Default)]
pub struct PageRange {
    /// Guest physical address of the first page.
    pub first_gpa: u64,
    /// Index of the first page in the region.
    pub first_index: u64,
    /// Number of pages.
    pub pages: u64,
}

/// The workload region.
#[derive(Clone, Copy)]
pub struct Region {
    ranges: [PageRange; MAX_RANGES],
    range_count: usize,
    /// Pages in the region.
    pub pages: u64,
    /// Bytes of RAM in the whole memory map (type 1, any address).
    pub ram_bytes: u64,
}

/// Why the region could not be built.
pub enum RegionError {
    /// `fl.size` asks for more than there is.
    TooLarge {
        /// Bytes asked for.
        asked: u64,
        /// Bytes available.
        available: u64,
    },
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionError::TooLarge { asked, available } => write!(
                f,
                "fl.size: {asked} bytes asked for, but the workload region (RAM from 8 MiB up) has only {available}"
            ),
        }
    }
}

impl Region {
    /// Builds the region from the memory map: RAM at or above `WORKLOAD_MIN_GPA` and below
    /// `mapped_limit` (what ring 0 identity-mapped), page-aligned, in address order, capped
    /// to `size_bytes` if given.
    pub fn from_memmap(
        memmap: &[MemmapEntry],
        mapped_limit: u64,
        size_bytes: Option<u64>,
    ) -> Result<Region, RegionError> {
        let mut region = Region { ranges: [PageRange::default(); MAX_RANGES], range_count: 0, pages: 0, ram_bytes: 0 };
        let mut spans = [(0u64, 0u64); MAX_RANGES];
        let mut span_count = 0;
        for entry in memmap.iter().filter(|entry| entry.kind == MEMMAP_TYPE_RAM) {
            region.ram_bytes += entry.size;
            let start = align_up(entry.addr.max(WORKLOAD_MIN_GPA), PAGE_SIZE);
            let end = (entry.addr.saturating_add(entry.size).min(mapped_limit)) & !(PAGE_SIZE - 1);
            if start < end && span_count < MAX_RANGES {
                spans[span_count] = (start, end);
                span_count += 1;
            }
        }
        let spans = &mut spans[..span_count];
        spans.sort_unstable_by_key(|span| span.0);
        let available_pages: u64 = spans.iter().map(|(start, end)| (end - start) / PAGE_SIZE).sum();
        let wanted_pages = match size_bytes {
            Some(asked) if asked > available_pages * PAGE_SIZE => {
                return Err(RegionError::TooLarge { asked, available: available_pages * PAGE_SIZE })
            }
            Some(asked) => asked / PAGE_SIZE,
            None => available_pages,
        };
        let mut last_end = 0;
        for &(start, end) in spans.iter() {
            let start = start.max(last_end); // overlapping entries: count each page once
            if start >= end || region.pages == wanted_pages {
                continue;
            }
            let pages = ((end - start) / PAGE_SIZE).min(wanted_pages - region.pages);
            region.ranges[region.range_count] = PageRange { first_gpa: start, first_index: region.pages, pages };
            region.range_count += 1;
            region.pages += pages;
            last_end = end;
        }
        Ok(region)
    }

    /// The physical ranges, in page-index order.
    pub fn ranges(&self) -> &[PageRange] {
        &self.ranges[..self.range_count]
    }

    /// Guest physical address of the page with region index `index` (< `pages`).
    #[inline]
    pub fn gpa(&self, index: u64) -> u64 {
        for range in self.ranges() {
            if index < range.first_index + range.pages {
                return range.first_gpa + (index - range.first_index) * PAGE_SIZE;
            }
        }
        panic!("page index {index} outside the region of {} pages", self.pages)
    }

    /// Calls `f(index, gpa)` for the pages `first..end` of the region, in order.
    pub fn for_each_page(&self, first: u64, end: u64, mut f: impl FnMut(u64, u64)) {
        for range in self.ranges() {
            let lo = first.max(range.first_index);
            let hi = end.min(range.first_index + range.pages);
            for index in lo..hi {
                f(index, range.first_gpa + (index - range.first_index) * PAGE_SIZE);
            }
        }
    }

    /// The contiguous share `first..end` of `total` items that CPU `cpu` of `cpus` handles.
    pub fn share(total: u64, cpu: u32, cpus: u32) -> (u64, u64) {
        let part = |c: u64| (u128::from(total) * u128::from(c) / u128::from(cpus)) as u64;
        (part(u64::from(cpu)), part(u64::from(cpu) + 1))
    }
}

fn align_up(value: u64, align: u64) -> u64 {
    (value + align - 1) & !(align - 1)
}
