//! virtio-balloon (device ID 5; virtio 1.2, 5.5) with Faultline's choices from the
//! balloon contract: inflate and deflate queues, statistics (STATS_VQ), deflate on OOM,
//! free page reporting (REPORTING), MUST_TELL_HOST. Free page hinting is not offered: it
//! needs a stop-and-copy protocol with migration to be race-free.
//!
//! Queue indices come from the negotiated features, as the spec says: inflateq 0,
//! deflateq 1, then statsq if STATS_VQ, then reporting_vq if REPORTING.
//!
//! Inflated pages are coalesced into runs and discarded through
//! [`Discarder`](crate::smmu::discard::Discarder), the invalidation layer's host
//! operation for each backend. On hugetlb regions a huge page (2 MiB or 1 GiB) is freed
//! only when all of its 4 KiB pages are in the balloon ([`pages`]); until then the
//! ballooned 4 KiB pages of a resident huge page are zeroed, so a deflated page reads as
//! zeros on every backend.
//!
//! Construction, for the VMM:
//! ```ignore
//! let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK)?));
//! vm.register_irqfd(interrupt.event(), abi::VIRTIO_MMIO_FIRST_IRQ)?;
//! let (balloon, handle) = Balloon::new(BalloonConfig::default(), discarder, regions, interrupt.clone());
//! let transport = MmioTransport::new(Box::new(balloon), ram.memory().clone(), interrupt);
//! mmio_bus.insert(abi::VIRTIO_MMIO_BASE_GPA, abi::VIRTIO_MMIO_WINDOW_BYTES, Arc::new(Mutex::new(transport)))?;
//! cmdline.push(virtio_mmio_cmdline_token(abi::VIRTIO_MMIO_BASE_GPA, abi::VIRTIO_MMIO_WINDOW_BYTES, abi::VIRTIO_MMIO_FIRST_IRQ));
//! handle.set_target_pages(32768); // from any thread
//! ```

mod control;
mod discard_worker;
mod handle;
mod pages;
mod runtime;
mod saved;
mod state;
mod stats;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use handle::{BalloonCounters, BalloonHandle};
pub use saved::{BalloonState, BalloonStateError};
pub use state::{BalloonEvent, BalloonObserver};
pub use stats::GuestStats;

use super::{ActivateContext, DeviceError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::smmu::discard::Discarder;
use crate::smmu::Regions;
use runtime::{Active, QueueKind, Runtime};

/// The virtio device ID of a balloon.
pub const DEVICE_ID_BALLOON: u32 = 5;
/// Feature: the guest tells the host before it uses a deflated page.
pub const F_MUST_TELL_HOST: u32 = 0;
/// Feature: the statistics queue.
pub const F_STATS_VQ: u32 = 1;
/// Feature: the guest deflates on its own when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// Feature: free page hinting (not offered).
pub const F_FREE_PAGE_HINT: u32 = 3;
/// Feature: free page reporting.
pub const F_REPORTING: u32 = 5;
/// Bytes of config space: num_pages, actual, free_page_hint_cmd_id, poison_val (le32).
pub const CONFIG_BYTES: usize = 16;
/// Default size of every queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// What the balloon offers and where it starts.
#[derive(Debug, Clone)]
pub struct BalloonConfig {
    /// Size of each queue (a power of two, at most 32768).
    pub queue_size: u16,
    /// Offer the statistics queue.
    pub stats: bool,
    /// Offer deflate on OOM.
    pub deflate_on_oom: bool,
    /// Offer free page reporting.
    pub reporting: bool,
    /// The target at start, in 4 KiB pages (ignored when `schedule` is not empty).
    pub initial_target_pages: u32,
    /// Targets to follow in order, each next one when the guest's `actual` reaches the
    /// current one (the contract's test-driven schedule).
    pub schedule: Vec<u32>,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            queue_size: DEFAULT_QUEUE_SIZE,
            stats: true,
            deflate_on_oom: true,
            reporting: true,
            initial_target_pages: 0,
            schedule: Vec::new(),
        }
    }
}

/// Where each queue is, from the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueIndices {
    /// inflateq (always 0).
    pub inflate: u16,
    /// deflateq (always 1).
    pub deflate: u16,
    /// statsq, if STATS_VQ was negotiated.
    pub stats: Option<u16>,
    /// reporting_vq, if REPORTING was negotiated.
    pub reporting: Option<u16>,
}

impl QueueIndices {
    /// The queue layout for `features` (virtio 1.2, 5.5.2: absent queues take no index).
    pub fn for_features(features: u64) -> Self {
        let mut next = 2;
        let mut take = |bit: u32| {
            (features & (1 << bit) != 0).then(|| {
                next += 1;
                next - 1
            })
        };
        let stats = take(F_STATS_VQ);
        let _free_page_hint = take(F_FREE_PAGE_HINT);
        let reporting = take(F_REPORTING);
        Self { inflate: 0, deflate: 1, stats, reporting }
    }

