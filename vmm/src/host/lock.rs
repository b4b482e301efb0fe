//! The lock file that serialises runs changing host-wide settings (KSM's scanner, swap):
//! a run holds it exclusively from before its first change until after its last restore.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::HostError;

/// Where the lock lives (on every Linux host, writable by root).
pub const HOST_LOCK_PATH: &str = "/run/lock/faultline-host-changes.lock";

/// The held lock; released (by closing the file) on drop.
#[derive(Debug)]
pub struct HostLock {
    _file: File,
    path: PathBuf,
}

impl HostLock {
    /// Takes the lock at [`HOST_LOCK_PATH`], waiting for other holders.
    pub fn acquire() -> Result<Self, HostError> {
        Self::acquire_at(Path::new(HOST_LOCK_PATH))
    }

    /// Takes the lock at `path`, waiting for other holders.
    pub fn acquire_at(path: &Path) -> Result<Self, HostError> {
        let err = |source| HostError::Lock { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(err)?;
        loop {
            // SAFETY: flock on a descriptor we own; the result is checked.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(err(e));
            }
        }
        Ok(HostLock { _file: file, path: path.to_path_buf() })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let first = HostLock::acquire_at(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let waiter = std::thread::spawn(move || {
            let _second = HostLock::acquire_at(&p).unwrap();
            tx.send(()).unwrap();
        });
        // The waiter cannot get it while we hold it.
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err());
        drop(first);
        rx.recv().unwrap();
        waiter.join().unwrap();
    }
}
