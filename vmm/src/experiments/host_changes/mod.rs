//! The host-change driver: a VMM thread that makes the host kernel change guest RAM's
//! page tables the way it does on its own — swap-out, KSM merges, THP collapse and
//! split, compaction and migration, read-only windows — while the guest runs. None of
//! these changes the guest's data, so the guest must find every page it wrote (its
//! `verify`/`churn` prove 0 pages lost or stale), and the coherence checker must keep
//! calling a swapped-out or merged page the guest's page. Each change is logged with its
//! host-virtual range and time, so the KVM trace can show the MMU notifier unmap that
//! covered it and the guest's refault after.
//!
//! [`session`] sets the host up (and puts it back); [`ops`] are the operations.

pub mod host_side;
pub mod noise;
pub mod ops;
pub mod session;

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use faultline_abi as abi;
use serde::Serialize;

use crate::config::{HostChangeKind, HostChangesConfig, ZoneConfig};
use crate::guest_report::GuestReportCollector;
use crate::host::{interrupt, ksm};
use crate::memory::RamRegion;
use crate::smmu::{GuestRange, PAGE_4K};
use crate::vstate::VmControl;
pub use host_side::HostSide;
use ops::HostRange;

/// A part of the guest's workload region that some kinds apply to.
#[derive(Debug, Clone)]
pub struct Target {
    /// Guest-physical range.
    pub range: GuestRange,
    /// Host address of its first byte.
    pub hva: u64,
    /// The kinds that apply (the zone's backend and paging mode allow them).
    pub kinds: Vec<HostChangeKind>,
    /// The zone's paging mode name.
    pub paging: &'static str,
    /// The zone's backend name.
    pub backend: &'static str,
}

/// The workload segments cut by RAM region, with the kinds that apply to each.
pub fn targets(
    regions: &[RamRegion],
    zones: &[ZoneConfig],
    segments: &[GuestRange],
    kinds: &[HostChangeKind],
) -> Vec<Target> {
    let mut out = Vec::new();
    for r in regions {
        let zone = &zones[r.zone];
        let region = GuestRange::new(r.gpa, r.size_bytes);
        for s in segments {
            let Some(part) = region.intersect(s) else { continue };
            let applies: Vec<_> = kinds.iter().copied().filter(|k| k.refusal(zone).is_none()).collect();
            if !applies.is_empty() {
                out.push(Target {
                    range: part,
                    hva: r.host_addr + (part.gpa - r.gpa),
                    kinds: applies,
                    paging: zone.paging.name(),
                    backend: zone.backend.name(),
                });
            }
        }
    }
    out
}

/// One change the driver made.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeRecord {
    /// The kind.
    pub kind: HostChangeKind,
    /// The operation (`pageout`, `merge`, `unmerge`, `collapse`, `split`, `compact`,
    /// `move_pages`, `protect`).
    pub op: &'static str,
    /// Guest-physical start.
    pub gpa: u64,
    /// Host-virtual start.
    pub hva: u64,
    /// Bytes.
    pub len: u64,
    /// CLOCK_MONOTONIC when the operation started, ns.
    pub start_ns: u64,
    /// CLOCK_MONOTONIC when it returned, ns.
    pub end_ns: u64,
    /// Pages it affected (paged out, merged, moved, ...), as the page tables show.
    pub pages: u64,
}

/// Per-kind figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KindFigures {
    /// Changes made.
    pub changes: u64,
    /// Pages affected.
    pub pages: u64,
    /// Operations the kernel refused (the first messages are in `first_errors`).
    pub refused: u64,
}

/// What the driver did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostChangesReport {
    /// What was set up on the host (and put back afterwards).
    pub setup: Vec<String>,
    /// Zones (backend/paging) each kind applied to, and those it was refused for.
    pub applied_to: Vec<String>,
    /// Kinds refused for a zone, with the reason.
    pub refused: Vec<String>,
    /// Changes made, all kinds.
    pub changes: u64,
    /// By kind: swap, ksm, thp, compaction, mprotect.
    pub by_kind: std::collections::BTreeMap<String, KindFigures>,
    /// Operations that succeeded, by operation (`pageout`, `memcg_squeeze`, `merge`,
    /// `unmerge`, `collapse`, `split`, `compact`, `move_pages`, `protect`).
    pub by_op: std::collections::BTreeMap<String, u64>,
    /// Pages of this process KSM had merged at the most (`/proc/self/ksm_merging_pages`).
    pub ksm_merged_pages_peak: u64,
    /// Pages the swap device held at the most.
    pub swap_stored_pages_peak: u64,
    /// The run was interrupted (SIGINT/SIGTERM) and ended early; the host was restored.
    pub interrupted: bool,
    /// Operations that failed in a way that is not a kernel refusal (a bug or a host
    /// problem); any fails the run.
    pub errors: u64,
    /// The first error and refusal messages.
    pub first_errors: Vec<String>,
    /// Every change (the first [`MAX_RECORDS`]), for the KVM trace.
    #[serde(skip)]
    pub records: Vec<ChangeRecord>,
}

