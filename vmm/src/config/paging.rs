//! Paging settings: how each zone's pages get populated, the fault engine's options, and
//! the chaos driver.

use serde::{Deserialize, Serialize};

use crate::smmu::engine_tuning::EngineTuning;

/// How a zone's pages get populated (see `smmu`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PagingMode {
    /// No userfaultfd: the kernel fills a page on its first touch.
    #[default]
    Kernel,
    /// Populate the whole zone before the guest starts (MADV_POPULATE_WRITE).
    Prefault,
    /// userfaultfd MISSING faults, resolved by the fault engine (COPY / ZEROPAGE).
    UffdMissing,
    /// userfaultfd MINOR faults (memfd, file on tmpfs, hugetlb): the page cache is filled
    /// up front and the engine maps pages with CONTINUE.
    UffdMinor,
}

impl PagingMode {
    /// The mode's name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            PagingMode::Kernel => "kernel",
            PagingMode::Prefault => "prefault",
            PagingMode::UffdMissing => "uffd-missing",
            PagingMode::UffdMinor => "uffd-minor",
        }
    }

    /// Parses a mode name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "kernel" => PagingMode::Kernel,
            "prefault" => PagingMode::Prefault,
            "uffd-missing" | "missing" => PagingMode::UffdMissing,
            "uffd-minor" | "minor" => PagingMode::UffdMinor,
            _ => return None,
        })
    }

    /// Whether the fault engine resolves this zone's first touches.
    pub fn uses_userfaultfd(self) -> bool {
        matches!(self, PagingMode::UffdMissing | PagingMode::UffdMinor)
    }
}

/// Settings of the userfaultfd fault engine (used when any zone pages through it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultEngineOptions {
    /// Handler threads.
    pub handler_threads: usize,
    /// Fault messages read per `read()`.
    pub batch: usize,
    /// Handler design and fast paths (`faultline run --fault-engine`, `[fault_engine.tuning]`).
    pub tuning: EngineTuning,
}

impl Default for FaultEngineOptions {
    fn default() -> Self {
        FaultEngineOptions { handler_threads: 2, batch: 64, tuning: EngineTuning::default() }
    }
}

/// The chaos driver: a VMM thread that discards, write-protects and unprotects random
/// ranges of the workload region while the guest runs (pair with the guest's `churn`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChaosConfig {
    /// Operations to perform (the driver stops earlier if the guest ends).
    pub events: u64,
    /// Largest range of one operation, in 4 KiB pages (hugetlb zones round to 2 MiB).
    pub max_pages: u64,
    /// Seed of the random ranges.
    pub seed: u64,
    /// Pause between operations, microseconds.
    pub interval_us: u64,
    /// Discard ranges too (false: only write-protect and unprotect, so the guest's data
    /// stays; e.g. to race write-protect faults against a balloon).
    pub discards: bool,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig { events: 10_000, max_pages: 64, seed: 7, interval_us: 50, discards: true }
    }
}
