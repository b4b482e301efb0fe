//! SVG plots the benchmarks write next to their JSON: grouped bars (time to warm by
//! restore mode, downtime by migration mode), distributions as CDFs (fault stalls), and
//! lines over time (bytes sent during a migration). Drawn with plotters' SVG backend: no
//! font files, no image libraries; a viewer or browser renders the text.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

/// What can go wrong writing a plot.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Nothing to draw (no series, or only empty ones).
    #[error("plot {path}: no data to draw")]
    Empty {
        /// The file that was not written.
        path: PathBuf,
    },
    /// plotters or the file system failed.
    #[error("plot {path}: {reason}")]
    Draw {
        /// The file being written.
        path: PathBuf,
        /// What plotters said.
        reason: String,
    },
}

/// One named series of values.
#[derive(Debug, Clone)]
pub struct Series {
    /// The legend entry.
    pub name: String,
    /// (x, y) points; for [`cdf`] only the x values count.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series from its name and points.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points }
    }
}

/// Axis titles and the chart's caption.
#[derive(Debug, Clone, Copy)]
pub struct Labels<'a> {
    /// Above the chart.
    pub title: &'a str,
    /// Under the x axis.
    pub x: &'a str,
    /// Beside the y axis.
    pub y: &'a str,
}

const SIZE: (u32, u32) = (800, 480);

fn color(index: usize) -> RGBColor {
    // Distinguishable on white and in greyscale print.
    const PALETTE: [RGBColor; 8] = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x8c, 0x56, 0x4b),
        RGBColor(0x17, 0xbe, 0xcf),
        RGBColor(0x7f, 0x7f, 0x7f),
    ];
    PALETTE[index % PALETTE.len()]
}

fn draw_error(path: &Path) -> impl Fn(Box<dyn std::error::Error + '_>) -> PlotError + '_ {
    move |e| PlotError::Draw { path: path.to_path_buf(), reason: e.to_string() }
}

/// Grouped bars: one group per x category, one bar per series in each group (the
/// series' points are `(category index, value)`; `categories` names the groups).
pub fn bars(path: &Path, labels: Labels, categories: &[String], series: &[Series]) -> Result<(), PlotError> {
    let top = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0f64, f64::max);
    if categories.is_empty() || series.iter().all(|s| s.points.is_empty()) {
        return Err(PlotError::Empty { path: path.to_path_buf() });
    }
    let fail = draw_error(path);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(Box::new(e)))?;
    let groups = categories.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(labels.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..groups, 0f64..(top * 1.1).max(f64::MIN_POSITIVE))
        .map_err(|e| fail(Box::new(e)))?;
    let names = categories.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(categories.len() * 2 + 1)
        .x_label_formatter(&move |x| {
            // Label the middle of each group only.
            let index = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-9 && index < names.len() {
                names[index].clone()
            } else {
                String::new()
            }
        })
        .x_desc(labels.x)
        .y_desc(labels.y)
        .draw()
        .map_err(|e| fail(Box::new(e)))?;
    let width = 0.8 / series.len() as f64;
    for (i, s) in series.iter().enumerate() {
        let fill = color(i);
        let left = move |group: f64| group + 0.1 + width * i as f64;
        chart
            .draw_series(s.points.iter().map(|&(group, value)| {
                Rectangle::new([(left(group), 0.0), (left(group) + width, value)], fill.filled())
            }))
            .map_err(|e| fail(Box::new(e)))?
            .label(s.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], fill.filled()));
    }
    legend_and_present(chart, root, path, SeriesLabelPosition::UpperRight)
}

/// Lines through each series' points, in x order (e.g. bytes sent over time).
pub fn lines(path: &Path, labels: Labels, series: &[Series]) -> Result<(), PlotError> {
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    let Some((x_max, y_max)) = points().reduce(|a, b| (a.0.max(b.0), a.1.max(b.1))) else {
        return Err(PlotError::Empty { path: path.to_path_buf() });
    };
    let (x_min, y_min) = points().fold((x_max, y_max), |a, b| (a.0.min(b.0), a.1.min(b.1)));
    let fail = draw_error(path);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(Box::new(e)))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(labels.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min.min(0.0)..span(x_min, x_max), y_min.min(0.0)..span(y_min, y_max))
        .map_err(|e| fail(Box::new(e)))?;
    chart.configure_mesh().x_desc(labels.x).y_desc(labels.y).draw().map_err(|e| fail(Box::new(e)))?;
    for (i, s) in series.iter().enumerate() {
        let mut sorted = s.points.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let stroke = color(i);
        chart
            .draw_series(LineSeries::new(sorted, stroke.stroke_width(2)))
            .map_err(|e| fail(Box::new(e)))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], stroke.stroke_width(2)));
    }
    legend_and_present(chart, root, path, SeriesLabelPosition::UpperLeft)
}

/// The empirical CDF of each series' x values (e.g. fault stalls in µs), on a log x axis:
/// the fraction of values at or below each x.
pub fn cdf(path: &Path, labels: Labels, series: &[Series]) -> Result<(), PlotError> {
    let curves: Vec<Series> =
        series.iter().map(|s| Series::new(s.name.clone(), cumulative(s.points.iter().map(|p| p.0)))).collect();
    cdf_curves(path, labels, &curves)
}

