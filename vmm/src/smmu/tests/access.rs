//! GuestAccess on a real engine: populates through the engine, resolves write protection,
//! and never returns a page torn by a concurrent discard.

use super::*;
use crate::smmu::access::GuestAccess;

fn access_of(r: &Rig) -> GuestAccess {
    GuestAccess::new(r.regions.clone(), r.table.clone(), r.inv.clone())
}

#[test]
fn reads_and_writes_populate_through_the_engine_and_follow_write_protection() {
    let map = Mapping::anon(16 * PAGE_4K);
    let region = region_of(&map, PAGE_4K, UffdMode::Missing, true);
    let r = rig(map, region, Arc::new(ZeroSource), FaultEngineConfig::default());
    let access = access_of(&r);
    let mut buf = vec![0xffu8; 100];
    access.read(GPA + 4096 - 50, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert!(r.table.get(GPA).contains(PageState::POPULATED) && r.table.get(GPA + 4096).contains(PageState::POPULATED));
    access.write(GPA + 2 * PAGE_4K, &[5u8; 4096]).unwrap();
    r.discarder.write_protect(GuestRange::new(GPA + 2 * PAGE_4K, PAGE_4K)).unwrap();
    access.write(GPA + 2 * PAGE_4K + 8, &[6u8; 8]).unwrap();
    let state = r.table.get(GPA + 2 * PAGE_4K);
    assert!(state.contains(PageState::DIRTY) && !state.contains(PageState::WRITE_PROTECTED), "{state:?}");
    let mut back = vec![0u8; 24];
    access.read(GPA + 2 * PAGE_4K, &mut back).unwrap();
    assert_eq!(back, [[5u8; 8], [6u8; 8], [5u8; 8]].concat());
    let err = access.read(GPA + 16 * PAGE_4K - 8, &mut [0u8; 16]).unwrap_err().to_string();
    assert!(err.contains("not entirely guest RAM"), "{err}");
    assert!(check_clean(&r));
}

fn check_clean(r: &Rig) -> bool {
    crate::smmu::coherence::check(&r.regions, &r.table, &r.inv).unwrap().is_clean()
}

#[test]
fn a_read_racing_discards_sees_a_whole_page_never_a_torn_one() {
    let map = Mapping::anon(4 * PAGE_4K);
    let region = region_of(&map, PAGE_4K, UffdMode::Missing, false);
    let r = Arc::new(rig(map, region, Arc::new(ZeroSource), FaultEngineConfig::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let page = GuestRange::new(GPA, PAGE_4K);
    let writer = {
        let (r, stop) = (r.clone(), stop.clone());
        std::thread::spawn(move || {
            let access = access_of(&r);
            let mut generation = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let bytes: Vec<u8> = std::iter::repeat_n(generation.to_ne_bytes(), 512).flatten().collect();
                access.write(GPA, &bytes).unwrap();
                r.discarder.discard(page).unwrap();
                generation += 1;
            }
            generation
        })
    };
    let access = access_of(&r);
    let mut buf = vec![0u8; PAGE_4K as usize];
    let (mut zero, mut whole) = (0, 0);
    for _ in 0..20_000 {
        access.read(GPA, &mut buf).unwrap();
        let first = &buf[..8];
        assert!(buf.chunks_exact(8).all(|w| w == first), "torn page: starts {first:?}");
        if first == [0u8; 8] {
            zero += 1;
        } else {
            whole += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let generations = writer.join().unwrap();
    eprintln!("{zero} zero reads, {whole} whole-pattern reads over {generations} write/discard generations");
    assert!(generations > 1);
}
