//! The `faultline` command line: clap definitions and their translation to a [`VmConfig`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    AccessKind, AccessPattern, BalloonOptions, ChaosConfig, ConfigError, HostChangeKind, HostChangesConfig, HostNoise,
    KernelImage, PagingMode, VmConfig, ZoneConfig,
};
use crate::smmu::engine_tuning::EngineTuning;

/// Faultline: a minimal KVM VMM for experiments on guest memory.
#[derive(Debug, Parser)]
#[command(name = "faultline", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
///
/// `defer`: a subcommand's arguments are defined (clap's `augment_args`) only when that
/// subcommand is the one being parsed (or its help is asked for), not for every process:
/// building all of them touched ~0.3 MiB of code per run, and each touched 64 KiB of code
/// counts in the VMM's RSS (docs/bench-boot.md). Adding a flag is unchanged: a field with
/// `#[arg(...)]` in the subcommand's `Args` struct. One side effect: the heading of
/// `faultline SUBCOMMAND --help` is the first line of the `Args` struct's doc comment
/// (clap applies the deferred arguments last); the list in `faultline --help` still shows
/// the variant's.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum Command {
    /// Boot a VM (by default the built-in tiny guest: 2 vCPUs, 256 MiB anon, fill + verify).
    Run(RunArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write the built-in guest ELF to a file (e.g. to boot it under QEMU).
    GuestImage {
        /// Where to write it.
        output: PathBuf,
    },
    /// Steer a running VM through its control socket (status, pause, snapshot, balloon).
    Ctl(crate::api::CtlArgs),
    /// `run` with `--trace-kvm`, printing each kind of change followed into KVM (its
    /// MMU-notifier unmap, the guest's refault).
    Trace(RunArgs),
    /// Start a VM from a snapshot (`faultline ctl ... snapshot create DIR`): it goes on
    /// where it was.
    Restore(crate::snapshot::cli::RestoreArgs),
    /// Look at snapshots.
    #[command(subcommand)]
    Snapshot(crate::snapshot::cli::SnapshotCommand),
    /// Serve a snapshot's pages to a VM restored with `--memory-restore uffd-socket:PATH`
    /// (Firecracker's page-fault handler protocol).
    PageServer(crate::snapshot::page_server::PageServerArgs),
}

/// Benchmarks (arguments deferred as for [`Command`]).
#[derive(Debug, Subcommand)]
#[command(defer = true)]
#[allow(clippy::large_enum_variant)] // parsed once per process; boxing would only move it
pub enum BenchCommand {
    /// Process start → guest ready, Faultline vs QEMU (microvm) booting the same ELF.
    Boot(crate::experiments::boot_bench::BootBenchArgs),
    /// Fault latency over a matrix of backend x paging mode x engine x vCPUs x threads x
    /// pattern x access x size, with kernel baselines and the reference handler beside.
    Faults(crate::experiments::fault_bench::FaultBenchArgs),
    /// Pause latency, snapshot time and size against touched memory (full and diff), and
    /// eager restore time, against QEMU microvm saving and restoring the same ELF.
    Snapshot(crate::experiments::snapshot_bench::SnapshotBenchArgs),
    /// Pre-copy live migration (total time, downtime, bytes, rounds) against QEMU microvm
    /// migrating the same ELF, per transport x dirty rate x downtime limit.
    Migrate(crate::experiments::migrate_bench::MigrateBenchArgs),
    /// Restore modes against guest size: first instruction, warm point, faults
    /// (docs/lazy-restore.md).
    Restore(crate::experiments::restore_bench::RestoreBenchArgs),
}

