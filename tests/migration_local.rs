//! `fd-local:` migration on the real /dev/kvm between two `faultline` processes on one
//! host: the zones' fds are handed over by SCM_RIGHTS and no page is copied. The guest
//! rewrites its pages generation after generation at 10k pages/s (`generations`) while
//! it moves and verifies them on the destination. An anon VM is refused up front; a
//! destination that dies after it received the fds and the state leaves the source
//! running on intact memory, and it then migrates for real.

mod common;

use std::os::unix::net::UnixListener;
use std::path::Path;

use common::migrating::{assert_generations_whole, assert_migrated, destination, Source};
use common::{outcome, root_and_kvm, RunOutcome, ScratchDir};
use faultline::config::VmConfig;
use faultline::migration::handshake;
use faultline::migration::local::receive_fds;
use faultline::migration::stream::{FrameReader, FrameType, FrameWriter};
use serde_json::Value;

/// One test at a time: each runs two VMs whose vCPUs spin.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fill, then `generations` at 10k pages/s for `ms` milliseconds, on `memory` zones.
fn workload(vcpus: &str, memory: &[&str], ms: &str) -> Vec<String> {
    let mut args: Vec<String> =
        ["--vcpus", vcpus, "--steps", "fill,generations", "--rate", "10000", "--duration-ms", ms]
            .iter()
            .map(|s| s.to_string())
            .collect();
    for zone in memory {
        args.extend(["-m".to_string(), zone.to_string()]);
    }
    args
}

/// The `generations` result of a run.
fn generations(run: &RunOutcome) -> Value {
    run.report["guest"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["step"] == "generations")
        .cloned()
        .unwrap_or_else(|| panic!("no generations result: {}\n{}", run.stdout, run.stderr))
}

/// The destination ran the rest of the step, found every page at its generation, and
/// no page travelled in the stream.
fn assert_arrived_whole(destination: &RunOutcome, source: &RunOutcome) {
    assert_migrated(source);
    assert_generations_whole(destination);
    let m = &destination.report["migration"];
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(m["normal"], 0, "fd-local sends no page: {m}");
    assert_eq!(m["duplicate"], 0, "fd-local sends no page: {m}");
    let s = &source.report["migration"];
    assert!(s["transferred"].as_u64().unwrap() < 1 << 20, "only the state travels: {s}");
}

#[test]
fn memfd_guests_on_1_and_2_vcpus_move_without_a_copy_and_lose_no_write() {
    if !root_and_kvm("fd-local migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-local-memfd");
    for vcpus in ["1", "2"] {
        let uri = format!("fd-local:{}", scratch.0.join(format!("in-{vcpus}.sock")).display());
        let source =
            Source::start(&scratch.0, &format!("src-{vcpus}"), &workload(vcpus, &["size=64M,backend=memfd"], "4000"));
        let dest = destination(&uri);
        let (code, result, stderr) = source.migrate(&uri);
        assert_eq!(code, 0, "{vcpus} vCPUs: {stderr} {result}");
        let (source, dest) = (source.wait(), outcome(dest.wait_with_output().unwrap()));
        assert_arrived_whole(&dest, &source);
        assert_eq!(dest.report["backends"], serde_json::json!(["memfd"]));
        let m = &source.report["migration"];
        eprintln!(
            "{vcpus} vCPU(s) fd-local: {:.0} ms total, downtime {:.1} ms, {} bytes sent",
            m["total-time"].as_f64().unwrap(),
            m["downtime"].as_f64().unwrap(),
            m["transferred"]
        );
    }
}

#[test]
fn a_hugetlb_zone_is_handed_over_not_copied() {
    if !root_and_kvm("fd-local migration tests") {
        return;
    }
    let _one = exclusive();
    // 16 huge pages, shared by both ends (the destination maps the source's).
    let Some(_pool) = common::HugepagePool::reserve(16) else { return };
    let scratch = ScratchDir::new("migrate-local-hugetlb");
    let uri = format!("fd-local:{}", scratch.0.join("in.sock").display());
    let args = workload("2", &["size=16M,backend=memfd", "size=32M,backend=hugetlb"], "4000");
    let source = Source::start(&scratch.0, "src", &args);
    let dest = destination(&uri);
    let (code, result, stderr) = source.migrate(&uri);
    assert_eq!(code, 0, "{stderr} {result}");
    let (source, dest) = (source.wait(), outcome(dest.wait_with_output().unwrap()));
    assert_arrived_whole(&dest, &source);
    assert_eq!(dest.report["backends"], serde_json::json!(["memfd", "hugetlb"]));
}

#[test]
fn an_anon_vm_is_refused_up_front_with_the_backend_to_use() {
    if !root_and_kvm("fd-local migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-local-anon");
    let uri = format!("fd-local:{}", scratch.0.join("in.sock").display());
    let source = Source::start(&scratch.0, "src", &workload("1", &["size=32M"], "1500"));
    let (code, result, stderr) = source.migrate(&uri);
    assert_ne!(code, 0, "an anon VM cannot be handed over: {result}");
    assert!(stderr.contains("anon") && stderr.contains("backend=memfd") && stderr.contains("unix:"), "{stderr}");
    source.assert_running("the refusal");
    let source = source.wait();
    source.assert_success();
    assert_eq!(generations(&source)["bad_pages"], 0);
}

/// A destination that takes the fds and the state, then dies without acknowledging:
/// it must not have run the guest, and the source must resume on its memory.
fn dying_destination(path: &Path) -> std::thread::JoinHandle<bool> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (link, _) = listener.accept().unwrap();
        let mut reader = FrameReader::new(link.try_clone().unwrap());
        let mut writer = FrameWriter::new(link.try_clone().unwrap());
        assert_eq!(reader.read().unwrap().kind, FrameType::Hello);
        let welcome = handshake::encode(&serde_json::json!({ "writer": "a test" }));
        writer.write(FrameType::Welcome, &[&welcome]).unwrap();
        let config = reader.read().unwrap();
        assert_eq!(config.kind, FrameType::Config);
        let config: VmConfig = serde_json::from_slice(&config.payload).unwrap();
        let fds = receive_fds(&link, &config.zones).unwrap();
        writer.write(FrameType::Welcome, &[&welcome]).unwrap();
        let state = reader.read().unwrap();
        let complete = reader.read().unwrap();
        drop(fds);
        // Dies here: no Ack.
        state.kind == FrameType::State && complete.kind == FrameType::Complete
    })
}

#[test]
fn a_destination_dying_before_the_release_leaves_the_source_running_and_able_to_move() {
    if !root_and_kvm("fd-local migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-local-dies");
    let source = Source::start(&scratch.0, "src", &workload("2", &["size=64M,backend=memfd"], "6000"));
    let dying = scratch.0.join("dying.sock");
    let fake = dying_destination(&dying);
    let (code, result, stderr) = source.migrate(&format!("fd-local:{}", dying.display()));
    assert_ne!(code, 0, "a destination that never acknowledged cannot have taken the VM: {result}");
    assert!(fake.join().unwrap(), "the dying destination got the state before it died");
    source.assert_running("a destination that died");
    // The same VM moves for real afterwards and verifies there.
    let uri = format!("fd-local:{}", scratch.0.join("in.sock").display());
    let dest = destination(&uri);
    let (code, result, stderr2) = source.migrate(&uri);
    assert_eq!(code, 0, "{stderr2} {result} (first attempt: {stderr})");
    let (source, dest) = (source.wait(), outcome(dest.wait_with_output().unwrap()));
    assert_arrived_whole(&dest, &source);
}
