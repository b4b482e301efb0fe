//! The `balloon` step: follow the host's balloon target and prove memory stays right.
//!
//! Runs on the BSP only; the APs wait at the step's closing barrier (the device has one
//! set of queues, and the pages are the BSP's to move). The region is expected to hold
//! the pattern (a `fill` step before this one).
//!
//! Pages the balloon holds are always the top `held` pages of the region (indices
//! `pages - held .. pages`): inflating takes the next page below them, deflating returns
//! the lowest held page. That is deterministic, and the held set is described exactly by
//! one count, so no bitmap is needed. The bottom `fl.balloon_report_pages` pages are the
//! guest's "free memory": never ballooned, sent by free page reporting after each change.
//!
//! After each change of the target has been followed (actual == target, or the most the
//! region can give): free pages are reported and checked (all zero, or still the
//! pattern), every kept page is checked against the pattern, and a `balloon` line is
//! printed. Deflated pages are checked for zeros right after the host acknowledged the
//! deflate and before their pattern is rewritten. The step ends after
//! `fl.balloon_changes` changes, or after `fl.duration_ms` when that is 0. A following
//! `verify` step passes only if the host's last target was 0 (held pages are the host's).

use core::fmt::Write;
use core::hint::spin_loop;

use faultline_abi::virtio::{report_ranges, stat};
use faultline_abi::{pattern_word, report, ExitStatus, PAGE_SIZE, REPORT_PREFIX};

use crate::balloon::{Balloon, PFNS_PER_REQUEST};
use crate::region::Region;
use crate::serial::Serial;
use crate::step_context::{write_pattern_page, Context, CpuResult, Mismatch};
use crate::virtio_mmio::{VirtioError, QUEUE_SIZE_MAX};
use crate::{boot, tsc};

/// u64 words per page.
const WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;
/// Largest free page reporting range (2 MiB).
const REPORT_RANGE_PAGES: u64 = 512;
/// How often the idle loop looks at the device (about every 200 µs).
const POLL_INTERVAL_US: u64 = 200;
/// Shortest time between two statistics updates: a device that hands the buffer straight
/// back gets fresh numbers at most this often, not on every poll.
const STATS_MIN_INTERVAL_MS: u64 = 100;

/// What one followed change did, for its `balloon` line.
#[derive(Default)]
struct Change {
    inflated: u64,
    deflated: u64,
    kept_mismatches: u64,
    zero_mismatches: u64,
    reported: u64,
    reported_zero: u64,
    kept_pages: u64,
}

struct Step<'a> {
    region: &'a Region,
    seed: u64,
    held: u64,
    /// Pages the balloon may take (the region without the reported free pages).
    capacity: u64,
    report_pages: u64,
    result: &'a mut CpuResult,
}

/// Runs the step (BSP only); returns its exit status.
pub fn run(context: &Context, result: &mut CpuResult) -> ExitStatus {
    let mut balloon = match Balloon::open(context.cmdline, boot::mapped_bytes(), context.tsc_khz) {
        Ok(balloon) => balloon,
        Err(error) => {
            crate::error(error);
            return ExitStatus::DeviceError;
        }
    };
    let queues = balloon.queues();
    note!(
        "balloon: virtio-mmio window {:#x}, features {:#x} (must-tell-host {}), queues inflate {} deflate {} stats {:?} reporting {:?}",
        balloon.base(),
        balloon.features(),
        balloon.must_tell_host(),
        queues.inflate,
        queues.deflate,
        queues.stats,
        queues.reporting
    );
    let config = &context.config;
    let region = &context.region;
    let report_pages = if balloon.reporting() { config.balloon_report_pages.min(region.pages) } else { 0 };
    let mut step =
        Step { region, seed: config.seed, held: 0, capacity: region.pages - report_pages, report_pages, result };
    match step.follow(&mut balloon, context) {
        Ok(status) => status,
        Err(error) => {
            crate::error(format_args!("balloon: {error}"));
            ExitStatus::DeviceError
        }
    }
}

