//! The control server: an event-manager subscriber owning the listening socket and every
//! client connection. It never blocks: accepts, reads and writes are non-blocking and
//! bounded per wake-up (see [`super::connection`]), so the VMM's loop keeps turning
//! whatever the clients do.
//!
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! # fn demo(target: Arc<dyn faultline::api::ControlTarget>) -> Result<(), faultline::api::ApiError> {
//! let server = faultline::api::ControlServer::bind("/run/fl.sock", target)?;
//! let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber>>> = EventManager::new().unwrap();
//! manager.add_subscriber(Arc::new(Mutex::new(server)));
//! loop {
//!     manager.run().unwrap(); // the server is served from here, with the VMM's other events
//! }
//! # }
//! ```

use std::collections::HashMap;
use std::io::ErrorKind as IoKind;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::connection::{Connection, Want};
use super::dispatch;
use super::protocol::{ErrorBody, ErrorKind, Response};
use super::socket_file::{self, ApiError, SocketFile};
use super::target::ControlTarget;

/// Clients served at once by default; more get a `busy` error and are closed.
pub const DEFAULT_MAX_CLIENTS: usize = 16;

/// Connections accepted per wake-up at most (the rest wait for the next turn of the loop).
const ACCEPT_BUDGET: usize = 16;

/// The control socket's server; add it to an `EventManager` to serve clients.
pub struct ControlServer {
    listener: UnixListener,
    /// Removes the socket file when the server is dropped.
    file: SocketFile,
    target: Arc<dyn ControlTarget>,
    connections: HashMap<RawFd, Connection>,
    max_clients: usize,
    /// The listener is watched (false after an accept failure, until a client leaves).
    accepting: bool,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer").field("path", &self.file.path()).field("clients", &self.clients()).finish()
    }
}

impl ControlServer {
    /// Binds the control socket at `path` (mode 0600), replacing a stale socket file and
    /// refusing a path where something listens or that is not a socket. Clients are
    /// served once the server is added to an `EventManager`; the socket file is removed
    /// when the server is dropped.
    pub fn bind(path: impl AsRef<Path>, target: Arc<dyn ControlTarget>) -> Result<Self, ApiError> {
        let (listener, file) = socket_file::bind(path.as_ref())?;
        Ok(ControlServer {
            listener,
            file,
            target,
            connections: HashMap::new(),
            max_clients: DEFAULT_MAX_CLIENTS,
            accepting: false,
        })
    }

    /// Serves at most `max` clients at once (at least 1).
    pub fn with_max_clients(mut self, max: usize) -> Self {
        self.max_clients = max.max(1);
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.connections.len()
    }

    /// Clients whose unread responses filled their queue: they get no more answers (and
    /// their requests wait) until they read.
    pub fn paused_clients(&self) -> usize {
        self.connections.values().filter(|c| c.is_paused()).count()
    }

    fn accept(&mut self, ops: &mut EventOps) {
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream, ops),
                Err(e) if e.kind() == IoKind::WouldBlock => return,
                Err(e) if e.kind() == IoKind::Interrupted => continue,
                Err(e) if e.kind() == IoKind::ConnectionAborted => continue,
                Err(e) => {
                    // E.g. EMFILE. The listener stays readable, so watching it would spin
                    // the loop: stop watching until a client leaves (and frees an fd).
                    tracing::warn!("control socket: cannot accept a client ({e}); waiting for one to leave");
                    if ops.remove(Events::new(&self.listener, EventSet::IN)).is_ok() {
                        self.accepting = false;
                    }
                    return;
                }
            }
        }
    }

    fn admit(&mut self, stream: UnixStream, ops: &mut EventOps) {
        if self.connections.len() >= self.max_clients {
            let busy = ErrorBody::new(
                ErrorKind::Busy,
                format!("the control socket serves {} clients at once; try again when one leaves", self.max_clients),
            );
            // Best effort on a fresh socket whose buffer is empty; the client is closed either way.
            let _ = rustix::net::send(
                &stream,
                &Response::failure(None, busy).to_line(),
                rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::DONTWAIT,
            );
            return;
        }
        let connection = match Connection::new(stream) {
            Ok(connection) => connection,
            Err(e) => return tracing::warn!("control socket: cannot set up a client: {e}"),
        };
        let fd = connection.stream().as_raw_fd();
        if let Err(e) = ops.add(Events::new(connection.stream(), connection.registered)) {
            return tracing::warn!("control socket: cannot watch a client: {e:?}");
        }
        self.connections.insert(fd, connection);
    }

    fn serve(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) {
        let Some(connection) = self.connections.get_mut(&fd) else {
            let _ = ops.remove(Events::empty_raw(fd));
            return;
        };
        let target = &*self.target;
        let want = connection.on_ready(events, &mut |line| dispatch::answer(target, line));
        match want {
            Want::Events(wanted) if wanted == connection.registered => {}
            Want::Events(wanted) => match ops.modify(Events::new(connection.stream(), wanted)) {
                Ok(()) => connection.registered = wanted,
                Err(e) => {
                    tracing::warn!("control socket: cannot update a client's events: {e:?}");
                    self.close(fd, ops);
                }
            },
            Want::Close => self.close(fd, ops),
        }
    }

    fn watch_listener(&mut self, ops: &mut EventOps) {
        match ops.add(Events::new(&self.listener, EventSet::IN)) {
            Ok(()) => self.accepting = true,
            Err(e) => tracing::warn!("control socket {}: cannot watch for clients: {e:?}", self.path().display()),
        }
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(connection) = self.connections.remove(&fd) {
            // Unregister before the fd closes (on drop), so a reused fd number is free.
            let _ = ops.remove(Events::empty(connection.stream()));
            drop(connection);
        }
        if !self.accepting {
            self.watch_listener(ops);
        }
    }
}

impl MutEventSubscriber for ControlServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.serve(events.fd(), events.event_set(), ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.watch_listener(ops);
    }
}
