//! The balloon on real guests: on every backend, inflating gives the host back at least
//! 99% of the balloon's size (measured on the host: RSS, allocated blocks, hugetlb pages),
//! the guest's kept pages keep their pattern and deflated pages come back as zeros; under
//! uffd-missing paging with write-protect faults racing the discards, nothing hangs, no
//! data goes stale and the coherence checker is clean; `faultline ctl` steers a balloon.

mod common;
use common::*;
use serde_json::Value;

/// Runs fill, balloon (inflate to `balloon`, deflate to 0), verify on `zone`.
fn balloon_run(zone: &str, balloon: &str, extra: &[&str]) -> RunOutcome {
    let schedule = format!("{balloon},0");
    let mut args = vec!["--vcpus", "2", "--memory", zone, "--balloon-schedule", &schedule];
    args.extend(["--steps", "fill,balloon,verify"]);
    args.extend(extra);
    let run = run_json(&args);
    run.assert_success().assert_verified(1);
    run
}

/// Checks the host gave back the balloon and the guest's two changes checked out.
fn assert_freed(run: &RunOutcome, balloon_bytes: u64) -> &Value {
    let report = &run.report["balloon"];
    assert_eq!(report["peak_balloon_bytes"], balloon_bytes, "{report}");
    let freed = report["freed_bytes"].as_u64().unwrap();
    assert!(freed * 100 >= balloon_bytes * 99, "host freed only {freed} of {balloon_bytes} bytes: {report}");
    assert_eq!(report["device"]["device_errors"], 0, "{report}");
    let changes = run.report["guest"]["balloon_changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2, "{changes:?}");
    for change in changes {
        assert_eq!((change["kept_ok"].as_bool(), change["zero_ok"].as_bool()), (Some(true), Some(true)), "{change}");
        assert_eq!(change["mismatches"], 0, "{change}");
    }
    assert_eq!(changes[0]["actual_pages"], balloon_bytes / 4096);
    assert_eq!(changes[1]["actual_pages"], 0);
    eprintln!("{report}");
    report
}

#[test]
fn anon_balloon_frees_its_size() {
    if kvm_available() {
        assert_freed(&balloon_run("size=256M,backend=anon", "128M", &[]), 128 << 20);
    }
}

#[test]
fn memfd_balloon_frees_its_size() {
    if kvm_available() {
        assert_freed(&balloon_run("size=256M,backend=memfd", "128M", &[]), 128 << 20);
    }
}

#[test]
fn file_balloon_frees_its_size() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("balloon-file");
    let zone = format!("size=256M,backend=file,path={}", dir.0.join("ram").display());
    assert_freed(&balloon_run(&zone, "128M", &[]), 128 << 20);
}

#[test]
fn hugetlb_balloon_frees_whole_huge_pages() {
    if !kvm_available() {
        return;
    }
    let Some(_pool) = HugepagePool::reserve(140) else {
        return;
    };
    let run = balloon_run("size=256M,backend=hugetlb", "128M", &[]);
    let report = assert_freed(&run, 128 << 20);
    assert_eq!(report["device"]["huge_pages_freed"], 64, "{report}");
}

#[test]
fn hugetlb_balloon_holds_a_partial_huge_page_and_says_so() {
    if !kvm_available() {
        return;
    }
    let Some(_pool) = HugepagePool::reserve(140) else {
        return;
    };
    // 1 MiB: half a huge page, which cannot be freed; the device zeroes it instead.
    let run = balloon_run("size=256M,backend=hugetlb", "1M", &[]);
    let report = &run.report["balloon"];
    assert_eq!(report["device"]["huge_pages_freed"], 0, "{report}");
    assert!(report["device"]["pages_zeroed"].as_u64().unwrap() >= 256, "{report}");
}

#[test]
fn balloon_under_uffd_missing_with_write_protect_faults_racing_it() {
    if !kvm_available() {
        return;
    }
    let extra = ["--chaos-events", "1000000", "--chaos-no-discard", "--chaos-interval-us", "0"];
    let run = balloon_run("size=128M,backend=anon,paging=uffd-missing", "64M", &extra);
    assert_freed(&run, 64 << 20);
    let faults = &run.report["faults"];
    assert_eq!(faults["coherence"]["mismatch_count"], 0, "{faults}");
    let wp: u64 = faults["latency"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "write-protect")
        .map(|l| l["count"].as_u64().unwrap())
        .sum();
    assert!(wp > 0, "no write-protect fault raced the balloon: {faults}");
    assert_eq!(run.report["chaos"]["errors"], 0);
}

#[test]
fn faultline_ctl_steers_a_running_balloon() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("balloon-ctl");
    let socket = dir.0.join("api.sock");
    let socket = socket.to_str().unwrap();
    let child = faultline()
        .args(["run", "--json", "--timeout", "120", "-m", "size=256M", "--steps", "fill,balloon,verify"])
        .args(["--balloon", "--balloon-changes", "2", "--api-socket", socket])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ctl = |args: &[&str]| {
        let out = faultline().args(["ctl", "-s", socket, "--json"]).args(args).output().unwrap();
        out.status.success().then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
    };
    let wait_for = |pages: u64| {
        for _ in 0..2000 {
            if let Some(info) = ctl(&["balloon", "get"]) {
                if info["actual_pages"] == pages && info["target_pages"] == pages {
                    return info;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("the guest never reached {pages} balloon pages");
    };
    // The socket appears once the VM is built.
    for _ in 0..500 {
        if ctl(&["status"]).is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(ctl(&["status"]).unwrap()["balloon"], true);
    ctl(&["balloon", "set", "64M"]).expect("balloon set");
    let inflated = wait_for(pages(64));
    assert_eq!(inflated["host_freed_bytes"], 64u64 << 20, "{inflated}");
    ctl(&["balloon", "set", "0"]).expect("balloon set 0");
    // The guest ends its step (and the VM ends) as soon as it has deflated: its report
    // says whether it got there.
    let run = outcome(child.wait_with_output().unwrap());
    run.assert_success().assert_verified(1);
    let changes = run.report["guest"]["balloon_changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!((changes[0]["actual_pages"].as_u64(), changes[1]["actual_pages"].as_u64()), (Some(pages(64)), Some(0)));
    assert!(run.report["balloon"]["freed_ratio"].as_f64().unwrap() >= 0.99, "{}", run.report["balloon"]);
}
