//! Snapshots of VMs with a virtio-balloon, on the real /dev/kvm with the real binary:
//! snapshotted while the balloon inflates, restored in a new process, the guest's
//! balloon step goes on to its target and back, and everything verifies; a diff chain
//! over the inflation restores byte for byte to a full snapshot of the same instant
//! (ballooned pages zero, not the parent's bytes); and a userfaultfd-paged VM snapshotted
//! after an inflation restores lazily with its ballooned pages reading as zeros.

mod common;

use std::path::{Path, PathBuf};

use common::running::{chain_memory, restore, Running};
use common::{kvm_available, pages, HugepagePool, RunOutcome, ScratchDir};
use faultline::snapshot::read_state;
use serde_json::Value;

/// The balloon as a snapshot saved it: (target, actual, remaining schedule length).
fn saved_balloon(dir: &Path) -> (u32, u32, usize) {
    let state = read_state(dir).unwrap();
    let balloon = state.machine.balloon.expect("a balloon VM's snapshot has the balloon's state");
    (balloon.device.target_pages, balloon.device.actual_pages, balloon.device.schedule.len())
}

/// The guest's balloon changes: each followed, kept pages intact and returned pages zero.
fn assert_changes_checked_out(run: &RunOutcome, actuals: &[u64]) {
    let changes = run.report["guest"]["balloon_changes"].as_array().expect("balloon changes");
    let got: Vec<u64> = changes.iter().map(|c| c["actual_pages"].as_u64().unwrap()).collect();
    assert_eq!(got, actuals, "{}", run.stdout);
    for change in changes {
        assert_eq!((change["kept_ok"].as_bool(), change["zero_ok"].as_bool()), (Some(true), Some(true)), "{change}");
        assert_eq!(change["mismatches"], 0, "{change}");
    }
}

/// The inflation the first test snapshots in the middle of: three targets on the way up
/// (each followed by the guest's checks of its kept pages), then back to 0.
const SCHEDULE: &str = "64M,128M,192M,0";
const TARGETS_MIB: [u64; 4] = [64, 128, 192, 0];
const TOP_MIB: u64 = 192;

#[test]
fn a_vm_snapshotted_mid_inflation_goes_on_inflating_after_restore_and_diffs_match_a_full_snapshot() {
    if !kvm_available() {
        return;
    }
    let scratch = ScratchDir::new("snapshot-balloon");
    // Whether a diff lands in the inflation is a race with the guest; a VM that was
    // missed is stopped and another one tried.
    let (vm, mut n, mid) = (0..3)
        .find_map(|attempt| catch_inflating(&scratch.0.join(format!("try-{attempt}"))))
        .expect("three VMs in a row inflated their balloon between two diffs");
    let top = pages(TOP_MIB) as u32;
    let (mid, mid_actual) = mid;
    eprintln!("diff {n} caught the balloon at {mid_actual} of {top} pages");
    let dir = mid.parent().unwrap().to_path_buf();
    // More inflation (or the target reached), then a diff and a full snapshot of the same
    // instant.
    let late = loop {
        n += 1;
        let dir = dir.join(format!("diff-{n}"));
        vm.ctl_json(&["pause"]).unwrap();
        vm.snapshot(&dir, &["--diff"]);
        let (saved_target, actual, _) = saved_balloon(&dir);
        if actual > mid_actual || saved_target == 0 {
            break dir;
        }
        vm.ctl_json(&["resume"]).unwrap();
        assert!(n < 4000, "the balloon never went on inflating");
    };
    let full = dir.join("full");
    vm.snapshot(&full, &["--stop"]);
    let stopped = vm.wait();
    assert_eq!(stopped.report["exit"]["kind"], "stopped", "{}", stopped.stdout);

    // Base + diffs = full, byte for byte; the pages the balloon holds are zero in both
    // (a chain whose diffs did not record the discards would show the parent's pattern).
    let from_chain = chain_memory(&late);
    let from_full = chain_memory(&full);
    let differing = from_chain.bytes().chunks(4096).zip(from_full.bytes().chunks(4096)).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "pages where base+diffs differ from the full snapshot");
    let held = read_state(&late).unwrap().machine.balloon.unwrap().device.held;
    let held_bytes: u64 = held.iter().map(|r| r.1).sum();
    assert!(held_bytes > mid_actual as u64 * 4096, "{held:?}");
    let ram_base = read_state(&late).unwrap().config.zones[0].size_bytes; // one zone from gpa 0
    for &(gpa, len) in &held {
        assert!(gpa + len <= ram_base, "a held page beyond the zone");
        let bytes = &from_chain.bytes()[gpa as usize..(gpa + len) as usize];
        assert!(bytes.iter().all(|&b| b == 0), "ballooned pages at {gpa:#x} are not zero in the chain");
    }

    // The snapshot from the middle of the inflation, in a new process: the guest goes on
    // through the schedule to the top target, then back to 0, and verifies.
    let all_changes = TARGETS_MIB.map(pages);
    let restored = restore(&mid, &[]);
    restored.assert_success().assert_verified(1);
    assert_changes_checked_out(&restored, &all_changes);
    assert_eq!(restored.report["balloon"]["device"]["device_errors"], 0, "{}", restored.stdout);
    // And the late diff chain too (inflated further, or at the target already).
    let late_run = restore(&late, &[]);
    late_run.assert_success().assert_verified(1);
    assert_changes_checked_out(&late_run, &all_changes);
}

