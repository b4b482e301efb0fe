//! End-to-end: the built-in tiny guest boots on real /dev/kvm on every non-hugetlb
//! backend, with 1, 2 and 4 vCPUs and several zones, and proves with fill/verify that
//! its memory holds what it wrote. (hugetlb: tests/hugetlb.rs.)

mod common;
use common::*;

#[test]
fn default_run_boots_two_vcpus_and_verifies() {
    if !kvm_available() {
        return;
    }
    let run = run_json(&[]);
    run.assert_success().assert_verified(pages(200));
    assert_eq!(run.report["vcpus"], 2);
    assert_eq!(run.report["guest"]["ready"]["cpus"], 2);
}

#[test]
fn anon_backend_boots_and_verifies() {
    if !kvm_available() {
        return;
    }
    run_json(&["--vcpus", "1", "--memory", "size=64M,backend=anon"]).assert_success().assert_verified(pages(56));
}

#[test]
fn memfd_backend_boots_and_verifies() {
    if !kvm_available() {
        return;
    }
    run_json(&["--vcpus", "1", "--memory", "size=64M,backend=memfd"]).assert_success().assert_verified(pages(56));
}

#[test]
fn file_backend_creates_its_file_and_verifies() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("file-backend");
    let path = dir.0.join("guest-ram");
    let spec = format!("size=64M,backend=file,path={}", path.display());
    run_json(&["--vcpus", "1", "--memory", &spec]).assert_success().assert_verified(pages(56));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 << 20);
    // The file holds what the guest wrote: the guest's pattern starts at 8 MiB.
    let data = std::fs::read(&path).unwrap();
    let word = u64::from_le_bytes(data[0x80_0000..0x80_0008].try_into().unwrap());
    assert_eq!(word, faultline_abi::pattern_word(1, 0x80_0000, 0));
}

#[test]
fn existing_file_of_the_right_size_is_reused_with_reuse_on() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("file-reuse");
    let path = dir.0.join("guest-ram");
    std::fs::write(&path, vec![0u8; 32 << 20]).unwrap();
    let spec = format!("size=32M,backend=file,path={},reuse=on", path.display());
    run_json(&["--vcpus", "1", "--memory", &spec]).assert_success().assert_verified(pages(24));
}

#[test]
fn one_two_and_four_vcpus_share_the_work() {
    if !kvm_available() {
        return;
    }
    for vcpus in ["1", "2", "4"] {
        let run = run_json(&["--vcpus", vcpus, "--memory", "size=96M"]);
        run.assert_success().assert_verified(pages(88));
        assert_eq!(run.report["guest"]["ready"]["cpus"].to_string(), vcpus);
        for result in run.report["guest"]["results"].as_array().unwrap() {
            assert_eq!(result["cpus"].to_string(), vcpus, "{result}");
        }
    }
}

#[test]
fn two_zones_with_different_backends_are_both_used() {
    if !kvm_available() {
        return;
    }
    let run = run_json(&["--vcpus", "2", "--memory", "size=32M,backend=anon", "--memory", "size=32M,backend=memfd"]);
    run.assert_success();
    // The workload region spans both zones: 64 MiB minus the 8 MiB the guest keeps.
    run.assert_verified(pages(56));
    assert_eq!(run.report["guest"]["ready"]["region_pages"], pages(56));
    assert_eq!(run.report["backends"], serde_json::json!(["anon", "memfd"]));
}

#[test]
fn zone_crossing_the_mmio_hole_is_split_and_verified() {
    if !kvm_available() {
        return;
    }
    // 3 GiB + 64 MiB of anon: RAM continues above 4 GiB; touch only what is needed to
    // cover both sides of the hole would need 3 GiB of fill, so fill just 64 MiB past
    // the start and check the guest saw all of its RAM.
    let run = run_json(&["--vcpus", "1", "--memory", "size=3136M", "--size", "64M"]);
    run.assert_success().assert_verified(pages(64));
    assert_eq!(run.report["guest"]["ready"]["ram_bytes"], 3136u64 << 20);
}

#[test]
fn touch_reports_a_latency_histogram_per_pass() {
    if !kvm_available() {
        return;
    }
    for pattern in ["sequential", "random", "strided"] {
        for access in ["read", "write"] {
            let run = run_json(&[
                "--vcpus",
                "2",
                "--memory",
                "size=40M",
                "--steps",
                "touch",
                "--pattern",
                pattern,
                "--access",
                access,
                "--passes",
                "2",
            ]);
            run.assert_success();
            let results = run.report["guest"]["results"].as_array().unwrap();
            let touches: Vec<_> = results.iter().filter(|r| r["step"] == "touch").collect();
            assert_eq!(touches.len(), 2, "{pattern}/{access}: {results:?}");
            for (index, touch) in touches.iter().enumerate() {
                assert_eq!(touch["pass"], index as u64 + 1);
                let histogram = &touch["latency_cycles"];
                // Every page of the region was touched exactly once per pass.
                assert_eq!(histogram["count"], pages(32), "{pattern}/{access}: {touch}");
                let bucket_total: u64 =
                    histogram["buckets"].as_array().unwrap().iter().map(|b| b[1].as_u64().unwrap()).sum();
                assert_eq!(bucket_total, pages(32));
                assert!(histogram["min"].as_u64().unwrap() <= histogram["max"].as_u64().unwrap());
            }
        }
    }
}

#[test]
fn dirty_and_idle_steps_run_and_memory_still_verifies() {
    if !kvm_available() {
        return;
    }
    let run = run_json(&[
        "--vcpus",
        "2",
        "--memory",
        "size=32M",
        "--steps",
        "fill,dirty,idle,verify",
        "--rate",
        "20000",
        "--duration-ms",
        "200",
    ]);
    run.assert_success().assert_verified(pages(24));
    let results = run.report["guest"]["results"].as_array().unwrap();
    let dirty = results.iter().find(|r| r["step"] == "dirty").expect("dirty result");
    assert!(dirty["pages"].as_u64().unwrap() > 0, "{dirty}");
}

#[test]
fn anon_rss_follows_touched_pages_not_guest_size() {
    if !kvm_available() {
        return;
    }
    let rss_after = |size: &str| {
        let run = run_json(&["--vcpus", "1", "--memory", "size=1G,backend=anon", "--size", size]);
        run.assert_success();
        run.report["host_memory"]["rss_anon_bytes"].as_u64().unwrap()
    };
    let small = rss_after("16M");
    let large = rss_after("144M");
    // A 1 GiB guest that touched 16 MiB holds far less than 1 GiB...
    assert!(small < 200 << 20, "1 GiB guest touching 16 MiB holds {} MiB", small >> 20);
    // ...and touching 128 MiB more adds (nearly) 128 MiB.
    let grown = large.saturating_sub(small);
    assert!((120 << 20..=200 << 20).contains(&grown), "grew by {} MiB", grown >> 20);
}
