//! KVM's dirty log for a VM's memslots, in the manual-protect mode
//! (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): logging is switched on per slot, reading the
//! log (`KVM_GET_DIRTY_LOG`) does not reset it, and `KVM_CLEAR_DIRTY_LOG` resets (and
//! write-protects again) exactly the pages harvested. Used by diff snapshots; pre-copy
//! migration harvests the same way.
//!
//! These methods are the VM's one dirty-page tracker: start ([`Vm::enable_dirty_log`]),
//! harvest ([`Vm::take_dirty_pages`]), stop ([`Vm::disable_dirty_log`]). On a VM made
//! with KVM's dirty ring ([`Vm::enable_dirty_ring`], `super::dirty_ring`) they go
//! through the ring instead, since such a VM's slots have no `KVM_GET_DIRTY_LOG`; the
//! callers see the same pages either way.
//!
//! kvm-ioctls has no wrapper for `KVM_CLEAR_DIRTY_LOG`, so its ioctl is issued here.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use vmm_sys_util::ioctl::ioctl_with_ref;

use super::vm::{Vm, VmError};

mod ioctls {
    #![allow(missing_docs)]
    use kvm_bindings::{kvm_clear_dirty_log, KVMIO};
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}
use ioctls::KVM_CLEAR_DIRTY_LOG;

/// The manual-protect mode without "initially all set": a freshly logged slot starts
/// clean.
const MANUAL_PROTECT_ENABLE: u64 = 1;

impl Vm {
    /// True once dirty logging is on for every memslot.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// Switches dirty logging on for every memslot (manual-protect mode). From now on
    /// every guest write to a page is logged until [`Vm::take_dirty_pages`] harvests it.
    pub fn enable_dirty_log(&mut self) -> Result<(), VmError> {
        if self.dirty_logging {
            return Ok(());
        }
        if self.dirty_rings.is_none() {
            self.enable_manual_protect()?;
        }
        self.set_log_flag(KVM_MEM_LOG_DIRTY_PAGES)?;
        self.dirty_logging = true;
        Ok(())
    }

    /// Switches dirty logging off for every memslot and drops what was not harvested.
    pub fn disable_dirty_log(&mut self) -> Result<(), VmError> {
        if !self.dirty_logging {
            return Ok(());
        }
        self.set_log_flag(0)?;
        if let Some(rings) = &self.dirty_rings {
            rings.forget()?;
        }
        self.dirty_logging = false;
        Ok(())
    }

    /// Which tracker this VM's dirty pages go through: `"ring"` or `"log"`.
    pub fn dirty_tracker(&self) -> &'static str {
        match self.dirty_rings {
            Some(_) => "ring",
            None => "log",
        }
    }

    fn enable_manual_protect(&mut self) -> Result<(), VmError> {
        let cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [MANUAL_PROTECT_ENABLE, 0, 0, 0],
            ..Default::default()
        };
        self.fd
            .enable_cap(&cap)
            .map_err(|source| VmError::Setup { what: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", source })
    }

    fn set_log_flag(&mut self, flags: u32) -> Result<(), VmError> {
        for index in 0..self.slots.len() {
            let slot = kvm_userspace_memory_region { flags, ..self.slots[index] };
            // SAFETY: the same slot, addresses and host range as registered in `Vm::new`
            // (a live mapping owned by guest RAM, which outlives the VM); only the flags
            // change.
            unsafe { self.fd.set_user_memory_region(slot) }.map_err(|source| VmError::Memslot {
                gpa: slot.guest_phys_addr,
                size_bytes: slot.memory_size,
                source,
            })?;
            self.slots[index] = slot;
        }
        Ok(())
    }

    /// The 4 KiB pages of memslot `slot` written since logging began or since the last
    /// harvest (page indices within the slot), and resets exactly those in the log.
    /// On a ring VM: every ring is collected and the slot's pages collected so far are
    /// taken.
    pub fn take_dirty_pages(&self, slot: usize) -> Result<Vec<u64>, VmError> {
        if let Some(rings) = &self.dirty_rings {
            return Ok(rings.take_slot(slot)?);
        }
        let region = self.slots[slot];
        let setup = |what| move |source| VmError::Setup { what, source };
        let mut bitmap =
            self.fd.get_dirty_log(slot as u32, region.memory_size as usize).map_err(setup("KVM_GET_DIRTY_LOG"))?;
        // Word by word, set bits only (the scan may run inside a pause).
        let mut pages = Vec::new();
        for (word, &bits) in bitmap.iter().enumerate().filter(|(_, bits)| **bits != 0) {
            let mut bits = bits;
            while bits != 0 {
                pages.push(word as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        if pages.is_empty() {
            return Ok(pages);
        }
        let mut clear = kvm_clear_dirty_log {
            slot: slot as u32,
            num_pages: (region.memory_size / 4096) as u32,
            first_page: 0,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: KVM reads `num_pages` bits from `dirty_bitmap`, which get_dirty_log sized
        // for the whole slot (one bit per 4 KiB page, rounded up to 64); the struct and
        // the bitmap live across the call.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(VmError::Setup { what: "KVM_CLEAR_DIRTY_LOG", source: kvm_ioctls::Error::last() });
        }
        Ok(pages)
    }
}
