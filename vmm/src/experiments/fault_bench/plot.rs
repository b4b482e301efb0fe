//! SVG plots of a fault benchmark report: the first-touch latency CDF of every cell, and
//! paging rate against vCPUs.
//!
//! Written by hand rather than with `plotters`: two line charts need ~150 lines of SVG
//! text, while plotters' SVG backend still pulls in its font and layout stack, adding
//! build time on our shared 2-core machines for no gain in what the charts show.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::FaultBenchReport;

const PALETTE: [&str; 10] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const DASHES: [&str; 3] = ["", "6,3", "2,2"];

/// A plot area with its axes' ranges.
struct Chart {
    svg: String,
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    x: (f64, f64),
    y: (f64, f64),
    log_x: bool,
    log_y: bool,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

impl Chart {
    fn new(title: &str, legend_rows: usize, x: (f64, f64), y: (f64, f64), (log_x, log_y): (bool, bool)) -> Chart {
        let (width, height) = (760.0, 420.0);
        let total_h = 80.0 + height + 50.0 + 16.0 * legend_rows as f64;
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="{total_h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="450" y="28" text-anchor="middle" font-size="16">{}</text>"#,
            escape(title)
        );
        Chart { svg, left: 90.0, top: 50.0, width, height, x, y, log_x, log_y }
    }

    fn px(&self, x: f64) -> f64 {
        self.left + fraction(x, self.x, self.log_x) * self.width
    }

    fn py(&self, y: f64) -> f64 {
        self.top + self.height - fraction(y, self.y, self.log_y) * self.height
    }

