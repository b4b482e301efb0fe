//! What a migration did, under QEMU's names (`query-migrate`): `migrate.status --json`,
//! and the `migration` section of both ends' run reports.

use serde::{Deserialize, Serialize};

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// Connecting and handshaking.
    #[default]
    Setup,
    /// Pre-copy rounds while the guest runs.
    Active,
    /// Stop-and-copy: the vCPUs are paused, the last pages and the state go.
    Device,
    /// Post-copy: the destination runs the VM and asks for the pages it still lacks.
    PostcopyActive,
    /// The destination runs the VM; this end is done.
    Completed,
    /// It failed; the source runs on (see `error`).
    Failed,
    /// Cancelled (`migrate.cancel`); the source runs on.
    Cancelled,
}

/// The figures of one migration, named as QEMU names them. Times in milliseconds,
/// sizes in bytes, rates per second.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationMetrics {
    /// Which end this is: `source` or `destination`.
    pub role: String,
    /// The address.
    pub uri: String,
    /// Where it is.
    pub status: MigrationStatus,
    /// Why it failed or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From the start to now (or to the end).
    pub total_time: f64,
    /// Connecting, handshake and configuration.
    pub setup_time: f64,
    /// vCPUs paused on the source to the destination's acknowledgement (source); the
    /// stop-and-copy's bytes received to the VM restored (destination).
    pub downtime: f64,
    /// The last estimate of the downtime: remaining dirty bytes at the measured bandwidth.
    pub expected_downtime: f64,
    /// The downtime the source aimed for (`--downtime-ms`).
    pub downtime_limit: f64,
    /// Stream bytes sent (source) or received (destination), headers included.
    pub transferred: u64,
    /// Dirty bytes known to be still to send.
    pub remaining: u64,
    /// Guest RAM.
    pub total: u64,
    /// Pages that were all zeros (sent as markers, no bytes).
    pub duplicate: u64,
    /// Pages sent with their bytes.
    pub normal: u64,
    /// Bytes of those pages.
    pub normal_bytes: u64,
    /// Pages the guest dirtied per second during the last round.
    pub dirty_pages_rate: f64,
    /// Measured bandwidth, megabits per second.
    pub mbps: f64,
    /// Pages sent per second.
    pub pages_per_second: f64,
    /// Dirty log harvests (one per round, plus the stop-and-copy's).
    pub dirty_sync_count: u64,
    /// Stream bytes sent while the guest ran.
    pub precopy_bytes: u64,
    /// Stream bytes sent while it was paused.
    pub downtime_bytes: u64,
    /// Pre-copy rounds (round 0: every existing page).
    pub rounds: u64,
    /// True when the stop-and-copy began because the downtime estimate was under the
    /// limit; false when the round limit forced it.
    pub converged: bool,
    /// The transfer unit (4096, or 2 MiB where a hugetlb zone moves).
    pub page_size: u64,
    /// `precopy`, `postcopy` or `hybrid`.
    #[serde(default)]
    pub mode: String,
    /// Post-copy: stream bytes after the switch-over (background pages and answers to
    /// page requests, both connections).
    #[serde(default)]
    pub postcopy_bytes: u64,
    /// Post-copy: pages the destination asked for (each page once, however many
    /// faults waited for it).
    #[serde(default)]
    pub postcopy_requests: u64,
    /// Post-copy, destination: the preempt channel (a second connection) carried the
    /// requests and their answers.
    #[serde(default)]
    pub postcopy_preempt: bool,
    /// Post-copy, destination: the time during which every vCPU waited for pages from the
    /// source at once (ms), QEMU's `postcopy-blocktime`.
    #[serde(default)]
    pub postcopy_blocktime: f64,
    /// Post-copy, destination: per vCPU, the time it waited for pages (ms), QEMU's
    /// `postcopy-vcpu-blocktime`.
    #[serde(default)]
    pub postcopy_vcpu_blocktime: Vec<f64>,
    /// Post-copy, destination: the waits of threads that are not vCPUs (the VMM's own
    /// accesses to guest RAM), summed (ms).
    #[serde(default)]
    pub postcopy_other_blocktime: f64,
    /// Post-copy, destination: every fault's wait for its page, summed over faults (ms;
    /// more than the per-vCPU figures when faults of one vCPU overlap, e.g. retries).
    #[serde(default)]
    pub postcopy_fault_wait: f64,
    /// Post-copy, destination: faults that waited for the source.
    #[serde(default)]
    pub postcopy_faults: u64,
    /// Post-copy, destination: how long those faults waited (fault read to page
    /// installed), as counts per power-of-two bucket of microseconds: `[upper_us, count]`.
    #[serde(default)]
    pub postcopy_latency_us: Vec<(u64, u64)>,
    /// Post-copy and hybrid: pages the post-copy table listed at the switch-over (the
    /// pages still to come: every existing page in post-copy, those dirtied since they
    /// were sent in hybrid).
    #[serde(default)]
    pub postcopy_table_pages: u64,
    /// Post-copy, destination: pages of the source's table that were neither installed
    /// nor discarded when the source said it had sent everything (0 on success).
    #[serde(default)]
    pub postcopy_missing: u64,
    /// The dirty tracker of the rounds: `log` or `ring` (source; empty elsewhere).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dirty_tracking: String,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits the vCPU threads served (a ring VM, since it
    /// was made).
    #[serde(default)]
    pub dirty_ring_full_exits: u64,
    /// Times a dirty ring was found overrun during the migration (it then fails).
    #[serde(default)]
    pub dirty_ring_overflows: u64,
    /// The ring's overflow count when the migration's tracking began (not reported).
    #[serde(skip)]
    pub dirty_ring_overflows_at_start: Option<u64>,
    /// How much auto-converge throttles the vCPUs, percent (the last value set; 0: not
    /// throttled).
    #[serde(default)]
    pub cpu_throttle_percentage: u64,
}

/// Where a running migration's figures are kept, for the parts that change them beside
/// the sender (dirty tracker, auto-converge) without depending on it.
pub trait Figures {
    /// Changes the figures under their lock.
    fn update_figures(&self, change: &mut dyn FnMut(&mut MigrationMetrics));
}
