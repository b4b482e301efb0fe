//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`, else `KVM_CAP_DIRTY_LOG_RING`):
//! instead of a bitmap per memslot, every vCPU has a ring of the pages it dirtied, mapped
//! from its fd at `KVM_DIRTY_LOG_PAGE_OFFSET`. KVM pushes an entry (slot, page) and sets
//! its `DIRTY` flag; the VMM reads entries in order from its own index, sets `RESET` on
//! each one it collected, and `KVM_RESET_DIRTY_RINGS` hands them back to KVM (which
//! write-protects those pages again). A vCPU whose ring reaches its soft limit exits with
//! `KVM_EXIT_DIRTY_RING_FULL`; its thread collects every ring ([`DirtyRings::on_full`])
//! and enters again, so nothing is lost and nothing waits for the migration thread.
//!
//! The ring is a property of the VM: it must be enabled before any vCPU exists, and
//! without `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` (not offered by every host) the slots of
//! such a VM have no `KVM_GET_DIRTY_LOG`. So [`super::Vm`]'s dirty-tracking methods
//! (`enable_dirty_log`, `take_dirty_pages`, `disable_dirty_log`) go through the ring on a
//! ring VM and through the log otherwise; callers (snapshots, migration) see one tracker.
//!
//! Collected entries land in a bitmap per memslot ([`DirtyRings::take_slot`] takes one),
//! so collecting early (on a full ring) keeps them for the next harvest, and a page
//! dirtied twice is counted once.
//!
//! kvm-ioctls maps no ring and has no `KVM_RESET_DIRTY_RINGS`: both are here, over libc
//! and kvm-bindings.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_dirty_gfn, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;

mod ioctls {
    #![allow(missing_docs)]
    use kvm_bindings::KVMIO;
    vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use ioctls::KVM_RESET_DIRTY_RINGS;

/// An entry KVM has filled (`KVM_DIRTY_GFN_F_DIRTY`).
const GFN_DIRTY: u32 = 1;
/// An entry the VMM has collected (`KVM_DIRTY_GFN_F_RESET`).
const GFN_RESET: u32 = 2;
/// Bytes of one ring entry.
const ENTRY_BYTES: u32 = std::mem::size_of::<kvm_dirty_gfn>() as u32;
/// KVM's smallest ring: one page of entries (it also keeps some entries in reserve).
pub const MIN_ENTRIES: u32 = 4096 / ENTRY_BYTES;
/// KVM's largest ring (`KVM_DIRTY_RING_MAX_ENTRIES`).
pub const MAX_ENTRIES: u32 = 65536;

/// Errors setting up or harvesting the dirty ring.
#[derive(Debug, thiserror::Error)]
pub enum DirtyRingError {
    /// The host's KVM has no dirty ring.
    #[error("this host's KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING); start the VM without --dirty-ring and migrate with --dirty-tracking log")]
    Unsupported,
    /// The size is not one KVM takes.
    #[error(
        "--dirty-ring {entries}: must be a power of two from {MIN_ENTRIES} to {max} entries per vCPU on this host"
    )]
    BadSize {
        /// What was asked.
        entries: u32,
        /// The host's largest.
        max: u32,
    },
    /// KVM refused to enable it.
    #[error("cannot enable KVM's dirty ring ({entries} entries per vCPU): {source} (it must be enabled before any vCPU exists)")]
    Enable {
        /// What was asked.
        entries: u32,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// A syscall on the VM or a vCPU failed.
    #[error("dirty ring: {what} failed: {source}")]
    Os {
        /// The step.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// One vCPU's ring, mapped from its fd.
struct Ring {
    gfns: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// The next entry to look at (free-running; the index is `next % entries`).
    next: u32,
}

// SAFETY: the mapping is shared memory owned by this struct (unmapped on drop); all
// access to it goes through `DirtyRings`'s mutex, so moving it between threads is sound.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the address and length are those of the mapping made in `add_vcpu`,
        // which nothing else references (Ring owns it and is being dropped).
        unsafe { libc::munmap(self.gfns.as_ptr().cast(), (self.entries * ENTRY_BYTES) as usize) };
    }
}

impl Ring {
    fn flags(&self, index: u32) -> &AtomicU32 {
        let index = (index % self.entries) as usize;
        // SAFETY: `index < entries`, so the entry lies inside the live mapping; `flags`
        // is a naturally aligned u32 in shared memory KVM writes concurrently, accessed
        // only atomically here.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.gfns.as_ptr().add(index)).flags)) }
    }

