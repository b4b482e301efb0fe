//! A minimal virtio-mmio "version 2" transport and split virtqueues, driven from ring 3.
//!
//! Hand-rolled: the guest is `no_std` without an allocator and drives one device with a
//! handful of queues, each with at most one descriptor chain in flight; the rust-vmm
//! crates are the device side. Everything is polled (the guest runs with IF=0): the
//! driver publishes a chain, notifies, and spins on the used ring's index with a
//! timeout. Register accesses are volatile 32-bit loads and stores to the identity-mapped
//! window (ring 0 maps the MMIO hole uncached, user-accessible); ring memory is ordered
//! with full fences around every hand-over to the device.
//!
//! The queues' memory is a static in `.bss`: below `WORKLOAD_MIN_GPA` (the linker script
//! asserts the image ends there) and so never part of the workload region.

use core::fmt;
use core::hint::spin_loop;
use core::ptr::addr_of_mut;
use core::sync::atomic::{fence, Ordering};

use faultline_abi::virtio::{self, desc_flags, mmio, status, MmioDevice};

use crate::smp::Shared;
use crate::tsc;

/// Most entries per queue this driver uses (one page holds descriptors and both rings).
pub const QUEUE_SIZE_MAX: u16 = 64;
/// Most queues one device gets.
pub const MAX_QUEUES: usize = 5;
/// Offset of the available ring in a queue's page (after 64 * 16 bytes of descriptors).
const AVAIL_OFFSET: usize = 1024;
/// Offset of the used ring in a queue's page (4-byte aligned, after the avail ring).
const USED_OFFSET: usize = 2048;
/// How long the device may take to use a buffer before the driver gives up.
pub const DEVICE_TIMEOUT_MS: u64 = 10_000;

/// One page per queue: descriptor table, available ring, used ring.
#[repr(C, align(4096))]
struct QueuePage([u8; 4096]);

static QUEUE_PAGES: Shared<[QueuePage; MAX_QUEUES]> = Shared::new([const { QueuePage([0; 4096]) }; MAX_QUEUES]);

/// What went wrong talking to a virtio-mmio device.
#[derive(Debug, Clone, Copy)]
pub enum VirtioError {
    /// The window does not start with the virtio magic value.
    BadMagic {
        /// Window base.
        base: u64,
        /// What was read.
        found: u32,
    },
    /// The window speaks a version other than 2 (legacy virtio-mmio is version 1).
    BadVersion {
        /// Window base.
        base: u64,
        /// The version read.
        version: u32,
    },
    /// The window lies outside what the guest's page tables map.
    Unmapped {
        /// Window base.
        base: u64,
    },
    /// The device did not keep FEATURES_OK after the driver's feature choice.
    FeaturesRejected {
        /// The features the driver wrote.
        features: u64,
    },
    /// The device lacks VIRTIO_F_VERSION_1.
    NoVersion1 {
        /// The features it offered.
        offered: u64,
    },
    /// A queue the negotiated features call for is missing (QueueNumMax 0) or already live.
    QueueUnavailable {
        /// The queue index.
        index: u16,
    },
    /// The device did not use a buffer in time.
    Timeout {
        /// The queue index.
        index: u16,
    },
    /// The device's status did not read 0 after a reset.
    ResetTimeout,
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset {
        /// Its status register.
        status: u32,
    },
    /// The device used a chain the driver never made available.
    BadUsedId {
        /// The queue index.
        index: u16,
        /// The id it returned.
        id: u32,
    },
}

