//! Report lines on the COM1 UART: plain polling writes from ring 3 (IOPL=3).
//!
//! Every line is written under one lock so lines from different CPUs never interleave.
//! Each port access is a VM exit (tens of µs under nested KVM), so the UART's 16-byte
//! FIFO is enabled and the line status is polled once per 16 bytes, not once per byte.

use core::arch::asm;
use core::fmt::{self, Write};
use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use faultline_abi::{REPORT_PREFIX, SERIAL_PORT};

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

/// Enables the UART's FIFOs. Called once by the BSP before the first line.
pub fn init() {
    outb(SERIAL_PORT + FCR_OFFSET, FCR_ENABLE_AND_CLEAR);
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

/// Exclusive access to the UART for one or more whole lines; unlocks when dropped.
pub struct Serial(());

impl Serial {
    /// Waits for the UART lock.
    pub fn lock() -> Serial {
        while LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            spin_loop();
        }
        Serial(())
    }

    /// Waits a bounded time for the lock, then takes it anyway: for last words (panic,
    /// exception), which must come out even if the holder died mid-line.
    pub fn lock_or_steal() -> Serial {
        for _ in 0..MAX_LOCK_SPINS {
            if LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return Serial(());
            }
            spin_loop();
        }
        Serial(())
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        LOCK.store(false, Ordering::Release);
    }
}

impl Write for Serial {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        text.bytes().for_each(write_byte);
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
