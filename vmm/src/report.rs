//! What a run produced: how the VM ended, what the guest reported, and the host-side
//! figures (paging, balloon, chaos, host memory). Printed as a short summary or as JSON.

use serde::Serialize;

use crate::exit::VmExit;
use crate::experiments::balloon_watch::BalloonReport;
use crate::experiments::chaos::ChaosReport;
use crate::experiments::host_changes::HostChangesReport;
use crate::guest_report::GuestReport;
use crate::migration::MigrationMetrics;
use crate::paging::FaultReport;
use crate::trace::KvmTraceReport;

/// Host memory use of the VMM process.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostMemory {
    /// Resident set size at the end of the run, bytes (VmRSS).
    pub rss_bytes: u64,
    /// Peak resident set size, bytes (VmHWM).
    pub peak_rss_bytes: u64,
    /// Of the RSS, anonymous memory (RssAnon).
    pub rss_anon_bytes: u64,
    /// Of the RSS, shared memory (RssShmem: memfd, hugetlb not included).
    pub rss_shmem_bytes: u64,
}

impl HostMemory {
    /// Reads /proc/self/status.
    pub fn of_self() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        HostMemory {
            rss_bytes: field("VmRSS:"),
            peak_rss_bytes: field("VmHWM:"),
            rss_anon_bytes: field("RssAnon:"),
            rss_shmem_bytes: field("RssShmem:"),
        }
    }
}

/// The outcome of one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// How the VM ended.
    pub exit: VmExit,
    /// What the guest reported.
    pub guest: GuestReport,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM, bytes.
    pub memory_bytes: u64,
    /// Zone backends, in order.
    pub backends: Vec<String>,
    /// Nanoseconds from process start to the VM being built (memory, vCPUs, image loaded).
    pub setup_ns: u64,
    /// Nanoseconds from process start to the VM's end.
    pub total_ns: u64,
    /// The boot's phases (VM built, first instruction, ready).
    pub boot: crate::boot::timeline::BootTimeline,
    /// Host memory at the end.
    pub host_memory: HostMemory,
    /// What demand paging did (fault latency, races, coherence at the end).
    pub faults: Option<FaultReport>,
    /// What the chaos driver did, when it ran.
    pub chaos: Option<ChaosReport>,
    /// What the balloon gave back to the host, when the VM had one.
    pub balloon: Option<BalloonReport>,
    /// What the host-change driver did, when it ran.
    pub host_changes: Option<HostChangesReport>,
    /// KVM's secondary-MMU events and their chains (`--trace-kvm`).
    pub kvm_trace: Option<KvmTraceReport>,
    /// What the `--host-noise` thread did.
    pub host_noise: Option<crate::experiments::host_changes::noise::NoiseReport>,
    /// Pauses (control socket or snapshots), when there were any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pauses: Option<crate::machine::PauseStats>,
    /// Guest memory read from a snapshot (or received by a migration), bytes, when the
    /// VM was restored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_bytes: Option<u64>,
    /// The VM's live migration (out of this process, or into it), when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationMetrics>,
}

impl RunReport {
    /// True when the VM ended with the guest's success status and the guest reported
    /// success for every step.
    pub fn success(&self) -> bool {
        let coherent = self.faults.as_ref().and_then(|f| f.coherence.as_ref()).is_none_or(|c| c.is_clean());
        let chaos_ok = self.chaos.as_ref().is_none_or(|c| c.errors == 0);
        let host_ok = self.host_changes.as_ref().is_none_or(|h| h.errors == 0 && !h.interrupted);
        (self.exit.is_success() && self.guest.success() || self.migrated_away_cleanly())
            && coherent
            && chaos_ok
            && host_ok
    }

    /// The source's side of a migration: the VM left without a guest failure so far (it
    /// finishes at the destination, so there is no `done` line here).
    fn migrated_away_cleanly(&self) -> bool {
        let guest = &self.guest;
        matches!(self.exit, VmExit::Migrated { .. })
            && guest.verifies.iter().all(|v| v.ok)
            && guest.errors.is_empty()
            && guest.exceptions.is_empty()
    }

    /// Why the run did not succeed, in one line (the first reason found).
    pub fn failure_reason(&self) -> String {
        if !self.exit.is_success() && !self.migrated_away_cleanly() {
            return self.exit.describe();
        }
        if !self.guest.success() {
            return "the guest reported a failure (see the verify, balloon and error lines)".into();
        }
        if let Some(c) = self.faults.as_ref().and_then(|f| f.coherence.as_ref()).filter(|c| !c.is_clean()) {
            return format!("the coherence check between the smmu and the host: {}", c.describe());
        }
        if let Some(c) = self.chaos.as_ref().filter(|c| c.errors > 0) {
            return format!("the chaos driver had {} errors", c.errors);
        }
        if let Some(h) = self.host_changes.as_ref().filter(|h| h.errors > 0 || h.interrupted) {
            return match h.interrupted {
                true => "interrupted (SIGINT/SIGTERM); the host was restored".into(),
                false => format!("the host-change driver had {} errors", h.errors),
            };
        }
        "it succeeded".into()
    }

