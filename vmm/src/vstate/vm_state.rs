//! The VM-wide state KVM holds ([`VmState`]): both PICs, the IOAPIC, the PIT and the
//! kvmclock, with its [`Persist`] implementation. Guest RAM is not here: the snapshot
//! layer writes it as memory images, and the zone table comes from the configuration.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use super::vm::{Vm, VmError};
use crate::persist::Persist;

/// The in-kernel irqchip, PIT and clock of a VM.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC (redirection table, IRR).
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT's channels.
    pub pit: kvm_pit_state2,
    /// The kvmclock (guest nanoseconds).
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState").field("clock_ns", &self.clock.clock).finish_non_exhaustive()
    }
}

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip { chip_id: id, ..Default::default() }
}

impl Persist for Vm {
    type State = VmState;
    type Error = VmError;

    fn save(&self) -> Result<VmState, VmError> {
        let setup = |what| move |source| VmError::Setup { what, source };
        let mut state = VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(KVM_IRQCHIP_IOAPIC),
            pit: self.fd().get_pit2().map_err(setup("KVM_GET_PIT2"))?,
            clock: self.fd().get_clock().map_err(setup("KVM_GET_CLOCK"))?,
        };
        for chip in [&mut state.pic_master, &mut state.pic_slave, &mut state.ioapic] {
            self.fd().get_irqchip(chip).map_err(setup("KVM_GET_IRQCHIP"))?;
        }
        Ok(state)
    }

    fn restore(&mut self, state: &VmState) -> Result<(), VmError> {
        let setup = |what| move |source| VmError::Setup { what, source };
        self.fd().set_pit2(&state.pit).map_err(setup("KVM_SET_PIT2"))?;
        // Only the clock value is meaningful in another process; the flags KVM returned
        // (e.g. KVM_CLOCK_TSC_STABLE) are not accepted by KVM_SET_CLOCK.
        let clock = kvm_clock_data { clock: state.clock.clock, ..Default::default() };
        self.fd().set_clock(&clock).map_err(setup("KVM_SET_CLOCK"))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd().set_irqchip(chip).map_err(setup("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
