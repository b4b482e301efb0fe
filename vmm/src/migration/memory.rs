//! Guest memory on the stream: `Pages` frames, each a contiguous range of one zone's
//! pages in the zone's transfer unit (4 KiB, or 2 MiB for hugetlb zones, whatever their
//! huge page size), with a bitmap marking the pages that are all zeros (they carry no
//! bytes) followed by the bytes of the others.
//!
//! Payload: zone (u32), unit shift (u32: 12 or 21), first unit (u64), count (u32),
//! reserved (u32, 0), then `ceil(count / 8)` bytes of zero map (bit `i` of byte `i / 8`:
//! page `first + i` is zero), then the non-zero pages in order.

use crate::config::{Backend, ZoneConfig};
use crate::memory::GuestRam;
use crate::snapshot::image::{self, ZoneView};

use super::MigrationError;

/// Bytes of a `Pages` payload before its zero map.
pub const BATCH_HEADER: usize = 24;
/// Most bytes of page data one frame carries.
const BATCH_DATA_BYTES: u64 = 4 << 20;
/// Most pages one frame lists.
const BATCH_MAX_PAGES: u64 = 1024;

/// The unit a zone's pages travel in.
pub fn unit_bytes(zone: &ZoneConfig) -> u64 {
    match zone.backend {
        Backend::Hugetlb => crate::config::HUGEPAGE_2M,
        _ => faultline_abi::PAGE_SIZE,
    }
}

/// Most pages in one frame for a unit.
pub fn max_batch(unit: u64) -> u64 {
    (BATCH_DATA_BYTES / unit).clamp(1, BATCH_MAX_PAGES)
}

/// A machine's zones as the migration reads and writes them.
pub struct Zones {
    views: Vec<ZoneView>,
    units: Vec<u64>,
}

/// Pages counted while sending or receiving.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// Pages that were all zeros (sent as markers).
    pub zero: u64,
    /// Pages sent with their bytes.
    pub normal: u64,
    /// Bytes of those.
    pub normal_bytes: u64,
}

impl PageCounts {
    /// Adds `other`.
    pub fn add(&mut self, other: PageCounts) {
        self.zero += other.zero;
        self.normal += other.normal;
        self.normal_bytes += other.normal_bytes;
    }
}

impl Zones {
    /// The zones of `ram`, built from `zones`.
    pub fn new(ram: &GuestRam, zones: &[ZoneConfig]) -> Self {
        Zones { views: crate::snapshot::zone_views(ram, zones), units: zones.iter().map(unit_bytes).collect() }
    }

    /// Number of zones.
    pub fn len(&self) -> usize {
        self.views.len()
    }

    /// True without zones.
    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    /// The transfer unit of zone `zone`.
    pub fn unit(&self, zone: usize) -> u64 {
        self.units[zone]
    }

    /// Units of zone `zone`.
    pub fn unit_count(&self, zone: usize) -> u64 {
        self.views[zone].size_bytes / self.units[zone]
    }

    /// The units of every zone that exist in the host (sorted per zone).
    pub fn existing_units(&self) -> Result<Vec<Vec<u64>>, MigrationError> {
        self.views
            .iter()
            .zip(&self.units)
            .map(|(view, &unit)| {
                let per_page = (view.page_bytes / unit).max(1);
                let pages = image::existing_pages(view).map_err(|e| MigrationError::Memory(e.to_string()))?;
                Ok(pages.iter().flat_map(|&p| p * per_page..(p + 1) * per_page).collect())
            })
            .collect()
    }

    /// Encodes units `first..first + count` of `zone` into `frame` (cleared first);
    /// returns what it held. The range must lie inside the zone and be at most
    /// [`max_batch`] long. The guest may run meanwhile: a page it writes during the copy
    /// is in the dirty log and sent again. Units in `absent` (sorted) go as zero markers
    /// without being read: pages discarded behind the guest (reading would bring them
    /// back, or fault into the fault engine).
    pub fn encode(&self, zone: usize, first: u64, count: u64, absent: &[u64], frame: &mut Vec<u8>) -> PageCounts {
        let unit = self.units[zone];
        let view = &self.views[zone];
        assert!(count > 0 && count <= max_batch(unit) && (first + count) * unit <= view.size_bytes);
        frame.clear();
        frame.extend_from_slice(&(zone as u32).to_le_bytes());
        frame.extend_from_slice(&unit.trailing_zeros().to_le_bytes());
        frame.extend_from_slice(&first.to_le_bytes());
        frame.extend_from_slice(&(count as u32).to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        let map_at = frame.len();
        frame.resize(map_at + count.div_ceil(8) as usize, 0);
        let mut counts = PageCounts::default();
        for i in 0..count {
            if absent.binary_search(&(first + i)).is_ok() {
                frame[map_at + (i / 8) as usize] |= 1 << (i % 8);
                counts.zero += 1;
                continue;
            }
            let at = frame.len();
            let offset = ((first + i) * unit) as usize;
            // SAFETY: [offset, offset + unit) lies inside the zone's live mapping (asserted
            // above). The guest may write the page concurrently; the copy is then torn,
            // and the page is dirty in KVM's log, so a later round (or the stop-and-copy,
            // with the vCPUs paused) sends it again. The slice lives only for the copy.
            // Reading a page that does not exist yet maps the zero page, or goes through
            // the fault engine for zones under userfaultfd.
            let page = unsafe { std::slice::from_raw_parts(view.host_addr.add(offset), unit as usize) };
            frame.extend_from_slice(page);
            if image::is_zero(&frame[at..]) {
                frame.truncate(at);
                frame[map_at + (i / 8) as usize] |= 1 << (i % 8);
                counts.zero += 1;
            } else {
                counts.normal += 1;
                counts.normal_bytes += unit;
            }
        }
        counts
    }
}

/// A `Pages` payload checked against the zones: which units it holds, which are zero,
/// and the bytes of the others in order.
pub struct PageBatch<'a> {
    /// The zone.
    pub zone: usize,
    /// Its first unit.
    pub first: u64,
    /// Units in it.
    pub count: u64,
    /// The zone's unit, bytes.
    pub unit: u64,
    map: &'a [u8],
    data: &'a [u8],
}