/// Starts a VM in `dir` following [`SCHEDULE`], takes a full snapshot, then diffs until
/// one catches the balloon on its way up (some pages given, not yet all of the top
/// target). Returns the VM, the diffs taken and the one that caught it with the
/// balloon's `actual` then; None (the VM stopped) when the inflation slipped between two
/// diffs.
fn catch_inflating(dir: &Path) -> Option<(Running, u32, (PathBuf, u32))> {
    std::fs::create_dir_all(dir).unwrap();
    let args = ["--vcpus", "2", "-m", "size=256M", "--balloon-schedule", SCHEDULE, "--steps", "fill,balloon,verify"];
    let vm = Running::start(dir, &args);
    let top = pages(TOP_MIB) as u32;
    vm.snapshot(&dir.join("base"), &[]);
    for n in 1..2000 {
        let diff = dir.join(format!("diff-{n}"));
        vm.snapshot(&diff, &["--diff"]);
        let (saved_target, actual, _) = saved_balloon(&diff);
        if saved_target == 0 || actual >= top {
            eprintln!("missed: the balloon got to {actual} pages (target {saved_target}) between two diffs");
            vm.ctl_json(&["pause"]).unwrap();
            vm.snapshot(&dir.join("end"), &["--diff", "--stop"]);
            vm.wait();
            return None;
        }
        if actual > 0 {
            return Some((vm, n, (diff, actual)));
        }
    }
    panic!("the balloon never started inflating");
}

/// Sets the restored VM's balloon to 0, waits for the end, checks it verified after
/// following an inflation to `inflated` pages and the deflation.
fn deflate_and_finish(vm: Running, inflated: u64) -> RunOutcome {
    vm.ctl_json(&["balloon", "set", "0"]).expect("balloon set 0");
    let run = vm.wait();
    run.assert_success().assert_verified(1);
    assert_changes_checked_out(&run, &[inflated, 0]);
    run
}

/// Starts a VM in `dir` whose guest follows two balloon changes by hand, waits until its
/// fill is done (the balloon step sends statistics as it starts), takes a full snapshot
/// `dir/base`, inflates the balloon to `mib` MiB and waits until the guest has.
fn inflated_after_base(dir: &Path, zone: &str, mib: u64) -> Running {
    let args = ["--vcpus", "2", "-m", zone, "--balloon", "--balloon-changes", "2", "--steps", "fill,balloon,verify"];
    let mut vm = Running::start(dir, &args);
    vm.wait_until(|vm| vm.ctl_json(&["balloon", "stats"]).is_ok_and(|s| !s["age_ms"].is_null()));
    vm.snapshot(&dir.join("base"), &[]);
    vm.ctl_json(&["balloon", "set", &format!("{mib}M")]).unwrap();
    let reached = |info: &Value| info["actual_pages"] == pages(mib) && info["target_pages"] == pages(mib);
    vm.wait_until(|vm| vm.ctl_json(&["balloon", "get"]).is_ok_and(|info| reached(&info)));
    vm
}

