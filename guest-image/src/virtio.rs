//! Pure, host-testable pieces of the guest's virtio-mmio balloon driver: register
//! offsets, feature bits, the `virtio_mmio.device=` token, feature negotiation and the
//! balloon's queue numbering. The driver itself (MMIO accesses, rings) lives in the
//! guest binary (`virtio_mmio.rs`, `balloon.rs`); everything here is plain data and
//! functions so `cargo test -p faultline-guest` runs it on the host.

/// The kernel command-line key that names a virtio-mmio device (Linux's format,
/// `size@base:irq[:id]`, e.g. `virtio_mmio.device=4K@0xd0000000:5`). May appear several
/// times, once per device.
pub const MMIO_DEVICE_KEY: &str = "virtio_mmio.device";

/// One virtio-mmio device window named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest physical address of the register window.
    pub base: u64,
    /// Bytes of the window.
    pub size: u64,
    /// Its interrupt line.
    pub irq: u32,
}

/// Parses the value of one `virtio_mmio.device=` token: `size@base:irq[:id]`, size with
/// an optional K/M/G suffix (or `0x` hex), base as `0x` hex or decimal, irq decimal.
/// Rejects a zero size, a window that wraps past 2^64, and a window too small for the
/// version-2 registers up to the config space (0x100 bytes).
pub fn parse_mmio_device(value: &str) -> Option<MmioDevice> {
    let (size, rest) = value.split_once('@')?;
    let mut parts = rest.split(':');
    let base = parse_number(parts.next()?)?;
    let irq: u32 = parts.next()?.parse().ok()?;
    if let Some(id) = parts.next() {
        let _: u32 = id.parse().ok()?; // Linux's optional platform device id
    }
    if parts.next().is_some() {
        return None;
    }
    let size = crate::parse_size(size)?;
    if size < mmio::CONFIG || base.checked_add(size).is_none() {
        return None;
    }
    Some(MmioDevice { base, size, irq })
}

/// Every well-formed `virtio_mmio.device=` token of `cmdline`, in order. Malformed
/// tokens are skipped (a VMM may name devices this guest cannot use).
pub fn mmio_devices(cmdline: &str) -> impl Iterator<Item = MmioDevice> + '_ {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|token| token.split_once('='))
        .filter(|(key, _)| *key == MMIO_DEVICE_KEY)
        .filter_map(|(_, value)| parse_mmio_device(value))
}

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// virtio-mmio "version 2" register offsets (virtio 1.2, 4.2.2), all 32-bit.
pub mod mmio {
    /// "virt" in little endian.
    pub const MAGIC_VALUE: u64 = 0x000;
    /// 2 for virtio 1.x (1 is the legacy layout, not supported).
    pub const VERSION: u64 = 0x004;
    /// Device type (5 = balloon); 0 = no device behind this window.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device feature bits, 32 at a time, selected by `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Which 32 feature bits `DEVICE_FEATURES` shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver feature bits, 32 at a time.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Which 32 feature bits `DRIVER_FEATURES` takes.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the queue the `QUEUE_*` registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest queue size the device takes (0 = queue not available).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Queue size the driver uses.
    pub const QUEUE_NUM: u64 = 0x038;
    /// 1 once the queue is set up.
    pub const QUEUE_READY: u64 = 0x044;
    /// Write a queue index to notify the device.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Bit 0: used buffer notification, bit 1: configuration change.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Write the handled `INTERRUPT_STATUS` bits back.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status (see [`super::status`]); write 0 to reset.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring ("driver area") address, low 32 bits.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Shared memory region length, low 32 bits (all ones: no such region).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory region length, high 32 bits.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Available ring address, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Used ring ("device area") address, low 32 bits.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Used ring address, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Changes whenever the device changes its configuration space.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
    /// `MAGIC_VALUE`'s contents.
    pub const MAGIC: u32 = 0x7472_6976;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 128;
}

/// The virtio device id of the memory balloon.
pub const DEVICE_ID_BALLOON: u32 = 5;

/// Feature bits the balloon driver knows (bit numbers).
pub mod feature {
    /// The host must be told before a deflated page is used.
    pub const BALLOON_MUST_TELL_HOST: u32 = 0;
    /// There is a statistics queue.
    pub const BALLOON_STATS_VQ: u32 = 1;
    /// The guest may deflate when it runs out of memory.
    pub const BALLOON_DEFLATE_ON_OOM: u32 = 2;
    /// Free page hinting (queue `free_page_vq`); this driver never takes it.
    pub const BALLOON_FREE_PAGE_HINT: u32 = 3;
    /// Free page reporting (queue `reporting_vq`).
    pub const BALLOON_REPORTING: u32 = 5;
    /// virtio 1.x (required: the legacy interface is not supported).
    pub const VERSION_1: u32 = 32;
}

/// The feature bits the balloon driver accepts when the device offers them.
pub const BALLOON_DRIVER_FEATURES: u64 = (1 << feature::VERSION_1)
    | (1 << feature::BALLOON_MUST_TELL_HOST)
    | (1 << feature::BALLOON_STATS_VQ)
    | (1 << feature::BALLOON_DEFLATE_ON_OOM)
    | (1 << feature::BALLOON_REPORTING);

