//! The balloon's queues at work: inflate, deflate, statistics and free page reporting.
//!
//! Each notification drains the queue: the heads made available are read first, every
//! chain is validated ([`chain::walk`]), processed, and returned in the used ring. A
//! malformed chain stops processing with a [`DeviceError`] (the transport then sets
//! DEVICE_NEEDS_RESET). A PFN that is not guest RAM is skipped and counted: one bad PFN
//! never stops the others and never reaches a neighbour.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::discard_worker::DiscardWorker;
use super::pages::{runs, BalloonPages, PageError};
use super::state::{add, BalloonEvent, DeviceState};
use super::stats::{self, STAT_ENTRY_BYTES};
use super::QueueIndices;
use crate::devices::virtio::chain::{self, ValidChain};
use crate::devices::virtio::{DeviceError, VirtioInterrupt};
use crate::memory::accounting;
use crate::smmu::discard::Discarder;
use crate::smmu::{GuestRange, Regions, PAGE_4K};

/// PFNs are read this many bytes at a time, so a huge descriptor costs no host memory.
const PFN_CHUNK_BYTES: usize = 4096;
/// Inflated pages collected before their discards are issued even though the
/// notification's chains are not all processed yet (bounds the host memory a driver's
/// huge PFN arrays can make the device hold: 8 bytes a page, 2 MiB here).
const FLUSH_PAGES: u64 = 256 * 1024;
/// The most statistics bytes read from one buffer (the spec defines 16 tags).
const MAX_STATS_BYTES: usize = 64 * STAT_ENTRY_BYTES;

/// The queues and memory of an activated balloon.
pub(super) struct Active {
    pub memory: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub indices: QueueIndices,
    /// The statistics buffer the device holds until it wants fresh statistics.
    pub stats_head: Option<u16>,
}

/// Everything the device's queue processing works on, behind the handle's lock.
pub(super) struct Runtime {
    pub discarder: Discarder,
    pub regions: Arc<Regions>,
    pub pages: BalloonPages,
    pub active: Option<Active>,
    /// Inflated pages whose discard is still to come (see [`Runtime::flush_inflated`]).
    /// Empty between notifications (each one flushes before it returns), so a saved
    /// state never needs it.
    pub pending: PendingInflate,
    /// The statistics buffer a restored device holds, until activation takes it.
    pub restored_stats_head: Option<u16>,
    /// The second thread of large discards.
    pub worker: DiscardWorker,
}

/// Pages put in the balloon whose host memory is not freed yet.
#[derive(Debug, Default)]
pub(super) struct PendingInflate {
    /// 4 KiB pages of 4 KiB regions.
    small: Vec<u64>,
    /// 4 KiB pages of hugetlb regions, by huge page.
    huge: BTreeMap<u64, (GuestRange, Vec<u64>)>,
    /// Pages in both.
    pages: u64,
}

/// What a queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum QueueKind {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

impl Runtime {
    /// Gives the held statistics buffer back to the driver; false if none is held.
    pub fn return_stats_buffer(&mut self, interrupt: &VirtioInterrupt) -> bool {
        let Some(active) = self.active.as_mut() else { return false };
        let (Some(head), Some(index)) = (active.stats_head.take(), active.indices.stats) else { return false };
        let queue = &mut active.queues[index as usize];
        mark_used_ring(&self.discarder, queue);
        match queue.add_used(&active.memory, head, 0) {
            Ok(()) => {
                if driver_wants_interrupt(queue, &active.memory) {
                    interrupt.signal_used();
                }
                true
            }
            Err(e) => {
                tracing::warn!("balloon: cannot return the statistics buffer: {e}");
                false
            }
        }
    }

