//! What a host-change run sets up on the host before the VM is built, and puts back after
//! it is gone: the lock that serialises such runs, a private zram swap device (swap), KSM
//! scanning fast (ksm), and SIGINT/SIGTERM caught so an interrupted run still restores.

use crate::config::{HostChangeKind, VmConfig};
use crate::host::ksm::KsmScanner;
use crate::host::lock::HostLock;
use crate::host::memcg::MemcgSqueeze;
use crate::host::zram::ZramSwap;
use crate::host::{interrupt, HostError};

/// KSM pages scanned per wake-up while a run merges.
pub const KSM_PAGES_TO_SCAN: u64 = 4096;
/// KSM's sleep between scans while a run merges, milliseconds.
pub const KSM_SLEEP_MS: u64 = 10;

/// The host set up for a host-change run. Dropping it restores everything, in reverse
/// order of setup (the lock last).
#[derive(Debug)]
pub struct HostSession {
    // Fields drop in declaration order: settings first, the lock last.
    memcg: Option<MemcgSqueeze>,
    ksm: Option<KsmScanner>,
    zram: Option<ZramSwap>,
    _lock: HostLock,
    /// What was set up, for the report.
    pub setup: Vec<String>,
}

impl HostSession {
    /// Sets the host up for `kinds`; `guest_ram_bytes` sizes the swap device.
    pub fn start(kinds: &[HostChangeKind], guest_ram_bytes: u64) -> Result<Self, HostError> {
        interrupt::catch();
        let lock = HostLock::acquire()?;
        let mut session = HostSession { memcg: None, ksm: None, zram: None, _lock: lock, setup: Vec::new() };
        if kinds.contains(&HostChangeKind::Swap) {
            // Room for all of guest RAM (zram stores it compressed; the size is a cap).
            let zram = ZramSwap::create(guest_ram_bytes.max(16 << 20))?;
            session.setup.push(format!(
                "swap on {} ({} MiB, priority {})",
                zram.device(),
                zram.size_bytes() >> 20,
                crate::host::zram::SWAP_PRIORITY
            ));
            session.zram = Some(zram);
            // The second way to swap: a memory cgroup of our own to squeeze. Entered
            // before guest RAM exists, so guest pages are charged to it. Optional: a
            // host without one runs page-outs only, and the report says why.
            match MemcgSqueeze::enter() {
                Ok(memcg) => {
                    let version = if memcg.is_v2() { "v2 memory.high" } else { "v1 memory.limit_in_bytes" };
                    session.setup.push(format!("memory cgroup {} ({version})", memcg.dir().display()));
                    session.memcg = Some(memcg);
                }
                Err(e) => session.setup.push(format!("no memory cgroup squeeze: {e}")),
            }
        }
        if kinds.contains(&HostChangeKind::Ksm) {
            session.ksm = Some(KsmScanner::start(KSM_PAGES_TO_SCAN, KSM_SLEEP_MS)?);
            session.setup.push(format!("ksm run=1 pages_to_scan={KSM_PAGES_TO_SCAN} sleep_millisecs={KSM_SLEEP_MS}"));
        }
        Ok(session)
    }

    /// The process's own memory cgroup, when swapping and the host has one.
    pub fn memcg(&self) -> Option<&MemcgSqueeze> {
        self.memcg.as_ref()
    }

    /// The swap device, when swap is one of the kinds.
    pub fn zram(&self) -> Option<&ZramSwap> {
        self.zram.as_ref()
    }
}

/// The host setup a VM's configuration needs: its host changes' kinds and its noise's.
pub fn host_kinds(config: &VmConfig) -> Vec<HostChangeKind> {
    let mut kinds: Vec<_> = config.host_changes.iter().flat_map(|h| h.kinds.iter().copied()).collect();
    kinds.extend(config.host_noise.iter().flat_map(|n| n.host_kinds()));
    kinds.sort_by_key(|k| k.name());
    kinds.dedup();
    kinds
}
