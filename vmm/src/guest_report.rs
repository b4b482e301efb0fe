//! What the guest reported: its `FL <kind> {json}` lines on the serial console, parsed
//! as they arrive into a [`GuestReport`] (ready, step results, verifies, balloon changes,
//! errors, exceptions, done).

use std::time::Instant;

use faultline_abi as abi;
use serde::Serialize;

/// The guest's `ready` line.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct GuestReady {
    /// CPUs the guest brought up.
    pub cpus: u64,
    /// RAM the guest saw in its memory map.
    pub ram_bytes: u64,
    /// Bytes of its workload region.
    pub region_bytes: u64,
    /// Pages of its workload region.
    pub region_pages: u64,
    /// TSC frequency the guest used.
    pub tsc_khz: u64,
    /// The steps it will run.
    pub steps: String,
}

/// The guest's `verify` line.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct GuestVerify {
    /// True when every word matched.
    pub ok: bool,
    /// Pages checked.
    pub pages: u64,
    /// Words that did not match.
    pub mismatches: u64,
    /// The first few mismatches.
    pub first: Vec<VerifyMismatch>,
}

/// One mismatching word.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct VerifyMismatch {
    /// Guest physical address of the word.
    pub gpa: u64,
    /// What the pattern says.
    pub expected: u64,
    /// What memory held.
    pub found: u64,
}

/// A latency histogram reported by the guest, in TSC cycles.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct GuestHistogram {
    /// Samples.
    pub count: u64,
    /// Smallest sample.
    pub min: u64,
    /// Largest sample.
    pub max: u64,
    /// Mean sample.
    pub mean: f64,
    /// Non-empty buckets as `[bucket index, count]` (see `faultline_abi::histogram_bucket`).
    pub buckets: Vec<(usize, u64)>,
}

impl GuestHistogram {
    /// The value at quantile `q` (0..=1), as the upper edge of its bucket, clamped to max.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for &(bucket, count) in &self.buckets {
            seen += count;
            if seen >= rank {
                return abi::histogram_bucket_high(bucket).min(self.max);
            }
        }
        self.max
    }

    /// The histogram as a CDF in microseconds: (the upper edge of each non-empty bucket,
    /// clamped to the largest sample; the fraction of samples at or below it).
    /// Empty when there are no samples or the TSC frequency is unknown.
    pub fn cdf_us(&self, tsc_khz: u64) -> Vec<(f64, f64)> {
        if self.count == 0 || tsc_khz == 0 {
            return Vec::new();
        }
        let mut seen = 0;
        self.buckets
            .iter()
            .map(|&(bucket, count)| {
                seen += count;
                let cycles = abi::histogram_bucket_high(bucket).min(self.max);
                (cycles as f64 * 1e3 / tsc_khz as f64, seen as f64 / self.count as f64)
            })
            .collect()
    }
}

/// A guest `result` line.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct GuestStepResult {
    /// The step's name.
    pub step: String,
    /// Pass number (touch), 1-based; 0 for steps without passes.
    pub pass: u64,
    /// Pages the step covered.
    pub pages: u64,
    /// Time of the step in TSC cycles as the guest measured it (the slowest CPU's own
    /// start to end: less than wall time when CPUs did not run at once, e.g. more vCPUs
    /// than host cores).
    pub cycles: u64,
    /// Wall time on the host's clock from the guest's previous report line to this one
    /// (the step plus its reporting), nanoseconds. Set by the VMM, not the guest.
    pub host_wall_ns: u64,
    /// CPUs that ran it.
    pub cpus: u64,
    /// Per-touch latency (touch only).
    pub latency_cycles: Option<GuestHistogram>,
    /// `churn`: pages found entirely zero (discarded under the guest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zeroed_pages: Option<u64>,
    /// `churn`, `generations`: complete rounds over the region (slowest CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rounds: Option<u64>,
    /// `generations`: pages that did not hold the generation they should (lost or stale writes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad_pages: Option<u64>,
    /// `dirty`, `generations`, `idle`: the longest a vCPU's clock moved between two looks
    /// (it did not run meanwhile), µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_stall_us: Option<u64>,
}

/// A guest `stall` line: a vCPU whose clock moved `us` microseconds between two looks.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct GuestStall {
    /// The vCPU.
    pub cpu: u64,
    /// How long it did not run, µs (guest TSC time).
    pub us: u64,
    /// Printed after this VMM restored the VM (from a snapshot or a migration): the first
    /// such stall of each vCPU spans the switch, as the guest saw it. Set by the VMM.
    pub after_restore: bool,
}

/// A guest `done` line.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct GuestDone {
    /// The exit status byte.
    pub status: u64,
    /// Its name.
    pub name: String,
}

