//! Transparent huge pages for an anon zone (`thp=on`): the mapping starts on a 2 MiB
//! boundary (so every whole 2 MiB of the zone can be one huge page) and is advised
//! `MADV_HUGEPAGE` (this project's hosts run THP in `madvise` mode).

use std::io;

/// THP size on x86-64.
pub const THP_BYTES: usize = 2 << 20;

/// Maps `size` bytes of anonymous memory with `flags` at a 2 MiB-aligned address and
/// advises it `MADV_HUGEPAGE`. Returns `MAP_FAILED` (errno set) like mmap.
pub fn map_hugepage_anon(size: usize, prot: i32, flags: i32) -> *mut libc::c_void {
    // Over-map by 2 MiB, then trim both ends to the aligned part.
    // SAFETY: a fresh mapping at an address the kernel chooses; nothing else is touched.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), size + THP_BYTES, prot, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return raw;
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(THP_BYTES);
    let (head, tail) = (aligned - start, start + size + THP_BYTES - (aligned + size));
    // SAFETY: both trimmed parts lie inside the mapping made above, which nothing uses yet.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
    }
    let addr = aligned as *mut libc::c_void;
    // SAFETY: madvise on the mapping we own; a failure (THP disabled) is only logged.
    if unsafe { libc::madvise(addr, size, libc::MADV_HUGEPAGE) } != 0 {
        tracing::warn!("MADV_HUGEPAGE failed: {}", io::Error::last_os_error());
    }
    addr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_is_2m_aligned_and_advised() {
        let size = 8 << 20;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let addr = map_hugepage_anon(size, libc::PROT_READ | libc::PROT_WRITE, flags);
        assert_ne!(addr, libc::MAP_FAILED);
        assert_eq!(addr as usize % THP_BYTES, 0);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let header = format!("{:x}-{:x} ", addr as usize, addr as usize + size);
        let block: String = smaps.split_inclusive('\n').skip_while(|l| !l.starts_with(&header)).take(30).collect();
        assert!(block.starts_with(&header), "the mapping is exactly the aligned part");
        let flags_line = block.lines().find(|l| l.starts_with("VmFlags:")).unwrap();
        assert!(flags_line.contains(" hg"), "MADV_HUGEPAGE sets the hg flag: {flags_line}");
        // SAFETY: the mapping made above, unused.
        unsafe { libc::munmap(addr, size) };
    }
}