impl fmt::Display for VirtioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadMagic { base, found } => {
                write!(f, "virtio-mmio at {base:#x}: magic {found:#x} is not 0x74726976 (is a device there?)")
            }
            Self::BadVersion { base, version } => write!(
                f,
                "virtio-mmio at {base:#x}: version {version}, this driver needs version 2 \
                 (QEMU: add -global virtio-mmio.force-legacy=false)"
            ),
            Self::Unmapped { base } => {
                write!(f, "virtio-mmio at {base:#x}: outside the guest's identity map; place the window below it")
            }
            Self::FeaturesRejected { features } => {
                write!(f, "the device refused features {features:#x} (FEATURES_OK did not stick)")
            }
            Self::NoVersion1 { offered } => {
                write!(f, "the device offers {offered:#x} without VIRTIO_F_VERSION_1; legacy devices are not supported")
            }
            Self::QueueUnavailable { index } => {
                write!(
                    f,
                    "queue {index} is not available (QueueNumMax 0 or already ready) though its feature was negotiated"
                )
            }
            Self::Timeout { index } => {
                write!(f, "queue {index}: the device used no buffer within {DEVICE_TIMEOUT_MS} ms")
            }
            Self::ResetTimeout => write!(f, "the device did not finish its reset within {DEVICE_TIMEOUT_MS} ms"),
            Self::NeedsReset { status } => write!(f, "the device set DEVICE_NEEDS_RESET (status {status:#x})"),
            Self::BadUsedId { index, id } => {
                write!(f, "queue {index}: the device used descriptor {id}, not one in flight")
            }
        }
    }
}

/// One virtio-mmio register window.
pub struct Transport {
    base: u64,
    tsc_khz: u64,
}

impl Transport {
    /// Opens the window of `device` and checks magic and version; returns it with the
    /// device id (0 = no device behind this window). `mapped_bytes` is how much ring 0
    /// identity-mapped.
    pub fn probe(device: MmioDevice, mapped_bytes: u64, tsc_khz: u64) -> Result<(Transport, u32), VirtioError> {
        if device.base.saturating_add(device.size) > mapped_bytes {
            return Err(VirtioError::Unmapped { base: device.base });
        }
        let transport = Transport { base: device.base, tsc_khz };
        let magic = transport.read(mmio::MAGIC_VALUE);
        if magic != mmio::MAGIC {
            return Err(VirtioError::BadMagic { base: device.base, found: magic });
        }
        let version = transport.read(mmio::VERSION);
        if version != 2 {
            return Err(VirtioError::BadVersion { base: device.base, version });
        }
        let id = transport.read(mmio::DEVICE_ID);
        Ok((transport, id))
    }

    /// The window's base address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Reads a 32-bit register.
    pub fn read(&self, offset: u64) -> u32 {
        // SAFETY: `base` is a virtio-mmio window inside the identity map (checked in
        // `probe`); the register is 4-byte aligned. A volatile load is one MMIO read.
        unsafe { ((self.base + offset) as *const u32).read_volatile() }
    }

    /// Writes a 32-bit register.
    pub fn write(&self, offset: u64, value: u32) {
        // SAFETY: as for `read`; a volatile store is one MMIO write.
        unsafe { ((self.base + offset) as *mut u32).write_volatile(value) }
    }

