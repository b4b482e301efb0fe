//! A private zram swap device for the life of a guard: hot-added (so no other user's
//! zram device is touched), sized, `mkswap`-ed and `swapon`-ed at the highest priority;
//! on drop `swapoff`, reset and hot-removed again.

use std::path::PathBuf;
use std::process::Command;

use super::{sysfs, HostError};

const CONTROL: &str = "/sys/class/zram-control";

/// Swap priority of the device (the highest, so our page-outs land on it).
pub const SWAP_PRIORITY: i32 = 32767;

/// A zram device in use as swap. Everything is put back on drop.
#[derive(Debug)]
pub struct ZramSwap {
    id: u32,
    size_bytes: u64,
    swapped_on: bool,
}

impl ZramSwap {
    /// Creates a zram device of `size_bytes` (uncompressed) and swaps on it.
    pub fn create(size_bytes: u64) -> Result<Self, HostError> {
        if !std::path::Path::new(CONTROL).join("hot_add").exists() {
            return Err(HostError::Unavailable {
                feature: "zram",
                reason: format!("{CONTROL}/hot_add is missing (load the zram module: modprobe zram)"),
            });
        }
        let id: u32 = sysfs::read(format!("{CONTROL}/hot_add"))?.parse().map_err(|_| HostError::Unavailable {
            feature: "zram",
            reason: "hot_add did not return a device number".into(),
        })?;
        // From here on, drop undoes whatever was done.
        let mut swap = ZramSwap { id, size_bytes, swapped_on: false };
        sysfs::write(swap.sys("disksize"), &size_bytes.to_string())?;
        run("mkswap", &[&swap.device()])?;
        run("swapon", &["-p", &SWAP_PRIORITY.to_string(), &swap.device()])?;
        swap.swapped_on = true;
        Ok(swap)
    }

    /// The block device, e.g. `/dev/zram1`.
    pub fn device(&self) -> String {
        format!("/dev/zram{}", self.id)
    }

    /// The device's size, bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Pages the device holds now (swapped out onto it), from its `mm_stat`.
    pub fn stored_pages(&self) -> u64 {
        // mm_stat: orig_data_size compr_data_size mem_used_total ...
        sysfs::read(self.sys("mm_stat"))
            .ok()
            .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
            .map_or(0, |bytes| bytes / 4096)
    }

    fn sys(&self, file: &str) -> PathBuf {
        PathBuf::from(format!("/sys/block/zram{}/{file}", self.id))
    }
}

impl Drop for ZramSwap {
    fn drop(&mut self) {
        if self.swapped_on {
            if let Err(e) = run("swapoff", &[&self.device()]) {
                tracing::warn!("{e}");
            }
        }
        if let Err(e) = sysfs::write(self.sys("reset"), "1") {
            tracing::warn!("{e}");
        }
        if let Err(e) = sysfs::write(format!("{CONTROL}/hot_remove"), &self.id.to_string()) {
            tracing::warn!("{e}");
        }
    }
}

/// Whether `/dev/zramN` is listed in /proc/swaps.
pub fn is_swap(device: &str) -> bool {
    std::fs::read_to_string("/proc/swaps").is_ok_and(|t| t.lines().any(|l| l.split_whitespace().next() == Some(device)))
}

fn run(program: &'static str, args: &[&str]) -> Result<(), HostError> {
    let fail = |reason: String| HostError::Program { program, args: args.join(" "), reason };
    let out = Command::new(program).args(args).output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}
