//! Where each zone lands in guest physical memory: zones are laid out in order from
//! GPA 0, each aligned to its page size, skipping the MMIO hole below 4 GiB. A zone that
//! would cross the hole is split into two slots around it. Pure arithmetic, no host.

use faultline_abi as abi;

/// One contiguous piece of a zone at one guest physical address (one KVM memslot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotPlan {
    /// Index of the zone this slot belongs to.
    pub zone: usize,
    /// Byte offset of the slot inside its zone (and its zone's mapping).
    pub zone_offset: u64,
    /// Guest physical address of the slot.
    pub gpa: u64,
    /// Length of the slot in bytes.
    pub size_bytes: u64,
}

/// What the layout needs to know about one zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZoneExtent {
    /// Size of the zone in bytes.
    pub size_bytes: u64,
    /// Alignment of its start GPA (its page size) and of any split point.
    pub align_bytes: u64,
}

/// Errors laying out guest RAM.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The zones do not fit below the largest guest physical address we support.
    #[error("guest RAM does not fit: zones reach past guest physical address {limit:#x}; give less memory")]
    TooLarge {
        /// The largest supported guest physical address.
        limit: u64,
    },
}

/// Highest guest physical address (exclusive) the layout will use: 2^46, the smallest
/// physical address width of x86-64 hosts that run KVM guests of this size.
pub const MAX_GPA: u64 = 1 << 46;

/// Lays out `zones` from GPA 0 in order; see the module documentation.
pub fn plan(zones: &[ZoneExtent]) -> Result<Vec<SlotPlan>, LayoutError> {
    let too_large = LayoutError::TooLarge { limit: MAX_GPA };
    let mut slots = Vec::new();
    let mut next_gpa = 0u64;
    for (zone, extent) in zones.iter().enumerate() {
        let align = extent.align_bytes.max(1);
        let mut gpa = next_gpa.checked_next_multiple_of(align).ok_or(too_large.clone())?;
        let mut zone_offset = 0;
        while zone_offset < extent.size_bytes {
            if (abi::MMIO_HOLE_START_GPA..abi::MMIO_HOLE_END_GPA).contains(&gpa) {
                gpa = abi::MMIO_HOLE_END_GPA;
            }
            let remaining = extent.size_bytes - zone_offset;
            let room = if gpa < abi::MMIO_HOLE_START_GPA { abi::MMIO_HOLE_START_GPA - gpa } else { u64::MAX };
            let size_bytes = remaining.min(room);
            let end = gpa.checked_add(size_bytes).ok_or(too_large.clone())?;
            if end > MAX_GPA {
                return Err(too_large);
            }
            slots.push(SlotPlan { zone, zone_offset, gpa, size_bytes });
            zone_offset += size_bytes;
            gpa = end;
        }
        next_gpa = gpa;
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn zone(size_bytes: u64, align_bytes: u64) -> ZoneExtent {
        ZoneExtent { size_bytes, align_bytes }
    }

    #[test]
    fn zones_are_laid_out_back_to_back_from_zero() {
        let slots = plan(&[zone(256 * MIB, 4096), zone(64 * MIB, 4096)]).unwrap();
        assert_eq!(
            slots,
            vec![
                SlotPlan { zone: 0, zone_offset: 0, gpa: 0, size_bytes: 256 * MIB },
                SlotPlan { zone: 1, zone_offset: 0, gpa: 256 * MIB, size_bytes: 64 * MIB },
            ]
        );
    }

    #[test]
    fn zone_crossing_the_mmio_hole_is_split_around_it() {
        let slots = plan(&[zone(4 * GIB, 4096)]).unwrap();
        assert_eq!(
            slots,
            vec![
                SlotPlan { zone: 0, zone_offset: 0, gpa: 0, size_bytes: 3 * GIB },
                SlotPlan { zone: 0, zone_offset: 3 * GIB, gpa: 4 * GIB, size_bytes: GIB },
            ]
        );
    }

    #[test]
    fn zone_starting_at_the_hole_moves_above_4g() {
        let slots = plan(&[zone(3 * GIB, 4096), zone(GIB, 2 * MIB)]).unwrap();
        assert_eq!(slots[1], SlotPlan { zone: 1, zone_offset: 0, gpa: 4 * GIB, size_bytes: GIB });
    }

    #[test]
    fn huge_page_zones_start_aligned_to_their_page_size() {
        let slots = plan(&[zone(64 * MIB + 4096, 4096), zone(GIB, GIB)]).unwrap();
        assert_eq!(slots[1].gpa, GIB);
        let slots = plan(&[zone(4096, 4096), zone(4 * MIB, 2 * MIB)]).unwrap();
        assert_eq!(slots[1].gpa, 2 * MIB);
    }

    #[test]
    fn absurd_sizes_are_refused() {
        assert_eq!(plan(&[zone(MAX_GPA, 4096)]), Err(LayoutError::TooLarge { limit: MAX_GPA }));
        assert_eq!(plan(&[zone(u64::MAX - 10, 4096), zone(4096, 4096)]), Err(LayoutError::TooLarge { limit: MAX_GPA }));
    }
}
