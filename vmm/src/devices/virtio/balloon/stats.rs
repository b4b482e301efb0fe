//! The guest's memory statistics (virtio 1.2, 5.5.6.3): tagged `(le16 tag, le64 value)`
//! entries, 10 bytes each, packed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Size of one statistics entry.
pub const STAT_ENTRY_BYTES: usize = 10;

/// The spec's names of the tags, by tag number.
const TAG_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
    "alloc_stalls",
    "async_scans",
    "direct_scans",
    "async_reclaims",
    "direct_reclaims",
];

/// The name of a statistics tag (`tag_N` for tags this VMM does not know).
pub fn tag_name(tag: u16) -> String {
    TAG_NAMES.get(tag as usize).map_or_else(|| format!("tag_{tag}"), |n| n.to_string())
}

/// The latest statistics the guest sent: values by tag name (memory values in bytes,
/// as the spec defines them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Values by tag name (`free_memory`, `total_memory`, `available_memory`, ...).
    pub values: BTreeMap<String, u64>,
    /// How many statistics buffers the guest has sent so far (this one included).
    pub updates: u64,
}

impl GuestStats {
    /// The value of `tag`, if the guest sent it.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.get(&tag_name(tag)).copied()
    }
}

/// Parses a statistics buffer; a trailing partial entry is ignored (the caller counts it
/// as a driver error).
pub fn parse(bytes: &[u8]) -> BTreeMap<String, u64> {
    bytes
        .chunks_exact(STAT_ENTRY_BYTES)
        .map(|e| {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let value = u64::from_le_bytes(e[2..10].try_into().expect("8 bytes"));
            (tag_name(tag), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_by_tag_and_unknown_tags_keep_their_number() {
        let mut buf = Vec::new();
        for (tag, value) in [(4u16, 1u64 << 30), (5, 2 << 30), (99, 7)] {
            buf.extend_from_slice(&tag.to_le_bytes());
            buf.extend_from_slice(&value.to_le_bytes());
        }
        buf.push(0xaa); // partial entry
        let values = parse(&buf);
        assert_eq!(values.len(), 3);
        assert_eq!(values["free_memory"], 1 << 30);
        assert_eq!(values["total_memory"], 2 << 30);
        assert_eq!(values["tag_99"], 7);
        let stats = GuestStats { values, updates: 1 };
        assert_eq!(stats.get(5), Some(2 << 30));
        assert_eq!(stats.get(6), None);
    }
}
