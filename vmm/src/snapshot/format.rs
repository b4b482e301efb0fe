//! The snapshot directory's files and the state file's encoding.
//!
//! A snapshot is a directory holding `state.fls` (everything but guest RAM) and one
//! sparse memory image per zone, `zone-N.img`, as large as the zone. The state file is a
//! fixed 32-byte header followed by a JSON payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `FLSNAPv\0` |
//! | 8..12 | format version (u32 LE), [`FORMAT_VERSION`] (2: images carry a checksum per 2 MiB chunk) |
//! | 12..16 | architecture (u32 LE, the ELF machine number: 62 = x86-64) |
//! | 16..24 | payload length in bytes (u64 LE) |
//! | 24..28 | CRC-32 (IEEE, `crc32fast`) of the payload |
//! | 28..32 | CRC-32 of bytes 0..28 |
//!
//! The payload is JSON through `serde_json`: the state is small (a few tens of KiB per
//! vCPU), JSON is readable with `jq` when a restore goes wrong, it is a format that will
//! still parse in ten years, serde_json is the best-kept serde backend there is, and it
//! is already how the control socket speaks. Binary encodings save nothing that
//! matters here: memory, the bulk, is in the images. The checksums catch truncation and
//! bit flips before the JSON parser sees a byte; the parser (with serde_json's recursion
//! limit) handles anything else without panicking — the tests fuzz it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::machine::MachineState;

/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state.fls";
/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"FLSNAPv\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// The architecture tag of this build (ELF `EM_X86_64`).
pub const ARCH_X86_64: u32 = 62;
/// Bytes of the fixed header.
pub const HEADER_BYTES: usize = 32;
/// The largest payload a state file may declare (a sanity bound; real ones are < 1 MiB).
pub const MAX_PAYLOAD_BYTES: u64 = 64 << 20;

/// The memory image file of zone `zone`.
pub fn image_file_name(zone: usize) -> String {
    format!("zone-{zone}.img")
}

/// Why a state file cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Shorter than its header or its declared payload.
    #[error("{path}: truncated ({got} bytes, expected {expected}); the snapshot was not written completely")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        got: u64,
        /// What the header says it should be (or the header size).
        expected: u64,
    },
    /// Not a Faultline state file.
    #[error("{path}: not a Faultline snapshot state file (bad magic)")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// The header's own checksum does not match.
    #[error("{path}: the header is corrupted (header checksum mismatch)")]
    BadHeader {
        /// The file.
        path: PathBuf,
    },
    /// Written by another format version.
    #[error("{path}: snapshot format version {found}, this faultline reads version {FORMAT_VERSION}; restore it with the faultline that wrote it")]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
    },
    /// Written for another architecture.
    #[error("{path}: snapshot of a machine with ELF architecture {found}, this faultline restores x86-64 ({ARCH_X86_64}) only")]
    Architecture {
        /// The file.
        path: PathBuf,
        /// The tag in the file.
        found: u32,
    },
    /// The declared payload length is absurd.
    #[error(
        "{path}: declares a {declared} byte payload, more than the {MAX_PAYLOAD_BYTES} bytes a state file may have"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The declared length.
        declared: u64,
    },
    /// Longer than its declared payload.
    #[error("{path}: {extra} bytes after the payload; the file was modified")]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// How many.
        extra: u64,
    },
    /// The payload's checksum does not match.
    #[error("{path}: the state is corrupted (payload checksum {found:#010x}, header says {expected:#010x})")]
    BadChecksum {
        /// The file.
        path: PathBuf,
        /// Computed.
        found: u32,
        /// Stored.
        expected: u32,
    },
    /// The payload is not a valid state.
    #[error("{path}: the state cannot be decoded: {reason}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// serde_json's message.
        reason: String,
    },
}

/// Full snapshot, or the pages written since a parent snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Every page; pages outside the image's ranges are zero.
    Full,
    /// Pages written since `parent`; pages outside the ranges are as in the parent.
    Diff,
}

/// One zone's memory image: which pages it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneImage {
    /// The zone's index.
    pub zone: usize,
    /// The image file, relative to the snapshot directory.
    pub file: String,
    /// The zone's size (and the image file's length), bytes.
    pub size_bytes: u64,
    /// The unit pages are saved in (4 KiB, or the zone's huge page size).
    pub page_bytes: u64,
    /// The byte ranges `(offset, length)` of the zone the image carries, sorted and
    /// disjoint. Inside them the image's bytes are the zone's (holes read as zeros).
    pub ranges: Vec<(u64, u64)>,
    /// CRC-32 of the carried bytes, range after range.
    pub crc32: u32,
    /// The checksum unit of `chunk_crc32` (2 MiB, or the page size if larger).
    pub chunk_bytes: u64,
    /// Per chunk of the zone, the CRC-32 of the carried bytes inside it (0 if none);
    /// see `snapshot::chunks`. Format version 2 on.
    pub chunk_crc32: Vec<u32>,
}

impl ZoneImage {
    /// Bytes the image carries.
    pub fn carried_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }
}

