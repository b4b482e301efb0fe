//! Fault-around (`around=N`): after a 4 KiB MISSING or MINOR fault is resolved, install up
//! to N following pages that nobody has asked for yet, in one ioctl, so a sequential
//! toucher finds them mapped instead of faulting on each.
//!
//! Correctness first, as for any fill: the neighbours are only the pages the state table
//! says are untouched (no bit set: not populated, not discarded, not write-protected), the
//! fill runs under the retry protocol (`try_read_begin` → source read → lock →
//! `read_retry`), the table is marked under the lock before the ioctl and unmarked for
//! whatever the kernel did not fill. Fault-around is opportunistic: whenever anything
//! gets in the way (an invalidation in progress, a retry, EEXIST, EAGAIN, an error from
//! the kernel) it installs nothing more and the pages fault normally later.

use super::engine_shared::{FaultEngineError, Shared};
use super::page_source::PageData;
use super::page_state::PageState;
use super::uffd::{FillOutcome, RangeIoctls};
use super::{GuestRange, UffdMode, UffdRegion, PAGE_4K};

/// A handler's fault-around state: the window and its buffers.
pub(super) struct FaultAround {
    pages: u64,
    buf: Vec<u8>,
}

impl FaultAround {
    /// Fault-around of `pages` pages (0: off).
    pub(super) fn new(pages: u32) -> Self {
        Self { pages: pages as u64, buf: vec![0u8; (pages as u64 * PAGE_4K) as usize] }
    }

    /// Installs the untouched 4 KiB pages from host address `hva` on (at most the window,
    /// stopping at the first touched page or the region's end) of region `r`. `write`:
    /// the fault that triggered it was a write, so the neighbours are likely written too
    /// and zero pages get writable copies rather than the shared zero page. Woken ranges
    /// are pushed to `to_wake` when DONTWAKE is on. Returns the pages installed.
    pub(super) fn install(
        &mut self,
        s: &Shared,
        r: &UffdRegion,
        ioctls: RangeIoctls,
        hva: u64,
        write: bool,
        to_wake: &mut Vec<(u64, u64)>,
    ) -> Result<u64, FaultEngineError> {
        if self.pages == 0 || r.page_bytes != PAGE_4K || r.mode == UffdMode::None {
            return Ok(0);
        }
        let end = r.host_addr + r.len;
        let mut count = 0;
        while count < self.pages && hva + count * PAGE_4K < end {
            if s.table.get(r.gpa_of(hva + count * PAGE_4K)) != PageState::EMPTY {
                break;
            }
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        let len = count * PAGE_4K;
        let range = GuestRange::new(r.gpa_of(hva), len);
        let Some(seq) = s.inv.try_read_begin(range) else { return Ok(0) };
        // Step 2: the contents, no locks held (MINOR faults map what the page cache holds).
        let mut all_zero = true;
        if r.mode == UffdMode::Missing {
            for i in 0..count {
                let page = &mut self.buf[(i * PAGE_4K) as usize..((i + 1) * PAGE_4K) as usize];
                match s.source.read_page(range.gpa + i * PAGE_4K, page) {
                    Ok(PageData::Zero) => page.fill(0),
                    Ok(PageData::Filled) => all_zero = false,
                    // `read_page` never answers later; a source that breaks that rule
                    // gets no fault-around.
                    Ok(PageData::Pending) => return Ok(0),
                    // The page's own fault will meet (and report) the error.
                    Err(_) => return Ok(0),
                }
            }
        }
        let lock = s.inv.lock(range);
        if lock.read_retry(seq) {
            return Ok(0);
        }
        // Step 4, under the lock: the pages may have been touched since we looked.
        if (0..count).any(|i| s.table.get(range.gpa + i * PAGE_4K) != PageState::EMPTY) {
            return Ok(0);
        }
        s.table.update(range, PageState::POPULATED, PageState::EMPTY);
        let dw = s.tuning.dont_wake;
        let outcome = match r.mode {
            UffdMode::Minor => s.uffd.continue_(hva, len, false, dw),
            _ if all_zero && !write && !s.tuning.zero_pool && ioctls.zeropage() => s.uffd.zeropage(hva, len, dw),
            _ => s.uffd.copy(hva, &self.buf[..len as usize], false, dw),
        };
        let filled = match outcome {
            Ok(FillOutcome::Filled) => len,
            Ok(FillOutcome::MmChanging { filled_bytes }) => filled_bytes.min(len) & !(PAGE_4K - 1),
            Ok(FillOutcome::AlreadyFilled) => 0,
            Err(e) => {
                tracing::debug!("fault-around of {count} pages at {hva:#x} stopped: {e}");
                0
            }
        };
        if filled < len {
            s.table.update(GuestRange::new(range.gpa + filled, len - filled), PageState::EMPTY, PageState::POPULATED);
        }
        drop(lock);
        if dw && filled > 0 {
            to_wake.push((hva, filled));
        }
        Ok(filled / PAGE_4K)
    }
}
