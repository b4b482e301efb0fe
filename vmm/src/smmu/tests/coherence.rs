//! The coherence checker against real page tables: clean after real faults and discards,
//! and each kind of disagreement is caught when the table is made to lie.

use super::*;
use crate::smmu::coherence::{check, Disagreement};

fn anon_rig(pages: u64, wp: bool) -> Rig {
    let map = Mapping::anon(pages * PAGE_4K);
    let region = region_of(&map, PAGE_4K, UffdMode::Missing, wp);
    rig(map, region, Arc::new(ZeroSource), FaultEngineConfig::default())
}

#[test]
fn clean_after_faults_discards_and_write_protection() {
    let r = anon_rig(64, true);
    let (a, b) = (r.map.page(3), r.map.page(40));
    on_thread(move || {
        fill_words(a, PAGE_4K, 7);
        let _ = read_words(b, 8);
    });
    r.discarder.write_protect(GuestRange::new(GPA + 3 * PAGE_4K, PAGE_4K)).unwrap();
    r.discarder.discard(GuestRange::new(GPA + 40 * PAGE_4K, PAGE_4K)).unwrap();
    // Protected, then discarded: the kernel leaves a uffd-wp pte marker, not contents.
    let c = r.map.page(41);
    on_thread(move || fill_words(c, PAGE_4K, 9));
    r.discarder.write_protect(GuestRange::new(GPA + 41 * PAGE_4K, PAGE_4K)).unwrap();
    r.discarder.discard(GuestRange::new(GPA + 41 * PAGE_4K, PAGE_4K)).unwrap();
    let report = check(&r.regions, &r.table, &r.inv).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!((report.granules_checked, report.granules_populated), (64, 1));
}

#[test]
fn each_disagreement_is_reported() {
    let r = anon_rig(64, true);
    let (a, b) = (r.map.page(1), r.map.page(2));
    on_thread(move || {
        fill_words(a, PAGE_4K, 1);
        fill_words(b, PAGE_4K, 2);
    });
    let page = |i: u64| GuestRange::new(GPA + i * PAGE_4K, PAGE_4K);
    // Page 1 mapped, but the table forgets it; page 5 never touched, the table claims it;
    // page 2 writable, the table claims it write-protected.
    r.table.clear(page(1), PageState::POPULATED);
    r.table.set(page(5), PageState::POPULATED);
    r.table.set(page(2), PageState::WRITE_PROTECTED);
    let report = check(&r.regions, &r.table, &r.inv).unwrap();
    let kinds: Vec<_> = report.mismatches.iter().map(|m| (m.gpa, m.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (GPA + PAGE_4K, Disagreement::MappedBehindSmmu),
            (GPA + 2 * PAGE_4K, Disagreement::MissingWriteProtect),
            (GPA + 5 * PAGE_4K, Disagreement::Lost),
        ]
    );
    // And the other way round: protected on the host, writable in the table.
    r.table.clear(page(2), PageState::WRITE_PROTECTED);
    r.discarder.write_protect(page(1)).unwrap_or_default();
    r.table.set(page(1), PageState::POPULATED);
    r.table.clear(page(1), PageState::WRITE_PROTECTED);
    let report = check(&r.regions, &r.table, &r.inv).unwrap();
    assert_eq!(
        report.mismatches.iter().map(|m| m.kind).collect::<Vec<_>>(),
        vec![Disagreement::UnexpectedWriteProtect, Disagreement::Lost]
    );
}

#[test]
fn shared_memory_in_the_page_cache_is_not_lost() {
    let map = Mapping::memfd(16 * PAGE_4K, false).unwrap();
    let region = region_of(&map, PAGE_4K, UffdMode::Minor, false);
    // Fill the page cache through the fd, as paging=uffd-minor does before the guest runs.
    let fd = map.fd.clone().unwrap();
    rustix::io::pwrite(&*fd, &[9u8; 4096 * 16], 0).unwrap();
    let r = rig(map, region, Arc::new(ZeroSource), FaultEngineConfig::default());
    // The table says populated, the pte is gone (never mapped here), the cache holds it.
    r.table.set(GuestRange::new(GPA, PAGE_4K), PageState::POPULATED);
    let report = check(&r.regions, &r.table, &r.inv).unwrap();
    assert!(report.is_clean(), "{report:?}");
}
