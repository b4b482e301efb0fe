//! Where the contents of a missing page come from.
//!
//! The fault engine calls [`PageSource::request_page`] with no locks held (step 2 of the
//! retry protocol), so a source may be slow: disk today, a remote peer tomorrow.
//!
//! # Answering "later"
//! A source that cannot answer at once (a remote peer, a slow device) returns
//! [`PageData::Pending`] from `request_page`: it has taken the [`PageRequest`] and will hand
//! the page to [`super::page_installer::PageInstaller::complete`] with that same request
//! when the data arrives. The handler thread goes on serving other faults meanwhile; the
//! faulting thread stays blocked in the kernel until the completion installs (and wakes)
//! its page. The request carries the sequence snapshot the handler took with
//! `try_read_begin` *before* asking, and the completion runs `lock` + `read_retry` before
//! its UFFDIO_COPY, so a discard between the request and the data's arrival is never
//! undone (the completion drops the data and wakes the waiter, which faults again and
//! finds the page discarded). Sources that answer synchronously (files, zeros) implement
//! only [`PageSource::read_page`]; the default `request_page` calls it, so their fault
//! path costs exactly what it did before.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use super::invalidation::ReadSeq;

/// Errors from page sources.
#[derive(Debug, thiserror::Error)]
pub enum PageSourceError {
    /// Reading the backing file failed.
    #[error("reading {len} bytes at offset {offset:#x} of the memory image failed: {source}; check that the image file is readable and not truncated")]
    Read {
        /// File offset.
        offset: u64,
        /// Bytes asked for.
        len: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// The source refused the page (used by tests and by sources with their own checks).
    #[error("the page source failed at gpa {gpa:#x}: {reason}")]
    Failed {
        /// The page asked for.
        gpa: u64,
        /// Why.
        reason: String,
    },
}

/// What a source produced for a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageData {
    /// The page is all zeros; `buf` was not necessarily written. The engine installs it
    /// with UFFDIO_ZEROPAGE where the backing supports it (no copy, no allocation for
    /// private anon until written).
    Zero,
    /// `buf` holds the page's contents.
    Filled,
    /// Only from [`PageSource::request_page`]: the source took the request and will
    /// complete it through a [`super::page_installer::PageInstaller`]; `buf` is unused.
    Pending,
}

/// One page asked of a source by a fault (or by a background pusher): the page, where it
/// is mapped, and the retry-protocol snapshot taken before the request. Passed back
/// unchanged to [`super::page_installer::PageInstaller::complete`].
#[derive(Debug, Clone, Copy)]
pub struct PageRequest {
    pub(super) gpa: u64,
    pub(super) hva: u64,
    pub(super) region: usize,
    pub(super) seq: ReadSeq,
    pub(super) write: bool,
    /// The faulting thread's id (0 for background pushes, or without THREAD_ID).
    pub(super) thread: u32,
    /// When the fault was read (latency is measured from here to the install).
    pub(super) read_at: Instant,
    /// A background push, not a fault: no thread waits for it.
    pub(super) background: bool,
}

impl PageRequest {
    /// Guest-physical address of the page (its first byte).
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Whether a guest thread is blocked on this page (false for background pushes).
    pub fn is_fault(&self) -> bool {
        !self.background
    }

    /// Whether the fault was a write.
    pub fn is_write(&self) -> bool {
        self.write
    }

    /// The faulting thread's id, 0 if unknown (a background push, or a kernel without
    /// `UFFD_FEATURE_THREAD_ID`).
    pub fn thread(&self) -> u32 {
        self.thread
    }

    /// When the fault was read by the handler (or the push began).
    pub fn started(&self) -> Instant {
        self.read_at
    }
}

/// A provider of page contents for MISSING faults.
pub trait PageSource: Send + Sync {
    /// Fills `buf` (one page: 4 KiB, or 2 MiB for hugetlb) with the contents of the page
    /// at guest-physical address `gpa`, or says it is all zeros.
    /// Never returns [`PageData::Pending`].
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<PageData, PageSourceError>;

    /// What the fault engine calls for a MISSING fault: like [`PageSource::read_page`],
    /// or [`PageData::Pending`] when the source will complete `req` later (see the module
    /// docs). The default answers synchronously with `read_page`.
    fn request_page(&self, req: PageRequest, buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        self.read_page(req.gpa, buf)
    }
}

/// Every page is zero.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroSource;

impl PageSource for ZeroSource {
    fn read_page(&self, _gpa: u64, _buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        Ok(PageData::Zero)
    }
}

/// Pages read from a memory image file: guest-physical `base_gpa + n` is at file offset
/// `n`. Pages past the end of the file, and pages that read as all zeros, are `Zero`.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    base_gpa: u64,
    file_len: u64,
}

impl FileSource {
    /// A source over `file`, whose offset 0 holds guest-physical address `base_gpa`.
    pub fn new(file: File, base_gpa: u64) -> Result<Self, PageSourceError> {
        let file_len = file.metadata().map_err(|source| PageSourceError::Read { offset: 0, len: 0, source })?.len();
        Ok(Self { file, base_gpa, file_len })
    }
}

impl PageSource for FileSource {
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        let Some(offset) = gpa.checked_sub(self.base_gpa) else {
            return Ok(PageData::Zero);
        };
        if offset >= self.file_len {
            return Ok(PageData::Zero);
        }
        let avail = ((self.file_len - offset) as usize).min(buf.len());
        self.file.read_exact_at(&mut buf[..avail], offset).map_err(|source| PageSourceError::Read {
            offset,
            len: avail,
            source,
        })?;
        buf[avail..].fill(0);
        // A zero page costs nothing to install with ZEROPAGE; checking is cheap next to
        // the read.
        if buf.iter().all(|&b| b == 0) {
            return Ok(PageData::Zero);
        }
        Ok(PageData::Filled)
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_source_reads_pages_zero_fills_the_tail_and_spots_zero_pages() {
        let mut f = tempfile::tempfile().unwrap();
        let mut image = vec![0u8; 4096 + 100];
        image[..4096].fill(0xab);
        image[4096..].fill(0xcd);
        f.write_all(&image).unwrap();
        let s = FileSource::new(f, 0x10000).unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(s.read_page(0x10000, &mut buf).unwrap(), PageData::Filled);
        assert!(buf.iter().all(|&b| b == 0xab));
        assert_eq!(s.read_page(0x11000, &mut buf).unwrap(), PageData::Filled);
        assert!(buf[..100].iter().all(|&b| b == 0xcd) && buf[100..].iter().all(|&b| b == 0));
        assert_eq!(s.read_page(0x12000, &mut buf).unwrap(), PageData::Zero);
        assert_eq!(ZeroSource.read_page(0, &mut buf).unwrap(), PageData::Zero);
    }
}
