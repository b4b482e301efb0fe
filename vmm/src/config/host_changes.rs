//! Host page-table changes the VMM did not make (swap, KSM, THP, compaction, mprotect),
//! applied to guest RAM while the guest runs; and which paging modes and backends each
//! applies to (a combination that cannot work is refused with the reason).

use serde::{Deserialize, Serialize};

use super::{Backend, ConfigError, PagingMode, ZoneConfig};

/// One kind of host change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HostChangeKind {
    /// Page ranges out to a private zram swap device (`MADV_PAGEOUT`).
    Swap,
    /// KSM merges identical pages (`MADV_MERGEABLE`, the scanner run fast); ranges are
    /// unmerged and re-advised to break and re-make merges.
    Ksm,
    /// Transparent huge pages collapsed (`MADV_COLLAPSE`) and split (the mapping of a
    /// 4 KiB part changed, which splits the PMD) in `thp=on` zones.
    Thp,
    /// Compaction (`/proc/sys/vm/compact_memory`) and `move_pages`.
    Compaction,
    /// Read-only windows (`mprotect`) the VMM opens and closes.
    Mprotect,
}

impl HostChangeKind {
    /// Every kind, in the order `mixed` cycles through them.
    pub const ALL: [HostChangeKind; 5] = [
        HostChangeKind::Swap,
        HostChangeKind::Ksm,
        HostChangeKind::Thp,
        HostChangeKind::Compaction,
        HostChangeKind::Mprotect,
    ];

    /// The kind's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HostChangeKind::Swap => "swap",
            HostChangeKind::Ksm => "ksm",
            HostChangeKind::Thp => "thp",
            HostChangeKind::Compaction => "compaction",
            HostChangeKind::Mprotect => "mprotect",
        }
    }

    /// Parses a list such as `swap,ksm` or `mixed` (every kind).
    pub fn parse_list(text: &str) -> Result<Vec<Self>, ConfigError> {
        let mut kinds = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "mixed" {
                kinds.extend(Self::ALL);
                continue;
            }
            let kind = Self::ALL.into_iter().find(|k| k.name() == part).ok_or_else(|| ConfigError::BadWorkload {
                field: "host_changes.kinds",
                reason: format!("unknown host change '{part}' (choose swap, ksm, thp, compaction, mprotect or mixed)"),
            })?;
            kinds.push(kind);
        }
        kinds.dedup();
        if kinds.is_empty() {
            return Err(ConfigError::BadWorkload {
                field: "host_changes.kinds",
                reason: "no host change given (e.g. --host-changes swap)".into(),
            });
        }
        Ok(kinds)
    }

    /// Why this change cannot apply to a zone with this backend and paging mode, or
    /// `None` when it applies.
    pub fn refusal(self, zone: &ZoneConfig) -> Option<&'static str> {
        let (backend, paging) = (zone.backend, zone.paging);
        match self {
            HostChangeKind::Swap if backend == Backend::Hugetlb => {
                Some("hugetlb pages are never swapped out; use anon, memfd or file")
            }
            HostChangeKind::Ksm if backend != Backend::Anon => Some(
                "KSM merges only private anonymous pages (MADV_MERGEABLE is ignored on shared mappings); use backend=anon",
            ),
            HostChangeKind::Ksm if paging == PagingMode::UffdMinor => {
                Some("uffd-minor needs a page cache, which KSM does not merge")
            }
            HostChangeKind::Thp if backend != Backend::Anon || !zone.thp => Some(
                "transparent huge pages are an anon zone option: give the zone backend=anon,thp=on (THP is in madvise mode)",
            ),
            HostChangeKind::Thp if paging == PagingMode::UffdMinor => {
                Some("uffd-minor needs a page cache, and transparent huge pages here are anon")
            }
            HostChangeKind::Compaction | HostChangeKind::Mprotect | HostChangeKind::Swap => None,
            HostChangeKind::Ksm | HostChangeKind::Thp => None,
        }
    }
}

