//! Each vCPU on a thread of its own that answers commands: run, pause, save state,
//! restore state, exit.
//!
//! A command is posted on the vCPU's channel and the thread is kicked out of `KVM_RUN`
//! (the kick signal of [`super::control`]); the thread looks at its channel after every
//! return from `KVM_RUN`, so a running vCPU answers within one guest exit. A paused
//! thread blocks on the channel (waking every few milliseconds to notice the VM's end).
//! State is read and written only on the vCPU's own thread, as KVM requires for some
//! vCPU ioctls and as is cheapest for all.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use super::control::{publish_kvm_run, VmControl};
use super::vcpu::Vcpu;
use super::vcpu_state::VcpuState;
use crate::devices::DeviceBuses;
use crate::persist::Persist;

/// How often a paused vCPU thread looks whether the VM has ended.
const PAUSED_POLL: Duration = Duration::from_millis(20);
/// The time slice of the throttle: a throttled vCPU runs this long, then sleeps its share.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// How long a command may take before the fleet gives up on the vCPU.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors steering vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuThreadError {
    /// The thread could not be started.
    #[error("cannot start the thread of vCPU {id}: {source}")]
    Spawn {
        /// The vCPU.
        id: u32,
        /// The OS error.
        source: std::io::Error,
    },
    /// The thread has ended (the VM ended) and cannot take commands.
    #[error("vCPU {0} has stopped (the VM ended), so it cannot take commands")]
    Gone(u32),
    /// The thread did not answer in time.
    #[error("vCPU {id} did not answer '{command}' within {COMMAND_TIMEOUT:?}")]
    Timeout {
        /// The vCPU.
        id: u32,
        /// The command.
        command: &'static str,
    },
    /// The command failed on the vCPU thread.
    #[error("vCPU {id}: {reason}")]
    Failed {
        /// The vCPU.
        id: u32,
        /// What failed.
        reason: String,
    },
    /// The command does not fit the vCPU's state (e.g. save while running).
    #[error("vCPU {id} is {state}; '{command}' needs it paused (pause the VM first)")]
    NotPaused {
        /// The vCPU.
        id: u32,
        /// What it is doing.
        state: &'static str,
        /// The command.
        command: &'static str,
    },
}

/// What a vCPU thread is asked to do.
enum Command {
    Run,
    Pause,
    Save,
    Restore(Box<VcpuState>),
    Exit,
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Run => "run",
            Command::Pause => "pause",
            Command::Save => "save state",
            Command::Restore(_) => "restore state",
            Command::Exit => "exit",
        }
    }
}

/// A vCPU thread's answer.
enum Answer {
    Done,
    Saved(Box<VcpuState>),
    Failed(String),
    NotPaused,
}

/// The vCPU threads of one VM. Created paused: nothing runs until [`VcpuFleet::run`].
pub struct VcpuFleet {
    threads: Vec<VcpuThread>,
    paused: bool,
}

struct VcpuThread {
    id: u32,
    commands: Sender<Command>,
    answers: Receiver<Answer>,
    pthread: libc::pthread_t,
    join: Option<std::thread::JoinHandle<()>>,
}

impl VcpuFleet {
    /// Starts one paused thread per vCPU. On error the threads already started exit.
    pub fn spawn(
        vcpus: Vec<Vcpu>,
        buses: Arc<DeviceBuses>,
        memory: GuestMemoryMmap,
        control: Arc<VmControl>,
    ) -> Result<Self, VcpuThreadError> {
        let mut fleet = VcpuFleet { threads: Vec::with_capacity(vcpus.len()), paused: true };
        for vcpu in vcpus {
            let id = vcpu.id();
            let (commands, inbox) = channel();
            let (outbox, answers) = channel();
            let (buses, memory, control) = (buses.clone(), memory.clone(), control.clone());
            let join = std::thread::Builder::new()
                .name(format!("fl-vcpu{id}"))
                .spawn(move || vcpu_thread(vcpu, &buses, &memory, &control, &inbox, &outbox))
                .map_err(|source| VcpuThreadError::Spawn { id, source })?;
            use std::os::unix::thread::JoinHandleExt;
            let pthread = join.as_pthread_t();
            fleet.threads.push(VcpuThread { id, commands, answers, pthread, join: Some(join) });
        }
        Ok(fleet)
    }

