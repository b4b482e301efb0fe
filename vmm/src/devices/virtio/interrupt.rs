//! The interrupt side of a virtio-mmio device: the InterruptStatus bits, the config
//! generation counter, and the eventfd the VMM connects to the guest's IRQ line (irqfd).
//!
//! Shared (`Arc`) by the transport, its device and the device's control handle, so a
//! control thread can announce a config change while the guest runs.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// InterruptStatus bit: the device used buffers in at least one queue.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: the device's configuration changed (or it needs a reset).
pub const INT_CONFIG: u32 = 2;

/// The interrupt state of one virtio device.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    generation: AtomicU32,
    raised: AtomicU64,
    event: EventFd,
}

impl VirtioInterrupt {
    /// Interrupt state that raises the guest interrupt by writing `event` (register it
    /// with `Vm::register_irqfd` for the device's IRQ).
    pub fn new(event: EventFd) -> Self {
        Self { status: AtomicU32::new(0), generation: AtomicU32::new(0), raised: AtomicU64::new(0), event }
    }

    /// The eventfd that raises the interrupt (for `Vm::register_irqfd`).
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.raised.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.event.write(1) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Bumps the config generation and tells the driver its config changed.
    pub fn signal_config_change(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }

    /// Clears the InterruptStatus bits the driver acknowledged.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// InterruptStatus as the driver reads it.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// ConfigGeneration as the driver reads it.
    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::SeqCst)
    }

    /// How many times the interrupt was raised since creation.
    pub fn raised_count(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }

    /// Puts InterruptStatus and ConfigGeneration back as a saved VM had them (restore,
    /// before any vCPU runs; the interrupt controller's own state says whether a raised
    /// interrupt is still pending, so nothing is raised here).
    pub fn restore(&self, status: u32, generation: u32) {
        self.status.store(status, Ordering::SeqCst);
        self.generation.store(generation, Ordering::SeqCst);
    }

    /// Clears InterruptStatus (device reset); the generation keeps counting.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}
