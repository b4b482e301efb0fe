//! Loading a kernel and preparing the boot CPU: the PVH protocol (`pvh`) for ELFs with a
//! Xen PHYS32_ENTRY note, the Linux 64-bit boot protocol (`linux`) for a `vmlinux`
//! without one or a bzImage, and for the built-in guest Faultline's own direct 64-bit
//! entry (`direct`: the VMM does the guest's ring-0 boot work). The choice is made from
//! the image itself (`elf` reads its headers); an ELF that speaks none of these is
//! refused before anything is loaded.

pub mod direct;
pub mod elf;
pub mod gdt;
pub mod linux;
pub mod pvh;
#[doc(hidden)] // for tests, unit and integration: hand-made hostile kernels
pub mod test_elf;
pub mod timeline;
pub mod zero;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use faultline_abi as abi;
use kvm_bindings::{kvm_regs, kvm_sregs};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
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
    /// An ELF that cannot be booted (a program, another architecture, no boot protocol).
    #[error("cannot boot {name}: {reason}")]
    NotAKernel {
        /// The image.
        name: String,
        /// What its headers say.
        reason: elf::ElfError,
    },
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
    /// Guest RAM reaches higher than the direct entry's page tables can map.
    #[error("guest RAM ends at {ram_end:#x}, but the built-in guest's boot page tables map at most {most_gib} GiB; use less memory")]
    DirectMapTooLarge {
        /// Where the identity map would have to end.
        ram_end: u64,
        /// The most GiB that can be mapped.
        most_gib: u64,
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
    /// Faultline's direct 64-bit entry (the built-in guest): long mode, the VMM's page
    /// tables, PVH start info in rbx (`abi::DIRECT_ENTRY_NOTE_NAME` has the contract).
    Direct {
        /// The 64-bit entry point.
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
    /// Faultline's direct 64-bit entry: long mode with the VMM's identity map,
    /// `rbx` = start info, `rsi` = bytes mapped.
    Direct64 {
        /// Entry address.
        entry: u64,
        /// `hvm_start_info` GPA (in rbx).
        start_info: u64,
        /// PML4 GPA (cr3).
        pml4: u64,
        /// Bytes identity-mapped from 0 (in rsi).
        mapped_bytes: u64,
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
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

impl CpuEntry {
    /// Writes this entry state into the vCPU's registers.
    pub fn apply(&self, regs: &mut kvm_regs, sregs: &mut kvm_sregs) {
        let table = match self {
            CpuEntry::Pvh32 { .. } => &gdt::PVH_GDT,
            CpuEntry::Linux64 { .. } | CpuEntry::Direct64 { .. } => &gdt::LINUX_GDT,
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
            CpuEntry::Direct64 { entry, start_info, pml4, mapped_bytes } => {
                // What the guest's ring-0 boot would have set (abi::DIRECT_ENTRY_NOTE_NAME).
                sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_NE | X86_CR0_PG;
                sregs.cr3 = pml4;
                sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
                sregs.efer = EFER_LME | EFER_LMA;
                regs.rip = entry;
                regs.rbx = start_info;
                regs.rsi = mapped_bytes;
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
pub fn load_kernel(kernel: &KernelImage, ram: &GuestRam) -> Result<LoadedKernel, BootError> {
    let (name, bytes) = match kernel {
        // Borrowed, not copied: a copy of the embedded ELF faults in fresh pages for nothing.
        KernelImage::BuiltIn => ("built-in guest".to_string(), std::borrow::Cow::Borrowed(crate::BUILTIN_GUEST_ELF)),
        KernelImage::Path(path) => (path.display().to_string(), std::borrow::Cow::Owned(read_image(path)?)),
    };
    // The direct entry is a contract between this VMM and the guest built with it: only
    // the embedded guest is entered that way; a `--kernel` file boots by its public
    // protocol (PVH or Linux), as any VMM would boot it.
    let built_in = *kernel == KernelImage::BuiltIn;
    let loaded = load_image(&name, &bytes, ram, built_in)?;
    if built_in && matches!(loaded.entry, KernelEntry::Linux { .. }) {
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

/// Loads an image already in memory (ELF or bzImage) into guest RAM. With `direct`, an
/// ELF with Faultline's direct-entry note is entered there.
pub fn load_image(name: &str, bytes: &[u8], ram: &GuestRam, direct: bool) -> Result<LoadedKernel, BootError> {
    let memory = ram.memory();
    let load_err = |e: linux_loader::loader::Error| BootError::Load { name: name.to_string(), reason: e.to_string() };
    let mut image = Cursor::new(bytes);
    if bytes.starts_with(b"\x7fELF") {
        let headers = elf::inspect(bytes).map_err(|reason| BootError::NotAKernel { name: name.to_string(), reason })?;
        let result = Elf::load(memory, None, &mut image, None).map_err(load_err)?;
        let end_gpa = zero_unfilled(ram, &headers.segments)?.max(result.kernel_end);
        let entry = match (headers.direct_entry, headers.protocol) {
            (Some(entry), _) if direct => KernelEntry::Direct { entry },
            (_, elf::ElfProtocol::Pvh { entry }) => KernelEntry::Pvh { entry },
            (_, elf::ElfProtocol::Linux) => KernelEntry::Linux { entry: result.kernel_load.0, setup_header: None },
        };
        return Ok(LoadedKernel { name: name.to_string(), entry, end_gpa });
    }
    if is_bzimage(bytes) {
        let result = BzImage::load(memory, None, &mut image, Some(GuestAddress(abi::KERNEL_GPA))).map_err(load_err)?;
        // The 64-bit entry of a bzImage is 0x200 past the start of its protected-mode code.
        let entry = KernelEntry::Linux { entry: result.kernel_load.0 + 0x200, setup_header: result.setup_header };
        return Ok(LoadedKernel { name: name.to_string(), entry, end_gpa: result.kernel_end });
    }
    Err(BootError::UnknownFormat(name.to_string()))
}

/// Zeroes what each loaded segment holds in memory beyond what the file gave it
/// (`p_memsz - p_filesz`) and returns the end of the highest segment (`zero` says how).
fn zero_unfilled(ram: &GuestRam, segments: &[elf::LoadSegment]) -> Result<u64, BootError> {
    let mut end_gpa = 0;
    for segment in segments {
        let start = segment.gpa.saturating_add(segment.file_bytes);
        let end = segment.gpa.saturating_add(segment.memory_bytes);
        end_gpa = end_gpa.max(end);
        zero::zero_range(ram, start, end)?;
    }
    Ok(end_gpa)
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
        KernelEntry::Direct { entry } => direct::configure(ram, *entry),
        KernelEntry::Linux { entry, setup_header } => linux::configure(ram, *entry, setup_header.as_ref(), cmdline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestRam {
        GuestRam::new(&[crate::config::ZoneConfig::new(16 << 20, crate::config::Backend::Anon)]).unwrap()
    }

    #[test]
    fn unknown_formats_and_missing_files_are_named() {
        let err = load_image("/tmp/notes.txt", b"hello world", &memory(), false).unwrap_err().to_string();
        assert_eq!(err, "not an ELF or bzImage kernel: /tmp/notes.txt");
        let err = load_kernel(&KernelImage::Path("/nonexistent/vmlinux".into()), &memory()).unwrap_err().to_string();
        assert_eq!(err, "file not found: /nonexistent/vmlinux");
    }

    #[test]
    fn memory_past_the_file_contents_of_each_segment_is_zeroed() {
        use test_elf::TestNote;
        let ram = memory();
        let mem = ram.memory();
        // Guest RAM that already holds data, as a reused file zone does.
        mem.write_slice(&vec![0xa5u8; 1 << 20], GuestAddress(test_elf::TEST_KERNEL_GPA)).unwrap();
        let code = [0xf4u8; 100];
        let bss = 3 * 4096 + 123;
        let image = test_elf::build(&code, &[TestNote::Pvh], bss);
        let loaded = load_image("bss", &image, &ram, false).unwrap();
        assert_eq!(loaded.end_gpa, test_elf::TEST_KERNEL_GPA + 100 + bss);
        let mut back = vec![0xffu8; (100 + bss + 1) as usize];
        mem.read_slice(&mut back, GuestAddress(test_elf::TEST_KERNEL_GPA)).unwrap();
        assert_eq!(&back[..100], &code);
        assert!(back[100..(100 + bss) as usize].iter().all(|&b| b == 0), "the .bss was not zeroed");
        assert_eq!(back[(100 + bss) as usize], 0xa5, "past the segment is left alone");
    }

    #[test]
    fn elfs_that_are_no_kernel_are_refused_before_loading() {
        let err = load_image("/bin/sh", &std::fs::read("/bin/sh").unwrap(), &memory(), false).unwrap_err();
        assert!(err.to_string().starts_with("cannot boot /bin/sh: it is a "), "{err}");
        let bare = test_elf::with_notes(&[0xf4], &[]);
        let err = load_image("bare.elf", &bare, &memory(), false).unwrap_err().to_string();
        assert!(err.contains("neither a PVH entry note") && err.contains("bare.elf"), "{err}");
    }

    #[test]
    fn only_the_direct_loader_uses_the_direct_entry() {
        use test_elf::TestNote;
        let image = test_elf::with_notes(&[0xf4], &[TestNote::Pvh, TestNote::Direct(0x10_0040)]);
        let direct = load_image("guest", &image, &memory(), true).unwrap();
        assert!(matches!(direct.entry, KernelEntry::Direct { entry: 0x10_0040 }));
        let pvh = load_image("guest", &image, &memory(), false).unwrap();
        assert!(matches!(pvh.entry, KernelEntry::Pvh { entry: test_elf::TEST_KERNEL_GPA }));
    }

    #[test]
    fn command_line_is_nul_terminated_and_bounded() {
        let ram = memory();
        let mem = ram.memory();
        write_cmdline(mem, "fl.cpus=1").unwrap();
        let mut buf = [0xffu8; 10];
        mem.read_slice(&mut buf, GuestAddress(abi::CMDLINE_GPA)).unwrap();
        assert_eq!(&buf, b"fl.cpus=1\0");
        let long = "x".repeat(abi::CMDLINE_MAX_BYTES);
        assert!(matches!(write_cmdline(mem, &long), Err(BootError::CmdlineTooLong { .. })));
    }
}
