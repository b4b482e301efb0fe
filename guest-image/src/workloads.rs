//! The steps: fill, verify, touch, dirty, idle, churn, generations and the
//! fault-injection steps.
//!
//! Every step runs on all CPUs between two barriers ([`phase`]); each CPU handles its
//! contiguous share of the work and writes its own [`CpuResult`]; the BSP then merges the
//! results and prints the report lines. All of this runs in ring 3.

use core::fmt::Write;
use core::hint::spin_loop;
use core::ptr::addr_of_mut;

use faultline_abi::{
    churn_seed, generation_word, pattern_word, report, splitmix64, ExitStatus, Step, MAX_CPUS, REPORT_PREFIX,
    VERIFY_REPORT_MAX,
};

use crate::balloon_step;
use crate::boot;
use crate::cmdline::{Access, GuestStep, TouchPattern};
use crate::histogram::Histogram;
use crate::region::Region;
use crate::serial::Serial;
use crate::smp::{Shared, STEP_BARRIER};
use crate::stall::StallWatch;
pub use crate::step_context::{context, set_context, Context};
use crate::step_context::{write_pattern_page, CpuResult, Mismatch, WORDS_PER_PAGE};
use crate::tsc;

/// Per-CPU results: slot `cpu` is written only by that CPU between the two barriers of a
/// phase, and read only by the BSP after the second barrier.
static RESULTS: Shared<[CpuResult; MAX_CPUS]> = Shared::new([CpuResult::new(); MAX_CPUS]);
/// The BSP's merge of all CPUs' histograms.
static MERGED: Shared<Histogram> = Shared::new(Histogram::new());

/// Runs `work` on this CPU's result slot, between two barriers of all CPUs, and times it.
fn phase(cpus: u32, cpu: u32, work: impl FnOnce(&mut CpuResult)) {
    STEP_BARRIER.wait(cpus);
    // SAFETY: between the two barriers only this CPU touches slot `cpu`.
    let result = unsafe { &mut (*RESULTS.get())[cpu as usize] };
    result.cycles = 0;
    result.pages = 0;
    result.mismatches = 0;
    result.first_count = 0;
    result.zeroed_pages = 0;
    result.rounds = 0;
    result.bad_pages = 0;
    result.histogram.clear();
    let start = tsc::now();
    work(result);
    result.cycles = tsc::now() - start;
    STEP_BARRIER.wait(cpus);
}

/// All CPUs' results of the last phase. BSP only, after the phase's second barrier.
fn results(cpus: u32) -> &'static [CpuResult] {
    // SAFETY: every other CPU is waiting at the next barrier and writes nothing.
    unsafe { &(&*RESULTS.get())[..cpus as usize] }
}

