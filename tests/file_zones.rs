//! The `file` backend's contract: a new or empty file is created and sized; a file that
//! holds data is refused unless the zone says `reuse=on` (and then it must have the zone's
//! size); a larger file is refused; two zones on one file (by device and inode) and a
//! second VM on a running VM's file are refused; a filesystem too small for the zone is
//! refused up front, and a file truncated under a running VM ends it with an error that
//! names the file.

mod common;
use common::*;

use std::path::Path;
use std::process::{Child, Command, Stdio};

fn file_spec(path: &Path, size: &str, extra: &str) -> String {
    format!("size={size},backend=file,path={}{extra}", path.display())
}

fn expect_refused(run: &RunOutcome, needles: &[&str]) {
    assert_eq!(run.code, 2, "expected a configuration error\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
    for needle in needles {
        assert!(run.stderr.contains(needle), "error must mention '{needle}': {}", run.stderr);
    }
}

#[test]
fn a_file_that_holds_data_is_refused_unless_the_zone_says_reuse() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("file-holds-data");
    let path = dir.0.join("ram");
    std::fs::write(&path, vec![7u8; 32 << 20]).unwrap();
    let run = run_json(&["--vcpus", "1", "--memory", &file_spec(&path, "32M", "")]);
    expect_refused(&run, &[&path.display().to_string(), "holds data", "reuse=on"]);
    assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 32 << 20], "the user's data must not be touched");
    // Data the guest can boot on (zeros: the image's zero-initialised sections are the
    // loader's to clear, a separate matter).
    std::fs::write(&path, vec![0u8; 32 << 20]).unwrap();
    run_json(&["--vcpus", "1", "--memory", &file_spec(&path, "32M", ",reuse=on")])
        .assert_success()
        .assert_verified(pages(24));
}

#[test]
fn a_sparse_file_of_the_zone_size_is_used_and_reuse_of_nothing_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("file-sparse");
    let path = dir.0.join("ram");
    std::fs::File::create(&path).unwrap().set_len(32 << 20).unwrap();
    run_json(&["--vcpus", "1", "--memory", &file_spec(&path, "32M", "")]).assert_success().assert_verified(pages(24));
    let fresh = dir.0.join("fresh");
    let run = run_json(&["--vcpus", "1", "--memory", &file_spec(&fresh, "32M", ",reuse=on")]);
    expect_refused(&run, &["reuse=on", "nothing to reuse"]);
}

#[test]
fn a_file_larger_than_the_zone_is_refused_even_with_reuse() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("file-larger");
    let path = dir.0.join("ram");
    std::fs::write(&path, vec![3u8; 48 << 20]).unwrap();
    for extra in ["", ",reuse=on"] {
        let run = run_json(&["--vcpus", "1", "--memory", &file_spec(&path, "32M", extra)]);
        expect_refused(&run, &[&path.display().to_string(), "50331648 bytes", "zone is 33554432 bytes"]);
    }
    let sparse = dir.0.join("sparse");
    std::fs::File::create(&sparse).unwrap().set_len(48 << 20).unwrap();
    let run = run_json(&["--vcpus", "1", "--memory", &file_spec(&sparse, "32M", "")]);
    expect_refused(&run, &["zone's size"]);
    assert_eq!(std::fs::read(&path).unwrap(), vec![3u8; 48 << 20]);
}

#[test]
fn two_zones_on_one_file_are_refused_however_it_is_named() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("file-alias");
    let path = dir.0.join("ram");
    let dotted = dir.0.join(".").join("ram");
    let symlink = dir.0.join("link");
    let hardlink = dir.0.join("hard");
    std::fs::File::create(&path).unwrap();
    std::os::unix::fs::symlink(&path, &symlink).unwrap();
    std::fs::hard_link(&path, &hardlink).unwrap();
    for alias in [&path, &dotted, &symlink, &hardlink] {
        let run = run_json(&["--memory", &file_spec(&path, "32M", ""), "--memory", &file_spec(alias, "32M", "")]);
        expect_refused(&run, &["memory zones 0 and 1 are the same file", "inode"]);
    }
}

