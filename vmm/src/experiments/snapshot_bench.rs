//! `faultline bench snapshot`: pause latency, snapshot time and size against touched
//! memory (full and diff), and eager restore time, with QEMU microvm doing the same on
//! the same ELF in the same run (`stop` + `migrate exec:cat > FILE`, then `-incoming
//! exec:cat FILE` until `query-status` says running), reported as ratios.
//!
//! Both VMMs run the built-in guest with `fill,dirty`: it writes the pattern over the
//! touched size, then keeps dirtying pages slowly, so a snapshot falls in the middle of a
//! running workload. A VMM's figures come from its own clock: Faultline's from the
//! control socket's answer (pause and snapshot times measured inside the VMM) and the
//! restored VM's report (process start to running); QEMU's from this process around its
//! QMP commands and its process start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::boot_bench::QEMU_MICROVM_ARGS;
use super::console_child::{ConsoleChild, ConsoleError};
use super::qmp::{Qmp, QmpError};
use crate::api::ControlClient;
use crate::config::{Backend, VmConfig, ZoneConfig};

/// Options of `faultline bench snapshot`.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotBenchArgs {
    /// Guest RAM in MiB (the guest is sparse: only the touched part is written).
    #[arg(long, default_value_t = 1024)]
    pub memory_mib: u64,
    /// Touched sizes in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16,256,1000")]
    pub touched_mib: Vec<u64>,
    /// vCPU counts for the pause latency, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub pause_vcpus: Vec<u32>,
    /// Pauses timed per vCPU count.
    #[arg(long, default_value_t = 20)]
    pub pauses: usize,
    /// Rounds per touched size, Faultline and QEMU alternating; the best round of each
    /// is reported (the first rounds also warm the host's page cache and memory).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Where snapshots and QEMU's migration files go (a fresh directory is made inside).
    /// tmpfs by default, so the figures are the VMMs' and not this host's disk's; give a
    /// disk directory to include it.
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// QEMU binary to compare against ("none" to skip).
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Instead of the above: a live snapshot by Faultline (`--live`) beside QEMU's
    /// `background-snapshot` of the same guest (`--memory-mib`, filled whole) while it
    /// rewrites its pages flat out; pause, total time and the guest's slowdown.
    #[arg(long)]
    pub live: bool,
    /// `--live`: how long the guest rewrites its pages after its fill, ms (must outlast
    /// QEMU's snapshot for its slowdown figure).
    #[arg(long, default_value_t = 20_000)]
    pub live_ms: u64,
}

