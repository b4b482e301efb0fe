//! `faultline ctl`, the real binary, against a control server served by an EventManager
//! loop in this process: what it prints and its exit status (0 answered, 1 the VM answered
//! with an error, 2 no answer).

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use faultline::api::{BalloonControl, BalloonRefused, BalloonSizes, BalloonStats, ControlServer, ControlTarget};
use faultline::api::{VmState, VmStatus};

struct Balloon(Mutex<BalloonSizes>);

impl BalloonControl for Balloon {
    fn sizes(&self) -> BalloonSizes {
        *self.0.lock().unwrap()
    }

    fn set_target_pages(&self, pages: u64) -> Result<(), BalloonRefused> {
        self.0.lock().unwrap().target_pages = pages;
        Ok(())
    }

    fn stats(&self) -> BalloonStats {
        BalloonStats::default()
    }
}

struct Vm(Option<Balloon>);

impl ControlTarget for Vm {
    fn status(&self) -> VmStatus {
        VmStatus {
            state: VmState::Running,
            vcpus: 1,
            memory_bytes: 256 << 20,
            uptime_ms: 5000,
            guest_ready: false,
            balloon: self.0.is_some(),
            exit: None,
        }
    }

    fn balloon(&self) -> Option<&dyn BalloonControl> {
        self.0.as_ref().map(|b| b as &dyn BalloonControl)
    }
}

/// Binds a server at `path` and serves it from a detached EventManager thread (it ends
/// with the test process).
fn serve(path: &Path, with_balloon: bool) {
    let balloon = with_balloon.then(|| Balloon(Mutex::new(BalloonSizes::default())));
    let server = ControlServer::bind(path, Arc::new(Vm(balloon))).unwrap();
    std::thread::spawn(move || {
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber>>> = EventManager::new().unwrap();
        manager.add_subscriber(Arc::new(Mutex::new(server)));
        loop {
            manager.run().unwrap();
        }
    });
}

struct Ctl {
    code: i32,
    stdout: String,
    stderr: String,
}

fn ctl(socket: &Path, args: &[&str]) -> Ctl {
    let out = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(["ctl", "--socket"])
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    let ctl = Ctl {
        code: out.status.code().expect("faultline ctl exited by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!ctl.stderr.contains("panicked"), "{}", ctl.stderr);
    ctl
}

#[test]
fn ctl_steers_a_balloon_and_reports_status() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    serve(&socket, true);
    let status = ctl(&socket, &["status"]);
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert_eq!(status.stdout, "running: 1 vCPU, 256 MiB RAM, up 5.0 s, guest not ready yet, balloon\n");
    let set = ctl(&socket, &["balloon", "set", "64M"]);
    assert_eq!(set.code, 0, "{}", set.stderr);
    assert!(set.stdout.starts_with("balloon target set: target 64 MiB (16384 pages)"), "{}", set.stdout);
    let get = ctl(&socket, &["balloon", "get", "--json"]);
    assert_eq!(get.code, 0, "{}", get.stderr);
    let json: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
    assert_eq!(json["target_pages"], 16384);
    let stats = ctl(&socket, &["balloon", "stats"]);
    assert_eq!(stats.stdout, "the guest has not reported memory statistics yet\n");
}

#[test]
fn ctl_exit_status_tells_an_error_answer_from_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    serve(&socket, false);
    let no_balloon = ctl(&socket, &["balloon", "set", "64M"]);
    assert_eq!(no_balloon.code, 1, "{}", no_balloon.stderr);
    assert!(no_balloon.stderr.contains("no balloon device"), "{}", no_balloon.stderr);
    assert!(no_balloon.stdout.is_empty());

    let nobody = ctl(&dir.path().join("nobody.sock"), &["status"]);
    assert_eq!(nobody.code, 2, "{}", nobody.stderr);
    assert!(nobody.stderr.contains("nobody.sock") && nobody.stderr.contains("is the VM running"), "{}", nobody.stderr);
}

