//! Lazy restore modes on the real /dev/kvm with the real binary: the Firecracker-style
//! userfaultfd handoff (`--memory-restore uffd-socket:PATH`) against our page server and
//! against a handler written in this test from Firecracker's published protocol
//! (tests/lazy_restore/fc_handler.py, no faultline code), a handler that dies or stops
//! answering, bad handoffs given to the page server, and the `map` and `uffd-minor`
//! modes. Every restored guest verifies every page it wrote before the snapshot.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{faultline, outcome, root_and_kvm, HugepagePool, RunOutcome, ScratchDir};
use serde_json::Value;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The workload snapshotted in its middle: fill, dirty for a while, verify everything.
/// Long enough that a restored VM still runs when the test reaches it on a loaded host.
const WORKLOAD: [&str; 6] = ["--steps", "fill,dirty,verify", "--duration-ms", "2500", "--rate", "20000"];

/// Pages the 64 MiB guest's workload region holds (RAM from 8 MiB up).
const WORKLOAD_PAGES: u64 = 56 * 256;

/// The handler written from Firecracker's protocol.
const FC_HANDLER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/lazy_restore/fc_handler.py");

/// Runs a 64 MiB, 2-vCPU guest and snapshots it mid-workload: a full snapshot `base`,
/// and with `diff` a diff on top of it 200 ms later. Returns the top of the chain.
fn snapshot_mid_workload(scratch: &Path, diff: bool) -> PathBuf {
    let socket = scratch.join("api.sock");
    let child = faultline()
        .args(["run", "--json", "--timeout", "120", "--vcpus", "2", "-m", "size=64M", "--api-socket"])
        .arg(&socket)
        .args(WORKLOAD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn faultline run");
    let ctl = |args: &[&str]| {
        let out = faultline().args(["ctl", "--json", "-s"]).arg(&socket).args(args).output().unwrap();
        out.status.success().then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap())
    };
    let started = Instant::now();
    while ctl(&["status"]).is_none_or(|s| s["guest_ready"] != true) {
        assert!(started.elapsed() < Duration::from_secs(60), "the guest never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let base = scratch.join("base");
    let top = scratch.join("diff");
    if diff {
        ctl(&["snapshot", "create", base.to_str().unwrap()]).expect("full snapshot");
        std::thread::sleep(Duration::from_millis(200));
        ctl(&["snapshot", "create", top.to_str().unwrap(), "--diff", "--stop"]).expect("diff snapshot");
    } else {
        ctl(&["snapshot", "create", base.to_str().unwrap(), "--stop"]).expect("full snapshot");
    }
    let before = outcome(child.wait_with_output().unwrap());
    assert!(before.report["guest"]["done"].is_null(), "the workload ended before the snapshot: {}", before.stdout);
    if diff {
        top
    } else {
        base
    }
}

/// `faultline restore --json --timeout 120 --from DIR ARGS`.
fn restore(dir: &Path, args: &[&str]) -> RunOutcome {
    let output = faultline()
        .args(["restore", "--json", "--timeout", "120", "--from"])
        .arg(dir)
        .args(args)
        .output()
        .expect("spawn faultline restore");
    outcome(output)
}

/// Waits until a listener made `socket` (both handlers rename it into place after
/// listening, so it is connectable once it exists), or `child` died.
fn wait_for_socket(socket: &Path, child: &mut Child) {
    let started = Instant::now();
    while !socket.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the handler exited before listening: {status}");
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{} never appeared", socket.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `faultline page-server --json --socket SOCKET --from DIR ARGS`, listening.
fn page_server(socket: &Path, dir: &Path, args: &[&str]) -> Child {
    let mut child = faultline()
        .args(["page-server", "--json", "--socket"])
        .arg(socket)
        .arg("--from")
        .arg(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn faultline page-server");
    wait_for_socket(socket, &mut child);
    child
}

/// The handler written from Firecracker's protocol, listening, serving `memory` in `mode`.
fn fc_handler(socket: &Path, memory: &Path, mode: &str) -> Child {
    let mut child = Command::new("python3")
        .arg(FC_HANDLER)
        .arg(socket)
        .arg(memory)
        .arg(mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs the Firecracker-protocol handler (CI installs python3)");
    wait_for_socket(socket, &mut child);
    child
}

fn socket_mode(socket: &Path) -> String {
    format!("uffd-socket:{}", socket.display())
}

#[test]
fn our_page_server_serves_a_diff_chain_on_demand_and_with_background_prefetch() {
    if !root_and_kvm("lazy restore tests (userfaultfd, hugepages)") {
        return;
    }
    let scratch = ScratchDir::new("lazy-pager");
    let top = snapshot_mid_workload(&scratch.0, true);
    let pool = HugepagePool::reserve(40);
    let mut cases = vec![(vec![], "none"), (vec![], "background"), (vec!["-m", "size=64M,backend=memfd"], "none")];
    if pool.is_some() {
        cases.push((vec!["-m", "size=64M,backend=hugetlb"], "none"));
    }
    for (index, (zones, prefetch)) in cases.into_iter().enumerate() {
        let socket = scratch.0.join(format!("pager-{index}.sock"));
        let server = page_server(&socket, &top, &["--prefetch", prefetch]);
        let mut args = vec!["--memory-restore".to_string(), socket_mode(&socket)];
        args.extend(zones.iter().map(|s| s.to_string()));
        let out = restore(&top, &args.iter().map(String::as_str).collect::<Vec<_>>());
        let served = server.wait_with_output().unwrap();
        let what = format!("{zones:?} prefetch {prefetch}");
        out.assert_success().assert_verified(WORKLOAD_PAGES);
        assert_eq!(out.report["restored_bytes"], 0, "{what}: nothing is read before the vCPUs start");
        assert!(served.status.success(), "{what}: {}", String::from_utf8_lossy(&served.stderr));
        let report: Value = serde_json::from_slice(&served.stdout).unwrap();
        assert!(report["faults"].as_u64().unwrap() > 0, "{what}: {report}");
        assert!(report["copied_pages"].as_u64().unwrap() > 0, "{what}: {report}");
        if prefetch == "background" {
            assert!(report["prefetched_pages"].as_u64().unwrap() > 0, "{what}: {report}");
        } else {
            assert_eq!(report["prefetched_pages"], 0, "{what}: {report}");
        }
    }
}

#[test]
fn a_handler_written_from_firecrackers_protocol_serves_our_restore() {
    if !root_and_kvm("lazy restore tests (userfaultfd)") {
        return;
    }
    let scratch = ScratchDir::new("lazy-fc");
    let base = snapshot_mid_workload(&scratch.0, false);
    let pool = HugepagePool::reserve(40);
    let mut cases = vec![vec![]];
    if pool.is_some() {
        // 2 MiB regions: the handler copies a huge page per fault.
        cases.push(vec!["-m", "size=64M,backend=hugetlb"]);
    }
    for (index, zones) in cases.into_iter().enumerate() {
        let socket = scratch.0.join(format!("fc-{index}.sock"));
        // One zone, full snapshot: the flat memory file is zone-0.img itself.
        let handler = fc_handler(&socket, &base.join("zone-0.img"), "serve");
        let mode = socket_mode(&socket);
        let mut args = vec!["--memory-restore", mode.as_str()];
        args.extend_from_slice(&zones);
        let out = restore(&base, &args);
        let served = handler.wait_with_output().unwrap();
        out.assert_success().assert_verified(WORKLOAD_PAGES);
        let stderr = String::from_utf8_lossy(&served.stderr);
        assert!(served.status.success(), "{zones:?}: {stderr}");
        assert!(stderr.contains("VMM went away"), "{zones:?}: the handler saw the VM go: {stderr}");
    }
}

#[test]
fn a_handler_that_dies_or_stops_answering_ends_the_vm_with_a_clear_error() {
    if !root_and_kvm("lazy restore tests (userfaultfd)") {
        return;
    }
    let scratch = ScratchDir::new("lazy-dead");
    let base = snapshot_mid_workload(&scratch.0, false);
    let memory = base.join("zone-0.img");
    for (mode, expect) in [("die-after=300", "exited"), ("hang-after=300", "did not answer")] {
        let socket = scratch.0.join(format!("{}.sock", &mode[..3]));
        let handler = fc_handler(&socket, &memory, mode);
        // The restore's own --timeout (120 s) would end it as "stopped": ending as a
        // failed fault engine, with the reason, is the watchdog's doing.
        let out = restore(&base, &["--memory-restore", &socket_mode(&socket), "--page-server-timeout", "2"]);
        handler.wait_with_output().unwrap();
        assert_eq!(out.code, 1, "{mode}: {}\n{}", out.stdout, out.stderr);
        assert_eq!(out.report["exit"]["kind"], "fault-engine-failed", "{mode}: {}", out.stdout);
        let reason = out.report["exit"]["reason"].as_str().unwrap();
        assert!(reason.contains("page-fault handler") && reason.contains(expect), "{mode}: {reason}");
    }
}

/// A fresh userfaultfd (the test's own, as a VMM would hand over).
fn userfaultfd() -> OwnedFd {
    // SAFETY: the userfaultfd syscall takes flags by value and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

#[test]
fn the_page_server_refuses_bad_handoffs_with_clear_errors() {
    if !root_and_kvm("lazy restore tests (userfaultfd)") {
        return;
    }
    let scratch = ScratchDir::new("lazy-bad-table");
    let base = snapshot_mid_workload(&scratch.0, false);
    let region = |size: u64, offset: u64, page: u64| {
        format!(r#"[{{"base_host_virt_addr":140000000000000,"size":{size},"offset":{offset},"page_size":{page}}}]"#)
    };
    let a_file = std::fs::File::open(base.join("state.fls")).unwrap();
    let cases: Vec<(String, Option<i32>, &str)> = vec![
        (region(128 << 20, 0, 4096), None, "ends past the snapshot's memory"),
        (region(64 << 20, 4 << 20, 4096), None, "ends past the snapshot's memory"),
        (region(64 << 20, 0, 8192), None, "page_size 8192"),
        (region(64 << 20, 0x800, 4096), None, "offset 0x800"),
        ("[]".into(), None, "empty region table"),
        ("{\"not\": \"a table\"}".into(), None, "is not a JSON array"),
        (region(64 << 20, 0, 4096), Some(a_file.as_raw_fd()), "not a userfaultfd"),
    ];
    for (index, (message, fd, expect)) in cases.into_iter().enumerate() {
        let socket = scratch.0.join(format!("bad-{index}.sock"));
        let server = page_server(&socket, &base, &[]);
        let stream = UnixStream::connect(&socket).unwrap();
        let uffd = userfaultfd();
        stream.send_with_fd(message.as_bytes(), fd.unwrap_or(uffd.as_raw_fd())).unwrap();
        let out = server.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{message}: {stderr}");
        assert!(stderr.contains(expect), "{message}: expected {expect:?} in {stderr}");
    }
    // A message without a descriptor.
    let socket = scratch.0.join("nofd.sock");
    let server = page_server(&socket, &base, &[]);
    std::io::Write::write_all(&mut UnixStream::connect(&socket).unwrap(), region(64 << 20, 0, 4096).as_bytes())
        .unwrap();
    let out = server.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("without a file descriptor"));
    // No snapshot there, and a socket path that is taken.
    let out =
        faultline().args(["page-server", "--socket"]).arg(&socket).arg("--from").arg(&scratch.0).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("state.fls"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&socket, "").unwrap();
    let out = faultline().args(["page-server", "--socket"]).arg(&socket).arg("--from").arg(&base).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists; remove it"));
    // Nobody listening: the restore says whom to start.
    let out = restore(&base, &["--memory-restore", &socket_mode(&scratch.0.join("nobody.sock"))]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("cannot connect to the page-fault handler"), "{}", out.stderr);
}

#[test]
fn map_uffd_minor_and_prefetching_uffd_missing_restore_a_diff_chain_and_refusals_are_named() {
    if !root_and_kvm("lazy restore tests (userfaultfd, hugepages)") {
        return;
    }
    let scratch = ScratchDir::new("lazy-map-minor");
    let top = snapshot_mid_workload(&scratch.0, true);
    // map: the base is mapped, the diff read on top (its bytes are what is read eagerly).
    let diff_bytes = {
        let out = faultline().args(["snapshot", "inspect", "--json"]).arg(&top).output().unwrap();
        let inspection: Value = serde_json::from_slice(&out.stdout).unwrap();
        inspection["zones"][0]["carried_bytes"].as_u64().unwrap()
    };
    let out = restore(&top, &["--memory-restore", "map"]);
    out.assert_success().assert_verified(WORKLOAD_PAGES);
    assert_eq!(out.report["restored_bytes"], diff_bytes, "{}", out.stdout);
    assert_eq!(out.report["faults"]["modes"][0], "kernel");

    let pool = HugepagePool::reserve(40);
    let mut zones = vec!["size=64M,backend=memfd"];
    if pool.is_some() {
        zones.push("size=64M,backend=hugetlb");
    }
    for zone in zones {
        let out = restore(&top, &["--memory-restore", "uffd-minor", "-m", zone]);
        out.assert_success().assert_verified(WORKLOAD_PAGES);
        let faults = &out.report["faults"];
        assert_eq!(faults["modes"][0], "uffd-minor", "{zone}");
        assert_eq!(faults["coherence"]["mismatch_count"], 0, "{zone}: {}", out.stdout);
        let minor = faults["latency"].as_array().unwrap().iter().find(|l| l["kind"] == "minor");
        assert!(minor.is_some_and(|m| m["count"].as_u64().unwrap() > 0), "{zone}: no MINOR faults: {}", out.stdout);
    }

    // uffd-missing with a background prefetch: every page through the fault engine,
    // coherent at the end; the prefetch says how far it got.
    let output = faultline()
        .env("FAULTLINE_LOG", "faultline::vmm=info")
        .args(["restore", "--json", "--timeout", "120", "--memory-restore", "uffd-missing", "--prefetch", "background"])
        .arg("--from")
        .arg(&top)
        .output()
        .unwrap();
    let out = outcome(output);
    out.assert_success().assert_verified(WORKLOAD_PAGES);
    assert_eq!(out.report["faults"]["coherence"]["mismatch_count"], 0, "{}", out.stdout);
    let line = out.stderr.lines().find(|l| l.contains("prefetch: ")).unwrap_or_else(|| panic!("{}", out.stderr));
    let kib: u64 = line.split("prefetch: ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(kib > 0, "{line}");
    // Record the working set, then prefetch it: both restores verify every page.
    let out =
        restore(&top, &["--memory-restore", "uffd-missing", "--record-working-set", "--working-set-ms", "600000"]);
    out.assert_success().assert_verified(WORKLOAD_PAGES);
    let set: Value = serde_json::from_str(&std::fs::read_to_string(top.join("working-set.json")).unwrap()).unwrap();
    let pages = set["pages"].as_array().unwrap();
    assert!(pages.len() as u64 >= WORKLOAD_PAGES, "the verify touched every page: {} recorded", pages.len());
    let out = restore(&top, &["--memory-restore", "uffd-missing", "--prefetch", "working-set"]);
    out.assert_success().assert_verified(WORKLOAD_PAGES);
    assert_eq!(out.report["faults"]["coherence"]["mismatch_count"], 0, "{}", out.stdout);
    let out = restore(&top, &["--memory-restore", "map", "--prefetch", "background"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("work with --memory-restore uffd-missing, not map"), "{}", out.stderr);

    let file_zone = format!("size=64M,backend=file,path={}", scratch.0.join("ram").display());
    for (mode, zone, expect) in [
        ("map", "size=64M,backend=memfd", "map works on anon zones only"),
        ("uffd-minor", "size=64M", "backend=anon, which has no page cache"),
        ("uffd-socket:/nonexistent.sock", file_zone.as_str(), "backend=file"),
    ] {
        let out = restore(&top, &["--memory-restore", mode, "-m", zone]);
        assert_eq!(out.code, 2, "{mode} {zone}: {}", out.stdout);
        assert!(out.stderr.contains(expect), "{mode} {zone}: {}", out.stderr);
    }
}

/// `UFFDIO_API` and `UFFDIO_REGISTER` of <linux/userfaultfd.h> (`_IOWR(0xAA, nr, size)`).
const UFFDIO_API: u64 = 0xC018_AA3F;
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;

/// `len` bytes of this process's own anonymous memory registered MISSING on a fresh
/// userfaultfd with REMOVE events (what a VMM hands over), as (address, uffd).
fn registered_memory(len: usize) -> (*mut u8, OwnedFd) {
    let uffd = userfaultfd();
    let mut api = [0xAAu64, UFFD_FEATURE_EVENT_REMOVE, 0];
    // SAFETY: UFFDIO_API takes a struct uffdio_api {u64 api, features, ioctls}: `api`.
    assert_eq!(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, api.as_mut_ptr()) }, 0);
    // SAFETY: a fresh private anonymous mapping; only this test uses it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let mut register = [addr as u64, len as u64, 1 /* MODE_MISSING */, 0];
    // SAFETY: UFFDIO_REGISTER takes a struct uffdio_register {range {start, len}, mode, ioctls}.
    assert_eq!(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, register.as_mut_ptr()) }, 0);
    (addr.cast(), uffd)
}

#[test]
fn the_page_server_never_refills_a_discarded_page_with_the_images_contents() {
    if !root_and_kvm("lazy restore tests (userfaultfd)") {
        return;
    }
    let scratch = ScratchDir::new("lazy-remove");
    let base = snapshot_mid_workload(&scratch.0, false);
    let image = std::fs::read(base.join("zone-0.img")).unwrap();
    let len = image.len();
    let mib = |n: usize| n << 20;
    assert!(image[mib(8)..mib(24)].iter().any(|&b| b != 0), "the guest wrote its workload region");
    for prefetch in ["none", "background"] {
        let (addr, uffd) = registered_memory(len);
        // SAFETY: `addr` is our own live mapping of `len` bytes; reads of it fault into the
        // page server (another process) until it installed each page.
        let memory = unsafe { std::slice::from_raw_parts_mut(addr, len) };
        let socket = scratch.0.join(format!("remove-{prefetch}.sock"));
        let server = page_server(&socket, &base, &["--prefetch", prefetch]);
        let stream = UnixStream::connect(&socket).unwrap();
        let table = format!(r#"[{{"base_host_virt_addr":{},"size":{len},"offset":0,"page_size":4096}}]"#, addr as u64);
        stream.send_with_fd(table.as_bytes(), uffd.as_raw_fd()).unwrap();
        // Discarded before anything touched it (a prefetch may or may not have got there).
        // SAFETY: a range of our own mapping; MADV_DONTNEED only drops its pages.
        assert_eq!(unsafe { libc::madvise(addr.add(mib(40)).cast(), mib(8), libc::MADV_DONTNEED) }, 0);
        assert!(memory[mib(8)..mib(24)] == image[mib(8)..mib(24)], "{prefetch}: served pages are the image's");
        // SAFETY: as above.
        assert_eq!(unsafe { libc::madvise(addr.add(mib(8)).cast(), mib(8), libc::MADV_DONTNEED) }, 0);
        assert!(memory[mib(8)..mib(16)].iter().all(|&b| b == 0), "{prefetch}: a discarded page came back non-zero");
        assert!(memory[mib(40)..mib(48)].iter().all(|&b| b == 0), "{prefetch}: a discarded page came back non-zero");
        assert!(memory[mib(16)..mib(24)] == image[mib(16)..mib(24)], "{prefetch}: pages not discarded stay");
        drop(stream);
        let out = server.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["remove_events"], 2, "{prefetch}: {report}");
        // SAFETY: our own mapping, no longer used.
        unsafe { libc::munmap(addr.cast(), len) };
    }
}

/// Guest memory bytes the top snapshot in `dir` carries.
fn carried_bytes(dir: &Path) -> u64 {
    let chain = faultline::snapshot::Chain::read(dir).expect("a readable snapshot");
    chain.top().images.iter().map(|image| image.carried_bytes()).sum()
}

/// A VM restored lazily and snapshotted at once, before it has touched most of its
/// pages, still carries them all: the pages that exist in the host are not all of its
/// memory until the lazy restore is brought in. The new snapshot restores eagerly and
/// the guest verifies every page it wrote before the first snapshot.
#[test]
fn a_full_snapshot_of_a_lazily_restored_vm_carries_the_pages_it_never_touched() {
    if !root_and_kvm("lazy restore tests (userfaultfd)") {
        return;
    }
    let scratch = ScratchDir::new("lazy-resnapshot");
    for mode in ["uffd-missing", "map"] {
        // A snapshot of its own per mode, restored at once: the guest's clock runs on
        // with the host's across a restore, so a base restored seconds later would find
        // its workload's time already spent.
        let dir = scratch.0.join(mode);
        std::fs::create_dir_all(&dir).unwrap();
        let base = snapshot_mid_workload(&dir, false);
        let vm =
            common::running::Running::restore(&scratch.0, &format!("{mode}.sock"), &base, &["--memory-restore", mode]);
        let again = scratch.0.join(format!("again-{mode}"));
        vm.snapshot(&again, &["--stop"]);
        let stopped = vm.wait();
        assert_eq!(stopped.report["exit"]["kind"], "stopped", "{mode}: {}", stopped.stdout);
        assert!(
            carried_bytes(&again) >= carried_bytes(&base),
            "{mode}: the new snapshot carries {} bytes, the one restored from {}",
            carried_bytes(&again),
            carried_bytes(&base)
        );
        restore(&again, &[]).assert_success().assert_verified(WORKLOAD_PAGES);
    }
}

/// A memory image changed after the snapshot (one byte flipped in a chunk in the middle of
/// what it carries) stops every restore mode that checks chunks with the image's name and
/// the chunk's offset before the guest gets a byte of that chunk: the eager restore, a
/// `uffd-missing` restore (the VM ends as a failed fault engine) and our page server
/// (which ends; the VM then ends with its page-fault handler gone). A truncated image is
/// refused before the VM starts. (`map` lets the kernel map the file and cannot check
/// per fault: docs/lazy-restore.md says so.)
#[test]
fn a_changed_or_truncated_image_stops_the_restore_with_the_file_and_offset() {
    use std::os::unix::fs::FileExt;
    if !root_and_kvm("lazy restore tests (userfaultfd)") {
        return;
    }
    let scratch = ScratchDir::new("lazy-corrupt");
    let base = snapshot_mid_workload(&scratch.0, false);
    let chain = faultline::snapshot::Chain::read(&base).expect("a readable snapshot");
    let image = chain.top().images[0].clone();
    // The carried byte halfway through the carried bytes.
    let mut left = image.carried_bytes() / 2;
    let offset = image
        .ranges
        .iter()
        .find_map(|&(start, len)| if left < len { Some(start + left) } else { (left -= len, None).1 })
        .unwrap();
    let chunk = offset / image.chunk_bytes * image.chunk_bytes;
    let path = base.join(&image.file);
    let file = std::fs::File::options().read(true).write(true).open(&path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x5a], offset).unwrap();
    let names_it = |text: &str| text.contains("zone-0.img") && text.contains(&format!("chunk at offset {chunk:#x}"));

    let out = restore(&base, &[]);
    assert_ne!(out.code, 0, "eager: {}", out.stdout);
    assert!(names_it(&out.stderr) || names_it(&out.stdout), "eager: {}\n{}", out.stdout, out.stderr);

    let out = restore(&base, &["--memory-restore", "uffd-missing"]);
    assert_eq!(out.report["exit"]["kind"], "fault-engine-failed", "uffd-missing: {}\n{}", out.stdout, out.stderr);
    let reason = out.report["exit"]["reason"].as_str().unwrap();
    assert!(names_it(reason), "uffd-missing: {reason}");

    let socket = scratch.0.join("ps.sock");
    let server = page_server(&socket, &base, &[]);
    // A generous watchdog: the server (a debug build under test) checks each chunk on
    // its first read; the VM is to end because the server ended, not because it was slow.
    let out = restore(&base, &["--memory-restore", &socket_mode(&socket), "--page-server-timeout", "30"]);
    let served = server.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&served.stdout), String::from_utf8_lossy(&served.stderr));
    assert!(
        !served.status.success() && names_it(&said),
        "page server: {said}\nrestore: {}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.report["exit"]["kind"], "fault-engine-failed", "page server restore: {}", out.stdout);

    file.set_len(image.size_bytes - 4096).unwrap();
    for args in [&[][..], &["--memory-restore", "uffd-missing"][..]] {
        let out = restore(&base, args);
        assert_ne!(out.code, 0, "{args:?}: {}", out.stdout);
        let text = format!("{}{}", out.stdout, out.stderr);
        assert!(text.contains("zone-0.img") && text.contains("but its zone is"), "{args:?}: {text}");
    }
}
