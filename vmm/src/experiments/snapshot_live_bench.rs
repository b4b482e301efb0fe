//! `faultline bench snapshot --live`: a live snapshot of a running guest by Faultline
//! (`snapshot.create` with `live`: userfaultfd write-protect) beside QEMU's
//! `background-snapshot` (`migrate-set-capabilities background-snapshot=on`, then
//! `migrate exec:cat > FILE`, the same userfaultfd write-protect technique) on the same
//! ELF, guest size and workload, in the same run, reported as ratios.
//!
//! The guest fills its RAM (all but its first 16 MiB), then rewrites its pages round-robin as fast as it can
//! (`dirty` with an unreachable rate) for `--live-ms`. Each VMM runs it twice: once
//! undisturbed and once with a snapshot taken as soon as the fill is reported. The
//! guest's own result (pages written in the step) gives its throughput; outside the
//! snapshot the disturbed run is assumed to go at the undisturbed rate, so its
//! throughput during the snapshot is `(pages - rate × (step - snapshot)) / snapshot`,
//! reported as a fraction of the undisturbed rate (1.0: no slowdown).
//!
//! The pause: Faultline's is measured inside the VMM (vCPUs stopped to resumed,
//! `guest_pause_ns`, with its breakdown); QEMU's from its QMP `STOP` and `RESUME` events'
//! timestamps (QEMU's own clock, µs). Total time: from the request to the snapshot being
//! complete (Faultline's answer; QEMU's `query-migrate` saying `completed`, polled every
//! 2 ms).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::boot_bench::QEMU_MICROVM_ARGS;
use super::console_child::ConsoleChild;
use super::qmp::Qmp;
use super::snapshot_bench::{call, connect, SnapshotBenchArgs, SnapshotBenchError};
use crate::config::{Backend, VmConfig, ZoneConfig};

/// The `dirty` step's rate: more than any guest here writes, so it runs flat out.
const FLAT_OUT_PAGES_PER_S: u64 = 1 << 40;

fn step(what: impl Into<String>) -> impl FnOnce(String) -> SnapshotBenchError {
    let what = what.into();
    move |reason| SnapshotBenchError::Step { what, reason }
}

/// One VMM's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LiveFigures {
    /// The guest-visible pause, µs.
    pub pause_us: Option<f64>,
    /// The whole snapshot, ms.
    pub total_ms: f64,
    /// Bytes of the snapshot on disk (image files or QEMU's migration file).
    pub bytes: u64,
    /// Pages the guest wrote per second, undisturbed.
    pub undisturbed_pages_per_s: f64,
    /// Pages the guest wrote per second in the run with the snapshot (whole step).
    pub disturbed_pages_per_s: f64,
    /// The guest's throughput during the snapshot as a fraction of the undisturbed one
    /// (1.0: no slowdown); `None` if the snapshot outlasted the step.
    pub throughput_during_snapshot: Option<f64>,
    /// Faultline: writes that waited for their page's copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_faults: Option<u64>,
    /// Faultline: the pause's breakdown, ns (see docs/snapshots.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_breakdown: Option<Value>,
    /// QEMU: `query-migrate`'s `downtime` at completion, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_downtime_ms: Option<f64>,
}

/// What `faultline bench snapshot --live` prints.
#[derive(Debug, Serialize)]
pub struct LiveBenchReport {
    /// Guest RAM, MiB (all of it filled).
    pub memory_mib: u64,
    /// The `dirty` step's length, ms.
    pub step_ms: u64,
    /// Faultline.
    pub faultline: LiveFigures,
    /// QEMU (`None` if not runnable).
    pub qemu: Option<LiveFigures>,
    /// Why QEMU is missing, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_note: Option<String>,
}

