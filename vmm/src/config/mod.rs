//! What the user asked for: vCPUs, memory zones and their backends, the kernel image,
//! the workload. Parsed from the CLI (`--memory size=1G,backend=hugetlb`) or a TOML file,
//! validated once, with errors that name the bad field and say how to fix it.

use std::path::PathBuf;

use faultline_abi as abi;
use serde::{Deserialize, Serialize};

mod balloon;
pub mod duration;
mod host_changes;
mod paging;
mod size;

pub use balloon::{check_target as check_balloon_target, BalloonOptions};
pub use host_changes::{HostChangeKind, HostChangesConfig, HostNoise};
pub use paging::{ChaosConfig, FaultEngineOptions, PagingMode};
pub use size::format_size;
use size::{deserialize_opt_size, deserialize_size};

/// Errors in a configuration. Each message names the field and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A `--memory` spec could not be parsed.
    #[error(
        "--memory '{spec}': {reason} (expected e.g. size=512M,backend=memfd or size=1G,backend=file,path=/tmp/ram)"
    )]
    BadZoneSpec {
        /// The spec as given.
        spec: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A zone's size is zero.
    #[error("memory zone {zone}: size is 0; give a size of at least 4K, e.g. size=256M")]
    ZeroZoneSize {
        /// Index of the zone.
        zone: usize,
    },
    /// A zone's size is not a multiple of its page size.
    #[error("memory zone {zone}: size {size_bytes} is not a multiple of the {backend} page size {page_bytes}; round it to e.g. {suggestion}")]
    UnalignedZoneSize {
        /// Index of the zone.
        zone: usize,
        /// The size given.
        size_bytes: u64,
        /// The backend's name.
        backend: &'static str,
        /// The page size it must be a multiple of.
        page_bytes: u64,
        /// The next aligned size, as a suggestion.
        suggestion: u64,
    },
    /// A zone option (path, reuse, hugepage) is missing, or does not fit its backend.
    #[error("memory zone {zone}: {reason}")]
    BadZoneOption {
        /// Index of the zone.
        zone: usize,
        /// What is wrong.
        reason: String,
    },
    /// A zone's paging mode does not fit its backend.
    #[error("memory zone {zone}: paging={mode} {reason}")]
    BadPaging {
        /// Index of the zone.
        zone: usize,
        /// The mode's name.
        mode: &'static str,
        /// What is wrong and what to use instead.
        reason: &'static str,
    },
    /// A fault engine or chaos setting is out of range.
    #[error("{field} = {value}: {reason}")]
    BadSetting {
        /// The option.
        field: &'static str,
        /// The value given.
        value: u64,
        /// What is accepted.
        reason: &'static str,
    },
    /// No memory zones at all.
    #[error("no memory zones: give at least one --memory size=...")]
    NoZones,
    /// Total memory is too small for the guest image and its workload region.
    #[error("total memory {total_bytes} bytes is too small: the built-in guest needs more than {min_bytes} bytes (its image and tables live below 8 MiB); give e.g. --memory size=64M")]
    TooLittleMemory {
        /// Sum of the zone sizes.
        total_bytes: u64,
        /// The minimum.
        min_bytes: u64,
    },
    /// vCPU count out of range.
    #[error("vcpus = {vcpus}: must be between 1 and {max}")]
    BadVcpuCount {
        /// The count given.
        vcpus: u32,
        /// The largest supported.
        max: usize,
    },
    /// A dirty ring size KVM does not take.
    #[error("--dirty-ring {entries} (dirty_ring in a config file): must be a power of two from {DIRTY_RING_MIN_ENTRIES} to {DIRTY_RING_MAX_ENTRIES} entries per vCPU (e.g. 4096)")]
    BadDirtyRing {
        /// The size given.
        entries: u32,
    },
    /// A workload option is invalid.
    #[error("workload {field}: {reason}")]
    BadWorkload {
        /// The option (e.g. `steps`).
        field: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// The kernel image is missing, not a regular file, or larger than guest RAM.
    #[error("kernel {path}: {reason}")]
    KernelFile {
        /// The file.
        path: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The TOML config file could not be read or parsed.
    #[error("config file {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Where one zone's memory comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Private anonymous memory, populated lazily by the kernel (the default, as on the
    /// command line).
    #[default]
    Anon,
    /// Shared memory from a memfd (shmem).
    Memfd,
    /// A shared mapping of a file at a user-given path.
    File,
    /// Huge pages from a hugetlb memfd (2 MiB by default, 1 GiB where the host has them).
    Hugetlb,
}

impl Backend {
    /// The backend's name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Anon => "anon",
            Backend::Memfd => "memfd",
            Backend::File => "file",
            Backend::Hugetlb => "hugetlb",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "anon" => Backend::Anon,
            "memfd" | "shmem" => Backend::Memfd,
            "file" => Backend::File,
            "hugetlb" => Backend::Hugetlb,
            _ => return None,
        })
    }
}

