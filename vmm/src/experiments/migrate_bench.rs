//! `faultline bench migrate`: live migration between two processes on this host,
//! Faultline beside QEMU microvm migrating the same built-in guest ELF in the same run,
//! per cell (transport x mode x guest dirty rate x downtime limit), reported as ratios.
//!
//! Modes: `precopy`; `postcopy` (QEMU: `postcopy-ram` and `postcopy-preempt` on both
//! ends, `migrate-start-postcopy` right after `migrate`, so it switches after its first
//! pass has begun: QEMU cannot skip pre-copy entirely); `hybrid` (Faultline: one round
//! after round 0, its default; QEMU: `migrate-start-postcopy` once `dirty-sync-count`
//! says round 0 ended).
//!
//! Both VMMs run the guest with `fill,dirty`: it writes the pattern over the touched
//! size, then rewrites pages at the cell's rate until the migration moves it (rate 0:
//! `fill,idle`).
//! Faultline: `faultline restore --incoming URI` at the destination, the control
//! socket's `migrate` at the source, the figures from the source's run report (its
//! `migration` section, QEMU's names). QEMU: `-incoming URI` at the destination,
//! `migrate-set-parameters` (downtime-limit, max-bandwidth raised to 100 GiB/s, as
//! Faultline's is unlimited) and `migrate` over QMP at the source, the figures from the
//! last `query-migrate` (total-time, downtime, ram.transferred, ram.dirty-sync-count).
//! Each VMM's figures come from its own clock.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::boot_bench::QEMU_MICROVM_ARGS;
use super::console_child::{ConsoleChild, ConsoleError};
use super::plot::{self, Labels, Series};
use super::qmp::{Qmp, QmpError};
use crate::api::ControlClient;
use crate::config::{Backend, VmConfig, ZoneConfig};

/// Options of `faultline bench migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateBenchArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory_mib: u64,
    /// MiB the guest fills before it migrates (the rest is never touched).
    #[arg(long, default_value_t = 512)]
    pub touched_mib: u64,
    /// Guest dirty rates in pages/s while it migrates, comma-separated (0: none).
    #[arg(long, value_delimiter = ',', default_value = "0,10000")]
    pub rates: Vec<u64>,
    /// Downtime limits in ms, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "300,10")]
    pub downtime_ms: Vec<u64>,
    /// Transports, comma-separated: tcp (127.0.0.1, a free port), unix, and/or fd-local
    /// (a memfd guest whose RAM is handed over, not copied; QEMU is not run for it).
    #[arg(long, value_delimiter = ',', default_value = "tcp")]
    pub transports: Vec<String>,
    /// Dirty trackers, comma-separated: log (KVM's dirty log) and/or ring (KVM's dirty
    /// ring, `--dirty-ring` entries per vCPU; QEMU gets `-accel kvm,dirty-ring-size=`
    /// the same). Not for fd-local, which tracks nothing.
    #[arg(long, value_delimiter = ',', default_value = "log")]
    pub dirty_tracking: Vec<String>,
    /// Modes, comma-separated: precopy, postcopy (with the preempt channel, both VMMs)
    /// and/or hybrid. fd-local cells are pre-copy only.
    #[arg(long, value_delimiter = ',', default_value = "precopy")]
    pub modes: Vec<String>,
    /// Entries per vCPU of the dirty ring in the ring cells.
    #[arg(long, default_value_t = 4096)]
    pub dirty_ring: u32,
    /// Rounds per cell, Faultline and QEMU alternating; the mean is reported.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Where sockets and the guest image go (a fresh directory is made inside).
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// QEMU binary to compare against ("none" to skip).
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also draw `migrate-downtime.svg` and `migrate-total.svg` (per cell, Faultline
    /// beside QEMU) and `migrate-bytes-N.svg` (cell N's bytes over time) into this
    /// directory.
    #[arg(long)]
    pub plots: Option<PathBuf>,
}

