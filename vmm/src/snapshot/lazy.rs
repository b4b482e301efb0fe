//! Lazy restore: a [`PageSource`] over a snapshot chain, so the restored VM starts at once
//! and each page is read from the images on its first touch (userfaultfd MISSING faults
//! resolved by the fault engine with COPY, or ZEROPAGE for pages no image carries).
//!
//! A page's contents come from the topmost snapshot of the chain whose image carries it
//! (a diff over its parent), else it is zero. Lookups are a binary search per chain link
//! over the image's sorted ranges. The state file, the chain and every image's size are
//! checked up front; the image bytes are checked chunk by chunk (`snapshot::chunks`): the
//! first read of any page of a 2 MiB chunk reads and checks the whole chunk's carried
//! bytes, the verdict is kept, and a chunk that does not match its checksum fails the
//! read (and so the fault, which ends the VM with the file and the chunk's offset)
//! before any of its bytes reach the guest.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use crate::memory::RamRegion;
use crate::smmu::page_source::{PageData, PageSource, PageSourceError};

use super::{Chain, SnapshotError};

/// One snapshot's image of one zone, open.
struct LinkImage {
    file: File,
    path: PathBuf,
    ranges: Vec<(u64, u64)>,
    chunk_bytes: u64,
    chunk_crc32: Vec<u32>,
    /// Per chunk: [`UNCHECKED`], [`GOOD`] or [`BAD`].
    verdicts: Vec<AtomicU8>,
}

/// A chunk's verdict: not read yet, matches its checksum, does not.
const UNCHECKED: u8 = 0;
const GOOD: u8 = 1;
const BAD: u8 = 2;

impl LinkImage {
    fn new(file: File, path: PathBuf, image: &crate::snapshot::format::ZoneImage) -> Self {
        let verdicts = image.chunk_crc32.iter().map(|_| AtomicU8::new(UNCHECKED)).collect();
        LinkImage {
            file,
            path,
            ranges: image.ranges.clone(),
            chunk_bytes: image.chunk_bytes,
            chunk_crc32: image.chunk_crc32.clone(),
            verdicts,
        }
    }

    /// Checks (once) every chunk that `from..to` touches. Two threads may check the same
    /// chunk at once; both reach the same verdict.
    fn check(&self, from: u64, to: u64) -> Result<(), String> {
        for chunk in from / self.chunk_bytes..to.div_ceil(self.chunk_bytes) {
            let verdict = &self.verdicts[chunk as usize];
            match verdict.load(Ordering::Acquire) {
                GOOD => continue,
                BAD => {}
                _ => {
                    let expected = self.chunk_crc32[chunk as usize];
                    match super::chunks::verify_chunk(
                        &self.file,
                        &self.path,
                        &self.ranges,
                        self.chunk_bytes,
                        expected,
                        chunk,
                    ) {
                        Ok(()) => {
                            verdict.store(GOOD, Ordering::Release);
                            continue;
                        }
                        Err(e) => {
                            verdict.store(BAD, Ordering::Release);
                            tracing::error!("lazy restore: {e}");
                            return Err(e.to_string());
                        }
                    }
                }
            }
            return Err(format!(
                "{}: the chunk at offset {:#x} does not match its checksum (the image was changed after the snapshot); restore from an intact copy",
                self.path.display(),
                chunk * self.chunk_bytes
            ));
        }
        Ok(())
    }

    /// The end of the carried range that holds `offset`, if one does.
    fn carried_until(&self, offset: u64) -> Option<u64> {
        let index = self.ranges.partition_point(|&(start, _)| start <= offset);
        let &(start, len) = self.ranges.get(index.checked_sub(1)?)?;
        (offset < start + len).then_some(start + len)
    }

    /// The next carried offset after `offset` (where zero or a lower link stops).
    fn next_start(&self, offset: u64) -> Option<u64> {
        let index = self.ranges.partition_point(|&(start, _)| start <= offset);
        self.ranges.get(index).map(|r| r.0)
    }
}

/// Where one guest-physical slot's bytes are in its zone.
#[derive(Debug, Clone, Copy)]
struct Slot {
    gpa: u64,
    size_bytes: u64,
    zone: usize,
    zone_offset: u64,
}

/// Pages of a snapshot chain, read on demand.
pub struct ChainSource {
    /// Per zone, its image in each link of the chain, base first.
    zones: Vec<Vec<LinkImage>>,
    /// The restored VM's memory layout: known once its guest RAM exists, which is after
    /// the fault engine (and so this source) was handed over.
    slots: std::sync::OnceLock<Vec<Slot>>,
}

impl std::fmt::Debug for ChainSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainSource").field("zones", &self.zones.len()).field("slots", &self.slots).finish()
    }
}

