//! `faultline bench faults` end to end: a small sweep of real guests on /dev/kvm writes its
//! table, JSON, CSV and plots; engine options reach the engine; bad ones are refused.

mod common;
use common::*;
use serde_json::Value;

fn metric(cell: &Value, name: &str) -> Option<f64> {
    cell["metrics"][name]["median"].as_f64()
}

#[test]
fn a_small_sweep_writes_table_json_csv_and_plots_with_baselines_and_ratios() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("bench-faults");
    let out = dir.0.display().to_string();
    let args = [
        "bench",
        "faults",
        "--backends",
        "anon,memfd",
        "--paging",
        "uffd-missing,uffd-minor",
        "--engines",
        "default,reference,around=8",
        "--vcpus",
        "1",
        "--sizes",
        "4M",
        "--repeat",
        "2",
        "--out",
        &out,
    ];
    let run = outcome(faultline().args(args).output().expect("spawn faultline"));
    assert_eq!(run.code, 0, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    assert!(run.stdout.contains("anon uffd-missing reference 1v 1t seq write 4M"), "{}", run.stdout);
    assert!(run.stdout.contains("skipped: anon uffd-minor"), "uffd-minor on anon must be skipped: {}", run.stdout);
    assert!(run.stderr.contains("[  1/"), "progress lines on stderr: {}", run.stderr);

    let report: Value = serde_json::from_str(&std::fs::read_to_string(dir.0.join("report.json")).unwrap()).unwrap();
    assert!(report["machine"]["command_line"].as_str().unwrap().contains("bench faults"));
    assert!(!report["machine"]["kernel"].as_str().unwrap().is_empty());
    let cells = report["cells"].as_array().unwrap();
    // anon: kernel + missing x 3 engines; memfd: kernel + (missing + minor) x 3 engines.
    assert_eq!(cells.len(), 4 + 7, "{:#?}", cells.iter().map(|c| &c["label"]).collect::<Vec<_>>());
    for cell in cells {
        let label = cell["label"].as_str().unwrap();
        assert_eq!(cell["runs_ok"], 2, "{label}: {}", cell["errors"]);
        for m in ["first_p50_ns", "first_p999_ns", "warm_p50_ns", "fault_p50_ns", "rate_pages_s", "total_ms"] {
            assert!(metric(cell, m).is_some(), "{label} lacks {m}");
        }
        assert!(!cell["first_cdf_ns"].as_array().unwrap().is_empty(), "{label} has no CDF");
        let engine = cell["cell"]["engine"].as_str().unwrap();
        if label.contains(" kernel ") {
            continue;
        }
        assert!(metric(cell, "x_kernel_rate").is_some(), "{label}: no ratio to its kernel baseline");
        if engine != "reference" {
            assert!(metric(cell, "x_reference_rate").is_some(), "{label}: no ratio to the reference");
        }
        let faults =
            ["engine_missing_4k_count", "engine_minor_4k_count"].iter().filter_map(|m| metric(cell, m)).sum::<f64>();
        if engine == "around=8" {
            assert!(metric(cell, "x_default_rate").is_some(), "{label}: no ratio to the default engine");
            // Fault-around reached the engine: far fewer faults than the region's 1024 pages.
            assert!(faults > 0.0 && faults < 512.0, "{label}: {faults} faults with around=8");
        } else {
            assert!(faults >= 1024.0, "{label}: only {faults} faults for 1024 pages");
        }
    }
    let csv = std::fs::read_to_string(dir.0.join("cells.csv")).unwrap();
    assert_eq!(csv.lines().count(), cells.len() + 1);
    assert!(csv.lines().next().unwrap().contains("first_p50_ns_median"));
    for svg in ["latency-cdf.svg", "rate-vs-vcpus.svg"] {
        let text = std::fs::read_to_string(dir.0.join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"), "{svg}");
        assert!(text.matches("<polyline").count() >= 4, "{svg} has too few lines");
    }
}

#[test]
fn bad_engine_options_stop_the_run_with_a_message_naming_them() {
    if !kvm_available() {
        return;
    }
    let output = faultline()
        .args(["run", "--json", "--paging", "uffd-missing", "--memory", "size=32M", "--steps", "idle"])
        .args(["--fault-engine", "dontwake+turbo"])
        .output()
        .expect("spawn faultline");
    let run = outcome(output);
    assert_eq!(run.code, 2, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    assert!(run.stderr.contains("'turbo'") && run.stderr.contains("--fault-engine"), "{}", run.stderr);
}