/// Waits until `path` has `bytes` (the VM sizes its file after taking its lock), or the
/// child ends.
fn wait_for_size(child: &mut Child, path: &Path, bytes: u64) {
    while std::fs::metadata(path).map_or(true, |m| m.len() != bytes) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the first VM ended ({status}) before sizing {}", path.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn long_running_vm(zone: &str, steps: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(["run", "--json", "--vcpus", "1", "--timeout", "120", "--steps", steps, "--duration-ms", "20000"])
        .args(["--memory", zone])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_second_vm_on_a_running_vms_file_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("file-locked");
    let path = dir.0.join("ram");
    let mut first = long_running_vm(&file_spec(&path, "32M", ""), "idle");
    wait_for_size(&mut first, &path, 32 << 20);
    let second = run_json(&["--vcpus", "1", "--memory", &file_spec(&path, "32M", ",reuse=on")]);
    let still_running = first.try_wait().unwrap().is_none();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(still_running, "the first VM must be running while the second tries");
    expect_refused(&second, &[&path.display().to_string(), "in use by another process"]);
}

#[test]
fn a_file_truncated_under_a_running_vm_ends_it_naming_the_file() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("file-truncated");
    let path = dir.0.join("ram");
    // The guest idles, then fills all of RAM: the fill runs into the truncated end.
    let mut vm = long_running_vm(&file_spec(&path, "64M", ""), "idle,fill,verify");
    wait_for_size(&mut vm, &path, 64 << 20);
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(16 << 20).unwrap();
    let run = outcome(vm.wait_with_output().unwrap());
    assert_eq!(run.code, 1, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    let exit = run.report["exit"].to_string();
    assert!(exit.contains(&path.display().to_string()) && exit.contains("truncated to 16777216 bytes"), "{exit}");
}

#[test]
fn a_zone_larger_than_its_filesystem_is_refused_up_front() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("file-small-fs");
    let mount = dir.0.join("mnt");
    std::fs::create_dir(&mount).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=16M", "tmpfs"]).arg(&mount).status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("!!!! SKIPPED: cannot mount a tmpfs here (not root?) !!!!");
        return;
    }
    let path = mount.join("ram");
    let run = run_json(&["--vcpus", "1", "--memory", &file_spec(&path, "64M", "")]);
    let _ = Command::new("umount").arg(&mount).status();
    expect_refused(&run, &[&path.display().to_string(), "filesystem has", "free"]);
}

#[test]
fn pages_lost_to_another_process_stay_reported_after_the_engine_refills_them() {
    if !kvm_available() {
        return;
    }
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    let path = std::path::PathBuf::from(format!("/dev/shm/faultline-punched-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let zone = file_spec(&path, "64M", ",paging=uffd-missing");
    let mut vm = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(["run", "--console", "--vcpus", "1", "--timeout", "120", "--steps", "fill,idle,verify"])
        .args(["--duration-ms", "3000", "--memory", &zone])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(vm.stdout.take().unwrap()).lines();
    let mut output = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        output.push_str(&line);
        output.push('\n');
        if line.starts_with("FL result") && line.contains("\"fill\"") {
            break;
        }
    }
    // While the guest idles, punch 1 MiB out of its filled RAM behind the VMM's back.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // SAFETY: fallocate on a descriptor we own, the result is checked.
    let rc = unsafe {
        libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 32 << 20, 1 << 20)
    };
    assert_eq!(rc, 0, "punch hole: {}", std::io::Error::last_os_error());
    for line in lines {
        output.push_str(&line.unwrap());
        output.push('\n');
    }
    let status = vm.wait().unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(output.contains("verify FAILED"), "the guest must see zeros where its data was:\n{output}");
    assert!(output.contains("coherence: ") && !output.contains("coherence: clean"), "{output}");
    assert!(output.contains("256 pages LOST behind the VMM's back"), "{output}");
    assert_eq!(status.code(), Some(1), "{output}");
}
