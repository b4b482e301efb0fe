//! A vCPU's architectural state ([`VcpuState`]) and its [`Persist`] implementation.
//!
//! Saved: general and special registers, FPU/SSE/AVX state (xsave), XCRs, every MSR KVM
//! lists that it can read back, the local APIC, the multiprocessing state, pending
//! events, debug registers and the TSC frequency. The guest's TSC travels as the
//! IA32_TSC MSR: on an ordinary KVM host it continues from the value it had when saved.
//! Some hosts do not apply a written TSC at all (this project's nested test host, whose
//! guests always read the host's TSC): the restore reads the TSC back and warns how far
//! the guest's clock jumped, since guest timings that span the restore include the gap.
//! Restore order follows what KVM needs: CPUID is set when the vCPU is built; the LAPIC
//! before the MSRs (TSC deadline) and the events last.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use serde::{Deserialize, Serialize};

use super::vcpu::{Vcpu, VcpuError};
use crate::persist::Persist;

/// IA32_TSC, the guest's time-stamp counter.
const MSR_IA32_TSC: u32 = 0x10;

/// KVM_GET_MSRS / KVM_SET_MSRS take at most this many entries at a time.
const MSR_BATCH: usize = 255;

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's id (its APIC ID).
    pub id: u32,
    /// General-purpose registers, rip and rflags.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX state (the 4 KiB legacy xsave area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// MSRs as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for SIPI ...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// DR0-DR7.
    pub debugregs: kvm_debugregs,
    /// The guest's TSC frequency in kHz.
    pub tsc_khz: u32,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .field("mp_state", &self.mp_state.mp_state)
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

impl Persist for Vcpu {
    type State = VcpuState;
    type Error = VcpuError;