/// Errors of the snapshot benchmark.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotBenchError {
    /// A child VMM could not be started, or its console closed early.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// Talking to QEMU's QMP socket failed.
    #[error("QEMU: {0}")]
    Qmp(#[from] QmpError),
    /// A child process could not be started or talked to.
    #[error("{what}: {reason}")]
    Step {
        /// What was being done.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

fn step(what: impl Into<String>) -> impl FnOnce(String) -> SnapshotBenchError {
    let what = what.into();
    move |reason| SnapshotBenchError::Step { what, reason }
}

/// Pause latency at one vCPU count.
#[derive(Debug, Clone, Serialize)]
pub struct PauseFigures {
    /// vCPUs.
    pub vcpus: u32,
    /// Faultline: median and worst pause, µs (inside the VMM: command to all vCPUs out).
    pub faultline_median_us: f64,
    /// Worst.
    pub faultline_max_us: f64,
    /// QEMU: median `stop` round trip over QMP, µs (includes the QMP round trip).
    pub qemu_stop_median_us: Option<f64>,
}

/// Snapshot and restore at one touched size.
#[derive(Debug, Clone, Serialize)]
pub struct SizeFigures {
    /// MiB the guest wrote.
    pub touched_mib: u64,
    /// Faultline full snapshot, ms, and bytes carried.
    pub full_ms: f64,
    /// Bytes the full snapshot's images carry.
    pub full_bytes: u64,
    /// Bytes the snapshot occupies on disk (sparse files).
    pub full_disk_bytes: u64,
    /// A live snapshot (`snapshot.create` with `live`) taken first, while the guest
    /// dirties: the whole snapshot, ms.
    pub live_ms: f64,
    /// How long the live snapshot stopped the vCPUs, µs.
    pub live_pause_us: f64,
    /// Guest writes that waited for their page's copy during the live snapshot.
    pub live_write_faults: u64,
    /// A diff 200 ms later, ms, and bytes.
    pub diff_ms: f64,
    /// Bytes the diff carries.
    pub diff_bytes: u64,
    /// Eager restore: process start to the restored vCPUs about to run, ms.
    pub restore_ms: f64,
    /// QEMU: `stop` + `migrate exec:cat > FILE` until completed, ms.
    pub qemu_save_ms: Option<f64>,
    /// QEMU's migration file, bytes.
    pub qemu_file_bytes: Option<u64>,
    /// QEMU: process start with `-incoming exec:cat FILE` to running, ms.
    pub qemu_restore_ms: Option<f64>,
}

impl SizeFigures {
    /// Each figure's better value of two rounds (sizes from the faster full snapshot).
    fn best_of(self, other: SizeFigures) -> SizeFigures {
        let min = |a: f64, b: f64| a.min(b);
        let min_opt = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sizes = if self.full_ms <= other.full_ms { &self } else { &other };
        SizeFigures {
            touched_mib: self.touched_mib,
            full_ms: min(self.full_ms, other.full_ms),
            full_bytes: sizes.full_bytes,
            full_disk_bytes: sizes.full_disk_bytes,
            live_ms: min(self.live_ms, other.live_ms),
            live_pause_us: min(self.live_pause_us, other.live_pause_us),
            live_write_faults: sizes.live_write_faults,
            diff_ms: min(self.diff_ms, other.diff_ms),
            diff_bytes: sizes.diff_bytes,
            restore_ms: min(self.restore_ms, other.restore_ms),
            qemu_save_ms: min_opt(self.qemu_save_ms, other.qemu_save_ms),
            qemu_file_bytes: self.qemu_file_bytes.or(other.qemu_file_bytes),
            qemu_restore_ms: min_opt(self.qemu_restore_ms, other.qemu_restore_ms),
        }
    }
}

/// The whole benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotBenchReport {
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Pause latency rows.
    pub pauses: Vec<PauseFigures>,
    /// Snapshot/restore rows.
    pub sizes: Vec<SizeFigures>,
    /// Why QEMU was not measured, if it was not.
    pub qemu_note: Option<String>,
}

/// Runs the benchmark.
pub fn run(args: &SnapshotBenchArgs) -> Result<SnapshotBenchReport, SnapshotBenchError> {
    let work = args.dir.join(format!("faultline-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| step(format!("create {}", work.display()))(e.to_string()))?;
    let with_qemu =
        args.qemu != "none" && Command::new(&args.qemu).arg("--version").output().is_ok_and(|o| o.status.success());
    let image = work.join("guest.elf");
    std::fs::write(&image, crate::BUILTIN_GUEST_ELF).map_err(|e| step("write the guest image")(e.to_string()))?;
    let result = (|| {
        let mut pauses = Vec::new();
        for &vcpus in &args.pause_vcpus {
            pauses.push(pause_row(args, &work, &image, vcpus, with_qemu)?);
        }
        let mut sizes = Vec::new();
        for &touched in &args.touched_mib {
            let mut best: Option<SizeFigures> = None;
            for _ in 0..args.rounds.max(1) {
                let round = size_row(args, &work, &image, touched, with_qemu)?;
                best = Some(match best {
                    None => round,
                    Some(best) => best.best_of(round),
                });
            }
            sizes.extend(best);
        }
        Ok(SnapshotBenchReport {
            memory_mib: args.memory_mib,
            pauses,
            sizes,
            qemu_note: (!with_qemu).then(|| format!("{} not found or not runnable: QEMU not measured", args.qemu)),
        })
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The guest's workload for `touched` MiB: fill it, then dirty slowly "forever".
fn workload_config(args: &SnapshotBenchArgs, vcpus: u32, touched_mib: u64) -> VmConfig {
    let mut config =
        VmConfig { vcpus, zones: vec![ZoneConfig::new(args.memory_mib << 20, Backend::Anon)], ..VmConfig::default() };
    config.workload.steps = vec!["fill".into(), "dirty".into()];
    config.workload.size_bytes = Some(touched_mib << 20);
    config.workload.rate_pages_per_s = 2000;
    config.workload.duration_ms = 600_000;
    config
}

fn faultline_run(config: &VmConfig, socket: &Path) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("faultline"));
    let mut command = Command::new(exe);
    command.args(["run", "--console", "--vcpus", &config.vcpus.to_string()]);
    command.args(["-m", &format!("size={}", config.zones[0].size_bytes)]);
    command.args(["--steps", "fill,dirty", "--rate", &config.workload.rate_pages_per_s.to_string()]);
    command.args(["--duration-ms", &config.workload.duration_ms.to_string()]);
    command.args(["--size", &config.workload.size_bytes.unwrap_or(0).to_string()]);
    command.arg("--api-socket").arg(socket);
    command
}

fn qemu_run(args: &SnapshotBenchArgs, config: &VmConfig, image: &Path, qmp: &Path) -> Command {
    let mut command = Command::new(&args.qemu);
    command.args(QEMU_MICROVM_ARGS);
    command.args(["-smp", &config.vcpus.to_string(), "-m", &format!("{}M", config.zones[0].size_bytes >> 20)]);
    command.arg("-kernel").arg(image);
    command.args(["-append", &config.guest_cmdline(None)]);
    command.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
    command
}

/// Connects to a Faultline child's control socket (waiting up to 30 s for it).
pub(super) fn connect(socket: &Path) -> Result<ControlClient, SnapshotBenchError> {
    let started = Instant::now();
    loop {
        match ControlClient::connect(socket, Some(Duration::from_secs(120))) {
            Ok(client) => return Ok(client),
            Err(e) if started.elapsed() > Duration::from_secs(30) => {
                return Err(step("connect to faultline")(e.to_string()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// One control-socket call.
pub(super) fn call(client: &mut ControlClient, cmd: &str, args: Value) -> Result<Value, SnapshotBenchError> {
    client.call(cmd, args).map_err(|e| step(format!("faultline ctl {cmd}"))(e.to_string()))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn pause_row(
    args: &SnapshotBenchArgs,
    work: &Path,
    image: &Path,
    vcpus: u32,
    with_qemu: bool,
) -> Result<PauseFigures, SnapshotBenchError> {
    let config = workload_config(args, vcpus, 64);
    let socket = work.join(format!("pause-{vcpus}.sock"));
    let mut guest = ConsoleChild::spawn(faultline_run(&config, &socket), "faultline")?;
    guest.wait_for("FL result", "faultline: fill")?;
    let mut client = connect(&socket)?;
    let mut ours = Vec::new();
    for _ in 0..args.pauses.max(1) {
        let paused = call(&mut client, "pause", Value::Null)?;
        ours.push(paused["pause_ns"].as_u64().unwrap_or(0) as f64 / 1e3);
        call(&mut client, "resume", Value::Null)?;
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(guest);
    let qemu_stop_median_us = if with_qemu {
        let qmp_path = work.join(format!("qmp-pause-{vcpus}.sock"));
        let mut guest = ConsoleChild::spawn(qemu_run(args, &config, image, &qmp_path), "qemu")?;
        guest.wait_for("FL result", "qemu: fill")?;
        let mut qmp = Qmp::connect(&qmp_path)?;
        let mut theirs = Vec::new();
        for _ in 0..args.pauses.max(1) {
            let started = Instant::now();
            qmp.execute("stop", Value::Null)?;
            theirs.push(started.elapsed().as_secs_f64() * 1e6);
            qmp.execute("cont", Value::Null)?;
            std::thread::sleep(Duration::from_millis(5));
        }
        Some(median(theirs))
    } else {
        None
    };
    let max = ours.iter().copied().fold(0.0, f64::max);
    Ok(PauseFigures { vcpus, faultline_median_us: median(ours), faultline_max_us: max, qemu_stop_median_us })
}

fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum())
        .unwrap_or(0)
}

fn size_row(
    args: &SnapshotBenchArgs,
    work: &Path,
    image: &Path,
    touched_mib: u64,
    with_qemu: bool,
) -> Result<SizeFigures, SnapshotBenchError> {
    let config = workload_config(args, 1, touched_mib);
    let socket = work.join(format!("size-{touched_mib}.sock"));
    let full_dir = work.join(format!("full-{touched_mib}"));
    let live_dir = work.join(format!("live-{touched_mib}"));
    let diff_dir = work.join(format!("diff-{touched_mib}"));
    let mut guest = ConsoleChild::spawn(faultline_run(&config, &socket), "faultline")?;
    guest.wait_for("FL result", "faultline: fill")?;
    let mut client = connect(&socket)?;
    let live = call(&mut client, "snapshot.create", json!({ "dir": live_dir, "live": true }))?;
    let _ = std::fs::remove_dir_all(&live_dir);
    let full = call(&mut client, "snapshot.create", json!({ "dir": full_dir }))?;
    std::thread::sleep(Duration::from_millis(200));
    let diff = call(&mut client, "snapshot.create", json!({ "dir": diff_dir, "diff": true, "then": "stop" }))?;
    drop(guest);
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("faultline"));
    let restored = Command::new(exe)
        .args(["restore", "--json", "--timeout", "0.3", "--from"])
        .arg(&full_dir)
        .output()
        .map_err(|e| step("faultline restore")(e.to_string()))?;
    let report: Value = serde_json::from_slice(&restored.stdout).map_err(|e| {
        step("faultline restore")(format!("no JSON report ({e}): {}", String::from_utf8_lossy(&restored.stderr)))
    })?;
    let restore_ms = report["setup_ns"].as_u64().unwrap_or(0) as f64 / 1e6;
    let mut figures = SizeFigures {
        touched_mib,
        full_ms: full["total_ms"].as_f64().unwrap_or(0.0),
        full_bytes: full["memory_bytes"].as_u64().unwrap_or(0),
        full_disk_bytes: disk_bytes(&full_dir),
        live_ms: live["total_ms"].as_f64().unwrap_or(0.0),
        live_pause_us: live["guest_pause_ns"].as_u64().unwrap_or(0) as f64 / 1e3,
        live_write_faults: live["write_faults"].as_u64().unwrap_or(0),
        diff_ms: diff["total_ms"].as_f64().unwrap_or(0.0),
        diff_bytes: diff["memory_bytes"].as_u64().unwrap_or(0),
        restore_ms,
        qemu_save_ms: None,
        qemu_file_bytes: None,
        qemu_restore_ms: None,
    };
    let _ = std::fs::remove_dir_all(&full_dir);
    let _ = std::fs::remove_dir_all(&diff_dir);
    if with_qemu {
        let (save_ms, file_bytes, restore_ms) = qemu_save_restore(args, work, image, &config)?;
        figures.qemu_save_ms = Some(save_ms);
        figures.qemu_file_bytes = Some(file_bytes);
        figures.qemu_restore_ms = Some(restore_ms);
    }
    Ok(figures)
}

/// QEMU saves the running guest to a file and restores it in a new process.
fn qemu_save_restore(
    args: &SnapshotBenchArgs,
    work: &Path,
    image: &Path,
    config: &VmConfig,
) -> Result<(f64, u64, f64), SnapshotBenchError> {
    let file = work.join("qemu.migration");
    let qmp_path = work.join("qmp-save.sock");
    let mut guest = ConsoleChild::spawn(qemu_run(args, config, image, &qmp_path), "qemu")?;
    guest.wait_for("FL result", "qemu: fill")?;
    let mut qmp = Qmp::connect(&qmp_path)?;
    // Let migration use the disk's speed, not QEMU's default 32 MiB/s cap.
    qmp.execute("migrate-set-parameters", json!({ "max-bandwidth": 100u64 << 30 }))?;
    let started = Instant::now();
    qmp.execute("stop", Value::Null)?;
    qmp.execute("migrate", json!({ "uri": format!("exec:cat > {}", file.display()) }))?;
    loop {
        let status = qmp.execute("query-migrate", Value::Null)?;
        match status["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => return Err(step("qemu migrate")(status.to_string())),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    let save_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(guest);
    let file_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let qmp_path = work.join("qmp-restore.sock");
    let mut command = qemu_run(args, config, image, &qmp_path);
    command.arg("-incoming").arg(format!("exec:cat {}", file.display()));
    let started = Instant::now();
    let _guest = ConsoleChild::spawn(command, "qemu -incoming")?;
    let mut qmp = Qmp::connect(&qmp_path)?;
    loop {
        let status = qmp.execute("query-status", Value::Null)?;
        if status["status"] == "running" {
            break;
        }
        // The source was stopped for the save, so the loaded VM waits paused: go on as
        // soon as the load has completed (Faultline's restore resumes by itself too).
        if status["status"] == "paused" && qmp.execute("query-migrate", Value::Null)?["status"] == "completed" {
            qmp.execute("cont", Value::Null)?;
            continue;
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(step("qemu -incoming")(format!("not running after 120 s: {status}")));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let restore_ms = started.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_file(&file);
    Ok((save_ms, file_bytes, restore_ms))
}

impl SnapshotBenchReport {
    /// The report as a table, with Faultline/QEMU ratios (below 1: Faultline faster).
    pub fn table(&self) -> String {
        let ratio = |ours: f64, theirs: Option<f64>| {
            theirs.filter(|t| *t > 0.0).map_or_else(|| "-".to_string(), |t| format!("{:.2}x", ours / t))
        };
        let mut out = format!("pause latency (guest {} MiB, dirtying)\n", self.memory_mib);
        out += "vcpus  faultline median  max        qemu stop (QMP round trip)  ratio\n";
        for p in &self.pauses {
            out += &format!(
                "{:<6} {:>9.0} µs      {:>6.0} µs  {:>12}                {}\n",
                p.vcpus,
                p.faultline_median_us,
                p.faultline_max_us,
                p.qemu_stop_median_us.map_or("-".into(), |q| format!("{q:.0} µs")),
                ratio(p.faultline_median_us, p.qemu_stop_median_us)
            );
        }
        out += &format!("\nsnapshot and eager restore, 1 vCPU, {} MiB guest, touched part written\n", self.memory_mib);
        out += "touched  full ms  full MiB  disk MiB  diff ms  diff MiB  restore ms | qemu save ms  file MiB  restore ms | save ratio  restore ratio\n";
        for s in &self.sizes {
            out += &format!(
                "{:>5} M  {:>7.1}  {:>8.1}  {:>8.1}  {:>7.1}  {:>8.2}  {:>10.1} | {:>12}  {:>8}  {:>10} | {:>10}  {:>13}\n",
                s.touched_mib,
                s.full_ms,
                s.full_bytes as f64 / 1048576.0,
                s.full_disk_bytes as f64 / 1048576.0,
                s.diff_ms,
                s.diff_bytes as f64 / 1048576.0,
                s.restore_ms,
                s.qemu_save_ms.map_or("-".into(), |v| format!("{v:.1}")),
                s.qemu_file_bytes.map_or("-".into(), |v| format!("{:.1}", v as f64 / 1048576.0)),
                s.qemu_restore_ms.map_or("-".into(), |v| format!("{v:.1}")),
                ratio(s.full_ms, s.qemu_save_ms),
                ratio(s.restore_ms, s.qemu_restore_ms),
            );
        }
        out += "\nlive snapshot (userfaultfd write-protect) of the same guest while it dirties\n";
        out += "touched  live ms  guest paused  writes that waited\n";
        for s in &self.sizes {
            out += &format!(
                "{:>5} M  {:>7.1}  {:>9.0} µs  {:>17}\n",
                s.touched_mib, s.live_ms, s.live_pause_us, s.live_write_faults
            );
        }
        if let Some(note) = &self.qemu_note {
            out += &format!("note: {note}\n");
        }
        out
    }
}