    /// A fleet of no vCPUs (what is left after [`VcpuFleet::exit`]).
    pub fn empty() -> Self {
        VcpuFleet { threads: Vec::new(), paused: true }
    }

    /// Lets every vCPU run (from the start, or on from a pause).
    pub fn run(&mut self) -> Result<(), VcpuThreadError> {
        if !self.paused {
            return Ok(());
        }
        self.broadcast(|| Command::Run, false)?;
        self.paused = false;
        Ok(())
    }

    /// Stops every vCPU outside `KVM_RUN` with its pending I/O completed, so its state can
    /// be read; returns how long that took. A no-op (zero) when already paused.
    pub fn pause(&mut self) -> Result<Duration, VcpuThreadError> {
        if self.paused {
            return Ok(Duration::ZERO);
        }
        let started = Instant::now();
        self.broadcast(|| Command::Pause, true)?;
        self.paused = true;
        Ok(started.elapsed())
    }

    /// True while the vCPUs are paused (or not started yet).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The state of every vCPU, in id order. The fleet must be paused.
    pub fn save(&mut self) -> Result<Vec<VcpuState>, VcpuThreadError> {
        let mut states = Vec::with_capacity(self.threads.len());
        for thread in &self.threads {
            match thread.ask(Command::Save, false)? {
                Answer::Saved(state) => states.push(*state),
                other => return Err(thread.unexpected(other, "save state")),
            }
        }
        Ok(states)
    }

    /// Restores every vCPU from `states` (id order, one per vCPU). The fleet must be paused.
    pub fn restore(&mut self, states: Vec<VcpuState>) -> Result<(), VcpuThreadError> {
        if states.len() != self.threads.len() {
            return Err(VcpuThreadError::Failed {
                id: 0,
                reason: format!("{} vCPU states for {} vCPUs", states.len(), self.threads.len()),
            });
        }
        for (thread, state) in self.threads.iter().zip(states) {
            match thread.ask(Command::Restore(Box::new(state)), false)? {
                Answer::Done => {}
                other => return Err(thread.unexpected(other, "restore state")),
            }
        }
        Ok(())
    }

    /// Ends every vCPU thread and joins it. Threads that already ended (the VM ended)
    /// are only joined.
    pub fn exit(mut self) {
        self.exit_threads();
    }

    fn exit_threads(&mut self) {
        for thread in &self.threads {
            let _ = thread.commands.send(Command::Exit);
            kick(thread.pthread);
        }
        for thread in &mut self.threads {
            if let Some(join) = thread.join.take() {
                if join.join().is_err() {
                    tracing::error!("the thread of vCPU {} panicked", thread.id);
                }
            }
        }
    }

    /// Posts a command to every vCPU (kicking them if `kick_them`: a running vCPU sees
    /// commands only when KVM_RUN returns), then waits for all.
    fn broadcast(&self, command: impl Fn() -> Command, kick_them: bool) -> Result<(), VcpuThreadError> {
        for thread in &self.threads {
            thread.post(command())?;
            if kick_them {
                kick(thread.pthread);
            }
        }
        for thread in &self.threads {
            let name = command().name();
            match thread.wait(name)? {
                Answer::Done => {}
                other => return Err(thread.unexpected(other, name)),
            }
        }
        Ok(())
    }
}

impl Drop for VcpuFleet {
    fn drop(&mut self) {
        self.exit_threads();
    }
}

impl VcpuThread {
    fn post(&self, command: Command) -> Result<(), VcpuThreadError> {
        self.commands.send(command).map_err(|_| VcpuThreadError::Gone(self.id))
    }

