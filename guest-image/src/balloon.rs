//! The virtio-balloon driver: finds the device from `virtio_mmio.device=`, negotiates
//! features, sets up the queues the negotiated features call for (indices from
//! [`BalloonQueues`]), and offers the operations the `balloon` step needs: read the
//! host's target, write `actual`, inflate and deflate PFN batches, answer statistics
//! requests, report free ranges. Every request waits for the device to use it, so a
//! deflated page is never touched before the host has been told (MUST_TELL_HOST).

use core::fmt;
use core::ptr::addr_of_mut;

use faultline_abi::virtio::{
    self, balloon_config, feature, has_feature, BalloonQueues, DEVICE_ID_BALLOON, STAT_ENTRY_BYTES,
};

use crate::smp::Shared;
use crate::virtio_mmio::{Transport, VirtioError, Virtqueue};

/// PFNs per inflate or deflate request: 128 MiB of guest pages in one 128 KiB buffer, so
/// a GiB takes 8 requests (and 8 `actual` updates) instead of Linux's 1024 of 256 PFNs:
/// each request costs two exits and a wait for the device besides its pages. The spec
/// sets no limit; QEMU and Faultline read a buffer of any length.
pub const PFNS_PER_REQUEST: usize = 32768;
/// Most statistics entries sent.
const MAX_STATS: usize = 8;

/// Buffers the device reads: PFN arrays and the statistics block.
#[repr(C, align(4096))]
struct Buffers {
    pfns: [u32; PFNS_PER_REQUEST],
    stats: [u8; MAX_STATS * STAT_ENTRY_BYTES],
}

static BUFFERS: Shared<Buffers> = Shared::new(Buffers { pfns: [0; PFNS_PER_REQUEST], stats: [0; MAX_STATS * 10] });

/// Why the balloon could not be driven.
#[derive(Debug, Clone, Copy)]
pub enum BalloonError {
    /// No `virtio_mmio.device=` token names a balloon.
    NotFound {
        /// Well-formed tokens seen.
        windows: usize,
    },
    /// The transport or the device failed.
    Virtio(VirtioError),
}

impl From<VirtioError> for BalloonError {
    fn from(error: VirtioError) -> Self {
        BalloonError::Virtio(error)
    }
}

impl fmt::Display for BalloonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound { windows: 0 } => write!(
                f,
                "balloon: no virtio_mmio.device= token on the command line (Faultline: give the VM a balloon; \
                 QEMU: -M microvm,acpi=off -device virtio-balloon-device)"
            ),
            Self::NotFound { windows } => {
                write!(f, "balloon: none of the {windows} virtio_mmio.device= windows holds a balloon (device id 5)")
            }
            Self::Virtio(error) => write!(f, "balloon: {error}"),
        }
    }
}

/// A live virtio-balloon device.
pub struct Balloon {
    transport: Transport,
    features: u64,
    queues: BalloonQueues,
    inflate: Virtqueue,
    deflate: Virtqueue,
    stats: Option<Virtqueue>,
    reporting: Option<Virtqueue>,
    generation: u32,
}

impl Balloon {
    /// Finds the first balloon among the command line's `virtio_mmio.device=` windows and
    /// brings it to DRIVER_OK. A window that fails the magic/version check is an error
    /// (a VMM that names a window must put a device there).
    pub fn open(cmdline: &str, mapped_bytes: u64, tsc_khz: u64) -> Result<Balloon, BalloonError> {
        let mut windows = 0;
        for device in virtio::mmio_devices(cmdline) {
            windows += 1;
            let (transport, id) = Transport::probe(device, mapped_bytes, tsc_khz)?;
            if id == DEVICE_ID_BALLOON {
                return Ok(Self::start(transport)?);
            }
        }
        Err(BalloonError::NotFound { windows })
    }

