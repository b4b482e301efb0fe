//! The guest <-> VMM ABI of Faultline's tiny guest.
//!
//! Everything both sides must agree on lives here, in one `no_std` file: I/O ports, the
//! guest physical layout the loader and the guest share, the kernel command-line keys
//! that choose workloads, the shape of the report lines the guest prints on the serial
//! port, the exit statuses, and the latency histogram buckets.
//!
//! The guest is booted by the PVH protocol, so any VMM that implements PVH (QEMU's
//! `-kernel`, Cloud Hypervisor, Firecracker-with-PVH) can boot it. Nothing here is
//! specific to Faultline's VMM except `fl.tsc_khz`, which is optional.
#![no_std]
#![deny(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod virtio;

// ---------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------

/// The 16550 UART the guest reports on (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;

/// The paravirtual console of the built-in guest (Faultline only; QEMU has nothing
/// here). A 32-bit read returns [`PV_CONSOLE_MAGIC`] when the device is there (all ones
/// or zero otherwise: the guest then writes to the UART). A 32-bit write names the guest
/// physical address of a buffer: a little-endian `u32` length, then that many bytes
/// (at most [`PV_CONSOLE_MAX`]), which the VMM takes as if they had been written to the
/// UART one by one: one VM exit per buffer instead of one per byte.
pub const PV_CONSOLE_PORT: u16 = 0xfc0;
/// Ports the paravirtual console claims.
pub const PV_CONSOLE_PORTS: u16 = 4;
/// What a read of [`PV_CONSOLE_PORT`] returns when the paravirtual console is there
/// ("FLPC").
pub const PV_CONSOLE_MAGIC: u32 = 0x4350_4c46;
/// Most bytes in one paravirtual console buffer.
pub const PV_CONSOLE_MAX: usize = 4096;

/// The debug-exit port (QEMU's `isa-debug-exit`, iobase 0xf4, iosize 4). The guest
/// writes its [`ExitStatus`] as one byte. QEMU exits with `(status << 1) | 1`;
/// Faultline reports the status as written.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// How the guest ended, as written to [`DEBUG_EXIT_PORT`].
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Every step ran and every verification passed.
    Success = 0,
    /// A `verify` step found memory that did not hold the expected pattern.
    VerifyFailed = 1,
    /// The kernel command line could not be parsed; an `FL error` line says why.
    BadCommandLine = 2,
    /// The guest's Rust code panicked; an `FL error` line carries the message.
    Panic = 3,
    /// An unexpected CPU exception; an `FL exception` line names vector and rip.
    Exception = 4,
    /// An application processor did not come up in time.
    ApStartFailed = 5,
    /// A device a step needs is missing, refused the driver or stopped answering; an
    /// `FL error` line says which and why.
    DeviceError = 6,
}

impl ExitStatus {
    /// Decodes a status byte written by the guest.
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => Self::Success,
            1 => Self::VerifyFailed,
            2 => Self::BadCommandLine,
            3 => Self::Panic,
            4 => Self::Exception,
            5 => Self::ApStartFailed,
            6 => Self::DeviceError,
            _ => return None,
        })
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::VerifyFailed => "verify-failed",
            Self::BadCommandLine => "bad-command-line",
            Self::Panic => "panic",
            Self::Exception => "exception",
            Self::ApStartFailed => "ap-start-failed",
            Self::DeviceError => "device-error",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Guest physical layout
// ---------------------------------------------------------------------------------------

