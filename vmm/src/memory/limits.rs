//! Host limits guest RAM must respect: total memory and swap, the address-space rlimit,
//! and the hugetlb pool. Parsing and policy are pure functions (unit-tested); the
//! readers of /proc and /sys are thin.

use std::path::PathBuf;

/// Errors checking guest RAM against the host's limits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    /// Lazily populated RAM larger than everything the host could ever hold.
    #[error("guest RAM of {requested_bytes} bytes ({requested_mib} MiB) in anon/memfd zones exceeds this host's memory plus swap ({limit_bytes} bytes, {limit_mib} MiB); give less memory, or use backend=file for RAM larger than the host")]
    TooMuchMemory {
        /// Bytes asked for in anon and memfd zones.
        requested_bytes: u64,
        /// The same in MiB.
        requested_mib: u64,
        /// MemTotal + SwapTotal.
        limit_bytes: u64,
        /// The same in MiB.
        limit_mib: u64,
    },
    /// RAM populated before the guest starts is more than the host has available.
    #[error("zones populated up front (paging=prefault, or uffd-minor's page cache fill: zone(s) {zones}) need {requested_mib} MiB but this host has only {available_mib} MiB available (MemAvailable + SwapFree); the kernel would OOM-kill the VM: give less memory, use paging=kernel or uffd-missing (populated on first touch), or free memory on the host")]
    NotEnoughAvailable {
        /// The zones populated up front.
        zones: String,
        /// Bytes they need, in MiB.
        requested_mib: u64,
        /// MemAvailable + SwapFree, in MiB.
        available_mib: u64,
    },
    /// Guest RAM does not fit in the process's address-space limit.
    #[error("guest RAM of {requested_bytes} bytes does not fit in this process's address-space limit (RLIMIT_AS, ulimit -v) of {limit_bytes} bytes; raise it with `ulimit -v unlimited` or give less memory")]
    AddressSpaceLimit {
        /// Bytes of guest RAM.
        requested_bytes: u64,
        /// The soft RLIMIT_AS.
        limit_bytes: u64,
    },
    /// The host has no pool for this huge page size.
    #[error("this host has no {page_kib} KiB huge pages ({dir} is missing); use hugepage=2M, or boot the host with hugepagesz={page_kib}K")]
    NoHugepageSize {
        /// Huge page size in KiB.
        page_kib: u64,
        /// The sysfs directory looked for.
        dir: String,
    },
    /// Too few free huge pages.
    #[error("hugetlb zones need {needed} huge pages of {page_kib} KiB but only {available} are free (free {free}, reserved {reserved}); as root run `echo {fix_total} > {nr_path}` (and give them back afterwards)")]
    HugepagePoolShort {
        /// Huge page size in KiB.
        page_kib: u64,
        /// Pages the zones need.
        needed: u64,
        /// free - reserved.
        available: u64,
        /// free_hugepages.
        free: u64,
        /// resv_hugepages.
        reserved: u64,
        /// What nr_hugepages should be set to.
        fix_total: u64,
        /// The file to write it to.
        nr_path: String,
    },
    /// A host file could not be read.
    #[error("cannot read {path}: {reason}")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The figures of /proc/meminfo that matter here, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostMemInfo {
    /// MemTotal.
    pub mem_total_bytes: u64,
    /// SwapTotal.
    pub swap_total_bytes: u64,
    /// MemAvailable: what can be allocated without swapping, by the kernel's estimate.
    pub mem_available_bytes: u64,
    /// SwapFree.
    pub swap_free_bytes: u64,
}

