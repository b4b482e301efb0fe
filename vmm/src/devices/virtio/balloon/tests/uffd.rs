//! Ballooning demand-paged memory: guest RAM registered with a userfaultfd engine
//! (MISSING, zero pages, REMOVE events on), inflated and deflated round after round while
//! another thread keeps faulting the same pages in. Nothing may hang, the engine must see
//! our discards as its own, and no page may ever show anything but its pattern or zeros.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::*;

const PAGES: u64 = 64;
const ROUNDS: u64 = 20;

#[test]
fn inflate_and_deflate_race_with_faults_on_the_same_pages_under_uffd_missing() {
    let rig = Rig::with_paging(16 << 20, Backend::Anon, BalloonConfig::default(), UffdMode::Missing);
    let mut qs = activate(&rig, ALL, 64);
    let pages: Vec<u64> = (0..PAGES).map(|i| DATA + i * PAGE_4K).collect();
    let ballooned: Vec<u32> = pages.iter().step_by(2).map(|&p| pfn(p)).collect();
    let stop = AtomicBool::new(false);
    let (bad_words, page_reads) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        let memory = rig.mem().clone();
        let (stop, bad_words, page_reads, pages) = (&stop, &bad_words, &page_reads, &pages);
        s.spawn(move || {
            let mut buf = vec![0u8; PAGE_4K as usize];
            while !stop.load(Ordering::Relaxed) {
                for &p in pages {
                    memory.read_slice(&mut buf, GuestAddress(p)).unwrap();
                    let bad = buf.chunks_exact(8).enumerate().filter(|(w, b)| {
                        let v = u64::from_le_bytes((*b).try_into().unwrap());
                        v != 0 && v != crate::devices::virtio::test_driver::pattern(p, *w as u64)
                    });
                    bad_words.fetch_add(bad.count() as u64, Ordering::Relaxed);
                    page_reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        for _ in 0..ROUNDS {
            pages.iter().for_each(|&p| rig.fill_page(p));
            send_pfns(&rig, &mut qs.inflate, &ballooned);
            assert!(!rig.needs_reset());
            for &p in pages.iter().step_by(2) {
                assert!(rig.page_is_zero(p), "ballooned page {p:#x} showed old data");
            }
            send_pfns(&rig, &mut qs.deflate, &ballooned);
        }
        stop.store(true, Ordering::Relaxed);
    });
    let engine = rig.engine.as_ref().unwrap();
    assert_eq!(engine.failure(), None);
    assert_eq!(bad_words.load(Ordering::Relaxed), 0, "a page showed data that was neither its pattern nor zero");
    let c = rig.balloon.counters();
    assert_eq!((c.inflated_pages, c.deflated_pages), (ROUNDS * PAGES / 2, ROUNDS * PAGES / 2));
    assert_eq!(c.discard_errors, 0);
    let stats = engine.stats();
    assert!(stats.remove_events > 0, "our discards of registered memory raised no REMOVE event");
    assert_eq!(stats.external_removes, 0, "the engine took our discards for someone else's");
    eprintln!(
        "uffd balloon: {} page reads by the toucher, {} REMOVE events, {} retries, {} deferred",
        page_reads.load(Ordering::Relaxed),
        stats.remove_events,
        stats.retries,
        stats.deferred
    );
}
