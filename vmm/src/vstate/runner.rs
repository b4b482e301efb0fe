//! The main thread's side of a running VM: an event-manager loop on the VM's exit eventfd
//! (and the run's time limit) serving the control socket, and [`run_vcpus`], which runs a
//! set of vCPUs from start to end for callers that need no pause or snapshot.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::control::VmControl;
use super::vcpu::Vcpu;
use super::vcpu_thread::{VcpuFleet, VcpuThreadError};
use crate::devices::DeviceBuses;
use crate::exit::VmExit;

/// Errors running the vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The vCPU threads could not be started or steered.
    #[error(transparent)]
    Vcpu(#[from] VcpuThreadError),
    /// The event loop failed.
    #[error("the VMM event loop failed: {0}")]
    EventLoop(String),
}

/// Wakes the event loop when the VM's exit eventfd fires.
struct ExitWatcher {
    fd: std::os::fd::RawFd,
    fired: bool,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.fired = true;
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            tracing::warn!("cannot watch the VM exit eventfd: {e:?}");
        }
    }
}

/// An event source served by the VMM's main loop while the vCPUs run (e.g. the control
/// socket).
pub type LoopSubscriber = Arc<Mutex<dyn MutEventSubscriber>>;

/// Runs `vcpus` until the VM ends or `timeout` passes; returns how it ended. The main
/// thread serves `subscribers` meanwhile. All vCPU threads are joined before this returns.
pub fn run_vcpus(
    vcpus: Vec<Vcpu>,
    buses: Arc<DeviceBuses>,
    memory: &GuestMemoryMmap,
    control: &Arc<VmControl>,
    timeout: Option<Duration>,
    subscribers: Vec<LoopSubscriber>,
) -> Result<VmExit, RunError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut fleet = VcpuFleet::spawn(vcpus, buses, memory.clone(), control.clone())?;
    if let Err(e) = fleet.run() {
        control.end(VmExit::Stopped { reason: e.to_string() });
        return Err(e.into());
    }
    let waited = wait_for_end(control, deadline, subscribers);
    if let Err(e) = &waited {
        control.end(VmExit::Stopped { reason: e.to_string() });
    }
    fleet.exit();
    waited?;
    Ok(control.exit().unwrap_or(VmExit::Stopped { reason: "ended without a reason".into() }))
}

/// Serves `subscribers` and waits on the exit eventfd until the VM ends or the deadline
/// passes (then ends it).
pub fn wait_for_end(
    control: &VmControl,
    deadline: Option<Instant>,
    subscribers: Vec<LoopSubscriber>,
) -> Result<(), RunError> {
    use std::os::fd::AsRawFd;
    let loop_err = |e: event_manager::Error| RunError::EventLoop(format!("{e:?}"));
    let watcher = Arc::new(Mutex::new(ExitWatcher { fd: control.exit_event().as_raw_fd(), fired: false }));
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber>>> = EventManager::new().map_err(loop_err)?;
    manager.add_subscriber(watcher.clone());
    for subscriber in subscribers {
        manager.add_subscriber(subscriber);
    }
    while control.exit().is_none() {
        let wait_ms = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    control.end(VmExit::Stopped { reason: "timeout: the run's time limit (--timeout) passed".into() });
                    break;
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
        };
        manager.run_with_timeout(wait_ms).map_err(loop_err)?;
    }
    let _ = control.exit_event().read();
    Ok(())
}
