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
