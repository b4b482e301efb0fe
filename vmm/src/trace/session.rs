//! Recording KVM's secondary-MMU events for this VM only, in two trace instances of our
//! own: "own" holds every event of this process's threads (`set_event_pid` with
//! `event-fork`, so the vCPU threads started later are in it); "kernel" holds the MMU
//! notifier events of the kernel threads that change pages behind the VMM's back (ksmd,
//! kswapd, khugepaged, kcompactd, kdamond), filtered to guest RAM's host addresses.

use crate::host::tracefs::{Instance, Tracefs};
use crate::host::HostError;

use super::event::{parse_line, TraceEvent};

/// The events of the "own" instance.
pub const OWN_EVENTS: [&str; 6] = [
    "kvm/kvm_unmap_hva_range",
    "kvm/kvm_age_hva",
    "kvm/kvm_test_age_hva",
    "kvm/kvm_page_fault",
    "kvmmmu/kvm_mmu_set_spte",
    "kvmmmu/kvm_mmu_prepare_zap_page",
];

/// The notifier events of the "kernel" instance.
const KERNEL_EVENTS: [&str; 3] = ["kvm/kvm_unmap_hva_range", "kvm/kvm_age_hva", "kvm/kvm_test_age_hva"];

/// Kernel threads whose page-table changes reach KVM's MMU notifier.
const KERNEL_THREADS: [&str; 5] = ["ksmd", "kswapd", "khugepaged", "kcompactd", "kdamond"];

/// Per-CPU buffer of each instance, KiB.
const BUFFER_KB: u32 = 16 * 1024;

/// A running recording. Instances (and a tracefs mount we made) go away on drop.
#[derive(Debug)]
pub struct KvmTraceSession {
    // Instances before the mount: they must be removed first.
    own: Instance,
    kernel: Option<Instance>,
    _tracefs: Tracefs,
    /// Events this kernel lacks (not recorded).
    pub missing_events: Vec<String>,
    /// The kernel threads followed, `comm(pid)`.
    pub kernel_threads: Vec<String>,
}

impl KvmTraceSession {
    /// Starts recording for this process and the host ranges `ram` (`(hva, len)`).
    pub fn start(ram: &[(u64, u64)]) -> Result<Self, HostError> {
        let tracefs = Tracefs::open()?;
        if !tracefs.has_event("kvm/kvm_unmap_hva_range") {
            return Err(HostError::Unavailable {
                feature: "KVM trace events",
                reason: "tracefs has no kvm:kvm_unmap_hva_range (is the kvm module loaded?)".into(),
            });
        }
        let missing_events: Vec<String> =
            OWN_EVENTS.iter().filter(|e| !tracefs.has_event(e)).map(|e| e.to_string()).collect();
        let pid = std::process::id();
        let own = tracefs.instance(&format!("faultline-{pid}-own"))?;
        own.set("trace_clock", "mono")?;
        own.set("buffer_size_kb", &BUFFER_KB.to_string())?;
        own.set("options/event-fork", "1")?;
        own.set("set_event_pid", &pid.to_string())?;
        for e in OWN_EVENTS.iter().filter(|e| tracefs.has_event(e)) {
            own.set(&format!("events/{e}/enable"), "1")?;
        }
        let threads = kernel_threads();
        let kernel_threads = threads.iter().map(|(pid, comm)| format!("{comm}({pid})")).collect();
        let kernel = if threads.is_empty() || ram.is_empty() {
            None
        } else {
            let kernel = tracefs.instance(&format!("faultline-{pid}-kernel"))?;
            kernel.set("trace_clock", "mono")?;
            kernel.set("buffer_size_kb", &(BUFFER_KB / 4).to_string())?;
            let pids = threads.iter().map(|(p, _)| format!("common_pid == {p}")).collect::<Vec<_>>().join(" || ");
            for e in KERNEL_EVENTS {
                let span = if e.ends_with("test_age_hva") {
                    ram.iter().map(|(a, l)| format!("(hva >= {a} && hva < {})", a + l)).collect::<Vec<_>>()
                } else {
                    ram.iter().map(|(a, l)| format!("(start < {} && end > {a})", a + l)).collect::<Vec<_>>()
                };
                kernel.set(&format!("events/{e}/filter"), &format!("({pids}) && ({})", span.join(" || ")))?;
                kernel.set(&format!("events/{e}/enable"), "1")?;
            }
            kernel.set("tracing_on", "1")?;
            Some(kernel)
        };
        own.set("tracing_on", "1")?;
        Ok(KvmTraceSession { own, kernel, _tracefs: tracefs, missing_events, kernel_threads })
    }

    /// Stops recording and returns the events in time order, with the count of events the
    /// buffers dropped (overruns).
    pub fn stop(&self) -> (Vec<TraceEvent>, u64) {
        let mut events = Vec::new();
        let mut lost = 0;
        for instance in std::iter::once(&self.own).chain(self.kernel.as_ref()) {
            let _ = instance.set("tracing_on", "0");
            lost += overruns(instance);
            if let Ok(text) = instance.read("trace") {
                events.extend(text.lines().filter_map(parse_line));
            }
        }
        events.sort_by_key(|e| e.ts_ns);
        (events, lost)
    }
}

/// Sum of the per-CPU `overrun:` counts of an instance.
fn overruns(instance: &Instance) -> u64 {
    let Ok(cpus) = std::fs::read_dir(instance.dir().join("per_cpu")) else { return 0 };
    cpus.flatten()
        .filter_map(|cpu| std::fs::read_to_string(cpu.path().join("stats")).ok())
        .flat_map(|stats| {
            stats
                .lines()
                .filter_map(|l| l.strip_prefix("overrun:").and_then(|v| v.trim().parse::<u64>().ok()))
                .collect::<Vec<_>>()
        })
        .sum()
}

/// `(pid, comm)` of the kernel threads in [`KERNEL_THREADS`] (children of kthreadd).
fn kernel_threads() -> Vec<(u32, String)> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ...
        let Some((comm, rest)) = stat.split_once('(').and_then(|(_, r)| r.rsplit_once(')')) else { continue };
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(2) && KERNEL_THREADS.iter().any(|k| comm.starts_with(k)) {
            out.push((pid, comm.to_string()));
        }
    }
    out.sort();
    out
}
