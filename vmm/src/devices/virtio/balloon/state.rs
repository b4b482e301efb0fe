//! What the balloon's queue processing and its handle share: the counters, the
//! interrupt, the guest's latest statistics, the last error and the observer. The handle
//! ([`super::handle`]) and the queue processing ([`super::runtime`]) both build on this
//! module, which uses neither, so they need not import each other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::stats::GuestStats;
use crate::devices::virtio::VirtioInterrupt;

/// Atomic counters, updated on vCPU threads.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub inflated: AtomicU64,
    pub deflated: AtomicU64,
    pub reported: AtomicU64,
    pub bytes_discarded: AtomicU64,
    pub huge_freed: AtomicU64,
    pub zeroed: AtomicU64,
    pub invalid_pfns: AtomicU64,
    pub redundant_pfns: AtomicU64,
    pub discard_errors: AtomicU64,
    pub device_errors: AtomicU64,
}

/// Adds `n` to a counter.
pub(super) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// What a [`BalloonObserver`] is told, on the device's thread, at the moment it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalloonEvent {
    /// An empty balloon is about to take its first page.
    InflatingFromEmpty,
    /// The guest wrote `actual` (pages).
    ActualWritten {
        /// The guest's `actual`.
        actual: u32,
        /// The target at that moment.
        target: u32,
    },
}

/// Observes the balloon (e.g. `experiments::balloon_watch` measures host memory exactly
/// when the balloon starts inflating and when it reaches a target: a sampling thread can
/// be starved by busy vCPUs at just those moments).
pub type BalloonObserver = Box<dyn Fn(BalloonEvent) + Send + Sync>;

/// The state the device's queue processing updates and the handle reads.
pub(super) struct DeviceState {
    pub counters: Counters,
    pub interrupt: Arc<VirtioInterrupt>,
    stats: Mutex<Option<(GuestStats, Instant)>>,
    last_error: Mutex<Option<String>>,
    invalid_pfn_logged: AtomicBool,
    observer: Mutex<Option<BalloonObserver>>,
}

impl DeviceState {
    pub fn new(interrupt: Arc<VirtioInterrupt>) -> Self {
        Self {
            counters: Counters::default(),
            interrupt,
            stats: Mutex::new(None),
            last_error: Mutex::new(None),
            invalid_pfn_logged: AtomicBool::new(false),
            observer: Mutex::new(None),
        }
    }

    pub fn set_observer(&self, observer: BalloonObserver) {
        *self.observer.lock().unwrap_or_else(|e| e.into_inner()) = Some(observer);
    }

    pub fn notify(&self, event: BalloonEvent) {
        if let Some(observer) = self.observer.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            observer(event);
        }
    }

    pub fn stats(&self) -> Option<GuestStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(s, _)| s.clone())
    }

    pub fn stats_age(&self) -> Option<Duration> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(_, at)| at.elapsed())
    }

    pub fn store_stats(&self, values: std::collections::BTreeMap<String, u64>) {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let updates = stats.as_ref().map_or(0, |(s, _)| s.updates) + 1;
        *stats = Some((GuestStats { values, updates }, Instant::now()));
    }

    /// The latest statistics without their age (for a saved state).
    pub fn saved_stats(&self) -> Option<GuestStats> {
        self.stats()
    }

    /// Puts saved statistics back; their age starts again at the restore.
    pub fn restore_stats(&self, stats: Option<GuestStats>) {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats.map(|s| (s, Instant::now()));
    }

    /// Puts a saved last error back (the error counter is restored with the counters).
    pub fn restore_last_error(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    pub fn record_error(&self, error: &str) {
        add(&self.counters.device_errors, 1);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Counts a PFN that is not guest RAM; logs the first one.
    pub fn invalid_pfn(&self, pfn: u64) {
        add(&self.counters.invalid_pfns, 1);
        if !self.invalid_pfn_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "balloon: the guest sent PFN {pfn:#x}, which is not guest RAM; skipped (further ones are only counted)"
            );
        }
    }
}
