//! A memory cgroup of our own for the VMM process, so the swap changer can squeeze it
//! (the second way to swap guest pages out, besides `MADV_PAGEOUT`): the process moves
//! into a fresh child of its memory cgroup before guest RAM is allocated (pages are
//! charged where they are first touched), a squeeze sets the limit below the usage (the
//! kernel reclaims, to swap) and lifts it again. cgroup v2 uses `memory.high`; on hosts
//! whose memory controller is on cgroup v1 (this project's machines) `memory.limit_in_bytes`.
//! On drop the process moves back and the child is removed.

use std::path::{Path, PathBuf};

use super::{sysfs, HostError};

/// The process inside a memory cgroup of its own.
#[derive(Debug)]
pub struct MemcgSqueeze {
    dir: PathBuf,
    parent: PathBuf,
    v2: bool,
}

impl MemcgSqueeze {
    /// Moves this process into a new child of its memory cgroup.
    pub fn enter() -> Result<Self, HostError> {
        let (parent, v2) = own_memory_cgroup()?;
        let dir = parent.join(format!("faultline-{}", std::process::id()));
        sysfs::create_dir(&dir)?;
        let memcg = MemcgSqueeze { dir, parent, v2 };
        sysfs::write(memcg.dir.join("cgroup.procs"), &std::process::id().to_string())?;
        Ok(memcg)
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this is cgroup v2 (`memory.high`) rather than v1 (`memory.limit_in_bytes`).
    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// Memory charged to the cgroup now, bytes.
    pub fn usage_bytes(&self) -> u64 {
        let file = if self.v2 { "memory.current" } else { "memory.usage_in_bytes" };
        sysfs::read_u64(self.dir.join(file)).unwrap_or(0)
    }

    /// Limits the cgroup to `bytes` (the kernel reclaims down to it), then lifts the
    /// limit. Returns the usage reached under the limit.
    pub fn squeeze(&self, bytes: u64) -> Result<u64, HostError> {
        let file = if self.v2 { "memory.high" } else { "memory.limit_in_bytes" };
        let result = sysfs::write(self.dir.join(file), &bytes.to_string());
        let reached = self.usage_bytes();
        self.release();
        result.map(|()| reached)
    }

    fn release(&self) {
        let (file, unlimited) = if self.v2 { ("memory.high", "max") } else { ("memory.limit_in_bytes", "-1") };
        if let Err(e) = sysfs::write(self.dir.join(file), unlimited) {
            tracing::warn!("{e}");
        }
    }
}

impl Drop for MemcgSqueeze {
    fn drop(&mut self) {
        self.release();
        if let Err(e) = sysfs::write(self.parent.join("cgroup.procs"), &std::process::id().to_string()) {
            tracing::warn!("could not move back to {}: {e}", self.parent.display());
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!("could not remove {}: {e}", self.dir.display());
        }
    }
}

/// The directory of this process's memory cgroup and whether it is cgroup v2.
fn own_memory_cgroup() -> Result<(PathBuf, bool), HostError> {
    let unavailable = |reason: String| HostError::Unavailable { feature: "a memory cgroup", reason };
    let cgroups = sysfs::read("/proc/self/cgroup")?;
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    // v1: "N:memory:/path" with a cgroup mount whose options name memory.
    if let Some(path) = cgroups.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers.split(',').any(|c| c == "memory").then(|| path.to_string())
    }) {
        let root = mounts.lines().find_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            (f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "memory")).then(|| PathBuf::from(f[1]))
        });
        let root = root.ok_or_else(|| unavailable("the memory controller's v1 hierarchy is not mounted".into()))?;
        return Ok((root.join(path.trim_start_matches('/')), false));
    }
    // v2: "0::/path" on a cgroup2 mount with the memory controller enabled.
    let path = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| unavailable("no cgroup v2 line in /proc/self/cgroup".into()))?;
    let root = mounts.lines().find_map(|l| {
        let f: Vec<_> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    });
    let root = root.ok_or_else(|| unavailable("neither a v1 memory hierarchy nor cgroup2 is mounted".into()))?;
    let dir = root.join(path.trim_start_matches('/'));
    let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return Err(unavailable(format!("the memory controller is not enabled for {}", dir.display())));
    }
    Ok((dir, true))
}
