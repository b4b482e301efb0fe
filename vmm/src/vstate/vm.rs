//! A KVM VM: in-kernel irqchip and PIT, one memslot per guest RAM region, irqfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::kvm::Kvm;
use crate::memory::GuestRam;

/// Where KVM puts the three pages of its real-mode TSS (inside the MMIO hole, as
/// Firecracker does).
pub const KVM_TSS_GPA: u64 = 0xfffb_d000;
/// Where KVM puts its identity-map page (the page below the TSS).
pub const KVM_IDENTITY_MAP_GPA: u64 = 0xfffb_c000;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM_CREATE_VM failed.
    #[error("cannot create a KVM VM: {0} (is another hypervisor holding VT-x/AMD-V, or is the host out of memory?)")]
    Create(kvm_ioctls::Error),
    /// A setup ioctl failed.
    #[error("cannot set up the VM ({what}): {source}")]
    Setup {
        /// The step that failed.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// More regions than memslots.
    #[error("guest RAM has {regions} regions but this host's KVM allows {max} memslots; use fewer memory zones")]
    TooManySlots {
        /// Regions of guest RAM.
        regions: usize,
        /// KVM's limit.
        max: usize,
    },
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot register guest RAM at {gpa:#x} ({size_bytes} bytes) with KVM: {source}")]
    Memslot {
        /// GPA of the region.
        gpa: u64,
        /// Its size.
        size_bytes: u64,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// KVM_IRQFD failed.
    #[error("cannot connect an interrupt eventfd to IRQ {irq}: {source}")]
    Irqfd {
        /// The IRQ line (GSI).
        irq: u32,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// Setting up or harvesting the dirty ring failed.
    #[error(transparent)]
    Ring(#[from] super::dirty_ring::DirtyRingError),
}

/// A VM with its irqchip, PIT and guest RAM registered.
pub struct Vm {
    pub(super) fd: VmFd,
    msrs_to_save: std::sync::Arc<[u32]>,
    pub(super) slots: Vec<kvm_userspace_memory_region>,
    xsave_bytes: usize,
    pub(super) dirty_logging: bool,
    /// KVM's dirty ring, when the VM was made with one ([`Vm::enable_dirty_ring`]).
    pub(super) dirty_rings: Option<std::sync::Arc<super::dirty_ring::DirtyRings>>,
}

/// Guest RAM registered with a VM's KVM as memslots (from [`Vm::register_memory`]), to be
/// handed back with [`Vm::adopt_memory`].
#[derive(Debug)]
pub struct RegisteredMemory(Vec<kvm_userspace_memory_region>);

impl Vm {
    /// Creates the VM, its in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, and registers
    /// every region of `ram` as a memslot (slot numbers in region order).
    pub fn new(kvm: &Kvm, ram: &GuestRam) -> Result<Self, VmError> {
        let mut vm = Vm::create(kvm, ram)?;
        vm.create_pit()?;
        let memory = vm.register_memory(ram)?;
        vm.adopt_memory(memory);
        Ok(vm)
    }

    /// Creates the VM and its in-kernel irqchip (PIC, IOAPIC, LAPICs), and checks that
    /// `ram` fits KVM's memslots. The PIT and guest RAM come next, with
    /// [`Vm::create_pit`] and [`Vm::register_memory`], which may run on another thread
    /// while vCPUs are created and the kernel is loaded: both mostly wait (registering a
    /// memslot waits out a grace period of KVM's memslot SRCU, 4-10 ms on a nested host
    /// whatever the size; the PIT starts a kernel thread), so overlapping them with the
    /// rest of the build shortens the boot.
    pub fn create(kvm: &Kvm, ram: &GuestRam) -> Result<Self, VmError> {
        let fd = kvm.fd().create_vm().map_err(VmError::Create)?;
        let setup = |what| move |source| VmError::Setup { what, source };
        fd.set_tss_address(KVM_TSS_GPA as usize).map_err(setup("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_GPA).map_err(setup("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
        let msrs = kvm.fd().get_msr_index_list().map_err(setup("KVM_GET_MSR_INDEX_LIST"))?;
        let mut vm = Vm {
            fd,
            msrs_to_save: msrs.as_slice().into(),
            slots: Vec::new(),
            xsave_bytes: 0,
            dirty_logging: false,
            dirty_rings: None,
        };
        // KVM_CAP_XSAVE2 gives the size of KVM's xsave buffer when it exceeds the legacy
        // 4 KiB (e.g. with AMX); 0 means the legacy size.
        let xsave2 = vm.fd.check_extension_int(kvm_ioctls::Cap::Xsave2);
        vm.xsave_bytes = usize::try_from(xsave2).unwrap_or(0).max(std::mem::size_of::<kvm_bindings::kvm_xsave>());
        let max = kvm.max_memslots();
        if ram.regions().len() > max {
            return Err(VmError::TooManySlots { regions: ram.regions().len(), max });
        }
        Ok(vm)
    }

    /// Makes the VM track dirty pages with KVM's dirty ring (`entries` per vCPU) instead
    /// of the dirty log; must come before any vCPU is created. Logging itself starts
    /// with [`Vm::enable_dirty_log`], as for the log.
    pub fn enable_dirty_ring(&mut self, entries: u32) -> Result<(), VmError> {
        let rings = super::dirty_ring::DirtyRings::enable(&self.fd, entries)?;
        self.dirty_rings = Some(std::sync::Arc::new(rings));
        Ok(())
    }

    /// The VM's dirty rings, if it was made with them.
    pub fn dirty_rings(&self) -> Option<&std::sync::Arc<super::dirty_ring::DirtyRings>> {
        self.dirty_rings.as_ref()
    }

    /// Creates the in-kernel PIT (channel 2's speaker gate as a dummy port).
    pub fn create_pit(&self) -> Result<(), VmError> {
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(pit).map_err(|source| VmError::Setup { what: "KVM_CREATE_PIT2", source })
    }

    /// Registers every region of `ram` as a memslot (slot numbers in region order); give
    /// the result to [`Vm::adopt_memory`] before the vCPUs run.
    pub fn register_memory(&self, ram: &GuestRam) -> Result<RegisteredMemory, VmError> {
        let mut slots = Vec::with_capacity(ram.regions().len());
        for (slot, region) in ram.regions().iter().enumerate() {
            let memslot = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.gpa,
                memory_size: region.size_bytes,
                userspace_addr: region.host_addr,
            };
            // SAFETY: the host range is a live mapping owned by `ram`, which outlives the
            // VM (the machine drops the VM and its vCPUs before guest RAM).
            unsafe { self.fd.set_user_memory_region(memslot) }.map_err(|source| VmError::Memslot {
                gpa: region.gpa,
                size_bytes: region.size_bytes,
                source,
            })?;
            slots.push(memslot);
        }
        Ok(RegisteredMemory(slots))
    }

    /// Records the memslots [`Vm::register_memory`] registered (for the dirty log and
    /// the snapshot layer).
    pub fn adopt_memory(&mut self, memory: RegisteredMemory) {
        self.slots = memory.0;
    }

    /// The MSRs KVM lists for saving (KVM_GET_MSR_INDEX_LIST), read once per VM.
    pub fn msrs_to_save(&self) -> &std::sync::Arc<[u32]> {
        &self.msrs_to_save
    }

    /// Bytes of xsave state KVM moves per vCPU (at least the legacy 4 KiB area).
    pub fn xsave_bytes(&self) -> usize {
        self.xsave_bytes
    }

    /// The memslots as registered (slot number = index).
    pub fn memslots(&self) -> &[kvm_userspace_memory_region] {
        &self.slots
    }

    /// The kvm-ioctls handle.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Makes a write to `event` raise IRQ line `irq` of the in-kernel irqchip.
    pub fn register_irqfd(&self, event: &EventFd, irq: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(event, irq).map_err(|source| VmError::Irqfd { irq, source })
    }
}
