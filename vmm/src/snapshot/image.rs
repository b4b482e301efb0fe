//! Memory images: which pages of a zone exist, writing them into a sparse image file, and
//! reading an image back into a zone.
//!
//! Which pages exist is asked of the kernel, so the cost follows touched memory and not
//! guest size: for shmem and file zones `SEEK_DATA`/`SEEK_HOLE` on the zone's fd (this
//! counts pages swapped out too); for anonymous and hugetlb zones `/proc/self/pagemap`
//! (present or swapped). Never-touched, discarded and ballooned pages are holes in the
//! image; so are pages that exist but hold only zeros.

use std::fs::File;
use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::config::Backend;

use super::chunks::{ChunkError, ChunkSums};
use super::format::ZoneImage;

/// pagemap entry bits: page present in RAM, page swapped out.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
/// Bytes moved per read or write of an image.
const IO_CHUNK: usize = 8 << 20;

/// Errors reading or writing memory images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O call on an image file failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The image (or /proc/self/pagemap).
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The image file is not as large as its zone.
    #[error("{path}: the memory image is {got} bytes but its zone is {expected} bytes; the snapshot is incomplete or of another VM")]
    WrongSize {
        /// The image.
        path: PathBuf,
        /// Its length.
        got: u64,
        /// The zone's size.
        expected: u64,
    },
    /// The carried bytes do not match the checksum in the state file.
    #[error("{path}: the memory image is corrupted (checksum {found:#010x}, the state file says {expected:#010x})")]
    BadChecksum {
        /// The image.
        path: PathBuf,
        /// Computed.
        found: u32,
        /// Stored.
        expected: u32,
    },
    /// A chunk of the image does not match its checksum.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}

/// A zone's host mapping, as the image code sees it.
#[derive(Debug, Clone, Copy)]
pub struct ZoneView {
    /// The zone's index.
    pub zone: usize,
    /// Host address of its first byte.
    pub host_addr: *mut u8,
    /// Its size.
    pub size_bytes: u64,
    /// Its page size (4 KiB or huge).
    pub page_bytes: u64,
    /// Its backend.
    pub backend: Backend,
    /// Its fd (shared backends).
    pub fd: Option<RawFd>,
}

// SAFETY: a ZoneView is an address and a length into guest RAM, which is shared between
// threads by design (vCPUs, devices, the fault engine); the functions reading through it
// say when that is safe (the VM paused, nothing else writing).
unsafe impl Send for ZoneView {}
// SAFETY: as above; a ZoneView itself is never mutated.
unsafe impl Sync for ZoneView {}

impl ZoneView {
    /// Pages of the zone in its page unit.
    pub fn pages(&self) -> u64 {
        self.size_bytes / self.page_bytes
    }
}

/// The zone's pages (in its page unit) that exist in the host: a sorted list of page
/// indices.
pub fn existing_pages(view: &ZoneView) -> Result<Vec<u64>, ImageError> {
    match (view.backend, view.fd) {
        (Backend::Memfd | Backend::File, Some(fd)) => pages_with_data(view, fd),
        _ => pages_in_pagemap(view),
    }
}

fn pages_with_data(view: &ZoneView, fd: RawFd) -> Result<Vec<u64>, ImageError> {
    // SAFETY: the fd is the zone's, open for the life of guest RAM, which outlives this
    // call; it is only borrowed for lseek.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut pages = Vec::new();
    let mut at = 0u64;
    while at < view.size_bytes {
        let data = match rustix::fs::seek(fd, rustix::fs::SeekFrom::Data(at)) {
            Ok(offset) => offset,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(io_error(Path::new("guest RAM fd"), "SEEK_DATA", e.into())),
        };
        let hole = match rustix::fs::seek(fd, rustix::fs::SeekFrom::Hole(data)) {
            Ok(offset) => offset.min(view.size_bytes),
            Err(e) => return Err(io_error(Path::new("guest RAM fd"), "SEEK_HOLE", e.into())),
        };
        let first = data / view.page_bytes;
        let end = hole.div_ceil(view.page_bytes).min(view.pages());
        pages.extend(first..end);
        at = hole.max(data + 1);
    }
    pages.dedup();
    Ok(pages)
}

fn pages_in_pagemap(view: &ZoneView) -> Result<Vec<u64>, ImageError> {
    let path = Path::new("/proc/self/pagemap");
    let pagemap = File::open(path).map_err(|e| io_error(path, "open", e))?;
    let small_pages = view.size_bytes / 4096;
    let per_unit = view.page_bytes / 4096;
    let first_entry = view.host_addr as u64 / 4096;
    let mut pages = Vec::new();
    let mut entries = vec![0u8; 8 * 65536];
    let mut done = 0u64;
    while done < small_pages {
        let count = (small_pages - done).min(65536);
        let buf = &mut entries[..(count * 8) as usize];
        pagemap.read_exact_at(buf, (first_entry + done) * 8).map_err(|e| io_error(path, "read", e))?;
        for (i, entry) in buf.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            if entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0 {
                let unit = (done + i as u64) / per_unit;
                if pages.last() != Some(&unit) {
                    pages.push(unit);
                }
            }
        }
        done += count;
    }
    Ok(pages)
}

