//! SIGINT, SIGTERM and SIGHUP end a run cleanly: the VM ends with an "interrupted" exit,
//! the vCPUs stop, the report is printed and the control socket removed — as a user of
//! Firecracker or QEMU expects from Ctrl-C or `kill`. A second signal while the VM is
//! already ending exits at once (status 130), for a teardown that hangs.
//!
//! signal-hook's iterator runs the handlers on a thread of its own (its handler only
//! writes to a self-pipe), so ending the VM happens outside signal context.

use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use crate::exit::VmExit;
use crate::vstate::VmControl;

/// Watches the stop signals while it lives.
pub struct StopSignals {
    handle: Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

impl StopSignals {
    /// Ends the VM of `control` on the first stop signal.
    pub fn watch(control: Arc<VmControl>) -> std::io::Result<Self> {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new().name("fl-signals".into()).spawn(move || {
            for signal in signals.forever() {
                if control.is_stopping() {
                    eprintln!("faultline: {} again while stopping: exiting now", name(signal));
                    std::process::exit(130);
                }
                control.end(VmExit::Interrupted { signal: name(signal).to_string() });
            }
        })?;
        Ok(StopSignals { handle, thread: Some(thread) })
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
