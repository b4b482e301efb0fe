//! The virtio-mmio transport, "version 2" (virtio 1.2, 4.2.2): one 4 KiB window of
//! 32-bit registers, then device config space at 0x100.
//!
//! The driver negotiates features (FEATURES_OK is kept only if its features are a subset
//! of the device's and include VIRTIO_F_VERSION_1), sets up the queues that exist with the
//! negotiated features, and sets DRIVER_OK, which activates the device. Writing 0 to
//! Status resets everything. A device error sets DEVICE_NEEDS_RESET, raises a config
//! interrupt, and the transport ignores notifications until the reset.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::interrupt::VirtioInterrupt;
use super::{status, ActivateContext, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::MmioDevice;

/// The register layout this transport implements.
const VERSION: u32 = 2;
/// Our vendor ID ("FL" + 0x554d, as QEMU uses "QEMU").
const VENDOR_ID: u32 = 0x4c46_554d;
/// Where device config space starts in the window.
pub const CONFIG_OFFSET: u64 = 0x100;

/// Register offsets (virtio 1.2, table 4.1): the contract the guest driver uses too.
use faultline_abi::virtio::mmio as reg;

/// What the transport saw go wrong (for reports and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportCounters {
    /// Register accesses that were not aligned 32-bit accesses, or to unknown registers.
    pub bad_accesses: u64,
    /// Notifications ignored: before DRIVER_OK, to a queue that does not exist or is not
    /// ready, or while the device needs a reset.
    pub ignored_notifies: u64,
    /// Status writes that broke the init sequence (ignored).
    pub bad_status_writes: u64,
    /// Times the device was put in DEVICE_NEEDS_RESET.
    pub device_errors: u64,
    /// Resets by the driver.
    pub resets: u64,
}

/// A virtio device behind a virtio-mmio window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// The queues that exist with the negotiated features (empty before FEATURES_OK).
    queues: Vec<Queue>,
    /// Per queue, the last value written to each of QueueNum, QueueDesc, QueueDriver and
    /// QueueDevice that the queue refused (bad size, misaligned ring).
    refused: Vec<[bool; 4]>,
    /// Snapshot of each queue's registers at DRIVER_OK, when the queues go to the device.
    active_queues: Vec<(u16, bool)>,
    last_error: Option<String>,
    counters: TransportCounters,
}

impl MmioTransport {
    /// A transport for `device`, reaching guest RAM through `memory` and raising
    /// interrupts through `interrupt` (the same one the device was given).
    ///
    /// `memory` points into guest RAM's mappings: drop the transport (and the bus that
    /// holds it) before guest RAM.
    pub fn new(device: Box<dyn VirtioDevice>, memory: GuestMemoryMmap, interrupt: Arc<VirtioInterrupt>) -> Self {
        Self {
            device,
            memory,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: Vec::new(),
            refused: Vec::new(),
            active_queues: Vec::new(),
            last_error: None,
            counters: TransportCounters::default(),
        }
    }