/// Everything in a state file.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// Full or diff.
    pub kind: SnapshotKind,
    /// For a diff: the parent snapshot directory (absolute, or relative to this one).
    pub parent: Option<PathBuf>,
    /// When it was taken (seconds since the Unix epoch).
    pub created_unix_s: u64,
    /// The faultline that wrote it.
    pub writer: String,
    /// The VM's configuration (the zone table: sizes, backends, paging modes).
    pub config: VmConfig,
    /// One image per zone.
    pub images: Vec<ZoneImage>,
    /// vCPUs, VM and devices.
    pub machine: MachineState,
}

/// Encodes a state file: header and payload.
pub fn encode(state: &SnapshotState) -> Vec<u8> {
    let payload = serde_json::to_vec(state).expect("snapshot states always serialize");
    let mut file = Vec::with_capacity(HEADER_BYTES + payload.len());
    file.extend_from_slice(&MAGIC);
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&ARCH_X86_64.to_le_bytes());
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let header_crc = crc32fast::hash(&file[..28]);
    file.extend_from_slice(&header_crc.to_le_bytes());
    file.extend_from_slice(&payload);
    file
}

/// Decodes a state file's bytes (`path` only names it in errors).
pub fn decode(path: &Path, bytes: &[u8]) -> Result<SnapshotState, FormatError> {
    let path_buf = || path.to_path_buf();
    if bytes.len() < HEADER_BYTES {
        if !bytes.is_empty() && !MAGIC.starts_with(&bytes[..bytes.len().min(8)]) {
            return Err(FormatError::BadMagic { path: path_buf() });
        }
        return Err(FormatError::Truncated {
            path: path_buf(),
            got: bytes.len() as u64,
            expected: HEADER_BYTES as u64,
        });
    }
    if bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic { path: path_buf() });
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[..28]) != u32_at(28) {
        return Err(FormatError::BadHeader { path: path_buf() });
    }
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { path: path_buf(), found: version });
    }
    let arch = u32_at(12);
    if arch != ARCH_X86_64 {
        return Err(FormatError::Architecture { path: path_buf(), found: arch });
    }
    let declared = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    if declared > MAX_PAYLOAD_BYTES {
        return Err(FormatError::TooLarge { path: path_buf(), declared });
    }
    let have = (bytes.len() - HEADER_BYTES) as u64;
    if have < declared {
        return Err(FormatError::Truncated {
            path: path_buf(),
            got: bytes.len() as u64,
            expected: HEADER_BYTES as u64 + declared,
        });
    }
    if have > declared {
        return Err(FormatError::TrailingBytes { path: path_buf(), extra: have - declared });
    }
    let payload = &bytes[HEADER_BYTES..];
    let found = crc32fast::hash(payload);
    if found != u32_at(24) {
        return Err(FormatError::BadChecksum { path: path_buf(), found, expected: u32_at(24) });
    }
    let state: SnapshotState =
        serde_json::from_slice(payload).map_err(|e| FormatError::Decode { path: path_buf(), reason: e.to_string() })?;
    validate(path, &state)?;
    Ok(state)
}

/// Checks what serde cannot: images that fit their zones, one per zone.
fn validate(path: &Path, state: &SnapshotState) -> Result<(), FormatError> {
    let bad = |reason: String| FormatError::Decode { path: path.to_path_buf(), reason };
    if state.images.len() != state.config.zones.len() {
        return Err(bad(format!("{} memory images for {} zones", state.images.len(), state.config.zones.len())));
    }
    if state.machine.vcpus.len() != state.config.vcpus as usize {
        return Err(bad(format!("{} vCPU states for {} vCPUs", state.machine.vcpus.len(), state.config.vcpus)));
    }
    if (state.kind == SnapshotKind::Diff) != state.parent.is_some() {
        return Err(bad("a diff snapshot names its parent, a full one does not".into()));
    }
    for (index, (image, zone)) in state.images.iter().zip(&state.config.zones).enumerate() {
        if image.zone != index || image.size_bytes != zone.size_bytes {
            return Err(bad(format!("image {index} does not describe zone {index} ({} bytes)", zone.size_bytes)));
        }
        if image.page_bytes == 0 || !image.page_bytes.is_power_of_two() || image.file.contains('/') {
            return Err(bad(format!("image {index}: bad page size or file name")));
        }
        let chunks_ok = image.chunk_bytes >= image.page_bytes
            && image.chunk_bytes.is_power_of_two()
            && image.chunk_crc32.len() as u64 == image.size_bytes.div_ceil(image.chunk_bytes);
        if !chunks_ok {
            return Err(bad(format!(
                "image {index}: the chunk checksum table ({} entries of {} bytes) does not cover the zone",
                image.chunk_crc32.len(),
                image.chunk_bytes
            )));
        }
        let mut end = 0;
        for &(offset, len) in &image.ranges {
            let aligned = offset % image.page_bytes == 0 && len % image.page_bytes == 0 && len > 0;
            let inside = offset.checked_add(len).is_some_and(|e| e <= image.size_bytes);
            if !aligned || !inside || offset < end {
                return Err(bad(format!(
                    "image {index}: range ({offset:#x}, {len:#x}) is out of order or outside the zone"
                )));
            }
            end = offset + len;
        }
    }
    Ok(())
}