    /// Resets the device, acknowledges it, negotiates features with `choose` (which gets
    /// the offered features and returns the accepted ones, or `None` to refuse) and checks
    /// FEATURES_OK. Returns the negotiated features. The driver then sets up its queues
    /// and calls [`Transport::driver_ok`].
    pub fn initialize(&self, choose: impl FnOnce(u64) -> Option<u64>) -> Result<u64, VirtioError> {
        self.write(mmio::STATUS, 0);
        let deadline = tsc::now() + tsc::ms_to_cycles(DEVICE_TIMEOUT_MS, self.tsc_khz);
        while self.read(mmio::STATUS) != 0 {
            if tsc::now() > deadline {
                return Err(VirtioError::ResetTimeout);
            }
            spin_loop();
        }
        self.write(mmio::STATUS, status::ACKNOWLEDGE);
        self.write(mmio::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for half in 0..2u32 {
            self.write(mmio::DEVICE_FEATURES_SEL, half);
            offered |= u64::from(self.read(mmio::DEVICE_FEATURES)) << (32 * half);
        }
        let Some(features) = choose(offered) else {
            self.fail();
            return Err(VirtioError::NoVersion1 { offered });
        };
        for half in 0..2u32 {
            self.write(mmio::DRIVER_FEATURES_SEL, half);
            self.write(mmio::DRIVER_FEATURES, (features >> (32 * half)) as u32);
        }
        let status = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(mmio::STATUS, status);
        if self.read(mmio::STATUS) & status::FEATURES_OK == 0 {
            self.fail();
            return Err(VirtioError::FeaturesRejected { features });
        }
        Ok(features)
    }

    /// Sets DRIVER_OK: the device is live.
    pub fn driver_ok(&self) {
        fence(Ordering::SeqCst); // queue memory is initialised before the device may use it
        let status = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.write(mmio::STATUS, status);
    }

    /// Sets FAILED: the driver gave up on the device.
    pub fn fail(&self) {
        let status = self.read(mmio::STATUS);
        self.write(mmio::STATUS, status | status::FAILED);
    }

    /// An error if the device asks for a reset.
    pub fn check_status(&self) -> Result<(), VirtioError> {
        let status = self.read(mmio::STATUS);
        if status & status::DEVICE_NEEDS_RESET != 0 {
            return Err(VirtioError::NeedsReset { status });
        }
        Ok(())
    }

    /// Reads the interrupt status and acknowledges what it shows (the driver polls; this
    /// only keeps the device's interrupt line from staying asserted). Returns the bits.
    pub fn ack_interrupts(&self) -> u32 {
        let pending = self.read(mmio::INTERRUPT_STATUS);
        if pending != 0 {
            self.write(mmio::INTERRUPT_ACK, pending);
        }
        pending
    }

    /// Reads the 32-bit config field at `offset` with its generation: retried until the
    /// generation is the same before and after (virtio 1.2, 4.2.2.2).
    pub fn read_config(&self, offset: u64) -> (u32, u32) {
        loop {
            let before = self.read(mmio::CONFIG_GENERATION);
            let value = self.read(mmio::CONFIG + offset);
            if self.read(mmio::CONFIG_GENERATION) == before {
                return (value, before);
            }
        }
    }

    /// Writes the 32-bit config field at `offset`.
    pub fn write_config(&self, offset: u64, value: u32) {
        self.write(mmio::CONFIG + offset, value);
    }

    /// The current configuration generation.
    pub fn config_generation(&self) -> u32 {
        self.read(mmio::CONFIG_GENERATION)
    }

    /// Sets up queue `index` in its own static page (one queue per `slot`, each slot used
    /// by one queue of one device).
    pub fn setup_queue(&self, index: u16, slot: usize) -> Result<Virtqueue, VirtioError> {
        self.write(mmio::QUEUE_SEL, u32::from(index));
        if self.read(mmio::QUEUE_READY) != 0 {
            return Err(VirtioError::QueueUnavailable { index });
        }
        let size = virtio::queue_size(self.read(mmio::QUEUE_NUM_MAX), QUEUE_SIZE_MAX)
            .ok_or(VirtioError::QueueUnavailable { index })?;
        // SAFETY: each slot is handed out once, to this queue, and used only through it.
        let page = unsafe { addr_of_mut!((*QUEUE_PAGES.get())[slot].0) } as *mut u8;
        // SAFETY: the page is 4 KiB of our own .bss, not yet shared with the device.
        unsafe { page.write_bytes(0, 4096) };
        let gpa = page as u64; // identity-mapped: the address is the guest physical address
        self.write(mmio::QUEUE_NUM, u32::from(size));
        let set = |low, high, address: u64| {
            self.write(low, address as u32);
            self.write(high, (address >> 32) as u32);
        };
        set(mmio::QUEUE_DESC_LOW, mmio::QUEUE_DESC_HIGH, gpa);
        set(mmio::QUEUE_DRIVER_LOW, mmio::QUEUE_DRIVER_HIGH, gpa + AVAIL_OFFSET as u64);
        set(mmio::QUEUE_DEVICE_LOW, mmio::QUEUE_DEVICE_HIGH, gpa + USED_OFFSET as u64);
        fence(Ordering::SeqCst);
        self.write(mmio::QUEUE_READY, 1);
        Ok(Virtqueue { index, size, page, next_avail: 0, last_used: 0, in_flight: false })
    }

    /// Polls `queue` until the device uses the chain in flight; returns the bytes it wrote.
    pub fn wait_used(&self, queue: &mut Virtqueue) -> Result<u32, VirtioError> {
        let deadline = tsc::now() + tsc::ms_to_cycles(DEVICE_TIMEOUT_MS, self.tsc_khz);
        let mut polls = 0u32;
        loop {
            if let Some(written) = queue.poll_used()? {
                return Ok(written);
            }
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(1024) {
                self.check_status()?;
                if tsc::now() > deadline {
                    return Err(VirtioError::Timeout { index: queue.index });
                }
            }
            spin_loop();
        }
    }

    /// Makes `buffers` (guest physical address, bytes, device-writable) available on
    /// `queue` as one chain and notifies the device.
    pub fn submit(&self, queue: &mut Virtqueue, buffers: &[(u64, u32, bool)]) {
        queue.publish(buffers);
        fence(Ordering::SeqCst); // the avail index is visible before the notification
        self.write(mmio::QUEUE_NOTIFY, u32::from(queue.index));
    }
}

/// A split virtqueue with at most one chain in flight (descriptors `0..n` every time).
pub struct Virtqueue {
    index: u16,
    size: u16,
    page: *mut u8,
    next_avail: u16,
    last_used: u16,
    in_flight: bool,
}

impl Virtqueue {
    /// Descriptors per chain at most.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Whether a chain is waiting for the device.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    fn publish(&mut self, buffers: &[(u64, u32, bool)]) {
        assert!(!self.in_flight, "queue {}: a chain is already in flight", self.index);
        assert!(!buffers.is_empty() && buffers.len() <= usize::from(self.size), "chain of {} buffers", buffers.len());
        for (i, &(gpa, len, writable)) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let flags = if writable { desc_flags::WRITE } else { 0 } | if last { 0 } else { desc_flags::NEXT };
            // SAFETY: descriptor i < size <= 64 lies in the first 1 KiB of our queue page,
            // which the device only reads after the avail index below publishes it.
            unsafe {
                let desc = self.page.add(16 * i);
                (desc as *mut u64).write_volatile(gpa);
                (desc.add(8) as *mut u32).write_volatile(len);
                (desc.add(12) as *mut u16).write_volatile(flags);
                (desc.add(14) as *mut u16).write_volatile(if last { 0 } else { i as u16 + 1 });
            }
        }
        let slot = usize::from(self.next_avail % self.size);
        // SAFETY: the avail ring (flags, idx, ring[size]) lies at AVAIL_OFFSET in our page.
        unsafe {
            let avail = self.page.add(AVAIL_OFFSET);
            (avail.add(4 + 2 * slot) as *mut u16).write_volatile(0); // head: descriptor 0
            fence(Ordering::SeqCst); // descriptors and ring entry before the index
            self.next_avail = self.next_avail.wrapping_add(1);
            (avail.add(2) as *mut u16).write_volatile(self.next_avail);
        }
        self.in_flight = true;
    }

    /// The bytes written by the device if it has used the chain in flight, else `None`.
    fn poll_used(&mut self) -> Result<Option<u32>, VirtioError> {
        // SAFETY: the used ring (flags, idx, ring[size] of {id u32, len u32}) lies at
        // USED_OFFSET in our page; the device writes it, so every read is volatile.
        unsafe {
            let used = self.page.add(USED_OFFSET);
            let idx = (used.add(2) as *const u16).read_volatile();
            if idx == self.last_used {
                return Ok(None);
            }
            fence(Ordering::SeqCst); // the entry is read after the index that published it
            let slot = usize::from(self.last_used % self.size);
            let id = (used.add(4 + 8 * slot) as *const u32).read_volatile();
            let len = (used.add(8 + 8 * slot) as *const u32).read_volatile();
            self.last_used = self.last_used.wrapping_add(1);
            if id != 0 || !self.in_flight {
                return Err(VirtioError::BadUsedId { index: self.index, id });
            }
            self.in_flight = false;
            Ok(Some(len))
        }
    }

    /// Like [`Transport::wait_used`] without waiting: `Some(bytes)` if the device has
    /// used the chain in flight.
    pub fn try_used(&mut self) -> Result<Option<u32>, VirtioError> {
        if !self.in_flight {
            return Ok(None);
        }
        self.poll_used()
    }
}