    /// Processes everything available in queue `index`.
    pub fn process(&mut self, handle: &DeviceState, index: u16) -> Result<(), DeviceError> {
        let Some(active) = self.active.as_mut() else { return Ok(()) };
        let Some(kind) = active.indices.kind(index) else {
            return Err(DeviceError::Queue { queue: index, what: "no such queue".into() });
        };
        let heads = available_heads(&mut active.queues[index as usize], &active.memory, index)?;
        if kind == QueueKind::Stats {
            if let Some(held) = active.stats_head.filter(|h| heads.contains(h)) {
                let what = format!("statistics buffer {held} made available again while the device holds it");
                return Err(DeviceError::Queue { queue: index, what });
            }
        }
        let table = GuestAddress(active.queues[index as usize].desc_table());
        let size = active.queues[index as usize].size();
        let mut done_heads = Vec::with_capacity(heads.len());
        let mut result = Ok(());
        for head in heads {
            let memory = &self.active.as_ref().expect("active").memory;
            let chain = match chain::walk(memory, table, size, head) {
                Ok(chain) => chain,
                Err(source) => {
                    result = Err(DeviceError::Chain { queue: index, source });
                    break;
                }
            };
            let done = match kind {
                QueueKind::Inflate | QueueKind::Deflate => self.balloon_pfns(handle, &chain, index, kind),
                QueueKind::Stats => self.take_stats(handle, &chain, index),
                QueueKind::Reporting => self.report_free(handle, &chain, index),
            };
            if let Err(e) = done {
                result = Err(e);
                break;
            }
            done_heads.push(head);
        }
        // The inflated pages of every chain, discarded in as few host operations as their
        // runs allow, before the driver sees any of those chains used.
        self.flush_inflated(handle);
        if !done_heads.is_empty() {
            mark_used_ring(&self.discarder, &self.active.as_ref().expect("active").queues[index as usize]);
        }
        let mut used = 0;
        for head in done_heads {
            if kind == QueueKind::Stats {
                // Held until the host wants fresh statistics; give back an older one.
                let active = self.active.as_mut().expect("active");
                if let Some(old) = active.stats_head.replace(head) {
                    used += add_used(active, index, old)?;
                }
                continue;
            }
            used += add_used(self.active.as_mut().expect("active"), index, head)?;
        }
        if used > 0 {
            self.notify_driver(handle, index);
        }
        result
    }

    /// Raises the used-buffer interrupt unless the driver suppressed it
    /// (VRING_AVAIL_F_NO_INTERRUPT; a polling driver sets it).
    fn notify_driver(&mut self, handle: &DeviceState, index: u16) {
        let Some(active) = self.active.as_mut() else { return };
        if driver_wants_interrupt(&active.queues[index as usize], &active.memory) {
            handle.interrupt.signal_used();
        }
    }

    /// Processes what every ready queue already holds: Linux's balloon posts its first
    /// statistics buffer (and kicks) before it sets DRIVER_OK, a kick the transport
    /// ignores, so activation must look for it.
    pub fn process_pending(&mut self, handle: &DeviceState) -> Result<(), DeviceError> {
        let ready: Vec<u16> = match self.active.as_ref() {
            Some(active) => (0..active.queues.len() as u16).filter(|&i| active.queues[i as usize].ready()).collect(),
            None => return Ok(()),
        };
        ready.into_iter().try_for_each(|index| self.process(handle, index))
    }

    /// Inflate or deflate: the chain is an array of le32 PFNs.
    fn balloon_pfns(
        &mut self,
        handle: &DeviceState,
        chain: &ValidChain,
        queue: u16,
        kind: QueueKind,
    ) -> Result<(), DeviceError> {
        check_readable(chain, queue)?;
        if let Some(s) = chain.segments.iter().find(|s| s.len % 4 != 0) {
            let what = format!("PFN array of {} bytes at {:#x} is not a whole number of le32 PFNs", s.len, s.addr.0);
            return Err(DeviceError::Request { queue, what });
        }
        let mut buf = vec![0u8; PFN_CHUNK_BYTES];
        for segment in &chain.segments {
            let mut offset = 0usize;
            while offset < segment.len as usize {
                let n = (segment.len as usize - offset).min(PFN_CHUNK_BYTES);
                let addr = GuestAddress(segment.addr.0 + offset as u64);
                let memory = &self.active.as_ref().expect("active").memory;
                memory.read_slice(&mut buf[..n], addr).map_err(|e| DeviceError::Request {
                    queue,
                    what: format!("cannot read PFNs at {:#x}: {e}", addr.0),
                })?;
                let pfns = buf[..n].chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
                match kind {
                    QueueKind::Inflate => self.inflate(handle, pfns),
                    _ => self.deflate(handle, pfns),
                }
                offset += n;
            }
        }
        Ok(())
    }

