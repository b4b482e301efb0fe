//! `--host-noise`: background activity in the VMM process or on the host while the guest
//! touches memory, to see how much each moves fault latency. Page faults take the
//! process's mmap lock for reading (or, since Linux 6.4, only the faulting VMA's lock);
//! `mmap`/`munmap`/`mprotect` take it for writing; reclaim, KSM and compaction walk the
//! same page tables. The noise runs from the VM's start until it stops.

use std::time::Duration;

use faultline_abi as abi;
use serde::Serialize;

use super::ops::{self, HostRange};
use super::Target;
pub use crate::config::HostNoise;
use crate::vstate::VmControl;

/// What the noise did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NoiseReport {
    /// The noise.
    pub noise: String,
    /// Loop iterations (maps, protects, page-outs, compactions).
    pub iterations: u64,
    /// Failed operations (the first message kept).
    pub errors: u64,
    /// The first error.
    pub first_error: Option<String>,
}

/// Runs `noise` on this thread until the VM stops. `targets` are the guest RAM ranges
/// (anon ones for KSM).
pub fn run(noise: HostNoise, targets: &[Target], control: &VmControl) -> NoiseReport {
    let mut report = NoiseReport { noise: noise.name().into(), ..NoiseReport::default() };
    let note = |r: std::io::Result<()>, report: &mut NoiseReport| {
        report.iterations += 1;
        if let Err(e) = r {
            report.errors += 1;
            report.first_error.get_or_insert_with(|| e.to_string());
        }
    };
    let mut rng = 0x5eed_u64;
    let mut next = move || {
        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        abi::splitmix64(rng)
    };
    match noise {
        HostNoise::None => {}
        HostNoise::MmapChurn => {
            while !control.is_stopping() {
                note(map_touch_unmap(64 << 10), &mut report);
            }
        }
        HostNoise::MprotectChurn => {
            let Some(scratch) = Scratch::new(2 << 20) else {
                report.errors += 1;
                report.first_error = Some("cannot map the scratch region".into());
                return report;
            };
            while !control.is_stopping() {
                let page = HostRange { hva: scratch.0.hva + next() % 512 * 4096, len: 4096 };
                note(ops::protect_read_only(page).and_then(|()| ops::unprotect(page)), &mut report);
            }
        }
        HostNoise::Pageout => {
            while !control.is_stopping() && !targets.is_empty() {
                let t = &targets[(next() % targets.len() as u64) as usize];
                let pages = t.range.len / 4096;
                let (first, len) = (next() % pages, 1 + next() % 256);
                let range = HostRange { hva: t.hva + first * 4096, len: len.min(pages - first) * 4096 };
                note(ops::page_out(range), &mut report);
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        HostNoise::Ksm => {
            for t in targets {
                note(ops::merge(HostRange { hva: t.hva, len: t.range.len }), &mut report);
            }
            while !control.is_stopping() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        HostNoise::Compaction => {
            while !control.is_stopping() {
                note(ops::compact_memory(), &mut report);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    report
}

fn map_touch_unmap(len: usize) -> std::io::Result<()> {
    let scratch = Scratch::new(len).ok_or_else(std::io::Error::last_os_error)?;
    // SAFETY: the first byte of the private mapping just made.
    unsafe { (scratch.0.hva as *mut u8).write_volatile(1) };
    Ok(())
}

/// A private scratch mapping, unmapped on drop.
struct Scratch(HostRange);

impl Scratch {
    fn new(len: usize) -> Option<Self> {
        // SAFETY: a fresh private mapping at an address the kernel chooses.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (addr != libc::MAP_FAILED).then(|| Scratch(HostRange { hva: addr as u64, len: len as u64 }))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, used by nobody else.
        unsafe { libc::munmap(self.0.hva as *mut libc::c_void, self.0.len as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_loops_run() {
        map_touch_unmap(64 << 10).unwrap();
        let s = Scratch::new(8192).unwrap();
        let page = HostRange { hva: s.0.hva, len: 4096 };
        ops::protect_read_only(page).unwrap();
        ops::unprotect(page).unwrap();
    }
}
