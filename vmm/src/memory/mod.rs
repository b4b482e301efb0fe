//! Guest RAM: its physical layout (`layout`), its host backends (`backend`), the host
//! limits it must respect (`limits`), and [`GuestRam`], which ties them together as
//! vm-memory regions plus the per-region facts the smmu and KVM layers need.
//!
//! This is the only place that mmaps guest RAM.

pub mod accounting;
pub mod backend;
pub mod layout;
pub mod limits;
pub mod thp;

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::path::PathBuf;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::config::{Backend, ZoneConfig};
pub use backend::{BackendError, ZoneMapping};
pub use layout::{LayoutError, SlotPlan};
pub use limits::LimitError;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The zones cannot be laid out.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The host cannot provide the memory asked for.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// A backend could not be created or mapped.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// vm-memory refused the regions (a bug: the layout never overlaps).
    #[error("cannot describe guest RAM to vm-memory: {0}")]
    Regions(String),
}

/// One slot of guest RAM: a contiguous guest physical range backed by a contiguous part
/// of one zone's host mapping. One KVM memslot each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamRegion {
    /// Index of the zone in the configuration.
    pub zone: usize,
    /// The zone's backend.
    pub backend: Backend,
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub size_bytes: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
    /// Page size of the backing memory (4 KiB, or the huge page size for hugetlb).
    pub page_bytes: u64,
    /// The backing fd (memfd, file or hugetlb memfd); `None` for anon. Valid as long as
    /// the [`GuestRam`] lives.
    pub fd: Option<RawFd>,
    /// Offset of this region's first byte in `fd` (and in the zone).
    pub fd_offset: u64,
    /// The backing file (`file` backend).
    pub path: Option<PathBuf>,
}

impl RamRegion {
    /// The first guest physical address past the region.
    pub fn end_gpa(&self) -> u64 {
        self.gpa + self.size_bytes
    }
}

/// All of guest RAM. Drop unmaps it; nothing may use host addresses from
/// [`GuestRam::regions`] after that.
pub struct GuestRam {
    // Field order matters: the vm-memory view (which points into the mappings) drops
    // before the mappings themselves.
    memory: GuestMemoryMmap,
    regions: Vec<RamRegion>,
    mappings: Vec<ZoneMapping>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam").field("regions", &self.regions).finish()
    }
}

impl GuestRam {
    /// Checks the zones against the host's limits, maps each zone once, and lays them out
    /// in guest physical memory.
    pub fn new(zones: &[ZoneConfig]) -> Result<Self, Error> {
        check_host_limits(zones)?;
        Self::build(zones, backend::map_zone)
    }

    /// As [`GuestRam::new`], but each zone maps the fd in `fds` (same order), which
    /// another faultline made for the same zones and handed over (`fd-local:` migration):
    /// the memory is shared, nothing is copied, and the host's limits (the huge page pool
    /// above all, whose pages the zones already hold) are not checked again.
    pub fn adopting(zones: &[ZoneConfig], fds: Vec<std::os::fd::OwnedFd>) -> Result<Self, Error> {
        if fds.len() != zones.len() {
            return Err(Error::Regions(format!("{} fds handed over for {} zones", fds.len(), zones.len())));
        }
        let mut fds = fds.into_iter();
        Self::build(zones, |index, zone, _| backend::adopt_zone(index, zone, fds.next().expect("counted")))
    }

