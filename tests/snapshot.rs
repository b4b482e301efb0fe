//! Pause, snapshot and restore on the real /dev/kvm, with the real binary and its control
//! socket: the guest is snapshotted in the middle of its workload, restored in a new
//! process, and verifies every page it wrote before and after.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::running::{chain_memory, restore, Running};
use common::{faultline, kvm_available, outcome, HugepagePool, ScratchDir};
use faultline::snapshot::format::{self, SnapshotKind};
use faultline::snapshot::Chain;

/// The workload the tests snapshot in the middle of: fill, then dirty for a while, then
/// verify everything.
const WORKLOAD: [&str; 6] = ["--steps", "fill,dirty,verify", "--duration-ms", "1500", "--rate", "20000"];

/// A VM of `vcpus` stopped by a full snapshot 300 ms into its workload.
fn snapshot_mid_workload(scratch: &Path, vcpus: &str, memory: &str) -> PathBuf {
    let mut args = vec!["--vcpus", vcpus, "-m", memory];
    args.extend_from_slice(&WORKLOAD);
    let vm = Running::start(scratch, &args);
    std::thread::sleep(Duration::from_millis(300));
    let dir = scratch.join(format!("full-{vcpus}"));
    let summary = vm.snapshot(&dir, &["--stop"]);
    assert_eq!(summary["kind"], "full", "{summary}");
    let before = vm.wait();
    assert_eq!(before.report["exit"]["kind"], "stopped", "{}", before.stdout);
    assert!(before.report["guest"]["done"].is_null(), "the workload finished before the snapshot: {}", before.stdout);
    dir
}

#[test]
fn a_vm_snapshotted_mid_workload_restores_and_verifies_on_1_2_and_4_vcpus() {
    if !kvm_available() {
        return;
    }
    let scratch = ScratchDir::new("snapshot-vcpus");
    for vcpus in ["1", "2", "4"] {
        let dir = snapshot_mid_workload(&scratch.0, vcpus, "size=64M");
        let restored = restore(&dir, &[]);
        restored.assert_success().assert_verified(common::pages(56));
        assert!(restored.report["restored_bytes"].as_u64().unwrap() > 0, "{}", restored.stdout);
        assert_eq!(restored.report["vcpus"], vcpus.parse::<u64>().unwrap());
    }
}

#[test]
fn one_snapshot_restores_many_times_and_onto_other_backends() {
    if !kvm_available() {
        return;
    }
    let scratch = ScratchDir::new("snapshot-clones");
    let dir = snapshot_mid_workload(&scratch.0, "2", "size=64M,backend=anon");
    // Two clones at once, each on its own.
    let clones: Vec<_> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_faultline"))
                .args(["restore", "--json", "--timeout", "120", "--from"])
                .arg(&dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for clone in clones {
        outcome(clone.wait_with_output().unwrap()).assert_success().assert_verified(common::pages(56));
    }
    let memfd = restore(&dir, &["-m", "size=64M,backend=memfd"]);
    memfd.assert_success().assert_verified(common::pages(56));
    assert_eq!(memfd.report["backends"][0], "memfd");
    // Into zones under userfaultfd paging: the eager load goes through the fault engine,
    // whose page-state table then knows every restored page (the coherence check agrees).
    for paging in ["uffd-missing", "uffd-minor"] {
        let spec = format!("size=64M,backend=memfd,paging={paging}");
        let out = restore(&dir, &["-m", &spec]);
        out.assert_success().assert_verified(common::pages(56));
        assert_eq!(out.report["faults"]["modes"][0], paging);
        assert_eq!(out.report["faults"]["coherence"]["mismatch_count"], 0, "{paging}: {}", out.stdout);
    }
    if let Some(_pool) = HugepagePool::reserve(40) {
        let huge = restore(&dir, &["-m", "size=64M,backend=hugetlb"]);
        huge.assert_success().assert_verified(common::pages(56));
        assert_eq!(huge.report["backends"][0], "hugetlb");
    }
    // Onto a file zone (a new file), and from one: a VM on a file zone snapshots its
    // pages by SEEK_DATA and restores onto anonymous memory.
    let file_zone = format!("size=64M,backend=file,path={}", scratch.0.join("restored-ram").display());
    let file = restore(&dir, &["-m", &file_zone]);
    file.assert_success().assert_verified(common::pages(56));
    assert_eq!(file.report["backends"][0], "file");
    let from_file = snapshot_mid_workload(
        &scratch.0,
        "1",
        &format!("size=64M,backend=file,path={}", scratch.0.join("ram").display()),
    );
    let anon = restore(&from_file, &["-m", "size=64M,backend=anon"]);
    anon.assert_success().assert_verified(common::pages(56));
}

#[test]
fn a_diff_chain_restores_to_the_same_memory_as_a_full_snapshot_of_the_same_instant() {
    if !kvm_available() {
        return;
    }
    let scratch = ScratchDir::new("snapshot-diff");
    let mut args = vec!["--vcpus", "2", "-m", "size=64M"];
    args.extend_from_slice(&WORKLOAD);
    let vm = Running::start(&scratch.0, &args);
    let base = scratch.0.join("base");
    let diff1 = scratch.0.join("diff1");
    let diff2 = scratch.0.join("diff2");
    let full = scratch.0.join("full");
    vm.snapshot(&base, &[]);
    std::thread::sleep(Duration::from_millis(150));
    let first = vm.snapshot(&diff1, &["--diff"]);
    std::thread::sleep(Duration::from_millis(150));
    vm.ctl_json(&["pause"]).unwrap();
    let second = vm.snapshot(&diff2, &["--diff"]);
    // Still paused: a full snapshot of the very same instant.
    vm.snapshot(&full, &["--stop"]);
    let stopped = vm.wait();
    assert_eq!(stopped.report["exit"]["kind"], "stopped", "{}", stopped.stdout);
    for diff in [&first, &second] {
        assert_eq!(diff["kind"], "diff");
        // The guest was dirtying pages: a diff has some, and fewer than the whole guest.
        let bytes = diff["memory_bytes"].as_u64().unwrap();
        assert!(bytes > 0 && bytes < 64 << 20, "{diff}");
    }
    let chain = Chain::read(&diff2).unwrap();
    let kinds: Vec<_> = chain.links.iter().map(|(_, s)| s.kind).collect();
    assert_eq!(kinds, [SnapshotKind::Full, SnapshotKind::Diff, SnapshotKind::Diff]);
    let from_chain = chain_memory(&diff2);
    let from_full = chain_memory(&full);
    let differing = from_chain.bytes().chunks(4096).zip(from_full.bytes().chunks(4096)).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "pages where base+diffs differ from the full snapshot");
    // And the chain restores into a VM that finishes its workload.
    restore(&diff2, &[]).assert_success().assert_verified(common::pages(56));
}

