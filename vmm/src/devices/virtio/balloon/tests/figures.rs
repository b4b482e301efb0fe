//! Figures for the closing note, not a pass/fail test: inflate 1 GiB on each
//! backend (PFNs in Linux-sized buffers of 256, in address order and shuffled) and print
//! the time and the host memory freed. Run by hand:
//! `cargo test -j1 -p faultline --lib balloon_figures -- --ignored --nocapture`.

use std::time::Instant;

use super::*;

const GIB: u64 = 1 << 30;
/// Guest RAM: 16 MiB for rings and buffers, then the 1 GiB the balloon takes.
const RAM: u64 = GIB + (16 << 20);
const BALLOONED_FROM: u64 = 16 << 20;
/// PFN arrays live here (256 buffers of 1 KiB per batch).
const ARRAYS: u64 = 8 << 20;
/// Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX.
const PFNS_PER_BUFFER: usize = 256;

/// Sends `pfns` through `q` in buffers of 256, a queue's worth per notify.
fn send_all(rig: &Rig, q: &mut VirtQueue, pfns: &[u32]) {
    for batch in pfns.chunks(PFNS_PER_BUFFER * q.size as usize) {
        for (i, buffer) in batch.chunks(PFNS_PER_BUFFER).enumerate() {
            let gpa = ARRAYS + (i * PFNS_PER_BUFFER * 4) as u64;
            let len = write_pfns(rig, gpa, buffer);
            q.add_chain(rig.mem(), &[(gpa, len, false)]);
        }
        rig.driver().notify(q.index);
    }
    assert!(!rig.needs_reset(), "{:?}", rig.balloon.counters().last_error);
}

fn figure(name: &str, zone: ZoneConfig, shuffled: bool) {
    let rig = Rig::with_zone(zone, BalloonConfig::default(), UffdMode::None);
    let mut qs = activate(&rig, ALL, 256);
    rig.mem().write_slice(&vec![0u8; 1 << 20], GuestAddress(ARRAYS)).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..GIB).step_by(chunk.len()) {
        rig.mem().write_slice(&chunk, GuestAddress(BALLOONED_FROM + off)).unwrap();
    }
    let mut pfns: Vec<u32> = (0..GIB / PAGE_4K).map(|i| pfn(BALLOONED_FROM) + i as u32).collect();
    if shuffled {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in (1..pfns.len()).rev() {
            x = faultline_abi::splitmix64(x);
            pfns.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    let before = accounting::measure(&rig.regions).unwrap();
    let started = Instant::now();
    send_all(&rig, &mut qs.inflate, &pfns);
    let inflate_ms = started.elapsed().as_secs_f64() * 1e3;
    let after = accounting::measure(&rig.regions).unwrap();
    let started = Instant::now();
    send_all(&rig, &mut qs.deflate, &pfns);
    let deflate_ms = started.elapsed().as_secs_f64() * 1e3;
    let freed = before.total_bytes().saturating_sub(after.total_bytes());
    let c = rig.balloon.counters();
    assert_eq!(c.inflated_pages, GIB / PAGE_4K);
    println!(
        "FIGURE backend={name} order={} inflate_1GiB_ms={inflate_ms:.1} deflate_1GiB_ms={deflate_ms:.1} \
         balloon_bytes={GIB} freed_bytes={freed} freed_pct={:.2} discarded_bytes={} huge_pages_freed={}",
        if shuffled { "shuffled" } else { "sequential" },
        freed as f64 * 100.0 / GIB as f64,
        c.bytes_discarded,
        c.huge_pages_freed,
    );
}

#[test]
#[ignore = "figures for the closing note: 1 GiB per backend, run by hand"]
fn balloon_figures() {
    let dir = tempfile::tempdir().unwrap();
    for shuffled in [false, true] {
        figure("anon", ZoneConfig::new(RAM, Backend::Anon), shuffled);
        figure("memfd", ZoneConfig::new(RAM, Backend::Memfd), shuffled);
        let file = ZoneConfig { path: Some(dir.path().join("ram")), ..ZoneConfig::new(RAM, Backend::File) };
        figure("file", file, shuffled);
        let _ = std::fs::remove_file(dir.path().join("ram"));
        match HugePages::get(RAM / PAGE_2M + 8) {
            Some(_pages) => figure("hugetlb", ZoneConfig::new(RAM, Backend::Hugetlb), shuffled),
            None => println!("FIGURE backend=hugetlb skipped: not enough huge pages"),
        }
    }
}
