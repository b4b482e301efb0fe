//! Pre-copy driven by KVM's dirty ring (`faultline run --dirty-ring N`, `ctl migrate
//! --dirty-tracking ring`) and auto-converge (`--auto-converge`), on the real /dev/kvm
//! between two `faultline` processes. The guest rewrites its pages generation after
//! generation while it moves (`generations`) and checks on the destination that no
//! write was lost or went stale.

mod common;

use common::migrating::{assert_generations_whole, assert_migrated, destination, Source};
use common::{outcome, root_and_kvm, ScratchDir};

/// One migration test at a time: each runs two VMs whose vCPUs spin.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// KVM's smallest ring (one page of entries, some of them held in reserve): at 10k
/// pages/s it fills many times a second, so the vCPU threads must serve
/// `KVM_EXIT_DIRTY_RING_FULL` while the migration harvests.
const SMALL_RING: &str = "256";

#[test]
fn precopy_by_the_dirty_ring_on_1_and_2_vcpus_loses_no_write() {
    if !root_and_kvm("live migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-ring");
    for vcpus in ["1", "2"] {
        let uri = format!("unix:{}", scratch.0.join(format!("in-{vcpus}.sock")).display());
        let args = [
            "--vcpus",
            vcpus,
            "-m",
            "size=64M",
            "--steps",
            "fill,generations",
            "--rate",
            "10000",
            "--duration-ms",
            "6000",
            "--dirty-ring",
            SMALL_RING,
        ];
        let source = Source::start(&scratch.0, &format!("src-{vcpus}"), &args);
        // A ring VM has no dirty log beside the ring on this host: asking for the log is
        // refused before anything is sent, and the VM runs on.
        let (code, _, stderr) = source.ctl(&["migrate", &uri, "--dirty-tracking", "log"]);
        assert_ne!(code, 0, "the log was accepted on a ring VM");
        assert!(stderr.contains("--dirty-tracking ring"), "{stderr}");
        source.assert_running("a refused --dirty-tracking log");

        let dest = destination(&uri);
        let (code, result, stderr) = source.ctl(&["migrate", &uri, "--dirty-tracking", "ring", "--wait"]);
        assert_eq!(code, 0, "{vcpus} vCPUs: {stderr} {result}");
        let (source, dest) = (source.wait(), outcome(dest.wait_with_output().unwrap()));
        let m = assert_migrated(&source);
        let generations = assert_generations_whole(&dest);
        assert!(generations["rounds"].as_u64().unwrap() >= 1, "{generations}");
        assert_eq!(m["dirty-tracking"], "ring", "{m}");
        assert!(m["dirty-sync-count"].as_u64().unwrap() >= 2, "{m}");
        assert!(m["dirty-ring-full-exits"].as_u64().unwrap() > 0, "a {SMALL_RING}-entry ring never filled: {m}");
        assert_eq!(m["dirty-ring-overflows"], 0, "{m}");
        assert_eq!(m["transferred"], dest.report["migration"]["transferred"], "both ends count the same stream");
        eprintln!(
            "{vcpus} vCPU(s), ring of {SMALL_RING}: {} rounds, {} full-ring exits, {:.0} ms total, downtime {:.1} ms",
            m["rounds"],
            m["dirty-ring-full-exits"],
            m["total-time"].as_f64().unwrap(),
            m["downtime"].as_f64().unwrap()
        );
    }
}

/// A guest dirtying as fast as it can (far more than 64 MiB/s) its 32 MiB region, over a
/// link limited to 64 MiB/s, with a 50 ms downtime limit: every round finds the whole
/// region dirty again, so without auto-converge the round limit forces the stop-and-copy
/// (`converged: false`); with it the throttle rises until the rounds shrink under the
/// limit. Either way the destination finds every page at its generation.
#[test]
fn auto_converge_throttles_a_guest_that_outruns_the_link() {
    if !root_and_kvm("live migration tests") {
        return;
    }
    let _one = exclusive();
    let scratch = ScratchDir::new("migrate-converge");
    let args = [
        "--vcpus",
        "1",
        "-m",
        "size=40M",
        "--steps",
        "fill,generations",
        "--rate",
        "1000000",
        "--duration-ms",
        "15000",
    ];
    let link = ["--bandwidth", "64M", "--downtime-ms", "50"];
    for auto_converge in [false, true] {
        let uri = format!("unix:{}", scratch.0.join(format!("in-{auto_converge}.sock")).display());
        let source = Source::start(&scratch.0, &format!("src-{auto_converge}"), &args);
        if !auto_converge {
            // A VM started without --dirty-ring cannot be migrated by the ring.
            let (code, _, stderr) = source.ctl(&["migrate", &uri, "--dirty-tracking", "ring"]);
            assert_ne!(code, 0, "the ring was accepted on a VM without one");
            assert!(stderr.contains("--dirty-ring"), "{stderr}");
            source.assert_running("a refused --dirty-tracking ring");
        }
        let dest = destination(&uri);
        let mut migrate = vec!["migrate", uri.as_str(), "--wait"];
        migrate.extend(link);
        match auto_converge {
            true => migrate.extend(["--auto-converge", "--max-rounds", "25"]),
            false => migrate.extend(["--max-rounds", "5"]),
        }
        let (code, result, stderr) = source.ctl(&migrate);
        assert_eq!(code, 0, "auto-converge {auto_converge}: {stderr} {result}");
        let (source, dest) = (source.wait(), outcome(dest.wait_with_output().unwrap()));
        let m = assert_migrated(&source);
        assert_generations_whole(&dest);
        assert_eq!(m["dirty-tracking"], "log", "{m}");
        assert_eq!(m["converged"], auto_converge, "auto-converge {auto_converge}: {m}");
        let throttle = m["cpu-throttle-percentage"].as_u64().unwrap();
        match auto_converge {
            true => assert!(throttle >= 20, "{m}"),
            false => assert_eq!(throttle, 0, "{m}"),
        }
        eprintln!(
            "auto-converge {auto_converge}: {} rounds, converged {}, throttle {throttle} %, downtime {:.1} ms",
            m["rounds"],
            m["converged"],
            m["downtime"].as_f64().unwrap()
        );
    }
}