/// One kind of noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HostNoise {
    /// Nothing (the baseline).
    None,
    /// A VMM thread maps, touches and unmaps small regions in a loop (mmap lock writes).
    MmapChurn,
    /// A VMM thread flips a scratch page read-only and back in a loop (mmap lock writes,
    /// VMA splits and merges).
    MprotectChurn,
    /// `MADV_PAGEOUT` of guest RAM ranges in a loop, to a private zram swap device.
    Pageout,
    /// KSM scanning guest RAM (`MADV_MERGEABLE`, the scanner run fast).
    Ksm,
    /// Compaction of all memory in a loop.
    Compaction,
}

impl HostNoise {
    /// Every kind.
    pub const ALL: [HostNoise; 6] = [
        HostNoise::None,
        HostNoise::MmapChurn,
        HostNoise::MprotectChurn,
        HostNoise::Pageout,
        HostNoise::Ksm,
        HostNoise::Compaction,
    ];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HostNoise::None => "none",
            HostNoise::MmapChurn => "mmap-churn",
            HostNoise::MprotectChurn => "mprotect-churn",
            HostNoise::Pageout => "pageout",
            HostNoise::Ksm => "ksm",
            HostNoise::Compaction => "compaction",
        }
    }

    /// Parses a name.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|n| n.name() == text).ok_or_else(|| {
            format!("unknown host noise '{text}' (choose none, mmap-churn, mprotect-churn, pageout, ksm or compaction)")
        })
    }

    /// The host setup the noise needs (a swap device, KSM's scanner).
    pub fn host_kinds(self) -> Vec<HostChangeKind> {
        match self {
            HostNoise::Pageout => vec![HostChangeKind::Swap],
            HostNoise::Ksm => vec![HostChangeKind::Ksm],
            HostNoise::Compaction => vec![HostChangeKind::Compaction],
            _ => Vec::new(),
        }
    }
}

/// The host-change driver's settings (`--host-changes`, `--host-change-rate`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostChangesConfig {
    /// The kinds, applied in turn.
    pub kinds: Vec<HostChangeKind>,
    /// Changes per second.
    pub rate_per_s: u64,
    /// Changes to make before the driver ends the guest's open-ended step (`churn`);
    /// without such a step the driver stops when the guest ends.
    pub events: u64,
    /// Largest range of one change, in 4 KiB pages.
    pub max_pages: u64,
    /// Seed of the random ranges.
    pub seed: u64,
    /// How long an mprotect window stays read-only, microseconds.
    pub window_us: u64,
}

impl Default for HostChangesConfig {
    fn default() -> Self {
        HostChangesConfig {
            kinds: vec![HostChangeKind::Swap],
            rate_per_s: 200,
            events: 200,
            max_pages: 256,
            seed: 11,
            window_us: 2000,
        }
    }
}

/// Steps that write guest memory after the first step (a write into an mprotect window
/// makes KVM_RUN fail with EFAULT: KVM cannot map a read-only page for writing).
const WRITING_STEPS: [&str; 4] = ["fill", "dirty", "churn", "balloon"];

