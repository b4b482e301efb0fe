//! The PVH boot information (`hvm_start_info`, its command line and memory map).
//!
//! The loader may have put them anywhere (Faultline: 0x6000/0x7000/0x20000; QEMU
//! elsewhere), possibly inside what becomes the workload region, so the BSP copies them
//! into the guest's own `.bss` before anything else touches memory.

use faultline_abi::CMDLINE_MAX_BYTES;

use crate::smp::Shared;

/// `hvm_start_info.magic`.
const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Most memory-map entries kept.
pub const MAX_MEMMAP_ENTRIES: usize = 128;
/// `hvm_memmap_table_entry.type` of usable RAM.
pub const MEMMAP_TYPE_RAM: u32 = 1;

/// One `hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct MemmapEntry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type (1 = RAM).
    pub kind: u32,
    /// Reserved.
    pub reserved: u32,
}

/// The fields of `hvm_start_info` the guest uses (offsets from the PVH spec).
#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

static CMDLINE: Shared<[u8; CMDLINE_MAX_BYTES]> = Shared::new([0; CMDLINE_MAX_BYTES]);
static MEMMAP: Shared<[MemmapEntry; MAX_MEMMAP_ENTRIES]> =
    Shared::new([MemmapEntry { addr: 0, size: 0, kind: 0, reserved: 0 }; MAX_MEMMAP_ENTRIES]);

/// The boot information, copied into the guest's own memory.
pub struct BootInfo {
    /// The kernel command line.
    pub cmdline: &'static str,
    /// The memory map, as the loader gave it.
    pub memmap: &'static [MemmapEntry],
}

/// Copies the command line and memory map out of the loader's `hvm_start_info`.
/// Called once, by the BSP, before any other CPU runs.
pub fn copy_boot_info(start_info_gpa: u64) -> Result<BootInfo, &'static str> {
    if start_info_gpa == 0 {
        return Err("no hvm_start_info (ebx was 0 at the PVH entry)");
    }
    // SAFETY: the loader placed hvm_start_info at this identity-mapped address.
    let info = unsafe { (start_info_gpa as *const StartInfo).read_volatile() };
    if info.magic != START_INFO_MAGIC {
        return Err("hvm_start_info has a bad magic");
    }
    if info.version < 1 || info.memmap_paddr == 0 || info.memmap_entries == 0 {
        return Err("hvm_start_info carries no memory map (version 1 needed)");
    }
    // SAFETY: only the BSP runs; nothing else refers to these buffers yet.
    let (cmdline_buf, memmap_buf) = unsafe { (&mut *CMDLINE.get(), &mut *MEMMAP.get()) };
    let mut length = 0;
    if info.cmdline_paddr != 0 {
        let source = info.cmdline_paddr as *const u8;
        while length < CMDLINE_MAX_BYTES {
            // SAFETY: the command line is a NUL-terminated string at an identity-mapped
            // address; we stop at the NUL or at the buffer's end.
            let byte = unsafe { source.add(length).read_volatile() };
            if byte == 0 {
                break;
            }
            cmdline_buf[length] = byte;
            length += 1;
        }
    }
    let entries = (info.memmap_entries as usize).min(MAX_MEMMAP_ENTRIES);
    for (i, slot) in memmap_buf.iter_mut().take(entries).enumerate() {
        // SAFETY: the loader's memory map has `memmap_entries` entries at that address.
        *slot = unsafe { (info.memmap_paddr as *const MemmapEntry).add(i).read_volatile() };
    }
    // The buffers are never written again: hand them out as shared 'static references.
    let cmdline_buf: &'static [u8; CMDLINE_MAX_BYTES] = cmdline_buf;
    let memmap_buf: &'static [MemmapEntry; MAX_MEMMAP_ENTRIES] = memmap_buf;
    let cmdline = core::str::from_utf8(&cmdline_buf[..length]).map_err(|_| "the command line is not UTF-8")?;
    Ok(BootInfo { cmdline, memmap: &memmap_buf[..entries] })
}