/// The default huge page size (2 MiB).
pub const HUGEPAGE_2M: u64 = 2 << 20;
/// The large huge page size (1 GiB).
pub const HUGEPAGE_1G: u64 = 1 << 30;

/// One region ("zone") of guest RAM with its own backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// Size of the zone in bytes.
    #[serde(deserialize_with = "deserialize_size")]
    pub size_bytes: u64,
    /// Where its memory comes from (default: anon).
    #[serde(default)]
    pub backend: Backend,
    /// The backing file (`file` backend only).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Boot on the data an existing backing file holds (`file` backend only): without it,
    /// a file that holds data is refused rather than overwritten.
    #[serde(default)]
    pub reuse: bool,
    /// Huge page size for `hugetlb` (2 MiB or 1 GiB); ignored for other backends.
    #[serde(default = "default_hugepage", deserialize_with = "deserialize_size")]
    pub hugepage_bytes: u64,
    /// How the zone's pages get populated.
    #[serde(default)]
    pub paging: PagingMode,
    /// Transparent huge pages (`anon` only): the mapping is 2 MiB aligned and advised
    /// `MADV_HUGEPAGE` (`thp=on`).
    #[serde(default)]
    pub thp: bool,
}

fn default_hugepage() -> u64 {
    HUGEPAGE_2M
}

impl ZoneConfig {
    /// A zone of `size_bytes` with `backend`, no path, 2 MiB huge pages.
    pub fn new(size_bytes: u64, backend: Backend) -> Self {
        ZoneConfig {
            size_bytes,
            backend,
            path: None,
            reuse: false,
            hugepage_bytes: HUGEPAGE_2M,
            paging: PagingMode::Kernel,
            thp: false,
        }
    }

    /// The granule the zone's size must be a multiple of.
    pub fn page_bytes(&self) -> u64 {
        match self.backend {
            Backend::Hugetlb => self.hugepage_bytes,
            _ => abi::PAGE_SIZE,
        }
    }

