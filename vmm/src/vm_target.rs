//! The running VM as the control socket sees it ([`crate::api::ControlTarget`]): status
//! from the machine's lifecycle and the guest's report lines, pause/resume/snapshot, the
//! smmu's statistics and its coherence checker, the balloon, live migration.

use std::path::Path;
use std::sync::Arc;

use crate::api::{AfterSnapshot, BalloonControl, ControlTarget, LifecycleControl, PagingControl, SnapshotRequest};
use crate::api::{MigrateRequest, MigrationControl};
use crate::api::{VmState, VmStatus};
use crate::exit::VmExit;
use crate::machine::{Machine, RunState};
use crate::migration::Migrations;
use crate::snapshot::{self, SnapshotHistory};

/// A running VM's state for the control server.
pub struct VmTarget {
    machine: Arc<Machine>,
    history: Arc<SnapshotHistory>,
    migrations: Arc<Migrations>,
}

impl VmTarget {
    /// The control server's view of `machine`.
    pub fn new(machine: Arc<Machine>, history: Arc<SnapshotHistory>, migrations: Arc<Migrations>) -> Self {
        VmTarget { machine, history, migrations }
    }
}

impl ControlTarget for VmTarget {
    fn status(&self) -> VmStatus {
        let control = &self.machine.control;
        let exit = control.exit();
        let state = match (&exit, control.is_stopping(), self.machine.run_state()) {
            (Some(_), _, _) => VmState::Ended,
            (None, true, _) => VmState::Stopping,
            (None, false, RunState::Paused) => VmState::Paused,
            (None, false, _) => VmState::Running,
        };
        let guest_ready = self.machine.collector.lock().unwrap_or_else(|e| e.into_inner()).report.ready.is_some();
        VmStatus {
            state,
            vcpus: self.machine.config.vcpus,
            memory_bytes: self.machine.ram.size_bytes(),
            uptime_ms: self.machine.started.elapsed().as_millis() as u64,
            guest_ready,
            balloon: self.machine.devices.balloon.is_some(),
            exit: exit.map(|e| e.describe()),
        }
    }

    fn balloon(&self) -> Option<&dyn BalloonControl> {
        self.machine.devices.balloon.as_deref().map(|h| h as &dyn BalloonControl)
    }

    fn paging(&self) -> Option<&dyn PagingControl> {
        Some(self)
    }

    fn lifecycle(&self) -> Option<&dyn LifecycleControl> {
        Some(self)
    }

    fn migration(&self) -> Option<&dyn MigrationControl> {
        Some(self)
    }
}

impl MigrationControl for VmTarget {
    fn migrate(&self, request: &MigrateRequest) -> Result<serde_json::Value, String> {
        let first = self.migrations.start(&self.machine, request).map_err(|e| e.to_string())?;
        Ok(serde_json::to_value(first).unwrap_or_default())
    }

    fn migrate_status(&self) -> Result<serde_json::Value, String> {
        let metrics = self.migrations.status().ok_or("this VM has not migrated (start one with migrate URI)")?;
        Ok(serde_json::to_value(metrics).unwrap_or_default())
    }

    fn migrate_cancel(&self) -> Result<serde_json::Value, String> {
        let metrics = self.migrations.cancel().map_err(|e| e.to_string())?;
        Ok(serde_json::to_value(metrics).unwrap_or_default())
    }
}

impl LifecycleControl for VmTarget {
    fn pause(&self) -> Result<serde_json::Value, String> {
        let took = self.machine.pause().map_err(|e| e.to_string())?;
        Ok(serde_json::json!({ "pause_ns": took.as_nanos() as u64 }))
    }

    fn resume(&self) -> Result<serde_json::Value, String> {
        self.machine.resume().map_err(|e| e.to_string())?;
        Ok(serde_json::json!({}))
    }

    fn snapshot(&self, request: &SnapshotRequest) -> Result<serde_json::Value, String> {
        let was_running = self.machine.run_state() == RunState::Running;
        let dir = Path::new(&request.dir);
        let result = match (request.live, request.diff) {
            (true, true) => Err(snapshot::SnapshotError::Directory {
                path: dir.to_path_buf(),
                reason: "a live snapshot is a full one; ask for --live or --diff, not both".into(),
            }),
            (true, false) => snapshot::live::create(&self.machine, &self.history, dir),
            (false, _) => snapshot::create(&self.machine, &self.history, dir, request.diff),
        };
        // Whatever happened, the VM goes on as asked (on an error: as before, unharmed).
        let then = if result.is_ok() { request.then } else { AfterSnapshot::AsBefore };
        match then {
            AfterSnapshot::Stop => self
                .machine
                .control
                .end(VmExit::Stopped { reason: format!("stopped after a snapshot to {}", request.dir) }),
            AfterSnapshot::Resume => self.machine.resume().map_err(|e| e.to_string())?,
            AfterSnapshot::AsBefore if was_running => self.machine.resume().map_err(|e| e.to_string())?,
            AfterSnapshot::AsBefore => {}
        }
        let summary = result.map_err(|e| format!("snapshot failed, the VM is unharmed: {e}"))?;
        Ok(serde_json::to_value(summary).unwrap_or_default())
    }
}

impl PagingControl for VmTarget {
    fn stats(&self) -> serde_json::Value {
        serde_json::to_value(self.machine.paging.live_report()).unwrap_or_default()
    }

    fn check_coherence(&self) -> Result<serde_json::Value, String> {
        let report = self.machine.paging.check_coherence().map_err(|e| e.to_string())?;
        Ok(serde_json::to_value(report).unwrap_or_default())
    }
}
