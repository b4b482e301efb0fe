//! `faultline bench faults`: how long a vCPU waits on a page that is not there yet, over a
//! matrix of backend × paging mode × engine variant × vCPUs × handler threads × pattern ×
//! read/write × size, with each cell's `kernel` baseline and reference-handler comparison
//! measured in the same sweep (see `docs/benchmarks.md`).
//!
//! - [`matrix`]: the cells, the skipped combinations, baselines;
//! - [`runner`]: one cell = one `faultline run --json` child;
//! - [`sample`]: one run's figures and their spread over repeats;
//! - [`machine`]: what it ran on; [`table`], [`output`], [`plot`]: the results.

pub mod host_noise;
pub mod machine;
pub mod matrix;
pub mod output;
pub mod plot;
pub mod runner;
pub mod sample;
pub mod table;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::config::{AccessKind, AccessPattern, PagingMode};
use crate::experiments::child_timing::Spread;
use machine::MachineInfo;
use matrix::{Cell, MatrixSpec, Skipped};
use runner::Runner;
use sample::RunSample;

/// Options of `faultline bench faults` (lists are comma separated).
#[derive(Debug, Clone, clap::Args)]
pub struct FaultBenchArgs {
    /// Backends: anon, memfd, file (a file on tmpfs), hugetlb.
    #[arg(long, value_delimiter = ',', default_value = "anon,memfd,hugetlb")]
    pub backends: Vec<String>,
    /// Paging modes (each cell's `kernel` baseline is always added).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "kernel,uffd-missing,uffd-minor")]
    pub paging: Vec<PagingMode>,
    /// Engine variants for userfaultfd modes: default, reference, minimal, or options
    /// joined by '+': batch=N, dontwake, zeropool, around=N, busypoll, noexclusive.
    #[arg(long, value_delimiter = ',', default_value = "default,reference,minimal")]
    pub engines: Vec<String>,
    /// vCPU counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub vcpus: Vec<u32>,
    /// Fault handler thread counts (engine variants other than reference).
    #[arg(long, value_delimiter = ',', default_value = "2")]
    pub threads: Vec<usize>,
    /// Touch orders.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sequential")]
    pub patterns: Vec<AccessPattern>,
    /// Read or write touches.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "write")]
    pub access: Vec<AccessKind>,
    /// Bytes each run touches (e.g. 64M).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64M")]
    pub sizes: Vec<u64>,
    /// Runs of every cell (cells interleaved, so drift hits all alike); the table shows
    /// the median and the spread.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Write report.json, cells.csv and SVG plots to this folder.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print the report as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Per-run limit in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Add the 2 MiB huge pages hugetlb cells need to the host pool for the sweep and give
    /// them back after (root only); without it, hugetlb cells the pool cannot hold are
    /// skipped.
    #[arg(long)]
    pub reserve_hugepages: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// The faultline binary to run (default: this one).
    #[arg(long, value_name = "PATH")]
    pub faultline_bin: Option<PathBuf>,
    /// Host noise during the runs, a dimension of its own: the whole matrix is run once
    /// per noise (none, mmap-churn, mprotect-churn, pageout, ksm, compaction) and compared
    /// with `none` (see docs/benchmarks.md).
    #[arg(long, value_delimiter = ',', value_parser = crate::config::HostNoise::parse)]
    pub host_noise: Vec<crate::config::HostNoise>,
}

fn parse_size(text: &str) -> Result<u64, String> {
    faultline_abi::parse_size(text).ok_or_else(|| format!("cannot parse size '{text}' (use e.g. 64M, 1G)"))
}

