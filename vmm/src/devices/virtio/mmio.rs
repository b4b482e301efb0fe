//! The virtio-mmio transport, "version 2" (virtio 1.2, 4.2.2): one 4 KiB window of
//! 32-bit registers, then device config space at 0x100.
//!
//! The driver negotiates features (FEATURES_OK is kept only if its features are a subset
//! of the device's and include VIRTIO_F_VERSION_1), sets up the queues that exist with the
//! negotiated features, and sets DRIVER_OK, which activates the device. Writing 0 to
//! Status resets everything. A device error sets DEVICE_NEEDS_RESET, raises a config
//! interrupt, and the transport ignores notifications until the reset.
//!
//! Its state (registers, queues with their ring indices, interrupt status and config
//! generation) is saved and restored through [`Persist`] ([`MmioTransportState`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::interrupt::VirtioInterrupt;
use super::{status, ActivateContext, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::MmioDevice;
use crate::persist::Persist;

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

/// Errors restoring a transport's saved state.
#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    /// The state is of another kind of device.
    #[error("the saved virtio-mmio state is of device type {saved}, this slot holds device type {here}; restore onto the VM configuration it was saved with")]
    DeviceType {
        /// The saved device ID.
        saved: u32,
        /// This transport's device ID.
        here: u32,
    },
    /// Some saved queues have no refused-register flags.
    #[error("the saved virtio-mmio state has {queues} queues but refused-register flags for only {refused}; the state file is damaged")]
    Refused {
        /// Queues saved.
        queues: usize,
        /// Flag sets saved.
        refused: usize,
    },
    /// A saved queue is not one virtio-queue accepts (size, alignment).
    #[error("saved virtio queue {index} cannot be set up again: {reason}; the state file is damaged")]
    Queue {
        /// The queue index.
        index: usize,
        /// virtio-queue's error.
        reason: String,
    },
}

/// One virtqueue's configuration and ring positions (virtio-queue's `QueueState`, in a
/// form serde can write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfigState {
    /// The most elements the device offers.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// The descriptor table's guest-physical address.
    pub desc_table: u64,
    /// The available ring's.
    pub avail_ring: u64,
    /// The used ring's.
    pub used_ring: u64,
    /// The next available-ring entry the device reads.
    pub next_avail: u16,
    /// The next used-ring entry the device writes.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX.
    pub event_idx: bool,
}

impl From<QueueState> for QueueConfigState {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl QueueConfigState {
    /// The queue again. Values the driver wrote that the queue refused were never in it,
    /// so every saved queue converts back.
    fn to_queue(self, index: usize) -> Result<Queue, TransportStateError> {
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|e| TransportStateError::Queue { index, reason: e.to_string() })
    }
}

/// The saved state of a virtio-mmio transport: every register the driver set, the queues
/// (from the transport before activation, from the device after) with their ring
/// indices, InterruptStatus and ConfigGeneration. The device's own state is saved by the
/// device (e.g. the balloon's handle) and must be restored before this, because
/// restoring an activated transport activates the device again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The device's virtio ID (checked on restore).
    pub device_type: u32,
    /// Status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// The queues being set up (between FEATURES_OK and DRIVER_OK).
    pub queues: Vec<QueueConfigState>,
    /// Per queue, which registers held a refused value.
    pub refused: Vec<[bool; 4]>,
    /// Each queue's (size, ready) as the driver reads them after DRIVER_OK.
    pub active_queues: Vec<(u16, bool)>,
    /// The queues the activated device works on (None: not activated).
    pub device_queues: Option<Vec<QueueConfigState>>,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Why the device needs a reset, if it does.
    pub last_error: Option<String>,
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type Error = TransportStateError;

    fn save(&self) -> Result<MmioTransportState, TransportStateError> {
        Ok(MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            refused: self.refused.clone(),
            active_queues: self.active_queues.clone(),
            device_queues: self
                .device
                .active_queue_states()
                .map(|queues| queues.into_iter().map(QueueConfigState::from).collect()),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.generation(),
            last_error: self.last_error.clone(),
        })
    }

    /// Onto a transport fresh from [`MmioTransport::new`] (its device restored first).
    /// An activated device is activated again with its saved queues, which also serves
    /// whatever the driver made available that the device had not seen yet (a kick
    /// still in flight when the VM was paused).
    fn restore(&mut self, state: &MmioTransportState) -> Result<(), TransportStateError> {
        let here = self.device.device_type();
        if state.device_type != here {
            return Err(TransportStateError::DeviceType { saved: state.device_type, here });
        }
        // Activation hands the queues to the device and keeps the flags: more flags than
        // queues is normal, fewer would leave a queue without its own.
        if state.refused.len() < state.queues.len() {
            return Err(TransportStateError::Refused { queues: state.queues.len(), refused: state.refused.len() });
        }
        let queues = state.queues.iter().enumerate().map(|(i, q)| q.to_queue(i)).collect::<Result<Vec<_>, _>>()?;
        let device_queues = match &state.device_queues {
            Some(saved) => Some(saved.iter().enumerate().map(|(i, q)| q.to_queue(i)).collect::<Result<Vec<_>, _>>()?),
            None => None,
        };
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.queues = queues;
        self.refused = state.refused.clone();
        self.active_queues = state.active_queues.clone();
        self.last_error = state.last_error.clone();
        self.interrupt.restore(state.interrupt_status, state.config_generation);
        // A device that needs a reset serves nothing until the driver resets it, which
        // rebuilds everything: it is not activated again.
        if let (Some(queues), false) = (device_queues, self.needs_reset()) {
            let context = ActivateContext { memory: self.memory.clone(), queues, features: self.driver_features };
            if let Err(e) = self.device.activate(context) {
                self.device_error(e);
            }
        }
        Ok(())
    }
}
