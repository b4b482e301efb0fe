//! The lifecycle layer: a built VM ([`Machine`]) whose vCPUs can be run, paused and
//! resumed, and whose state — every part, through [`Persist`] — can be saved and restored
//! while it is paused.
//!
//! `vmm` builds a machine from a configuration and runs it to its end; the control socket
//! (`vm_target`) and the snapshot layer (`snapshot`) steer it while it runs. The machine
//! is shared (`Arc`) between them; its parts are locked one at a time, in the order
//! fleet, then devices.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::serial::{SerialDevice, SerialDeviceState, SerialError};
use crate::devices::step_control::{StepControl, StepControlState};
use crate::devices::virtio::balloon::{BalloonHandle, BalloonState, BalloonStateError};
use crate::devices::virtio::mmio::{MmioTransportState, TransportStateError};
use crate::devices::virtio::notify::QueueNotifier;
use crate::devices::virtio::MmioTransport;
use crate::devices::DeviceBuses;
use crate::guest_report::{CollectorState, GuestReportCollector};
use crate::memory::GuestRam;
use crate::paging::{GuestPaging, PagingError};
use crate::persist::Persist;
use crate::smmu::page_state::PageStateTableState;
use crate::vstate::{VcpuFleet, VcpuState, VcpuThreadError, Vm, VmControl, VmError, VmState};

/// Errors pausing, resuming, saving or restoring a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A vCPU thread failed the command.
    #[error(transparent)]
    Vcpu(#[from] VcpuThreadError),
    /// The VM's irqchip or clocks could not be read or written.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The serial device's state could not be restored.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// The balloon's state could not be restored.
    #[error(transparent)]
    Balloon(#[from] BalloonStateError),
    /// The balloon's virtio-mmio transport could not be restored.
    #[error(transparent)]
    Transport(#[from] TransportStateError),
    /// The page-state table could not be applied.
    #[error(transparent)]
    PageState(#[from] PagingError),
    /// The VM has ended.
    #[error("the VM has ended ({0}); there is nothing to pause, resume or save")]
    Ended(String),
    /// The VM must be paused for this.
    #[error("the VM is running; pause it first (faultline ctl pause)")]
    NotPaused,
    /// Something in the VM cannot be saved yet.
    #[error("this VM cannot be saved: {0}")]
    Unsupported(String),
    /// A saved state does not fit this machine.
    #[error("the saved state does not fit this VM: {0}")]
    Mismatch(String),
}

/// The stateful devices of a machine (the buses hold them too).
pub struct MachineDevices {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The step-control port.
    pub step_control: Arc<Mutex<StepControl>>,
    /// The flag step-control answers from (the chaos driver sets it).
    pub step_stop: Arc<AtomicBool>,
    /// The balloon, if the VM has one.
    pub balloon: Option<Arc<BalloonHandle>>,
    /// The balloon's virtio-mmio transport (on the MMIO bus too), if the VM has one.
    pub balloon_transport: Option<Arc<Mutex<MmioTransport>>>,
    /// The thread serving the balloon's queue notifications from ioeventfds, if any
    /// (stops with the devices, after the vCPUs and before guest RAM).
    pub notifier: Option<QueueNotifier>,
}

/// Whether the vCPUs run, and pause figures so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// Built, vCPUs not started yet.
    Created,
    /// The vCPUs run.
    Running,
    /// Every vCPU is out of KVM_RUN.
    Paused,
}

/// Pause statistics.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct PauseStats {
    /// Pauses done.
    pub pauses: u64,
    /// The last pause's latency (command posted to every vCPU out of KVM_RUN), ns.
    pub last_pause_ns: u64,
    /// The longest pause latency, ns.
    pub max_pause_ns: u64,
}

/// A built VM: guest RAM, the KVM VM, devices, demand paging and the vCPU threads.
///
/// Field order is drop order: vCPU threads first, guest RAM last.
pub struct Machine {
    fleet: Mutex<VcpuFleet>,
    lifecycle: Mutex<(RunState, PauseStats)>,
    // Host ranges of guest RAM whose contents a lazy restore has not brought in yet (see
    // `Machine::set_lazily_restored`).
    lazy_memory: Mutex<Vec<(u64, u64)>>,
    /// The devices with state.
    pub devices: MachineDevices,
    /// Both buses (what vCPU exits reach).
    pub buses: Arc<DeviceBuses>,
    /// The guest's report lines.
    pub collector: Arc<Mutex<GuestReportCollector>>,
    vm: Mutex<Vm>,
    /// Demand paging and the invalidation layer.
    pub paging: Arc<GuestPaging>,
    /// How and whether the VM ended.
    pub control: Arc<VmControl>,
    /// The configuration the machine was built from.
    pub config: VmConfig,
    /// When the VMM process started.
    pub started: Instant,
    /// Guest RAM (dropped last: everything above points into it).
    pub ram: Arc<GuestRam>,
}

/// What is left of a machine after [`Machine::dismantle`].
pub struct Dismantled {
    /// Demand paging (finish it for the fault report).
    pub paging: Arc<GuestPaging>,
    /// The guest's report.
    pub collector: Arc<Mutex<GuestReportCollector>>,
    /// Guest RAM (drop it last).
    pub ram: Arc<GuestRam>,
}

/// Everything of a machine's state except guest RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// Every vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// Irqchip, PIT, clock.
    pub vm: VmState,
    /// COM1.
    pub serial: SerialDeviceState,
    /// The step-control port.
    pub step_control: StepControlState,
    /// The guest's report lines so far.
    pub collector: CollectorState,
    /// The virtio-balloon and its transport (None: the VM has no balloon).
    #[serde(default)]
    pub balloon: Option<SavedBalloon>,
    /// The smmu's page-state table: which pages were discarded (None in states written
    /// before it was saved).
    #[serde(default)]
    pub page_state: Option<PageStateTableState>,
}

