//! Balloon tests on real guest RAM (anon, memfd, hugetlb): a driver programs the device by
//! register writes and lays out its rings by hand; host memory is measured with
//! [`crate::memory::accounting`]. The malicious-driver tests are in `malicious.rs`.

mod figures;
mod malicious;
mod persist;
mod uffd;

use vm_memory::{Bytes, GuestAddress};

use super::{BalloonConfig, F_DEFLATE_ON_OOM, F_MUST_TELL_HOST, F_REPORTING, F_STATS_VQ};
use crate::config::{Backend, ZoneConfig};
use crate::devices::virtio::test_driver::{Rig, VirtQueue};
use crate::devices::virtio::VIRTIO_F_VERSION_1;
use crate::memory::accounting;
use crate::smmu::{UffdMode, PAGE_2M, PAGE_4K};

const V1: u64 = 1 << VIRTIO_F_VERSION_1;
const ALL: u64 = V1 | 1 << F_MUST_TELL_HOST | 1 << F_STATS_VQ | 1 << F_DEFLATE_ON_OOM | 1 << F_REPORTING;
/// Where the test driver keeps its PFN arrays and statistics buffers.
const BUFFERS: u64 = 0x8_0000;
/// The first page the tests balloon.
const DATA: u64 = 4 << 20;

/// The queues of an activated balloon, by role.
struct Queues {
    inflate: VirtQueue,
    deflate: VirtQueue,
    stats: Option<VirtQueue>,
    reporting: Option<VirtQueue>,
}

/// Negotiates `features`, sets up every queue they imply (of `size` entries) and sets
/// DRIVER_OK.
fn activate(rig: &Rig, features: u64, size: u16) -> Queues {
    let d = rig.driver();
    assert!(d.negotiate(features));
    // A driver zeroes its fresh rings. They and the buffers are the driver's memory:
    // allocating them now also means host memory measured later changes only by what the
    // device does.
    rig.mem().write_slice(&vec![0u8; 0x8000 * 4], GuestAddress(0x1_0000)).unwrap();
    rig.mem().write_slice(&[0u8; 0x4000], GuestAddress(BUFFERS)).unwrap();
    let mut next = 0u16;
    let mut queue = |on: bool| {
        on.then(|| {
            let q = VirtQueue::new(next, 0x1_0000 + 0x8000 * next as u64, size);
            d.setup_queue(&q);
            next += 1;
            q
        })
    };
    let inflate = queue(true).unwrap();
    let deflate = queue(true).unwrap();
    let stats = queue(features & (1 << F_STATS_VQ) != 0);
    let reporting = queue(features & (1 << F_REPORTING) != 0);
    d.driver_ok();
    Queues { inflate, deflate, stats, reporting }
}

/// Writes `pfns` as a le32 array at `gpa`; returns its length in bytes.
fn write_pfns(rig: &Rig, gpa: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    rig.mem().write_slice(&bytes, GuestAddress(gpa)).unwrap();
    bytes.len() as u32
}

/// Sends `pfns` through `q` in one buffer and notifies.
fn send_pfns(rig: &Rig, q: &mut VirtQueue, pfns: &[u32]) {
    let len = write_pfns(rig, BUFFERS, pfns);
    q.add_chain(rig.mem(), &[(BUFFERS, len, false)]);
    rig.driver().notify(q.index);
}

fn pfn(gpa: u64) -> u32 {
    (gpa >> 12) as u32
}

