//! Ring 0: the only code that runs at CPL0, all of it assembly.
//!
//! On the nested KVM this project runs on, every CPL0 instruction is emulated (~1 µs each)
//! and the emulator cannot run SSE, so ring 0 is a few dozen integer instructions. The
//! guest has two ways in:
//!
//! 1. `direct_entry64` (BSP, Faultline's own VMM: `faultline_abi::DIRECT_ENTRY_NOTE_NAME`):
//!    long mode already, with the VMM's identity map of all guest RAM; `rbx` =
//!    `hvm_start_info`, `rsi` = bytes mapped. It notes both and the VMM's `cr3` (for the
//!    APs), loads the guest's GDT and goes on at `entry64`: about 20 instructions in all.
//! 2. `pvh_start32` (BSP, any PVH loader such as QEMU: 32-bit protected mode, paging off,
//!    `ebx` = `hvm_start_info`): saves `ebx`, identity-maps guest physical memory (1 GiB
//!    pages for the first 64 GiB when CPUID says so, else 2 MiB pages for the first
//!    4 GiB, which ring 3 extends over RAM above 4 GiB: [`extend_identity_map`]), every
//!    page U/S=1, the MMIO hole at 3–4 GiB (LAPIC, IOAPIC, virtio-mmio windows) uncached
//!    (PCD|PWT) so ring 3 can drive devices there, then enters long mode at
//!    `long_mode_entry32`.
//!
//! Then, for every CPU:
//! - `ap_trampoline` (APs, real mode at 0x8000 after SIPI vector 0x08): loads the GDT and
//!   jumps to 32-bit code, reusing the BSP's page tables (`boot_cr3`: the guest's own or
//!   the VMM's).
//! - `long_mode_entry32` (PVH BSP and APs): PAE + OSFXSR + OSXMMEXCPT, LME, PG|NE|MP|PE.
//! - `entry64` (every CPU): CPU index = LAPIC ID, ring-0 stack, per-CPU TSS (RSP0), IDT,
//!   then `iretq` to ring 3 (`ring3_entry(cpu)`) with IOPL=3, IF=0 and a per-CPU stack.
//!
//! Exceptions (vectors 0–31) go to one stub that hands vector, error code, rip and CPU to
//! the ring-3 Rust function `exception_report` on a fresh per-CPU stack — except a `ud2`
//! at `service_ud2`, which asks for one of the ring-0 services of [`Service`]. The IDT
//! itself is filled from ring 3 by [`install_idt`] before any other Rust code runs (an
//! exception before that triple-faults).
//!
//! Instructions executed at CPL0: about 45 on the BSP entered directly; by PVH about 520
//! (460 of them the 64-entry page table loop; the 2 MiB fallback runs about 12,000); about
//! 70 per AP.
//!
//! Two things are as they are because of the nested KVM (`kvm_pvm`) this project runs on:
//! port I/O from ring 3 is checked against the TSS I/O bitmap even with IOPL=3, so every
//! TSS carries an all-zero (all ports allowed) bitmap; and neither `int n` nor `syscall`
//! from ring 3 reaches ring 0 there (`int 0x80` raises #UD, `syscall` jumps to LSTAR but
//! stays at CPL3), while exceptions are delivered through the IDT normally — so ring 3
//! asks for a ring-0 service by executing `ud2` at one known address. All of this works
//! the same on bare-metal KVM.

use core::arch::global_asm;
use core::ptr::{addr_of, addr_of_mut};

use faultline_abi::MAX_CPUS;

/// Bytes of each CPU's ring-0 stack (only interrupt frames land there).
pub const RING0_STACK_BYTES: usize = 1 << RING0_STACK_SHIFT;
const RING0_STACK_SHIFT: u32 = 12;
/// Bytes of each CPU's ring-3 stack.
pub const USER_STACK_BYTES: usize = 1 << USER_STACK_SHIFT;
const USER_STACK_SHIFT: u32 = 15;
/// Bytes of each CPU's ring-3 stack used to report an exception.
pub const EXCEPTION_STACK_BYTES: usize = 1 << EXCEPTION_STACK_SHIFT;
const EXCEPTION_STACK_SHIFT: u32 = 13;

/// Kernel 64-bit code selector.
const KERNEL_CODE64: u16 = 0x08;
/// Kernel data selector (flat, usable in 32- and 64-bit mode).
const KERNEL_DATA: u16 = 0x10;
/// User data selector with RPL 3.
const USER_DATA: u16 = 0x18 | 3;
/// User 64-bit code selector with RPL 3.
const USER_CODE64: u16 = 0x20 | 3;
/// Kernel 32-bit code selector (the AP trampoline's way into protected mode).
const KERNEL_CODE32: u16 = 0x28;

