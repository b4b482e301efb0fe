//! Ending a VM from any thread: the first reason to end wins, the main thread is woken
//! through an eventfd, and every vCPU thread is kicked out of KVM_RUN.
//!
//! The kick is Firecracker's: each vCPU thread publishes its `kvm_run` page in a
//! thread-local; a no-op-ish handler for [`kick_signal`] sets `immediate_exit` there, so
//! KVM_RUN returns EINTR whether the signal lands inside KVM_RUN or just before it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, Once, OnceLock};

use kvm_bindings::kvm_run;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::exit::VmExit;

/// Errors setting up VM control.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The exit eventfd could not be created.
    #[error("cannot create the VM exit eventfd: {0}")]
    EventFd(std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

thread_local! {
    /// This thread's vCPU `kvm_run` page, while the thread runs a vCPU.
    static THREAD_KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal that kicks vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = THREAD_KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's live kvm_run page: it is published by
        // `publish_kvm_run` and cleared before the vCPU (and its mapping) is dropped, and
        // this handler runs on the same thread. A volatile byte store is all we do.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
    std::sync::atomic::fence(Ordering::SeqCst);
}

/// Publishes (or, with null, withdraws) the calling thread's `kvm_run` page for the kick
/// handler. Withdraw before the vCPU is dropped.
pub fn publish_kvm_run(run: *mut kvm_run) {
    THREAD_KVM_RUN.with(|cell| cell.set(run));
}

fn install_kick_handler() -> Result<(), ControlError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| result = register_signal_handler(kick_signal(), handle_kick).map_err(ControlError::Signal));
    result
}

/// Shared by the main thread, the vCPU threads and devices: how and whether the VM ended.
pub struct VmControl {
    exit: Mutex<Option<VmExit>>,
    stopping: AtomicBool,
    exit_event: EventFd,
    threads: Mutex<Vec<libc::pthread_t>>,
    first_run: OnceLock<std::time::Instant>,
    throttle_percent: AtomicU8,
}

impl VmControl {
    /// A running VM's control, with the kick handler installed.
    pub fn new() -> Result<Self, ControlError> {
        install_kick_handler()?;
        Ok(VmControl {
            exit: Mutex::new(None),
            stopping: AtomicBool::new(false),
            exit_event: EventFd::new(libc::EFD_NONBLOCK).map_err(ControlError::EventFd)?,
            threads: Mutex::new(Vec::new()),
            first_run: OnceLock::new(),
            throttle_percent: AtomicU8::new(0),
        })
    }

    /// Ends the VM with `exit` unless it already ended; wakes the main thread and kicks
    /// every vCPU thread.
    pub fn end(&self, exit: VmExit) {
        {
            let mut slot = self.exit.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_some() {
                return;
            }
            tracing::debug!("VM ends: {}", exit.describe());
            *slot = Some(exit);
        }
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.exit_event.write(1);
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let self_thread = unsafe_pthread_self();
        for &thread in threads.iter().filter(|&&t| t != self_thread) {
            // SAFETY: the ids are of vCPU threads that have not been joined yet (they are
            // joined only after the VM ended); pthread_kill on a finished but unjoined
            // thread is harmless.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// True once the VM has ended (vCPU loops check this before every KVM_RUN).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// How the VM ended, if it has.
    pub fn exit(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Signalled (written) when the VM ends.
    pub fn exit_event(&self) -> &EventFd {
        &self.exit_event
    }

    /// Notes that the boot vCPU is about to enter KVM_RUN (the first call counts).
    pub fn note_first_run(&self) {
        let _ = self.first_run.set(std::time::Instant::now());
    }

    /// When the boot vCPU first entered KVM_RUN, if it has.
    pub fn first_run(&self) -> Option<std::time::Instant> {
        self.first_run.get().copied()
    }

    /// Registers the calling thread as a vCPU thread to kick when the VM ends.
    pub fn register_vcpu_thread(&self) {
        self.threads.lock().unwrap_or_else(|e| e.into_inner()).push(unsafe_pthread_self());
    }

    /// Withdraws the calling vCPU thread (it is about to end): no kick reaches it after.
    pub fn unregister_vcpu_thread(&self) {
        let me = unsafe_pthread_self();
        self.threads.lock().unwrap_or_else(|e| e.into_inner()).retain(|&t| t != me);
    }

    /// Kicks every vCPU thread out of KVM_RUN once (they look at their commands and at
    /// the throttle, then enter again).
    pub fn kick_vcpus(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for &thread in threads.iter() {
            // SAFETY: a thread stays listed until it unregisters itself just before it
            // ends, and the list is locked here, so every id is of a live thread.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Makes every vCPU sleep `percent` % of its time (0: not throttled; at most 99):
    /// auto-converge during a migration.
    pub fn set_throttle(&self, percent: u8) {
        self.throttle_percent.store(percent.min(99), Ordering::Relaxed);
    }

    /// The share of time vCPUs are made to sleep, percent.
    pub fn throttle_percent(&self) -> u8 {
        self.throttle_percent.load(Ordering::Relaxed)
    }
}

fn unsafe_pthread_self() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}