/// A balloon's saved state: the device, then its transport (restored in that order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedBalloon {
    /// Target, actual, schedule, pages held, statistics, counters.
    pub device: BalloonState,
    /// Registers, queues and ring indices, interrupt status, config generation.
    pub transport: MmioTransportState,
}

/// The devices held still while a snapshot is taken: with the vCPUs paused, a device
/// thread (the balloon's queue notifier) could still be serving a kick; holding the
/// transport's lock makes it wait until the snapshot is written.
pub struct Quiesced<'a> {
    balloon: Option<MutexGuard<'a, MmioTransport>>,
}

/// The parts a [`Machine`] is assembled from.
pub struct MachineParts {
    /// The configuration.
    pub config: VmConfig,
    /// When the process started.
    pub started: Instant,
    /// Guest RAM.
    pub ram: Arc<GuestRam>,
    /// The KVM VM.
    pub vm: Vm,
    /// The paused vCPU threads.
    pub fleet: VcpuFleet,
    /// Devices with state.
    pub devices: MachineDevices,
    /// The buses.
    pub buses: Arc<DeviceBuses>,
    /// Guest report lines.
    pub collector: Arc<Mutex<GuestReportCollector>>,
    /// Demand paging.
    pub paging: Arc<GuestPaging>,
    /// VM control.
    pub control: Arc<VmControl>,
}

impl Machine {
    /// Assembles a machine (vCPUs not running yet).
    pub fn new(parts: MachineParts) -> Self {
        Machine {
            fleet: Mutex::new(parts.fleet),
            lifecycle: Mutex::new((RunState::Created, PauseStats::default())),
            lazy_memory: Mutex::new(Vec::new()),
            devices: parts.devices,
            buses: parts.buses,
            collector: parts.collector,
            vm: Mutex::new(parts.vm),
            paging: parts.paging,
            control: parts.control,
            config: parts.config,
            started: parts.started,
            ram: parts.ram,
        }
    }

