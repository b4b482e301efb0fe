//! The guest's configuration, parsed from the kernel command line (`abi::cmdline` keys).
//!
//! Unknown tokens are ignored (a VMM may add its own); a known key with a bad value is an
//! error that names the key and the value.

use core::fmt;

use faultline_abi::{cmdline as key, cmdline_value, parse_size, Step, MAX_CPUS};

/// Most steps one command line may name.
pub const MAX_STEPS: usize = 32;

/// A step the guest runs: an ABI step, or a hidden test step.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum GuestStep {
    /// One of the ABI's steps.
    Abi(Step),
    /// Hidden test step `x-ud2`: executes `ud2` in ring 3 to prove exception reports work.
    Ring3Exception,
}

/// The name of the hidden ring-3 exception step.
const RING3_EXCEPTION_STEP: &str = "x-ud2";

impl GuestStep {
    fn parse(name: &str) -> Option<Self> {
        match name {
            RING3_EXCEPTION_STEP => Some(Self::Ring3Exception),
            _ => Step::parse(name).map(Self::Abi),
        }
    }

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Abi(step) => step.name(),
            Self::Ring3Exception => RING3_EXCEPTION_STEP,
        }
    }
}

/// Order of `touch` accesses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TouchPattern {
    /// Page 0, 1, 2, ...
    Sequential,
    /// A seeded permutation of all pages.
    Random,
    /// Every `stride`-th page, then the next residue, until every page is touched.
    Strided,
}

/// Kind of `touch` access.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read one u64 per page.
    Read,
    /// Write one u64 per page (the page's own pattern word 0).
    Write,
}

/// Everything the command line chooses.
#[derive(Clone, Copy)]
pub struct Config {
    /// CPUs to use (APIC IDs 0..cpus).
    pub cpus: u32,
    /// `fl.tsc_khz`, if given.
    pub tsc_khz: Option<u64>,
    steps: [GuestStep; MAX_STEPS],
    step_count: usize,
    /// `fl.size` in bytes; `None` = all.
    pub size_bytes: Option<u64>,
    /// `fl.region_stride`: the region samples every Nth page of each RAM range (1: all).
    pub region_stride_pages: u64,
    /// Pattern and permutation seed.
    pub seed: u64,
    /// `touch` order.
    pub pattern: TouchPattern,
    /// Stride of `strided`, in pages.
    pub stride_pages: u64,
    /// `touch` access kind.
    pub access: Access,
    /// Passes of `touch`.
    pub passes: u32,
    /// Pages per second `dirty` rewrites (all CPUs together).
    pub rate_pages_per_s: u64,
    /// Duration of `dirty` and `idle` (and of `balloon` when `balloon_changes` is 0).
    pub duration_ms: u64,
    /// `churn` runs until the VMM asks it to stop instead of for `duration_ms`.
    pub until_stopped: bool,
    /// Pattern period in pages (0: every page its own pattern).
    pub dup_pages: u64,
    /// `balloon`: changes of the host's target to follow before the step ends (0 = until
    /// `duration_ms`).
    pub balloon_changes: u64,
    /// `balloon`: pages at the bottom of the region sent by free page reporting.
    pub balloon_report_pages: u64,
    /// `balloon`: how long to wait for `balloon_changes` changes before failing.
    pub balloon_timeout_ms: u64,
    /// Paced steps print a `stall` line for a gap of this many µs or more (0: never).
    pub stall_us: u64,
}

/// A key whose value could not be used.
#[derive(Debug)]
pub struct BadValue {
    /// The key.
    pub key: &'static str,
    /// Its value as written.
    pub value: &'static str,
    /// What was wrong.
    pub problem: &'static str,
}

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} '{}'", self.key, self.problem, self.value)
    }
}

impl Config {
    /// The steps, in order.
    pub fn steps(&self) -> &[GuestStep] {
        &self.steps[..self.step_count]
    }

