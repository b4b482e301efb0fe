//! What the benchmark ran on, recorded in every report: CPU, kernel, KVM module
//! parameters, huge page state, Faultline's version and commit, and the command line.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

/// The machine and software of a benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// CPUs this process may run on.
    pub cpus: usize,
    /// `uname -r`.
    pub kernel: String,
    /// Loaded KVM modules and their readable parameters (`/sys/module/<m>/parameters`).
    pub kvm_modules: BTreeMap<String, BTreeMap<String, String>>,
    /// 2 MiB pool: total, free, reserved; and the THP mode.
    pub hugepages: String,
    /// MemTotal from /proc/meminfo, MiB.
    pub memory_mib: u64,
    /// Faultline's version.
    pub faultline_version: String,
    /// `git describe --always --dirty` of the source tree the binary was built from, read
    /// when the benchmark runs (if the tree is still there): a binary older than the tree
    /// is not detected.
    pub git_commit: Option<String>,
    /// The exact command line of the benchmark.
    pub command_line: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix_s: u64,
}

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn kvm_modules() -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let Ok(modules) = std::fs::read_dir("/sys/module") else { return out };
    for m in modules.flatten() {
        let name = m.file_name().to_string_lossy().into_owned();
        if !name.starts_with("kvm") {
            continue;
        }
        let mut params = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(m.path().join("parameters")) {
            for p in entries.flatten() {
                if let Some(v) = read_trimmed(p.path()) {
                    params.insert(p.file_name().to_string_lossy().into_owned(), v);
                }
            }
        }
        out.insert(name, params);
    }
    out
}

fn hugepages() -> String {
    let pool = crate::memory::limits::HugepagePool::read(2 << 20)
        .map(|p| format!("2M pool {} (free {}, reserved {})", p.total, p.free, p.reserved))
        .unwrap_or_else(|e| format!("2M pool unreadable: {e}"));
    let thp = read_trimmed("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_else(|| "?".into());
    format!("{pool}; THP {thp}")
}

fn git_commit() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("git")
        .args(["-C", dir, "describe", "--always", "--dirty", "--abbrev=12"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl MachineInfo {
    /// Reads everything now; `command_line` is the benchmark's own.
    pub fn collect(command_line: String) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim()))
            .unwrap_or("unknown")
            .to_string();
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kb| kb / 1024);
        MachineInfo {
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into()),
            kvm_modules: kvm_modules(),
            hugepages: hugepages(),
            memory_mib,
            faultline_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: git_commit(),
            command_line,
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Lines for the top of the table.
    pub fn lines(&self) -> Vec<String> {
        let kvm: Vec<String> = self
            .kvm_modules
            .iter()
            .map(|(m, p)| {
                let interesting: Vec<String> = ["ept", "npt", "nested", "tdp_mmu", "enable_shadow_vmcs"]
                    .iter()
                    .filter_map(|k| p.get(*k).map(|v| format!("{k}={v}")))
                    .collect();
                if interesting.is_empty() {
                    m.clone()
                } else {
                    format!("{m}({})", interesting.join(","))
                }
            })
            .collect();
        vec![
            format!("machine: {} x{} ({} MiB), Linux {}", self.cpu_model, self.cpus, self.memory_mib, self.kernel),
            format!(
                "kvm: {}; hugepages: {}",
                if kvm.is_empty() { "no module info".into() } else { kvm.join(" ") },
                self.hugepages
            ),
            format!(
                "faultline {} ({}); command: {}",
                self.faultline_version,
                self.git_commit.as_deref().map_or("commit unknown".to_string(), |c| format!("tree at {c}")),
                self.command_line
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_info_reads_this_host() {
        let m = MachineInfo::collect("faultline bench faults".into());
        assert!(m.cpus >= 1);
        assert_ne!(m.kernel, "unknown", "/proc/sys/kernel/osrelease is readable on Linux");
        assert!(m.memory_mib > 0);
        assert!(m.lines()[2].contains("faultline bench faults"));
    }
}
