//! Pre-copy live migration over a real link: the source VMM in one network namespace, the
//! destination in another, joined by veth (tests/common/netns.rs), unshaped, shaped by
//! `tc tbf`, and through a user-space relay adding 5 ms each way (tests/common/relay.rs;
//! this kernel has no netem). The guest rewrites its pages generation after generation
//! while it moves and checks on the destination that no write was lost. Then a seeded
//! loop cuts the link at 50 random byte offsets: each time the source runs on, and every
//! tenth time it migrates for real to the other namespace, which becomes the next source;
//! the last destination verifies every page.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::migrating::{assert_generations_whole, assert_migrated};
use common::netns::{listening_in, End, NetnsPair, Shaping};
use common::relay::{LinkFaults, Relay};
use common::{faultline, outcome, root_and_kvm, RunOutcome, ScratchDir};
use faultline_abi::splitmix64;
use serde_json::Value;

/// One test at a time: each runs two spinning VMs on a 2-core host.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The port every destination listens on (each namespace has its own port space).
const PORT: u16 = 7700;

/// A VM process inside one namespace, steered through its control socket.
struct Vm {
    child: Child,
    socket: PathBuf,
    end: End,
}

impl Vm {
    /// `faultline run --json --api-socket DIR/NAME.sock ARGS` in `end`'s namespace, waiting
    /// until the guest is ready.
    fn run(pair: &NetnsPair, end: End, dir: &Path, name: &str, args: &[String]) -> Vm {
        let socket = dir.join(format!("{name}.sock"));
        let child = pair
            .command(end, env!("CARGO_BIN_EXE_faultline"))
            .args(["run", "--json", "--timeout", "240", "--api-socket"])
            .arg(&socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline run in a namespace");
        let vm = Vm { child, socket, end };
        let started = Instant::now();
        while vm.ctl(&["status"]).1["guest_ready"] != true {
            assert!(started.elapsed() < Duration::from_secs(60), "the guest never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        vm
    }

    /// `faultline restore --incoming tcp:ADDR:PORT --api-socket DIR/NAME.sock` in `end`'s
    /// namespace, waiting until it listens.
    fn incoming(pair: &NetnsPair, end: End, dir: &Path, name: &str) -> Vm {
        let socket = dir.join(format!("{name}.sock"));
        let uri = format!("tcp:{}:{PORT}", pair.address(end));
        let child = pair
            .command(end, env!("CARGO_BIN_EXE_faultline"))
            .args(["restore", "--json", "--timeout", "240", "--incoming", &uri, "--api-socket"])
            .arg(&socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn faultline restore --incoming in a namespace");
        let started = Instant::now();
        while !listening_in(child.id(), PORT) {
            assert!(started.elapsed() < Duration::from_secs(30), "the destination never listened on {uri}");
            std::thread::sleep(Duration::from_millis(5));
        }
        Vm { child, socket, end }
    }

    /// `faultline ctl --json -s SOCKET ARGS`: exit code, JSON printed, stderr (a pathname
    /// socket reaches across namespaces).
    fn ctl(&self, args: &[&str]) -> (i32, Value, String) {
        let output = faultline().args(["ctl", "--json", "-s"]).arg(&self.socket).args(args).output().unwrap();
        let json = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        (output.status.code().unwrap_or(-1), json, String::from_utf8_lossy(&output.stderr).to_string())
    }

    /// The VM runs (a failed migration must leave it so).
    fn assert_running(&self, after: &str) {
        let (code, status, stderr) = self.ctl(&["status"]);
        assert_eq!(code, 0, "after {after}: the VM does not answer: {stderr}");
        assert_eq!(status["state"], "running", "after {after}: {status}");
        assert!(status["exit"].is_null(), "after {after}: {status}");
    }

    fn wait(self) -> RunOutcome {
        outcome(self.child.wait_with_output().unwrap())
    }
}

/// The other end of the link.
fn other(end: End) -> End {
    match end {
        End::A => End::B,
        End::B => End::A,
    }
}

/// The guest workload: fill, then `generations` at `rate` pages/s for `ms` milliseconds.
fn workload(memory: &str, rate: u32, ms: u32) -> Vec<String> {
    let (rate, ms) = (rate.to_string(), ms.to_string());
    ["--vcpus", "1", "-m", memory, "--steps", "fill,generations", "--rate", &rate, "--duration-ms", &ms]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The last destination ran the rest of the step and found every page at its generation.
fn assert_arrived_whole(destination: &RunOutcome) {
    assert_generations_whole(destination);
    assert_eq!(destination.report["migration"]["status"], "completed", "{}", destination.stdout);
}

/// One migration of a fresh 64 MiB VM from a to b, reaching b at `uri_for(pair, relay)`:
/// the source's metrics.
fn migrate_once(pair: &NetnsPair, dir: &Path, name: &str, rate: u32, ms: u32, faults: Option<LinkFaults>) -> Value {
    let source = Vm::run(pair, End::A, dir, &format!("{name}-src"), &workload("size=64M", rate, ms));
    let dest = Vm::incoming(pair, End::B, dir, &format!("{name}-dst"));
    let target: SocketAddr = format!("{}:{PORT}", pair.address(End::B)).parse().unwrap();
    let relay = faults.map(|f| Relay::spawn(Some(pair.name(End::A)), target, f));
    let uri = match &relay {
        Some(relay) => format!("tcp:{}", relay.addr),
        None => format!("tcp:{target}"),
    };
    let (code, result, stderr) = source.ctl(&["migrate", &uri, "--wait"]);
    assert_eq!(code, 0, "{name} over {uri}: {stderr} {result}");
    let metrics = assert_migrated(&source.wait());
    assert_arrived_whole(&dest.wait());
    if let Some(relay) = relay {
        let forwarded = relay.join();
        assert!(!forwarded.cut, "{forwarded:?}");
        assert_eq!(forwarded.forward, metrics["transferred"].as_u64().unwrap(), "the relay saw the whole stream");
    }
    eprintln!(
        "{name}: {} rounds, {:.0} ms total, downtime {:.1} ms, {} MiB sent, {:.0} Mbit/s",
        metrics["rounds"],
        metrics["total-time"].as_f64().unwrap(),
        metrics["downtime"].as_f64().unwrap(),
        metrics["transferred"].as_u64().unwrap() >> 20,
        metrics["mbps"].as_f64().unwrap()
    );
    metrics
}

#[test]
fn precopy_across_a_veth_unshaped_shaped_and_delayed_loses_no_write() {
    if !root_and_kvm("migration across network namespaces") || !common::netns::tools_available() {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-links");
    // 1000 pages/s (4 MiB/s) converges at 200 Mbit/s; the step outlasts the migration.
    let unshaped = {
        let pair = NetnsPair::new();
        migrate_once(&pair, &scratch.0, "unshaped", 1000, 12000, None)
    };
    let shaped = {
        let pair = NetnsPair::new();
        pair.shape(End::A, Shaping::Tbf { mbit: 200, burst_kib: 256, latency_ms: 50 });
        migrate_once(&pair, &scratch.0, "tbf-200mbit", 1000, 12000, None)
    };
    let (fast, slow) = (unshaped["mbps"].as_f64().unwrap(), shaped["mbps"].as_f64().unwrap());
    // A check that the shaping took effect, not a timing threshold.
    assert!(slow < fast, "shaped {slow:.0} Mbit/s is not below unshaped {fast:.0} Mbit/s");
    assert!(slow <= 1.5 * 200.0, "the 200 Mbit/s tbf let {slow:.0} Mbit/s through");
    let delayed = {
        let pair = NetnsPair::new();
        let faults = LinkFaults { delay: Duration::from_millis(5), ..LinkFaults::default() };
        migrate_once(&pair, &scratch.0, "relay-5ms", 1000, 12000, Some(faults))
    };
    // Every reply crosses the relay twice (5 ms each way): setup takes at least one round trip.
    assert!(delayed["setup-time"].as_f64().unwrap() >= 10.0, "{delayed}");
}

#[test]
fn fifty_seeded_link_cuts_leave_the_source_running_and_it_migrates_on() {
    if !root_and_kvm("migration across network namespaces") || !common::netns::tools_available() {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-link-cuts");
    let pair = NetnsPair::new();
    const CUTS: usize = 50;
    const EVERY: usize = 10;
    // A rough stream length for 64 MiB (round 0 of the filled region): cuts fall over it.
    const STREAM: u64 = 56 << 20;
    // The step (45 s) must outlast the 50 cuts and 5 moves (about 25 s here).
    let mut source = Vm::run(&pair, End::A, &scratch.0, "vm-0", &workload("size=64M", 10000, 45000));
    let mut rng = 0x4c49_4e4bu64;
    let mut moves = 0;
    let started = Instant::now();
    for attempt in 0..CUTS {
        rng = splitmix64(rng);
        // Some in the handshake and configuration, the rest anywhere in the stream.
        let at = if attempt % 8 == 0 { rng % 4096 } else { rng % STREAM };
        let here = source.end;
        let dest = Vm::incoming(&pair, other(here), &scratch.0, &format!("cut-{attempt}"));
        let target: SocketAddr = format!("{}:{PORT}", pair.address(other(here))).parse().unwrap();
        let relay = Relay::spawn(Some(pair.name(here)), target, LinkFaults { cut_at: Some(at), ..Default::default() });
        let (code, result, stderr) = source.ctl(&["migrate", &format!("tcp:{}", relay.addr), "--wait"]);
        let forwarded = relay.join();
        assert!(forwarded.cut, "cut {attempt} at {at}: the stream ended first ({forwarded:?}); {result}");
        assert_eq!(code, 1, "cut {attempt} at {at}: the migration should have failed: {result} {stderr}");
        assert_eq!(result["status"], "failed", "cut {attempt} at {at}: {result}");
        let dest = dest.wait();
        assert_eq!(
            dest.code, 2,
            "cut {attempt} at {at}: the destination must refuse: {}\n{}",
            dest.stdout, dest.stderr
        );
        assert!(dest.report.is_null(), "cut {attempt} at {at}: the destination ran a VM: {}", dest.stdout);
        source.assert_running(&format!("cut {attempt} at {at}"));
        if (attempt + 1) % EVERY == 0 {
            moves += 1;
            let next = Vm::incoming(&pair, other(here), &scratch.0, &format!("vm-{moves}"));
            let uri = format!("tcp:{}:{PORT}", pair.address(other(here)));
            let (code, result, stderr) = source.ctl(&["migrate", &uri, "--wait"]);
            assert_eq!(code, 0, "move {moves} after cut {attempt}: {stderr} {result}");
            let metrics = assert_migrated(&std::mem::replace(&mut source, next).wait());
            let started_wait = Instant::now();
            while source.ctl(&["status"]).1["state"] != "running" {
                assert!(started_wait.elapsed() < Duration::from_secs(30), "the moved VM never ran");
                std::thread::sleep(Duration::from_millis(10));
            }
            eprintln!(
                "move {moves} ({:?} -> {:?}) after {} cuts: {} MiB, {:.0} ms",
                here,
                source.end,
                attempt + 1,
                metrics["transferred"].as_u64().unwrap() >> 20,
                metrics["total-time"].as_f64().unwrap()
            );
        }
    }
    eprintln!("{CUTS} cuts and {moves} moves in {:.1} s", started.elapsed().as_secs_f64());
    assert_arrived_whole(&source.wait());
}