/// Change records kept for the trace.
pub const MAX_RECORDS: usize = 100_000;

/// What the driver needs from the running VM.
pub struct DriverContext<'a> {
    /// The settings.
    pub config: &'a HostChangesConfig,
    /// Where changes may go.
    pub targets: &'a [Target],
    /// The VM's control (to see it stop, and to end it on SIGINT).
    pub control: &'a VmControl,
    /// The guest's report so far (the driver starts after the guest's first step).
    pub collector: &'a Mutex<GuestReportCollector>,
    /// Set to end the guest's open-ended step when the driver is done.
    pub done: &'a AtomicBool,
    /// Wait for the guest's first step before the first change (it writes the data);
    /// false when that step is open-ended (it would wait for the driver).
    pub wait_first_step: bool,
    /// The swap device's fill, when swapping.
    pub swap_stored_pages: Option<&'a (dyn Fn() -> u64 + Sync)>,
    /// The VMM's own memory cgroup, to squeeze (every [`SQUEEZE_EVERY`]th swap change).
    pub memcg: Option<&'a crate::host::memcg::MemcgSqueeze>,
}

/// Every this many swap changes, one is a memory cgroup squeeze instead of a page-out.
pub const SQUEEZE_EVERY: u64 = 8;

/// Runs the driver on this thread until `config.events` changes are made or the VM stops.
pub fn run(cx: &DriverContext<'_>, setup: Vec<String>, refused: Vec<String>) -> HostChangesReport {
    let _done = SetOnDrop(cx.done);
    let mut report = HostChangesReport { setup, refused, ..HostChangesReport::default() };
    for t in cx.targets {
        let kinds: Vec<_> = t.kinds.iter().map(|k| k.name()).collect();
        report.applied_to.push(format!(
            "{} ({}, paging={}): {}",
            fmt_range(t.range),
            t.backend,
            t.paging,
            kinds.join(",")
        ));
    }
    if cx.wait_first_step && !wait_for_first_step(cx) {
        return finish(cx, report, Vec::new());
    }
    let pagemap = match File::open("/proc/self/pagemap") {
        Ok(f) => f,
        Err(e) => {
            report.errors += 1;
            report.first_errors.push(format!("cannot open /proc/self/pagemap: {e}"));
            return report;
        }
    };
    let mut driver = Driver {
        cx,
        pagemap,
        rng: cx.config.seed,
        last_compact_ns: 0,
        open_windows: Vec::new(),
        ksm_scans_at_advise: None,
    };
    if cx.config.kinds.contains(&HostChangeKind::Ksm) {
        driver.advise_mergeable(&mut report);
    }
    let interval = Duration::from_nanos(1_000_000_000 / cx.config.rate_per_s.max(1));
    let (mut turn, mut misses) = (0usize, 0usize);
    while report.changes < cx.config.events && !cx.control.is_stopping() {
        if interrupt::interrupted() {
            report.interrupted = true;
            cx.control.end(crate::exit::VmExit::Stopped { reason: "interrupted (SIGINT/SIGTERM)".into() });
            break;
        }
        let kind = cx.config.kinds[turn % cx.config.kinds.len()];
        turn += 1;
        if kind == HostChangeKind::Ksm && !driver.ksm_ready() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        match driver.pick_target(kind) {
            Some(target) => {
                misses = 0;
                driver.change(kind, &target, &mut report);
            }
            None => {
                misses += 1;
                if misses > cx.config.kinds.len() * 4 {
                    report.errors += 1;
                    report.first_errors.push("no target fits any host change; give a larger --size".into());
                    break;
                }
            }
        }
        report.ksm_merged_pages_peak = report.ksm_merged_pages_peak.max(ksm::process_merging_pages());
        if let Some(stored) = cx.swap_stored_pages {
            report.swap_stored_pages_peak = report.swap_stored_pages_peak.max(stored());
        }
        std::thread::sleep(interval);
        driver.close_windows(&mut report);
    }
    let windows = std::mem::take(&mut driver.open_windows);
    finish(cx, report, windows)
}

