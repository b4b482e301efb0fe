//! `--trace-kvm`: KVM's own secondary-MMU events for this VM (tracefs), beside the VMM's
//! invalidations, its userfaultfd fills and the host changes, correlated into chains:
//! change → KVM unmap of its host range → the guest's refault.
//!
//! - [`event`]: the trace lines, parsed;
//! - [`session`]: the trace instances (this process's threads, and the kernel threads
//!   that change pages behind it), set up and removed;
//! - [`record`]: the VMM-side logs (invalidations, fills), in the trace's clock;
//! - [`chain`]: the correlation.
//!
//! Without tracefs (not root, no KVM events) the run goes on untraced and the report
//! says why.

pub mod chain;
pub mod event;
pub mod record;
pub mod session;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::config::HostChangeKind;
use crate::experiments::host_changes::{ops::monotonic_ns, ChangeRecord};
use crate::smmu::invalidation::Invalidation;
use crate::smmu::page_source::PageSource;
use crate::smmu::{GuestRange, Regions};
use chain::{ChainFigures, Source};
use record::{InvalidationLog, RangeLog, RecordingSource};
use session::KvmTraceSession;

/// What the trace showed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KvmTraceReport {
    /// Whether events were recorded.
    pub recorded: bool,
    /// Why not, when not.
    pub skipped: Option<String>,
    /// Events this kernel does not have.
    pub missing_events: Vec<String>,
    /// Kernel threads whose notifier events were followed.
    pub kernel_threads: Vec<String>,
    /// Events recorded, by name.
    pub events: BTreeMap<String, u64>,
    /// Events the trace buffers dropped.
    pub lost_events: u64,
    /// Invalidations the VMM made (balloon, chaos, discards).
    pub vmm_invalidations: u64,
    /// Pages the fault engine read from its source to fill.
    pub uffd_fills: u64,
    /// The chains, by kind of change.
    pub chains: BTreeMap<String, ChainFigures>,
    /// Nanoseconds from the start of the trace to its end.
    pub duration_ns: u64,
}

impl KvmTraceReport {
    /// The summary lines of the run report.
    pub fn summary_lines(&self) -> Vec<String> {
        if !self.recorded {
            return vec![format!("kvm trace: not recorded: {}", self.skipped.as_deref().unwrap_or("unknown reason"))];
        }
        let events: Vec<_> = self.events.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let mut out = vec![format!("kvm trace: {} ({} lost)", events.join(", "), self.lost_events)];
        for (what, f) in &self.chains {
            out.push(format!(
                "  {what}: {} followed, {} with a KVM unmap of their range, {} refaulted after",
                f.followed, f.unmapped, f.refaulted
            ));
            if let Some(c) = f.examples.first() {
                let unmap = c.unmap.as_ref().map_or("no unmap".to_string(), |u| {
                    format!("unmap {:#x}-{:#x} by {} after {} us", u.start, u.end, u.comm, u.after_ns / 1000)
                });
                let refault = c.refault.as_ref().map_or("no refault".to_string(), |r| {
                    format!(
                        "refault gfn {:#x} ({}) by {} after {} us",
                        r.gfn,
                        if r.writable { "rw" } else { "ro" },
                        r.comm,
                        r.after_ns / 1000
                    )
                });
                out.push(format!("    e.g. gpa {:#x}+{:#x}: {unmap}; {refault}", c.gpa, c.len));
            }
        }
        out
    }
}

/// The recording of one run: the VMM-side logs from the start, the trace once guest RAM
/// exists.
pub struct Recorder {
    fills: Arc<RangeLog>,
    invalidations: Arc<InvalidationLog>,
    session: Option<KvmTraceSession>,
    skipped: Option<String>,
    started_ns: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// A recorder with empty logs and no trace yet.
    pub fn new() -> Self {
        Recorder {
            fills: Arc::default(),
            invalidations: Arc::default(),
            session: None,
            skipped: None,
            started_ns: monotonic_ns(),
        }
    }

    /// The page source the fault engine should use: `inner`, logging each page.
    pub fn page_source(&self, inner: Arc<dyn PageSource>) -> Arc<dyn PageSource> {
        Arc::new(RecordingSource::new(inner, self.fills.clone()))
    }

    /// Starts the trace for guest RAM (`(hva, len)` ranges) and logs the invalidations of
    /// `inv`. A host without tracefs is not an error: the report says why.
    pub fn start(&mut self, ram: &[(u64, u64)], inv: &Invalidation) {
        inv.subscribe(GuestRange::new(0, u64::MAX), self.invalidations.clone());
        match KvmTraceSession::start(ram) {
            Ok(s) => self.session = Some(s),
            Err(e) => {
                tracing::warn!("running without the KVM trace: {e}");
                self.skipped = Some(e.to_string());
            }
        }
        self.started_ns = monotonic_ns();
    }

    /// Stops the trace and correlates it with the logs and the host changes.
    pub fn finish(self, host_changes: &[ChangeRecord], regions: &Regions) -> KvmTraceReport {
        let mut report = KvmTraceReport { skipped: self.skipped.clone(), ..KvmTraceReport::default() };
        let (invalidations, n_inv) = self.invalidations.0.take();
        let (fills, n_fills) = self.fills.take();
        report.vmm_invalidations = n_inv;
        report.uffd_fills = n_fills;
        let Some(session) = &self.session else { return report };
        let (events, lost) = session.stop();
        report.duration_ns = monotonic_ns() - self.started_ns;
        report.recorded = true;
        report.lost_events = lost;
        report.missing_events = session.missing_events.clone();
        report.kernel_threads = session.kernel_threads.clone();
        for e in &events {
            *report.events.entry(e.kind.name().to_string()).or_default() += 1;
        }
        let mut sources: Vec<Source> = Vec::new();
        for c in host_changes {
            sources.push(Source {
                what: format!("{}/{}", c.kind.name(), c.op),
                gpa: c.gpa,
                hva: c.hva,
                len: c.len,
                start_ns: c.start_ns,
                end_ns: c.end_ns,
                deferred: c.kind == HostChangeKind::Ksm && c.op == "merge",
                fill: false,
            });
        }
        let hva_of = |gpa: u64| regions.by_gpa(gpa).map(|r| r.host_of(gpa));
        for s in &invalidations {
            if let Some(hva) = hva_of(s.range.gpa) {
                sources.push(Source {
                    what: "vmm/invalidation".into(),
                    gpa: s.range.gpa,
                    hva,
                    len: s.range.len,
                    start_ns: s.ts_ns,
                    // The host operation follows the subscribers' notification: allow
                    // the invalidation's own time (up to 1 s).
                    end_ns: s.ts_ns + 1_000_000_000,
                    deferred: false,
                    fill: false,
                });
            }
        }
        for s in &fills {
            if let Some(hva) = hva_of(s.range.gpa) {
                sources.push(Source {
                    what: "uffd/fill".into(),
                    gpa: s.range.gpa,
                    hva,
                    len: s.range.len,
                    start_ns: s.ts_ns,
                    end_ns: s.ts_ns,
                    deferred: false,
                    fill: true,
                });
            }
        }
        report.chains = chain::correlate(&sources, &events);
        report
    }
}