/// Boot a VM (by default the built-in tiny guest: 2 vCPUs, 256 MiB anon, fill + verify):
/// the options of `faultline run` and `faultline trace`.
///
/// The first line is the heading of `faultline run --help`: with deferred arguments
/// ([`Command`]) an `Args` struct's doc comment, not the variant's, heads its help.
#[derive(Debug, Args, Clone, Default)]
pub struct RunArgs {
    /// A TOML config file; options given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Number of vCPUs [default: 2].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// A memory zone, repeatable, laid out in order: size=SIZE[,backend=anon|memfd|file|hugetlb][,path=FILE][,hugepage=2M|1G]
    /// [default: size=256M,backend=anon].
    #[arg(long = "memory", short = 'm', value_name = "SPEC")]
    pub memory: Vec<String>,
    /// How guest RAM is populated, for every zone without its own paging=: kernel (first
    /// touch filled by the kernel), prefault (all up front), uffd-missing or uffd-minor
    /// (by Faultline's userfaultfd fault engine) [default: kernel]. With uffd-minor and no
    /// --memory, the default zone is a memfd (MINOR faults need a page cache).
    #[arg(long, value_enum, value_name = "MODE")]
    pub paging: Option<PagingMode>,
    /// Fault handler threads of the userfaultfd engine [default: 2].
    #[arg(long, value_name = "N")]
    pub fault_threads: Option<usize>,
    /// Fault engine design and fast paths: default, reference (the textbook one-thread
    /// handler), minimal (poll + read + COPY, the floor), or options joined by '+':
    /// batch=N, dontwake, zeropool, around=N, busypoll, noexclusive (see docs/benchmarks.md).
    #[arg(long, value_name = "OPTIONS", value_parser = EngineTuning::parse_arg)]
    pub fault_engine: Option<EngineTuning>,
    /// Run the chaos driver: this many random discard / write-protect / unprotect
    /// operations on the workload region while the guest runs (use with --steps churn).
    #[arg(long, value_name = "N")]
    pub chaos_events: Option<u64>,
    /// Largest chaos range, in 4 KiB pages [default: 64].
    #[arg(long, value_name = "PAGES", requires = "chaos_events")]
    pub chaos_max_pages: Option<u64>,
    /// Seed of the chaos driver's ranges [default: 7].
    #[arg(long, value_name = "SEED", requires = "chaos_events")]
    pub chaos_seed: Option<u64>,
    /// Pause between chaos operations, microseconds (0: back to back) [default: 50].
    #[arg(long, value_name = "US", requires = "chaos_events")]
    pub chaos_interval_us: Option<u64>,
    /// Chaos only write-protects and unprotects (no discards: the guest's data stays).
    #[arg(long, requires = "chaos_events")]
    pub chaos_no_discard: bool,
    /// Host page-table changes the VMM does not make, applied to guest RAM while the guest
    /// runs: swap, ksm, thp, compaction, mprotect (comma separated) or mixed. Needs root;
    /// everything set up on the host is put back afterwards.
    #[arg(long, value_name = "KINDS")]
    pub host_changes: Option<String>,
    /// Host changes per second [default: 200].
    #[arg(long, value_name = "R", requires = "host_changes")]
    pub host_change_rate: Option<u64>,
    /// Host changes before the driver ends the guest's churn step [default: 200].
    #[arg(long, value_name = "N", requires = "host_changes")]
    pub host_change_events: Option<u64>,
    /// Largest range of one host change, 4 KiB pages [default: 256].
    #[arg(long, value_name = "PAGES", requires = "host_changes")]
    pub host_change_max_pages: Option<u64>,
    /// Give the VM KVM's dirty ring, ENTRIES per vCPU (a power of two, 256 to 65536),
    /// instead of the dirty log: `ctl migrate --dirty-tracking ring` needs it.
    #[arg(long, value_name = "ENTRIES")]
    pub dirty_ring: Option<u32>,
    /// Record KVM's secondary-MMU events for this VM (tracefs; root) and follow each
    /// change into KVM: its unmap and the guest's refault.
    #[arg(long)]
    pub trace_kvm: bool,
    /// Background noise while the guest runs: none, mmap-churn, mprotect-churn, pageout,
    /// ksm, compaction (pageout, ksm and compaction need root).
    #[arg(long, value_name = "NOISE", value_parser = HostNoise::parse)]
    pub host_noise: Option<HostNoise>,
    /// fill/verify/churn: page i holds the pattern of page i % N (duplicates for KSM).
    #[arg(long, value_name = "N")]
    pub dup_pages: Option<u64>,
    /// Give the VM a virtio-balloon device (virtio-mmio at 0xd0000000, IRQ 5).
    #[arg(long)]
    pub balloon: bool,
    /// Balloon targets to follow in order, e.g. 128M,0 (each next one once the guest has
    /// reached the current one; implies --balloon). The built-in guest's `balloon` step
    /// ends after the last.
    #[arg(long, value_name = "SIZES")]
    pub balloon_schedule: Option<String>,
    /// Target changes the guest's balloon step follows before it ends (for steering by hand
    /// with `faultline ctl balloon set`; default: the schedule's length).
    #[arg(long, value_name = "N")]
    pub balloon_changes: Option<u64>,
    /// Serve the control API on this Unix socket while the VM runs (see `faultline ctl`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// A kernel to boot instead of the built-in guest: PVH ELF, Linux vmlinux or bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Extra kernel command line (for the built-in guest, appended after the workload).
    #[arg(long, value_name = "TEXT")]
    pub cmdline: Option<String>,
    /// Workload steps of the built-in guest, comma separated: fill, verify, touch, dirty, idle.
    #[arg(long, value_delimiter = ',')]
    pub steps: Option<Vec<String>>,
    /// Bytes of guest RAM the workload uses (default: all of it above 8 MiB).
    #[arg(long, value_parser = parse_size_arg)]
    pub size: Option<u64>,
    /// Seed of the fill/verify pattern and random orders.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Touch order.
    #[arg(long, value_enum)]
    pub pattern: Option<AccessPattern>,
    /// Stride in pages for --pattern strided.
    #[arg(long)]
    pub stride: Option<u64>,
    /// Read or write touches.
    #[arg(long, value_enum)]
    pub access: Option<AccessKind>,
    /// Passes of touch over the same pages (the first is cold).
    #[arg(long)]
    pub passes: Option<u32>,
    /// Pages per second for the dirty step.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Duration of dirty and idle, milliseconds.
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// The paced steps (dirty, generations, idle) print a stall line whenever a vCPU's
    /// clock jumped this many microseconds between two looks (it did not run: paused,
    /// migrated, waiting for a page); the report lists them under guest.stalls.
    #[arg(long, value_name = "US")]
    pub stall_us: Option<u64>,
    /// Echo the guest's serial console to stdout (before the summary).
    #[arg(long)]
    pub console: bool,
    /// Print the run report as JSON instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Stop the VM after this many seconds (exit status 1, exit kind "stopped"). There is
    /// no limit by default, as in QEMU or Firecracker: a guest that never exits (e.g. one
    /// spinning, or halted with interrupts off) runs until stopped, so bound unattended
    /// runs with this.
    #[arg(long, value_name = "SECONDS", value_parser = crate::config::duration::parse_seconds)]
    pub timeout: Option<std::time::Duration>,
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    faultline_abi::parse_size(text).ok_or_else(|| format!("cannot parse size '{text}' (use e.g. 64M, 1G)"))
}

