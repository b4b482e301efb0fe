//! A virtio-mmio driver for tests: it programs the transport through the MMIO bus with
//! register writes, exactly as a guest driver would, and lays out descriptor tables and
//! rings by hand in real guest memory (so tests can also lay out malformed ones).
//! Plus the rig that builds real guest RAM, a discarder and a balloon behind the bus.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::balloon::{BalloonConfig, BalloonHandle};
use super::mmio::MmioTransport;
use super::{install_balloon, status, InstalledBalloon, MmioSlot, VirtioInterrupt};
use crate::config::{Backend, ZoneConfig};
use crate::devices::MmioBus;
use crate::memory::GuestRam;
use crate::smmu::discard::Discarder;
use crate::smmu::fault_engine::{FaultEngine, FaultEngineConfig};
use crate::smmu::invalidation::Invalidation;
use crate::smmu::page_source::ZeroSource;
use crate::smmu::page_state::PageStateTable;
use crate::smmu::{RegionBacking, Regions, UffdMode, UffdRegion};

/// Where the device window is in tests.
pub const BASE: u64 = 0xd000_0000;
/// VRING_DESC_F_NEXT.
pub const NEXT: u16 = 1;
/// VRING_DESC_F_WRITE.
pub const WRITE: u16 = 2;
/// VRING_DESC_F_INDIRECT.
pub const INDIRECT: u16 = 4;

/// Register offsets a driver uses (the abi's, shared with the guest driver).
pub use faultline_abi::virtio::mmio as reg;

/// One split virtqueue as the driver lays it out in guest memory.
pub struct VirtQueue {
    /// Queue index.
    pub index: u16,
    /// Entries.
    pub size: u16,
    /// Descriptor table GPA.
    pub desc: u64,
    /// Available ring GPA.
    pub avail: u64,
    /// Used ring GPA.
    pub used: u64,
    next_free: u16,
    avail_idx: u16,
}

impl VirtQueue {
    /// A queue of `size` entries laid out from `base` (16-byte aligned).
    pub fn new(index: u16, base: u64, size: u16) -> Self {
        let avail = base + 16 * size as u64;
        let used = (avail + 6 + 2 * size as u64).next_multiple_of(4);
        Self { index, size, desc: base, avail, used, next_free: 0, avail_idx: 0 }
    }

    /// Writes descriptor `i` as given (no checks: tests write malformed ones too).
    pub fn write_desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        mem.write_obj(Descriptor::new(addr, len, flags, next), GuestAddress(self.desc + 16 * i as u64)).unwrap();
    }

    /// Publishes `head` in the available ring.
    pub fn push_avail(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * (self.avail_idx % self.size) as u64;
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Writes the avail ring's index directly.
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2)).unwrap();
    }

    /// Adds a well-formed chain of `(addr, len, writable)` buffers and makes it available;
    /// returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_free;
        for (k, &(addr, len, writable)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % self.size;
            let last = k + 1 == bufs.len();
            let flags = if writable { WRITE } else { 0 } | if last { 0 } else { NEXT };
            self.write_desc(mem, i, addr, len, flags, (i + 1) % self.size);
        }
        self.next_free = (head + bufs.len() as u16) % self.size;
        self.push_avail(mem, head);
        head
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// Used element `i`: (head id, length written).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * (i % self.size) as u64;
        (mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
    }
}

/// A driver talking to the device at [`BASE`] through the bus.
pub struct Driver<'a> {
    /// The bus the device sits on.
    pub bus: &'a MmioBus,
}

impl Driver<'_> {
    /// Reads a 32-bit register.
    pub fn read(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.bus.read(BASE + offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn write(&self, offset: u64, value: u32) {
        self.bus.write(BASE + offset, &value.to_le_bytes());
    }

    /// The device's offered features.
    pub fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES) as u64;
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        low | (self.read(reg::DEVICE_FEATURES) as u64) << 32
    }

    /// Reset, ACKNOWLEDGE, DRIVER, write `features`, FEATURES_OK; returns whether the
    /// device kept FEATURES_OK.
    pub fn negotiate(&self, features: u64) -> bool {
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.read(reg::STATUS) & status::FEATURES_OK != 0
    }

    /// QueueNumMax of queue `index`.
    pub fn queue_num_max(&self, index: u16) -> u32 {
        self.write(reg::QUEUE_SEL, index as u32);
        self.read(reg::QUEUE_NUM_MAX)
    }

    /// Programs `q` into the device and sets it ready.
    pub fn setup_queue(&self, q: &VirtQueue) {
        self.setup_queue_unready(q);
        self.write(reg::QUEUE_READY, 1);
    }

    /// Programs `q` into the device without setting it ready.
    pub fn setup_queue_unready(&self, q: &VirtQueue) {
        self.write(reg::QUEUE_SEL, q.index as u32);
        assert!(self.read(reg::QUEUE_NUM_MAX) >= q.size as u32, "queue {} too small", q.index);
        self.write(reg::QUEUE_NUM, q.size as u32);
        for (low, value) in
            [(reg::QUEUE_DESC_LOW, q.desc), (reg::QUEUE_DRIVER_LOW, q.avail), (reg::QUEUE_DEVICE_LOW, q.used)]
        {
            self.write(low, value as u32);
            self.write(low + 4, (value >> 32) as u32);
        }
    }

    /// Sets DRIVER_OK.
    pub fn driver_ok(&self) {
        let s = self.read(reg::STATUS);
        self.write(reg::STATUS, s | status::DRIVER_OK);
    }

    /// Notifies queue `index`.
    pub fn notify(&self, index: u16) {
        self.write(reg::QUEUE_NOTIFY, index as u32);
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.read(reg::STATUS)
    }

    /// Reads a le32 config field.
    pub fn config(&self, offset: u64) -> u32 {
        self.read(reg::CONFIG + offset)
    }

    /// Writes a le32 config field.
    pub fn set_config(&self, offset: u64, value: u32) {
        self.write(reg::CONFIG + offset, value);
    }
}

