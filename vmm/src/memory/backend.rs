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
use std::os::unix::fs::MetadataExt;
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
    /// The backing file holds data and the zone does not say to reuse it.
    #[error("memory zone {zone}: {path} already holds data ({file_bytes} bytes); Faultline does not overwrite a file that may be someone's data: add reuse=on to boot on its contents as guest RAM (its size must be the zone's), or give a new or empty file")]
    FileHoldsData {
        /// Index of the zone.
        zone: usize,
        /// The file.
        path: PathBuf,
        /// Its size.
        file_bytes: u64,
    },
    /// The backing file is larger than the zone, or not exactly its size with `reuse=on`.
    #[error("memory zone {zone}: {path} is {file_bytes} bytes but the zone is {zone_bytes} bytes; a backing file must have the zone's size: give size={file_bytes} or another file")]
    FileSizeMismatch {
        /// Index of the zone.
        zone: usize,
        /// The file.
        path: PathBuf,
        /// Its size.
        file_bytes: u64,
        /// The zone's size.
        zone_bytes: u64,
    },
    /// `reuse=on` on a file that does not exist or is empty.
    #[error("memory zone {zone}: reuse=on but {path} is empty or new, so there is nothing to reuse: drop reuse=on to create it")]
    NothingToReuse {
        /// Index of the zone.
        zone: usize,
        /// The file.
        path: PathBuf,
    },
    /// Two zones name the same file (also through `./`, a symlink or a hard link).
    #[error("memory zones {first} and {zone} are the same file ({path}, device {dev}, inode {ino}); two zones on one file would overwrite each other: give each zone its own file")]
    SameFile {
        /// The earlier zone.
        first: usize,
        /// This zone.
        zone: usize,
        /// This zone's path.
        path: PathBuf,
        /// The file's device.
        dev: u64,
        /// The file's inode.
        ino: u64,
    },
    /// Another process holds the file's lock: another VM is running on it.
    #[error("memory zone {zone}: {path} is in use by another process (it holds the file's lock, e.g. another faultline VM on the same file); stop it or give another file")]
    FileInUse {
        /// Index of the zone.
        zone: usize,
        /// The file.
        path: PathBuf,
    },
    /// The file's filesystem has too little free space for the zone.
    #[error("memory zone {zone}: {path} needs {needed_bytes} more bytes ({needed_mib} MiB) but its filesystem has {free_bytes} bytes ({free_mib} MiB) free; the guest would fault (SIGBUS) when it filled it: free space, make the zone smaller, or put the file on a larger filesystem")]
    NoSpace {
        /// Index of the zone.
        zone: usize,
        /// The file.
        path: PathBuf,
        /// Bytes the file still needs to hold the whole zone.
        needed_bytes: u64,
        /// The same in MiB.
        needed_mib: u64,
        /// Free bytes for unprivileged users of the filesystem.
        free_bytes: u64,
        /// The same in MiB.
        free_mib: u64,
    },
    /// fstat/fstatvfs/flock failed on the backing file.
    #[error("memory zone {zone}: cannot {what} {path}: {source}")]
    FileCheck {
        /// Index of the zone.
        zone: usize,
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
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
    /// Device and inode of a `file` zone's file (to refuse two zones on one file).
    file_identity: Option<(u64, u64)>,
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

    /// The backing fd, borrowed (to hand it to another process).
    pub fn borrowed_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.fd.as_ref().map(std::os::fd::AsFd::as_fd)
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

/// Creates the backing memory of zone `index` and maps it. `earlier` are the zones
/// already mapped (a file zone on the same file as one of them is refused).
pub fn map_zone(index: usize, zone: &ZoneConfig, earlier: &[ZoneMapping]) -> Result<ZoneMapping, BackendError> {
    let mut file_identity = None;
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
            let (fd, identity) = open_file(index, path, zone, earlier)?;
            file_identity = Some(identity);
            (Some(fd), libc::MAP_SHARED | libc::MAP_NORESERVE)
        }
    };
    map_with(index, zone, fd, flags, file_identity)
}

