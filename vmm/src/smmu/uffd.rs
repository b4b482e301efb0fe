//! A small, safe wrapper over the Linux userfaultfd uapi.
//!
//! Built on linux-raw-sys's pre-generated bindings (not the `userfaultfd` crate, which needs
//! libclang, lacks MINOR/WP/POISON and misreports EAGAIN from UFFDIO_COPY; see
//! `platform.md`). The fd is always opened for kernel *and* user faults: KVM's faults on
//! guest memory happen in the kernel, so `UFFD_USER_MODE_ONLY` is never requested.
//!
//! The fill ioctls (COPY, ZEROPAGE, CONTINUE, POISON) return a [`FillOutcome`] rather
//! than an error for the two expected races:
//! - `EEXIST`: someone else resolved the page first; the caller must `wake()` the waiters;
//! - `EAGAIN`: the address space is changing (a REMOVE/UNMAP event is pending, or the fill
//!   stopped part-way); the caller must read pending events first, then retry the rest.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use linux_raw_sys::general as uapi;
use linux_raw_sys::ioctl as uioctl;

/// Errors from userfaultfd operations.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Opening a userfaultfd failed.
    #[error("cannot open a userfaultfd (/dev/userfaultfd and the userfaultfd syscall both failed: {0}); run as root, or set vm.unprivileged_userfaultfd=1, or give access to /dev/userfaultfd")]
    Open(std::io::Error),
    /// UFFDIO_API failed.
    #[error("UFFDIO_API handshake failed: {0}")]
    Api(std::io::Error),
    /// The kernel lacks features we require.
    #[error("this kernel's userfaultfd lacks required feature(s) {missing}; use a newer kernel or pick a paging mode that does not need them")]
    MissingFeatures {
        /// Names of the missing features, comma-separated.
        missing: String,
    },
    /// An ioctl failed with an unexpected error.
    #[error("{op} on [{start:#x}, +{len:#x}) failed: {source}")]
    Ioctl {
        /// The ioctl name.
        op: &'static str,
        /// Host start address.
        start: u64,
        /// Length in bytes.
        len: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The registered range does not support an ioctl we need.
    #[error("the range [{start:#x}, +{len:#x}) does not support {op} for this backing; choose another paging mode for this memory")]
    Unsupported {
        /// The ioctl name.
        op: &'static str,
        /// Host start address.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Reading events failed.
    #[error("reading userfaultfd events failed: {0}")]
    Read(std::io::Error),
    /// The kernel sent an event we do not understand.
    #[error("unknown userfaultfd event type {0}; this VMM is older than the kernel's uapi")]
    UnknownEvent(u8),
}

impl UffdError {
    /// `EAGAIN` from an ioctl: the address space is changing (a REMOVE/UNMAP event is
    /// pending). Read the pending events (or let a handler read them), then retry.
    pub fn is_mm_changing(&self) -> bool {
        matches!(self, UffdError::Ioctl { source, .. } if source.raw_os_error() == Some(libc::EAGAIN))
    }
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, UffdError>;

pub use super::uffd_types::{Event, Features, FillOutcome, RangeIoctls, RegisterMode};

/// A raw `uffd_msg` slot for [`Uffd::read_events`].
pub type RawMsg = uapi::uffd_msg;

/// A zeroed message buffer of `n` slots for [`Uffd::read_events`].
pub fn msg_buffer(n: usize) -> Vec<RawMsg> {
    // SAFETY: uffd_msg is a plain C struct of integers and unions of integers; the
    // all-zero bit pattern is a valid value.
    vec![unsafe { std::mem::zeroed::<RawMsg>() }; n]
}

// linux-raw-sys 0.11 lacks these few uapi numbers (they are plain _IO/_IOWR encodings of
// <linux/userfaultfd.h>), so we encode them here; a unit test checks the encoder against
// numbers linux-raw-sys does have.
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const IOC_WRITE_READ: u64 = 3;
/// `USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)`.
const USERFAULTFD_IOC_NEW: u64 = ioc(0, uapi::USERFAULTFD_IOC as u64, 0, 0);
/// `UFFDIO_POISON = _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)`.
const UFFDIO_POISON: u64 = ioc(
    IOC_WRITE_READ,
    uapi::UFFDIO as u64,
    uapi::_UFFDIO_POISON as u64,
    std::mem::size_of::<uapi::uffdio_poison>() as u64,
);
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;

/// An open, API-negotiated userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
}

impl Uffd {
    /// Opens a userfaultfd (`O_CLOEXEC | O_NONBLOCK`, kernel and user faults) and
    /// negotiates features: every bit of `required` must be offered by the kernel (else
    /// [`UffdError::MissingFeatures`] names the missing ones); the offered bits of
    /// `optional` are enabled too.
    pub fn open(required: Features, optional: Features) -> Result<Uffd> {
        let available = Self::available_features()?;
        let missing = Features(required.0 & !available.0);
        if missing.0 != 0 {
            return Err(UffdError::MissingFeatures { missing: missing.names() });
        }
        let want = Features(required.0 | (optional.0 & available.0));
        let fd = open_raw()?;
        let features = api(&fd, want)?;
        Ok(Uffd { fd, features: Features(want.0 & features.0) })
    }

    /// Wraps a userfaultfd another process opened and passed over a Unix socket (the
    /// Firecracker handoff: the sender ran the UFFDIO_API handshake and registered the
    /// ranges). Which features the sender enabled is not known here.
    pub fn from_received(fd: OwnedFd) -> Uffd {
        Uffd { fd, features: Features(0) }
    }

    /// The features this kernel offers (probed on a throw-away fd: UFFDIO_API can only be
    /// called once per fd).
    pub fn available_features() -> Result<Features> {
        let fd = open_raw()?;
        api(&fd, Features(0))
    }

    /// The features enabled on this fd.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Registers `[start, start + len)` (page-aligned, huge-page-aligned for hugetlb) and
    /// returns the ioctls the range supports.
    pub fn register(&self, start: u64, len: u64, mode: RegisterMode) -> Result<RangeIoctls> {
        let mut reg = uapi::uffdio_register { range: uapi::uffdio_range { start, len }, mode: mode.bits(), ioctls: 0 };
        self.ioctl("UFFDIO_REGISTER", uioctl::UFFDIO_REGISTER as u64, &mut reg, start, len)?;
        Ok(RangeIoctls(reg.ioctls))
    }

    /// Unregisters a range; the kernel wakes any thread still waiting on a fault in it.
    pub fn unregister(&self, start: u64, len: u64) -> Result<()> {
        let mut range = uapi::uffdio_range { start, len };
        self.ioctl("UFFDIO_UNREGISTER", uioctl::UFFDIO_UNREGISTER as u64, &mut range, start, len)
    }

    /// UFFDIO_COPY: atomically fills missing pages `[dst, dst + src.len())` with `src`.
    /// `write_protect` installs them write-protected (needs WP registration); `dont_wake`
    /// leaves the waiters asleep (wake later with [`Uffd::wake`]).
    pub fn copy(&self, dst: u64, src: &[u8], write_protect: bool, dont_wake: bool) -> Result<FillOutcome> {
        let mut mode = 0u64;
        if dont_wake {
            mode |= uapi::UFFDIO_COPY_MODE_DONTWAKE as u64;
        }
        if write_protect {
            mode |= uapi::UFFDIO_COPY_MODE_WP as u64;
        }
        let len = src.len() as u64;
        // `copy` starts at 0: when the kernel refuses early with EAGAIN (mmap changing) it
        // does not write the field, and 0 then correctly means "nothing filled".
        let mut arg = uapi::uffdio_copy { dst, src: src.as_ptr() as u64, len, mode, copy: 0 };
        let r = self.ioctl("UFFDIO_COPY", uioctl::UFFDIO_COPY as u64, &mut arg, dst, len);
        fill_outcome(r, arg.copy)
    }

    /// UFFDIO_ZEROPAGE: fills missing pages with zeros (not supported on hugetlb).
    pub fn zeropage(&self, start: u64, len: u64, dont_wake: bool) -> Result<FillOutcome> {
        let mode = if dont_wake { uapi::UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64 } else { 0 };
        let mut arg = uapi::uffdio_zeropage { range: uapi::uffdio_range { start, len }, mode, zeropage: 0 };
        let r = self.ioctl("UFFDIO_ZEROPAGE", uioctl::UFFDIO_ZEROPAGE as u64, &mut arg, start, len);
        fill_outcome(r, arg.zeropage)
    }

    /// UFFDIO_CONTINUE: maps the page-cache pages of a MINOR fault range.
    pub fn continue_(&self, start: u64, len: u64, write_protect: bool, dont_wake: bool) -> Result<FillOutcome> {
        let mut mode = 0u64;
        if dont_wake {
            mode |= UFFDIO_CONTINUE_MODE_DONTWAKE;
        }
        if write_protect {
            mode |= UFFDIO_CONTINUE_MODE_WP;
        }
        let mut arg = uapi::uffdio_continue { range: uapi::uffdio_range { start, len }, mode, mapped: 0 };
        let r = self.ioctl("UFFDIO_CONTINUE", uioctl::UFFDIO_CONTINUE as u64, &mut arg, start, len);
        fill_outcome(r, arg.mapped)
    }

    /// UFFDIO_POISON: marks missing pages poisoned (access raises SIGBUS); needs the
    /// POISON feature.
    pub fn poison(&self, start: u64, len: u64, dont_wake: bool) -> Result<FillOutcome> {
        let mode = if dont_wake { UFFDIO_POISON_MODE_DONTWAKE } else { 0 };
        let mut arg = uapi::uffdio_poison { range: uapi::uffdio_range { start, len }, mode, updated: 0 };
        let r = self.ioctl("UFFDIO_POISON", UFFDIO_POISON, &mut arg, start, len);
        fill_outcome(r, arg.updated)
    }

    /// UFFDIO_WRITEPROTECT: `protect` sets write protection on the range; clearing it
    /// (`protect == false`) also wakes threads blocked on a WP fault there unless
    /// `dont_wake`.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool, dont_wake: bool) -> Result<()> {
        let mut mode = 0u64;
        if protect {
            mode |= UFFDIO_WRITEPROTECT_MODE_WP;
        }
        if dont_wake {
            mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut arg = uapi::uffdio_writeprotect { range: uapi::uffdio_range { start, len }, mode };
        self.ioctl("UFFDIO_WRITEPROTECT", uioctl::UFFDIO_WRITEPROTECT as u64, &mut arg, start, len)
    }

    /// UFFDIO_WAKE: wakes threads waiting on faults in the range.
    pub fn wake(&self, start: u64, len: u64) -> Result<()> {
        let mut range = uapi::uffdio_range { start, len };
        self.ioctl("UFFDIO_WAKE", uioctl::UFFDIO_WAKE as u64, &mut range, start, len)
    }

    /// Reads as many pending messages as fit in `buf` without blocking and decodes them
    /// into `out` (cleared first). Returns the number of events (0 if none are pending).
    pub fn read_events(&self, buf: &mut [RawMsg], out: &mut Vec<Event>) -> Result<usize> {
        out.clear();
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is a valid, writable slice of `bytes` bytes of plain-data
        // messages; the kernel writes whole `uffd_msg`s into it.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(UffdError::Read(e)),
            };
        }
        let count = n as usize / std::mem::size_of::<RawMsg>();
        for msg in &buf[..count] {
            out.push(decode(msg)?);
        }
        Ok(count)
    }

    fn ioctl<T>(&self, op: &'static str, req: u64, arg: &mut T, start: u64, len: u64) -> Result<()> {
        // SAFETY: `req` is a userfaultfd ioctl whose argument struct is `T` (each caller
        // pairs them as in <linux/userfaultfd.h>); `arg` is a valid, exclusively borrowed
        // `T`. Addresses inside it are only used by the kernel on our own mm and are
        // checked there (bad ones return EFAULT/EINVAL, never undefined behaviour for us);
        // COPY's `src` points at a live borrowed slice of `len` bytes.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        if r < 0 {
            return Err(UffdError::Ioctl { op, start, len, source: std::io::Error::last_os_error() });
        }
        Ok(())
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Turns a fill ioctl's result and its "bytes done / -errno" field into an outcome.
fn fill_outcome(r: Result<()>, done: i64) -> Result<FillOutcome> {
    match r {
        Ok(()) => Ok(FillOutcome::Filled),
        Err(UffdError::Ioctl { source, op, start, len }) => match source.raw_os_error() {
            Some(libc::EEXIST) => Ok(FillOutcome::AlreadyFilled),
            Some(libc::EAGAIN) => Ok(FillOutcome::MmChanging { filled_bytes: done.max(0) as u64 }),
            _ => Err(UffdError::Ioctl { op, start, len, source }),
        },
        Err(e) => Err(e),
    }
}