    fn axes(&mut self, x_label: &str, y_label: &str, x_ticks: &[(f64, String)], y_ticks: &[(f64, String)]) {
        let (l, t, w, h) = (self.left, self.top, self.width, self.height);
        let _ = write!(self.svg, r#"<rect x="{l}" y="{t}" width="{w}" height="{h}" fill="none" stroke="black"/>"#);
        for (v, text) in x_ticks {
            let x = self.px(*v);
            let _ = write!(
                self.svg,
                r##"<line x1="{x}" y1="{t}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
                t + h,
                t + h + 16.0,
                escape(text)
            );
        }
        for (v, text) in y_ticks {
            let y = self.py(*v);
            let _ = write!(
                self.svg,
                r##"<line x1="{l}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                l + w,
                l - 6.0,
                y + 4.0,
                escape(text)
            );
        }
        let _ = write!(
            self.svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text><text x="20" y="{}" text-anchor="middle" transform="rotate(-90 20 {})">{}</text>"#,
            l + w / 2.0,
            t + h + 36.0,
            escape(x_label),
            t + h / 2.0,
            t + h / 2.0,
            escape(y_label)
        );
    }

    fn line(&mut self, series: usize, points: &[(f64, f64)], markers: bool) {
        let color = PALETTE[series % PALETTE.len()];
        let dash = DASHES[(series / PALETTE.len()) % DASHES.len()];
        let pts: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", self.px(x), self.py(y))).collect();
        let _ = write!(
            self.svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" stroke-dasharray="{dash}" points="{}"/>"#,
            pts.join(" ")
        );
        if markers {
            for &(x, y) in points {
                let _ =
                    write!(self.svg, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, self.px(x), self.py(y));
            }
        }
    }

    fn whisker(&mut self, series: usize, x: f64, lo: f64, hi: f64) {
        let color = PALETTE[series % PALETTE.len()];
        let (px, a, b) = (self.px(x), self.py(lo), self.py(hi));
        let _ = write!(self.svg, r#"<line x1="{px:.1}" y1="{a:.1}" x2="{px:.1}" y2="{b:.1}" stroke="{color}"/>"#);
    }

    fn finish(mut self, legend: &[String]) -> String {
        let top = self.top + self.height + 56.0;
        for (i, label) in legend.iter().enumerate() {
            let y = top + 16.0 * i as f64;
            let color = PALETTE[i % PALETTE.len()];
            let dash = DASHES[(i / PALETTE.len()) % DASHES.len()];
            let _ = write!(
                self.svg,
                r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{}" y="{}">{}</text>"#,
                self.left,
                y - 4.0,
                self.left + 30.0,
                y - 4.0,
                self.left + 38.0,
                y,
                escape(label)
            );
        }
        self.svg.push_str("</svg>\n");
        self.svg
    }
}

/// Where `v` falls in `range` (0 to 1), on a linear or log scale.
fn fraction(v: f64, range: (f64, f64), log: bool) -> f64 {
    let (lo, hi, v) =
        if log { (range.0.log10(), range.1.log10(), v.max(range.0).log10()) } else { (range.0, range.1, v) };
    (v - lo) / (hi - lo).max(1e-12)
}

fn log_ticks(lo: f64, hi: f64, unit_scale: f64, unit: &str) -> Vec<(f64, String)> {
    let mut ticks = Vec::new();
    let mut v = 10f64.powf(lo.log10().floor());
    while v <= hi * 1.0001 {
        if v >= lo * 0.9999 {
            ticks.push((v, format!("{}{unit}", v / unit_scale)));
        }
        v *= 10.0;
    }
    ticks
}

/// First-touch latency CDF of every cell (all runs' histograms merged), log time axis.
pub fn latency_cdf(report: &FaultBenchReport) -> String {
    let cells: Vec<_> = report.cells.iter().filter(|c| !c.first_cdf_ns.is_empty()).collect();
    let lo = cells.iter().flat_map(|c| c.first_cdf_ns.iter().map(|p| p.0)).fold(f64::MAX, f64::min).max(1.0);
    let hi = cells.iter().flat_map(|c| c.first_cdf_ns.iter().map(|p| p.0)).fold(lo * 10.0, f64::max);
    let (lo, hi) = (10f64.powf(lo.log10().floor()), 10f64.powf(hi.log10().ceil()));
    let mut chart =
        Chart::new("First-touch latency as the vCPU saw it (CDF)", cells.len(), (lo, hi), (0.0, 1.0), (true, false));
    let y_ticks: Vec<(f64, String)> =
        (0..=10).step_by(2).map(|i| (i as f64 / 10.0, format!("{:.1}", i as f64 / 10.0))).collect();
    chart.axes("latency (us, log scale)", "fraction of touches", &log_ticks(lo, hi, 1e3, ""), &y_ticks);
    for (i, c) in cells.iter().enumerate() {
        // A step function: each bucket's fraction holds until the next bucket's edge.
        let mut pts = vec![(lo, 0.0)];
        let mut previous = 0.0;
        for &(ns, f) in &c.first_cdf_ns {
            pts.push((ns, previous));
            pts.push((ns, f));
            previous = f;
        }
        chart.line(i, &pts, false);
    }
    chart.finish(&cells.iter().map(|c| c.label.clone()).collect::<Vec<_>>())
}

/// Paging rate (median, with min-max whiskers) against vCPUs, one line per configuration.
pub fn rate_vs_vcpus(report: &FaultBenchReport) -> String {
    let mut groups: BTreeMap<String, Vec<(f64, f64, f64, f64)>> = BTreeMap::new();
    for c in &report.cells {
        let Some(s) = c.metrics.get("rate_pages_s") else { continue };
        let key = c.label.replacen(&format!(" {}v ", c.cell.vcpus), " ", 1);
        groups.entry(key).or_default().push((c.cell.vcpus as f64, s.median / 1e3, s.min / 1e3, s.max / 1e3));
    }
    let max_v = groups.values().flatten().map(|p| p.0).fold(1.0, f64::max);
    // Log scale: 4 KiB cells page at thousands of pages/s, hugetlb ones at millions.
    let min_r = groups.values().flatten().map(|p| p.2).fold(f64::MAX, f64::min).max(1e-3);
    let max_r = groups.values().flatten().map(|p| p.3).fold(min_r * 10.0, f64::max);
    let (lo, hi) = (10f64.powf(min_r.log10().floor()), 10f64.powf(max_r.log10().ceil()));
    let mut chart = Chart::new(
        "Paging rate against vCPUs (first-touch pass)",
        groups.len(),
        (0.0, max_v + 0.5),
        (lo, hi),
        (false, true),
    );
    let x_ticks: Vec<(f64, String)> = (1..=max_v as u32).map(|v| (v as f64, v.to_string())).collect();
    let y_ticks = log_ticks(lo, hi, 1.0, "");
    chart.axes("vCPUs", "1000 pages / s (log scale)", &x_ticks, &y_ticks);
    for (i, points) in groups.values_mut().enumerate() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart.line(i, &points.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(), true);
        for p in points.iter() {
            chart.whisker(i, p.0, p.2, p.3);
        }
    }
    chart.finish(&groups.keys().cloned().collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers_and_scales_map_to_the_axis() {
        assert_eq!(fraction(100.0, (10.0, 1000.0), true), 0.5);
        assert_eq!(fraction(5.0, (0.0, 10.0), false), 0.5);
        let t = log_ticks(1e3, 1e6, 1e3, "");
        assert_eq!(t.iter().map(|p| p.1.as_str()).collect::<Vec<_>>(), ["1", "10", "100", "1000"]);
    }

    #[test]
    fn escape_keeps_svg_well_formed() {
        assert_eq!(escape("a<b & c>"), "a&lt;b &amp; c&gt;");
    }
}
