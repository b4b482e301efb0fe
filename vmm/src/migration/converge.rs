//! Auto-converge (`--auto-converge`, QEMU's cpu-throttle): when the estimated downtime
//! stays over `--downtime-ms` for [`ROUNDS_BEFORE_THROTTLE`] harvests in a row, the
//! guest's vCPUs are made to sleep [`THROTTLE_INITIAL`] % of their time, then
//! [`THROTTLE_INCREMENT`] % more after each harvest still over the limit, up to
//! [`THROTTLE_MAX`] %. The vCPU threads keep the duty cycle (`vstate::vcpu_thread`:
//! run a 10 ms slice, sleep their share); a ticker thread kicks them out of `KVM_RUN`
//! every slice so a guest that never exits is throttled too. The throttle ends when the
//! migration does, whatever its outcome.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::metrics::Figures;
use crate::api::protocol::MigrateRequest;
use crate::machine::Machine;
use crate::vstate::vcpu_thread::THROTTLE_SLICE;
use crate::vstate::VmControl;

/// The first throttle, percent (QEMU's `cpu-throttle-initial`).
pub const THROTTLE_INITIAL: u8 = 20;
/// Added after each harvest still over the limit (QEMU's `cpu-throttle-increment`).
pub const THROTTLE_INCREMENT: u8 = 10;
/// The most (QEMU's `max-cpu-throttle`).
pub const THROTTLE_MAX: u8 = 99;
/// Harvests over the limit in a row before the throttle starts.
pub const ROUNDS_BEFORE_THROTTLE: u32 = 2;

/// The throttle of one migration.
pub(super) struct AutoConverge {
    control: Arc<VmControl>,
    enabled: bool,
    over_limit: u32,
    percent: u8,
    ticker: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl AutoConverge {
    /// Off unless the request asks for it.
    pub(super) fn new(machine: &Machine, request: &MigrateRequest) -> Self {
        AutoConverge {
            control: machine.control.clone(),
            enabled: request.auto_converge,
            over_limit: 0,
            percent: 0,
            ticker: None,
        }
    }

    /// After a harvest that is followed by another round: throttles (more) if the
    /// estimate is over the limit again.
    pub(super) fn after_harvest(&mut self, expected_ms: f64, limit_ms: f64, progress: &dyn Figures) {
        if !self.enabled {
            return;
        }
        if expected_ms <= limit_ms {
            self.over_limit = 0;
            return;
        }
        self.over_limit += 1;
        if self.over_limit < ROUNDS_BEFORE_THROTTLE {
            return;
        }
        self.percent = match self.percent {
            0 => THROTTLE_INITIAL,
            p => p.saturating_add(THROTTLE_INCREMENT).min(THROTTLE_MAX),
        };
        self.control.set_throttle(self.percent);
        self.start_ticker();
        let percent = u64::from(self.percent);
        progress.update_figures(&mut |m| m.cpu_throttle_percentage = percent);
        tracing::debug!("auto-converge: vCPUs throttled to {percent} %");
    }

    fn start_ticker(&mut self) {
        if self.ticker.is_some() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (control, flag) = (self.control.clone(), stop.clone());
        let spawned = std::thread::Builder::new().name("fl-throttle".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) && !control.is_stopping() {
                std::thread::sleep(THROTTLE_SLICE);
                control.kick_vcpus();
            }
        });
        match spawned {
            Ok(join) => self.ticker = Some((stop, join)),
            // Without the ticker the vCPUs are still throttled at each of their exits.
            Err(e) => tracing::warn!("auto-converge: cannot start the throttle ticker: {e}"),
        }
    }
}

impl Drop for AutoConverge {
    fn drop(&mut self) {
        if self.percent > 0 {
            self.control.set_throttle(0);
        }
        if let Some((stop, join)) = self.ticker.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = join.join();
        }
    }
}