/// Inflates 32 of 64 patterned pages (every other pair, sent out of order in a
/// two-buffer chain), checks zeros, neighbours and freed host memory; deflates half.
fn inflate_frees_memory_and_deflate_returns_pages(zone: ZoneConfig) {
    let backend = zone.backend;
    let rig = Rig::with_zone(zone, BalloonConfig::default(), UffdMode::None);
    let mut qs = activate(&rig, ALL, 64);
    let pages: Vec<u64> = (0..64).map(|i| DATA + i * PAGE_4K).collect();
    pages.iter().for_each(|&p| rig.fill_page(p));
    let held_before = accounting::measure(&rig.regions).unwrap().total_bytes();

    let mut ballooned: Vec<u64> = pages.iter().copied().filter(|p| (p - DATA) / PAGE_4K % 4 < 2).collect();
    ballooned.reverse();
    let pfns: Vec<u32> = ballooned.iter().map(|&p| pfn(p)).collect();
    let first = write_pfns(&rig, BUFFERS, &pfns[..10]);
    let second = write_pfns(&rig, BUFFERS + 0x1000, &pfns[10..]);
    let head = qs.inflate.add_chain(rig.mem(), &[(BUFFERS, first, false), (BUFFERS + 0x1000, second, false)]);
    rig.driver().notify(0);

    assert!(!rig.needs_reset(), "{:?}", rig.balloon.counters().last_error);
    assert_eq!(qs.inflate.used_idx(rig.mem()), 1);
    assert_eq!(qs.inflate.used_elem(rig.mem(), 0), (head as u32, 0));
    // Measured before the zero checks below read the pages again (a read maps the zero
    // page on anon memory and allocates a fresh page on shmem).
    let held_after = accounting::measure(&rig.regions).unwrap().total_bytes();
    assert_eq!(held_before - held_after, 32 * PAGE_4K, "{backend:?}: host memory must drop by the balloon");
    for &p in &pages {
        if ballooned.contains(&p) {
            assert!(rig.page_is_zero(p), "ballooned page {p:#x} still has data");
        } else {
            assert!(rig.page_has_pattern(p), "neighbour page {p:#x} lost its pattern");
        }
    }
    let c = rig.balloon.counters();
    assert_eq!(
        (c.inflated_pages, c.ballooned_pages, c.bytes_discarded, c.freed_bytes),
        (32, 32, 32 * PAGE_4K, 32 * PAGE_4K)
    );

    send_pfns(&rig, &mut qs.deflate, &pfns[..16]);
    let c = rig.balloon.counters();
    assert_eq!((c.deflated_pages, c.ballooned_pages, c.redundant_pfns), (16, 16, 0));
    assert_eq!(qs.deflate.used_idx(rig.mem()), 1);
    // Returned pages read as zeros and are the guest's again.
    rig.fill_page(ballooned[0]);
    assert!(rig.page_has_pattern(ballooned[0]));
    // Deflating a page twice is counted, not fatal.
    send_pfns(&rig, &mut qs.deflate, &pfns[..1]);
    assert_eq!(rig.balloon.counters().redundant_pfns, 1);
    assert!(!rig.needs_reset());
}

#[test]
fn anon_inflate_frees_memory_and_deflate_returns_pages() {
    inflate_frees_memory_and_deflate_returns_pages(ZoneConfig::new(16 << 20, Backend::Anon));
}

#[test]
fn memfd_inflate_frees_memory_and_deflate_returns_pages() {
    inflate_frees_memory_and_deflate_returns_pages(ZoneConfig::new(16 << 20, Backend::Memfd));
}

#[test]
fn file_inflate_frees_memory_and_deflate_returns_pages() {
    let dir = tempfile::tempdir().unwrap();
    let zone = ZoneConfig { path: Some(dir.path().join("ram")), ..ZoneConfig::new(16 << 20, Backend::File) };
    inflate_frees_memory_and_deflate_returns_pages(zone);
}

#[test]
fn guest_reports_actual_and_device_reset_empties_the_balloon() {
    let rig = Rig::new(16 << 20, Backend::Anon, BalloonConfig { initial_target_pages: 8, ..Default::default() });
    let mut qs = activate(&rig, ALL, 16);
    send_pfns(&rig, &mut qs.inflate, &(0..8).map(|i| pfn(DATA) + i).collect::<Vec<_>>());
    rig.driver().set_config(4, 8);
    assert_eq!((rig.balloon.actual_pages(), rig.balloon.counters().ballooned_pages), (8, 8));
    rig.driver().write(crate::devices::virtio::test_driver::reg::STATUS, 0);
    assert_eq!((rig.balloon.actual_pages(), rig.balloon.counters().ballooned_pages), (0, 0));
    assert_eq!(rig.balloon.target_pages(), 8, "the host's target survives a guest reset");
}