/// Closes any window still open; on SIGINT ends the VM.
fn finish(cx: &DriverContext<'_>, mut report: HostChangesReport, windows: Vec<(HostRange, u64)>) -> HostChangesReport {
    for (range, _) in windows {
        if let Err(e) = ops::unprotect(range) {
            report.errors += 1;
            report.first_errors.push(format!("cannot make {:#x}+{:#x} writable again: {e}", range.hva, range.len));
        }
    }
    if interrupt::interrupted() && !report.interrupted {
        report.interrupted = true;
        cx.control.end(crate::exit::VmExit::Stopped { reason: "interrupted (SIGINT/SIGTERM)".into() });
    }
    report
}

/// Waits until the guest reported its first step (its data is written) or the VM stops.
fn wait_for_first_step(cx: &DriverContext<'_>) -> bool {
    loop {
        if cx.control.is_stopping() {
            return false;
        }
        if interrupt::interrupted() {
            return true; // the loop ends the VM
        }
        if !cx.collector.lock().unwrap_or_else(|e| e.into_inner()).report.results.is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

struct Driver<'a> {
    cx: &'a DriverContext<'a>,
    pagemap: File,
    rng: u64,
    last_compact_ns: u64,
    /// Read-only windows and when they close (monotonic ns).
    open_windows: Vec<(HostRange, u64)>,
    /// KSM's full scans when the guest's RAM was advised mergeable.
    ksm_scans_at_advise: Option<u64>,
}

/// Compaction of all memory at most this often; `move_pages` in between.
const COMPACT_EVERY_NS: u64 = 500_000_000;

impl Driver<'_> {
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        abi::splitmix64(self.rng)
    }

    fn pick_target(&mut self, kind: HostChangeKind) -> Option<Target> {
        let fits: Vec<_> = self.cx.targets.iter().filter(|t| t.kinds.contains(&kind)).collect();
        if fits.is_empty() {
            return None;
        }
        let t = fits[(self.next() % fits.len() as u64) as usize].clone();
        // THP works on whole 2 MiB pages: aligned ranges of at least one.
        let granule = if kind == HostChangeKind::Thp { 2 << 20 } else { PAGE_4K };
        let first = t.hva.next_multiple_of(granule);
        let end = (t.hva + t.range.len) / granule * granule;
        if end <= first {
            return None;
        }
        let granules = (end - first) / granule;
        let max = (self.cx.config.max_pages * PAGE_4K / granule).max(1);
        let start = first + self.next() % granules * granule;
        let len = ((1 + self.next() % max) * granule).min(end - start);
        let gpa = t.range.gpa + (start - t.hva);
        Some(Target { range: GuestRange::new(gpa, len), hva: start, ..t })
    }

    fn view(&self, range: HostRange) -> ops::PageTableView {
        ops::page_table_view(&self.pagemap, range).unwrap_or_default()
    }

    fn advise_mergeable(&mut self, report: &mut HostChangesReport) {
        for t in self.cx.targets.iter().filter(|t| t.kinds.contains(&HostChangeKind::Ksm)) {
            let range = HostRange { hva: t.hva, len: t.range.len };
            let start_ns = ops::monotonic_ns();
            let result = ops::merge(range);
            self.log(report, HostChangeKind::Ksm, "merge", t.range, range, start_ns, 0, result, false);
        }
        self.ksm_scans_at_advise = Some(ksm::KsmScanner::full_scans());
        report.ksm_merged_pages_peak = ksm::process_merging_pages();
    }

    /// Whether KSM has had the time to merge: two full scans since the advice (the first
    /// only learns the pages' checksums). Until then ranges are not unmerged; the other
    /// kinds go on.
    fn ksm_ready(&self) -> bool {
        self.ksm_scans_at_advise.is_none_or(|scans| ksm::KsmScanner::full_scans() >= scans + 2)
    }

    fn change(&mut self, kind: HostChangeKind, t: &Target, report: &mut HostChangesReport) {
        let range = HostRange { hva: t.hva, len: t.range.len };
        let start_ns = ops::monotonic_ns();
        match kind {
            HostChangeKind::Swap if self.squeeze_due(report) => {
                let Some(memcg) = self.cx.memcg else { return };
                // Squeeze by the largest range: the kernel reclaims the coldest pages of
                // the cgroup (guest RAM is most of it) to swap. Cgroup v1 gives up with
                // EBUSY when one reclaim pass frees nothing: counted as declined.
                let squeeze = self.cx.config.max_pages * PAGE_4K;
                let stored = self.cx.swap_stored_pages.map_or(0, |f| f());
                let result = memcg.squeeze(memcg.usage_bytes().saturating_sub(squeeze)).map(|_| ());
                let result = result.map_err(|e| match e {
                    crate::host::HostError::Write { source, .. } => source,
                    other => std::io::Error::other(other.to_string()),
                });
                let pages = self.cx.swap_stored_pages.map_or(0, |f| f()).saturating_sub(stored);
                // Reclaim picks its pages anywhere in the cgroup: the change covers the
                // whole target.
                let whole = self.cx.targets.iter().find(|x| x.range.overlaps(&t.range)).unwrap_or(t);
                let all = HostRange { hva: whole.hva, len: whole.range.len };
                self.log(report, kind, "memcg_squeeze", whole.range, all, start_ns, pages, result, true);
            }
            HostChangeKind::Swap => {
                let before = self.view(range);
                let result = ops::page_out(range);
                let after = self.view(range);
                let pages = before.present.saturating_sub(after.present);
                self.log(report, kind, "pageout", t.range, range, start_ns, pages, result, true);
            }
            HostChangeKind::Ksm => {
                // Break the merges of the range (each page gets its own copy: a page-table
                // change) and offer it for merging again.
                let merged = ksm::process_merging_pages();
                let result = ops::unmerge(range);
                let pages = merged.saturating_sub(ksm::process_merging_pages());
                let result = result.and_then(|()| ops::merge(range));
                self.log(report, kind, "unmerge", t.range, range, start_ns, pages, result, true);
            }
            HostChangeKind::Thp => {
                if self.next().is_multiple_of(2) {
                    let result = ops::collapse(range);
                    let pages = if result.is_ok() { range.pages() } else { 0 };
                    self.log(report, kind, "collapse", t.range, range, start_ns, pages, result, true);
                } else {
                    // Split every huge page of the range at one of its 4 KiB pages.
                    let mut result = Ok(());
                    let mut at = range.hva;
                    while at < range.hva + range.len && result.is_ok() {
                        let page = at + (self.next() % 512) * PAGE_4K;
                        result = ops::split(HostRange { hva: page, len: PAGE_4K });
                        at += 2 << 20;
                    }
                    let pages = if result.is_ok() { range.len / (2 << 20) * 512 } else { 0 };
                    self.log(report, kind, "split", t.range, range, start_ns, pages, result, true);
                }
            }
            HostChangeKind::Compaction => {
                let before = self.view(range);
                let compact = start_ns.saturating_sub(self.last_compact_ns) >= COMPACT_EVERY_NS;
                let (op, result) = if compact {
                    self.last_compact_ns = start_ns;
                    ("compact", ops::compact_memory())
                } else {
                    ("move_pages", ops::move_pages(range, 0).map(|_| ()))
                };
                let pages = self.view(range).moved_since(&before);
                self.log(report, kind, op, t.range, range, start_ns, pages, result, true);
            }
            HostChangeKind::Mprotect => {
                let result = ops::protect_read_only(range);
                if result.is_ok() {
                    let close = ops::monotonic_ns() + self.cx.config.window_us * 1000;
                    self.open_windows.push((range, close));
                }
                self.log(report, kind, "protect", t.range, range, start_ns, range.pages(), result, true);
            }
        }
    }

    /// Whether this swap change is a memory cgroup squeeze.
    fn squeeze_due(&self, report: &HostChangesReport) -> bool {
        let done = report.by_kind.get("swap").map_or(0, |f| f.changes + f.refused);
        self.cx.memcg.is_some() && done % SQUEEZE_EVERY == SQUEEZE_EVERY - 1
    }

    /// Closes the windows whose time is up.
    fn close_windows(&mut self, report: &mut HostChangesReport) {
        let now = ops::monotonic_ns();
        let (due, open): (Vec<_>, Vec<_>) = self.open_windows.drain(..).partition(|(_, close)| *close <= now);
        self.open_windows = open;
        for (range, _) in due {
            if let Err(e) = ops::unprotect(range) {
                report.errors += 1;
                report.first_errors.push(format!("cannot make {:#x}+{:#x} writable again: {e}", range.hva, range.len));
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // one log line per operation; a struct would only rename them
    fn log(
        &self,
        report: &mut HostChangesReport,
        kind: HostChangeKind,
        op: &'static str,
        guest: GuestRange,
        range: HostRange,
        start_ns: u64,
        pages: u64,
        result: std::io::Result<()>,
        counts: bool,
    ) {
        let figures = report.by_kind.entry(kind.name().to_string()).or_default();
        match result {
            Ok(()) => {
                *report.by_op.entry(op.to_string()).or_default() += 1;
                if counts {
                    figures.changes += 1;
                    report.changes += 1;
                }
                figures.pages += pages;
                if report.records.len() < MAX_RECORDS {
                    report.records.push(ChangeRecord {
                        kind,
                        op,
                        gpa: guest.gpa,
                        hva: range.hva,
                        len: range.len,
                        start_ns,
                        end_ns: ops::monotonic_ns(),
                        pages,
                    });
                }
            }
            Err(e) => {
                // EINVAL/EBUSY/EAGAIN/ENOMEM: the kernel declined this one (e.g. a range
                // it cannot collapse now); anything else is an error.
                let declined =
                    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EBUSY | libc::EAGAIN | libc::ENOMEM));
                if declined {
                    figures.refused += 1;
                    if counts {
                        report.changes += 1;
                    }
                } else {
                    report.errors += 1;
                }
                if report.first_errors.len() < 8 {
                    let what = if declined { "declined by the kernel" } else { "failed" };
                    report.first_errors.push(format!("{op} of {} {what}: {e}", fmt_range(guest)));
                }
            }
        }
    }
}

