//! Queue notifications off the vCPU thread: one ioeventfd per queue index, so that a
//! driver's write to QueueNotify is completed by KVM in the kernel (the vCPU goes on at
//! once, with no exit to the VMM) and a thread of the device's own does the queue work.
//!
//! KVM signals the eventfd registered for the written value (the queue index, KVM's
//! datamatch); [`QueueNotifier`]'s thread sleeps in epoll on all of them and hands each
//! signalled index to [`MmioTransport::notify_queue`], the same path a trapped write to
//! QueueNotify takes, so every check (before DRIVER_OK, unknown queue, DEVICE_NEEDS_RESET)
//! holds alike. A driver only learns that a buffer was used from the used ring, so doing
//! the work later, on another thread, changes nothing it can rely on.
//!
//! On this project's nested hosts a QueueNotify write made by guest code at CPL0 (run by
//! KVM's instruction emulator) signals the ioeventfd *and* still exits to the VMM; from
//! CPL3 (where the built-in guest drives its devices) KVM completes it in the kernel
//! alone. Either way the device sees every notification, at worst twice, and serving a
//! queue with nothing new is a no-op.
//!
//! The thread holds the transport, which holds guest RAM's mappings: drop the notifier
//! (it stops and joins its thread) before guest RAM, as for the bus.

use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::event::epoll;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;

/// Whether a VM of `vcpus` vCPUs leaves a host CPU for a notifier thread: more CPUs than
/// vCPUs plus one for the VMM's other threads. Without one, serving notifications on the
/// vCPU that wrote them is faster: a polling driver keeps its vCPU busy while it waits
/// for the used ring, and the notifier thread then waits for a CPU. Measured on a 2-CPU
/// host, 1 GiB inflation with 1 vCPU: 135-243 ms trapped, 277-389 ms through the
/// notifier (`docs/benchmarks.md`, "Balloon inflation").
pub fn spare_cpu(vcpus: u32) -> bool {
    std::thread::available_parallelism().map_or(1, |n| n.get()) > vcpus as usize + 1
}

/// Queue indices that get an ioeventfd: every queue a balloon can have (inflate,
/// deflate, stats, free page hinting, reporting).
pub const NOTIFY_QUEUES: u16 = 5;

/// Errors setting up queue notifications.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// An eventfd or the epoll instance could not be created.
    #[error("cannot set up the virtio queue notification eventfds: {0} (out of file descriptors?)")]
    Setup(std::io::Error),
    /// KVM refused an ioeventfd.
    #[error("KVM refused the ioeventfd for queue {queue} at {addr:#x}: {reason}")]
    Register {
        /// The queue index (the datamatch value).
        queue: u16,
        /// The QueueNotify register's guest-physical address.
        addr: u64,
        /// KVM's error.
        reason: String,
    },
    /// The notifier thread could not be started.
    #[error("cannot start the virtio queue notification thread: {0}")]
    Thread(std::io::Error),
}

/// Registers one ioeventfd with KVM: a 4-byte write of `datamatch` to guest-physical
/// `addr` signals `event` (the VMM passes a closure over its VM).
pub type RegisterIoeventfd<'a> = &'a mut dyn FnMut(&EventFd, u64, u32) -> Result<(), String>;

/// The thread that turns ioeventfd signals into queue notifications; stops when dropped.
pub struct QueueNotifier {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    served: Arc<AtomicU64>,
}

impl std::fmt::Debug for QueueNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueNotifier").field("running", &self.thread.is_some()).finish()
    }
}

/// epoll token of the stop eventfd (queue indices are the other tokens).
const TOKEN_STOP: u64 = u64::MAX;

impl QueueNotifier {
    /// Creates one eventfd per queue index below [`NOTIFY_QUEUES`], registers each with
    /// `register` for a write of its index to `notify_addr` (the window's QueueNotify),
    /// and starts the thread that processes them on `transport`.
    pub fn start(
        transport: Arc<Mutex<MmioTransport>>,
        notify_addr: u64,
        register: RegisterIoeventfd<'_>,
    ) -> Result<QueueNotifier, NotifyError> {
        let new_fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(NotifyError::Setup);
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| NotifyError::Setup(e.into()))?;
        let mut events = Vec::new();
        for queue in 0..NOTIFY_QUEUES {
            let event = new_fd()?;
            register(&event, notify_addr, u32::from(queue)).map_err(|reason| NotifyError::Register {
                queue,
                addr: notify_addr,
                reason,
            })?;
            epoll::add(&ep, borrowed(&event), epoll::EventData::new_u64(queue.into()), epoll::EventFlags::IN)
                .map_err(|e| NotifyError::Setup(e.into()))?;
            events.push(event);
        }
        let stop = Arc::new(new_fd()?);
        epoll::add(&ep, borrowed(&stop), epoll::EventData::new_u64(TOKEN_STOP), epoll::EventFlags::IN)
            .map_err(|e| NotifyError::Setup(e.into()))?;
        let served = Arc::new(AtomicU64::new(0));
        let counter = served.clone();
        let thread = std::thread::Builder::new()
            .name("virtio-notify".into())
            .spawn(move || serve(&ep, &events, &transport, &counter))
            .map_err(NotifyError::Thread)?;
        Ok(QueueNotifier { stop, thread: Some(thread), served })
    }

    /// Notifications the thread has handed to the transport so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

/// vmm-sys-util's `EventFd` does not implement `AsFd`.
fn borrowed(event: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: `event` owns an open file descriptor for at least the borrow's lifetime.
    unsafe { BorrowedFd::borrow_raw(event.as_raw_fd()) }
}

/// The thread's loop: wait, then notify every signalled queue, until the stop eventfd.
fn serve(ep: &std::os::fd::OwnedFd, events: &[EventFd], transport: &Mutex<MmioTransport>, served: &AtomicU64) {
    let mut ready = [MaybeUninit::<epoll::Event>::uninit(); NOTIFY_QUEUES as usize + 1];
    loop {
        let (ready, _) = match epoll::wait(ep, &mut ready, None) {
            Ok(r) => r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!("virtio queue notifications stopped: epoll_wait failed: {e}");
                return;
            }
        };
        for event in ready.iter() {
            let token = event.data.u64();
            if token == TOKEN_STOP {
                return;
            }
            // Read first: a notification that comes while we work signals again.
            let _ = events[token as usize].read();
            served.fetch_add(1, Ordering::Relaxed);
            transport.lock().unwrap_or_else(|e| e.into_inner()).notify_queue(token as u32);
        }
    }
}

impl Drop for QueueNotifier {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
