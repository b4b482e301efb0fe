//! The PVH boot protocol (<https://xenbits.xen.org/docs/unstable/misc/pvh.html>):
//! `hvm_start_info` and its memory map, a flat 32-bit GDT, and the entry state.

use faultline_abi as abi;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{gdt, BootError, CpuEntry};
use crate::memory::GuestRam;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// E820/PVH memory type of usable RAM.
pub const E820_RAM: u32 = 1;
/// Most memory-map entries that fit between the map and the AP trampoline page.
pub const MAX_MEMMAP_ENTRIES: usize =
    ((abi::AP_TRAMPOLINE_GPA - abi::PVH_MEMMAP_GPA) as usize) / std::mem::size_of::<hvm_memmap_table_entry>();
const _: () = assert!(MAX_MEMMAP_ENTRIES >= 100);

/// The PVH memory map for RAM ranges `(gpa, size)`: one RAM entry each.
pub fn memmap(ram_ranges: &[(u64, u64)]) -> Vec<hvm_memmap_table_entry> {
    ram_ranges.iter().map(|&(addr, size)| hvm_memmap_table_entry { addr, size, type_: E820_RAM, reserved: 0 }).collect()
}

/// Writes the start info, memory map and GDT; returns the PVH entry state.
pub fn configure(ram: &GuestRam, entry: u64) -> Result<CpuEntry, BootError> {
    let start_info = write_start_info(ram)?;
    let gdt_bytes: Vec<u8> = gdt::PVH_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    super::write(ram.memory(), "the boot GDT", abi::BOOT_GDT_GPA, &gdt_bytes)?;
    Ok(CpuEntry::Pvh32 { entry, start_info })
}

/// Writes `hvm_start_info` and the memory map of `ram`; returns the start info's GPA.
pub fn write_start_info(ram: &GuestRam) -> Result<u64, BootError> {
    let memory = ram.memory();
    let map = memmap(&ram.ram_ranges());
    if map.len() > MAX_MEMMAP_ENTRIES {
        return Err(BootError::MemoryMapFull { protocol: "PVH", ranges: map.len(), max: MAX_MEMMAP_ENTRIES });
    }
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: abi::CMDLINE_GPA,
        memmap_paddr: abi::PVH_MEMMAP_GPA,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    for (index, item) in map.iter().enumerate() {
        let gpa = abi::PVH_MEMMAP_GPA + (index * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        memory.write_obj(*item, GuestAddress(gpa)).map_err(|e| BootError::Write {
            what: "the PVH memory map",
            gpa,
            reason: e.to_string(),
        })?;
    }
    super::write(memory, "hvm_start_info", abi::PVH_START_INFO_GPA, start_info.as_slice())?;
    Ok(abi::PVH_START_INFO_GPA)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, ZoneConfig};

    #[test]
    fn memory_map_lists_every_ram_range_as_ram() {
        let map = memmap(&[(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(map.len(), 2);
        assert_eq!((map[1].addr, map[1].size, map[1].type_), (4 << 30, 1 << 30, E820_RAM));
    }

    #[test]
    fn start_info_points_at_cmdline_and_memmap() {
        let ram = GuestRam::new(&[ZoneConfig::new(16 << 20, Backend::Anon)]).unwrap();
        let entry = configure(&ram, 0x10_0000).unwrap();
        assert!(matches!(entry, CpuEntry::Pvh32 { entry: 0x10_0000, start_info: abi::PVH_START_INFO_GPA }));
        let info: hvm_start_info = ram.memory().read_obj(GuestAddress(abi::PVH_START_INFO_GPA)).unwrap();
        assert_eq!((info.magic, info.version, info.memmap_entries), (XEN_HVM_START_MAGIC, 1, 1));
        assert_eq!((info.cmdline_paddr, info.memmap_paddr), (abi::CMDLINE_GPA, abi::PVH_MEMMAP_GPA));
        let first: hvm_memmap_table_entry = ram.memory().read_obj(GuestAddress(abi::PVH_MEMMAP_GPA)).unwrap();
        assert_eq!((first.addr, first.size), (0, 16 << 20));
    }
}
