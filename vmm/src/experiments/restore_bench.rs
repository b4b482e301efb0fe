//! `faultline bench restore`: how each restore mode's start and warm-up grow with guest
//! size, for sparse guests (a fixed touched part in 1 GiB and 16 GiB of RAM by default).
//!
//! Per size, a guest runs `fill,idle,touch,verify` over the touched part and is
//! snapshotted (`--stop`) as soon as its fill reports; each mode then restores that
//! snapshot in a new process. The restored guest reads every page it filled once in a
//! random order (`touch`, timing each read with its TSC: the stalls the guest saw), then
//! verifies every page. Figures per mode: restore start → the first guest instruction (the
//! run report's boot timeline), the touch step's wall time inside the guest (its "warm"
//! point: every touched page brought back), the whole run, the fault engine's MISSING or
//! MINOR faults with their p50/p99 latency, and the guest's stall distribution (a CDF;
//! `--plots DIR` draws it and the warm times as SVG). `uffd-socket` restores against a `faultline
//! page-server` child; `uffd-minor` restores into a memfd zone, whose page cache is filled
//! for the whole zone up front (so it is skipped for zones larger than half of this
//! host's available memory). Figures, not thresholds: read them with docs/lazy-restore.md.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::plot::{self, Labels, Series};
use crate::api::ControlClient;
use crate::guest_report::GuestHistogram;

/// Options of `faultline bench restore`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreBenchArgs {
    /// Guest RAM sizes in MiB, comma-separated (each a sparse guest).
    #[arg(long, value_delimiter = ',', default_value = "1024,16384")]
    pub memory_mib: Vec<u64>,
    /// The part of RAM the guest fills before the snapshot and verifies after, MiB.
    #[arg(long, default_value_t = 128)]
    pub touched_mib: u64,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Restore modes, comma-separated: eager, map, uffd-missing, uffd-missing-bg (with
    /// `--prefetch background`), uffd-missing-ws (a recording restore first, then
    /// `--prefetch working-set`), uffd-minor, uffd-socket (against a page server).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "eager,map,uffd-missing,uffd-missing-bg,uffd-missing-ws,uffd-minor,uffd-socket"
    )]
    pub modes: Vec<String>,
    /// Where snapshots go (a fresh directory is made inside); tmpfs by default.
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also draw `restore-warm.svg` (time to warm by mode and size) and
    /// `restore-stalls.svg` (CDF of the stalls the guest saw, largest size) into this
    /// directory.
    #[arg(long)]
    pub plots: Option<PathBuf>,
}

/// Errors of the restore benchmark.
#[derive(Debug, thiserror::Error)]
pub enum RestoreBenchError {
    /// A child process could not be started, talked to, or failed.
    #[error("bench restore: {what}: {reason}")]
    Step {
        /// What was being done.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A plot could not be written.
    #[error("bench restore: {0}")]
    Plot(#[from] super::plot::PlotError),
}

fn step(what: impl Into<String>) -> impl FnOnce(String) -> RestoreBenchError {
    let what = what.into();
    move |reason| RestoreBenchError::Step { what, reason }
}

/// One restore of one size in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreRow {
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// The mode.
    pub mode: String,
    /// Restore start → first guest instruction, ms.
    pub first_instruction_ms: f64,
    /// The guest's touch step over the touched part (its warm point), wall ms.
    pub warm_ms: f64,
    /// The whole restored run, ms.
    pub total_ms: f64,
    /// Bytes read before the vCPUs started.
    pub restored_bytes: u64,
    /// Faults the fault engine resolved (0 for kernel-paged modes and uffd-socket).
    pub faults: u64,
    /// Their p50 / p99 latency, µs.
    pub fault_p50_us: f64,
    /// p99, µs.
    pub fault_p99_us: f64,
    /// Faults the page server served (uffd-socket).
    pub page_server_faults: u64,
    /// The stalls the guest saw in its touch step: (µs, fraction of touches at or
    /// below), from its TSC histogram.
    pub stall_cdf_us: Vec<(f64, f64)>,
}

/// What `bench restore` measured.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreBenchReport {
    /// Touched MiB per guest.
    pub touched_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// One row per size and mode.
    pub rows: Vec<RestoreRow>,
    /// Modes skipped, with why.
    pub skipped: Vec<String>,
}

