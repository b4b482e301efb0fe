//! Experiments that drive the VMM and report figures: the benchmarks (boot, faults,
//! snapshot, migrate), the chaos driver and the balloon watcher.

pub mod balloon_watch;
pub mod boot_bench;
pub mod chaos;
pub mod child_timing;
pub mod console_child;
pub mod fault_bench;
pub mod host_changes;
pub mod migrate_bench;
pub mod plot;
pub mod qmp;
pub mod restore_bench;
pub mod snapshot_bench;
pub mod snapshot_live_bench;
