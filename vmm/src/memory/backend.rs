//! The backends of guest RAM: one host mapping per zone, made here and nowhere else.
//!
//! Every mapping is lazily populated: the kernel supplies pages on first touch (and the
//! smmu layer may take those faults over with userfaultfd). Private and shared backends
//! use MAP_NORESERVE so a sparse guest can be larger than free memory; hugetlb does not,
//! so a short pool fails here at map time instead of SIGBUS-ing a vCPU later.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::config::{Backend, ZoneConfig, HUGEPAGE_1G};

/// Errors creating a zone's backing memory.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// memfd_create failed.
    #[error("memory zone {zone}: cannot create a {what} memfd: {source}")]
    Memfd {
        /// Index of the zone.
        zone: usize,
        /// "shmem" or "hugetlb".
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The backing file could not be opened or created.
    #[error("memory zone {zone}: cannot open or create {path}: {source}")]
    FileOpen {
        /// Index of the zone.
        zone: usize,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The backing file is read-only for us.
    #[error("memory zone {zone}: {path} is read-only (guest RAM must be writable): choose another path or fix its permissions")]
    FileReadOnly {
        /// Index of the zone.
        zone: usize,
        /// The file.
        path: PathBuf,
    },
    /// The backing file holds data and is smaller than the zone.
    #[error("memory zone {zone}: {path} is {file_bytes} bytes, smaller than the zone ({needed_bytes} bytes needed); it is not empty, so Faultline will not grow it: use an empty or new file, or a file of at least {needed_bytes} bytes")]
    FileTooSmall {
        /// Index of the zone.
        zone: usize,
        /// The file.
        path: PathBuf,
        /// Its size.
        file_bytes: u64,
        /// The zone's size.
        needed_bytes: u64,
    },
    /// The path is not a regular file.
    #[error("memory zone {zone}: {path} is not a regular file; give a path to a regular file (created if missing)")]
    NotAFile {
        /// Index of the zone.
        zone: usize,
        /// The path.
        path: PathBuf,
    },
    /// ftruncate failed.
    #[error("memory zone {zone}: cannot size {what} to {size_bytes} bytes: {source}")]
    Resize {
        /// Index of the zone.
        zone: usize,
        /// What was being sized.
        what: String,
        /// The size asked for.
        size_bytes: u64,
        /// The OS error.
        source: io::Error,
    },
    /// mmap ran out of memory (or of huge pages).
    #[error("memory zone {zone}: cannot map {size_bytes} bytes of {backend} memory: out of memory{hint}")]
    OutOfMemory {
        /// Index of the zone.
        zone: usize,
        /// The zone's size.
        size_bytes: u64,
        /// The backend's name (and path, for files).
        backend: String,
        /// What to do.
        hint: &'static str,
    },
    /// mmap failed for another reason.
    #[error("memory zone {zone}: cannot map {size_bytes} bytes of {backend} memory: {source}")]
    Mmap {
        /// Index of the zone.
        zone: usize,
        /// The zone's size.
        size_bytes: u64,
        /// The backend's name (and path, for files).
        backend: String,
        /// The OS error.
        source: io::Error,
    },
}

/// One zone's host mapping. Unmapped (and its fd closed) on drop.
#[derive(Debug)]
pub struct ZoneMapping {
    host_addr: *mut u8,
    size_bytes: u64,
    fd: Option<OwnedFd>,
    /// The mmap flags used (the vm-memory regions are built with the same).
    pub mmap_flags: i32,
}

// SAFETY: the mapping is plain memory owned by this struct; sharing its address between
// threads is what guest RAM is for (KVM and the vCPU threads access it concurrently).
unsafe impl Send for ZoneMapping {}
// SAFETY: as above; the struct itself is never mutated after creation.
unsafe impl Sync for ZoneMapping {}

impl ZoneMapping {
    /// Host virtual address of the zone's first byte.
    pub fn host_addr(&self) -> *mut u8 {
        self.host_addr
    }

    /// Size of the mapping in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The backing fd (memfd, file or hugetlb memfd), if any.
    pub fn fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(AsRawFd::as_raw_fd)
    }
}

impl Drop for ZoneMapping {
    fn drop(&mut self) {
        // SAFETY: host_addr/size_bytes describe a mapping this struct created and owns;
        // every user of it (vm-memory regions, KVM memslots, vCPU threads) is gone by now
        // because GuestRam drops its regions before its mappings.
        unsafe { libc::munmap(self.host_addr.cast(), self.size_bytes as usize) };
    }
}

