//! One fault handler thread: poll, read a batch of events, resolve each page fault under
//! the retry protocol (see [`super::fault_engine`] for the whole picture), retry the faults
//! it had to put aside, and report its own death.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rustix::event::{poll, PollFd, PollFlags, Timespec};

use super::fault_engine::{signal, FaultEngineError, Shared};
use super::fault_stats::FaultKind;
use super::page_source::PageData;
use super::page_state::PageState;
use super::uffd::{Event, FillOutcome};
use super::{GuestRange, PAGE_2M};

/// A fault waiting to be resolved.
#[derive(Debug, Clone, Copy)]
struct Fault {
    region: usize,
    /// Granule-aligned host address.
    hva: u64,
    kind: FaultKind,
    write: bool,
    read_at: Instant,
}

/// Why a fault was put aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defer {
    /// An invalidation of the page is in progress: retry when one ends.
    Invalidation,
    /// EAGAIN: read pending events, then retry.
    MmChanging,
}

/// The body of handler thread `idx`: runs until shutdown, reports a failure or panic.
pub(super) fn handler_main(shared: &Arc<Shared>, idx: usize, wake: &OwnedFd) {
    let result = catch_unwind(AssertUnwindSafe(|| Handler::new(shared, idx).run(wake)));
    let err = match result {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            FaultEngineError::HandlerPanicked { thread: idx, message }
        }
    };
    tracing::error!("fault handler {idx} died: {err}");
    // Recorded before the callback runs, so whoever the callback wakes finds the reason.
    let message = err.to_string();
    shared.failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(err);
    super::fault_engine::release_after_failure(shared);
    if let Some(cb) = &shared.config.on_failure {
        cb(&message);
    }
    signal(&shared.failure_fd);
    signal(&shared.shutdown_fd); // stop the other handlers too
}

struct Handler<'a> {
    s: &'a Shared,
    idx: usize,
    buf: Vec<u8>,
    deferred: VecDeque<Fault>,
}

impl<'a> Handler<'a> {
    fn new(s: &'a Shared, idx: usize) -> Self {
        let max_page = s.regions.iter().map(|r| r.page_bytes).max().unwrap_or(4096);
        Self { s, idx, buf: vec![0u8; max_page as usize], deferred: VecDeque::new() }
    }

    fn run(&mut self, wake: &OwnedFd) -> Result<(), FaultEngineError> {
        let mut msgs = super::uffd::msg_buffer(self.s.config.batch.max(1));
        let mut events = Vec::new();
        let mut mm_changing = false;
        loop {
            // With EAGAIN-deferred faults, wake soon even if nothing arrives: the kernel
            // ends "mm changing" without an event once the remover resumes.
            let short = Timespec { tv_sec: 0, tv_nsec: 200_000 };
            let timeout = mm_changing.then_some(&short);
            let mut fds = [
                PollFd::new(&*self.s.uffd, PollFlags::IN),
                PollFd::new(&self.s.shutdown_fd, PollFlags::IN),
                PollFd::new(wake, PollFlags::IN),
            ];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
            if !fds[1].revents().is_empty() {
                return Ok(());
            }
            if !fds[2].revents().is_empty() {
                let mut b = [0u8; 8];
                let _ = rustix::io::read(wake, &mut b);
            }
            loop {
                let n = self.s.uffd.read_events(&mut msgs, &mut events)?;
                let read_at = Instant::now();
                for ev in events.drain(..) {
                    self.on_event(ev, read_at)?;
                }
                if n < msgs.len() {
                    break;
                }
            }
            mm_changing = false;
            for _ in 0..self.deferred.len() {
                let f = self.deferred.pop_front().expect("counted");
                mm_changing |= self.resolve(f)? == Some(Defer::MmChanging);
            }
        }
    }

