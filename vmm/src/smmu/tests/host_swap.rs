//! The coherence checker against a host that swaps guest pages out on its own: a shmem
//! page swapped out of the page cache is still the guest's page (no false "lost"), a page
//! whose contents really went (a hole punched behind the smmu) is reported lost. Needs
//! root (a private zram swap device, under the host-change lock).

use super::*;
use crate::host::lock::HostLock;
use crate::host::zram::ZramSwap;
use crate::smmu::coherence::{check, Disagreement};

#[test]
fn a_page_swapped_out_of_shmem_is_not_lost_but_a_punched_one_is() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!!! SKIPPED: needs root for a zram swap device !!!!");
        return;
    }
    let _lock = HostLock::acquire().unwrap();
    let _swap = ZramSwap::create(16 << 20).unwrap();
    let pages = 16;
    let map = Mapping::memfd(pages * PAGE_4K, false).unwrap();
    let region = region_of(&map, PAGE_4K, UffdMode::Minor, false);
    let fd = map.fd.clone().unwrap();
    rustix::io::pwrite(&*fd, &[9u8; 4096 * 16], 0).unwrap();
    let r = rig(map, region, Arc::new(ZeroSource), FaultEngineConfig::default());
    let base = r.map.page(0);
    // Map every page through the engine (MINOR faults), then page them all out.
    on_thread(move || {
        let _ = read_words(base, pages * PAGE_4K);
    });
    let (addr, len) = (base as *mut libc::c_void, (pages * PAGE_4K) as usize);
    // SAFETY: the test's own mapping; MADV_PAGEOUT keeps contents (in swap).
    let rc = unsafe { libc::madvise(addr, len, libc::MADV_PAGEOUT) };
    assert_eq!(rc, 0);
    let mut resident = vec![0u8; pages as usize];
    // SAFETY: the mapping above, one byte per page.
    let rc = unsafe { libc::mincore(addr, len, resident.as_mut_ptr()) };
    assert_eq!(rc, 0);
    let swapped = resident.iter().filter(|b| **b & 1 == 0).count();
    assert!(swapped > 0, "MADV_PAGEOUT swapped nothing out of the page cache: {resident:?}");
    let report = check(&r.regions, &r.table, &r.inv).unwrap();
    assert!(report.is_clean(), "{swapped} pages swapped out: {report:?}");
    // Now really lose page 3: punch it out of the file behind the smmu's back.
    rustix::fs::fallocate(
        &*fd,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        3 * PAGE_4K,
        PAGE_4K,
    )
    .unwrap();
    let report = check(&r.regions, &r.table, &r.inv).unwrap();
    let lost: Vec<_> = report.mismatches.iter().map(|m| (m.gpa, m.kind)).collect();
    assert_eq!(lost, vec![(GPA + 3 * PAGE_4K, Disagreement::Lost)]);
    // The contents of the swapped pages come back on the next read.
    let words = on_thread(move || read_words(base, PAGE_4K));
    assert!(words.iter().all(|w| *w == u64::from_ne_bytes([9; 8])));
}