impl HostMemInfo {
    /// Parses the text of /proc/meminfo.
    pub fn parse(text: &str) -> Self {
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kib| kib.saturating_mul(1024))
        };
        HostMemInfo {
            mem_total_bytes: field("MemTotal"),
            swap_total_bytes: field("SwapTotal"),
            mem_available_bytes: field("MemAvailable"),
            swap_free_bytes: field("SwapFree"),
        }
    }

    /// Reads /proc/meminfo.
    pub fn read() -> Result<Self, LimitError> {
        let text = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| LimitError::Unreadable { path: "/proc/meminfo".into(), reason: e.to_string() })?;
        Ok(Self::parse(&text))
    }
}

/// Refuses lazily populated (anon, memfd) RAM above MemTotal + SwapTotal: a sparse
/// workload may use more than is free, but never more than the host could ever hold.
pub fn check_host_memory(lazy_bytes: u64, host: HostMemInfo) -> Result<(), LimitError> {
    let limit_bytes = host.mem_total_bytes.saturating_add(host.swap_total_bytes);
    if limit_bytes > 0 && lazy_bytes > limit_bytes {
        return Err(LimitError::TooMuchMemory {
            requested_bytes: lazy_bytes,
            requested_mib: lazy_bytes >> 20,
            limit_bytes,
            limit_mib: limit_bytes >> 20,
        });
    }
    Ok(())
}

/// Refuses RAM populated before the guest starts (`upfront_bytes`, in `zones`) beyond
/// MemAvailable + SwapFree: unlike lazily populated RAM, all of it is allocated at once,
/// and the kernel's answer to too much is the OOM killer, with no message from us.
pub fn check_available_memory(upfront_bytes: u64, zones: &str, host: HostMemInfo) -> Result<(), LimitError> {
    let available = host.mem_available_bytes.saturating_add(host.swap_free_bytes);
    if host.mem_total_bytes > 0 && upfront_bytes > available {
        return Err(LimitError::NotEnoughAvailable {
            zones: zones.to_string(),
            requested_mib: upfront_bytes.div_ceil(1 << 20),
            available_mib: available >> 20,
        });
    }
    Ok(())
}

/// Headroom the VMM itself needs in its address space besides guest RAM (code, heap,
/// thread stacks).
pub const VMM_ADDRESS_SPACE_HEADROOM_BYTES: u64 = 1 << 30;

/// Refuses guest RAM that cannot fit below RLIMIT_AS (`None`: unlimited).
pub fn check_address_space(total_bytes: u64, rlimit_as: Option<u64>) -> Result<(), LimitError> {
    match rlimit_as {
        Some(limit_bytes) if total_bytes.saturating_add(VMM_ADDRESS_SPACE_HEADROOM_BYTES) > limit_bytes => {
            Err(LimitError::AddressSpaceLimit { requested_bytes: total_bytes, limit_bytes })
        }
        _ => Ok(()),
    }
}

/// The soft RLIMIT_AS of this process, or `None` when unlimited.
pub fn rlimit_address_space() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// The state of one huge page pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HugepagePool {
    /// nr_hugepages.
    pub total: u64,
    /// free_hugepages.
    pub free: u64,
    /// resv_hugepages (free pages already promised to mappings).
    pub reserved: u64,
}

/// The sysfs directory of the pool of `page_bytes` huge pages.
pub fn hugepage_dir(page_bytes: u64) -> PathBuf {
    PathBuf::from(format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page_bytes >> 10))
}

impl HugepagePool {
    /// Reads the pool of `page_bytes` huge pages from sysfs.
    pub fn read(page_bytes: u64) -> Result<Self, LimitError> {
        let dir = hugepage_dir(page_bytes);
        if !dir.is_dir() {
            return Err(LimitError::NoHugepageSize { page_kib: page_bytes >> 10, dir: dir.display().to_string() });
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .map_err(|e| LimitError::Unreadable { path: path.display().to_string(), reason: e.to_string() })
                .and_then(|text| {
                    text.trim()
                        .parse::<u64>()
                        .map_err(|e| LimitError::Unreadable { path: path.display().to_string(), reason: e.to_string() })
                })
        };
        Ok(HugepagePool {
            total: read("nr_hugepages")?,
            free: read("free_hugepages")?,
            reserved: read("resv_hugepages")?,
        })
    }
}

