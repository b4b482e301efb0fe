//! What an ELF kernel is, read from its own headers before anything is loaded: its
//! loadable segments (so the part of each that the file does not hold can be zeroed), and
//! its notes (which boot protocol it speaks).
//!
//! Hand-rolled on purpose: linux-loader keeps its ELF structures private and zeroes
//! nothing past `p_filesz`; what we need is a handful of fixed little-endian offsets of
//! the ELF64 header, program headers and notes, all bounds-checked here.

use faultline_abi as abi;

/// Errors reading an ELF kernel's headers: each says why the file cannot be booted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// The headers end before they should.
    #[error("the ELF headers are truncated ({0}); is the file complete?")]
    Truncated(&'static str),
    /// Not a 64-bit little-endian x86-64 ELF.
    #[error("it is not a 64-bit little-endian x86-64 ELF ({0}); Faultline boots x86-64 kernels only")]
    WrongMachine(&'static str),
    /// A position-independent program or shared object.
    #[error("it is a position-independent program or shared library (ELF type ET_DYN), not a kernel")]
    SharedObject,
    /// Not an executable.
    #[error("its ELF type is {0}, not an executable (ET_EXEC) kernel")]
    NotExecutable(u16),
    /// A user-space program that asks for a dynamic linker.
    #[error("it is a user-space program (it asks for the program interpreter {0}), not a kernel")]
    UserProgram(String),
    /// An executable with neither a PVH entry nor the notes of a Linux kernel.
    #[error(
        "it has neither a PVH entry note (Xen XEN_ELFNOTE_PHYS32_ENTRY, as Linux writes with CONFIG_PVH=y) \
         nor the \"Linux\" notes of a Linux vmlinux, so there is no boot protocol to enter it by; \
         give a PVH kernel, a Linux vmlinux or a bzImage"
    )]
    NoBootProtocol,
}

/// How an ELF kernel says it wants to be entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfProtocol {
    /// A PVH kernel: the PHYS32_ENTRY address.
    Pvh {
        /// The 32-bit entry point.
        entry: u64,
    },
    /// A Linux vmlinux without a PVH note: the 64-bit boot protocol at `e_entry`.
    Linux,
}

/// One PT_LOAD segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    /// Guest physical address (p_paddr).
    pub gpa: u64,
    /// Bytes held by the file.
    pub file_bytes: u64,
    /// Bytes in memory (the rest, `memory_bytes - file_bytes`, must read as zero).
    pub memory_bytes: u64,
}

/// What the headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfKernel {
    /// The boot protocol.
    pub protocol: ElfProtocol,
    /// The 64-bit entry of Faultline's direct entry (a `Faultline` note), if present.
    pub direct_entry: Option<u64>,
    /// The loadable segments.
    pub segments: Vec<LoadSegment>,
}

const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const EHDR_BYTES: usize = 64;
const PHDR_BYTES: usize = 56;
/// XEN_ELFNOTE_PHYS32_ENTRY.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(offset..offset + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(offset..offset + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(offset..offset + 8)?.try_into().ok()?))
}

/// A note: name (without its NUL), type, descriptor.
struct Note<'a> {
    name: &'a [u8],
    kind: u32,
    desc: &'a [u8],
}

/// The notes of one PT_NOTE segment's bytes (4-byte aligned, as Linux and Xen write them).
fn notes(mut bytes: &[u8]) -> Vec<Note<'_>> {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    let mut out = Vec::new();
    while let (Some(namesz), Some(descsz), Some(kind)) = (u32_at(bytes, 0), u32_at(bytes, 4), u32_at(bytes, 8)) {
        let (namesz, descsz) = (namesz as usize, descsz as usize);
        let name_end = 12 + namesz;
        let desc_start = 12 + align4(namesz);
        let desc_end = desc_start.saturating_add(descsz);
        let (Some(name), Some(desc)) = (bytes.get(12..name_end), bytes.get(desc_start..desc_end)) else { break };
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        out.push(Note { name, kind, desc });
        bytes = bytes.get(align4(desc_end)..).unwrap_or(&[]);
    }
    out
}