    /// A short summary for people.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let ms = |ns: u64| ns as f64 / 1e6;
        out.push_str(&format!(
            "faultline: {} vCPU(s), {} MiB [{}]\n",
            self.vcpus,
            self.memory_bytes >> 20,
            self.backends.join(", ")
        ));
        out.push_str(&format!("  exit: {}\n", self.exit.describe()));
        if let Some(ns) = self.guest.ready_after_ns {
            out.push_str(&format!(
                "  guest ready after {:.2} ms (VM built after {:.2} ms, first instruction after {:.2} ms)\n",
                ms(ns),
                ms(self.setup_ns),
                self.boot.first_instruction_ns.map_or(f64::NAN, ms)
            ));
        }
        let tsc_khz = self.guest.ready.as_ref().map_or(0, |r| r.tsc_khz);
        for result in &self.guest.results {
            // Without the guest's TSC frequency (a kernel that printed no ready line),
            // cycles are all there is: never "NaN ms".
            let guest_time = if tsc_khz > 0 {
                format!("{:.2} ms", result.cycles as f64 / tsc_khz as f64)
            } else {
                format!("{} TSC cycles", result.cycles)
            };
            out.push_str(&format!(
                "  {} pass {}: {} pages in {guest_time} (slowest vCPU), {:.2} ms wall",
                result.step,
                result.pass,
                result.pages,
                ms(result.host_wall_ns)
            ));
            if let Some(h) = &result.latency_cycles {
                out.push_str(&format!(
                    ", per-touch cycles p50 {} p99 {} max {}",
                    h.quantile(0.5),
                    h.quantile(0.99),
                    h.max
                ));
            }
            if let Some(us) = result.max_stall_us {
                out.push_str(&format!(", longest stall {:.2} ms", us as f64 / 1e3));
            }
            out.push('\n');
        }
        if !self.guest.stalls.is_empty() {
            let stalls = &self.guest.stalls;
            let longest = stalls.iter().map(|s| s.us).max().unwrap_or(0);
            let restored = stalls.iter().filter(|s| s.after_restore).count();
            out.push_str(&format!(
                "  stalls (--stall-us): {} lines, the longest {:.2} ms{}\n",
                stalls.len(),
                longest as f64 / 1e3,
                if restored > 0 { format!(", {restored} after the restore") } else { String::new() }
            ));
        }
        for verify in &self.guest.verifies {
            if verify.ok {
                out.push_str(&format!("  verify ok: {} pages\n", verify.pages));
            } else {
                out.push_str(&format!(
                    "  verify FAILED: {} mismatching words in {} pages\n",
                    verify.mismatches, verify.pages
                ));
                for m in &verify.first {
                    out.push_str(&format!(
                        "    gpa {:#x}: expected {:#018x}, found {:#018x}\n",
                        m.gpa, m.expected, m.found
                    ));
                }
            }
        }
        for error in &self.guest.errors {
            out.push_str(&format!("  guest error: {error}\n"));
        }
        for exception in &self.guest.exceptions {
            out.push_str(&format!("  guest exception: {exception}\n"));
        }
        if self.guest.dropped_lines > 0 {
            out.push_str(&format!(
                "  {} guest report lines dropped (only the first {} of each kind are kept)\n",
                self.guest.dropped_lines,
                crate::guest_report::MAX_LINES_PER_KIND
            ));
        }
        if let Some(faults) = self.faults.as_ref().filter(|f| f.modes.iter().any(|m| *m != "kernel")) {
            for line in faults.summary_lines() {
                out.push_str(&format!("  {line}\n"));
            }
        }
        if let Some(c) = &self.chaos {
            out.push_str(&format!(
                "  chaos: {} events ({} discards freeing {:.1} MiB, {} write-protects, {} unprotects), {} errors\n",
                c.events,
                c.discards,
                c.bytes_discarded as f64 / 1048576.0,
                c.write_protects,
                c.unprotects,
                c.errors
            ));
            for e in &c.first_errors {
                out.push_str(&format!("    chaos error: {e}\n"));
            }
        }
        let host_lines = self.host_changes.iter().flat_map(|h| h.summary_lines());
        for line in host_lines.chain(self.kvm_trace.iter().flat_map(|t| t.summary_lines())) {
            out.push_str(&format!("  {line}\n"));
        }
        if let Some(b) = &self.balloon {
            let mib = |bytes: u64| bytes as f64 / 1048576.0;
            let peak_note = if b.peak_balloon_bytes > 0 && !b.peak_reached_target {
                format!(" (the guest could not reach its {:.1} MiB target)", mib(b.largest_target_bytes))
            } else {
                String::new()
            };
            out.push_str(&format!(
                "  balloon: peak {:.1} MiB{peak_note}, host memory freed {:.1} MiB ({:.1}% of it), inflated in {:.1} ms; {} huge pages freed, {} partial; {} device errors, {} bad PFNs\n",
                mib(b.peak_balloon_bytes),
                mib(b.freed_bytes),
                b.freed_ratio * 100.0,
                b.inflate_ms,
                b.device.huge_pages_freed,
                b.device.huge_pages_partial,
                b.device.device_errors,
                b.device.invalid_pfns
            ));
        }
        if let Some(m) = &self.migration {
            out.push_str(&format!(
                "  migration ({}) {}: {:?}, {:.1} MiB sent ({} pages, {} zero), total {:.0} ms, downtime {:.1} ms, {} rounds{}\n",
                m.role,
                m.uri,
                m.status,
                m.transferred as f64 / 1048576.0,
                m.normal,
                m.duplicate,
                m.total_time,
                m.downtime,
                m.rounds,
                m.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
        out.push_str(&format!(
            "  host RSS {:.1} MiB (peak {:.1} MiB), total {:.2} ms\n",
            self.host_memory.rss_bytes as f64 / 1048576.0,
            self.host_memory.peak_rss_bytes as f64 / 1048576.0,
            ms(self.total_ns)
        ));
        out
    }
}
