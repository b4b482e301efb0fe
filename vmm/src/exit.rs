//! How a VM ended: [`VmExit`], set once by whoever ends the VM (a vCPU, a device, the
//! fault engine, the main loop) and read by everyone above. A leaf module: devices and the
//! KVM layer name exits without depending on the report layer.

use faultline_abi as abi;
use serde::Serialize;

/// How the VM ended.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum VmExit {
    /// The guest wrote its status to the debug-exit port.
    DebugExit {
        /// The status byte.
        status: u8,
    },
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU that shut down.
        vcpu: u32,
        /// Its rip.
        rip: u64,
    },
    /// KVM could not run the guest (KVM_EXIT_INTERNAL_ERROR, e.g. emulation failure).
    InternalError {
        /// The vCPU.
        vcpu: u32,
        /// KVM's suberror code.
        suberror: u32,
        /// Its rip.
        rip: u64,
        /// The instruction bytes at rip, hex, as far as they could be read.
        instruction_bytes: String,
    },
    /// KVM failed to enter the guest (KVM_EXIT_FAIL_ENTRY) or another fatal exit.
    Fatal {
        /// The vCPU.
        vcpu: u32,
        /// What happened.
        reason: String,
    },
    /// The userfaultfd fault engine died: the guest's faults could no longer be resolved.
    FaultEngineFailed {
        /// The engine's error.
        reason: String,
    },
    /// The run was stopped from outside (control socket, timeout, a snapshot's --stop).
    Stopped {
        /// Why.
        reason: String,
    },
    /// The VM was live-migrated away: it runs on at the destination now.
    Migrated {
        /// Where it went (`unix:PATH`, `tcp:HOST:PORT`).
        to: String,
        /// How long its vCPUs were paused here until the destination had it, µs.
        downtime_us: u64,
    },
    /// A signal (SIGINT, SIGTERM, SIGHUP) ended the run.
    Interrupted {
        /// The signal's name.
        signal: String,
    },
}

impl VmExit {
    /// True for a debug exit with status success.
    pub fn is_success(&self) -> bool {
        matches!(self, VmExit::DebugExit { status } if *status == abi::ExitStatus::Success as u8)
    }

    /// A one-line description for people.
    pub fn describe(&self) -> String {
        match self {
            VmExit::DebugExit { status } => {
                let name = abi::ExitStatus::from_byte(*status).map_or("unknown", |s| s.name());
                format!("guest exited with status {status} ({name})")
            }
            VmExit::TripleFault { vcpu, rip } => format!("vCPU {vcpu} triple-faulted (shutdown) at rip {rip:#x}"),
            VmExit::InternalError { vcpu, suberror, rip, instruction_bytes } => format!(
                "vCPU {vcpu}: KVM internal error (suberror {suberror}{}) at rip {rip:#x}, instruction bytes [{instruction_bytes}]",
                if *suberror == 1 { ": emulation failure" } else { "" }
            ),
            VmExit::Fatal { vcpu, reason } => format!("vCPU {vcpu}: {reason}"),
            VmExit::FaultEngineFailed { reason } => format!("the fault engine failed, VM stopped: {reason}"),
            VmExit::Stopped { reason } => format!("stopped: {reason}"),
            VmExit::Interrupted { signal } => format!("interrupted by {signal}"),
            VmExit::Migrated { to, downtime_us } => {
                format!("migrated to {to} (paused {:.1} ms until the destination had it)", *downtime_us as f64 / 1e3)
            }
        }
    }
}
