//! `cargo bench --bench boot`: process start → guest ready, Faultline vs QEMU microvm
//! booting the same ELF, in the same run (a short version of `faultline bench boot`).

fn main() {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(["bench", "boot", "--runs", "5"])
        .status()
        .expect("run faultline bench boot");
    std::process::exit(status.code().unwrap_or(1));
}