/// What to write into an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// Only pages that hold something other than zeros (a full snapshot: the rest is zero).
    NonZero,
    /// Every listed page, zero or not (a diff: a page zeroed since the parent must say so).
    All,
}

/// Writes the listed pages (sorted page indices in the zone's unit) of `view` into a new
/// sparse image file `dir/file` as large as the zone. The VM must be paused and nothing
/// else may write guest RAM meanwhile.
///
/// `existing` (sorted, from [`existing_pages`]) says which pages the host has: a listed
/// page that does not exist (discarded since the parent, by the balloon or anyone) is
/// zero, and is carried as zeros without being read, since reading it would populate it
/// (or fault into the fault engine). `None`: every listed page exists.
pub fn write_image(
    dir: &Path,
    file_name: &str,
    view: &ZoneView,
    pages: &[u64],
    carry: Carry,
    existing: Option<&[u64]>,
) -> Result<ZoneImage, ImageError> {
    let path = dir.join(file_name);
    let file = File::options().write(true).create_new(true).open(&path).map_err(|e| io_error(&path, "create", e))?;
    file.set_len(view.size_bytes).map_err(|e| io_error(&path, "set its length", e))?;
    // The copy into the page cache is most of the cost: split the pages over the host's
    // cores (each piece writes its own part of the file; checksums combine in order).
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_WRITERS);
    let per_worker = pages.len().div_ceil(workers).max(PAGES_PER_WORKER_MIN);
    let pieces: Vec<Result<Piece, ImageError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pages
            .chunks(per_worker.max(1))
            .map(|chunk| {
                let (file, path) = (&file, &path);
                scope.spawn(move || write_pages(file, path, view, chunk, carry, existing))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("image writer panicked")).collect()
    });
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut crc = crc32fast::Hasher::new();
    let mut chunks = ChunkSums::new(view.size_bytes, view.page_bytes);
    for piece in pieces {
        let piece = piece?;
        chunks.combine(&piece.chunks);
        for (offset, len) in piece.ranges {
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 == offset => last.1 += len,
                _ => ranges.push((offset, len)),
            }
        }
        crc.combine(&piece.crc);
    }
    let (chunk_bytes, chunk_crc32) = chunks.finish();
    // No fsync: a snapshot survives the VMM, not a host crash (as with Firecracker and
    // QEMU's migrate-to-file); `sync` the directory if it must.
    Ok(ZoneImage {
        zone: view.zone,
        file: file_name.to_string(),
        size_bytes: view.size_bytes,
        page_bytes: view.page_bytes,
        ranges,
        crc32: crc.finalize(),
        chunk_bytes,
        chunk_crc32,
    })
}

/// Most threads writing one image.
const MAX_WRITERS: usize = 4;
/// Below this many pages a second writer is not worth its start.
const PAGES_PER_WORKER_MIN: usize = 4096;

/// What one writer produced: the ranges it carried and their checksums.
struct Piece {
    ranges: Vec<(u64, u64)>,
    crc: crc32fast::Hasher,
    chunks: ChunkSums,
}

/// Writes `pages` (sorted) of `view` into `file`; see [`write_image`].
fn write_pages(
    file: &File,
    path: &Path,
    view: &ZoneView,
    pages: &[u64],
    carry: Carry,
    existing: Option<&[u64]>,
) -> Result<Piece, ImageError> {
    let page = view.page_bytes as usize;
    let zeros = vec![0u8; if existing.is_some() { page } else { 0 }];
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut crc = crc32fast::Hasher::new();
    let mut chunks = ChunkSums::new(view.size_bytes, view.page_bytes);
    // The run of contiguous non-zero pages waiting to be written: (zone offset, length).
    let mut run: Option<(u64, usize)> = None;
    for &index in pages {
        let offset = index * view.page_bytes;
        let bytes = if existing.is_some_and(|e| e.binary_search(&index).is_err()) {
            &zeros[..]
        } else {
            // SAFETY: offset + page lies inside the zone's live mapping; the VM is paused
            // and the devices are quiesced (no VMM part writes guest RAM during a
            // snapshot), so nothing changes the page while this shared view of it lives,
            // and the page exists (listed as such), so reading it does not fault into
            // the fault engine.
            unsafe { std::slice::from_raw_parts(view.host_addr.add(offset as usize), page) }
        };
        let zero = is_zero(bytes);
        if carry == Carry::NonZero && zero {
            continue;
        }
        crc.update(bytes);
        chunks.add(offset, bytes);
        match ranges.last_mut() {
            Some(last) if last.0 + last.1 == offset => last.1 += view.page_bytes,
            _ => ranges.push((offset, view.page_bytes)),
        }
        // Non-zero pages go to the file straight from guest RAM, contiguous ones in one
        // write; a zero page stays a hole.
        run = match run {
            Some((start, len)) if !zero && start + len as u64 == offset && len + page <= IO_CHUNK => {
                Some((start, len + page))
            }
            pending => {
                if let Some((start, len)) = pending {
                    write_from_guest(file, path, view, start, len)?;
                }
                (!zero).then_some((offset, page))
            }
        };
    }
    if let Some((start, len)) = run {
        write_from_guest(file, path, view, start, len)?;
    }
    Ok(Piece { ranges, crc, chunks })
}

