//! Builds minimal x86-64 ELF kernels for tests: one PT_LOAD segment with the given code
//! at 1 MiB and, optionally, a PVH (Xen PHYS32_ENTRY) note pointing at it.

/// Where test kernels are loaded and entered.
pub const TEST_KERNEL_GPA: u64 = 0x10_0000;

/// An ELF with `code` at [`TEST_KERNEL_GPA`]; with `pvh`, a PHYS32_ENTRY note for it.
pub fn elf(code: &[u8], pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let note_offset = 64 + 56 * phnum as u64;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(TEST_KERNEL_GPA as u32).to_le_bytes());
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
    let mut phdr = |kind: u32, flags: u32, offset: u64, addr: u64, size: u64, align: u64| {
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        for word in [offset, addr, addr, size, size, align] {
            out.extend_from_slice(&word.to_le_bytes());
        }
    };
    phdr(1, 7, code_offset, TEST_KERNEL_GPA, code.len() as u64, 0x1000);
    if pvh {
        phdr(4, 4, note_offset, 0, note.len() as u64, 4);
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
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn pvh_note_selects_pvh_and_its_absence_selects_linux() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let pvh = load_image("pvh", &elf(&[0xf4], true), &memory).unwrap();
        assert!(matches!(pvh.entry, KernelEntry::Pvh { entry: TEST_KERNEL_GPA }));
        let linux = load_image("vmlinux", &elf(&[0xf4], false), &memory).unwrap();
        assert!(matches!(linux.entry, KernelEntry::Linux { entry: TEST_KERNEL_GPA, setup_header: None }));
    }
}