impl<'a> PageBatch<'a> {
    /// Checks `payload` (zone, unit size, range inside the zone, zero map, data length).
    pub fn parse(zones: &Zones, payload: &'a [u8]) -> Result<Self, MigrationError> {
        let bad = |reason: String| MigrationError::Malformed { what: "a Pages frame".into(), reason };
        if payload.len() < BATCH_HEADER {
            return Err(bad(format!("{} bytes, shorter than its {BATCH_HEADER}-byte header", payload.len())));
        }
        let u32_at = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().expect("4 bytes"));
        let zone = u32_at(0) as usize;
        let shift = u32_at(4);
        let first = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
        let count = u64::from(u32_at(16));
        if u32_at(20) != 0 {
            return Err(bad("its reserved word is not zero".into()));
        }
        if zone >= zones.len() {
            return Err(bad(format!("zone {zone}, but the VM has {} zones", zones.len())));
        }
        let unit = zones.unit(zone);
        if shift != unit.trailing_zeros() {
            return Err(bad(format!("zone {zone}: pages of 2^{shift} bytes, but the zone moves in {unit}-byte pages")));
        }
        if count == 0 || count > max_batch(unit) {
            return Err(bad(format!("{count} pages (1 to {} allowed)", max_batch(unit))));
        }
        let units = zones.unit_count(zone);
        if first.checked_add(count).is_none_or(|end| end > units) {
            return Err(bad(format!("zone {zone}: pages {first}..+{count} are outside its {units} pages")));
        }
        let map = &payload[BATCH_HEADER..];
        let map_len = count.div_ceil(8) as usize;
        if map.len() < map_len {
            return Err(bad("it ends inside its zero map".into()));
        }
        let (map, data) = map.split_at(map_len);
        if count % 8 != 0 && map[map_len - 1] >> (count % 8) != 0 {
            return Err(bad("its zero map marks pages past its count".into()));
        }
        let batch = PageBatch { zone, first, count, unit, map, data };
        let normal = (0..count).filter(|&i| !batch.is_zero(i)).count() as u64;
        if data.len() as u64 != normal * unit {
            return Err(bad(format!("{} data bytes for {normal} non-zero {unit}-byte pages", data.len())));
        }
        Ok(batch)
    }

    /// Whether unit `first + i` is all zeros.
    pub fn is_zero(&self, i: u64) -> bool {
        self.map[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Each unit in order: its index in the zone and its bytes (`None`: zero).
    pub fn units(&self) -> impl Iterator<Item = (u64, Option<&'a [u8]>)> + '_ {
        let mut at = 0usize;
        (0..self.count).map(move |i| {
            if self.is_zero(i) {
                return (self.first + i, None);
            }
            let page = &self.data[at..at + self.unit as usize];
            at += self.unit as usize;
            (self.first + i, Some(page))
        })
    }
}

/// Writes `Pages` frames into fresh guest RAM on the destination, checking each first.
pub struct Applier {
    zones: Zones,
    /// Per zone, one bit per unit: holds non-zero data from an earlier frame.
    written: Vec<Vec<u64>>,
}

impl Applier {
    /// An applier for the destination's freshly built zones (all zero, no vCPU running).
    pub fn new(zones: Zones) -> Self {
        let written = (0..zones.len()).map(|z| vec![0u64; zones.unit_count(z).div_ceil(64) as usize]).collect();
        Applier { zones, written }
    }

    /// Checks a `Pages` payload against the zones and writes it into guest RAM.
    pub fn apply(&mut self, payload: &[u8]) -> Result<PageCounts, MigrationError> {
        let batch = PageBatch::parse(&self.zones, payload)?;
        let (zone, first, count, unit) = (batch.zone, batch.first, batch.count, batch.unit);
        let is_zero = |i: u64| batch.is_zero(i);
        let data = batch.data;
        let view = self.zones.views[zone];
        let written = &mut self.written[zone];
        let mut at = 0usize;
        let mut counts = PageCounts::default();
        for i in 0..count {
            let index = first + i;
            let offset = (index * unit) as usize;
            let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
            if is_zero(i) {
                counts.zero += 1;
                // Fresh guest RAM is zero: only a page sent with data earlier needs clearing.
                if written[word] & bit != 0 {
                    // SAFETY: inside the zone's live mapping (checked above); no vCPU runs
                    // on the destination yet and nothing else writes guest RAM.
                    unsafe { std::ptr::write_bytes(view.host_addr.add(offset), 0, unit as usize) };
                    written[word] &= !bit;
                }
                continue;
            }
            // SAFETY: as above; `data` holds `unit` bytes at `at` (length checked).
            unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), view.host_addr.add(offset), unit as usize) };
            at += unit as usize;
            written[word] |= bit;
            counts.normal += 1;
            counts.normal_bytes += unit;
        }
        Ok(counts)
    }
}
