//! The balloon's state shared with the rest of the VMM: the host's target, the guest's
//! `actual`, the target schedule, the latest guest statistics and the counters. A
//! [`BalloonHandle`] (`Arc`) lets a control thread read and steer the balloon while the
//! VM runs; the device (on vCPU threads) uses the same state.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::runtime::Runtime;
use super::state::{BalloonEvent, BalloonObserver, DeviceState};
use super::stats::GuestStats;
use crate::devices::virtio::VirtioInterrupt;

/// Counters of what the balloon did, as a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonCounters {
    /// The host's target, in 4 KiB pages.
    pub target_pages: u32,
    /// What the guest says it holds in the balloon (config field `actual`), in pages.
    pub actual_pages: u32,
    /// Pages the device holds as ballooned (from the inflate/deflate queues).
    pub ballooned_pages: u64,
    /// Pages inflated (each counted when it enters the balloon).
    pub inflated_pages: u64,
    /// Pages deflated (each counted when it leaves the balloon).
    pub deflated_pages: u64,
    /// Pages freed through free page reporting (not part of the balloon).
    pub reported_pages: u64,
    /// Bytes of guest RAM given back to the host (balloon and reporting).
    pub bytes_discarded: u64,
    /// Hugetlb pages freed because all their 4 KiB pages were ballooned.
    pub huge_pages_freed: u64,
    /// Hugetlb pages held partially: some of their 4 KiB pages ballooned, not all.
    pub huge_pages_partial: u64,
    /// Host memory the balloon holds freed now, by its bookkeeping: ballooned 4 KiB pages
    /// plus whole ballooned huge pages (true while the guest keeps out of its balloon;
    /// `memory::accounting` measures what the host really holds).
    pub freed_bytes: u64,
    /// Ballooned 4 KiB pages of partially held huge pages that were zeroed instead of
    /// freed (so a deflated page reads as zeros on every backend).
    pub pages_zeroed: u64,
    /// PFNs that were not guest RAM (skipped).
    pub invalid_pfns: u64,
    /// Inflates of pages already in the balloon, deflates of pages not in it (skipped).
    pub redundant_pfns: u64,
    /// Host discard operations that failed (memory not freed; see the log).
    pub discard_errors: u64,
    /// Protocol errors that put the device in DEVICE_NEEDS_RESET.
    pub device_errors: u64,
    /// The last such error.
    pub last_error: Option<String>,
}

/// The balloon as seen from outside the device: target, schedule, statistics, counters.
pub struct BalloonHandle {
    target: AtomicU32,
    actual: AtomicU32,
    schedule: Mutex<VecDeque<u32>>,
    advance_pending: AtomicBool,
    state: DeviceState,
    runtime: Mutex<Runtime>,
}

impl std::fmt::Debug for BalloonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonHandle").field("counters", &self.counters()).finish()
    }
}

impl BalloonHandle {
    pub(super) fn new(runtime: Runtime, interrupt: Arc<VirtioInterrupt>, schedule: &[u32], target: u32) -> Self {
        let mut schedule: VecDeque<u32> = schedule.iter().copied().collect();
        let target = schedule.pop_front().unwrap_or(target);
        Self {
            target: AtomicU32::new(target),
            actual: AtomicU32::new(0),
            schedule: Mutex::new(schedule),
            advance_pending: AtomicBool::new(false),
            state: DeviceState::new(interrupt),
            runtime: Mutex::new(runtime),
        }
    }

    /// What the queue processing updates (counters, interrupt, statistics, errors).
    pub(super) fn state(&self) -> &DeviceState {
        &self.state
    }

    pub(super) fn runtime(&self) -> MutexGuard<'_, Runtime> {
        self.runtime.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the observer told of [`BalloonEvent`]s.
    pub fn set_observer(&self, observer: BalloonObserver) {
        self.state.set_observer(observer);
    }