    /// Puts pages in the balloon; their discards wait in `pending` for
    /// [`Runtime::flush_inflated`] (or until `pending` holds [`FLUSH_PAGES`]).
    fn inflate(&mut self, handle: &DeviceState, pfns: impl Iterator<Item = u32>) {
        if self.pages.count() == 0 {
            handle.notify(BalloonEvent::InflatingFromEmpty);
        }
        // Counted locally and added once: an atomic add per page was a share of the cost.
        let (mut inflated, mut redundant) = (0, 0);
        let any_huge = self.pages.has_huge_regions();
        for pfn in pfns {
            let gpa = (pfn as u64) << 12;
            match self.pages.insert(gpa) {
                Err(PageError::NotRam(_)) => handle.invalid_pfn(pfn as u64),
                Ok(false) => redundant += 1,
                Ok(true) => {
                    inflated += 1;
                    let huge = if any_huge { self.pages.huge_page_of(gpa) } else { None };
                    match huge {
                        Some(page) => {
                            self.pending.huge.entry(page.gpa).or_insert_with(|| (page, Vec::new())).1.push(gpa)
                        }
                        None => self.pending.small.push(gpa),
                    }
                    self.pending.pages += 1;
                }
            }
        }
        add(&handle.counters.inflated, inflated);
        add(&handle.counters.redundant_pfns, redundant);
        if self.pending.pages >= FLUSH_PAGES {
            self.flush_inflated(handle);
        }
    }

    /// Discards what [`Runtime::inflate`] collected: 4 KiB pages as coalesced runs, huge
    /// pages whole once all their 4 KiB pages are in, the rest of a huge page zeroed.
    fn flush_inflated(&mut self, handle: &DeviceState) {
        let pending = std::mem::take(&mut self.pending);
        let small = runs(pending.small);
        if small.iter().map(|r| r.len).sum::<u64>() < PARALLEL_DISCARD_BYTES {
            small.into_iter().for_each(|range| _ = self.discard(handle, range));
        } else {
            // Two host threads zap page tables at once (disjoint ranges: the invalidation
            // layer and the kernel both allow it); the kernel's zap is most of the cost.
            let outcome = self.worker.discard(&self.discarder, small);
            add(&handle.counters.bytes_discarded, outcome.freed);
            for e in outcome.errors {
                add(&handle.counters.discard_errors, 1);
                tracing::warn!("balloon: {e}");
            }
        }
        for (page, gpas) in pending.huge.into_values() {
            if self.pages.huge_page_full(page) {
                if self.discard(handle, page) {
                    add(&handle.counters.huge_freed, 1);
                }
            } else {
                gpas.into_iter().for_each(|gpa| self.zero_if_resident(handle, gpa));
            }
        }
    }

    /// A ballooned 4 KiB page of a huge page that cannot be freed yet still holds the
    /// guest's data; zero it, so every backend gives a deflated page back as zeros. A huge
    /// page not resident in our mapping is skipped: writing would allocate it, and its
    /// first touch gives zeros anyway.
    fn zero_if_resident(&self, handle: &DeviceState, gpa: u64) {
        let Some(region) = self.regions.by_gpa(gpa) else { return };
        let resident = accounting::resident_bytes(region.host_of(gpa), PAGE_4K).unwrap_or(0) > 0;
        let Some(active) = self.active.as_ref().filter(|_| resident) else { return };
        self.discarder.vmm_writes().mark(GuestRange::new(gpa, PAGE_4K));
        match active.memory.write_slice(&[0u8; PAGE_4K as usize], GuestAddress(gpa)) {
            Ok(()) => add(&handle.counters.zeroed, 1),
            Err(e) => tracing::warn!("balloon: cannot zero ballooned page {gpa:#x}: {e}"),
        }
    }

    fn deflate(&mut self, handle: &DeviceState, pfns: impl Iterator<Item = u32>) {
        for pfn in pfns {
            match self.pages.remove((pfn as u64) << 12) {
                Err(PageError::NotRam(_)) => handle.invalid_pfn(pfn as u64),
                Ok(false) => add(&handle.counters.redundant_pfns, 1),
                // The page was discarded: the guest's next touch reads zeros.
                Ok(true) => add(&handle.counters.deflated, 1),
            }
        }
    }

    /// Discards `range` through the invalidation layer; true if memory was freed.
    fn discard(&self, handle: &DeviceState, range: GuestRange) -> bool {
        match self.discarder.discard(range) {
            Ok(report) => {
                let freed: u64 = report.freed.iter().map(|r| r.len).sum();
                add(&handle.counters.bytes_discarded, freed);
                freed > 0
            }
            Err(e) => {
                add(&handle.counters.discard_errors, 1);
                tracing::warn!("balloon: {e}");
                false
            }
        }
    }

