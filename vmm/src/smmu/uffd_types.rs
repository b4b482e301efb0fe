//! The plain types of the userfaultfd wrapper ([`super::uffd`]): feature sets,
//! registration modes, supported-ioctl masks, fill outcomes and decoded events.

use linux_raw_sys::general as uapi;

/// A set of `UFFD_FEATURE_*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features(pub u64);

/// Every feature bit we know, with its uapi name (for error messages).
const FEATURE_NAMES: &[(u32, &str)] = &[
    (uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
    (uapi::UFFD_FEATURE_EVENT_FORK, "EVENT_FORK"),
    (uapi::UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP"),
    (uapi::UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE"),
    (uapi::UFFD_FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
    (uapi::UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
    (uapi::UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"),
    (uapi::UFFD_FEATURE_SIGBUS, "SIGBUS"),
    (uapi::UFFD_FEATURE_THREAD_ID, "THREAD_ID"),
    (uapi::UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
    (uapi::UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
    (uapi::UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"),
    (uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
    (uapi::UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"),
    (uapi::UFFD_FEATURE_POISON, "POISON"),
    (uapi::UFFD_FEATURE_WP_ASYNC, "WP_ASYNC"),
    (uapi::UFFD_FEATURE_MOVE, "MOVE"),
];

impl Features {
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults.
    pub const WP: Features = Features(uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64);
    /// `UFFD_FEATURE_EVENT_FORK`.
    pub const EVENT_FORK: Features = Features(uapi::UFFD_FEATURE_EVENT_FORK as u64);
    /// `UFFD_FEATURE_EVENT_REMAP`: mremap of registered memory is reported.
    pub const EVENT_REMAP: Features = Features(uapi::UFFD_FEATURE_EVENT_REMAP as u64);
    /// `UFFD_FEATURE_EVENT_REMOVE`: MADV_DONTNEED/REMOVE of registered memory is reported.
    pub const EVENT_REMOVE: Features = Features(uapi::UFFD_FEATURE_EVENT_REMOVE as u64);
    /// `UFFD_FEATURE_EVENT_UNMAP`: munmap of registered memory is reported.
    pub const EVENT_UNMAP: Features = Features(uapi::UFFD_FEATURE_EVENT_UNMAP as u64);
    /// `UFFD_FEATURE_MISSING_HUGETLBFS`.
    pub const MISSING_HUGETLBFS: Features = Features(uapi::UFFD_FEATURE_MISSING_HUGETLBFS as u64);
    /// `UFFD_FEATURE_MISSING_SHMEM`.
    pub const MISSING_SHMEM: Features = Features(uapi::UFFD_FEATURE_MISSING_SHMEM as u64);
    /// `UFFD_FEATURE_MINOR_HUGETLBFS`.
    pub const MINOR_HUGETLBFS: Features = Features(uapi::UFFD_FEATURE_MINOR_HUGETLBFS as u64);
    /// `UFFD_FEATURE_MINOR_SHMEM`.
    pub const MINOR_SHMEM: Features = Features(uapi::UFFD_FEATURE_MINOR_SHMEM as u64);
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: WP on shmem and hugetlb.
    pub const WP_HUGETLBFS_SHMEM: Features = Features(uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64);
    /// `UFFD_FEATURE_WP_UNPOPULATED`: WP applies to not-yet-populated anon pages too.
    pub const WP_UNPOPULATED: Features = Features(uapi::UFFD_FEATURE_WP_UNPOPULATED as u64);
    /// `UFFD_FEATURE_THREAD_ID`: page faults name the faulting thread.
    pub const THREAD_ID: Features = Features(uapi::UFFD_FEATURE_THREAD_ID as u64);
    /// `UFFD_FEATURE_POISON`: UFFDIO_POISON.
    pub const POISON: Features = Features(uapi::UFFD_FEATURE_POISON as u64);

    /// Both sets' bits.
    pub const fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }

    /// Whether every bit of `other` is set in `self`.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    /// Uapi names of the set bits, comma-separated (unknown bits as hex).
    pub fn names(self) -> String {
        let mut names: Vec<String> = Vec::new();
        let mut rest = self.0;
        for &(bit, name) in FEATURE_NAMES {
            if rest & bit as u64 != 0 {
                names.push(name.to_string());
                rest &= !(bit as u64);
            }
        }
        if rest != 0 {
            names.push(format!("{rest:#x}"));
        }
        names.join(", ")
    }
}

/// Registration modes (`UFFDIO_REGISTER_MODE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegisterMode {
    /// Report faults on missing pages.
    pub missing: bool,
    /// Report faults on pages present in the page cache but not mapped (shmem/hugetlb).
    pub minor: bool,
    /// Report writes to write-protected pages.
    pub wp: bool,
}

impl RegisterMode {
    pub(super) fn bits(self) -> u64 {
        let mut m = 0;
        if self.missing {
            m |= uapi::UFFDIO_REGISTER_MODE_MISSING;
        }
        if self.minor {
            m |= uapi::UFFDIO_REGISTER_MODE_MINOR;
        }
        if self.wp {
            m |= uapi::UFFDIO_REGISTER_MODE_WP;
        }
        m as u64
    }
}

/// The ioctls a registered range supports (bit `_UFFDIO_*` set in the mask the kernel
/// returned from UFFDIO_REGISTER).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeIoctls(pub u64);

impl RangeIoctls {
    fn has(self, nr: u32) -> bool {
        self.0 & (1u64 << nr) != 0
    }
    /// UFFDIO_COPY is supported.
    pub fn copy(self) -> bool {
        self.has(uapi::_UFFDIO_COPY)
    }
    /// UFFDIO_ZEROPAGE is supported (not on hugetlb).
    pub fn zeropage(self) -> bool {
        self.has(uapi::_UFFDIO_ZEROPAGE)
    }
    /// UFFDIO_CONTINUE is supported.
    pub fn continue_(self) -> bool {
        self.has(uapi::_UFFDIO_CONTINUE)
    }
    /// UFFDIO_WRITEPROTECT is supported.
    pub fn writeprotect(self) -> bool {
        self.has(uapi::_UFFDIO_WRITEPROTECT)
    }
    /// UFFDIO_POISON is supported.
    pub fn poison(self) -> bool {
        self.has(uapi::_UFFDIO_POISON)
    }
}

/// What a fill ioctl (COPY / ZEROPAGE / CONTINUE / POISON) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOutcome {
    /// The whole range was filled (and its waiters woken, unless DONTWAKE was asked).
    Filled,
    /// `EEXIST`: the page was already there — someone else resolved it. Nothing was
    /// filled; the caller must `wake()` the range so the faulting thread retries.
    AlreadyFilled,
    /// `EAGAIN`: the address space is changing (a REMOVE/UNMAP event is pending) or the
    /// fill stopped part-way. `filled_bytes` from the start were filled (and woken); the
    /// caller must read pending events first, then retry the rest.
    MmChanging {
        /// Bytes filled from the start of the range before the kernel stopped.
        filled_bytes: u64,
    },
}

/// A decoded userfaultfd event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted on a registered page and waits for it to be resolved.
    PageFault {
        /// The faulting host address (page-aligned unless EXACT_ADDRESS; hugetlb faults
        /// are reported at the huge page's address).
        address: u64,
        /// The access was a write.
        write: bool,
        /// A write to a write-protected page.
        wp: bool,
        /// A minor fault (page in the page cache, not mapped).
        minor: bool,
        /// The faulting thread's id (`UFFD_FEATURE_THREAD_ID`; 0 without it).
        thread: u32,
    },
    /// Pages in `[start, end)` were dropped (MADV_DONTNEED / MADV_REMOVE).
    Remove {
        /// First host address.
        start: u64,
        /// One past the last host address.
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// First host address.
        start: u64,
        /// One past the last host address.
        end: u64,
    },
    /// A registered area moved (mremap).
    Remap {
        /// Old host address.
        from: u64,
        /// New host address.
        to: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The process forked; `child_uffd` is a new userfaultfd for the child.
    Fork {
        /// The raw fd number of the child's userfaultfd (now owned by the reader).
        child_uffd: i32,
    },
}
