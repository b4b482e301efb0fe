//! Builds minimal x86-64 ELF kernels for tests: one PT_LOAD segment with the given code
//! at 1 MiB (optionally followed by a zero-initialised `.bss` the file does not hold) and
//! a note segment: a PVH (Xen PHYS32_ENTRY) note, a Linux note, a Faultline direct-entry
//! note, in any combination.

use faultline_abi as abi;

/// Where test kernels are loaded and entered.
pub const TEST_KERNEL_GPA: u64 = 0x10_0000;

/// A note a test kernel carries.
#[derive(Debug, Clone, Copy)]
pub enum TestNote {
    /// XEN_ELFNOTE_PHYS32_ENTRY pointing at the code.
    Pvh,
    /// A "Linux" note (as every vmlinux has).
    Linux,
    /// Faultline's direct 64-bit entry at this address.
    Direct(u64),
}

fn note_bytes(name: &str, kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().div_ceil(4) * 4, 0);
    out.extend_from_slice(desc);
    out.resize(out.len().div_ceil(4) * 4, 0);
    out
}

/// An ELF with `code` at [`TEST_KERNEL_GPA`]; with `pvh`, a PHYS32_ENTRY note for it,
/// without, a Linux note (so it boots by the Linux 64-bit protocol).
pub fn elf(code: &[u8], pvh: bool) -> Vec<u8> {
    with_notes(code, &[if pvh { TestNote::Pvh } else { TestNote::Linux }])
}

/// An ELF with `code` and these notes.
pub fn with_notes(code: &[u8], notes: &[TestNote]) -> Vec<u8> {
    build(code, notes, 0)
}

/// An ELF with `code`, these notes, and `bss_bytes` of memory past the code that the
/// file does not hold (p_memsz - p_filesz).
pub fn build(code: &[u8], notes: &[TestNote], bss_bytes: u64) -> Vec<u8> {
    let note: Vec<u8> = notes
        .iter()
        .flat_map(|n| match *n {
            TestNote::Pvh => note_bytes("Xen", 18, &(TEST_KERNEL_GPA as u32).to_le_bytes()),
            TestNote::Linux => note_bytes("Linux", 0x100, &[0; 4]),
            TestNote::Direct(entry) => {
                note_bytes(abi::DIRECT_ENTRY_NOTE_NAME, abi::DIRECT_ENTRY_NOTE_TYPE, &entry.to_le_bytes())
            }
        })
        .collect();
    let phnum: u16 = if note.is_empty() { 1 } else { 2 };
    let note_offset = 64 + 56 * phnum as u64;
    let code_offset = 0x1000u64;

    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&TEST_KERNEL_GPA.to_le_bytes()); // e_entry
    out.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, phnum, 64, 0, 0] {
        out.extend_from_slice(&half.to_le_bytes());
    }
    let mut phdr = |kind: u32, flags: u32, offset: u64, addr: u64, size: u64, memsz: u64, align: u64| {
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        for word in [offset, addr, addr, size, memsz, align] {
            out.extend_from_slice(&word.to_le_bytes());
        }
    };
    let code_len = code.len() as u64;
    phdr(1, 7, code_offset, TEST_KERNEL_GPA, code_len, code_len + bss_bytes, 0x1000);
    if !note.is_empty() {
        phdr(4, 4, note_offset, 0, note.len() as u64, note.len() as u64, 4);
        out.extend_from_slice(&note);
    }
    out.resize(code_offset as usize, 0);
    out.extend_from_slice(code);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::{load_image, KernelEntry};
    use crate::config::{Backend, ZoneConfig};
    use crate::memory::GuestRam;

    #[test]
    fn pvh_note_selects_pvh_and_a_linux_note_selects_linux() {
        let memory = GuestRam::new(&[ZoneConfig::new(4 << 20, Backend::Anon)]).unwrap();
        let pvh = load_image("pvh", &elf(&[0xf4], true), &memory, false).unwrap();
        assert!(matches!(pvh.entry, KernelEntry::Pvh { entry: TEST_KERNEL_GPA }));
        let linux = load_image("vmlinux", &elf(&[0xf4], false), &memory, false).unwrap();
        assert!(matches!(linux.entry, KernelEntry::Linux { entry: TEST_KERNEL_GPA, setup_header: None }));
    }
}