    /// Says that guest RAM was restored lazily (`map`, `uffd-missing`, `uffd-socket`):
    /// the pages in `host_ranges` hold the restored contents but may not exist in the
    /// host yet, so a walk of the pages that exist (SEEK_DATA, pagemap) would miss them.
    pub fn set_lazily_restored(&self, host_ranges: Vec<(u64, u64)>) {
        *lock(&self.lazy_memory) = host_ranges;
    }

    /// Brings in every page a lazy restore has not yet (by `MADV_POPULATE_READ`, which
    /// faults each one in through whatever serves it: the fault engine, an external
    /// handler, or the kernel for a mapped image), so that the pages that exist are all
    /// the guest's memory. A full snapshot and a migration call it before they list the
    /// pages to carry; after the first success there is nothing left to do.
    pub fn bring_in_lazy_memory(&self) -> std::io::Result<u64> {
        let mut ranges = lock(&self.lazy_memory);
        let mut bytes = 0;
        for &(start, len) in ranges.iter() {
            // SAFETY: the range lies inside guest RAM's live mapping (it came from the
            // restore's region table and `self.ram` outlives `self`); populating reads
            // pages in and changes no contents.
            unsafe { rustix::mm::madvise(start as *mut _, len as usize, rustix::mm::Advice::LinuxPopulateRead) }?;
            bytes += len;
        }
        ranges.clear();
        Ok(bytes)
    }

    /// Running, paused, or not started.
    pub fn run_state(&self) -> RunState {
        lock(&self.lifecycle).0
    }

    /// Pause figures so far.
    pub fn pause_stats(&self) -> PauseStats {
        lock(&self.lifecycle).1
    }

    /// Starts the vCPUs, or resumes them after a pause.
    pub fn resume(&self) -> Result<(), MachineError> {
        self.check_alive()?;
        let mut fleet = lock(&self.fleet);
        fleet.run()?;
        lock(&self.lifecycle).0 = RunState::Running;
        Ok(())
    }

    /// Stops every vCPU outside KVM_RUN; returns how long it took (zero if already paused).
    pub fn pause(&self) -> Result<Duration, MachineError> {
        self.check_alive()?;
        let mut fleet = lock(&self.fleet);
        let took = fleet.pause()?;
        let mut lifecycle = lock(&self.lifecycle);
        if lifecycle.0 == RunState::Running {
            let ns = took.as_nanos() as u64;
            lifecycle.1.pauses += 1;
            lifecycle.1.last_pause_ns = ns;
            lifecycle.1.max_pause_ns = lifecycle.1.max_pause_ns.max(ns);
        }
        lifecycle.0 = RunState::Paused;
        Ok(took)
    }

