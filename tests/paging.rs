//! Demand paging on real guests: every paging mode on every backend boots, fills and
//! verifies with the coherence checker clean at the end; a guest that faults faster than
//! one handler resolves slows down but finishes; a dead handler ends the VM with a clear
//! error instead of a hang; modes that cannot work are refused with the fix named.

mod common;
use common::*;
use serde_json::Value;

/// Checks the fault report of a run in `mode`: uffd modes resolved faults of `kind` and
/// the coherence check ran clean.
fn assert_paging(run: &RunOutcome, mode: &str, kind: Option<&str>) {
    let faults = &run.report["faults"];
    assert!(faults["modes"].as_array().unwrap().iter().all(|m| m == mode), "{faults}");
    let Some(kind) = kind else {
        assert!(faults["coherence"].is_null(), "kernel-filled zones are not tracked: {faults}");
        return;
    };
    let resolved: u64 = faults["latency"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == kind)
        .map(|l| l["count"].as_u64().unwrap())
        .sum();
    assert!(resolved > 0, "no {kind} faults resolved: {faults}");
    let coherence = &faults["coherence"];
    assert_eq!(coherence["mismatch_count"], 0, "coherence: {coherence}");
    assert!(coherence["granules_populated"].as_u64().unwrap() > 0, "{coherence}");
}

fn run_mode(zone: &str, mode: &str) -> RunOutcome {
    let memory = format!("{zone},paging={mode}");
    let run = run_json(&["--vcpus", "2", "--memory", &memory]);
    run.assert_success().assert_verified(pages(56));
    run
}

fn expected_kind(mode: &str) -> Option<&'static str> {
    match mode {
        "uffd-missing" => Some("missing"),
        "uffd-minor" => Some("minor"),
        _ => None,
    }
}

#[test]
fn every_mode_on_anon_memory() {
    if !kvm_available() {
        return;
    }
    for mode in ["kernel", "prefault", "uffd-missing"] {
        assert_paging(&run_mode("size=64M,backend=anon", mode), mode, expected_kind(mode));
    }
}

#[test]
fn every_mode_on_memfd_memory() {
    if !kvm_available() {
        return;
    }
    for mode in ["kernel", "prefault", "uffd-missing", "uffd-minor"] {
        assert_paging(&run_mode("size=64M,backend=memfd", mode), mode, expected_kind(mode));
    }
}

