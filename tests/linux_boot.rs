//! Booting Linux: Debian's kernel (uncompressed vmlinux extracted from linux-image-amd64
//! by scripts/extract-vmlinux.sh) starts, prints its version and the memory map we gave
//! it. On this machine's nested KVM it cannot boot further (ring 0 is emulated), so that
//! is all this test asks.

mod common;
use common::*;

fn vmlinux() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("FAULTLINE_LINUX_VMLINUX")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/vmlinux"));
    if path.exists() {
        return Some(path);
    }
    if std::env::var("FAULTLINE_REQUIRE_LINUX").as_deref() == Ok("1") {
        panic!("no vmlinux at {} and FAULTLINE_REQUIRE_LINUX=1 (.ci/run extracts one)", path.display());
    }
    eprintln!("!!!! SKIPPED: no vmlinux at {} (see .ci/run for how to extract Debian's) !!!!", path.display());
    None
}

#[test]
fn debian_linux_prints_its_version_and_our_memory_map() {
    if !kvm_available() {
        return;
    }
    let Some(kernel) = vmlinux() else { return };
    let output = faultline()
        .args(["run", "--console", "--vcpus", "1", "--memory", "size=256M", "--timeout", "60"])
        .arg("--kernel")
        .arg(&kernel)
        .args(["--cmdline", "console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=8"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("Linux version 6."), "Linux did not print its version:\n{stdout}");
    // The memory map Linux prints must show the RAM we gave it: 256 MiB from 0, as one
    // or more usable ranges ending at 0x0fffffff.
    let usable: Vec<&str> = stdout.lines().filter(|l| l.contains("usable") && l.contains("[mem ")).collect();
    assert!(!usable.is_empty(), "no memory map printed:\n{stdout}");
    assert!(usable.iter().any(|l| l.contains("0x000000000fffffff")), "RAM end 256 MiB not in the map: {usable:#?}");
    // And the run ended by itself, with a report.
    assert!(stdout.contains("exit:"), "{stdout}");
}
