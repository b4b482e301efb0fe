//! The completion path of a page source that answered "later" ([`PageData::Pending`]), and
//! of pages pushed in the background (post-copy migration, prefetch): steps 3 and 4 of the
//! retry protocol of [`super::invalidation`], run by the source's own thread when the data
//! arrives.
//!
//! Step 1 (`read_begin`) happened *before* the request went out: for a fault, in the
//! handler, whose snapshot travels in the [`PageRequest`]; for a background push, in
//! [`PageInstaller::begin`]. [`PageInstaller::complete`] then takes the lock, checks
//! `read_retry`, and only then COPYs, so an invalidation (a balloon or chaos discard)
//! between the request and the data is never undone. What the caller gets back says what
//! to do next: nothing ([`Completion::Installed`], [`Completion::AlreadyPresent`],
//! [`Completion::Discarded`]), or, for a background push, ask again
//! ([`Completion::Retry`]; a faulting thread is woken and faults again by itself).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::engine_shared::{fail, FaultEngineError, Shared};
use super::page_source::{PageRequest, PageSourceError};
use super::page_state::PageState;
use super::uffd::FillOutcome;
use super::GuestRange;

/// What a completion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The page was installed (and its waiter, if any, woken).
    Installed,
    /// The page was already present (EEXIST: another fault or push won); waiter woken.
    AlreadyPresent,
    /// The page was discarded before the request: it stays missing and reads as zero when
    /// touched. Nothing to retry.
    Discarded,
    /// The page was invalidated since the request (or the address space was changing):
    /// the data was dropped and a waiter woken to fault again; a background pusher should
    /// [`PageInstaller::begin`] again and resend the page.
    Retry,
}

/// Installs pages that a source delivers after the fault that asked for them (or
/// unasked, in the background). Cheap to clone; valid while the engine runs (after
/// [`super::fault_engine::FaultEngine::shutdown`] every completion fails with the
/// unregistered range's error, which the caller may ignore).
#[derive(Clone)]
pub struct PageInstaller {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PageInstaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageInstaller").finish_non_exhaustive()
    }
}

impl PageInstaller {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The registered region holding `gpa` and its index, if any.
    fn region_of(&self, gpa: u64) -> Option<(usize, &super::UffdRegion)> {
        self.shared.regions.iter().enumerate().find(|(_, r)| gpa >= r.guest_addr && gpa - r.guest_addr < r.len)
    }

    /// The page size (4 KiB or 2 MiB) of the region holding `gpa`, if any region does.
    pub fn page_bytes(&self, gpa: u64) -> Option<u64> {
        self.region_of(gpa).map(|(_, r)| r.page_bytes)
    }

    /// Step 1 for a background push of the page holding `gpa` (rounded down to its page):
    /// waits while an invalidation of it is in progress (a pusher is not a handler thread,
    /// so it may wait) and returns the request to fetch and then [`complete`]. `None` if
    /// `gpa` is in no registered region.
    ///
    /// [`complete`]: PageInstaller::complete
    pub fn begin(&self, gpa: u64) -> Option<PageRequest> {
        let s = &self.shared;
        let (region, r) = self.region_of(gpa)?;
        let gpa = gpa & !(r.page_bytes - 1);
        let seq = s.inv.read_begin(GuestRange::new(gpa, r.page_bytes));
        let hva = r.host_addr + (gpa - r.guest_addr);
        Some(PageRequest { gpa, hva, region, seq, write: false, thread: 0, read_at: Instant::now(), background: true })
    }

    /// Whether the table holds the page of `gpa` populated or discarded already, i.e. a
    /// background push of it would install nothing (a hint to skip the transfer; the
    /// completion checks again under the lock).
    pub fn settled(&self, gpa: u64) -> bool {
        let state = self.shared.table.get(gpa);
        state.contains(PageState::POPULATED) || state.contains(PageState::DISCARDED)
    }