/// Creates the backing memory of zone `index` and maps it.
pub fn map_zone(index: usize, zone: &ZoneConfig) -> Result<ZoneMapping, BackendError> {
    let size = zone.size_bytes;
    let (fd, flags) = match zone.backend {
        Backend::Anon => (None, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
        Backend::Memfd => {
            let fd = memfd(index, "shmem", 0)?;
            resize(index, &fd, size, "the memfd".into())?;
            (Some(fd), libc::MAP_SHARED | libc::MAP_NORESERVE)
        }
        Backend::Hugetlb => {
            let huge = if zone.hugepage_bytes == HUGEPAGE_1G { libc::MFD_HUGE_1GB } else { libc::MFD_HUGE_2MB };
            let fd = memfd(index, "hugetlb", libc::MFD_HUGETLB | huge)?;
            resize(index, &fd, size, "the hugetlb memfd".into())?;
            (Some(fd), libc::MAP_SHARED)
        }
        Backend::File => {
            let path = zone.path.as_deref().unwrap_or(Path::new(""));
            (Some(open_file(index, path, size)?), libc::MAP_SHARED | libc::MAP_NORESERVE)
        }
    };
    let raw_fd = fd.as_ref().map_or(-1, AsRawFd::as_raw_fd);
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let addr = if zone.thp && zone.backend == Backend::Anon {
        super::thp::map_hugepage_anon(size as usize, prot, flags)
    } else {
        // SAFETY: a fresh mapping at an address the kernel chooses; nothing else is touched.
        unsafe { libc::mmap(std::ptr::null_mut(), size as usize, prot, flags, raw_fd, 0) }
    };
    if addr == libc::MAP_FAILED {
        let source = io::Error::last_os_error();
        let backend = match &zone.path {
            Some(path) if zone.backend == Backend::File => format!("file {}", path.display()),
            _ => zone.backend.name().to_string(),
        };
        return Err(match source.raw_os_error() {
            Some(libc::ENOMEM) => BackendError::OutOfMemory {
                zone: index,
                size_bytes: size,
                backend,
                hint: if zone.backend == Backend::Hugetlb {
                    ": the huge page pool is too small (raise /proc/sys/vm/nr_hugepages)"
                } else {
                    ": give less memory, or raise vm.max_map_count / vm.overcommit_memory"
                },
            },
            _ => BackendError::Mmap { zone: index, size_bytes: size, backend, source },
        });
    }
    Ok(ZoneMapping { host_addr: addr.cast(), size_bytes: size, fd, mmap_flags: flags })
}

fn memfd(zone: usize, what: &'static str, flags: libc::c_uint) -> Result<OwnedFd, BackendError> {
    let name = CString::new(format!("faultline-zone{zone}")).unwrap_or_default();
    // SAFETY: name is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(BackendError::Memfd { zone, what, source: io::Error::last_os_error() });
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn resize(zone: usize, fd: &impl AsRawFd, size_bytes: u64, what: String) -> Result<(), BackendError> {
    // SAFETY: ftruncate on a descriptor we own; the result is checked.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size_bytes as libc::off_t) } != 0 {
        return Err(BackendError::Resize { zone, what, size_bytes, source: io::Error::last_os_error() });
    }
    Ok(())
}

/// Opens (or creates) a backing file read-write; grows it only if it is empty.
fn open_file(zone: usize, path: &Path, size_bytes: u64) -> Result<OwnedFd, BackendError> {
    let file: File = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(
        |source| match source.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM) => {
                BackendError::FileReadOnly { zone, path: path.to_path_buf() }
            }
            _ => BackendError::FileOpen { zone, path: path.to_path_buf(), source },
        },
    )?;
    let meta = file.metadata().map_err(|source| BackendError::FileOpen { zone, path: path.to_path_buf(), source })?;
    if !meta.is_file() {
        return Err(BackendError::NotAFile { zone, path: path.to_path_buf() });
    }
    let file_bytes = meta.len();
    if file_bytes < size_bytes {
        if file_bytes != 0 {
            return Err(BackendError::FileTooSmall {
                zone,
                path: path.to_path_buf(),
                file_bytes,
                needed_bytes: size_bytes,
            });
        }
        resize(zone, &file, size_bytes, path.display().to_string())?;
    }
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_zone(path: &Path, size_bytes: u64) -> ZoneConfig {
        ZoneConfig { path: Some(path.to_path_buf()), ..ZoneConfig::new(size_bytes, Backend::File) }
    }

    #[test]
    fn anon_and_memfd_zones_are_writable_and_shared_ones_have_an_fd() {
        for backend in [Backend::Anon, Backend::Memfd] {
            let mapping = map_zone(0, &ZoneConfig::new(1 << 20, backend)).unwrap();
            // SAFETY: the mapping is 1 MiB of fresh read-write memory.
            unsafe { mapping.host_addr().add(4096).write(7) };
            assert_eq!(mapping.fd().is_some(), backend == Backend::Memfd);
        }
    }

    #[test]
    fn new_file_is_created_at_the_zone_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let mapping = map_zone(0, &file_zone(&path, 2 << 20)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 << 20);
        drop(mapping);
    }

    #[test]
    fn small_nonempty_file_is_refused_with_the_size_needed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        std::fs::write(&path, b"data").unwrap();
        let err = map_zone(1, &file_zone(&path, 1 << 20)).unwrap_err().to_string();
        assert!(err.contains("is 4 bytes") && err.contains("1048576 bytes needed"), "{err}");
    }

    #[test]
    fn read_only_file_is_refused_naming_the_path() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // root ignores file permissions; /proc/version is read-only for everyone.
            let err = map_zone(0, &file_zone(Path::new("/proc/version"), 4096)).unwrap_err().to_string();
            assert!(err.contains("/proc/version"), "{err}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        std::fs::set_permissions(&path, perms).unwrap();
        let err = map_zone(0, &file_zone(&path, 4096)).unwrap_err().to_string();
        assert!(err.contains("read-only") && err.contains(&path.display().to_string()), "{err}");
    }
}
