//! Live migration: a running VM moves to another `faultline` process (same host or
//! another) over a stream of our own (`docs/migration.md`), by pre-copy, post-copy or a hybrid of both.
//!
//! - [`stream`]: numbered, checksummed frames; [`handshake`]: magic, version, arch;
//!   [`memory`]: page ranges with zero markers, read from and written into guest RAM;
//!   [`transport`]: `unix:PATH`, `tcp:HOST:PORT` and `fd-local:PATH`; [`local`]: the
//!   `fd-local:` handover of the zones' fds (no memory copied);
//! - [`source`]: the pre-copy sender (on its own thread; [`Migrations`] starts, polls
//!   and cancels it for the control socket); [`postcopy_source`]: the post-copy one;
//!   [`hybrid_source`]: pre-copy rounds, then post-copy on the same connections;
//! - [`destination`]: `faultline restore --incoming URI` receives, checks every frame
//!   before it applies it, and starts nothing unless the whole VM arrived;
//! - [`metrics`]: QEMU's figures.
//!
//! The dirty log is KVM's (manual-protect mode, harvested and cleared per slot). The
//! VMM's own writes to guest RAM are not in it (the balloon writes and discards): each
//! harvest unites it with the smmu's set of those writes, and discarded pages go as
//! zero markers (docs/migration.md, "The balloon").

mod blocktime;
mod converge;
pub mod destination;
mod dirty_tracker;
pub mod handshake;
pub mod hybrid_source;
pub mod local;
pub mod memory;
pub mod metrics;
pub mod postcopy_destination;
pub mod postcopy_source;
pub mod source;
pub mod stream;
pub mod transport;

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

pub use metrics::{MigrationMetrics, MigrationStatus};
pub use source::Progress;
pub use stream::StreamError;

use crate::api::protocol::{MigrateMode, MigrateRequest};
use crate::machine::{Machine, MachineError, RunState};

