//! The chain from a change of guest RAM to KVM: for each host change or VMM invalidation,
//! the KVM MMU-notifier unmap that covered its host-virtual range, then the guest's
//! refault (KVM mapping a frame of the range again); for each userfaultfd fill, KVM
//! mapping the filled frame.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::event::{EventKind, TraceEvent};

/// A change to follow into KVM.
#[derive(Debug, Clone)]
pub struct Source {
    /// What it was: `swap/pageout`, `ksm/merge`, `vmm/invalidation`, `uffd/fill`, ...
    pub what: String,
    /// Guest-physical start.
    pub gpa: u64,
    /// Host-virtual start.
    pub hva: u64,
    /// Bytes.
    pub len: u64,
    /// CLOCK_MONOTONIC start, ns.
    pub start_ns: u64,
    /// CLOCK_MONOTONIC end, ns (the unmap must fall in between, unless `deferred`).
    pub end_ns: u64,
    /// The change happens later in a kernel thread (KSM merges by ksmd): any unmap after
    /// `start_ns` from a kernel thread counts.
    pub deferred: bool,
    /// A fill: nothing to unmap, only KVM's mapping afterwards.
    pub fill: bool,
}

/// The KVM unmap that covered a change.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UnmapSeen {
    /// Nanoseconds after the change started.
    pub after_ns: u64,
    /// The unmapped host range.
    pub start: u64,
    /// Its end.
    pub end: u64,
    /// The task that caused it (`faultline` for the VMM's own madvise, `ksmd`, ...).
    pub comm: String,
}

/// The guest's refault: KVM mapping a frame of the range again.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RefaultSeen {
    /// Nanoseconds after the change started.
    pub after_ns: u64,
    /// The guest frame.
    pub gfn: u64,
    /// Whether KVM mapped it writable.
    pub writable: bool,
    /// The vCPU thread.
    pub comm: String,
}

/// One followed change.
#[derive(Debug, Clone, Serialize)]
pub struct Chain {
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
    /// The unmap, if seen.
    pub unmap: Option<UnmapSeen>,
    /// The refault, if seen.
    pub refault: Option<RefaultSeen>,
}

/// The chains of one kind of change.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChainFigures {
    /// Changes followed.
    pub followed: u64,
    /// Of those, with a KVM unmap of their range.
    pub unmapped: u64,
    /// Of those, with KVM mapping a frame of their range again afterwards.
    pub refaulted: u64,
    /// The first few complete chains (or incomplete ones, when none is complete).
    pub examples: Vec<Chain>,
}

/// Changes followed per kind (the rest are not correlated, to bound the work).
pub const MAX_FOLLOWED: usize = 5_000;
const EXAMPLES: usize = 3;

/// Correlates `sources` with `events` (sorted by time). `own_tids` are not needed: the
/// events are already this process's or the followed kernel threads'.
pub fn correlate(sources: &[Source], events: &[TraceEvent]) -> BTreeMap<String, ChainFigures> {
    let unmaps: Vec<&TraceEvent> = events.iter().filter(|e| matches!(e.kind, EventKind::Unmap { .. })).collect();
    // Level -> frame base -> times KVM mapped it.
    let mut maps: HashMap<(u8, u64), Vec<(u64, usize)>> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        if let (EventKind::SetSpte { level, .. }, Some((base, _))) = (e.kind, e.kind.spte_frames()) {
            maps.entry((level, base)).or_default().push((e.ts_ns, i));
        }
    }
    let levels: Vec<u8> = {
        let mut l: Vec<u8> = maps.keys().map(|k| k.0).collect();
        l.sort_unstable();
        l.dedup();
        l
    };
    let mut out: BTreeMap<String, ChainFigures> = BTreeMap::new();
    for s in sources {
        let figures = out.entry(s.what.clone()).or_default();
        if figures.followed as usize >= MAX_FOLLOWED {
            continue;
        }
        figures.followed += 1;
        let unmap = if s.fill { None } else { find_unmap(s, &unmaps) };
        let after = match (&unmap, s.fill) {
            (Some(u), _) => Some(s.start_ns + u.after_ns),
            (None, true) => Some(s.start_ns),
            (None, false) => None,
        };
        let refault = after.and_then(|t| find_refault(s, t, events, &maps, &levels));
        figures.unmapped += u64::from(unmap.is_some());
        figures.refaulted += u64::from(refault.is_some());
        let complete = refault.is_some() && (s.fill || unmap.is_some());
        let chain = Chain { gpa: s.gpa, len: s.len, unmap, refault };
        if complete {
            // Complete chains replace incomplete examples.
            figures.examples.retain(|c| c.refault.is_some() && (s.fill || c.unmap.is_some()));
            if figures.examples.len() < EXAMPLES {
                figures.examples.push(chain);
            }
        } else if figures.examples.is_empty() {
            figures.examples.push(chain);
        }
    }
    out
}

