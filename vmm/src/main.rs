//! The `faultline` binary: parses the command line and runs what it names.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use faultline::cli::{BenchCommand, Cli, Command, RunArgs};
use faultline::experiments::{
    boot_bench, fault_bench, migrate_bench, restore_bench, snapshot_bench, snapshot_live_bench,
};
use faultline::snapshot::{self, cli::RestoreArgs, cli::SnapshotCommand};
use faultline::vmm::{self, RunOptions};

/// Logs to stderr at the levels `FAULTLINE_LOG` names: `debug`, or per module as
/// `target=level` joined by commas (e.g. `faultline::smmu=trace,warn`); errors only when
/// unset. A `Targets` filter rather than `EnvFilter`: the same directive syntax without
/// span and field matching, and without the regex engine (a quarter of a MiB of code
/// every run would map).
fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = match std::env::var("FAULTLINE_LOG") {
        Ok(text) if !text.trim().is_empty() => text.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("faultline: FAULTLINE_LOG={text:?} is not a filter ({e}); give e.g. debug or faultline::smmu=trace,warn");
            Targets::new().with_default(LevelFilter::ERROR)
        }),
        _ => Targets::new().with_default(LevelFilter::ERROR),
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

fn main() -> ExitCode {
    let started = Instant::now();
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(&args, started),
        Command::Bench(BenchCommand::Boot(args)) => match boot_bench::run(&args) {
            Ok(report) if args.json => print_json(&report),
            Ok(report) => {
                print!("{}", report.table());
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        },
        Command::Bench(BenchCommand::Faults(args)) => bench_faults(&args),
        Command::Bench(BenchCommand::Snapshot(args)) if args.live => match snapshot_live_bench::run(&args) {
            Ok(report) if args.json => print_json(&report),
            Ok(report) => {
                print!("{}", report.table());
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        },
        Command::Bench(BenchCommand::Snapshot(args)) => match snapshot_bench::run(&args) {
            Ok(report) if args.json => print_json(&report),
            Ok(report) => {
                print!("{}", report.table());
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        },
        Command::Bench(BenchCommand::Migrate(args)) => match migrate_bench::run(&args) {
            Ok(report) if args.json => print_json(&report),
            Ok(report) => {
                print!("{}", report.table());
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        },
        Command::Bench(BenchCommand::Restore(args)) => match restore_bench::run(&args) {
            Ok(report) if args.json => print_json(&report),
            Ok(report) => {
                print!("{}", report.table());
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        },
        Command::Ctl(args) => faultline::api::ctl::main(&args),
        Command::Trace(args) => run(&RunArgs { trace_kvm: true, ..args }, started),
        Command::Restore(args) => restore(&args, started),
        Command::PageServer(args) => snapshot::page_server::main(&args),
        Command::Snapshot(SnapshotCommand::Inspect { dir, json }) => match snapshot::inspect(&dir) {
            Ok(inspection) if json => print_json(&inspection),
            Ok(inspection) => {
                print!("{}", snapshot::cli::describe(&inspection));
                if inspection.checksums_ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(err) => fail(&err),
        },
        Command::GuestImage { output } => match std::fs::write(&output, faultline::BUILTIN_GUEST_ELF) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => fail(&format!("cannot write {}: {err}", output.display())),
        },
    }
}

/// Exit codes: 0 the guest succeeded; 1 the guest ran but failed (verify, exception,
/// triple fault, KVM error); 2 the VM could not be built (bad config, host limits).
fn run(args: &RunArgs, started: Instant) -> ExitCode {
    let config = match args.to_config() {
        Ok(config) => config,
        Err(err) => return fail(&err),
    };
    let options = RunOptions {
        api_socket: args.api_socket.clone(),
        stop_on_signals: true,
        ..RunOptions::new(started, args.timeout)
    };
    finish(vmm::run(&config, &options), args.json)
}

/// `faultline restore`: exit codes as for `run`.
fn restore(args: &RestoreArgs, started: Instant) -> ExitCode {
    let overrides = match args.overrides() {
        Ok(overrides) => overrides,
        Err(err) => return fail(&err),
    };
    let options = RunOptions {
        api_socket: args.api_socket.clone(),
        stop_on_signals: true,
        ..RunOptions::new(started, args.timeout)
    };
    let vmm = match (&args.incoming, &args.from) {
        (Some(uri), _) => vmm::Vmm::incoming(uri, args.console.then_some(true), &options),
        (None, Some(from)) => vmm::Vmm::restore(from, &overrides, &options),
        (None, None) => return fail(&"give --from DIR (a snapshot) or --incoming URI (a migration)"),
    };
    finish(vmm.and_then(vmm::Vmm::run), args.json)
}

/// Prints a run's report (or its error) and picks the exit code.
fn finish(result: Result<faultline::report::RunReport, vmm::VmmError>, json: bool) -> ExitCode {
    match result {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
            } else {
                print!("{}", report.summary());
            }
            if report.success() {
                ExitCode::SUCCESS
            } else {
                if !json {
                    eprintln!("faultline: the run did not succeed: {}", report.failure_reason());
                }
                ExitCode::from(1)
            }
        }
        Err(err) => fail(&err),
    }
}

/// `bench faults`: the table (or JSON) on stdout, files in --out.
fn bench_faults(args: &fault_bench::FaultBenchArgs) -> ExitCode {
    if !args.host_noise.is_empty() {
        return match fault_bench::host_noise::sweep(args) {
            Ok(report) => report.print(args),
            Err(err) => fail(&err),
        };
    }
    let report = match fault_bench::run(args) {
        Ok(report) => report,
        Err(err) => return fail(&err),
    };
    if let Some(dir) = &args.out {
        match report.write_to(dir) {
            Ok(files) => eprintln!("bench faults: wrote {}", files.join(", ")),
            Err(err) => return fail(&err),
        }
    }
    if args.json {
        print_json(&report)
    } else {
        print!("{}", report.table());
        ExitCode::SUCCESS
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> ExitCode {
    println!("{}", serde_json::to_string_pretty(value).expect("report serializes"));
    ExitCode::SUCCESS
}

fn fail(err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("faultline: error: {err}");
    ExitCode::from(2)
}