/// Writes `len` bytes of the zone at `offset` into the image at the same offset.
fn write_from_guest(file: &File, path: &Path, view: &ZoneView, offset: u64, len: usize) -> Result<(), ImageError> {
    // SAFETY: as in `write_image`: inside the live mapping, existing pages, nothing writes
    // them during the snapshot.
    let bytes = unsafe { std::slice::from_raw_parts(view.host_addr.add(offset as usize), len) };
    file.write_all_at(bytes, offset).map_err(|e| io_error(path, "write", e))
}

/// True when every byte is zero (word at a time).
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned
        // middle of the slice.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Checks that `dir/image.file` exists and is as large as its zone.
pub fn check_image_file(dir: &Path, image: &ZoneImage) -> Result<(), ImageError> {
    let path = dir.join(&image.file);
    let length = std::fs::metadata(&path).map_err(|e| io_error(&path, "open", e))?.len();
    if length != image.size_bytes {
        return Err(ImageError::WrongSize { path, got: length, expected: image.size_bytes });
    }
    Ok(())
}

/// Reads the pages `image` carries from `dir` into the zone and checks their checksum.
/// Returns the bytes read.
pub fn load_image(dir: &Path, image: &ZoneImage, view: &ZoneView) -> Result<u64, ImageError> {
    check_image_file(dir, image)?;
    let path = dir.join(&image.file);
    let file = File::open(&path).map_err(|e| io_error(&path, "open", e))?;
    // The carried bytes in IO_CHUNK pieces, in order; contiguous groups of them per
    // thread (populating fresh guest RAM is most of the cost), checksums combined in order.
    let mut pieces: Vec<(u64, usize)> = Vec::new();
    for &(offset, len) in &image.ranges {
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(IO_CHUNK as u64);
            pieces.push((offset + done, chunk as usize));
            done += chunk;
        }
    }
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_WRITERS);
    let per_worker = pieces.len().div_ceil(workers).max(1);
    let hashers: Vec<Result<(crc32fast::Hasher, ChunkSums), ImageError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pieces
            .chunks(per_worker)
            .map(|group| {
                let (file, path) = (&file, &path);
                scope.spawn(move || {
                    let mut crc = crc32fast::Hasher::new();
                    let mut chunks = ChunkSums::new(view.size_bytes, view.page_bytes);
                    for &(offset, len) in group {
                        // SAFETY: [offset, offset + len) lies inside the zone's live mapping
                        // (the state file's ranges were validated against the zone size), the
                        // pieces are disjoint, no vCPU runs yet and nothing else holds a
                        // reference to guest RAM. A read into a page under userfaultfd
                        // MISSING faults into the running fault engine first.
                        let target =
                            unsafe { std::slice::from_raw_parts_mut(view.host_addr.add(offset as usize), len) };
                        file.read_exact_at(target, offset).map_err(|e| io_error(path, "read", e))?;
                        crc.update(target);
                        chunks.add(offset, target);
                    }
                    Ok((crc, chunks))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("image reader panicked")).collect()
    });
    let mut crc = crc32fast::Hasher::new();
    let mut chunks = ChunkSums::new(view.size_bytes, view.page_bytes);
    for hasher in hashers {
        let (piece_crc, piece_chunks) = hasher?;
        crc.combine(&piece_crc);
        chunks.combine(&piece_chunks);
    }
    // The first bad chunk names where the image was changed; the whole-image sum after it.
    chunks.first_mismatch(&path, image)?;
    let found = crc.finalize();
    if found != image.crc32 {
        return Err(ImageError::BadChecksum { path, found, expected: image.crc32 });
    }
    Ok(image.carried_bytes())
}

/// Makes every page of a shared zone a hole (file zones may hold old data; a restored
/// zone must be zero wherever the image carries nothing).
pub fn clear_shared_zone(view: &ZoneView) -> Result<(), ImageError> {
    let Some(fd) = view.fd else { return Ok(()) };
    if view.backend != Backend::File {
        return Ok(()); // a fresh memfd is zero already
    }
    // SAFETY: the fd is the zone's, open for the life of guest RAM; only borrowed.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::fs::fallocate(
        fd,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        0,
        view.size_bytes,
    )
    .map_err(|e| io_error(Path::new("file zone"), "punch holes", e.into()))?;
    Ok(())
}

fn io_error(path: &Path, what: &'static str, source: std::io::Error) -> ImageError {
    ImageError::Io { path: path.to_path_buf(), what, source }
}
