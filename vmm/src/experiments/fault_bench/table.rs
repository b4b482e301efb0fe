//! The terminal table of a fault benchmark report.

use super::{CellResult, FaultBenchReport};

/// The median engine-side p50 of a cell (whatever fault kind and page size it saw most).
fn engine_p50_ns(c: &CellResult) -> Option<f64> {
    c.metrics
        .iter()
        .filter(|(k, _)| k.starts_with("engine_") && k.ends_with("_count"))
        .max_by(|a, b| a.1.median.total_cmp(&b.1.median))
        .and_then(|(k, _)| c.median(&k.replace("_count", "_p50_ns")))
}

fn num(v: Option<f64>, scale: f64, width: usize, precision: usize) -> String {
    match v {
        Some(v) => format!("{:>width$.precision$}", v / scale),
        None => format!("{:>width$}", "-"),
    }
}

/// Relative spread (max - min) / median of a metric, percent.
pub fn spread_percent(c: &CellResult, metric: &str) -> Option<f64> {
    let s = c.metrics.get(metric)?;
    (s.median > 0.0).then(|| (s.max - s.min) / s.median * 100.0)
}

impl FaultBenchReport {
    /// A table for people: one line per cell, medians over the runs.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for line in self.machine.lines() {
            out.push_str(&line);
            out.push('\n');
        }
        let width = self.cells.iter().map(|c| c.label.len()).max().unwrap_or(10).max(10);
        // "x default" only when the sweep has engine options to compare with the default.
        let options = self.cells.iter().any(|c| c.metrics.contains_key("x_default_rate"));
        out.push_str(&format!(
            "\nmedians of {} runs; latencies in us as the vCPU saw them (guest TSC), rates in 1000 pages/s\n",
            self.repeat
        ));
        out.push_str(&format!(
            "{:<width$} {:>23} {:>6} {:>7} {:>7} {:>23} {:>7} {:>13} {:>13} {:>13}{} {:>6} {:>8}\n",
            "cell",
            "first touch p50/p99/mean",
            "warm50",
            "fault50",
            "engin50",
            "rate median [min-max]",
            "/vCPU",
            "x kernel l/r",
            "x ref l/r",
            "x min l/r",
            if options { format!(" {:>13}", "x default l/r") } else { String::new() },
            "+-%",
            "total ms",
        ));
        for c in &self.cells {
            let m = |k: &str| c.median(k);
            let rate = c.metrics.get("rate_pages_s");
            let ratio = |name: &str| match (m(&format!("x_{name}_first_mean")), m(&format!("x_{name}_rate"))) {
                (Some(l), Some(r)) => format!("{l:>6.2}/{r:<6.2}"),
                _ => format!("{:>13}", "-"),
            };
            out.push_str(&format!(
                "{:<width$} {} {} {} {} {} {} {} {} {}{} {} {}\n",
                c.label,
                format_args!(
                    "{}/{}/{}",
                    num(m("first_p50_ns"), 1e3, 7, 1),
                    num(m("first_p99_ns"), 1e3, 7, 1),
                    num(m("first_mean_ns"), 1e3, 7, 1)
                ),
                num(m("warm_p50_ns"), 1e3, 6, 2),
                num(m("fault_p50_ns"), 1e3, 7, 1),
                num(engine_p50_ns(c), 1e3, 7, 1),
                match rate {
                    Some(s) => format!("{:>7.1} [{:>6.1}-{:>6.1}]", s.median / 1e3, s.min / 1e3, s.max / 1e3),
                    None => format!("{:>23}", "-"),
                },
                num(m("rate_per_vcpu_pages_s"), 1e3, 7, 1),
                ratio("kernel"),
                ratio("reference"),
                ratio("minimal"),
                if options { format!(" {}", ratio("default")) } else { String::new() },
                num(spread_percent(c, "first_mean_ns"), 1.0, 6, 1),
                num(m("total_ms"), 1.0, 8, 0),
            ));
            for e in &c.errors {
                out.push_str(&format!("    ! {e}\n"));
            }
        }
        out.push_str(
            "\nfault50 = first-touch p50 minus warm-pass p50 (the fault's share of a touch); engin50 = engine-side\n\
             p50 (message read -> page installed); x kernel / x ref / x min / x default: first-touch mean\n\
             latency / paging rate as multiples of the same cell in kernel mode / with the reference handler /\n\
             with the minimal handler (poll + read + COPY of a zero page) / with the default engine (paired run\n\
             by run); +-% = (max - min) / median of the first-touch mean over the runs.\n",
        );
        for line in self.yardstick_lines() {
            out.push_str(&line);
            out.push('\n');
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        for s in &self.skipped {
            out.push_str(&format!("skipped: {}: {}\n", s.cell, s.reason));
        }
        out
    }
}

impl FaultBenchReport {
    /// The default engine against each yardstick handler over the whole sweep: per
    /// yardstick and figure (first-touch mean; fault cost = first-touch mean minus warm
    /// mean), the median over cells of each cell's median paired ratio and the worst cell.
    /// A ratio above 1 means the default engine made the vCPU wait longer.
    pub fn yardstick_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, label) in [("reference", "reference handler"), ("minimal", "minimal handler")] {
            for (key, what) in [("first_mean", "first-touch mean"), ("fault_mean", "fault cost (first - warm)")] {
                let metric = format!("x_{name}_{key}");
                let mut ratios: Vec<(f64, &str)> = self
                    .cells
                    .iter()
                    .filter(|c| c.cell.engine == "default")
                    .filter_map(|c| c.median(&metric).map(|v| (v, c.label.as_str())))
                    .collect();
                if ratios.is_empty() {
                    continue;
                }
                ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
                let median = ratios[ratios.len() / 2].0;
                let (worst, cell) = ratios[ratios.len() - 1];
                out.push(format!(
                    "default engine / {label}, {what}: median {median:.2}x over {} cells, worst {worst:.2}x ({cell})",
                    ratios.len()
                ));
            }
        }
        out
    }
}
