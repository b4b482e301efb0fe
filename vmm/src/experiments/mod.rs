//! Experiments that drive the VMM and report figures: benchmarks today; snapshot,
//! restore, migration and balloon policy later.

pub mod balloon_watch;
pub mod boot_bench;
pub mod chaos;
pub mod child_timing;
pub mod fault_bench;
pub mod host_changes;
