//! Zeroing what an ELF segment holds in memory past what its file gave it (`p_memsz -
//! p_filesz`: `.bss`, page tables, stacks), as an ELF loader must: guest RAM may already
//! hold data (a file zone's old contents, a reused image).
//!
//! Without touching what is already zero: on this project's nested hosts every first
//! touch of a page costs ~10 µs, and a guest's zero-initialised memory is megabytes (its
//! per-CPU stacks and results), most of it never used. So a page is read (and written
//! only if it is not zero) only when the host says it may hold data: for memory backed
//! by a file (memfd, file zones) a `SEEK_DATA` extent of that file, for anonymous memory
//! a page that `/proc/self/pagemap` shows present or swapped. A page neither shows is
//! zero, and stays unpopulated.

use std::fs::File;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::memory::{GuestRam, RamRegion};

const PAGE_BYTES: u64 = 4096;
/// pagemap: page present in RAM / swapped out.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

fn write_error(gpa: u64, reason: String) -> BootError {
    BootError::Write { what: "the kernel's zero-initialised memory (p_memsz past p_filesz)", gpa, reason }
}

/// Zeroes guest memory `[start, end)` where it is not already zero.
pub fn zero_range(ram: &GuestRam, start: u64, end: u64) -> Result<(), BootError> {
    let mut covered = start;
    for region in ram.regions().iter().filter(|r| r.gpa < end && r.end_gpa() > start) {
        let (lo, hi) = (start.max(region.gpa), end.min(region.end_gpa()));
        if lo > covered {
            return Err(write_error(covered, "the address is not guest RAM".into()));
        }
        for (data_lo, data_hi) in extents_that_may_hold_data(region, lo, hi) {
            zero_if_not_zero(ram.memory(), data_lo, data_hi)?;
        }
        covered = hi;
    }
    if covered < end {
        return Err(write_error(covered, "the address is not guest RAM".into()));
    }
    Ok(())
}

/// Reads `[start, end)` page by page and writes zeros over any page that is not zero.
fn zero_if_not_zero(memory: &GuestMemoryMmap, start: u64, end: u64) -> Result<(), BootError> {
    let zeros = [0u8; PAGE_BYTES as usize];
    let mut buffer = [0u8; PAGE_BYTES as usize];
    let mut gpa = start;
    while gpa < end {
        let length = (PAGE_BYTES - gpa % PAGE_BYTES).min(end - gpa) as usize;
        let chunk = &mut buffer[..length];
        memory.read_slice(chunk, GuestAddress(gpa)).map_err(|e| write_error(gpa, e.to_string()))?;
        if chunk.iter().any(|&b| b != 0) {
            memory.write_slice(&zeros[..length], GuestAddress(gpa)).map_err(|e| write_error(gpa, e.to_string()))?;
        }
        gpa += length as u64;
    }
    Ok(())
}

/// The parts of `[start, end)` (inside `region`) that may hold data; when the host cannot
/// tell, all of it.
fn extents_that_may_hold_data(region: &RamRegion, start: u64, end: u64) -> Vec<(u64, u64)> {
    let offset = start - region.gpa;
    let all = vec![(start, end)];
    match region.fd {
        Some(fd) => {
            // SAFETY: the region's fd stays open as long as the GuestRam that lent us
            // `region` lives, which outlives this call.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            file_data_extents(fd, region.fd_offset + offset, end - start)
                .map(|extents| extents.into_iter().map(|(lo, hi)| (start + lo, start + hi)).collect())
                .unwrap_or(all)
        }
        None => anon_data_extents(region.host_addr + offset, start, end).unwrap_or(all),
    }
}