/// Runs every step of the command line on CPU `cpu`; on the BSP also prints the reports.
/// Returns the exit status the steps earned (meaningful on the BSP).
pub fn run_steps(cpu: u32) -> ExitStatus {
    let context = context();
    let config = &context.config;
    let cpus = config.cpus;
    let mut status = ExitStatus::Success;
    for &step in config.steps() {
        match step {
            GuestStep::Abi(Step::Fill) => {
                phase(cpus, cpu, |result| fill(context, cpu, result));
                if cpu == 0 {
                    print_result(step, None, cpus);
                }
            }
            GuestStep::Abi(Step::Verify) => {
                phase(cpus, cpu, |result| verify(context, cpu, result));
                if cpu == 0 {
                    print_result(step, None, cpus);
                    if !print_verify(cpus) {
                        status = ExitStatus::VerifyFailed;
                    }
                }
            }
            GuestStep::Abi(Step::Touch) => {
                let permutation = Permutation::new(context.region.pages, config.seed);
                for pass in 1..=config.passes {
                    phase(cpus, cpu, |result| touch_pass(context, &permutation, cpu, result));
                    if cpu == 0 {
                        print_result(step, Some(pass), cpus);
                    }
                }
            }
            GuestStep::Abi(Step::Dirty) => {
                phase(cpus, cpu, |result| dirty(context, cpu, result));
                if cpu == 0 {
                    print_result(step, None, cpus);
                }
            }
            GuestStep::Abi(Step::Idle) => {
                phase(cpus, cpu, |result| idle(context, cpu, result));
                if cpu == 0 {
                    print_result(step, None, cpus);
                }
            }
            GuestStep::Abi(Step::Churn) => {
                phase(cpus, cpu, |result| churn(context, cpu, result));
                if cpu == 0 {
                    print_result(step, None, cpus);
                    if !print_verify(cpus) {
                        status = ExitStatus::VerifyFailed;
                    }
                }
            }
            GuestStep::Abi(Step::Generations) => {
                phase(cpus, cpu, |result| generations(context, cpu, result));
                if cpu == 0 {
                    print_result(step, None, cpus);
                    if !print_verify(cpus) {
                        status = ExitStatus::VerifyFailed;
                    }
                }
            }
            GuestStep::Abi(Step::Balloon) => {
                // The BSP drives the device alone; the APs wait at the phase's closing
                // barrier (the driver has one set of queues and is not shared).
                let mut balloon_status = ExitStatus::Success;
                phase(cpus, cpu, |result| {
                    if cpu == 0 {
                        balloon_status = balloon_step::run(context, result);
                    }
                });
                if cpu == 0 {
                    print_result(step, None, cpus);
                    // A device error already printed its error line; a verify line
                    // saying ok would mislead.
                    if balloon_status == ExitStatus::DeviceError {
                        status = balloon_status;
                    } else if !print_verify(cpus) || balloon_status != ExitStatus::Success {
                        status = ExitStatus::VerifyFailed;
                    }
                }
            }
            GuestStep::Abi(Step::TripleFault) => phase(cpus, cpu, |_| {
                if cpu == 0 {
                    boot::triple_fault();
                }
            }),
            GuestStep::Abi(Step::Cpl0Sse) => {
                phase(cpus, cpu, |_| {
                    if cpu == 0 {
                        boot::cpl0_sse();
                    }
                });
                if cpu == 0 {
                    print_result(step, None, cpus);
                }
            }
            GuestStep::Ring3Exception => phase(cpus, cpu, |_| {
                if cpu == 0 {
                    // SAFETY: ud2 raises #UD, which the ring-0 stub reports; it never returns.
                    unsafe { core::arch::asm!("ud2", options(noreturn, nostack)) }
                }
            }),
        }
    }
    status
}

/// Writes the pattern of the page at `key` into every word of the page at `gpa`.
fn write_keyed_page(seed: u64, gpa: u64, key: u64) {
    let page = gpa as *mut u64;
    for word in 0..WORDS_PER_PAGE {
        // SAFETY: `gpa` is a page of the workload region: identity-mapped RAM that only
        // this CPU writes during this step.
        unsafe { page.add(word as usize).write(pattern_word(seed, key, word)) };
    }
}

/// The page whose pattern page `index` (at `gpa`) holds: itself, or with `fl.dup_pages`
/// the page `index % dup_pages` (so the region holds duplicates).
fn pattern_key(context: &Context, index: u64, gpa: u64) -> u64 {
    match context.config.dup_pages {
        0 => gpa,
        period => context.region.gpa(index % period),
    }
}

fn fill(context: &Context, cpu: u32, result: &mut CpuResult) {
    let (first, end) = Region::share(context.region.pages, cpu, context.config.cpus);
    let seed = context.config.seed;
    context
        .region
        .for_each_page(first, end, |index, gpa| write_keyed_page(seed, gpa, pattern_key(context, index, gpa)));
    result.pages = end - first;
}

fn verify(context: &Context, cpu: u32, result: &mut CpuResult) {
    let (first, end) = Region::share(context.region.pages, cpu, context.config.cpus);
    let seed = context.config.seed;
    context.region.for_each_page(first, end, |index, gpa| {
        let page = gpa as *const u64;
        let key = pattern_key(context, index, gpa);
        for word in 0..WORDS_PER_PAGE {
            // SAFETY: a page of the workload region (identity-mapped RAM).
            let found = unsafe { page.add(word as usize).read_volatile() };
            let expected = pattern_word(seed, key, word);
            if found != expected {
                result.note_mismatch(Mismatch { gpa: gpa + word * 8, expected, found });
            }
        }
    });
    result.pages = end - first;
}

/// A seeded bijection on `0..2^bits` (the next power of two >= the page count): xor with
/// a key, multiply by an odd constant, xor-shift, three rounds. Walking its domain in order
/// and skipping values >= the page count visits every page exactly once, in random order,
/// without any table (cycle walking over a power-of-two domain).
pub struct Permutation {
    mask: u64,
    shift: u32,
    keys: [u64; 3],
}

impl Permutation {
    /// A permutation of `0..pages`.
    pub fn new(pages: u64, seed: u64) -> Self {
        let bits = if pages <= 1 { 0 } else { 64 - (pages - 1).leading_zeros() };
        let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
        let keys = [splitmix64(seed), splitmix64(seed ^ 0x5555), splitmix64(seed ^ 0xaaaa)];
        Permutation { mask, shift: bits / 2 + 1, keys }
    }

