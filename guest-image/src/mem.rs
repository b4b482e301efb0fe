//! The C memory functions the compiler calls (`-nostdlib` leaves them undefined).
//!
//! Written with `rep movsb` / `rep stosb` in inline assembly so they can never be turned
//! back into calls to themselves. Only ring-3 code calls them.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dst` (the regions must not overlap).
///
/// # Safety
/// `src` must be readable and `dst` writable for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; the direction flag is clear (ABI).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// Copies `n` bytes from `src` to `dst`; the regions may overlap.
///
/// # Safety
/// `src` must be readable and `dst` writable for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dst is below src or past its end.
        return unsafe { memcpy(dst, src, n) };
    }
    if n != 0 {
        // SAFETY: copy backwards (std), from the last byte; cld restores the ABI state.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _,
                 inout("rsi") src.add(n - 1) => _, options(nostack));
        }
    }
    dst
}

/// Sets `n` bytes at `dst` to `value as u8`.
///
/// # Safety
/// `dst` must be writable for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; the direction flag is clear (ABI).
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") value as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// Compares `n` bytes; returns the difference of the first differing bytes, or 0.
///
/// # Safety
/// Both pointers must be readable for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, both ranges readable; volatile keeps this a plain byte loop.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Like [`memcmp`], but only zero/non-zero matters.
///
/// # Safety
/// Both pointers must be readable for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled `core` (built with unwinding) refers to this; with `panic=abort` nothing
/// ever unwinds, so it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