    fn take_stats(&mut self, handle: &DeviceState, chain: &ValidChain, queue: u16) -> Result<(), DeviceError> {
        check_readable(chain, queue)?;
        let total: usize = chain.segments.iter().map(|s| s.len as usize).sum();
        if !total.is_multiple_of(STAT_ENTRY_BYTES) {
            let what = format!("statistics buffer of {total} bytes is not a whole number of 10-byte entries");
            return Err(DeviceError::Request { queue, what });
        }
        let memory = &self.active.as_ref().expect("active").memory;
        let mut bytes = Vec::with_capacity(total.min(MAX_STATS_BYTES));
        for s in &chain.segments {
            let n = (s.len as usize).min(MAX_STATS_BYTES - bytes.len());
            let start = bytes.len();
            bytes.resize(start + n, 0);
            memory.read_slice(&mut bytes[start..], s.addr).map_err(|e| DeviceError::Request {
                queue,
                what: format!("cannot read statistics at {:#x}: {e}", s.addr.0),
            })?;
        }
        handle.store_stats(stats::parse(&bytes));
        Ok(())
    }

    /// Free page reporting: each buffer is a free range the guest may reuse later without
    /// telling (it then reads zeros). Accepted in either direction: Linux posts them
    /// device-writable, the contract's guest device-readable.
    fn report_free(&mut self, handle: &DeviceState, chain: &ValidChain, queue: u16) -> Result<(), DeviceError> {
        for s in &chain.segments {
            if !s.addr.0.is_multiple_of(PAGE_4K) || !(s.len as u64).is_multiple_of(PAGE_4K) {
                let what = format!("reported range [{:#x}, +{:#x}) is not 4 KiB aligned", s.addr.0, s.len);
                return Err(DeviceError::Request { queue, what });
            }
        }
        for s in &chain.segments {
            let range = GuestRange::new(s.addr.0, s.len as u64);
            // The walker checked the range is guest RAM; regions are what the discarder
            // knows, so a range vm-memory accepts but the smmu does not is skipped.
            if self.regions.split(range).map(|(_, p)| p.len).sum::<u64>() != range.len {
                handle.invalid_pfn(s.addr.0 >> 12);
                continue;
            }
            self.discard(handle, range);
            add(&handle.counters.reported, range.len / PAGE_4K);
        }
        Ok(())
    }
}

/// Below this many bytes of 4 KiB discards, one thread does them all.
const PARALLEL_DISCARD_BYTES: u64 = 16 << 20;

/// The heads the driver made available since the last pass; refuses an avail index that
/// ran ahead by more than the queue size and a head posted twice in one batch.
fn available_heads(queue: &mut Queue, memory: &GuestMemoryMmap, index: u16) -> Result<Vec<u16>, DeviceError> {
    let broken = |what: String| DeviceError::Queue { queue: index, what };
    let iter = queue.iter(memory).map_err(|e| broken(e.to_string()))?;
    let mut heads = Vec::new();
    let mut seen = BTreeSet::new();
    for chain in iter {
        let head = chain.head_index();
        if !seen.insert(head) {
            return Err(broken(format!("descriptor {head} made available twice without being used")));
        }
        heads.push(head);
    }
    Ok(heads)
}

/// Whether the driver wants a used-buffer interrupt: not if it set
/// VRING_AVAIL_F_NO_INTERRUPT in the avail ring's flags (virtio-queue 0.18 does not look
/// at that flag, so it is read here; EVENT_IDX is not offered).
fn driver_wants_interrupt(queue: &Queue, memory: &GuestMemoryMmap) -> bool {
    const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
    let flags: u16 = memory.read_obj(GuestAddress(queue.avail_ring())).map(u16::from_le).unwrap_or(0);
    flags & VRING_AVAIL_F_NO_INTERRUPT == 0
}

fn check_readable(chain: &ValidChain, queue: u16) -> Result<(), DeviceError> {
    if chain.all_readable() {
        return Ok(());
    }
    let what = format!("chain {} has a device-writable buffer where the device only reads", chain.head);
    Err(DeviceError::Request { queue, what })
}

/// Records the used ring of `queue` (flags, idx, the ring, avail_event) as written by the
/// VMM, for diff snapshots: KVM's dirty log does not see the device's writes.
fn mark_used_ring(discarder: &Discarder, queue: &Queue) {
    let len = 6 + 8 * queue.size() as u64;
    discarder.vmm_writes().mark(GuestRange::new(queue.used_ring(), len));
}

/// Puts `head` in the used ring (nothing written to it); returns 1 for counting.
fn add_used(active: &mut Active, index: u16, head: u16) -> Result<u32, DeviceError> {
    active.queues[index as usize]
        .add_used(&active.memory, head, 0)
        .map_err(|e| DeviceError::Queue { queue: index, what: format!("cannot update the used ring: {e}") })?;
    Ok(1)
}
