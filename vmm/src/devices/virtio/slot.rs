//! Where virtio-mmio devices live (window `n` of the abi's virtio-mmio area, IRQ
//! `first + n`) and the one call that puts a balloon there.

use std::sync::{Arc, Mutex};

use faultline_abi as abi;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::balloon::{Balloon, BalloonConfig, BalloonHandle};
use super::mmio::{virtio_mmio_cmdline_token, MmioTransport};
use super::notify::{NotifyError, QueueNotifier, RegisterIoeventfd};
use super::VirtioInterrupt;
use crate::devices::{MmioBus, MmioBusError};
use crate::smmu::discard::Discarder;
use crate::smmu::Regions;

/// Errors putting a virtio device on the bus.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The interrupt eventfd could not be created.
    #[error("cannot create the interrupt eventfd of a virtio device: {0} (out of file descriptors?)")]
    EventFd(std::io::Error),
    /// The window is taken.
    #[error(transparent)]
    Bus(#[from] MmioBusError),
    /// Queue notifications could not be moved off the vCPU thread.
    #[error(transparent)]
    Notify(#[from] NotifyError),
}

/// One virtio-mmio device window and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical base of the window.
    pub base: u64,
    /// Window size in bytes.
    pub size_bytes: u64,
    /// IOAPIC pin (GSI) for its irqfd.
    pub irq: u32,
}

impl MmioSlot {
    /// Device window `n` of the guest ABI (0 is the balloon's).
    pub const fn nth(n: u32) -> Self {
        MmioSlot {
            base: abi::VIRTIO_MMIO_BASE_GPA + n as u64 * abi::VIRTIO_MMIO_WINDOW_BYTES,
            size_bytes: abi::VIRTIO_MMIO_WINDOW_BYTES,
            irq: abi::VIRTIO_MMIO_FIRST_IRQ + n,
        }
    }

    /// The `virtio_mmio.device=` command-line token for this slot.
    pub fn cmdline_token(&self) -> String {
        virtio_mmio_cmdline_token(self.base, self.size_bytes, self.irq)
    }
}

/// A balloon on the bus: its handle for control threads, and the interrupt whose eventfd
/// the VMM connects to `slot.irq` (`vm.register_irqfd(interrupt.event(), slot.irq)`).
pub struct InstalledBalloon {
    /// The balloon's handle (target, schedule, statistics, counters).
    pub handle: Arc<BalloonHandle>,
    /// The device's interrupt.
    pub interrupt: Arc<VirtioInterrupt>,
    /// The transport, for its error counters.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The thread serving queue notifications from ioeventfds (None: they are trapped
    /// and served on the vCPU thread). Drop it before guest RAM.
    pub notifier: Option<QueueNotifier>,
}

/// Creates a balloon over `regions` (freeing memory through `discarder`) and puts it on
/// `bus` at `slot`. With `ioeventfd` (a VM to register eventfds with), queue notifications
/// are served by a [`QueueNotifier`] thread instead of the vCPU that wrote them. `memory`
/// is guest RAM: drop the bus and the notifier before guest RAM.
pub fn install_balloon(
    bus: &mut MmioBus,
    slot: MmioSlot,
    memory: &GuestMemoryMmap,
    discarder: Discarder,
    regions: Arc<Regions>,
    config: BalloonConfig,
    ioeventfd: Option<RegisterIoeventfd<'_>>,
) -> Result<InstalledBalloon, SlotError> {
    let event = EventFd::new(libc::EFD_NONBLOCK).map_err(SlotError::EventFd)?;
    let interrupt = Arc::new(VirtioInterrupt::new(event));
    let (device, handle) = Balloon::new(config, discarder, regions, interrupt.clone());
    let transport = Arc::new(Mutex::new(MmioTransport::new(Box::new(device), memory.clone(), interrupt.clone())));
    bus.insert(slot.base, slot.size_bytes, transport.clone())?;
    let notify_addr = slot.base + faultline_abi::virtio::mmio::QUEUE_NOTIFY;
    let notifier =
        ioeventfd.map(|register| QueueNotifier::start(transport.clone(), notify_addr, register)).transpose()?;
    Ok(InstalledBalloon { handle, interrupt, transport, notifier })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_abi() {
        let first = MmioSlot::nth(0);
        assert_eq!(first.cmdline_token(), "virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(MmioSlot::nth(2), MmioSlot { base: 0xd000_2000, size_bytes: 0x1000, irq: 7 });
    }
}