impl HostChangesConfig {
    /// Checks the settings against the zones and the guest's steps: every kind must apply
    /// to at least one zone, and mprotect windows need a guest that only reads after its
    /// first step.
    pub fn validate(&self, zones: &[ZoneConfig], steps: &[String], touch_writes: bool) -> Result<(), ConfigError> {
        let bad =
            |field: &'static str, value: u64, reason: &'static str| ConfigError::BadSetting { field, value, reason };
        if !(1..=100_000).contains(&self.rate_per_s) {
            return Err(bad(
                "host_changes.rate_per_s",
                self.rate_per_s,
                "give 1 to 100000 changes per second (--host-change-rate)",
            ));
        }
        if !(1..=1 << 18).contains(&self.max_pages) {
            return Err(bad(
                "host_changes.max_pages",
                self.max_pages,
                "a host change covers 1 to 262144 pages (1 GiB)",
            ));
        }
        if self.events == 0 {
            return Err(bad("host_changes.events", 0, "give at least one change (--host-change-events)"));
        }
        for &kind in &self.kinds {
            let reasons: Vec<_> = zones.iter().map(|z| kind.refusal(z)).collect();
            if let Some(reason) = reasons.iter().copied().reduce(|a, b| a.and(b)).flatten() {
                return Err(ConfigError::BadWorkload {
                    field: "host_changes.kinds",
                    reason: format!("{} applies to no zone: {reason}", kind.name()),
                });
            }
        }
        if self.kinds.contains(&HostChangeKind::Mprotect) {
            let writes_later =
                steps.iter().skip(1).any(|s| WRITING_STEPS.contains(&s.as_str()) || (s == "touch" && touch_writes));
            if writes_later {
                return Err(ConfigError::BadWorkload {
                    field: "host_changes.kinds",
                    reason: "mprotect windows need a guest that only reads after its first step (e.g. --steps fill,verify,idle,verify or touch --access read): a guest write into a read-only window makes KVM_RUN fail with EFAULT, which this VMM does not wait out".into(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(backend: Backend, paging: PagingMode) -> ZoneConfig {
        ZoneConfig { paging, ..ZoneConfig::new(64 << 20, backend) }
    }

    #[test]
    fn every_kind_and_paging_mode_is_run_or_refused_with_a_reason() {
        let modes = [PagingMode::Kernel, PagingMode::Prefault, PagingMode::UffdMissing, PagingMode::UffdMinor];
        for kind in HostChangeKind::ALL {
            for paging in modes {
                for backend in [Backend::Anon, Backend::Memfd, Backend::Hugetlb] {
                    let mut z = zone(backend, paging);
                    z.thp = backend == Backend::Anon;
                    let refusal = kind.refusal(&z);
                    let expect_refused = match kind {
                        HostChangeKind::Swap => backend == Backend::Hugetlb,
                        HostChangeKind::Ksm | HostChangeKind::Thp => {
                            backend != Backend::Anon || paging == PagingMode::UffdMinor
                        }
                        HostChangeKind::Compaction | HostChangeKind::Mprotect => false,
                    };
                    assert_eq!(refusal.is_some(), expect_refused, "{kind:?} {paging:?} {backend:?}: {refusal:?}");
                }
            }
        }
    }

    #[test]
    fn noise_names_round_trip() {
        for n in HostNoise::ALL {
            assert_eq!(HostNoise::parse(n.name()).unwrap(), n);
        }
        assert!(HostNoise::parse("earthquake").unwrap_err().contains("mmap-churn"));
    }

    #[test]
    fn lists_parse_and_bad_settings_name_the_field() {
        assert_eq!(HostChangeKind::parse_list("mixed").unwrap(), HostChangeKind::ALL.to_vec());
        assert_eq!(HostChangeKind::parse_list("swap,ksm").unwrap(), vec![HostChangeKind::Swap, HostChangeKind::Ksm]);
        let err = HostChangeKind::parse_list("hotplug").unwrap_err().to_string();
        assert!(err.contains("unknown host change 'hotplug'") && err.contains("mixed"), "{err}");
        let zones = vec![zone(Backend::Memfd, PagingMode::UffdMinor)];
        let steps: Vec<String> = vec!["fill".into(), "verify".into()];
        let ksm = HostChangesConfig { kinds: vec![HostChangeKind::Ksm], ..Default::default() };
        let err = ksm.validate(&zones, &steps, false).unwrap_err().to_string();
        assert!(err.contains("ksm applies to no zone") && err.contains("backend=anon"), "{err}");
        let mprotect = HostChangesConfig { kinds: vec![HostChangeKind::Mprotect], ..Default::default() };
        mprotect.validate(&zones, &steps, false).unwrap();
        let churn: Vec<String> = vec!["fill".into(), "churn".into()];
        assert!(mprotect.validate(&zones, &churn, false).unwrap_err().to_string().contains("EFAULT"));
        let rate = HostChangesConfig { rate_per_s: 0, ..Default::default() };
        assert!(rate.validate(&zones, &steps, false).unwrap_err().to_string().contains("--host-change-rate"));
    }
}
