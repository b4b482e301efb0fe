//! The KVM system handle: opens /dev/kvm and checks that it offers what Faultline needs.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm as KvmFd};

/// Errors opening or probing KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm does not exist.
    #[error("/dev/kvm not found: this host has no KVM (load the kvm_intel or kvm_amd module, or enable nested virtualization for this VM)")]
    NotFound,
    /// /dev/kvm exists but cannot be opened.
    #[error("cannot open /dev/kvm: permission denied; add your user to the 'kvm' group (sudo usermod -aG kvm $USER, then log in again) or run as root")]
    PermissionDenied,
    /// Another error opening /dev/kvm.
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    /// The KVM API version is not 12.
    #[error("KVM API version {0} is not supported (expected 12)")]
    ApiVersion(i32),
    /// A required capability is missing.
    #[error("this host's KVM lacks {0:?}, which Faultline needs; use a newer host kernel")]
    MissingCap(Cap),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID KVM supports: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
}

/// Capabilities Faultline cannot run without.
const REQUIRED_CAPS: [Cap; 8] = [
    Cap::Irqchip,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Irqfd,
    Cap::ExtCpuid,
    Cap::Pit2,
    Cap::ImmediateExit,
    Cap::MpState,
];

/// An open /dev/kvm that has the capabilities Faultline needs.
pub struct Kvm {
    fd: KvmFd,
}

impl Kvm {
    /// Opens /dev/kvm and checks its API version and capabilities.
    pub fn open() -> Result<Self, KvmError> {
        let fd = KvmFd::new().map_err(|e| match e.errno() {
            libc::ENOENT => KvmError::NotFound,
            libc::EACCES | libc::EPERM => KvmError::PermissionDenied,
            _ => KvmError::Open(e),
        })?;
        let version = fd.get_api_version();
        if version != 12 {
            return Err(KvmError::ApiVersion(version));
        }
        for cap in REQUIRED_CAPS {
            if !fd.check_extension(cap) {
                return Err(KvmError::MissingCap(cap));
            }
        }
        Ok(Kvm { fd })
    }

    /// The kvm-ioctls handle.
    pub fn fd(&self) -> &KvmFd {
        &self.fd
    }

    /// The CPUID leaves KVM can give a guest.
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.fd.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(KvmError::SupportedCpuid)
    }

    /// Most vCPUs a VM may have on this host.
    pub fn max_vcpus(&self) -> usize {
        self.fd.get_max_vcpus()
    }

    /// Most memslots a VM may have on this host.
    pub fn max_memslots(&self) -> usize {
        self.fd.get_nr_memslots()
    }
}