#[test]
fn a_uffd_paged_vm_snapshotted_after_inflation_restores_with_ballooned_pages_zero() {
    if !kvm_available() {
        return;
    }
    let scratch = ScratchDir::new("snapshot-balloon-uffd");
    let vm = inflated_after_base(&scratch.0, "size=128M,paging=uffd-missing", 64);
    let base = scratch.0.join("base");
    let diff = scratch.0.join("diff");
    vm.snapshot(&diff, &["--diff", "--stop"]);
    let stopped = vm.wait();
    assert_eq!(stopped.report["exit"]["kind"], "stopped", "{}", stopped.stdout);

    // The saved page-state table knows the ballooned pages are gone, and the diff
    // records them as zeros over the base's pattern.
    let state = read_state(&diff).unwrap();
    let page_state = state.machine.page_state.as_ref().expect("the page-state table is saved");
    let discarded: u64 = page_state.discarded.iter().map(|r| r.1).sum();
    assert!(discarded >= 64 << 20, "{discarded} bytes discarded, the balloon holds 64 MiB");
    let held = &state.machine.balloon.as_ref().unwrap().device.held;
    let chain = chain_memory(&diff);
    for &(gpa, len) in held {
        assert!(chain.bytes()[gpa as usize..(gpa + len) as usize].iter().all(|&b| b == 0), "{gpa:#x}");
    }
    let base_memory = chain_memory(&base);
    let (gpa, len) = held[0];
    assert!(
        base_memory.bytes()[gpa as usize..(gpa + len) as usize].iter().any(|&b| b != 0),
        "the base must hold the pattern where the balloon later took pages, or resurrection goes unseen"
    );

    // Lazily (every page from the images on first touch, discarded ones as zeros), then
    // eagerly into a uffd-missing zone: the guest deflates, finds its returned pages
    // zero, and verifies everything.
    let lazy = Running::restore(&scratch.0, "lazy.sock", &diff, &["--memory-restore", "uffd-missing"]);
    let run = deflate_and_finish(lazy, pages(64));
    assert_eq!(run.report["faults"]["modes"][0], "uffd-missing");
    assert_eq!(run.report["faults"]["coherence"]["mismatch_count"], 0, "{}", run.stdout);
    let eager = Running::restore(&scratch.0, "eager.sock", &diff, &["-m", "size=128M,paging=uffd-missing"]);
    // The eager load wrote the diff's zeros over the base's pattern; the restored
    // page-state table made those pages holes again: the balloon's 64 MiB is not back.
    let check = eager.ctl_json(&["paging", "check"]).unwrap();
    let populated = check["granules_populated"].as_u64().unwrap();
    assert!(populated <= pages(128 - 64), "{populated} pages populated after the restore: {check}");
    assert_eq!(check["mismatch_count"], 0, "{check}");
    let run = deflate_and_finish(eager, pages(64));
    assert_eq!(run.report["faults"]["coherence"]["mismatch_count"], 0, "{}", run.stdout);
}

#[test]
fn a_hugetlb_balloon_holding_a_partial_huge_page_snapshots_in_2m_units_and_restores() {
    if !kvm_available() {
        return;
    }
    // One 128 MiB VM at a time: the snapshotted one, then the restored one.
    let Some(_pool) = HugepagePool::reserve(70) else {
        return;
    };
    let scratch = ScratchDir::new("snapshot-balloon-hugetlb");
    // 33 MiB: 16 whole huge pages freed, and half of one held (zeroed, not freed).
    let vm = inflated_after_base(&scratch.0, "size=128M,backend=hugetlb", 33);
    vm.ctl_json(&["pause"]).unwrap();
    let diff = scratch.0.join("diff");
    let full = scratch.0.join("full");
    vm.snapshot(&diff, &["--diff"]);
    vm.snapshot(&full, &["--stop"]);
    let stopped = vm.wait();
    assert_eq!(stopped.report["exit"]["kind"], "stopped", "{}", stopped.stdout);

    let state = read_state(&diff).unwrap();
    assert_eq!(state.images[0].page_bytes, 2 << 20, "hugetlb zones are saved in 2 MiB units");
    let device = &state.machine.balloon.as_ref().unwrap().device;
    assert!(device.counters.huge_freed >= 16 && device.counters.zeroed > 0, "{:?}", device.counters);
    let from_chain = chain_memory(&diff);
    let from_full = chain_memory(&full);
    let differing = from_chain.bytes().chunks(4096).zip(from_full.bytes().chunks(4096)).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "pages where base+diff differ from the full snapshot");
    for &(gpa, len) in &device.held {
        assert!(from_chain.bytes()[gpa as usize..(gpa + len) as usize].iter().all(|&b| b == 0), "{gpa:#x}");
    }
    let restored = Running::restore(&scratch.0, "restored.sock", &diff, &[]);
    let run = deflate_and_finish(restored, pages(33));
    assert_eq!(run.report["backends"][0], "hugetlb");
}
