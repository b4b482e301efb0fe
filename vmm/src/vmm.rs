//! Builds a VM step by step from a [`VmConfig`] (guest RAM, the KVM VM, the kernel and
//! its boot data, devices, vCPU threads) or from a snapshot, runs it to its end with the
//! control socket and the chaos driver beside it, and reports.
mod restore;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use faultline_abi as abi;

use crate::api::{ApiError, ControlServer};
use crate::boot::{self, BootError};
use crate::config::{ConfigError, PagingMode, VmConfig};
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_PORTS};
use crate::devices::pv_console::PvConsole;
use crate::devices::serial::{ConsoleSink, SerialDevice, COM1_IRQ, SERIAL_PORTS};
use crate::devices::step_control::{StepControl, STEP_CONTROL_PORTS};
use crate::devices::virtio::balloon::{BalloonConfig, BalloonHandle};
use crate::devices::virtio::notify::{spare_cpu, QueueNotifier};
use crate::devices::virtio::{install_balloon, MmioSlot, MmioTransport, SlotError};
use crate::devices::{BusError, DeviceBuses, MmioBus, PioBus};
use crate::exit::VmExit;
use crate::experiments::balloon_watch::BalloonWatch;
use crate::experiments::chaos::{self, ChaosReport};
use crate::experiments::host_changes::{self, HostSide};
use crate::guest_report::GuestReportCollector;
use crate::host::HostError;
use crate::machine::{Machine, MachineDevices, MachineParts};
use crate::memory::{self, GuestRam};
use crate::migration::destination::Incoming;
use crate::migration::postcopy_destination::{PostcopyRun, RemoteSource};
use crate::migration::{MigrationError, Migrations};
use crate::paging::{EngineFailureHook, GuestPaging, PagingError};
use crate::report::{HostMemory, RunReport};
use crate::smmu::page_source::{PageSource, ZeroSource};
use crate::snapshot::map::MapError;
use crate::snapshot::prefetch::Prefetcher;
use crate::snapshot::uffd_socket::{ExternalPager, UffdSocketError};
use crate::snapshot::working_set::{Recorder, WorkingSetError, FILE as WORKING_SET_FILE};
use crate::snapshot::{SnapshotError, SnapshotHistory};
use crate::stop_signals::StopSignals;
use crate::vm_target::VmTarget;
use crate::vstate::runner::{self, LoopSubscriber, RunError};
use crate::vstate::{ControlError, Kvm, KvmError, Vcpu, VcpuError, VcpuFleet, Vm, VmControl, VmError};

