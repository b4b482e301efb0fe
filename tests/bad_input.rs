//! Bad input gets a clear error that names the problem, a non-zero exit status, and no
//! hang or crash.

mod common;
use common::*;

fn expect_error(args: &[&str], needles: &[&str]) {
    let run = run_json(args);
    assert_eq!(
        run.code, 2,
        "args {args:?}: expected a configuration error\nstdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    for needle in needles {
        assert!(run.stderr.contains(needle), "args {args:?}: error must mention '{needle}': {}", run.stderr);
    }
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn missing_kernel_is_named() {
    expect_error(&["--kernel", "/nonexistent/kernel.elf"], &["/nonexistent/kernel.elf"]);
}

#[test]
fn non_elf_kernel_is_refused() {
    let dir = ScratchDir::new("non-elf");
    let path = dir.0.join("kernel.txt");
    std::fs::write(&path, b"this is not a kernel, just some text that is long enough to read a header from").unwrap();
    let path = path.display().to_string();
    let run = run_json(&["--kernel", &path]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains(&path), "{}", run.stderr);
    assert!(run.stderr.to_lowercase().contains("elf"), "{}", run.stderr);
}

#[test]
fn zero_memory_is_refused() {
    expect_error(&["--memory", "size=0"], &["zone 0", "size is 0"]);
}

#[test]
fn unaligned_memory_is_refused_with_a_suggestion() {
    expect_error(&["--memory", "size=100001"], &["not a multiple", "4096", "102400"]);
    expect_error(&["--memory", "size=63M,backend=hugetlb"], &["not a multiple", "2097152"]);
}

#[test]
fn unparsable_memory_spec_is_named() {
    expect_error(&["--memory", "size=lots"], &["size=lots", "cannot parse size"]);
    expect_error(&["--memory", "size=64M,backend=floppy"], &["floppy", "anon, memfd, file or hugetlb"]);
}

#[test]
fn memory_beyond_what_the_host_allows_is_refused() {
    if !kvm_available() {
        return;
    }
    expect_error(&["--memory", "size=64T"], &["64"]);
}

#[test]
fn read_only_backing_file_is_refused() {
    if !kvm_available() {
        return;
    }
    // Root ignores file modes, so make the file truly read-only: a read-only tmpfs mount.
    let dir = ScratchDir::new("ro-file");
    let mount = dir.0.join("mnt");
    std::fs::create_dir(&mount).unwrap();
    let mounted =
        std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=64M", "tmpfs"]).arg(&mount).status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("!!!! SKIPPED: cannot mount a tmpfs here (not root?) !!!!");
        return;
    }
    let path = mount.join("ram");
    std::fs::write(&path, vec![0u8; 16 << 20]).unwrap();
    let remounted = std::process::Command::new("mount").args(["-o", "remount,ro"]).arg(&mount).status();
    let spec = format!("size=16M,backend=file,path={}", path.display());
    let run = run_json(&["--memory", &spec]);
    let _ = std::process::Command::new("umount").arg(&mount).status();
    assert!(remounted.unwrap().success());
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains(&path.display().to_string()), "{}", run.stderr);
    assert!(run.stderr.to_lowercase().contains("read-only"), "{}", run.stderr);
}

#[test]
fn too_small_existing_file_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = ScratchDir::new("small-file");
    let path = dir.0.join("ram");
    std::fs::write(&path, vec![1u8; 4 << 20]).unwrap();
    let spec = format!("size=16M,backend=file,path={}", path.display());
    let run = run_json(&["--memory", &spec]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains(&path.display().to_string()), "{}", run.stderr);
    // The user's data is not touched.
    assert_eq!(std::fs::read(&path).unwrap(), vec![1u8; 4 << 20]);
}

#[test]
fn bad_vcpu_count_and_bad_step_are_named() {
    expect_error(&["--vcpus", "0"], &["vcpus = 0"]);
    expect_error(&["--vcpus", "65"], &["vcpus = 65", "64"]);
    expect_error(&["--steps", "fill,explode"], &["explode", "steps"]);
}