impl ChainSource {
    /// Opens every image of `chain`.
    pub fn open(chain: &Chain) -> Result<Self, SnapshotError> {
        chain.check_files()?;
        let zone_count = chain.top().images.len();
        let mut zones: Vec<Vec<LinkImage>> = (0..zone_count).map(|_| Vec::new()).collect();
        for (dir, state) in &chain.links {
            for image in &state.images {
                let path = dir.join(&image.file);
                let file = File::open(&path).map_err(|source| SnapshotError::Io {
                    path: path.clone(),
                    what: "open",
                    source,
                })?;
                zones[image.zone].push(LinkImage::new(file, path, image));
            }
        }
        Ok(ChainSource { zones, slots: std::sync::OnceLock::new() })
    }

    /// Tells the source where guest RAM lies (once, before any vCPU runs).
    pub fn set_layout(&self, regions: &[RamRegion]) {
        let slots = regions
            .iter()
            .map(|r| Slot { gpa: r.gpa, size_bytes: r.size_bytes, zone: r.zone, zone_offset: r.fd_offset })
            .collect();
        let _ = self.slots.set(slots);
    }

    /// How many zones the chain has.
    pub fn zone_count(&self) -> usize {
        self.zones.len()
    }

    /// Zone `zone`'s bytes from `offset` into `buf` (the page server's lookup: by zone
    /// offset, not guest-physical address). Zero when no image carries them, or they are
    /// all zero.
    pub fn read_zone(&self, zone: usize, offset: u64, buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        if zone >= self.zones.len() {
            return Err(PageSourceError::Failed { gpa: offset, reason: format!("zone {zone} is not in the snapshot") });
        }
        let any = self.fill(zone, offset, buf, Path::new("snapshot image"))?;
        if !any || super::image::is_zero(buf) {
            return Ok(PageData::Zero);
        }
        Ok(PageData::Filled)
    }

    /// The parts of zone `zone` that this chain carries inside the window of `len` bytes
    /// at `offset` (a memory region's share of the zone), rounded out to `page_bytes`:
    /// `(from, to)` zone offsets.
    pub fn carried_within(&self, zone: usize, offset: u64, len: u64, page_bytes: u64) -> Vec<(u64, u64)> {
        self.carried_ranges(zone)
            .into_iter()
            .filter_map(|(start, carried)| {
                let from = start.max(offset);
                let to = (start + carried).min(offset + len);
                (from < to).then(|| (from / page_bytes * page_bytes, to.div_ceil(page_bytes) * page_bytes))
            })
            .collect()
    }

    /// The byte ranges of zone `zone` some image of the chain carries, sorted and merged
    /// (what a background prefetch has to install; the rest is zero).
    pub fn carried_ranges(&self, zone: usize) -> Vec<(u64, u64)> {
        let Some(links) = self.zones.get(zone) else { return Vec::new() };
        let mut spans: Vec<(u64, u64)> =
            links.iter().flat_map(|link| link.ranges.iter().map(|&(start, len)| (start, start + len))).collect();
        spans.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (start, end) in spans {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        merged.into_iter().map(|(start, end)| (start, end - start)).collect()
    }

    /// Fills `buf` with zone `zone`'s bytes from `offset`; true if any came from an image.
    fn fill(&self, zone: usize, offset: u64, buf: &mut [u8], path_hint: &Path) -> Result<bool, PageSourceError> {
        let links = &self.zones[zone];
        let end = offset + buf.len() as u64;
        let mut at = offset;
        let mut any = false;
        while at < end {
            // The topmost link carrying `at`, and how far it carries it before a higher
            // link starts carrying.
            let mut piece_end = end;
            let mut found = None;
            for (depth, link) in links.iter().enumerate().rev() {
                if let Some(until) = link.carried_until(at) {
                    found = Some((depth, until.min(piece_end)));
                    break;
                }
                if let Some(next) = link.next_start(at) {
                    piece_end = piece_end.min(next);
                }
            }
            let slice = |from: u64, to: u64| (from - offset) as usize..(to - offset) as usize;
            match found {
                Some((depth, until)) => {
                    links[depth].check(at, until).map_err(|reason| PageSourceError::Failed { gpa: at, reason })?;
                    let range = slice(at, until);
                    links[depth].file.read_exact_at(&mut buf[range.clone()], at).map_err(|source| {
                        tracing::debug!("lazy restore read failed in {}", path_hint.display());
                        PageSourceError::Read { offset: at, len: range.len(), source }
                    })?;
                    any = true;
                    at = until;
                }
                None => {
                    buf[slice(at, piece_end)].fill(0);
                    at = piece_end;
                }
            }
        }
        Ok(any)
    }
}

impl PageSource for ChainSource {
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        let slots = self.slots.get().map_or(&[][..], Vec::as_slice);
        let Some(slot) = slots.iter().find(|s| gpa >= s.gpa && gpa < s.gpa + s.size_bytes) else {
            return Err(PageSourceError::Failed { gpa, reason: "not guest RAM of the restored VM".into() });
        };
        let offset = slot.zone_offset + (gpa - slot.gpa);
        let any = self.fill(slot.zone, offset, buf, Path::new("snapshot image")).map_err(|e| match e {
            // `fill` knows zone offsets; the engine reports guest-physical addresses.
            PageSourceError::Failed { reason, .. } => PageSourceError::Failed { gpa, reason },
            other => other,
        })?;
        if !any || super::image::is_zero(buf) {
            return Ok(PageData::Zero);
        }
        Ok(PageData::Filled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(pages: &[(u64, u8)], ranges: Vec<(u64, u64)>) -> LinkImage {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0u8; 64 << 10]).unwrap();
        for &(page, byte) in pages {
            file.write_all_at(&[byte; 4096], page * 4096).unwrap();
        }
        let mut image = crate::snapshot::format::ZoneImage {
            zone: 0,
            file: String::new(),
            size_bytes: 64 << 10,
            page_bytes: 4096,
            ranges,
            crc32: 0,
            chunk_bytes: crate::snapshot::chunks::CHUNK_BYTES,
            chunk_crc32: vec![0],
        };
        let mut sums = crate::snapshot::chunks::ChunkSums::new(64 << 10, 4096);
        for &(start, len) in &image.ranges {
            let mut bytes = vec![0u8; len as usize];
            file.read_exact_at(&mut bytes, start).unwrap();
            sums.add(start, &bytes);
        }
        image.chunk_crc32 = sums.finish().1;
        LinkImage::new(file, PathBuf::from("test.img"), &image)
    }