    fn build(
        zones: &[ZoneConfig],
        mut map: impl FnMut(usize, &ZoneConfig, &[ZoneMapping]) -> Result<ZoneMapping, backend::BackendError>,
    ) -> Result<Self, Error> {
        let extents: Vec<_> = zones
            .iter()
            .map(|z| layout::ZoneExtent { size_bytes: z.size_bytes, align_bytes: z.page_bytes() })
            .collect();
        let slots = layout::plan(&extents)?;
        let mut mappings = Vec::with_capacity(zones.len());
        for (index, zone) in zones.iter().enumerate() {
            let mapping = map(index, zone, &mappings)?;
            mappings.push(mapping);
        }

        let mut regions = Vec::with_capacity(slots.len());
        let mut mmap_regions = Vec::with_capacity(slots.len());
        for slot in &slots {
            let zone = &zones[slot.zone];
            let mapping = &mappings[slot.zone];
            // SAFETY: zone_offset + size_bytes lies inside the zone's mapping (the layout
            // splits a zone, never extends it).
            let host = unsafe { mapping.host_addr().add(slot.zone_offset as usize) };
            // SAFETY: [host, host + size) is inside a live mapping owned by `mappings`,
            // which outlives the vm-memory regions (field order of GuestRam); prot and
            // flags are those the mapping was made with.
            let mmap = unsafe {
                MmapRegion::build_raw(
                    host,
                    slot.size_bytes as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    mapping.mmap_flags,
                )
            }
            .map_err(|e| Error::Regions(e.to_string()))?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(slot.gpa))
                .ok_or_else(|| Error::Regions(format!("region at {:#x} overflows", slot.gpa)))?;
            mmap_regions.push(region);
            regions.push(RamRegion {
                zone: slot.zone,
                backend: zone.backend,
                gpa: slot.gpa,
                size_bytes: slot.size_bytes,
                host_addr: host as u64,
                page_bytes: zone.page_bytes(),
                fd: mapping.fd(),
                fd_offset: slot.zone_offset,
                path: zone.path.clone(),
            });
        }
        let memory = GuestMemoryMmap::from_regions(mmap_regions).map_err(|e| Error::Regions(e.to_string()))?;
        Ok(GuestRam { memory, regions, mappings })
    }

    /// The vm-memory view of guest RAM (for loaders and devices).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The slots of guest RAM in GPA order, with host address, fd and page size.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The host mapping of each zone, in configuration order.
    pub fn zone_mappings(&self) -> &[ZoneMapping] {
        &self.mappings
    }

    /// Names the file behind a vCPU or fault-engine failure that a file zone's file
    /// caused: a file truncated while the VM ran, or a full filesystem, make the kernel
    /// fail the access (SIGBUS: `KVM_RUN` EFAULT, or ENOMEM/ENOSPC from userfaultfd) with
    /// an error that names neither. Other exits are returned as they are.
    pub fn explain_failure(&self, exit: crate::exit::VmExit) -> crate::exit::VmExit {
        use crate::exit::VmExit;
        let reason = match &exit {
            VmExit::Fatal { reason, .. } | VmExit::FaultEngineFailed { reason } => reason.clone(),
            _ => return exit,
        };
        let Some(cause) = self
            .mappings
            .iter()
            .enumerate()
            .find_map(|(zone, m)| backend::file_fault_cause(zone, m, self.path_of(zone)))
        else {
            return exit;
        };
        let reason = format!("{cause} ({reason})");
        match exit {
            VmExit::Fatal { vcpu, .. } => VmExit::Fatal { vcpu, reason },
            _ => VmExit::FaultEngineFailed { reason },
        }
    }

    fn path_of(&self, zone: usize) -> Option<&std::path::Path> {
        self.regions.iter().find(|r| r.zone == zone).and_then(|r| r.path.as_deref())
    }

    /// Total guest RAM in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size_bytes).sum()
    }

    /// The RAM ranges `(gpa, size_bytes)` in GPA order, adjacent slots merged: what a
    /// boot memory map lists as usable RAM.
    pub fn ram_ranges(&self) -> Vec<(u64, u64)> {
        merge_ranges(self.regions.iter().map(|r| (r.gpa, r.size_bytes)))
    }
}

/// Merges GPA-ordered `(start, size)` ranges that touch.
pub fn merge_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, size) in ranges {
        match merged.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += size,
            _ => merged.push((start, size)),
        }
    }
    merged
}

