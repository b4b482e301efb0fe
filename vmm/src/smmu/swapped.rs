//! Whether a shared (shmem/file) page that is neither mapped nor in the page cache still
//! holds contents: swapped out of the page cache (shmem under memory pressure) or written
//! back to the file. `lseek(SEEK_DATA)` counts both as data (shmem's swap entries
//! included), and a hole as none. The coherence checker asks this before it calls a page
//! the smmu thinks populated "lost".

use std::os::fd::AsRawFd;

/// Whether the file has data in `[offset, offset + len)`.
pub fn file_has_data(fd: &impl AsRawFd, offset: u64, len: u64) -> bool {
    // SAFETY: lseek on a descriptor the caller keeps open; it only moves the (unused)
    // file position of this description and reports where data starts.
    let at = unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    at >= 0 && (at as u64) < offset + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_have_no_data_and_written_pages_have() {
        let file = tempfile::tempfile_in("/dev/shm").unwrap();
        file.set_len(4 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        assert!(!file_has_data(&file, 0, 4096));
        assert!(file_has_data(&file, 1 << 20, 4096));
        assert!(!file_has_data(&file, (1 << 20) + 4096, 4096));
    }
}