fn config(args: &SnapshotBenchArgs) -> VmConfig {
    let mut config = VmConfig {
        vcpus: 1,
        zones: vec![ZoneConfig::new(args.memory_mib << 20, Backend::Anon)],
        ..VmConfig::default()
    };
    config.workload.steps = vec!["fill".into(), "dirty".into()];
    // The workload region starts at 8 MiB; leave a little more for the guest's own use.
    config.workload.size_bytes = Some(args.memory_mib.saturating_sub(16) << 20);
    config.workload.rate_pages_per_s = FLAT_OUT_PAGES_PER_S;
    config.workload.duration_ms = args.live_ms;
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

/// Reads the console up to the `FL result` line of `step_name`; returns its JSON.
fn result_of(guest: &mut ConsoleChild, step_name: &str, what: &str) -> Result<Value, SnapshotBenchError> {
    let mut line = String::new();
    loop {
        line.clear();
        match guest.console.read_line(&mut line) {
            Ok(0) | Err(_) => return Err(step(what)(format!("the console closed before the {step_name} result"))),
            Ok(_) => {}
        }
        let Some(json) = line.strip_prefix("FL result ") else { continue };
        let Ok(value) = serde_json::from_str::<Value>(json) else { continue };
        if value["step"] == step_name {
            return Ok(value);
        }
    }
}

/// Pages per second of the `dirty` step over its whole length.
fn rate(result: &Value, step_ms: u64) -> f64 {
    result["pages"].as_u64().unwrap_or(0) as f64 / (step_ms as f64 / 1e3)
}

/// The guest's throughput during a snapshot of `snapshot_ms`, as a fraction of `undisturbed`.
fn during(undisturbed: f64, disturbed: f64, step_ms: u64, snapshot_ms: f64) -> Option<f64> {
    let step_s = step_ms as f64 / 1e3;
    let snapshot_s = snapshot_ms / 1e3;
    if snapshot_s >= step_s || snapshot_s <= 0.0 || undisturbed <= 0.0 {
        return None;
    }
    let pages_in_snapshot = disturbed * step_s - undisturbed * (step_s - snapshot_s);
    Some((pages_in_snapshot / snapshot_s / undisturbed).max(0.0))
}

fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else { return 0 };
    if meta.is_file() {
        return meta.blocks() * 512;
    }
    std::fs::read_dir(path)
        .map(|entries| entries.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum())
        .unwrap_or(0)
}