/// Maps zone `index` onto `fd`, the backing memory another faultline made for the same
/// zone and handed over (`fd-local:` migration): `MAP_SHARED` from offset 0, so both
/// processes see the same pages. The fd must be at least as long as the zone.
pub fn adopt_zone(index: usize, zone: &ZoneConfig, fd: OwnedFd) -> Result<ZoneMapping, BackendError> {
    let flags = match zone.backend {
        Backend::Anon => {
            return Err(BackendError::Mmap {
                zone: index,
                size_bytes: zone.size_bytes,
                backend: zone.backend.name().to_string(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "private anonymous memory cannot be handed over"),
            })
        }
        Backend::Hugetlb => libc::MAP_SHARED,
        Backend::Memfd | Backend::File => libc::MAP_SHARED | libc::MAP_NORESERVE,
    };
    let file_bytes = rustix::fs::fstat(&fd)
        .map_err(|e| BackendError::Resize {
            zone: index,
            what: "the handed-over fd (fstat)".into(),
            size_bytes: zone.size_bytes,
            source: io::Error::from(e),
        })?
        .st_size as u64;
    if file_bytes < zone.size_bytes {
        return Err(BackendError::Resize {
            zone: index,
            what: format!("the handed-over fd, which holds only {file_bytes} bytes"),
            size_bytes: zone.size_bytes,
            source: io::Error::new(io::ErrorKind::InvalidInput, "shorter than the zone"),
        });
    }
    map_with(index, zone, Some(fd), flags, None)
}

fn map_with(
    index: usize,
    zone: &ZoneConfig,
    fd: Option<OwnedFd>,
    flags: i32,
    file_identity: Option<(u64, u64)>,
) -> Result<ZoneMapping, BackendError> {
    let size = zone.size_bytes;
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
    Ok(ZoneMapping { host_addr: addr.cast(), size_bytes: size, fd, file_identity, mmap_flags: flags })
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

/// Opens (or creates) a backing file read-write and holds its lock for the zone's life.
///
/// The contract: a new, empty or sparse (no data) file is sized to the zone and used; a
/// file that holds data is refused unless the zone says `reuse=on`, and then it must have
/// exactly the zone's size; a file larger than the zone is always refused. Two zones on
/// one file (by device and inode, so `./`, symlinks and hard links too) are refused, and
/// an exclusive `flock` held as long as the fd is open refuses a second VM on the file.
fn open_file(
    zone: usize,
    path: &Path,
    config: &ZoneConfig,
    earlier: &[ZoneMapping],
) -> Result<(OwnedFd, (u64, u64)), BackendError> {
    let size_bytes = config.size_bytes;
    let file: File = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(
        |source| match source.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM) => {
                BackendError::FileReadOnly { zone, path: path.to_path_buf() }
            }
            _ => BackendError::FileOpen { zone, path: path.to_path_buf(), source },
        },
    )?;
    let check = |what: &'static str| {
        move |source: io::Error| BackendError::FileCheck { zone, what, path: path.to_path_buf(), source }
    };
    let meta = file.metadata().map_err(check("stat"))?;
    if !meta.is_file() {
        return Err(BackendError::NotAFile { zone, path: path.to_path_buf() });
    }
    let identity = (meta.dev(), meta.ino());
    if let Some(first) = earlier.iter().position(|m| m.file_identity == Some(identity)) {
        let (dev, ino) = identity;
        return Err(BackendError::SameFile { first, zone, path: path.to_path_buf(), dev, ino });
    }
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Err(BackendError::FileInUse { zone, path: path.to_path_buf() }),
        Err(e) => return Err(check("lock")(e.into())),
    }
    let file_bytes = meta.len();
    let holds_data = file_bytes > 0 && rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(0)).is_ok();
    let mismatch =
        || BackendError::FileSizeMismatch { zone, path: path.to_path_buf(), file_bytes, zone_bytes: size_bytes };
    if file_bytes > size_bytes {
        return Err(mismatch());
    }
    if config.reuse {
        if !holds_data {
            return Err(BackendError::NothingToReuse { zone, path: path.to_path_buf() });
        }
        if file_bytes != size_bytes {
            return Err(mismatch());
        }
    } else if holds_data {
        if file_bytes < size_bytes {
            return Err(BackendError::FileTooSmall {
                zone,
                path: path.to_path_buf(),
                file_bytes,
                needed_bytes: size_bytes,
            });
        }
        return Err(BackendError::FileHoldsData { zone, path: path.to_path_buf(), file_bytes });
    }
    check_free_space(zone, path, &file, size_bytes, meta.blocks().saturating_mul(512))?;
    if file_bytes != size_bytes {
        resize(zone, &file, size_bytes, path.display().to_string())?;
    }
    Ok((OwnedFd::from(file), identity))
}