    /// Parses `size=1G,backend=hugetlb[,path=/x][,reuse=on][,hugepage=2M][,paging=uffd-missing]`
    /// (`backend` defaults to anon, `paging` to kernel;
    /// a bare `1G` means `size=1G`). A key given twice is an error, not "last wins".
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::BadZoneSpec { spec: spec.to_string(), reason };
        let mut size = None;
        let mut zone = ZoneConfig::new(0, Backend::Anon);
        let mut seen: Vec<&str> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or(("size", part));
            let canonical = if key == "hugepage_size" { "hugepage" } else { key };
            if seen.contains(&canonical) {
                return Err(bad(format!("{canonical}= is given twice; give each key once")));
            }
            seen.push(canonical);
            match key {
                "size" => {
                    size = Some(abi::parse_size(value).ok_or_else(|| bad(format!("cannot parse size '{value}'")))?)
                }
                "backend" => {
                    zone.backend = Backend::parse(value).ok_or_else(|| {
                        bad(format!("unknown backend '{value}' (choose anon, memfd, file or hugetlb)"))
                    })?
                }
                "path" => zone.path = Some(PathBuf::from(value)),
                "reuse" => {
                    zone.reuse = match value {
                        "on" | "yes" | "true" | "1" => true,
                        "off" | "no" | "false" | "0" => false,
                        _ => return Err(bad(format!("reuse={value}: give reuse=on or reuse=off"))),
                    }
                }
                "thp" => {
                    zone.thp = match value {
                        "on" | "1" | "true" => true,
                        "off" | "0" | "false" => false,
                        _ => return Err(bad(format!("thp={value}: give thp=on or thp=off"))),
                    }
                }
                "paging" => {
                    zone.paging = PagingMode::parse(value).ok_or_else(|| {
                        bad(format!(
                            "unknown paging mode '{value}' (choose kernel, prefault, uffd-missing or uffd-minor)"
                        ))
                    })?
                }
                "hugepage" | "hugepage_size" => {
                    zone.hugepage_bytes =
                        abi::parse_size(value).ok_or_else(|| bad(format!("cannot parse hugepage size '{value}'")))?
                }
                other => {
                    return Err(bad(format!(
                        "unknown key '{other}' (keys: size, backend, path, reuse, hugepage, paging, thp)"
                    )))
                }
            }
        }
        zone.size_bytes = size.ok_or_else(|| bad("missing size=".to_string()))?;
        if seen.contains(&"hugepage") && zone.backend != Backend::Hugetlb {
            return Err(bad(format!("hugepage= is only for backend=hugetlb, not {}", zone.backend.name())));
        }
        Ok(zone)
    }
}

/// Order of `touch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccessPattern {
    /// Page after page.
    Sequential,
    /// A seeded random permutation of the pages.
    Random,
    /// Every `stride`-th page, then the next offset.
    Strided,
}

/// Kind of `touch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccessKind {
    /// Load one word per page.
    Read,
    /// Store one word per page.
    Write,
}

/// What the built-in guest runs (turned into its kernel command line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Steps in order (`fill`, `verify`, `touch`, `dirty`, `idle`, ...).
    pub steps: Vec<String>,
    /// Bytes of the workload region to use; `None` means all of it.
    #[serde(deserialize_with = "deserialize_opt_size")]
    pub size_bytes: Option<u64>,
    /// Pattern and random-order seed.
    pub seed: u64,
    /// Touch order.
    pub pattern: AccessPattern,
    /// Stride in pages for `strided`.
    pub stride_pages: u64,
    /// Read or write touches.
    pub access: AccessKind,
    /// Passes of `touch`.
    pub passes: u32,
    /// Pages per second for `dirty`.
    pub rate_pages_per_s: u64,
    /// Duration of `dirty` and `idle`, in milliseconds.
    pub duration_ms: u64,
    /// Pages whose patterns repeat: page `i` holds the pattern of page `i % dup_pages`,
    /// so the region holds duplicates for KSM to merge (0: every page its own pattern).
    pub dup_pages: u64,
    /// The paced steps print a `stall` line for every gap of this many µs or more in a
    /// vCPU's clock (0: none).
    pub stall_us: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            steps: vec!["fill".into(), "verify".into()],
            size_bytes: None,
            seed: 1,
            pattern: AccessPattern::Sequential,
            stride_pages: 16,
            access: AccessKind::Write,
            passes: 2,
            rate_pages_per_s: 10_000,
            duration_ms: 1000,
            dup_pages: 0,
            stall_us: 0,
        }
    }
}

