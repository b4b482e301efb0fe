//! Host system settings that experiments change (a private zram swap device, KSM's
//! scanner, a tracefs mount and its instances), each behind a guard that puts the
//! original back when dropped — on success, on error and on unwinding — and a lock file
//! that serialises the runs that change them, so parallel runs on one machine never see
//! each other's half-set-up host.
//!
//! Nothing here knows about VMs: the experiments decide what to change and when.

pub mod interrupt;
pub mod ksm;
pub mod lock;
pub mod memcg;
pub mod sysfs;
pub mod tracefs;
pub mod zram;

use std::path::PathBuf;

/// Errors changing a host setting. Each says what needs fixing.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A setting file could not be read.
    #[error("cannot read {path}: {source}{hint}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
        /// What to do.
        hint: &'static str,
    },
    /// A setting file could not be written.
    #[error("cannot write '{value}' to {path}: {source}{hint}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The OS error.
        source: std::io::Error,
        /// What to do.
        hint: &'static str,
    },
    /// A helper program failed.
    #[error("{program} {args} failed: {reason}")]
    Program {
        /// The program.
        program: &'static str,
        /// Its arguments.
        args: String,
        /// Its stderr or the spawn error.
        reason: String,
    },
    /// The host lacks a feature the experiment needs.
    #[error("{feature} is not available on this host: {reason}")]
    Unavailable {
        /// The feature.
        feature: &'static str,
        /// Why, and what to do.
        reason: String,
    },
    /// The lock file could not be taken.
    #[error("cannot lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The hint for permission errors on host settings.
pub(crate) fn root_hint(err: &std::io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => " (host changes need root)",
        _ => "",
    }
}