/// Runs the benchmark.
pub fn run(args: &RestoreBenchArgs) -> Result<RestoreBenchReport, RestoreBenchError> {
    let work = args.dir.join(format!("faultline-bench-restore-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| step(format!("create {}", work.display()))(e.to_string()))?;
    let result = run_in(args, &work);
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;
    if let Some(dir) = &args.plots {
        report.plot(dir)?;
    }
    Ok(report)
}

fn run_in(args: &RestoreBenchArgs, work: &Path) -> Result<RestoreBenchReport, RestoreBenchError> {
    let mut report =
        RestoreBenchReport { touched_mib: args.touched_mib, vcpus: args.vcpus, rows: Vec::new(), skipped: Vec::new() };
    for &memory_mib in &args.memory_mib {
        let snapshot = take_snapshot(args, work, memory_mib)?;
        for mode in &args.modes {
            if mode == "uffd-minor" && memory_mib << 20 > available_memory_bytes() / 2 {
                report.skipped.push(format!("uffd-minor at {memory_mib} MiB: it fills the whole zone's page cache, more than half of this host's available memory"));
                continue;
            }
            report.rows.push(restore_row(work, &snapshot, memory_mib, mode)?);
        }
        let _ = std::fs::remove_dir_all(&snapshot);
    }
    Ok(report)
}

fn exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("faultline"))
}