/// Faultline's direct 64-bit entry: an ELF note named [`DIRECT_ENTRY_NOTE_NAME`] of type
/// [`DIRECT_ENTRY_NOTE_TYPE`] whose 8-byte descriptor is the address of the guest's 64-bit
/// entry point. The Faultline VMM enters the built-in guest there instead of at its PVH
/// entry, with the work of the guest's ring-0 boot done beforehand:
///
/// - long mode, paging on, `cr3` = a PML4 at [`DIRECT_PAGE_TABLES_GPA`] identity-mapping
///   `[0, rsi)` with 2 MiB pages, every page present, writable and user-accessible, the
///   MMIO hole (`MMIO_HOLE_START_GPA..MMIO_HOLE_END_GPA`) uncached (PCD|PWT);
/// - CR0 = PG|NE|MP|PE, CR4 = PAE|OSFXSR|OSXMMEXCPT, EFER = LME|LMA, RFLAGS = 2 (IF=0);
/// - a flat GDT at [`BOOT_GDT_GPA`] with 64-bit code at selector 0x08 (CS) and data at
///   0x10 (DS, ES, SS), an empty IDT (the guest loads its own GDT, IDT and TSS);
/// - `rbx` = the guest physical address of a PVH `hvm_start_info` (command line and
///   memory map, exactly as for the PVH entry), `rsi` = bytes identity-mapped (at least
///   4 GiB, covering every RAM range of the memory map).
///
/// The contract is private to the VMM and the guest built with it (the VMM embeds that
/// guest): other VMMs boot the same ELF by PVH.
pub const DIRECT_ENTRY_NOTE_NAME: &str = "Faultline";
/// The note type of the direct 64-bit entry (see [`DIRECT_ENTRY_NOTE_NAME`]).
pub const DIRECT_ENTRY_NOTE_TYPE: u32 = 1;
/// Where the VMM builds the direct entry's page tables (PML4, PDPT, then one page
/// directory per GiB mapped).
pub const DIRECT_PAGE_TABLES_GPA: u64 = 0x3_0000;
/// The direct entry's page tables end below this address (so at most 109 GiB are mapped).
pub const DIRECT_PAGE_TABLES_END_GPA: u64 = 0x9_f000;

/// Where a Faultline-built boot GDT goes (the VMM's PVH 32-bit entry state).
pub const BOOT_GDT_GPA: u64 = 0x500;
/// Where the VMM puts `hvm_start_info`.
pub const PVH_START_INFO_GPA: u64 = 0x6000;
/// Where the VMM puts the PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_GPA: u64 = 0x7000;
/// The guest's real-mode AP trampoline (an ELF segment of the guest image); the SIPI
/// vector is `AP_TRAMPOLINE_GPA >> 12`. The VMM must not place boot data in this page.
pub const AP_TRAMPOLINE_GPA: u64 = 0x8000;
/// Where the VMM puts the kernel command line.
pub const CMDLINE_GPA: u64 = 0x20000;
/// Longest command line the VMM passes and the guest accepts.
pub const CMDLINE_MAX_BYTES: usize = 4096;
/// Where the guest image is linked (1 MiB).
pub const KERNEL_GPA: u64 = 0x10_0000;
/// The workload region never starts below this address: the guest's image, stacks,
/// page tables and histograms live below it. 2 MiB aligned, so hugetlb zones keep
/// whole huge pages for workloads.
pub const WORKLOAD_MIN_GPA: u64 = 0x80_0000;
/// Start of the hole below 4 GiB that is never RAM (MMIO, LAPIC, IOAPIC).
pub const MMIO_HOLE_START_GPA: u64 = 0xC000_0000;
/// End of the hole below 4 GiB.
pub const MMIO_HOLE_END_GPA: u64 = 0x1_0000_0000;
/// The step-control port: reading it gives [`STEP_STOP`] once the VMM wants the running
/// open-ended step (`churn` with `fl.until_stopped=1`) to end; any other value (0, or 0xff
/// where no device answers, as under QEMU) means go on.
pub const STEP_CONTROL_PORT: u16 = 0xEC;
/// The value of [`STEP_CONTROL_PORT`] that asks the step to end.
pub const STEP_STOP: u8 = 1;
/// The first virtio-mmio device window (virtio 1.x "version 2" registers). Device `n`
/// sits at `VIRTIO_MMIO_BASE_GPA + n * VIRTIO_MMIO_WINDOW_BYTES`; the VMM names each on
/// the kernel command line the way Linux expects: `virtio_mmio.device=4K@0xd0000000:5`.
pub const VIRTIO_MMIO_BASE_GPA: u64 = 0xD000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_WINDOW_BYTES: u64 = 0x1000;
/// The interrupt (IOAPIC pin, via irqfd) of virtio-mmio device 0; device `n` uses `+ n`.
pub const VIRTIO_MMIO_FIRST_IRQ: u32 = 5;
/// The local APIC's MMIO page.
pub const LAPIC_GPA: u64 = 0xFEE0_0000;
/// Most vCPUs the guest supports (APIC IDs 0..MAX_CPUS).
pub const MAX_CPUS: usize = 64;
/// Guest page size used by workloads.
pub const PAGE_SIZE: u64 = 4096;

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

