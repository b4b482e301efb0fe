//! The reference handler (`faultline run --fault-engine reference`): the textbook userfaultfd
//! handler that every report compares the engine with, as in the kernel's
//! `demand_paging_test` and most tutorials: one thread; `poll` on the userfaultfd (and the
//! shutdown eventfd); `read` one message; one `UFFDIO_COPY` (or `UFFDIO_CONTINUE` for a
//! MINOR fault) that wakes the faulting thread; repeat.
//!
//! It marks the page-state table so the coherence checker judges it like the engine, but
//! it has none of the engine's machinery: no batching, no retry protocol against
//! concurrent invalidations, no deferral, no write-protect faults (they stop it with an
//! error). It is a yardstick for benchmarks, not a handler for VMs that discard memory.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::engine_shared::{next_event, on_other_event, record_latency, FaultEngineError, Shared};
use super::fault_stats::FaultKind;
use super::page_source::PageData;
use super::page_state::PageState;
use super::uffd::{Event, FillOutcome};
use super::GuestRange;

/// The reference handler's loop; returns at shutdown.
pub(super) fn run(s: &Shared) -> Result<(), FaultEngineError> {
    let max_page = s.regions.iter().map(|r| r.page_bytes).max().unwrap_or(4096) as usize;
    let mut buf = vec![0u8; max_page];
    let mut msg = super::uffd::msg_buffer(1);
    let mut events = Vec::with_capacity(1);
    while let Some(event) = next_event(s, &mut msg, &mut events)? {
        let read_at = Instant::now();
        match event {
            Event::PageFault { address, write, wp, minor, .. } => {
                if wp {
                    return Err(FaultEngineError::HandlerUnsupported {
                        handler: "reference",
                        what: "write-protect faults",
                    });
                }
                let r = s.regions.by_host(address).ok_or(FaultEngineError::UnknownAddress(address))?;
                let page = r.page_bytes;
                let hva = address & !(page - 1);
                let gpa = r.gpa_of(hva);
                let range = GuestRange::new(gpa, page);
                let set = if write { PageState::POPULATED.union(PageState::DIRTY) } else { PageState::POPULATED };
                // Marked before the fill wakes the faulting thread, unmarked if it fails.
                let before = s.table.get(gpa);
                s.table.update(range, set, PageState::DISCARDED);
                let outcome = if minor {
                    s.uffd.continue_(hva, page, false, false)
                } else {
                    let data = s
                        .source
                        .read_page(gpa, &mut buf[..page as usize])
                        .map_err(|source| FaultEngineError::Source { gpa, source })?;
                    if data == PageData::Zero {
                        buf[..page as usize].fill(0);
                    }
                    s.uffd.copy(hva, &buf[..page as usize], false, false)
                };
                match outcome {
                    Ok(FillOutcome::Filled) => {}
                    other => {
                        s.table.update(
                            range,
                            PageState(before.0 & PageState::DISCARDED.0),
                            PageState(set.0 & !before.0),
                        );
                        match other? {
                            FillOutcome::AlreadyFilled => {
                                s.counters.eexist.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                s.counters.eagain.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // Woken, the thread touches the page again and faults anew if it is
                        // still missing.
                        s.uffd.wake(hva, page)?;
                        continue;
                    }
                }
                let kind = if minor { FaultKind::Minor } else { FaultKind::Missing };
                record_latency(s, 0, kind, page, read_at);
            }
            other => on_other_event(s, other),
        }
    }
    Ok(())
}