/// A guest of `memory_mib` that filled the touched part, snapshotted and stopped.
fn take_snapshot(args: &RestoreBenchArgs, work: &Path, memory_mib: u64) -> Result<PathBuf, RestoreBenchError> {
    let socket = work.join(format!("run-{memory_mib}.sock"));
    let dir = work.join(format!("snap-{memory_mib}"));
    let mut child = Command::new(exe())
        .args(["run", "--console", "--timeout", "600", "--vcpus", &args.vcpus.to_string()])
        .args(["-m", &format!("size={memory_mib}M"), "--size", &(args.touched_mib << 20).to_string()])
        .args(["--steps", "fill,idle,touch,verify", "--duration-ms", "200", "--pattern", "random", "--access", "read"])
        .arg("--api-socket")
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| step("start faultline run")(e.to_string()))?;
    let result = (|| {
        let mut console = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        while !line.starts_with("FL result") {
            line.clear();
            if console.read_line(&mut line).map_err(|e| step("read the console")(e.to_string()))? == 0 {
                return Err(step("faultline run")("the console closed before the fill's result".into()));
            }
        }
        let mut client = ControlClient::connect(&socket, Some(Duration::from_secs(600)))
            .map_err(|e| step("connect to faultline")(e.to_string()))?;
        client
            .call("snapshot.create", json!({ "dir": dir, "then": "stop" }))
            .map_err(|e| step("snapshot.create")(e.to_string()))?;
        Ok(dir.clone())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Restores `snapshot` in `mode` and reads the figures off its report.
fn restore_row(work: &Path, snapshot: &Path, memory_mib: u64, mode: &str) -> Result<RestoreRow, RestoreBenchError> {
    let mut command = Command::new(exe());
    command.args(["restore", "--json", "--timeout", "600", "--from"]).arg(snapshot);
    let mut server: Option<Child> = None;
    match mode {
        "uffd-socket" => {
            let socket = work.join(format!("pager-{memory_mib}.sock"));
            let child = Command::new(exe())
                .args(["page-server", "--json", "--socket"])
                .arg(&socket)
                .arg("--from")
                .arg(snapshot)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| step("start faultline page-server")(e.to_string()))?;
            let started = Instant::now();
            while !socket.exists() && started.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(5));
            }
            server = Some(child);
            command.arg("--memory-restore").arg(format!("uffd-socket:{}", socket.display()));
        }
        "uffd-missing-bg" => {
            command.args(["--memory-restore", "uffd-missing", "--prefetch", "background"]);
        }
        "uffd-missing-ws" => {
            // Record the working set in one restore, then prefetch it in the measured one.
            let recorded = Command::new(exe())
                .args(["restore", "--json", "--timeout", "600", "--memory-restore", "uffd-missing"])
                .args(["--record-working-set", "--working-set-ms", "600000", "--from"])
                .arg(snapshot)
                .output()
                .map_err(|e| step("record the working set")(e.to_string()))?;
            if !recorded.status.success() {
                return Err(step("record the working set")(String::from_utf8_lossy(&recorded.stderr).to_string()));
            }
            command.args(["--memory-restore", "uffd-missing", "--prefetch", "working-set"]);
        }
        "uffd-minor" => {
            command.args(["--memory-restore", "uffd-minor", "-m", &format!("size={memory_mib}M,backend=memfd")]);
        }
        other => {
            command.args(["--memory-restore", other]);
        }
    }
    let output = command.output().map_err(|e| step(format!("restore {mode}"))(e.to_string()))?;
    let served: Value = match server {
        Some(child) => {
            child.wait_with_output().ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or(Value::Null)
        }
        None => Value::Null,
    };
    // The snapshotted run echoed its console, and so does the restored one (the console
    // setting is part of the saved config): the report is what follows the console lines.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json_start = stdout.find("\n{\n").map_or(0, |at| at + 1);
    let report: Value = serde_json::from_str(&stdout[json_start..]).map_err(|e| {
        step(format!("restore {mode}"))(format!(
            "no JSON report ({e}, {}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    })?;
    if !output.status.success() {
        return Err(step(format!("restore {mode} at {memory_mib} MiB"))(format!(
            "it did not succeed: {}",
            report["exit"]
        )));
    }
    let ms = |v: &Value| v.as_u64().unwrap_or(0) as f64 / 1e6;
    // The first touch pass after the restore: the later ones find every page in place.
    let touch = report["guest"]["results"].as_array().and_then(|r| r.iter().find(|x| x["step"] == "touch"));
    let tsc_khz = report["guest"]["ready"]["tsc_khz"].as_u64().unwrap_or(0);
    let stall_cdf_us = touch
        .and_then(|t| serde_json::from_value::<GuestHistogram>(t["latency_cycles"].clone()).ok())
        .map_or_else(Vec::new, |h| h.cdf_us(tsc_khz));
    let latency = report["faults"]["latency"].as_array().cloned().unwrap_or_default();
    let faults: u64 = latency.iter().map(|l| l["count"].as_u64().unwrap_or(0)).sum();
    let first = latency.first();
    Ok(RestoreRow {
        memory_mib,
        mode: mode.to_string(),
        first_instruction_ms: ms(&report["boot"]["first_instruction_ns"]),
        warm_ms: touch.map_or(0.0, |v| ms(&v["host_wall_ns"])),
        total_ms: ms(&report["total_ns"]),
        restored_bytes: report["restored_bytes"].as_u64().unwrap_or(0),
        faults,
        fault_p50_us: first.map_or(0.0, |l| l["p50_ns"].as_f64().unwrap_or(0.0) / 1e3),
        fault_p99_us: first.map_or(0.0, |l| l["p99_ns"].as_f64().unwrap_or(0.0) / 1e3),
        page_server_faults: served["faults"].as_u64().unwrap_or(0),
        stall_cdf_us,
    })
}

/// `MemAvailable` from /proc/meminfo, bytes (0 when unknown).
fn available_memory_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

impl RestoreBenchReport {
    /// Draws the warm times (bars: one group per mode, one bar per size) and the stall
    /// CDFs of the largest size into `dir`.
    pub fn plot(&self, dir: &Path) -> Result<(), RestoreBenchError> {
        std::fs::create_dir_all(dir).map_err(|e| step(format!("create {}", dir.display()))(e.to_string()))?;
        let mut modes: Vec<String> = Vec::new();
        let mut sizes: Vec<u64> = Vec::new();
        for r in &self.rows {
            if !modes.contains(&r.mode) {
                modes.push(r.mode.clone());
            }
            if !sizes.contains(&r.memory_mib) {
                sizes.push(r.memory_mib);
            }
        }
        let index = |mode: &str| modes.iter().position(|m| m == mode).unwrap_or(0) as f64;
        let warm: Vec<Series> = sizes
            .iter()
            .map(|&size| {
                let points = self.rows.iter().filter(|r| r.memory_mib == size).map(|r| (index(&r.mode), r.warm_ms));
                Series::new(format!("{size} MiB"), points.collect())
            })
            .collect();
        let title = format!("Time to warm ({} MiB touched, {} vCPUs)", self.touched_mib, self.vcpus);
        plot::bars(&dir.join("restore-warm.svg"), Labels { title: &title, x: "restore mode", y: "ms" }, &modes, &warm)?;
        let largest = sizes.iter().copied().max().unwrap_or(0);
        let stalls: Vec<Series> = self
            .rows
            .iter()
            .filter(|r| r.memory_mib == largest && !r.stall_cdf_us.is_empty())
            .map(|r| Series::new(r.mode.clone(), r.stall_cdf_us.clone()))
            .collect();
        let title = format!("Stalls the guest saw touching its pages after restore ({largest} MiB)");
        plot::cdf_curves(
            &dir.join("restore-stalls.svg"),
            Labels { title: &title, x: "µs per touch", y: "fraction of touches" },
            &stalls,
        )?;
        Ok(())
    }

    /// The table for people: one line per size and mode, then the largest size's start
    /// and warm-up as ratios to the smallest's.
    pub fn table(&self) -> String {
        let mut out = format!(
            "restore of a sparse guest ({} MiB touched, {} vCPUs)\n{:>8} {:<12} {:>12} {:>10} {:>10} {:>12} {:>9} {:>9} {:>9}\n",
            self.touched_mib, self.vcpus, "RAM MiB", "mode", "1st insn ms", "warm ms", "total ms", "read MiB", "faults", "p50 µs", "p99 µs"
        );
        for r in &self.rows {
            let faults = if r.page_server_faults > 0 { r.page_server_faults } else { r.faults };
            out += &format!(
                "{:>8} {:<12} {:>12.2} {:>10.1} {:>10.1} {:>12.1} {:>9} {:>9.1} {:>9.1}\n",
                r.memory_mib,
                r.mode,
                r.first_instruction_ms,
                r.warm_ms,
                r.total_ms,
                r.restored_bytes as f64 / (1 << 20) as f64,
                faults,
                r.fault_p50_us,
                r.fault_p99_us
            );
        }
        let sizes: Vec<u64> = self.rows.iter().map(|r| r.memory_mib).collect();
        if let (Some(&small), Some(&large)) = (sizes.iter().min(), sizes.iter().max()) {
            if small != large {
                out += &format!("{large} MiB / {small} MiB:\n");
                for r in self.rows.iter().filter(|r| r.memory_mib == large) {
                    if let Some(s) = self.rows.iter().find(|s| s.memory_mib == small && s.mode == r.mode) {
                        out += &format!(
                            "  {:<12} first instruction {:.2}x, warm {:.2}x\n",
                            r.mode,
                            r.first_instruction_ms / s.first_instruction_ms.max(1e-9),
                            r.warm_ms / s.warm_ms.max(1e-9)
                        );
                    }
                }
            }
        }
        for s in &self.skipped {
            out += &format!("skipped: {s}\n");
        }
        out
    }
}