fn decode(msg: &RawMsg) -> Result<Event> {
    // `uffd_msg` is packed: copy fields out by value instead of referencing them.
    let event = msg.event;
    let arg = msg.arg;
    Ok(match event as u32 {
        uapi::UFFD_EVENT_PAGEFAULT => {
            // SAFETY: `event` says the kernel filled the `pagefault` member (plain integers).
            let pf = unsafe { arg.pagefault };
            let flags = pf.flags;
            Event::PageFault {
                address: pf.address,
                write: flags & uapi::UFFD_PAGEFAULT_FLAG_WRITE as u64 != 0,
                wp: flags & uapi::UFFD_PAGEFAULT_FLAG_WP as u64 != 0,
                minor: flags & uapi::UFFD_PAGEFAULT_FLAG_MINOR as u64 != 0,
                // SAFETY: `feat` has one member, a plain integer (0 unless THREAD_ID).
                thread: unsafe { pf.feat.ptid },
            }
        }
        uapi::UFFD_EVENT_REMOVE => {
            // SAFETY: `event` says the kernel filled the `remove` member (plain integers).
            let r = unsafe { arg.remove };
            Event::Remove { start: r.start, end: r.end }
        }
        uapi::UFFD_EVENT_UNMAP => {
            // SAFETY: `event` says the kernel filled the `remove` member (plain integers).
            let r = unsafe { arg.remove };
            Event::Unmap { start: r.start, end: r.end }
        }
        uapi::UFFD_EVENT_REMAP => {
            // SAFETY: `event` says the kernel filled the `remap` member (plain integers).
            let r = unsafe { arg.remap };
            Event::Remap { from: r.from, to: r.to, len: r.len }
        }
        uapi::UFFD_EVENT_FORK => {
            // SAFETY: `event` says the kernel filled the `fork` member (plain integers).
            let f = unsafe { arg.fork };
            Event::Fork { child_uffd: f.ufd as i32 }
        }
        _ => return Err(UffdError::UnknownEvent(event)),
    })
}