#[test]
fn config_file_with_a_typo_names_the_field() {
    let dir = ScratchDir::new("toml");
    let path = dir.0.join("vm.toml");
    std::fs::write(&path, "vcpu = 2\n").unwrap();
    expect_error(&["--config", &path.display().to_string()], &["vm.toml", "vcpu"]);
}

#[test]
fn a_timeout_that_is_not_a_positive_number_of_seconds_is_refused() {
    for bad in ["-1", "NaN", "inf", "1e20", "0", "soon"] {
        let arg = format!("--timeout={bad}");
        let out = faultline().args(["run", &arg]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains(&format!("'{bad}'")) && stderr.contains("--timeout"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn a_device_or_fifo_as_config_or_kernel_is_refused_instead_of_read_for_ever() {
    let dir = ScratchDir::new("not-regular");
    let fifo = dir.0.join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for path in ["/dev/zero".to_string(), fifo.display().to_string(), dir.0.display().to_string()] {
        expect_error(&["--config", &path], &[&path, "not a regular file"]);
        expect_error(&["--kernel", &path], &[&path, "not a regular file"]);
    }
}

#[test]
fn a_config_file_too_large_to_be_one_and_a_kernel_larger_than_ram_are_refused() {
    let dir = ScratchDir::new("too-large");
    let big = dir.0.join("big");
    std::fs::File::create(&big).unwrap().set_len(80 << 20).unwrap();
    let path = big.display().to_string();
    expect_error(&["--config", &path], &[&path, "larger than 1048576 bytes"]);
    expect_error(&["--kernel", &path, "--memory", "size=64M"], &[&path, "larger than guest RAM"]);
}

#[test]
fn workload_flags_with_another_kernel_are_refused_not_ignored() {
    let dir = ScratchDir::new("kernel-flags");
    let image = guest_image_in(&dir.0).display().to_string();
    for flags in
        [&["--steps", "fill,verify"][..], &["--size", "16M"], &["--duration-ms", "5"], &["--pattern", "random"]]
    {
        let mut args = vec!["--kernel", &image];
        args.extend_from_slice(flags);
        expect_error(&args, &[flags[0], "--kernel", "--cmdline"]);
    }
    let toml = dir.0.join("vm.toml");
    std::fs::write(&toml, format!("kernel = {{ path = \"{image}\" }}\n[workload]\nsteps = [\"touch\"]\n")).unwrap();
    expect_error(&["--config", &toml.display().to_string()], &["built-in guest only", "--cmdline"]);
}

#[test]
fn memory_populated_up_front_beyond_what_is_available_is_refused_not_oom_killed() {
    if !kvm_available() {
        return;
    }
    // All of the host's RAM: within MemTotal + swap (the check for lazily populated RAM),
    // but always more than MemAvailable. Without this check the VM would be OOM-killed
    // (taking the host's other work with it), so the check must come first.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let size = format!("size={}M", total_kib >> 10);
    for zone in [format!("{size},paging=prefault"), format!("{size},backend=memfd,paging=uffd-minor")] {
        expect_error(&["--memory", &zone], &["zone(s) 0", "MemAvailable", "paging=kernel"]);
    }
}

#[test]
fn options_that_were_silently_reshaped_or_ignored_are_refused() {
    expect_error(&["--size", "4097"], &["size", "4097 bytes is not whole 4 KiB pages", "8K"]);
    expect_error(&["--chaos-events", "100"], &["chaos", "add churn to --steps", "--chaos-no-discard"]);
    expect_error(&["--memory", "size=64M,size=128M"], &["size= is given twice"]);
    expect_error(&["--memory", "size=64M,hugepage=2M"], &["hugepage= is only for backend=hugetlb"]);
    expect_error(&["--memory", "size=64M,backend=hugetlb,hugepage=4M"], &["hugepage=4M is not a huge page size"]);
    let dir = ScratchDir::new("toml-wording");
    let toml = dir.0.join("vm.toml");
    std::fs::write(&toml, "[[memory]]\nsize_bytes = true\n").unwrap();
    expect_error(&["--config", &toml.display().to_string()], &["a whole number of bytes", "\"512M\""]);
}