/// Errors building or running a VM. Each wraps its layer's error, whose message says
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Guest RAM could not be created.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// KVM is unavailable or lacks a feature.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The VM could not be created.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU could not be created.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The kernel could not be loaded or booted.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The device bus could not be built.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// VM control (exit eventfd, kick signal) could not be set up.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Demand paging could not be set up or checked.
    #[error(transparent)]
    Paging(#[from] PagingError),
    /// A virtio device could not be placed.
    #[error(transparent)]
    Device(#[from] SlotError),
    /// A snapshot could not be read or restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A `map` or `uffd-minor` restore could not set guest RAM up.
    #[error(transparent)]
    MapRestore(#[from] MapError),
    /// Guest RAM could not be handed to an external page-fault handler.
    #[error(transparent)]
    UffdSocket(#[from] UffdSocketError),
    /// The control socket could not be served.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// An incoming migration failed (nothing was started).
    #[error("incoming migration: {0}")]
    Migration(#[from] MigrationError),
    /// The host could not be set up for host changes.
    #[error("host changes: {0}")]
    Host(#[from] HostError),
    /// The vCPUs could not be started.
    #[error("cannot start the vCPUs: {0}")]
    Start(crate::machine::MachineError),
    /// Zones given to a restore do not fit the snapshot.
    #[error("--memory: the snapshot's zones are [{saved}] bytes, the zones given are [{given}]; give one --memory per saved zone with the same size (backend, path and paging may differ)")]
    RestoreZones {
        /// The saved zone sizes.
        saved: String,
        /// The sizes given.
        given: String,
    },
    /// `--prefetch background` with a mode that has nothing to prefetch.
    #[error("--prefetch and --record-working-set work with --memory-restore uffd-missing, not {mode} (eager, map and uffd-minor read or map everything up front; for uffd-socket ask the handler: faultline page-server --prefetch background)")]
    RestorePrefetch {
        /// The restore mode given.
        mode: &'static str,
    },
    /// Recording a working set while prefetching one.
    #[error("--record-working-set with --prefetch working-set would record the prefetch, not the guest; record without a prefetch")]
    RecordWhilePrefetching,
    /// The working set to prefetch cannot be read.
    #[error(transparent)]
    WorkingSet(#[from] WorkingSetError),
    /// The stop signals could not be watched.
    #[error("cannot watch SIGINT/SIGTERM/SIGHUP: {0}")]
    Signals(String),
    /// A part of the VM was still in use after the run (a bug).
    #[error("{0} was still in use after the VM ended; this is a bug in faultline")]
    StillShared(&'static str),
    /// Running the vCPUs failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        /// What it was for.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The KVM vCPU limit is below the count asked for.
    #[error("{vcpus} vCPUs asked for but this host's KVM allows {max}; use --vcpus {max} or fewer")]
    TooManyVcpus {
        /// vCPUs asked for.
        vcpus: u32,
        /// KVM's limit.
        max: usize,
    },
}

/// How long a fault may wait on an external page-fault handler by default.
const DEFAULT_PAGE_SERVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Options of one run that are not part of the VM's configuration.
#[derive(Clone)]
pub struct RunOptions {
    /// When the process started (boot figures are measured from here).
    pub started: std::time::Instant,
    /// Stop the VM after this long (None: no limit).
    pub timeout: Option<std::time::Duration>,
    /// Where MISSING faults of `uffd-missing` zones get their contents (None: zeros, a
    /// fresh VM). Restores plug a memory image in here.
    pub page_source: Option<Arc<dyn PageSource>>,
    /// Serve the control API on this Unix socket while the VM runs (`faultline ctl`).
    pub api_socket: Option<std::path::PathBuf>,
    /// End the VM cleanly on SIGINT, SIGTERM and SIGHUP (the binary sets this; a library
    /// user keeps its own signal handling).
    pub stop_on_signals: bool,
}

impl RunOptions {
    /// Options for a run that started at `started`, with an optional time limit.
    pub fn new(started: std::time::Instant, timeout: Option<std::time::Duration>) -> Self {
        RunOptions { started, timeout, page_source: None, api_socket: None, stop_on_signals: false }
    }
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("started", &self.started)
            .field("timeout", &self.timeout)
            .field("page_source", &self.page_source.as_ref().map(|_| "custom"))
            .field("api_socket", &self.api_socket)
            .field("stop_on_signals", &self.stop_on_signals)
            .finish()
    }
}

/// Builds the VM described by `config`, runs it until it ends, and reports.
pub fn run(config: &VmConfig, options: &RunOptions) -> Result<RunReport, VmmError> {
    Vmm::boot(config, options)?.run()
}

/// A VM with a lifecycle: built (from a config, or from a snapshot), then run until it
/// ends — paused, resumed and snapshotted meanwhile through its [`Machine`] (the control
/// socket does that) — and finished into its run report.
pub struct Vmm {
    machine: Arc<Machine>,
    history: Arc<SnapshotHistory>,
    options: RunOptions,
    setup_ns: u64,
    restored_bytes: Option<u64>,
    // `uffd-socket` restores: guest RAM's external page-fault handler, watched while the
    // VM runs.
    pager: Option<ExternalPager>,
    // `uffd-missing --prefetch background`: the host ranges to bring in while it runs.
    prefetch: Option<Vec<(u64, u64)>>,
    // `--record-working-set`: the recording page source and the snapshot to write beside.
    working_set: Option<(Arc<Recorder>, std::path::PathBuf)>,
    migrations: Arc<Migrations>,
    // A post-copy migration bringing this VM's memory in while it runs.
    postcopy: Option<PostcopyRun>,
    // Host changes' setup and the KVM trace: dropped after the machine (restores the host).
    host: HostSide,
}

impl Vmm {
    /// Builds the VM of `config` and loads its kernel; the vCPUs wait for [`Vmm::run`].
    pub fn boot(config: &VmConfig, options: &RunOptions) -> Result<Self, VmmError> {
        config.validate()?;
        let (machine, host) = build_machine(config, options, Start::Boot)?;
        Ok(Vmm::assemble(machine, options, None, host))
    }

    /// Waits on `uri` for a VM migrated by another faultline (`faultline ctl migrate`),
    /// builds it from the configuration the source sends, receives its memory and state,
    /// and acknowledges; the vCPUs go on when [`Vmm::run`] lets them. A broken or refused
    /// stream is an error and nothing runs (the source is told and runs on).
    pub fn incoming(uri: &str, console: Option<bool>, options: &RunOptions) -> Result<Self, VmmError> {
        let mut incoming = Incoming::accept(uri)?;
        let zone_fds = incoming.take_zone_fds();
        let mut config = incoming.config().clone();
        if let Some(console) = console {
            config.console = console;
        }
        let postcopy = incoming.is_postcopy().then(RemoteSource::new);
        let mut options = options.clone();
        if let Some((source, _)) = &postcopy {
            // Post-copy: the VM runs before its memory came; every page it touches first
            // is a MISSING fault served from the source.
            for zone in &mut config.zones {
                zone.paging = PagingMode::UffdMissing;
            }
            options.page_source = Some(source.clone());
        }
        let built = config
            .validate()
            .map_err(VmmError::from)
            .and_then(|()| build_machine_on(&config, &options, Start::Restore, zone_fds));
        let (machine, host) = match built {
            Ok(built) => built,
            Err(e) => return Err(incoming.refuse(MigrationError::Unsupported(e.to_string())).into()),
        };
        if let Some((source, requests)) = postcopy {
            return Vmm::incoming_postcopy(incoming, machine, host, &options, source, requests);
        }
        let restored = incoming.receive(&machine).and_then(|state| Ok(machine.restore_state(state)?));
        if let Err(e) = restored {
            return Err(incoming.refuse(e).into());
        }
        let metrics = incoming.acknowledge()?;
        let loaded = metrics.normal_bytes;
        let vmm = Vmm::assemble(machine, &options, Some(loaded), host);
        vmm.migrations.record_incoming(metrics);
        Ok(vmm)
    }

    /// The rest of [`Vmm::incoming`] for post-copy: the page table and the state, the
    /// page channel started before the state is restored (restoring may touch guest
    /// RAM), the handover; the pages come while the VM runs.
    fn incoming_postcopy(
        mut incoming: Incoming,
        machine: Machine,
        host: HostSide,
        options: &RunOptions,
        source: Arc<RemoteSource>,
        requests: std::sync::mpsc::Receiver<crate::smmu::page_source::PageRequest>,
    ) -> Result<Self, VmmError> {
        let Some(installer) = machine.paging.installer() else {
            let e = MigrationError::Unsupported("post-copy needs the fault engine, which did not start".into());
            return Err(incoming.refuse(e).into());
        };
        let channel = incoming
            .receive_postcopy(&machine, &source, &installer)
            .and_then(|state| Ok((state, incoming.start_postcopy(&machine, &source, requests, installer)?)));
        let (state, channel) = match channel {
            Ok(received) => received,
            Err(e) => return Err(incoming.refuse(e).into()),
        };
        if let Err(e) = machine.restore_state(state) {
            return Err(incoming.refuse(e.into()).into());
        }
        let mut vmm = Vmm::assemble(machine, options, Some(0), host);
        let migrations = vmm.migrations.clone();
        let run = channel.hand_over(incoming, Box::new(move |metrics| migrations.record_incoming(metrics)))?;
        vmm.postcopy = Some(run);
        Ok(vmm)
    }

    fn assemble(machine: Machine, options: &RunOptions, restored_bytes: Option<u64>, host: HostSide) -> Self {
        Vmm {
            migrations: Arc::new(Migrations::default()),
            host,
            machine: Arc::new(machine),
            history: Arc::new(SnapshotHistory::default()),
            options: options.clone(),
            setup_ns: options.started.elapsed().as_nanos() as u64,
            restored_bytes,
            pager: None,
            prefetch: None,
            working_set: None,
            postcopy: None,
        }
    }

    /// The running parts: pause, resume, save state.
    pub fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }

    /// Lets the vCPUs run, serves the control socket and the chaos driver until the VM
    /// ends (or the run's time limit passes), then tears the VM down and reports.
    pub fn run(self) -> Result<RunReport, VmmError> {
        let Vmm {
            machine,
            history,
            options,
            setup_ns,
            restored_bytes,
            pager,
            prefetch,
            working_set,
            migrations,
            mut postcopy,
            host: mut host_side,
        } = self;
        if let Some((recorder, _)) = &working_set {
            recorder.start();
        }
        let pager = pager.map(|pager| pager.watch(machine.control.clone()));
        // Before the vCPUs go, so pages stream in before and while they start.
        let prefetch = prefetch.map(Prefetcher::start);
        let config = machine.config.clone();
        let watch = machine
            .devices
            .balloon
            .as_ref()
            .map(|handle| BalloonWatch::attach(handle, machine.paging.regions().clone()));
        if let Some(watch) = watch.clone() {
            let hook = Box::new(move || watch.guest_followed_change());
            machine.collector.lock().unwrap_or_else(|e| e.into_inner()).on_balloon_line(hook);
        }
        let api = match &options.api_socket {
            Some(path) => {
                let target = Arc::new(VmTarget::new(machine.clone(), history.clone(), migrations.clone()));
                let server: LoopSubscriber = Arc::new(Mutex::new(ControlServer::bind(path, target)?));
                vec![server]
            }
            None => Vec::new(),
        };
        let signals = match options.stop_on_signals {
            true => Some(StopSignals::watch(machine.control.clone()).map_err(|e| VmmError::Signals(e.to_string()))?),
            false => None,
        };
        let deadline = options.timeout.map(|t| std::time::Instant::now() + t);
        let (waited, chaos, host, noise, migration) = std::thread::scope(|scope| {
            let (host, noise) = host_side.spawn(scope, &machine);
            let chaos = config.chaos.as_ref().map(|chaos_config| {
                let segments = chaos::workload_segments(&machine.ram.ram_ranges(), config.workload.size_bytes);
                let machine = &*machine;
                scope.spawn(move || {
                    let paging = &machine.paging;
                    let stop = &*machine.devices.step_stop;
                    chaos::run(chaos_config, paging.discarder(), paging.regions(), &segments, &machine.control, stop)
                })
            });
            let waited: Result<(), VmmError> = match machine.resume() {
                Ok(()) => runner::wait_for_end(&machine.control, deadline, api).map_err(VmmError::from),
                Err(e) => Err(VmmError::Start(e)),
            };
            if let Err(e) = &waited {
                machine.control.end(VmExit::Stopped { reason: e.to_string() });
            }
            machine.control.end(VmExit::Stopped { reason: "the vCPUs returned".into() });
            machine.stop_vcpus();
            // A post-copy still bringing pages in stops (the source keeps the VM).
            if let Some(postcopy) = postcopy.take() {
                postcopy.finish();
            }
            // A migration still running is cancelled (the VM ended); its thread holds the machine.
            let migration = migrations.finish();
            let chaos = chaos.map(|h| h.join().unwrap_or_else(|_| chaos_panicked()));
            let host = host.map(|h| h.join().unwrap_or_else(|_| host_changes::panicked()));
            let noise = noise.and_then(|h| h.join().ok());
            (waited, chaos, host, noise, migration)
        });
        drop(signals);
        // The vCPUs are gone: the prefetch stops (before the engine and guest RAM go), and
        // the handler may go (it sees the connection close).
        if let Some(prefetch) = prefetch {
            let bytes = prefetch.finish();
            tracing::info!("prefetch: {} KiB brought in by the end of the run", bytes >> 10);
        }
        if let Some(watchdog) = pager {
            watchdog.finish();
        }
        if let Some((recorder, dir)) = &working_set {
            match recorder.save(dir, machine.ram.regions()) {
                Ok(pages) => {
                    tracing::info!("working set: {pages} pages written to {}", dir.join(WORKING_SET_FILE).display())
                }
                Err(e) => tracing::warn!("working set not written: {e}"),
            }
        }
        waited?;
        let exit = machine.control.exit().unwrap_or(VmExit::Stopped { reason: "ended without a reason".into() });
        let exit = machine.ram.explain_failure(exit);
        let total_ns = options.started.elapsed().as_nanos() as u64;
        let host_memory = HostMemory::of_self();
        let balloon_report = watch.zip(machine.devices.balloon.as_ref()).map(|(watch, handle)| watch.report(handle));
        let pauses = machine.pause_stats();
        let first_run = machine.control.first_run();
        let kvm_trace = host_side.finish_trace(host.as_ref(), machine.paging.regions());
        // The control server (and its hold on the machine) went with the event loop.
        let machine = Arc::try_unwrap(machine).map_err(|_| VmmError::StillShared("the machine"))?;
        let parts = machine.dismantle();
        let paging = Arc::try_unwrap(parts.paging).map_err(|_| VmmError::StillShared("demand paging"))?;
        let faults = paging.finish()?;
        let memory_bytes = parts.ram.size_bytes();
        drop(parts.ram);
        let guest = std::mem::take(&mut parts.collector.lock().unwrap_or_else(|e| e.into_inner()).report);
        let boot = boot::timeline::BootTimeline::new(options.started, setup_ns, first_run, guest.ready_after_ns);
        Ok(RunReport {
            exit,
            guest,
            vcpus: config.vcpus,
            memory_bytes,
            backends: config.zones.iter().map(|z| z.backend.name().to_string()).collect(),
            setup_ns,
            total_ns,
            boot,
            host_memory,
            faults: Some(faults),
            chaos,
            balloon: balloon_report,
            pauses: (pauses.pauses > 0).then_some(pauses),
            restored_bytes,
            host_changes: host,
            kvm_trace,
            host_noise: noise,
            migration,
        })
    }
}

/// How a machine starts: by booting its kernel, or from a snapshot (memory and state
/// come afterwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Boot,
    Restore,
}

/// Builds every part of the VM of a validated `config`; vCPU threads wait paused.
fn build_machine(config: &VmConfig, options: &RunOptions, start: Start) -> Result<(Machine, HostSide), VmmError> {
    build_machine_on(config, options, start, None)
}

/// As [`build_machine`]; `zone_fds`: an `fd-local:` migration's handed-over zones,
/// mapped instead of fresh memory.
fn build_machine_on(
    config: &VmConfig,
    options: &RunOptions,
    start: Start,
    zone_fds: Option<Vec<std::os::fd::OwnedFd>>,
) -> Result<(Machine, HostSide), VmmError> {
    let kvm = Kvm::open()?;
    if config.vcpus as usize > kvm.max_vcpus() {
        return Err(VmmError::TooManyVcpus { vcpus: config.vcpus, max: kvm.max_vcpus() });
    }
    // Host changes set the host up before guest RAM exists (a memory cgroup must hold it).
    let mut host = HostSide::start(config)?;
    let ram = Arc::new(match zone_fds {
        Some(fds) => GuestRam::adopting(&config.zones, fds)?,
        None => GuestRam::new(&config.zones)?,
    });
    let control = Arc::new(VmControl::new()?);
    // Paging starts before anything touches guest RAM, so the state table sees the
    // kernel loader's (or the restore's) writes too.
    let paging = Arc::new(start_paging(config, options, &ram, &control, &host)?);
    host.start_trace(&ram, &paging);
    let mut vm = Vm::create(&kvm, &ram)?;
    // The ring is the VM's before any vCPU exists.
    if let Some(entries) = config.dirty_ring {
        vm.enable_dirty_ring(entries)?;
    }
    // The PIT and the memslots mostly wait in the kernel (see `Vm::create`): they are
    // made on a thread of their own while the vCPUs, the kernel and the devices are set up.
    let (memory, built) = std::thread::scope(|scope| {
        let slow = scope.spawn(|| vm.create_pit().and_then(|()| vm.register_memory(&ram)));
        let built = build_vcpus_and_devices(config, options, start, &kvm, &vm, &ram, &paging);
        (slow.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)), built)
    });
    vm.adopt_memory(memory?);
    let VcpusAndDevices {
        vcpus,
        collector,
        step_stop,
        balloon,
        balloon_transport,
        notifier,
        pio,
        mmio,
        serial,
        step_control,
    } = built?;
    let buses = Arc::new(DeviceBuses::new(pio, mmio));
    let fleet =
        VcpuFleet::spawn(vcpus, buses.clone(), ram.memory().clone(), control.clone()).map_err(RunError::from)?;
    let machine = Machine::new(MachineParts {
        config: config.clone(),
        started: options.started,
        ram,
        vm,
        fleet,
        devices: MachineDevices { serial, step_control, step_stop, balloon, balloon_transport, notifier },
        buses,
        collector,
        paging,
        control,
    });
    Ok((machine, host))
}

/// The vCPUs (boot vCPU at its entry point when booting) and the devices of a machine
/// being built.
struct VcpusAndDevices {
    vcpus: Vec<Vcpu>,
    collector: Arc<Mutex<GuestReportCollector>>,
    step_stop: Arc<AtomicBool>,
    balloon: Option<Arc<BalloonHandle>>,
    balloon_transport: Option<Arc<Mutex<MmioTransport>>>,
    notifier: Option<QueueNotifier>,
    pio: PioBus,
    mmio: MmioBus,
    serial: Arc<Mutex<SerialDevice>>,
    step_control: Arc<Mutex<StepControl>>,
}

/// Creates the vCPUs, loads the kernel when booting, and builds the devices: the part of
/// [`build_machine`] that needs neither the PIT nor the memslots.
fn build_vcpus_and_devices(
    config: &VmConfig,
    options: &RunOptions,
    start: Start,
    kvm: &Kvm,
    vm: &Vm,
    ram: &GuestRam,
    paging: &GuestPaging,
) -> Result<VcpusAndDevices, VmmError> {
    let supported_cpuid = kvm.supported_cpuid()?;
    let vcpus =
        (0..config.vcpus).map(|id| Vcpu::new(vm, &supported_cpuid, id, config.vcpus)).collect::<Result<Vec<_>, _>>()?;
    if start == Start::Boot {
        let kernel = boot::load_kernel(&config.kernel, ram)?;
        tracing::debug!("loaded {}: {:?}, ends at {:#x}", kernel.name, kernel.entry, kernel.end_gpa);
        let tsc_khz = vcpus[0].tsc_khz().ok();
        let cmdline = config.guest_cmdline(tsc_khz);
        boot::write_cmdline(ram.memory(), &cmdline)?;
        let entry = boot::configure(&kernel, ram, &cmdline)?;
        vcpus[0].set_entry(&entry)?;
    }
    let collector = Arc::new(Mutex::new(GuestReportCollector::new(options.started)));
    let step_stop = Arc::new(AtomicBool::new(false));
    let mut mmio = MmioBus::new();
    let (balloon, balloon_transport, notifier) = attach_balloon(config, ram, vm, paging, &mut mmio)?;
    let (pio, serial, step_control) = build_bus(vm, ram, config.console, collector.clone(), step_stop.clone())?;
    Ok(VcpusAndDevices {
        vcpus,
        collector,
        step_stop,
        balloon,
        balloon_transport,
        notifier,
        pio,
        mmio,
        serial,
        step_control,
    })
}

/// Puts a virtio-balloon on the MMIO bus (window 0) when the config asks for one; its
/// discards go through the smmu; its queue notifications go through ioeventfds to its own
/// thread (returned: drop it before guest RAM) when the host has a CPU to spare for it.
fn attach_balloon(
    config: &VmConfig,
    ram: &GuestRam,
    vm: &Vm,
    paging: &GuestPaging,
    mmio: &mut MmioBus,
) -> Result<AttachedBalloon, VmmError> {
    let Some(options) = &config.balloon else {
        return Ok((None, None, None));
    };
    let device_config = BalloonConfig {
        schedule: options.schedule_pages(),
        stats: !options.no_stats,
        reporting: !options.no_free_page_reporting,
        deflate_on_oom: !options.no_deflate_on_oom,
        ..BalloonConfig::default()
    };
    let slot = MmioSlot::nth(0);
    let discarder = paging.discarder().clone();
    let mut ioeventfd = |event: &vmm_sys_util::eventfd::EventFd, addr: u64, queue: u32| {
        let addr = kvm_ioctls::IoEventAddress::Mmio(addr);
        vm.fd().register_ioevent(event, &addr, queue).map_err(|e| e.to_string())
    };
    let io = spare_cpu(config.vcpus).then_some(&mut ioeventfd as _);
    let regions = paging.regions().clone();
    let installed = install_balloon(mmio, slot, ram.memory(), discarder, regions, device_config, io)?;
    vm.register_irqfd(installed.interrupt.event(), slot.irq)?;
    Ok((Some(installed.handle), Some(installed.transport), installed.notifier))
}

/// What [`attach_balloon`] gives the machine: the handle, the transport (for its saved
/// state) and the notifier thread, each None without a balloon.
type AttachedBalloon = (Option<Arc<BalloonHandle>>, Option<Arc<Mutex<MmioTransport>>>, Option<QueueNotifier>);

/// Starts demand paging for every zone; a dying fault engine ends the VM.
fn start_paging(
    config: &VmConfig,
    options: &RunOptions,
    ram: &GuestRam,
    control: &Arc<VmControl>,
    host: &HostSide,
) -> Result<GuestPaging, VmmError> {
    let control = control.clone();
    let on_failure: EngineFailureHook = Arc::new(move |reason| control.end(VmExit::FaultEngineFailed { reason }));
    let source = host.page_source(options.page_source.clone().unwrap_or_else(|| Arc::new(ZeroSource)));
    let write_protect = config.chaos.is_some();
    Ok(GuestPaging::start(ram, &config.zones, &config.fault_engine, write_protect, source, on_failure)?)
}

fn chaos_panicked() -> ChaosReport {
    ChaosReport { errors: 1, first_errors: vec!["the chaos driver panicked".into()], ..ChaosReport::default() }
}

/// The port devices of [`build_bus`]: the bus, and the stateful devices on it.
type PortDevices = (PioBus, Arc<Mutex<SerialDevice>>, Arc<Mutex<StepControl>>);

/// The port-I/O devices: COM1 (IRQ 4 via irqfd), the built-in guest's paravirtual
/// console (same sink as COM1), the debug-exit and step-control ports.
fn build_bus(
    vm: &Vm,
    ram: &GuestRam,
    echo: bool,
    collector: Arc<Mutex<GuestReportCollector>>,
    step_stop: Arc<AtomicBool>,
) -> Result<PortDevices, VmmError> {
    let interrupt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|source| VmmError::EventFd { what: "the serial interrupt", source })?;
    vm.register_irqfd(&interrupt, COM1_IRQ)?;
    let sink = ConsoleSink::new(echo, collector);
    let pv_console = Arc::new(Mutex::new(PvConsole::new(ram.memory().clone(), sink.clone())));
    let serial = Arc::new(Mutex::new(SerialDevice::new(interrupt, sink)));
    let step_control = Arc::new(Mutex::new(StepControl::new(step_stop)));
    let mut bus = PioBus::new();
    bus.insert(abi::SERIAL_PORT, SERIAL_PORTS, serial.clone())?;
    bus.insert(abi::PV_CONSOLE_PORT, abi::PV_CONSOLE_PORTS, pv_console)?;
    bus.insert(abi::DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS, Arc::new(Mutex::new(DebugExit)))?;
    bus.insert(abi::STEP_CONTROL_PORT, STEP_CONTROL_PORTS, step_control.clone())?;
    Ok((bus, serial, step_control))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::test_elf;
    use crate::config::{Backend, KernelImage, ZoneConfig};

    /// A PVH kernel that prints `line` on COM1 and exits with `status`.
    fn printing_kernel(line: &[u8], status: u8) -> Vec<u8> {
        let data_gpa = test_elf::TEST_KERNEL_GPA + 0x100;
        // mov esi, data; mov dx, 0x3f8; loop: lodsb; test al, al; jz done; out dx, al; jmp loop
        let mut code = vec![0xbe];
        code.extend_from_slice(&(data_gpa as u32).to_le_bytes());
        code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]);
        code.extend_from_slice(&[0xb0, status, 0xe6, 0xf4, 0xf4]);
        code.resize(0x100, 0x90);
        code.extend_from_slice(line);
        code.push(0);
        test_elf::elf(&code, true)
    }

    fn config_for(kernel: &std::path::Path, zones: Vec<ZoneConfig>, vcpus: u32) -> VmConfig {
        VmConfig { vcpus, zones, kernel: KernelImage::Path(kernel.to_path_buf()), ..VmConfig::default() }
    }

    fn options() -> RunOptions {
        RunOptions::new(std::time::Instant::now(), Some(std::time::Duration::from_secs(30)))
    }

    #[test]
    fn pvh_kernel_runs_to_a_successful_report_on_every_shared_backend() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("kernel.elf");
        std::fs::write(&kernel, printing_kernel(b"FL done {\"status\":0,\"name\":\"success\"}\n", 0)).unwrap();
        let file_zone = ZoneConfig { path: Some(dir.path().join("ram")), ..ZoneConfig::new(8 << 20, Backend::File) };
        let zones = vec![ZoneConfig::new(16 << 20, Backend::Anon), ZoneConfig::new(8 << 20, Backend::Memfd), file_zone];
        let report = run(&config_for(&kernel, zones, 2), &options()).unwrap();
        assert!(report.success(), "{}", report.summary());
        assert_eq!(report.memory_bytes, 32 << 20);
        assert_eq!(report.backends, vec!["anon", "memfd", "file"]);
        assert!(report.setup_ns > 0 && report.total_ns >= report.setup_ns);
    }

    /// Adds `pages` 2 MiB huge pages to the host pool for the guard's life (root only).
    struct HugepageReservation(u64);

    impl HugepageReservation {
        fn add(pages: u64) -> Option<Self> {
            let path = "/proc/sys/vm/nr_hugepages";
            let now: u64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
            std::fs::write(path, (now + pages).to_string()).ok()?;
            let free = crate::memory::limits::HugepagePool::read(2 << 20).ok()?;
            (free.free >= pages).then_some(HugepageReservation(pages))
        }
    }

    impl Drop for HugepageReservation {
        fn drop(&mut self) {
            let path = "/proc/sys/vm/nr_hugepages";
            if let Some(now) = std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse::<u64>().ok()) {
                let _ = std::fs::write(path, now.saturating_sub(self.0).to_string());
            }
        }
    }

    #[test]
    fn pvh_kernel_runs_on_hugetlb_memory() {
        let Some(_pages) = HugepageReservation::add(8) else {
            eprintln!("skipped: cannot reserve huge pages (needs root)");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("kernel.elf");
        std::fs::write(&kernel, printing_kernel(b"FL done {\"status\":0,\"name\":\"success\"}\n", 0)).unwrap();
        let zones = vec![ZoneConfig::new(16 << 20, Backend::Hugetlb)];
        let report = run(&config_for(&kernel, zones, 1), &options()).unwrap();
        assert!(report.success(), "{}", report.summary());
    }

    #[test]
    fn builtin_guest_boots_and_verifies_its_memory() {
        let config =
            VmConfig { vcpus: 1, zones: vec![ZoneConfig::new(64 << 20, Backend::Anon)], ..VmConfig::default() };
        let report = run(&config, &options()).unwrap();
        assert!(report.success(), "{}", report.summary());
        assert_eq!(report.guest.ready.as_ref().map(|r| r.ram_bytes), Some(64 << 20));
    }

    #[test]
    fn guest_failure_status_is_reported_not_success() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("kernel.elf");
        std::fs::write(&kernel, printing_kernel(b"FL error {\"msg\":\"bad\"}\n", 2)).unwrap();
        let report = run(&config_for(&kernel, vec![ZoneConfig::new(16 << 20, Backend::Anon)], 1), &options()).unwrap();
        assert_eq!(report.exit, VmExit::DebugExit { status: 2 });
        assert_eq!(report.guest.errors, vec!["bad".to_string()]);
        assert!(!report.success());
    }

    #[test]
    fn elf_without_pvh_note_boots_by_the_linux_64_bit_protocol() {
        // In long mode with rsi = boot_params: mov al, [rsi + e820_entries]; out 0xf4, al
        let code = [0x8a, 0x86, 0xe8, 0x01, 0x00, 0x00, 0xe6, 0xf4, 0xf4];
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, test_elf::elf(&code, false)).unwrap();
        let report = run(&config_for(&kernel, vec![ZoneConfig::new(16 << 20, Backend::Anon)], 1), &options()).unwrap();
        // Low RAM, the reserved legacy area, RAM above 1 MiB.
        assert_eq!(report.exit, VmExit::DebugExit { status: 3 });
    }

    #[test]
    fn bad_kernels_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not a kernel").unwrap();
        let zones = vec![ZoneConfig::new(16 << 20, Backend::Anon)];
        let err = run(&config_for(&text, zones.clone(), 1), &options()).unwrap_err().to_string();
        assert!(err.starts_with("not an ELF or bzImage kernel: "), "{err}");
        let missing = dir.path().join("missing");
        let err = run(&config_for(&missing, zones, 1), &options()).unwrap_err().to_string();
        assert!(err.starts_with("file not found: "), "{err}");
    }
}
