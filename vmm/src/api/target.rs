//! What the control server steers: the traits the VMM implements for it.
//!
//! The server calls these on the thread that runs its event loop (the VMM's main event
//! loop), so every method must return promptly: read shared state, or post a request to
//! a device (write its config space, raise its interrupt) and return. Never wait for the
//! guest here; a client that wants to see the guest follow polls `balloon.get`.

use super::protocol::{BalloonStats, VmStatus};

/// A running VM, as the control server sees it.
pub trait ControlTarget: Send + Sync {
    /// The VM's state now.
    fn status(&self) -> VmStatus;

    /// The balloon device, if the VM has one.
    fn balloon(&self) -> Option<&dyn BalloonControl>;

    /// Demand paging (the smmu), if the VM exposes it.
    fn paging(&self) -> Option<&dyn PagingControl> {
        None
    }

    /// Pause, resume and snapshots, if the VM supports them.
    fn lifecycle(&self) -> Option<&dyn LifecycleControl> {
        None
    }

    /// Live migration, if the VM supports it.
    fn migration(&self) -> Option<&dyn MigrationControl> {
        None
    }
}

/// Live migration of a running VM. `migrate` only checks and starts it (the transfer
/// runs on its own thread) and returns at once; `migrate_status` polls it.
pub trait MigrationControl: Send + Sync {
    /// Starts a migration (JSON: its first figures), or says why this VM cannot migrate.
    fn migrate(&self, request: &super::protocol::MigrateRequest) -> Result<serde_json::Value, String>;

    /// The running or last migration's figures (JSON).
    fn migrate_status(&self) -> Result<serde_json::Value, String>;

    /// Cancels the running migration; the VM runs on here (JSON: the figures so far).
    fn migrate_cancel(&self) -> Result<serde_json::Value, String>;
}

/// Pausing, resuming and saving a VM. Pause and resume take about a millisecond; a
/// snapshot takes as long as writing the guest's touched memory (the event loop waits
/// meanwhile, so other clients get their answers after it).
pub trait LifecycleControl: Send + Sync {
    /// Pauses every vCPU; the result says how long the pause took (JSON).
    fn pause(&self) -> Result<serde_json::Value, String>;

    /// Lets the vCPUs run again (JSON result).
    fn resume(&self) -> Result<serde_json::Value, String>;

    /// Writes a snapshot (JSON summary: files, bytes, time).
    fn snapshot(&self, request: &super::protocol::SnapshotRequest) -> Result<serde_json::Value, String>;
}

/// The smmu of a running VM, for debugging: statistics and the coherence checker.
pub trait PagingControl: Send + Sync {
    /// Paging modes, faults resolved, engine latency and race counters so far (JSON).
    fn stats(&self) -> serde_json::Value;

    /// Runs the coherence checker now; its report (JSON) or why it could not run. Takes
    /// each range's invalidation lock briefly, so faults go on meanwhile.
    fn check_coherence(&self) -> Result<serde_json::Value, String>;
}

/// A balloon's sizes, in 4 KiB balloon pages (virtio-balloon's unit), plus what the
/// device measured on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonSizes {
    /// The target the host set (virtio config `num_pages`).
    pub target_pages: u64,
    /// What the guest has given (virtio config `actual`).
    pub actual_pages: u64,
    /// Host memory actually freed by the balloon, bytes, if the device measures it.
    pub host_freed_bytes: Option<u64>,
    /// Huge pages only partly ballooned (hugetlb backends), if the device tracks them.
    pub partial_huge_pages: Option<u64>,
}

/// Why a balloon refused a new target (shown to the user as is: say what to do).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BalloonRefused(pub String);

/// A balloon device, as the control server steers it.
pub trait BalloonControl: Send + Sync {
    /// The current target, actual size and host accounting.
    fn sizes(&self) -> BalloonSizes;

    /// Asks the guest to make the balloon `pages` 4 KiB pages big (updates config space
    /// and notifies the guest). Returns once the request is posted, not when the guest
    /// has followed. The server has already checked that `pages` fits in guest RAM.
    fn set_target_pages(&self, pages: u64) -> Result<(), BalloonRefused>;

    /// The guest's latest memory statistics (all `None` until it reports).
    fn stats(&self) -> BalloonStats;
}
