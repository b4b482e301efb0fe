//! Measures what a balloon really gives back: host memory held by guest RAM
//! (`memory::accounting`: RSS of private memory, allocated blocks of memfd/file, hugetlb
//! pages) taken by the device at the moments that matter — just before an empty balloon
//! inflates, and when the guest reports having reached a target — so the report can set
//! "memory freed" against "balloon size" and time the inflation. (A sampling thread would
//! be starved by busy vCPUs at exactly those moments on a small host.)

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::devices::virtio::balloon::{BalloonCounters, BalloonEvent, BalloonHandle};
use crate::memory::accounting;
use crate::smmu::Regions;

/// 4 KiB: the balloon's page.
const BALLOON_PAGE: u64 = 4096;

/// What the balloon did to host memory.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BalloonReport {
    /// The largest target the guest reached, bytes.
    pub peak_balloon_bytes: u64,
    /// Guest RAM held on the host just before the balloon first inflated, bytes.
    pub held_before_bytes: u64,
    /// Guest RAM held on the host when the guest reached the largest target, bytes.
    pub held_at_peak_bytes: u64,
    /// `held_before - held_at_peak`: host memory the inflation really freed.
    pub freed_bytes: u64,
    /// `freed / peak_balloon`: 1.0 when every ballooned byte came back to the host (more
    /// when free page reporting freed some too).
    pub freed_ratio: f64,
    /// From the first inflation to the guest reporting the largest target, milliseconds
    /// (includes the guest picking its pages and posting them).
    pub inflate_ms: f64,
    /// Guest RAM held at the end, bytes.
    pub held_at_end_bytes: u64,
    /// Targets the guest reached.
    pub targets_reached: u64,
    /// The device's counters at the end.
    pub device: BalloonCounters,
}

#[derive(Default)]
struct State {
    report: BalloonReport,
    inflating_since: Option<Instant>,
}

/// Watches one balloon.
pub struct BalloonWatch {
    regions: Arc<Regions>,
    state: Mutex<State>,
}

impl BalloonWatch {
    /// Starts watching `handle`'s events.
    pub fn attach(handle: &BalloonHandle, regions: Arc<Regions>) -> Arc<Self> {
        let watch = Arc::new(BalloonWatch { regions, state: Mutex::new(State::default()) });
        let observer = watch.clone();
        handle.set_observer(Box::new(move |event| observer.on_event(event)));
        watch
    }

    fn held(&self) -> u64 {
        accounting::measure(&self.regions).map(|h| h.total_bytes()).unwrap_or(0)
    }

    fn on_event(&self, event: BalloonEvent) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            BalloonEvent::InflatingFromEmpty => {
                if state.inflating_since.is_none() {
                    state.report.held_before_bytes = self.held();
                    state.inflating_since = Some(Instant::now());
                }
            }
            BalloonEvent::ActualWritten { actual, target } if actual == target => {
                state.report.targets_reached += 1;
                let bytes = u64::from(actual) * BALLOON_PAGE;
                if bytes > state.report.peak_balloon_bytes {
                    // The clock first: measuring host memory walks guest RAM's page
                    // tables, which is not part of the inflation.
                    if let Some(since) = state.inflating_since {
                        state.report.inflate_ms = since.elapsed().as_secs_f64() * 1e3;
                    }
                    state.report.peak_balloon_bytes = bytes;
                    state.report.held_at_peak_bytes = self.held();
                }
            }
            BalloonEvent::ActualWritten { .. } => {}
        }
    }

    /// The report, with the device's counters and what is held now.
    pub fn report(&self, handle: &BalloonHandle) -> BalloonReport {
        let mut report = self.state.lock().unwrap_or_else(|e| e.into_inner()).report.clone();
        report.freed_bytes = report.held_before_bytes.saturating_sub(report.held_at_peak_bytes);
        if report.peak_balloon_bytes > 0 {
            report.freed_ratio = report.freed_bytes as f64 / report.peak_balloon_bytes as f64;
        }
        report.held_at_end_bytes = self.held();
        report.device = handle.counters();
        report
    }
}
