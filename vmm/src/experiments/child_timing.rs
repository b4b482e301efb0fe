//! Times a child process from spawn to a line on its stdout and to its exit, with the
//! kernel's own accounting of its CPU time and peak RSS (wait4's rusage).

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Errors timing a child.
#[derive(Debug, thiserror::Error)]
pub enum ChildTimingError {
    /// The command could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// wait4 failed.
    #[error("waiting for {program} failed: {source}")]
    Wait {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
}

/// One timed run of a child process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChildTiming {
    /// CLOCK_MONOTONIC just before the spawn, in nanoseconds (to place the child's own
    /// timestamps on the parent's time line).
    pub spawned_monotonic_ns: u64,
    /// Spawn → the marker line on stdout (None if it never came).
    pub marker_ns: Option<u64>,
    /// Spawn → exit.
    pub exit_ns: u64,
    /// User + system CPU time of the child.
    pub cpu_ns: u64,
    /// Peak RSS of the child, bytes.
    pub max_rss_bytes: u64,
    /// Exit code (or 128 + signal).
    pub exit_code: i32,
    /// Everything the child wrote on stdout.
    #[serde(skip)]
    pub stdout: String,
}

/// Runs `command`, noting when a stdout line containing `marker` appears; kills the
/// child if it runs past `timeout`.
pub fn time_child(mut command: Command, marker: &str, timeout: Duration) -> Result<ChildTiming, ChildTimingError> {
    let program = format!("{:?}", command.get_program());
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let spawned_monotonic_ns = crate::boot::timeline::monotonic_ns();
    let start = Instant::now();
    let mut child = command.spawn().map_err(|source| ChildTimingError::Spawn { program: program.clone(), source })?;
    let pid = child.id() as libc::pid_t;
    let stdout = child.stdout.take().expect("stdout was piped");
    let killer = std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            // SAFETY: kill with signal 0 only checks that the pid exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
        }
        // SAFETY: plain kill(2) of our own child; at worst the pid is already reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let mut marker_ns = None;
    let mut output = String::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if marker_ns.is_none() && line.contains(marker) {
            marker_ns = Some(start.elapsed().as_nanos() as u64);
        }
        output.push_str(&line);
        output.push('\n');
    }
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data, zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child's pid with valid out-pointers; std's Child is not
    // waited afterwards (we forget it below), so the pid is reaped exactly once.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let exit_ns = start.elapsed().as_nanos() as u64;
    std::mem::forget(child);
    let _ = killer.join();
    if rc < 0 {
        return Err(ChildTimingError::Wait { program, source: std::io::Error::last_os_error() });
    }
    let status = std::process::ExitStatus::from_raw(status);
    let tv_ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
    Ok(ChildTiming {
        spawned_monotonic_ns,
        marker_ns,
        exit_ns,
        cpu_ns: tv_ns(usage.ru_utime) + tv_ns(usage.ru_stime),
        max_rss_bytes: usage.ru_maxrss as u64 * 1024,
        exit_code: status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        stdout: output,
    })
}

/// Minimum, median and maximum of a sample.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Spread {
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (None when empty).
    pub fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        Some(Spread { min: sorted[0], median, max: sorted[n - 1] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_even_and_odd_samples() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn child_timing_sees_marker_and_exit_code() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo hello; echo READY; exit 3"]);
        let timing = time_child(command, "READY", Duration::from_secs(10)).unwrap();
        assert!(timing.marker_ns.is_some());
        assert!(timing.marker_ns.unwrap() <= timing.exit_ns);
        assert_eq!(timing.exit_code, 3);
        assert_eq!(timing.stdout, "hello\nREADY\n");
        assert!(timing.max_rss_bytes > 0);
    }
}
