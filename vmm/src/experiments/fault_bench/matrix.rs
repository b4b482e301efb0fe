//! The sweep's matrix: which cells to run, which to skip (and why), and which cell is each
//! cell's `kernel` baseline and reference-handler comparison.

use serde::Serialize;

use crate::config::{AccessKind, AccessPattern, Backend, PagingMode, HUGEPAGE_2M};
use crate::smmu::engine_tuning::{useful_handler_threads, EngineTuning};

/// Guest RAM below the workload region (the guest's own image, page tables, stacks).
pub const GUEST_LOW_BYTES: u64 = 16 << 20;

/// One cell of the matrix: one `faultline run` configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// Backend of the single memory zone.
    pub backend: Backend,
    /// Paging mode of the zone.
    pub paging: PagingMode,
    /// Engine variant (`default`, `reference`, or `+`-joined options); `default` for
    /// modes without userfaultfd.
    pub engine: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Fault handler threads (0 when no engine runs; 1 for the reference handler).
    pub threads: usize,
    /// Touch order.
    pub pattern: AccessPattern,
    /// Read or write touches.
    pub access: AccessKind,
    /// Bytes the guest touches.
    pub size_bytes: u64,
}

impl Cell {
    /// Guest RAM for this cell: the workload plus the guest's low memory.
    pub fn memory_bytes(&self) -> u64 {
        self.size_bytes + GUEST_LOW_BYTES
    }

    /// A short label, e.g. `memfd uffd-minor default 2v 2t seq write 64M`.
    pub fn label(&self) -> String {
        format!(
            "{} {} {} {}v {}t {} {} {}",
            self.backend.name(),
            self.paging.name(),
            self.engine,
            self.vcpus,
            self.threads,
            pattern_name(self.pattern),
            access_name(self.access),
            size_name(self.size_bytes)
        )
    }

    /// The `kernel`-mode cell measured beside this one (same backend, vCPUs, pattern,
    /// access and size), or None if this is one.
    pub fn kernel_baseline(&self) -> Option<Cell> {
        (self.paging != PagingMode::Kernel).then(|| Cell {
            paging: PagingMode::Kernel,
            engine: "default".into(),
            threads: 0,
            ..self.clone()
        })
    }

    /// The default-engine cell of the same configuration (same handler threads), for
    /// cells with engine options: what the options buy.
    pub fn default_engine(&self) -> Option<Cell> {
        let yardstick = ["default", "reference", "minimal"].contains(&self.engine.as_str());
        (self.paging.uses_userfaultfd() && !yardstick).then(|| Cell { engine: "default".into(), ..self.clone() })
    }

    /// The reference-handler cell of the same configuration, for userfaultfd cells that
    /// do not use it themselves.
    pub fn reference(&self) -> Option<Cell> {
        self.yardstick("reference")
    }

    /// The minimal-handler cell of the same configuration (poll + read + COPY of a zero
    /// page, the floor), for userfaultfd cells other than itself. The minimal handler
    /// resolves MISSING faults only, so uffd-minor cells have none.
    pub fn minimal(&self) -> Option<Cell> {
        (self.paging == PagingMode::UffdMissing).then(|| self.yardstick("minimal")).flatten()
    }

    fn yardstick(&self, engine: &str) -> Option<Cell> {
        (self.paging.uses_userfaultfd() && self.engine != engine).then(|| Cell {
            engine: engine.into(),
            threads: 1,
            ..self.clone()
        })
    }
}

/// A combination left out of the sweep, with the reason.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The cell's label.
    pub cell: String,
    /// Why it was not run.
    pub reason: String,
}

/// What the user asked to sweep.
#[derive(Debug, Clone)]
pub struct MatrixSpec {
    /// Backends.
    pub backends: Vec<Backend>,
    /// Paging modes.
    pub paging: Vec<PagingMode>,
    /// Engine variants (see [`EngineTuning::parse`]).
    pub engines: Vec<String>,
    /// vCPU counts.
    pub vcpus: Vec<u32>,
    /// Handler thread counts.
    pub threads: Vec<usize>,
    /// Touch orders.
    pub patterns: Vec<AccessPattern>,
    /// Read / write.
    pub access: Vec<AccessKind>,
    /// Region sizes, bytes.
    pub sizes: Vec<u64>,
}

