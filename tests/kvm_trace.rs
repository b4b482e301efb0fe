//! `--trace-kvm`: KVM's own secondary-MMU events for this VM, and the chain from a change
//! of guest RAM to KVM — the MMU-notifier unmap that covered the change's host range, and
//! the guest's refault after (KVM mapping a frame of the range again) — for a balloon
//! discard, a userfaultfd MISSING fill, a swap-out and a KSM merge. Needs root (tracefs).

mod common;
use common::*;

use serde_json::Value;

/// The tests of this file one at a time: each squeezes, swaps or merges host memory and
/// reads one tracefs buffer, and side by side they make each other's reclaim fail (the
/// kernel declines every cgroup squeeze of a host that busy).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn trace_possible() -> Option<std::sync::MutexGuard<'static, ()>> {
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    common::root_and_kvm("the KVM trace (tracefs)").then_some(turn)
}

/// Asserts that changes of kind `what` were followed into KVM: unmapped (unless a fill)
/// and refaulted, and returns the first complete example.
fn assert_chain<'a>(trace: &'a Value, what: &str, unmapped: bool) -> &'a Value {
    let chain = &trace["chains"][what];
    assert!(chain["followed"].as_u64().unwrap_or(0) > 0, "no {what} followed: {trace}");
    if unmapped {
        assert!(chain["unmapped"].as_u64().unwrap() > 0, "no KVM unmap covered a {what}: {chain}");
    }
    assert!(chain["refaulted"].as_u64().unwrap() > 0, "no refault after a {what}: {chain}");
    let example = &chain["examples"][0];
    assert!(!example["refault"].is_null(), "{chain}");
    assert_eq!(example["unmap"].is_null(), !unmapped, "{chain}");
    example
}

#[test]
fn balloon_discard_and_uffd_fill_reach_kvm() {
    let Some(_turn) = trace_possible() else {
        return;
    };
    let run = run_json(&[
        "--vcpus",
        "2",
        "--memory",
        "size=64M,paging=uffd-missing",
        "--balloon-schedule",
        "16M,0",
        "--steps",
        "fill,balloon,verify",
        "--trace-kvm",
    ]);
    run.assert_success().assert_verified(1);
    let trace = &run.report["kvm_trace"];
    assert_eq!(trace["recorded"], true, "{trace}");
    assert!(trace["events"]["kvm_unmap_hva_range"].as_u64().unwrap() > 0, "{trace}");
    assert!(trace["vmm_invalidations"].as_u64().unwrap() > 0, "the balloon discarded nothing: {trace}");
    let discard = assert_chain(trace, "vmm/invalidation", true);
    // The VMM's own madvise (in the vCPU thread that handles the balloon's queue) is
    // what KVM's notifier saw.
    let comm = discard["unmap"]["comm"].as_str().unwrap();
    assert!(comm == "faultline" || comm.starts_with("fl-"), "{discard}");
    let fill = assert_chain(trace, "uffd/fill", false);
    assert!(fill["refault"]["comm"].as_str().unwrap().starts_with("fl-vcpu"), "{fill}");
    eprintln!("{}", serde_json::to_string_pretty(&trace["chains"]).unwrap());
}

/// A `faultline run` of the guest holding still (`fill,idle,verify`) while `kinds` run.
fn traced_host_changes(kinds: &str, extra: &[&str]) -> RunOutcome {
    let mut args = vec!["--vcpus", "2", "--memory", "48M", "--steps", "fill,idle,verify", "--duration-ms", "2000"];
    args.extend(["--host-changes", kinds, "--host-change-events", "40", "--host-change-rate", "50", "--trace-kvm"]);
    args.extend(extra);
    let run = run_json(&args);
    run.assert_success().assert_verified(1);
    assert_eq!(run.report["kvm_trace"]["recorded"], true, "{}", run.report["kvm_trace"]);
    run
}

#[test]
fn swap_out_reaches_kvm() {
    let Some(_turn) = trace_possible() else {
        return;
    };
    let run = traced_host_changes("swap", &[]);
    let trace = &run.report["kvm_trace"];
    let swap = assert_chain(trace, "swap/pageout", true);
    assert_eq!(swap["unmap"]["comm"], "faultline", "MADV_PAGEOUT runs in the VMM's driver thread: {swap}");
    // The second way: squeezing the VMM's own memory cgroup, where the host has one.
    let setup = run.report["host_changes"]["setup"].to_string();
    let squeezed = run.report["host_changes"]["by_op"]["memcg_squeeze"].as_u64().unwrap_or(0);
    if setup.contains("memory cgroup /") && squeezed > 0 {
        assert_chain(trace, "swap/memcg_squeeze", true);
    } else if setup.contains("memory cgroup /") {
        // cgroup v1 answers EBUSY when its reclaim cannot get under the limit (a busy
        // host); the run reports those as refused, and nothing happened to follow.
        let refused = &run.report["host_changes"]["first_errors"];
        assert!(refused.to_string().contains("memcg_squeeze"), "no squeeze done nor declined: {refused}");
        eprintln!("!!!! the kernel declined every memory cgroup squeeze of this run: {refused} !!!!");
    } else {
        eprintln!("!!!! no memory cgroup squeeze here: {setup} !!!!");
    }
    eprintln!("{}", serde_json::to_string_pretty(&trace["chains"]).unwrap());
}

#[test]
fn ksm_merge_reaches_kvm() {
    let Some(_turn) = trace_possible() else {
        return;
    };
    // Duplicate pages, so KSM has something to merge (merged pages are not paged out by
    // MADV_PAGEOUT: they are shared, hence a separate run from swap).
    let run = traced_host_changes("ksm", &["--dup-pages", "16"]);
    let trace = &run.report["kvm_trace"];
    let host = &run.report["host_changes"];
    assert!(host["ksm_merged_pages_peak"].as_u64().unwrap() > 0, "KSM merged nothing: {host}");
    eprintln!("kernel threads followed: {}", trace["kernel_threads"]);
    let merge = assert_chain(trace, "ksm/merge", true);
    assert!(merge["unmap"]["comm"].as_str().unwrap().starts_with("ksmd"), "KSM merges in ksmd: {merge}");
    // The guest reads the merged page: KVM maps the shared KSM page read-only.
    assert_eq!(merge["refault"]["writable"], false, "{merge}");
    eprintln!("{}", serde_json::to_string_pretty(&trace["chains"]).unwrap());
}