    /// How many queues exist.
    pub fn count(&self) -> usize {
        2 + self.stats.is_some() as usize + self.reporting.is_some() as usize
    }

    fn kind(&self, index: u16) -> Option<QueueKind> {
        match index {
            0 => Some(QueueKind::Inflate),
            1 => Some(QueueKind::Deflate),
            i if Some(i) == self.stats => Some(QueueKind::Stats),
            i if Some(i) == self.reporting => Some(QueueKind::Reporting),
            _ => None,
        }
    }
}

/// The virtio-balloon device (give it to an [`MmioTransport`](super::MmioTransport)).
pub struct Balloon {
    features: u64,
    queue_size: u16,
    handle: Arc<BalloonHandle>,
}

impl Balloon {
    /// A balloon over guest RAM `regions`, freeing memory through `discarder` and raising
    /// interrupts through `interrupt` (the same one its transport gets). Returns the
    /// device and its handle for control threads.
    pub fn new(
        config: BalloonConfig,
        discarder: Discarder,
        regions: Arc<Regions>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> (Self, Arc<BalloonHandle>) {
        let mut features = (1u64 << VIRTIO_F_VERSION_1) | (1 << F_MUST_TELL_HOST);
        for (on, bit) in
            [(config.stats, F_STATS_VQ), (config.deflate_on_oom, F_DEFLATE_ON_OOM), (config.reporting, F_REPORTING)]
        {
            features |= (on as u64) << bit;
        }
        let pages = pages::BalloonPages::new(&regions);
        let runtime = Runtime {
            discarder,
            regions,
            pages,
            active: None,
            pending: Default::default(),
            restored_stats_head: None,
            worker: Default::default(),
        };
        let handle = Arc::new(BalloonHandle::new(runtime, interrupt, &config.schedule, config.initial_target_pages));
        (Self { features, queue_size: config.queue_size, handle: handle.clone() }, handle)
    }

    /// The handle (as returned by [`Balloon::new`]).
    pub fn handle(&self) -> &Arc<BalloonHandle> {
        &self.handle
    }

    fn config_bytes(&self) -> [u8; CONFIG_BYTES] {
        let mut bytes = [0u8; CONFIG_BYTES];
        bytes[0..4].copy_from_slice(&self.handle.target_pages().to_le_bytes());
        bytes[4..8].copy_from_slice(&self.handle.actual_pages().to_le_bytes());
        bytes
    }
}

impl Drop for Balloon {
    /// The handle may outlive the device (a control thread holds it): drop the device's
    /// view of guest memory with the device, so the handle never reaches into guest RAM
    /// after the VMM unmaps it.
    fn drop(&mut self) {
        self.handle.runtime().active = None;
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        DEVICE_ID_BALLOON
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self, negotiated: u64) -> Vec<u16> {
        vec![self.queue_size; QueueIndices::for_features(negotiated).count()]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.config_bytes();
        let start = offset.min(CONFIG_BYTES as u64) as usize;
        let end = (start + data.len()).min(CONFIG_BYTES);
        data.fill(0);
        data[..end - start].copy_from_slice(&bytes[start..end]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write (poison_val needs PAGE_POISON, not offered).
        let mut bytes = self.config_bytes();
        let Some(end) = (offset as usize).checked_add(data.len()).filter(|&e| e <= 8 && offset >= 4) else {
            tracing::debug!("balloon: config write at {offset:#x} ({} bytes) ignored", data.len());
            return;
        };
        bytes[offset as usize..end].copy_from_slice(data);
        self.handle.guest_wrote_actual(u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")));
    }

    fn config_observed(&mut self) {
        self.handle.driver_read_config();
    }

    fn activate(&mut self, context: ActivateContext) -> Result<(), DeviceError> {
        let indices = QueueIndices::for_features(context.features);
        if context.queues.len() != indices.count() {
            return Err(DeviceError::Activate(format!(
                "{} queues for features {:#x}, {} expected",
                context.queues.len(),
                context.features,
                indices.count()
            )));
        }
        let mut runtime = self.handle.runtime();
        let stats_head = runtime.restored_stats_head.take();
        let active = Active { memory: context.memory, queues: context.queues, indices, stats_head };
        runtime.active = Some(active);
        let result = runtime.process_pending(self.handle.state());
        drop(runtime);
        if let Err(e) = &result {
            self.handle.record_error(&e.to_string());
        }
        result
    }

    fn queue_notify(&mut self, index: u16) -> Result<(), DeviceError> {
        let result = self.handle.runtime().process(self.handle.state(), index);
        if let Err(e) = &result {
            self.handle.record_error(&e.to_string());
        }
        result
    }

    fn active_queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        let runtime = self.handle.runtime();
        runtime.active.as_ref().map(|active| active.queues.iter().map(|q| q.state()).collect())
    }

    fn reset(&mut self) {
        let mut runtime = self.handle.runtime();
        runtime.active = None;
        runtime.pages.clear();
        drop(runtime);
        self.handle.reset_actual();
    }
}
