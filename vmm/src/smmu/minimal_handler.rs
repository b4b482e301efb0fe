//! The minimal handler (`faultline run --fault-engine minimal`): the least a userfaultfd
//! handler can do, written as a C programmer would for a benchmark: one thread; `poll` on
//! the userfaultfd and the shutdown eventfd; `read` one message; one `UFFDIO_COPY` from a
//! page that is never written (so always zero) and that wakes the faulting thread. No
//! clock reads, no histograms, no retry protocol, no memset.
//!
//! It is the floor `faultline bench faults` measures every other design against (its
//! `x min` column). Two things it does beyond the C loop, because the run must stay
//! checkable: it marks the page-state table (an atomic read and update per fault), so the coherence
//! check at the end judges it like every other design, and it handles REMOVE/UNMAP events
//! as the others do. MINOR and write-protect faults stop it with an error: it resolves
//! MISSING faults only, from zeros (the engine's page source is not consulted).

use super::engine_shared::{next_event, on_other_event, FaultEngineError, Shared};
use super::page_state::PageState;
use super::uffd::{Event, FillOutcome};
use super::GuestRange;

/// The minimal handler's loop; returns at shutdown.
pub(super) fn run(s: &Shared) -> Result<(), FaultEngineError> {
    let max_page = s.regions.iter().map(|r| r.page_bytes).max().unwrap_or(4096) as usize;
    let zeros = vec![0u8; max_page];
    let mut msg = super::uffd::msg_buffer(1);
    let mut events = Vec::with_capacity(1);
    while let Some(event) = next_event(s, &mut msg, &mut events)? {
        match event {
            Event::PageFault { wp: true, .. } => {
                return Err(FaultEngineError::HandlerUnsupported { handler: "minimal", what: "write-protect faults" })
            }
            Event::PageFault { minor: true, .. } => {
                return Err(FaultEngineError::HandlerUnsupported { handler: "minimal", what: "MINOR faults" })
            }
            Event::PageFault { address, write, .. } => {
                let r = s.regions.by_host(address).ok_or(FaultEngineError::UnknownAddress(address))?;
                let page = r.page_bytes;
                let hva = address & !(page - 1);
                let range = GuestRange::new(r.gpa_of(hva), page);
                let set = if write { PageState::POPULATED.union(PageState::DIRTY) } else { PageState::POPULATED };
                // Marked before the fill wakes the faulting thread; unmarked if the kernel
                // refused the fill (EEXIST: someone else's page; EAGAIN: being removed, the
                // woken thread faults again).
                let before = s.table.get(range.gpa);
                s.table.update(range, set, PageState::DISCARDED);
                match s.uffd.copy(hva, &zeros[..page as usize], false, false)? {
                    FillOutcome::Filled => {}
                    FillOutcome::AlreadyFilled | FillOutcome::MmChanging { .. } => {
                        let restore = PageState(before.0 & PageState::DISCARDED.0);
                        s.table.update(range, restore, PageState(set.0 & !before.0));
                        s.uffd.wake(hva, page)?;
                    }
                }
            }
            other => on_other_event(s, other),
        }
    }
    Ok(())
}