/// Real guest RAM, a discarder over it and a balloon on an MMIO bus.
pub struct Rig {
    /// The bus (drops first: it holds the transport, which holds guest memory).
    pub bus: MmioBus,
    /// The transport, for checking its state.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The balloon's handle.
    pub balloon: Arc<BalloonHandle>,
    /// The interrupt.
    pub interrupt: Arc<VirtioInterrupt>,
    /// The userfaultfd engine, if guest RAM is demand-paged (stops before RAM goes).
    pub engine: Option<FaultEngine>,
    /// The smmu's view of guest RAM.
    pub regions: Arc<Regions>,
    /// Guest RAM.
    pub ram: GuestRam,
}

impl Rig {
    /// Guest RAM of `size_bytes` on `backend`, with a balloon configured by `config`.
    pub fn new(size_bytes: u64, backend: Backend, config: BalloonConfig) -> Rig {
        Self::with_paging(size_bytes, backend, config, UffdMode::None)
    }

    /// Like [`Rig::new`], with guest RAM demand-paged by a fault engine in `mode`
    /// (zero-filled pages) unless `mode` is `None`.
    pub fn with_paging(size_bytes: u64, backend: Backend, config: BalloonConfig, mode: UffdMode) -> Rig {
        Self::with_zone(ZoneConfig::new(size_bytes, backend), config, mode)
    }

    /// Like [`Rig::with_paging`], for one zone as configured.
    pub fn with_zone(zone: ZoneConfig, config: BalloonConfig, mode: UffdMode) -> Rig {
        let ram = GuestRam::new(&[zone]).unwrap();
        let regions = Arc::new(smmu_regions(&ram, mode));
        let table =
            PageStateTable::new(&regions.iter().map(|r| (r.guest_addr, r.len, r.page_bytes)).collect::<Vec<_>>());
        let (table, inv) = (Arc::new(table.unwrap()), Arc::new(Invalidation::new()));
        let engine = (mode != UffdMode::None).then(|| {
            let source = Arc::new(ZeroSource);
            FaultEngine::start(regions.clone(), table.clone(), inv.clone(), source, FaultEngineConfig::default())
                .unwrap()
        });
        let discarder = Discarder::new(regions.clone(), table, inv, engine.as_ref().map(|e| e.link()));
        let mut bus = MmioBus::new();
        let slot = MmioSlot::nth(0);
        assert_eq!(slot.base, BASE);
        let installed =
            install_balloon(&mut bus, slot, ram.memory(), discarder, regions.clone(), config, None).unwrap();
        let InstalledBalloon { handle: balloon, interrupt, transport, notifier: _ } = installed;
        Rig { bus, transport, balloon, interrupt, engine, regions, ram }
    }

    /// A driver for the rig's device.
    pub fn driver(&self) -> Driver<'_> {
        Driver { bus: &self.bus }
    }

    /// Guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// Fills page `gpa` with its own pattern.
    pub fn fill_page(&self, gpa: u64) {
        let words: Vec<u8> = (0..512u64).flat_map(|w| pattern(gpa, w).to_le_bytes()).collect();
        self.mem().write_slice(&words, GuestAddress(gpa)).unwrap();
    }

    /// Whether page `gpa` still holds its pattern.
    pub fn page_has_pattern(&self, gpa: u64) -> bool {
        let mut buf = vec![0u8; 4096];
        self.mem().read_slice(&mut buf, GuestAddress(gpa)).unwrap();
        buf.chunks_exact(8)
            .enumerate()
            .all(|(w, b)| u64::from_le_bytes(b.try_into().unwrap()) == pattern(gpa, w as u64))
    }

    /// Whether page `gpa` reads as zeros.
    pub fn page_is_zero(&self, gpa: u64) -> bool {
        let mut buf = vec![0u8; 4096];
        self.mem().read_slice(&mut buf, GuestAddress(gpa)).unwrap();
        buf.iter().all(|&b| b == 0)
    }

    /// Whether the device is in DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.transport.lock().unwrap().needs_reset()
    }
}

/// The per-page test pattern (never zero).
pub fn pattern(gpa: u64, word: u64) -> u64 {
    (gpa + 8 * word) | (1 << 63)
}

/// The smmu's regions for `ram` (what the VMM builds; fds duplicated so each side owns
/// its own).
pub fn smmu_regions(ram: &GuestRam, mode: UffdMode) -> Regions {
    let dup = |raw| -> Arc<OwnedFd> {
        // SAFETY: `raw` is the backing fd of a zone of `ram`, open while `ram` lives; it is
        // only borrowed for the duplication.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        Arc::new(rustix::io::fcntl_dupfd_cloexec(fd, 0).unwrap())
    };
    Regions::new(
        ram.regions()
            .iter()
            .map(|r| {
                let backing = match (r.backend, r.fd) {
                    (Backend::Hugetlb, fd) => RegionBacking::Hugetlb { fd: fd.map(dup), file_offset: r.fd_offset },
                    (_, Some(fd)) => RegionBacking::Shared { fd: dup(fd), file_offset: r.fd_offset },
                    (_, None) => RegionBacking::PrivateAnon,
                };
                UffdRegion {
                    guest_addr: r.gpa,
                    host_addr: r.host_addr,
                    len: r.size_bytes,
                    page_bytes: r.page_bytes,
                    backing,
                    mode,
                    write_protect: false,
                }
            })
            .collect(),
    )
}