/// Expands the matrix into cells (each `kernel` baseline included, even when the user
/// did not list `kernel`) and the combinations that cannot run.
pub fn expand(spec: &MatrixSpec) -> (Vec<Cell>, Vec<Skipped>) {
    let mut cells: Vec<Cell> = Vec::new();
    let mut skipped = Vec::new();
    let push = |cell: Cell, cells: &mut Vec<Cell>| {
        if !cells.contains(&cell) {
            cells.push(cell);
        }
    };
    for &backend in &spec.backends {
        for &size in &spec.sizes {
            for &vcpus in &spec.vcpus {
                for &pattern in &spec.patterns {
                    for &access in &spec.access {
                        for &paging in &spec.paging {
                            for engine in &spec.engines {
                                for &threads in &spec.threads {
                                    let cell = Cell {
                                        backend,
                                        paging,
                                        engine: engine.clone(),
                                        vcpus,
                                        threads,
                                        pattern,
                                        access,
                                        size_bytes: size,
                                    };
                                    match normalize(cell) {
                                        Ok(cell) => {
                                            if let Some(base) = cell.kernel_baseline() {
                                                push(base, &mut cells);
                                            }
                                            push(cell, &mut cells);
                                        }
                                        Err(s) if !skipped.iter().any(|k: &Skipped| k.cell == s.cell) => {
                                            skipped.push(s)
                                        }
                                        Err(_) => {}
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    (cells, skipped)
}

/// Makes a cell canonical (engine/threads only matter with userfaultfd; the reference
/// handler has one thread) or says why it cannot run.
fn normalize(mut cell: Cell) -> Result<Cell, Skipped> {
    let skip = |cell: &Cell, reason: &str| Skipped { cell: cell.label(), reason: reason.to_string() };
    if !cell.paging.uses_userfaultfd() {
        cell.engine = "default".into();
        cell.threads = 0;
    } else {
        match EngineTuning::parse(&cell.engine) {
            Ok(t) if t.handler.single_threaded() => cell.threads = 1,
            // What the VMM will really start on this host (the label says so).
            Ok(_) => cell.threads = useful_handler_threads(cell.threads),
            Err(e) => return Err(skip(&cell, &e.to_string())),
        }
    }
    if cell.paging == PagingMode::UffdMinor && cell.engine == "minimal" {
        return Err(skip(&cell, "the minimal handler resolves MISSING faults only"));
    }
    if cell.paging == PagingMode::UffdMinor && cell.backend == Backend::Anon {
        return Err(skip(&cell, "uffd-minor needs a shared backing (memfd, file on tmpfs, hugetlb)"));
    }
    if cell.backend == Backend::Hugetlb && !cell.size_bytes.is_multiple_of(HUGEPAGE_2M) {
        return Err(skip(&cell, "hugetlb sizes must be multiples of 2 MiB"));
    }
    if cell.size_bytes == 0 || !cell.size_bytes.is_multiple_of(4096) {
        return Err(skip(&cell, "sizes must be non-zero multiples of 4 KiB"));
    }
    Ok(cell)
}

/// `sequential` → `seq`, for labels.
pub fn pattern_name(p: AccessPattern) -> &'static str {
    match p {
        AccessPattern::Sequential => "seq",
        AccessPattern::Random => "random",
        AccessPattern::Strided => "strided",
    }
}

/// The `--access` name.
pub fn access_name(a: AccessKind) -> &'static str {
    match a {
        AccessKind::Read => "read",
        AccessKind::Write => "write",
    }
}

/// `64M`, `1G`, or bytes.
pub fn size_name(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b => format!("{}K", b >> 10),
    }
}

/// Parses a backend name (`anon`, `memfd`, `file`, `hugetlb`).
pub fn parse_backend(text: &str) -> Result<Backend, String> {
    [Backend::Anon, Backend::Memfd, Backend::File, Backend::Hugetlb]
        .into_iter()
        .find(|b| b.name() == text)
        .ok_or_else(|| format!("unknown backend '{text}' (choose anon, memfd, file or hugetlb)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MatrixSpec {
        MatrixSpec {
            backends: vec![Backend::Anon, Backend::Memfd],
            paging: vec![PagingMode::UffdMissing, PagingMode::UffdMinor],
            engines: vec!["default".into(), "reference".into(), "minimal".into()],
            vcpus: vec![1, 2],
            threads: vec![1, 2],
            patterns: vec![AccessPattern::Sequential],
            access: vec![AccessKind::Write],
            sizes: vec![64 << 20],
        }
    }

    #[test]
    fn expansion_adds_kernel_baselines_and_skips_minor_on_anon() {
        let (cells, skipped) = expand(&spec());
        // Per vCPU count: anon kernel + missing(default 1t, 2t, reference, minimal);
        // memfd kernel + missing(4) + minor(default 1t, 2t, reference) = 5 + 8 = 13; one
        // default cell fewer per mode where the host cannot use 2 handler threads.
        let per_mode = if useful_handler_threads(2) == 2 { 0 } else { 1 };
        assert_eq!(cells.len(), 26 - 6 * per_mode, "{:#?}", cells.iter().map(Cell::label).collect::<Vec<_>>());
        assert!(skipped.iter().any(|s| s.reason.contains("MISSING faults only")));
        assert!(cells.iter().all(|c| c.paging != PagingMode::UffdMinor || c.backend != Backend::Anon));
        assert!(skipped.iter().any(|s| s.reason.contains("uffd-minor")));
        for cell in &cells {
            if let Some(base) = cell.kernel_baseline() {
                assert!(cells.contains(&base), "{} has no baseline", cell.label());
            }
            if let Some(reference) = cell.reference() {
                assert!(cells.contains(&reference), "{} has no reference", cell.label());
            }
            if let Some(minimal) = cell.minimal() {
                assert!(cells.contains(&minimal), "{} has no minimal", cell.label());
            }
        }
        assert!(cells.iter().filter(|c| c.engine == "reference" || c.engine == "minimal").all(|c| c.threads == 1));
        let mut s = spec();
        s.engines.push("dontwake+around=8".into());
        let (cells, _) = expand(&s);
        let with_options: Vec<_> = cells.iter().filter_map(Cell::default_engine).collect();
        assert!(!with_options.is_empty() && with_options.iter().all(|d| cells.contains(d)));
    }

    #[test]
    fn bad_engine_variants_and_hugetlb_sizes_are_skipped_with_reasons() {
        let mut s = spec();
        s.engines = vec!["warp-drive".into()];
        s.backends = vec![Backend::Hugetlb];
        s.sizes = vec![3 << 20];
        let (cells, skipped) = expand(&s);
        assert!(cells.iter().all(|c| c.paging == PagingMode::Kernel));
        assert!(skipped.iter().any(|k| k.reason.contains("warp-drive")), "{skipped:?}");
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(size_name(64 << 20), "64M");
        assert_eq!(size_name(1 << 30), "1G");
        assert_eq!(parse_backend("memfd").unwrap(), Backend::Memfd);
        assert!(parse_backend("floppy").is_err());
    }
}