/// 1 GiB pages mapped when the CPU supports them.
pub const GIB_PAGES_MAPPED: u64 = 64;
/// Bytes identity-mapped with 1 GiB pages.
pub const MAPPED_BYTES_1G: u64 = GIB_PAGES_MAPPED << 30;
/// Bytes identity-mapped with the 2 MiB fallback (a whole number of 4 GiB).
pub const MAPPED_BYTES_2M: u64 = 4 << 30;
const _: () =
    assert!((MAPPED_BYTES_1G >> 32) << 32 == MAPPED_BYTES_1G && (MAPPED_BYTES_2M >> 32) << 32 == MAPPED_BYTES_2M);
/// Bytes of a TSS without its I/O bitmap (where the bitmap starts).
const TSS_BASE_BYTES: usize = 104;
/// The I/O permission bitmap: one bit per port, 0 = allowed.
const IO_BITMAP_BYTES: usize = 65536 / 8;
/// TSS limit: the bitmap's last byte (ports up to 0xffff, two-byte reads at the end).
const TSS_LIMIT: usize = TSS_BASE_BYTES + IO_BITMAP_BYTES;
/// Bytes between two CPUs' TSSs.
const TSS_STRIDE: usize = (TSS_LIMIT + 1 + 127) & !127;

global_asm!(
    r#"
/* ---- PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18), as Linux writes it (4-byte aligned) ---- */
.section .note.Xen, "a", @note
.balign 4
.long 4
.long 8
.long 18
.asciz "Xen"
.balign 4
.quad pvh_start32
.balign 4

/* ---- Faultline's direct 64-bit entry (faultline_abi::DIRECT_ENTRY_NOTE_NAME) ---- */
.section .note.faultline, "a", @note
.balign 4
.long 10
.long 8
.long {direct_note_type}
.asciz "Faultline"
.balign 4
.quad direct_entry64
.balign 4

/* ---- AP trampoline: real mode at 0x8000 (CS = 0x0800, IP = 0) ---- */
.section .trampoline, "ax", @progbits
.code16
.global ap_trampoline
ap_trampoline:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl ap_gdtr
    movl %cr0, %eax
    orb $1, %al
    movl %eax, %cr0
    movw ${kdata}, %ax          /* flat data segments before touching memory above 64 KiB */
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    ljmpl ${code32}, $long_mode_entry32
.balign 8
ap_gdtr:
    .word gdt_end - gdt - 1
    .long gdt

/* ---- BSP PVH entry: 32-bit protected mode, paging off, ebx = hvm_start_info ---- */
.section .text.boot, "ax", @progbits
.code32
.global pvh_start32
pvh_start32:
    movl %ebx, boot_start_info_gpa
    movl $0x80000001, %eax
    cpuid
    movl $(pdpt + 7), pml4
    movl $pdpt, %edi
    btl $26, %edx
    jnc 2f
    /* 1 GiB pages: PDPT[i] = i GiB | PS | U | W | P */
    movl $0x87, %eax
    xorl %edx, %edx
    movl ${gib_pages}, %ecx
1:  movl %eax, (%edi)
    movl %edx, 4(%edi)
    addl $0x40000000, %eax
    adcl $0, %edx
    addl $8, %edi
    decl %ecx
    jnz 1b
    orl $0x18, pdpt + 24        /* 3-4 GiB, the MMIO hole: PCD | PWT (uncached) */
    movl ${mapped_1g_high}, boot_mapped_bytes + 4   /* MAPPED_BYTES_1G */
    jmp long_mode_entry32
    /* 2 MiB pages for the first 4 GiB: PDPT[0..4] -> four page directories */
2:  movl $(pds + 7), %eax
    movl %eax, (%edi)
    addl $4096, %eax
    movl %eax, 8(%edi)
    addl $4096, %eax
    movl %eax, 16(%edi)
    addl $4096, %eax
    movl %eax, 24(%edi)
    movl $pds, %edi
    movl $0x87, %eax
    movl $2048, %ecx
3:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    decl %ecx
    jnz 3b
    /* the fourth directory maps 3-4 GiB, the MMIO hole: PCD | PWT (uncached) */
    movl $(pds + 3 * 4096), %edi
    movl $512, %ecx
4:  orl $0x18, (%edi)
    addl $8, %edi
    decl %ecx
    jnz 4b
    movl ${mapped_2m_high}, boot_mapped_bytes + 4   /* MAPPED_BYTES_2M */

/* ---- BSP and APs: enter long mode with the shared page tables ---- */
long_mode_entry32:
    lgdtl gdtr
    movl ${kdata}, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x620, %eax            /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl boot_cr3, %eax         /* the guest's own tables, or the VMM's (direct entry) */
    movl %eax, %cr3
    movl $0xC0000080, %ecx      /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $0x80000023, %eax      /* PG | NE | MP | PE (EM, TS clear) */
    movl %eax, %cr0
    ljmpl ${code64}, $entry64

.code64
/* ---- BSP direct entry: long mode, the VMM's tables, rbx = start info, rsi = mapped ---- */
.global direct_entry64
direct_entry64:
    movq %rbx, boot_start_info_gpa(%rip)
    movq %rsi, boot_mapped_bytes(%rip)
    movq %cr3, %rax
    movl %eax, boot_cr3(%rip)
    lgdt gdtr64(%rip)           /* CS 0x08 is 64-bit kernel code in both GDTs; no stack yet */

entry64:
    movl ${kdata}, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl $0xFEE00020, %eax      /* CPU index = LAPIC ID */
    movl (%rax), %edi
    shrl $24, %edi
    cmpl ${max_cpus}, %edi
    jae 9f
    leal 1(%rdi), %eax
    shll ${r0_shift}, %eax
    leaq r0_stacks(%rax), %rsp
    /* TSS of this CPU: RSP0 = ring-0 stack top, all-zero I/O bitmap; its GDT descriptor */
    imull ${tss_stride}, %edi, %ebx
    addl $tss_array, %ebx
    movq %rsp, 4(%rbx)
    movw ${tss_base}, 102(%rbx)
    movl %edi, %ecx
    shll $4, %ecx
    addl $gdt_tss, %ecx
    movl %ebx, %eax
    shll $16, %eax
    orl ${tss_limit}, %eax      /* limit, base[15:0] */
    movl %eax, (%rcx)
    movl %ebx, %eax
    shrl $16, %eax
    orl $0x8900, %eax           /* base[23:16], present 64-bit TSS (base < 16 MiB) */
    movl %eax, 4(%rcx)
    subl $gdt, %ecx
    ltr %cx
    lidt idtr(%rip)
    /* iretq to ring3_entry(cpu) with IOPL=3, IF=0 */
    leal 1(%rdi), %eax
    shll ${user_shift}, %eax
    addl $(user_stacks - 8), %eax
    pushq ${udata}
    pushq %rax
    pushq $0x3002
    pushq ${ucode}
    pushq $ring3_entry
    iretq
9:  cli
    hlt
    jmp 9b

/* ---- Exceptions 0..31: 16-byte stubs push the vector ---- */
.balign 16
.global isr_stubs
isr_stubs:
.set vector, 0
.rept 32
    pushq $vector
    jmp isr_common
    .balign 16
.set vector, vector + 1
.endr

isr_common:
    popq %rdi                   /* vector */
    cmpl $6, %edi               /* #UD at service_ud2: a service request */
    jne 2f
    cmpq $service_ud2, (%rsp)
    je service_entry
2:    xorl %esi, %esi
    movl $0x60227D00, %eax      /* vectors that push an error code */
    btl %edi, %eax
    jnc 1f
    popq %rsi                   /* error code */
1:  movq (%rsp), %rdx           /* rip */
    movl $0xFEE00020, %eax
    movl (%rax), %ecx
    shrl $24, %ecx
    andl ${cpu_mask}, %ecx
    leal 1(%rcx), %eax
    shll ${exc_shift}, %eax
    addl $(exc_stacks - 8), %eax
    pushq ${udata}
    pushq %rax
    pushq $0x3002
    pushq ${ucode}
    pushq $exception_report
    iretq

/* ---- ring-0 services: eax = 0 park, 1 triple fault, 2 SSE at CPL0 ---- */
service_entry:
    cmpl $1, %eax
    je 1f
    cmpl $2, %eax
    je 2f
0:  hlt                         /* IF = 0: for good */
    jmp 0b
1:  lidt zero_idtr(%rip)        /* #DE with an empty IDT: #GP, #DF, triple fault */
    xorl %ecx, %ecx
    divl %ecx
    jmp 0b
2:  pxor %xmm0, %xmm0
    addq $2, (%rsp)             /* return past the ud2 */
    iretq

/* ---- ring 3: faultline_service(n) asks ring 0 for service n ---- */
.global faultline_service
faultline_service:
    movl %edi, %eax
service_ud2:
    ud2
    ret

/* ---- Boot data ---- */
.section .data.boot, "aw", @progbits
.balign 16
gdt:
    .quad 0
    .quad 0x00209A0000000000    /* 0x08 kernel code 64 */
    .quad 0x00CF92000000FFFF    /* 0x10 kernel data */
    .quad 0x00CFF2000000FFFF    /* 0x18 user data */
    .quad 0x0020FA0000000000    /* 0x20 user code 64 */
    .quad 0x00CF9A000000FFFF    /* 0x28 kernel code 32 */
gdt_tss:
    .skip {max_cpus} * 16       /* 0x30 + 16 * cpu: that CPU's TSS */
gdt_end:
.balign 8
gdtr:
    .word gdt_end - gdt - 1
    .long gdt
.balign 8
gdtr64:
    .word gdt_end - gdt - 1
    .quad gdt
.balign 8
idtr:
    .word 4095
    .quad idt
.balign 8
zero_idtr:
    .word 0
    .quad 0
.balign 8
.global boot_start_info_gpa
boot_start_info_gpa:
    .quad 0
.global boot_mapped_bytes
boot_mapped_bytes:
    .quad 0
.global boot_cr3
boot_cr3:
    .long pml4

.section .boot_bss, "aw", @nobits
.balign 4096
.global pml4
pml4:        .skip 4096
pds:         .skip 4 * 4096
.global pdpt
pdpt:        .skip 4096
.global pds_high
pds_high:    .skip {high_gib} * 4096     /* 4 GiB and up, filled by ring 3 (PVH, 2 MiB pages) */
.global idt
idt:         .skip 4096
tss_array:   .skip {max_cpus} * {tss_stride}
r0_stacks:   .skip {max_cpus} * {r0_bytes}
exc_stacks:  .skip {max_cpus} * {exc_bytes}
user_stacks: .skip {max_cpus} * {user_bytes}

.text
"#,
    code32 = const KERNEL_CODE32,
    code64 = const KERNEL_CODE64,
    kdata = const KERNEL_DATA,
    udata = const USER_DATA,
    ucode = const USER_CODE64,
    gib_pages = const GIB_PAGES_MAPPED,
    direct_note_type = const faultline_abi::DIRECT_ENTRY_NOTE_TYPE,
    mapped_1g_high = const MAPPED_BYTES_1G >> 32,
    high_gib = const HIGH_GIB,
    mapped_2m_high = const MAPPED_BYTES_2M >> 32,
    max_cpus = const MAX_CPUS,
    cpu_mask = const MAX_CPUS - 1,
    r0_shift = const RING0_STACK_SHIFT,
    r0_bytes = const RING0_STACK_BYTES,
    user_shift = const USER_STACK_SHIFT,
    user_bytes = const USER_STACK_BYTES,
    exc_shift = const EXCEPTION_STACK_SHIFT,
    exc_bytes = const EXCEPTION_STACK_BYTES,
    tss_base = const TSS_BASE_BYTES,
    tss_limit = const TSS_LIMIT,
    tss_stride = const TSS_STRIDE,
    options(att_syntax)
);

