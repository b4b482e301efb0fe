//! How much host memory guest RAM really holds, per backend: what a balloon's "freed"
//! figure is checked against.
//!
//! - private anon: resident pages of the guest mapping's address range, from `mincore`
//!   (exactly the range: /proc/self/smaps Rss is per VMA, and the kernel merges adjacent
//!   anonymous VMAs with equal flags, so a VMA's Rss can include memory that is not guest
//!   RAM);
//! - memfd / file (and hugetlb memfd / hugetlbfs): blocks allocated to the backing file,
//!   `st_blocks * 512` from `fstat`, each file counted once;
//! - anonymous hugetlb (no fd): resident pages of the range (`mincore`);
//! - and, beside them, the host's free 2 MiB huge pages
//!   (`/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages`).

use std::collections::BTreeSet;
use std::os::fd::AsFd;

use serde::{Deserialize, Serialize};

use crate::smmu::{RegionBacking, Regions, PAGE_4K};

/// Where the host's count of free 2 MiB huge pages is.
pub const FREE_HUGEPAGES_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
/// `mincore` is asked about at most this many bytes at a time (bounds its vector).
const MINCORE_CHUNK_BYTES: u64 = 1 << 30;

/// Errors measuring host memory.
#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    /// mincore failed on a guest mapping.
    #[error("cannot read which pages of the guest mapping at {addr:#x} are resident (mincore): {source}; is guest RAM still mapped?")]
    Mincore {
        /// Host address of the range.
        addr: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// fstat failed on a backing file.
    #[error("cannot fstat the backing file of guest RAM: {0}")]
    Fstat(std::io::Error),
}

/// Host memory held by a set of guest RAM regions, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMemory {
    /// Resident bytes of private anonymous guest RAM.
    pub anon_resident_bytes: u64,
    /// Bytes allocated to memfd / file backings (4 KiB pages).
    pub file_allocated_bytes: u64,
    /// Bytes allocated to hugetlb backings (files: allocated blocks; anonymous: resident).
    pub hugetlb_allocated_bytes: u64,
    /// Free 2 MiB huge pages on the host (system-wide), if the host has the pool.
    pub free_hugepages_2m: Option<u64>,
}

impl HeldMemory {
    /// All guest RAM held, in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.anon_resident_bytes + self.file_allocated_bytes + self.hugetlb_allocated_bytes
    }
}

/// Measures the host memory the guest RAM `regions` hold right now.
pub fn measure(regions: &Regions) -> Result<HeldMemory, AccountingError> {
    let mut held = HeldMemory { free_hugepages_2m: free_hugepages_2m(), ..HeldMemory::default() };
    let mut files_seen = BTreeSet::new();
    for region in regions.iter() {
        match &region.backing {
            RegionBacking::PrivateAnon => held.anon_resident_bytes += resident_bytes(region.host_addr, region.len)?,
            RegionBacking::Hugetlb { fd: None, .. } => {
                held.hugetlb_allocated_bytes += resident_bytes(region.host_addr, region.len)?
            }
            RegionBacking::Shared { fd, .. } | RegionBacking::Hugetlb { fd: Some(fd), .. } => {
                let stat = rustix::fs::fstat(fd.as_fd()).map_err(|e| AccountingError::Fstat(e.into()))?;
                if !files_seen.insert((stat.st_dev, stat.st_ino)) {
                    continue;
                }
                let bytes = stat.st_blocks as u64 * 512;
                match region.backing {
                    RegionBacking::Shared { .. } => held.file_allocated_bytes += bytes,
                    _ => held.hugetlb_allocated_bytes += bytes,
                }
            }
        }
    }
    Ok(held)
}

/// The host's free 2 MiB huge pages, if it has that pool.
pub fn free_hugepages_2m() -> Option<u64> {
    std::fs::read_to_string(FREE_HUGEPAGES_2M).ok()?.trim().parse().ok()
}

