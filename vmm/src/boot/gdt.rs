//! Flat boot GDTs and the KVM segment registers that match them.

use kvm_bindings::kvm_segment;

/// Builds a GDT descriptor from access/flag bits (`0xc09b`-style), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment register for descriptor `entry` at GDT index `index`.
pub fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granular = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: if granular == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The 32-bit flat GDT of the PVH entry: null, code (0x08), data (0x10), TSS (0x18).
pub const PVH_GDT: [u64; 4] =
    [0, gdt_entry(0xc09b, 0, 0xffff_ffff), gdt_entry(0xc093, 0, 0xffff_ffff), gdt_entry(0x008b, 0, 0x67)];

/// The 64-bit GDT of the Linux entry: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub const LINUX_GDT: [u64; 4] =
    [0, gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_32_bit_code_segment_decodes_as_expected() {
        assert_eq!(PVH_GDT[1], 0x00cf_9b00_0000_ffff);
        let cs = segment(PVH_GDT[1], 1);
        assert_eq!((cs.base, cs.limit, cs.selector, cs.type_), (0, 0xffff_ffff, 8, 0xb));
        assert_eq!((cs.present, cs.db, cs.s, cs.l, cs.g, cs.unusable), (1, 1, 1, 0, 1, 0));
    }

    #[test]
    fn long_mode_code_segment_has_l_set_and_db_clear() {
        let cs = segment(LINUX_GDT[1], 1);
        assert_eq!((cs.l, cs.db), (1, 0));
        let tr = segment(LINUX_GDT[3], 3);
        assert_eq!((tr.selector, tr.type_), (0x18, 0xb));
    }
}
