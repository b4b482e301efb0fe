//! A fault engine whose page source fails (a memory image that cannot be read, a remote
//! peer that went away) ends the VM with that error: no vCPU is left waiting forever on a
//! fault nobody will resolve.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline::config::{Backend, ChaosConfig, PagingMode, VmConfig, Workload, ZoneConfig};
use faultline::exit::VmExit;
use faultline::smmu::page_source::{PageData, PageSource, PageSourceError};
use faultline::vmm::{run, RunOptions};

mod common;

/// Serves zero pages, then fails every request after `left` of them.
struct FailsAfter {
    left: AtomicU64,
}

impl PageSource for FailsAfter {
    fn read_page(&self, gpa: u64, _buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        if self.left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_err() {
            return Err(PageSourceError::Failed { gpa, reason: "the memory image server went away".into() });
        }
        Ok(PageData::Zero)
    }
}

#[test]
fn a_failing_page_source_ends_the_vm_with_its_error() {
    if !common::kvm_available() {
        return;
    }
    let zone = ZoneConfig { paging: PagingMode::UffdMissing, ..ZoneConfig::new(64 << 20, Backend::Anon) };
    let config = VmConfig { vcpus: 2, zones: vec![zone], ..VmConfig::default() };
    let timeout = Duration::from_secs(60);
    let mut options = RunOptions::new(Instant::now(), Some(timeout));
    // Enough for the kernel image and boot data, then the guest's fill hits the failure.
    options.page_source = Some(Arc::new(FailsAfter { left: AtomicU64::new(3000) }));
    let started = Instant::now();
    let report = run(&config, &options).expect("the run itself works");
    match &report.exit {
        VmExit::FaultEngineFailed { reason } => {
            assert!(reason.contains("the memory image server went away"), "{reason}")
        }
        other => panic!("expected the engine failure to end the VM, got {other:?}"),
    }
    assert!(started.elapsed() < timeout, "ended by the timeout, not by the failure");
    assert!(!report.success());
    let faults = report.faults.as_ref().expect("fault report");
    assert!(faults.engine_failure.as_ref().is_some_and(|e| e.contains("went away")), "{faults:?}");
    assert!(report.summary().contains("the fault engine failed"), "{}", report.summary());
}

#[test]
fn an_engine_that_dies_while_discards_run_still_ends_the_vm() {
    if !common::kvm_available() {
        return;
    }
    // The chaos thread discards back to back: with REMOVE events on, each MADV_DONTNEED
    // waits for a handler to read its event, so when the engine dies (early in the fill;
    // pages discarded before their first touch never reach the source) one may be
    // waiting. The engine must release it (unregister, then drain the events). How often
    // one is caught waiting is not under the test's control: without the drain the runs
    // here still ended, so this guards the end-to-end behaviour, not the drain itself.
    let zone = ZoneConfig { paging: PagingMode::UffdMissing, ..ZoneConfig::new(64 << 20, Backend::Anon) };
    let config = VmConfig {
        vcpus: 2,
        zones: vec![zone],
        workload: Workload { steps: vec!["fill".into(), "churn".into()], ..Workload::default() },
        chaos: Some(ChaosConfig { events: u64::MAX, interval_us: 0, ..ChaosConfig::default() }),
        ..VmConfig::default()
    };
    let timeout = Duration::from_secs(60);
    let mut options = RunOptions::new(Instant::now(), Some(timeout));
    options.page_source = Some(Arc::new(FailsAfter { left: AtomicU64::new(1_000) }));
    let started = Instant::now();
    let report = run(&config, &options).expect("the run itself works");
    assert!(matches!(&report.exit, VmExit::FaultEngineFailed { .. }), "{:?}", report.exit);
    assert!(started.elapsed() < timeout, "ended by the timeout, not by the failure");
    eprintln!("ended after {:?}: {}", started.elapsed(), report.summary());
    let chaos = report.chaos.expect("chaos report");
    assert!(chaos.discards > 0, "{chaos:?}");
}
