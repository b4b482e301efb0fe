//! hugetlb guest RAM: boots and verifies on 2 MiB pages (reserving them for the test and
//! giving them back), mixes with other backends, and an empty pool is a clear error.

mod common;
use common::*;

#[test]
fn hugetlb_backend_boots_and_verifies() {
    if !kvm_available() {
        return;
    }
    let Some(_pool) = HugepagePool::reserve(32) else {
        return;
    };
    let free_before = HugepagePool::free_pages();
    run_json(&["--vcpus", "2", "--memory", "size=64M,backend=hugetlb"]).assert_success().assert_verified(pages(56));
    // Every huge page comes back when the VM is gone.
    assert_eq!(HugepagePool::free_pages(), free_before);
}

#[test]
fn hugetlb_and_anon_zones_together() {
    if !kvm_available() {
        return;
    }
    let Some(_pool) = HugepagePool::reserve(16) else {
        return;
    };
    let run = run_json(&["--vcpus", "2", "--memory", "size=32M,backend=anon", "--memory", "size=32M,backend=hugetlb"]);
    run.assert_success().assert_verified(pages(56));
}

#[test]
fn hugetlb_with_an_empty_pool_says_how_many_pages_to_reserve() {
    if !kvm_available() {
        return;
    }
    let Some(_pool) = HugepagePool::empty() else {
        return;
    };
    let run = run_json(&["--memory", "size=64M,backend=hugetlb"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("32"), "must say 32 pages are needed: {}", run.stderr);
    assert!(run.stderr.contains("nr_hugepages"), "must say how to reserve them: {}", run.stderr);
}
