//! CPUs: shared state, the step barrier, and starting the application processors.
//!
//! The BSP starts APs from ring 3: the LAPIC page is identity-mapped with U/S=1, so
//! ring 3 writes the xAPIC ICR directly (INIT, then SIPI with vector 0x08 — the
//! trampoline at `AP_TRAMPOLINE_GPA`). Each AP checks in by bumping [`AP_ONLINE`].

use core::cell::UnsafeCell;
use core::hint::spin_loop;
use core::sync::atomic::{AtomicU32, Ordering};

use faultline_abi::{AP_TRAMPOLINE_GPA, LAPIC_GPA};

use crate::tsc;

/// A static shared by all CPUs whose accesses are ordered by the program's own protocol
/// (set by the BSP before APs start, or written per CPU between two barriers).
pub struct Shared<T>(UnsafeCell<T>);

// SAFETY: users of `Shared` order their accesses with barriers or start-up order, as
// each use site documents.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// Wraps a value.
    pub const fn new(value: T) -> Self {
        Shared(UnsafeCell::new(value))
    }

    /// A raw pointer to the value.
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// A reusable barrier for all running CPUs (sense by generation counter).
pub struct Barrier {
    arrived: AtomicU32,
    generation: AtomicU32,
}

impl Barrier {
    /// A barrier nobody has reached.
    pub const fn new() -> Self {
        Barrier { arrived: AtomicU32::new(0), generation: AtomicU32::new(0) }
    }

    /// Waits until `cpus` CPUs have called `wait` for this round.
    pub fn wait(&self, cpus: u32) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == cpus {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
        } else {
            while self.generation.load(Ordering::Acquire) == generation {
                spin_loop();
            }
        }
    }
}

/// The barrier every step uses.
pub static STEP_BARRIER: Barrier = Barrier::new();
/// APs that reached ring 3.
pub static AP_ONLINE: AtomicU32 = AtomicU32::new(0);

const LAPIC_ICR_LOW: u64 = LAPIC_GPA + 0x300;
const LAPIC_ICR_HIGH: u64 = LAPIC_GPA + 0x310;
const ICR_INIT_ASSERT: u32 = 0x4500;
const ICR_STARTUP: u32 = 0x4600;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
/// How long the BSP waits for every AP.
pub const AP_START_TIMEOUT_MS: u64 = 2000;

fn lapic_read(gpa: u64) -> u32 {
    // SAFETY: the LAPIC page is identity-mapped and user-accessible; reads have no
    // side effects on the registers we read.
    unsafe { (gpa as *const u32).read_volatile() }
}

fn lapic_write(gpa: u64, value: u32) {
    // SAFETY: as for `lapic_read`; only the ICR is written.
    unsafe { (gpa as *mut u32).write_volatile(value) }
}

fn send_ipi(apic_id: u32, command: u32) {
    lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
    lapic_write(LAPIC_ICR_LOW, command);
    for _ in 0..100_000 {
        if lapic_read(LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING == 0 {
            break;
        }
        spin_loop();
    }
}

/// Starts APs `1..cpus` and waits until they are all in ring 3. On timeout returns the
/// number of APs that did check in.
pub fn start_aps(cpus: u32, tsc_khz: u64) -> Result<(), u32> {
    if cpus <= 1 {
        return Ok(());
    }
    let sipi = ICR_STARTUP | (AP_TRAMPOLINE_GPA >> 12) as u32;
    for apic_id in 1..cpus {
        send_ipi(apic_id, ICR_INIT_ASSERT);
    }
    for apic_id in 1..cpus {
        send_ipi(apic_id, sipi);
    }
    let start = tsc::now();
    let mut resent = false;
    let expected = cpus - 1;
    while AP_ONLINE.load(Ordering::Acquire) < expected {
        let elapsed_ms = tsc::cycles_to_ms(tsc::now() - start, tsc_khz);
        if elapsed_ms >= 1 && !resent {
            // The second SIPI of the MP spec start-up sequence; ignored by a started AP.
            resent = true;
            for apic_id in 1..cpus {
                send_ipi(apic_id, sipi);
            }
        }
        if elapsed_ms >= AP_START_TIMEOUT_MS {
            return Err(AP_ONLINE.load(Ordering::Acquire));
        }
        spin_loop();
    }
    Ok(())
}