/// Everything the guest reported, in order of arrival.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct GuestReport {
    /// The ready line, if printed.
    pub ready: Option<GuestReady>,
    /// Nanoseconds from VMM process start to the ready line.
    pub ready_after_ns: Option<u64>,
    /// Result lines.
    pub results: Vec<GuestStepResult>,
    /// Verify lines.
    pub verifies: Vec<GuestVerify>,
    /// The done line.
    pub done: Option<GuestDone>,
    /// Error messages the guest printed.
    pub errors: Vec<String>,
    /// Exception lines, raw JSON.
    pub exceptions: Vec<serde_json::Value>,
    /// The balloon step's lines, one per target change it followed (raw JSON: target,
    /// actual, inflated, deflated, kept_ok, zero_ok, mismatches, ...).
    pub balloon_changes: Vec<serde_json::Value>,
    /// `stall` lines, in order (`--stall-us`).
    #[serde(default)]
    pub stalls: Vec<GuestStall>,
    /// Report lines that could not be parsed (a guest bug worth seeing).
    pub unparsed: Vec<String>,
    /// Report lines not kept because their kind already had [`MAX_LINES_PER_KIND`] (a
    /// chatty guest cannot grow the VMM or the report without bound).
    pub dropped_lines: u64,
    /// Whether a dropped line reported a failure (a failed verify or balloon change, an
    /// error or exception): the run still counts it.
    pub dropped_failure: bool,
}

/// Lines of one kind (results, verifies, errors, ...) kept in the report; later ones are
/// counted in `dropped_lines`. Far more than any workload prints.
pub const MAX_LINES_PER_KIND: usize = 1024;

/// Longest serial line kept, bytes; the rest of a longer line is dropped.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Appends `item` unless `list` is full; says whether it was kept.
fn keep<T>(list: &mut Vec<T>, item: T, dropped: &mut u64) -> bool {
    if list.len() >= MAX_LINES_PER_KIND {
        *dropped += 1;
        return false;
    }
    list.push(item);
    true
}

impl GuestReport {
    /// True when the guest said done with success and every verify passed.
    pub fn success(&self) -> bool {
        self.done.as_ref().is_some_and(|d| d.status == abi::ExitStatus::Success as u64)
            && self.verifies.iter().all(|v| v.ok)
            && self.errors.is_empty()
            && self.exceptions.is_empty()
            && !self.dropped_failure
            && self.balloon_changes.iter().all(|c| c["kept_ok"] == true && c["zero_ok"] == true && c["mismatches"] == 0)
    }
}

/// Collects the guest's serial output line by line and parses the `FL ...` lines.
pub struct GuestReportCollector {
    started: Instant,
    partial: Vec<u8>,
    on_balloon_line: Option<Box<dyn FnMut() + Send>>,
    last_line_at: Instant,
    /// The report came from a saved state (a restore or a migration).
    restored: bool,
    /// What has been parsed so far.
    pub report: GuestReport,
}

/// What the collector holds of the guest's output: the report so far and the line being
/// written (a snapshot may fall in the middle of one).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct CollectorState {
    /// Bytes of the unfinished line.
    pub partial: Vec<u8>,
    /// The report so far.
    pub report: GuestReport,
}

impl crate::persist::Persist for GuestReportCollector {
    type State = CollectorState;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<CollectorState, Self::Error> {
        Ok(CollectorState { partial: self.partial.clone(), report: self.report.clone() })
    }

    fn restore(&mut self, state: &CollectorState) -> Result<(), Self::Error> {
        self.partial = state.partial.clone();
        self.report = state.report.clone();
        self.restored = true;
        Ok(())
    }
}

impl GuestReportCollector {
    /// A collector that measures `ready_after_ns` from `started` (the VMM's start).
    pub fn new(started: Instant) -> Self {
        GuestReportCollector {
            started,
            partial: Vec::new(),
            on_balloon_line: None,
            last_line_at: started,
            restored: false,
            report: GuestReport::default(),
        }
    }

    /// Calls `hook` whenever the guest reports it has followed a balloon target change
    /// (the moment the balloon watch measures host memory, before later steps touch it).
    pub fn on_balloon_line(&mut self, hook: Box<dyn FnMut() + Send>) {
        self.on_balloon_line = Some(hook);
    }