extern "C" {
    /// The 32 exception stubs, 16 bytes apart.
    static isr_stubs: u8;
    /// Asks ring 0 for a [`Service`] (ring 3 only): `ud2` at a known address.
    fn faultline_service(service: u32);
    /// The IDT (256 gates of 16 bytes), loaded by every CPU in `entry64`.
    static mut idt: [u64; 512];
    /// `ebx` at the PVH entry: the guest physical address of `hvm_start_info`.
    static boot_start_info_gpa: u64;
    /// The PVH path's PML4 and PDPT and the page directories for RAM above 4 GiB.
    static pml4: [u64; 512];
    static mut pdpt: [u64; 512];
    static mut pds_high: [[u64; 512]; HIGH_GIB as usize];
    /// The page-table root every CPU loads (`pml4`, or the VMM's for the direct entry).
    static boot_cr3: u32;
    /// Bytes of guest physical memory (from 0) identity-mapped at entry: by the VMM for
    /// the direct entry, by `pvh_start32` otherwise.
    static mut boot_mapped_bytes: u64;
}

/// The guest physical address of the PVH `hvm_start_info` the loader passed in `ebx`.
pub fn start_info_gpa() -> u64 {
    // SAFETY: written once by ring 0 before ring 3 started; read-only afterwards.
    unsafe { addr_of!(boot_start_info_gpa).read_volatile() }
}

