//! `cargo bench --bench faults`: the short default sweep of `faultline bench faults`
//! (anon, memfd, hugetlb × kernel, uffd-missing, uffd-minor × default engine and reference
//! handler × 1, 2 vCPUs × sequential write × 64 MiB, 3 runs each), printed as a table with
//! progress on stderr. As the tests do, it reserves the huge pages its hugetlb cells need
//! (`--reserve-hugepages`, root) and gives them back.
//!
//! Options after `--` go to the sweep, e.g.
//! `cargo bench --bench faults -- --repeat 5 --engines default,reference,around=16 --out /tmp/faults`.

fn main() {
    // cargo passes `--bench` to harness-less benches; everything else is the sweep's.
    let extra: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(["bench", "faults", "--reserve-hugepages"])
        .args(&extra)
        .status()
        .expect("run faultline bench faults");
    std::process::exit(status.code().unwrap_or(1));
}
