//! Host page-table changes the VMM did not make — swap-out, KSM merges, THP collapse and
//! split, compaction and migration, read-only windows — applied to guest RAM while the
//! guest runs, with every paging mode: each combination runs (and the guest proves it
//! lost no page and read nothing stale, the coherence checker stays clean) or is refused
//! with its reason. Then: the host is put back after a failed and after an interrupted
//! run. Needs root (the host changes do); each run serialises on the host lock itself.

mod common;
use common::*;

use std::process::Stdio;
use std::time::{Duration, Instant};

use faultline::host::lock::HostLock;

/// True when the host changes can run here (root and KVM); otherwise a loud skip.
fn host_changes_possible() -> bool {
    common::root_and_kvm("host changes (swap, KSM, compaction settings)")
}

const MODES: [&str; 4] = ["kernel", "prefault", "uffd-missing", "uffd-minor"];

/// The zone a kind is tried on with `paging`: anon where it can be, memfd for uffd-minor
/// (which needs a page cache), anon with THP for thp.
fn zone_for(kind: &str, paging: &str) -> String {
    let backend = if paging == "uffd-minor" { "memfd" } else { "anon" };
    let thp = if kind == "thp" { ",thp=on" } else { "" };
    format!("size=48M,backend={backend},paging={paging}{thp}")
}

/// The guest's steps for a kind: rewrite-and-check rounds (`churn`) while the host
/// changes run, except where the guest must not write (mprotect windows) or must keep
/// its pages still (KSM merges only pages that stay the same between two scans).
fn steps_for(kind: &str) -> Vec<&'static str> {
    match kind {
        "mprotect" => vec!["--steps", "fill,verify,idle,verify", "--duration-ms", "1000"],
        "ksm" => vec!["--steps", "fill,idle,verify", "--duration-ms", "1500", "--dup-pages", "16"],
        _ => vec!["--steps", "fill,churn", "--host-change-events", "120"],
    }
}

/// Runs `kind` with every paging mode; checks what each run must show.
fn every_paging_mode(kind: &str, refused_with: &[(&str, &str)]) {
    if !host_changes_possible() {
        return;
    }
    for paging in MODES {
        let zone = zone_for(kind, paging);
        let mut args = vec!["--vcpus", "2", "--memory", &zone, "--host-changes", kind, "--host-change-rate", "400"];
        args.extend(steps_for(kind));
        let run = run_json(&args);
        if let Some((_, reason)) = refused_with.iter().find(|(mode, _)| *mode == paging) {
            assert_eq!(run.code, 2, "{kind} with {paging} must be refused: {}", run.stdout);
            assert!(run.stderr.contains(reason), "{kind} {paging}: {}", run.stderr);
            eprintln!("{kind} with {paging}: refused: {}", run.stderr.trim());
            continue;
        }
        run.assert_success().assert_verified(1);
        let host = &run.report["host_changes"];
        assert_eq!(host["errors"], 0, "{host}");
        assert!(host["changes"].as_u64().unwrap() > 0, "{kind} {paging}: {host}");
        if let Some(churn) = run.report["guest"]["results"].as_array().unwrap().iter().find(|r| r["step"] == "churn") {
            // Nothing discards: a page found zero would be a page the host lost.
            assert_eq!(churn["zeroed_pages"], 0, "{kind} {paging}: pages lost: {churn}");
            assert!(churn["rounds"].as_u64().unwrap() >= 1, "{churn}");
        }
        let coherence = &run.report["faults"]["coherence"];
        if !coherence.is_null() {
            assert_eq!(coherence["mismatch_count"], 0, "{kind} {paging}: {coherence}");
        }
        let figures = &host["by_kind"][kind];
        match kind {
            "swap" => {
                assert!(figures["pages"].as_u64().unwrap() > 0, "nothing was paged out: {host}");
                assert!(host["swap_stored_pages_peak"].as_u64().unwrap() > 0, "{host}");
            }
            "ksm" => assert!(host["ksm_merged_pages_peak"].as_u64().unwrap() > 0, "KSM merged nothing: {host}"),
            "thp" | "mprotect" => assert!(figures["pages"].as_u64().unwrap() > 0, "{host}"),
            _ => {}
        }
        eprintln!("{kind} with {paging}: {host}\nfaults {}", run.report["faults"]);
    }
}

#[test]
fn swap_out_with_every_paging_mode_loses_no_page() {
    every_paging_mode("swap", &[]);
}

#[test]
fn ksm_merges_with_every_paging_mode_lose_no_page() {
    every_paging_mode("ksm", &[("uffd-minor", "ksm applies to no zone")]);
}

#[test]
fn thp_collapse_and_split_with_every_paging_mode_lose_no_page() {
    every_paging_mode("thp", &[("uffd-minor", "transparent huge pages are for backend=anon")]);
}

#[test]
fn compaction_and_move_pages_with_every_paging_mode_lose_no_page() {
    every_paging_mode("compaction", &[]);
}

