//! One fault handler thread: poll, read a batch of events, resolve each page fault under
//! the retry protocol (see [`super::fault_engine`] for the whole picture), retry the faults
//! it had to put aside, and report its own death.
//!
//! The tuning options of [`super::engine_tuning`] change the loop here: `dontwake` fills
//! without waking and wakes every resolved range once per batch; `zeropool` fills zero
//! pages by COPY from a buffer that stays zeroed; `around=N` installs following pages too
//! ([`super::fault_around`]); `busypoll` polls with a zero timeout instead of sleeping;
//! `exclusive` sleeps in a per-thread epoll where the userfaultfd wakes one handler.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rustix::event::{epoll, poll, PollFd, PollFlags, Timespec};

use super::engine_shared::{on_other_event, record_latency, FaultEngineError, Shared};
use super::fault_around::FaultAround;
use super::fault_stats::FaultKind;
use super::page_source::{PageData, PageRequest};
use super::page_state::PageState;
use super::uffd::{Event, FillOutcome};
use super::{GuestRange, PAGE_2M};

/// The engine's handler loop for thread `idx` (`wake`: its own wake eventfd); returns at
/// shutdown.
pub(super) fn run(shared: &Shared, idx: usize, wake: &OwnedFd) -> Result<(), FaultEngineError> {
    Handler::new(shared, idx).run(wake)
}

/// A fault waiting to be resolved.
#[derive(Debug, Clone, Copy)]
struct Fault {
    region: usize,
    /// Granule-aligned host address.
    hva: u64,
    kind: FaultKind,
    write: bool,
    /// The faulting thread (0 if the kernel did not say).
    thread: u32,
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

struct Handler<'a> {
    s: &'a Shared,
    idx: usize,
    buf: Vec<u8>,
    /// A buffer that is never written, so always zero: zero fills COPY from it (no memset
    /// of a page per fault; untouched, it costs no memory until the kernel reads it).
    zeros: Vec<u8>,
    deferred: VecDeque<Fault>,
    /// `dontwake`: ranges filled without waking, woken once per batch.
    to_wake: Vec<(u64, u64)>,
    around: FaultAround,
}

impl<'a> Handler<'a> {
    fn new(s: &'a Shared, idx: usize) -> Self {
        let max_page = s.regions.iter().map(|r| r.page_bytes).max().unwrap_or(4096) as usize;
        let zeros = vec![0u8; max_page];
        Self {
            s,
            idx,
            buf: vec![0u8; max_page],
            zeros,
            deferred: VecDeque::new(),
            to_wake: Vec::new(),
            around: FaultAround::new(s.tuning.fault_around),
        }
    }