/// The features to accept from `offered`, or `None` when the device lacks VERSION_1
/// (a legacy-only device this driver cannot drive).
pub fn negotiate_balloon_features(offered: u64) -> Option<u64> {
    if offered & (1 << feature::VERSION_1) == 0 {
        return None;
    }
    Some(offered & BALLOON_DRIVER_FEATURES)
}

/// Whether `features` has bit `bit`.
pub const fn has_feature(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// The balloon's queue indices for a set of negotiated features (virtio 1.2, 5.5.2):
/// inflateq 0, deflateq 1, then each optional queue takes the next index only if its
/// feature was negotiated. (Hard-coding reporting_vq = 4 is the classic bug.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonQueues {
    /// Inflate queue (always 0).
    pub inflate: u16,
    /// Deflate queue (always 1).
    pub deflate: u16,
    /// Statistics queue, if STATS_VQ.
    pub stats: Option<u16>,
    /// Free page hinting queue, if FREE_PAGE_HINT.
    pub free_page: Option<u16>,
    /// Free page reporting queue, if REPORTING.
    pub reporting: Option<u16>,
}

impl BalloonQueues {
    /// Derives the indices from the negotiated `features`.
    pub fn from_features(features: u64) -> Self {
        let mut next = 2u16;
        let mut take = |bit| {
            has_feature(features, bit).then(|| {
                next += 1;
                next - 1
            })
        };
        let stats = take(feature::BALLOON_STATS_VQ);
        let free_page = take(feature::BALLOON_FREE_PAGE_HINT);
        let reporting = take(feature::BALLOON_REPORTING);
        BalloonQueues { inflate: 0, deflate: 1, stats, free_page, reporting }
    }
}

/// Balloon configuration space offsets (from [`mmio::CONFIG`]), all le32.
pub mod balloon_config {
    /// Pages (4 KiB) the host wants in the balloon.
    pub const NUM_PAGES: u64 = 0x0;
    /// Pages the guest has in the balloon (written by the guest).
    pub const ACTUAL: u64 = 0x4;
    /// Free page hinting command id.
    pub const FREE_PAGE_HINT_CMD_ID: u64 = 0x8;
    /// Page poison value.
    pub const POISON_VAL: u64 = 0xc;
}

/// Balloon statistics tags (le16 tag + le64 value entries, virtio 1.2, 5.5.6.3).
pub mod stat {
    /// Bytes swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Bytes swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major page faults.
    pub const MAJFLT: u16 = 2;
    /// Minor page faults.
    pub const MINFLT: u16 = 3;
    /// Bytes of unused memory.
    pub const MEMFREE: u16 = 4;
    /// Bytes of memory in total.
    pub const MEMTOT: u16 = 5;
    /// Bytes available without swapping.
    pub const AVAIL: u16 = 6;
}

/// Bytes of one statistics entry (packed le16 tag + le64 value).
pub const STAT_ENTRY_BYTES: usize = 10;

/// Encodes statistics entries into `out` (10 bytes each, packed little endian);
/// returns the bytes written. Entries that do not fit are left out.
pub fn encode_stats(entries: &[(u16, u64)], out: &mut [u8]) -> usize {
    let mut written = 0;
    for &(tag, value) in entries {
        let Some(slot) = out.get_mut(written..written + STAT_ENTRY_BYTES) else { break };
        slot[..2].copy_from_slice(&tag.to_le_bytes());
        slot[2..].copy_from_slice(&value.to_le_bytes());
        written += STAT_ENTRY_BYTES;
    }
    written
}

/// Split virtqueue descriptor flags.
pub mod desc_flags {
    /// The chain continues in `next`.
    pub const NEXT: u16 = 1;
    /// Device-writable (else device-readable).
    pub const WRITE: u16 = 2;
}

/// The queue size the driver uses for a device maximum of `max`: the largest power of
/// two not above `min(max, wanted)` (split rings need a power of two), or `None` when the
/// queue is not available (`max` 0).
pub fn queue_size(max: u32, wanted: u16) -> Option<u16> {
    let limit = max.min(u32::from(wanted));
    if limit == 0 {
        return None;
    }
    Some(1u16 << (31 - limit.leading_zeros()))
}