#[test]
fn statistics_are_held_until_the_host_asks_for_fresh_ones() {
    let rig = Rig::new(16 << 20, Backend::Anon, BalloonConfig::default());
    let mut qs = activate(&rig, ALL, 16);
    let stats_q = qs.stats.as_mut().unwrap();
    assert_eq!(stats_q.index, 2);
    let post = |q: &mut VirtQueue, free: u64| {
        let mut buf = Vec::new();
        for (tag, value) in [(0u16, 0u64), (4, free), (5, 16 << 20), (6, free / 2)] {
            buf.extend_from_slice(&tag.to_le_bytes());
            buf.extend_from_slice(&value.to_le_bytes());
        }
        rig.mem().write_slice(&buf, GuestAddress(BUFFERS + 0x2000)).unwrap();
        q.add_chain(rig.mem(), &[(BUFFERS + 0x2000, buf.len() as u32, false)]);
        rig.driver().notify(q.index);
    };
    assert!(!rig.balloon.request_stats(), "no buffer posted yet");
    post(stats_q, 8 << 20);
    let stats = rig.balloon.stats().unwrap();
    assert_eq!(
        (stats.get(4), stats.get(5), stats.get(6), stats.updates),
        (Some(8 << 20), Some(16 << 20), Some(4 << 20), 1)
    );
    assert_eq!(stats_q.used_idx(rig.mem()), 0, "the device holds the buffer");
    rig.interrupt.ack(u32::MAX);
    assert!(rig.balloon.request_stats());
    assert_eq!(stats_q.used_idx(rig.mem()), 1);
    assert_ne!(rig.interrupt.status() & super::super::interrupt::INT_USED_RING, 0);
    assert!(!rig.balloon.request_stats(), "the buffer was given back already");
    post(stats_q, 6 << 20);
    let stats = rig.balloon.stats().unwrap();
    assert_eq!((stats.get(4), stats.updates), (Some(6 << 20), 2));
    assert!(!rig.needs_reset());
    // The handle outlives the device (a control thread holds it): once the device is gone
    // it no longer reaches guest memory, and still answers.
    let Rig { bus, transport, balloon, ram, .. } = rig;
    drop((bus, transport));
    assert!(!balloon.request_stats(), "a dropped device still held the statistics buffer");
    assert_eq!(balloon.stats().unwrap().updates, 2);
    drop(ram);
    assert_eq!(balloon.counters().inflated_pages, 0);
}

#[test]
fn reporting_queue_index_follows_negotiated_features_and_frees_without_ballooning() {
    for (features, index) in [(V1 | 1 << F_REPORTING, 2u16), (ALL, 3)] {
        let rig = Rig::new(16 << 20, Backend::Memfd, BalloonConfig::default());
        let mut qs = activate(&rig, features, 16);
        let q = qs.reporting.as_mut().unwrap();
        assert_eq!(q.index, index);
        let pages: Vec<u64> = (0..40).map(|i| DATA + i * PAGE_4K).collect();
        pages.iter().for_each(|&p| rig.fill_page(p));
        let before = accounting::measure(&rig.regions).unwrap().file_allocated_bytes;
        // Linux posts reported ranges device-writable; the contract's guest, readable.
        q.add_chain(rig.mem(), &[(DATA, 16 * PAGE_4K as u32, true)]);
        q.add_chain(rig.mem(), &[(DATA + 24 * PAGE_4K, 8 * PAGE_4K as u32, false)]);
        rig.driver().notify(index);
        assert!(!rig.needs_reset(), "{:?}", rig.balloon.counters().last_error);
        assert_eq!(q.used_idx(rig.mem()), 2);
        let after = accounting::measure(&rig.regions).unwrap().file_allocated_bytes;
        assert_eq!(before - after, 24 * PAGE_4K);
        for (i, &p) in pages.iter().enumerate() {
            let reported = i < 16 || (24..32).contains(&i);
            assert_eq!(rig.page_is_zero(p), reported, "page {i}");
            assert_eq!(rig.page_has_pattern(p), !reported, "page {i}");
        }
        let c = rig.balloon.counters();
        assert_eq!((c.reported_pages, c.ballooned_pages, c.inflated_pages), (24, 0, 0));
    }
}

/// Holds `n` free 2 MiB pages (reserving them as root if the pool is short) and gives
/// back what it added.
struct HugePages {
    restore: Option<u64>,
}

