//! `faultline ctl`: steer a running VM through its control socket, printing one short
//! line per answer (or the raw JSON result with `--json`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::client::{ClientError, ControlClient};
use super::protocol::{BalloonInfo, BalloonStats, HelloResult, MigrateMode, VmState, VmStatus};

/// Options of `faultline ctl`.
#[derive(Debug, Args, Clone)]
pub struct CtlArgs {
    /// The VM's control socket (the path given to `faultline run --api-socket`).
    #[arg(long, short = 's', value_name = "PATH")]
    pub socket: PathBuf,
    /// Print the JSON result instead of a sentence.
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up if the VM does not answer within this many seconds (0: wait for ever).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_ctl_timeout)]
    pub timeout: CtlTimeout,
    /// What to ask.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// What `faultline ctl` asks.
#[derive(Debug, Subcommand, Clone)]
pub enum CtlCommand {
    /// The protocol version and the commands the VM knows.
    Hello,
    /// The VM's state: running or not, vCPUs, memory, uptime, guest ready.
    Status,
    /// The balloon.
    #[command(subcommand)]
    Balloon(BalloonCommand),
    /// Demand paging (the smmu).
    #[command(subcommand)]
    Paging(PagingCommand),
    /// Stop every vCPU (outside KVM_RUN, state readable); prints how long the pause took.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// Snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Live migration: `migrate URI [options]` starts one (the destination is
    /// `faultline restore --incoming URI`); `migrate status`, `migrate cancel`.
    Migrate(MigrateArgs),
}

/// `faultline ctl migrate ...`.
#[derive(Debug, Args, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MigrateArgs {
    /// `status` or `cancel` instead of starting one.
    #[command(subcommand)]
    pub action: Option<MigrateAction>,
    /// Where the destination listens: `unix:PATH` or `tcp:HOST:PORT`.
    #[arg(value_name = "URI", required = true)]
    pub uri: Option<String>,
    /// How to migrate.
    #[arg(long, value_enum, default_value_t = MigrateMode::Precopy)]
    pub mode: MigrateMode,
    /// Stop and copy once the estimated downtime is under this many milliseconds.
    #[arg(long, value_name = "MS", default_value = "300")]
    pub downtime_ms: u64,
    /// Send at most this many bytes per second (a size: 100M means 100 MiB/s).
    #[arg(long, value_name = "BYTES", value_parser = parse_bandwidth)]
    pub bandwidth: Option<u64>,
    /// Give up after this many seconds (the VM runs on here).
    #[arg(long = "timeout", value_name = "SECONDS", value_parser = crate::config::duration::parse_seconds)]
    pub migrate_timeout: Option<Duration>,
    /// Pre-copy rounds after the first before the stop-and-copy is forced.
    #[arg(long, value_name = "N")]
    pub max_rounds: Option<u32>,
    /// Post-copy and hybrid: page requests on a second connection (the preempt channel;
    /// `false`: on the main connection, behind the background pages).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub postcopy_preempt: bool,
    /// Hybrid: pre-copy rounds after the first before switching to post-copy (default 1).
    #[arg(long, value_name = "K")]
    pub postcopy_after_rounds: Option<u32>,
    /// Dirty tracking for the rounds: log or ring (ring needs a VM started with
    /// --dirty-ring) [default: the VM's own].
    #[arg(long, value_enum)]
    pub dirty_tracking: Option<crate::api::protocol::DirtyTracking>,
    /// Throttle the guest's vCPUs (20 %, then +10 % per round, at most 99 %) while the
    /// estimated downtime stays over --downtime-ms.
    #[arg(long)]
    pub auto_converge: bool,
    /// Wait until it ends, with a progress line on stderr; exit 1 if it failed or was
    /// cancelled (status `source-ended`: the source VM ended, its socket closed, before
    /// the last poll saw the outcome).
    #[arg(long)]
    pub wait: bool,
}

/// `faultline ctl migrate status|cancel`.
#[derive(Debug, Subcommand, Clone)]
pub enum MigrateAction {
    /// The running or last migration's figures (QEMU's names with --json).
    Status,
    /// Stop the running migration; the VM runs on here.
    Cancel,
}

fn parse_bandwidth(text: &str) -> Result<u64, String> {
    match faultline_abi::parse_size(text) {
        Some(0) | None => Err(format!("cannot parse \"{text}\" as bytes per second (e.g. 100M, 1G)")),
        Some(bytes) => Ok(bytes),
    }
}