impl Workload {
    /// Checks every option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.steps.is_empty() {
            return Err(ConfigError::BadWorkload {
                field: "steps",
                reason: "no steps given (e.g. fill,verify)".into(),
            });
        }
        for step in &self.steps {
            if abi::Step::parse(step).is_none() {
                return Err(ConfigError::BadWorkload {
                    field: "steps",
                    reason: format!("unknown step '{step}' (choose from fill, verify, touch, dirty, idle, churn, balloon, triple-fault, cpl0-sse)"),
                });
            }
        }
        if self.size_bytes == Some(0) {
            return Err(ConfigError::BadWorkload {
                field: "size",
                reason: "0 bytes; give e.g. 64M or omit for all".into(),
            });
        }
        if let Some(size) = self.size_bytes.filter(|s| !s.is_multiple_of(abi::PAGE_SIZE)) {
            return Err(ConfigError::BadWorkload {
                field: "size",
                reason: format!(
                    "{size} bytes is not whole 4 KiB pages (the workload works on pages); round it, e.g. to {}",
                    format_size(size.div_ceil(abi::PAGE_SIZE) * abi::PAGE_SIZE)
                ),
            });
        }
        if self.stride_pages == 0 {
            return Err(ConfigError::BadWorkload { field: "stride", reason: "must be at least 1 page".into() });
        }
        if self.passes == 0 {
            return Err(ConfigError::BadWorkload { field: "passes", reason: "must be at least 1".into() });
        }
        if self.rate_pages_per_s == 0 {
            return Err(ConfigError::BadWorkload { field: "rate", reason: "must be at least 1 page/s".into() });
        }
        Ok(())
    }

    /// The guest command-line tokens for this workload.
    pub fn cmdline_tokens(&self) -> Vec<String> {
        use abi::cmdline as k;
        let mut tokens = vec![format!("{}={}", k::STEPS, self.steps.join(","))];
        if let Some(size) = self.size_bytes {
            tokens.push(format!("{}={}", k::SIZE, size));
        }
        tokens.push(format!("{}={}", k::SEED, self.seed));
        let pattern = match self.pattern {
            AccessPattern::Sequential => "sequential",
            AccessPattern::Random => "random",
            AccessPattern::Strided => "strided",
        };
        tokens.push(format!("{}={}", k::PATTERN, pattern));
        tokens.push(format!("{}={}", k::STRIDE_PAGES, self.stride_pages));
        let access = match self.access {
            AccessKind::Read => "read",
            AccessKind::Write => "write",
        };
        tokens.push(format!("{}={}", k::ACCESS, access));
        tokens.push(format!("{}={}", k::PASSES, self.passes));
        tokens.push(format!("{}={}", k::RATE_PAGES_PER_S, self.rate_pages_per_s));
        tokens.push(format!("{}={}", k::DURATION_MS, self.duration_ms));
        if self.dup_pages > 0 {
            tokens.push(format!("{}={}", k::DUP_PAGES, self.dup_pages));
        }
        if self.stall_us > 0 {
            tokens.push(format!("{}={}", k::STALL_US, self.stall_us));
        }
        tokens
    }
}

/// Which kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelImage {
    /// The tiny guest embedded in the `faultline` binary.
    BuiltIn,
    /// A PVH ELF, an uncompressed Linux `vmlinux`, or a Linux bzImage at this path.
    Path(PathBuf),
}

/// The whole VM as the user asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM zones, laid out in order from guest physical address 0 (skipping the
    /// MMIO hole below 4 GiB).
    #[serde(rename = "memory")]
    pub zones: Vec<ZoneConfig>,
    /// The kernel to boot.
    pub kernel: KernelImage,
    /// Extra kernel command-line text (appended after the workload's tokens).
    pub cmdline: String,
    /// The built-in guest's workload (ignored for other kernels).
    pub workload: Workload,
    /// Echo the guest's serial console to stdout.
    pub console: bool,
    /// The userfaultfd fault engine's settings.
    pub fault_engine: FaultEngineOptions,
    /// Run the chaos driver during the workload.
    pub chaos: Option<ChaosConfig>,
    /// A virtio-balloon device.
    pub balloon: Option<BalloonOptions>,
    /// Host page-table changes applied to guest RAM during the run.
    pub host_changes: Option<HostChangesConfig>,
    /// Record KVM's secondary-MMU trace events for this VM (tracefs; root).
    pub trace_kvm: bool,
    /// Background noise while the guest runs (`faultline bench faults --host-noise`).
    pub host_noise: Option<HostNoise>,
    /// Track dirty pages with KVM's dirty ring, this many entries per vCPU, instead of
    /// the dirty log (`--dirty-ring`; fixed when the VM is made).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_ring: Option<u32>,
}

