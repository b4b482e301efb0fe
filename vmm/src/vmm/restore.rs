//! `Vmm::restore`: a VM built from a snapshot chain, its memory brought back by one of
//! the restore modes (eager, map, uffd-missing, uffd-minor, uffd-socket), with the
//! prefetch and working-set options of the lazy ones.

use std::path::Path;
use std::sync::Arc;

use super::{build_machine, RunOptions, Start, Vmm, VmmError, DEFAULT_PAGE_SERVER_TIMEOUT};
use crate::config::{PagingMode, ZoneConfig};
use crate::smmu::page_source::PageSource;
use crate::snapshot::lazy::ChainSource;
use crate::snapshot::page_server::Prefetch;
use crate::snapshot::uffd_socket::ExternalPager;
use crate::snapshot::working_set::{Recorder, WorkingSet};
use crate::snapshot::{self, Chain, MemoryRestore, RestoreOverrides, SnapshotError};

impl Vmm {
    /// Builds a VM from the snapshot in `dir` (and the diffs below it), reads its memory
    /// into fresh guest RAM and puts every part in its saved state; the vCPUs go on
    /// where they were when [`Vmm::run`] lets them.
    pub fn restore(dir: &Path, overrides: &RestoreOverrides, options: &RunOptions) -> Result<Self, VmmError> {
        let chain = Chain::read(dir)?;
        let mut config = chain.top().config.clone();
        if let Some(zones) = &overrides.zones {
            check_zone_overrides(&config.zones, zones)?;
            config.zones = zones.clone();
        }
        if let Some(console) = overrides.console {
            config.console = console;
        }
        let lazy_only = overrides.prefetch != Prefetch::None || overrides.record_working_set.is_some();
        if lazy_only && overrides.memory_restore != MemoryRestore::UffdMissing {
            return Err(VmmError::RestorePrefetch { mode: overrides.memory_restore.name() });
        }
        if overrides.prefetch == Prefetch::WorkingSet && overrides.record_working_set.is_some() {
            return Err(VmmError::RecordWhilePrefetching);
        }
        // Zones a mode cannot serve are refused by the mode's name, before the paging
        // checks would refuse them by the paging mode it implies.
        match &overrides.memory_restore {
            MemoryRestore::Map => snapshot::map::check_map_zones(&config.zones)?,
            MemoryRestore::UffdMinor => snapshot::map::check_minor_zones(&config.zones)?,
            MemoryRestore::UffdSocket(_) => snapshot::uffd_socket::check_zones(&config.zones)?,
            MemoryRestore::Eager | MemoryRestore::UffdMissing => {}
        }
        let paging = match &overrides.memory_restore {
            MemoryRestore::Eager => None,
            MemoryRestore::UffdMissing => Some(PagingMode::UffdMissing),
            MemoryRestore::UffdMinor => Some(PagingMode::UffdMinor),
            // The kernel pages a mapped image; an external handler owns the userfaultfd.
            MemoryRestore::Map | MemoryRestore::UffdSocket(_) => Some(PagingMode::Kernel),
        };
        if let Some(paging) = paging {
            for zone in &mut config.zones {
                zone.paging = paging;
            }
        }
        config.validate()?;
        chain.check_files()?;
        let mut pager = None;
        let mut prefetch = None;
        let mut working_set = None;
        let (machine, host, loaded) = match &overrides.memory_restore {
            MemoryRestore::Eager => {
                let (machine, host) = build_machine(&config, options, Start::Restore)?;
                let views = snapshot::zone_views(&machine.ram, &machine.config.zones);
                let loaded = chain.load_memory(&views)?;
                (machine, host, loaded)
            }
            MemoryRestore::UffdMissing => {
                let source = Arc::new(ChainSource::open(&chain)?);
                let page_source: Arc<dyn PageSource> = match overrides.record_working_set {
                    Some(window) => {
                        let recorder = Arc::new(Recorder::new(source.clone(), window));
                        working_set = Some((recorder.clone(), dir.to_path_buf()));
                        recorder
                    }
                    None => source.clone(),
                };
                let options = RunOptions { page_source: Some(page_source), ..options.clone() };
                let (machine, host) = build_machine(&config, &options, Start::Restore)?;
                source.set_layout(machine.ram.regions());
                prefetch = match overrides.prefetch {
                    Prefetch::None => None,
                    Prefetch::Background => {
                        Some(snapshot::prefetch::carried_host_ranges(&source, machine.ram.regions()))
                    }
                    Prefetch::WorkingSet => Some(WorkingSet::load(dir)?.host_ranges(machine.ram.regions())),
                };
                (machine, host, 0)
            }
            MemoryRestore::Map => {
                let (machine, host) = build_machine(&config, options, Start::Restore)?;
                let views = snapshot::zone_views(&machine.ram, &machine.config.zones);
                let loaded = snapshot::map::map_chain(&chain, &views)?;
                (machine, host, loaded)
            }
            MemoryRestore::UffdMinor => {
                let (machine, host) = build_machine(&config, options, Start::Restore)?;
                let views = snapshot::zone_views(&machine.ram, &machine.config.zones);
                for view in &views {
                    snapshot::image::clear_shared_zone(view).map_err(SnapshotError::from)?;
                }
                let loaded = snapshot::map::fill_page_cache(&chain, &views)?;
                (machine, host, loaded)
            }
            MemoryRestore::UffdSocket(path) => {
                let (machine, host) = build_machine(&config, options, Start::Restore)?;
                let sizes: Vec<u64> = config.zones.iter().map(|z| z.size_bytes).collect();
                let stall = overrides.page_server_timeout.unwrap_or(DEFAULT_PAGE_SERVER_TIMEOUT);
                pager = Some(ExternalPager::hand_off(path, machine.ram.regions(), &sizes, stall)?);
                (machine, host, 0)
            }
        };
        if matches!(
            overrides.memory_restore,
            MemoryRestore::UffdMissing | MemoryRestore::Map | MemoryRestore::UffdSocket(_)
        ) {
            // Pages of the chain not touched yet are not in the host: a later full
            // snapshot or migration must bring them in first.
            let source = ChainSource::open(&chain)?;
            machine.set_lazily_restored(snapshot::prefetch::carried_host_ranges(&source, machine.ram.regions()));
        }
        machine.restore_state(chain.into_machine_state()).map_err(SnapshotError::from)?;
        let mut vmm = Vmm::assemble(machine, options, Some(loaded), host);
        vmm.pager = pager;
        vmm.prefetch = prefetch;
        vmm.working_set = working_set;
        Ok(vmm)
    }
}

/// Zones given to a restore must match the snapshot's in count and size.
fn check_zone_overrides(saved: &[ZoneConfig], given: &[ZoneConfig]) -> Result<(), VmmError> {
    let sizes = |zones: &[ZoneConfig]| zones.iter().map(|z| z.size_bytes.to_string()).collect::<Vec<_>>().join(", ");
    if saved.len() != given.len() || saved.iter().zip(given).any(|(a, b)| a.size_bytes != b.size_bytes) {
        return Err(VmmError::RestoreZones { saved: sizes(saved), given: sizes(given) });
    }
    Ok(())
}