/// Keys the guest reads from its kernel command line (`key=value`, space separated;
/// unknown tokens are ignored so a VMM may add its own).
pub mod cmdline {
    /// Number of CPUs to use, APIC IDs `0..n` (default 1). PVH carries no CPU count.
    pub const CPUS: &str = "fl.cpus";
    /// TSC frequency in kHz, if the VMM knows it (else CPUID 0x15/0x16, else 0x40000010).
    pub const TSC_KHZ: &str = "fl.tsc_khz";
    /// Comma-separated steps run in order, each split across all CPUs:
    /// `fill`, `verify`, `touch`, `dirty`, `idle`, `churn`, `generations`, `balloon`, and the fault-injection steps
    /// `triple-fault` and `cpl0-sse` (tests only). Default `fill,verify`.
    pub const STEPS: &str = "fl.steps";
    /// Bytes of the workload region to use (`all`, or a size like `64M`); default all.
    pub const SIZE: &str = "fl.size";
    /// Sample the workload region: the first page of every RAM range, every Nth page after
    /// it and its last page (default 1: every page). For tests that must reach every range
    /// of a big guest (RAM above 4 GiB, several zones) without touching all of it; with
    /// `fill`, `verify`, `touch` and `dirty` (not `balloon`, not the chaos driver).
    pub const REGION_STRIDE_PAGES: &str = "fl.region_stride";
    /// Seed of the fill/verify pattern and of random orders (default 1).
    pub const SEED: &str = "fl.seed";
    /// Access order of `touch`: `sequential`, `random` or `strided` (default sequential).
    pub const PATTERN: &str = "fl.pattern";
    /// Stride in pages for `strided` (default 16).
    pub const STRIDE_PAGES: &str = "fl.stride";
    /// `read` or `write` touches (default write).
    pub const ACCESS: &str = "fl.access";
    /// Passes of `touch` over the same pages (default 2: cold then warm).
    pub const PASSES: &str = "fl.passes";
    /// Pages per second `dirty` and `generations` rewrite (all CPUs together; default 10000).
    pub const RATE_PAGES_PER_S: &str = "fl.rate";
    /// How long `dirty`, `generations` and `idle` run, in milliseconds (default 1000); also how long
    /// `balloon` follows the host when `fl.balloon_changes=0`.
    pub const DURATION_MS: &str = "fl.duration_ms";
    /// `1`: `churn` ignores the duration and runs until the VMM asks it to stop on the
    /// step-control port, then completes one last full round; `idle` likewise idles until
    /// asked to stop.
    pub const UNTIL_STOPPED: &str = "fl.until_stopped";
    /// `fill`, `verify`, `churn`: page `i` of the region holds the pattern of page
    /// `i % N`, so the region holds duplicate pages (for KSM); default 0 (no repeats).
    pub const DUP_PAGES: &str = "fl.dup_pages";
    /// `balloon`: end after following this many changes of the host's target to
    /// completion (default 0: follow changes until `fl.duration_ms` has elapsed).
    pub const BALLOON_CHANGES: &str = "fl.balloon_changes";
    /// `balloon`: pages (4 KiB) of the bottom of the region reported free after each
    /// change when free page reporting was negotiated (default 512; 0 = never report).
    pub const BALLOON_REPORT_PAGES: &str = "fl.balloon_report_pages";
    /// `balloon` with `fl.balloon_changes>0`: give up (and fail) when the changes have not
    /// all happened after this many milliseconds (default 120000).
    pub const BALLOON_TIMEOUT_MS: &str = "fl.balloon_timeout_ms";
    /// `dirty`, `generations`, `idle`: print a `stall` line when a CPU's clock moved this
    /// many microseconds or more between two looks (default 0: never print; the worst gap
    /// is in the step's result either way).
    pub const STALL_US: &str = "fl.stall_us";
}