/// Errors of the fault benchmark.
#[derive(Debug, thiserror::Error)]
pub enum FaultBenchError {
    /// --repeat 0.
    #[error("--repeat must be at least 1")]
    NoRepeat,
    /// A list option named something unknown.
    #[error("{0}")]
    BadArgument(String),
    /// Nothing left to run.
    #[error("no cell of the matrix can run here ({0} skipped, see the notes); widen the matrix")]
    NothingToRun(usize),
    /// An output file could not be written.
    #[error("cannot write {path}: {source}")]
    Output {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The results of one cell over all repeats.
#[derive(Debug, Clone, Serialize)]
pub struct CellResult {
    /// The cell.
    pub cell: Cell,
    /// Its label.
    pub label: String,
    /// The exact command of one run.
    pub command: String,
    /// Runs that produced figures.
    pub runs_ok: usize,
    /// Why the other runs failed.
    pub errors: Vec<String>,
    /// Every metric's min / median / max over the runs (ratios pair runs of the same repeat).
    pub metrics: BTreeMap<String, Spread>,
    /// Every metric of every successful run.
    pub runs: Vec<BTreeMap<String, f64>>,
    /// First-touch latency CDF over all runs: `(ns, fraction of touches ≤ ns)`.
    pub first_cdf_ns: Vec<(f64, f64)>,
    #[serde(skip)]
    samples: Vec<Option<RunSample>>,
}

impl CellResult {
    /// The median of a metric, if any run had it.
    pub fn median(&self, metric: &str) -> Option<f64> {
        self.metrics.get(metric).map(|s| s.median)
    }
}

/// The benchmark's report.
#[derive(Debug, Clone, Serialize)]
pub struct FaultBenchReport {
    /// What it ran on.
    pub machine: MachineInfo,
    /// Runs per cell.
    pub repeat: usize,
    /// Results, in matrix order.
    pub cells: Vec<CellResult>,
    /// Combinations not run, and why.
    pub skipped: Vec<Skipped>,
    /// What the sweep did to the host (huge page pool), or failed to.
    pub notes: Vec<String>,
}

impl FaultBenchReport {
    /// The cell result for `cell`, if it ran.
    pub fn find(&self, cell: &Cell) -> Option<&CellResult> {
        self.cells.iter().find(|c| &c.cell == cell)
    }
}

fn spec_of(args: &FaultBenchArgs) -> Result<MatrixSpec, FaultBenchError> {
    let backends = args.backends.iter().map(|b| matrix::parse_backend(b)).collect::<Result<_, _>>();
    Ok(MatrixSpec {
        backends: backends.map_err(FaultBenchError::BadArgument)?,
        paging: args.paging.clone(),
        engines: args.engines.clone(),
        vcpus: args.vcpus.clone(),
        threads: args.threads.clone(),
        patterns: args.patterns.clone(),
        access: args.access.clone(),
        sizes: args.sizes.clone(),
    })
}

/// Runs the sweep, printing progress on stderr unless `--quiet`.
pub fn run(args: &FaultBenchArgs) -> Result<FaultBenchReport, FaultBenchError> {
    run_with_noise(args, None)
}

/// [`run`] with every child under `noise` (`--host-noise`).
pub fn run_with_noise(
    args: &FaultBenchArgs,
    noise: Option<crate::config::HostNoise>,
) -> Result<FaultBenchReport, FaultBenchError> {
    if args.repeat == 0 {
        return Err(FaultBenchError::NoRepeat);
    }
    let (cells, mut skipped) = matrix::expand(&spec_of(args)?);
    let mut notes = Vec::new();
    let needed = cells.iter().map(runner::hugetlb_pages).max().unwrap_or(0);
    let _loan = match (args.reserve_hugepages && needed > 0).then(|| runner::HugepageLoan::take(needed)) {
        Some(Ok(loan)) => {
            notes.push(format!("added {} 2 MiB pages to the host pool for the sweep", loan.added()));
            Some(loan)
        }
        Some(Err(e)) => {
            notes.push(format!("--reserve-hugepages: {e}"));
            None
        }
        None => None,
    };
    let mut runnable = Vec::new();
    for cell in cells {
        match runner::hugetlb_shortfall(&cell) {
            Some(reason) => skipped.push(Skipped { cell: cell.label(), reason }),
            None => runnable.push(cell),
        }
    }
    if runnable.is_empty() {
        return Err(FaultBenchError::NothingToRun(skipped.len()));
    }
    let runner = Runner {
        binary: args
            .faultline_bin
            .clone()
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from("faultline")),
        timeout_s: args.timeout,
        file_dir: PathBuf::from("/dev/shm"),
        host_noise: noise,
    };
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let machine = MachineInfo::collect(command_line);
    let mut results: Vec<CellResult> = runnable
        .iter()
        .map(|cell| CellResult {
            cell: cell.clone(),
            label: cell.label(),
            command: runner.command_line(cell),
            runs_ok: 0,
            errors: Vec::new(),
            metrics: BTreeMap::new(),
            runs: Vec::new(),
            first_cdf_ns: Vec::new(),
            samples: Vec::new(),
        })
        .collect();
    let say = |line: String| {
        if !args.quiet {
            eprintln!("{line}");
        }
    };
    say(format!(
        "bench faults: {} cells x {} runs ({} combinations skipped)",
        results.len(),
        args.repeat,
        skipped.len()
    ));
    // One untimed run first: the binary, the guest image and the page cache get warm.
    let _ = runner.run(&runnable[0], 0);
    let total = results.len() * args.repeat;
    for rep in 0..args.repeat {
        for (i, result) in results.iter_mut().enumerate() {
            let started = std::time::Instant::now();
            let outcome = runner.run(&result.cell, rep);
            let n = rep * runnable.len() + i + 1;
            let took = started.elapsed().as_secs_f64();
            match &outcome {
                Ok(s) => say(format!(
                    "[{n:>3}/{total}] {}: first touch p50 {:.1} us mean {:.1} us, {:.1} kpages/s ({took:.1} s)",
                    result.label,
                    s.first.p50 / 1e3,
                    s.first.mean / 1e3,
                    s.rate_pages_per_s() / 1e3
                )),
                Err(e) => say(format!("[{n:>3}/{total}] {}: FAILED: {e}", result.label)),
            }
            match outcome {
                Ok(s) => result.samples.push(Some(s)),
                Err(e) => {
                    result.errors.push(format!("run {rep}: {e}"));
                    result.samples.push(None);
                }
            }
        }
    }
    finish(&mut results);
    Ok(FaultBenchReport { machine, repeat: args.repeat, cells: results, skipped, notes })
}

/// Computes per-run metrics, the ratios to each cell's kernel baseline, reference and
/// minimal handlers and default engine (pairing runs of the same repeat), the spreads and
/// the CDFs.
fn finish(results: &mut [CellResult]) {
    let per_run: Vec<Vec<Option<BTreeMap<String, f64>>>> =
        results.iter().map(|r| r.samples.iter().map(|s| s.as_ref().map(RunSample::metrics)).collect()).collect();
    let index_of = |cell: &Cell| results.iter().position(|r| &r.cell == cell);
    let mut with_ratios = per_run.clone();
    for (i, r) in results.iter().enumerate() {
        let others = [
            ("kernel", r.cell.kernel_baseline()),
            ("reference", r.cell.reference()),
            ("minimal", r.cell.minimal()),
            ("default", r.cell.default_engine()),
        ];
        for (name, other) in others {
            let Some(j) = other.as_ref().and_then(index_of) else { continue };
            for (rep, mine) in with_ratios[i].iter_mut().enumerate() {
                let (Some(mine), Some(Some(theirs))) = (mine.as_mut(), per_run[j].get(rep)) else { continue };
                for (metric, key) in [
                    ("first_mean_ns", "first_mean"),
                    ("first_p50_ns", "first_p50"),
                    ("fault_mean_ns", "fault_mean"),
                    ("rate_pages_s", "rate"),
                ] {
                    if let (Some(a), Some(b)) = (mine.get(metric).copied(), theirs.get(metric).copied()) {
                        if b > 0.0 {
                            mine.insert(format!("x_{name}_{key}"), a / b);
                        }
                    }
                }
            }
        }
    }
    for (r, runs) in results.iter_mut().zip(with_ratios) {
        r.runs = runs.into_iter().flatten().collect();
        r.runs_ok = r.runs.len();
        r.metrics = sample::spread_of(&r.runs);
        let ok: Vec<RunSample> = r.samples.iter().flatten().cloned().collect();
        r.first_cdf_ns = sample::merged_cdf(&ok);
    }
}