/// `faultline ctl snapshot ...`.
#[derive(Debug, Subcommand, Clone)]
pub enum SnapshotCommand {
    /// Save the VM (vCPUs, devices, memory) into a new directory; restore it with
    /// `faultline restore --from DIR`.
    Create {
        /// The directory to create (it must not exist, or be empty).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Save only the pages written since this VM's previous snapshot (restore the
        /// chain by naming the last diff).
        #[arg(long)]
        diff: bool,
        /// Pause only to save the vCPU and device state and write-protect guest RAM, then
        /// copy the pages out while the VM runs (userfaultfd write-protect); the snapshot
        /// is the guest at that pause, an ordinary full snapshot.
        #[arg(long, conflicts_with = "diff")]
        live: bool,
        /// Run the VM afterwards even if it was paused before.
        #[arg(long, conflicts_with = "stop")]
        resume: bool,
        /// End the VM once it is saved.
        #[arg(long)]
        stop: bool,
    },
}

/// `faultline ctl paging ...`.
#[derive(Debug, Subcommand, Clone)]
pub enum PagingCommand {
    /// Paging modes, faults resolved and engine latency so far.
    Stats,
    /// Run the coherence checker now: the state table against the host's page tables.
    Check,
}

/// `faultline ctl balloon ...`.
#[derive(Debug, Subcommand, Clone)]
pub enum BalloonCommand {
    /// Target and actual size, host memory freed, guest statistics.
    Get,
    /// Ask the guest to make the balloon this size (e.g. 512M, 1G, 0 to give it all back).
    Set {
        /// The target size.
        #[arg(value_name = "SIZE")]
        target: String,
    },
    /// The guest's latest memory statistics.
    Stats,
}

/// Runs `faultline ctl` and prints its answer. Exit codes: 0 done; 1 the VM answered with
/// an error (e.g. no balloon); 2 no answer (cannot connect, connection failed).
pub fn main(args: &CtlArgs) -> ExitCode {
    match execute(args) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(err @ ClientError::Server(_)) => {
            eprintln!("faultline ctl: {err}");
            ExitCode::from(1)
        }
        Err(err) => {
            eprintln!("faultline ctl: error: {err}");
            ExitCode::from(2)
        }
    }
}

/// `faultline ctl --timeout`: how long to wait for an answer (`None`: for ever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtlTimeout(pub Option<Duration>);

/// `--timeout`: seconds, or 0 for no limit.
fn parse_ctl_timeout(text: &str) -> Result<CtlTimeout, String> {
    if text.trim().parse::<f64>() == Ok(0.0) {
        return Ok(CtlTimeout(None));
    }
    crate::config::duration::parse_seconds(text)
        .map(|t| CtlTimeout(Some(t)))
        .map_err(|e| e.replace("omit it for no limit", "0 to wait for ever"))
}