    fn wait(&self, command: &'static str) -> Result<Answer, VcpuThreadError> {
        self.answers.recv_timeout(COMMAND_TIMEOUT).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuThreadError::Timeout { id: self.id, command },
            RecvTimeoutError::Disconnected => VcpuThreadError::Gone(self.id),
        })
    }

    fn ask(&self, command: Command, kick_it: bool) -> Result<Answer, VcpuThreadError> {
        let name = command.name();
        self.post(command)?;
        if kick_it {
            kick(self.pthread);
        }
        self.wait(name)
    }

    fn unexpected(&self, answer: Answer, command: &'static str) -> VcpuThreadError {
        match answer {
            Answer::Failed(reason) => VcpuThreadError::Failed { id: self.id, reason },
            Answer::NotPaused => VcpuThreadError::NotPaused { id: self.id, state: "running", command },
            Answer::Done | Answer::Saved(_) => {
                VcpuThreadError::Failed { id: self.id, reason: format!("unexpected answer to '{command}'") }
            }
        }
    }
}

/// Kicks a vCPU thread out of `KVM_RUN` (or makes its next `KVM_RUN` return at once).
fn kick(thread: libc::pthread_t) {
    // SAFETY: the id is of a vCPU thread that has not been joined (threads are joined only
    // in `exit_threads`, after the last kick); pthread_kill on a finished but unjoined
    // thread is harmless.
    unsafe { libc::pthread_kill(thread, super::control::kick_signal()) };
}

/// The body of a vCPU thread: paused until told to run, then runs until paused again,
/// told to exit, or the VM ends.
fn vcpu_thread(
    mut vcpu: Vcpu,
    buses: &DeviceBuses,
    memory: &GuestMemoryMmap,
    control: &VmControl,
    inbox: &Receiver<Command>,
    outbox: &Sender<Answer>,
) {
    control.register_vcpu_thread();
    publish_kvm_run(vcpu.kvm_run_page());
    let mut running = false;
    let mut throttle = Throttle { ran_since: Instant::now() };
    loop {
        let command = if running {
            // A throttled vCPU sleeps its share of each slice, still taking commands.
            match throttle.sleep_due(control.throttle_percent()) {
                Some(sleep) => match inbox.recv_timeout(sleep) {
                    Ok(command) => Some(command),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match inbox.try_recv() {
                    Ok(command) => Some(command),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                },
            }
        } else {
            match inbox.recv_timeout(PAUSED_POLL) {
                Ok(command) => Some(command),
                Err(RecvTimeoutError::Timeout) if control.is_stopping() => break,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        };
        if let Some(command) = command {
            let answer = match command {
                Command::Exit => break,
                Command::Run => {
                    running = true;
                    if vcpu.id() == 0 {
                        control.note_first_run();
                    }
                    Answer::Done
                }
                Command::Pause => {
                    running = false;
                    match vcpu.complete_pending_io() {
                        Ok(()) => Answer::Done,
                        Err(e) => Answer::Failed(e.to_string()),
                    }
                }
                Command::Save if running => Answer::NotPaused,
                Command::Save => match vcpu.save() {
                    Ok(state) => Answer::Saved(Box::new(state)),
                    Err(e) => Answer::Failed(e.to_string()),
                },
                Command::Restore(_) if running => Answer::NotPaused,
                Command::Restore(state) => match vcpu.restore(&state) {
                    Ok(()) => Answer::Done,
                    Err(e) => Answer::Failed(e.to_string()),
                },
            };
            if outbox.send(answer).is_err() {
                break;
            }
            continue;
        }
        if control.is_stopping() {
            // Stay for commands (a paused-state read after the end is harmless) but do
            // not run the guest again.
            running = false;
            continue;
        }
        if let Some(exit) = vcpu.run_once(buses, memory) {
            control.end(exit);
        }
    }
    control.unregister_vcpu_thread();
    publish_kvm_run(std::ptr::null_mut());
    vcpu.log_stop();
}

/// The duty cycle of a throttled vCPU (QEMU's cpu-throttle): after running a
/// [`THROTTLE_SLICE`], sleep `percent / (100 - percent)` slices.
struct Throttle {
    ran_since: Instant,
}

impl Throttle {
    /// How long to sleep now, if at all.
    fn sleep_due(&mut self, percent: u8) -> Option<Duration> {
        let now = Instant::now();
        if percent == 0 {
            self.ran_since = now;
            return None;
        }
        if now < self.ran_since + THROTTLE_SLICE {
            return None;
        }
        let percent = u32::from(percent.min(99));
        let sleep = THROTTLE_SLICE * percent / (100 - percent);
        self.ran_since = now + sleep;
        Some(sleep)
    }
}
