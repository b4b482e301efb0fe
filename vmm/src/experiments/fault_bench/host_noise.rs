//! The `--host-noise` dimension of `faultline bench faults`: the whole matrix once per
//! noise (every child run gets `faultline run --host-noise X`), then each cell's first-
//! touch and warm latency under each noise as a ratio to the same cell under `none`,
//! measured in the same sweep. Each noise's own report (table, JSON, CSV, plots) is kept
//! beside the comparison.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::output::write;
use super::{run_with_noise, FaultBenchArgs, FaultBenchError, FaultBenchReport};
use crate::config::HostNoise;

/// The figures compared across noises.
pub const METRICS: [&str; 4] = ["first_p50_ns", "first_p99_ns", "warm_p50_ns", "warm_p99_ns"];

/// One cell under one noise.
#[derive(Debug, Clone, Serialize)]
pub struct NoiseRow {
    /// The cell's label.
    pub cell: String,
    /// The noise.
    pub noise: String,
    /// Medians of [`METRICS`] over the repeats, ns.
    pub medians: Vec<(String, f64)>,
    /// The same divided by the cell's medians under `none` (absent without a `none` run).
    pub x_none: Vec<(String, f64)>,
}

/// The sweep over noises.
#[derive(Debug, Clone, Serialize)]
pub struct HostNoiseReport {
    /// Each noise's full report, in the order run.
    pub sweeps: Vec<(String, FaultBenchReport)>,
    /// Every cell under every noise.
    pub rows: Vec<NoiseRow>,
}

/// Runs the matrix once per noise in `args.host_noise` (`none` first, added if missing).
pub fn sweep(args: &FaultBenchArgs) -> Result<HostNoiseReport, FaultBenchError> {
    let mut noises = vec![HostNoise::None];
    noises.extend(args.host_noise.iter().copied().filter(|n| *n != HostNoise::None));
    let mut sweeps = Vec::new();
    for noise in noises {
        if !args.quiet {
            eprintln!("bench faults: host noise {}", noise.name());
        }
        sweeps.push((noise.name().to_string(), run_with_noise(args, Some(noise))?));
    }
    let rows = compare(&sweeps);
    Ok(HostNoiseReport { sweeps, rows })
}

/// Each cell of each sweep with its ratios to the `none` sweep's same cell.
pub fn compare(sweeps: &[(String, FaultBenchReport)]) -> Vec<NoiseRow> {
    let base = sweeps.iter().find(|(n, _)| n == "none").map(|(_, r)| r);
    let mut rows = Vec::new();
    for (noise, report) in sweeps {
        for c in &report.cells {
            let medians: Vec<(String, f64)> =
                METRICS.iter().filter_map(|m| c.median(m).map(|v| (m.to_string(), v))).collect();
            let base_cell = base.and_then(|b| b.find(&c.cell));
            let x_none = medians
                .iter()
                .filter_map(|(m, v)| {
                    let b = base_cell?.median(m)?;
                    (b > 0.0).then(|| (m.clone(), v / b))
                })
                .collect();
            rows.push(NoiseRow { cell: c.label.clone(), noise: noise.clone(), medians, x_none });
        }
    }
    rows
}

impl HostNoiseReport {
    /// The comparison table: one line per cell and noise.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<44} {:<15} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
            "cell", "noise", "first p50", "first p99", "warm p50", "warm p99", "x first", "x warm"
        );
        for r in &self.rows {
            let get = |v: &[(String, f64)], m: &str| v.iter().find(|(k, _)| k == m).map(|(_, x)| *x);
            let us = |m: &str| get(&r.medians, m).map_or("-".into(), |ns| format!("{:.1}us", ns / 1e3));
            let x = |m: &str| get(&r.x_none, m).map_or("-".into(), |x| format!("{x:.2}"));
            let _ = writeln!(
                out,
                "{:<44} {:<15} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
                r.cell,
                r.noise,
                us("first_p50_ns"),
                us("first_p99_ns"),
                us("warm_p50_ns"),
                us("warm_p99_ns"),
                x("first_p50_ns"),
                x("warm_p50_ns")
            );
        }
        out.push_str("x first / x warm: p50 under the noise / p50 of the same cell under none, same sweep\n");
        out
    }

    /// The comparison as CSV.
    pub fn csv(&self) -> String {
        let mut out = String::from("cell,noise");
        for m in METRICS {
            let _ = write!(out, ",{m},x_none_{m}");
        }
        out.push('\n');
        for r in &self.rows {
            let get = |v: &[(String, f64)], m: &str| v.iter().find(|(k, _)| k == m).map(|(_, x)| x.to_string());
            let _ = write!(out, "{},{}", r.cell, r.noise);
            for m in METRICS {
                let _ = write!(
                    out,
                    ",{},{}",
                    get(&r.medians, m).unwrap_or_default(),
                    get(&r.x_none, m).unwrap_or_default()
                );
            }
            out.push('\n');
        }
        out
    }

    /// Writes host-noise.json, host-noise.csv, host-noise.txt and each noise's own files
    /// (in `noise-NAME/`) into `dir`.
    pub fn write_to(&self, dir: &Path) -> Result<Vec<String>, FaultBenchError> {
        let mut written = Vec::new();
        for (noise, report) in &self.sweeps {
            written.extend(report.write_to(&dir.join(format!("noise-{noise}")))?);
        }
        let files = [
            ("host-noise.json", serde_json::to_string_pretty(self).expect("report serializes")),
            ("host-noise.csv", self.csv()),
            ("host-noise.txt", self.table()),
        ];
        for (name, text) in files {
            let path = dir.join(name);
            write(&path, &text)?;
            written.push(path.display().to_string());
        }
        Ok(written)
    }

    /// Prints the table (or JSON) and writes `--out`; the exit code of `bench faults`.
    pub fn print(&self, args: &FaultBenchArgs) -> std::process::ExitCode {
        if let Some(dir) = &args.out {
            match self.write_to(dir) {
                Ok(files) => eprintln!("bench faults: wrote {} files to {}", files.len(), dir.display()),
                Err(e) => {
                    eprintln!("faultline: error: {e}");
                    return std::process::ExitCode::from(2);
                }
            }
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(self).expect("report serializes"));
        } else {
            for (noise, report) in &self.sweeps {
                println!("== host noise: {noise}");
                print!("{}", report.table());
            }
            println!("== host noise compared with none");
            print!("{}", self.table());
        }
        std::process::ExitCode::SUCCESS
    }
}