impl HugePages {
    fn get(n: u64) -> Option<HugePages> {
        const SYSCTL: &str = "/proc/sys/vm/nr_hugepages";
        let free = accounting::free_hugepages_2m()?;
        if free >= n {
            return Some(HugePages { restore: None });
        }
        let old: u64 = std::fs::read_to_string(SYSCTL).ok()?.trim().parse().ok()?;
        let guard = HugePages { restore: Some(old) };
        std::fs::write(SYSCTL, format!("{}", old + n - free)).ok()?;
        (accounting::free_hugepages_2m()? >= n).then_some(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(old) = self.restore {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", format!("{old}"));
        }
    }
}

#[test]
fn hugetlb_page_is_freed_only_when_all_512_pages_are_ballooned() {
    let Some(_hugepages) = HugePages::get(8) else {
        let msg = "hugetlb balloon: cannot get 8 free 2 MiB pages (write /proc/sys/vm/nr_hugepages as root)";
        assert_ne!(std::env::var("FAULTLINE_REQUIRE_HUGETLB").as_deref(), Ok("1"), "{msg}");
        eprintln!("SKIPPED {msg}");
        return;
    };
    let rig = Rig::new(4 * PAGE_2M, Backend::Hugetlb, BalloonConfig::default());
    let mut qs = activate(&rig, ALL, 256);
    let huge = PAGE_2M; // the second huge page; rings and buffers live in the first
    let neighbour = 2 * PAGE_2M;
    for i in 0..512 {
        rig.fill_page(huge + i * PAGE_4K);
    }
    rig.fill_page(neighbour);
    let held = || accounting::measure(&rig.regions).unwrap().hugetlb_allocated_bytes;
    let before = held();
    assert_eq!(before, 3 * PAGE_2M);

    // 511 of 512: nothing can be freed; the huge page is held partially.
    let pfns: Vec<u32> = (0..512).map(|i| pfn(huge) + i).collect();
    for chunk in pfns[..511].chunks(256) {
        send_pfns(&rig, &mut qs.inflate, chunk);
    }
    let c = rig.balloon.counters();
    assert_eq!((c.inflated_pages, c.huge_pages_partial, c.huge_pages_freed, c.bytes_discarded), (511, 1, 0, 0));
    assert_eq!(c.freed_bytes, 0);
    assert_eq!(held(), before);
    // Not freed, but zeroed: a page given back later reads as zeros, as on other backends.
    assert_eq!(c.pages_zeroed, 511);
    assert!(rig.page_is_zero(huge) && rig.page_is_zero(huge + 510 * PAGE_4K));
    assert!(rig.page_has_pattern(huge + 511 * PAGE_4K), "the page not ballooned kept its data");
    // The last one frees the whole huge page.
    send_pfns(&rig, &mut qs.inflate, &pfns[511..]);
    let c = rig.balloon.counters();
    assert_eq!((c.inflated_pages, c.huge_pages_partial, c.huge_pages_freed, c.bytes_discarded), (512, 0, 1, PAGE_2M));
    assert_eq!(c.freed_bytes, PAGE_2M);
    assert_eq!(held(), before - PAGE_2M);
    eprintln!("hugetlb balloon: free 2 MiB pages on the host now {:?}", accounting::free_hugepages_2m());
    assert!(rig.page_is_zero(huge) && rig.page_is_zero(huge + PAGE_2M - PAGE_4K));
    assert!(rig.page_has_pattern(neighbour), "the next huge page lost its pattern");
    // A page of a huge page the guest never touched is neither freed nor allocated.
    let untouched = 3 * PAGE_2M;
    let held_now = held(); // the zero checks above faulted the freed huge page back in
    send_pfns(&rig, &mut qs.inflate, &[pfn(untouched)]);
    let c = rig.balloon.counters();
    assert_eq!((c.pages_zeroed, c.huge_pages_partial), (511, 1));
    assert_eq!(held(), held_now, "ballooning into an untouched huge page allocated it");
    send_pfns(&rig, &mut qs.deflate, &[pfn(untouched)]);
    // Deflating one 4 KiB page leaves the huge page partial again.
    send_pfns(&rig, &mut qs.deflate, &pfns[..1]);
    let c = rig.balloon.counters();
    assert_eq!((c.deflated_pages, c.ballooned_pages, c.huge_pages_partial), (2, 511, 1));
    assert!(!rig.needs_reset());
}

#[test]
fn a_control_thread_steers_the_balloon_while_the_device_works() {
    let rig = Rig::new(16 << 20, Backend::Anon, BalloonConfig::default());
    let mut qs = activate(&rig, ALL, 64);
    let pfns: Vec<u32> = (0..32).map(|i| pfn(DATA) + i).collect();
    let generation = rig.interrupt.generation();
    std::thread::scope(|s| {
        let handle = rig.balloon.clone();
        s.spawn(move || {
            for target in 1..=200u32 {
                handle.set_target_pages(target);
                let c = handle.counters();
                assert!(c.ballooned_pages <= 32 && c.device_errors == 0);
                handle.request_stats();
            }
        });
        for _ in 0..50 {
            send_pfns(&rig, &mut qs.inflate, &pfns);
            send_pfns(&rig, &mut qs.deflate, &pfns);
        }
    });
    assert!(!rig.needs_reset());
    assert_eq!(rig.driver().config(0), 200);
    assert_eq!(rig.interrupt.generation(), generation + 200, "every target change bumps the generation once");
    let c = rig.balloon.counters();
    assert_eq!((c.inflated_pages, c.deflated_pages, c.ballooned_pages), (50 * 32, 50 * 32, 0));
}
