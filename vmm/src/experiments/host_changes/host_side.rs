//! What a VM's run does on the host side beside the machine: the host-change session
//! (set up before guest RAM, restored after it), the host-change driver and the noise
//! thread while the VM runs, and the KVM trace. The glue `vmm` calls, in a few lines.

use std::sync::Arc;
use std::thread::{Scope, ScopedJoinHandle};

use super::noise::NoiseReport;
use super::session::{host_kinds, HostSession};
use super::HostChangesReport;
use crate::config::VmConfig;
use crate::host::HostError;
use crate::machine::Machine;
use crate::memory::GuestRam;
use crate::paging::GuestPaging;
use crate::smmu::page_source::PageSource;
use crate::smmu::Regions;
use crate::trace::{KvmTraceReport, Recorder};

/// The host side of one VM. Dropping it restores the host (after the machine is gone).
#[derive(Default)]
pub struct HostSide {
    // The recorder's trace instances go before the session's settings and lock.
    recorder: Option<Recorder>,
    session: Option<HostSession>,
}

impl HostSide {
    /// Sets the host up for `config`'s host changes and noise (before guest RAM exists),
    /// and prepares the KVM trace when asked for.
    pub fn start(config: &VmConfig) -> Result<Self, HostError> {
        let kinds = host_kinds(config);
        let session =
            if kinds.is_empty() { None } else { Some(HostSession::start(&kinds, config.total_memory_bytes())?) };
        Ok(HostSide { recorder: config.trace_kvm.then(Recorder::new), session })
    }

    /// The fault engine's page source: `inner`, logged for the trace when tracing.
    pub fn page_source(&self, inner: Arc<dyn PageSource>) -> Arc<dyn PageSource> {
        match &self.recorder {
            Some(r) => r.page_source(inner),
            None => inner,
        }
    }

    /// Starts the KVM trace over guest RAM (once paging runs: it logs its invalidations).
    pub fn start_trace(&mut self, ram: &GuestRam, paging: &GuestPaging) {
        if let Some(recorder) = self.recorder.as_mut() {
            let hva_ranges: Vec<_> = ram.regions().iter().map(|r| (r.host_addr, r.size_bytes)).collect();
            recorder.start(&hva_ranges, paging.invalidation());
        }
    }

    /// Starts the host-change driver and the noise thread for the running `machine`.
    #[allow(clippy::type_complexity)] // two optional handles, named at the call site
    pub fn spawn<'scope, 'env>(
        &'env self,
        scope: &'scope Scope<'scope, 'env>,
        machine: &'env Machine,
    ) -> (Option<ScopedJoinHandle<'scope, HostChangesReport>>, Option<ScopedJoinHandle<'scope, NoiseReport>>) {
        let config = &machine.config;
        let (ram, control) = (&*machine.ram, &*machine.control);
        let host = self.session.as_ref().filter(|_| config.host_changes.is_some()).map(|session| {
            let (collector, stop) = (&*machine.collector, &*machine.devices.step_stop);
            scope.spawn(move || super::drive(config, session, ram, control, collector, stop))
        });
        let noise = config.host_noise.map(|noise| scope.spawn(move || super::drive_noise(config, noise, ram, control)));
        (host, noise)
    }

    /// Stops the KVM trace and follows the host changes (and the VMM's own invalidations
    /// and fills) into it.
    pub fn finish_trace(&mut self, host: Option<&HostChangesReport>, regions: &Regions) -> Option<KvmTraceReport> {
        let records = host.map_or(&[][..], |h| &h.records[..]);
        self.recorder.take().map(|r| r.finish(records, regions))
    }
}