/// Whether the guest was entered at `direct_entry64` (by Faultline's own VMM).
fn entered_directly() -> bool {
    // SAFETY: a plain read of boot data written before ring 3 started.
    unsafe { addr_of!(boot_cr3).read_volatile() as u64 != addr_of!(pml4) as u64 }
}

/// How many bytes of guest physical memory (from 0) were identity-mapped at entry.
pub fn mapped_bytes() -> u64 {
    // SAFETY: written once by ring 0 before ring 3 started; read-only afterwards.
    unsafe { addr_of!(boot_mapped_bytes).read_volatile() }
}

/// GiB above the first 4 that the 2 MiB fallback can extend the identity map over.
const HIGH_GIB: u64 = GIB_PAGES_MAPPED - 4;

/// Extends the identity map over RAM above 4 GiB when ring 0 mapped only the first 4 GiB
/// (the PVH entry on a CPU without 1 GiB pages), up to `MAPPED_BYTES_1G`, and returns
/// how many bytes from 0 are mapped now. Runs on the BSP in ring 3 before the APs start
/// (the tables are user-writable like all memory). The new PDPT entries were not present,
/// so no TLB holds them: nothing to flush. Each page directory is filled before the PDPT
/// entry that links it, so no CPU ever sees a half-built one.
pub fn extend_identity_map(memmap: &[crate::pvh::MemmapEntry]) -> u64 {
    let mapped = mapped_bytes();
    if entered_directly() || mapped != MAPPED_BYTES_2M {
        return mapped;
    }
    let top = memmap
        .iter()
        .filter(|e| e.kind == crate::pvh::MEMMAP_TYPE_RAM)
        .map(|e| e.addr.saturating_add(e.size))
        .max()
        .unwrap_or(0);
    let end_gib = top.div_ceil(1 << 30).min(GIB_PAGES_MAPPED);
    for gib in 4..end_gib {
        // SAFETY: only the BSP runs; these directories are not linked (not in use) until
        // the PDPT write below, and the PDPT entry written was not present.
        unsafe {
            let directory = &mut (*addr_of_mut!(pds_high))[(gib - 4) as usize];
            for (i, entry) in directory.iter_mut().enumerate() {
                *entry = (gib << 30) | ((i as u64) << 21) | 0x87;
            }
            let link = directory.as_ptr() as u64 | 0x7;
            addr_of_mut!(pdpt).cast::<u64>().add(gib as usize).write_volatile(link);
        }
    }
    let extended = end_gib.max(4) << 30;
    // SAFETY: only the BSP runs, before anything reads the value again.
    unsafe { addr_of_mut!(boot_mapped_bytes).write_volatile(extended) };
    extended
}