    /// Steps 3 and 4 for `req`: takes the page's lock, drops `data` if the page was
    /// invalidated since the request or discarded before it, else COPYs it (`None`: the
    /// page is zero) and marks the table, all under the lock; wakes the faulting thread.
    /// `data` must be exactly one page of the region.
    pub fn complete(&self, req: PageRequest, data: Option<&[u8]>) -> Result<Completion, FaultEngineError> {
        let s = &self.shared;
        let r = s.regions.iter().nth(req.region).expect("request region index is valid");
        let page = r.page_bytes;
        let range = GuestRange::new(req.gpa, page);
        let zeros;
        let bytes = match data {
            Some(d) if d.len() as u64 == page => d,
            Some(d) => {
                return Err(FaultEngineError::Source {
                    gpa: req.gpa,
                    source: PageSourceError::Failed {
                        gpa: req.gpa,
                        reason: format!("the source delivered {} bytes for a {page}-byte page", d.len()),
                    },
                })
            }
            None => {
                zeros = vec![0u8; page as usize];
                &zeros[..]
            }
        };
        let lock = s.inv.lock(range);
        let state = s.table.get(req.gpa);
        let stale = lock.read_retry(req.seq);
        if stale || state.contains(PageState::DISCARDED) {
            drop(lock);
            s.counters.completions_dropped.fetch_add(1, Ordering::Relaxed);
            if !req.background {
                // The waiter faults again and meets the page's current state.
                s.uffd.wake(req.hva, page)?;
            }
            return Ok(if stale { Completion::Retry } else { Completion::Discarded });
        }
        // Marked first (a successful fill wakes the faulting thread, which must not see
        // its page unmarked); undone if the kernel refuses.
        let set = if req.write { PageState::POPULATED.union(PageState::DIRTY) } else { PageState::POPULATED };
        let wp = state.contains(PageState::WRITE_PROTECTED);
        s.table.update(range, set, PageState::DISCARDED);
        let outcome = s.uffd.copy(req.hva, bytes, wp, false);
        if !matches!(outcome, Ok(FillOutcome::Filled | FillOutcome::AlreadyFilled)) {
            s.table.update(range, PageState::EMPTY, PageState(set.0 & !state.0));
        }
        let outcome = outcome?;
        drop(lock);
        let done = match outcome {
            FillOutcome::Filled => Completion::Installed,
            FillOutcome::AlreadyFilled => {
                s.counters.eexist.fetch_add(1, Ordering::Relaxed);
                if !req.background {
                    s.uffd.wake(req.hva, page)?;
                }
                Completion::AlreadyPresent
            }
            FillOutcome::MmChanging { .. } => {
                s.counters.eagain.fetch_add(1, Ordering::Relaxed);
                if !req.background {
                    s.uffd.wake(req.hva, page)?;
                }
                return Ok(Completion::Retry);
            }
        };
        s.counters.completed.fetch_add(1, Ordering::Relaxed);
        if !req.background {
            let ns = req.read_at.elapsed().as_nanos().min(u64::MAX as u128) as u64;
            s.pending_latency.lock().unwrap_or_else(|p| p.into_inner()).saturating_record(ns.max(1));
        }
        Ok(done)
    }

    /// Makes the page of `gpa` hold `data` (`None`: zeros), whatever its state, for an
    /// owner that alone touches guest RAM: a destination taking pre-copy rounds before
    /// any vCPU runs there (hybrid migration). A missing page is COPYed in and marked
    /// populated (a missing page asked to be zero stays missing: it reads as zero, or as
    /// the page source says, when touched); a populated one is overwritten in place, which
    /// raises no fault. All under the page's lock, so the table and the page agree for a
    /// coherence check. `data` must be exactly one page of the region.
    pub fn write_owned(&self, gpa: u64, data: Option<&[u8]>) -> Result<(), FaultEngineError> {
        let s = &self.shared;
        let Some((_, r)) = self.region_of(gpa) else {
            return Err(FaultEngineError::Source {
                gpa,
                source: PageSourceError::Failed { gpa, reason: "not guest RAM of a registered region".into() },
            });
        };
        let page = r.page_bytes;
        let gpa = gpa & !(page - 1);
        let hva = r.host_addr + (gpa - r.guest_addr);
        if let Some(d) = data.filter(|d| d.len() as u64 != page) {
            return Err(FaultEngineError::Source {
                gpa,
                source: PageSourceError::Failed {
                    gpa,
                    reason: format!("{} bytes written to a {page}-byte page", d.len()),
                },
            });
        }
        let range = GuestRange::new(gpa, page);
        loop {
            let lock = s.inv.lock(range);
            let state = s.table.get(gpa);
            if state.contains(PageState::POPULATED) {
                // SAFETY: `hva..hva + page` is one page of the region's mapping, which the
                // memory layer keeps mapped while the engine runs; the page is present, so
                // the write raises no userfault, and no vCPU or device uses guest RAM
                // while its owner writes it (this method's contract). Guest RAM is never
                // borrowed by Rust references (the smmu invariant).
                unsafe {
                    match data {
                        Some(d) => std::ptr::copy_nonoverlapping(d.as_ptr(), hva as *mut u8, page as usize),
                        None => std::ptr::write_bytes(hva as *mut u8, 0, page as usize),
                    }
                }
                return Ok(());
            }
            let Some(bytes) = data else { return Ok(()) };
            let wp = state.contains(PageState::WRITE_PROTECTED);
            s.table.update(range, PageState::POPULATED, PageState::DISCARDED);
            match s.uffd.copy(hva, bytes, wp, false) {
                Ok(FillOutcome::Filled) => return Ok(()),
                Ok(FillOutcome::AlreadyFilled) => {
                    // Present behind the table's back: overwrite it on the next turn.
                    s.counters.eexist.fetch_add(1, Ordering::Relaxed);
                }
                Ok(FillOutcome::MmChanging { .. }) => {
                    s.table.update(range, PageState::EMPTY, PageState(PageState::POPULATED.0 & !state.0));
                    s.counters.eagain.fetch_add(1, Ordering::Relaxed);
                    drop(lock);
                    std::thread::yield_now();
                }
                Err(e) => {
                    s.table.update(range, PageState::EMPTY, PageState(PageState::POPULATED.0 & !state.0));
                    return Err(e.into());
                }
            }
        }
    }

    /// The source cannot deliver the pages it promised (its peer is gone): stops the
    /// engine with `err` as a dead handler would (the owner learns it through the
    /// failure fd and callback; threads blocked on faults are released by unregistering).
    pub fn fail(&self, gpa: u64, err: PageSourceError) {
        fail(&self.shared, FaultEngineError::Source { gpa, source: err });
    }
}
