//! A `faultline run` (or `restore`) in the background, steered through its control
//! socket, and what snapshot tests compare: a snapshot chain's memory loaded into a
//! scratch mapping.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use faultline::snapshot::image::ZoneView;
use faultline::snapshot::Chain;
use serde_json::Value;

use super::{faultline, outcome, RunOutcome};

/// A VM process in the background with a control socket.
pub struct Running {
    child: Child,
    /// Its control socket.
    pub socket: PathBuf,
}

impl Running {
    /// Starts `faultline run --json --api-socket DIR/api.sock ARGS` and waits until the
    /// guest is ready.
    pub fn start(dir: &Path, args: &[&str]) -> Running {
        let mut running = Running::spawn(dir, "api.sock", &["run"], args);
        running.wait_until(|vm| vm.ctl_json(&["status"]).is_ok_and(|s| s["guest_ready"] == true));
        running
    }

    /// Starts `faultline restore --json --api-socket DIR/NAME --from FROM ARGS` and waits
    /// until its control socket answers.
    pub fn restore(dir: &Path, name: &str, from: &Path, args: &[&str]) -> Running {
        let from = from.to_str().expect("a UTF-8 path");
        let mut all = vec!["--from", from];
        all.extend_from_slice(args);
        let mut running = Running::spawn(dir, name, &["restore"], &all);
        running.wait_until(|vm| vm.ctl_json(&["status"]).is_ok());
        running
    }

    fn spawn(dir: &Path, name: &str, command: &[&str], args: &[&str]) -> Running {
        let socket = dir.join(name);
        let child = faultline()
            .args(command)
            .args(["--json", "--timeout", "120", "--api-socket"])
            .arg(&socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline");
        Running { child, socket }
    }

    /// Polls `ready` every 20 ms for up to two minutes (the VMs run with --timeout 120); panics with the process's output if
    /// it ends first.
    pub fn wait_until(&mut self, ready: impl Fn(&Running) -> bool) {
        let started = Instant::now();
        while !ready(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                panic!("the VM ended ({status}) before it got there: {stderr}");
            }
            assert!(started.elapsed() < Duration::from_secs(120), "the VM never got there");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `faultline ctl --json -s SOCKET ARGS`: the JSON result, or stderr on failure.
    pub fn ctl_json(&self, args: &[&str]) -> Result<Value, String> {
        let output = faultline().args(["ctl", "--json", "-s"]).arg(&self.socket).args(args).output().unwrap();
        if output.status.success() {
            Ok(serde_json::from_slice(&output.stdout).expect("ctl --json prints JSON"))
        } else {
            Err(String::from_utf8_lossy(&output.stderr).to_string())
        }
    }

    /// `snapshot create DIR EXTRA` (panics on failure).
    pub fn snapshot(&self, dir: &Path, extra: &[&str]) -> Value {
        let mut args = vec!["snapshot", "create", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.ctl_json(&args).unwrap_or_else(|e| panic!("snapshot create {}: {e}", dir.display()))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to end.
    pub fn wait(self) -> RunOutcome {
        outcome(self.child.wait_with_output().unwrap())
    }
}

/// `faultline restore --json --timeout 120 --from DIR ARGS`, to its end.
pub fn restore(dir: &Path, args: &[&str]) -> RunOutcome {
    let output = faultline()
        .args(["restore", "--json", "--timeout", "120", "--from"])
        .arg(dir)
        .args(args)
        .output()
        .expect("spawn faultline restore");
    outcome(output)
}

/// An anonymous mapping to load a chain into, for byte comparisons.
pub struct Scratch {
    addr: *mut u8,
    len: usize,
}

impl Scratch {
    /// A fresh zero mapping of `len` bytes.
    pub fn new(len: usize) -> Scratch {
        // SAFETY: a fresh private anonymous mapping; unmapped in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        Scratch { addr: addr.cast(), len }
    }

    /// The mapping as zone 0 of an anonymous VM.
    pub fn view(&self) -> ZoneView {
        ZoneView {
            zone: 0,
            host_addr: self.addr,
            size_bytes: self.len as u64,
            page_bytes: 4096,
            backend: faultline::config::Backend::Anon,
            fd: None,
        }
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping lives as long as self and nothing else writes it.
        unsafe { std::slice::from_raw_parts(self.addr, self.len) }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// The memory of the (one-zone) snapshot chain ending in `dir`.
pub fn chain_memory(dir: &Path) -> Scratch {
    let chain = Chain::read(dir).unwrap();
    let memory = Scratch::new(chain.top().images[0].size_bytes as usize);
    chain.load_memory(&[memory.view()]).unwrap();
    memory
}
