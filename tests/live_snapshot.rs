//! Live snapshots on the real /dev/kvm (`snapshot create DIR --live`, userfaultfd
//! write-protect): the guest rewrites its pages generation after generation
//! (`generations`) while the snapshot is copied out; the VM runs on and its own check
//! finds every write; a restore of the snapshot in a new process resumes the guest at
//! the pause, and the guest finds every page at the generation its cursor says: none
//! newer (a write after the pause leaked into the image) and none older (a page copied
//! too late or lost).

mod common;

use std::path::Path;
use std::time::Duration;

use common::running::{restore, Running};
use common::{root_and_kvm, HugepagePool, RunOutcome, ScratchDir};
use serde_json::Value;

/// One test at a time: each runs a VM whose two vCPUs spin through the whole step, and
/// the step must outlast the snapshot; on a small CI machine parallel tests starve each
/// other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest: fill, then `generations` at `rate` pages/s for 8 s. A round over the
/// region takes longer than the step has left after the snapshot, so the restored guest
/// cannot rewrite every page before it checks them: what it finds unrewritten is what
/// the image holds.
fn workload<'a>(memory: &'a str, rate: &'a str) -> Vec<&'a str> {
    vec!["--vcpus", "2", "-m", memory, "--steps", "fill,generations", "--rate", rate, "--duration-ms", "8000"]
}

/// The `generations` result of a finished run; asserts it found no bad page.
fn generations_ok(run: &RunOutcome) -> Value {
    run.assert_success();
    let result = run.report["guest"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["step"] == "generations")
        .cloned()
        .unwrap_or_else(|| panic!("no generations result: {}", run.stdout));
    assert_eq!(result["bad_pages"], 0, "{result}");
    run.assert_verified(result["pages"].as_u64().unwrap());
    result
}

/// Boots a guest on `memory`, snapshots it live in the middle of `generations`, checks
/// the source VM ran on and lost nothing, then restores the snapshot and checks it.
/// With `diff_on_top`, a diff is taken on top of the live snapshot a little later and
/// restored too: the dirty log was reset in the live snapshot's pause, so the diff holds
/// exactly the writes after it.
fn live_snapshot_round_trip(memory: &str, restore_args: &[&str], diff_on_top: bool) {
    let _one = exclusive();
    let scratch = ScratchDir::new(&format!("live-snapshot-{}", memory.replace(['=', ','], "-")));
    let dir = scratch.0.as_path().join("snap");
    let vm = Running::start(scratch.0.as_path(), &workload(memory, "3000"));
    // The fill of the region is over well before this; the generations step runs 8 s.
    std::thread::sleep(Duration::from_millis(2500));
    // A directory in use (it holds the control socket) is refused and left as it was.
    let busy = vm.ctl_json(&["snapshot", "create", scratch.0.to_str().unwrap(), "--live"]);
    assert!(busy.as_ref().is_err_and(|e| e.contains("not empty")), "{busy:?}");
    assert!(vm.socket.exists(), "a refused live snapshot removed nothing");
    let summary = vm.snapshot(&dir, &["--live"]);
    let status = vm.ctl_json(&["status"]).unwrap();
    assert_eq!(status["state"], "running", "the VM runs on after a live snapshot: {status}");
    assert_eq!(summary["kind"], "full", "{summary}");
    let write_faults = summary["write_faults"].as_u64().expect("a live snapshot counts its write faults");
    eprintln!(
        "live snapshot of {memory}: guest paused {} µs (stopping the vCPUs {} µs), {} MiB in {:.1} ms, {write_faults} writes waited for their copy; {}",
        summary["guest_pause_ns"].as_u64().unwrap() / 1000,
        summary["pause_ns"].as_u64().unwrap() / 1000,
        summary["memory_bytes"].as_u64().unwrap() >> 20,
        summary["total_ms"].as_f64().unwrap(),
        summary["pause_breakdown"],
    );
    let diff_dir = scratch.0.join("diff");
    if diff_on_top {
        std::thread::sleep(Duration::from_millis(500));
        let diff = vm.snapshot(&diff_dir, &["--diff"]);
        assert_eq!(diff["kind"], "diff", "{diff}");
    }
    let source = vm.wait();
    let results = source.report["guest"]["results"].as_array().unwrap().clone();
    generations_ok(&source);
    assert!(
        results.iter().any(|r| r["step"] == "fill"),
        "the source filled its region before the snapshot: {}",
        source.stdout
    );

    let restored = restore(&dir, restore_args);
    let result = generations_ok(&restored);
    let pages = result["pages"].as_u64().unwrap();
    assert!(pages > 0, "{result}");
    check_restored_report(&restored, &dir);
    if diff_on_top {
        let restored = restore(&diff_dir, restore_args);
        generations_ok(&restored);
        check_restored_report(&restored, &diff_dir);
    }
}

/// The restored guest resumed inside `generations` (its fill result came from the
/// snapshot's saved report, not from running again).
fn check_restored_report(restored: &RunOutcome, dir: &Path) {
    let results = restored.report["guest"]["results"].as_array().unwrap();
    assert_eq!(
        results.iter().filter(|r| r["step"] == "fill").count(),
        1,
        "restoring {} resumed the guest after its fill, inside generations: {}",
        dir.display(),
        restored.stdout
    );
}

#[test]
fn a_live_snapshot_of_an_anonymous_guest_is_the_guest_at_the_pause_and_a_diff_builds_on_it() {
    if !root_and_kvm("live snapshots register guest RAM with userfaultfd") {
        return;
    }
    live_snapshot_round_trip("128M", &[], true);
}

#[test]
fn a_live_snapshot_of_a_memfd_guest_is_the_guest_at_the_pause() {
    if !root_and_kvm("live snapshots register guest RAM with userfaultfd") {
        return;
    }
    live_snapshot_round_trip("size=128M,backend=memfd", &[], false);
}

#[test]
fn a_live_snapshot_of_a_hugetlb_guest_is_the_guest_at_the_pause() {
    if !root_and_kvm("live snapshots register guest RAM with userfaultfd") {
        return;
    }
    // 64 pages for the guest (the source has ended before its restore starts).
    let Some(_pool) = HugepagePool::reserve(64) else { return };
    live_snapshot_round_trip("size=128M,backend=hugetlb", &[], false);
}

#[test]
fn a_live_snapshot_refuses_zones_the_fault_engine_pages() {
    if !root_and_kvm("live snapshots register guest RAM with userfaultfd") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("live-snapshot-refused");
    let dir = scratch.0.as_path().join("snap");
    let vm = Running::start(
        scratch.0.as_path(),
        &["-m", "size=64M,paging=uffd-missing", "--steps", "fill,idle", "--duration-ms", "2000"],
    );
    let args = ["snapshot", "create", dir.to_str().unwrap(), "--live"];
    let error = vm.ctl_json(&args).expect_err("a live snapshot of a uffd-missing zone is refused");
    assert!(error.contains("zone 0") && error.contains("without --live"), "{error}");
    assert!(!dir.exists(), "a refused snapshot leaves no directory");
    let status = vm.ctl_json(&["status"]).unwrap();
    assert_eq!(status["state"], "running", "{status}");
    vm.wait().assert_success();
}