    /// Feeds bytes the guest wrote to its serial port.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if byte == b'\n' {
                let line = String::from_utf8_lossy(&self.partial).trim_end_matches('\r').to_string();
                self.partial.clear();
                self.push_line(&line);
            } else if self.partial.len() < MAX_LINE_BYTES {
                self.partial.push(byte);
            }
        }
    }

    /// Parses one complete line.
    pub fn push_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix(abi::REPORT_PREFIX) else {
            return;
        };
        let (kind, json) = rest.split_once(' ').unwrap_or((rest, "{}"));
        let now = Instant::now();
        let since_previous_line = now.duration_since(self.last_line_at).as_nanos() as u64;
        self.last_line_at = now;
        let report = &mut self.report;
        let dropped = &mut report.dropped_lines;
        let parsed = match kind {
            abi::report::READY => serde_json::from_str(json).map(|ready| {
                report.ready = Some(ready);
                report.ready_after_ns = Some(self.started.elapsed().as_nanos() as u64);
            }),
            abi::report::RESULT => serde_json::from_str(json).map(|mut r: GuestStepResult| {
                r.host_wall_ns = since_previous_line;
                keep(&mut report.results, r, dropped);
            }),
            abi::report::VERIFY => serde_json::from_str(json).map(|v: GuestVerify| {
                let ok = v.ok;
                report.dropped_failure |= !keep(&mut report.verifies, v, dropped) && !ok;
            }),
            abi::report::DONE => serde_json::from_str(json).map(|d| report.done = Some(d)),
            abi::report::ERROR => serde_json::from_str::<serde_json::Value>(json).map(|v| {
                let message = v.get("msg").and_then(|m| m.as_str()).unwrap_or(json).to_string();
                report.dropped_failure |= !keep(&mut report.errors, message, dropped);
            }),
            abi::report::EXCEPTION => serde_json::from_str(json).map(|v| {
                report.dropped_failure |= !keep(&mut report.exceptions, v, dropped);
            }),
            abi::report::STALL => serde_json::from_str(json).map(|mut stall: GuestStall| {
                stall.after_restore = self.restored;
                keep(&mut report.stalls, stall, dropped);
            }),
            abi::report::BALLOON => serde_json::from_str(json).map(|v: serde_json::Value| {
                let ok = v["kept_ok"] == true && v["zero_ok"] == true && v["mismatches"] == 0;
                report.dropped_failure |= !keep(&mut report.balloon_changes, v, dropped) && !ok;
                if let Some(hook) = self.on_balloon_line.as_mut() {
                    hook();
                }
            }),
            _ => Ok(()),
        };
        if parsed.is_err() {
            keep(&mut report.unparsed, line.to_string(), &mut report.dropped_lines);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_parses_report_lines_split_across_writes() {
        let mut collector = GuestReportCollector::new(Instant::now());
        collector.push_bytes(b"booting...\nFL ready {\"cpus\":2,\"ram_bytes\":268435456,\"region_bytes\":1,\"regi");
        collector.push_bytes(b"on_pages\":1,\"tsc_khz\":2400000,\"steps\":\"fill,verify\"}\r\n");
        collector.push_bytes(b"FL result {\"step\":\"fill\",\"pass\":0,\"pages\":10,\"cycles\":100,\"cpus\":2}\n");
        collector.push_bytes(b"FL verify {\"ok\":false,\"pages\":10,\"mismatches\":1,\"first\":[{\"gpa\":4096,\"expected\":5,\"found\":0}]}\n");
        collector.push_bytes(b"FL done {\"status\":1,\"name\":\"verify-failed\"}\nFL bogus\nFL result {oops\n");
        let report = &collector.report;
        assert_eq!(report.ready.as_ref().unwrap().cpus, 2);
        assert!(report.ready_after_ns.is_some());
        assert_eq!(report.results[0].pages, 10);
        assert_eq!(report.verifies[0].first[0], VerifyMismatch { gpa: 4096, expected: 5, found: 0 });
        assert_eq!(report.done.as_ref().unwrap().status, 1);
        assert_eq!(report.unparsed, vec!["FL result {oops".to_string()]);
        assert!(!report.success());
    }

    #[test]
    fn histogram_quantiles_use_bucket_edges() {
        let mut h = GuestHistogram { count: 100, min: 10, max: 5000, mean: 0.0, buckets: vec![] };
        h.buckets.push((abi::histogram_bucket(10), 50));
        h.buckets.push((abi::histogram_bucket(1000), 49));
        h.buckets.push((abi::histogram_bucket(5000), 1));
        assert_eq!(h.quantile(0.5), 10);
        let p99 = h.quantile(0.99);
        assert!((1000..1040).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), 5000);
    }

    #[test]
    fn stalls_printed_after_a_restore_are_told_apart() {
        use crate::persist::Persist;
        let mut source = GuestReportCollector::new(Instant::now());
        source.push_bytes(b"FL stall {\"cpu\":1,\"us\":4200}\n");
        let state = source.save().unwrap();
        let mut destination = GuestReportCollector::new(Instant::now());
        destination.restore(&state).unwrap();
        destination
            .push_bytes(b"FL stall {\"cpu\":0,\"us\":1800}\nFL result {\"step\":\"dirty\",\"max_stall_us\":4200}\n");
        let stalls = &destination.report.stalls;
        assert_eq!(
            stalls,
            &vec![
                GuestStall { cpu: 1, us: 4200, after_restore: false },
                GuestStall { cpu: 0, us: 1800, after_restore: true }
            ]
        );
        assert_eq!(destination.report.results[0].max_stall_us, Some(4200));
    }
}
