//! The two ends of a migration test on one host: a `faultline run` with a control socket
//! (the source) and `faultline restore --incoming URI` (the destination), and how to tell
//! that the destination listens without taking its one connection.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{faultline, outcome, RunOutcome};

/// A `faultline run` in the background with a control socket, the guest ready.
pub struct Source {
    /// The `faultline run` process (stdout and stderr piped).
    pub child: Child,
    /// Its control socket.
    pub socket: PathBuf,
}

impl Source {
    /// Starts `faultline run --json --api-socket DIR/NAME.sock ARGS` and waits until the
    /// guest is ready.
    pub fn start(dir: &Path, name: &str, args: &[impl AsRef<OsStr>]) -> Source {
        let socket = dir.join(format!("{name}.sock"));
        let child = faultline()
            .args(["run", "--json", "--timeout", "180", "--api-socket"])
            .arg(&socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline run");
        let source = Source { child, socket };
        let started = Instant::now();
        while source.ctl(&["status"]).1["guest_ready"] != true {
            assert!(started.elapsed() < Duration::from_secs(60), "the guest never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        source
    }

    /// `faultline ctl --json -s SOCKET ARGS`: exit code, JSON printed, stderr.
    pub fn ctl(&self, args: &[&str]) -> (i32, Value, String) {
        let output = faultline().args(["ctl", "--json", "-s"]).arg(&self.socket).args(args).output().unwrap();
        let json = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        (output.status.code().unwrap_or(-1), json, String::from_utf8_lossy(&output.stderr).to_string())
    }

    /// `ctl migrate URI --wait`.
    pub fn migrate(&self, uri: &str) -> (i32, Value, String) {
        self.ctl(&["migrate", uri, "--wait"])
    }

    /// The VM runs (a failed migration must leave it so).
    pub fn assert_running(&self, after: &str) {
        let (code, status, stderr) = self.ctl(&["status"]);
        assert_eq!(code, 0, "after {after}: the source does not answer: {stderr}");
        assert_eq!(status["state"], "running", "after {after}: {status}");
        assert!(status["exit"].is_null(), "after {after}: {status}");
    }

    /// Waits for the run to end and reads its report.
    pub fn wait(self) -> RunOutcome {
        outcome(self.child.wait_with_output().unwrap())
    }
}

/// `faultline restore --incoming URI --json` in the background, listening once it returns.
pub fn destination(uri: &str) -> Child {
    let child = faultline()
        .args(["restore", "--json", "--timeout", "180", "--incoming", uri])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn faultline restore --incoming");
    let started = Instant::now();
    while !listening(uri) {
        assert!(started.elapsed() < Duration::from_secs(30), "the destination never listened on {uri}");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// True once something listens at `uri` (`unix:`, `fd-local:` or `tcp:`), without
/// connecting: the destination takes only one connection.
pub fn listening(uri: &str) -> bool {
    if let Some(path) = uri.strip_prefix("unix:").or_else(|| uri.strip_prefix("fd-local:")) {
        // The socket file appears at bind(), a moment before listen(): a connect in
        // between is refused. /proc/net/unix shows the listening flag (__SO_ACCEPTCON).
        let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
        return table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 7 && fields[7] == path && fields[3] == "00010000"
        });
    }
    let port: u16 = uri.rsplit(':').next().unwrap().parse().unwrap();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[1].ends_with(&format!(":{port:04X}")) && fields[3] == "0A"
    })
}

/// The source migrated and exited while its `generations` step still ran (a step that
/// ended before the migration proves nothing); its migration metrics.
pub fn assert_migrated(source: &RunOutcome) -> Value {
    assert_eq!(source.report["exit"]["kind"], "migrated", "{}\n{}", source.stdout, source.stderr);
    assert_eq!(source.code, 0, "a migrated source succeeded: {}", source.stderr);
    assert_eq!(source.report["migration"]["status"], "completed", "{}", source.stdout);
    let results = source.report["guest"]["results"].as_array().unwrap();
    assert!(
        results.iter().all(|r| r["step"] != "generations"),
        "the step ended before the migration, so it proves nothing: {}",
        source.stdout
    );
    source.report["migration"].clone()
}

/// The destination succeeded, its `generations` step found no page at a wrong
/// generation, and it verified every page the step covers; that step's result.
pub fn assert_generations_whole(destination: &RunOutcome) -> Value {
    destination.assert_success();
    let generations = destination.report["guest"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["step"] == "generations")
        .cloned()
        .unwrap_or_else(|| panic!("no generations result: {}\n{}", destination.stdout, destination.stderr));
    assert_eq!(generations["bad_pages"], 0, "{generations}");
    destination.assert_verified(generations["pages"].as_u64().unwrap());
    generations
}

/// The guest-visible pause of the switch, from a destination whose guest ran with
/// `--stall-us`: per vCPU the first stall it printed after the restore (it spans the
/// switch-over), the longest of them, in ms. `None` if no vCPU printed one.
pub fn guest_pause_ms(destination: &RunOutcome) -> Option<f64> {
    let stalls = destination.report["guest"]["stalls"].as_array()?;
    let mut first: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    for stall in stalls.iter().filter(|s| s["after_restore"] == true) {
        first.entry(stall["cpu"].as_u64()?).or_insert(stall["us"].as_u64()?);
    }
    first.values().max().map(|&us| us as f64 / 1e3)
}
