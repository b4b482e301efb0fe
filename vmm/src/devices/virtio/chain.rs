//! Walking and validating one descriptor chain of a split virtqueue.
//!
//! Hand-rolled on virtio-queue's `Descriptor` type on purpose: the crate's
//! `DescriptorChain` iterator ends a malformed chain silently (a loop, a `next` index past
//! the table, an unreadable descriptor or a nested indirect table all look like a chain
//! that simply ends), and follows indirect tables we never offered. A device must tell
//! those apart from a good chain to set NEEDS_RESET, so every step is checked here.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use virtio_queue::desc::split::Descriptor;

/// Errors of a malformed descriptor chain (each one a driver bug or a malicious guest).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The head or a `next` index is past the end of the descriptor table.
    #[error("descriptor index {index} is outside the queue of {size} entries")]
    IndexOutOfRange {
        /// The index.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// The chain visits a descriptor twice.
    #[error("descriptor chain loops back to descriptor {index}")]
    Loop {
        /// The descriptor visited again.
        index: u16,
    },
    /// The chain has more descriptors than the queue has entries.
    #[error("descriptor chain is longer than the queue ({size} entries)")]
    TooLong {
        /// The queue size.
        size: u16,
    },
    /// The descriptor table entry itself is not in guest RAM.
    #[error("descriptor {index} at {addr:#x} is not in guest RAM")]
    TableOutsideRam {
        /// The descriptor's index.
        index: u16,
        /// Its guest-physical address.
        addr: u64,
    },
    /// A descriptor's buffer is not entirely guest RAM.
    #[error("descriptor {index} points at [{addr:#x}, +{len:#x}), which is not entirely guest RAM")]
    BufferOutsideRam {
        /// The descriptor's index.
        index: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// An indirect descriptor, a feature this device does not offer.
    #[error("descriptor {index} is indirect, but VIRTIO_F_INDIRECT_DESC was not negotiated")]
    Indirect {
        /// The descriptor's index.
        index: u16,
    },
    /// A device-readable descriptor after a device-writable one.
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable {
        /// The descriptor's index.
        index: u16,
    },
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address of the buffer.
    pub addr: GuestAddress,
    /// Its length in bytes.
    pub len: u32,
    /// Whether the device may write it (VRING_DESC_F_WRITE).
    pub writable: bool,
}

/// A chain whose every buffer lies in guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidChain {
    /// Index of the head descriptor (what goes into the used ring).
    pub head: u16,
    /// The buffers in chain order.
    pub segments: Vec<Segment>,
}

impl ValidChain {
    /// Whether every buffer is device-readable.
    pub fn all_readable(&self) -> bool {
        self.segments.iter().all(|s| !s.writable)
    }
}

/// Walks the chain starting at `head` in the descriptor table at `table` (of `size`
/// entries), checking every index, every buffer's range, loops and the chain length.
pub fn walk(memory: &GuestMemoryMmap, table: GuestAddress, size: u16, head: u16) -> Result<ValidChain, ChainError> {
    let mut visited = vec![false; size as usize];
    let mut segments = Vec::new();
    let mut index = head;
    let mut seen_writable = false;
    loop {
        if index >= size {
            return Err(ChainError::IndexOutOfRange { index, size });
        }
        if std::mem::replace(&mut visited[index as usize], true) {
            return Err(ChainError::Loop { index });
        }
        if segments.len() >= size as usize {
            return Err(ChainError::TooLong { size });
        }
        let addr = table.0.checked_add(16 * index as u64).map(GuestAddress);
        let desc: Descriptor = addr
            .and_then(|a| memory.read_obj(a).ok())
            .ok_or(ChainError::TableOutsideRam { index, addr: table.0.wrapping_add(16 * index as u64) })?;
        if desc.refers_to_indirect_table() {
            return Err(ChainError::Indirect { index });
        }
        let in_ram = desc.addr().0.checked_add(desc.len() as u64).is_some()
            && (desc.len() == 0 || GuestMemoryBackend::check_range(memory, desc.addr(), desc.len() as usize));
        if !in_ram {
            return Err(ChainError::BufferOutsideRam { index, addr: desc.addr().0, len: desc.len() });
        }
        let writable = desc.is_write_only();
        if seen_writable && !writable {
            return Err(ChainError::ReadableAfterWritable { index });
        }
        seen_writable |= writable;
        segments.push(Segment { addr: desc.addr(), len: desc.len(), writable });
        if !desc.has_next() {
            return Ok(ValidChain { head, segments });
        }
        index = desc.next();
    }
}
