//! Fault engine statistics: per-fault latency (message read → installed) by kind and
//! page size, and counts of the races the engine met.

use std::sync::atomic::AtomicU64;

use hdrhistogram::Histogram;

use super::PAGE_2M;

/// The kinds of fault, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// A missing page (COPY / ZEROPAGE).
    Missing,
    /// A minor fault (CONTINUE).
    Minor,
    /// A write to a write-protected page.
    WriteProtect,
}

/// Per-kind latency figures (nanoseconds, message read → installed).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LatencySummary {
    /// Fault kind.
    pub kind: FaultKind,
    /// Page size in bytes.
    pub page_bytes: u64,
    /// Faults resolved.
    pub count: u64,
    /// Median latency.
    pub p50_ns: u64,
    /// 90th percentile latency.
    pub p90_ns: u64,
    /// 99th percentile latency.
    pub p99_ns: u64,
    /// 99.9th percentile latency.
    pub p999_ns: u64,
    /// Mean latency.
    pub mean_ns: u64,
    /// Largest latency.
    pub max_ns: u64,
}

/// Counters and latency histograms of an engine.
#[derive(Debug, Clone)]
pub struct EngineStats {
    /// Latency per (kind, page size), index `kind * 2 + huge`.
    pub latency_ns: Vec<Histogram<u64>>,
    /// Fills that found the page already present (EEXIST) and woke the waiter.
    pub eexist: u64,
    /// Fills refused because the address space was changing (EAGAIN).
    pub eagain: u64,
    /// Resolutions dropped by `read_retry` and started again.
    pub retries: u64,
    /// Faults deferred because an invalidation of their page was in progress.
    pub deferred: u64,
    /// REMOVE / UNMAP events read.
    pub remove_events: u64,
    /// REMOVE / UNMAP events not caused by our own invalidations (invalidated here).
    pub external_removes: u64,
    /// Pages installed by fault-around (`around=N`) before anyone touched them.
    pub fault_around_pages: u64,
    /// MISSING faults on pages the table held populated: their contents were lost behind
    /// the VMM's back (e.g. another process punched a hole) and the fill put zeros there.
    pub lost_refilled: u64,
    /// MISSING faults the source answered "later" ([`super::page_source::PageData::Pending`]).
    pub pending: u64,
    /// Pages installed by [`super::page_installer::PageInstaller::complete`] (faults
    /// answered later and background pushes).
    pub completed: u64,
    /// Completions dropped because the page was invalidated since its request (the waiter
    /// was woken to fault again) or discarded before it.
    pub completions_dropped: u64,
    /// Latency of the faults answered later (fault read → installed by the completion).
    pub pending_latency_ns: Histogram<u64>,
}

impl EngineStats {
    /// Summaries of every (kind, page size) that saw faults.
    pub fn summaries(&self) -> Vec<LatencySummary> {
        let kinds = [FaultKind::Missing, FaultKind::Minor, FaultKind::WriteProtect];
        let mut out = Vec::new();
        for (i, h) in self.latency_ns.iter().enumerate() {
            if h.is_empty() {
                continue;
            }
            out.push(LatencySummary {
                kind: kinds[i / 2],
                page_bytes: if i % 2 == 1 { PAGE_2M } else { 4096 },
                count: h.len(),
                p50_ns: h.value_at_quantile(0.5),
                p90_ns: h.value_at_quantile(0.9),
                p99_ns: h.value_at_quantile(0.99),
                p999_ns: h.value_at_quantile(0.999),
                mean_ns: h.mean() as u64,
                max_ns: h.max(),
            });
        }
        out
    }

    /// Faults resolved of one kind (all page sizes).
    pub fn resolved(&self, kind: FaultKind) -> u64 {
        let k = kind as usize;
        self.latency_ns[k * 2].len() + self.latency_ns[k * 2 + 1].len()
    }
}

pub(crate) fn new_histograms() -> Vec<Histogram<u64>> {
    // Fixed bounds (1 ns .. 100 s): `Histogram::new` starts tiny and `saturating_record`
    // would clamp every value to its initial maximum instead of growing.
    (0..6).map(|_| Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")).collect()
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) eexist: AtomicU64,
    pub(crate) eagain: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) deferred: AtomicU64,
    pub(crate) remove_events: AtomicU64,
    pub(crate) external_removes: AtomicU64,
    pub(crate) fault_around_pages: AtomicU64,
    pub(crate) lost_refilled: AtomicU64,
    pub(crate) pending: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) completions_dropped: AtomicU64,
}
