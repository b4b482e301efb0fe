//! Saving a working balloon and its transport, restoring both into a fresh device over a
//! copy of guest RAM, and driving the restored one on: the queues go on at their ring
//! indices, the pages held, the statistics buffer held and the schedule position carry
//! over.

use vm_memory::{Bytes, GuestAddress};

use super::{activate, pfn, send_pfns, ALL, BUFFERS, DATA};
use crate::config::Backend;
use crate::devices::virtio::balloon::BalloonConfig;
use crate::devices::virtio::mmio::TransportStateError;
use crate::devices::virtio::test_driver::Rig;
use crate::persist::Persist;
use crate::smmu::PAGE_4K;

const RAM: u64 = 16 << 20;

fn config() -> BalloonConfig {
    BalloonConfig { schedule: vec![40, 8, 0], ..BalloonConfig::default() }
}

#[test]
fn a_restored_balloon_goes_on_where_the_saved_one_was() {
    let saved_rig = Rig::new(RAM, Backend::Anon, config());
    let mut qs = activate(&saved_rig, ALL, 16);
    (0..64).for_each(|i| saved_rig.fill_page(DATA + i * PAGE_4K));
    // 40 pages in, the guest says so and looks at its config: the next target (8) is due.
    send_pfns(&saved_rig, &mut qs.inflate, &(0..40).map(|i| pfn(DATA) + i).collect::<Vec<_>>());
    saved_rig.driver().set_config(4, 40);
    let stats_q = qs.stats.as_mut().unwrap();
    let stats: Vec<u8> = [4u16.to_le_bytes().as_slice(), (7u64 << 20).to_le_bytes().as_slice()].concat();
    saved_rig.mem().write_slice(&stats, GuestAddress(BUFFERS + 0x2000)).unwrap();
    let stats_head = stats_q.add_chain(saved_rig.mem(), &[(BUFFERS + 0x2000, stats.len() as u32, false)]);
    saved_rig.driver().notify(stats_q.index);
    let transport = saved_rig.transport.lock().unwrap().save().unwrap();
    let device = (&*saved_rig.balloon).save().unwrap();
    assert_eq!((device.target_pages, device.actual_pages), (40, 40));
    assert_eq!(device.held, vec![(DATA, 40 * PAGE_4K)]);
    assert_eq!(device.stats_head, Some(stats_head));
    assert_eq!(device.schedule, vec![8, 0]);
    let queues = transport.device_queues.as_ref().expect("an activated device has queues");
    assert_eq!((queues[0].next_avail, queues[0].next_used), (1, 1));

    // A fresh device over a copy of guest RAM (what an eager restore gives it).
    let restored = Rig::new(RAM, Backend::Anon, config());
    let mut copy = vec![0u8; RAM as usize];
    saved_rig.mem().read_slice(&mut copy, GuestAddress(0)).unwrap();
    restored.mem().write_slice(&copy, GuestAddress(0)).unwrap();
    let mut handle = &*restored.balloon;
    handle.restore(&device).unwrap();
    restored.transport.lock().unwrap().restore(&transport).unwrap();
    assert_eq!(restored.transport.lock().unwrap().save().unwrap(), transport, "the transport round-trips");
    assert_eq!((&*restored.balloon).save().unwrap(), device, "the balloon round-trips");
    assert_eq!(restored.balloon.counters().ballooned_pages, 40);

    // The driver goes on against the restored device, with its own ring state.
    restored.driver().config(0); // looks at its config: the schedule moves on
    assert_eq!(restored.balloon.target_pages(), 8);
    send_pfns(&restored, &mut qs.deflate, &(8..40).map(|i| pfn(DATA) + i).collect::<Vec<_>>());
    assert_eq!(qs.deflate.used_idx(restored.mem()), 1, "the deflate queue goes on at its saved index");
    assert_eq!(restored.balloon.counters().ballooned_pages, 8);
    assert!(restored.balloon.request_stats(), "the restored device holds the statistics buffer");
    assert_eq!(qs.stats.as_ref().unwrap().used_idx(restored.mem()), 1);
    assert!(!restored.needs_reset(), "{:?}", restored.balloon.counters().last_error);
    assert_eq!(restored.balloon.stats().unwrap().get(4), Some(7 << 20));
}

#[test]
fn a_transport_state_of_another_device_or_with_broken_queues_is_refused() {
    let rig = Rig::new(RAM, Backend::Anon, config());
    activate(&rig, ALL, 16);
    let mut state = rig.transport.lock().unwrap().save().unwrap();
    let fresh = Rig::new(RAM, Backend::Anon, config());
    let mut unpaired = state.clone();
    unpaired.queues = state.device_queues.clone().unwrap();
    unpaired.refused.truncate(1);
    let err = fresh.transport.lock().unwrap().restore(&unpaired).unwrap_err();
    assert!(matches!(err, TransportStateError::Refused { queues: 4, refused: 1 }), "{err}");
    let mut other = state.clone();
    other.device_type = 1;
    let err = fresh.transport.lock().unwrap().restore(&other).unwrap_err();
    assert!(matches!(err, TransportStateError::DeviceType { saved: 1, here: 5 }), "{err}");
    state.device_queues.as_mut().unwrap()[1].size = 3; // not a power of two
    let err = fresh.transport.lock().unwrap().restore(&state).unwrap_err();
    assert!(err.to_string().contains("queue 1"), "{err}");
    assert_eq!(fresh.transport.lock().unwrap().status(), 0, "a refused state changes nothing");
}
