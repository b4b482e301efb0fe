//! The chaos driver: a VMM thread that discards, write-protects and unprotects random
//! ranges of the guest's workload region while the guest runs `churn` — the stress test of
//! the secondary-MMU invariant ("after an invalidation of a range returns, nothing maps
//! its old contents"). The guest checks that every word it reads is zero or its previous
//! round's pattern; the driver counts what it did.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use faultline_abi as abi;

use crate::config::ChaosConfig;
use crate::smmu::discard::Discarder;
use crate::smmu::{GuestRange, Regions, PAGE_4K};
use crate::vstate::VmControl;

/// What the driver did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChaosReport {
    /// Operations done.
    pub events: u64,
    /// Discards.
    pub discards: u64,
    /// Write-protects.
    pub write_protects: u64,
    /// Unprotects.
    pub unprotects: u64,
    /// Bytes given back by discards.
    pub bytes_discarded: u64,
    /// Discarded ranges that only partly covered a huge page (those parts were kept).
    pub partial_huge_pages: u64,
    /// Operations that failed (the first few messages are kept).
    pub errors: u64,
    /// The first error messages.
    pub first_errors: Vec<String>,
}

/// The workload region of the built-in guest: guest RAM from `abi::WORKLOAD_MIN_GPA`
/// on, across zones, limited to `size_bytes` when given.
pub fn workload_segments(ram_ranges: &[(u64, u64)], size_bytes: Option<u64>) -> Vec<GuestRange> {
    let mut left = size_bytes.unwrap_or(u64::MAX);
    let mut out = Vec::new();
    for &(gpa, len) in ram_ranges {
        let start = gpa.max(abi::WORKLOAD_MIN_GPA);
        let end = gpa + len;
        if start >= end || left == 0 {
            continue;
        }
        let take = (end - start).min(left);
        out.push(GuestRange::new(start, take));
        left -= take;
    }
    out
}

/// Runs the driver on this thread until `config.events` operations are done or the VM
/// stops; then sets `done` (the guest's step-control port) so the guest ends its step.
pub fn run(
    config: &ChaosConfig,
    discarder: &Discarder,
    regions: &Regions,
    segments: &[GuestRange],
    control: &VmControl,
    done: &AtomicBool,
) -> ChaosReport {
    // Set however this returns (a panic included), or the guest's churn never ends.
    let _done = SetOnDrop(done);
    let mut report = ChaosReport::default();
    let total_pages: u64 = segments.iter().map(|s| s.len / PAGE_4K).sum();
    let mut misses = 0u32;
    let mut rng = config.seed;
    let mut next = || {
        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        abi::splitmix64(rng)
    };
    while report.events < config.events && total_pages > 0 && !control.is_stopping() {
        let Some(range) = pick_range(next(), next(), config.max_pages, total_pages, segments, regions) else {
            misses += 1;
            if misses == MAX_MISSES {
                report.errors += 1;
                report.first_errors.push(format!(
                    "no whole page of the guest's memory fits in its workload region ({} bytes from {:#x}); give a larger --size",
                    segments.iter().map(|s| s.len).sum::<u64>(),
                    abi::WORKLOAD_MIN_GPA
                ));
                break;
            }
            continue;
        };
        misses = 0;
        let op = if config.discards { next() % 4 } else { 2 + next() % 2 };
        let result = match op {
            0 | 1 => discarder.discard(range).map(|r| {
                report.discards += 1;
                report.bytes_discarded += r.freed.iter().map(|f| f.len).sum::<u64>();
                report.partial_huge_pages += r.partial_huge_pages.len() as u64;
            }),
            2 => discarder.write_protect(range).map(|()| report.write_protects += 1),
            _ => discarder.unprotect(range).map(|()| report.unprotects += 1),
        };
        if let Err(e) = result {
            report.errors += 1;
            if report.first_errors.len() < 8 {
                report.first_errors.push(e.to_string());
            }
        }
        report.events += 1;
        if config.interval_us > 0 {
            std::thread::sleep(Duration::from_micros(config.interval_us));
        }
    }
    report
}

/// Consecutive draws with no range that fit before the driver gives up.
const MAX_MISSES: u32 = 10_000;

/// Sets the flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A random range of up to `max_pages` 4 KiB pages inside one segment and one region,
/// aligned to the region's page size (a hugetlb region gets whole 2 MiB pages).
fn pick_range(
    r1: u64,
    r2: u64,
    max_pages: u64,
    total_pages: u64,
    segments: &[GuestRange],
    regions: &Regions,
) -> Option<GuestRange> {
    let mut page = r1 % total_pages;
    let segment = segments.iter().find(|s| {
        let pages = s.len / PAGE_4K;
        if page < pages {
            return true;
        }
        page -= pages;
        false
    })?;
    let gpa = segment.gpa + page * PAGE_4K;
    let region = regions.by_gpa(gpa)?;
    let granule = region.page_bytes;
    let start = gpa / granule * granule;
    let limit = segment.end().min(region.guest_addr + region.len);
    let granules = (max_pages.saturating_mul(PAGE_4K) / granule).max(1);
    let len = (1 + r2 % granules) * granule;
    let end = (start + len).min(limit / granule * granule);
    (start >= segment.gpa && end > start).then(|| GuestRange::new(start, end - start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smmu::{UffdRegion, PAGE_2M};

    fn region(gpa: u64, len: u64, page_bytes: u64) -> UffdRegion {
        UffdRegion::unmapped_for_tests(gpa, len, page_bytes, true)
    }

    #[test]
    fn workload_segments_start_at_8m_and_stop_at_the_size() {
        let ranges = [(0, 3 << 30), (4 << 30, 1 << 30)];
        assert_eq!(
            workload_segments(&ranges, None),
            vec![GuestRange::new(8 << 20, (3 << 30) - (8 << 20)), GuestRange::new(4 << 30, 1 << 30)]
        );
        assert_eq!(workload_segments(&ranges, Some(16 << 20)), vec![GuestRange::new(8 << 20, 16 << 20)]);
    }

    #[test]
    fn ranges_stay_inside_the_workload_and_are_aligned_to_their_region() {
        let regions = Regions::new(vec![region(0, 64 << 20, PAGE_4K), region(64 << 20, 64 << 20, PAGE_2M)]);
        let segments = workload_segments(&[(0, 128 << 20)], None);
        let total = segments.iter().map(|s| s.len / PAGE_4K).sum();
        let mut seen_huge = false;
        for i in 0..10_000u64 {
            let Some(r) = pick_range(abi::splitmix64(i), abi::splitmix64(i + 7), 64, total, &segments, &regions) else {
                continue;
            };
            assert!(r.gpa >= 8 << 20 && r.end() <= 128 << 20, "{r:?}");
            let g = regions.by_gpa(r.gpa).unwrap().page_bytes;
            assert_eq!((r.gpa % g, r.len % g), (0, 0), "{r:?}");
            assert!(regions.by_gpa(r.end() - 1).unwrap().page_bytes == g, "one region: {r:?}");
            assert!(g == PAGE_2M || r.len <= 64 * PAGE_4K);
            seen_huge |= g == PAGE_2M;
        }
        assert!(seen_huge);
    }
}