#[test]
fn pause_and_resume_report_their_latency_and_the_status_follows() {
    if !kvm_available() {
        return;
    }
    let scratch = ScratchDir::new("snapshot-pause");
    let vm = Running::start(
        &scratch.0,
        &["--vcpus", "2", "-m", "size=64M", "--steps", "fill,dirty,verify", "--duration-ms", "800"],
    );
    let paused = vm.ctl_json(&["pause"]).unwrap();
    assert!(paused["pause_ns"].as_u64().unwrap() > 0, "{paused}");
    assert_eq!(vm.ctl_json(&["status"]).unwrap()["state"], "paused");
    // Paused again: nothing to do, no time.
    assert_eq!(vm.ctl_json(&["pause"]).unwrap()["pause_ns"], 0);
    vm.ctl_json(&["resume"]).unwrap();
    assert_eq!(vm.ctl_json(&["status"]).unwrap()["state"], "running");
    let done = vm.wait();
    done.assert_success().assert_verified(common::pages(56));
    assert_eq!(done.report["pauses"]["pauses"], 1, "{}", done.stdout);
}

#[test]
fn a_snapshot_that_cannot_be_written_leaves_the_vm_running_unharmed() {
    if !kvm_available() {
        return;
    }
    let scratch = ScratchDir::new("snapshot-unwritable");
    let vm = Running::start(
        &scratch.0,
        &["--vcpus", "2", "-m", "size=64M", "--steps", "fill,dirty,verify", "--duration-ms", "800"],
    );
    let not_empty = scratch.0.join("not-empty");
    std::fs::create_dir(&not_empty).unwrap();
    std::fs::write(not_empty.join("x"), "x").unwrap();
    let err = vm.ctl_json(&["snapshot", "create", not_empty.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("not empty"), "{err}");
    let err = vm.ctl_json(&["snapshot", "create", "/proc/self/cannot-be-here"]).unwrap_err();
    if !err.contains("VM is unharmed") {
        let out = vm.wait();
        panic!("{err}\nthe VM: {}\n{}", out.stdout, out.stderr);
    }
    let err = vm.ctl_json(&["snapshot", "create", scratch.0.join("d").to_str().unwrap(), "--diff"]).unwrap_err();
    assert!(err.contains("take a full one first"), "{err}");
    assert_eq!(vm.ctl_json(&["status"]).unwrap()["state"], "running");
    vm.wait().assert_success().assert_verified(common::pages(56));
}

/// Rewrites a state file's header checksum after its bytes were edited on purpose.
fn fix_header(bytes: &mut [u8]) {
    let crc = crc32fast::hash(&bytes[..28]);
    bytes[28..32].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn broken_snapshots_are_clear_errors_and_nothing_starts() {
    if !kvm_available() {
        return;
    }
    let scratch = ScratchDir::new("snapshot-broken");
    let good = snapshot_mid_workload(&scratch.0, "1", "size=64M");
    let state = std::fs::read(good.join(format::STATE_FILE)).unwrap();
    let copy = |name: &str, edit: &dyn Fn(&mut Vec<u8>, &Path)| {
        let dir = scratch.0.join(name);
        std::fs::create_dir(&dir).unwrap();
        for entry in std::fs::read_dir(&good).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        let mut bytes = state.clone();
        edit(&mut bytes, &dir);
        std::fs::write(dir.join(format::STATE_FILE), &bytes).unwrap();
        dir
    };
    let cases: Vec<(PathBuf, &str)> = vec![
        (copy("truncated", &|b, _| b.truncate(b.len() / 2)), "truncated"),
        (
            copy("flipped", &|b, _| {
                let at = b.len() - 100;
                b[at] ^= 0x20
            }),
            "corrupted",
        ),
        (copy("header", &|b, _| b[20] ^= 1), "header is corrupted"),
        (
            copy("version", &|b, _| {
                // Version 1 (images without chunk checksums) and any other are refused.
                b[8..12].copy_from_slice(&1u32.to_le_bytes());
                fix_header(b);
            }),
            "format version 1, this faultline reads version 2",
        ),
        (
            copy("arch", &|b, _| {
                b[12..16].copy_from_slice(&183u32.to_le_bytes());
                fix_header(b);
            }),
            "x86-64",
        ),
        (copy("magic", &|b, _| b[0] = b'X'), "not a Faultline snapshot"),
        (copy("no-image", &|_, dir| std::fs::remove_file(dir.join("zone-0.img")).unwrap()), "zone-0.img"),
        (
            copy("short-image", &|_, dir| {
                let image = std::fs::OpenOptions::new().write(true).open(dir.join("zone-0.img")).unwrap();
                image.set_len(32 << 20).unwrap();
            }),
            "image is 33554432 bytes but its zone is 67108864",
        ),
        (
            copy("bad-image", &|_, dir| {
                use std::os::unix::fs::FileExt;
                let image = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("zone-0.img")).unwrap();
                let mut byte = [0u8];
                image.read_exact_at(&mut byte, 8 << 20).unwrap();
                image.write_all_at(&[byte[0] ^ 0xff], 8 << 20).unwrap();
            }),
            "memory image was changed after the snapshot: the 2097152 byte chunk at offset",
        ),
        (scratch.0.join("missing"), "state.fls"),
    ];
    for (dir, expected) in &cases {
        let out = restore(dir, &[]);
        assert_eq!(out.code, 2, "{}: {}", dir.display(), out.stderr);
        assert!(out.stderr.contains(expected), "{}: expected '{expected}' in: {}", dir.display(), out.stderr);
        assert!(out.report.is_null(), "nothing may start: {}", out.stdout);
    }
    // Zones the snapshot does not fit.
    let out = restore(&good, &["-m", "size=32M"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("same size"), "{}", out.stderr);
    // inspect says what is wrong too, and is happy with the good one.
    let inspect = faultline().args(["snapshot", "inspect"]).arg(&good).output().unwrap();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("checksums ok"));
    let inspect = faultline().args(["snapshot", "inspect"]).arg(scratch.0.join("bad-image")).output().unwrap();
    assert_eq!(inspect.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("CHECKSUM ERRORS"));
}

/// A tiny deterministic generator (xorshift64*), so a failing mutation can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Mutates `bytes` a few ways: byte flips, overwrites with interesting values, cuts,
/// duplicated spans; with `fix`, the checksums are rewritten so the JSON decoder (not
/// only the checksum) meets the damage.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>, fix: bool) {
    for _ in 0..1 + rng.below(4) {
        if bytes.is_empty() {
            bytes.push(b'{');
        }
        let at = rng.below(bytes.len());
        match rng.below(6) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = [b'{', b'}', b'[', b']', b'"', b',', b':', b'0', b'9', b'-', 0, 0xff][rng.below(12)],
            2 => bytes.truncate(at.max(1)),
            3 => {
                let end = (at + rng.below(64)).min(bytes.len());
                let span = bytes[at..end].to_vec();
                bytes.splice(at..at, span);
            }
            4 => {
                let end = (at + rng.below(32)).min(bytes.len());
                bytes.drain(at..end);
            }
            _ => bytes.insert(at, b"0123456789[]{}\",:-enutrfals"[rng.below(27)]),
        }
    }
    if fix && bytes.len() >= format::HEADER_BYTES {
        let payload_len = (bytes.len() - format::HEADER_BYTES) as u64;
        bytes[16..24].copy_from_slice(&payload_len.to_le_bytes());
        let crc = crc32fast::hash(&bytes[format::HEADER_BYTES..]);
        bytes[24..28].copy_from_slice(&crc.to_le_bytes());
        fix_header(bytes);
    }
}

