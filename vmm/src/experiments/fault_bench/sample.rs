//! One run's figures, read from the JSON report of `faultline run --json`, and their
//! spread over repeats.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::experiments::child_timing::Spread;
use crate::guest_report::{GuestHistogram, GuestReady, GuestStepResult};
use crate::smmu::fault_engine::{FaultKind, LatencySummary};

/// The parts of a run report the benchmark reads.
#[derive(Debug, Deserialize)]
struct RunJson {
    guest: GuestJson,
    vcpus: u32,
    total_ns: u64,
    #[serde(default)]
    host_memory: HostJson,
    #[serde(default)]
    faults: Option<FaultsJson>,
}

#[derive(Debug, Deserialize)]
struct GuestJson {
    ready: Option<GuestReady>,
    #[serde(default)]
    results: Vec<GuestStepResult>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HostJson {
    peak_rss_bytes: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FaultsJson {
    latency: Vec<LatencySummary>,
    eexist: u64,
    eagain: u64,
    retries: u64,
    deferred: u64,
}

/// Latency quantiles of one touch pass as the vCPU saw them, nanoseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Quantiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Quantiles {
    /// Quantiles of a guest histogram (TSC cycles) in nanoseconds.
    pub fn of(h: &GuestHistogram, tsc_khz: u64) -> Self {
        let ns = |cycles: f64| cycles * 1e6 / tsc_khz as f64;
        Quantiles {
            p50: ns(h.quantile(0.5) as f64),
            p90: ns(h.quantile(0.9) as f64),
            p99: ns(h.quantile(0.99) as f64),
            p999: ns(h.quantile(0.999) as f64),
            max: ns(h.max as f64),
            mean: ns(h.mean),
        }
    }

    /// `(name, value)` pairs in order.
    pub fn named(&self) -> [(&'static str, f64); 6] {
        [
            ("p50", self.p50),
            ("p90", self.p90),
            ("p99", self.p99),
            ("p999", self.p999),
            ("max", self.max),
            ("mean", self.mean),
        ]
    }
}

/// Figures of one run of one cell.
#[derive(Debug, Clone)]
pub struct RunSample {
    /// First touch (pass 1), as the vCPUs saw it.
    pub first: Quantiles,
    /// Warm pass (pass 2) over the same pages.
    pub warm: Quantiles,
    /// Wall time of pass 1 (slowest vCPU), ns.
    pub first_pass_ns: f64,
    /// Pages touched per pass.
    pub pages: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Process start → VM end, ns.
    pub total_ns: u64,
    /// Peak RSS of the VMM, bytes.
    pub peak_rss_bytes: u64,
    /// Engine-side latency per fault kind and page size.
    pub engine: Vec<LatencySummary>,
    /// EEXIST, EAGAIN, retries, deferred.
    pub races: [u64; 4],
    /// Pass 1's histogram (cycles) and the TSC frequency, for CDF plots.
    pub first_histogram: GuestHistogram,
    /// TSC kHz of the guest.
    pub tsc_khz: u64,
}

impl RunSample {
    /// Reads a `faultline run --json` report.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let run: RunJson =
            serde_json::from_str(text).map_err(|e| format!("cannot parse the run's JSON report: {e}"))?;
        let tsc_khz = run.guest.ready.as_ref().map_or(0, |r| r.tsc_khz);
        if tsc_khz == 0 {
            return Err("the guest never reported its TSC frequency (no ready line)".into());
        }
        let pass = |n: u64| {
            run.guest
                .results
                .iter()
                .find(|r| r.step == "touch" && r.pass == n)
                .filter(|r| r.latency_cycles.is_some())
                .ok_or_else(|| format!("the guest reported no touch pass {n} with latencies"))
        };
        let (first, warm) = (pass(1)?, pass(2)?);
        let (fh, wh) =
            (first.latency_cycles.clone().unwrap_or_default(), warm.latency_cycles.clone().unwrap_or_default());
        let faults = run.faults.unwrap_or_default();
        Ok(RunSample {
            first: Quantiles::of(&fh, tsc_khz),
            warm: Quantiles::of(&wh, tsc_khz),
            first_pass_ns: first.cycles as f64 * 1e6 / tsc_khz as f64,
            pages: first.pages,
            vcpus: run.vcpus,
            total_ns: run.total_ns,
            peak_rss_bytes: run.host_memory.peak_rss_bytes,
            engine: faults.latency,
            races: [faults.eexist, faults.eagain, faults.retries, faults.deferred],
            first_histogram: fh,
            tsc_khz,
        })
    }

    /// Pages per second over pass 1 (all vCPUs together).
    pub fn rate_pages_per_s(&self) -> f64 {
        self.pages as f64 / (self.first_pass_ns / 1e9).max(1e-9)
    }

    /// Faults the engine resolved of one kind.
    pub fn faults(&self, kind: FaultKind) -> u64 {
        self.engine.iter().filter(|l| l.kind == kind).map(|l| l.count).sum()
    }

    /// Every figure of the run under a flat name (the CSV columns, the JSON keys).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for ((name, first), (_, warm)) in self.first.named().into_iter().zip(self.warm.named()) {
            m.insert(format!("first_{name}_ns"), first);
            m.insert(format!("warm_{name}_ns"), warm);
            m.insert(format!("fault_{name}_ns"), first - warm);
        }
        let rate = self.rate_pages_per_s();
        m.insert("rate_pages_s".into(), rate);
        m.insert("rate_per_vcpu_pages_s".into(), rate / self.vcpus.max(1) as f64);
        m.insert("first_pass_ms".into(), self.first_pass_ns / 1e6);
        m.insert("total_ms".into(), self.total_ns as f64 / 1e6);
        m.insert("peak_rss_mib".into(), self.peak_rss_bytes as f64 / 1048576.0);
        for l in &self.engine {
            let page = if l.page_bytes > 4096 { "2m" } else { "4k" };
            let kind = match l.kind {
                FaultKind::Missing => "missing",
                FaultKind::Minor => "minor",
                FaultKind::WriteProtect => "wp",
            };
            let key = |what: &str| format!("engine_{kind}_{page}_{what}");
            m.insert(key("count"), l.count as f64);
            m.insert(key("p50_ns"), l.p50_ns as f64);
            m.insert(key("p90_ns"), l.p90_ns as f64);
            m.insert(key("p99_ns"), l.p99_ns as f64);
            m.insert(key("p999_ns"), l.p999_ns as f64);
            m.insert(key("max_ns"), l.max_ns as f64);
            m.insert(key("mean_ns"), l.mean_ns as f64);
        }
        for (name, v) in ["eexist", "eagain", "retries", "deferred"].into_iter().zip(self.races) {
            m.insert(name.into(), v as f64);
        }
        m
    }
}

