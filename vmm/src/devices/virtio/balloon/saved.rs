//! The balloon's saved state, through [`Persist`]: the host's target, the guest's
//! `actual`, where the target schedule is, the pages held (the PFNs the guest gave, as
//! runs: the 2 MiB aggregation state follows from them, since a huge page is freed
//! exactly when all its 4 KiB pages are held), the statistics buffer the device holds,
//! the guest's latest statistics and the counters.
//!
//! Not saved: inflated pages whose discard is pending (none between two notifications:
//! each flushes before it returns, and a snapshot holds the transport's lock, so none is
//! half done) and the observer (a measurement of the process that saved).
//!
//! Restoring puts the pages back in the bookkeeping only: their memory is already a hole
//! in the restored guest (a snapshot's images never carry ballooned pages, and the
//! page-state table's discarded pages are discarded again on restore).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::handle::BalloonHandle;
use super::pages::PageError;
use super::stats::GuestStats;
use crate::persist::Persist;
use crate::smmu::PAGE_4K;

/// Errors restoring a balloon.
#[derive(Debug, thiserror::Error)]
pub enum BalloonStateError {
    /// A saved page is not guest RAM of this VM.
    #[error("the saved balloon holds page {0:#x}, which is not guest RAM of this VM; restore with the zones it was saved with")]
    NotRam(u64),
}

/// The balloon's counters (see [`super::BalloonCounters`]), as saved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedCounters {
    /// Pages inflated.
    pub inflated: u64,
    /// Pages deflated.
    pub deflated: u64,
    /// Pages freed through free page reporting.
    pub reported: u64,
    /// Bytes given back to the host.
    pub bytes_discarded: u64,
    /// Hugetlb pages freed whole.
    pub huge_freed: u64,
    /// 4 KiB pages zeroed instead of freed.
    pub zeroed: u64,
    /// PFNs that were not guest RAM.
    pub invalid_pfns: u64,
    /// Redundant inflates and deflates.
    pub redundant_pfns: u64,
    /// Failed discards.
    pub discard_errors: u64,
    /// Protocol errors.
    pub device_errors: u64,
}

/// Everything a balloon needs to go on where it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// The host's target (config `num_pages`).
    pub target_pages: u32,
    /// The guest's `actual`.
    pub actual_pages: u32,
    /// Targets still to come.
    pub schedule: Vec<u32>,
    /// The guest reached the target and the next one comes when it looks again.
    pub advance_pending: bool,
    /// The pages held, as `(gpa, bytes)` runs of 4 KiB pages.
    pub held: Vec<(u64, u64)>,
    /// The statistics buffer the device holds (a descriptor head), if any.
    pub stats_head: Option<u16>,
    /// The guest's latest statistics.
    pub stats: Option<GuestStats>,
    /// The counters.
    pub counters: SavedCounters,
    /// The last protocol error.
    pub last_error: Option<String>,
}

impl Persist for &BalloonHandle {
    type State = BalloonState;
    type Error = BalloonStateError;

    /// With the VM paused and the transport locked (no queue is being served).
    fn save(&self) -> Result<BalloonState, BalloonStateError> {
        let (target_pages, actual_pages, schedule, advance_pending) = self.position();
        let runtime = self.runtime();
        let held = runtime.pages.ranges().into_iter().map(|r| (r.gpa, r.len)).collect();
        let stats_head = runtime.active.as_ref().and_then(|a| a.stats_head).or(runtime.restored_stats_head);
        drop(runtime);
        let c = &self.state().counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters = SavedCounters {
            inflated: get(&c.inflated),
            deflated: get(&c.deflated),
            reported: get(&c.reported),
            bytes_discarded: get(&c.bytes_discarded),
            huge_freed: get(&c.huge_freed),
            zeroed: get(&c.zeroed),
            invalid_pfns: get(&c.invalid_pfns),
            redundant_pfns: get(&c.redundant_pfns),
            discard_errors: get(&c.discard_errors),
            device_errors: get(&c.device_errors),
        };
        Ok(BalloonState {
            target_pages,
            actual_pages,
            schedule,
            advance_pending,
            held,
            stats_head,
            stats: self.state().saved_stats(),
            counters,
            last_error: self.state().last_error(),
        })
    }

    /// Onto a balloon fresh from `Balloon::new`, before its transport is restored (which
    /// activates the device, taking the held statistics buffer).
    fn restore(&mut self, state: &BalloonState) -> Result<(), BalloonStateError> {
        let mut runtime = self.runtime();
        runtime.pages.clear();
        for &(gpa, len) in &state.held {
            for page in (gpa..gpa.saturating_add(len)).step_by(PAGE_4K as usize) {
                match runtime.pages.insert(page) {
                    Ok(_) => {}
                    Err(PageError::NotRam(at)) => return Err(BalloonStateError::NotRam(at)),
                }
            }
        }
        runtime.restored_stats_head = state.stats_head;
        drop(runtime);
        self.restore_position(state.target_pages, state.actual_pages, &state.schedule, state.advance_pending);
        let c = &self.state().counters;
        let s = &state.counters;
        for (counter, value) in [
            (&c.inflated, s.inflated),
            (&c.deflated, s.deflated),
            (&c.reported, s.reported),
            (&c.bytes_discarded, s.bytes_discarded),
            (&c.huge_freed, s.huge_freed),
            (&c.zeroed, s.zeroed),
            (&c.invalid_pfns, s.invalid_pfns),
            (&c.redundant_pfns, s.redundant_pfns),
            (&c.discard_errors, s.discard_errors),
            (&c.device_errors, s.device_errors),
        ] {
            counter.store(value, Ordering::Relaxed);
        }
        self.state().restore_stats(state.stats.clone());
        self.state().restore_last_error(state.last_error.clone());
        Ok(())
    }
}