/// Splits `pages` pages starting at `first_gpa` into page-aligned ranges of at most
/// `max_range_pages` pages each, calling `f(gpa, bytes)` for each (free page reporting
/// descriptors).
pub fn report_ranges(first_gpa: u64, pages: u64, max_range_pages: u64, mut f: impl FnMut(u64, u32)) {
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(max_range_pages.max(1));
        f(first_gpa + done * crate::PAGE_SIZE, (n * crate::PAGE_SIZE) as u32);
        done += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn mmio_tokens_parse_like_linux() {
        assert_eq!(parse_mmio_device("4K@0xd0000000:5"), Some(MmioDevice { base: 0xd000_0000, size: 4096, irq: 5 }));
        assert_eq!(parse_mmio_device("512@0xfeb00e00:12"), Some(MmioDevice { base: 0xfeb0_0e00, size: 512, irq: 12 }));
        assert_eq!(
            parse_mmio_device("0x200@4272947200:7:3"),
            Some(MmioDevice { base: 0xfeb0_0000, size: 512, irq: 7 })
        );
        for bad in ["", "4K", "4K@", "4K@0xd0000000", "4K@0xd0000000:", "4K@zz:5", "4K@0x1000:5:x", "4K@0x1000:5:1:2"] {
            assert_eq!(parse_mmio_device(bad), None, "{bad}");
        }
        // Too small for the registers, and a window that wraps.
        assert_eq!(parse_mmio_device("64@0x1000:5"), None);
        assert_eq!(parse_mmio_device("4K@0xfffffffffffff800:5"), None);
    }

    #[test]
    fn every_device_token_is_found_in_order() {
        let line = "console=ttyS0 virtio_mmio.device=512@0xfeb00000:5 fl.steps=balloon \
                    virtio_mmio.device=bogus virtio_mmio.device=4K@0xd0000000:5";
        let found: Vec<_> = mmio_devices(line).collect();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].base, 0xfeb0_0000);
        assert_eq!(found[1], MmioDevice { base: 0xd000_0000, size: 4096, irq: 5 });
        assert_eq!(mmio_devices("fl.steps=fill").count(), 0);
    }

    #[test]
    fn queue_indices_follow_negotiated_features() {
        let bit = |b: u32| 1u64 << b;
        let none = BalloonQueues::from_features(bit(feature::VERSION_1));
        assert_eq!((none.inflate, none.deflate, none.stats, none.free_page, none.reporting), (0, 1, None, None, None));
        // Reporting without stats or hinting is queue 2, not 4.
        let reporting = BalloonQueues::from_features(bit(feature::BALLOON_REPORTING));
        assert_eq!(reporting.reporting, Some(2));
        let stats_reporting =
            BalloonQueues::from_features(bit(feature::BALLOON_STATS_VQ) | bit(feature::BALLOON_REPORTING));
        assert_eq!((stats_reporting.stats, stats_reporting.reporting), (Some(2), Some(3)));
        let all = BalloonQueues::from_features(
            bit(feature::BALLOON_STATS_VQ) | bit(feature::BALLOON_FREE_PAGE_HINT) | bit(feature::BALLOON_REPORTING),
        );
        assert_eq!((all.stats, all.free_page, all.reporting), (Some(2), Some(3), Some(4)));
        // MUST_TELL_HOST and DEFLATE_ON_OOM add no queue.
        let no_queue = BalloonQueues::from_features(
            bit(feature::BALLOON_MUST_TELL_HOST)
                | bit(feature::BALLOON_DEFLATE_ON_OOM)
                | bit(feature::BALLOON_REPORTING),
        );
        assert_eq!(no_queue.reporting, Some(2));
    }

    #[test]
    fn negotiation_requires_version_1_and_never_takes_hinting() {
        let bit = |b: u32| 1u64 << b;
        assert_eq!(negotiate_balloon_features(bit(feature::BALLOON_STATS_VQ)), None);
        let offered = bit(feature::VERSION_1)
            | bit(feature::BALLOON_STATS_VQ)
            | bit(feature::BALLOON_FREE_PAGE_HINT)
            | bit(feature::BALLOON_REPORTING)
            | bit(40);
        let taken = negotiate_balloon_features(offered).unwrap();
        assert_eq!(taken, bit(feature::VERSION_1) | bit(feature::BALLOON_STATS_VQ) | bit(feature::BALLOON_REPORTING));
        // With hinting refused, reporting is queue 3 even though the device offered hinting.
        assert_eq!(BalloonQueues::from_features(taken).reporting, Some(3));
    }

    #[test]
    fn queue_sizes_are_powers_of_two_within_the_maximum() {
        assert_eq!(queue_size(0, 64), None);
        assert_eq!(queue_size(128, 64), Some(64));
        assert_eq!(queue_size(48, 64), Some(32));
        assert_eq!(queue_size(1, 64), Some(1));
        assert_eq!(queue_size(32768, 256), Some(256));
    }

    #[test]
    fn stats_encode_packed_little_endian() {
        let mut out = [0u8; 25];
        let written = encode_stats(&[(stat::MEMFREE, 0x0102), (stat::MEMTOT, u64::MAX), (stat::AVAIL, 7)], &mut out);
        assert_eq!(written, 20); // the third entry does not fit
        assert_eq!(&out[..10], &[4, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&out[10..12], &[5, 0]);
        assert_eq!(&out[12..20], &[0xff; 8]);
    }

    #[test]
    fn report_ranges_cover_every_page_once() {
        let mut ranges = Vec::new();
        report_ranges(0x80_0000, 1100, 512, |gpa, bytes| ranges.push((gpa, bytes)));
        assert_eq!(ranges, [(0x80_0000, 2 << 20), (0xa0_0000, 2 << 20), (0xc0_0000, 76 * 4096)]);
        ranges.clear();
        report_ranges(0x80_0000, 0, 512, |gpa, bytes| ranges.push((gpa, bytes)));
        assert!(ranges.is_empty());
    }
}
