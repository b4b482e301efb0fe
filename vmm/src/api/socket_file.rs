//! The control socket's file: bound with mode 0600, a stale one (left by a VMM that died)
//! replaced, a live one (another VMM listening) refused, and removed when the server goes.
//!
//! Check-and-bind is made atomic by a lock file beside the socket (`<path>.lock`, an
//! exclusive `flock` held for the server's life): without it a second VMM could find the
//! first one's socket between its `bind` and `listen` (connect is refused: "stale"),
//! remove it and bind its own.

use std::io::ErrorKind as IoKind;
use std::os::fd::OwnedFd;
use std::os::linux::fs::MetadataExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::fs::Mode;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// Longest socket path the kernel takes (`sun_path` is 108 bytes, NUL included).
const MAX_PATH_BYTES: usize = 107;

/// Connections the kernel queues before the server accepts them.
const LISTEN_BACKLOG: i32 = 64;

/// Why the control socket cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Something is listening at the path already.
    #[error(
        "{}: another process (a running faultline?) is listening on this control socket; \
         stop it or choose another socket path",
        .0.display()
    )]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{}: exists and is not a socket; remove it or choose another socket path", .0.display())]
    NotASocket(PathBuf),
    /// The path is too long for a Unix socket.
    #[error(
        "{}: a Unix socket path can have at most {MAX_PATH_BYTES} bytes; choose a shorter one",
        .0.display()
    )]
    PathTooLong(PathBuf),
    /// An existing socket file could not be checked or removed.
    #[error("{}: cannot replace the stale socket file ({source}); remove it by hand", .path.display())]
    Stale {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Creating, binding or listening on the socket failed.
    #[error("{}: cannot {what} the control socket: {source}", .path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The bound socket's file; removed on drop if it is still ours.
#[derive(Debug)]
pub(super) struct SocketFile {
    path: PathBuf,
    /// (device, inode) of the file we bound, so we never remove a successor's socket.
    identity: (u64, u64),
    /// The lock that makes this process the socket path's owner (dropped after the
    /// socket file is removed: fields drop after `Drop::drop`).
    _lock: PathLock,
}

/// An exclusive `flock` on `<socket>.lock`, removed (while still held) on drop.
#[derive(Debug)]
struct PathLock {
    path: PathBuf,
    /// Holds the `flock` while open.
    _file: std::fs::File,
}

impl PathLock {
    /// Takes the lock or says who has it. After locking, the file must still be the one
    /// at the path (a previous owner may have removed it between our open and our lock;
    /// then we would hold a lock nobody else can see): if not, open again.
    fn take(socket: &Path) -> Result<Self, ApiError> {
        let mut name = socket.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let fail = |what, source: std::io::Error| ApiError::Socket { path: path.clone(), what, source };
        loop {
            let file = std::os::unix::fs::OpenOptionsExt::mode(
                std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false),
                0o600,
            )
            .open(&path)
            .map_err(|e| fail("create the lock file of", e))?;
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => return Err(ApiError::InUse(socket.to_path_buf())),
                Err(e) => return Err(fail("lock", e.into())),
            }
            let held = file.metadata().map_err(|e| fail("inspect the lock file of", e))?;
            match std::fs::symlink_metadata(&path) {
                Ok(now) if (now.st_dev(), now.st_ino()) == (held.st_dev(), held.st_ino()) => {
                    return Ok(PathLock { path, _file: file })
                }
                Ok(_) => continue,
                Err(e) if e.kind() == IoKind::NotFound => continue,
                Err(e) => return Err(fail("inspect the lock file of", e)),
            }
        }
    }
}

impl Drop for PathLock {
    fn drop(&mut self) {
        // Removed while held (a waiter that opened it before sees it gone and opens anew),
        // and only if it is still ours.
        let ours = match (self._file.metadata(), std::fs::symlink_metadata(&self.path)) {
            (Ok(held), Ok(now)) => (held.st_dev(), held.st_ino()) == (now.st_dev(), now.st_ino()),
            _ => false,
        };
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl SocketFile {
    /// The socket's path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.st_dev(), m.st_ino()) == self.identity);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!("cannot remove the control socket {}: {e}", self.path.display());
            }
        }
    }
}

/// Binds a non-blocking listening socket at `path`, mode 0600 (owner only).
pub(super) fn bind(path: &Path) -> Result<(UnixListener, SocketFile), ApiError> {
    if path.as_os_str().len() > MAX_PATH_BYTES {
        return Err(ApiError::PathTooLong(path.to_path_buf()));
    }
    // Held from before the check until the socket file is removed: no other faultline can
    // check, clear or bind this path meanwhile.
    let lock = PathLock::take(path)?;
    clear_stale(path)?;
    let io_err =
        |what, source: rustix::io::Errno| ApiError::Socket { path: path.to_path_buf(), what, source: source.into() };
    let fd: OwnedFd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| io_err("create", e))?;
    // Linux creates the socket's file with the socket inode's mode (less the umask): set
    // it before bind so the file never exists with a wider mode, not even for a moment.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600)).map_err(|e| io_err("set the mode of", e))?;
    let address = SocketAddrUnix::new(path).map_err(|e| io_err("name", e))?;
    match rustix::net::bind(&fd, &address) {
        Ok(()) => {}
        // Someone bound the path between our check and our bind.
        Err(rustix::io::Errno::ADDRINUSE) => return Err(ApiError::InUse(path.to_path_buf())),
        Err(e) => return Err(io_err("bind", e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(|source| ApiError::Socket {
        path: path.to_path_buf(),
        what: "inspect",
        source,
    })?;
    let file = SocketFile { path: path.to_path_buf(), identity: (meta.st_dev(), meta.st_ino()), _lock: lock };
    rustix::net::listen(&fd, LISTEN_BACKLOG).map_err(|e| io_err("listen on", e))?;
    Ok((UnixListener::from(fd), file))
}

/// Removes a stale socket file at `path`; refuses a live socket or a file of another kind.
fn clear_stale(path: &Path) -> Result<(), ApiError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == IoKind::NotFound => return Ok(()),
        Err(source) => return Err(ApiError::Stale { path: path.to_path_buf(), source }),
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == IoKind::ConnectionRefused => {
            tracing::info!("replacing the stale control socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| ApiError::Stale { path: path.to_path_buf(), source })
        }
        Err(source) => Err(ApiError::Stale { path: path.to_path_buf(), source }),
    }
}
