//! The invariant under stress: discards racing touchers never expose pre-discard data.

use super::*;

#[test]
fn discards_racing_touchers_never_expose_pre_discard_data() {
    const PAGES: u64 = 256;
    const DISCARDS: u64 = 20_000;
    let map = Mapping::anon(PAGES * PAGE_4K);
    let region = region_of(&map, PAGE_4K, UffdMode::Missing, false);
    let r = Arc::new(rig(map, region, Arc::new(ZeroSource), FaultEngineConfig::default()));
    // started[p] is bumped before a discard of p begins, done[p] after it returns.
    let started: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let base = r.map.addr;
    let touchers: Vec<_> = (0..2u64)
        .map(|t| {
            let (started, done, stop) = (started.clone(), done.clone(), stop.clone());
            std::thread::spawn(move || {
                let mine: Vec<u64> = (0..PAGES).filter(|p| p % 2 == t).collect();
                let mut gen = vec![0u64; PAGES as usize];
                let mut started_after_write = vec![0u64; PAGES as usize];
                let (mut rng, mut checks, mut refills) = (0x9e37_79b9_7f4a_7c15u64 ^ t, 0u64, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let p = mine[(rng % mine.len() as u64) as usize];
                    let i = p as usize;
                    let discarded_since = done[i].load(Ordering::SeqCst) > started_after_write[i];
                    let words = read_words(base + p * PAGE_4K, PAGE_4K);
                    let expect = pattern(p, gen[i]);
                    for &w in &words {
                        assert!(
                            w == 0 || (gen[i] > 0 && w == expect),
                            "page {p}: found {w:#x}, expected 0 or {expect:#x}"
                        );
                        assert!(
                            !(discarded_since && w != 0),
                            "page {p}: pre-discard data {w:#x} after a discard returned"
                        );
                    }
                    checks += 1;
                    if words.contains(&0) {
                        gen[i] += 1;
                        fill_words(base + p * PAGE_4K, PAGE_4K, pattern(p, gen[i]));
                        started_after_write[i] = started[i].load(Ordering::SeqCst);
                        refills += 1;
                    }
                }
                (checks, refills)
            })
        })
        .collect();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..DISCARDS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let first = rng % PAGES;
        let n = (1 + (rng >> 20) % 4).min(PAGES - first);
        (first..first + n).for_each(|p| {
            started[p as usize].fetch_add(1, Ordering::SeqCst);
        });
        r.discarder.discard(GuestRange::new(GPA + first * PAGE_4K, n * PAGE_4K)).unwrap();
        (first..first + n).for_each(|p| {
            done[p as usize].fetch_add(1, Ordering::SeqCst);
        });
    }
    stop.store(true, Ordering::SeqCst);
    let totals: Vec<(u64, u64)> = touchers.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!("stress: {DISCARDS} discards, touchers (checks, refills) {totals:?}; {}", summary(&r.engine));
    assert!(r.engine.failure().is_none());
}