    /// Parses the command line.
    pub fn parse(line: &'static str) -> Result<Config, BadValue> {
        let mut config = Config {
            cpus: 1,
            tsc_khz: None,
            steps: [GuestStep::Abi(Step::Fill); MAX_STEPS],
            step_count: 0,
            size_bytes: None,
            region_stride_pages: 1,
            seed: 1,
            pattern: TouchPattern::Sequential,
            stride_pages: 16,
            access: Access::Write,
            passes: 2,
            rate_pages_per_s: 10_000,
            duration_ms: 1000,
            until_stopped: false,
            dup_pages: 0,
            balloon_changes: 0,
            balloon_report_pages: 512,
            balloon_timeout_ms: 120_000,
            stall_us: 0,
        };
        let bad = |key, value, problem| BadValue { key, value, problem };
        if let Some(v) = cmdline_value(line, key::CPUS) {
            config.cpus = parse_number(v).filter(|n| (1..=MAX_CPUS as u64).contains(n)).ok_or(bad(
                key::CPUS,
                v,
                "must be 1 to 64, cannot use",
            ))? as u32;
        }
        if let Some(v) = cmdline_value(line, key::TSC_KHZ) {
            config.tsc_khz = Some(parse_number(v).ok_or(bad(key::TSC_KHZ, v, "cannot parse"))?);
        }
        let steps = cmdline_value(line, key::STEPS).unwrap_or("fill,verify");
        for name in steps.split(',').filter(|name| !name.is_empty()) {
            let step = GuestStep::parse(name).ok_or(bad(key::STEPS, name, "unknown step"))?;
            if config.step_count == MAX_STEPS {
                return Err(bad(key::STEPS, steps, "more than 32 steps in"));
            }
            config.steps[config.step_count] = step;
            config.step_count += 1;
        }
        if let Some(v) = cmdline_value(line, key::SIZE) {
            if v != "all" {
                config.size_bytes = Some(parse_size(v).ok_or(bad(key::SIZE, v, "cannot parse"))?);
            }
        }
        if let Some(v) = cmdline_value(line, key::REGION_STRIDE_PAGES) {
            config.region_stride_pages = parse_number(v).filter(|&n| n >= 1).ok_or(bad(
                key::REGION_STRIDE_PAGES,
                v,
                "must be at least 1, cannot use",
            ))?;
        }
        if let Some(v) = cmdline_value(line, key::SEED) {
            config.seed = parse_number(v).ok_or(bad(key::SEED, v, "cannot parse"))?;
        }
        if let Some(v) = cmdline_value(line, key::PATTERN) {
            config.pattern = match v {
                "sequential" => TouchPattern::Sequential,
                "random" => TouchPattern::Random,
                "strided" => TouchPattern::Strided,
                _ => return Err(bad(key::PATTERN, v, "expected sequential, random or strided, got")),
            };
        }
        if let Some(v) = cmdline_value(line, key::STRIDE_PAGES) {
            config.stride_pages =
                parse_number(v).filter(|&n| n >= 1).ok_or(bad(key::STRIDE_PAGES, v, "cannot parse"))?;
        }
        if let Some(v) = cmdline_value(line, key::ACCESS) {
            config.access = match v {
                "read" => Access::Read,
                "write" => Access::Write,
                _ => return Err(bad(key::ACCESS, v, "expected read or write, got")),
            };
        }
        if let Some(v) = cmdline_value(line, key::PASSES) {
            config.passes = parse_number(v).filter(|n| (1..=u64::from(u32::MAX)).contains(n)).ok_or(bad(
                key::PASSES,
                v,
                "cannot parse",
            ))? as u32;
        }
        if let Some(v) = cmdline_value(line, key::RATE_PAGES_PER_S) {
            config.rate_pages_per_s = parse_number(v).ok_or(bad(key::RATE_PAGES_PER_S, v, "cannot parse"))?;
        }
        if let Some(v) = cmdline_value(line, key::DURATION_MS) {
            config.duration_ms = parse_number(v).ok_or(bad(key::DURATION_MS, v, "cannot parse"))?;
        }
        if let Some(v) = cmdline_value(line, key::UNTIL_STOPPED) {
            config.until_stopped =
                parse_number(v).filter(|&n| n <= 1).ok_or(bad(key::UNTIL_STOPPED, v, "expected 0 or 1, got"))? == 1;
        }
        if let Some(v) = cmdline_value(line, key::DUP_PAGES) {
            config.dup_pages = parse_number(v).ok_or(bad(key::DUP_PAGES, v, "cannot parse"))?;
        }
        if let Some(v) = cmdline_value(line, key::BALLOON_CHANGES) {
            config.balloon_changes = parse_number(v).ok_or(bad(key::BALLOON_CHANGES, v, "cannot parse"))?;
        }
        if let Some(v) = cmdline_value(line, key::BALLOON_REPORT_PAGES) {
            config.balloon_report_pages = parse_number(v).ok_or(bad(key::BALLOON_REPORT_PAGES, v, "cannot parse"))?;
        }
        if let Some(v) = cmdline_value(line, key::BALLOON_TIMEOUT_MS) {
            config.balloon_timeout_ms = parse_number(v).ok_or(bad(key::BALLOON_TIMEOUT_MS, v, "cannot parse"))?;
        }
        if let Some(v) = cmdline_value(line, key::STALL_US) {
            config.stall_us = parse_number(v).ok_or(bad(key::STALL_US, v, "cannot parse"))?;
        }
        Ok(config)
    }
}

/// A decimal or `0x` hexadecimal number.
fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}
