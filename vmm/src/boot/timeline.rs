//! When each phase of a boot ended, for `bench boot` and the run report: the VMM's
//! start (as CLOCK_MONOTONIC, so a parent that noted when it spawned the process can
//! measure process start-up), the VM built, the boot vCPU's first KVM_RUN (the guest's
//! first instruction), and the guest's ready line.

use std::time::Instant;

/// The boot's phases, in nanoseconds from the VMM's start (`RunOptions::started`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BootTimeline {
    /// CLOCK_MONOTONIC at the VMM's start, in nanoseconds.
    pub started_monotonic_ns: u64,
    /// VMM start → VM built (guest RAM, KVM VM, kernel and boot data, devices, vCPUs).
    pub vm_built_ns: u64,
    /// VMM start → the boot vCPU entered KVM_RUN for the first time.
    pub first_instruction_ns: Option<u64>,
    /// VMM start → the guest's ready line arrived.
    pub ready_ns: Option<u64>,
}

/// CLOCK_MONOTONIC now, in nanoseconds (what `Instant` measures on Linux).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

impl BootTimeline {
    /// The timeline of a boot that started at `started`.
    pub fn new(started: Instant, vm_built_ns: u64, first_instruction: Option<Instant>, ready_ns: Option<u64>) -> Self {
        let since_start = |at: Instant| at.saturating_duration_since(started).as_nanos() as u64;
        // Elapsed first, the clock second: the start lands at or just after the true one,
        // never before it (`Instant` reads the same CLOCK_MONOTONIC on Linux).
        let elapsed_ns = started.elapsed().as_nanos() as u64;
        BootTimeline {
            started_monotonic_ns: monotonic_ns().saturating_sub(elapsed_ns),
            vm_built_ns,
            first_instruction_ns: first_instruction.map(since_start),
            ready_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_is_placed_on_the_monotonic_clock_and_phases_after_it() {
        let before = monotonic_ns();
        let started = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let first = Instant::now();
        let timeline = BootTimeline::new(started, 1_000, Some(first), Some(7_000_000));
        let after = monotonic_ns();
        assert!(timeline.started_monotonic_ns >= before && timeline.started_monotonic_ns <= after);
        assert!(timeline.first_instruction_ns.unwrap() >= 5_000_000);
        assert_eq!((timeline.vm_built_ns, timeline.ready_ns), (1_000, Some(7_000_000)));
    }
}
