//! Loading a kernel and preparing the boot CPU: the PVH protocol (`pvh`) for ELFs with a
//! Xen PHYS32_ENTRY note (the tiny guest), the Linux 64-bit boot protocol (`linux`) for a
//! `vmlinux` without one or a bzImage. The choice is made from the image itself.

pub mod gdt;
pub mod linux;
pub mod pvh;
#[doc(hidden)] // for tests, unit and integration: hand-made hostile kernels
pub mod test_elf;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use faultline_abi as abi;
use kvm_bindings::{kvm_regs, kvm_sregs};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::KernelImage;
use crate::memory::GuestRam;

/// Errors loading a kernel or writing boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file does not exist.
    #[error("file not found: {0}")]
    NotFound(PathBuf),
    /// The kernel file cannot be read.
    #[error("cannot read kernel {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("not an ELF or bzImage kernel: {0}")]
    UnknownFormat(String),
    /// The loader rejected the image (bad headers, segments outside guest RAM, ...).
    #[error("cannot load kernel {name}: {reason}")]
    Load {
        /// The image.
        name: String,
        /// The loader's reason.
        reason: String,
    },
    /// The built-in guest has no PVH entry (a broken guest build).
    #[error("the built-in guest image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); rebuild guest-image/")]
    NoPvhEntry,
    /// The command line is too long.
    #[error("kernel command line is {len} bytes; at most {max} are allowed: shorten --cmdline or the workload")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Boot data does not fit in guest RAM.
    #[error("cannot write {what} at guest address {gpa:#x}: {reason} (is guest RAM at least 16 MiB?)")]
    Write {
        /// What was being written.
        what: &'static str,
        /// Where.
        gpa: u64,
        /// The vm-memory error.
        reason: String,
    },
    /// Too many RAM ranges for the boot memory map.
    #[error("guest RAM has {ranges} separate ranges but the {protocol} memory map holds at most {max}; use fewer memory zones")]
    MemoryMapFull {
        /// The boot protocol.
        protocol: &'static str,
        /// RAM ranges.
        ranges: usize,
        /// The most entries.
        max: usize,
    },
}

/// How a loaded kernel wants to be entered.
#[derive(Debug, Clone)]
pub enum KernelEntry {
    /// PVH: 32-bit protected mode, paging off, at this address.
    Pvh {
        /// The PHYS32_ENTRY address.
        entry: u64,
    },
    /// Linux 64-bit boot protocol: long mode with identity-mapped page tables.
    Linux {
        /// The 64-bit entry point.
        entry: u64,
        /// The setup header of a bzImage (`None` for a vmlinux).
        setup_header: Option<setup_header>,
    },
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// The image's name for messages (path or "built-in guest").
    pub name: String,
    /// How to enter it.
    pub entry: KernelEntry,
    /// First guest physical address past the loaded image.
    pub end_gpa: u64,
}

/// The boot CPU's register state at entry.
#[derive(Debug, Clone, Copy)]
pub enum CpuEntry {
    /// PVH 32-bit entry: flat segments from `pvh` GDT, `rbx` = start info.
    Pvh32 {
        /// Entry address.
        entry: u64,
        /// `hvm_start_info` GPA (in rbx).
        start_info: u64,
    },
    /// Linux 64-bit entry: long mode, `rsi` = boot_params.
    Linux64 {
        /// Entry address.
        entry: u64,
        /// Zero page GPA (in rsi).
        boot_params: u64,
        /// PML4 GPA (cr3).
        pml4: u64,
        /// Initial stack pointer.
        stack: u64,
    },
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

impl CpuEntry {
    /// Writes this entry state into the vCPU's registers.
    pub fn apply(&self, regs: &mut kvm_regs, sregs: &mut kvm_sregs) {
        let table = match self {
            CpuEntry::Pvh32 { .. } => &gdt::PVH_GDT,
            CpuEntry::Linux64 { .. } => &gdt::LINUX_GDT,
        };
        let code = gdt::segment(table[1], 1);
        let data = gdt::segment(table[2], 2);
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = gdt::segment(table[3], 3);
        sregs.gdt.base = abi::BOOT_GDT_GPA;
        sregs.gdt.limit = (std::mem::size_of_val(table) - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        *regs = kvm_regs { rflags: 0x2, ..Default::default() };
        match *self {
            CpuEntry::Pvh32 { entry, start_info } => {
                sregs.cr0 = X86_CR0_PE;
                sregs.cr4 = 0;
                sregs.efer = 0;
                regs.rip = entry;
                regs.rbx = start_info;
            }
            CpuEntry::Linux64 { entry, boot_params, pml4, stack } => {
                sregs.cr0 = X86_CR0_PE | X86_CR0_PG;
                sregs.cr3 = pml4;
                sregs.cr4 = X86_CR4_PAE;
                sregs.efer = EFER_LME | EFER_LMA;
                regs.rip = entry;
                regs.rsi = boot_params;
                regs.rsp = stack;
                regs.rbp = stack;
            }
        }
    }
}

/// Reads the image named by `kernel` and loads it into `memory`, choosing the boot
/// protocol from its format.
pub fn load_kernel(kernel: &KernelImage, memory: &GuestMemoryMmap) -> Result<LoadedKernel, BootError> {
    let (name, bytes) = match kernel {
        KernelImage::BuiltIn => ("built-in guest".to_string(), crate::BUILTIN_GUEST_ELF.to_vec()),
        KernelImage::Path(path) => (path.display().to_string(), read_image(path)?),
    };
    let loaded = load_image(&name, &bytes, memory)?;
    if *kernel == KernelImage::BuiltIn && !matches!(loaded.entry, KernelEntry::Pvh { .. }) {
        return Err(BootError::NoPvhEntry);
    }
    Ok(loaded)
}

fn read_image(path: &Path) -> Result<Vec<u8>, BootError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => BootError::NotFound(path.to_path_buf()),
        _ => BootError::Read { path: path.to_path_buf(), source },
    })
}