/// The steps a guest can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Write the deterministic pattern into every page of the region.
    Fill,
    /// Check every page of the region against the pattern.
    Verify,
    /// First-touch the region (and warm passes), timing each touch with the TSC.
    Touch,
    /// Rewrite pages at a set rate for a set time.
    Dirty,
    /// Do nothing for the duration.
    Idle,
    /// For `fl.duration_ms`, rewrite every page round after round with a new pattern
    /// ([`churn_seed`]) while the VMM discards or write-protects ranges under it. Every
    /// word read must be zero (discarded since) or the previous round's pattern; anything
    /// else is stale data and a mismatch. Prints a `verify` line.
    Churn,
    /// Load an empty IDT and raise an exception from ring 0: the CPU triple-faults.
    TripleFault,
    /// Execute an SSE instruction at CPL0 (stops nested KVMs that emulate CPL0).
    Cpl0Sse,
    /// Drive the virtio-balloon device named by `virtio_mmio.device=`: follow the host's
    /// target (inflating pages from the top of the region, deflating them back), send
    /// statistics, report free pages; after each change check that kept pages hold the
    /// pattern and that deflated pages read as zero. Prints `balloon` lines, then a
    /// `result` and a `verify` line. Runs on the BSP; other CPUs wait. Needs the pattern
    /// in place (a `fill` step before it); a later `verify` (or a second `balloon`) step
    /// passes only if the host's last target was 0, since held pages stay the host's.
    Balloon,
    /// Writes generation 0 into every page, then for `fl.duration_ms` rewrites each CPU's
    /// pages round after round at `fl.rate` pages/s, round `g` writing
    /// [`generation_word`]`(seed, gpa, g, word)` (word 0 holds `g` itself). At the end every
    /// page must hold exactly the generation its CPU's cursor says (pages before the cursor
    /// `g`, the rest `g - 1`) with the whole pattern: a lost or stale write (e.g. a page a
    /// live migration did not carry over) is a mismatch. Prints `result` (with `rounds`)
    /// and `verify` lines.
    Generations,
}

impl Step {
    /// Parses a step name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "fill" => Self::Fill,
            "verify" => Self::Verify,
            "touch" => Self::Touch,
            "dirty" => Self::Dirty,
            "idle" => Self::Idle,
            "churn" => Self::Churn,
            "triple-fault" => Self::TripleFault,
            "cpl0-sse" => Self::Cpl0Sse,
            "balloon" => Self::Balloon,
            "generations" => Self::Generations,
            _ => return None,
        })
    }

    /// The step's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fill => "fill",
            Self::Verify => "verify",
            Self::Touch => "touch",
            Self::Dirty => "dirty",
            Self::Idle => "idle",
            Self::Churn => "churn",
            Self::TripleFault => "triple-fault",
            Self::Cpl0Sse => "cpl0-sse",
            Self::Balloon => "balloon",
            Self::Generations => "generations",
        }
    }
}

/// Parses a byte size: a decimal number with an optional `K`, `M`, `G` or `T` suffix
/// (binary units, case-insensitive, optional trailing `iB`/`B`), or `0x` hex.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    if let Some(hex) = text.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).ok();
    }
    let lower_end = text.trim_end_matches(['B', 'b']).trim_end_matches('i');
    let (digits, shift) = match lower_end.as_bytes().last()? {
        b'k' | b'K' => (&lower_end[..lower_end.len() - 1], 10),
        b'm' | b'M' => (&lower_end[..lower_end.len() - 1], 20),
        b'g' | b'G' => (&lower_end[..lower_end.len() - 1], 30),
        b't' | b'T' => (&lower_end[..lower_end.len() - 1], 40),
        _ => (lower_end, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    value.checked_mul(1u64 << shift)
}

/// Looks up `key` in a command line of space-separated `key=value` tokens (last wins).
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|token| token.split_once('='))
        .rev()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

// ---------------------------------------------------------------------------------------
// The fill/verify pattern
// ---------------------------------------------------------------------------------------

/// SplitMix64: a fast, well-mixed 64-bit hash used for the pattern and random orders.
pub const fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The pattern word at byte offset `word_index * 8` of the page at `page_gpa`, for
/// `seed`. Seeded per page, so any page can be checked alone and a page moved to the
/// wrong place is caught. Never zero for a real page, so a zero page is always a mismatch.
#[inline(always)]
pub const fn pattern_word(seed: u64, page_gpa: u64, word_index: u64) -> u64 {
    let page_key = splitmix64(seed ^ page_gpa.rotate_left(17));
    let word = page_key ^ word_index.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    if word == 0 {
        1
    } else {
        word
    }
}

/// The pattern seed of `churn` round `round` (round 0 is the `fill` pattern itself).
pub const fn churn_seed(seed: u64, round: u64) -> u64 {
    if round == 0 {
        seed
    } else {
        seed ^ splitmix64(round)
    }
}

