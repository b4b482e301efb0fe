//! Per-chunk checksums of memory images: the zone is cut into chunks of
//! [`CHUNK_BYTES`] (or one page, if the zone's pages are larger), and the state file keeps,
//! per chunk, the CRC-32 of the bytes the image carries inside it (range after range, in
//! offset order; a chunk that carries nothing has the CRC of no bytes, 0).
//!
//! Why per chunk and not only per image: a lazy restore reads an image piece by piece,
//! long after it started the guest, and must never give the guest a page of a changed
//! image. With a checksum per 2 MiB it checks the chunk the first time any page of it is
//! read (one read of at most 2 MiB, then the verdict is cached) and stops the VM with the
//! file and offset of the first bad chunk; an eager restore checks every chunk it loads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::ZoneImage;

/// The checksum unit of a memory image (2 MiB: a huge page, and a short read).
pub const CHUNK_BYTES: u64 = 2 << 20;

/// The chunk size of a zone with pages of `page_bytes`.
pub fn chunk_bytes(page_bytes: u64) -> u64 {
    CHUNK_BYTES.max(page_bytes)
}

/// A chunk of an image does not match its checksum, or cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The carried bytes of a chunk are not what was written.
    #[error("{path}: the memory image was changed after the snapshot: the {chunk_bytes} byte chunk at offset {offset:#x} has checksum {found:#010x}, the state file says {expected:#010x}; restore from an intact copy of the snapshot")]
    Mismatch {
        /// The image file.
        path: PathBuf,
        /// The chunk's first byte (offset in the image and the zone).
        offset: u64,
        /// The chunk size.
        chunk_bytes: u64,
        /// Computed.
        found: u32,
        /// Stored.
        expected: u32,
    },
    /// Reading the chunk failed (a truncated or unreadable image).
    #[error("{path}: reading the chunk at offset {offset:#x} to check it failed: {source}; the image is truncated or unreadable")]
    Read {
        /// The image file.
        path: PathBuf,
        /// The chunk's first byte.
        offset: u64,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Checksums being built, one per chunk of a zone.
#[derive(Clone)]
pub struct ChunkSums {
    chunk_bytes: u64,
    sums: Vec<crc32fast::Hasher>,
}

impl ChunkSums {
    /// Empty sums for a zone of `size_bytes` with pages of `page_bytes`.
    pub fn new(size_bytes: u64, page_bytes: u64) -> Self {
        let chunk_bytes = chunk_bytes(page_bytes);
        ChunkSums { chunk_bytes, sums: vec![crc32fast::Hasher::new(); size_bytes.div_ceil(chunk_bytes) as usize] }
    }

    /// Adds carried `bytes` at zone offset `offset` (in offset order within each chunk).
    pub fn add(&mut self, offset: u64, bytes: &[u8]) {
        let mut done = 0usize;
        while done < bytes.len() {
            let at = offset + done as u64;
            let chunk = at / self.chunk_bytes;
            let room = ((chunk + 1) * self.chunk_bytes - at) as usize;
            let len = room.min(bytes.len() - done);
            self.sums[chunk as usize].update(&bytes[done..done + len]);
            done += len;
        }
    }

    /// Adds a page's checksum `crc` (of `len` bytes at `offset`, inside one chunk).
    pub fn add_crc(&mut self, offset: u64, crc: u32, len: u64) {
        let chunk = (offset / self.chunk_bytes) as usize;
        self.sums[chunk].combine(&crc32fast::Hasher::new_with_initial_len(crc, len));
    }

    /// Appends `later` (bytes after all of this one's in each chunk) to these sums.
    pub fn combine(&mut self, later: &ChunkSums) {
        for (sum, more) in self.sums.iter_mut().zip(&later.sums) {
            sum.combine(more);
        }
    }

    /// The chunk size and the finished checksums.
    pub fn finish(self) -> (u64, Vec<u32>) {
        (self.chunk_bytes, self.sums.into_iter().map(crc32fast::Hasher::finalize).collect())
    }

    /// The first chunk whose sum differs from `image`'s table.
    pub fn first_mismatch(self, path: &Path, image: &ZoneImage) -> Result<(), ChunkError> {
        let (chunk_bytes, found) = self.finish();
        for (index, (&found, &expected)) in found.iter().zip(&image.chunk_crc32).enumerate() {
            if found != expected {
                let offset = index as u64 * chunk_bytes;
                return Err(ChunkError::Mismatch { path: path.to_path_buf(), offset, chunk_bytes, found, expected });
            }
        }
        Ok(())
    }
}

/// The carried ranges of `ranges` (sorted, disjoint) inside chunk `chunk`, clipped to it.
pub fn carried_in_chunk(ranges: &[(u64, u64)], chunk_bytes: u64, chunk: u64) -> Vec<(u64, u64)> {
    let (from, to) = (chunk * chunk_bytes, (chunk + 1) * chunk_bytes);
    let first = ranges.partition_point(|&(start, len)| start + len <= from);
    ranges[first..]
        .iter()
        .take_while(|&&(start, _)| start < to)
        .map(|&(start, len)| (start.max(from), (start + len).min(to)))
        .filter(|(a, b)| a < b)
        .map(|(a, b)| (a, b - a))
        .collect()
}

/// Reads chunk `chunk` of `image` from `file` and checks it against the table.
pub fn verify_chunk(
    file: &File,
    path: &Path,
    ranges: &[(u64, u64)],
    chunk_bytes: u64,
    expected: u32,
    chunk: u64,
) -> Result<(), ChunkError> {
    let offset = chunk * chunk_bytes;
    let mut crc = crc32fast::Hasher::new();
    let mut buffer = Vec::new();
    for (start, len) in carried_in_chunk(ranges, chunk_bytes, chunk) {
        buffer.resize(len as usize, 0);
        file.read_exact_at(&mut buffer, start).map_err(|source| ChunkError::Read {
            path: path.to_path_buf(),
            offset,
            source,
        })?;
        crc.update(&buffer);
    }
    let found = crc.finalize();
    if found != expected {
        return Err(ChunkError::Mismatch { path: path.to_path_buf(), offset, chunk_bytes, found, expected });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_split_at_chunk_boundaries_and_combine_in_order() {
        let size = 3 * CHUNK_BYTES;
        let bytes: Vec<u8> = (0..(CHUNK_BYTES + 8192) as usize).map(|i| (i % 251) as u8).collect();
        // One add across a chunk boundary equals two halves added by two workers.
        let at = CHUNK_BYTES - 4096;
        let mut whole = ChunkSums::new(size, 4096);
        whole.add(at, &bytes);
        let mut first = ChunkSums::new(size, 4096);
        first.add(at, &bytes[..4096]);
        let mut second = ChunkSums::new(size, 4096);
        second.add(at + 4096, &bytes[4096..]);
        first.combine(&second);
        let (chunk, sums) = whole.finish();
        assert_eq!(chunk, CHUNK_BYTES);
        assert_eq!(sums, first.finish().1);
        assert_eq!(sums[0], crc32fast::hash(&bytes[..4096]));
        assert_eq!(sums[2], crc32fast::hash(&bytes[4096 + CHUNK_BYTES as usize..]));
    }

    #[test]
    fn carried_ranges_are_clipped_to_the_chunk() {
        let ranges = [(0, 4096), (CHUNK_BYTES - 4096, 8192), (3 * CHUNK_BYTES, 4096)];
        assert_eq!(carried_in_chunk(&ranges, CHUNK_BYTES, 0), [(0, 4096), (CHUNK_BYTES - 4096, 4096)]);
        assert_eq!(carried_in_chunk(&ranges, CHUNK_BYTES, 1), [(CHUNK_BYTES, 4096)]);
        assert!(carried_in_chunk(&ranges, CHUNK_BYTES, 2).is_empty());
    }
}