/// Errors of the migration benchmark.
#[derive(Debug, thiserror::Error)]
pub enum MigrateBenchError {
    /// A child VMM could not be started, or its console closed early.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// Talking to QEMU's QMP socket failed.
    #[error("QEMU: {0}")]
    Qmp(#[from] QmpError),
    /// An option cannot be measured.
    #[error("--{option}: {reason}")]
    Option {
        /// The option.
        option: &'static str,
        /// Why, and what to give instead.
        reason: String,
    },
    /// A plot could not be written.
    #[error(transparent)]
    Plot(#[from] super::plot::PlotError),
    /// A child process could not be started, talked to, or did not migrate.
    #[error("{what}: {reason}")]
    Step {
        /// What was being done.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

/// A child VMM with its console on a pipe and no stdin.
fn spawn(mut command: Command, what: &str) -> Result<ConsoleChild, ConsoleError> {
    command.stdin(Stdio::null());
    ConsoleChild::spawn(command, what)
}

fn step(what: impl Into<String>) -> impl FnOnce(String) -> MigrateBenchError {
    let what = what.into();
    move |reason| MigrateBenchError::Step { what, reason }
}

/// One migration's figures, as the source VMM reports them.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Migration {
    /// Start to end, ms.
    pub total_ms: f64,
    /// The source's downtime, ms (Faultline: vCPUs paused until the destination's Ack;
    /// QEMU: its `downtime`).
    pub downtime_ms: f64,
    /// Bytes sent (Faultline: stream bytes with headers; QEMU: `ram.transferred`).
    pub bytes: u64,
    /// Dirty-log harvests (`dirty-sync-count`).
    pub syncs: u64,
    /// The pause the guest saw across the switch, ms: the first `stall` line its vCPU
    /// printed on the destination (`fl.stall_us`), on the guest's clock. `None` if none
    /// came within a second of the end.
    pub guest_pause_ms: Option<f64>,
}

impl Migration {
    fn mean(all: &[Migration]) -> Migration {
        let n = all.len().max(1) as f64;
        Migration {
            total_ms: all.iter().map(|m| m.total_ms).sum::<f64>() / n,
            downtime_ms: all.iter().map(|m| m.downtime_ms).sum::<f64>() / n,
            bytes: (all.iter().map(|m| m.bytes as f64).sum::<f64>() / n) as u64,
            syncs: (all.iter().map(|m| m.syncs as f64).sum::<f64>() / n).round() as u64,
            guest_pause_ms: {
                let seen: Vec<f64> = all.iter().filter_map(|m| m.guest_pause_ms).collect();
                (!seen.is_empty()).then(|| seen.iter().sum::<f64>() / seen.len() as f64)
            },
        }
    }
}

/// One cell: both VMMs under the same conditions.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// `tcp` or `unix`.
    pub transport: String,
    /// `precopy`, `postcopy` or `hybrid`.
    pub mode: String,
    /// The dirty tracker: `log` or `ring` (`-` for fd-local).
    pub dirty_tracking: String,
    /// Guest dirty rate, pages/s.
    pub rate: u64,
    /// Downtime limit asked of both, ms.
    pub downtime_limit_ms: u64,
    /// Faultline, mean over the rounds.
    pub faultline: Migration,
    /// Whether every Faultline round met the limit (else the round limit forced the stop).
    pub faultline_converged: bool,
    /// Faultline, each round.
    pub faultline_rounds: Vec<Migration>,
    /// QEMU, mean over the rounds.
    pub qemu: Option<Migration>,
    /// QEMU, each round.
    pub qemu_rounds: Vec<Migration>,
    /// Faultline's first round: (ms since the migrate command, MiB sent so far), sampled
    /// from `migrate.status` every few milliseconds.
    pub faultline_progress: Progress,
    /// QEMU's first round, the same from `query-migrate`'s `ram.transferred`.
    pub qemu_progress: Progress,
}

/// How often the bench asks either VMM how far its migration is.
const PROGRESS_EVERY: Duration = Duration::from_millis(5);

/// A migration's progress: (ms since the migrate command, MiB sent so far), in time order.
type Progress = Vec<(f64, f64)>;

/// One sample of a migration's progress: (ms since `started`, MiB in `bytes`).
fn progress_point(started: Instant, bytes: u64) -> (f64, f64) {
    (started.elapsed().as_secs_f64() * 1e3, bytes as f64 / (1u64 << 20) as f64)
}

/// The whole benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateBenchReport {
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// MiB filled.
    pub touched_mib: u64,
    /// Rounds per cell and VMM.
    pub rounds: usize,
    /// The cells.
    pub cells: Vec<Cell>,
    /// Why QEMU was not measured, if it was not.
    pub qemu_note: Option<String>,
}

/// Runs the benchmark.
pub fn run(args: &MigrateBenchArgs) -> Result<MigrateBenchReport, MigrateBenchError> {
    if args.touched_mib == 0 || args.touched_mib > args.memory_mib.saturating_sub(16) {
        return Err(MigrateBenchError::Option {
            option: "touched-mib",
            reason: format!(
                "{} MiB does not fit a {} MiB guest; give 1 to {} (the guest keeps 16 MiB for itself)",
                args.touched_mib,
                args.memory_mib,
                args.memory_mib.saturating_sub(16)
            ),
        });
    }
    if let Some(bad) = args.transports.iter().find(|t| !matches!(t.as_str(), "tcp" | "unix" | "fd-local")) {
        return Err(MigrateBenchError::Option {
            option: "transports",
            reason: format!("unknown transport {bad:?}; give tcp, unix, fd-local or a list of them"),
        });
    }
    if let Some(bad) = args.modes.iter().find(|m| !matches!(m.as_str(), "precopy" | "postcopy" | "hybrid")) {
        return Err(MigrateBenchError::Option {
            option: "modes",
            reason: format!("unknown mode {bad:?}; give precopy, postcopy, hybrid or a list of them"),
        });
    }
    if let Some(bad) = args.dirty_tracking.iter().find(|t| !matches!(t.as_str(), "log" | "ring")) {
        return Err(MigrateBenchError::Option {
            option: "dirty-tracking",
            reason: format!("unknown dirty tracker {bad:?}; give log, ring or log,ring"),
        });
    }
    let work = args.dir.join(format!("faultline-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| step(format!("create {}", work.display()))(e.to_string()))?;
    let with_qemu =
        args.qemu != "none" && Command::new(&args.qemu).arg("--version").output().is_ok_and(|o| o.status.success());
    let image = work.join("guest.elf");
    std::fs::write(&image, crate::BUILTIN_GUEST_ELF).map_err(|e| step("write the guest image")(e.to_string()))?;
    let result: Result<MigrateBenchReport, MigrateBenchError> = (|| {
        let mut cells = Vec::new();
        let mut serial = 0usize;
        for (transport, tracker, mode) in &links(args) {
            for &rate in &args.rates {
                for &limit in &args.downtime_ms {
                    let mut ours = Vec::new();
                    let mut converged = true;
                    let mut theirs = Vec::new();
                    let (mut our_progress, mut their_progress) = (Vec::new(), Vec::new());
                    for round in 0..args.rounds.max(1) {
                        serial += 1;
                        let address = uri(transport, &work, &format!("fl-{serial}"))?;
                        let how = How { rate, limit, tracker, mode };
                        let (figures, met, progress) = faultline_migration(args, &work, serial, &how, &address)?;
                        ours.push(figures);
                        converged &= met;
                        if round == 0 {
                            our_progress = progress;
                        }
                        if with_qemu && transport != "fd-local" {
                            // QEMU spells both addresses the same way.
                            let address = uri(transport, &work, &format!("qemu-{serial}"))?;
                            let (figures, progress) = qemu_migration(args, &work, serial, &how, &address)?;
                            theirs.push(figures);
                            if round == 0 {
                                their_progress = progress;
                            }
                        }
                    }
                    cells.push(Cell {
                        transport: transport.clone(),
                        mode: mode.to_string(),
                        dirty_tracking: tracker.to_string(),
                        rate,
                        downtime_limit_ms: limit,
                        faultline: Migration::mean(&ours),
                        faultline_converged: converged,
                        faultline_rounds: ours,
                        qemu: (with_qemu && !theirs.is_empty()).then(|| Migration::mean(&theirs)),
                        qemu_rounds: theirs,
                        faultline_progress: our_progress,
                        qemu_progress: their_progress,
                    });
                }
            }
        }
        Ok(MigrateBenchReport {
            memory_mib: args.memory_mib,
            touched_mib: args.touched_mib,
            rounds: args.rounds.max(1),
            cells,
            qemu_note: (!with_qemu).then(|| format!("{} not found or not runnable: QEMU not measured", args.qemu)),
        })
    })();
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;
    if let Some(dir) = &args.plots {
        report.plot(dir)?;
    }
    Ok(report)
}

/// Transport x dirty tracker (`-` for fd-local, which tracks nothing) x mode (fd-local:
/// pre-copy only).
fn links(args: &MigrateBenchArgs) -> Vec<(String, &'static str, &str)> {
    let mut links = Vec::new();
    for transport in &args.transports {
        if transport == "fd-local" {
            links.push((transport.clone(), "-", "precopy"));
            continue;
        }
        for tracker in &args.dirty_tracking {
            for mode in &args.modes {
                links.push((transport.clone(), if tracker == "ring" { "ring" } else { "log" }, mode.as_str()));
            }
        }
    }
    links
}

/// What one migration of a cell does, for either VMM.
struct How<'a> {
    /// Guest dirty rate, pages/s.
    rate: u64,
    /// Downtime limit, ms.
    limit: u64,
    /// `log`, `ring` or `-`.
    tracker: &'a str,
    /// `precopy`, `postcopy` or `hybrid`.
    mode: &'a str,
}

/// A free loopback TCP port (bound and released: the destination binds it next).
fn free_port() -> Result<u16, MigrateBenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| step("find a free TCP port on 127.0.0.1")(e.to_string()))
}