/// `faultline run --json ...` in the background, with a control socket in `dir`.
fn spawn_vm(dir: &Path, args: &[&str]) -> (std::process::Child, std::path::PathBuf) {
    let socket = dir.join("vm.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(["run", "--json", "--timeout", "120", "--api-socket"])
        .arg(&socket)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The socket answers once the VM is built.
    while ctl_quiet(&socket, &["status"]).is_none() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (child, socket)
}

fn ctl_quiet(socket: &Path, args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(["ctl", "--json", "--socket"])
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !ok {
        assert_ne!(std::env::var("FAULTLINE_REQUIRE_KVM").as_deref(), Ok("1"), "/dev/kvm is needed");
        eprintln!("!!!! SKIPPED: /dev/kvm is not usable here !!!!");
    }
    ok
}

#[test]
fn a_balloon_target_the_guest_cannot_reach_still_gets_a_true_summary() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (child, socket) = spawn_vm(
        dir.path(),
        &["-m", "size=256M", "--steps", "fill,balloon,verify", "--balloon", "--balloon-changes", "1"],
    );
    // The same rule as --balloon-schedule: a balloon of all of RAM is refused.
    let all = ctl(&socket, &["balloon", "set", "256M"]);
    assert_eq!(all.code, 1, "{}", all.stderr);
    assert!(all.stderr.contains("smaller than guest RAM"), "{}", all.stderr);
    // 250 MiB is allowed, but the guest can give only its workload region (RAM above
    // 8 MiB), so it stops short of the target.
    let set = ctl(&socket, &["balloon", "set", "250M"]);
    assert_eq!(set.code, 0, "{}", set.stderr);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let change = &report["guest"]["balloon_changes"][0];
    let reached = change["actual_pages"].as_u64().unwrap() * 4096;
    assert!(reached > 0 && reached < 250 << 20, "{change}");
    let balloon = &report["balloon"];
    assert_eq!(balloon["peak_balloon_bytes"].as_u64(), Some(reached), "{balloon}");
    assert_eq!(balloon["largest_target_bytes"].as_u64(), Some(250 << 20), "{balloon}");
    assert_eq!(balloon["peak_reached_target"], false, "{balloon}");
    let freed = balloon["freed_bytes"].as_u64().unwrap();
    assert!(freed * 100 >= reached * 99, "host freed {freed} of {reached} bytes: {balloon}");
    assert!(balloon["inflate_ms"].as_f64().unwrap() > 0.0, "{balloon}");
}

/// A "control socket" whose peer answers every connection with `answer` (called with the
/// stream until it fails): a hostile or broken server.
fn rogue_server(path: &Path, answer: fn(&mut std::os::unix::net::UnixStream) -> std::io::Result<()>) {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            std::thread::spawn(move || {
                let _ = answer(&mut stream);
            });
        }
    });
}

/// Runs `faultline ctl ARGS` and waits for it, killing it (and failing) if it is still
/// running after a minute: the bug this guards against is a ctl that never returns.
fn ctl_that_must_end(socket: &Path, args: &[&str]) -> Ctl {
    let mut child = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(["ctl", "--socket"])
        .arg(socket)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("faultline ctl {args:?} did not end: it ignores its --timeout or the answer size cap");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    Ctl {
        code: out.status.code().expect("faultline ctl exited by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn ctl_stops_reading_an_endless_answer_at_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("flood.sock");
    rogue_server(&socket, |stream| {
        let chunk = [b'x'; 64 * 1024];
        loop {
            std::io::Write::write_all(stream, &chunk)?;
        }
    });
    let out = ctl_that_must_end(&socket, &["--timeout", "30", "status"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("longer than 4194304 bytes"), "{}", out.stderr);
}

#[test]
fn ctl_honours_its_timeout_against_a_peer_that_drips_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("drip.sock");
    rogue_server(&socket, |stream| loop {
        std::io::Write::write_all(stream, b"x")?;
        std::thread::sleep(std::time::Duration::from_millis(100));
    });
    let out = ctl_that_must_end(&socket, &["--timeout", "1", "status"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("did not answer within 1s"), "{}", out.stderr);
}

#[test]
fn ctl_refuses_a_timeout_that_is_not_a_number_of_seconds() {
    for bad in ["-1", "NaN", "inf", "1e20"] {
        let out = ctl(Path::new("/nonexistent.sock"), &[&format!("--timeout={bad}"), "status"]);
        assert_eq!(out.code, 2, "{bad}: {}", out.stderr);
        assert!(out.stderr.contains(&format!("'{bad}'")) && out.stderr.contains("--timeout"), "{}", out.stderr);
    }
}

#[test]
fn a_second_vm_cannot_take_a_socket_between_the_first_ones_bind_and_listen() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    // The first VM, caught between bind and listen: it holds the path's lock and its socket
    // is bound but refuses connections, exactly like a stale one.
    let lock = std::fs::File::create(dir.path().join("vm.sock.lock")).unwrap();
    // SAFETY: flock on a descriptor we own; the result is checked.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    // SAFETY: a fresh socket; the result is checked and owned by `bound`.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let bound = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data for which all zeros is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(socket.as_os_str().as_encoded_bytes()) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    assert_eq!(unsafe { libc::bind(bound.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) }, 0);
    let before = std::fs::symlink_metadata(&socket).unwrap();

    let second = Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(["run", "--timeout", "60", "--api-socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("another process") && stderr.contains("vm.sock"), "{stderr}");
    // The first VM's socket is still its own.
    let after = std::fs::symlink_metadata(&socket).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((before.dev(), before.ino()), (after.dev(), after.ino()));
    drop(bound);
}