/// Whether `bytes` start like a bzImage (the "HdrS" magic of the setup header).
fn is_bzimage(bytes: &[u8]) -> bool {
    bytes.get(0x202..0x206) == Some(b"HdrS")
}

/// Loads an image already in memory (ELF or bzImage) into guest RAM.
pub fn load_image(name: &str, bytes: &[u8], memory: &GuestMemoryMmap) -> Result<LoadedKernel, BootError> {
    let load_err = |e: linux_loader::loader::Error| BootError::Load { name: name.to_string(), reason: e.to_string() };
    let mut image = Cursor::new(bytes);
    if bytes.starts_with(b"\x7fELF") {
        let result = Elf::load(memory, None, &mut image, None).map_err(load_err)?;
        let entry = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => KernelEntry::Pvh { entry: entry.0 },
            _ => KernelEntry::Linux { entry: result.kernel_load.0, setup_header: None },
        };
        return Ok(LoadedKernel { name: name.to_string(), entry, end_gpa: result.kernel_end });
    }
    if is_bzimage(bytes) {
        let result = BzImage::load(memory, None, &mut image, Some(GuestAddress(abi::KERNEL_GPA))).map_err(load_err)?;
        // The 64-bit entry of a bzImage is 0x200 past the start of its protected-mode code.
        let entry = KernelEntry::Linux { entry: result.kernel_load.0 + 0x200, setup_header: result.setup_header };
        return Ok(LoadedKernel { name: name.to_string(), entry, end_gpa: result.kernel_end });
    }
    Err(BootError::UnknownFormat(name.to_string()))
}

/// Writes the command line, NUL-terminated, at [`abi::CMDLINE_GPA`].
pub fn write_cmdline(memory: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= abi::CMDLINE_MAX_BYTES {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max: abi::CMDLINE_MAX_BYTES - 1 });
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    write(memory, "the kernel command line", abi::CMDLINE_GPA, &bytes)
}

/// Writes boot data, naming it in the error.
pub(crate) fn write(memory: &GuestMemoryMmap, what: &'static str, gpa: u64, bytes: &[u8]) -> Result<(), BootError> {
    memory.write_slice(bytes, GuestAddress(gpa)).map_err(|e| BootError::Write { what, gpa, reason: e.to_string() })
}

/// Writes the boot data of `kernel` (start info or zero page, memory map, GDT, page
/// tables; the command line must already be written) and returns the boot CPU's state.
pub fn configure(kernel: &LoadedKernel, ram: &GuestRam, cmdline: &str) -> Result<CpuEntry, BootError> {
    match &kernel.entry {
        KernelEntry::Pvh { entry } => pvh::configure(ram, *entry),
        KernelEntry::Linux { entry, setup_header } => linux::configure(ram, *entry, setup_header.as_ref(), cmdline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn unknown_formats_and_missing_files_are_named() {
        let err = load_image("/tmp/notes.txt", b"hello world", &memory()).unwrap_err().to_string();
        assert_eq!(err, "not an ELF or bzImage kernel: /tmp/notes.txt");
        let err = load_kernel(&KernelImage::Path("/nonexistent/vmlinux".into()), &memory()).unwrap_err().to_string();
        assert_eq!(err, "file not found: /nonexistent/vmlinux");
    }

    #[test]
    fn command_line_is_nul_terminated_and_bounded() {
        let mem = memory();
        write_cmdline(&mem, "fl.cpus=1").unwrap();
        let mut buf = [0xffu8; 10];
        mem.read_slice(&mut buf, GuestAddress(abi::CMDLINE_GPA)).unwrap();
        assert_eq!(&buf, b"fl.cpus=1\0");
        let long = "x".repeat(abi::CMDLINE_MAX_BYTES);
        assert!(matches!(write_cmdline(&mem, &long), Err(BootError::CmdlineTooLong { .. })));
    }
}