    /// Size of the domain walked (a power of two >= the page count).
    pub fn domain(&self) -> u64 {
        self.mask.wrapping_add(1)
    }

    /// The image of `x` (< `domain()`).
    #[inline(always)]
    pub fn apply(&self, mut x: u64) -> u64 {
        for key in self.keys {
            x = (x ^ key) & self.mask;
            x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) & self.mask;
            x ^= x >> self.shift;
        }
        x
    }
}

/// Touches one u64 of the page at `gpa` and returns the cycles it took.
#[inline(always)]
fn timed_touch(gpa: u64, access: Access, value: u64) -> u64 {
    let word = gpa as *mut u64;
    let start = tsc::start();
    match access {
        // SAFETY: word 0 of a workload page (identity-mapped RAM); a write stores the
        // page's own pattern word, so a filled page stays valid.
        Access::Write => unsafe { word.write_volatile(value) },
        Access::Read => {
            // SAFETY: as above; the read is volatile so it is not elided.
            let _ = unsafe { word.read_volatile() };
        }
    }
    tsc::end() - start
}

fn touch_pass(context: &Context, permutation: &Permutation, cpu: u32, result: &mut CpuResult) {
    let config = &context.config;
    let region = &context.region;
    let pages = region.pages;
    let cpus = config.cpus;
    let mut touch = |gpa: u64| {
        let value = pattern_word(config.seed, gpa, 0);
        let cycles = timed_touch(gpa, config.access, value);
        result.histogram.record(cycles);
        result.pages += 1;
    };
    match config.pattern {
        TouchPattern::Sequential => {
            let (first, end) = Region::share(pages, cpu, cpus);
            region.for_each_page(first, end, |_, gpa| touch(gpa));
        }
        TouchPattern::Random => {
            // Each CPU walks its share of the permutation's domain.
            let (first, end) = Region::share(permutation.domain(), cpu, cpus);
            for x in first..end {
                let index = permutation.apply(x);
                if index < pages {
                    touch(region.gpa(index));
                }
            }
        }
        TouchPattern::Strided => {
            // Order: residue 0 (pages 0, s, 2s, ..), then residue 1, ..; each CPU takes a
            // contiguous share of that order.
            let stride = config.stride_pages.min(pages.max(1));
            let (first, end) = Region::share(pages, cpu, cpus);
            let in_residue = |residue: u64| (pages - residue).div_ceil(stride);
            let (mut residue, mut skipped) = (0, 0);
            while residue < stride && skipped + in_residue(residue) <= first {
                skipped += in_residue(residue);
                residue += 1;
            }
            let mut page = residue + (first - skipped) * stride;
            for _ in first..end {
                touch(region.gpa(page));
                page += stride;
                if page >= pages {
                    residue += 1;
                    page = residue;
                }
            }
        }
    }
}

/// Rewrites this CPU's pages round-robin at its share of the rate, paced by the TSC.
fn dirty(context: &Context, cpu: u32, result: &mut CpuResult) {
    let config = &context.config;
    let (first, end) = Region::share(context.region.pages, cpu, config.cpus);
    let (rate_low, rate_high) = Region::share(config.rate_pages_per_s, cpu, config.cpus);
    let rate = u128::from(rate_high - rate_low);
    let hz = u128::from(tsc::effective_khz(context.tsc_khz)) * 1000;
    let duration = tsc::ms_to_cycles(config.duration_ms, context.tsc_khz);
    let start = tsc::now();
    let (mut written, mut next) = (0u64, first);
    let mut stalls = StallWatch::new(cpu, config.stall_us, context.tsc_khz);
    loop {
        let now = tsc::now();
        stalls.look(now);
        let elapsed = now - start;
        if elapsed >= duration {
            break;
        }
        let due = (u128::from(elapsed) * rate / hz) as u64;
        if written < due && first < end {
            write_pattern_page(config.seed, context.region.gpa(next));
            written += 1;
            next = if next + 1 == end { first } else { next + 1 };
        } else {
            spin_loop();
        }
    }
    result.pages = written;
    result.max_stall_us = stalls.worst_us();
}