#[test]
fn every_mode_on_a_file_in_tmpfs() {
    if !kvm_available() {
        return;
    }
    let dir = std::path::PathBuf::from(format!("/dev/shm/faultline-paging-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for mode in ["kernel", "prefault", "uffd-missing", "uffd-minor"] {
        let path = dir.join(mode);
        let zone = format!("size=64M,backend=file,path={}", path.display());
        assert_paging(&run_mode(&zone, mode), mode, expected_kind(mode));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_mode_on_hugetlb_memory() {
    if !kvm_available() {
        return;
    }
    let Some(_pool) = HugepagePool::reserve(40) else {
        return;
    };
    for mode in ["kernel", "prefault", "uffd-missing", "uffd-minor"] {
        let run = run_mode("size=64M,backend=hugetlb", mode);
        assert_paging(&run, mode, expected_kind(mode));
        if let Some(kind) = expected_kind(mode) {
            // Whole 2 MiB pages: one fault per huge page the guest touched.
            let latency = run.report["faults"]["latency"].as_array().unwrap().clone();
            let huge: Vec<&Value> = latency.iter().filter(|l| l["kind"] == kind).collect();
            assert!(huge.iter().all(|l| l["page_bytes"] == 2 << 20), "{latency:?}");
            // A fault two vCPUs raise on the same page is resolved once and woken once
            // (EEXIST), and both are recorded.
            let eexist = run.report["faults"]["eexist"].as_u64().unwrap();
            let resolved: u64 = huge.iter().map(|l| l["count"].as_u64().unwrap()).sum();
            assert!(resolved <= 32 + eexist, "{latency:?}");
        }
    }
}

#[test]
fn zones_with_different_modes_in_one_vm() {
    if !kvm_available() {
        return;
    }
    let run = run_json(&[
        "--memory",
        "size=32M,backend=anon,paging=uffd-missing",
        "--memory",
        "size=32M,backend=memfd,paging=uffd-minor",
        "--memory",
        "size=32M,backend=anon",
    ]);
    run.assert_success().assert_verified(pages(88));
    let faults = &run.report["faults"];
    assert_eq!(faults["modes"], serde_json::json!(["uffd-missing", "uffd-minor", "kernel"]));
    assert_eq!(faults["coherence"]["mismatch_count"], 0, "{faults}");
}

#[test]
fn cli_paging_flag_prints_a_fault_summary() {
    if !kvm_available() {
        return;
    }
    let out = faultline().args(["run", "--paging", "uffd-missing", "-m", "64M"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("paging: uffd-missing"), "{text}");
    assert!(text.contains("Missing 4K faults:") && text.contains("engine latency p50"), "{text}");
    assert!(text.contains("coherence: clean"), "{text}");
}

#[test]
fn a_flood_of_faults_on_one_handler_thread_slows_down_but_finishes() {
    if !kvm_available() {
        return;
    }
    // Four vCPUs on this two-core host fill memory as fast as they can; one handler
    // thread resolves every fault, and the pattern must still verify.
    let run = run_json(&[
        "--vcpus",
        "4",
        "--memory",
        "size=64M,paging=uffd-missing",
        "--fault-threads",
        "1",
        "--steps",
        "fill,verify",
    ]);
    run.assert_success().assert_verified(pages(56));
    let faults = &run.report["faults"];
    let missing = faults["latency"].as_array().unwrap().iter().find(|l| l["kind"] == "missing").unwrap();
    assert!(missing["count"].as_u64().unwrap() >= pages(56), "{faults}");
    assert_eq!(faults["coherence"]["mismatch_count"], 0, "{faults}");
}

#[test]
fn modes_that_cannot_work_are_refused_with_the_fix() {
    let run = run_json(&["--memory", "size=64M,backend=anon,paging=uffd-minor"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("paging=uffd-minor") && run.stderr.contains("backend=memfd"), "{}", run.stderr);
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("paging-ext4");
    let path = dir.0.join("ram");
    for mode in ["uffd-missing", "uffd-minor"] {
        let zone = format!("size=64M,backend=file,path={},paging={mode}", path.display());
        let run = run_json(&["--memory", &zone]);
        if run.code == 0 {
            // The temp dir is itself on tmpfs here: nothing to refuse.
            eprintln!("note: {} is on tmpfs, the not-tmpfs error is not exercised", dir.0.display());
            break;
        }
        assert!(run.stderr.contains("tmpfs") && run.stderr.contains("/dev/shm"), "{}", run.stderr);
    }
    // A file that already holds data cannot be paged with MISSING faults.
    let shm = std::path::PathBuf::from(format!("/dev/shm/faultline-data-{}", std::process::id()));
    std::fs::write(&shm, vec![1u8; 64 << 20]).unwrap();
    let zone = format!("size=64M,backend=file,path={},reuse=on,paging=uffd-missing", shm.display());
    let run = run_json(&["--memory", &zone]);
    std::fs::remove_file(&shm).unwrap();
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("holds data") && run.stderr.contains("uffd-minor"), "{}", run.stderr);
}

#[test]
fn the_coherence_checker_runs_on_a_live_vm_through_the_control_socket() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("paging-ctl");
    let socket = dir.0.join("api.sock");
    let socket_arg = socket.to_str().unwrap();
    let child = faultline()
        .args(["run", "--json", "--timeout", "120", "-m", "size=64M,paging=uffd-missing", "--steps", "fill,churn"])
        .args(["--chaos-events", "20000", "--api-socket", socket_arg])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut checks = Vec::new();
    for _ in 0..200 {
        let out = faultline().args(["ctl", "-s", socket_arg, "paging", "check"]).output().unwrap();
        if out.status.success() {
            checks.push(String::from_utf8_lossy(&out.stdout).to_string());
            if checks.len() == 3 {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let run = outcome(child.wait_with_output().unwrap());
    run.assert_success();
    assert!(!checks.is_empty(), "never reached the control socket: {}", run.stderr);
    for check in &checks {
        assert!(check.starts_with("coherence: clean"), "{check}");
    }
}