/// Runs `faultline ctl` and returns what it prints.
pub fn execute(args: &CtlArgs) -> Result<String, ClientError> {
    let mut client = ControlClient::connect(&args.socket, args.timeout.0)?;
    let (cmd, call_args) = match &args.command {
        CtlCommand::Hello => ("hello", Value::Null),
        CtlCommand::Status => ("status", Value::Null),
        CtlCommand::Balloon(BalloonCommand::Get) => ("balloon.get", Value::Null),
        CtlCommand::Balloon(BalloonCommand::Set { target }) => ("balloon.set", serde_json::json!({ "target": target })),
        CtlCommand::Balloon(BalloonCommand::Stats) => ("balloon.stats", Value::Null),
        CtlCommand::Paging(PagingCommand::Stats) => ("paging.stats", Value::Null),
        CtlCommand::Paging(PagingCommand::Check) => ("paging.check", Value::Null),
        CtlCommand::Pause => ("pause", Value::Null),
        CtlCommand::Resume => ("resume", Value::Null),
        CtlCommand::Snapshot(SnapshotCommand::Create { dir, diff, live, resume, stop }) => {
            // The server resolves paths against its own working directory: send an
            // absolute one.
            let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
            let then = if *stop {
                "stop"
            } else if *resume {
                "resume"
            } else {
                "as_before"
            };
            ("snapshot.create", serde_json::json!({ "dir": dir, "diff": diff, "live": live, "then": then }))
        }
        CtlCommand::Migrate(migrate) => match migrate.action {
            Some(MigrateAction::Status) => ("migrate.status", Value::Null),
            Some(MigrateAction::Cancel) => ("migrate.cancel", Value::Null),
            None => (
                "migrate",
                serde_json::json!({
                    "uri": migrate.uri,
                    "mode": migrate.mode,
                    "downtime_ms": migrate.downtime_ms,
                    "bandwidth_bytes_per_s": migrate.bandwidth,
                    "timeout_ms": migrate.migrate_timeout.map(|t| t.as_millis() as u64),
                    "max_rounds": migrate.max_rounds,
                    "postcopy_preempt": migrate.postcopy_preempt,
                    "postcopy_after_rounds": migrate.postcopy_after_rounds,
                    "dirty_tracking": migrate.dirty_tracking,
                    "auto_converge": migrate.auto_converge,
                }),
            ),
        },
    };
    let mut result = client.call(cmd, call_args)?;
    if let CtlCommand::Migrate(MigrateArgs { action: None, wait: true, .. }) = &args.command {
        result = wait_for_migration(&mut client, result)?;
        let status = result["status"].as_str().unwrap_or("?");
        if status != "completed" && status != "source-ended" {
            let text = if args.json {
                serde_json::to_string_pretty(&result).unwrap_or_default()
            } else {
                describe_migration(&result)
            };
            println!("{text}");
            return Err(ClientError::Server(super::protocol::ErrorBody::new(
                super::protocol::ErrorKind::MigrationError,
                format!("the migration {status}: {}", result["error"].as_str().unwrap_or("no reason given")),
            )));
        }
    }
    if args.json {
        return Ok(serde_json::to_string_pretty(&result).expect("JSON values serialize"));
    }
    let bad = |e: serde_json::Error| ClientError::Protocol(format!("{cmd}: {e}"));
    Ok(match &args.command {
        CtlCommand::Hello => describe_hello(&serde_json::from_value(result).map_err(bad)?),
        CtlCommand::Status => describe_status(&serde_json::from_value(result).map_err(bad)?),
        CtlCommand::Balloon(BalloonCommand::Get) => describe_balloon(&serde_json::from_value(result).map_err(bad)?),
        CtlCommand::Balloon(BalloonCommand::Set { .. }) => {
            let info: BalloonInfo = serde_json::from_value(result).map_err(bad)?;
            format!("balloon target set: {}", describe_balloon(&info).trim_start_matches("balloon: "))
        }
        CtlCommand::Balloon(BalloonCommand::Stats) => describe_stats(&serde_json::from_value(result).map_err(bad)?),
        CtlCommand::Paging(PagingCommand::Stats) => describe_paging(&result),
        CtlCommand::Paging(PagingCommand::Check) => describe_coherence(&result),
        CtlCommand::Pause => format!("paused in {} µs", result["pause_ns"].as_u64().unwrap_or(0) / 1000),
        CtlCommand::Resume => "running".to_string(),
        CtlCommand::Migrate(_) => describe_migration(&result),
        CtlCommand::Snapshot(SnapshotCommand::Create { .. }) if result["guest_pause_ns"].is_u64() => format!(
            "live snapshot {} ({}): {} MiB of memory in {} ms while the VM ran (paused {} µs, {} writes waited for their page's copy)",
            result["dir"].as_str().unwrap_or("?"),
            result["kind"].as_str().unwrap_or("?"),
            result["memory_bytes"].as_u64().unwrap_or(0) >> 20,
            result["total_ms"].as_f64().unwrap_or(0.0).round(),
            result["guest_pause_ns"].as_u64().unwrap_or(0) / 1000,
            result["write_faults"].as_u64().unwrap_or(0),
        ),
        CtlCommand::Snapshot(SnapshotCommand::Create { .. }) => format!(
            "snapshot {} ({}): {} MiB of memory in {} ms (paused {} µs)",
            result["dir"].as_str().unwrap_or("?"),
            result["kind"].as_str().unwrap_or("?"),
            result["memory_bytes"].as_u64().unwrap_or(0) >> 20,
            result["total_ms"].as_f64().unwrap_or(0.0).round(),
            result["pause_ns"].as_u64().unwrap_or(0) / 1000,
        ),
    })
}