    fn save(&self) -> Result<VcpuState, VcpuError> {
        self.check_xsave_size()?;
        let fd = self.fd();
        let configure = |what| {
            let id = self.id();
            move |source| VcpuError::Configure { id, what, source }
        };
        Ok(VcpuState {
            id: self.id(),
            regs: fd.get_regs().map_err(configure("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(configure("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(configure("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(configure("KVM_GET_XCRS"))?,
            msrs: self.read_msrs()?,
            lapic: fd.get_lapic().map_err(configure("KVM_GET_LAPIC"))?,
            mp_state: fd.get_mp_state().map_err(configure("KVM_GET_MP_STATE"))?,
            events: fd.get_vcpu_events().map_err(configure("KVM_GET_VCPU_EVENTS"))?,
            debugregs: fd.get_debug_regs().map_err(configure("KVM_GET_DEBUGREGS"))?,
            tsc_khz: fd.get_tsc_khz().map_err(configure("KVM_GET_TSC_KHZ"))?,
        })
    }

    fn restore(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        if state.id != self.id() {
            return Err(VcpuError::StateMismatch {
                id: self.id(),
                reason: format!("the state is of vCPU {}", state.id),
            });
        }
        self.check_xsave_size()?;
        let id = self.id();
        let configure = |what| move |source| VcpuError::Configure { id, what, source };
        let fd = self.fd();
        let host_khz = fd.get_tsc_khz().map_err(configure("KVM_GET_TSC_KHZ"))?;
        if host_khz != state.tsc_khz {
            fd.set_tsc_khz(state.tsc_khz).map_err(|source| VcpuError::TscFrequency {
                id,
                saved_khz: state.tsc_khz,
                host_khz,
                source,
            })?;
        }
        fd.set_mp_state(state.mp_state).map_err(configure("KVM_SET_MP_STATE"))?;
        fd.set_regs(&state.regs).map_err(configure("KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs).map_err(configure("KVM_SET_SREGS"))?;
        // SAFETY: `check_xsave_size` made sure KVM's xsave area is the legacy size of
        // `kvm_xsave`, so KVM_SET_XSAVE reads no further than the struct.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(configure("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs).map_err(configure("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debugregs).map_err(configure("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&state.lapic).map_err(configure("KVM_SET_LAPIC"))?;
        self.write_msrs(&state.msrs)?;
        self.warn_if_tsc_jumped(state)?;
        fd.set_vcpu_events(&state.events).map_err(configure("KVM_SET_VCPU_EVENTS"))
    }
}

impl Vcpu {
    /// Refuses hosts whose xsave area is larger than the legacy 4 KiB (dynamically
    /// enabled features such as AMX): the state would not fit `kvm_xsave`.
    fn check_xsave_size(&self) -> Result<(), VcpuError> {
        let legacy = std::mem::size_of::<kvm_xsave>();
        if self.xsave_bytes() > legacy {
            return Err(VcpuError::StateMismatch {
                id: self.id(),
                reason: format!(
                    "this host's KVM uses a {} byte xsave area (more than the {legacy} bytes snapshots carry)",
                    self.xsave_bytes()
                ),
            });
        }
        Ok(())
    }

    /// Reads the TSC back after a restore and warns (once, for vCPU 0) when it is far
    /// from the saved value: the host ignored the write, so the guest's clock ran on
    /// with the host's while the VM was saved.
    fn warn_if_tsc_jumped(&self, state: &VcpuState) -> Result<(), VcpuError> {
        let Some(&(_, saved)) = state.msrs.iter().find(|(index, _)| *index == MSR_IA32_TSC) else {
            return Ok(());
        };
        if self.id() != 0 || state.tsc_khz == 0 {
            return Ok(());
        }
        let now = self.read_msr(MSR_IA32_TSC)?;
        let jump_ms = (now as i128 - saved as i128) / state.tsc_khz as i128;
        // A restore itself takes milliseconds; a second is well beyond that.
        if jump_ms.abs() > 1000 {
            tracing::warn!(
                "this host did not apply the saved TSC: the guest's clock is {jump_ms} ms {} the value it was saved with; guest timings that span the restore include that gap",
                if jump_ms > 0 { "ahead of" } else { "behind" }
            );
        }
        Ok(())
    }

    /// Reads one MSR.
    fn read_msr(&self, index: u32) -> Result<u64, VcpuError> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
            .map_err(|_| VcpuError::MsrList(self.id()))?;
        let id = self.id();
        let count = self.fd().get_msrs(&mut msrs).map_err(|source| VcpuError::Configure {
            id,
            what: "KVM_GET_MSRS",
            source,
        })?;
        if count != 1 {
            return Err(VcpuError::StateMismatch { id, reason: format!("KVM cannot read MSR {index:#x}") });
        }
        Ok(msrs.as_slice()[0].data)
    }

    /// Reads every MSR of the VM's save list that KVM can read for this vCPU.
    fn read_msrs(&self) -> Result<Vec<(u32, u64)>, VcpuError> {
        let mut read = Vec::with_capacity(self.msrs_to_save().len());
        let mut pending: Vec<u32> = self.msrs_to_save().to_vec();
        while !pending.is_empty() {
            let batch: Vec<u32> = pending.iter().copied().take(MSR_BATCH).collect();
            let entries: Vec<kvm_msr_entry> =
                batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrList(self.id()))?;
            let id = self.id();
            let count = self.fd().get_msrs(&mut msrs).map_err(|source| VcpuError::Configure {
                id,
                what: "KVM_GET_MSRS",
                source,
            })?;
            read.extend(msrs.as_slice()[..count].iter().map(|e| (e.index, e.data)));
            // KVM stops at the first MSR it cannot read: skip that one and go on.
            let consumed = (count + 1).min(batch.len());
            if count < batch.len() {
                tracing::debug!("vCPU {}: MSR {:#x} cannot be read; not saved", self.id(), batch[count]);
            }
            pending.drain(..consumed);
        }
        Ok(read)
    }

    /// Writes saved MSRs; every one must be accepted.
    fn write_msrs(&self, saved: &[(u32, u64)]) -> Result<(), VcpuError> {
        for chunk in saved.chunks(MSR_BATCH) {
            let entries: Vec<kvm_msr_entry> =
                chunk.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrList(self.id()))?;
            let id = self.id();
            let written = self.fd().set_msrs(&msrs).map_err(|source| VcpuError::Configure {
                id,
                what: "KVM_SET_MSRS",
                source,
            })?;
            if written < chunk.len() {
                return Err(VcpuError::StateMismatch {
                    id,
                    reason: format!(
                        "this host's KVM refused MSR {:#x}; restore on a host with the same CPU model",
                        chunk[written].0
                    ),
                });
            }
        }
        Ok(())
    }
}