impl Step<'_> {
    /// The main loop: returns Success, VerifyFailed (memory was wrong) or DeviceError
    /// (the host did not make the changes in time).
    fn follow(&mut self, balloon: &mut Balloon, context: &Context) -> Result<ExitStatus, VirtioError> {
        let config = &context.config;
        let start = tsc::now();
        let end = start + tsc::ms_to_cycles(config.duration_ms, context.tsc_khz);
        let give_up = start + tsc::ms_to_cycles(config.balloon_timeout_ms, context.tsc_khz);
        let poll = tsc::ms_to_cycles(1, context.tsc_khz) * POLL_INTERVAL_US / 1000;
        balloon.set_actual(0);
        balloon.service_stats(&self.stats())?;
        let stats_interval = tsc::ms_to_cycles(STATS_MIN_INTERVAL_MS, context.tsc_khz);
        let mut next_stats = start + stats_interval;
        let (mut target, _) = balloon.target()?;
        let (mut changes, mut change, mut changing, mut capped_noted) = (0u64, Change::default(), false, false);
        let mut failed = false;
        loop {
            if tsc::now() >= next_stats && balloon.service_stats(&self.stats())? {
                next_stats = tsc::now() + stats_interval;
            }
            let want = u64::from(target).min(self.capacity);
            if want < u64::from(target) && !capped_noted {
                note!("balloon: target {target} pages is more than the {} the region can give", self.capacity);
                capped_noted = true;
            }
            if want > self.held {
                change.inflated += self.inflate(balloon, want - self.held)?;
                changing = true;
                continue;
            }
            if want < self.held {
                let (pages, mismatches) = self.deflate(balloon, self.held - want)?;
                change.deflated += pages;
                change.zero_mismatches += mismatches;
                changing = true;
                continue;
            }
            if changing {
                self.report_free(balloon, &mut change)?;
                let (pages, mismatches) = self.verify_kept();
                change.kept_pages = pages;
                change.kept_mismatches = mismatches;
                changes += 1;
                self.print(changes, target, &change);
                failed |= change.kept_mismatches + change.zero_mismatches > 0;
                (change, changing) = (Change::default(), false);
                if config.balloon_changes != 0 && changes >= config.balloon_changes {
                    break;
                }
                continue;
            }
            // The target is re-read only once the last change is finished and printed: the
            // host sees `actual == target` as soon as the inflate or deflate ends and may
            // set the next target at once, and folding that into the change still being
            // checked would make two host changes count as one.
            if balloon.config_changed() {
                target = balloon.target()?.0;
                continue;
            }
            let now = tsc::now();
            if config.balloon_changes == 0 && now >= end {
                break;
            }
            if config.balloon_changes != 0 && now >= give_up {
                crate::error(format_args!(
                    "balloon: the host changed the target {changes} of {} times within fl.balloon_timeout_ms={}",
                    config.balloon_changes, config.balloon_timeout_ms
                ));
                return Ok(ExitStatus::DeviceError);
            }
            while tsc::now() - now < poll {
                spin_loop();
            }
        }
        Ok(if failed { ExitStatus::VerifyFailed } else { ExitStatus::Success })
    }

    /// The statistics the guest sends: bytes of its workload region.
    fn stats(&self) -> [(u16, u64); 7] {
        let bytes = |pages: u64| pages * PAGE_SIZE;
        [
            (stat::SWAP_IN, 0),
            (stat::SWAP_OUT, 0),
            (stat::MAJFLT, 0),
            (stat::MINFLT, 0),
            (stat::MEMFREE, bytes(self.report_pages)),
            (stat::MEMTOT, bytes(self.region.pages)),
            (stat::AVAIL, bytes(self.region.pages - self.held)),
        ]
    }

    fn pfn(&self, index: u64) -> u32 {
        let pfn = self.region.gpa(index) / PAGE_SIZE;
        u32::try_from(pfn).expect("a balloon page above 16 TiB has no 32-bit PFN")
    }

    /// Gives up to one request's worth of pages (at most `pages`) to the host; returns
    /// how many.
    fn inflate(&mut self, balloon: &mut Balloon, pages: u64) -> Result<u64, VirtioError> {
        let count = pages.min(PFNS_PER_REQUEST as u64);
        let top = self.region.pages - self.held; // the next page to give is top - 1
        balloon.inflate(count as usize, |i| self.pfn(top - 1 - i as u64))?;
        self.held += count;
        balloon.set_actual(self.held as u32);
        Ok(count)
    }

    /// Takes up to one request's worth of pages (at most `pages`) back, then checks each
    /// reads as zero and rewrites its pattern; returns (pages, words that were not zero).
    fn deflate(&mut self, balloon: &mut Balloon, pages: u64) -> Result<(u64, u64), VirtioError> {
        let count = pages.min(PFNS_PER_REQUEST as u64);
        let lowest_held = self.region.pages - self.held;
        // The host is told (and has answered) before any of these pages is touched.
        balloon.deflate(count as usize, |i| self.pfn(lowest_held + i as u64))?;
        self.held -= count;
        balloon.set_actual(self.held as u32);
        let mut mismatches = 0;
        for index in lowest_held..lowest_held + count {
            let gpa = self.region.gpa(index);
            mismatches += self.check_page(gpa, |_| 0);
            write_pattern_page(self.seed, gpa);
        }
        self.result.pages += count;
        Ok((count, mismatches))
    }

    /// Reports the bottom `report_pages` pages free, then checks each page is all zero
    /// (discarded) or still entirely the pattern, and rewrites the pattern.
    fn report_free(&mut self, balloon: &mut Balloon, change: &mut Change) -> Result<(), VirtioError> {
        if self.report_pages == 0 {
            return Ok(());
        }
        let mut batch = [(0u64, 0u32); QUEUE_SIZE_MAX as usize];
        let max = balloon.report_ranges_max().min(batch.len());
        let mut count = 0;
        let mut outcome = Ok(());
        let region = self.region;
        for range in region.ranges() {
            let pages = range.pages.min(self.report_pages.saturating_sub(range.first_index));
            report_ranges(range.first_gpa, pages, REPORT_RANGE_PAGES, |gpa, bytes| {
                if outcome.is_err() {
                    return;
                }
                batch[count] = (gpa, bytes);
                count += 1;
                if count == max {
                    outcome = self.send_report(balloon, &batch[..count], change);
                    count = 0;
                }
            });
        }
        outcome?;
        if count > 0 {
            self.send_report(balloon, &batch[..count], change)?;
        }
        Ok(())
    }

    fn send_report(
        &mut self,
        balloon: &mut Balloon,
        ranges: &[(u64, u32)],
        change: &mut Change,
    ) -> Result<(), VirtioError> {
        balloon.report_free(ranges)?;
        for &(first, bytes) in ranges {
            for gpa in (first..first + u64::from(bytes)).step_by(PAGE_SIZE as usize) {
                let zero_words = (0..WORDS_PER_PAGE)
                    // SAFETY: a page of the workload region the host has finished with.
                    .filter(|&word| unsafe { (gpa as *const u64).add(word as usize).read_volatile() } == 0)
                    .count() as u64;
                if zero_words == WORDS_PER_PAGE {
                    change.reported_zero += 1;
                } else {
                    let seed = self.seed;
                    change.kept_mismatches += self.check_page(gpa, |word| pattern_word(seed, gpa, word));
                }
                write_pattern_page(self.seed, gpa);
                change.reported += 1;
            }
        }
        self.result.pages += ranges.iter().map(|&(_, bytes)| u64::from(bytes) / PAGE_SIZE).sum::<u64>();
        Ok(())
    }

    /// Checks every page the guest kept (all but the held ones); returns (pages, mismatches).
    fn verify_kept(&mut self) -> (u64, u64) {
        let kept = self.region.pages - self.held;
        let mut mismatches = 0;
        let seed = self.seed;
        let region = self.region;
        region
            .for_each_page(0, kept, |_, gpa| mismatches += self.check_page(gpa, |word| pattern_word(seed, gpa, word)));
        self.result.pages += kept;
        (kept, mismatches)
    }

    /// Compares the page at `gpa` with `expected(word)`; notes and counts mismatches.
    fn check_page(&mut self, gpa: u64, expected: impl Fn(u64) -> u64) -> u64 {
        let page = gpa as *const u64;
        let mut mismatches = 0;
        for word in 0..WORDS_PER_PAGE {
            // SAFETY: a page of the workload region (identity-mapped RAM) the guest holds.
            let found = unsafe { page.add(word as usize).read_volatile() };
            let expected = expected(word);
            if found != expected {
                self.result.note_mismatch(Mismatch { gpa: gpa + word * 8, expected, found });
                mismatches += 1;
            }
        }
        mismatches
    }

    fn print(&self, number: u64, target: u32, change: &Change) {
        let mut out = Serial::lock();
        let _ = writeln!(
            out,
            "{REPORT_PREFIX}{} {{\"change\":{number},\"target_pages\":{target},\"actual_pages\":{},\"inflated\":{},\
             \"deflated\":{},\"kept_pages\":{},\"kept_ok\":{},\"zero_ok\":{},\"mismatches\":{},\
             \"reported_pages\":{},\"reported_zero_pages\":{}}}",
            report::BALLOON,
            self.held,
            change.inflated,
            change.deflated,
            change.kept_pages,
            change.kept_mismatches == 0,
            change.zero_mismatches == 0,
            change.kept_mismatches + change.zero_mismatches,
            change.reported,
            change.reported_zero
        );
    }
}