/// Polls `migrate.status` until the migration ends, drawing a progress line on stderr.
fn wait_for_migration(client: &mut ControlClient, mut status: Value) -> Result<Value, ClientError> {
    use std::io::Write;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    loop {
        if let Some("completed" | "failed" | "cancelled") = status["status"].as_str() {
            if terminal {
                eprintln!();
            }
            return Ok(status);
        }
        if terminal {
            let total = status["total"].as_u64().unwrap_or(0).max(1);
            let sent = status["normal-bytes"].as_u64().unwrap_or(0);
            let filled = ((sent.min(total) * 30) / total) as usize;
            eprint!(
                "\r[{}{}] {} {} sent, {:.0} Mbit/s, round {}   ",
                "#".repeat(filled),
                " ".repeat(30 - filled),
                status["status"].as_str().unwrap_or("?"),
                format_bytes(status["transferred"].as_u64().unwrap_or(0)),
                status["mbps"].as_f64().unwrap_or(0.0),
                status["dirty-sync-count"].as_u64().unwrap_or(0)
            );
            let _ = std::io::stderr().flush();
        }
        std::thread::sleep(Duration::from_millis(50));
        match client.call("migrate.status", Value::Null) {
            Ok(next) => status = next,
            // The source VM ends (and its control socket closes) when the destination
            // has acknowledged it, or when the guest or a signal ended it meanwhile: this
            // end cannot tell which any more; both ends' run reports can.
            // An fd-local: migration copies no memory and may end before the first poll.
            Err(e @ (ClientError::Io(_) | ClientError::Closed))
                if status["status"] != "setup"
                    || status["uri"].as_str().is_some_and(|u| u.starts_with("fd-local:")) =>
            {
                if terminal {
                    eprintln!();
                }
                status["status"] = "source-ended".into();
                status["note"] = format!(
                    "the source VM ended during the migration (its control socket closed: {e}); it migrated, unless the guest ended first: see both ends' run reports"
                )
                .into();
                return Ok(status);
            }
            Err(e) => return Err(e),
        }
    }
}

fn describe_migration(m: &Value) -> String {
    let mut text = format!(
        "migration to {}: {}, {} sent ({} pages, {} zero), total {:.0} ms, downtime {:.1} ms (expected {:.1} ms), {} dirty syncs, {:.0} Mbit/s",
        m["uri"].as_str().unwrap_or("?"),
        m["status"].as_str().unwrap_or("?"),
        format_bytes(m["transferred"].as_u64().unwrap_or(0)),
        m["normal"].as_u64().unwrap_or(0),
        m["duplicate"].as_u64().unwrap_or(0),
        m["total-time"].as_f64().unwrap_or(0.0),
        m["downtime"].as_f64().unwrap_or(0.0),
        m["expected-downtime"].as_f64().unwrap_or(0.0),
        m["dirty-sync-count"].as_u64().unwrap_or(0),
        m["mbps"].as_f64().unwrap_or(0.0),
    );
    if m["postcopy-requests"].as_u64().is_some_and(|n| n > 0) || m["postcopy-bytes"].as_u64().is_some_and(|n| n > 0) {
        text.push_str(&format!(
            ", post-copy {} ({} page requests, blocktime {:.1} ms)",
            format_bytes(m["postcopy-bytes"].as_u64().unwrap_or(0)),
            m["postcopy-requests"].as_u64().unwrap_or(0),
            m["postcopy-blocktime"].as_f64().unwrap_or(0.0),
        ));
    }
    if let Some(error) = m["error"].as_str() {
        text.push_str(&format!(": {error}"));
    }
    text
}

fn describe_hello(hello: &HelloResult) -> String {
    format!("{}, control protocol {}: {}", hello.server, hello.protocol, hello.commands.join(", "))
}

fn describe_status(status: &VmStatus) -> String {
    let state = match status.state {
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopping => "stopping",
        VmState::Ended => "ended",
    };
    let mut text = format!(
        "{state}: {} vCPU{}, {} RAM, up {:.1} s, guest {}, {}",
        status.vcpus,
        if status.vcpus == 1 { "" } else { "s" },
        format_bytes(status.memory_bytes),
        status.uptime_ms as f64 / 1000.0,
        if status.guest_ready { "ready" } else { "not ready yet" },
        if status.balloon { "balloon" } else { "no balloon" },
    );
    if let Some(exit) = &status.exit {
        text.push_str(&format!(" ({exit})"));
    }
    text
}