/// Opens a bare userfaultfd: `/dev/userfaultfd` + USERFAULTFD_IOC_NEW first (works without
/// the `vm.unprivileged_userfaultfd` sysctl for whoever may open the device), else the
/// userfaultfd syscall.
fn open_raw() -> Result<OwnedFd> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64; // never UFFD_USER_MODE_ONLY
    let dev_err = match OpenOptions::new().read(true).write(true).open("/dev/userfaultfd") {
        Ok(dev) => {
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd.
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if r >= 0 {
                // SAFETY: `r` is a fresh fd the kernel just gave us; nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(r) });
            }
            std::io::Error::last_os_error()
        }
        Err(e) => e,
    };
    let sys_flags = rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK;
    // SAFETY: the fd lets its owner resolve faults of this process; we keep it private
    // to the smmu, which is what the rustix contract asks.
    match unsafe { rustix::mm::userfaultfd(sys_flags) } {
        Ok(fd) => Ok(fd),
        Err(e) => {
            tracing::debug!("/dev/userfaultfd unusable: {dev_err}");
            Err(UffdError::Open(e.into()))
        }
    }
}

/// Runs the UFFDIO_API handshake asking for `features`; returns what the kernel reports.
fn api(fd: &OwnedFd, features: Features) -> Result<Features> {
    let mut arg = uapi::uffdio_api { api: uapi::UFFD_API as u64, features: features.0, ioctls: 0 };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`, which `arg` is.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), uioctl::UFFDIO_API as _, &mut arg) };
    if r < 0 {
        return Err(UffdError::Api(std::io::Error::last_os_error()));
    }
    Ok(Features(arg.features))
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn ioctl_encoder_matches_linux_raw_sys() {
        let cont = ioc(
            IOC_WRITE_READ,
            uapi::UFFDIO as u64,
            uapi::_UFFDIO_CONTINUE as u64,
            std::mem::size_of::<uapi::uffdio_continue>() as u64,
        );
        assert_eq!(cont, uioctl::UFFDIO_CONTINUE as u64);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
        assert_eq!(std::mem::size_of::<RawMsg>(), 32);
    }

    #[test]
    fn feature_names_name_each_bit() {
        let f = Features::MINOR_SHMEM.union(Features::POISON).union(Features(1 << 40));
        assert_eq!(f.names(), "MINOR_SHMEM, POISON, 0x10000000000");
    }

    #[test]
    fn open_negotiates_and_reports_missing_features() {
        let uffd = Uffd::open(Features::EVENT_REMOVE, Features::MINOR_SHMEM).unwrap();
        assert!(uffd.features().contains(Features::EVENT_REMOVE));
        match Uffd::open(Features(1 << 40), Features(0)) {
            Err(UffdError::MissingFeatures { missing }) => assert_eq!(missing, "0x10000000000"),
            other => panic!("expected MissingFeatures, got {other:?}"),
        }
    }
}
