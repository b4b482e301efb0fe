//! `faultline bench faults --host-noise`: the matrix runs once per noise (every child
//! under it), and each cell is compared with itself under `none` in the same sweep.

mod common;
use common::*;

#[test]
fn every_noise_runs_the_matrix_and_is_compared_with_none() {
    if !kvm_available() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let output = faultline()
        .args(["bench", "faults", "--backends", "anon", "--paging", "kernel", "--engines", "default", "--vcpus", "1"])
        .args(["--sizes", "16M", "--repeat", "1", "--quiet", "--json", "--host-noise", "mmap-churn,mprotect-churn"])
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let sweeps = report["sweeps"].as_array().unwrap();
    let names: Vec<_> = sweeps.iter().map(|s| s[0].as_str().unwrap()).collect();
    assert_eq!(names, ["none", "mmap-churn", "mprotect-churn"], "none is added and run first");
    for sweep in sweeps {
        let (noise, cells) = (sweep[0].as_str().unwrap(), sweep[1]["cells"].as_array().unwrap());
        assert!(!cells.is_empty());
        for cell in cells {
            assert!(cell["command"].as_str().unwrap().ends_with(&format!("--host-noise {noise}")), "{cell}");
            assert_eq!(cell["runs_ok"], 1, "{noise}: {}", cell["errors"]);
        }
    }
    for row in report["rows"].as_array().unwrap() {
        let x = row["x_none"].as_array().unwrap();
        assert!(!x.is_empty(), "{row}");
        if row["noise"] == "none" {
            assert!(x.iter().all(|p| p[1].as_f64() == Some(1.0)), "{row}");
        }
    }
    for file in ["host-noise.json", "host-noise.csv", "host-noise.txt", "noise-mmap-churn/cells.csv"] {
        assert!(out.path().join(file).is_file(), "{file} missing");
    }
}
