//! The control API: a Unix socket speaking newline-delimited JSON, so a running VM can be
//! steered (`faultline ctl`). See `docs/control-api.md` for the protocol.
//!
//! - [`protocol`]: the wire types and command parsing;
//! - [`target`]: the traits the VMM implements for the server ([`ControlTarget`],
//!   [`BalloonControl`]);
//! - [`ControlServer`]: the event-manager subscriber serving the socket;
//! - [`client`]: a blocking client; [`ctl`]: the `faultline ctl` subcommand.

pub mod client;
mod connection;
pub mod ctl;
mod dispatch;
pub mod protocol;
mod server;
mod socket_file;
pub mod target;

#[cfg(test)]
mod tests;

pub use client::{ClientError, ControlClient};
pub use ctl::CtlArgs;
pub use protocol::{
    AfterSnapshot, BalloonInfo, BalloonStats, DirtyTracking, MigrateMode, MigrateRequest, SnapshotRequest, VmState,
    VmStatus,
};
pub use server::{ControlServer, DEFAULT_MAX_CLIENTS};
pub use socket_file::ApiError;
pub use target::{
    BalloonControl, BalloonRefused, BalloonSizes, ControlTarget, LifecycleControl, MigrationControl, PagingControl,
};
