//! `faultline restore` and `faultline snapshot inspect`: the command-line side of the
//! snapshot layer.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{MemoryRestore, RestoreOverrides};
use crate::config::{ConfigError, ZoneConfig};

/// Options of `faultline restore`.
#[derive(Debug, Args, Clone)]
pub struct RestoreArgs {
    /// The snapshot directory (a full snapshot, or the last diff of a chain).
    #[arg(long = "from", value_name = "DIR", required_unless_present = "incoming", conflicts_with = "incoming")]
    pub from: Option<PathBuf>,
    /// Wait for a live migration on `unix:PATH` or `tcp:HOST:PORT` instead of reading a
    /// snapshot (the source runs `faultline ctl migrate URI`); with --api-socket,
    /// --timeout, --console and --json only.
    #[arg(long, value_name = "URI", conflicts_with_all = ["memory", "memory_restore"])]
    pub incoming: Option<String>,
    /// Restore into these zones instead of the saved ones: one per saved zone, same
    /// sizes, any backend (e.g. an anon snapshot into size=256M,backend=hugetlb).
    #[arg(long = "memory", short = 'm', value_name = "SPEC")]
    pub memory: Vec<String>,
    /// Serve the control API on this Unix socket while the VM runs.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Stop the VM after this many seconds (a positive number; no limit by default).
    #[arg(long, value_name = "SECONDS", value_parser = crate::config::duration::parse_seconds)]
    pub timeout: Option<std::time::Duration>,
    /// Echo the guest's serial console to stdout.
    #[arg(long)]
    pub console: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// How guest memory comes back: `eager` reads the images into RAM first; `map`
    /// maps the image (anon zones); `uffd-missing` reads each page on its first touch;
    /// `uffd-minor` fills shared zones' page cache and maps it on faults;
    /// `uffd-socket:PATH` hands the userfaultfd to an external handler (Firecracker's
    /// protocol; e.g. `faultline page-server`).
    #[arg(long, value_name = "MODE", default_value = "eager", value_parser = MemoryRestore::parse)]
    pub memory_restore: MemoryRestore,
    /// With `uffd-socket`: end the VM with an error when a thread has waited this long
    /// on a page fault the handler did not answer (the handler's exit is noticed at once).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = crate::config::duration::parse_seconds)]
    pub page_server_timeout: std::time::Duration,
    /// With `uffd-missing`: `background` also brings every carried page in from a
    /// thread while the guest runs, `working-set` the pages a `--record-working-set`
    /// restore recorded, in first-touch order, from before the vCPUs start (both through
    /// the fault engine: never over a page the guest has, never over a discard).
    #[arg(long, value_enum, default_value_t = super::page_server::Prefetch::None)]
    pub prefetch: super::page_server::Prefetch,
    /// With `uffd-missing`: write the pages the guest touches first (during
    /// `--working-set-ms` after the restore) beside the snapshot, for `--prefetch
    /// working-set`.
    #[arg(long)]
    pub record_working_set: bool,
    /// How long after the restore `--record-working-set` records, ms.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub working_set_ms: u64,
}

impl RestoreArgs {
    /// The overrides these options ask for.
    pub fn overrides(&self) -> Result<RestoreOverrides, ConfigError> {
        let zones = if self.memory.is_empty() {
            None
        } else {
            Some(self.memory.iter().map(|spec| ZoneConfig::parse(spec)).collect::<Result<Vec<_>, _>>()?)
        };
        Ok(RestoreOverrides {
            zones,
            console: self.console.then_some(true),
            memory_restore: self.memory_restore.clone(),
            page_server_timeout: Some(self.page_server_timeout),
            prefetch: self.prefetch,
            record_working_set: self.record_working_set.then(|| std::time::Duration::from_millis(self.working_set_ms)),
        })
    }
}

/// `faultline snapshot ...`.
#[derive(Debug, Subcommand, Clone)]
pub enum SnapshotCommand {
    /// Check a snapshot (state checksum, every image's checksum) and describe it.
    Inspect {
        /// The snapshot directory.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// One line per zone, for `snapshot inspect`.
pub fn describe(inspection: &super::Inspection) -> String {
    let mut text = format!(
        "{}: {:?} snapshot, format {}, {} vCPUs, written by {}{}\n",
        inspection.dir.display(),
        inspection.kind,
        inspection.format_version,
        inspection.vcpus,
        inspection.writer,
        inspection.parent.as_ref().map(|p| format!(", parent {}", p.display())).unwrap_or_default(),
    );
    for (index, zone) in inspection.zones.iter().enumerate() {
        text += &format!(
            "  zone {index}: {} {} MiB ({} paging), {} KiB pages, {} MiB carried, image {}\n",
            zone.backend,
            zone.size_bytes >> 20,
            zone.paging,
            zone.page_bytes >> 10,
            zone.carried_bytes as f64 / (1 << 20) as f64,
            match &zone.image {
                Ok(()) => "checksum ok".to_string(),
                Err(e) => format!("BAD: {e}"),
            }
        );
    }
    text += if inspection.checksums_ok { "checksums ok\n" } else { "CHECKSUM ERRORS\n" };
    text
}
