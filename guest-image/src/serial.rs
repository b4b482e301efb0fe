//! Report lines on the COM1 UART: plain polling writes from ring 3 (IOPL=3), or on
//! Faultline's paravirtual console when the VMM has one.
//!
//! Every line is written under one lock so lines from different CPUs never interleave.
//! Each port access is a VM exit (tens of µs under nested KVM), so the UART's 16-byte
//! FIFO is enabled and the line status is polled once per 16 bytes, not once per byte.
//! Under Faultline the guest finds the paravirtual console at start ([`init`]: one read
//! of [`PV_CONSOLE_PORT`]) and then collects what it writes under the lock in a buffer
//! that it hands to the VMM with one port write (when the lock is released or the buffer
//! is full): one exit per line instead of one per byte. QEMU has no such device, so the
//! same ELF writes to the UART there.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use faultline_abi::{PV_CONSOLE_MAGIC, PV_CONSOLE_MAX, PV_CONSOLE_PORT, REPORT_PREFIX, SERIAL_PORT};

/// Line status register offset; bit 5 = transmit holding register (FIFO) empty.
const LSR_OFFSET: u16 = 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// FIFO control register offset, and its value: enable and clear both FIFOs.
const FCR_OFFSET: u16 = 2;
const FCR_ENABLE_AND_CLEAR: u8 = 0x07;
/// Bytes the transmit FIFO takes once the line status says it is empty.
const TX_FIFO_BYTES: u32 = 16;
/// Most LSR polls before writing anyway (a missing UART must not hang us).
const MAX_POLLS: u32 = 1000;
/// Spins before a CPU that must report (panic, exception) takes the lock anyway.
const MAX_LOCK_SPINS: u32 = 50_000_000;

static LOCK: AtomicBool = AtomicBool::new(false);
/// Bytes that may still be written before the line status must be checked again.
static TX_CREDIT: AtomicU32 = AtomicU32::new(0);

/// Whether the VMM's paravirtual console is there (set once by [`init`]).
static PV: AtomicBool = AtomicBool::new(false);

/// The paravirtual console's buffer, laid out as the VMM reads it: the length, then the
/// bytes.
#[repr(C, align(8))]
struct PvBuffer {
    len: u32,
    bytes: [u8; PV_CONSOLE_MAX],
}

struct PvCell(UnsafeCell<PvBuffer>);

// SAFETY: the buffer is only touched through a `Serial` whose `pv` is set, and only a CPU
// that acquired LOCK (not one that stole it) gets such a `Serial`: one CPU at a time.
unsafe impl Sync for PvCell {}

static PV_BUFFER: PvCell = PvCell(UnsafeCell::new(PvBuffer { len: 0, bytes: [0; PV_CONSOLE_MAX] }));

/// Finds the paravirtual console, or else enables the UART's FIFOs. Called once by the
/// BSP before the first line.
pub fn init() {
    // Identity-mapped: the buffer's address is its guest physical address, which must fit
    // the 32-bit port write.
    let buffer_gpa = PV_BUFFER.0.get() as u64;
    if inl(PV_CONSOLE_PORT) == PV_CONSOLE_MAGIC && buffer_gpa <= u32::MAX as u64 {
        PV.store(true, Ordering::Relaxed);
    } else {
        outb(SERIAL_PORT + FCR_OFFSET, FCR_ENABLE_AND_CLEAR);
    }
}

/// Reads four bytes from an I/O port.
fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Hands the paravirtual console's buffer to the VMM and empties it; the caller's
/// `Serial` has `pv` set.
fn pv_flush() {
    let buffer = PV_BUFFER.0.get();
    // SAFETY: only the `Serial` with `pv` set (one CPU, see `PvCell`) calls this.
    if unsafe { (*buffer).len } == 0 {
        return;
    }
    // SAFETY: as above; the port write has no `nomem`, so the compiler has stored the
    // bytes before it, and the VMM has read them when it returns.
    unsafe {
        asm!("out dx, eax", in("dx") PV_CONSOLE_PORT, in("eax") buffer as u32, options(nostack, preserves_flags));
        (*buffer).len = 0;
    }
}

