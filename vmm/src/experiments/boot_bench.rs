//! `faultline bench boot`: process start → guest ready, Faultline against QEMU
//! (`-M microvm -accel kvm`) booting the same built-in ELF, measured in the same run,
//! alternating A B A B so that drift of this shared machine hits both alike.
//!
//! For Faultline it also gives where the time goes, from the spawn: process start (until
//! `main`), VM built, first instruction (the boot vCPU's first KVM_RUN) and ready (the
//! guest's ready line reaching the VMM), from the run report's boot timeline; and what
//! the peak RSS is made of (anonymous, file-backed, shared memory at the end of the run).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::child_timing::{time_child, ChildTiming, ChildTimingError, Spread};

/// Process start → guest ready, Faultline vs QEMU (microvm) booting the same ELF: the
/// options of `faultline bench boot`.
#[derive(Debug, Clone, clap::Args)]
pub struct BootBenchArgs {
    /// Timed runs of each VMM (after one warm-up run each).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// QEMU binary to compare against ("none" to skip).
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Errors of the boot benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BootBenchError {
    /// The guest image could not be written for QEMU.
    #[error("cannot write the guest image to {path}: {source}")]
    WriteImage {
        /// Where.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A child could not be timed.
    #[error(transparent)]
    Child(#[from] ChildTimingError),
    /// A run never printed its ready line.
    #[error("{vmm} run {run} never printed the guest's ready line (exit code {exit_code}); run it by hand to see why")]
    NoReady {
        /// Which VMM.
        vmm: &'static str,
        /// Which run.
        run: usize,
        /// Its exit code.
        exit_code: i32,
    },
    /// --runs 0.
    #[error("--runs must be at least 1")]
    NoRuns,
}

/// Figures of one VMM over all runs, in milliseconds (RSS in MiB).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootFigures {
    /// Spawn → ready line.
    pub ready_ms: Spread,
    /// Spawn → exit.
    pub exit_ms: Spread,
    /// CPU time of the process.
    pub cpu_ms: Spread,
    /// Peak RSS.
    pub max_rss_mib: Spread,
}

/// Where Faultline's boot time goes: milliseconds from the spawn to the end of each phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootPhases {
    /// The process reached `main` (exec, dynamic linking, runtime start).
    pub process_start_ms: Spread,
    /// Guest RAM, KVM VM, kernel and boot data, devices and vCPUs are ready.
    pub vm_built_ms: Spread,
    /// The boot vCPU entered KVM_RUN: the guest's first instruction.
    pub first_instruction_ms: Spread,
    /// The guest's ready line reached the VMM.
    pub ready_ms: Spread,
}

/// What Faultline's memory is made of at the end of a run (MiB, from /proc/self/status).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RssParts {
    /// Peak RSS (VmHWM).
    pub peak_mib: Spread,
    /// RSS at the end.
    pub rss_mib: Spread,
    /// Of it, anonymous memory (heap, stacks, touched guest RAM).
    pub anon_mib: Spread,
    /// Of it, file-backed pages (the binary's text and data, shared libraries).
    pub file_mib: Spread,
    /// Of it, shared memory (memfd guest RAM).
    pub shmem_mib: Spread,
}

/// The benchmark's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootBenchReport {
    /// Timed runs per VMM.
    pub runs: usize,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Faultline's figures.
    pub faultline: BootFigures,
    /// Where Faultline's boot time goes.
    pub phases: Option<BootPhases>,
    /// What Faultline's RSS is made of.
    pub rss: Option<RssParts>,
    /// QEMU's figures, when QEMU was found.
    pub qemu: Option<BootFigures>,
    /// Faultline / QEMU ready time, pair by pair.
    pub ready_ratio: Option<Spread>,
    /// Faultline / QEMU CPU time, pair by pair.
    pub cpu_ratio: Option<Spread>,
    /// Why QEMU was not measured, if it was not.
    pub qemu_note: Option<String>,
}

const READY_MARKER: &str = "FL ready";

fn faultline_command(args: &BootBenchArgs) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("faultline"));
    let mut command = Command::new(exe);
    command.args(["run", "--console", "--json", "--steps", "idle", "--duration-ms", "0"]);
    command.args(["--vcpus", &args.vcpus.to_string(), "--memory", &format!("size={}M", args.memory_mib)]);
    command
}

