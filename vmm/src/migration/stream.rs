//! The migration stream's framing: every message is a frame of a 16-byte header and a
//! payload, numbered, with a CRC-32 over both, so a flipped, cut, dropped, reordered or
//! replayed byte is caught before anything is applied.
//!
//! Header, little-endian: type (u16), flags (u16, 0), sequence number (u32, 0 for the
//! first frame each way, then +1), payload length (u32, at most [`MAX_PAYLOAD`]), CRC-32
//! (IEEE) of header bytes 0..12 followed by the payload.

use std::io::{ErrorKind, Read, Write};

/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 16;
/// The largest payload a frame may carry (a page batch is at most 4 MiB plus its table).
pub const MAX_PAYLOAD: u32 = (4 << 20) + 4096;

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection failed.
    #[error("the migration link failed while {what}: {source}")]
    Io {
        /// Reading or writing.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The other end closed the connection between frames.
    #[error("the other end closed the migration link")]
    Closed,
    /// The connection ended inside a frame.
    #[error("the migration stream is truncated: frame {seq} ended after {got} of {wanted} bytes")]
    Truncated {
        /// The frame's sequence number (as expected).
        seq: u32,
        /// Bytes of the frame read.
        got: usize,
        /// Bytes it should have had.
        wanted: usize,
    },
    /// The frame's type is none this version knows.
    #[error("frame {seq} has unknown type {found} (corrupted stream, or a newer faultline)")]
    BadType {
        /// Sequence number.
        seq: u32,
        /// The type found.
        found: u16,
    },
    /// The header's flags are not zero.
    #[error("frame {seq} has flags {found:#x}, which this version does not know")]
    BadFlags {
        /// Sequence number.
        seq: u32,
        /// Flags found.
        found: u16,
    },
    /// The payload length is over the limit.
    #[error("frame {seq} declares a {declared}-byte payload, more than the {MAX_PAYLOAD} allowed")]
    TooLong {
        /// Sequence number.
        seq: u32,
        /// The length declared.
        declared: u32,
    },
    /// The checksum does not match.
    #[error("frame {seq} ({kind:?}) is corrupted: CRC-32 {found:#010x}, header says {expected:#010x}")]
    BadChecksum {
        /// Sequence number.
        seq: u32,
        /// Its declared type.
        kind: FrameType,
        /// Computed.
        found: u32,
        /// Stored.
        expected: u32,
    },
    /// A frame out of sequence: dropped, reordered or replayed.
    #[error("frame number {found} arrived where {expected} was due (a frame was dropped, reordered or replayed)")]
    OutOfOrder {
        /// The number due.
        expected: u32,
        /// The number found.
        found: u32,
    },
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameType {
    /// Source -> destination: the handshake (magic, version, architecture, summary).
    Hello = 1,
    /// Destination -> source: the handshake accepted (its version and architecture).
    Welcome = 2,
    /// The VM's configuration (JSON).
    Config = 3,
    /// A range of guest pages (zone, first page, count, zero map, data).
    Pages = 4,
    /// The end of a pre-copy round (its number, u32).
    RoundEnd = 5,
    /// Every part's state but guest RAM (JSON `MachineState`).
    State = 6,
    /// Source -> destination: nothing more follows; start the VM.
    Complete = 7,
    /// Destination -> source: the VM is restored and runs here now.
    Ack = 8,
    /// Either way: the migration is off; the payload says why (UTF-8).
    Refuse = 9,
    /// Post-copy, destination -> source: send this page now (zone u32, unit u64).
    PageRequest = 10,
    /// Post-copy, source -> destination: which units of one zone exist on the source
    /// (zone u32, units u64, then one bit per unit); the rest are zero.
    Present = 11,
}

impl FrameType {
    fn from_u16(value: u16) -> Option<Self> {
        use FrameType::*;
        Some(match value {
            1 => Hello,
            2 => Welcome,
            3 => Config,
            4 => Pages,
            5 => RoundEnd,
            6 => State,
            7 => Complete,
            8 => Ack,
            9 => Refuse,
            10 => PageRequest,
            11 => Present,
            _ => return None,
        })
    }
}

/// One frame read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its type.
    pub kind: FrameType,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Writes numbered frames.
pub struct FrameWriter<W: Write> {
    inner: W,
    seq: u32,
    bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    /// A writer whose first frame is number 0.
    pub fn new(inner: W) -> Self {
        FrameWriter { inner, seq: 0, bytes: 0 }
    }

    /// Bytes written so far, headers included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Writes one frame whose payload is the concatenation of `parts`.
    pub fn write(&mut self, kind: FrameType, parts: &[&[u8]]) -> Result<(), StreamError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        assert!(len <= MAX_PAYLOAD as usize, "a frame payload over the limit is a bug in the sender");
        let header = encode_header(kind, self.seq, len as u32, parts);
        let io = |source| StreamError::Io { what: "sending", source };
        self.inner.write_all(&header).map_err(io)?;
        for part in parts {
            self.inner.write_all(part).map_err(io)?;
        }
        self.inner.flush().map_err(io)?;
        self.seq = self.seq.wrapping_add(1);
        self.bytes += (HEADER_BYTES + len) as u64;
        Ok(())
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

/// The header of frame `seq` of `kind` over `parts` (the CRC covers both).
pub fn encode_header(kind: FrameType, seq: u32, len: u32, parts: &[&[u8]]) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[0..2].copy_from_slice(&(kind as u16).to_le_bytes());
    header[4..8].copy_from_slice(&seq.to_le_bytes());
    header[8..12].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[..12]);
    for part in parts {
        crc.update(part);
    }
    header[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
    header
}

/// Reads numbered frames and checks each (type, flags, length, checksum, number).
pub struct FrameReader<R: Read> {
    inner: R,
    seq: u32,
    bytes: u64,
}

impl<R: Read> FrameReader<R> {
    /// A reader that expects frame number 0 first.
    pub fn new(inner: R) -> Self {
        FrameReader { inner, seq: 0, bytes: 0 }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The next frame, checked.
    pub fn read(&mut self) -> Result<Frame, StreamError> {
        let seq = self.seq;
        let mut header = [0u8; HEADER_BYTES];
        let got = read_full(&mut self.inner, &mut header)?;
        if got == 0 {
            return Err(StreamError::Closed);
        }
        if got < HEADER_BYTES {
            return Err(StreamError::Truncated { seq, got, wanted: HEADER_BYTES });
        }
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let raw_kind = u16::from_le_bytes([header[0], header[1]]);
        let flags = u16::from_le_bytes([header[2], header[3]]);
        let (found_seq, len, expected) = (word(4), word(8), word(12));
        if len > MAX_PAYLOAD {
            return Err(StreamError::TooLong { seq, declared: len });
        }
        let mut payload = vec![0u8; len as usize];
        let got = read_full(&mut self.inner, &mut payload)?;
        if got < payload.len() {
            return Err(StreamError::Truncated { seq, got: HEADER_BYTES + got, wanted: HEADER_BYTES + len as usize });
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header[..12]);
        crc.update(&payload);
        let found = crc.finalize();
        let kind = FrameType::from_u16(raw_kind);
        if found != expected {
            // A corrupted type is reported as such only when the checksum is right.
            return Err(StreamError::BadChecksum { seq, kind: kind.unwrap_or(FrameType::Refuse), found, expected });
        }
        let kind = kind.ok_or(StreamError::BadType { seq, found: raw_kind })?;
        if flags != 0 {
            return Err(StreamError::BadFlags { seq, found: flags });
        }
        if found_seq != seq {
            return Err(StreamError::OutOfOrder { expected: seq, found: found_seq });
        }
        self.seq = self.seq.wrapping_add(1);
        self.bytes += (HEADER_BYTES + payload.len()) as u64;
        Ok(Frame { kind, payload })
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, StreamError> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(source) => return Err(StreamError::Io { what: "receiving", source }),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(frames: &[(FrameType, Vec<u8>)]) -> Vec<u8> {
        let mut writer = FrameWriter::new(Vec::new());
        for (kind, payload) in frames {
            writer.write(*kind, &[payload]).unwrap();
        }
        writer.inner
    }

    #[test]
    fn frames_round_trip_in_order() {
        let frames =
            vec![(FrameType::Hello, b"hi".to_vec()), (FrameType::Pages, vec![7; 5000]), (FrameType::Complete, vec![])];
        let bytes = stream(&frames);
        let mut reader = FrameReader::new(&bytes[..]);
        for (kind, payload) in &frames {
            assert_eq!(reader.read().unwrap(), Frame { kind: *kind, payload: payload.clone() });
        }
        assert!(matches!(reader.read(), Err(StreamError::Closed)));
        assert_eq!(reader.bytes_read(), bytes.len() as u64);
    }

    #[test]
    fn replayed_dropped_and_truncated_frames_are_refused() {
        let one = stream(&[(FrameType::Config, b"{}".to_vec())]);
        let replay = [one.clone(), one.clone()].concat();
        let mut reader = FrameReader::new(&replay[..]);
        reader.read().unwrap();
        assert!(matches!(reader.read(), Err(StreamError::OutOfOrder { expected: 1, found: 0 })));
        let two = stream(&[(FrameType::Config, b"{}".to_vec()), (FrameType::State, b"{}".to_vec())]);
        let dropped = &two[one.len()..];
        assert!(matches!(FrameReader::new(dropped).read(), Err(StreamError::OutOfOrder { expected: 0, found: 1 })));
        for cut in 1..one.len() {
            assert!(matches!(FrameReader::new(&one[..cut]).read(), Err(StreamError::Truncated { .. })), "cut {cut}");
        }
    }
}
