//! A malicious (or broken) driver: bad PFNs, descriptors outside RAM, loops, overlong
//! chains, wrong directions, bad lengths, indirect tables never offered, avail indices that
//! run ahead or repeat. The VMM must not panic, must not touch memory outside guest RAM or
//! any page it was not given, and must report the error (DEVICE_NEEDS_RESET) or count it.

use super::*;
use crate::devices::virtio::status;
use crate::devices::virtio::test_driver::{reg, INDIRECT, NEXT, WRITE};

const RAM: u64 = 16 << 20;
/// Pages with a pattern that no case may change.
const GUARDED: u64 = 16;

/// A fresh rig with an activated balloon (queues of 8) and [`GUARDED`] patterned pages.
fn setup() -> (Rig, Queues) {
    let rig = Rig::new(RAM, Backend::Anon, BalloonConfig::default());
    let qs = activate(&rig, ALL, 8);
    for i in 0..GUARDED {
        rig.fill_page(DATA + i * PAGE_4K);
    }
    (rig, qs)
}

fn guarded_intact(rig: &Rig) -> bool {
    (0..GUARDED).all(|i| rig.page_has_pattern(DATA + i * PAGE_4K))
}

/// Runs a malformed request built by `build` against the inflate queue and checks the
/// device refused it: DEVICE_NEEDS_RESET, a config interrupt, nothing used, nothing
/// discarded, the error recorded. Then checks further notifies are ignored until a reset,
/// after which the device works again.
fn refused(what: &str, build: impl FnOnce(&Rig, &mut VirtQueue)) {
    let (rig, mut qs) = setup();
    build(&rig, &mut qs.inflate);
    rig.interrupt.ack(u32::MAX);
    rig.driver().notify(0);
    assert!(rig.needs_reset(), "{what}: the device did not ask for a reset");
    assert_ne!(rig.driver().status() & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(
        rig.interrupt.status() & crate::devices::virtio::interrupt::INT_CONFIG,
        0,
        "{what}: no config interrupt"
    );
    assert_eq!(qs.inflate.used_idx(rig.mem()), 0, "{what}: a refused request was used");
    assert!(guarded_intact(&rig), "{what}: a guarded page changed");
    let c = rig.balloon.counters();
    assert_eq!((c.inflated_pages, c.bytes_discarded, c.device_errors), (0, 0, 1), "{what}");
    eprintln!("{what}: {}", c.last_error.unwrap_or_default());
    // Stopped: a good request now is ignored.
    send_pfns(&rig, &mut qs.inflate, &[pfn(DATA)]);
    assert!(guarded_intact(&rig), "{what}: processed after NEEDS_RESET");
    assert!(rig.transport.lock().unwrap().counters().ignored_notifies >= 1);
    // A reset and a fresh start work.
    let mut qs = activate(&rig, ALL, 8);
    assert!(!rig.needs_reset());
    send_pfns(&rig, &mut qs.inflate, &[pfn(DATA)]);
    assert!(rig.page_is_zero(DATA), "{what}: the device did not work after a reset");
    assert!(rig.page_has_pattern(DATA + PAGE_4K));
}

#[test]
fn pfns_beyond_ram_or_in_the_mmio_hole_are_skipped_and_counted() {
    let (rig, mut qs) = setup();
    let bad = [pfn(RAM), pfn(0xc000_0000), pfn(0xd000_0000), u32::MAX, pfn(RAM) + 1];
    let mut pfns = vec![pfn(DATA + 3 * PAGE_4K)];
    pfns.extend_from_slice(&bad);
    pfns.push(pfn(DATA + 5 * PAGE_4K));
    send_pfns(&rig, &mut qs.inflate, &pfns);
    assert!(!rig.needs_reset(), "bad PFNs are skipped, not fatal");
    assert_eq!(qs.inflate.used_idx(rig.mem()), 1);
    let c = rig.balloon.counters();
    assert_eq!((c.invalid_pfns, c.inflated_pages, c.ballooned_pages), (bad.len() as u64, 2, 2));
    for i in 0..GUARDED {
        let gpa = DATA + i * PAGE_4K;
        assert_eq!(rig.page_is_zero(gpa), i == 3 || i == 5, "page {i}");
        assert_eq!(rig.page_has_pattern(gpa), i != 3 && i != 5, "page {i}");
    }
    // The same on deflate.
    send_pfns(&rig, &mut qs.deflate, &bad);
    assert_eq!(rig.balloon.counters().invalid_pfns, 2 * bad.len() as u64);
    assert!(!rig.needs_reset());
}

#[test]
fn descriptor_outside_guest_ram_is_refused() {
    refused("buffer past the end of RAM", |rig, q| {
        q.add_chain(rig.mem(), &[(RAM - 4, 8, false)]);
    });
    refused("buffer in the MMIO hole", |rig, q| {
        q.add_chain(rig.mem(), &[(0xd000_0000, 4, false)]);
    });
    refused("buffer whose end wraps around", |rig, q| {
        q.add_chain(rig.mem(), &[(u64::MAX - 3, 8, false)]);
    });
}

#[test]
fn descriptor_loop_is_refused() {
    refused("two descriptors pointing at each other", |rig, q| {
        let len = write_pfns(rig, BUFFERS, &[pfn(DATA)]);
        q.write_desc(rig.mem(), 0, BUFFERS, len, NEXT, 1);
        q.write_desc(rig.mem(), 1, BUFFERS, len, NEXT, 0);
        q.push_avail(rig.mem(), 0);
    });
    refused("a descriptor pointing at itself", |rig, q| {
        q.write_desc(rig.mem(), 3, BUFFERS, 4, NEXT, 3);
        q.push_avail(rig.mem(), 3);
    });
}

#[test]
fn chain_longer_than_the_queue_or_past_its_table_is_refused() {
    refused("next index past the queue", |rig, q| {
        for i in 0..8 {
            q.write_desc(rig.mem(), i, BUFFERS, 4, NEXT, i + 1);
        }
        q.push_avail(rig.mem(), 0);
    });
    refused("head index past the queue", |rig, q| {
        q.push_avail(rig.mem(), 300);
    });
}

#[test]
fn write_only_descriptor_where_the_device_reads_is_refused() {
    refused("device-writable PFN array", |rig, q| {
        let len = write_pfns(rig, BUFFERS, &[pfn(DATA), pfn(DATA + PAGE_4K)]);
        q.add_chain(rig.mem(), &[(BUFFERS, len, true)]);
    });
    refused("readable after writable", |rig, q| {
        let len = write_pfns(rig, BUFFERS, &[pfn(DATA)]);
        q.write_desc(rig.mem(), 0, BUFFERS, len, NEXT | WRITE, 1);
        q.write_desc(rig.mem(), 1, BUFFERS, len, 0, 0);
        q.push_avail(rig.mem(), 0);
    });
}

#[test]
fn pfn_array_length_not_a_multiple_of_4_is_refused_before_any_discard() {
    refused("6-byte PFN array", |rig, q| {
        write_pfns(rig, BUFFERS, &[pfn(DATA), pfn(DATA + PAGE_4K)]);
        q.add_chain(rig.mem(), &[(BUFFERS, 6, false)]);
    });
}

#[test]
fn indirect_descriptor_never_offered_is_refused() {
    refused("indirect table", |rig, q| {
        write_pfns(rig, BUFFERS, &[pfn(DATA)]);
        q.write_desc(rig.mem(), 0, BUFFERS + 0x100, 16, INDIRECT, 0);
        rig.mem()
            .write_obj(virtio_queue::desc::split::Descriptor::new(BUFFERS, 4, 0, 0), GuestAddress(BUFFERS + 0x100))
            .unwrap();
        q.push_avail(rig.mem(), 0);
    });
}

#[test]
fn avail_index_running_ahead_or_repeating_a_head_is_refused() {
    refused("avail index ahead by more than the queue size", |rig, q| {
        q.add_chain(rig.mem(), &[(BUFFERS, 4, false)]);
        q.set_avail_idx(rig.mem(), 9);
    });
    refused("avail index moved backwards", |rig, q| {
        let len = write_pfns(rig, BUFFERS, &[pfn(RAM)]);
        q.add_chain(rig.mem(), &[(BUFFERS, len, false)]);
        rig.driver().notify(0);
        assert_eq!(q.used_idx(rig.mem()), 1, "the first, good request is used");
        q.set_avail_idx(rig.mem(), 0);
        // (`refused` then expects nothing new in the used ring: rewind our view of it.)
        rig.mem().write_obj(0u16, GuestAddress(q.used + 2)).unwrap();
    });
    refused("the same head made available twice in one batch", |rig, q| {
        let len = write_pfns(rig, BUFFERS, &[pfn(DATA)]);
        let head = q.add_chain(rig.mem(), &[(BUFFERS, len, false)]);
        q.push_avail(rig.mem(), head);
    });
}

#[test]
fn reordered_heads_are_processed_in_ring_order() {
    // Heads need not be in table order: the driver may reuse descriptors in any order.
    let (rig, mut qs) = setup();
    let first = write_pfns(&rig, BUFFERS, &[pfn(DATA)]);
    let second = write_pfns(&rig, BUFFERS + 0x100, &[pfn(DATA + PAGE_4K)]);
    qs.inflate.write_desc(rig.mem(), 5, BUFFERS, first, 0, 0);
    qs.inflate.write_desc(rig.mem(), 2, BUFFERS + 0x100, second, 0, 0);
    qs.inflate.push_avail(rig.mem(), 5);
    qs.inflate.push_avail(rig.mem(), 2);
    rig.driver().notify(0);
    assert!(!rig.needs_reset());
    assert_eq!((qs.inflate.used_elem(rig.mem(), 0).0, qs.inflate.used_elem(rig.mem(), 1).0), (5, 2));
    assert!(rig.page_is_zero(DATA) && rig.page_is_zero(DATA + PAGE_4K));
    assert!(rig.page_has_pattern(DATA + 2 * PAGE_4K));
}

#[test]
fn reporting_a_misaligned_range_is_refused_and_nothing_is_freed() {
    let (rig, mut qs) = setup();
    let q = qs.reporting.as_mut().unwrap();
    q.add_chain(rig.mem(), &[(DATA + 0x800, PAGE_4K as u32, true)]);
    rig.driver().notify(q.index);
    assert!(rig.needs_reset());
    assert!(guarded_intact(&rig));
    assert_eq!(rig.balloon.counters().reported_pages, 0);
}

#[test]
fn writes_to_a_live_queue_are_ignored() {
    let (rig, mut qs) = setup();
    let d = rig.driver();
    d.write(reg::QUEUE_SEL, 0);
    d.write(reg::QUEUE_DESC_LOW, 0xdead_0000);
    d.write(reg::QUEUE_NUM, 2);
    send_pfns(&rig, &mut qs.inflate, &[pfn(DATA)]);
    assert!(rig.page_is_zero(DATA), "the queue kept its setup");
    assert!(rig.transport.lock().unwrap().counters().bad_accesses >= 2);
}
