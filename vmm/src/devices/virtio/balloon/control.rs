//! The balloon as the control socket steers it: [`BalloonControl`] for
//! [`BalloonHandle`], so `VmTarget::balloon()` can hand out the device's handle as is.

use crate::api::protocol::BalloonStats;
use crate::api::target::{BalloonControl, BalloonRefused, BalloonSizes};

use super::handle::BalloonHandle;
use super::stats::GuestStats;

impl BalloonControl for BalloonHandle {
    fn sizes(&self) -> BalloonSizes {
        let c = self.counters();
        BalloonSizes {
            target_pages: c.target_pages as u64,
            actual_pages: c.actual_pages as u64,
            host_freed_bytes: Some(c.freed_bytes),
            partial_huge_pages: Some(c.huge_pages_partial),
        }
    }

    fn set_target_pages(&self, pages: u64) -> Result<(), BalloonRefused> {
        let pages = u32::try_from(pages).map_err(|_| {
            BalloonRefused(format!(
                "a balloon of {pages} pages is more than virtio-balloon can express (at most {} 4 KiB pages, 16 TiB)",
                u32::MAX
            ))
        })?;
        self.set_target_pages(pages);
        Ok(())
    }

    /// The latest statistics; also gives the guest its buffer back, so the next call sees
    /// fresher ones (the guest refills it at its own pace).
    fn stats(&self) -> BalloonStats {
        let stats = BalloonHandle::stats(self);
        let age_ms = self.stats_age().map(|age| age.as_millis() as u64);
        self.request_stats();
        stats.map_or_else(BalloonStats::default, |s| protocol_stats(&s, age_ms))
    }
}

/// The protocol's view of the guest's statistics (the spec's values are already bytes
/// for the memory tags).
fn protocol_stats(stats: &GuestStats, age_ms: Option<u64>) -> BalloonStats {
    BalloonStats {
        swap_in_bytes: stats.get(0),
        swap_out_bytes: stats.get(1),
        major_faults: stats.get(2),
        minor_faults: stats.get(3),
        free_bytes: stats.get(4),
        total_bytes: stats.get(5),
        available_bytes: stats.get(6),
        disk_caches_bytes: stats.get(7),
        hugetlb_allocations: stats.get(8),
        hugetlb_failures: stats.get(9),
        age_ms,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn statistics_map_to_the_protocol_by_tag() {
        let values: BTreeMap<String, u64> = [(4u16, 100u64), (5, 200), (6, 150), (9, 1)]
            .iter()
            .map(|&(t, v)| (super::super::stats::tag_name(t), v))
            .collect();
        let s = protocol_stats(&GuestStats { values, updates: 1 }, Some(5));
        assert_eq!(
            (s.free_bytes, s.total_bytes, s.available_bytes, s.hugetlb_failures),
            (Some(100), Some(200), Some(150), Some(1))
        );
        assert_eq!((s.swap_in_bytes, s.age_ms), (None, Some(5)));
    }
}
