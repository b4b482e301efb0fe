//! Post-copy live migration on the real /dev/kvm between two `faultline` processes: the
//! source pauses and sends only the page table and the state, the destination runs at
//! once under userfaultfd MISSING and asks for each page its guest touches first (on the
//! preempt channel, a second connection, or on the main one), while the source pushes
//! the rest. The guest rewrites its pages generation after generation at 10k pages/s
//! (`generations`) across the switch and checks on the destination that no write was
//! lost or went stale. A link cut after the switch ends the destination's VM with a
//! clear error, and the source keeps the VM paused with everything, able to run on.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::migrating::{assert_generations_whole, assert_migrated, destination, guest_pause_ms, Source};
use common::{outcome, root_and_kvm, RunOutcome, ScratchDir};
use serde_json::Value;

/// One migration test at a time: each runs two VMs whose vCPUs spin.
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
    let steps = ["--steps", "fill,generations", "--rate", "10000", "--duration-ms", ms, "--stall-us", "200"];
    ["--vcpus", vcpus, "-m", memory].iter().chain(&steps).map(|s| s.to_string()).collect()
}

/// A source whose guest has filled its memory (the process holds 60 MiB of its 64) and
/// is rewriting it, so the post-copy has pages to move, the guest writes them across
/// the switch, and its first stall on the destination is the switch-over.
fn start_source(dir: &Path, name: &str, vcpus: &str, memory: &str, ms: &str) -> Source {
    let source = start_filled(dir, name, &workload(vcpus, memory, ms), 60 << 10);
    std::thread::sleep(Duration::from_millis(200));
    source
}