/// QEMU microvm booting the built-in guest: KVM, this host's CPU without
/// arch-capabilities (which nested KVM here refuses), serial on stdio, no reboot, and the
/// debug-exit port the guest ends with. Append `-smp`, `-m`, `-kernel IMAGE`.
pub const QEMU_MICROVM_ARGS: &[&str] = &[
    "-M",
    "microvm",
    "-accel",
    "kvm",
    "-cpu",
    "host,-arch-capabilities",
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-monitor",
    "none",
    "-serial",
    "stdio",
    "-no-reboot",
    "-device",
    "isa-debug-exit,iobase=0xf4,iosize=4",
];

fn qemu_command(args: &BootBenchArgs, image: &std::path::Path) -> Command {
    let mut command = Command::new(&args.qemu);
    command.args(QEMU_MICROVM_ARGS);
    command.args(["-smp", &args.vcpus.to_string(), "-m", &format!("{}M", args.memory_mib)]);
    command.arg("-kernel").arg(image);
    command.args(["-append", &format!("fl.cpus={} fl.steps=idle fl.duration_ms=0", args.vcpus)]);
    command
}

fn figures(timings: &[ChildTiming]) -> BootFigures {
    let ms = |ns: u64| ns as f64 / 1e6;
    let spread = |values: Vec<f64>| Spread::of(&values).expect("at least one run");
    BootFigures {
        ready_ms: spread(timings.iter().map(|t| ms(t.marker_ns.unwrap_or(t.exit_ns))).collect()),
        exit_ms: spread(timings.iter().map(|t| ms(t.exit_ns)).collect()),
        cpu_ms: spread(timings.iter().map(|t| ms(t.cpu_ns)).collect()),
        max_rss_mib: spread(timings.iter().map(|t| t.max_rss_bytes as f64 / 1048576.0).collect()),
    }
}

/// The run report Faultline printed after the guest's lines (`--console --json`).
fn run_report(timing: &ChildTiming) -> Option<serde_json::Value> {
    let start =
        timing.stdout.find("\n{\n").map(|at| at + 1).or_else(|| timing.stdout.starts_with("{\n").then_some(0))?;
    serde_json::from_str(&timing.stdout[start..]).ok()
}

fn phases(timings: &[ChildTiming]) -> Option<BootPhases> {
    let mut columns: [Vec<f64>; 4] = Default::default();
    for timing in timings {
        let report = run_report(timing)?;
        let boot = &report["boot"];
        let start_ns = boot["started_monotonic_ns"].as_u64()?.checked_sub(timing.spawned_monotonic_ns)?;
        let phase_ns =
            [Some(0), boot["vm_built_ns"].as_u64(), boot["first_instruction_ns"].as_u64(), boot["ready_ns"].as_u64()];
        for (column, ns) in columns.iter_mut().zip(phase_ns) {
            column.push((start_ns + ns?) as f64 / 1e6);
        }
    }
    let [process_start, vm_built, first_instruction, ready] = columns.map(|c| Spread::of(&c));
    Some(BootPhases {
        process_start_ms: process_start?,
        vm_built_ms: vm_built?,
        first_instruction_ms: first_instruction?,
        ready_ms: ready?,
    })
}

fn rss_parts(timings: &[ChildTiming]) -> Option<RssParts> {
    let mut columns: [Vec<f64>; 5] = Default::default();
    for timing in timings {
        let memory = run_report(timing)?["host_memory"].clone();
        let mib = |key: &str| memory[key].as_u64().map(|b| b as f64 / 1048576.0);
        let (rss, anon, shmem) = (mib("rss_bytes")?, mib("rss_anon_bytes")?, mib("rss_shmem_bytes")?);
        let values = [mib("peak_rss_bytes")?, rss, anon, (rss - anon - shmem).max(0.0), shmem];
        for (column, value) in columns.iter_mut().zip(values) {
            column.push(value);
        }
    }
    let [peak, rss, anon, file, shmem] = columns.map(|c| Spread::of(&c));
    Some(RssParts { peak_mib: peak?, rss_mib: rss?, anon_mib: anon?, file_mib: file?, shmem_mib: shmem? })
}

