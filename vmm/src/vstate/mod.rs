//! KVM state: the system handle (`kvm`), the VM and its memslots (`vm`, its saved state
//! in `vm_state`), vCPUs (`vcpu`, `cpuid`, saved state in `vcpu_state`), each vCPU on a
//! thread that answers commands (`vcpu_thread`), ending a VM from any thread (`control`),
//! and running all vCPUs to the VM's end (`runner`); dirty-page tracking by KVM's dirty
//! log (`dirty_log`) or dirty ring (`dirty_ring`).

pub mod control;
pub mod cpuid;
pub mod dirty_log;
pub mod dirty_ring;
pub mod kvm;
pub mod runner;
pub mod vcpu;
pub mod vcpu_state;
pub mod vcpu_thread;
pub mod vm;
pub mod vm_state;

pub use control::{ControlError, VmControl};
pub use kvm::{Kvm, KvmError};
pub use vcpu::{Vcpu, VcpuError};
pub use vcpu_state::VcpuState;
pub use vcpu_thread::{VcpuFleet, VcpuThreadError};
pub use vm::{Vm, VmError};
pub use vm_state::VmState;

#[cfg(test)]
mod tests;