fn describe_balloon(info: &BalloonInfo) -> String {
    let mut text = format!(
        "balloon: target {} ({} pages), actual {} ({} pages)",
        format_bytes(info.target_bytes),
        info.target_pages,
        format_bytes(info.actual_bytes),
        info.actual_pages
    );
    if let Some(freed) = info.host_freed_bytes {
        text.push_str(&format!(", host freed {}", format_bytes(freed)));
    }
    if let Some(partial) = info.partial_huge_pages.filter(|&p| p > 0) {
        text.push_str(&format!(", {partial} huge pages partly ballooned"));
    }
    text
}

fn describe_stats(stats: &BalloonStats) -> String {
    let Some(age_ms) = stats.age_ms else {
        return "the guest has not reported memory statistics yet".to_string();
    };
    let bytes = [
        ("free", stats.free_bytes),
        ("available", stats.available_bytes),
        ("total", stats.total_bytes),
        ("caches", stats.disk_caches_bytes),
        ("swapped in", stats.swap_in_bytes),
        ("swapped out", stats.swap_out_bytes),
    ];
    let counts = [
        ("major faults", stats.major_faults),
        ("minor faults", stats.minor_faults),
        ("hugetlb allocations", stats.hugetlb_allocations),
        ("hugetlb failures", stats.hugetlb_failures),
    ];
    let parts: Vec<String> = bytes
        .iter()
        .filter_map(|(name, v)| v.map(|v| format!("{name} {}", format_bytes(v))))
        .chain(counts.iter().filter_map(|(name, v)| v.map(|v| format!("{name} {v}"))))
        .collect();
    let listed = if parts.is_empty() { "no figures".to_string() } else { parts.join(", ") };
    format!("guest memory: {listed} (reported {:.1} s ago)", age_ms as f64 / 1000.0)
}

fn describe_paging(stats: &Value) -> String {
    let modes: Vec<&str> = stats["modes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let mut text = format!("paging: {}", modes.join(", "));
    for l in stats["latency"].as_array().into_iter().flatten() {
        let us = |key: &str| l[key].as_f64().unwrap_or(0.0) / 1e3;
        text.push_str(&format!(
            "\n  {} faults ({} KiB pages): {}, engine latency p50 {:.1} µs p99 {:.1} µs",
            l["kind"].as_str().unwrap_or("?"),
            l["page_bytes"].as_u64().unwrap_or(0) >> 10,
            l["count"],
            us("p50_ns"),
            us("p99_ns")
        ));
    }
    text
}

fn describe_coherence(report: &Value) -> String {
    let checked = &report["granules_checked"];
    let populated = &report["granules_populated"];
    let lost = report["lost_and_refilled"].as_u64().unwrap_or(0);
    match report["mismatch_count"].as_u64() {
        Some(0) if lost > 0 => format!(
            "coherence: {lost} pages LOST behind the VMM's back and refilled with zeros ({checked} pages checked)"
        ),
        Some(0) => format!("coherence: clean ({checked} pages checked, {populated} populated)"),
        Some(n) => {
            format!("coherence: {n} disagreements ({checked} pages checked); first: {}", report["mismatches"][0])
        }
        None => format!("coherence: unexpected answer {report}"),
    }
}

/// `bytes` in the largest binary unit that keeps it short: exact when it divides, else
/// one decimal (`512 MiB`, `1.5 GiB`, `1023 B`).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        if bytes >= 1 << shift {
            return if bytes & ((1 << shift) - 1) == 0 {
                format!("{} {unit}", bytes >> shift)
            } else {
                format!("{:.1} {unit}", bytes as f64 / (1u64 << shift) as f64)
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(4096), "4 KiB");
        assert_eq!(format_bytes(512 << 20), "512 MiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn stats_line_names_what_the_guest_reported() {
        assert!(describe_stats(&BalloonStats::default()).contains("not reported"));
        let stats =
            BalloonStats { free_bytes: Some(1 << 20), major_faults: Some(3), age_ms: Some(1500), ..Default::default() };
        assert_eq!(describe_stats(&stats), "guest memory: free 1 MiB, major faults 3 (reported 1.5 s ago)");
    }
}