/// Encodes a 64-bit interrupt gate to `handler` (kernel code, IF cleared) usable from `dpl`.
fn interrupt_gate(handler: u64, dpl: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(KERNEL_CODE64) << 16)
        | ((0x8e | (dpl << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// Fills the IDT: exceptions 0–31 to their stubs.
/// Runs on the BSP in ring 3 before anything else (every page is mapped user-writable).
pub fn install_idt() {
    // The stubs are 16 bytes apart (`.balign 16` in the asm); we only take addresses.
    let stubs = addr_of!(isr_stubs) as u64;
    // SAFETY: no CPU takes an interrupt while the BSP fills the table (IF=0, APs not
    // started yet); the IDT is plain memory mapped writable for ring 3.
    let table = unsafe { &mut *addr_of_mut!(idt) };
    for vector in 0..32 {
        let gate = interrupt_gate(stubs + 16 * vector as u64, 0);
        table[2 * vector..2 * vector + 2].copy_from_slice(&gate);
    }
}

/// The ring-0 services behind [`faultline_service`].
#[repr(u32)]
#[derive(Clone, Copy)]
enum Service {
    /// `cli; hlt` forever.
    Park = 0,
    /// Load an empty IDT and divide by zero: #DE -> #GP -> #DF -> triple fault.
    TripleFault = 1,
    /// `pxor xmm0, xmm0` at CPL0, then return.
    Cpl0Sse = 2,
}

/// Stops this CPU for good (ring 0 `cli; hlt` loop).
pub fn park() -> ! {
    // SAFETY: the service never returns; no memory is touched.
    unsafe { faultline_service(Service::Park as u32) };
    unreachable!("the park service returned")
}

/// Triple-faults the CPU (the VMM sees a shutdown; QEMU with -no-reboot exits).
pub fn triple_fault() -> ! {
    // SAFETY: the service never returns.
    unsafe { faultline_service(Service::TripleFault as u32) };
    unreachable!("the triple-fault service returned")
}

/// Executes an SSE instruction at CPL0 (a nested KVM that emulates CPL0 stops the VM;
/// elsewhere this returns).
pub fn cpl0_sse() {
    // SAFETY: the service clobbers only xmm0 (caller-saved) and returns.
    unsafe { faultline_service(Service::Cpl0Sse as u32) }
}
