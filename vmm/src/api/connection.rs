//! One client connection: a non-blocking stream with an input buffer cut into lines and an
//! output buffer of responses, bounded both ways so that no client can make the VMM's
//! event loop block or grow without limit.
//!
//! - Input: at most [`READ_BUDGET`] bytes are read per wake-up (the loop is level
//!   triggered, so the rest waits for the next turn and other subscribers get theirs); a
//!   line longer than [`MAX_LINE_BYTES`] is answered with `line_too_long` and skipped up
//!   to its newline; a half line left at end of input is dropped.
//! - Output: responses queue up to [`OUTPUT_CAP`] bytes; beyond that the connection stops
//!   reading (and so stops running commands) until the client reads its responses. A
//!   client that never reads stalls only itself.
//!
//! Hand-rolled rather than a framed codec because the VMM runs no async runtime: the
//! event-manager loop hands us readiness and we do the few lines of buffering ourselves.

use std::io::{ErrorKind as IoKind, Read};
use std::os::unix::net::UnixStream;

use rustix::net::SendFlags;
use vmm_sys_util::epoll::EventSet;

use super::protocol::{ErrorBody, ErrorKind, Response, MAX_LINE_BYTES};

/// Bytes read from one connection per wake-up at most.
pub(super) const READ_BUDGET: usize = 64 * 1024;

/// Response bytes queued for one connection before it stops taking requests.
pub(super) const OUTPUT_CAP: usize = 256 * 1024;

/// What a connection wants next from the event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    /// Wait for these events.
    Events(EventSet),
    /// The connection is finished (client gone, or all answered after it closed its side).
    Close,
}

/// A client connection and its buffers.
#[derive(Debug)]
pub(super) struct Connection {
    stream: UnixStream,
    /// Received bytes not yet cut into lines.
    input: Vec<u8>,
    /// Skipping the rest of an oversized line, up to its newline.
    discarding: bool,
    /// Responses not yet sent; `output[sent..]` is pending.
    output: Vec<u8>,
    sent: usize,
    /// The client closed its sending side (or the connection failed while reading).
    read_closed: bool,
    /// A write failed: the client is gone.
    broken: bool,
    /// The events the loop currently waits for on this connection.
    pub(super) registered: EventSet,
}

impl Connection {
    /// Wraps an accepted stream (made non-blocking here).
    pub(super) fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Connection {
            stream,
            input: Vec::new(),
            discarding: false,
            output: Vec::new(),
            sent: 0,
            read_closed: false,
            broken: false,
            registered: EventSet::IN,
        })
    }

    /// The stream (to register it with the event loop).
    pub(super) fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// True while the connection waits for its client to read responses before it takes
    /// more requests.
    pub(super) fn is_paused(&self) -> bool {
        self.pending_output() >= OUTPUT_CAP
    }

    fn pending_output(&self) -> usize {
        self.output.len() - self.sent
    }

    /// Handles readiness `events`: reads what is there, answers every complete line with
    /// `answer`, sends what it can. Returns what the connection wants next.
    pub(super) fn on_ready(&mut self, events: EventSet, answer: &mut dyn FnMut(&[u8]) -> Response) -> Want {
        let readable = EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR;
        if events.intersects(readable) && self.wants_input() {
            self.read_some();
        }
        self.answer_lines(answer);
        self.flush();
        // Sending made room: run the requests that waited for it.
        self.answer_lines(answer);
        self.flush();
        self.want()
    }

    fn wants_input(&self) -> bool {
        !self.read_closed && !self.broken && !self.is_paused()
    }

    fn want(&self) -> Want {
        if self.broken || (self.read_closed && self.pending_output() == 0) {
            return Want::Close;
        }
        let mut events = EventSet::empty();
        if self.wants_input() {
            events |= EventSet::IN;
        }
        if self.pending_output() > 0 {
            events |= EventSet::OUT;
        }
        Want::Events(events)
    }

    fn read_some(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        let mut budget = READ_BUDGET;
        while budget > 0 {
            let want = chunk.len().min(budget);
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    self.read_closed = true;
                    break;
                }
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    budget -= n;
                }
                Err(e) if e.kind() == IoKind::WouldBlock => break,
                Err(e) if e.kind() == IoKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("control client read failed: {e}");
                    self.read_closed = true;
                    self.broken = true;
                    break;
                }
            }
        }
    }

    /// Cuts complete lines off the input and queues their responses, while output has room.
    fn answer_lines(&mut self, answer: &mut dyn FnMut(&[u8]) -> Response) {
        let mut start = 0;
        while !self.is_paused() {
            let rest = &self.input[start..];
            let Some(newline) = rest.iter().position(|&b| b == b'\n') else { break };
            let line = &rest[..newline];
            start += newline + 1;
            if std::mem::take(&mut self.discarding) {
                continue; // The tail of an oversized line.
            }
            let response = if line.len() > MAX_LINE_BYTES {
                too_long()
            } else {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue; // Blank lines are allowed (hand-typed sessions) and ignored.
                }
                answer(line)
            };
            self.output.extend_from_slice(&response.to_line());
        }
        self.input.drain(..start);
        if self.input.contains(&b'\n') {
            return; // Complete lines wait for output room.
        }
        if self.discarding {
            self.input.clear(); // Still inside the oversized line.
        } else if self.input.len() > MAX_LINE_BYTES {
            // No newline within the limit: answer now, skip the rest when it comes.
            self.output.extend_from_slice(&too_long().to_line());
            self.input.clear();
            self.discarding = true;
        } else if self.read_closed && !self.input.is_empty() {
            tracing::debug!("control client left with {} bytes of an unfinished line", self.input.len());
            self.input.clear();
        }
    }

    fn flush(&mut self) {
        while self.pending_output() > 0 && !self.broken {
            match rustix::net::send(&self.stream, &self.output[self.sent..], SendFlags::NOSIGNAL | SendFlags::DONTWAIT)
            {
                Ok(n) => self.sent += n,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::debug!("control client write failed: {e}");
                    self.broken = true;
                }
            }
        }
        if self.pending_output() == 0 {
            self.output.clear();
            self.sent = 0;
        } else if self.sent >= OUTPUT_CAP {
            self.output.drain(..self.sent);
            self.sent = 0;
        }
    }
}

fn too_long() -> Response {
    Response::failure(
        None,
        ErrorBody::new(
            ErrorKind::LineTooLong,
            format!("the request line is longer than {MAX_LINE_BYTES} bytes; it was skipped up to its newline"),
        ),
    )
}
