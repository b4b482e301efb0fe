//! The workload region: all RAM at or above `WORKLOAD_MIN_GPA`, as one linear space of
//! page indices laid over one or more physical ranges (memory zones, RAM below and above
//! the 3–4 GiB hole). With `fl.region_stride=N` the region is a sample of that RAM: the
//! first page of every physical range, every Nth page after it and its last page, so a
//! test can prove that every range of a big guest is reached without touching it all.

use core::fmt;

use faultline_abi::{PAGE_SIZE, WORKLOAD_MIN_GPA};

use crate::pvh::{MemmapEntry, MEMMAP_TYPE_RAM};

/// Most RAM ranges of the memory map the region is made of.
pub const MAX_RANGES: usize = 32;
/// Most page runs: a sampled RAM range is two runs (the strided pages, its last page).
const MAX_RUNS: usize = 2 * MAX_RANGES;

/// A run of pages at evenly spaced guest physical addresses.
#[derive(Clone, Copy, Default)]
pub struct PageRange {
    /// Guest physical address of the first page.
    pub first_gpa: u64,
    /// Index of the first page in the region.
    pub first_index: u64,
    /// Number of pages.
    pub pages: u64,
    /// Distance between two pages of the run, in pages (1: consecutive pages).
    pub stride_pages: u64,
}

impl PageRange {
    #[inline]
    fn gpa(&self, index: u64) -> u64 {
        self.first_gpa + (index - self.first_index) * self.stride_pages * PAGE_SIZE
    }
}

/// The workload region.
#[derive(Clone, Copy)]
pub struct Region {
    ranges: [PageRange; MAX_RUNS],
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
    /// `mapped_limit` (what is identity-mapped), page-aligned, in address order, capped to
    /// its first `size_bytes` if given, then sampled every `stride_pages` pages (1: every
    /// page).
    pub fn from_memmap(
        memmap: &[MemmapEntry],
        mapped_limit: u64,
        size_bytes: Option<u64>,
        stride_pages: u64,
    ) -> Result<Region, RegionError> {
        let stride = stride_pages.max(1);
        let mut region = Region { ranges: [PageRange::default(); MAX_RUNS], range_count: 0, pages: 0, ram_bytes: 0 };
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
        let mut last_end = 0;
        for span in spans.iter_mut() {
            span.0 = span.0.max(last_end); // overlapping entries: count each page once
            span.1 = span.1.max(span.0);
            last_end = span.1;
        }
        let available_pages: u64 = spans.iter().map(|(start, end)| (end - start) / PAGE_SIZE).sum();
        let mut unused_pages = match size_bytes {
            Some(asked) if asked > available_pages * PAGE_SIZE => {
                return Err(RegionError::TooLarge { asked, available: available_pages * PAGE_SIZE })
            }
            Some(asked) => asked / PAGE_SIZE,
            None => available_pages,
        };
        for &(start, end) in spans.iter() {
            let pages = ((end - start) / PAGE_SIZE).min(unused_pages);
            unused_pages -= pages;
            // A sampled span: its pages 0, s, 2s, ... and, if not among them, its last one.
            let strided = pages.div_ceil(stride);
            let last = pages > 0 && (pages - 1) % stride != 0;
            for (first_page, count, stride_pages) in
                [(0, strided, stride), (pages.saturating_sub(1), u64::from(last), 1)]
            {
                if count == 0 {
                    continue;
                }
                region.ranges[region.range_count] = PageRange {
                    first_gpa: start + first_page * PAGE_SIZE,
                    first_index: region.pages,
                    pages: count,
                    stride_pages,
                };
                region.range_count += 1;
                region.pages += count;
            }
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
                return range.gpa(index);
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
                f(index, range.gpa(index));
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
