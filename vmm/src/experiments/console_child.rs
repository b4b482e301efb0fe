//! A child VMM (Faultline or QEMU) run by a benchmark, with its console on a pipe: the
//! bench waits for the guest's report lines on it, and the child is killed when dropped.

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

/// Starting a child or reading its console failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct ConsoleError {
    /// What was being done.
    pub what: String,
    /// Why it failed.
    pub reason: String,
}

/// A child with its stdout on a pipe, killed when dropped.
pub struct ConsoleChild {
    /// The process.
    pub child: Child,
    /// Its stdout (the guest's console).
    pub console: BufReader<ChildStdout>,
}

impl ConsoleChild {
    /// Starts `command` with stdout piped and stderr discarded (stdin as the command
    /// says).
    pub fn spawn(mut command: Command, what: &str) -> Result<ConsoleChild, ConsoleError> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| ConsoleError { what: format!("start {what}"), reason: e.to_string() })?;
        let console = BufReader::new(child.stdout.take().expect("piped"));
        Ok(ConsoleChild { child, console })
    }

    /// Reads the console until a line starts with `prefix` (the guest's report lines).
    pub fn wait_for(&mut self, prefix: &str, what: &str) -> Result<(), ConsoleError> {
        let mut line = String::new();
        loop {
            line.clear();
            match self.console.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    return Err(ConsoleError {
                        what: what.to_string(),
                        reason: format!("the console closed before '{prefix}'"),
                    })
                }
                Ok(_) if line.starts_with(prefix) => return Ok(()),
                Ok(_) => {}
            }
        }
    }
}

impl ConsoleChild {
    /// Reads the console for at most `limit` until a line starts with `prefix`; returns
    /// that line, or `None` if none came in time (or the console closed).
    pub fn line_within(&mut self, prefix: &str, limit: Duration) -> Option<String> {
        let until = Instant::now() + limit;
        let mut line = String::new();
        loop {
            // Lines already buffered need no wait; otherwise wait for the pipe to have data
            // (the guest prints whole lines quickly, so a read then does not block long).
            if self.console.buffer().is_empty() {
                let left = until.checked_duration_since(Instant::now())?;
                let wait = Timespec { tv_sec: left.as_secs() as i64, tv_nsec: i64::from(left.subsec_nanos()) };
                let mut fds = [PollFd::from_borrowed_fd(self.console.get_ref().as_fd(), PollFlags::IN)];
                match rustix::event::poll(&mut fds, Some(&wait)) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => return None,
                }
            }
            line.clear();
            match self.console.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) if line.starts_with(prefix) => return Some(line.trim_end().to_string()),
                Ok(_) => {}
            }
        }
    }
}

impl Drop for ConsoleChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
