//! The VMM's own side of the chain, timestamped in the clock the KVM trace uses: every
//! invalidation the VMM makes (balloon, chaos, discards) as its invalidation layer sees
//! it, and every page the fault engine reads from its page source just before it fills
//! it (a userfaultfd fill).

use std::sync::{Arc, Mutex};

use crate::experiments::host_changes::ops::monotonic_ns;
use crate::smmu::invalidation::InvalidationSubscriber;
use crate::smmu::page_source::{PageData, PageSource, PageSourceError};
use crate::smmu::GuestRange;

/// Records kept per log (the rest are counted, not kept).
pub const MAX_LOGGED: usize = 200_000;

/// A timestamped guest-physical range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamped {
    /// The range.
    pub range: GuestRange,
    /// CLOCK_MONOTONIC, ns.
    pub ts_ns: u64,
}

/// A bounded log of stamped ranges.
#[derive(Debug, Default)]
pub struct RangeLog {
    entries: Mutex<(Vec<Stamped>, u64)>,
}

impl RangeLog {
    /// Adds an entry now.
    pub fn note(&self, range: GuestRange) {
        let ts_ns = monotonic_ns();
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.1 += 1;
        if e.0.len() < MAX_LOGGED {
            e.0.push(Stamped { range, ts_ns });
        }
    }

    /// The entries kept, and how many were noted in all.
    pub fn take(&self) -> (Vec<Stamped>, u64) {
        std::mem::take(&mut *self.entries.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// An invalidation subscriber that logs each invalidation the VMM makes.
#[derive(Debug, Default)]
pub struct InvalidationLog(pub RangeLog);

impl InvalidationSubscriber for InvalidationLog {
    fn invalidate(&self, range: GuestRange) {
        self.0.note(range);
    }
}

/// A page source that logs each page it serves, then asks the real source.
pub struct RecordingSource {
    inner: Arc<dyn PageSource>,
    log: Arc<RangeLog>,
}

impl RecordingSource {
    /// Wraps `inner`, logging into `log`.
    pub fn new(inner: Arc<dyn PageSource>, log: Arc<RangeLog>) -> Self {
        RecordingSource { inner, log }
    }
}

impl PageSource for RecordingSource {
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        self.log.note(GuestRange::new(gpa, buf.len() as u64));
        self.inner.read_page(gpa, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smmu::page_source::ZeroSource;

    #[test]
    fn logs_in_order_and_count_past_the_cap() {
        let log = Arc::new(RangeLog::default());
        let source = RecordingSource::new(Arc::new(ZeroSource), log.clone());
        let mut page = vec![0u8; 4096];
        assert_eq!(source.read_page(0x1000, &mut page).unwrap(), PageData::Zero);
        InvalidationLog::default().invalidate(GuestRange::new(0, 4096));
        source.read_page(0x2000, &mut page).unwrap();
        let (entries, total) = log.take();
        assert_eq!(total, 2);
        assert_eq!(entries.iter().map(|e| e.range.gpa).collect::<Vec<_>>(), vec![0x1000, 0x2000]);
        assert!(entries[0].ts_ns <= entries[1].ts_ns);
    }
}