    fn run(&mut self, wake: &OwnedFd) -> Result<(), FaultEngineError> {
        let mut msgs = super::uffd::msg_buffer(self.s.tuning.batch.unwrap_or(self.s.config.batch).max(1));
        let mut events = Vec::new();
        let mut mm_changing = false;
        let ep = if self.s.tuning.exclusive { Some(exclusive_epoll(self.s, wake)?) } else { None };
        loop {
            // With EAGAIN-deferred faults, wake soon even if nothing arrives: the kernel
            // ends "mm changing" without an event once the remover resumes. Busy-polling
            // never sleeps at all.
            let short = Timespec { tv_sec: 0, tv_nsec: 200_000 };
            let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
            let timeout = if self.s.tuning.busy_poll { Some(&zero) } else { mm_changing.then_some(&short) };
            let (shutdown, woken) = self.wait(wake, ep.as_ref(), timeout)?;
            if shutdown {
                return Ok(());
            }
            if woken {
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
            self.wake_batch()?;
        }
    }

    /// Sleeps until the userfaultfd, the shutdown eventfd or the wake eventfd is readable,
    /// or `timeout` passes; returns (shutdown, woken). With `ep` (the `exclusive` option)
    /// through that epoll instance, else poll(2) on the three fds.
    fn wait(
        &self,
        wake: &OwnedFd,
        ep: Option<&OwnedFd>,
        timeout: Option<&Timespec>,
    ) -> Result<(bool, bool), FaultEngineError> {
        if let Some(ep) = ep {
            let mut buf = [MaybeUninit::<epoll::Event>::uninit(); 3];
            let (ready, _) = match epoll::wait(ep, &mut buf, timeout) {
                Ok(r) => r,
                Err(rustix::io::Errno::INTR) => return Ok((false, false)),
                Err(e) => return Err(std::io::Error::from(e).into()),
            };
            let has = |token: u64| ready.iter().any(|e| e.data.u64() == token);
            return Ok((has(TOKEN_SHUTDOWN), has(TOKEN_WAKE)));
        }
        let mut fds = [
            PollFd::new(&*self.s.uffd, PollFlags::IN),
            PollFd::new(&self.s.shutdown_fd, PollFlags::IN),
            PollFd::new(wake, PollFlags::IN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
        Ok((!fds[1].revents().is_empty(), !fds[2].revents().is_empty()))
    }

    /// Wakes the ranges filled with DONTWAKE, adjacent ranges merged into one WAKE.
    fn wake_batch(&mut self) -> Result<(), FaultEngineError> {
        if self.to_wake.is_empty() {
            return Ok(());
        }
        self.to_wake.sort_unstable();
        let mut run: Option<(u64, u64)> = None;
        for &(start, len) in &self.to_wake {
            run = match run {
                Some((s, l)) if s + l == start => Some((s, l + len)),
                Some((s, l)) => {
                    self.s.uffd.wake(s, l)?;
                    Some((start, len))
                }
                None => Some((start, len)),
            };
        }
        if let Some((s, l)) = run {
            self.s.uffd.wake(s, l)?;
        }
        self.to_wake.clear();
        Ok(())
    }

    fn on_event(&mut self, ev: Event, read_at: Instant) -> Result<(), FaultEngineError> {
        match ev {
            Event::PageFault { address, write, wp, minor, thread } => {
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
                self.resolve(Fault { region, hva, kind, write, thread, read_at })?;
            }
            other => on_other_event(self.s, other),
        }
        Ok(())
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
                let req = PageRequest {
                    gpa,
                    hva: f.hva,
                    region: f.region,
                    seq,
                    write: f.write,
                    thread: f.thread,
                    read_at: f.read_at,
                    background: false,
                };
                s.source
                    .request_page(req, &mut self.buf[..page as usize])
                    .map_err(|source| FaultEngineError::Source { gpa, source })?
            };
            if data == PageData::Pending {
                // The source completes it through the installer (which runs steps 3-4
                // with this `seq`); the faulting thread stays blocked until then.
                s.counters.pending.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
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
            let dw = s.tuning.dont_wake;
            let zero_fill = (f.kind == FaultKind::Missing && data == PageData::Zero) || minor_discarded;
            let outcome = match (f.kind, data) {
                _ if zero_fill && s.tuning.zero_pool => s.uffd.copy(f.hva, &self.zeros[..page as usize], wp, dw),
                // ZEROPAGE only for reads: on anon it maps the shared zero page, and a
                // write would at once take a second (copy-on-write) fault in the kernel.
                // Writes get a writable page by COPY, as the kernel's own fault does.
                (FaultKind::Missing, PageData::Zero) if ioctls.zeropage() && !wp && !f.write => {
                    s.uffd.zeropage(f.hva, page, dw)
                }
                _ if zero_fill => s.uffd.copy(f.hva, &self.zeros[..page as usize], wp, dw),
                (FaultKind::Missing, _) => s.uffd.copy(f.hva, &self.buf[..page as usize], wp, dw),
                (FaultKind::Minor, _) => s.uffd.continue_(f.hva, page, wp, dw),
                (FaultKind::WriteProtect, _) => match s.uffd.write_protect(f.hva, page, false, dw) {
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
            // The table held the page populated, yet the kernel raised MISSING and took
            // the fill: its contents were lost behind our back. Keep that on record.
            if f.kind == FaultKind::Missing
                && before.contains(PageState::POPULATED)
                && matches!(outcome, Ok(FillOutcome::Filled))
            {
                s.counters.lost_refilled.fetch_add(1, Ordering::Relaxed);
            }
            let outcome = outcome?;
            drop(lock);
            break outcome;
        };
        match outcome {
            FillOutcome::Filled if s.tuning.dont_wake => self.to_wake.push((f.hva, page)),
            FillOutcome::Filled => {}
            FillOutcome::AlreadyFilled => {
                s.counters.eexist.fetch_add(1, Ordering::Relaxed);
                if s.tuning.dont_wake {
                    self.to_wake.push((f.hva, page));
                } else {
                    s.uffd.wake(f.hva, page)?;
                }
            }
            FillOutcome::MmChanging { .. } => {
                // One granule per fill, so nothing was filled; had part of it been, the
                // whole-granule retry meets EEXIST and wakes the waiter.
                s.counters.eagain.fetch_add(1, Ordering::Relaxed);
                self.deferred.push_back(f);
                return Ok(Some(Defer::MmChanging));
            }
        }
        record_latency(s, self.idx, f.kind, page, f.read_at);
        if f.kind != FaultKind::WriteProtect && page < PAGE_2M {
            let filled = self.around.install(s, r, ioctls, f.hva + page, f.write, &mut self.to_wake)?;
            if filled > 0 {
                s.counters.fault_around_pages.fetch_add(filled, Ordering::Relaxed);
            }
        }
        Ok(None)
    }
}

const TOKEN_UFFD: u64 = 0;
const TOKEN_SHUTDOWN: u64 = 1;
const TOKEN_WAKE: u64 = 2;

/// A handler's own epoll instance for the `exclusive` option: the userfaultfd added with
/// `EPOLLEXCLUSIVE` (the kernel wakes one waiting instance per event, not all of them;
/// level-triggered, so a message nobody was woken for is found by the next wait), the
/// shutdown and wake eventfds added normally.
fn exclusive_epoll(s: &Shared, wake: &OwnedFd) -> Result<OwnedFd, FaultEngineError> {
    let io = |e: rustix::io::Errno| FaultEngineError::Os(e.into());
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(io)?;
    let exclusive = epoll::EventFlags::IN | epoll::EventFlags::EXCLUSIVE;
    epoll::add(&ep, &*s.uffd, epoll::EventData::new_u64(TOKEN_UFFD), exclusive).map_err(io)?;
    epoll::add(&ep, &s.shutdown_fd, epoll::EventData::new_u64(TOKEN_SHUTDOWN), epoll::EventFlags::IN).map_err(io)?;
    epoll::add(&ep, wake, epoll::EventData::new_u64(TOKEN_WAKE), epoll::EventFlags::IN).map_err(io)?;
    Ok(ep)
}