#[test]
fn mprotect_windows_with_every_paging_mode_lose_no_page() {
    every_paging_mode("mprotect", &[]);
}

#[test]
fn impossible_host_changes_are_refused_with_the_reason() {
    if !kvm_available() {
        return;
    }
    let cases: [(&[&str], &str); 4] = [
        (&["--memory", "size=64M,backend=hugetlb", "--host-changes", "swap"], "hugetlb pages are never swapped"),
        (&["--memory", "size=64M,backend=memfd", "--host-changes", "ksm"], "KSM merges only private anonymous pages"),
        (&["--memory", "64M", "--host-changes", "mprotect", "--steps", "fill,churn"], "EFAULT"),
        (&["--memory", "64M", "--host-changes", "hotplug"], "unknown host change 'hotplug'"),
    ];
    for (args, reason) in cases {
        let run = run_json(args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stdout);
        assert!(run.stderr.contains(reason), "{args:?}: {}", run.stderr);
    }
}

/// The host settings a run may change, read under the host lock (so no run is between
/// its setup and its restore).
#[derive(Debug, PartialEq, Eq)]
struct HostState {
    swaps: String,
    zram_devices: Vec<String>,
    ksm: Vec<String>,
    trace_instances: Vec<String>,
    tracefs_mounts: Vec<String>,
    memory_cgroups: Vec<String>,
}

fn host_state() -> HostState {
    let _lock = HostLock::acquire().unwrap();
    let mut zram_devices: Vec<String> = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("zram"))
        .collect();
    zram_devices.sort();
    let ksm = ["run", "pages_to_scan", "sleep_millisecs"]
        .iter()
        .map(|f| std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{f}")).unwrap())
        .collect();
    let tracefs_mounts: Vec<String> = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).filter(|_| l.contains(" tracefs ")).map(str::to_string))
        .collect();
    let mut trace_instances: Vec<String> = tracefs_mounts
        .iter()
        .flat_map(|root| std::fs::read_dir(format!("{root}/instances")).into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("faultline-"))
        .collect();
    trace_instances.sort();
    // Runs make their memory cgroup beside the test's own (the children inherit it).
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let memcg = own.lines().find_map(|l| l.split(':').nth(2).filter(|_| l.split(':').nth(1) == Some("memory")));
    let mut memory_cgroups: Vec<String> = memcg
        .map(|path| format!("/sys/fs/cgroup/memory{path}"))
        .into_iter()
        .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("faultline-"))
        .collect();
    memory_cgroups.sort();
    HostState {
        swaps: std::fs::read_to_string("/proc/swaps").unwrap(),
        zram_devices,
        ksm,
        trace_instances,
        tracefs_mounts,
        memory_cgroups,
    }
}

#[test]
fn the_host_is_restored_after_a_run_that_fails() {
    if !host_changes_possible() {
        return;
    }
    let before = host_state();
    // The guest churns until the driver has made a million changes; the time limit ends
    // the run first, a failure (exit 1).
    let output = faultline()
        .args(["run", "--json", "--timeout", "2", "--memory", "48M", "--steps", "fill,churn", "--dup-pages", "8"])
        .args(["--host-changes", "swap,ksm", "--host-change-events", "1000000", "--trace-kvm"])
        .output()
        .unwrap();
    let run = outcome(output);
    assert_eq!(run.code, 1, "the run must fail by its time limit: {}\n{}", run.stdout, run.stderr);
    assert!(run.report["host_changes"]["changes"].as_u64().unwrap() > 0, "{}", run.report["host_changes"]);
    assert_eq!(host_state(), before, "the failed run left the host changed");
}

#[test]
fn the_host_is_restored_after_sigint() {
    if !host_changes_possible() {
        return;
    }
    let before = host_state();
    let child = faultline()
        .args(["run", "--json", "--timeout", "60", "--memory", "48M", "--steps", "fill,churn", "--dup-pages", "8"])
        .args(["--host-changes", "swap,ksm", "--host-change-events", "1000000", "--host-change-rate", "100"])
        .arg("--trace-kvm")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt it once its swap device is on (it may first wait for the host lock).
    let started = Instant::now();
    let pid = child.id().to_string();
    let swapping = || {
        let swaps = std::fs::read_to_string("/proc/swaps").unwrap();
        swaps.lines().filter(|l| l.starts_with("/dev/zram")).count()
            > before.swaps.lines().filter(|l| l.starts_with("/dev/zram")).count()
    };
    while !swapping() {
        assert!(started.elapsed() < Duration::from_secs(300), "the run never set up its swap device");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the driver start changing pages.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let run = outcome(child.wait_with_output().unwrap());
    assert_eq!(run.code, 1, "an interrupted run fails: {}\n{}", run.stdout, run.stderr);
    assert_eq!(run.report["host_changes"]["interrupted"], true, "{}", run.report["host_changes"]);
    assert_eq!(host_state(), before, "the interrupted run left the host changed");
}
