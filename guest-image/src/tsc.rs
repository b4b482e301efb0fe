//! The time-stamp counter: reading it, timing one access, and finding its frequency.

use core::arch::asm;
use core::arch::x86_64::__cpuid;
use core::sync::atomic::{AtomicBool, Ordering};

/// Whether the CPU has `rdtscp` (CPUID 0x80000001 EDX bit 27), set by [`init`].
static HAS_RDTSCP: AtomicBool = AtomicBool::new(false);

/// Looks up the CPU features the timing functions use. Called by the BSP at start-up.
pub fn init() {
    // Leaf 0x80000001 exists on every x86-64 CPU.
    let edx = __cpuid(0x8000_0001).edx;
    HAS_RDTSCP.store(edx & (1 << 27) != 0, Ordering::Relaxed);
}

/// Assumed TSC frequency when neither the command line nor CPUID knows it (only for
/// timeouts and pacing; reports then say `"tsc_khz":0`).
pub const FALLBACK_TSC_KHZ: u64 = 2_000_000;

/// The TSC now (not serialising).
#[inline(always)]
pub fn now() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: rdtsc is allowed at CPL3 (CR4.TSD clear) and has no memory effects.
    unsafe { asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags)) }
    (u64::from(high) << 32) | u64::from(low)
}

/// The TSC before a timed operation: earlier instructions have completed (`lfence; rdtsc`).
#[inline(always)]
pub fn start() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: as for `now`; lfence only orders instructions.
    unsafe { asm!("lfence", "rdtsc", out("eax") low, out("edx") high, options(nostack, preserves_flags)) }
    (u64::from(high) << 32) | u64::from(low)
}

/// The TSC after a timed operation: the operation has completed (`rdtscp; lfence`, or
/// `mfence; lfence; rdtsc` without rdtscp).
#[inline(always)]
pub fn end() -> u64 {
    let (low, high): (u32, u32);
    if HAS_RDTSCP.load(Ordering::Relaxed) {
        // SAFETY: rdtscp exists (checked by `init`); it clobbers ecx only.
        unsafe {
            asm!("rdtscp", "lfence", out("eax") low, out("edx") high, out("ecx") _,
                 options(nostack, preserves_flags))
        }
    } else {
        // SAFETY: fences and rdtsc have no memory effects.
        unsafe {
            asm!("mfence", "lfence", "rdtsc", out("eax") low, out("edx") high,
                 options(nostack, preserves_flags))
        }
    }
    (u64::from(high) << 32) | u64::from(low)
}

/// Where the TSC frequency came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `fl.tsc_khz`.
    CommandLine,
    /// CPUID leaf 0x15 (crystal ratio).
    Cpuid15,
    /// CPUID leaf 0x16 (base frequency).
    Cpuid16,
    /// CPUID leaf 0x40000010 (hypervisor timing leaf).
    Hypervisor,
    /// Unknown: reported as 0.
    Unknown,
}

/// The TSC frequency in kHz from CPUID (0x15, then 0x16, then 0x40000010), or 0.
pub fn khz_from_cpuid() -> (u64, Source) {
    let max_leaf = __cpuid(0).eax;
    if max_leaf >= 0x15 {
        let leaf = __cpuid(0x15);
        if leaf.eax != 0 && leaf.ebx != 0 && leaf.ecx != 0 {
            let hz = u64::from(leaf.ecx) * u64::from(leaf.ebx) / u64::from(leaf.eax);
            return (hz / 1000, Source::Cpuid15);
        }
    }
    if max_leaf >= 0x16 {
        let mhz = __cpuid(0x16).eax & 0xffff;
        if mhz != 0 {
            return (u64::from(mhz) * 1000, Source::Cpuid16);
        }
    }
    // Leaf 1 ECX bit 31: running under a hypervisor, so leaves 0x4000_00xx exist.
    let under_hypervisor = __cpuid(1).ecx & (1 << 31) != 0;
    if under_hypervisor && __cpuid(0x4000_0000).eax >= 0x4000_0010 {
        let khz = __cpuid(0x4000_0010).eax;
        if khz != 0 {
            return (u64::from(khz), Source::Hypervisor);
        }
    }
    (0, Source::Unknown)
}

/// The frequency to compute with: `khz`, or the fallback when it is unknown.
pub fn effective_khz(khz: u64) -> u64 {
    if khz == 0 {
        FALLBACK_TSC_KHZ
    } else {
        khz
    }
}

/// Whole milliseconds in `cycles` at `khz` (the fallback when 0).
pub fn cycles_to_ms(cycles: u64, khz: u64) -> u64 {
    cycles / effective_khz(khz)
}

/// Cycles in `ms` milliseconds at `khz` (the fallback when 0).
pub fn ms_to_cycles(ms: u64, khz: u64) -> u64 {
    ms.saturating_mul(effective_khz(khz))
}