impl RunArgs {
    /// The VM configuration: the config file (or defaults), then every option given here.
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let mut config = match &self.config {
            Some(path) => VmConfig::from_toml_file(path)?,
            None => VmConfig::default(),
        };
        if let Some(vcpus) = self.vcpus {
            config.vcpus = vcpus;
        }
        if !self.memory.is_empty() {
            config.zones = self.memory.iter().map(|spec| ZoneConfig::parse(spec)).collect::<Result<_, _>>()?;
        }
        if let Some(paging) = self.paging {
            if paging == PagingMode::UffdMinor && self.memory.is_empty() && config.zones == VmConfig::default().zones {
                // MINOR faults need a page cache: the default zone becomes a memfd.
                config.zones.iter_mut().for_each(|z| z.backend = crate::config::Backend::Memfd);
            }
            // Zones whose spec names paging= keep it; the rest take --paging.
            for (zone, spec) in config.zones.iter_mut().zip(self.memory.iter().map(Some).chain(std::iter::repeat(None)))
            {
                if !spec.is_some_and(|s| s.contains("paging=")) {
                    zone.paging = paging;
                }
            }
        }
        if let Some(threads) = self.fault_threads {
            config.fault_engine.handler_threads = threads;
        }
        if let Some(tuning) = self.fault_engine {
            config.fault_engine.tuning = tuning;
        }
        if let Some(events) = self.chaos_events {
            let chaos = config.chaos.get_or_insert_with(ChaosConfig::default);
            chaos.events = events;
            if let Some(v) = self.chaos_max_pages {
                chaos.max_pages = v;
            }
            if let Some(v) = self.chaos_seed {
                chaos.seed = v;
            }
            if let Some(v) = self.chaos_interval_us {
                chaos.interval_us = v;
            }
            chaos.discards = !self.chaos_no_discard;
        }
        if let Some(kinds) = &self.host_changes {
            let host = config.host_changes.get_or_insert_with(HostChangesConfig::default);
            host.kinds = HostChangeKind::parse_list(kinds)?;
            host.rate_per_s = self.host_change_rate.unwrap_or(host.rate_per_s);
            host.events = self.host_change_events.unwrap_or(host.events);
            host.max_pages = self.host_change_max_pages.unwrap_or(host.max_pages);
        }
        config.trace_kvm |= self.trace_kvm;
        if self.dirty_ring.is_some() {
            config.dirty_ring = self.dirty_ring;
        }
        if self.host_noise.is_some() {
            config.host_noise = self.host_noise;
        }
        if let Some(n) = self.dup_pages {
            config.workload.dup_pages = n;
        }
        if self.balloon || self.balloon_schedule.is_some() || self.balloon_changes.is_some() {
            let balloon = config.balloon.get_or_insert_with(BalloonOptions::default);
            if self.balloon_changes.is_some() {
                balloon.guest_changes = self.balloon_changes;
            }
            if let Some(schedule) = &self.balloon_schedule {
                balloon.schedule_bytes = BalloonOptions::parse_schedule(schedule)?;
            }
        }
        if let Some(kernel) = &self.kernel {
            config.kernel = KernelImage::Path(kernel.clone());
            let workload_flags = [
                ("--steps", self.steps.is_some()),
                ("--size", self.size.is_some()),
                ("--seed", self.seed.is_some()),
                ("--pattern", self.pattern.is_some()),
                ("--stride", self.stride.is_some()),
                ("--access", self.access.is_some()),
                ("--passes", self.passes.is_some()),
                ("--rate", self.rate.is_some()),
                ("--duration-ms", self.duration_ms.is_some()),
                ("--stall-us", self.stall_us.is_some()),
                ("--balloon-changes", self.balloon_changes.is_some()),
            ];
            if let Some((flag, _)) = workload_flags.iter().find(|(_, given)| *given) {
                return Err(ConfigError::BadWorkload {
                    field: "steps",
                    reason: format!(
                        "{flag} drives the built-in guest's workload and would be ignored with --kernel; pass your kernel its own options with --cmdline"
                    ),
                });
            }
        }
        if let Some(cmdline) = &self.cmdline {
            config.cmdline = cmdline.clone();
        }
        let workload = &mut config.workload;
        if let Some(steps) = &self.steps {
            workload.steps = steps.clone();
        }
        if self.size.is_some() {
            workload.size_bytes = self.size;
        }
        if let Some(v) = self.seed {
            workload.seed = v;
        }
        if let Some(v) = self.pattern {
            workload.pattern = v;
        }
        if let Some(v) = self.stride {
            workload.stride_pages = v;
        }
        if let Some(v) = self.access {
            workload.access = v;
        }
        if let Some(v) = self.passes {
            workload.passes = v;
        }
        if let Some(v) = self.rate {
            workload.rate_pages_per_s = v;
        }
        if let Some(v) = self.duration_ms {
            workload.duration_ms = v;
        }
        if let Some(v) = self.stall_us {
            workload.stall_us = v;
        }
        config.console |= self.console;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Backend;