/// Checks that `pool` has `needed` unreserved free pages of `page_bytes`.
pub fn check_hugepage_pool(page_bytes: u64, needed: u64, pool: HugepagePool) -> Result<(), LimitError> {
    let available = pool.free.saturating_sub(pool.reserved);
    if available >= needed {
        return Ok(());
    }
    let nr_path = if page_bytes == 2 << 20 {
        "/proc/sys/vm/nr_hugepages".to_string()
    } else {
        hugepage_dir(page_bytes).join("nr_hugepages").display().to_string()
    };
    Err(LimitError::HugepagePoolShort {
        page_kib: page_bytes >> 10,
        needed,
        available,
        free: pool.free,
        reserved: pool.reserved,
        fix_total: pool.total + (needed - available),
        nr_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let info = HostMemInfo::parse("MemTotal:       24000000 kB\nMemFree: 1 kB\nSwapTotal:      1024 kB\n");
        assert_eq!(
            info,
            HostMemInfo { mem_total_bytes: 24_000_000 * 1024, swap_total_bytes: 1024 * 1024, ..HostMemInfo::default() }
        );
        let info = HostMemInfo::parse("MemTotal: 8 kB\nMemAvailable: 4 kB\nSwapFree: 2 kB\n");
        assert_eq!((info.mem_available_bytes, info.swap_free_bytes), (4096, 2048));
    }

    #[test]
    fn lazy_memory_may_exceed_free_but_not_total_plus_swap() {
        let host = HostMemInfo { mem_total_bytes: 8 << 30, swap_total_bytes: 2 << 30, ..HostMemInfo::default() };
        assert!(check_host_memory(10 << 30, host).is_ok());
        let err = check_host_memory(11 << 30, host).unwrap_err().to_string();
        assert!(err.contains("11264 MiB") && err.contains("10240 MiB") && err.contains("backend=file"), "{err}");
    }

    #[test]
    fn memory_populated_up_front_must_fit_in_what_is_available() {
        let host = HostMemInfo {
            mem_total_bytes: 24 << 30,
            mem_available_bytes: 10 << 30,
            swap_free_bytes: 1 << 30,
            ..HostMemInfo::default()
        };
        assert!(check_available_memory(11 << 30, "0", host).is_ok());
        let err = check_available_memory(12 << 30, "0, 2", host).unwrap_err().to_string();
        assert!(err.contains("zone(s) 0, 2") && err.contains("12288 MiB") && err.contains("11264 MiB"), "{err}");
        assert!(err.contains("paging=kernel"), "{err}");
    }

    #[test]
    fn address_space_limit_names_the_limit_and_the_fix() {
        assert!(check_address_space(64 << 30, None).is_ok());
        assert!(check_address_space(1 << 30, Some(4 << 30)).is_ok());
        let err = check_address_space(4 << 30, Some(4 << 30)).unwrap_err().to_string();
        assert!(err.contains("RLIMIT_AS") && err.contains("ulimit -v"), "{err}");
    }

    #[test]
    fn short_hugepage_pool_says_how_many_and_the_exact_fix() {
        let pool = HugepagePool { total: 10, free: 6, reserved: 2 };
        assert!(check_hugepage_pool(2 << 20, 4, pool).is_ok());
        let err = check_hugepage_pool(2 << 20, 128, pool).unwrap_err().to_string();
        assert!(err.contains("need 128 huge pages of 2048 KiB but only 4 are free"), "{err}");
        assert!(err.contains("echo 134 > /proc/sys/vm/nr_hugepages"), "{err}");
        let err = check_hugepage_pool(1 << 30, 1, HugepagePool::default()).unwrap_err().to_string();
        assert!(err.contains("hugepages-1048576kB/nr_hugepages"), "{err}");
    }
}
