//! virtio 1.x devices over the virtio-mmio transport ("version 2" registers only).
//!
//! - [`mmio`]: the transport, an [`MmioDevice`](super::MmioDevice) for one 4 KiB window:
//!   feature negotiation, queue setup, status and reset, config space and generation.
//! - [`interrupt`]: InterruptStatus, ConfigGeneration and the irqfd eventfd, shared with
//!   control threads.
//! - [`chain`]: validation of every descriptor chain a driver hands us.
//! - [`balloon`]: the virtio-balloon device.
//! - [`notify`]: queue notifications through ioeventfds, served by a thread of the
//!   device's own instead of the vCPU that wrote them.
//! - [`slot`]: where devices live (window, IRQ, command-line token) and
//!   [`install_balloon`], the one call the VMM makes.
//!
//! A misbehaving driver never crashes the VMM: every chain is checked before use, guest
//! memory is reached only through vm-memory (which refuses anything outside guest RAM),
//! and a device that meets a malformed request returns a [`DeviceError`], on which the
//! transport sets DEVICE_NEEDS_RESET, raises a config interrupt and stops processing
//! until the driver resets the device.

pub mod balloon;
pub mod chain;
pub mod interrupt;
pub mod mmio;
pub mod notify;
pub mod slot;

#[cfg(test)]
mod kvm_tests;
#[cfg(test)]
mod test_driver;
#[cfg(test)]
mod tests;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

pub use chain::ChainError;
pub use interrupt::VirtioInterrupt;
pub use mmio::MmioTransport;
pub use slot::{install_balloon, InstalledBalloon, MmioSlot, SlotError};

/// VIRTIO_F_VERSION_1: the device follows virtio 1.x (required by this transport).
pub const VIRTIO_F_VERSION_1: u32 = faultline_abi::virtio::feature::VERSION_1;

/// Device status bits (virtio 1.2, 2.1): the abi's, shared with the guest driver.
pub use faultline_abi::virtio::status;

/// Errors a device reports to its transport. Each means the driver broke the protocol;
/// the transport answers with DEVICE_NEEDS_RESET.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// A descriptor chain is malformed or points outside guest RAM.
    #[error("bad descriptor chain in queue {queue}: {source}")]
    Chain {
        /// The queue.
        queue: u16,
        /// What is wrong with it.
        source: ChainError,
    },
    /// A request broke the device's protocol (wrong direction, bad length, ...).
    #[error("bad request in queue {queue}: {what}")]
    Request {
        /// The queue.
        queue: u16,
        /// What is wrong with it.
        what: String,
    },
    /// The ring indices or ring memory are inconsistent (avail index ran ahead by more
    /// than the queue size, rings outside guest RAM, ...).
    #[error("queue {queue} is broken: {what}")]
    Queue {
        /// The queue.
        queue: u16,
        /// What is wrong with it.
        what: String,
    },
    /// Activation was refused (a queue is not usable).
    #[error("cannot activate the device: {0}")]
    Activate(String),
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest RAM (the device reaches it only through vm-memory).
    pub memory: GuestMemoryMmap,
    /// The queues, in index order, as the driver configured them (ready or not).
    pub queues: Vec<Queue>,
    /// The negotiated features.
    pub features: u64,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (5 for a balloon).
    fn device_type(&self) -> u32;
    /// The feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// The maximum size of each queue that exists with the `negotiated` features, in
    /// queue-index order (a device whose queues depend on features derives them here).
    fn queue_max_sizes(&self, negotiated: u64) -> Vec<u16>;
    /// Reads device config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver has just read ConfigGeneration or config space (after the transport
    /// answered): a device that defers config changes until the driver has seen the
    /// current config makes them here.
    fn config_observed(&mut self) {}
    /// Starts the device with the driver's queues.
    fn activate(&mut self, context: ActivateContext) -> Result<(), DeviceError>;
    /// The driver notified queue `index`: process what it made available.
    fn queue_notify(&mut self, index: u16) -> Result<(), DeviceError>;
    /// Back to the state before activation (drops queues and memory).
    fn reset(&mut self);
    /// The queues the device works on, with their ring positions, if it is activated
    /// (for the transport's saved state; the transport holds them before activation).
    fn active_queue_states(&self) -> Option<Vec<virtio_queue::QueueState>>;
}