/// Data extents of `file` in `[pos, pos + length)`, relative to `pos` (SEEK_DATA/SEEK_HOLE).
fn file_data_extents(file: BorrowedFd<'_>, pos: u64, length: u64) -> Option<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    let end = pos + length;
    let mut extents = Vec::new();
    let mut at = pos;
    while at < end {
        let data = match seek(file, SeekFrom::Data(at)) {
            Ok(data) => data,
            Err(rustix::io::Errno::NXIO) => break, // no data past `at`
            Err(_) => return None,
        };
        if data >= end {
            break;
        }
        let hole = seek(file, SeekFrom::Hole(data)).ok()?.min(end);
        extents.push((data - pos, hole - pos));
        at = hole.max(data + 1);
    }
    Some(extents)
}

/// Runs of pages of anonymous memory at host address `host` (guest `[start, end)`) that
/// `/proc/self/pagemap` shows present or swapped.
fn anon_data_extents(host: u64, start: u64, end: u64) -> Option<Vec<(u64, u64)>> {
    let first_page = host / PAGE_BYTES;
    let pages = (host + (end - start)).div_ceil(PAGE_BYTES) - first_page;
    let mut raw = vec![0u8; pages as usize * 8];
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    pagemap.read_exact_at(&mut raw, first_page * 8).ok()?;
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for (i, entry) in raw.chunks_exact(8).enumerate() {
        let entry = u64::from_le_bytes(entry.try_into().ok()?);
        if entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) == 0 {
            continue;
        }
        let page_host = (first_page + i as u64) * PAGE_BYTES;
        let lo = start + page_host.saturating_sub(host);
        let hi = (start + (page_host + PAGE_BYTES - host)).min(end);
        match extents.last_mut() {
            Some(last) if last.1 == lo => last.1 = hi,
            _ => extents.push((lo, hi)),
        }
    }
    Some(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, ZoneConfig};
    use crate::memory::GuestRam;

    fn resident(ram: &GuestRam, gpa: u64, len: u64) -> u64 {
        let region = ram.regions().iter().find(|r| r.gpa <= gpa && gpa < r.end_gpa()).unwrap();
        let host = region.host_addr + (gpa - region.gpa);
        crate::memory::accounting::resident_bytes(host, len).unwrap()
    }

    #[test]
    fn fresh_memory_stays_unpopulated_and_dirty_memory_is_zeroed() {
        for backend in [Backend::Anon, Backend::Memfd] {
            let ram = GuestRam::new(&[ZoneConfig::new(16 << 20, backend)]).unwrap();
            let memory = ram.memory();
            memory.write_slice(&[7u8; 3 * 4096], GuestAddress(0x20_0000)).unwrap();
            zero_range(&ram, 0x10_0000, 0x60_0000 + 100).unwrap();
            let mut back = vec![1u8; 3 * 4096];
            memory.read_slice(&mut back, GuestAddress(0x20_0000)).unwrap();
            assert!(back.iter().all(|&b| b == 0), "{backend:?}: data left in the range");
            assert_eq!(resident(&ram, 0x30_0000, 0x30_0000), 0, "{backend:?}: zero pages were populated");
        }
    }

    #[test]
    fn addresses_outside_guest_ram_are_an_error() {
        let ram = GuestRam::new(&[ZoneConfig::new(16 << 20, Backend::Anon)]).unwrap();
        let err = zero_range(&ram, (16 << 20) - 8, (16 << 20) + 8).unwrap_err().to_string();
        assert!(err.contains("not guest RAM"), "{err}");
    }

    #[test]
    fn a_file_that_holds_data_is_zeroed_where_asked_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        std::fs::write(&path, vec![0x5au8; 8 << 20]).unwrap();
        let zone = ZoneConfig { path: Some(path.clone()), reuse: true, ..ZoneConfig::new(8 << 20, Backend::File) };
        let ram = GuestRam::new(&[zone]).unwrap();
        zero_range(&ram, 0x1000 + 10, 0x5000).unwrap();
        drop(ram);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..0x100a], &vec![0x5au8; 0x100a][..]);
        assert!(data[0x100a..0x5000].iter().all(|&b| b == 0));
        assert_eq!(data[0x5000], 0x5a);
    }
}
