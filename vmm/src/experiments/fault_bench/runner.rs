//! Runs one cell: one `faultline run --json` child process.
//!
//! Child processes rather than in-process `vmm::run`: every run starts from a fresh
//! address space (peak RSS, page cache of a memfd and the hugetlb pool are per run, so no
//! run inherits another's populated memory or allocator state), a cell that crashes or
//! hangs ends only its own process (the sweep notes the error and goes on), and the
//! engine options reach the engine through the child's environment. It is also what
//! `bench boot` does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::matrix::{access_name, Cell};
use super::sample::RunSample;
use crate::config::{AccessPattern, Backend};

/// How to start runs.
#[derive(Debug, Clone)]
pub struct Runner {
    /// The `faultline` binary.
    pub binary: PathBuf,
    /// Per-run limit, seconds (the child's own `--timeout`).
    pub timeout_s: f64,
    /// Directory for `file` backends (must be tmpfs for userfaultfd modes).
    pub file_dir: PathBuf,
    /// `--host-noise` for every run (see `host_noise`).
    pub host_noise: Option<crate::config::HostNoise>,
}

impl Runner {
    /// The exact command of a cell (`file_path`: the backing file of a `file` cell).
    pub fn command(&self, cell: &Cell, file_path: &Path) -> Command {
        let mut c = Command::new(&self.binary);
        let mut zone = format!("size={}K,backend={}", cell.memory_bytes() >> 10, cell.backend.name());
        if cell.backend == Backend::File {
            zone.push_str(&format!(",path={}", file_path.display()));
        }
        zone.push_str(&format!(",paging={}", cell.paging.name()));
        c.args(["run", "--json", "--vcpus", &cell.vcpus.to_string(), "--memory", &zone]);
        if cell.threads > 0 {
            c.args(["--fault-threads", &cell.threads.to_string()]);
        }
        let pattern = match cell.pattern {
            AccessPattern::Sequential => "sequential",
            AccessPattern::Random => "random",
            AccessPattern::Strided => "strided",
        };
        c.args(["--steps", "touch", "--passes", "2", "--pattern", pattern, "--access", access_name(cell.access)]);
        c.args(["--size", &format!("{}K", cell.size_bytes >> 10), "--timeout", &self.timeout_s.to_string()]);
        if cell.paging.uses_userfaultfd() {
            c.args(["--fault-engine", &cell.engine]);
        }
        if let Some(noise) = self.host_noise {
            c.args(["--host-noise", noise.name()]);
        }
        c
    }

    /// The command line of a cell as text (for the report).
    pub fn command_line(&self, cell: &Cell) -> String {
        let c = self.command(cell, &self.file_path(cell, 0));
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        format!("{} {}", c.get_program().to_string_lossy(), args.join(" "))
    }

    fn file_path(&self, _cell: &Cell, run: usize) -> PathBuf {
        self.file_dir.join(format!("faultline-bench-{}-{run}.img", std::process::id()))
    }

    /// Runs a cell once. Errors say what went wrong with the child.
    pub fn run(&self, cell: &Cell, run: usize) -> Result<RunSample, String> {
        let path = self.file_path(cell, run);
        let _ = std::fs::remove_file(&path);
        let output = self
            .command(cell, &path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()));
        let _ = std::fs::remove_file(&path);
        let output = output?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let why = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
            let exit = serde_json::from_str::<serde_json::Value>(&stdout).ok().map(|v| v["exit"].to_string());
            return Err(format!("run failed ({}): {}", output.status, exit.unwrap_or(why)));
        }
        RunSample::from_json(&stdout)
    }
}

/// 2 MiB pages a cell's guest RAM takes from the hugetlb pool (0 for other backends).
pub fn hugetlb_pages(cell: &Cell) -> u64 {
    if cell.backend == Backend::Hugetlb {
        cell.memory_bytes().div_ceil(2 << 20)
    } else {
        0
    }
}

/// Why the hugetlb pool cannot hold a cell's guest RAM, if it cannot.
pub fn hugetlb_shortfall(cell: &Cell) -> Option<String> {
    if cell.backend != Backend::Hugetlb {
        return None;
    }
    let needed = hugetlb_pages(cell);
    match crate::memory::limits::HugepagePool::read(2 << 20) {
        Ok(pool) => {
            let available = pool.free.saturating_sub(pool.reserved);
            (available < needed).then(|| {
                format!(
                    "needs {needed} free 2 MiB huge pages, the pool has {available}; pass --reserve-hugepages (root) or: echo {} > /proc/sys/vm/nr_hugepages",
                    pool.total + needed - available
                )
            })
        }
        Err(e) => Some(e.to_string()),
    }
}

/// 2 MiB pages added to the host pool for the sweep (`--reserve-hugepages`, root only);
/// given back on drop. Relative, so pool changes made meanwhile by others are kept.
#[derive(Debug)]
pub struct HugepageLoan {
    added: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugepageLoan {
    /// Adds what the pool lacks to have `needed` unreserved free pages; `Err` says why not.
    pub fn take(needed: u64) -> Result<Self, String> {
        let read = || crate::memory::limits::HugepagePool::read(2 << 20).map_err(|e| e.to_string());
        let pool = read()?;
        let short = needed.saturating_sub(pool.free.saturating_sub(pool.reserved));
        if short == 0 {
            return Ok(HugepageLoan { added: 0 });
        }
        std::fs::write(NR_HUGEPAGES, (pool.total + short).to_string()).map_err(|e| {
            format!("cannot raise {NR_HUGEPAGES} by {short} ({e}); run as root or reserve them yourself")
        })?;
        let loan = HugepageLoan { added: short };
        let now = read()?;
        if now.free.saturating_sub(now.reserved) < needed {
            return Err(format!("asked the kernel for {short} more 2 MiB pages, it found only {}", now.free));
        }
        Ok(loan)
    }

    /// Pages added.
    pub fn added(&self) -> u64 {
        self.added
    }
}

impl Drop for HugepageLoan {
    fn drop(&mut self) {
        if self.added == 0 {
            return;
        }
        if let Some(now) = std::fs::read_to_string(NR_HUGEPAGES).ok().and_then(|t| t.trim().parse::<u64>().ok()) {
            let _ = std::fs::write(NR_HUGEPAGES, now.saturating_sub(self.added).to_string());
        }
    }
}