    fn start(transport: Transport) -> Result<Balloon, VirtioError> {
        let features = transport.initialize(virtio::negotiate_balloon_features)?;
        let queues = BalloonQueues::from_features(features);
        let setup = |index: Option<u16>, slot| index.map(|index| transport.setup_queue(index, slot)).transpose();
        let inflate = transport.setup_queue(queues.inflate, 0)?;
        let deflate = transport.setup_queue(queues.deflate, 1)?;
        let stats = setup(queues.stats, 2)?;
        // queues.free_page is never negotiated (FREE_PAGE_HINT is refused).
        let reporting = setup(queues.reporting, 3)?;
        transport.driver_ok();
        let (_, generation) = transport.read_config(balloon_config::NUM_PAGES);
        Ok(Balloon { transport, features, queues, inflate, deflate, stats, reporting, generation })
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The queue indices in use.
    pub fn queues(&self) -> BalloonQueues {
        self.queues
    }

    /// The register window's base.
    pub fn base(&self) -> u64 {
        self.transport.base()
    }

    /// Whether free page reporting was negotiated.
    pub fn reporting(&self) -> bool {
        self.reporting.is_some()
    }

    /// The host's target in pages, and whether the configuration changed since the last
    /// call (a new generation). Also acknowledges pending interrupts and checks for
    /// DEVICE_NEEDS_RESET.
    pub fn target(&mut self) -> Result<(u32, bool), VirtioError> {
        self.transport.ack_interrupts();
        self.transport.check_status()?;
        let (pages, generation) = self.transport.read_config(balloon_config::NUM_PAGES);
        let changed = generation != self.generation;
        self.generation = generation;
        Ok((pages, changed))
    }

    /// Whether the configuration generation moved since [`Balloon::target`] last read it
    /// (one register read: cheap enough to poll).
    pub fn config_changed(&self) -> bool {
        self.transport.config_generation() != self.generation
    }

    /// Tells the host how many pages the guest holds in the balloon.
    pub fn set_actual(&self, pages: u32) {
        self.transport.write_config(balloon_config::ACTUAL, pages);
    }

    /// Gives `count` pages (1 to [`PFNS_PER_REQUEST`]), the `i`th being `pfn_of(i)`, to
    /// the host and waits until it has taken them.
    pub fn inflate(&mut self, count: usize, pfn_of: impl Fn(usize) -> u32) -> Result<(), VirtioError> {
        let buffer = Self::load_pfns(count, pfn_of);
        self.transport.submit(&mut self.inflate, &[buffer]);
        self.transport.wait_used(&mut self.inflate).map(|_| ())
    }

    /// Asks the host for `count` pages back (as [`Balloon::inflate`] names them) and waits
    /// until it has answered; only then may the caller touch them.
    pub fn deflate(&mut self, count: usize, pfn_of: impl Fn(usize) -> u32) -> Result<(), VirtioError> {
        let buffer = Self::load_pfns(count, pfn_of);
        self.transport.submit(&mut self.deflate, &[buffer]);
        self.transport.wait_used(&mut self.deflate).map(|_| ())
    }

    /// Writes the PFNs straight into the device buffer (no copy on the stack: the buffer
    /// is 128 KiB).
    fn load_pfns(count: usize, pfn_of: impl Fn(usize) -> u32) -> (u64, u32, bool) {
        assert!(count > 0 && count <= PFNS_PER_REQUEST);
        // SAFETY: the PFN buffer is ours; the device reads it only between submit and
        // used, and every request waits for used before the next load.
        let buffer = unsafe { &mut (*addr_of_mut!((*BUFFERS.get()).pfns)) };
        for (i, slot) in buffer[..count].iter_mut().enumerate() {
            *slot = pfn_of(i).to_le();
        }
        (buffer.as_ptr() as u64, (count * 4) as u32, false)
    }

    /// Statistics: sends `entries` the first time, and again whenever the device has
    /// returned the previous buffer (its way of asking for fresh numbers). Returns whether
    /// a buffer was sent. No-op without a statistics queue.
    pub fn service_stats(&mut self, entries: &[(u16, u64)]) -> Result<bool, VirtioError> {
        let Some(queue) = self.stats.as_mut() else { return Ok(false) };
        if queue.in_flight() && queue.try_used()?.is_none() {
            return Ok(false); // the device still holds the last buffer
        }
        // SAFETY: the stats block is ours; the device holds it only while in flight,
        // and it is not in flight here.
        let block = unsafe { &mut (*addr_of_mut!((*BUFFERS.get()).stats)) };
        let bytes = virtio::encode_stats(&entries[..entries.len().min(MAX_STATS)], block);
        self.transport.submit(queue, &[(block.as_ptr() as u64, bytes as u32, false)]);
        Ok(true)
    }

    /// Free page reporting: hands the ranges (guest physical address, bytes; page
    /// aligned) to the host as one chain and waits until it is done with them; afterwards
    /// the pages may be used again without telling. At most the queue's size of ranges.
    /// The buffers are device-writable, as Linux sends them and QEMU reads them.
    pub fn report_free(&mut self, ranges: &[(u64, u32)]) -> Result<(), VirtioError> {
        let Some(queue) = self.reporting.as_mut() else { return Ok(()) };
        let mut chain = [(0u64, 0u32, true); crate::virtio_mmio::QUEUE_SIZE_MAX as usize];
        let count = ranges.len().min(usize::from(queue.size()));
        for (slot, &(gpa, bytes)) in chain.iter_mut().zip(&ranges[..count]) {
            *slot = (gpa, bytes, true);
        }
        self.transport.submit(queue, &chain[..count]);
        self.transport.wait_used(queue).map(|_| ())
    }

    /// Most ranges one [`Balloon::report_free`] call takes.
    pub fn report_ranges_max(&self) -> usize {
        self.reporting.as_ref().map_or(0, |queue| usize::from(queue.size()))
    }

    /// Whether MUST_TELL_HOST was negotiated (the driver always tells anyway).
    pub fn must_tell_host(&self) -> bool {
        has_feature(self.features, feature::BALLOON_MUST_TELL_HOST)
    }
}