/// Reads the headers of an ELF kernel image (which starts with `\x7fELF`).
pub fn inspect(bytes: &[u8]) -> Result<ElfKernel, ElfError> {
    if bytes.len() < EHDR_BYTES {
        return Err(ElfError::Truncated("the file header"));
    }
    if bytes[4] != 2 {
        return Err(ElfError::WrongMachine("32-bit ELF class"));
    }
    if bytes[5] != 1 {
        return Err(ElfError::WrongMachine("big-endian"));
    }
    let header = |offset| u16_at(bytes, offset).ok_or(ElfError::Truncated("the file header"));
    match header(16)? {
        ET_EXEC => {}
        ET_DYN => return Err(ElfError::SharedObject),
        other => return Err(ElfError::NotExecutable(other)),
    }
    if header(18)? != EM_X86_64 {
        return Err(ElfError::WrongMachine("e_machine is not x86-64"));
    }
    let phoff = u64_at(bytes, 32).ok_or(ElfError::Truncated("the file header"))? as usize;
    let phentsize = header(54)? as usize;
    let phnum = header(56)? as usize;
    if phentsize < PHDR_BYTES && phnum > 0 {
        return Err(ElfError::Truncated("program headers smaller than 56 bytes"));
    }
    let mut segments = Vec::new();
    let mut pvh_entry = None;
    let mut linux = false;
    let mut direct_entry = None;
    for index in 0..phnum {
        let at = phoff.saturating_add(index.saturating_mul(phentsize));
        let phdr = bytes.get(at..at.saturating_add(PHDR_BYTES)).ok_or(ElfError::Truncated("the program headers"))?;
        let word = |offset| u64_at(phdr, offset).unwrap_or(0);
        let (kind, offset, paddr, filesz, memsz) =
            (u32_at(phdr, 0).unwrap_or(0), word(8), word(24), word(32), word(40));
        let contents = || bytes.get(offset as usize..(offset.saturating_add(filesz)) as usize);
        match kind {
            PT_LOAD => segments.push(LoadSegment { gpa: paddr, file_bytes: filesz, memory_bytes: memsz }),
            PT_INTERP => {
                let path = contents().unwrap_or(&[]);
                let path = path.split(|&b| b == 0).next().unwrap_or(&[]);
                return Err(ElfError::UserProgram(String::from_utf8_lossy(path).into_owned()));
            }
            PT_NOTE => {
                for note in notes(contents().ok_or(ElfError::Truncated("a note segment"))?) {
                    match (note.name, note.kind) {
                        (b"Xen", XEN_ELFNOTE_PHYS32_ENTRY) => {
                            // Linux writes a 4-byte entry, our guest an 8-byte one.
                            let entry = u64_at(note.desc, 0).or_else(|| u32_at(note.desc, 0).map(u64::from));
                            pvh_entry = pvh_entry.or(entry);
                        }
                        (b"Linux", _) => linux = true,
                        (name, abi::DIRECT_ENTRY_NOTE_TYPE) if name == abi::DIRECT_ENTRY_NOTE_NAME.as_bytes() => {
                            direct_entry = u64_at(note.desc, 0);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let protocol = match (pvh_entry, linux) {
        (Some(entry), _) => ElfProtocol::Pvh { entry },
        (None, true) => ElfProtocol::Linux,
        (None, false) => return Err(ElfError::NoBootProtocol),
    };
    Ok(ElfKernel { protocol, direct_entry, segments })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::test_elf::{self, TestNote};

    #[test]
    fn pvh_linux_and_direct_notes_are_recognised() {
        let pvh = inspect(&test_elf::elf(&[0xf4], true)).unwrap();
        assert_eq!(pvh.protocol, ElfProtocol::Pvh { entry: test_elf::TEST_KERNEL_GPA });
        let linux = inspect(&test_elf::elf(&[0xf4], false)).unwrap();
        assert_eq!((linux.protocol, linux.direct_entry), (ElfProtocol::Linux, None));
        let direct = inspect(&test_elf::with_notes(&[0xf4], &[TestNote::Pvh, TestNote::Direct(0x12_3456)])).unwrap();
        assert_eq!(direct.direct_entry, Some(0x12_3456));
        assert_eq!(
            direct.segments,
            vec![LoadSegment { gpa: test_elf::TEST_KERNEL_GPA, file_bytes: 1, memory_bytes: 1 }]
        );
    }

    #[test]
    fn the_built_in_guest_has_a_pvh_and_a_direct_entry() {
        let guest = inspect(crate::BUILTIN_GUEST_ELF).unwrap();
        assert!(matches!(guest.protocol, ElfProtocol::Pvh { .. }));
        assert!(guest.direct_entry.is_some());
        assert!(guest.segments.iter().any(|s| s.memory_bytes > s.file_bytes), "the guest has a .bss");
    }

    #[test]
    fn an_elf_without_a_boot_protocol_is_refused() {
        assert_eq!(inspect(&test_elf::with_notes(&[0xf4], &[])), Err(ElfError::NoBootProtocol));
    }

    #[test]
    fn user_space_programs_are_refused_naming_why() {
        let bash = std::fs::read("/bin/sh").expect("/bin/sh exists");
        let err = inspect(&bash).unwrap_err();
        assert!(matches!(err, ElfError::SharedObject | ElfError::UserProgram(_)), "{err}");
        let mut dyn_elf = test_elf::elf(&[0xf4], true);
        dyn_elf[16] = 3;
        assert_eq!(inspect(&dyn_elf), Err(ElfError::SharedObject));
        let mut arm = test_elf::elf(&[0xf4], true);
        arm[18] = 183;
        assert!(matches!(inspect(&arm), Err(ElfError::WrongMachine(_))));
        assert!(matches!(inspect(&arm[..40]), Err(ElfError::Truncated(_))));
    }
}
