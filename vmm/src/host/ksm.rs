//! KSM's scanner (`/sys/kernel/mm/ksm`) set to run and scan fast for the life of a guard,
//! its previous settings restored on drop; this process's own KSM figures.

use super::sysfs::{self, SettingGuard};
use super::HostError;

const KSM: &str = "/sys/kernel/mm/ksm";

/// KSM running with fast scan settings. The previous `run`, `pages_to_scan` and
/// `sleep_millisecs` come back on drop (in reverse order: `run` last).
#[derive(Debug)]
pub struct KsmScanner {
    // Dropped in declaration order: the scan rate first, then `run`.
    _sleep: SettingGuard,
    _pages: SettingGuard,
    _run: SettingGuard,
}

impl KsmScanner {
    /// Starts KSM scanning `pages_to_scan` pages every `sleep_ms` milliseconds.
    pub fn start(pages_to_scan: u64, sleep_ms: u64) -> Result<Self, HostError> {
        if !std::path::Path::new(KSM).join("run").exists() {
            return Err(HostError::Unavailable {
                feature: "KSM",
                reason: format!("{KSM} is missing (a kernel without CONFIG_KSM)"),
            });
        }
        let run = SettingGuard::set(format!("{KSM}/run"), "1")?;
        let pages = SettingGuard::set(format!("{KSM}/pages_to_scan"), &pages_to_scan.to_string())?;
        let sleep = SettingGuard::set(format!("{KSM}/sleep_millisecs"), &sleep_ms.to_string())?;
        Ok(KsmScanner { _sleep: sleep, _pages: pages, _run: run })
    }

    /// KSM's full scans so far (host-wide).
    pub fn full_scans() -> u64 {
        sysfs::read_u64(format!("{KSM}/full_scans")).unwrap_or(0)
    }
}

/// This process's pages that KSM has merged (`/proc/self/ksm_merging_pages`).
pub fn process_merging_pages() -> u64 {
    sysfs::read_u64("/proc/self/ksm_merging_pages").unwrap_or(0)
}

/// KSM's `run` setting now.
pub fn run_setting() -> Result<String, HostError> {
    sysfs::read(format!("{KSM}/run"))
}
