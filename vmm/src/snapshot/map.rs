//! Restore modes that hand the image to the kernel instead of copying it page by page:
//!
//! - `map` (Firecracker's default): the base snapshot's image is mapped privately
//!   (`MAP_PRIVATE | MAP_FIXED`) over each anonymous zone, so the kernel reads a page from
//!   the file on its first touch and copies it on the first write. A diff chain maps its
//!   base and reads the diffs on top eagerly (each diff page is copied-on-write over the
//!   base): the kernel can map only one file per range, and diffs are small beside the
//!   base. Only anonymous zones: a memfd, file or hugetlb zone *is* its file, and a
//!   private mapping of a regular file cannot give hugetlb pages.
//! - `uffd-minor`: shared zones (memfd, hugetlb, files on tmpfs) get the chain written
//!   into their page cache through a second mapping of the zone's file before the vCPUs
//!   start; the guest's own mapping is registered for MINOR faults and each first touch
//!   is one UFFDIO_CONTINUE (no copy per fault, 2 MiB at a time on hugetlb).

use std::os::fd::BorrowedFd;
use std::path::PathBuf;

use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

use super::image::{self, ImageError, ZoneView};
use super::Chain;
use crate::config::{Backend, ZoneConfig};

/// Errors of the `map` and `uffd-minor` restores.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// `map` of a zone that is not anonymous memory.
    #[error("--memory-restore map: memory zone {zone} is backend={backend}; map works on anon zones only (a shared zone is its own file, hugetlb cannot map a regular file); use --memory-restore uffd-minor for memfd/hugetlb zones, or -m size=...,backend=anon")]
    MapBackend {
        /// Zone index.
        zone: usize,
        /// Its backend.
        backend: &'static str,
    },
    /// `uffd-minor` of a zone without a page cache.
    #[error("--memory-restore uffd-minor: memory zone {zone} is backend={backend}, which has no page cache to fill; use -m size=...,backend=memfd (or hugetlb), or --memory-restore uffd-missing")]
    MinorBackend {
        /// Zone index.
        zone: usize,
        /// Its backend.
        backend: &'static str,
    },
    /// Mapping a file failed.
    #[error("{path}: {what} failed: {source}")]
    Mmap {
        /// The file mapped.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading an image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// Refuses zones `map` cannot serve, by name.
pub fn check_map_zones(zones: &[ZoneConfig]) -> Result<(), MapError> {
    match zones.iter().position(|z| z.backend != Backend::Anon) {
        Some(zone) => Err(MapError::MapBackend { zone, backend: zones[zone].backend.name() }),
        None => Ok(()),
    }
}

/// Refuses zones `uffd-minor` cannot serve, by name.
pub fn check_minor_zones(zones: &[ZoneConfig]) -> Result<(), MapError> {
    match zones.iter().position(|z| z.backend == Backend::Anon) {
        Some(zone) => Err(MapError::MinorBackend { zone, backend: zones[zone].backend.name() }),
        None => Ok(()),
    }
}

/// Maps the chain's base images over the (fresh, untouched, anonymous) zones of
/// `views` and reads the diffs above it on top; returns the bytes read eagerly. The
/// chain's files were checked ([`Chain::check_files`]).
pub fn map_chain(chain: &Chain, views: &[ZoneView]) -> Result<u64, MapError> {
    let (base_dir, base) = &chain.links[0];
    for (image, view) in base.images.iter().zip(views) {
        let path = base_dir.join(&image.file);
        let file =
            std::fs::File::open(&path).map_err(|source| MapError::Mmap { path: path.clone(), what: "open", source })?;
        // SAFETY: `view` is a live anonymous zone mapping of exactly `size_bytes` owned by
        // guest RAM, which nothing has touched yet (no vCPU runs, nothing holds references
        // into it); MAP_FIXED replaces it in place with a private mapping of the image
        // (the same size: check_files checked it), which guest RAM unmaps on drop as before.
        unsafe {
            mmap(
                view.host_addr.cast(),
                view.size_bytes as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::FIXED,
                &file,
                0,
            )
        }
        .map_err(|e| MapError::Mmap {
            path,
            what: "mmap (MAP_PRIVATE | MAP_FIXED) over the zone",
            source: e.into(),
        })?;
    }
    let mut loaded = 0;
    for (dir, state) in &chain.links[1..] {
        for (image, view) in state.images.iter().zip(views) {
            loaded += image::load_image(dir, image, view)?;
        }
    }
    Ok(loaded)
}

/// Writes the chain into the page cache of the shared zones of `views` through a second
/// mapping of each zone's file (the guest's mapping, registered for MINOR faults, is not
/// touched); returns the bytes written.
pub fn fill_page_cache(chain: &Chain, views: &[ZoneView]) -> Result<u64, MapError> {
    let mut aliases = Vec::with_capacity(views.len());
    for view in views {
        let fd = view.fd.expect("uffd-minor zones are shared and have an fd");
        // SAFETY: the fd is the zone's, open for the life of guest RAM; only borrowed here.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        // SAFETY: a new shared mapping of the zone's own file; nothing else refers to it
        // and it is unmapped below.
        let alias = unsafe {
            mmap(
                std::ptr::null_mut(),
                view.size_bytes as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }
        .map_err(|e| MapError::Mmap {
            path: PathBuf::from(format!("memory zone {}", view.zone)),
            what: "mapping the page cache to fill it",
            source: e.into(),
        })?;
        aliases.push(ZoneView { host_addr: alias.cast(), ..*view });
    }
    let mut result = Ok(0);
    'links: for (dir, state) in &chain.links {
        for (image, view) in state.images.iter().zip(&aliases) {
            match image::load_image(dir, image, view) {
                Ok(bytes) => *result.as_mut().expect("still ok") += bytes,
                Err(e) => {
                    result = Err(e.into());
                    break 'links;
                }
            }
        }
    }
    for alias in &aliases {
        // SAFETY: each alias is the mapping made above, of this length, used by nothing else.
        let _ = unsafe { munmap(alias.host_addr.cast(), alias.size_bytes as usize) };
    }
    result
}