/// Appends to the paravirtual console's buffer, flushing it when full; the caller's
/// `Serial` has `pv` set.
fn pv_write(mut text: &[u8]) {
    let buffer = PV_BUFFER.0.get();
    while !text.is_empty() {
        // SAFETY: as for `pv_flush`.
        let buf = unsafe { &mut *buffer };
        let at = buf.len as usize;
        let n = text.len().min(PV_CONSOLE_MAX - at);
        buf.bytes[at..at + n].copy_from_slice(&text[..n]);
        buf.len += n as u32;
        text = &text[n..];
        if buf.len as usize == PV_CONSOLE_MAX {
            pv_flush();
        }
    }
}

/// Writes one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: ring 3 runs with IOPL=3; the ports we use (UART, debug exit) have no
    // memory side effects.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Writes one byte; the caller holds the lock (or stole it for last words).
fn write_byte(byte: u8) {
    let mut credit = TX_CREDIT.load(Ordering::Relaxed);
    if credit == 0 {
        for _ in 0..MAX_POLLS {
            if inb(SERIAL_PORT + LSR_OFFSET) & LSR_THR_EMPTY != 0 {
                break;
            }
            spin_loop();
        }
        credit = TX_FIFO_BYTES;
    }
    outb(SERIAL_PORT, byte);
    TX_CREDIT.store(credit - 1, Ordering::Relaxed);
}

/// Exclusive access to the console for one or more whole lines; unlocks (and hands the
/// lines to the paravirtual console) when dropped.
pub struct Serial {
    /// Writes go to the paravirtual console's buffer (it is there and the lock was
    /// acquired, not stolen); else to the UART, byte by byte.
    pv: bool,
}

impl Serial {
    /// Waits for the console lock.
    pub fn lock() -> Serial {
        while LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            spin_loop();
        }
        Serial { pv: PV.load(Ordering::Relaxed) }
    }

    /// Waits a bounded time for the lock, then takes it anyway: for last words (panic,
    /// exception), which must come out even if the holder died mid-line. A stolen lock
    /// writes to the UART (the holder may still be filling the paravirtual buffer).
    pub fn lock_or_steal() -> Serial {
        for _ in 0..MAX_LOCK_SPINS {
            if LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return Serial { pv: PV.load(Ordering::Relaxed) };
            }
            spin_loop();
        }
        Serial { pv: false }
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        if self.pv {
            pv_flush();
        }
        LOCK.store(false, Ordering::Release);
    }
}

impl Write for Serial {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        if self.pv {
            pv_write(text.as_bytes());
        } else {
            text.bytes().for_each(write_byte);
        }
        Ok(())
    }
}

/// Prints one `FL <kind> <body>` line.
pub fn report(kind: &str, body: fmt::Arguments) {
    let mut serial = Serial::lock();
    let _ = writeln!(serial, "{REPORT_PREFIX}{kind} {body}");
}

/// Prints one free-form line (not a report; parsers skip it).
pub fn note(body: fmt::Arguments) {
    let mut serial = Serial::lock();
    let _ = writeln!(serial, "faultline-guest: {body}");
}

/// `report!(kind, "{{...json...}}", args..)`: prints one report line.
#[macro_export]
macro_rules! report {
    ($kind:expr, $($arg:tt)*) => { $crate::serial::report($kind, format_args!($($arg)*)) };
}

/// `note!("text {}", args..)`: prints one free-form line.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => { $crate::serial::note(format_args!($($arg)*)) };
}

/// Displays its content escaped for a JSON string (quotes, backslashes, control chars).
pub struct JsonEscaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for JsonEscaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapingWriter(f), "{}", self.0)
    }
}

struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for c in text.chars() {
            match c {
                '"' => self.0.write_str("\\\"")?,
                '\\' => self.0.write_str("\\\\")?,
                '\n' => self.0.write_str("\\n")?,
                c if (c as u32) < 0x20 => write!(self.0, "\\u{:04x}", c as u32)?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}