    fn on_event(&mut self, ev: Event, read_at: Instant) -> Result<(), FaultEngineError> {
        match ev {
            Event::PageFault { address, write, wp, minor } => {
                let (region, r) = self
                    .s
                    .regions
                    .iter()
                    .enumerate()
                    .find(|(_, r)| address >= r.host_addr && address - r.host_addr < r.len)
                    .ok_or(FaultEngineError::UnknownAddress(address))?;
                let kind = if wp {
                    FaultKind::WriteProtect
                } else if minor {
                    FaultKind::Minor
                } else {
                    FaultKind::Missing
                };
                let hva = address & !(r.page_bytes - 1);
                self.resolve(Fault { region, hva, kind, write, read_at })?;
            }
            Event::Remove { start, end } | Event::Unmap { start, end } => {
                self.s.counters.remove_events.fetch_add(1, Ordering::Relaxed);
                self.on_remove(start, end, matches!(ev, Event::Unmap { .. }));
            }
            Event::Remap { from, to, len } => {
                tracing::error!(
                    "guest RAM moved by mremap ({from:#x} -> {to:#x}, {len:#x} bytes); faults there will be refused"
                );
            }
            Event::Fork { child_uffd } => {
                // We never ask for EVENT_FORK; if one comes, close the child's fd.
                // SAFETY: the kernel installed this fd for us with the message; we own it.
                drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(child_uffd) });
            }
        }
        Ok(())
    }

    /// A REMOVE/UNMAP from the kernel. Our own discards announced theirs in
    /// [`ExpectedRemoves`] and did the invalidation themselves; anything else is
    /// invalidated here.
    fn on_remove(&self, start: u64, end: u64, unmap: bool) {
        if !unmap && self.s.expected_removes.take(start, end) {
            return;
        }
        for r in self.s.regions.iter() {
            let s = start.max(r.host_addr);
            let e = end.min(r.host_addr + r.len);
            if s >= e {
                continue;
            }
            let range = GuestRange::new(r.gpa_of(s), e - s);
            // Processed after the kernel let the remover go on (reading the event completes
            // it), so a page may already have been refaulted: the marks below are a best
            // effort. All of the VMM's own discards go through the expected path above.
            self.s.counters.external_removes.fetch_add(1, Ordering::Relaxed);
            if unmap {
                tracing::warn!("guest RAM [{:#x}, +{:#x}) was unmapped behind the smmu", range.gpa, range.len);
            }
            let _g = self.s.inv.invalidate(range);
            self.s.table.mark_discarded(range);
        }
    }

    /// Resolves one fault under the retry protocol; `Some` if it was put aside.
    fn resolve(&mut self, f: Fault) -> Result<Option<Defer>, FaultEngineError> {
        let s = self.s;
        let r = s.regions.iter().nth(f.region).expect("fault region index is valid");
        let page = r.page_bytes;
        let gpa = r.gpa_of(f.hva);
        let range = GuestRange::new(gpa, page);
        let ioctls = s.ioctls[f.region];
        let outcome = loop {
            let Some(seq) = s.inv.try_read_begin(range) else {
                s.counters.deferred.fetch_add(1, Ordering::Relaxed);
                self.deferred.push_back(f);
                return Ok(Some(Defer::Invalidation));
            };
            // Step 2: read the source, no locks held. A discarded page reads as zeros.
            let state = s.table.get(gpa);
            // A page write-protected before it was populated is installed protected.
            let wp = state.contains(PageState::WRITE_PROTECTED);
            // A MINOR fault whose page was discarded (hole punched) after the fault was
            // raised: the page cache no longer holds it, so CONTINUE would fail (EFAULT).
            // Fill it with zeros instead, as a MISSING fault on a discarded page.
            let minor_discarded = f.kind == FaultKind::Minor && state.contains(PageState::DISCARDED);
            let data = if f.kind != FaultKind::Missing || state.contains(PageState::DISCARDED) {
                PageData::Zero
            } else {
                s.source
                    .read_page(gpa, &mut self.buf[..page as usize])
                    .map_err(|source| FaultEngineError::Source { gpa, source })?
            };
            let lock = s.inv.lock(range);
            if lock.read_retry(seq) {
                s.counters.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Step 4, under the lock: mark first, because a successful fill wakes the
            // faulting thread, which must not see its page unmarked; undo if refused.
            let (set, clear) = match f.kind {
                FaultKind::WriteProtect => (PageState::DIRTY, PageState::WRITE_PROTECTED),
                _ if f.write => (PageState::POPULATED.union(PageState::DIRTY), PageState::DISCARDED),
                _ => (PageState::POPULATED, PageState::DISCARDED),
            };
            let before = s.table.get(gpa);
            s.table.update(range, set, clear);
            let outcome = match (f.kind, data) {
                (FaultKind::Missing, PageData::Zero) if ioctls.zeropage() && !wp => s.uffd.zeropage(f.hva, page, false),
                (FaultKind::Minor, _) if minor_discarded => {
                    self.buf[..page as usize].fill(0);
                    s.uffd.copy(f.hva, &self.buf[..page as usize], wp, false)
                }
                (FaultKind::Missing, data) => {
                    if data == PageData::Zero {
                        self.buf[..page as usize].fill(0);
                    }
                    s.uffd.copy(f.hva, &self.buf[..page as usize], wp, false)
                }
                (FaultKind::Minor, _) => s.uffd.continue_(f.hva, page, wp, false),
                (FaultKind::WriteProtect, _) => match s.uffd.write_protect(f.hva, page, false, false) {
                    Ok(()) => Ok(FillOutcome::Filled),
                    // Like a fill: a REMOVE is pending, read it before retrying.
                    Err(e) if e.is_mm_changing() => Ok(FillOutcome::MmChanging { filled_bytes: 0 }),
                    Err(e) => Err(e),
                },
            };
            if !matches!(outcome, Ok(FillOutcome::Filled | FillOutcome::AlreadyFilled)) {
                let restore = PageState(before.0 & clear.0);
                s.table.update(range, restore, PageState(set.0 & !before.0));
            }
            let outcome = outcome?;
            drop(lock);
            break outcome;
        };
        match outcome {
            FillOutcome::Filled => {}
            FillOutcome::AlreadyFilled => {
                s.counters.eexist.fetch_add(1, Ordering::Relaxed);
                s.uffd.wake(f.hva, page)?;
            }
            FillOutcome::MmChanging { .. } => {
                // One granule per fill, so nothing was filled; had part of it been, the
                // whole-granule retry meets EEXIST and wakes the waiter.
                s.counters.eagain.fetch_add(1, Ordering::Relaxed);
                self.deferred.push_back(f);
                return Ok(Some(Defer::MmChanging));
            }
        }
        let ns = f.read_at.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        let slot = f.kind as usize * 2 + usize::from(page >= PAGE_2M);
        let mut h = s.histograms[self.idx].lock().unwrap_or_else(|p| p.into_inner());
        h[slot].saturating_record(ns.max(1));
        Ok(None)
    }
}
