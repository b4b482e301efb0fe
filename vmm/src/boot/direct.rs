//! Faultline's direct 64-bit entry for the built-in guest: the VMM does what the guest's
//! ring-0 boot would (identity-map guest RAM, leave 32-bit mode) and enters the guest's
//! 64-bit entry point, as Firecracker enters a Linux `vmlinux`. On hosts whose KVM
//! emulates guest ring 0 instruction by instruction, that is thousands of emulated
//! instructions fewer on the boot path. The boot information stays the PVH start info
//! and memory map, so the guest reads one format whichever way it was entered. The
//! contract is `abi::DIRECT_ENTRY_NOTE_NAME`'s.

use faultline_abi as abi;

use super::{gdt, pvh, BootError, CpuEntry};
use crate::memory::GuestRam;

const GIB: u64 = 1 << 30;
const PAGE_BYTES: u64 = 4096;
/// Present | writable | user.
const TABLE_FLAGS: u64 = 0x7;
/// Present | writable | user | 2 MiB page.
const LARGE_PAGE_FLAGS: u64 = 0x87;
/// Page-level cache disable | write-through (the MMIO hole).
const UNCACHED: u64 = 0x18;

/// How many bytes the direct entry identity-maps for RAM ranges `(gpa, size)`: at least
/// 4 GiB (the MMIO hole and the LAPIC are reached through it), and up to the end of the
/// highest range, in whole GiB.
pub fn mapped_bytes(ram_ranges: &[(u64, u64)]) -> u64 {
    let top = ram_ranges.iter().map(|&(gpa, size)| gpa.saturating_add(size)).max().unwrap_or(0);
    top.max(abi::MMIO_HOLE_END_GPA).div_ceil(GIB) * GIB
}

/// The page tables identity-mapping `[0, mapped_bytes)` with 2 MiB pages, to be placed
/// at `base`: PML4, PDPT, then one page directory per GiB. Every page is user-accessible
/// (the guest runs its workloads in ring 3) and the MMIO hole is uncached.
pub fn identity_map(base: u64, mapped_bytes: u64) -> Vec<u8> {
    let gib = mapped_bytes / GIB;
    let mut tables = vec![0u8; ((2 + gib) * PAGE_BYTES) as usize];
    let mut put = |table: u64, index: u64, value: u64| {
        let at = (table * PAGE_BYTES + index * 8) as usize;
        tables[at..at + 8].copy_from_slice(&value.to_le_bytes());
    };
    put(0, 0, (base + PAGE_BYTES) | TABLE_FLAGS);
    for g in 0..gib {
        put(1, g, (base + (2 + g) * PAGE_BYTES) | TABLE_FLAGS);
        for i in 0..512 {
            let gpa = g * GIB + (i << 21);
            let hole = (abi::MMIO_HOLE_START_GPA..abi::MMIO_HOLE_END_GPA).contains(&gpa);
            put(2 + g, i, gpa | LARGE_PAGE_FLAGS | if hole { UNCACHED } else { 0 });
        }
    }
    tables
}

/// Writes the PVH start info and memory map, the identity map and a 64-bit GDT; returns
/// the direct entry state.
pub fn configure(ram: &GuestRam, entry: u64) -> Result<CpuEntry, BootError> {
    let memory = ram.memory();
    let start_info = pvh::write_start_info(ram)?;
    let mapped = mapped_bytes(&ram.ram_ranges());
    let most = (abi::DIRECT_PAGE_TABLES_END_GPA - abi::DIRECT_PAGE_TABLES_GPA) / PAGE_BYTES - 2;
    if mapped / GIB > most.min(512) {
        return Err(BootError::DirectMapTooLarge { ram_end: mapped, most_gib: most.min(512) });
    }
    let tables = identity_map(abi::DIRECT_PAGE_TABLES_GPA, mapped);
    super::write(memory, "the direct entry's page tables", abi::DIRECT_PAGE_TABLES_GPA, &tables)?;
    let gdt_bytes: Vec<u8> = gdt::LINUX_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    super::write(memory, "the boot GDT", abi::BOOT_GDT_GPA, &gdt_bytes)?;
    Ok(CpuEntry::Direct64 { entry, start_info, pml4: abi::DIRECT_PAGE_TABLES_GPA, mapped_bytes: mapped })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tables: &[u8], table: u64, index: u64) -> u64 {
        let at = (table * PAGE_BYTES + index * 8) as usize;
        u64::from_le_bytes(tables[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn small_guests_map_the_first_4_gib_and_big_ones_all_their_ram() {
        assert_eq!(mapped_bytes(&[(0, 256 << 20)]), 4 * GIB);
        assert_eq!(mapped_bytes(&[(0, 3 * GIB), (4 * GIB, 3 * GIB)]), 7 * GIB);
        assert_eq!(mapped_bytes(&[(0, 3 * GIB), (4 * GIB, GIB + 4096)]), 6 * GIB);
    }

    #[test]
    fn identity_map_covers_every_2_mib_page_with_the_hole_uncached() {
        let base = abi::DIRECT_PAGE_TABLES_GPA;
        let tables = identity_map(base, 6 * GIB);
        assert_eq!(tables.len(), 8 * 4096);
        assert_eq!(entry(&tables, 0, 0), (base + 4096) | 7);
        assert_eq!(entry(&tables, 0, 1), 0);
        assert_eq!(entry(&tables, 1, 5), (base + 7 * 4096) | 7);
        assert_eq!(entry(&tables, 1, 6), 0);
        // The last 2 MiB page of the fifth GiB, the first of the hole, RAM after it.
        assert_eq!(entry(&tables, 2 + 5, 511), (6 * GIB - (2 << 20)) | 0x87);
        assert_eq!(entry(&tables, 2 + 3, 0), (3 * GIB) | 0x87 | 0x18);
        assert_eq!(entry(&tables, 2 + 4, 0), (4 * GIB) | 0x87);
    }
}