fn faultline_once(
    args: &SnapshotBenchArgs,
    work: &Path,
    snapshot: bool,
) -> Result<(Value, Option<Value>, u64), SnapshotBenchError> {
    let config = config(args);
    let socket = work.join(format!("live-{snapshot}.sock"));
    let dir = work.join("live-snapshot");
    let mut guest = ConsoleChild::spawn(faultline_run(&config, &socket), "faultline")?;
    result_of(&mut guest, "fill", "faultline: fill")?;
    let mut answer = None;
    let mut bytes = 0;
    if snapshot {
        let mut client = connect(&socket)?;
        let summary = call(&mut client, "snapshot.create", json!({ "dir": dir, "live": true }))?;
        bytes = disk_bytes(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        answer = Some(summary);
    }
    let result = result_of(&mut guest, "dirty", "faultline: dirty")?;
    Ok((result, answer, bytes))
}

fn faultline_figures(args: &SnapshotBenchArgs, work: &Path) -> Result<LiveFigures, SnapshotBenchError> {
    let (quiet, _, _) = faultline_once(args, work, false)?;
    let (busy, answer, bytes) = faultline_once(args, work, true)?;
    let answer = answer.unwrap_or(Value::Null);
    let undisturbed = rate(&quiet, args.live_ms);
    let disturbed = rate(&busy, args.live_ms);
    let total_ms = answer["total_ms"].as_f64().unwrap_or(0.0);
    Ok(LiveFigures {
        pause_us: answer["guest_pause_ns"].as_u64().map(|ns| ns as f64 / 1e3),
        total_ms,
        bytes,
        undisturbed_pages_per_s: undisturbed,
        disturbed_pages_per_s: disturbed,
        throughput_during_snapshot: during(undisturbed, disturbed, args.live_ms, total_ms),
        write_faults: answer["write_faults"].as_u64(),
        pause_breakdown: answer.get("pause_breakdown").cloned(),
        qemu_downtime_ms: None,
    })
}

/// The µs between QEMU's first `STOP` event and the next `RESUME`.
fn qemu_pause_us(events: &[Value]) -> Option<f64> {
    let at = |event: &Value| {
        let t = &event["timestamp"];
        Some(t["seconds"].as_f64()? * 1e6 + t["microseconds"].as_f64()?)
    };
    let stop = events.iter().position(|e| e["event"] == "STOP")?;
    let resume = events[stop..].iter().find(|e| e["event"] == "RESUME")?;
    Some(at(resume)? - at(&events[stop])?)
}

/// What QEMU's background snapshot took.
struct QemuSnapshot {
    total_ms: f64,
    pause_us: Option<f64>,
    downtime_ms: Option<f64>,
    bytes: u64,
}

fn qemu_once(
    args: &SnapshotBenchArgs,
    work: &Path,
    image: &Path,
    snapshot: bool,
) -> Result<(Value, Option<QemuSnapshot>), SnapshotBenchError> {
    let config = config(args);
    let qmp_path = work.join(format!("qmp-live-{snapshot}.sock"));
    let file = work.join("qemu.background-snapshot");
    let mut guest = ConsoleChild::spawn(qemu_run(args, &config, image, &qmp_path), "qemu")?;
    let mut qmp = Qmp::connect(&qmp_path)?;
    result_of(&mut guest, "fill", "qemu: fill")?;
    let mut figures = None;
    if snapshot {
        qmp.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "background-snapshot", "state": true }] }),
        )?;
        // As in `bench snapshot`: the disk's (tmpfs's) speed, not QEMU's 32 MiB/s default.
        qmp.execute("migrate-set-parameters", json!({ "max-bandwidth": 100u64 << 30 }))?;
        qmp.take_events();
        let started = Instant::now();
        qmp.execute("migrate", json!({ "uri": format!("exec:cat > {}", file.display()) }))?;
        let status = loop {
            let status = qmp.execute("query-migrate", Value::Null)?;
            match status["status"].as_str() {
                Some("completed") => break status,
                Some("failed") | Some("cancelled") => return Err(step("qemu background-snapshot")(status.to_string())),
                _ if started.elapsed() > Duration::from_secs(300) => {
                    return Err(step("qemu background-snapshot")(format!("not complete after 300 s: {status}")))
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        // The RESUME event may come after the first replies.
        std::thread::sleep(Duration::from_millis(50));
        qmp.execute("query-status", Value::Null)?;
        let pause_us = qemu_pause_us(&qmp.take_events());
        let downtime = status["downtime"].as_f64();
        figures = Some(QemuSnapshot { total_ms, pause_us, downtime_ms: downtime, bytes: disk_bytes(&file) });
        let _ = std::fs::remove_file(&file);
    }
    let result = result_of(&mut guest, "dirty", "qemu: dirty")?;
    Ok((result, figures))
}

fn qemu_figures(args: &SnapshotBenchArgs, work: &Path, image: &Path) -> Result<LiveFigures, SnapshotBenchError> {
    let (quiet, _) = qemu_once(args, work, image, false)?;
    let (busy, figures) = qemu_once(args, work, image, true)?;
    let QemuSnapshot { total_ms, pause_us, downtime_ms: downtime, bytes } =
        figures.unwrap_or(QemuSnapshot { total_ms: 0.0, pause_us: None, downtime_ms: None, bytes: 0 });
    let undisturbed = rate(&quiet, args.live_ms);
    let disturbed = rate(&busy, args.live_ms);
    Ok(LiveFigures {
        pause_us,
        total_ms,
        bytes,
        undisturbed_pages_per_s: undisturbed,
        disturbed_pages_per_s: disturbed,
        throughput_during_snapshot: during(undisturbed, disturbed, args.live_ms, total_ms),
        write_faults: None,
        pause_breakdown: None,
        qemu_downtime_ms: downtime,
    })
}

/// Runs the comparison (see the module doc).
pub fn run(args: &SnapshotBenchArgs) -> Result<LiveBenchReport, SnapshotBenchError> {
    let work = args.dir.join(format!("faultline-bench-snapshot-live-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| step(format!("create {}", work.display()))(e.to_string()))?;
    let with_qemu =
        args.qemu != "none" && Command::new(&args.qemu).arg("--version").output().is_ok_and(|o| o.status.success());
    let image = work.join("guest.elf");
    let result = (|| {
        std::fs::write(&image, crate::BUILTIN_GUEST_ELF).map_err(|e| step("write the guest image")(e.to_string()))?;
        let faultline = faultline_figures(args, &work)?;
        let qemu = if with_qemu { Some(qemu_figures(args, &work, &image)?) } else { None };
        Ok(LiveBenchReport {
            memory_mib: args.memory_mib,
            step_ms: args.live_ms,
            faultline,
            qemu,
            qemu_note: (!with_qemu).then(|| format!("{} not found or not runnable: QEMU not measured", args.qemu)),
        })
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

impl LiveBenchReport {
    /// The report as a table, with Faultline/QEMU ratios (below 1: Faultline faster).
    pub fn table(&self) -> String {
        let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        let ratio = |ours: Option<f64>, theirs: Option<f64>| match (ours, theirs) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.3}x", a / b),
            _ => "-".to_string(),
        };
        let mut out = format!(
            "live snapshot of a {} MiB guest (filled, then rewriting its pages flat out for {} ms)\n",
            self.memory_mib, self.step_ms
        );
        out += "vmm        pause µs   total ms   MiB      guest pages/s undisturbed  during snapshot\n";
        let mut row = |name: &str, f: &LiveFigures| {
            out += &format!(
                "{:<10} {:>8}   {:>8.1}   {:>6.1}   {:>25.0}  {:>15}\n",
                name,
                opt(f.pause_us, 0),
                f.total_ms,
                f.bytes as f64 / 1048576.0,
                f.undisturbed_pages_per_s,
                opt(f.throughput_during_snapshot, 2),
            );
        };
        row("faultline", &self.faultline);
        if let Some(q) = &self.qemu {
            row("qemu", q);
            out += &format!(
                "faultline/qemu: pause {}, total {}\n",
                ratio(self.faultline.pause_us, q.pause_us),
                ratio(Some(self.faultline.total_ms), Some(q.total_ms)),
            );
        }
        if let Some(breakdown) = &self.faultline.pause_breakdown {
            out += &format!("faultline pause breakdown (ns): {breakdown}\n");
        }
        if let Some(note) = &self.qemu_note {
            out += &format!("note: {note}\n");
        }
        out
    }
}