/// The address for a transport (QEMU and Faultline spell them alike).
fn uri(transport: &str, work: &Path, name: &str) -> Result<String, MigrateBenchError> {
    Ok(match transport {
        "unix" => format!("unix:{}", work.join(format!("{name}.sock")).display()),
        "fd-local" => format!("fd-local:{}", work.join(format!("{name}.sock")).display()),
        _ => format!("tcp:127.0.0.1:{}", free_port()?),
    })
}

/// True once something listens at `uri` (without connecting: both destinations take
/// only one connection).
fn listening(uri: &str) -> bool {
    if let Some(path) = uri.strip_prefix("unix:").or_else(|| uri.strip_prefix("fd-local:")) {
        // The socket file appears at bind(), a moment before listen(): a connect in
        // between is refused. /proc/net/unix shows the listening flag (__SO_ACCEPTCON).
        let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
        return table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 7 && fields[7] == path && fields[3] == "00010000"
        });
    }
    let port = uri.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).unwrap_or(0);
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[1].ends_with(&format!(":{port:04X}")) && fields[3] == "0A"
    })
}

fn wait_listening(uri: &str, who: &str, child: &mut Child) -> Result<(), MigrateBenchError> {
    let started = Instant::now();
    while !listening(uri) {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(step(format!("{who} -incoming {uri}"))(format!("exited with {status} before listening")));
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(step(format!("{who} -incoming {uri}"))("not listening after 30 s".into()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn connect(socket: &Path) -> Result<ControlClient, MigrateBenchError> {
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

/// The guest's workload, for either VMM: fill, then dirty at `rate` (0: idle) for
/// longer than any migration takes.
fn guest_config(args: &MigrateBenchArgs, rate: u64) -> VmConfig {
    let mut config = VmConfig {
        vcpus: 1,
        zones: vec![ZoneConfig::new(args.memory_mib << 20, Backend::Anon)],
        ..VmConfig::default()
    };
    let second = if rate == 0 { "idle" } else { "dirty" };
    config.workload.steps = vec!["fill".into(), second.into()];
    config.workload.size_bytes = Some(args.touched_mib << 20);
    config.workload.rate_pages_per_s = rate.max(1);
    config.workload.duration_ms = 600_000;
    config.workload.stall_us = STALL_US;
    config
}

/// The guest prints gaps in its clock from this long (µs): the switch-over is one.
const STALL_US: u64 = 200;

/// The pause the guest on `destination` saw across the switch: the first `stall` line
/// its console printed, ms.
fn guest_pause(destination: &mut ConsoleChild) -> Option<f64> {
    let line = destination.line_within("FL stall ", Duration::from_secs(1))?;
    let stall: Value = serde_json::from_str(line.strip_prefix("FL stall ")?).ok()?;
    Some(stall["us"].as_f64()? / 1e3)
}

/// One Faultline migration: source `run`, destination `restore --incoming`, `migrate`
/// once the fill is done; the figures from the source's report. Also returns whether
/// it converged under the limit.
fn faultline_migration(
    args: &MigrateBenchArgs,
    work: &Path,
    serial: usize,
    how: &How<'_>,
    uri: &str,
) -> Result<(Migration, bool, Progress), MigrateBenchError> {
    let How { rate, limit, tracker, mode } = *how;
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("faultline"));
    let socket = work.join(format!("src-{serial}.sock"));
    let config = guest_config(args, rate);
    let mut command = Command::new(&exe);
    command.args(["run", "--console", "--json", "--vcpus", "1", "--timeout", "600"]);
    // fd-local: hands shared memory over; anon RAM cannot be.
    let backend = if uri.starts_with("fd-local:") { ",backend=memfd" } else { "" };
    command.args(["-m", &format!("size={}M{backend}", args.memory_mib), "--steps", &config.workload.steps.join(",")]);
    command.args(["--rate", &config.workload.rate_pages_per_s.to_string()]);
    command.args(["--duration-ms", &config.workload.duration_ms.to_string()]);
    command.args(["--stall-us", &STALL_US.to_string()]);
    command.args(["--size", &config.workload.size_bytes.unwrap_or(0).to_string()]);
    command.arg("--api-socket").arg(&socket);
    if tracker == "ring" {
        command.args(["--dirty-ring", &args.dirty_ring.to_string()]);
    }
    let mut source = spawn(command, "faultline run")?;
    source.wait_for("FL result", "faultline: fill")?;
    let mut destination_command = Command::new(&exe);
    destination_command.args(["restore", "--timeout", "600", "--incoming", uri]);
    let mut destination = spawn(destination_command, "faultline restore --incoming")?;
    wait_listening(uri, "faultline restore", &mut destination.child)?;
    let mut client = connect(&socket)?;
    let started = Instant::now();
    client
        .call(
            "migrate",
            json!({
                "uri": uri,
                "mode": mode,
                "downtime_ms": limit,
                "dirty_tracking": (tracker == "ring").then_some("ring"),
            }),
        )
        .map_err(|e| step(format!("faultline migrate {uri}"))(e.to_string()))?;
    // Sample the progress until the source ends (its socket closes) while this thread
    // reads the console to the end.
    let sampler = std::thread::spawn(move || {
        let mut progress = vec![(0.0, 0.0)];
        while let Ok(status) = client.call("migrate.status", Value::Null) {
            progress.push(progress_point(started, status["transferred"].as_u64().unwrap_or(0)));
            if status["status"] == "completed" || status["status"] == "failed" {
                break;
            }
            std::thread::sleep(PROGRESS_EVERY);
        }
        progress
    });
    // The source ends its VM on the destination's Ack and prints its report.
    let mut rest = String::new();
    let _ = source.console.read_to_string(&mut rest);
    let _ = source.child.wait();
    let json_start = rest.find("\n{").map(|i| i + 1).or_else(|| rest.starts_with('{').then_some(0));
    let report: Value = json_start
        .and_then(|i| serde_json::from_str(&rest[i..]).ok())
        .ok_or_else(|| step("faultline run")(format!("no JSON report after the migration: {rest}")))?;
    let m = &report["migration"];
    let mut progress = sampler.join().unwrap_or_default();
    // The report's end point: the last sample may be older than it, or later (taken after
    // completion, when the clock here had run on).
    progress.push((
        m["total-time"].as_f64().unwrap_or(0.0),
        m["transferred"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
    ));
    progress.sort_by(|a, b| a.0.total_cmp(&b.0));
    if m["status"] != "completed" {
        return Err(step(format!("faultline migrate {uri}"))(format!("did not complete: {m}")));
    }
    let guest_pause_ms = guest_pause(&mut destination);
    drop(destination);
    let figures = Migration {
        total_ms: m["total-time"].as_f64().unwrap_or(0.0),
        downtime_ms: m["downtime"].as_f64().unwrap_or(0.0),
        bytes: m["transferred"].as_u64().unwrap_or(0),
        syncs: m["dirty-sync-count"].as_u64().unwrap_or(0),
        guest_pause_ms,
    };
    // Post-copy has no convergence to meet.
    Ok((figures, m["converged"] == true || mode == "postcopy", progress))
}

fn qemu_command(args: &MigrateBenchArgs, image: &Path, qmp: &Path, rate: u64, tracker: &str) -> Command {
    let mut command = Command::new(&args.qemu);
    let ring = format!("kvm,dirty-ring-size={}", args.dirty_ring);
    command
        .args(QEMU_MICROVM_ARGS.iter().map(|&arg| if arg == "kvm" && tracker == "ring" { ring.as_str() } else { arg }));
    command.args(["-smp", "1", "-m", &format!("{}M", args.memory_mib)]);
    command.arg("-kernel").arg(image);
    command.args(["-append", &guest_config(args, rate).guest_cmdline(None)]);
    command.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
    command
}

/// One QEMU migration under the same conditions.
fn qemu_migration(
    args: &MigrateBenchArgs,
    work: &Path,
    serial: usize,
    how: &How<'_>,
    uri: &str,
) -> Result<(Migration, Progress), MigrateBenchError> {
    let How { rate, limit, tracker, mode } = *how;
    // `run` wrote the guest image there.
    let image = &work.join("guest.elf");
    let qmp_path = work.join(format!("qmp-src-{serial}.sock"));
    let mut source = spawn(qemu_command(args, image, &qmp_path, rate, tracker), "qemu")?;
    source.wait_for("FL result", "qemu: fill")?;
    let dest_qmp = work.join(format!("qmp-dst-{serial}.sock"));
    let mut command = qemu_command(args, image, &dest_qmp, rate, tracker);
    command.args(["-incoming", uri]);
    let mut destination = spawn(command, "qemu -incoming")?;
    wait_listening(uri, "qemu", &mut destination.child)?;
    let mut qmp = Qmp::connect(&qmp_path)?;
    let postcopy = mode != "precopy";
    if postcopy {
        // Both ends need the capabilities before the migration starts.
        let capabilities = json!({ "capabilities": [
            { "capability": "postcopy-ram", "state": true },
            { "capability": "postcopy-preempt", "state": true },
        ] });
        Qmp::connect(&dest_qmp)?.execute("migrate-set-capabilities", capabilities.clone())?;
        qmp.execute("migrate-set-capabilities", capabilities)?;
    }
    qmp.execute("migrate-set-parameters", json!({ "downtime-limit": limit, "max-bandwidth": 100u64 << 30 }))?;
    qmp.execute("migrate", json!({ "uri": uri }))?;
    let started = Instant::now();
    let mut switch_asked = false;
    if mode == "postcopy" {
        qmp.execute("migrate-start-postcopy", Value::Null)?;
        switch_asked = true;
    }
    let mut progress = vec![(0.0, 0.0)];
    let status = loop {
        let status = qmp.execute("query-migrate", Value::Null)?;
        progress.push(progress_point(started, status["ram"]["transferred"].as_u64().unwrap_or(0)));
        // Hybrid: round 0 ended when the second dirty sync happened.
        if mode == "hybrid" && !switch_asked && status["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 {
            // It may have completed meanwhile (converged), which refuses the switch.
            let _ = qmp.execute("migrate-start-postcopy", Value::Null);
            switch_asked = true;
        }
        match status["status"].as_str() {
            Some("completed") => break status,
            Some("failed") | Some("cancelled") => return Err(step(format!("qemu migrate {uri}"))(status.to_string())),
            _ if started.elapsed() > Duration::from_secs(300) => {
                return Err(step(format!("qemu migrate {uri}"))(format!("not completed after 300 s: {status}")))
            }
            _ => std::thread::sleep(PROGRESS_EVERY),
        }
    };
    let guest_pause_ms = guest_pause(&mut destination);
    drop(destination);
    drop(source);
    let figures = Migration {
        total_ms: status["total-time"].as_f64().unwrap_or(0.0),
        downtime_ms: status["downtime"].as_f64().unwrap_or(0.0),
        bytes: status["ram"]["transferred"].as_u64().unwrap_or(0),
        syncs: status["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        guest_pause_ms,
    };
    Ok((figures, progress))
}

impl MigrateBenchReport {
    /// Draws each cell's downtime and total time, Faultline beside QEMU, and each cell's
    /// bytes sent over time, into `dir`.
    pub fn plot(&self, dir: &Path) -> Result<(), MigrateBenchError> {
        std::fs::create_dir_all(dir).map_err(|e| step(format!("create {}", dir.display()))(e.to_string()))?;
        let labels: Vec<String> = self
            .cells
            .iter()
            .map(|c| {
                format!(
                    "{} {} {} {}k/s ≤{} ms",
                    c.transport,
                    c.dirty_tracking,
                    c.mode,
                    c.rate / 1000,
                    c.downtime_limit_ms
                )
            })
            .collect();
        let series = |figure: fn(&Migration) -> f64| {
            let ours = self.cells.iter().enumerate().map(|(i, c)| (i as f64, figure(&c.faultline))).collect();
            let theirs =
                self.cells.iter().enumerate().filter_map(|(i, c)| c.qemu.as_ref().map(|q| (i as f64, figure(q))));
            let mut all = vec![Series::new("Faultline", ours)];
            let theirs: Vec<(f64, f64)> = theirs.collect();
            if !theirs.is_empty() {
                all.push(Series::new("QEMU", theirs));
            }
            all
        };
        let what =
            format!("{} MiB guest, {} MiB filled, mean of {} rounds", self.memory_mib, self.touched_mib, self.rounds);
        for (file, title, figure) in [
            ("migrate-downtime.svg", "Downtime", (|m: &Migration| m.downtime_ms) as fn(&Migration) -> f64),
            ("migrate-total.svg", "Total time", |m: &Migration| m.total_ms),
        ] {
            let title = format!("{title} ({what})");
            plot::bars(
                &dir.join(file),
                Labels { title: &title, x: "link, tracker, mode, dirty rate, limit", y: "ms" },
                &labels,
                &series(figure),
            )?;
        }
        for (i, (cell, label)) in self.cells.iter().zip(&labels).enumerate() {
            let mut curves = vec![Series::new("Faultline", cell.faultline_progress.clone())];
            if !cell.qemu_progress.is_empty() {
                curves.push(Series::new("QEMU", cell.qemu_progress.clone()));
            }
            let title = format!("MiB sent over time, {label} ({} MiB guest, first round)", self.memory_mib);
            plot::lines(
                &dir.join(format!("migrate-bytes-{}.svg", i + 1)),
                Labels { title: &title, x: "ms since the migrate command", y: "MiB sent" },
                &curves,
            )?;
        }
        Ok(())
    }

    /// The report as a table, with Faultline/QEMU ratios (below 1: Faultline faster or
    /// smaller).
    pub fn table(&self) -> String {
        let ratio = |ours: f64, theirs: Option<f64>| {
            theirs.filter(|t| *t > 0.0).map_or_else(|| "-".to_string(), |t| format!("{:.2}x", ours / t))
        };
        let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        let mut out = format!(
            "live migration, 1 vCPU, {} MiB guest, {} MiB filled, mean of {} round(s) each, faultline | qemu\n",
            self.memory_mib, self.touched_mib, self.rounds
        );
        out += "link:tracker  mode      rate/s  limit ms | total ms  down ms  guest ms  MiB sent  syncs | qemu total  down  guest  MiB sent  syncs | total ratio  down ratio  guest ratio  bytes ratio\n";
        for c in &self.cells {
            let (f, q) = (&c.faultline, c.qemu.as_ref());
            out += &format!(
                "{:<12}  {:<8}  {:>6}  {:>8} | {:>8.1}  {:>7.1}  {:>8}  {:>8.1}  {:>3}{} | {:>10}  {:>4}  {:>5}  {:>8}  {:>5} | {:>11}  {:>10}  {:>11}  {:>11}\n",
                format!("{}:{}", c.transport, c.dirty_tracking),
                c.mode,
                c.rate,
                c.downtime_limit_ms,
                f.total_ms,
                f.downtime_ms,
                opt(f.guest_pause_ms, 1),
                f.bytes as f64 / 1048576.0,
                f.syncs,
                if c.faultline_converged { "  " } else { " !" },
                opt(q.map(|q| q.total_ms), 1),
                opt(q.map(|q| q.downtime_ms), 0),
                opt(q.and_then(|q| q.guest_pause_ms), 1),
                opt(q.map(|q| q.bytes as f64 / 1048576.0), 1),
                q.map_or("-".into(), |q| q.syncs.to_string()),
                ratio(f.total_ms, q.map(|q| q.total_ms)),
                ratio(f.downtime_ms, q.map(|q| q.downtime_ms)),
                f.guest_pause_ms.map_or("-".into(), |g| ratio(g, q.and_then(|q| q.guest_pause_ms))),
                ratio(f.bytes as f64, q.map(|q| q.bytes as f64)),
            );
        }
        out += "guest: the pause the guest saw across the switch (its first clock gap on the destination)\n";
        if self.cells.iter().any(|c| !c.faultline_converged) {
            out += "!: faultline did not meet the limit in every round (the round limit forced the stop)\n";
        }
        if let Some(note) = &self.qemu_note {
            out += &format!("note: {note}\n");
        }
        out
    }
}