fn find_unmap(s: &Source, unmaps: &[&TraceEvent]) -> Option<UnmapSeen> {
    let first = unmaps.partition_point(|e| e.ts_ns < s.start_ns);
    let (lo, hi) = (s.hva, s.hva + s.len);
    for e in &unmaps[first..] {
        if !s.deferred && e.ts_ns > s.end_ns {
            break;
        }
        let EventKind::Unmap { start, end } = e.kind else { continue };
        let by_kernel_thread = e.comm != "faultline" && !e.comm.starts_with("fl-");
        if start < hi && end > lo && (!s.deferred || by_kernel_thread) {
            return Some(UnmapSeen { after_ns: e.ts_ns - s.start_ns, start, end, comm: e.comm.clone() });
        }
    }
    None
}

fn find_refault(
    s: &Source,
    after_ns: u64,
    events: &[TraceEvent],
    maps: &HashMap<(u8, u64), Vec<(u64, usize)>>,
    levels: &[u8],
) -> Option<RefaultSeen> {
    let (g0, g1) = (s.gpa >> 12, (s.gpa + s.len).div_ceil(4096));
    let mut best: Option<(u64, usize)> = None;
    for &level in levels {
        let frames = 1u64 << (9 * u32::from(level.saturating_sub(1)).min(3));
        let mut base = g0 / frames * frames;
        while base < g1 {
            if let Some(times) = maps.get(&(level, base)) {
                let i = times.partition_point(|t| t.0 <= after_ns);
                if let Some(&hit) = times.get(i) {
                    if best.is_none_or(|b| hit.0 < b.0) {
                        best = Some(hit);
                    }
                }
            }
            base += frames;
        }
    }
    best.map(|(ts, i)| {
        let e = &events[i];
        let (gfn, writable) = match e.kind {
            EventKind::SetSpte { gfn, writable, .. } => (gfn, writable),
            _ => (0, false),
        };
        RefaultSeen { after_ns: ts - s.start_ns, gfn, writable, comm: e.comm.clone() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts_ns: u64, comm: &str, kind: EventKind) -> TraceEvent {
        TraceEvent { ts_ns, tid: 1, comm: comm.into(), kind }
    }

    fn source(what: &str, gpa: u64, hva: u64, start_ns: u64, end_ns: u64) -> Source {
        Source { what: what.into(), gpa, hva, len: 0x2000, start_ns, end_ns, deferred: false, fill: false }
    }

    #[test]
    fn a_change_is_followed_to_its_unmap_and_the_refault_after() {
        let events = vec![
            ev(5, "fl-vcpu0", EventKind::SetSpte { gfn: 0x801, level: 1, writable: true }), // before: not a refault
            ev(10, "faultline", EventKind::Unmap { start: 0x7000_0000, end: 0x7000_1000 }), // another range
            ev(11, "faultline", EventKind::Unmap { start: 0x7000_1000, end: 0x7000_3000 }),
            ev(30, "fl-vcpu1", EventKind::SetSpte { gfn: 0x802, level: 1, writable: false }),
            ev(40, "ksmd", EventKind::Unmap { start: 0x7000_8000, end: 0x7000_9000 }),
            ev(50, "fl-vcpu0", EventKind::SetSpte { gfn: 0x800, level: 2, writable: true }), // 2 MiB: covers 0x808
        ];
        let sources = vec![
            source("swap/pageout", 0x80_1000, 0x7000_1000, 9, 12),
            // Its unmap came after it returned: not this change's.
            source("swap/pageout", 0x80_8000, 0x7000_8000, 1, 2),
            Source { deferred: true, ..source("ksm/merge", 0x80_8000, 0x7000_8000, 1, 2) },
            Source { fill: true, ..source("uffd/fill", 0x80_1000, 0, 6, 6) },
        ];
        let chains = correlate(&sources, &events);
        let swap = &chains["swap/pageout"];
        assert_eq!((swap.followed, swap.unmapped, swap.refaulted), (2, 1, 1));
        let c = &swap.examples[0];
        assert_eq!(c.unmap.as_ref().map(|u| (u.after_ns, u.comm.as_str())), Some((2, "faultline")));
        assert_eq!(c.refault.as_ref().map(|r| (r.after_ns, r.gfn, r.writable)), Some((21, 0x802, false)));
        let ksm = &chains["ksm/merge"];
        assert_eq!((ksm.unmapped, ksm.refaulted), (1, 1));
        assert_eq!(ksm.examples[0].unmap.as_ref().unwrap().comm, "ksmd");
        assert_eq!(ksm.examples[0].refault.as_ref().unwrap().gfn, 0x800);
        let fill = &chains["uffd/fill"];
        assert_eq!((fill.unmapped, fill.refaulted), (0, 1));
        assert_eq!(fill.examples[0].refault.as_ref().unwrap().after_ns, 24);
    }
}