/// The spread of every metric over runs (a metric missing from some runs is spread over
/// the runs that have it).
pub fn spread_of(runs: &[BTreeMap<String, f64>]) -> BTreeMap<String, Spread> {
    let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for run in runs {
        for (k, v) in run {
            values.entry(k.clone()).or_default().push(*v);
        }
    }
    values.into_iter().filter_map(|(k, v)| Spread::of(&v).map(|s| (k, s))).collect()
}

/// Sums pass-1 histograms of several runs and returns the CDF as `(ns, fraction ≤ ns)`.
pub fn merged_cdf(runs: &[RunSample]) -> Vec<(f64, f64)> {
    let Some(tsc_khz) = runs.first().map(|r| r.tsc_khz) else { return Vec::new() };
    let mut counts: BTreeMap<usize, u64> = BTreeMap::new();
    for r in runs {
        for &(bucket, count) in &r.first_histogram.buckets {
            *counts.entry(bucket).or_default() += count;
        }
    }
    let total: u64 = counts.values().sum();
    let mut seen = 0;
    counts
        .into_iter()
        .map(|(bucket, count)| {
            seen += count;
            let high = faultline_abi::histogram_bucket_high(bucket) as f64;
            (high * 1e6 / tsc_khz as f64, seen as f64 / total.max(1) as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"{"exit":{"kind":"debug-exit","status":0},"vcpus":2,"total_ns":1000000000,
      "host_memory":{"peak_rss_bytes":1048576},
      "guest":{"ready":{"cpus":2,"tsc_khz":1000000},"results":[
        {"step":"touch","pass":1,"pages":1000,"cycles":500000000,"cpus":2,
         "latency_cycles":{"count":1000,"min":1000,"max":9000,"mean":2000.0,"buckets":[[200,1000]]}},
        {"step":"touch","pass":2,"pages":1000,"cycles":1000000,"cpus":2,
         "latency_cycles":{"count":1000,"min":10,"max":90,"mean":20.0,"buckets":[[10,1000]]}}]},
      "faults":{"latency":[{"kind":"missing","page_bytes":4096,"count":1000,"p50_ns":10,"p90_ns":20,
        "p99_ns":30,"p999_ns":40,"mean_ns":12,"max_ns":50}],"eexist":3}}"#;

    #[test]
    fn a_report_turns_into_figures_in_nanoseconds() {
        let s = RunSample::from_json(REPORT).unwrap();
        // 1 GHz TSC: one cycle is one nanosecond; pass 1 took 0.5 s for 1000 pages.
        assert_eq!(s.first.mean, 2000.0);
        assert_eq!(s.warm.max, 90.0);
        assert!((s.rate_pages_per_s() - 2000.0).abs() < 1e-6);
        assert_eq!(s.faults(FaultKind::Missing), 1000);
        let m = s.metrics();
        assert_eq!(m["fault_mean_ns"], 1980.0);
        assert_eq!(m["rate_per_vcpu_pages_s"], 1000.0);
        assert_eq!(m["engine_missing_4k_p50_ns"], 10.0);
        assert_eq!(m["eexist"], 3.0);
        let cdf = merged_cdf(&[s.clone(), s]);
        assert_eq!(cdf.last().unwrap().1, 1.0);
    }

    #[test]
    fn a_report_without_touch_passes_is_an_error_that_says_so() {
        let text = REPORT.replace("\"pass\":2", "\"pass\":7");
        assert!(RunSample::from_json(&text).unwrap_err().contains("touch pass 2"));
        assert!(RunSample::from_json("{").unwrap_err().contains("cannot parse"));
    }

    #[test]
    fn spreads_cover_metrics_of_every_run() {
        let a = BTreeMap::from([("x".to_string(), 1.0), ("y".to_string(), 5.0)]);
        let b = BTreeMap::from([("x".to_string(), 3.0)]);
        let s = spread_of(&[a, b]);
        assert_eq!((s["x"].min, s["x"].median, s["x"].max), (1.0, 2.0, 3.0));
        assert_eq!(s["y"].median, 5.0);
    }
}
