//! A vCPU: creation and architectural setup (CPUID, MSRs, LAPIC, FPU, boot registers),
//! and the run loop that turns KVM exits into device accesses or the VM's end.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::vm::Vm;
use crate::boot::CpuEntry;
use crate::devices::DeviceBuses;
use crate::exit::VmExit;

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {id}: {source}")]
    Create {
        /// The vCPU.
        id: u32,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// A configuration ioctl failed.
    #[error("cannot configure vCPU {id} ({what}): {source}")]
    Configure {
        /// The vCPU.
        id: u32,
        /// The step that failed.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// The vCPU's dirty ring could not be mapped.
    #[error("cannot map the dirty ring of vCPU {id}: {reason}")]
    DirtyRing {
        /// The vCPU.
        id: u32,
        /// What failed.
        reason: String,
    },
    /// An MSR list could not be built.
    #[error("cannot build the MSR list of vCPU {0}")]
    MsrList(u32),
    /// A saved state does not fit this vCPU.
    #[error("cannot restore vCPU {id}: {reason}")]
    StateMismatch {
        /// The vCPU.
        id: u32,
        /// Why.
        reason: String,
    },
    /// The saved TSC frequency cannot be set on this host.
    #[error("vCPU {id} was saved with a {saved_khz} kHz TSC, this host's is {host_khz} kHz and KVM cannot scale it ({source}); restore on a host with the same TSC frequency")]
    TscFrequency {
        /// The vCPU.
        id: u32,
        /// The frequency in the snapshot.
        saved_khz: u32,
        /// This host's.
        host_khz: u32,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
}

/// MSR_IA32_MISC_ENABLE and its fast-strings bit.
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MSR_MTRRdefType: MTRRs enabled, default type write-back.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
/// LAPIC register offsets and delivery modes (LINT0 ExtINT, LINT1 NMI, as on a PC).
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// One vCPU of the VM.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    msrs_to_save: std::sync::Arc<[u32]>,
    xsave_bytes: usize,
    /// The VM's dirty rings (this vCPU's is mapped there), if it has them.
    dirty_rings: Option<std::sync::Arc<super::dirty_ring::DirtyRings>>,
    /// This vCPU's ring among them.
    dirty_ring_index: usize,
}

impl Vcpu {
    /// Creates vCPU `id` (its APIC ID) of a VM with `count` vCPUs and sets CPUID, MSRs,
    /// FPU and LAPIC LINT pins. APs stay in wait-for-SIPI; the BSP needs
    /// [`Vcpu::set_entry`].
    pub fn new(vm: &Vm, supported_cpuid: &CpuId, id: u32, count: u32) -> Result<Self, VcpuError> {
        let fd = vm.fd().create_vcpu(id as u64).map_err(|source| VcpuError::Create { id, source })?;
        let mut vcpu = Vcpu {
            id,
            fd,
            msrs_to_save: vm.msrs_to_save().clone(),
            xsave_bytes: vm.xsave_bytes(),
            dirty_rings: vm.dirty_rings().cloned(),
            dirty_ring_index: 0,
        };
        if let Some(rings) = &vcpu.dirty_rings {
            vcpu.dirty_ring_index =
                rings.add_vcpu(&vcpu.fd).map_err(|e| VcpuError::DirtyRing { id, reason: e.to_string() })?;
        }
        let cpuid = super::cpuid::for_vcpu(supported_cpuid, id, count);
        vcpu.fd.set_cpuid2(&cpuid).map_err(vcpu.configure("KVM_SET_CPUID2"))?;
        vcpu.set_msrs()?;
        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        vcpu.fd.set_fpu(&fpu).map_err(vcpu.configure("KVM_SET_FPU"))?;
        vcpu.set_lint_pins()?;
        Ok(vcpu)
    }

    fn configure(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Configure { id, what, source }
    }

    fn set_msrs(&self) -> Result<(), VcpuError> {
        let entries = [
            kvm_msr_entry { index: MSR_IA32_MISC_ENABLE, data: MISC_ENABLE_FAST_STRING, ..Default::default() },
            kvm_msr_entry { index: MSR_MTRR_DEF_TYPE, data: MTRR_ENABLE_WB, ..Default::default() },
        ];
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrList(self.id))?;
        let written = self.fd.set_msrs(&msrs).map_err(self.configure("KVM_SET_MSRS"))?;
        if written != entries.len() {
            tracing::debug!("vCPU {}: KVM accepted {written} of {} MSRs", self.id, entries.len());
        }
        Ok(())
    }

    fn set_lint_pins(&self) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(self.configure("KVM_GET_LAPIC"))?;
        for (offset, mode) in [(APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
                lapic.regs[offset + i] = byte as i8;
            }
        }
        self.fd.set_lapic(&lapic).map_err(self.configure("KVM_SET_LAPIC"))
    }

    /// Sets the boot CPU's registers for `entry`.
    pub fn set_entry(&self, entry: &CpuEntry) -> Result<(), VcpuError> {
        let mut sregs = self.fd.get_sregs().map_err(self.configure("KVM_GET_SREGS"))?;
        let mut regs = self.fd.get_regs().map_err(self.configure("KVM_GET_REGS"))?;
        entry.apply(&mut regs, &mut sregs);
        self.fd.set_sregs(&sregs).map_err(self.configure("KVM_SET_SREGS"))?;
        self.fd.set_regs(&regs).map_err(self.configure("KVM_SET_REGS"))
    }

    /// The guest TSC frequency in kHz.
    pub fn tsc_khz(&self) -> Result<u32, VcpuError> {
        self.fd.get_tsc_khz().map_err(self.configure("KVM_GET_TSC_KHZ"))
    }

    /// The MSRs a snapshot of this vCPU saves (KVM's index list).
    pub fn msrs_to_save(&self) -> &std::sync::Arc<[u32]> {
        &self.msrs_to_save
    }

    /// Bytes of xsave state KVM reads and writes for this VM's vCPUs.
    pub fn xsave_bytes(&self) -> usize {
        self.xsave_bytes
    }

    /// The vCPU's id (and APIC ID).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The kvm-ioctls handle.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Completes an exit's pending I/O (the data of a port or MMIO read) without
    /// running the guest: KVM_RUN with `immediate_exit` set, as the KVM API asks before
    /// the vCPU's state is read.
    pub(super) fn complete_pending_io(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = match self.fd.run() {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(source) => Err(VcpuError::Configure { id: self.id, what: "KVM_RUN (complete pending I/O)", source }),
        };
        self.fd.set_kvm_immediate_exit(0);
        result
    }

    /// This vCPU's `kvm_run` page (for the kick handler).
    pub(super) fn kvm_run_page(&mut self) -> *mut kvm_bindings::kvm_run {
        self.fd.get_kvm_run()
    }

    /// Logs where the vCPU stopped (debug).
    pub(super) fn log_stop(&self) {
        if let Ok(regs) = self.fd.get_regs() {
            tracing::debug!("vCPU {} stopped at rip {:#x} (rsp {:#x})", self.id, regs.rip, regs.rsp);
        }
    }

    /// One KVM_RUN and the handling of its exit; `Some` when the VM must end.
    pub(super) fn run_once(&mut self, buses: &DeviceBuses, memory: &GuestMemoryMmap) -> Option<VmExit> {
        let id = self.id;
        let fatal = |reason: String| Some(VmExit::Fatal { vcpu: id, reason });
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick (immediate_exit) or an AP woken by INIT: check for the end, retry.
                self.fd.set_kvm_immediate_exit(0);
                return None;
            }
            Err(e) => return fatal(format!("KVM_RUN failed: {e}")),
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                buses.pio.read(port, data);
                None
            }
            VcpuExit::IoOut(port, data) => buses.pio.write(port, data),
            VcpuExit::MmioRead(addr, data) => {
                buses.mmio.read(addr, data);
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                buses.mmio.write(addr, data);
                None
            }
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
            VcpuExit::Hlt => fatal("halted in user space (HLT exit despite the in-kernel irqchip)".into()),
            VcpuExit::Shutdown => {
                let rip = self.fd.get_regs().map_or(0, |r| r.rip);
                Some(VmExit::TripleFault { vcpu: id, rip })
            }
            VcpuExit::InternalError => Some(self.internal_error(memory)),
            VcpuExit::FailEntry(reason, cpu) => fatal(format!(
                "KVM could not enter the guest (hardware entry failure reason {reason:#x}, host CPU {cpu})"
            )),
            VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL) => match &self.dirty_rings {
                // Collect every ring (KVM_RESET_DIRTY_RINGS) and enter again.
                Some(rings) => rings.on_full(self.dirty_ring_index).err().and_then(|e| fatal(e.to_string())),
                None => fatal("dirty ring full on a VM without dirty rings".into()),
            },
            VcpuExit::SystemEvent(kind, data) => Some(VmExit::Stopped {
                reason: format!("guest requested a system event (type {kind}, data {data:x?}) on vCPU {id}"),
            }),
            other => fatal(format!("unexpected KVM exit {other:?}")),
        }
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR: suberror, rip and the instruction bytes (from
    /// KVM's emulation-failure report, else read from guest memory at rip).
    fn internal_error(&mut self, memory: &GuestMemoryMmap) -> VmExit {
        const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the `internal` (and, for
        // emulation failures, `emulation_failure`) member of the union is the live one.
        let (suberror, ndata, data, flags, insn) = unsafe {
            let internal = run.__bindgen_anon_1.internal;
            let failure = run.__bindgen_anon_1.emulation_failure;
            let insn = failure.__bindgen_anon_1.__bindgen_anon_1;
            (internal.suberror, internal.ndata, internal.data, failure.flags, insn)
        };
        let rip = self.fd.get_regs().map_or(0, |r| r.rip);
        let kvm_bytes = (suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION
            && flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES != 0
            && insn.insn_size > 0)
            .then(|| insn.insn_bytes[..(insn.insn_size as usize).min(15)].to_vec());
        let instruction_bytes = match kvm_bytes.map_or_else(|| self.read_code_at_rip(rip, memory), Ok) {
            Ok(bytes) => bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "),
            Err(why) => format!("unreadable: {why}"),
        };
        tracing::debug!(
            "vCPU {}: internal error {suberror}, data {:x?}",
            self.id,
            &data[..(ndata as usize).min(data.len())]
        );
        VmExit::InternalError { vcpu: self.id, suberror, rip, instruction_bytes }
    }

    /// Reads up to 15 bytes at cs:rip through the guest's page tables.
    fn read_code_at_rip(&self, rip: u64, memory: &GuestMemoryMmap) -> Result<Vec<u8>, String> {
        let cs_base = self.fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?.cs.base;
        let linear = cs_base.wrapping_add(rip);
        let mut bytes = Vec::with_capacity(15);
        while bytes.len() < 15 {
            let address = linear.wrapping_add(bytes.len() as u64);
            let translation = self.fd.translate_gva(address).map_err(|e| format!("KVM_TRANSLATE {address:#x}: {e}"))?;
            if translation.valid == 0 {
                if bytes.is_empty() {
                    return Err(format!("rip {address:#x} is not mapped in the guest"));
                }
                break;
            }
            let in_page = (4096 - (address & 0xfff)) as usize;
            let mut chunk = vec![0u8; in_page.min(15 - bytes.len())];
            match memory.read_slice(&mut chunk, GuestAddress(translation.physical_address)) {
                Ok(()) => bytes.extend_from_slice(&chunk),
                Err(e) if bytes.is_empty() => return Err(format!("gpa {:#x}: {e}", translation.physical_address)),
                Err(_) => break,
            }
        }
        Ok(bytes)
    }
}
