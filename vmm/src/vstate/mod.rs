//! KVM state: the system handle (`kvm`), the VM and its memslots (`vm`), vCPUs and their
//! run loop (`vcpu`, `cpuid`), ending a VM from any thread (`control`), and running all
//! vCPUs to the VM's end (`runner`).

pub mod control;
pub mod cpuid;
pub mod kvm;
pub mod runner;
pub mod vcpu;
pub mod vm;

pub use control::{ControlError, VmControl};
pub use kvm::{Kvm, KvmError};
pub use vcpu::{Vcpu, VcpuError};
pub use vm::{Vm, VmError};

#[cfg(test)]
mod tests;