    /// After a collection: if the entry due next is empty but a later one is filled, KVM
    /// overran the ring; marks the empty ones collected and moves on to the filled one.
    fn resync(&mut self) -> bool {
        let Some(skip) =
            (1..self.entries).find(|&i| self.flags(self.next.wrapping_add(i)).load(Ordering::Acquire) & GFN_DIRTY != 0)
        else {
            return false;
        };
        for i in 0..skip {
            self.flags(self.next.wrapping_add(i)).store(GFN_RESET, Ordering::Release);
        }
        self.next = self.next.wrapping_add(skip);
        true
    }
}

#[derive(Default)]
struct Collected {
    rings: Vec<Ring>,
    /// Per memslot, one bit per 4 KiB page: collected from the rings, not yet taken.
    pending: Vec<Vec<u64>>,
}

/// The dirty rings of one VM: every vCPU's mapping, the pages collected from them, and
/// counters.
pub struct DirtyRings {
    entries: u32,
    vm_fd: OwnedFd,
    collected: Mutex<Collected>,
    full_exits: AtomicU64,
    harvested: AtomicU64,
    overflows: AtomicU64,
}

/// What the rings have done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirtyRingCounts {
    /// Entries per vCPU ring.
    pub entries: u32,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits the vCPU threads served.
    pub full_exits: u64,
    /// Entries collected from all rings.
    pub harvested: u64,
    /// Times a ring was found overrun (KVM wrote past it without a full exit): pages
    /// dirtied then may be lost, so a harvest spanning one cannot be trusted.
    pub overflows: u64,
}

impl DirtyRings {
    /// Enables the dirty ring on `vm` (no vCPU may exist yet) with `entries` per vCPU.
    pub fn enable(vm: &VmFd, entries: u32) -> Result<Self, DirtyRingError> {
        // The acquire/release flavour is the one for weakly ordered hosts; x86 offers both.
        let (cap, max_bytes) = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
            .into_iter()
            .map(|cap| (cap, vm.check_extension_raw(cap.into())))
            .find(|&(_, bytes)| bytes > 0)
            .ok_or(DirtyRingError::Unsupported)?;
        let max = (max_bytes as u32 / ENTRY_BYTES).min(MAX_ENTRIES);
        if !entries.is_power_of_two() || !(MIN_ENTRIES..=max).contains(&entries) {
            return Err(DirtyRingError::BadSize { entries, max });
        }
        let enable = kvm_bindings::kvm_enable_cap {
            cap,
            args: [u64::from(entries * ENTRY_BYTES), 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&enable).map_err(|source| DirtyRingError::Enable { entries, source })?;
        // SAFETY: dup of a valid, open fd (the VM's); the new fd is owned here.
        let dup = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(DirtyRingError::Os { what: "duplicating the VM fd", source: std::io::Error::last_os_error() });
        }
        Ok(DirtyRings {
            entries,
            // SAFETY: `dup` is a fresh fd nobody else owns.
            vm_fd: unsafe { OwnedFd::from_raw_fd(dup) },
            collected: Mutex::new(Collected::default()),
            full_exits: AtomicU64::new(0),
            harvested: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
        })
    }