fn fmt_range(r: GuestRange) -> String {
    format!("gpa {:#x}+{:#x}", r.gpa, r.len)
}

/// Sets the flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl HostChangesReport {
    /// The summary lines of the run report.
    pub fn summary_lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "host changes: {} changes{}; ksm merged up to {} pages, swap held up to {} pages; {} errors",
            self.changes,
            if self.interrupted { " (interrupted; host restored)" } else { "" },
            self.ksm_merged_pages_peak,
            self.swap_stored_pages_peak,
            self.errors
        )];
        for (kind, f) in &self.by_kind {
            out.push(format!(
                "  {kind}: {} changes, {} pages affected, {} declined by the kernel",
                f.changes, f.pages, f.refused
            ));
        }
        out.extend(self.setup.iter().map(|s| format!("  host: {s} (restored afterwards)")));
        out.extend(self.refused.iter().map(|s| format!("  refused: {s}")));
        out.extend(self.first_errors.iter().map(|e| format!("  host change: {e}")));
        out
    }
}

/// Runs the driver for a VM: targets from guest RAM and the workload region, the zones
/// each kind is refused for, then [`run`]. The glue `vmm::run` calls on its own thread.
pub fn drive(
    config: &crate::config::VmConfig,
    session: &session::HostSession,
    ram: &crate::memory::GuestRam,
    control: &VmControl,
    collector: &Mutex<GuestReportCollector>,
    done: &AtomicBool,
) -> HostChangesReport {
    let Some(host) = &config.host_changes else { return HostChangesReport::default() };
    let segments = crate::experiments::chaos::workload_segments(&ram.ram_ranges(), config.workload.size_bytes);
    let targets = targets(ram.regions(), &config.zones, &segments, &host.kinds);
    let mut refused = Vec::new();
    for (i, zone) in config.zones.iter().enumerate() {
        for kind in &host.kinds {
            if let Some(reason) = kind.refusal(zone) {
                refused.push(format!(
                    "{} on zone {i} ({}, paging={}): {reason}",
                    kind.name(),
                    zone.backend.name(),
                    zone.paging.name()
                ));
            }
        }
    }
    let stored = session.zram().map(|z| move || z.stored_pages());
    let stored_ref: Option<&(dyn Fn() -> u64 + Sync)> = stored.as_ref().map(|f| f as &(dyn Fn() -> u64 + Sync));
    let memcg = session.memcg();
    let first = config.workload.steps.first().map(String::as_str);
    let wait_first_step = !matches!(first, Some("churn" | "idle"));
    let cx = DriverContext {
        wait_first_step,
        config: host,
        targets: &targets,
        control,
        collector,
        done,
        swap_stored_pages: stored_ref,
        memcg,
    };
    run(&cx, session.setup.clone(), refused)
}

/// The report of a driver that panicked.
pub fn panicked() -> HostChangesReport {
    HostChangesReport {
        errors: 1,
        first_errors: vec!["the host-change driver panicked".into()],
        ..HostChangesReport::default()
    }
}

/// Runs the VM's `--host-noise` on this thread until the VM stops.
pub fn drive_noise(
    config: &crate::config::VmConfig,
    noise: noise::HostNoise,
    ram: &crate::memory::GuestRam,
    control: &VmControl,
) -> noise::NoiseReport {
    let segments = crate::experiments::chaos::workload_segments(&ram.ram_ranges(), config.workload.size_bytes);
    let kinds = noise.host_kinds();
    // Page-outs go anywhere a swap applies; KSM to anon zones; the rest need no targets.
    let targets = if kinds.is_empty() { Vec::new() } else { targets(ram.regions(), &config.zones, &segments, &kinds) };
    noise::run(noise, &targets, control)
}
