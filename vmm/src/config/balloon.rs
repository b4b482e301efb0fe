//! The balloon device's settings.

use faultline_abi as abi;
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// A virtio-balloon device (virtio-mmio window 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalloonOptions {
    /// Targets to follow in order, bytes (multiples of 4 KiB): each next one when the
    /// guest has reached the current one. Empty: start at 0 and wait for `faultline ctl`.
    #[serde(deserialize_with = "super::size::deserialize_sizes")]
    pub schedule_bytes: Vec<u64>,
    /// Target changes the built-in guest's `balloon` step follows before it ends (default:
    /// the schedule's length; 0 with no schedule: until the workload duration ends). Set it
    /// when steering the balloon by hand with `faultline ctl balloon set`.
    pub guest_changes: Option<u64>,
    /// Do not offer the statistics queue.
    pub no_stats: bool,
    /// Do not offer free page reporting.
    pub no_free_page_reporting: bool,
    /// Do not offer deflate-on-OOM.
    pub no_deflate_on_oom: bool,
}

impl BalloonOptions {
    /// Parses a schedule such as `128M,0`.
    pub fn parse_schedule(text: &str) -> Result<Vec<u64>, ConfigError> {
        text.split(',')
            .map(|t| {
                abi::parse_size(t.trim()).ok_or(ConfigError::BadSetting {
                    field: "balloon.schedule_bytes",
                    value: 0,
                    reason: "cannot parse a size in the schedule; give sizes like 128M,0",
                })
            })
            .collect()
    }

    /// The schedule in 4 KiB balloon pages.
    pub fn schedule_pages(&self) -> Vec<u32> {
        self.schedule_bytes.iter().map(|b| (b / abi::PAGE_SIZE) as u32).collect()
    }

    /// Checks the schedule against guest RAM.
    pub fn validate(&self, memory_bytes: u64) -> Result<(), ConfigError> {
        for &target in &self.schedule_bytes {
            check_target(target, memory_bytes).map_err(|reason| ConfigError::BadSetting {
                field: "balloon.schedule_bytes",
                value: target,
                reason,
            })?;
        }
        Ok(())
    }
}

/// The one rule for a balloon target, from the command line, a config file or the control
/// API: whole 4 KiB pages, and smaller than guest RAM (a balloon of all of RAM would leave
/// the guest nothing to run in; QEMU's `balloon` likewise always leaves the guest some).
pub fn check_target(target_bytes: u64, memory_bytes: u64) -> Result<(), &'static str> {
    if !target_bytes.is_multiple_of(abi::PAGE_SIZE) {
        return Err("balloon targets are whole 4 KiB pages; round the size");
    }
    if target_bytes >= memory_bytes {
        return Err("a balloon target must be smaller than guest RAM");
    }
    Ok(())
}
