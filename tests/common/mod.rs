//! Helpers shared by the integration tests: run the real `faultline` binary on the real
//! /dev/kvm, read its JSON report, and manage host resources (hugepages) honestly.
#![allow(dead_code)]

pub mod migrating;
pub mod netns;
pub mod relay;
pub mod running;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;

/// The `faultline` binary built for these tests.
///
/// The process is killed when the test thread that started it ends: a test that panics
/// half way does not leave a VM running that holds hugepages or sockets the next test
/// needs.
pub fn faultline() -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(env!("CARGO_BIN_EXE_faultline"));
    // SAFETY: the closure runs in the child between fork and exec and only makes one
    // async-signal-safe system call (prctl).
    unsafe {
        command.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            Ok(())
        });
    }
    command
}

/// True when `/dev/kvm` can be used. Without it, the test is skipped with a loud message,
/// unless FAULTLINE_REQUIRE_KVM=1 (CI), where it fails.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !ok {
        if std::env::var("FAULTLINE_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("/dev/kvm is not usable and FAULTLINE_REQUIRE_KVM=1: this test needs KVM");
        }
        eprintln!("!!!! SKIPPED: /dev/kvm is not usable here; set FAULTLINE_REQUIRE_KVM=1 to make this a failure !!!!");
    }
    ok
}

/// True when the tests run as root (KVM must be usable too); otherwise a loud skip saying
/// `needs`, or a failure under FAULTLINE_REQUIRE_KVM=1 (CI runs as root).
pub fn root_and_kvm(needs: &str) -> bool {
    if !kvm_available() {
        return false;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("FAULTLINE_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{needs}: these tests need root");
        }
        eprintln!("!!!! SKIPPED: {needs} need root !!!!");
        return false;
    }
    true
}

/// QEMU's binary when installed. Without it, the test is skipped with a loud message,
/// unless FAULTLINE_REQUIRE_QEMU=1 (CI), where it fails.
pub fn qemu() -> Option<&'static str> {
    let found = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("FAULTLINE_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("qemu-system-x86_64 is not installed and FAULTLINE_REQUIRE_QEMU=1");
        }
        eprintln!("!!!! SKIPPED: qemu-system-x86_64 not installed (apt-get install qemu-system-x86) !!!!");
        return None;
    }
    Some("qemu-system-x86_64")
}

/// Writes the built-in guest's ELF into `dir` (for other VMMs) and returns its path.
pub fn guest_image_in(dir: &std::path::Path) -> PathBuf {
    let image = dir.join("guest.elf");
    assert!(faultline().arg("guest-image").arg(&image).status().unwrap().success());
    image
}

/// The outcome of one `faultline run --json`.
pub struct RunOutcome {
    /// The process's exit code.
    pub code: i32,
    /// The JSON report (Null when the run failed before producing one).
    pub report: Value,
    /// stderr, for error messages.
    pub stderr: String,
    /// stdout, raw.
    pub stdout: String,
}

impl RunOutcome {
    /// Panics with everything known unless the run succeeded.
    pub fn assert_success(&self) -> &Self {
        assert_eq!(self.code, 0, "faultline failed\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        assert_eq!(self.report["exit"]["kind"], "debug-exit", "{}", self.stdout);
        self
    }

    /// The verify lines the guest printed.
    pub fn verifies(&self) -> &Vec<Value> {
        self.report["guest"]["verifies"].as_array().expect("verifies array")
    }

    /// Asserts at least one verify line and that all passed over `min_pages` or more.
    pub fn assert_verified(&self, min_pages: u64) -> &Self {
        assert!(!self.verifies().is_empty(), "no verify line: {}", self.stdout);
        for verify in self.verifies() {
            assert_eq!(verify["ok"], true, "verify failed: {verify}");
            assert_eq!(verify["mismatches"], 0, "{verify}");
            assert!(verify["pages"].as_u64().unwrap() >= min_pages, "{verify}");
        }
        self
    }
}

/// Runs `faultline run --json ARGS...`.
pub fn run_json(args: &[&str]) -> RunOutcome {
    let output =
        faultline().arg("run").arg("--json").args(["--timeout", "120"]).args(args).output().expect("spawn faultline");
    outcome(output)
}

/// Wraps a finished process.
pub fn outcome(output: Output) -> RunOutcome {
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    RunOutcome {
        code: output.status.code().unwrap_or(-1),
        report,
        stderr: String::from_utf8_lossy(&output.stderr).to_string(),
        stdout,
    }
}

/// Guest pages of `mib` MiB.
pub fn pages(mib: u64) -> u64 {
    mib * 256
}

/// A scratch directory removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// A new empty directory under the system temp dir.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("faultline-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const FREE_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

fn read_number(path: &str) -> u64 {
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Tests that change or depend on the hugepage pool run one at a time.
static HUGETLB_LOCK: Mutex<()> = Mutex::new(());

/// A hold on the 2 MiB hugepage pool: at least `pages` free while it lives; the pool size
/// is put back on drop.
pub struct HugepagePool {
    previous: u64,
    _lock: MutexGuard<'static, ()>,
}

impl HugepagePool {
    /// Sets the pool so that `pages` are free. None (with a loud message) when that is not
    /// possible here, unless FAULTLINE_REQUIRE_HUGETLB=1 (CI), where it panics.
    pub fn reserve(pages: u64) -> Option<Self> {
        let lock = HUGETLB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let previous = read_number(NR_HUGEPAGES);
        let free = read_number(FREE_HUGEPAGES);
        let wanted = previous + pages.saturating_sub(free);
        if std::fs::write(NR_HUGEPAGES, wanted.to_string()).is_err() || read_number(FREE_HUGEPAGES) < pages {
            let _ = std::fs::write(NR_HUGEPAGES, previous.to_string());
            let why = format!(
                "cannot reserve {pages} free 2 MiB hugepages (pool {previous}, free {}); as root: echo {wanted} > {NR_HUGEPAGES}",
                read_number(FREE_HUGEPAGES)
            );
            if std::env::var("FAULTLINE_REQUIRE_HUGETLB").as_deref() == Ok("1") {
                panic!("{why} (FAULTLINE_REQUIRE_HUGETLB=1)");
            }
            eprintln!("!!!! SKIPPED: {why} !!!!");
            return None;
        }
        Some(HugepagePool { previous, _lock: lock })
    }

    /// Empties the pool (for the empty-pool error test); restored on drop.
    pub fn empty() -> Option<Self> {
        let lock = HUGETLB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let previous = read_number(NR_HUGEPAGES);
        if std::fs::write(NR_HUGEPAGES, "0").is_err() || read_number(FREE_HUGEPAGES) != 0 {
            let _ = std::fs::write(NR_HUGEPAGES, previous.to_string());
            eprintln!("!!!! SKIPPED: cannot empty the hugepage pool here !!!!");
            return None;
        }
        Some(HugepagePool { previous, _lock: lock })
    }

    /// Free 2 MiB pages right now.
    pub fn free_pages() -> u64 {
        read_number(FREE_HUGEPAGES)
    }
}

impl Drop for HugepagePool {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.previous.to_string());
    }
}
