//! The running VM as the control socket sees it ([`crate::api::ControlTarget`]): status
//! from the VM's control and the guest's report lines, the smmu's statistics and its
//! coherence checker, the balloon.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::api::{BalloonControl, ControlTarget, PagingControl, VmState, VmStatus};
use crate::devices::virtio::balloon::BalloonHandle;
use crate::guest_report::GuestReportCollector;
use crate::paging::GuestPaging;
use crate::vstate::VmControl;

/// A running VM's state for the control server.
pub struct VmTarget {
    /// How and whether the VM ended.
    pub control: Arc<VmControl>,
    /// The guest's report lines (for "guest ready").
    pub collector: Arc<Mutex<GuestReportCollector>>,
    /// Demand paging.
    pub paging: Arc<GuestPaging>,
    /// The balloon, if the VM has one.
    pub balloon: Option<Arc<BalloonHandle>>,
    /// When the VM started.
    pub started: Instant,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM, bytes.
    pub memory_bytes: u64,
}

impl ControlTarget for VmTarget {
    fn status(&self) -> VmStatus {
        let exit = self.control.exit();
        let state = match (&exit, self.control.is_stopping()) {
            (Some(_), _) => VmState::Ended,
            (None, true) => VmState::Stopping,
            (None, false) => VmState::Running,
        };
        let guest_ready = self.collector.lock().unwrap_or_else(|e| e.into_inner()).report.ready.is_some();
        VmStatus {
            state,
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            guest_ready,
            balloon: self.balloon.is_some(),
            exit: exit.map(|e| e.describe()),
        }
    }

    fn balloon(&self) -> Option<&dyn BalloonControl> {
        self.balloon.as_deref().map(|h| h as &dyn BalloonControl)
    }

    fn paging(&self) -> Option<&dyn PagingControl> {
        Some(self)
    }
}

impl PagingControl for VmTarget {
    fn stats(&self) -> serde_json::Value {
        serde_json::to_value(self.paging.live_report()).unwrap_or_default()
    }

    fn check_coherence(&self) -> Result<serde_json::Value, String> {
        let report = self.paging.check_coherence().map_err(|e| e.to_string())?;
        Ok(serde_json::to_value(report).unwrap_or_default())
    }
}
