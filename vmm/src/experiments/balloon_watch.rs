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
    /// The largest balloon the guest gave, bytes (whether or not it reached its target).
    pub peak_balloon_bytes: u64,
    /// The largest target asked for, bytes.
    pub largest_target_bytes: u64,
    /// Whether the guest reached the target it was asked for at its peak (false when it
    /// could give no more, e.g. a target above its workload region).
    pub peak_reached_target: bool,
    /// Guest RAM held on the host just before the balloon first inflated, bytes.
    pub held_before_bytes: u64,
    /// Guest RAM held on the host when the balloon was at its peak, bytes.
    pub held_at_peak_bytes: u64,
    /// `held_before - held_at_peak`: host memory the inflation really freed.
    pub freed_bytes: u64,
    /// `freed / peak_balloon`: 1.0 when every ballooned byte came back to the host (more
    /// when free page reporting freed some too).
    pub freed_ratio: f64,
    /// From the first inflation to the balloon reaching its peak, milliseconds (includes
    /// the guest picking its pages and posting them).
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
    /// The peak has grown since host memory was last measured at it.
    peak_unmeasured: bool,
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
            BalloonEvent::ActualWritten { actual, target } => {
                let (bytes, target_bytes) = (u64::from(actual) * BALLOON_PAGE, u64::from(target) * BALLOON_PAGE);
                let report = &mut state.report;
                report.largest_target_bytes = report.largest_target_bytes.max(target_bytes);
                if actual == target {
                    report.targets_reached += 1;
                }
                if bytes > report.peak_balloon_bytes {
                    // A new peak, reached or not: the guest may never get to its target
                    // (it can give only its workload region). Host memory is measured
                    // once the guest stops growing the balloon, not on every batch: a
                    // measurement reads the whole pagemap.
                    report.peak_balloon_bytes = bytes;
                    report.peak_reached_target = actual == target;
                    state.peak_unmeasured = true;
                    if let Some(since) = state.inflating_since {
                        state.report.inflate_ms = since.elapsed().as_secs_f64() * 1e3;
                    }
                    if actual == target {
                        self.measure_peak(&mut state);
                    }
                } else if state.peak_unmeasured {
                    // The balloon stopped growing (it deflates, or the guest wrote the
                    // same size again): the host still holds what it held at the peak.
                    self.measure_peak(&mut state);
                }
            }
        }
    }

    /// The guest reports it has followed a target change, as far as it could: if the
    /// balloon grew since host memory was last measured, measure it now (later steps may
    /// touch the guest's RAM again).
    pub fn guest_followed_change(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.peak_unmeasured {
            self.measure_peak(&mut state);
        }
    }

    fn measure_peak(&self, state: &mut State) {
        state.report.held_at_peak_bytes = self.held();
        state.peak_unmeasured = false;
    }

    /// The report, with the device's counters and what is held now.
    pub fn report(&self, handle: &BalloonHandle) -> BalloonReport {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.peak_unmeasured {
            // The guest never reached its target and the balloon stayed at its peak.
            self.measure_peak(&mut state);
        }
        let mut report = state.report.clone();
        drop(state);
        report.freed_bytes = report.held_before_bytes.saturating_sub(report.held_at_peak_bytes);
        if report.peak_balloon_bytes > 0 {
            report.freed_ratio = report.freed_bytes as f64 / report.peak_balloon_bytes as f64;
        }
        report.held_at_end_bytes = self.held();
        report.device = handle.counters();
        report
    }
}