/// Word `word_index` of the page at `page_gpa` in generation `generation` of the
/// `generations` step: word 0 is the generation itself, the others the pattern of a seed
/// derived from (`seed`, `generation`).
#[inline(always)]
pub const fn generation_word(seed: u64, page_gpa: u64, generation: u64, word_index: u64) -> u64 {
    if word_index == 0 {
        generation
    } else {
        pattern_word(churn_seed(seed, generation + 1), page_gpa, word_index)
    }
}

// ---------------------------------------------------------------------------------------
// Report lines
// ---------------------------------------------------------------------------------------

/// Every machine-readable line the guest prints starts with this prefix, then a kind,
/// a space and one JSON object: `FL <kind> {...}`.
pub const REPORT_PREFIX: &str = "FL ";

/// A CPU prints at most one `stall` line per this many milliseconds (a flood of short
/// stalls, post-copy faults for one, would slow the guest down with its own printing).
/// A gap at least this long is always printed: it ends at least this long after the
/// previous line.
pub const STALL_LINE_EVERY_MS: u64 = 2;

/// The kinds of report line.
pub mod report {
    /// Printed once when the guest has parsed its command line, brought up every CPU
    /// and is about to run its first step:
    /// `{"cpus":N,"ram_bytes":B,"region_bytes":B,"region_pages":P,"tsc_khz":K,"steps":"fill,verify"}`.
    pub const READY: &str = "ready";
    /// Printed after each step (for `touch`, one line per pass):
    /// `{"step":"touch","pass":1,"pages":P,"cycles":C,"cpus":N,
    ///   "latency_cycles":{"count":..,"min":..,"max":..,"mean":..,"buckets":[[index,count],..]}}`.
    /// `cycles` is the wall time of the step in TSC cycles (slowest CPU);
    /// `latency_cycles` is present for `touch` only.
    pub const RESULT: &str = "result";
    /// Printed after each `verify`:
    /// `{"ok":true,"pages":P,"mismatches":M,"first":[{"gpa":G,"expected":E,"found":F},..]}`
    /// (at most [`super::VERIFY_REPORT_MAX`] entries in `first`, numbers in decimal).
    pub const VERIFY: &str = "verify";
    /// Printed by `dirty`, `generations` and `idle` when a CPU's clock moved at least
    /// `fl.stall_us` between two consecutive looks: `{"cpu":C,"us":U}`. The CPU did not
    /// run for those `U` microseconds (paused, migrated or restored, waiting for a page,
    /// or descheduled by the host). A CPU prints at most one line per
    /// [`super::STALL_LINE_EVERY_MS`] (the worst gap is in the step's `max_stall_us`).
    pub const STALL: &str = "stall";
    /// Printed just before the debug exit: `{"status":S,"name":"success"}`.
    pub const DONE: &str = "done";
    /// A problem the guest explains: `{"msg":"..."}`.
    pub const ERROR: &str = "error";
    /// Printed by `balloon` after each change of the host's target it followed:
    /// `{"change":C,"target_pages":T,"actual_pages":A,"inflated":I,"deflated":D,
    ///   "kept_pages":K,"kept_ok":true,"zero_ok":true,"mismatches":M,
    ///   "reported_pages":R,"reported_zero_pages":Z}`. `inflated`/`deflated` count the
    /// pages given to / taken back from the host for this change; `kept_ok` says every
    /// page the guest kept holds the pattern, `zero_ok` that every deflated page read as
    /// zero before it was rewritten; `mismatches` counts the words that broke either.
    /// `reported_*`: pages sent by free page reporting, and how many read as zero after.
    pub const BALLOON: &str = "balloon";
    /// An unexpected CPU exception, printed by the ring-0 handler:
    /// `{"vector":V,"error_code":E,"rip":R,"cpu":C}` (numbers in decimal).
    pub const EXCEPTION: &str = "exception";
}

/// Most mismatches a `verify` line lists individually (the count is always exact).
pub const VERIFY_REPORT_MAX: usize = 8;

// ---------------------------------------------------------------------------------------
// Latency histogram
// ---------------------------------------------------------------------------------------

