//! What a workload step runs with: the [`Context`] every CPU shares (set once by the BSP),
//! a CPU's [`CpuResult`] of one step, and the pattern every step writes and checks.
//!
//! The steps themselves ([`crate::workloads`], [`crate::balloon_step`]) build on this
//! module and not on one another, so the step runner and the balloon step import no
//! cycle.

use faultline_abi::{pattern_word, PAGE_SIZE, VERIFY_REPORT_MAX};

use crate::cmdline::Config;
use crate::histogram::Histogram;
use crate::region::Region;
use crate::smp::Shared;

/// u64 words per page.
pub const WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;

/// What every CPU needs to run the steps; set by the BSP before it starts the APs.
pub struct Context {
    /// The command line's choices.
    pub config: Config,
    /// The workload region.
    pub region: Region,
    /// TSC frequency (0 = unknown).
    pub tsc_khz: u64,
    /// The kernel command line (for device tokens such as `virtio_mmio.device=`).
    pub cmdline: &'static str,
}

static CONTEXT: Shared<Option<Context>> = Shared::new(None);

/// Publishes the context. BSP only, before any AP starts.
pub fn set_context(context: Context) {
    // SAFETY: only the BSP runs; APs read the context only after they are started.
    unsafe { *CONTEXT.get() = Some(context) };
}

/// The context set by [`set_context`].
pub fn context() -> &'static Context {
    // SAFETY: written once before any reader exists, never written again.
    unsafe { (*CONTEXT.get()).as_ref() }.expect("the step context is not set")
}

/// A word of the region that did not hold the pattern.
#[derive(Clone, Copy, Default)]
pub struct Mismatch {
    /// Address of the word.
    pub gpa: u64,
    /// What it should hold.
    pub expected: u64,
    /// What it held.
    pub found: u64,
}

/// One CPU's result of one step (or touch pass).
#[derive(Clone, Copy)]
pub struct CpuResult {
    /// TSC cycles the step took on this CPU.
    pub(crate) cycles: u64,
    /// Pages the step covered.
    pub pages: u64,
    /// Words that did not hold what they should.
    pub(crate) mismatches: u64,
    /// The first few of them, for the verify line.
    pub(crate) first: [Mismatch; VERIFY_REPORT_MAX],
    /// How many of `first` are set.
    pub(crate) first_count: usize,
    /// Per-touch latency (touch passes).
    pub(crate) histogram: Histogram,
    /// `churn`: pages found entirely zero (discarded since the previous round).
    pub(crate) zeroed_pages: u64,
    /// `churn`, `generations`: complete rounds.
    pub(crate) rounds: u64,
    /// `generations`: pages holding another generation than their cursor says.
    pub(crate) bad_pages: u64,
    /// `dirty`, `generations`, `idle`: the longest the CPU's clock moved between two
    /// looks, µs (see [`crate::stall`]).
    pub(crate) max_stall_us: u64,
}

impl CpuResult {
    /// An empty result.
    pub(crate) const fn new() -> Self {
        CpuResult {
            cycles: 0,
            pages: 0,
            mismatches: 0,
            first: [Mismatch { gpa: 0, expected: 0, found: 0 }; VERIFY_REPORT_MAX],
            first_count: 0,
            histogram: Histogram::new(),
            zeroed_pages: 0,
            rounds: 0,
            bad_pages: 0,
            max_stall_us: 0,
        }
    }

    /// Counts a mismatch (and keeps the first few for the verify line).
    pub fn note_mismatch(&mut self, mismatch: Mismatch) {
        if self.first_count < VERIFY_REPORT_MAX {
            self.first[self.first_count] = mismatch;
            self.first_count += 1;
        }
        self.mismatches += 1;
    }
}

/// Writes the pattern into every word of the page at `gpa`.
pub fn write_pattern_page(seed: u64, gpa: u64) {
    let page = gpa as *mut u64;
    for word in 0..WORDS_PER_PAGE {
        // SAFETY: `gpa` is a page of the workload region: identity-mapped RAM that only
        // this CPU writes during this step.
        unsafe { page.add(word as usize).write(pattern_word(seed, gpa, word)) };
    }
}