    /// The device Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is in DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.status & status::DEVICE_NEEDS_RESET != 0
    }

    /// The error that put the device in DEVICE_NEEDS_RESET, if any since the last reset.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// What went wrong so far.
    pub fn counters(&self) -> &TransportCounters {
        &self.counters
    }

    /// The features the driver acknowledged.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    fn activated(&self) -> bool {
        self.status & status::DRIVER_OK != 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated() {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> Option<u32> {
        let sel = self.queue_sel as usize;
        Some(match offset {
            reg::MAGIC_VALUE => reg::MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX if self.activated() => self.active_queues.get(sel).map_or(0, |_| self.max_size(sel)),
            reg::QUEUE_NUM_MAX => self.queues.get(sel).map_or(0, |q| q.max_size() as u32),
            reg::QUEUE_NUM if self.activated() => self.active_queues.get(sel).map_or(0, |q| q.0 as u32),
            reg::QUEUE_NUM => self.queues.get(sel).map_or(0, |q| q.size() as u32),
            reg::QUEUE_READY if self.activated() => self.active_queues.get(sel).map_or(0, |q| q.1 as u32),
            reg::QUEUE_READY => self.queues.get(sel).map_or(0, |q| q.ready() as u32),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length -1 says "none".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.interrupt.generation(),
            _ => return None,
        })
    }

    fn max_size(&self, index: usize) -> u32 {
        self.device.queue_max_sizes(self.driver_features).get(index).map_or(0, |&s| s as u32)
    }

    fn write_register(&mut self, offset: u64, value: u32) -> bool {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.set_queue(0, |q| q.try_set_size(value.min(u16::MAX as u32) as u16).map(|_| 0)),
            reg::QUEUE_READY => match self.selected_queue() {
                Some(q) => q.set_ready(value == 1),
                None => self.counters.bad_accesses += 1,
            },
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => self.set_queue(1, |q| {
                let addr = merge(q.desc_table(), offset == reg::QUEUE_DESC_HIGH, value);
                q.try_set_desc_table_address(GuestAddress(addr)).map(|_| addr)
            }),
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => self.set_queue(2, |q| {
                let addr = merge(q.avail_ring(), offset == reg::QUEUE_DRIVER_HIGH, value);
                q.try_set_avail_ring_address(GuestAddress(addr)).map(|_| addr)
            }),
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => self.set_queue(3, |q| {
                let addr = merge(q.used_ring(), offset == reg::QUEUE_DEVICE_HIGH, value);
                q.try_set_used_ring_address(GuestAddress(addr)).map(|_| addr)
            }),
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            _ => return false,
        }
        true
    }

    /// Applies a queue-register write (`field`: 0 size, 1 desc, 2 driver, 3 device) to the
    /// selected queue, remembering a value the queue refused so activation fails. Ignored
    /// (and counted) after DRIVER_OK, for a queue that does not exist, and on a ready queue
    /// (the driver must set a queue up before it sets QueueReady).
    fn set_queue(&mut self, field: usize, f: impl FnOnce(&mut Queue) -> Result<u64, virtio_queue::Error>) {
        let sel = self.queue_sel as usize;
        let outcome = match self.selected_queue() {
            Some(q) if !q.ready() => f(q),
            _ => {
                self.counters.bad_accesses += 1;
                return;
            }
        };
        self.refused[sel][field] = outcome.is_err();
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER == 0 {
            self.counters.bad_accesses += 1;
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value as u64,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | ((value as u64) << 32),
            _ => self.counters.bad_accesses += 1,
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET is the device's bit: whatever the driver writes there is ignored.
        let (value, kept) = (value & !status::DEVICE_NEEDS_RESET, old & !status::DEVICE_NEEDS_RESET);
        if value & status::FAILED != 0 {
            // The driver gave up on the device: allowed at any time.
            self.status |= status::FAILED;
            return;
        }
        // Bits only get set, in the order of 3.1.1.
        let added = value & !old;
        let ordered = value & kept == kept
            && (value & status::DRIVER == 0 || value & status::ACKNOWLEDGE != 0)
            && (value & status::FEATURES_OK == 0 || value & status::DRIVER != 0)
            && (value & status::DRIVER_OK == 0 || value & status::FEATURES_OK != 0);
        if !ordered {
            tracing::debug!("virtio-mmio: status {value:#x} after {old:#x} breaks the init sequence; ignored");
            self.counters.bad_status_writes += 1;
            return;
        }
        let mut new = old | value;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            // Leave FEATURES_OK clear: the driver reads Status back and gives up.
            new &= !status::FEATURES_OK;
        } else if added & status::FEATURES_OK != 0 {
            self.refused = vec![[false; 4]; self.device.queue_max_sizes(self.driver_features).len()];
            self.queues = self
                .device
                .queue_max_sizes(self.driver_features)
                .into_iter()
                .filter_map(|max| Queue::new(max).ok())
                .collect();
        }
        self.status = new;
        if added & status::DRIVER_OK != 0 && new & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.driver_features & !offered == 0 && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        for (index, q) in queues.iter().enumerate() {
            let refused = self.refused.get(index).is_some_and(|r| r.contains(&true));
            if q.ready() && (refused || !q.is_valid(&self.memory)) {
                self.active_queues = queues.iter().map(|q| (q.size(), q.ready())).collect();
                let what = format!("queue {index}: bad size, misaligned rings, or rings not in guest RAM");
                self.device_error(super::DeviceError::Activate(what));
                return;
            }
        }
        self.active_queues = queues.iter().map(|q| (q.size(), q.ready())).collect();
        let context = ActivateContext { memory: self.memory.clone(), queues, features: self.driver_features };
        if let Err(e) = self.device.activate(context) {
            self.device_error(e);
        }
    }

    /// The driver wrote `value` to QueueNotify (trapped here, or signalled through an
    /// ioeventfd to [`super::notify::QueueNotifier`]): processes the queue it names, if
    /// that queue may be used now.
    pub fn notify_queue(&mut self, value: u32) {
        // With VIRTIO_F_NOTIFICATION_DATA (not offered) the high half carries more data.
        let index = value & 0xffff;
        let usable = self.activated()
            && !self.needs_reset()
            && self.active_queues.get(index as usize).is_some_and(|&(_, ready)| ready);
        if !usable {
            tracing::debug!("virtio-mmio: notify of queue {index} ignored (status {:#x})", self.status);
            self.counters.ignored_notifies += 1;
            return;
        }
        if let Err(e) = self.device.queue_notify(index as u16) {
            self.device_error(e);
        }
    }

    /// Puts the device in DEVICE_NEEDS_RESET and tells the driver.
    fn device_error(&mut self, error: super::DeviceError) {
        tracing::warn!("virtio device {}: {error}; the device needs a reset", self.device.device_type());
        self.counters.device_errors += 1;
        self.last_error = Some(error.to_string());
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt.raise(super::interrupt::INT_CONFIG);
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues.clear();
        self.refused.clear();
        self.active_queues.clear();
        self.last_error = None;
        self.interrupt.reset();
        self.counters.resets += 1;
    }
}

