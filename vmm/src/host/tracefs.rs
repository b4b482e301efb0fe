//! tracefs for the life of a guard: found where it is mounted, or mounted privately (and
//! unmounted on drop); trace instances of our own (`instances/NAME`, removed on drop), so
//! a run's events and settings never touch the top-level buffer or another run's.

use std::path::{Path, PathBuf};

use super::{sysfs, HostError};

/// Where tracefs is mounted when the system mounts it.
const USUAL_MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// A tracefs mount: an existing one, or one we made (unmounted on drop).
#[derive(Debug)]
pub struct Tracefs {
    root: PathBuf,
    // Our own mount point (a temporary directory), when we mounted it.
    mounted: Option<tempfile::TempDir>,
}

impl Tracefs {
    /// Finds tracefs mounted at its usual place, or mounts it on a private temporary
    /// directory. (Another process's private mount is never used: it may go away while
    /// we read it.)
    pub fn open() -> Result<Self, HostError> {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if let Some(root) = mounts.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            let usual = USUAL_MOUNTS.contains(&dir);
            (kind == "tracefs" && usual && Path::new(dir).join("instances").is_dir()).then(|| PathBuf::from(dir))
        }) {
            return Ok(Tracefs { root, mounted: None });
        }
        let dir = tempfile::Builder::new().prefix("faultline-tracefs-").tempdir().map_err(|e| {
            HostError::Unavailable { feature: "tracefs", reason: format!("no directory to mount it on: {e}") }
        })?;
        let target = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).expect("no NUL in a temp path");
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call; the result
        // is checked.
        let rc = unsafe { libc::mount(c"nodev".as_ptr(), target.as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(HostError::Unavailable {
                feature: "tracefs",
                reason: format!("mount -t tracefs failed: {e}{}", super::root_hint(&e)),
            });
        }
        Ok(Tracefs { root: dir.path().to_path_buf(), mounted: Some(dir) })
    }

    /// The mount's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the event `system/name` exists.
    pub fn has_event(&self, event: &str) -> bool {
        self.root.join("events").join(event).is_dir()
    }

    /// Creates the instance `instances/name` (removed when the [`Instance`] drops).
    pub fn instance(&self, name: &str) -> Result<Instance, HostError> {
        let dir = self.root.join("instances").join(name);
        sysfs::create_dir(&dir)?;
        Ok(Instance { dir })
    }
}

impl Drop for Tracefs {
    fn drop(&mut self) {
        if let Some(dir) = &self.mounted {
            let target = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).expect("no NUL");
            // SAFETY: umount2 on the mount point we created; the result is only logged.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                tracing::warn!(
                    "could not unmount tracefs at {}: {}",
                    dir.path().display(),
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// A trace instance of our own. Tracing is switched off and the directory removed on drop.
#[derive(Debug)]
pub struct Instance {
    dir: PathBuf,
}

impl Instance {
    /// The instance's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a setting file of the instance (e.g. `trace_clock`, `events/kvm/x/enable`).
    pub fn set(&self, file: &str, value: &str) -> Result<(), HostError> {
        sysfs::write(self.dir.join(file), value)
    }

    /// Reads a file of the instance.
    pub fn read(&self, file: &str) -> Result<String, HostError> {
        std::fs::read_to_string(self.dir.join(file)).map_err(|source| HostError::Read {
            path: self.dir.join(file),
            hint: super::root_hint(&source),
            source,
        })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = sysfs::write(self.dir.join("tracing_on"), "0");
        // Events must be off before the instance can be removed.
        let _ = sysfs::write(self.dir.join("events/enable"), "0");
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!("could not remove trace instance {}: {e}", self.dir.display());
        }
    }
}
