//! The Linux x86-64 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry: a
//! zero page (`boot_params`) with the e820 map and command line, identity-mapped page
//! tables for the first GiB, a 64-bit GDT, and long-mode registers — the way Firecracker
//! boots a `vmlinux` or bzImage.

use faultline_abi as abi;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::ByteValued;

use super::{gdt, BootError, CpuEntry};
use crate::memory::GuestRam;

/// Where the zero page goes.
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// The identity-map page tables: PML4, PDPT, PD (2 MiB pages over the first GiB).
pub const PML4_GPA: u64 = 0x9000;
const PDPT_GPA: u64 = 0xa000;
const PD_GPA: u64 = 0xb000;
/// The boot stack (grows down below the page tables).
pub const BOOT_STACK_GPA: u64 = 0x8ff0;
/// Start of the Extended BIOS Data Area: RAM below it is usable, above it reserved.
pub const EBDA_START_GPA: u64 = 0x9fc00;
/// Start of RAM above the legacy hole.
pub const HIGH_MEMORY_GPA: u64 = 0x10_0000;
/// E820 types.
pub const E820_RAM: u32 = 1;
/// Reserved memory.
pub const E820_RESERVED: u32 = 2;
/// The zero page's e820 table size.
pub const E820_MAX_ENTRIES: usize = 128;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment a vmlinux (no setup header) is assumed to need, as Firecracker does.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const LOADED_HIGH: u8 = 1;
const CAN_USE_HEAP: u8 = 0x80;

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// Type (RAM or reserved).
    pub type_: u32,
}

/// The e820 map for RAM ranges: RAM below the EBDA, the legacy area 0x9fc00..1 MiB
/// reserved, every other RAM range usable.
pub fn e820(ram_ranges: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for &(start, size) in ram_ranges {
        let end = start + size;
        if start < EBDA_START_GPA {
            map.push(E820Entry { addr: start, size: end.min(EBDA_START_GPA) - start, type_: E820_RAM });
        }
        if start < HIGH_MEMORY_GPA && end > EBDA_START_GPA {
            let low = start.max(EBDA_START_GPA);
            map.push(E820Entry { addr: low, size: HIGH_MEMORY_GPA - low, type_: E820_RESERVED });
        }
        if end > HIGH_MEMORY_GPA {
            let high = start.max(HIGH_MEMORY_GPA);
            map.push(E820Entry { addr: high, size: end - high, type_: E820_RAM });
        }
    }
    map
}

/// `boot_params` as plain bytes for vm-memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);
// SAFETY: boot_params is a repr(C) bindgen struct of integers and arrays of integers;
// every bit pattern is valid and it has no implicit padding that matters to the kernel.
unsafe impl ByteValued for ZeroPage {}

/// Identity-maps the first GiB with 2 MiB pages; returns the page-table bytes
/// (PML4, PDPT, PD), each 4 KiB.
fn page_tables() -> [Vec<u8>; 3] {
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_GPA | 0x03).to_le_bytes());
    let mut pdpt = vec![0u8; 4096];
    pdpt[..8].copy_from_slice(&(PD_GPA | 0x03).to_le_bytes());
    let mut pd = vec![0u8; 4096];
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        pd[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&((i << 21) | 0x83).to_le_bytes());
    }
    [pml4, pdpt, pd]
}

/// Writes the zero page, page tables and GDT; returns the 64-bit entry state.
pub fn configure(
    ram: &GuestRam,
    entry: u64,
    header: Option<&setup_header>,
    cmdline: &str,
) -> Result<CpuEntry, BootError> {
    let memory = ram.memory();
    let map = e820(&ram.ram_ranges());
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootError::MemoryMapFull { protocol: "e820", ranges: map.len(), max: E820_MAX_ENTRIES });
    }
    let mut params = boot_params::default();
    match header {
        Some(header) => {
            // A bzImage says how long a command line it accepts (0: the old 255 bytes).
            let max = if header.cmdline_size == 0 { 255 } else { header.cmdline_size as usize };
            if cmdline.len() > max {
                return Err(BootError::CmdlineTooLong { len: cmdline.len(), max });
            }
            params.hdr = *header;
        }
        None => params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES,
    }
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = abi::CMDLINE_GPA as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    for (slot, item) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr: item.addr, size: item.size, r#type: item.type_ };
    }
    params.e820_entries = map.len() as u8;
    super::write(memory, "the Linux zero page", ZERO_PAGE_GPA, ZeroPage(params).as_slice())?;
    for (gpa, table) in [PML4_GPA, PDPT_GPA, PD_GPA].into_iter().zip(page_tables()) {
        super::write(memory, "the boot page tables", gpa, &table)?;
    }
    let gdt_bytes: Vec<u8> = gdt::LINUX_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    super::write(memory, "the boot GDT", abi::BOOT_GDT_GPA, &gdt_bytes)?;
    Ok(CpuEntry::Linux64 { entry, boot_params: ZERO_PAGE_GPA, pml4: PML4_GPA, stack: BOOT_STACK_GPA })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_the_legacy_area_and_keeps_high_ram() {
        let map = e820(&[(0, 256 << 20)]);
        assert_eq!(
            map,
            vec![
                E820Entry { addr: 0, size: EBDA_START_GPA, type_: E820_RAM },
                E820Entry { addr: EBDA_START_GPA, size: HIGH_MEMORY_GPA - EBDA_START_GPA, type_: E820_RESERVED },
                E820Entry { addr: HIGH_MEMORY_GPA, size: (256 << 20) - HIGH_MEMORY_GPA, type_: E820_RAM },
            ]
        );
    }

    #[test]
    fn e820_lists_ram_above_the_mmio_hole() {
        let map = e820(&[(0, 3 << 30), (4 << 30, 2 << 30)]);
        assert_eq!(map.len(), 4);
        assert_eq!(map[3], E820Entry { addr: 4 << 30, size: 2 << 30, type_: E820_RAM });
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let [pml4, _, pd] = page_tables();
        assert_eq!(u64::from_le_bytes(pml4[..8].try_into().unwrap()), PDPT_GPA | 3);
        assert_eq!(u64::from_le_bytes(pd[8 * 511..].try_into().unwrap()), (511 << 21) | 0x83);
    }
}
