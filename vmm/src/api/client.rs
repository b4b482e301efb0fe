//! A blocking client of the control socket, as `faultline ctl` and tests use it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::protocol::{BalloonInfo, BalloonStats, ErrorBody, HelloResult, Request, Response, VmStatus};

/// Errors talking to a control socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the path.
    #[error(
        "cannot connect to the control socket {}: {source}; is the VM running with this socket?",
        .path.display()
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("the control socket connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// No answer within the timeout given to [`ControlClient::connect`].
    #[error("the VM did not answer within {0:?}; it may be busy or stuck (try a longer --timeout)")]
    Timeout(Duration),
    /// The answer is longer than any answer of this protocol.
    #[error("the VM's answer is longer than {0} bytes without ending its line; this is not a Faultline control socket, or the VM misbehaves")]
    TooLong(usize),
    /// The server closed the connection before answering.
    #[error("the VM closed the control connection without answering (did it just end?)")]
    Closed,
    /// The server's answer is not a response of this protocol.
    #[error("the VM sent an answer this client does not understand ({0}); are client and VM the same version?")]
    Protocol(String),
    /// The server answered with an error.
    #[error("{0}")]
    Server(ErrorBody),
}

/// The longest answer line the client reads: far above any answer of the protocol (the
/// server queues at most 256 KiB per connection), so a peer that streams bytes without a
/// newline cannot grow the client without bound.
pub const MAX_ANSWER_BYTES: usize = 4 << 20;

/// A connection to a control socket.
#[derive(Debug)]
pub struct ControlClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
    timeout: Option<Duration>,
}

impl ControlClient {
    /// Connects to the socket at `path`. With a `timeout`, a call that gets no answer in
    /// that time fails instead of waiting for ever.
    pub fn connect(path: impl AsRef<Path>, timeout: Option<Duration>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream =
            UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.to_path_buf(), source })?;
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(ControlClient { writer: stream, reader, next_id: 1, timeout })
    }

    /// Sends `cmd` with `args` (JSON null for none) and returns the `result` of a success,
    /// [`ClientError::Server`] for a failure.
    pub fn call(&mut self, cmd: &str, args: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&Request { id, cmd: cmd.to_string(), args }).expect("requests serialize");
        line.push(b'\n');
        if let Err(write_error) = self.writer.write_all(&line) {
            // The server may have closed the connection after saying why (e.g. busy).
            return match self.read_response() {
                Ok(Response { id: None, error: Some(error), .. }) => Err(ClientError::Server(error)),
                _ => Err(ClientError::Io(write_error)),
            };
        }
        let response = self.read_response()?;
        if response.id != Some(id) {
            return match response.error {
                // An error the server could not tie to our request (e.g. busy): show it.
                Some(error) if response.id.is_none() => Err(ClientError::Server(error)),
                _ => Err(ClientError::Protocol(format!("answer to request {:?}, expected {id}", response.id))),
            };
        }
        match (response.ok, response.result, response.error) {
            (true, Some(result), _) => Ok(result),
            (false, _, Some(error)) => Err(ClientError::Server(error)),
            _ => Err(ClientError::Protocol("a response with neither result nor error".into())),
        }
    }

    /// Reads one response line, within the timeout for the whole line (not per read: a
    /// peer dripping bytes cannot hold the client past it) and at most
    /// [`MAX_ANSWER_BYTES`] long.
    pub fn read_response(&mut self) -> Result<Response, ClientError> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let timed_out = || ClientError::Timeout(self.timeout.unwrap_or_default());
        let mut line = Vec::new();
        loop {
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timed_out());
                }
                self.writer.set_read_timeout(Some(left))?;
            }
            let buf = match self.reader.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(timed_out());
                }
                Err(e) => return Err(e.into()),
            };
            if buf.is_empty() {
                return Err(if line.is_empty() {
                    ClientError::Closed
                } else {
                    ClientError::Protocol("the connection closed in the middle of an answer".into())
                });
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(end) => (end + 1, true),
                None => (buf.len(), false),
            };
            line.extend_from_slice(&buf[..take]);
            self.reader.consume(take);
            if line.len() > MAX_ANSWER_BYTES {
                return Err(ClientError::TooLong(MAX_ANSWER_BYTES));
            }
            if done {
                break;
            }
        }
        serde_json::from_slice(&line).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    fn typed<T: DeserializeOwned>(&mut self, cmd: &str, args: Value) -> Result<T, ClientError> {
        let value = self.call(cmd, args)?;
        serde_json::from_value(value).map_err(|e| ClientError::Protocol(format!("{cmd}: {e}")))
    }

    /// `hello`: the server's protocol version and commands.
    pub fn hello(&mut self) -> Result<HelloResult, ClientError> {
        self.typed("hello", Value::Null)
    }

    /// `status`: the VM's state.
    pub fn status(&mut self) -> Result<VmStatus, ClientError> {
        self.typed("status", Value::Null)
    }

    /// `balloon.get`: target, actual size and statistics.
    pub fn balloon_get(&mut self) -> Result<BalloonInfo, ClientError> {
        self.typed("balloon.get", Value::Null)
    }

    /// `balloon.set`: a new target, as a size the server parses (`"512M"`, `"0"`).
    pub fn balloon_set(&mut self, target: &str) -> Result<BalloonInfo, ClientError> {
        self.typed("balloon.set", json!({ "target": target }))
    }

    /// `balloon.stats`: the guest's latest memory statistics.
    pub fn balloon_stats(&mut self) -> Result<BalloonStats, ClientError> {
        self.typed("balloon.stats", Value::Null)
    }
}
