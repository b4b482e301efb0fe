//! The hybrid source (`--mode hybrid`): pre-copy rounds first, on the pre-copy sender,
//! then post-copy for what the guest dirtied since. Round 0 sends every existing page
//! while the guest runs and `--postcopy-after-rounds` rounds of dirty pages follow (fewer
//! if the downtime estimate is under the limit earlier). Then the VM pauses, and:
//!
//! - if the rounds converged, the last dirty pages go at once, as pre-copy's
//!   stop-and-copy would send them, and the post-copy table is empty;
//! - if not, only the dirty pages that no longer exist (the balloon took them) go, as
//!   zero markers; the others are the post-copy table, which the destination evicts
//!   from what the rounds brought and then fetches on demand and in the background.
//!
//! Either way the handover, the requests, the push and the end are post-copy's
//! ([`super::postcopy_source`]), on the same connections.

use std::time::Instant;

use super::handshake::Summary;
use super::memory::Zones;
use super::postcopy_source::{connect_preempt, Session};
use super::source::{self, union, Progress, UnitLists, DEFAULT_MAX_ROUNDS};
use super::transport::MigrationUri;
use super::MigrationError;
use crate::api::protocol::MigrateRequest;
use crate::machine::Machine;

/// Pre-copy rounds after round 0 before the switch to post-copy, by default.
pub const DEFAULT_POSTCOPY_AFTER_ROUNDS: u32 = 1;

/// The hybrid transfer.
pub fn hybrid(
    machine: &Machine,
    uri: &MigrationUri,
    request: &MigrateRequest,
    progress: &Progress,
) -> Result<(), MigrationError> {
    let mut summary = Summary::of(&machine.config);
    summary.mode = "hybrid".into();
    summary.preempt = request.postcopy_preempt;
    let zones = Zones::new(&machine.ram, &machine.config.zones);
    source::with_sender(machine, uri, request, progress, |sender| {
        sender.handshake(&summary)?;
        let preempt = connect_preempt(uri, &summary)?;
        progress.update(|m| {
            m.mode = "hybrid".into();
            m.postcopy_preempt = summary.preempt;
        });
        let max_rounds = request.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS);
        let after = request.postcopy_after_rounds.unwrap_or(DEFAULT_POSTCOPY_AFTER_ROUNDS).min(max_rounds);
        let rounds = sender.rounds(request, u64::from(after))?;
        let paused_at = Instant::now();
        let precopy_bytes = sender.stop(&rounds)?;
        // Held still from here to the end, as in post-copy: every page read is final.
        let quiet = machine.quiesce();
        let (last, last_ours) = sender.harvest()?;
        let pending = union(rounds.dirty, last);
        let ours = union(rounds.ours, last_ours);
        let listed = match rounds.converged {
            true => {
                sender.send_all(&pending, &ours)?;
                vec![Vec::new(); zones.len()]
            }
            false => {
                let (listed, gone) = split_existing(pending, &zones.existing_units()?);
                sender.send_all(&gone, &gone)?;
                listed
            }
        };
        tracing::debug!(
            "hybrid switch-over after {} rounds (converged: {}): {} pages left for post-copy",
            rounds.round + 1,
            rounds.converged,
            listed.iter().map(Vec::len).sum::<usize>()
        );
        let (writer, answers) = sender.take_link();
        let mut session = Session::resume(writer, preempt)?;
        let result =
            session.switch_over(machine, progress, &quiet, &listed, answers.into_iter(), (paused_at, precopy_bytes));
        session.shutdown();
        result
    })
}

/// Splits sorted unit lists into the units in `existing` (sorted) and the others.
fn split_existing(units: UnitLists, existing: &[Vec<u64>]) -> (UnitLists, UnitLists) {
    units
        .into_iter()
        .zip(existing)
        .map(|(list, existing)| list.into_iter().partition(|u| existing.binary_search(u).is_ok()))
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_split_into_those_that_exist_and_the_rest() {
        let (kept, gone) = split_existing(vec![vec![1, 2, 5, 9], vec![], vec![3]], &[vec![2, 9, 10], vec![4], vec![]]);
        assert_eq!(kept, vec![vec![2, 9], vec![], vec![]]);
        assert_eq!(gone, vec![vec![1, 5], vec![], vec![3]]);
    }
}
