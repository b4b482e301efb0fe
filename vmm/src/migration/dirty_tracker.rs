//! Which of KVM's dirty trackers drives a migration's rounds: the log or the ring
//! (`--dirty-tracking`), checked before anything is sent, and its counters in the
//! figures. The harvest itself is the VM's one interface (`Vm::enable_dirty_log`,
//! `Vm::take_dirty_pages`), which goes through whichever tracker the VM was made with.

use super::metrics::Figures;
use super::MigrationError;
use crate::api::protocol::{DirtyTracking, MigrateRequest};
use crate::machine::Machine;

/// Refuses a tracker the VM cannot use, saying what to do instead.
pub(super) fn check(machine: &Machine, request: &MigrateRequest) -> Result<(), MigrationError> {
    let has_ring = machine.vm().dirty_rings().is_some();
    match (request.dirty_tracking, has_ring) {
        (Some(DirtyTracking::Ring), false) => Err(MigrationError::Unsupported(
            "--dirty-tracking ring: this VM has no dirty ring (KVM's ring must exist before the vCPUs, so it is chosen when the VM starts); start it with `faultline run --dirty-ring 4096 ...`, or migrate with --dirty-tracking log".into(),
        )),
        (Some(DirtyTracking::Log), true) => Err(MigrationError::Unsupported(
            "--dirty-tracking log: this VM was started with --dirty-ring, and this host's KVM keeps no dirty log beside the ring (no KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP); migrate with --dirty-tracking ring (its default)".into(),
        )),
        _ => Ok(()),
    }
}

/// Puts the tracker's name and the ring's counters into the figures; the first call
/// (right after the tracker was reset for round 0) notes where the ring's overflow count
/// stood. Fails if a ring was overrun since: KVM may have overwritten entries, so the
/// dirty pages are not known any more (the VM runs on; migrate again, with a larger
/// `--dirty-ring`).
pub(super) fn record(machine: &Machine, progress: &dyn Figures) -> Result<(), MigrationError> {
    let (name, counts) = {
        let vm = machine.vm();
        (vm.dirty_tracker(), vm.dirty_rings().map(|rings| rings.counts()).unwrap_or_default())
    };
    let mut overrun = 0;
    progress.update_figures(&mut |m| {
        let before = *m.dirty_ring_overflows_at_start.get_or_insert(counts.overflows);
        m.dirty_tracking = name.to_string();
        m.dirty_ring_full_exits = counts.full_exits;
        m.dirty_ring_overflows = counts.overflows - before;
        overrun = m.dirty_ring_overflows;
    });
    match overrun {
        0 => Ok(()),
        n => Err(MigrationError::Memory(format!(
            "the dirty ring ({} entries per vCPU) was overrun {n} time(s) during the migration (this host's KVM pushed past it without a full-ring exit), so dirtied pages may be unknown; the VM runs on here: migrate again, or start it with a larger --dirty-ring",
            counts.entries
        ))),
    }
}