impl MmioDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            self.device.config_observed();
            return;
        }
        let value = (data.len() == 4 && offset.is_multiple_of(4)).then(|| self.read_register(offset)).flatten();
        match value {
            Some(v) => {
                data.copy_from_slice(&v.to_le_bytes());
                if offset == reg::CONFIG_GENERATION {
                    self.device.config_observed();
                }
            }
            None => {
                self.counters.bad_accesses += 1;
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.counters.bad_accesses += 1;
            return;
        };
        if !offset.is_multiple_of(4) || !self.write_register(offset, u32::from_le_bytes(bytes)) {
            self.counters.bad_accesses += 1;
        }
    }
}

/// `old` with its low (or high) 32 bits replaced by `value`.
fn merge(old: u64, high: bool, value: u32) -> u64 {
    match high {
        true => (old & 0xffff_ffff) | ((value as u64) << 32),
        false => (old & !0xffff_ffff) | value as u64,
    }
}

/// The kernel command-line token that tells Linux (and the tiny guest) where a
/// virtio-mmio device is: `virtio_mmio.device=<size>@<base>:<irq>`, e.g.
/// `virtio_mmio.device=4K@0xd0000000:5`.
pub fn virtio_mmio_cmdline_token(base: u64, size_bytes: u64, irq: u32) -> String {
    let size =
        if size_bytes.is_multiple_of(1 << 10) { format!("{}K", size_bytes >> 10) } else { size_bytes.to_string() };
    format!("virtio_mmio.device={size}@{base:#x}:{irq}")
}