    fn parse(args: &[&str]) -> RunArgs {
        match Cli::try_parse_from(std::iter::once("faultline").chain(args.iter().copied())).unwrap().command {
            Command::Run(run) => run,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn run_with_no_options_is_the_sensible_default() {
        let config = parse(&["run"]).to_config().unwrap();
        assert_eq!(config, VmConfig::default());
        assert_eq!(config.vcpus, 2);
    }

    #[test]
    fn options_override_defaults() {
        let config = parse(&[
            "run",
            "--vcpus",
            "4",
            "--memory",
            "size=64M,backend=memfd",
            "-m",
            "size=32M",
            "--steps",
            "touch,verify",
            "--pattern",
            "random",
            "--size",
            "16M",
        ])
        .to_config()
        .unwrap();
        assert_eq!(config.vcpus, 4);
        assert_eq!(config.zones[0].backend, Backend::Memfd);
        assert_eq!(config.zones[1], ZoneConfig::new(32 << 20, Backend::Anon));
        assert_eq!(config.workload.steps, vec!["touch".to_string(), "verify".to_string()]);
        assert_eq!(config.workload.pattern, AccessPattern::Random);
        assert_eq!(config.workload.size_bytes, Some(16 << 20));
    }

    #[test]
    fn bad_memory_spec_names_the_field() {
        let err = parse(&["run", "--memory", "size=0"]).to_config().unwrap_err().to_string();
        assert!(err.contains("zone 0") && err.contains("size is 0"), "{err}");
        let err = parse(&["run", "--memory", "size=10000,backend=anon"]).to_config().unwrap_err().to_string();
        assert!(err.contains("not a multiple") && err.contains("12288"), "{err}");
    }

    #[test]
    fn paging_flag_applies_to_zones_without_their_own() {
        let config = parse(&[
            "run",
            "--paging",
            "uffd-missing",
            "-m",
            "size=64M",
            "-m",
            "size=32M,backend=memfd,paging=uffd-minor",
            "--fault-threads",
            "3",
            "--chaos-events",
            "100",
            "--steps",
            "fill,churn",
        ])
        .to_config()
        .unwrap();
        assert_eq!(config.zones[0].paging, PagingMode::UffdMissing);
        assert_eq!(config.zones[1].paging, PagingMode::UffdMinor);
        assert_eq!(config.fault_engine.handler_threads, 3);
        assert_eq!(config.chaos.as_ref().map(|c| c.events), Some(100));
        let config = parse(&["run", "--paging", "prefault"]).to_config().unwrap();
        assert_eq!(config.zones[0].paging, PagingMode::Prefault);
        let config = parse(&["run", "--paging", "uffd-minor"]).to_config().unwrap();
        assert_eq!((config.zones[0].backend, config.zones[0].paging), (Backend::Memfd, PagingMode::UffdMinor));
    }
}
