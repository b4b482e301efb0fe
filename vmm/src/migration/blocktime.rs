//! Post-copy blocktime as QEMU defines it: per vCPU, the time that vCPU's thread waited
//! for pages from the source; in total, the time during which every vCPU waited at once
//! (the guest made no progress at all).
//!
//! The fault engine asks userfaultfd for `UFFD_FEATURE_THREAD_ID`, so each fault names
//! the thread that took it; a vCPU thread is called `fl-vcpuN`, which is how a thread id
//! becomes a vCPU index here. Faults of other threads (the VMM's own accesses to guest
//! RAM) are summed apart. Without THREAD_ID (thread 0) a fault counts as another thread's.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// One fault's wait, in ns since the recorder's epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Wait {
    /// The vCPU that waited, `None` for another thread.
    vcpu: Option<usize>,
    from_ns: u64,
    to_ns: u64,
}

/// The blocktime figures of one post-copy run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlocktimeSummary {
    /// Per vCPU, the time it waited for pages (overlapping waits counted once), ms.
    pub per_vcpu_ms: Vec<f64>,
    /// The time during which every vCPU waited at once, ms (QEMU's `postcopy-blocktime`).
    pub all_vcpus_ms: f64,
    /// Waits of threads that are not vCPUs, summed, ms.
    pub other_threads_ms: f64,
}

/// Records the waits of post-copy faults; [`Blocktime::summary`] turns them into figures.
#[derive(Debug)]
pub struct Blocktime {
    vcpus: usize,
    epoch: Instant,
    waits: Mutex<Vec<Wait>>,
    /// Thread id to vCPU index, read once per thread from procfs.
    threads: Mutex<HashMap<u32, Option<usize>>>,
}

impl Blocktime {
    /// A recorder for a VM of `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Blocktime { vcpus, epoch: Instant::now(), waits: Mutex::new(Vec::new()), threads: Mutex::new(HashMap::new()) }
    }

    /// A fault of `thread` read at `started` has just been resolved.
    pub fn record(&self, thread: u32, started: Instant) {
        let now = Instant::now();
        let vcpu = *self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(thread)
            .or_insert_with(|| vcpu_of_thread(thread));
        let ns = |at: Instant| at.saturating_duration_since(self.epoch).as_nanos().min(u64::MAX as u128) as u64;
        let wait = Wait { vcpu, from_ns: ns(started), to_ns: ns(now) };
        self.waits.lock().unwrap_or_else(|e| e.into_inner()).push(wait);
    }

    /// The figures so far.
    pub fn summary(&self) -> BlocktimeSummary {
        summarize(self.vcpus, &self.waits.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The vCPU index of thread `tid` of this process, from its name (`fl-vcpuN`).
fn vcpu_of_thread(tid: u32) -> Option<usize> {
    if tid == 0 {
        return None;
    }
    let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
    comm.trim_end().strip_prefix("fl-vcpu")?.parse().ok()
}

/// Sorted, merged `[from, to)` spans.
fn merged(mut spans: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    spans.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (from, to) in spans {
        match out.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => out.push((from, to)),
        }
    }
    out
}

fn summarize(vcpus: usize, waits: &[Wait]) -> BlocktimeSummary {
    let ms = |ns: u64| ns as f64 / 1e6;
    let per_vcpu: Vec<Vec<(u64, u64)>> = (0..vcpus)
        .map(|v| merged(waits.iter().filter(|w| w.vcpu == Some(v)).map(|w| (w.from_ns, w.to_ns)).collect()))
        .collect();
    // Sweep the vCPUs' merged spans: where all of them are inside one, the guest stood.
    let mut edges: Vec<(u64, i64)> = per_vcpu.iter().flatten().flat_map(|&(from, to)| [(from, 1), (to, -1)]).collect();
    // At one instant, ends before starts: touching spans do not overlap.
    edges.sort_unstable();
    let (mut blocked, mut all_since, mut all_ns) = (0i64, 0u64, 0u64);
    for (at, step) in edges {
        if vcpus > 0 && blocked == vcpus as i64 {
            all_ns += at - all_since;
        }
        blocked += step;
        all_since = at;
    }
    let other_ns = waits.iter().filter(|w| w.vcpu.is_none_or(|v| v >= vcpus)).map(|w| w.to_ns - w.from_ns).sum();
    BlocktimeSummary {
        per_vcpu_ms: per_vcpu.iter().map(|spans| ms(spans.iter().map(|(f, t)| t - f).sum())).collect(),
        all_vcpus_ms: ms(all_ns),
        other_threads_ms: ms(other_ns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(vcpu: Option<usize>, from_ms: u64, to_ms: u64) -> Wait {
        Wait { vcpu, from_ns: from_ms * 1_000_000, to_ns: to_ms * 1_000_000 }
    }

    #[test]
    fn per_vcpu_counts_overlaps_once_and_all_needs_every_vcpu() {
        let waits = [
            wait(Some(0), 0, 10),
            wait(Some(0), 5, 12), // overlaps the first: vCPU 0 waited 0..12
            wait(Some(1), 8, 20), // both wait in 8..12
            wait(Some(1), 30, 31),
            wait(None, 0, 100),
            wait(Some(7), 0, 3), // a vCPU this VM does not have: another thread
        ];
        let s = summarize(2, &waits);
        assert_eq!(s.per_vcpu_ms, vec![12.0, 13.0]);
        assert_eq!(s.all_vcpus_ms, 4.0);
        assert_eq!(s.other_threads_ms, 103.0);
    }

    #[test]
    fn one_vcpu_is_blocked_whenever_it_waits_and_touching_spans_do_not_overlap() {
        let s = summarize(1, &[wait(Some(0), 0, 5), wait(Some(0), 5, 6), wait(Some(0), 10, 11)]);
        assert_eq!((s.per_vcpu_ms[0], s.all_vcpus_ms), (7.0, 7.0));
        let s = summarize(2, &[wait(Some(0), 0, 5), wait(Some(1), 5, 9)]);
        assert_eq!(s.all_vcpus_ms, 0.0);
        assert_eq!(summarize(0, &[]), BlocktimeSummary::default());
    }

    #[test]
    fn this_thread_is_not_a_vcpu_and_a_named_one_is() {
        assert_eq!(vcpu_of_thread(0), None);
        assert_eq!(vcpu_of_thread(rustix::thread::gettid().as_raw_nonzero().get() as u32), None);
        let tid = std::thread::Builder::new()
            .name("fl-vcpu3".into())
            .spawn(|| {
                let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
                vcpu_of_thread(tid)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(tid, Some(3));
    }
}
