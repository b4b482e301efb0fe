//! The host operations behind each change, on a host-virtual range of guest RAM, and the
//! page-table readings (`/proc/self/pagemap`) that say what each did. These are the
//! kernel's own operations — the VMM does not go through its invalidation layer for
//! them, because none changes the guest's data: the kernel keeps the contents (in swap,
//! in a KSM page, in a huge page, at a new frame) and KVM's MMU notifier drops its
//! mapping, so the guest's next access refaults.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const PAGE: u64 = 4096;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_PFN: u64 = (1 << 55) - 1;
/// `MADV_COLLAPSE` (Linux 6.1; not in every libc).
const MADV_COLLAPSE: i32 = 25;
/// `MPOL_MF_MOVE` of move_pages(2) (not in libc).
const MPOL_MF_MOVE: libc::c_int = 1 << 1;

/// A host-virtual range of guest RAM (page aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    /// First byte.
    pub hva: u64,
    /// Length, bytes.
    pub len: u64,
}

impl HostRange {
    fn ptr(&self) -> *mut libc::c_void {
        self.hva as *mut libc::c_void
    }

    /// 4 KiB pages in the range.
    pub fn pages(&self) -> u64 {
        self.len / PAGE
    }
}

/// What the page tables say about a range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageTableView {
    /// Pages mapped (present).
    pub present: u64,
    /// Pages swapped out (a swap entry, not a pte marker).
    pub swapped: u64,
    /// The frame of each page (0 when not present, or when frames are hidden: not root).
    pub frames: Vec<u64>,
}

impl PageTableView {
    /// Pages present in both views whose frame changed (migrated), when frames are visible.
    pub fn moved_since(&self, before: &PageTableView) -> u64 {
        self.frames.iter().zip(&before.frames).filter(|(a, b)| **a != 0 && **b != 0 && a != b).count() as u64
    }
}

/// Reads the pagemap entries of `range`.
pub fn page_table_view(pagemap: &File, range: HostRange) -> io::Result<PageTableView> {
    let mut bytes = vec![0u8; range.pages() as usize * 8];
    pagemap.read_exact_at(&mut bytes, range.hva / PAGE * 8)?;
    let mut view = PageTableView::default();
    for chunk in bytes.chunks_exact(8) {
        let entry = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
        let present = entry & PM_PRESENT != 0;
        view.present += u64::from(present);
        // A swap entry with a frame field of 0 and swap type 31 would be a pte marker;
        // markers only appear with uffd write-protect, which the host changes never use.
        view.swapped += u64::from(!present && entry & PM_SWAPPED != 0);
        view.frames.push(if present { entry & PM_PFN } else { 0 });
    }
    Ok(view)
}

fn madvise(range: HostRange, advice: i32) -> io::Result<()> {
    // SAFETY: `range` lies inside a live guest RAM mapping; the advice changes only how
    // the kernel backs it (none of the advice used here discards contents).
    if unsafe { libc::madvise(range.ptr(), range.len as usize, advice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pages the range out to swap (`MADV_PAGEOUT`): private pages to the swap device,
/// shmem pages too (to swap, from the page cache).
pub fn page_out(range: HostRange) -> io::Result<()> {
    madvise(range, libc::MADV_PAGEOUT)
}

/// Marks the range mergeable by KSM.
pub fn merge(range: HostRange) -> io::Result<()> {
    madvise(range, libc::MADV_MERGEABLE)
}

/// Unmerges the range (every merged page gets its own copy again).
pub fn unmerge(range: HostRange) -> io::Result<()> {
    madvise(range, libc::MADV_UNMERGEABLE)
}

/// Collapses the range's pages into transparent huge pages now (`MADV_COLLAPSE`).
pub fn collapse(range: HostRange) -> io::Result<()> {
    madvise(range, MADV_COLLAPSE)
}

/// Splits the huge page mapping around `page` (a 4 KiB page inside a THP): advising that
/// one page `MADV_NOHUGEPAGE` splits the VMA there, which splits the PMD into 512 PTEs;
/// advising it `MADV_HUGEPAGE` again merges the VMAs back (the mapping stays split until
/// a collapse). No protection changes, so a guest writing meanwhile is not disturbed.
pub fn split(page: HostRange) -> io::Result<()> {
    madvise(page, libc::MADV_NOHUGEPAGE)?;
    madvise(page, libc::MADV_HUGEPAGE)
}

/// Runs compaction of all zones (`/proc/sys/vm/compact_memory`).
pub fn compact_memory() -> io::Result<()> {
    std::fs::write("/proc/sys/vm/compact_memory", "1")
}

/// Asks the kernel to move the range's pages to `node` (`move_pages`); returns how many
/// the kernel reported on that node afterwards (a page already there is not moved).
pub fn move_pages(range: HostRange, node: i32) -> io::Result<u64> {
    let pages: Vec<*mut libc::c_void> = (0..range.pages()).map(|i| (range.hva + i * PAGE) as *mut _).collect();
    let nodes = vec![node; pages.len()];
    let mut status = vec![0i32; pages.len()];
    // SAFETY: move_pages(2) on our own process (pid 0) with arrays of `count` elements
    // each; the pages lie in a live guest RAM mapping. libc has no wrapper: raw syscall.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            pages.len() as libc::c_ulong,
            pages.as_ptr(),
            nodes.as_ptr(),
            status.as_mut_ptr(),
            MPOL_MF_MOVE,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(status.iter().filter(|&&s| s == node).count() as u64)
}

/// Makes the range read-only.
pub fn protect_read_only(range: HostRange) -> io::Result<()> {
    mprotect(range, libc::PROT_READ)
}

/// Makes the range read-write again.
pub fn unprotect(range: HostRange) -> io::Result<()> {
    mprotect(range, libc::PROT_READ | libc::PROT_WRITE)
}

fn mprotect(range: HostRange, prot: i32) -> io::Result<()> {
    // SAFETY: `range` lies inside a live guest RAM mapping; only its protection changes
    // (the driver restores PROT_READ | PROT_WRITE before the VM ends).
    if unsafe { libc::mprotect(range.ptr(), range.len as usize, prot) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CLOCK_MONOTONIC now, nanoseconds (the clock the KVM trace is read in).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mapping(HostRange);

    impl Mapping {
        fn anon(pages: u64) -> Self {
            let len = pages * PAGE;
            // SAFETY: a fresh private mapping.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED);
            Mapping(HostRange { hva: addr as u64, len })
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `anon`.
            unsafe { libc::munmap(self.0.ptr(), self.0.len as usize) };
        }
    }

    #[test]
    fn pagemap_view_counts_present_pages_and_protection_round_trips() {
        let m = Mapping::anon(8);
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        assert_eq!(page_table_view(&pagemap, m.0).unwrap().present, 0);
        for i in 0..4 {
            // SAFETY: page i of the mapping above.
            unsafe { ((m.0.hva + i * PAGE) as *mut u64).write_volatile(i + 1) };
        }
        let view = page_table_view(&pagemap, m.0).unwrap();
        assert_eq!((view.present, view.swapped, view.frames.len()), (4, 0, 8));
        protect_read_only(m.0).unwrap();
        // SAFETY: reading page 0 of the read-only mapping.
        assert_eq!(unsafe { (m.0.hva as *const u64).read_volatile() }, 1);
        unprotect(m.0).unwrap();
        // SAFETY: writing page 0 again, now writable.
        unsafe { (m.0.hva as *mut u64).write_volatile(9) };
        assert_eq!(view.moved_since(&view), 0);
        let a = monotonic_ns();
        assert!(monotonic_ns() >= a);
    }
}
