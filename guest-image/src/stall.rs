//! Stalls a paced step notices: the longest time a CPU's clock moved between two looks
//! while the CPU did not run (the VM paused, migrated or restored, a fault waiting for
//! its page, the host descheduling the vCPU). A gap of at least `fl.stall_us` is printed
//! at once as a `stall` line (at most one per CPU every [`STALL_LINE_EVERY_MS`]), so a
//! VMM or a bench reading the console learns the guest-visible pause of a migration from
//! the first line the destination prints; the worst gap goes into the step's result.
//!
//! The gaps are TSC time: a VMM that restores the guest's TSC on the destination hides
//! the pause from it; where the host ignores the restored TSC the gap is wall time.

use core::fmt::Write;

use faultline_abi::{report, REPORT_PREFIX, STALL_LINE_EVERY_MS};

use crate::serial::Serial;
use crate::tsc;

/// Watches one CPU's paced loop.
pub struct StallWatch {
    cpu: u32,
    khz: u64,
    last: u64,
    worst: u64,
    /// Gaps from this many cycles are printed (`u64::MAX`: never).
    print_from: u64,
    line_every: u64,
    next_line: u64,
}

impl StallWatch {
    /// A watch starting now, printing gaps of `stall_us` or more (0: none).
    pub fn new(cpu: u32, stall_us: u64, tsc_khz: u64) -> Self {
        let khz = tsc::effective_khz(tsc_khz).max(1);
        let print_from = if stall_us == 0 { u64::MAX } else { stall_us.saturating_mul(khz) / 1000 };
        let now = tsc::now();
        StallWatch {
            cpu,
            khz,
            last: now,
            worst: 0,
            print_from: print_from.max(1),
            line_every: tsc::ms_to_cycles(STALL_LINE_EVERY_MS, tsc_khz),
            next_line: now,
        }
    }

    /// The clock read `now` (TSC cycles) on this turn of the loop.
    #[inline]
    pub fn look(&mut self, now: u64) {
        let gap = now.saturating_sub(self.last);
        self.last = now;
        self.worst = self.worst.max(gap);
        if gap >= self.print_from && now >= self.next_line {
            self.print(gap);
            // The printing itself is not a stall of the guest.
            self.last = tsc::now();
            self.next_line = self.last + self.line_every;
        }
    }

    #[cold]
    fn print(&self, gap: u64) {
        let mut out = Serial::lock();
        let _ = writeln!(
            out,
            "{REPORT_PREFIX}{} {{\"cpu\":{},\"us\":{}}}",
            report::STALL,
            self.cpu,
            self.cycles_to_us(gap)
        );
    }

    fn cycles_to_us(&self, cycles: u64) -> u64 {
        (u128::from(cycles) * 1000 / u128::from(self.khz)) as u64
    }

    /// The worst gap so far, in microseconds.
    pub fn worst_us(&self) -> u64 {
        self.cycles_to_us(self.worst)
    }
}