/// Sub-buckets per power of two in the guest's latency histogram (precision ~3%).
pub const HISTOGRAM_SUB_BUCKETS: u64 = 32;
const SUB_BUCKET_BITS: u32 = 5;
/// Number of buckets: values below `HISTOGRAM_SUB_BUCKETS` get one bucket each, then
/// `HISTOGRAM_SUB_BUCKETS` per power of two up to 2^64.
pub const HISTOGRAM_BUCKETS: usize = (HISTOGRAM_SUB_BUCKETS as usize) * (64 - SUB_BUCKET_BITS as usize + 1);

/// The bucket a value (cycles) falls in. Log-linear, like HdrHistogram: exact below 32,
/// then 32 equal buckets per power of two.
#[inline(always)]
pub const fn histogram_bucket(value: u64) -> usize {
    if value < HISTOGRAM_SUB_BUCKETS {
        return value as usize;
    }
    let magnitude = 63 - value.leading_zeros(); // >= SUB_BUCKET_BITS
    let shift = magnitude - SUB_BUCKET_BITS;
    let sub = (value >> shift) - HISTOGRAM_SUB_BUCKETS; // 0..32
    ((shift as u64 + 1) * HISTOGRAM_SUB_BUCKETS + sub) as usize
}

/// The smallest value that falls in `bucket`.
pub const fn histogram_bucket_low(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < HISTOGRAM_SUB_BUCKETS {
        return bucket;
    }
    let shift = bucket / HISTOGRAM_SUB_BUCKETS - 1;
    let sub = bucket % HISTOGRAM_SUB_BUCKETS;
    (HISTOGRAM_SUB_BUCKETS + sub) << shift
}

/// The largest value that falls in `bucket`.
pub const fn histogram_bucket_high(bucket: usize) -> u64 {
    if bucket + 1 >= HISTOGRAM_BUCKETS {
        return u64::MAX;
    }
    histogram_bucket_low(bucket + 1) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2MiB"), Some(2 << 20));
        assert_eq!(parse_size("512k"), Some(512 << 10));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn cmdline_lookup_takes_last_value() {
        let line = "console=ttyS0 fl.cpus=2 fl.steps=fill,verify fl.cpus=4";
        assert_eq!(cmdline_value(line, cmdline::CPUS), Some("4"));
        assert_eq!(cmdline_value(line, cmdline::STEPS), Some("fill,verify"));
        assert_eq!(cmdline_value(line, cmdline::SEED), None);
    }

    #[test]
    fn steps_round_trip() {
        for name in
            ["fill", "verify", "touch", "dirty", "idle", "churn", "triple-fault", "cpl0-sse", "balloon", "generations"]
        {
            assert_eq!(Step::parse(name).unwrap().name(), name);
        }
        assert_eq!(Step::parse("nope"), None);
    }

    #[test]
    fn pattern_differs_per_page_word_and_seed_and_is_never_zero() {
        let a = pattern_word(1, 0x80_0000, 0);
        assert_ne!(a, pattern_word(1, 0x80_1000, 0));
        assert_ne!(a, pattern_word(1, 0x80_0000, 1));
        assert_ne!(a, pattern_word(2, 0x80_0000, 0));
        for page in 0..1000u64 {
            for word in 0..512 {
                assert_ne!(pattern_word(7, page * 4096, word), 0);
            }
        }
    }

    #[test]
    fn histogram_buckets_are_monotonic_and_cover_their_values() {
        let mut previous = 0;
        for value in (0..5000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let bucket = histogram_bucket(value);
            assert!(bucket < HISTOGRAM_BUCKETS, "value {value} bucket {bucket}");
            assert!(bucket >= previous || value > 5000);
            previous = bucket;
            assert!(histogram_bucket_low(bucket) <= value, "value {value}");
            assert!(histogram_bucket_high(bucket) >= value, "value {value}");
        }
        // Relative width of a bucket stays within 1/32 above the exact range.
        for value in [100u64, 1000, 123_456, 1 << 40] {
            let bucket = histogram_bucket(value);
            let width = histogram_bucket_high(bucket) - histogram_bucket_low(bucket) + 1;
            assert!(width * 32 <= histogram_bucket_low(bucket) + 32);
        }
    }

    #[test]
    fn exit_status_round_trips() {
        for byte in 0..=6u8 {
            assert_eq!(ExitStatus::from_byte(byte).unwrap() as u8, byte);
        }
        assert_eq!(ExitStatus::from_byte(7), None);
    }
}
