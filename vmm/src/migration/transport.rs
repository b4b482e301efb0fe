//! Where a migration goes: `unix:PATH`, `tcp:HOST:PORT` or `fd-local:PATH` (std
//! sockets), connected by the source and listened on by the destination. `fd-local:` is a
//! Unix socket too; over it the guest-RAM zones are handed over by `SCM_RIGHTS`
//! (`super::local`).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::MigrationError;

/// How long the source tries to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A migration address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp(String),
    /// A Unix socket path on this host, over which the zones' fds are handed over.
    FdLocal(PathBuf),
}

impl MigrationUri {
    /// Parses `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(text: &str) -> Result<Self, MigrationError> {
        let bad = |reason: &str| MigrationError::BadUri { uri: text.to_string(), reason: reason.to_string() };
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("unix: needs a socket path, e.g. unix:/tmp/migrate.sock"));
            }
            return Ok(MigrationUri::Unix(PathBuf::from(path)));
        }
        if let Some(address) = text.strip_prefix("tcp:") {
            let port = address.rsplit_once(':').map(|(_, port)| port);
            if port.is_none_or(|p| p.parse::<u16>().is_err()) {
                return Err(bad("tcp: needs HOST:PORT, e.g. tcp:127.0.0.1:4444"));
            }
            return Ok(MigrationUri::Tcp(address.to_string()));
        }
        if let Some(path) = text.strip_prefix("fd-local:") {
            if path.is_empty() {
                return Err(bad("fd-local: needs a socket path, e.g. fd-local:/tmp/migrate.sock"));
            }
            return Ok(MigrationUri::FdLocal(PathBuf::from(path)));
        }
        Err(bad("use unix:PATH, tcp:HOST:PORT or fd-local:PATH"))
    }

    /// Whether this is `fd-local:` (memory handed over, not copied).
    pub fn is_local(&self) -> bool {
        matches!(self, MigrationUri::FdLocal(_))
    }

    /// Connects to a listening destination.
    pub fn connect(&self) -> Result<Link, MigrationError> {
        let failed = |source| MigrationError::Connect { uri: self.to_string(), source };
        match self {
            MigrationUri::Unix(path) | MigrationUri::FdLocal(path) => {
                UnixStream::connect(path).map(Link::Unix).map_err(failed)
            }
            MigrationUri::Tcp(address) => {
                let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the host name resolves to nothing");
                for addr in address.to_socket_addrs().map_err(failed)? {
                    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                        Ok(stream) => {
                            let _ = stream.set_nodelay(true);
                            return Ok(Link::Tcp(stream));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(failed(last))
            }
        }
    }

    /// Listens for one source (a Unix socket path must not exist yet).
    pub fn listen(&self) -> Result<Listener, MigrationError> {
        let failed = |source| MigrationError::Listen { uri: self.to_string(), source };
        match self {
            MigrationUri::Unix(path) | MigrationUri::FdLocal(path) => {
                UnixListener::bind(path).map(|l| Listener::Unix(l, path.clone())).map_err(failed)
            }
            MigrationUri::Tcp(address) => TcpListener::bind(address).map(Listener::Tcp).map_err(failed),
        }
    }
}

impl std::fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationUri::Unix(path) => write!(f, "unix:{}", path.display()),
            MigrationUri::Tcp(address) => write!(f, "tcp:{address}"),
            MigrationUri::FdLocal(path) => write!(f, "fd-local:{}", path.display()),
        }
    }
}

/// A listening destination.
pub enum Listener {
    /// On a Unix socket (removed again on drop).
    Unix(UnixListener, PathBuf),
    /// On TCP.
    Tcp(TcpListener),
}

impl Listener {
    /// Waits for the source.
    pub fn accept(&self) -> Result<Link, MigrationError> {
        let failed = |source| MigrationError::Accept { source };
        match self {
            Listener::Unix(listener, _) => listener.accept().map(|(s, _)| Link::Unix(s)).map_err(failed),
            Listener::Tcp(listener) => listener
                .accept()
                .map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Link::Tcp(s)
                })
                .map_err(failed),
        }
    }
}

impl Listener {
    /// Waits at most `timeout` for another connection.
    pub fn accept_within(&self, timeout: Duration) -> Result<Link, MigrationError> {
        let failed = |source| MigrationError::Accept { source };
        let nonblocking = |on: bool| match self {
            Listener::Unix(l, _) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        };
        nonblocking(true).map_err(failed)?;
        let until = std::time::Instant::now() + timeout;
        let result = loop {
            match self.accept() {
                Ok(link) => break Ok(link),
                Err(MigrationError::Accept { source }) if source.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= until {
                        break Err(failed(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no second connection within {} s", timeout.as_secs()),
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => break Err(e),
            }
        };
        let _ = nonblocking(false);
        let link = result?;
        let blocking = match &link {
            Link::Unix(s) => s.set_nonblocking(false),
            Link::Tcp(s) => s.set_nonblocking(false),
        };
        blocking.map_err(failed)?;
        Ok(link)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A connected migration link.
pub enum Link {
    /// A Unix stream socket.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
}

impl Link {
    /// A second handle on the same connection (for a reader thread).
    pub fn try_clone(&self) -> std::io::Result<Link> {
        Ok(match self {
            Link::Unix(s) => Link::Unix(s.try_clone()?),
            Link::Tcp(s) => Link::Tcp(s.try_clone()?),
        })
    }

    /// Ends the connection both ways (unblocks any thread reading or writing it).
    pub fn shutdown(&self) {
        let _ = match self {
            Link::Unix(s) => s.shutdown(Shutdown::Both),
            Link::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Ends the sending side only (the peer reads end-of-stream after what was sent).
    pub fn shutdown_write(&self) {
        let _ = match self {
            Link::Unix(s) => s.shutdown(Shutdown::Write),
            Link::Tcp(s) => s.shutdown(Shutdown::Write),
        };
    }

    /// The Unix socket under the link (fd passing needs it), if it is one.
    pub fn unix(&self) -> Option<&UnixStream> {
        match self {
            Link::Unix(s) => Some(s),
            Link::Tcp(_) => None,
        }
    }

    /// Read and write timeouts (None: wait for ever).
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) {
        let _ = match self {
            Link::Unix(s) => s.set_read_timeout(read).and(s.set_write_timeout(write)),
            Link::Tcp(s) => s.set_read_timeout(read).and(s.set_write_timeout(write)),
        };
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Unix(s) => s.read(buf),
            Link::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Unix(s) => s.write(buf),
            Link::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_or_say_what_to_write() {
        assert_eq!(MigrationUri::parse("unix:/tmp/m.sock").unwrap(), MigrationUri::Unix("/tmp/m.sock".into()));
        assert_eq!(MigrationUri::parse("tcp:127.0.0.1:4444").unwrap(), MigrationUri::Tcp("127.0.0.1:4444".into()));
        assert_eq!(MigrationUri::parse("fd-local:/tmp/m.sock").unwrap(), MigrationUri::FdLocal("/tmp/m.sock".into()));
        assert_eq!(MigrationUri::parse("fd-local:/tmp/m.sock").unwrap().to_string(), "fd-local:/tmp/m.sock");
        for bad in ["unix:", "tcp:host", "tcp:host:99999", "ftp:x", "fd-local:", ""] {
            let err = MigrationUri::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