/// Why a file zone's file can no longer back the zone, if it cannot: it was truncated
/// below the zone's size, or its filesystem is full. `None` for other zones.
pub fn file_fault_cause(zone: usize, mapping: &ZoneMapping, path: Option<&Path>) -> Option<String> {
    mapping.file_identity?;
    let fd = mapping.fd.as_ref()?;
    let path = path.map_or_else(String::new, |p| p.display().to_string());
    let stat = rustix::fs::fstat(fd).ok()?;
    let file_bytes = stat.st_size as u64;
    if file_bytes < mapping.size_bytes {
        return Some(format!(
            "memory zone {zone}: its file {path} was truncated to {file_bytes} bytes while the VM ran (the zone is {} bytes), so the guest's access past the end failed (SIGBUS); do not resize a file zone's file while its VM runs",
            mapping.size_bytes
        ));
    }
    let fs = rustix::fs::fstatvfs(fd).ok()?;
    let allocated = (stat.st_blocks as u64).saturating_mul(512);
    if fs.f_blocks > 0 && fs.f_bavail == 0 && allocated < mapping.size_bytes {
        return Some(format!(
            "memory zone {zone}: the filesystem of its file {path} is full, so a guest page could not be allocated (SIGBUS); free space there or put the file on a larger filesystem"
        ));
    }
    None
}

/// Refuses a zone its file's filesystem cannot hold: writing a page the filesystem has no
/// room for SIGBUSes the writer (a vCPU: `KVM_RUN` fails with EFAULT, naming nothing).
fn check_free_space(
    zone: usize,
    path: &Path,
    file: &File,
    size_bytes: u64,
    allocated_bytes: u64,
) -> Result<(), BackendError> {
    let fs = rustix::fs::fstatvfs(file).map_err(|e| BackendError::FileCheck {
        zone,
        what: "statvfs the filesystem of",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    let free_bytes = fs.f_bavail.saturating_mul(fs.f_frsize);
    let needed_bytes = size_bytes.saturating_sub(allocated_bytes);
    // f_blocks == 0: a filesystem that reports no size (e.g. hugetlbfs without size=).
    if fs.f_blocks > 0 && needed_bytes > free_bytes {
        return Err(BackendError::NoSpace {
            zone,
            path: path.to_path_buf(),
            needed_bytes,
            needed_mib: needed_bytes.div_ceil(1 << 20),
            free_bytes,
            free_mib: free_bytes >> 20,
        });
    }
    Ok(())
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
            let mapping = map_zone(0, &ZoneConfig::new(1 << 20, backend), &[]).unwrap();
            // SAFETY: the mapping is 1 MiB of fresh read-write memory.
            unsafe { mapping.host_addr().add(4096).write(7) };
            assert_eq!(mapping.fd().is_some(), backend == Backend::Memfd);
        }
    }

    #[test]
    fn new_file_is_created_at_the_zone_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let mapping = map_zone(0, &file_zone(&path, 2 << 20), &[]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 << 20);
        drop(mapping);
    }

    #[test]
    fn small_nonempty_file_is_refused_with_the_size_needed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        std::fs::write(&path, b"data").unwrap();
        let err = map_zone(1, &file_zone(&path, 1 << 20), &[]).unwrap_err().to_string();
        assert!(err.contains("is 4 bytes") && err.contains("1048576 bytes needed"), "{err}");
    }

    #[test]
    fn read_only_file_is_refused_naming_the_path() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // root ignores file permissions; /proc/version is read-only for everyone.
            let err = map_zone(0, &file_zone(Path::new("/proc/version"), 4096), &[]).unwrap_err().to_string();
            assert!(err.contains("/proc/version"), "{err}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        std::fs::set_permissions(&path, perms).unwrap();
        let err = map_zone(0, &file_zone(&path, 4096), &[]).unwrap_err().to_string();
        assert!(err.contains("read-only") && err.contains(&path.display().to_string()), "{err}");
    }
}
