//! KVM's secondary-MMU trace events as tracefs prints them, parsed.

/// One trace event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// CLOCK_MONOTONIC timestamp, ns (the instance runs with `trace_clock` = mono).
    pub ts_ns: u64,
    /// The task that hit the event.
    pub tid: u32,
    /// Its name (e.g. `fl-vcpu0`, `ksmd`, `kswapd0`).
    pub comm: String,
    /// What happened.
    pub kind: EventKind,
}

/// The events we record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// `kvm:kvm_unmap_hva_range`: the MMU notifier zapped KVM's mappings of `[start, end)`.
    Unmap {
        /// First host-virtual byte.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// `kvm:kvm_age_hva`: the host aged `[start, end)` (reclaim's accessed-bit scan).
    Age {
        /// First host-virtual byte.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// `kvm:kvm_test_age_hva`.
    TestAge {
        /// The page.
        hva: u64,
    },
    /// `kvm:kvm_page_fault` (hardware two-dimensional paging faults; none under shadow
    /// paging hosts such as nested `kvm_pvm`).
    PageFault {
        /// The faulting guest address.
        address: u64,
    },
    /// `kvmmmu:kvm_mmu_set_spte`: KVM mapped guest frame `gfn` (a refault once unmapped).
    SetSpte {
        /// Guest frame number.
        gfn: u64,
        /// Page-table level (1 = 4 KiB, 2 = 2 MiB).
        level: u8,
        /// Whether the mapping is writable.
        writable: bool,
    },
    /// `kvmmmu:kvm_mmu_prepare_zap_page`: KVM zapped a shadow page.
    ZapPage {
        /// Its guest frame number.
        gfn: u64,
    },
}

impl EventKind {
    /// A short name.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Unmap { .. } => "kvm_unmap_hva_range",
            EventKind::Age { .. } => "kvm_age_hva",
            EventKind::TestAge { .. } => "kvm_test_age_hva",
            EventKind::PageFault { .. } => "kvm_page_fault",
            EventKind::SetSpte { .. } => "kvm_mmu_set_spte",
            EventKind::ZapPage { .. } => "kvm_mmu_prepare_zap_page",
        }
    }

    /// The guest frames a `SetSpte` maps: `[gfn, gfn + 512^(level-1))`.
    pub fn spte_frames(&self) -> Option<(u64, u64)> {
        match *self {
            EventKind::SetSpte { gfn, level, .. } => {
                let frames = 1u64 << (9 * u32::from(level.saturating_sub(1)).min(3));
                let base = gfn / frames * frames;
                Some((base, base + frames))
            }
            _ => None,
        }
    }
}

/// Parses one line of a tracefs `trace` file; `None` for comments and other events.
///
/// Line shape: `  comm-tid  [cpu] flags  secs.micros: event: text`.
pub fn parse_line(line: &str) -> Option<TraceEvent> {
    if line.starts_with('#') {
        return None;
    }
    let bracket = line.find(" [")?;
    let (task, rest) = line.split_at(bracket);
    let task = task.trim();
    let dash = task.rfind('-')?;
    let (comm, tid) = (&task[..dash], task[dash + 1..].parse().ok()?);
    let rest = &rest[rest.find(']')? + 1..];
    // flags, then "secs.micros:"
    let mut parts = rest.split_whitespace();
    let mut ts = parts.next()?;
    if !ts.ends_with(':') {
        ts = parts.next()?;
    }
    let ts_ns = parse_seconds(ts.strip_suffix(':')?)?;
    let after_ts = &rest[rest.find(ts)? + ts.len()..];
    let (event, text) = after_ts.trim_start().split_once(": ")?;
    let kind = parse_kind(event, text)?;
    Some(TraceEvent { ts_ns, tid, comm: comm.to_string(), kind })
}

fn parse_seconds(text: &str) -> Option<u64> {
    let (secs, frac) = text.split_once('.')?;
    let secs: u64 = secs.parse().ok()?;
    let digits = frac.len().min(9);
    let frac: u64 = frac[..digits].parse().ok()?;
    Some(secs * 1_000_000_000 + frac * 10u64.pow(9 - digits as u32))
}

fn hex(text: &str) -> Option<u64> {
    u64::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// The value after `key ` in `text` (`gfn 105 spte ...` → `105`).
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next();
        }
    }
    None
}

fn range(text: &str) -> Option<(u64, u64)> {
    let (_, span) = text.rsplit_once(": ")?;
    let (a, b) = span.split_once(" -- ")?;
    Some((hex(a)?, hex(b)?))
}

fn parse_kind(event: &str, text: &str) -> Option<EventKind> {
    Some(match event {
        "kvm_unmap_hva_range" => {
            let (start, end) = range(text)?;
            EventKind::Unmap { start, end }
        }
        "kvm_age_hva" => {
            let (start, end) = range(text)?;
            EventKind::Age { start, end }
        }
        "kvm_test_age_hva" => EventKind::TestAge { hva: hex(text.rsplit_once(": ")?.1)? },
        "kvm_page_fault" => EventKind::PageFault { address: hex(field(text, "address")?)? },
        "kvm_mmu_set_spte" => {
            let gfn = hex(field(text, "gfn")?)?;
            let level = field(text, "level")?.parse().ok()?;
            let access = text.split_once('(')?.1.split_once(')')?.0;
            EventKind::SetSpte { gfn, level, writable: access.contains('w') }
        }
        "kvm_mmu_prepare_zap_page" => EventKind::ZapPage { gfn: hex(field(text, "gfn")?)? },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_lines_this_host_prints() {
        let e = parse_line("        fl-vcpu0-10630   [000] .N.1.   371.388157: kvm_mmu_set_spte: gfn 105 spte 21c6d7e67 (rwxu) level 1 at 10cdae828").unwrap();
        assert_eq!((e.ts_ns, e.tid, e.comm.as_str()), (371_388_157_000, 10630, "fl-vcpu0"));
        assert_eq!(e.kind, EventKind::SetSpte { gfn: 0x105, level: 1, writable: true });
        assert_eq!(e.kind.spte_frames(), Some((0x105, 0x106)));
        let e = parse_line("       faultline-10628   [001] .....   371.341408: kvm_unmap_hva_range: mmu notifier unmap range: 0x007f24ea508000 -- 0x007f24ea600000").unwrap();
        assert_eq!(e.kind, EventKind::Unmap { start: 0x7f24_ea50_8000, end: 0x7f24_ea60_0000 });
        let e = parse_line("            ksmd-40      [001] .....  12.000001: kvm_test_age_hva: mmu notifier test age hva: 0x007f0000001000").unwrap();
        assert_eq!((e.comm.as_str(), e.kind), ("ksmd", EventKind::TestAge { hva: 0x7f00_0000_1000 }));
        let e = parse_line(" a-b-7 [000] ..... 1.5: kvm_mmu_set_spte: gfn 200 spte 1 (r-xu) level 2 at 0").unwrap();
        assert_eq!(e.comm, "a-b");
        assert_eq!(e.kind.spte_frames(), Some((0x200, 0x400)));
        assert!(matches!(e.kind, EventKind::SetSpte { writable: false, .. }));
        assert_eq!(parse_line("# tracer: nop"), None);
        assert_eq!(parse_line(" x-1 [000] ..... 1.0: kvm_exit: reason 1"), None);
    }
}