/// Checks all zones together against the host before anything is mapped.
fn check_host_limits(zones: &[ZoneConfig]) -> Result<(), Error> {
    let total: u64 = zones.iter().map(|z| z.size_bytes).sum();
    limits::check_address_space(total, limits::rlimit_address_space())?;
    let lazy: u64 =
        zones.iter().filter(|z| matches!(z.backend, Backend::Anon | Backend::Memfd)).map(|z| z.size_bytes).sum();
    // Zones whose memory is allocated before the guest runs: prefault populates them,
    // uffd-minor fills their page cache first (hugetlb comes from its pool, checked below;
    // a file from its filesystem, checked when it is opened).
    let upfront: Vec<(usize, &ZoneConfig)> = zones
        .iter()
        .enumerate()
        .filter(|(_, z)| matches!(z.backend, Backend::Anon | Backend::Memfd))
        .filter(|(_, z)| {
            z.paging == crate::config::PagingMode::Prefault
                || (z.paging == crate::config::PagingMode::UffdMinor && z.backend == Backend::Memfd)
        })
        .collect();
    if lazy > 0 {
        let host = limits::HostMemInfo::read()?;
        limits::check_host_memory(lazy, host)?;
        let upfront_bytes: u64 = upfront.iter().map(|(_, z)| z.size_bytes).sum();
        let names = upfront.iter().map(|(i, _)| i.to_string()).collect::<Vec<_>>().join(", ");
        limits::check_available_memory(upfront_bytes, &names, host)?;
    }
    let mut huge_pages: BTreeMap<u64, u64> = BTreeMap::new();
    for zone in zones.iter().filter(|z| z.backend == Backend::Hugetlb) {
        *huge_pages.entry(zone.hugepage_bytes).or_default() += zone.size_bytes.div_ceil(zone.hugepage_bytes);
    }
    for (page_bytes, needed) in huge_pages {
        limits::check_hugepage_pool(page_bytes, needed, limits::HugepagePool::read(page_bytes)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn guest_ram_maps_zones_in_order_and_is_readable_through_vm_memory() {
        let zones = [ZoneConfig::new(2 << 20, Backend::Anon), ZoneConfig::new(1 << 20, Backend::Memfd)];
        let ram = GuestRam::new(&zones).unwrap();
        assert_eq!(ram.regions().len(), 2);
        assert_eq!(ram.regions()[1].gpa, 2 << 20);
        assert!(ram.regions()[1].fd.is_some() && ram.regions()[0].fd.is_none());
        assert_eq!(ram.ram_ranges(), vec![(0, 3 << 20)]);
        ram.memory().write_obj(0x1234_5678u32, GuestAddress((2 << 20) + 8)).unwrap();
        // SAFETY: host_addr + 8 is inside the 1 MiB memfd zone, just written through vm-memory.
        let seen = unsafe { (ram.regions()[1].host_addr as *const u32).add(2).read() };
        assert_eq!(seen, 0x1234_5678);
        assert_eq!(ram.memory().num_regions(), 2);
    }

    #[test]
    fn hugetlb_zone_larger_than_the_pool_says_how_to_grow_it() {
        let zones = [ZoneConfig::new(64 << 30, Backend::Hugetlb)];
        let err = GuestRam::new(&zones).unwrap_err().to_string();
        assert!(
            err.contains("need 32768 huge pages of 2048 KiB") && err.contains("> /proc/sys/vm/nr_hugepages"),
            "{err}"
        );
    }

    #[test]
    fn anon_memory_beyond_ram_and_swap_is_refused_with_the_limit() {
        let zones = [ZoneConfig::new(1 << 45, Backend::Anon)];
        let err = GuestRam::new(&zones).unwrap_err().to_string();
        assert!(err.contains("exceeds this host's memory plus swap"), "{err}");
    }

    #[test]
    fn touching_ranges_merge() {
        assert_eq!(merge_ranges([(0, 10), (10, 5), (20, 1)]), vec![(0, 15), (20, 1)]);
    }
}