/// A source started with `args`, once its process holds `rss_kib` (anon and shmem; not
/// hugetlb, which VmRSS does not count).
fn start_filled(dir: &Path, name: &str, args: &[String], rss_kib_wanted: u64) -> Source {
    let source = Source::start(dir, name, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let started = Instant::now();
    let status = format!("/proc/{}/status", source.child.id());
    loop {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        let rss_kib: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        if rss_kib >= rss_kib_wanted {
            return source;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the guest never filled its memory: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child process at most `limit`, killing it after that (a hang fails).
fn wait_bounded(mut child: std::process::Child, limit: Duration, what: &str) -> RunOutcome {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} did not end within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    outcome(child.wait_with_output().unwrap())
}

/// A `ctl migrate --wait` that failed panics with what the destination said too (its
/// VM may be the one that ended the migration).
fn migrated_or_explain(
    name: &str,
    (code, result, stderr): (i32, Value, String),
    dest: std::process::Child,
) -> std::process::Child {
    if code != 0 {
        let dest = wait_bounded(dest, Duration::from_secs(60), "the destination after a failed migration");
        panic!(
            "{name}: ctl migrate failed: {stderr} {result}\ndestination ({}): {}\n{}",
            dest.code, dest.stdout, dest.stderr
        );
    }
    dest
}

/// Both ends after a migration in `mode` that completed: the source migrated mid-step,
/// the destination found every generation and every page of the post-copy table, both
/// ends agree on that table's size; the metrics of both ends.
fn assert_handover_whole(dest: &RunOutcome, source: &RunOutcome, mode: &str, preempt: bool) -> (Value, Value) {
    let sm = assert_migrated(source);
    assert_generations_whole(dest);
    let dm = dest.report["migration"].clone();
    assert_eq!(dm["role"], "destination", "{dm}");
    assert_eq!(dm["status"], "completed", "{dm}");
    assert_eq!(dm["mode"], mode, "{dm}");
    assert_eq!(sm["mode"], mode, "{sm}");
    assert_eq!(dm["postcopy-preempt"], preempt, "{dm}");
    assert_eq!(dm["postcopy-missing"], 0, "every page of the source's table is in: {dm}");
    assert_eq!(dm["postcopy-table-pages"], sm["postcopy-table-pages"], "{dm}\n{sm}");
    let histogram: u64 = dm["postcopy-latency-us"].as_array().unwrap().iter().map(|b| b[1].as_u64().unwrap()).sum();
    assert_eq!(histogram, dm["postcopy-faults"].as_u64().unwrap(), "{dm}");
    (dm, sm)
}

/// Both ends after a post-copy that completed: as [`assert_handover_whole`], and both
/// counted the same page requests, and the vCPUs' waits add up.
fn assert_postcopy_whole(dest: &RunOutcome, source: &RunOutcome, preempt: bool, vcpus: usize) -> (String, u64) {
    let (dm, sm) = assert_handover_whole(dest, source, "postcopy", preempt);
    // The guest kept writing its pages on the destination: it faulted on some it had
    // not got yet, and each became one request the source answered.
    let requests = dm["postcopy-requests"].as_u64().unwrap();
    assert!(requests > 0, "{dm}");
    // The source counts the requests it read before it ended; one sent while the source
    // was finishing (its page already on the way) may be in flight then: at most one per
    // waiting thread.
    let answered = sm["postcopy-requests"].as_u64().unwrap();
    assert!(answered <= requests && requests - answered <= vcpus as u64 + 1, "both ends count the requests: {sm}");
    // (A fault whose page was invalidated while it came faults again: one more request.)
    assert!(dm["postcopy-faults"].as_u64().unwrap() > 0, "{dm}");
    assert!(sm["postcopy-bytes"].as_u64().unwrap() > 0 && sm["downtime"].as_f64().unwrap() > 0.0, "{sm}");
    // The downtime carried no memory: only the page table and the state.
    assert!(sm["downtime-bytes"].as_u64().unwrap() < sm["postcopy-bytes"].as_u64().unwrap(), "{sm}");
    // Blocktime per vCPU: the faults name their threads, and vCPU threads waited (the
    // guest's own writes faulted); no vCPU waited longer than all faults together, and
    // the whole guest stood no longer than its least blocked vCPU.
    let per_vcpu: Vec<f64> =
        dm["postcopy-vcpu-blocktime"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(per_vcpu.len(), vcpus, "{dm}");
    assert!(per_vcpu.iter().sum::<f64>() > 0.0, "vCPU threads were not told apart: {dm}");
    let fault_wait = dm["postcopy-fault-wait"].as_f64().unwrap();
    assert!(per_vcpu.iter().all(|&b| b <= fault_wait + 1e-6), "{dm}");
    let all = dm["postcopy-blocktime"].as_f64().unwrap();
    assert!(per_vcpu.iter().all(|&b| all <= b + 1e-6), "{dm}");
    let blocktime = format!("blocktime {all:.1} ms (per vCPU {per_vcpu:.1?}, all faults {fault_wait:.1})");
    (blocktime, requests)
}

#[test]
fn postcopy_over_unix_and_tcp_on_1_and_2_vcpus_anon_and_memfd_loses_no_write() {
    if !root_and_kvm("post-copy migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-postcopy");
    let cases = [
        ("1", "unix", "size=64M", true),
        ("2", "tcp", "size=64M,backend=memfd", true),
        ("2", "unix", "size=64M,backend=memfd", false),
        ("1", "tcp", "size=64M", false),
    ];
    for (vcpus, transport, memory, preempt) in cases {
        let name = format!("{vcpus}-{transport}-{}", if preempt { "preempt" } else { "main" });
        let uri = match transport {
            "unix" => format!("unix:{}", scratch.0.join(format!("in-{name}.sock")).display()),
            _ => format!("tcp:127.0.0.1:{}", free_port()),
        };
        let source = start_source(&scratch.0, &format!("src-{name}"), vcpus, memory, "4000");
        let dest = destination(&uri);
        let preempt_arg = if preempt { "true" } else { "false" };
        let migrated =
            source.ctl(&["migrate", &uri, "--mode", "postcopy", "--postcopy-preempt", preempt_arg, "--wait"]);
        let dest = migrated_or_explain(&name, migrated, dest);
        let source = wait_bounded(source.child, Duration::from_secs(120), "the source");
        let dest = wait_bounded(dest, Duration::from_secs(120), "the destination");
        let backend = if memory.contains("memfd") { "memfd" } else { "anon" };
        assert_eq!(dest.report["backends"], serde_json::json!([backend]), "{}", dest.stdout);
        let (blocktime, requests) = assert_postcopy_whole(&dest, &source, preempt, vcpus.parse().unwrap());
        let m = &source.report["migration"];
        eprintln!(
            "{name} ({backend}): downtime {:.1} ms (the guest saw {:?} ms), total {:.0} ms, {requests} requests, {blocktime}, {} MiB",
            m["downtime"].as_f64().unwrap(),
            guest_pause_ms(&dest),
            m["total-time"].as_f64().unwrap(),
            m["transferred"].as_u64().unwrap() >> 20
        );
    }
}

/// Hybrid: pre-copy rounds, then post-copy for what the guest dirtied in the last one.
/// A downtime limit of 0 never converges, so the switch comes after the rounds asked
/// for and the post-copy table holds the pages dirtied since their last copy, which the
/// destination must evict from what the rounds brought: a stale copy left in place
/// would show as a page at an old generation. A limit that converges at once ends like
/// pre-copy, with an empty table.
#[test]
fn hybrid_switches_to_postcopy_after_its_rounds_and_leaves_no_stale_page() {
    if !root_and_kvm("post-copy migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-hybrid");
    // 256 MiB: one pass of `generations` over it takes 6.5 s at 10k pages/s, longer
    // than the step, so the pages written just before the switch (the table) are not
    // written again on the destination, and its final check sees what the migration
    // left in them.
    let cases = [
        ("2", "unix", "size=256M,backend=memfd", true, "0", "2"),
        ("1", "tcp", "size=256M", false, "0", "1"),
        ("1", "unix", "size=256M", true, "1000", "3"),
    ];
    for (vcpus, transport, memory, preempt, downtime, after) in cases {
        let converges = downtime != "0";
        let name = format!("{vcpus}-{transport}-{}-{after}", if preempt { "preempt" } else { "main" });
        let uri = match transport {
            "unix" => format!("unix:{}", scratch.0.join(format!("in-{name}.sock")).display()),
            _ => format!("tcp:127.0.0.1:{}", free_port()),
        };
        // Filled (the guest holds 240 MiB), then a moment into the paced rewriting.
        let source = start_filled(&scratch.0, &format!("src-{name}"), &workload(vcpus, memory, "5000"), 240 << 10);
        std::thread::sleep(Duration::from_millis(300));
        let dest = destination(&uri);
        let preempt_arg = if preempt { "true" } else { "false" };
        let migrated = source.ctl(&[
            "migrate",
            &uri,
            "--mode",
            "hybrid",
            "--downtime-ms",
            downtime,
            "--postcopy-after-rounds",
            after,
            "--postcopy-preempt",
            preempt_arg,
            "--wait",
        ]);
        let dest = migrated_or_explain(&name, migrated, dest);
        let source = wait_bounded(source.child, Duration::from_secs(120), "the source");
        let dest = wait_bounded(dest, Duration::from_secs(120), "the destination");
        let (dm, sm) = assert_handover_whole(&dest, &source, "hybrid", preempt);
        assert_eq!(sm["converged"], converges, "{sm}");
        let rounds = sm["rounds"].as_u64().unwrap();
        match converges {
            true => assert_eq!(rounds, 1, "a limit met at the first harvest: {sm}"),
            false => assert_eq!(rounds, after.parse::<u64>().unwrap() + 1, "round 0 and the rounds asked for: {sm}"),
        }
        assert_eq!(dm["rounds"], rounds, "{dm}");
        let table = sm["postcopy-table-pages"].as_u64().unwrap();
        match converges {
            // The last dirty pages went in the downtime, as in pre-copy.
            true => assert_eq!(table, 0, "{sm}"),
            // The guest dirtied pages at 10k pages/s through the last round.
            false => assert!(table > 0, "{sm}"),
        }
        // The rounds carried the memory (the guest filled 40 MiB before).
        assert!(sm["precopy-bytes"].as_u64().unwrap() > 32 << 20, "{sm}");
        eprintln!(
            "hybrid {name}: {rounds} rounds, {table} pages by post-copy ({} requests), downtime {:.1} ms (the guest saw {:?} ms), total {:.0} ms, {} MiB",
            dm["postcopy-requests"],
            sm["downtime"].as_f64().unwrap(),
            guest_pause_ms(&dest),
            sm["total-time"].as_f64().unwrap(),
            sm["transferred"].as_u64().unwrap() >> 20
        );
    }
}

#[test]
fn a_vm_with_a_hugetlb_zone_moves_by_postcopy_in_2_mib_pages() {
    if !root_and_kvm("post-copy migration tests") {
        return;
    }
    let _one = exclusive();
    // 16 huge pages at each end.
    let Some(_pool) = common::HugepagePool::reserve(32) else { return };
    let scratch = ScratchDir::new("migrate-postcopy-hugetlb");
    let uri = format!("unix:{}", scratch.0.join("in.sock").display());
    let mut args = workload("2", "size=16M", "4000");
    args.extend(["-m".to_string(), "size=32M,backend=hugetlb".to_string()]);
    let source = start_filled(&scratch.0, "src", &args, 12 << 10);
    let dest = destination(&uri);
    let dest = migrated_or_explain("hugetlb", source.ctl(&["migrate", &uri, "--mode", "postcopy", "--wait"]), dest);
    let source = wait_bounded(source.child, Duration::from_secs(120), "the source");
    let dest = wait_bounded(dest, Duration::from_secs(120), "the destination");
    assert_eq!(dest.report["backends"], serde_json::json!(["anon", "hugetlb"]));
    assert_postcopy_whole(&dest, &source, true, 2);
    assert_eq!(source.report["migration"]["page-size"], 2 << 20);
}

/// Forwards each connection made to `listen` to `target` (the main one first, then
/// the preempt channel); once `cut_at` bytes went forward on the first, every
/// connection is cut both ways. Returns whether the cut happened.
fn cutting_relay(listen: PathBuf, target: PathBuf, cut_at: u64) -> JoinHandle<bool> {
    let listener = UnixListener::bind(&listen).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let cut = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let mut streams: Vec<UnixStream> = Vec::new();
        let mut pumps = Vec::new();
        let started = Instant::now();
        while !cut.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(60) {
            match listener.accept() {
                Ok((from, _)) => {
                    from.set_nonblocking(false).unwrap();
                    let Ok(to) = UnixStream::connect(&target) else { break };
                    let first = streams.is_empty();
                    streams.push(from.try_clone().unwrap());
                    streams.push(to.try_clone().unwrap());
                    for (mut a, mut b, count) in
                        [(from.try_clone().unwrap(), to.try_clone().unwrap(), first), (to, from, false)]
                    {
                        let (cut, forwarded) = (cut.clone(), forwarded.clone());
                        pumps.push(std::thread::spawn(move || {
                            let mut buf = vec![0u8; 64 << 10];
                            loop {
                                let n = match a.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                if b.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                if count && forwarded.fetch_add(n as u64, Ordering::SeqCst) + n as u64 >= cut_at {
                                    cut.store(true, Ordering::SeqCst);
                                    break;
                                }
                            }
                            let _ = b.shutdown(std::net::Shutdown::Write);
                        }));
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        let was_cut = cut.load(Ordering::SeqCst);
        for s in &streams {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for p in pumps {
            let _ = p.join();
        }
        was_cut
    })
}

#[test]
fn a_link_cut_after_the_switch_ends_the_destination_clearly_and_the_source_keeps_the_vm() {
    if !root_and_kvm("post-copy migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-postcopy-cut");
    let source = start_source(&scratch.0, "src", "1", "size=64M", "8000");
    // Cut before the switch-over (inside the configuration): the source resumes, the
    // destination never ran.
    let early = scratch.0.join("early.sock");
    let dest = destination(&format!("unix:{}", early.display()));
    let relayed_early = scratch.0.join("relay-early.sock");
    let relay = cutting_relay(relayed_early.clone(), early, 1000);
    let (code, result, _) =
        source.ctl(&["migrate", &format!("unix:{}", relayed_early.display()), "--mode", "postcopy", "--wait"]);
    assert_ne!(code, 0, "the migration cannot complete over a cut link: {result}");
    assert!(relay.join().unwrap(), "the relay never cut the link");
    let dest = wait_bounded(dest, Duration::from_secs(60), "the destination after an early cut");
    assert_eq!(dest.code, 2, "the destination refused and started nothing: {}", dest.stderr);
    source.assert_running("a cut before the switch-over");
    let target = scratch.0.join("in.sock");
    let dest = destination(&format!("unix:{}", target.display()));
    let relayed = scratch.0.join("relay.sock");
    // The page table and state are ~20 KiB; 4 MiB in, the background push is under way.
    let relay = cutting_relay(relayed.clone(), target, 4 << 20);
    let (code, result, _) =
        source.ctl(&["migrate", &format!("unix:{}", relayed.display()), "--mode", "postcopy", "--wait"]);
    assert_ne!(code, 0, "the migration cannot complete over a cut link: {result}");
    assert!(relay.join().unwrap(), "the relay never cut the link");
    // The destination's VM ends with the reason.
    let dest = wait_bounded(dest, Duration::from_secs(90), "the destination after the cut");
    assert_ne!(dest.code, 0, "{}", dest.stdout);
    assert_eq!(dest.report["exit"]["kind"], "fault-engine-failed", "{}", dest.stdout);
    let text = format!("{}{}", dest.stdout, dest.stderr);
    assert!(text.contains("post-copy migration failed") && text.contains("source keeps the VM"), "{text}");
    // The source says what happened and keeps the VM paused, memory and state intact.
    let (_, status, _) = source.ctl(&["migrate", "status"]);
    assert_eq!(status["status"], "failed", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("switch-over had happened") && error.contains("paused"), "{error}");
    assert_eq!(source.ctl(&["status"]).1["state"], "paused");
    // Resumed, it runs on from the switch-over and its pages are all there.
    let (code, _, stderr) = source.ctl(&["resume"]);
    assert_eq!(code, 0, "{stderr}");
    let source = wait_bounded(source.child, Duration::from_secs(90), "the resumed source");
    assert_generations_whole(&source);
}