/// KVM's smallest dirty ring: one page of 16-byte entries.
pub const DIRTY_RING_MIN_ENTRIES: u32 = 256;
/// KVM's largest dirty ring (`KVM_DIRTY_RING_MAX_ENTRIES`).
pub const DIRTY_RING_MAX_ENTRIES: u32 = 65536;

/// The largest TOML config file read.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// Most vCPUs supported (the tiny guest's limit).
pub const MAX_VCPUS: usize = abi::MAX_CPUS;

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 2,
            zones: vec![ZoneConfig::new(256 << 20, Backend::Anon)],
            kernel: KernelImage::BuiltIn,
            cmdline: String::new(),
            workload: Workload::default(),
            console: false,
            fault_engine: FaultEngineOptions::default(),
            chaos: None,
            balloon: None,
            host_changes: None,
            trace_kvm: false,
            host_noise: None,
            dirty_ring: None,
        }
    }
}

impl VmConfig {
    /// Reads a TOML config file. Unknown fields are errors that name the field. Only a
    /// regular file of at most [`MAX_CONFIG_FILE_BYTES`] is read (`/dev/zero` or a FIFO
    /// would be read for ever).
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let err = |reason: String| ConfigError::ConfigFile { path: path.display().to_string(), reason };
        // O_NONBLOCK: opening a FIFO must not wait for a writer (regular files ignore it).
        let file =
            std::os::unix::fs::OpenOptionsExt::custom_flags(std::fs::OpenOptions::new().read(true), libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| err(e.to_string()))?;
        let meta = file.metadata().map_err(|e| err(e.to_string()))?;
        if !meta.is_file() {
            return Err(err("is not a regular file (a device, FIFO or directory); give a TOML file".into()));
        }
        let mut text = String::new();
        file.take(MAX_CONFIG_FILE_BYTES + 1).read_to_string(&mut text).map_err(|e| err(e.to_string()))?;
        if text.len() as u64 > MAX_CONFIG_FILE_BYTES {
            return Err(err(format!("is larger than {MAX_CONFIG_FILE_BYTES} bytes; a VM's config is a few lines")));
        }
        toml::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// Checks the kernel image file: a regular file no larger than guest RAM (it could not
    /// be loaded otherwise; a device such as `/dev/zero` would be read for ever).
    pub fn check_kernel_file(&self) -> Result<(), ConfigError> {
        let KernelImage::Path(path) = &self.kernel else {
            return Ok(());
        };
        let err = |reason: String| ConfigError::KernelFile { path: path.display().to_string(), reason };
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            // The loader names a missing file (and any other error reading it) itself.
            Err(_) => return Ok(()),
        };
        if !meta.is_file() {
            return Err(err("is not a regular file (a device, FIFO or directory); give a kernel image file".into()));
        }
        if meta.len() > self.total_memory_bytes() {
            return Err(err(format!(
                "is {} bytes, larger than guest RAM ({} bytes), so it cannot be loaded; give the right file or more memory",
                meta.len(),
                self.total_memory_bytes()
            )));
        }
        Ok(())
    }

    /// Total guest RAM in bytes.
    pub fn total_memory_bytes(&self) -> u64 {
        self.zones.iter().map(|z| z.size_bytes).sum()
    }

    /// Checks everything that can be checked without touching the host, and that a kernel
    /// file is a regular file that fits in guest RAM. Host-dependent checks (hugepage
    /// pool, file permissions, memory limits) happen when the memory layer creates the
    /// zones.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus as usize > MAX_VCPUS {
            return Err(ConfigError::BadVcpuCount { vcpus: self.vcpus, max: MAX_VCPUS });
        }
        if let Some(entries) = self.dirty_ring {
            if !entries.is_power_of_two() || !(DIRTY_RING_MIN_ENTRIES..=DIRTY_RING_MAX_ENTRIES).contains(&entries) {
                return Err(ConfigError::BadDirtyRing { entries });
            }
        }
        if self.zones.is_empty() {
            return Err(ConfigError::NoZones);
        }
        for (index, zone) in self.zones.iter().enumerate() {
            if zone.size_bytes == 0 {
                return Err(ConfigError::ZeroZoneSize { zone: index });
            }
            if zone.backend == Backend::Hugetlb && ![HUGEPAGE_2M, HUGEPAGE_1G].contains(&zone.hugepage_bytes) {
                return Err(ConfigError::BadZoneOption {
                    zone: index,
                    reason: format!(
                        "hugepage={} is not a huge page size: give hugepage=2M or hugepage=1G",
                        format_size(zone.hugepage_bytes)
                    ),
                });
            }
            if zone.backend != Backend::Hugetlb && zone.hugepage_bytes != HUGEPAGE_2M {
                return Err(ConfigError::BadZoneOption {
                    zone: index,
                    reason: format!(
                        "hugepage={} is only for backend=hugetlb, not {}",
                        format_size(zone.hugepage_bytes),
                        zone.backend.name()
                    ),
                });
            }
            if zone.reuse && zone.backend != Backend::File {
                return Err(ConfigError::BadZoneOption {
                    zone: index,
                    reason: format!("reuse=on is only for backend=file, not {}", zone.backend.name()),
                });
            }
            let page = zone.page_bytes();
            if zone.size_bytes % page != 0 {
                return Err(ConfigError::UnalignedZoneSize {
                    zone: index,
                    size_bytes: zone.size_bytes,
                    backend: zone.backend.name(),
                    page_bytes: page,
                    suggestion: zone.size_bytes.div_ceil(page) * page,
                });
            }
            if zone.thp && zone.backend != Backend::Anon {
                return Err(ConfigError::BadZoneSpec {
                    spec: "thp=on".into(),
                    reason: format!(
                        "memory zone {index}: transparent huge pages are for backend=anon, not {}",
                        zone.backend.name()
                    ),
                });
            }
            if zone.paging == PagingMode::UffdMinor && zone.backend == Backend::Anon {
                return Err(ConfigError::BadPaging {
                    zone: index,
                    mode: zone.paging.name(),
                    reason: "needs a page cache: use backend=memfd, file (on tmpfs) or hugetlb, or paging=uffd-missing for anon",
                });
            }
            match (zone.backend, &zone.path) {
                (Backend::File, None) => {
                    return Err(ConfigError::BadZoneOption {
                        zone: index,
                        reason: "backend=file needs path=/some/file (created if missing)".into(),
                    })
                }
                (Backend::File, Some(_)) | (_, None) => {}
                (other, Some(_)) => {
                    return Err(ConfigError::BadZoneOption {
                        zone: index,
                        reason: format!("path= is only for backend=file, not {}", other.name()),
                    })
                }
            }
        }
        let engine = &self.fault_engine;
        if !(1..=64).contains(&engine.handler_threads) {
            let reason = "give 1 to 64 fault handler threads (--fault-threads)";
            return Err(ConfigError::BadSetting {
                field: "fault_engine.handler_threads",
                value: engine.handler_threads as u64,
                reason,
            });
        }
        if engine.tuning.fault_around > crate::smmu::engine_tuning::MAX_FAULT_AROUND {
            let reason = "fault-around installs at most 512 neighbouring pages";
            let value = u64::from(engine.tuning.fault_around);
            return Err(ConfigError::BadSetting { field: "fault_engine.tuning.fault_around", value, reason });
        }
        if !(1..=1024).contains(&engine.batch) {
            let reason = "give 1 to 1024 messages per read";
            return Err(ConfigError::BadSetting { field: "fault_engine.batch", value: engine.batch as u64, reason });
        }
        if let Some(balloon) = &self.balloon {
            balloon.validate(self.total_memory_bytes())?;
        }
        if self.kernel == KernelImage::BuiltIn
            && self.workload.steps.iter().any(|s| s == "balloon")
            && self.balloon.is_none()
        {
            let reason = "the balloon step needs a balloon device: add --balloon (and --balloon-schedule)";
            return Err(ConfigError::BadSetting { field: "workload.steps", value: 0, reason });
        }
        if let Some(chaos) = &self.chaos {
            if !self.fault_engine.tuning.handler.resolves_write_protect() {
                let reason = "only the default engine resolves write-protect faults, which the chaos driver raises; the reference and minimal handlers do not: drop them from --fault-engine";
                return Err(ConfigError::BadSetting { field: "chaos.events", value: chaos.events, reason });
            }
            if !(1..=1 << 20).contains(&chaos.max_pages) {
                let reason = "a chaos range is 1 to 1048576 pages (4 GiB) (--chaos-max-pages)";
                return Err(ConfigError::BadSetting { field: "chaos.max_pages", value: chaos.max_pages, reason });
            }
            if chaos.discards && !self.workload.steps.iter().any(|s| s == "churn") {
                let reason = "chaos discards throw the guest's data away, which only the churn step expects: add churn to --steps (e.g. --steps fill,churn), or give --chaos-no-discard";
                return Err(ConfigError::BadSetting { field: "chaos.events", value: chaos.events, reason });
            }
            if self.kernel != KernelImage::BuiltIn {
                let reason = "the chaos driver needs the built-in guest (it works on its workload region)";
                return Err(ConfigError::BadSetting { field: "chaos.events", value: chaos.events, reason });
            }
        }
        if self.kernel != KernelImage::BuiltIn && self.workload != Workload::default() {
            return Err(ConfigError::BadWorkload {
                field: "steps",
                reason: "workload options (--steps, --size, --seed, --pattern, --stride, --access, --passes, --rate, --duration-ms, [workload]) drive the built-in guest only and would be ignored with --kernel; pass your kernel its own options with --cmdline".into(),
            });
        }
        if let Some(host) = &self.host_changes {
            if self.kernel != KernelImage::BuiltIn {
                let reason = "host changes need the built-in guest (it proves its memory was kept)";
                return Err(ConfigError::BadSetting { field: "host_changes.events", value: host.events, reason });
            }
            host.validate(&self.zones, &self.workload.steps, self.workload.access == AccessKind::Write)?;
        }
        if self.kernel == KernelImage::BuiltIn {
            let min = abi::WORKLOAD_MIN_GPA;
            if self.total_memory_bytes() <= min {
                return Err(ConfigError::TooLittleMemory { total_bytes: self.total_memory_bytes(), min_bytes: min });
            }
            self.workload.validate()?;
        }
        self.check_kernel_file()
    }

    /// The kernel command line: for the built-in guest, the workload's tokens and the
    /// CPU count (and TSC frequency when known), then the user's extra text.
    pub fn guest_cmdline(&self, tsc_khz: Option<u32>) -> String {
        let mut tokens = Vec::new();
        if self.kernel == KernelImage::BuiltIn {
            tokens.push(format!("{}={}", abi::cmdline::CPUS, self.vcpus));
            if let Some(khz) = tsc_khz {
                tokens.push(format!("{}={}", abi::cmdline::TSC_KHZ, khz));
            }
            tokens.extend(self.workload.cmdline_tokens());
            if self.chaos.is_some() || self.host_changes.is_some() {
                // The chaos (or host-change) driver ends `churn` when it has done its events.
                tokens.push(format!("{}=1", abi::cmdline::UNTIL_STOPPED));
            }
            if let Some(balloon) = &self.balloon {
                // The guest's balloon step ends after following the whole schedule.
                let changes = balloon.guest_changes.unwrap_or(balloon.schedule_bytes.len() as u64);
                tokens.push(format!("{}={}", abi::cmdline::BALLOON_CHANGES, changes));
            }
        }
        if self.balloon.is_some() {
            // How Linux (and the built-in guest) find a virtio-mmio device.
            tokens.push(format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                abi::VIRTIO_MMIO_WINDOW_BYTES >> 10,
                abi::VIRTIO_MMIO_BASE_GPA,
                abi::VIRTIO_MMIO_FIRST_IRQ
            ));
        }
        if !self.cmdline.is_empty() {
            tokens.push(self.cmdline.clone());
        }
        tokens.join(" ")
    }
}

#[cfg(test)]
mod tests;