    /// Holds every device thread still (see [`Quiesced`]) until the guard is dropped.
    /// Take it after pausing and keep it while guest RAM is read.
    pub fn quiesce(&self) -> Quiesced<'_> {
        Quiesced { balloon: self.devices.balloon_transport.as_ref().map(|t| lock(t)) }
    }

    /// The state of every part but guest RAM. The machine must be paused (or not started).
    pub fn save_state(&self) -> Result<MachineState, MachineError> {
        let quiet = self.quiesce();
        self.save_state_quiesced(&quiet)
    }

    /// [`Machine::save_state`] with the devices already held still by `quiet`.
    pub fn save_state_quiesced(&self, quiet: &Quiesced<'_>) -> Result<MachineState, MachineError> {
        self.check_alive()?;
        if self.run_state() == RunState::Running {
            return Err(MachineError::NotPaused);
        }
        if self.config.chaos.is_some() {
            return Err(MachineError::Unsupported(
                "the chaos driver is running against it; snapshots of chaos runs are not supported".into(),
            ));
        }
        let vcpus = lock(&self.fleet).save()?;
        let vm = lock(&self.vm).save()?;
        let serial = lock(&self.devices.serial).save()?;
        let step_control = match lock(&self.devices.step_control).save() {
            Ok(state) => state,
            Err(never) => match never {},
        };
        let collector = match lock(&self.collector).save() {
            Ok(state) => state,
            Err(never) => match never {},
        };
        let balloon = match (&self.devices.balloon, &quiet.balloon) {
            (Some(handle), Some(transport)) => {
                let device = (&**handle).save()?;
                Some(SavedBalloon { device, transport: transport.save()? })
            }
            _ => None,
        };
        let page_state = Some(self.paging.save_page_state()?);
        Ok(MachineState { vcpus, vm, serial, step_control, collector, balloon, page_state })
    }

    /// Puts every part but guest RAM into `state`. The machine must not be running.
    pub fn restore_state(&self, state: MachineState) -> Result<(), MachineError> {
        self.check_alive()?;
        if self.run_state() == RunState::Running {
            return Err(MachineError::NotPaused);
        }
        if state.vcpus.len() != self.config.vcpus as usize {
            return Err(MachineError::Mismatch(format!(
                "{} vCPU states for a VM with {} vCPUs",
                state.vcpus.len(),
                self.config.vcpus
            )));
        }
        // The VM (irqchip, PIT, clock) before the vCPUs: their LAPICs and TSCs follow it.
        lock(&self.vm).restore(&state.vm)?;
        lock(&self.fleet).restore(state.vcpus)?;
        lock(&self.devices.serial).restore(&state.serial)?;
        let _ = lock(&self.devices.step_control).restore(&state.step_control);
        let _ = lock(&self.collector).restore(&state.collector);
        // Discarded pages become holes again before any device looks at guest RAM.
        if let Some(page_state) = &state.page_state {
            self.paging.restore_page_state(page_state)?;
        }
        match (&state.balloon, &self.devices.balloon, &self.devices.balloon_transport) {
            (None, None, _) => {}
            (Some(saved), Some(handle), Some(transport)) => {
                // The device first: restoring an activated transport activates it.
                let mut device = &**handle;
                device.restore(&saved.device)?;
                lock(transport).restore(&saved.transport)?;
            }
            (Some(_), _, _) => {
                return Err(MachineError::Mismatch(
                    "the snapshot has a virtio-balloon and this VM has none; restore with the configuration it was saved with".into(),
                ))
            }
            (None, Some(_), _) => {
                return Err(MachineError::Mismatch(
                    "this VM has a virtio-balloon and the snapshot has none; restore without --balloon".into(),
                ))
            }
        }
        Ok(())
    }

    /// The KVM VM (for the snapshot layer's dirty log).
    pub fn vm(&self) -> MutexGuard<'_, Vm> {
        lock(&self.vm)
    }

    /// Ends the vCPU threads and joins them (the VM has ended or is being torn down).
    pub fn stop_vcpus(&self) {
        let mut fleet = lock(&self.fleet);
        let empty = VcpuFleet::empty();
        std::mem::replace(&mut *fleet, empty).exit();
    }

    /// Takes the machine apart once the VM has ended: the vCPU threads are joined,
    /// devices and the KVM VM dropped; what the run report needs is returned (guest RAM
    /// last, so nothing above outlives it).
    pub fn dismantle(self) -> Dismantled {
        self.stop_vcpus();
        let Machine { fleet, devices, buses, collector, vm, paging, ram, .. } = self;
        drop(fleet);
        drop(devices);
        drop(buses);
        drop(vm);
        Dismantled { paging, collector, ram }
    }

    fn check_alive(&self) -> Result<(), MachineError> {
        match self.control.exit() {
            Some(exit) => Err(MachineError::Ended(exit.describe())),
            None if self.control.is_stopping() => Err(MachineError::Ended("it is stopping".into())),
            None => Ok(()),
        }
    }
}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
