//! Watches a balloon while the VM runs and measures what it really gives back: host
//! memory held by guest RAM (`memory::accounting`: RSS of private memory, allocated
//! blocks of memfd/file, hugetlb pages) sampled beside the balloon's size, so the report
//! can set "memory freed" against "balloon size" and time the inflation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::devices::virtio::balloon::{BalloonCounters, BalloonHandle};
use crate::memory::accounting;
use crate::smmu::Regions;
use crate::vstate::VmControl;

/// Time between samples.
const SAMPLE_EVERY: Duration = Duration::from_millis(2);
/// 4 KiB: the balloon's page.
const BALLOON_PAGE: u64 = 4096;

/// What the balloon did to host memory.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BalloonReport {
    /// The largest size the guest gave the balloon, bytes.
    pub peak_balloon_bytes: u64,
    /// Guest RAM held on the host just before the balloon started to inflate, bytes.
    pub held_before_bytes: u64,
    /// Guest RAM held on the host at the balloon's largest size, bytes.
    pub held_at_peak_bytes: u64,
    /// `held_before - held_at_peak`: host memory the inflation really freed.
    pub freed_bytes: u64,
    /// `freed / peak_balloon`: 1.0 when every ballooned byte came back to the host (it can
    /// exceed 1 when free page reporting freed more).
    pub freed_ratio: f64,
    /// From the first ballooned page to the largest size, milliseconds (2 ms sampling).
    pub inflate_ms: f64,
    /// From the first page leaving the largest balloon to the final size, milliseconds
    /// (the built-in guest checks and rewrites each returned page before it reports).
    pub deflate_ms: Option<f64>,
    /// Guest RAM held at the end, bytes.
    pub held_at_end_bytes: u64,
    /// Samples taken.
    pub samples: u64,
    /// The device's counters at the end.
    pub device: BalloonCounters,
}

/// Samples until the VM stops; returns the report. "Before" is measured by the device
/// itself just before its first inflation (a sampling thread can be starved by busy vCPUs
/// exactly then); the peak is the last sample at the balloon's largest size.
pub fn watch(handle: &BalloonHandle, regions: &Arc<Regions>, control: &VmControl) -> BalloonReport {
    let before = Arc::new(AtomicU64::new(u64::MAX));
    let (observed_regions, observed) = (regions.clone(), before.clone());
    handle.set_inflate_observer(Box::new(move || {
        if observed.load(Ordering::Acquire) == u64::MAX {
            let held = accounting::measure(&observed_regions).map(|h| h.total_bytes()).unwrap_or(0);
            observed.store(held, Ordering::Release);
        }
    }));
    let mut report = BalloonReport::default();
    let mut peak_pages = 0u64;
    let (mut first_ballooned, mut peak_at) = (None::<Instant>, None::<Instant>);
    let (mut deflate_started, mut back_at) = (None::<Instant>, None::<Instant>);
    loop {
        let stopping = control.is_stopping();
        let actual = u64::from(handle.actual_pages());
        let held = accounting::measure(regions).map(|h| h.total_bytes()).unwrap_or(0);
        let now = Instant::now();
        report.samples += 1;
        report.held_at_end_bytes = held;
        if actual > 0 && first_ballooned.is_none() {
            first_ballooned = Some(now);
        }
        if actual > peak_pages {
            peak_pages = actual;
            peak_at = Some(now);
            (deflate_started, back_at) = (None, None);
        }
        if actual < peak_pages && deflate_started.is_none() {
            deflate_started = Some(now);
        }
        if actual == peak_pages && actual > 0 {
            // Discards happen before the guest reports `actual`; the latest sample at the
            // peak is the settled one.
            report.held_at_peak_bytes = held;
        }
        if actual < peak_pages && back_at.is_none() && actual == u64::from(handle.target_pages()) {
            back_at = Some(now);
        }
        if stopping {
            break;
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    report.held_before_bytes = match before.load(Ordering::Acquire) {
        u64::MAX => 0,
        held => held,
    };
    report.peak_balloon_bytes = peak_pages * BALLOON_PAGE;
    report.freed_bytes = report.held_before_bytes.saturating_sub(report.held_at_peak_bytes);
    if report.peak_balloon_bytes > 0 {
        report.freed_ratio = report.freed_bytes as f64 / report.peak_balloon_bytes as f64;
    }
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
    if let (Some(first), Some(peak)) = (first_ballooned, peak_at) {
        report.inflate_ms = ms(first, peak);
    }
    report.deflate_ms = deflate_started.zip(back_at).map(|(start, back)| ms(start, back));
    report.device = handle.counters();
    report
}