/// CDFs already computed: each series' points are (x, fraction at or below x), x
/// ascending (e.g. [`crate::guest_report::GuestHistogram::cdf_us`]); log x axis.
pub fn cdf_curves(path: &Path, labels: Labels, curves: &[Series]) -> Result<(), PlotError> {
    let Some((low, high)) = curves
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(None, |range: Option<(f64, f64)>, x| Some(range.map_or((x, x), |(l, h)| (l.min(x), h.max(x)))))
    else {
        return Err(PlotError::Empty { path: path.to_path_buf() });
    };
    let fail = draw_error(path);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(Box::new(e)))?;
    let low = low.max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption(labels.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((low * 0.9..high.max(low) * 1.1).log_scale(), 0f64..1f64)
        .map_err(|e| fail(Box::new(e)))?;
    chart.configure_mesh().x_desc(labels.x).y_desc(labels.y).draw().map_err(|e| fail(Box::new(e)))?;
    for (i, s) in curves.iter().filter(|s| !s.points.is_empty()).enumerate() {
        let stroke = color(i);
        let points: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (x.max(low), y)).collect();
        chart
            .draw_series(LineSeries::new(points, stroke.stroke_width(2)))
            .map_err(|e| fail(Box::new(e)))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], stroke.stroke_width(2)));
    }
    legend_and_present(chart, root, path, SeriesLabelPosition::LowerRight)
}

/// The empirical CDF of `values` as (value, fraction at or below it) steps, at most
/// ~1000 points (evenly spaced ranks) so a plot of a million faults stays small.
pub fn cumulative(values: impl Iterator<Item = f64>) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let step = n.div_ceil(1000);
    let mut out: Vec<(f64, f64)> = (0..n).step_by(step).map(|i| (sorted[i], (i + 1) as f64 / n as f64)).collect();
    if out.last().is_some_and(|&(_, f)| f < 1.0) {
        out.push((sorted[n - 1], 1.0));
    }
    out
}

/// An axis end above `high` (plotters refuses an empty range).
fn span(low: f64, high: f64) -> f64 {
    if high > low {
        high * 1.05
    } else {
        low + 1.0
    }
}

fn legend_and_present<'a, 'b: 'a, CT: CoordTranslate>(
    mut chart: ChartContext<'a, SVGBackend<'b>, CT>,
    root: DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    path: &Path,
    legend: SeriesLabelPosition,
) -> Result<(), PlotError> {
    let fail = draw_error(path);
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(legend)
        .draw()
        .map_err(|e| fail(Box::new(e)))?;
    root.present().map_err(|e| fail(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("faultline-plot-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(format!("{name}.svg"))
    }

    const LABELS: Labels = Labels { title: "t", x: "x", y: "y" };

    #[test]
    fn the_cdf_of_values_rises_to_one_in_value_order() {
        let curve = cumulative([3.0, 1.0, 2.0, f64::NAN, 4.0].into_iter());
        assert_eq!(curve, vec![(1.0, 0.25), (2.0, 0.5), (3.0, 0.75), (4.0, 1.0)]);
        let big = cumulative((0..100_000).map(|i| i as f64));
        assert!(big.len() <= 1001, "{}", big.len());
        assert_eq!(big.last(), Some(&(99_999.0, 1.0)));
        assert!(big.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert!(cumulative(std::iter::empty()).is_empty());
    }

    #[test]
    fn each_plot_names_its_series_and_draws_them() {
        let bars_path = scratch("bars");
        let categories = vec!["eager".to_string(), "uffd-missing".to_string()];
        let series = [
            Series::new("none", vec![(0.0, 10.0), (1.0, 4.0)]),
            Series::new("working-set", vec![(0.0, 9.0), (1.0, 1.5)]),
        ];
        bars(&bars_path, LABELS, &categories, &series).unwrap();
        let svg = std::fs::read_to_string(&bars_path).unwrap();
        for text in ["eager", "uffd-missing", "none", "working-set"] {
            assert!(svg.contains(text), "{text} missing");
        }
        // Four bars and two legend swatches, over the background and the plot frame.
        assert!(svg.matches("<rect").count() >= 6, "{svg}");

        let lines_path = scratch("lines");
        lines(&lines_path, LABELS, &[Series::new("precopy", vec![(2.0, 5.0), (0.0, 0.0), (1.0, 3.0)])]).unwrap();
        let svg = std::fs::read_to_string(&lines_path).unwrap();
        assert!(svg.contains("precopy") && svg.contains("<polyline"), "{svg}");

        let cdf_path = scratch("cdf");
        cdf(&cdf_path, LABELS, &[Series::new("stalls", (1..=50).map(|i| (i as f64, 0.0)).collect())]).unwrap();
        let svg = std::fs::read_to_string(&cdf_path).unwrap();
        assert!(svg.contains("stalls") && svg.contains("<polyline"), "{svg}");
        let _ = std::fs::remove_dir_all(bars_path.parent().unwrap());
        let _ = std::fs::remove_dir_all(lines_path.parent().unwrap());
        let _ = std::fs::remove_dir_all(cdf_path.parent().unwrap());
    }

    #[test]
    fn nothing_to_draw_is_an_error_naming_the_file() {
        let path = scratch("empty");
        let error = cdf(&path, LABELS, &[Series::new("none", vec![])]).unwrap_err();
        assert!(matches!(error, PlotError::Empty { .. }));
        assert!(error.to_string().contains("empty.svg"), "{error}");
        assert!(lines(&path, LABELS, &[]).is_err());
        assert!(bars(&path, LABELS, &[], &[]).is_err());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
