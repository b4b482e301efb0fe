//! A minimal QMP client for the benchmarks that run QEMU beside Faultline: connect
//! (retrying while QEMU starts), negotiate capabilities, then one command at a time,
//! keeping the events that arrive meanwhile for the caller. Written here because no maintained Rust QMP crate with a
//! synchronous API is on crates.io, and the benches need a handful of commands.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP step that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct QmpError {
    /// What was being done (e.g. `QMP migrate`).
    pub what: String,
    /// Why it failed.
    pub reason: String,
}

fn step(what: impl Into<String>) -> impl FnOnce(String) -> QmpError {
    let what = what.into();
    move |reason| QmpError { what, reason }
}

/// A connection to QEMU's QMP socket.
pub struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to the socket at `path` (waiting up to 30 s for QEMU to create it) and
    /// negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if started.elapsed() > Duration::from_secs(30) => {
                    return Err(step("connect to QMP")(e.to_string()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        let reader = BufReader::new(stream.try_clone().map_err(|e| step("QMP")(e.to_string()))?);
        let mut qmp = Qmp { stream, reader, events: Vec::new() };
        qmp.read_reply()?; // the greeting
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    /// Runs `command` (with `arguments` unless null) and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let request = if arguments.is_null() {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        writeln!(self.stream, "{request}").map_err(|e| step(format!("QMP {command}"))(e.to_string()))?;
        let reply = self.read_reply()?;
        if let Some(error) = reply.get("error") {
            return Err(step(format!("QMP {command}"))(error.to_string()));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// The events QEMU sent since the last call (each with its `timestamp`), in order,
    /// including those read while waiting for replies.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// The next line that is not an event (events are kept for [`Qmp::take_events`]).
    fn read_reply(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let read = self.reader.read_line(&mut line).map_err(|e| step("QMP read")(e.to_string()))?;
            if read == 0 {
                return Err(step("QMP read")("QEMU closed the connection".into()));
            }
            let value: Value = serde_json::from_str(&line).map_err(|e| step("QMP read")(e.to_string()))?;
            if value.get("event").is_none() {
                return Ok(value);
            }
            self.events.push(value);
        }
    }
}