#[test]
fn the_state_file_parser_survives_100k_mutated_files() {
    if !kvm_available() {
        return;
    }
    let scratch = ScratchDir::new("snapshot-fuzz");
    let good = snapshot_mid_workload(&scratch.0, "1", "size=64M");
    let path = good.join(format::STATE_FILE);
    let original = std::fs::read(&path).unwrap();
    assert!(format::decode(&path, &original).is_ok());
    const MUTATIONS: u64 = 100_000;
    let threads = 2;
    let decoded_ok: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|worker| {
                let (original, path) = (&original, &path);
                scope.spawn(move || {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (worker + 1));
                    let mut ok = 0;
                    for i in 0..MUTATIONS / threads {
                        let mut bytes = original.clone();
                        mutate(&mut rng, &mut bytes, i % 2 == 0);
                        let started = Instant::now();
                        let result = std::panic::catch_unwind(|| format::decode(path, &bytes));
                        assert!(result.is_ok(), "decode panicked on mutation {i} of worker {worker}");
                        assert!(started.elapsed() < Duration::from_secs(5), "decode hung on mutation {i}");
                        ok += u64::from(result.unwrap().is_ok());
                    }
                    ok
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    // Some mutations are harmless (a digit changed inside a register value), most are not.
    assert!(decoded_ok < MUTATIONS / 2, "{decoded_ok} of {MUTATIONS} mutated files decoded");
}

#[test]
fn sigint_sigterm_and_sighup_end_the_run_with_a_report_and_remove_the_socket() {
    if !kvm_available() {
        return;
    }
    let scratch = ScratchDir::new("snapshot-signals");
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")] {
        let vm = Running::start(
            &scratch.0,
            &["--vcpus", "2", "-m", "size=64M", "--steps", "fill,dirty,verify", "--duration-ms", "20000"],
        );
        let socket = vm.socket.clone();
        // SAFETY: kill(2) on our own child, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(vm.pid() as i32, signal) }, 0);
        let out = vm.wait();
        assert_eq!(out.code, 1, "{name}: {}", out.stderr);
        assert_eq!(out.report["exit"]["kind"], "interrupted", "{name}: {}", out.stdout);
        assert_eq!(out.report["exit"]["signal"], name);
        assert!(!socket.exists(), "{name}: the control socket was left behind");
    }
}

#[test]
fn a_lazy_restore_pages_a_diff_chain_in_through_userfaultfd_on_every_backend() {
    if !kvm_available() {
        return;
    }
    let scratch = ScratchDir::new("snapshot-lazy");
    let mut args = vec!["--vcpus", "2", "-m", "size=64M"];
    args.extend_from_slice(&WORKLOAD);
    let vm = Running::start(&scratch.0, &args);
    let base = scratch.0.join("base");
    let diff = scratch.0.join("diff");
    vm.snapshot(&base, &[]);
    std::thread::sleep(Duration::from_millis(200));
    vm.snapshot(&diff, &["--diff", "--stop"]);
    vm.wait();
    let mut cases = vec![vec![], vec!["-m", "size=64M,backend=memfd"]];
    let pool = HugepagePool::reserve(40);
    if pool.is_some() {
        cases.push(vec!["-m", "size=64M,backend=hugetlb"]);
    }
    for extra in cases {
        let mut restore_args = vec!["--memory-restore", "uffd-missing"];
        restore_args.extend_from_slice(&extra);
        let out = restore(&diff, &restore_args);
        out.assert_success().assert_verified(common::pages(56));
        let faults = &out.report["faults"];
        assert_eq!(faults["modes"][0], "uffd-missing", "{extra:?}");
        assert_eq!(faults["coherence"]["mismatch_count"], 0, "{extra:?}: {}", out.stdout);
        // The pages came in through the fault engine, not an eager copy.
        assert_eq!(out.report["restored_bytes"], 0);
        let missing = faults["latency"].as_array().unwrap().iter().find(|l| l["kind"] == "missing").unwrap();
        assert!(missing["count"].as_u64().unwrap() > 0, "{extra:?}: no MISSING faults: {}", out.stdout);
    }
}