    /// Maps the ring of a vCPU just created; returns its index (for [`DirtyRings::on_full`]).
    pub fn add_vcpu(&self, vcpu: &VcpuFd) -> Result<usize, DirtyRingError> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as libc::off_t;
        let bytes = (self.entries * ENTRY_BYTES) as usize;
        // SAFETY: a fresh shared mapping of the vCPU fd at the offset KVM documents for
        // the ring, of the size the VM was enabled with; nothing else is overwritten
        // (the kernel picks the address). The mapping keeps the vCPU file open.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * page,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(DirtyRingError::Os { what: "mapping a vCPU's ring", source: std::io::Error::last_os_error() });
        }
        let gfns = NonNull::new(addr.cast()).expect("mmap does not return null on success");
        let mut collected = self.lock();
        collected.rings.push(Ring { gfns, entries: self.entries, next: 0 });
        Ok(collected.rings.len() - 1)
    }

    /// Entries per vCPU.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// The counters so far.
    pub fn counts(&self) -> DirtyRingCounts {
        DirtyRingCounts {
            entries: self.entries,
            full_exits: self.full_exits.load(Ordering::Relaxed),
            harvested: self.harvested.load(Ordering::Relaxed),
            overflows: self.overflows.load(Ordering::Relaxed),
        }
    }

    /// vCPU `ring` exited with `KVM_EXIT_DIRTY_RING_FULL`: collect every ring (waiting
    /// for a harvest in progress) so it can enter again.
    ///
    /// If its ring holds filled entries but none where the next one is due, KVM pushed
    /// past the ring without a full exit (seen on hosts whose KVM emulates a run of guest
    /// instructions without checking its requests: kernel warning in
    /// `kvm_dirty_ring_push`). The oldest entries were overwritten and KVM's reset index
    /// now sits on an empty entry, so no reset could ever free the ring again and the
    /// vCPU would exit forever. The empty entries are marked collected (KVM's reset walks
    /// past them), collection goes on from the first filled one, and the overflow is
    /// counted: whoever harvests across it must not trust the pages.
    pub fn on_full(&self, ring: usize) -> Result<(), DirtyRingError> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        let mut collected = self.lock();
        self.collect(&mut collected)?;
        if let Some(ring) = collected.rings.get_mut(ring) {
            if ring.resync() {
                self.overflows.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("a dirty ring was overrun by KVM: pages dirtied meanwhile may be lost");
                self.collect(&mut collected)?;
            }
        }
        Ok(())
    }

    /// Collects every ring, then takes (and clears) the pages of memslot `slot` collected
    /// so far, as page indices within the slot in ascending order.
    pub fn take_slot(&self, slot: usize) -> Result<Vec<u64>, DirtyRingError> {
        let mut collected = self.lock();
        self.collect(&mut collected)?;
        let Some(bitmap) = collected.pending.get_mut(slot) else { return Ok(Vec::new()) };
        let bitmap = std::mem::take(bitmap);
        Ok(bitmap
            .iter()
            .enumerate()
            .flat_map(|(word, &bits)| {
                (0..64).filter(move |bit| bits & (1 << bit) != 0).map(move |bit| word as u64 * 64 + bit)
            })
            .collect())
    }

    /// Drops what was collected and not taken (logging was switched off).
    pub fn forget(&self) -> Result<(), DirtyRingError> {
        let mut collected = self.lock();
        self.collect(&mut collected)?;
        collected.pending.clear();
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Collected> {
        self.collected.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves every filled entry of every ring into `pending`, marks them collected and
    /// gives them back to KVM.
    fn collect(&self, collected: &mut Collected) -> Result<(), DirtyRingError> {
        let Collected { rings, pending } = collected;
        let mut taken = 0u64;
        for ring in rings.iter_mut() {
            let first = ring.next;
            loop {
                // Acquire pairs with KVM's release of the entry (ACQ_REL protocol).
                let flags = ring.flags(ring.next);
                if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                    break;
                }
                // SAFETY: `next % entries < entries`: inside the live mapping.
                let entry = unsafe { ring.gfns.as_ptr().add((ring.next % ring.entries) as usize) };
                // SAFETY: a published entry (DIRTY seen with acquire): KVM does not touch
                // slot and offset again until the entry is reset.
                let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
                // Address space 0 only (1 is SMM's, which this VMM never enables).
                if slot >> 16 == 0 {
                    let (slot, word, bit) = ((slot & 0xffff) as usize, (offset / 64) as usize, offset % 64);
                    if pending.len() <= slot {
                        pending.resize_with(slot + 1, Vec::new);
                    }
                    if pending[slot].len() <= word {
                        pending[slot].resize(word + 1, 0);
                    }
                    pending[slot][word] |= 1 << bit;
                }
                flags.store(GFN_RESET, Ordering::Release);
                ring.next = ring.next.wrapping_add(1);
                taken += 1;
            }
            // A whole ring filled at once: KVM went past its soft limit by the whole
            // reserve instead of exiting, so any later push overwrote an entry.
            if ring.next.wrapping_sub(first) >= ring.entries {
                self.overflows.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("a dirty ring was found full (KVM did not exit at its soft limit): pages may be lost");
            }
        }
        if taken == 0 {
            return Ok(());
        }
        self.harvested.fetch_add(taken, Ordering::Relaxed);
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the fd is the VM's (a dup).
        let ret = unsafe { ioctl(&self.vm_fd, KVM_RESET_DIRTY_RINGS()) };
        if ret < 0 {
            return Err(DirtyRingError::Os { what: "KVM_RESET_DIRTY_RINGS", source: std::io::Error::last_os_error() });
        }
        Ok(())
    }
}