    /// The host's target (config `num_pages`), in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.target.load(Ordering::SeqCst)
    }

    /// Sets the host's target and tells the guest (config change interrupt). Clears any
    /// remaining schedule: an explicit target wins.
    pub fn set_target_pages(&self, pages: u32) {
        self.lock_schedule().clear();
        self.store_target(pages);
    }

    /// Follows `targets` in order: the first becomes the target now; each next one when
    /// the guest's `actual` reaches the current one.
    pub fn set_schedule(&self, targets: &[u32]) {
        let mut schedule: VecDeque<u32> = targets.iter().copied().collect();
        let first = schedule.pop_front();
        *self.lock_schedule() = schedule;
        if let Some(first) = first {
            self.store_target(first);
        }
    }

    /// Targets still to come in the schedule.
    pub fn remaining_schedule(&self) -> Vec<u32> {
        self.lock_schedule().iter().copied().collect()
    }

    fn lock_schedule(&self) -> MutexGuard<'_, VecDeque<u32>> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store_target(&self, pages: u32) {
        self.advance_pending.store(false, Ordering::SeqCst);
        self.target.store(pages, Ordering::SeqCst);
        self.state.interrupt.signal_config_change();
    }

    /// What the guest says the balloon holds (config `actual`), in 4 KiB pages.
    pub fn actual_pages(&self) -> u32 {
        self.actual.load(Ordering::SeqCst)
    }

    /// The guest wrote `actual`: record it. If it reached the target and a schedule
    /// follows, the next target comes once the driver has looked at its config again
    /// ([`BalloonHandle::driver_read_config`]): a polling driver then sees the reached
    /// target stay put long enough to verify it, instead of a new target in the same
    /// breath as its own write.
    pub(super) fn guest_wrote_actual(&self, pages: u32) {
        self.actual.store(pages, Ordering::SeqCst);
        self.state.notify(BalloonEvent::ActualWritten { actual: pages, target: self.target_pages() });
        let reached = pages == self.target_pages() && !self.lock_schedule().is_empty();
        self.advance_pending.store(reached, Ordering::SeqCst);
    }

    /// The driver read ConfigGeneration or config space (the transport calls this after
    /// answering): time to move to the next scheduled target, if one is pending.
    pub(super) fn driver_read_config(&self) {
        if !self.advance_pending.swap(false, Ordering::SeqCst) {
            return;
        }
        let mut schedule = self.lock_schedule();
        if self.actual_pages() == self.target_pages() {
            if let Some(next) = schedule.pop_front() {
                tracing::debug!("balloon reached {} pages; next target {next}", self.actual_pages());
                self.store_target(next);
            }
        }
    }

    /// Target, actual, the schedule still to come, and whether the next target is due
    /// (for a saved state).
    pub(super) fn position(&self) -> (u32, u32, Vec<u32>, bool) {
        let schedule = self.remaining_schedule();
        (self.target_pages(), self.actual_pages(), schedule, self.advance_pending.load(Ordering::SeqCst))
    }

    /// Puts a saved position back, without telling the guest (it saw the target
    /// already; the restored interrupt state says whether it still has to look).
    pub(super) fn restore_position(&self, target: u32, actual: u32, schedule: &[u32], advance_pending: bool) {
        *self.lock_schedule() = schedule.iter().copied().collect();
        self.target.store(target, Ordering::SeqCst);
        self.actual.store(actual, Ordering::SeqCst);
        self.advance_pending.store(advance_pending, Ordering::SeqCst);
    }

    pub(super) fn reset_actual(&self) {
        self.advance_pending.store(false, Ordering::SeqCst);
        self.actual.store(0, Ordering::SeqCst);
    }

    /// The latest statistics the guest sent (None until it sends some).
    pub fn stats(&self) -> Option<GuestStats> {
        self.state.stats()
    }

    /// How long ago the guest last sent statistics (None if it never has).
    pub fn stats_age(&self) -> Option<Duration> {
        self.state.stats_age()
    }

    /// Asks the guest for fresh statistics: gives back the statistics buffer it posted,
    /// which the driver refills and posts again. Returns false when there is no buffer
    /// to give back (no stats queue, or the guest has not posted one yet).
    pub fn request_stats(&self) -> bool {
        self.runtime().return_stats_buffer(&self.state.interrupt)
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> BalloonCounters {
        let (ballooned_pages, huge_pages_partial, freed_bytes) = {
            let rt = self.runtime();
            (rt.pages.count(), rt.pages.partial_huge_pages(), rt.pages.freed_bytes())
        };
        let c = &self.state.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BalloonCounters {
            target_pages: self.target_pages(),
            actual_pages: self.actual_pages(),
            ballooned_pages,
            inflated_pages: get(&c.inflated),
            deflated_pages: get(&c.deflated),
            reported_pages: get(&c.reported),
            bytes_discarded: get(&c.bytes_discarded),
            huge_pages_freed: get(&c.huge_freed),
            huge_pages_partial,
            freed_bytes,
            pages_zeroed: get(&c.zeroed),
            invalid_pfns: get(&c.invalid_pfns),
            redundant_pfns: get(&c.redundant_pfns),
            discard_errors: get(&c.discard_errors),
            device_errors: get(&c.device_errors),
            last_error: self.state.last_error(),
        }
    }

    pub(super) fn record_error(&self, error: &str) {
        self.state.record_error(error);
    }
}