/// Rewrites this CPU's pages round after round for the step's duration, each round with
/// a new pattern ([`churn_seed`]), while the VMM may discard or write-protect any of them.
/// Before rewriting a page, every word must be zero (the page was discarded since the
/// last round) or the previous round's pattern; any other value is stale data — contents
/// that an invalidation should have removed — and is reported as a mismatch. `pages`
/// counts pages checked, `zeroed_pages` those found discarded.
fn churn(context: &Context, cpu: u32, result: &mut CpuResult) {
    let config = &context.config;
    let (first, end) = Region::share(context.region.pages, cpu, config.cpus);
    let duration = tsc::ms_to_cycles(config.duration_ms, context.tsc_khz);
    let start = tsc::now();
    let mut round = 1u64;
    if first >= end {
        result.rounds = 0;
        return;
    }
    'rounds: loop {
        // Asked to stop: this round is the last, and a whole one, so every page is checked
        // once more after the VMM's last invalidation.
        let last =
            config.until_stopped && crate::serial::inb(faultline_abi::STEP_CONTROL_PORT) == faultline_abi::STEP_STOP;
        let previous = churn_seed(config.seed, round - 1);
        let current = churn_seed(config.seed, round);
        for index in first..end {
            if !config.until_stopped && tsc::now() - start >= duration {
                break 'rounds;
            }
            let gpa = context.region.gpa(index);
            let key = pattern_key(context, index, gpa);
            let page = gpa as *mut u64;
            let mut zero_words = 0;
            for word in 0..WORDS_PER_PAGE {
                // SAFETY: a page of the workload region (identity-mapped RAM) that only
                // this CPU touches during this step.
                let found = unsafe { page.add(word as usize).read_volatile() };
                let expected = pattern_word(previous, key, word);
                if found == 0 {
                    zero_words += 1;
                } else if found != expected {
                    result.note_mismatch(Mismatch { gpa: gpa + word * 8, expected, found });
                }
            }
            if zero_words == WORDS_PER_PAGE {
                result.zeroed_pages += 1;
            }
            write_keyed_page(current, gpa, key);
            result.pages += 1;
        }
        round += 1;
        if last {
            break;
        }
    }
    result.rounds = round - 1;
}

/// Writes generation `generation` of the `generations` step into the page at `gpa`.
fn write_generation(seed: u64, gpa: u64, generation: u64) {
    let page = gpa as *mut u64;
    for word in 0..WORDS_PER_PAGE {
        // SAFETY: a page of the workload region (identity-mapped RAM) that only this CPU
        // touches during this step.
        unsafe { page.add(word as usize).write_volatile(generation_word(seed, gpa, generation, word)) };
    }
}

/// Writes generation 0 into this CPU's pages, then rewrites them in order at its share
/// of the rate, generation after generation, for the step's duration; then checks that
/// every page holds the generation its cursor says (before the cursor the current one,
/// from it on the previous one). A page holding anything else lost a write (or got a
/// stale one back): `bad_pages` counts them, every wrong word is a mismatch.
fn generations(context: &Context, cpu: u32, result: &mut CpuResult) {
    let config = &context.config;
    let region = &context.region;
    let (first, end) = Region::share(region.pages, cpu, config.cpus);
    if first >= end {
        return;
    }
    let seed = config.seed;
    for index in first..end {
        write_generation(seed, region.gpa(index), 0);
    }
    let (rate_low, rate_high) = Region::share(config.rate_pages_per_s, cpu, config.cpus);
    let rate = u128::from(rate_high - rate_low);
    let hz = u128::from(tsc::effective_khz(context.tsc_khz)) * 1000;
    let duration = tsc::ms_to_cycles(config.duration_ms, context.tsc_khz);
    let start = tsc::now();
    let (mut written, mut cursor, mut generation) = (0u64, first, 1u64);
    let mut stalls = StallWatch::new(cpu, config.stall_us, context.tsc_khz);
    loop {
        let now = tsc::now();
        stalls.look(now);
        let elapsed = now - start;
        if elapsed >= duration {
            break;
        }
        let due = (u128::from(elapsed) * rate / hz) as u64;
        if written < due {
            write_generation(seed, region.gpa(cursor), generation);
            written += 1;
            cursor += 1;
            if cursor == end {
                cursor = first;
                generation += 1;
            }
        } else {
            spin_loop();
        }
    }
    for index in first..end {
        let gpa = region.gpa(index);
        let expected_generation = if index < cursor { generation } else { generation - 1 };
        let page = gpa as *const u64;
        let mut bad = false;
        for word in 0..WORDS_PER_PAGE {
            // SAFETY: a page of the workload region (identity-mapped RAM).
            let found = unsafe { page.add(word as usize).read_volatile() };
            let expected = generation_word(seed, gpa, expected_generation, word);
            if found != expected {
                bad = true;
                result.note_mismatch(Mismatch { gpa: gpa + word * 8, expected, found });
            }
        }
        result.bad_pages += u64::from(bad);
    }
    result.pages = end - first;
    result.rounds = generation - 1;
    result.max_stall_us = stalls.worst_us();
}

