//! The `faultline` binary: parses the command line and runs what it names.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use faultline::cli::{BenchCommand, Cli, Command, RunArgs};
use faultline::experiments::{boot_bench, fault_bench};
use faultline::vmm::{self, RunOptions};

fn main() -> ExitCode {
    let started = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("FAULTLINE_LOG"))
        .with_writer(std::io::stderr)
        .init();
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
        Command::Ctl(args) => faultline::api::ctl::main(&args),
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
    let options = RunOptions { api_socket: args.api_socket.clone(), ..RunOptions::new(started, args.timeout) };
    match vmm::run(&config, &options) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
            } else {
                print!("{}", report.summary());
            }
            if report.success() {
                ExitCode::SUCCESS
            } else {
                if !args.json {
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
