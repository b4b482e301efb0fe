//! The secondary-MMU invariant under stress: the guest rewrites and re-checks its memory
//! round after round (`churn`) while a VMM thread discards, write-protects and unprotects
//! random ranges of it. After a discard returns the guest must read zeros there (never
//! the old data), elsewhere its previous pattern; no hang, no mismatch, and for the
//! userfaultfd modes the coherence checker must be clean at the end.

mod common;
use common::*;

/// Runs `events` chaos operations on `zone` and checks the outcome.
fn chaos(zone: &str, events: u64, max_pages: u64) {
    chaos_with(zone, events, max_pages, &[]);
}

/// [`chaos`] with extra `faultline run` arguments.
fn chaos_with(zone: &str, events: u64, max_pages: u64, extra: &[&str]) {
    let events_arg = events.to_string();
    let max_pages_arg = max_pages.to_string();
    let run = run_json(
        &vec![
            "--vcpus",
            "2",
            "--memory",
            zone,
            "--steps",
            "fill,churn",
            "--chaos-events",
            &events_arg,
            "--chaos-max-pages",
            &max_pages_arg,
            "--chaos-interval-us",
            "0",
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
    );
    run.assert_success();
    let chaos = &run.report["chaos"];
    assert_eq!(chaos["events"], events, "{chaos}");
    assert_eq!(chaos["errors"], 0, "{chaos}");
    assert!(chaos["discards"].as_u64().unwrap() > events / 4, "{chaos}");
    assert!(chaos["write_protects"].as_u64().unwrap() > events / 8, "{chaos}");
    let churn = run.report["guest"]["results"].as_array().unwrap().iter().find(|r| r["step"] == "churn").unwrap();
    // The guest saw the discards (pages it found zeroed) and finished whole rounds.
    assert!(churn["zeroed_pages"].as_u64().unwrap() > 0, "{churn}");
    assert!(churn["rounds"].as_u64().unwrap() >= 1, "{churn}");
    for verify in run.verifies() {
        assert_eq!(verify["mismatches"], 0, "stale data after a discard: {verify}");
    }
    let coherence = &run.report["faults"]["coherence"];
    if !coherence.is_null() {
        assert_eq!(coherence["mismatch_count"], 0, "{coherence}");
    }
    eprintln!("{zone}: chaos {chaos}\nchurn {churn}\nraces {}", run.report["faults"]);
}

#[test]
fn anon_uffd_missing_survives_200k_invalidations() {
    if kvm_available() {
        chaos("size=64M,backend=anon,paging=uffd-missing", 200_000, 64);
    }
}

#[test]
fn memfd_uffd_minor_survives_100k_invalidations() {
    if kvm_available() {
        chaos("size=64M,backend=memfd,paging=uffd-minor", 100_000, 64);
    }
}

#[test]
fn anon_kernel_paging_survives_50k_invalidations() {
    if kvm_available() {
        chaos("size=64M,backend=anon,paging=kernel", 50_000, 64);
    }
}

#[test]
fn hugetlb_uffd_missing_survives_20k_invalidations_of_whole_huge_pages() {
    if !kvm_available() {
        return;
    }
    if let Some(_pool) = HugepagePool::reserve(40) {
        chaos("size=64M,backend=hugetlb,paging=uffd-missing", 20_000, 1024);
    }
}

#[test]
fn hugetlb_uffd_minor_survives_20k_invalidations() {
    if !kvm_available() {
        return;
    }
    if let Some(_pool) = HugepagePool::reserve(40) {
        chaos("size=64M,backend=hugetlb,paging=uffd-minor", 20_000, 1024);
    }
}

#[test]
fn fault_around_and_batched_wakes_survive_50k_invalidations() {
    if !kvm_available() {
        return;
    }
    // Fault-around installs pages nobody faulted on: it must never install one a discard
    // has just emptied, nor one the table is about to protect.
    let engine = ["--fault-engine", "dontwake+zeropool+around=64"];
    chaos_with("size=64M,backend=anon,paging=uffd-missing", 50_000, 64, &engine);
    chaos_with("size=64M,backend=memfd,paging=uffd-minor", 50_000, 64, &engine);
}
