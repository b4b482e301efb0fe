//! Booting Linux: Debian's kernel (uncompressed vmlinux extracted from linux-image-amd64
//! by scripts/extract-vmlinux.sh) starts, prints its version and the memory map we gave
//! it. On this machine's nested KVM it cannot boot further in reasonable time (ring 0 is
//! emulated), so that is all this test asks; it stops the VM once it has seen both.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

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
    let mut child = faultline()
        .args(["run", "--console", "--vcpus", "1", "--memory", "size=256M", "--timeout", "240"])
        .arg("--kernel")
        .arg(&kernel)
        .args(["--cmdline", "console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut version = false;
    let mut map_lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        version |= line.contains("Linux version 6.");
        let is_map_line = line.contains("[mem 0x") && (line.contains("usable") || line.contains("reserved"));
        if is_map_line {
            map_lines.push(line.clone());
        }
        seen.push(line);
        // The map is printed as a block: once it has ended, we have what we came for.
        if version && !map_lines.is_empty() && !is_map_line {
            break;
        }
        if started.elapsed() > Duration::from_secs(240) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let output = seen.join("\n");
    assert!(version, "Linux did not print its version:\n{output}");
    // The RAM we gave it: 256 MiB from 0 (as one or more usable ranges ending at 256 MiB).
    let usable: Vec<&String> = map_lines.iter().filter(|l| l.contains("usable")).collect();
    assert!(!usable.is_empty(), "no memory map printed:\n{output}");
    assert!(usable.iter().any(|l| l.contains("0x000000000fffffff")), "RAM end 256 MiB not in the map: {usable:#?}");
    assert!(
        usable.iter().any(|l| l.contains("[mem 0x0000000000100000-")),
        "RAM from 1 MiB not in the map: {usable:#?}"
    );
}
