//! Which granules of a region the host holds contents for right now: for shared and
//! file-backed hugetlb backings the file's data extents (`SEEK_DATA`/`SEEK_HOLE`, which
//! count swapped-out shmem pages too), for private anonymous memory `/proc/self/pagemap`
//! (present, or a real swap entry; a userfaultfd write-protect marker holds nothing).
//!
//! The page-state table knows what was discarded, but in a region nobody tracks page by
//! page (paged by the kernel) a discarded page the guest touched again still reads as
//! discarded there; this is what tells the two apart.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use super::coherence::holds_contents;
use super::{GuestRange, RegionBacking, UffdRegion, PAGE_4K};

/// For each granule of `range` (inside `region`, granule-aligned): whether the host
/// holds contents for it.
pub fn held(region: &UffdRegion, range: GuestRange) -> std::io::Result<Vec<bool>> {
    let granule = region.page_bytes;
    let granules = (range.len / granule) as usize;
    let fd = match &region.backing {
        RegionBacking::Shared { fd, file_offset } | RegionBacking::Hugetlb { fd: Some(fd), file_offset } => {
            Some((fd.clone(), *file_offset))
        }
        RegionBacking::PrivateAnon | RegionBacking::Hugetlb { fd: None, .. } => None,
    };
    let Some((fd, file_offset)) = fd else {
        let pagemap = File::open("/proc/self/pagemap")?;
        let pages = (range.len / PAGE_4K) as usize;
        let mut bytes = vec![0u8; pages * 8];
        pagemap.read_exact_at(&mut bytes, region.host_of(range.gpa) / PAGE_4K * 8)?;
        let per_granule = (granule / PAGE_4K) as usize;
        let entries: Vec<u64> =
            bytes.chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes"))).collect();
        return Ok(entries.chunks(per_granule).map(|g| g.iter().any(|&e| holds_contents(e))).collect());
    };
    let start = file_offset + (range.gpa - region.guest_addr);
    let end = start + range.len;
    let mut out = vec![false; granules];
    let mut at = start;
    while at < end {
        let data = match rustix::fs::seek(fd.as_fd(), rustix::fs::SeekFrom::Data(at)) {
            Ok(offset) => offset,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = rustix::fs::seek(fd.as_fd(), rustix::fs::SeekFrom::Hole(data))?.min(end);
        let first = ((data - start) / granule) as usize;
        let last = ((hole - start).div_ceil(granule) as usize).min(granules);
        out[first..last].iter_mut().for_each(|g| *g = true);
        at = hole.max(data + 1);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::config::{Backend, ZoneConfig};
    use crate::memory::GuestRam;
    use crate::smmu::{Regions, UffdMode};

    /// The smmu's region for the one zone of `ram` (its fd duplicated).
    fn smmu_regions(ram: &GuestRam) -> Regions {
        let r = &ram.regions()[0];
        let backing = match r.fd {
            Some(raw) => {
                // SAFETY: the zone's fd, open while `ram` lives; only borrowed to duplicate it.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
                let fd = std::sync::Arc::new(fd.try_clone_to_owned().unwrap());
                RegionBacking::Shared { fd, file_offset: r.fd_offset }
            }
            None => RegionBacking::PrivateAnon,
        };
        Regions::new(vec![UffdRegion {
            guest_addr: r.gpa,
            host_addr: r.host_addr,
            len: r.size_bytes,
            page_bytes: r.page_bytes,
            backing,
            mode: UffdMode::None,
            write_protect: false,
        }])
    }

    fn written_pages_are_held_and_discarded_ones_not(backend: Backend) {
        let ram = GuestRam::new(&[ZoneConfig::new(1 << 20, backend)]).unwrap();
        let regions = smmu_regions(&ram);
        let region = regions.iter().next().unwrap();
        for page in [1u64, 3, 4] {
            ram.memory().write_slice(&[7u8; 16], GuestAddress(page * PAGE_4K)).unwrap();
        }
        let range = GuestRange::new(0, 8 * PAGE_4K);
        let want = [false, true, false, true, true, false, false, false];
        assert_eq!(held(region, range).unwrap(), want, "{backend:?}");
        // Page 3 given back: held no more. A range that starts inside the region works too.
        let discarder = crate::smmu::discard::Discarder::new(
            std::sync::Arc::new(regions.clone()),
            std::sync::Arc::new(crate::smmu::page_state::PageStateTable::new(&[(0, 1 << 20, PAGE_4K)]).unwrap()),
            std::sync::Arc::new(crate::smmu::invalidation::Invalidation::new()),
            None,
        );
        discarder.discard(GuestRange::new(3 * PAGE_4K, PAGE_4K)).unwrap();
        assert_eq!(held(region, GuestRange::new(3 * PAGE_4K, 2 * PAGE_4K)).unwrap(), [false, true], "{backend:?}");
    }

    #[test]
    fn anon_pages_are_held_once_written() {
        written_pages_are_held_and_discarded_ones_not(Backend::Anon);
    }

    #[test]
    fn memfd_pages_are_held_once_written() {
        written_pages_are_held_and_discarded_ones_not(Backend::Memfd);
    }
}