/// Errors of a migration, on either end.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The URI is not one of the forms known.
    #[error("migration address \"{uri}\": {reason}")]
    BadUri {
        /// What was given.
        uri: String,
        /// What to write instead.
        reason: String,
    },
    /// The source could not reach the destination.
    #[error("cannot connect to {uri}: {source}; is `faultline restore --incoming {uri}` listening there?")]
    Connect {
        /// The address.
        uri: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The destination could not listen.
    #[error("cannot listen on {uri}: {source} (a unix: path must not exist yet; a tcp: port must be free)")]
    Listen {
        /// The address.
        uri: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Accepting the source failed.
    #[error("accepting the source failed: {source}")]
    Accept {
        /// The OS error.
        source: std::io::Error,
    },
    /// The stream broke or was corrupted.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The handshake found the two ends incompatible.
    #[error("handshake refused: {reason}")]
    Handshake {
        /// What differs.
        reason: String,
    },
    /// A frame came where another was due.
    #[error("the migration stream is out of order: a {got} frame arrived where {wanted} was due")]
    Unexpected {
        /// What came.
        got: String,
        /// What was due.
        wanted: String,
    },
    /// A frame's payload is malformed.
    #[error("the migration stream is malformed: {what}: {reason}")]
    Malformed {
        /// Which frame.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The other end refused or gave up, and said why.
    #[error("the {peer} refused the migration: {reason}")]
    Refused {
        /// `destination` or `source`.
        peer: &'static str,
        /// Its message.
        reason: String,
    },
    /// The other end did not answer in time.
    #[error("the {peer} did not answer within {seconds} s while {what}")]
    NoAnswer {
        /// `destination` or `source`.
        peer: &'static str,
        /// The wait.
        seconds: u64,
        /// What was awaited.
        what: &'static str,
    },
    /// Guest memory could not be read.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The machine could not be paused, saved or restored.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// KVM's dirty log failed.
    #[error("dirty log: {0}")]
    DirtyLog(#[from] crate::vstate::VmError),
    /// This VM cannot migrate (yet).
    #[error("this VM cannot migrate: {0}")]
    Unsupported(String),
    /// Another migration runs.
    #[error("a migration is already running (see migrate status; migrate cancel stops it)")]
    Busy,
    /// No migration runs.
    #[error("no migration is running")]
    NotRunning,
    /// `migrate.cancel`.
    #[error("cancelled (migrate cancel); the VM runs on here")]
    Cancelled,
    /// The VM ended while it migrated.
    #[error("the VM ended during the migration ({0})")]
    VmEnded(String),
    /// `--timeout` passed.
    #[error("the migration did not finish within its --timeout of {seconds} s; the VM runs on here")]
    TimedOut {
        /// The limit.
        seconds: f64,
    },
}

/// The migrations of one VM, as the control socket starts, polls and cancels them:
/// at most one runs at a time, on its own thread.
#[derive(Default)]
pub struct Migrations {
    state: Mutex<ControllerState>,
}

#[derive(Default)]
struct ControllerState {
    running: Option<(JoinHandle<()>, Arc<Progress>)>,
    last: Option<Arc<Progress>>,
    incoming: Option<MigrationMetrics>,
    /// The dirty log was switched on by a migration (not by a snapshot, whose diffs it
    /// belongs to).
    dirty_log_ours: bool,
}

impl Migrations {
    /// Checks that `machine` can migrate and starts the migration on its own thread;
    /// returns at once with the first figures.
    pub fn start(&self, machine: &Arc<Machine>, request: &MigrateRequest) -> Result<MigrationMetrics, MigrationError> {
        let uri = transport::MigrationUri::parse(&request.uri)?;
        let mut state = self.lock();
        state.reap();
        if state.running.is_some() {
            return Err(MigrationError::Busy);
        }
        if !uri.is_local() {
            dirty_tracker::check(machine, request)?;
        }
        check_migratable(machine, state.dirty_log_ours, &uri, request.mode)?;
        state.dirty_log_ours = true;
        let progress = Arc::new(Progress::new(&uri, machine, request));
        let thread = {
            let (machine, progress, request) = (machine.clone(), progress.clone(), request.clone());
            std::thread::Builder::new()
                .name("migrate-source".into())
                .spawn(move || {
                    let transfer: source::Transfer = match (uri.is_local(), request.mode) {
                        (true, _) => local::migrate,
                        (false, MigrateMode::Precopy) => source::precopy,
                        (false, MigrateMode::Postcopy) => postcopy_source::postcopy,
                        (false, MigrateMode::Hybrid) => hybrid_source::hybrid,
                    };
                    source::migrate(&machine, uri, &request, &progress, transfer)
                })
                .map_err(|e| MigrationError::Unsupported(format!("cannot start the migration thread: {e}")))?
        };
        let first = progress.metrics();
        state.running = Some((thread, progress));
        Ok(first)
    }

    /// The running (or last) migration's figures, or the incoming one's.
    pub fn status(&self) -> Option<MigrationMetrics> {
        let mut state = self.lock();
        state.reap();
        match (&state.running, &state.last) {
            (Some((_, progress)), _) | (None, Some(progress)) => Some(progress.metrics()),
            (None, None) => state.incoming.clone(),
        }
    }

    /// Asks the running migration to stop; the source resumes.
    pub fn cancel(&self) -> Result<MigrationMetrics, MigrationError> {
        let mut state = self.lock();
        state.reap();
        let (_, progress) = state.running.as_ref().ok_or(MigrationError::NotRunning)?;
        progress.cancel();
        Ok(progress.metrics())
    }

    /// Cancels a migration still running and waits for its thread (the VM has ended);
    /// returns the figures for the run report: the last outgoing migration, else the
    /// incoming one.
    pub fn finish(&self) -> Option<MigrationMetrics> {
        let running = self.lock().running.take();
        if let Some((thread, progress)) = running {
            progress.cancel();
            let _ = thread.join();
            self.lock().last = Some(progress);
        }
        let state = self.lock();
        state.last.as_ref().map(|p| p.metrics()).or_else(|| state.incoming.clone())
    }

    /// Records how the VM arrived (destination).
    pub fn record_incoming(&self, metrics: MigrationMetrics) {
        self.lock().incoming = Some(metrics);
    }

    fn lock(&self) -> MutexGuard<'_, ControllerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ControllerState {
    /// Moves a finished migration to `last`.
    fn reap(&mut self) {
        if self.running.as_ref().is_some_and(|(thread, _)| thread.is_finished()) {
            let (thread, progress) = self.running.take().expect("checked");
            let _ = thread.join();
            self.last = Some(progress);
        }
    }
}

fn machine_request_is_postcopy(mode: MigrateMode) -> bool {
    mode != MigrateMode::Precopy
}

/// Refuses, with what to do, a VM this migration cannot move faithfully.
fn check_migratable(
    machine: &Machine,
    dirty_log_ours: bool,
    uri: &transport::MigrationUri,
    mode: MigrateMode,
) -> Result<(), MigrationError> {
    let unsupported = |reason: &str| Err(MigrationError::Unsupported(reason.to_string()));
    if uri.is_local() && machine_request_is_postcopy(mode) {
        return unsupported("fd-local: hands the memory over at once; post-copy and hybrid are for unix: and tcp:");
    }
    if uri.is_local() {
        local::check_shareable(&machine.config.zones)?;
    } else if machine.config.zones.iter().any(|z| z.backend == crate::config::Backend::File) {
        return unsupported(
            "a file zone would be shared by both ends on one host (and is not carried to another); use anon, memfd or hugetlb zones",
        );
    }
    if machine.vm().dirty_logging() && !dirty_log_ours {
        return unsupported(
            "it has snapshots whose diffs use KVM's dirty log; a migration would take their pages (restore a snapshot in a fresh process to migrate)",
        );
    }
    // Whatever a snapshot refuses (chaos, parts without saved state), a migration
    // refuses too, up front: pause, ask, resume.
    let was_running = machine.run_state() == RunState::Running;
    machine.pause()?;
    let saved = machine.save_state();
    if was_running {
        machine.resume()?;
    }
    match saved {
        Ok(_) => Ok(()),
        Err(MachineError::Unsupported(reason)) => Err(MigrationError::Unsupported(reason)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests;