fn qemu_available(qemu: &str) -> bool {
    qemu != "none" && Command::new(qemu).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Runs the benchmark.
pub fn run(args: &BootBenchArgs) -> Result<BootBenchReport, BootBenchError> {
    if args.runs == 0 {
        return Err(BootBenchError::NoRuns);
    }
    let timeout = Duration::from_secs(60);
    let with_qemu = qemu_available(&args.qemu);
    let image = std::env::temp_dir().join(format!("faultline-guest-{}.elf", std::process::id()));
    if with_qemu {
        std::fs::write(&image, crate::BUILTIN_GUEST_ELF)
            .map_err(|source| BootBenchError::WriteImage { path: image.display().to_string(), source })?;
    }
    let timed = |vmm: &'static str, run: usize, command: Command| -> Result<Option<ChildTiming>, BootBenchError> {
        let timing = time_child(command, READY_MARKER, timeout)?;
        if timing.marker_ns.is_none() {
            return Err(BootBenchError::NoReady { vmm, run, exit_code: timing.exit_code });
        }
        Ok((run > 0).then_some(timing)) // run 0 is the warm-up
    };
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let result = (|| {
        for run in 0..=args.runs {
            ours.extend(timed("faultline", run, faultline_command(args))?);
            if with_qemu {
                theirs.extend(timed("qemu", run, qemu_command(args, &image))?);
            }
        }
        Ok::<(), BootBenchError>(())
    })();
    if with_qemu {
        let _ = std::fs::remove_file(&image);
    }
    result?;
    let pair_ratio = |f: fn(&ChildTiming) -> u64| {
        let ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| f(a) as f64 / f(b).max(1) as f64).collect();
        Spread::of(&ratios)
    };
    Ok(BootBenchReport {
        runs: args.runs,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        faultline: figures(&ours),
        phases: phases(&ours),
        rss: rss_parts(&ours),
        qemu: with_qemu.then(|| figures(&theirs)),
        ready_ratio: pair_ratio(|t| t.marker_ns.unwrap_or(t.exit_ns)),
        cpu_ratio: pair_ratio(|t| t.cpu_ns),
        qemu_note: (!with_qemu).then(|| format!("{} not found or not runnable: QEMU not measured", args.qemu)),
    })
}

impl BootBenchReport {
    /// A table for people.
    pub fn table(&self) -> String {
        let row = |name: &str, s: &Spread, unit: &str| {
            format!("  {name:<22} {:>9.2} {:>9.2} {:>9.2} {unit}\n", s.min, s.median, s.max)
        };
        let mut out = format!(
            "boot: process start -> guest ready line, {} vCPU(s), {} MiB, {} runs each (min / median / max)\n",
            self.vcpus, self.memory_mib, self.runs
        );
        let mut block = |name: &str, f: &BootFigures| {
            out.push_str(&format!("{name}\n"));
            out.push_str(&row("ready", &f.ready_ms, "ms"));
            out.push_str(&row("exit", &f.exit_ms, "ms"));
            out.push_str(&row("cpu (user+sys)", &f.cpu_ms, "ms"));
            out.push_str(&row("peak RSS", &f.max_rss_mib, "MiB"));
        };
        block("faultline", &self.faultline);
        if let Some(q) = &self.qemu {
            block("qemu -M microvm", q);
        }
        if let Some(p) = &self.phases {
            out.push_str("faultline boot phases, from the spawn\n");
            out.push_str(&row("process start", &p.process_start_ms, "ms"));
            out.push_str(&row("VM built", &p.vm_built_ms, "ms"));
            out.push_str(&row("first instruction", &p.first_instruction_ms, "ms"));
            out.push_str(&row("ready (in the VMM)", &p.ready_ms, "ms"));
        }
        if let Some(r) = &self.rss {
            out.push_str("faultline RSS at the end of the run\n");
            out.push_str(&row("peak (VmHWM)", &r.peak_mib, "MiB"));
            out.push_str(&row("resident", &r.rss_mib, "MiB"));
            out.push_str(&row("  anonymous", &r.anon_mib, "MiB"));
            out.push_str(&row("  file-backed", &r.file_mib, "MiB"));
            out.push_str(&row("  shared memory", &r.shmem_mib, "MiB"));
        }
        if let (Some(r), Some(c)) = (&self.ready_ratio, &self.cpu_ratio) {
            out.push_str("faultline / qemu, pair by pair\n");
            out.push_str(&row("ready ratio", r, "x"));
            out.push_str(&row("cpu ratio", c, "x"));
        }
        if let Some(note) = &self.qemu_note {
            out.push_str(&format!("note: {note}\n"));
        }
        out
    }
}