    #[test]
    fn the_topmost_link_carrying_a_byte_wins_and_the_rest_is_zero() {
        // Base carries pages 0-3 (page 2 a zero page it carries), the diff page 1 and 5.
        let base = image(&[(0, 0xb0), (1, 0xb1), (3, 0xb3)], vec![(0, 4 << 12)]);
        let diff = image(&[(1, 0xd1), (5, 0xd5)], vec![(1 << 12, 1 << 12), (5 << 12, 1 << 12)]);
        let source = ChainSource { zones: vec![vec![base, diff]], slots: std::sync::OnceLock::new() };
        source.set_layout(&[RamRegion {
            zone: 0,
            backend: crate::config::Backend::Anon,
            gpa: 0x10_0000,
            size_bytes: 64 << 10,
            host_addr: 0,
            page_bytes: 4096,
            fd: None,
            fd_offset: 0,
            path: None,
        }]);
        let mut page = vec![0xffu8; 4096];
        let expect = [(0, Some(0xb0)), (1, Some(0xd1)), (2, None), (3, Some(0xb3)), (4, None), (5, Some(0xd5))];
        for (index, byte) in expect {
            let data = source.read_page(0x10_0000 + index * 4096, &mut page).unwrap();
            match byte {
                Some(b) => assert!(data == PageData::Filled && page.iter().all(|&x| x == b), "page {index}"),
                None => assert_eq!(data, PageData::Zero, "page {index}"),
            }
        }
        // A 16 KiB read (a bigger page unit than the images') mixes links piece by piece.
        let mut big = vec![0xffu8; 16 << 10];
        assert_eq!(source.read_page(0x10_0000, &mut big).unwrap(), PageData::Filled);
        let firsts: Vec<u8> = big.chunks(4096).map(|c| c[0]).collect();
        assert_eq!(firsts, [0xb0, 0xd1, 0, 0xb3]);
        assert!(source.read_page(0x9_0000, &mut page).is_err(), "outside guest RAM");
    }

    #[test]
    fn a_changed_byte_fails_every_read_of_its_chunk_with_the_file_and_offset() {
        let base = image(&[(0, 0xb0), (1, 0xb1)], vec![(0, 2 << 12)]);
        base.file.write_all_at(&[0xee], 4096 + 17).unwrap();
        let source = ChainSource { zones: vec![vec![base]], slots: std::sync::OnceLock::new() };
        let mut page = vec![0u8; 4096];
        for _ in 0..2 {
            // Page 0 itself is intact: its chunk is not, so it is refused too (and again).
            let err = source.read_zone(0, 0, &mut page).unwrap_err().to_string();
            assert!(err.contains("test.img") && err.contains("offset 0x0"), "{err}");
        }
        // A page no image carries is zero without reading a chunk.
        assert_eq!(source.read_zone(0, 8 << 12, &mut page).unwrap(), PageData::Zero);
    }
}
