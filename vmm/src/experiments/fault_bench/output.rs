//! Files for programs: `report.json` (everything) and `cells.csv` (one row per cell, every
//! metric's median, min and max), plus the SVG plots, in one output folder.

use std::collections::BTreeSet;
use std::path::Path;

use super::matrix::{access_name, pattern_name};
use super::{plot, FaultBenchError, FaultBenchReport};

pub(super) fn write(path: &Path, text: &str) -> Result<(), FaultBenchError> {
    std::fs::write(path, text).map_err(|source| FaultBenchError::Output { path: path.display().to_string(), source })
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

impl FaultBenchReport {
    /// The CSV: cell columns, then `<metric>_median,<metric>_min,<metric>_max` for every
    /// metric any cell has (empty where a cell lacks it).
    pub fn csv(&self) -> String {
        let metrics: BTreeSet<&String> = self.cells.iter().flat_map(|c| c.metrics.keys()).collect();
        let mut out =
            String::from("label,backend,paging,engine,vcpus,threads,pattern,access,size_bytes,runs_ok,errors");
        for m in &metrics {
            out.push_str(&format!(",{m}_median,{m}_min,{m}_max"));
        }
        out.push('\n');
        for c in &self.cells {
            let cell = &c.cell;
            let fields = [
                csv_field(&c.label),
                cell.backend.name().to_string(),
                cell.paging.name().to_string(),
                csv_field(&cell.engine),
                cell.vcpus.to_string(),
                cell.threads.to_string(),
                pattern_name(cell.pattern).to_string(),
                access_name(cell.access).to_string(),
                cell.size_bytes.to_string(),
                c.runs_ok.to_string(),
                c.errors.len().to_string(),
            ];
            out.push_str(&fields.join(","));
            for m in &metrics {
                match c.metrics.get(*m) {
                    Some(s) => out.push_str(&format!(",{},{},{}", s.median, s.min, s.max)),
                    None => out.push_str(",,,"),
                }
            }
            out.push('\n');
        }
        out
    }

    /// Writes report.json, cells.csv, table.txt, latency-cdf.svg and rate-vs-vcpus.svg
    /// into `dir` (created if needed).
    pub fn write_to(&self, dir: &Path) -> Result<Vec<String>, FaultBenchError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| FaultBenchError::Output { path: dir.display().to_string(), source })?;
        let files = [
            ("report.json", serde_json::to_string_pretty(self).expect("report serializes")),
            ("cells.csv", self.csv()),
            ("table.txt", self.table()),
            ("latency-cdf.svg", plot::latency_cdf(self)),
            ("rate-vs-vcpus.svg", plot::rate_vs_vcpus(self)),
        ];
        let mut written = Vec::new();
        for (name, text) in files {
            let path = dir.join(name);
            write(&path, &text)?;
            written.push(path.display().to_string());
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_with_commas_are_quoted() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\", ok"), "\"say \"\"hi\"\", ok\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
