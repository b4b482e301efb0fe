//! Hugetlb (2 MiB) faults and discards; skipped loudly when no huge pages can be had
//! (set FAULTLINE_REQUIRE_HUGETLB=1 to fail instead).

use super::*;

static HUGETLB_LOCK: Mutex<()> = Mutex::new(());

fn meminfo(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches(" kB").parse().ok()).unwrap_or(0)
}

/// Holds `n` free 2 MiB pages (reserving them if the pool is short) and gives back what
/// it added when dropped.
struct HugePages {
    restore: Option<u64>,
}

impl HugePages {
    fn get(n: u64) -> Option<HugePages> {
        const SYSCTL: &str = "/proc/sys/vm/nr_hugepages";
        let free = meminfo("HugePages_Free:");
        if free >= n {
            return Some(HugePages { restore: None });
        }
        let old: u64 = std::fs::read_to_string(SYSCTL).ok()?.trim().parse().ok()?;
        let guard = HugePages { restore: Some(old) };
        std::fs::write(SYSCTL, format!("{}", old + n - free)).ok()?;
        (meminfo("HugePages_Free:") >= n).then_some(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(old) = self.restore {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", format!("{old}"));
        }
    }
}

fn hugepages_or_skip(n: u64, test: &str) -> Option<HugePages> {
    let hp = HugePages::get(n);
    if hp.is_none() {
        let msg = format!("{test}: cannot get {n} free 2 MiB hugetlb pages (write /proc/sys/vm/nr_hugepages as root)");
        if std::env::var("FAULTLINE_REQUIRE_HUGETLB").as_deref() == Ok("1") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED {msg}");
    }
    hp
}

#[test]
fn hugetlb_missing_fault_resolves_the_whole_2m_page_and_discard_frees_whole_pages_only() {
    let _serial = HUGETLB_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let Some(_hp) = hugepages_or_skip(2, "hugetlb MISSING") else {
        return;
    };
    let map = Mapping::memfd(2 * PAGE_2M, true).expect("hugetlb memfd");
    let region = region_of(&map, PAGE_2M, UffdMode::Missing, false);
    let src = Arc::new(FileSource::new(image_file(2, PAGE_2M), GPA).unwrap());
    let r = rig(map, region, src, FaultEngineConfig::default());
    let base = r.map.addr;
    // Touch the middle of each huge page; the whole page must arrive.
    let ok = on_thread(move || {
        (0..2u64).all(|i| {
            let _ = read_words(base + i * PAGE_2M + PAGE_2M / 2, 8);
            read_words(base + i * PAGE_2M, PAGE_2M).iter().all(|&w| w == pattern(i, 1))
        })
    });
    assert!(ok, "a huge page was not filled whole from the image");
    eventually("two 2 MiB MISSING faults", || r.engine.stats().latency_ns[1].len() == 2);
    assert_eq!(r.table.count(PageState::POPULATED), 2);
    eprintln!("hugetlb MISSING: {}", summary(&r.engine));
    // Discard 1.5 huge pages: only the first is freed; the partial half is reported.
    let rep = r.discarder.discard(GuestRange::new(GPA, PAGE_2M + PAGE_2M / 2)).unwrap();
    assert_eq!(rep.freed, vec![GuestRange::new(GPA, PAGE_2M)]);
    assert_eq!(rep.partial_huge_pages, vec![GuestRange::new(GPA + PAGE_2M, PAGE_2M / 2)]);
    let (z, kept) = on_thread(move || {
        let z = read_words(base, PAGE_2M).iter().all(|&w| w == 0);
        (z, read_words(base + PAGE_2M, 8)[0])
    });
    assert!(z, "a discarded huge page showed old data");
    assert_eq!(kept, pattern(1, 1));
}