/// Resident bytes of the host range `[addr, addr + len)` (page aligned), by `mincore`.
pub fn resident_bytes(addr: u64, len: u64) -> Result<u64, AccountingError> {
    let mut resident = 0u64;
    let mut vec = Vec::new();
    let mut offset = 0;
    while offset < len {
        let chunk = (len - offset).min(MINCORE_CHUNK_BYTES);
        vec.resize(chunk.div_ceil(PAGE_4K) as usize, 0u8);
        let start = addr + offset;
        // SAFETY: mincore only reads the page tables of `[start, start + chunk)` and writes
        // one byte per 4 KiB page into `vec`, which has exactly that many bytes; it does
        // not touch the pages themselves. An unmapped range fails with ENOMEM.
        let rc = unsafe { libc::mincore(start as *mut libc::c_void, chunk as usize, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(AccountingError::Mincore { addr: start, source: std::io::Error::last_os_error() });
        }
        resident += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_4K;
        offset += chunk;
    }
    Ok(resident)
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    use rustix::fs::{fallocate, ftruncate, memfd_create, FallocateFlags, MemfdFlags};
    use rustix::mm::{madvise, mmap, mmap_anonymous, munmap, Advice, MapFlags, ProtFlags};

    use super::*;
    use crate::smmu::{UffdMode, UffdRegion};

    const LEN: u64 = 8 << 20;

    struct Map {
        addr: u64,
        fd: Option<Arc<OwnedFd>>,
    }

    impl Map {
        fn anon() -> Map {
            // SAFETY: a fresh private anonymous mapping nothing else references.
            let p = unsafe {
                mmap_anonymous(
                    std::ptr::null_mut(),
                    LEN as usize,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::PRIVATE,
                )
            }
            .unwrap();
            Map { addr: p as u64, fd: None }
        }

        fn memfd() -> Map {
            let fd = memfd_create("faultline-accounting-test", MemfdFlags::CLOEXEC).unwrap();
            ftruncate(&fd, LEN).unwrap();
            // SAFETY: a fresh shared mapping of our own memfd.
            let p = unsafe {
                mmap(std::ptr::null_mut(), LEN as usize, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, &fd, 0)
            }
            .unwrap();
            Map { addr: p as u64, fd: Some(Arc::new(fd)) }
        }

        fn touch(&self, pages: u64) {
            for i in 0..pages {
                // SAFETY: inside our live mapping; nothing else holds a reference to it.
                unsafe { std::ptr::write_volatile((self.addr + i * PAGE_4K) as *mut u64, i + 1) };
            }
        }

        fn regions(&self) -> Regions {
            let backing = match &self.fd {
                None => RegionBacking::PrivateAnon,
                Some(fd) => RegionBacking::Shared { fd: fd.clone(), file_offset: 0 },
            };
            Regions::new(vec![UffdRegion {
                guest_addr: 0,
                host_addr: self.addr,
                len: LEN,
                page_bytes: PAGE_4K,
                backing,
                mode: UffdMode::None,
                write_protect: false,
            }])
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: we mapped exactly this range and no reference into it remains.
            let _ = unsafe { munmap(self.addr as *mut _, LEN as usize) };
        }
    }

    #[test]
    fn anon_resident_bytes_follow_touches_and_dontneed() {
        let map = Map::anon();
        assert_eq!(measure(&map.regions()).unwrap().anon_resident_bytes, 0);
        map.touch(100);
        let held = measure(&map.regions()).unwrap();
        assert_eq!(held.anon_resident_bytes, 100 * PAGE_4K);
        assert_eq!(held.file_allocated_bytes, 0);
        // SAFETY: drops 40 pages of our own mapping; nothing references them.
        unsafe { madvise((map.addr + 10 * PAGE_4K) as *mut _, 40 * PAGE_4K as usize, Advice::LinuxDontNeed) }.unwrap();
        assert_eq!(measure(&map.regions()).unwrap().total_bytes(), 60 * PAGE_4K);
    }

    #[test]
    fn memfd_allocated_bytes_follow_touches_and_punched_holes() {
        let map = Map::memfd();
        assert_eq!(measure(&map.regions()).unwrap().file_allocated_bytes, 0);
        map.touch(64);
        let held = measure(&map.regions()).unwrap();
        assert_eq!(held.file_allocated_bytes, 64 * PAGE_4K);
        assert_eq!(held.anon_resident_bytes, 0);
        let fd = map.fd.as_ref().unwrap();
        fallocate(&**fd, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, 0, 16 * PAGE_4K).unwrap();
        assert_eq!(measure(&map.regions()).unwrap().file_allocated_bytes, 48 * PAGE_4K);
    }

    #[test]
    fn a_file_mapped_by_two_regions_is_counted_once() {
        let map = Map::memfd();
        map.touch(10);
        let one = map.regions().iter().next().unwrap().clone();
        let half = LEN / 2;
        let regions = Regions::new(vec![
            UffdRegion { len: half, ..one.clone() },
            UffdRegion { guest_addr: half, host_addr: one.host_addr + half, len: half, ..one },
        ]);
        assert_eq!(measure(&regions).unwrap().file_allocated_bytes, 10 * PAGE_4K);
    }
}
