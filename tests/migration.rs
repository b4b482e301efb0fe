//! Live migration on the real /dev/kvm between two `faultline` processes: the guest
//! rewrites its pages generation after generation at 10k pages/s while it moves
//! (`generations`), and checks on the destination that no write was lost or went stale.
//! Links are cut and streams corrupted at seeded random points by a relay in this test:
//! the destination refuses and starts nothing, the source runs on and migrates again.
//! A VM whose balloon inflates while it migrates deflates on the destination and verifies.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Stdio;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::migrating::{assert_generations_whole, assert_migrated, destination, listening, Source};
use common::{faultline, outcome, root_and_kvm, RunOutcome, ScratchDir};
use faultline::migration::handshake;
use faultline::migration::stream::{FrameReader, FrameType, FrameWriter};
use faultline_abi::splitmix64;

/// One migration test at a time: each runs two VMs whose vCPUs spin, and the source must
/// converge before its step ends; on a small CI machine parallel tests starve each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A free loopback TCP port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The guest workload: fill, then `generations` at 10k pages/s for `ms` milliseconds.
fn workload(vcpus: &str, memory: &str, ms: &str) -> Vec<String> {
    ["--vcpus", vcpus, "-m", memory, "--steps", "fill,generations", "--rate", "10000", "--duration-ms", ms]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The destination ran the rest of the step and found every page at its generation.
fn assert_arrived_whole(destination: &RunOutcome, source: &RunOutcome) {
    assert_migrated(source);
    let generations = assert_generations_whole(destination);
    assert!(generations["rounds"].as_u64().unwrap() >= 1, "{generations}");
    let m = &destination.report["migration"];
    assert_eq!(m["role"], "destination", "{m}");
    assert_eq!(m["status"], "completed", "{m}");
    assert!(m["normal"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["transferred"], source.report["migration"]["transferred"], "both ends count the same stream");
}

#[test]
fn precopy_over_unix_and_tcp_on_1_and_2_vcpus_loses_no_write() {
    if !root_and_kvm("live migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-precopy");
    for (vcpus, transport) in [("1", "unix"), ("2", "tcp"), ("2", "unix"), ("1", "tcp")] {
        let uri = match transport {
            "unix" => format!("unix:{}", scratch.0.join(format!("in-{vcpus}.sock")).display()),
            _ => format!("tcp:127.0.0.1:{}", free_port()),
        };
        let args = workload(vcpus, "size=64M", "6000");
        let source = Source::start(
            &scratch.0,
            &format!("src-{vcpus}-{transport}"),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let dest = destination(&uri);
        let (code, result, stderr) = source.migrate(&uri);
        assert_eq!(code, 0, "{vcpus} vCPUs over {transport}: {stderr} {result}");
        let (source, dest) = (source.wait(), outcome(dest.wait_with_output().unwrap()));
        assert_arrived_whole(&dest, &source);
        let m = &source.report["migration"];
        assert!(m["dirty-sync-count"].as_u64().unwrap() >= 2, "{m}");
        assert!(m["downtime"].as_f64().unwrap() > 0.0 && m["precopy-bytes"].as_u64().unwrap() > 0, "{m}");
        assert_eq!(m["total"], 64 << 20, "{m}");
        eprintln!(
            "{vcpus} vCPU(s) over {transport}: {} rounds, {:.0} ms total, downtime {:.1} ms, {} MiB sent",
            m["rounds"],
            m["total-time"].as_f64().unwrap(),
            m["downtime"].as_f64().unwrap(),
            m["transferred"].as_u64().unwrap() >> 20
        );
    }
}

#[test]
fn a_vm_with_a_hugetlb_zone_moves_in_2_mib_pages() {
    if !root_and_kvm("live migration tests") {
        return;
    }
    let _one = exclusive();
    // 16 huge pages at each end.
    let Some(_pool) = common::HugepagePool::reserve(32) else { return };
    let scratch = ScratchDir::new("migrate-hugetlb");
    let uri = format!("unix:{}", scratch.0.join("in.sock").display());
    let mut args = workload("2", "size=16M", "6000");
    args.extend(["-m".to_string(), "size=32M,backend=hugetlb".to_string()]);
    let source = Source::start(&scratch.0, "src", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let dest = destination(&uri);
    let (code, result, stderr) = source.migrate(&uri);
    assert_eq!(code, 0, "{stderr} {result}");
    let (source, dest) = (source.wait(), outcome(dest.wait_with_output().unwrap()));
    assert_arrived_whole(&dest, &source);
    assert_eq!(dest.report["backends"], serde_json::json!(["anon", "hugetlb"]));
    assert_eq!(source.report["migration"]["page-size"], 2 << 20);
}

/// What the relay does to the source's bytes.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Kill the link in both directions after this many bytes.
    Cut(u64),
    /// Flip this bit of the byte at this offset.
    Flip(u64, u8),
    /// At this offset, send the last `len` bytes again.
    Replay(u64, usize),
}

/// Listens on `listen`, forwards one connection to `target` both ways, and does `fault`
/// to the source's bytes.
fn relay(listen: &Path, target: &Path, fault: Fault) -> JoinHandle<()> {
    let listener = UnixListener::bind(listen).unwrap();
    let target = target.to_path_buf();
    std::thread::spawn(move || {
        let Ok((mut from_source, _)) = listener.accept() else { return };
        let Ok(mut to_dest) = UnixStream::connect(&target) else { return };
        let (mut back_from, mut back_to) = (to_dest.try_clone().unwrap(), from_source.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(std::net::Shutdown::Write);
        });
        let mut buffer = vec![0u8; 64 << 10];
        let mut history: Vec<u8> = Vec::new();
        let mut offset = 0u64;
        let mut done = false;
        loop {
            let n = match from_source.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut chunk = buffer[..n].to_vec();
            let end = offset + n as u64;
            match fault {
                Fault::Cut(at) if end > at => {
                    let keep = (at - offset) as usize;
                    let _ = to_dest.write_all(&chunk[..keep]);
                    let _ = to_dest.shutdown(std::net::Shutdown::Both);
                    let _ = from_source.shutdown(std::net::Shutdown::Both);
                    break;
                }
                Fault::Flip(at, bit) if !done && end > at => {
                    chunk[(at - offset) as usize] ^= 1 << bit;
                    done = true;
                }
                Fault::Replay(at, len) if !done && end > at => {
                    let split = (at - offset) as usize;
                    history.extend_from_slice(&chunk[..split]);
                    let replay = history[history.len().saturating_sub(len)..].to_vec();
                    chunk.splice(split..split, replay);
                    done = true;
                }
                _ => {}
            }
            history.extend_from_slice(&buffer[..n]);
            if history.len() > 256 << 10 {
                history.drain(..history.len() - (128 << 10));
            }
            offset = end;
            if to_dest.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to_dest.shutdown(std::net::Shutdown::Write);
        let _ = back.join();
    })
}

/// Migrates through a relay doing `fault`: the migration fails, the destination exits
/// with an error and started nothing, the source runs on. Returns the source's error.
fn failed_migration(source: &Source, scratch: &Path, attempt: usize, fault: Fault) -> String {
    let dest_path = scratch.join(format!("dest-{attempt}.sock"));
    let relay_path = scratch.join(format!("relay-{attempt}.sock"));
    let dest = destination(&format!("unix:{}", dest_path.display()));
    let relay = relay(&relay_path, &dest_path, fault);
    let (code, result, stderr) = source.migrate(&format!("unix:{}", relay_path.display()));
    assert_eq!(code, 1, "{fault:?}: the migration should have failed: {result} {stderr}");
    assert_eq!(result["status"], "failed", "{fault:?}: {result}");
    let dest = outcome(dest.wait_with_output().unwrap());
    assert_eq!(dest.code, 2, "{fault:?}: the destination must refuse: {}\n{}", dest.stdout, dest.stderr);
    assert!(dest.stderr.contains("incoming migration"), "{fault:?}: {}", dest.stderr);
    assert!(dest.report.is_null(), "{fault:?}: the destination ran a VM: {}", dest.stdout);
    // If the destination refused while the relay still forwarded, its message may have
    // reached the source; either way it must not take the source down.
    let _ = relay.join();
    source.assert_running(&format!("{fault:?}"));
    eprintln!("{fault:?}: source: {}; destination: {}", result["error"], dest.stderr.trim());
    result["error"].as_str().unwrap_or_default().to_string()
}

/// After the failures, one clean migration: memory was intact all along.
fn migrate_cleanly(source: Source, scratch: &Path) {
    let uri = format!("unix:{}", scratch.join("final.sock").display());
    let dest = destination(&uri);
    let (code, result, stderr) = source.migrate(&uri);
    if code != 0 {
        // Say how the source ended: a guest whose timed step ran out before this
        // migration (a slow host) reads differently from a migration that broke.
        let source = source.wait();
        panic!(
            "the last migration failed: {stderr} {result}\nsource exit: {}\nsource stderr: {}",
            source.report["exit"], source.stderr
        );
    }
    assert_arrived_whole(&outcome(dest.wait_with_output().unwrap()), &source.wait());
}

#[test]
fn a_cut_link_leaves_the_source_running_and_it_migrates_again() {
    if !root_and_kvm("live migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-cut");
    // The guest's timed step must outlast ten failed attempts on a loaded host.
    let args = workload("2", "size=32M", "40000");
    let source = Source::start(&scratch.0, "src", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut rng = 12u64;
    for attempt in 0..10 {
        rng = splitmix64(rng);
        // Two cuts inside the handshake and configuration, the rest anywhere in round 0
        // (24 MiB of filled region) and the rounds after it.
        let at = if attempt < 2 { rng % 2048 } else { rng % (24 << 20) };
        failed_migration(&source, &scratch.0, attempt, Fault::Cut(at));
    }
    migrate_cleanly(source, &scratch.0);
}

#[test]
fn corrupted_streams_are_refused_by_the_destination_and_the_source_goes_on() {
    if !root_and_kvm("live migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-corrupt");
    // The guest's timed step must outlast six failed attempts on a loaded host (at
    // 20 s, a CI run once found the guest finished before the clean migration).
    let args = workload("1", "size=32M", "40000");
    let source = Source::start(&scratch.0, "src", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut rng = 34u64;
    for attempt in 0..6 {
        rng = splitmix64(rng);
        let at = 64 + rng % (16 << 20);
        let fault = match attempt % 2 {
            0 => Fault::Flip(at, (rng >> 40) as u8 % 8),
            _ => Fault::Replay(at, 1 + (rng >> 32) as usize % (64 << 10)),
        };
        let error = failed_migration(&source, &scratch.0, attempt, fault);
        assert!(error.contains("destination refused"), "{fault:?}: the destination should have said why: {error}");
    }
    migrate_cleanly(source, &scratch.0);
}

#[test]
fn cancel_and_timeout_leave_the_source_running_and_it_migrates_again() {
    if !root_and_kvm("live migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-cancel");
    let args = workload("1", "size=32M", "25000");
    let source = Source::start(&scratch.0, "src", &args.iter().map(String::as_str).collect::<Vec<_>>());
    // Cancel: `migrate` answers at once (the transfer is on its own thread, held to
    // 4 MiB/s so it is still going), `migrate cancel` stops it.
    let uri = format!("unix:{}", scratch.0.join("cancel.sock").display());
    let dest = destination(&uri);
    let (code, first, stderr) = source.ctl(&["migrate", &uri, "--bandwidth", "4M"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(["setup", "active"].contains(&first["status"].as_str().unwrap()), "{first}");
    let started = Instant::now();
    while source.ctl(&["migrate", "status"]).1["status"] != "active" {
        assert!(started.elapsed() < Duration::from_secs(20), "the migration never became active");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, _, stderr) = source.ctl(&["migrate", &uri]);
    assert_eq!(code, 1, "a second migration while one runs is refused");
    assert!(stderr.contains("already running"), "{stderr}");
    let (code, _, stderr) = source.ctl(&["migrate", "cancel"]);
    assert_eq!(code, 0, "{stderr}");
    let status = loop {
        let status = source.ctl(&["migrate", "status"]).1;
        if status["status"] != "active" && status["status"] != "setup" {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status["status"], "cancelled", "{status}");
    assert!(status["transferred"].as_u64().unwrap() > 0, "{status}");
    source.assert_running("a cancelled migration");
    let dest = outcome(dest.wait_with_output().unwrap());
    assert_eq!(dest.code, 2, "{}", dest.stderr);
    assert!(dest.report.is_null() && dest.stderr.contains("incoming migration"), "{}", dest.stderr);
    let (code, _, stderr) = source.ctl(&["migrate", "cancel"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no migration is running"), "{stderr}");

    // --timeout: it gives up and the VM runs on.
    let uri = format!("unix:{}", scratch.0.join("timeout.sock").display());
    let dest = destination(&uri);
    let (code, result, _) = source.ctl(&["migrate", &uri, "--bandwidth", "4M", "--timeout", "1", "--wait"]);
    assert_eq!(code, 1, "{result}");
    assert_eq!(result["status"], "failed", "{result}");
    assert!(result["error"].as_str().unwrap().contains("--timeout of 1 s"), "{result}");
    source.assert_running("a timed-out migration");
    assert_eq!(outcome(dest.wait_with_output().unwrap()).code, 2);
    migrate_cleanly(source, &scratch.0);
}

#[test]
fn mismatched_handshakes_and_unmigratable_vms_are_refused_clearly() {
    if !root_and_kvm("live migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-handshake");
    // A source of another stream version: the destination refuses it, says so, runs nothing.
    let path = scratch.0.join("dest.sock");
    let dest = destination(&format!("unix:{}", path.display()));
    let link = UnixStream::connect(&path).unwrap();
    let mut writer = FrameWriter::new(link.try_clone().unwrap());
    writer.write(FrameType::Hello, &[&handshake::encode_with(99, handshake::ARCH_X86_64, &0)]).unwrap();
    let reply = FrameReader::new(link).read().unwrap();
    assert_eq!(reply.kind, FrameType::Refuse);
    let reason = String::from_utf8_lossy(&reply.payload).to_string();
    assert!(reason.contains("version 99"), "{reason}");
    let dest = outcome(dest.wait_with_output().unwrap());
    assert_eq!(dest.code, 2, "{}", dest.stderr);
    assert!(dest.stderr.contains("version 99") && dest.report.is_null(), "{}", dest.stderr);

    // A destination of another version or architecture: the source refuses and runs on.
    let source = Source::start(&scratch.0, "src", &["-m", "size=32M", "--steps", "fill,idle", "--duration-ms", "8000"]);
    for (version, arch, expected) in
        [(7, handshake::ARCH_X86_64, "version 7"), (handshake::VERSION, 183, "architecture 183")]
    {
        let path = scratch.0.join(format!("fake-{version}-{arch}.sock"));
        let listener = UnixListener::bind(&path).unwrap();
        let fake = std::thread::spawn(move || {
            let (link, _) = listener.accept().unwrap();
            let hello = FrameReader::new(link.try_clone().unwrap()).read().unwrap();
            assert_eq!(hello.kind, FrameType::Hello);
            let welcome = handshake::encode_with(version, arch, &serde_json::json!({"writer": "fake"}));
            FrameWriter::new(link.try_clone().unwrap()).write(FrameType::Welcome, &[&welcome]).unwrap();
            let mut rest = Vec::new();
            let _ = (&link).read_to_end(&mut rest);
        });
        let (code, result, stderr) = source.migrate(&format!("unix:{}", path.display()));
        assert_eq!(code, 1, "{stderr}");
        let error = result["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected) && error.contains("handshake"), "{error}");
        fake.join().unwrap();
        source.assert_running(expected);
    }
    // Nothing listening: a clear error, the VM runs on.
    let (code, result, _) = source.migrate(&format!("unix:{}", scratch.0.join("nobody.sock").display()));
    assert_eq!(code, 1);
    assert!(result["error"].as_str().unwrap_or_default().contains("is `faultline restore --incoming"), "{result}");
    source.assert_running("connecting to nobody");
    let (code, _, stderr) = source.ctl(&["migrate", "ftp:somewhere"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("unix:PATH, tcp:HOST:PORT or fd-local:PATH"), "{stderr}");
    let source = source.wait();
    assert_eq!(source.code, 0, "{}", source.stderr);
    assert_eq!(source.report["migration"]["status"], "failed", "{}", source.stdout);
}

#[test]
fn a_vm_migrated_mid_inflation_finishes_its_balloon_changes_on_the_destination() {
    if !root_and_kvm("live migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-balloon");
    let uri = format!("unix:{}", scratch.0.join("in.sock").display());
    // Two changes steered by hand: inflate to 192M (the migration starts while the guest
    // gives pages, so the VMM discards and writes used rings during the rounds), then,
    // on the destination, back to 0 (the guest checks the pages it gets back are zero).
    let args =
        ["--vcpus", "2", "-m", "size=256M", "--balloon", "--balloon-changes", "2", "--steps", "fill,balloon,verify"];
    let source = Source::start(&scratch.0, "src", &args);
    let (code, _, stderr) = source.ctl(&["balloon", "set", "192M"]);
    assert_eq!(code, 0, "{stderr}");
    let started = Instant::now();
    let actual = loop {
        let (code, info, stderr) = source.ctl(&["balloon", "get"]);
        assert_eq!(code, 0, "{stderr}");
        let actual = info["actual_pages"].as_u64().unwrap();
        if actual > 0 {
            break actual;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the balloon never started inflating: {info}");
        std::thread::sleep(Duration::from_millis(2));
    };
    let dest_socket = scratch.0.join("dest-api.sock");
    let dest = faultline()
        .args(["restore", "--json", "--timeout", "180", "--incoming", &uri, "--api-socket"])
        .arg(&dest_socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn faultline restore --incoming");
    while !listening(&uri) {
        assert!(started.elapsed() < Duration::from_secs(90), "the destination never listened on {uri}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, result, stderr) = source.migrate(&uri);
    assert_eq!(code, 0, "{stderr} {result}");
    let source = source.wait();
    assert_eq!(source.report["exit"]["kind"], "migrated", "{}\n{}", source.stdout, source.stderr);
    let before = source.report["guest"]["balloon_changes"].as_array().map_or(0, Vec::len);
    eprintln!("migrated with the balloon at {actual}+ pages, {before} of 2 changes done on the source");
    let deflate = faultline().args(["ctl", "-s"]).arg(&dest_socket).args(["balloon", "set", "0"]).output().unwrap();
    assert!(deflate.status.success(), "{}", String::from_utf8_lossy(&deflate.stderr));
    let dest = outcome(dest.wait_with_output().unwrap());
    dest.assert_success().assert_verified(1);
    let changes = dest.report["guest"]["balloon_changes"].as_array().expect("balloon changes");
    let got: Vec<u64> = changes.iter().map(|c| c["actual_pages"].as_u64().unwrap()).collect();
    assert_eq!(got, [192u64 << 8, 0], "{}", dest.stdout);
    for change in changes {
        assert_eq!((change["kept_ok"].as_bool(), change["zero_ok"].as_bool()), (Some(true), Some(true)), "{change}");
        assert_eq!(change["mismatches"], 0, "{change}");
    }
    assert_eq!(dest.report["balloon"]["device"]["device_errors"], 0, "{}", dest.stdout);
    assert_eq!(dest.report["migration"]["status"], "completed", "{}", dest.stdout);
}
