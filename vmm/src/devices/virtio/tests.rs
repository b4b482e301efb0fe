//! Transport tests: a driver programs a real balloon through the MMIO bus, over real
//! guest RAM, by register writes only.

use super::balloon::{BalloonConfig, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT, F_MUST_TELL_HOST, F_REPORTING, F_STATS_VQ};
use super::interrupt::{INT_CONFIG, INT_USED_RING};
use super::mmio::virtio_mmio_cmdline_token;
use super::test_driver::{reg, Rig, VirtQueue};
use super::{status, VIRTIO_F_VERSION_1};
use crate::config::Backend;
use vm_memory::Bytes;

const V1: u64 = 1 << VIRTIO_F_VERSION_1;
const ALL: u64 = V1 | 1 << F_MUST_TELL_HOST | 1 << F_STATS_VQ | 1 << F_DEFLATE_ON_OOM | 1 << F_REPORTING;
const RAM: u64 = 16 << 20;

fn rig() -> Rig {
    Rig::new(RAM, Backend::Anon, BalloonConfig::default())
}

#[test]
fn identification_registers_and_offered_features() {
    let rig = rig();
    let d = rig.driver();
    assert_eq!(d.read(reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.read(reg::VERSION), 2);
    assert_eq!(d.read(reg::DEVICE_ID), 5);
    assert_eq!(d.device_features(), ALL);
    assert_eq!(d.device_features() & (1 << F_FREE_PAGE_HINT), 0, "hinting is not race-free, so not offered");
}

#[test]
fn features_ok_needs_version_1_and_only_offered_features() {
    let rig = rig();
    let d = rig.driver();
    assert!(!d.negotiate(1 << F_STATS_VQ), "legacy (no VERSION_1) must be refused");
    assert!(!d.negotiate(V1 | 1 << F_FREE_PAGE_HINT), "a feature not offered must be refused");
    assert!(d.negotiate(ALL));
    // Features are frozen once FEATURES_OK is set.
    d.write(reg::DRIVER_FEATURES_SEL, 0);
    d.write(reg::DRIVER_FEATURES, 0);
    assert_eq!(rig.transport.lock().unwrap().driver_features(), ALL);
}

#[test]
fn queues_exist_as_the_negotiated_features_say() {
    let rig = rig();
    let d = rig.driver();
    let sizes = |n: u16| (0..n).map(|i| d.queue_num_max(i)).collect::<Vec<_>>();
    // Before FEATURES_OK there are no queues.
    d.write(reg::STATUS, 0);
    assert_eq!(d.queue_num_max(0), 0);
    assert!(d.negotiate(ALL));
    assert_eq!(sizes(5), [256, 256, 256, 256, 0]);
    assert!(d.negotiate(V1));
    assert_eq!(sizes(3), [256, 256, 0]);
    assert!(d.negotiate(V1 | 1 << F_REPORTING));
    assert_eq!(sizes(4), [256, 256, 256, 0]);
    assert!(d.negotiate(V1 | 1 << F_STATS_VQ));
    assert_eq!(sizes(4), [256, 256, 256, 0]);
}

#[test]
fn driver_ok_without_features_ok_is_ignored_and_status_zero_resets() {
    let rig = rig();
    let d = rig.driver();
    d.write(reg::STATUS, status::ACKNOWLEDGE);
    d.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
    assert_eq!(d.status(), status::ACKNOWLEDGE);
    assert_eq!(rig.transport.lock().unwrap().counters().bad_status_writes, 1);
    assert!(d.negotiate(ALL));
    let q = VirtQueue::new(0, 0x10000, 16);
    d.setup_queue(&q);
    d.driver_ok();
    assert_eq!(d.status(), status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    d.write(reg::QUEUE_SEL, 0);
    assert_eq!((d.read(reg::QUEUE_NUM), d.read(reg::QUEUE_READY)), (16, 1));
    d.write(reg::STATUS, 0);
    assert_eq!(d.status(), 0);
    assert_eq!(d.read(reg::QUEUE_READY), 0);
    assert_eq!(d.queue_num_max(0), 0);
}

#[test]
fn target_changes_bump_the_generation_and_raise_a_config_interrupt() {
    let rig = rig();
    let d = rig.driver();
    assert!(d.negotiate(ALL));
    let generation = d.read(reg::CONFIG_GENERATION);
    assert_eq!(d.config(0), 0);
    rig.balloon.set_target_pages(1234);
    assert_eq!(d.config(0), 1234);
    assert_eq!(d.read(reg::CONFIG_GENERATION), generation + 1);
    assert_eq!(d.read(reg::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
    assert_eq!(rig.interrupt.event().read().unwrap(), 1, "the irqfd eventfd was written");
    d.write(reg::INTERRUPT_ACK, INT_CONFIG);
    assert_eq!(d.read(reg::INTERRUPT_STATUS), 0);
    // The guest reports what it holds; a byte-wide config read works too.
    d.set_config(4, 1234);
    assert_eq!(rig.balloon.actual_pages(), 1234);
    let mut byte = [0u8; 1];
    rig.bus.read(super::test_driver::BASE + reg::CONFIG + 1, &mut byte);
    assert_eq!(byte[0], (1234u32 >> 8) as u8);
    // num_pages is the host's: a guest write is ignored.
    d.set_config(0, 7);
    assert_eq!(d.config(0), 1234);
}

#[test]
fn schedule_moves_to_the_next_target_once_the_driver_has_seen_the_reached_one() {
    let config = BalloonConfig { schedule: vec![300, 0, 50], ..BalloonConfig::default() };
    let rig = Rig::new(RAM, Backend::Anon, config);
    let d = rig.driver();
    assert_eq!(d.config(0), 300);
    d.set_config(4, 100);
    assert_eq!(d.read(reg::CONFIG_GENERATION), 0);
    assert_eq!(d.config(0), 300);
    d.set_config(4, 300);
    // The driver's next look still shows the target it reached (it verifies now) ...
    assert_eq!(d.read(reg::CONFIG_GENERATION), 0);
    assert_eq!(rig.balloon.target_pages(), 0, "the next target comes right after that look");
    // ... and the look after that shows the next target, with a config interrupt.
    assert_eq!(d.read(reg::CONFIG_GENERATION), 1);
    assert_eq!(d.config(0), 0);
    assert_ne!(d.read(reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
    d.set_config(4, 0);
    assert_eq!(d.config(0), 0, "a plain config read counts as a look too");
    assert_eq!(d.config(0), 50);
    assert_eq!(rig.balloon.remaining_schedule(), Vec::<u32>::new());
    d.set_config(4, 50);
    assert_eq!((d.config(0), d.config(0)), (50, 50), "the schedule is over: the target stays");
    // An explicit target drops the rest of a schedule and any pending move.
    rig.balloon.set_schedule(&[10, 20]);
    d.set_config(4, 10);
    rig.balloon.set_target_pages(7);
    assert_eq!((d.config(0), d.config(0)), (7, 7));
}

#[test]
fn notify_before_driver_ok_is_ignored_but_buffers_waiting_at_driver_ok_are_processed() {
    let rig = rig();
    let d = rig.driver();
    assert!(d.negotiate(ALL));
    let mut q = VirtQueue::new(0, 0x10000, 16);
    d.setup_queue(&q);
    rig.fill_page(0x20_0000);
    rig.fill_page(0x20_1000);
    rig.mem().write_slice(&(0x200u32).to_le_bytes(), vm_memory::GuestAddress(0x30000)).unwrap();
    q.add_chain(rig.mem(), &[(0x30000, 4, false)]);
    d.notify(0); // before DRIVER_OK: the device must not touch the queue yet
    assert!(rig.page_has_pattern(0x20_0000), "processed before DRIVER_OK");
    assert_eq!(q.used_idx(rig.mem()), 0);
    // Linux's balloon kicks its first stats buffer before DRIVER_OK: activation picks
    // up what is waiting.
    d.driver_ok();
    assert_eq!(q.used_idx(rig.mem()), 1);
    assert!(rig.page_is_zero(0x20_0000));
    assert_eq!(d.read(reg::INTERRUPT_STATUS) & INT_USED_RING, INT_USED_RING);
    d.notify(1); // deflateq was never set ready
    d.notify(9); // no such queue
    assert_eq!(rig.transport.lock().unwrap().counters().ignored_notifies, 3);
    assert!(!rig.needs_reset());
    rig.mem().write_slice(&(0x201u32).to_le_bytes(), vm_memory::GuestAddress(0x30000)).unwrap();
    q.add_chain(rig.mem(), &[(0x30000, 4, false)]);
    d.notify(0);
    assert_eq!(q.used_idx(rig.mem()), 2);
    assert!(rig.page_is_zero(0x20_1000));
}

#[test]
fn used_interrupt_follows_the_drivers_no_interrupt_flag() {
    let rig = rig();
    let d = rig.driver();
    assert!(d.negotiate(ALL));
    let mut q = VirtQueue::new(0, 0x10000, 16);
    d.setup_queue(&q);
    d.driver_ok();
    // VRING_AVAIL_F_NO_INTERRUPT: a polling driver asks for no used interrupts.
    rig.mem().write_obj(1u16, vm_memory::GuestAddress(q.avail)).unwrap();
    rig.mem().write_slice(&(0x200u32).to_le_bytes(), vm_memory::GuestAddress(0x30000)).unwrap();
    q.add_chain(rig.mem(), &[(0x30000, 4, false)]);
    let raised = rig.interrupt.raised_count();
    d.notify(0);
    assert_eq!(q.used_idx(rig.mem()), 1);
    assert_eq!(rig.interrupt.raised_count(), raised);
    rig.mem().write_obj(0u16, vm_memory::GuestAddress(q.avail)).unwrap();
    q.add_chain(rig.mem(), &[(0x30000, 4, false)]);
    d.notify(0);
    assert_eq!(rig.interrupt.raised_count(), raised + 1);
}

#[test]
fn failed_may_be_set_at_any_time_and_needs_reset_bit_is_the_devices() {
    let rig = rig();
    let d = rig.driver();
    assert!(d.negotiate(ALL));
    // A driver writing back what it read (NEEDS_RESET included) plus FAILED.
    d.write(reg::STATUS, d.status() | status::DEVICE_NEEDS_RESET | status::FAILED);
    assert_eq!(d.status() & (status::FAILED | status::DEVICE_NEEDS_RESET), status::FAILED);
}

#[test]
fn misaligned_and_unknown_register_accesses_are_counted_not_fatal() {
    let rig = rig();
    let mut two = [0u8; 2];
    rig.bus.read(super::test_driver::BASE + reg::MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    rig.bus.write(super::test_driver::BASE + reg::STATUS + 1, &[1]);
    rig.driver().write(0x0c8, 1);
    assert_eq!(rig.transport.lock().unwrap().counters().bad_accesses, 3);
    assert_eq!(rig.driver().status(), 0);
}

#[test]
fn activation_with_rings_outside_guest_ram_needs_reset() {
    let rig = rig();
    let d = rig.driver();
    assert!(d.negotiate(ALL));
    d.setup_queue(&VirtQueue::new(0, RAM - 0x100, 256));
    d.driver_ok();
    assert!(rig.needs_reset());
    assert_eq!(d.read(reg::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
    // A reset brings the device back.
    assert!(d.negotiate(ALL));
    assert!(!rig.needs_reset());
}

#[test]
fn misaligned_rings_or_a_bad_queue_size_fail_activation() {
    let rig = rig();
    let d = rig.driver();
    for (what, offset, value) in [
        ("descriptor table not 16-byte aligned", reg::QUEUE_DESC_LOW, 0x10008),
        ("used ring not 4-byte aligned", reg::QUEUE_DEVICE_LOW, 0x12002),
        ("queue size not a power of two", reg::QUEUE_NUM, 12),
        ("queue size above the maximum", reg::QUEUE_NUM, 512),
    ] {
        assert!(d.negotiate(ALL));
        let q = VirtQueue::new(0, 0x10000, 16);
        d.write(reg::QUEUE_SEL, 0);
        d.setup_queue_unready(&q);
        d.write(offset, value);
        d.write(reg::QUEUE_READY, 1);
        d.driver_ok();
        assert!(rig.needs_reset(), "{what}: activation succeeded");
    }
    // And a correct setup works.
    assert!(d.negotiate(ALL));
    d.setup_queue(&VirtQueue::new(0, 0x10000, 16));
    d.driver_ok();
    assert!(!rig.needs_reset());
}

#[test]
fn cmdline_token_has_linux_format() {
    assert_eq!(virtio_mmio_cmdline_token(0xd000_0000, 0x1000, 5), "virtio_mmio.device=4K@0xd0000000:5");
    assert_eq!(virtio_mmio_cmdline_token(0xd000_1000, 0x200, 6), "virtio_mmio.device=512@0xd0001000:6");
}