/// Spins for the step's duration, or with `fl.until_stopped` until the VMM asks it to
/// stop (the port is read about once a millisecond: each read is an exit).
fn idle(context: &Context, cpu: u32, result: &mut CpuResult) {
    let duration = tsc::ms_to_cycles(context.config.duration_ms, context.tsc_khz);
    let check_every = tsc::ms_to_cycles(1, context.tsc_khz).max(1);
    let start = tsc::now();
    let mut next_check = start;
    let mut stalls = StallWatch::new(cpu, context.config.stall_us, context.tsc_khz);
    loop {
        let now = tsc::now();
        stalls.look(now);
        if !context.config.until_stopped {
            if now - start >= duration {
                break;
            }
        } else if now >= next_check {
            if crate::serial::inb(faultline_abi::STEP_CONTROL_PORT) == faultline_abi::STEP_STOP {
                break;
            }
            next_check = now + check_every;
        }
        spin_loop();
    }
    result.max_stall_us = stalls.worst_us();
}

/// Prints the RESULT line of a step (BSP, after the phase).
fn print_result(step: GuestStep, pass: Option<u32>, cpus: u32) {
    let results = results(cpus);
    let cycles = results.iter().map(|r| r.cycles).max().unwrap_or(0);
    let pages: u64 = results.iter().map(|r| r.pages).sum();
    let mut out = Serial::lock();
    let _ = write!(out, "{REPORT_PREFIX}{} {{\"step\":\"{}\"", report::RESULT, step.name());
    if let Some(pass) = pass {
        let _ = write!(out, ",\"pass\":{pass}");
    }
    let _ = write!(out, ",\"pages\":{pages},\"cycles\":{cycles},\"cpus\":{cpus}");
    if step == GuestStep::Abi(Step::Dirty) {
        let _ = write!(out, ",\"pages_written\":{pages}");
    }
    if step == GuestStep::Abi(Step::Churn) {
        let zeroed: u64 = results.iter().map(|r| r.zeroed_pages).sum();
        let rounds = results.iter().map(|r| r.rounds).min().unwrap_or(0);
        let _ = write!(out, ",\"zeroed_pages\":{zeroed},\"rounds\":{rounds}");
    }
    if step == GuestStep::Abi(Step::Generations) {
        let bad: u64 = results.iter().map(|r| r.bad_pages).sum();
        let rounds = results.iter().map(|r| r.rounds).min().unwrap_or(0);
        let _ = write!(out, ",\"bad_pages\":{bad},\"rounds\":{rounds}");
    }
    if matches!(step, GuestStep::Abi(Step::Dirty | Step::Generations | Step::Idle)) {
        let stall = results.iter().map(|r| r.max_stall_us).max().unwrap_or(0);
        let _ = write!(out, ",\"max_stall_us\":{stall}");
    }
    if step == GuestStep::Abi(Step::Touch) {
        // SAFETY: only the BSP uses the merge buffer.
        let merged = unsafe { &mut *addr_of_mut!(*MERGED.get()) };
        merged.clear();
        results.iter().for_each(|r| merged.merge(&r.histogram));
        let _ = out.write_str(",\"latency_cycles\":");
        let _ = merged.write_json(&mut out);
    }
    let _ = out.write_str("}\n");
}

/// Prints the VERIFY line (BSP, after a verify phase); returns whether memory was intact.
fn print_verify(cpus: u32) -> bool {
    let results = results(cpus);
    let pages: u64 = results.iter().map(|r| r.pages).sum();
    let mismatches: u64 = results.iter().map(|r| r.mismatches).sum();
    let ok = mismatches == 0;
    let mut out = Serial::lock();
    let _ = write!(
        out,
        "{REPORT_PREFIX}{} {{\"ok\":{ok},\"pages\":{pages},\"mismatches\":{mismatches},\"first\":[",
        report::VERIFY
    );
    // CPUs hold contiguous shares in order, so the first mismatches overall are the
    // concatenation of each CPU's first ones.
    let first = results.iter().flat_map(|r| r.first[..r.first_count].iter()).take(VERIFY_REPORT_MAX);
    for (i, m) in first.enumerate() {
        let comma = if i == 0 { "" } else { "," };
        let _ = write!(out, "{comma}{{\"gpa\":{},\"expected\":{},\"found\":{}}}", m.gpa, m.expected, m.found);
    }
    let _ = out.write_str("]}\n");
    ok
}
