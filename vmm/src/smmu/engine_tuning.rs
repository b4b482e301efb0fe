//! Tuning options of the fault engine, each measurable on its own in `faultline bench
//! faults`: which handler design runs, and the engine's optional fast paths.
//!
//! Written as a short text, options joined by `+`: `default`, `reference`, `minimal`, or
//! any of `batch=N`, `dontwake`, `zeropool`, `around=N`, `busypoll`, `noexclusive` (e.g.
//! `dontwake+around=16`). `exclusive` (on by default) is still accepted.
//!
//! Set with `faultline run --fault-engine OPTIONS`, or `[fault_engine.tuning]` in a TOML
//! config (`crate::config::FaultEngineOptions`).

use serde::{Deserialize, Serialize};

/// Largest fault-around window, in pages.
pub const MAX_FAULT_AROUND: u32 = 512;

/// The handler threads worth starting when `requested` are asked for: at most one fewer
/// than the host's CPUs (at least one). A handler thread beyond that cannot run beside the
/// vCPUs it serves, only preempt them. Measured on a 2-CPU host, 2 vCPUs, 16,384 faults:
/// one thread made 11,655 epoll waits and 11,678 reads (batches of two); two threads,
/// even with exclusive wakeups, 20,102 waits and 20,124 reads of which 6,210 found nothing
/// (the other thread's batch had taken the message), plus 665 futex calls
/// (`docs/benchmarks.md`, "Where the default engine's time went").
pub fn useful_handler_threads(requested: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    requested.min(cpus.saturating_sub(1)).max(1)
}

/// Errors parsing tuning options.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TuningError {
    /// An unknown option.
    #[error("unknown fault-engine option '{0}' (use default, reference, minimal, batch=N, dontwake, zeropool, around=N, busypoll, noexclusive, joined by '+')")]
    Unknown(String),
    /// An option's number is out of range.
    #[error("fault-engine option '{option}': {reason}")]
    BadValue {
        /// The option as written.
        option: String,
        /// What is wrong.
        reason: String,
    },
}

/// Which handler design resolves faults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HandlerKind {
    /// The engine: batched reads, retry protocol, deferral, several threads.
    #[default]
    Engine,
    /// The textbook handler: one thread, poll + read one message + one ioctl per fault
    /// (see [`super::reference_handler`]).
    Reference,
    /// The least a handler can do: one thread, poll + read + UFFDIO_COPY of a zero page,
    /// no latency recording (see [`super::minimal_handler`]). The floor every other
    /// design is measured against.
    Minimal,
}

impl HandlerKind {
    /// Whether the design runs one thread whatever `handler_threads` says.
    pub fn single_threaded(self) -> bool {
        self != HandlerKind::Engine
    }

    /// Whether the design resolves write-protect faults (only the engine does).
    pub fn resolves_write_protect(self) -> bool {
        self == HandlerKind::Engine
    }

    /// The option naming the design (`None` for the engine).
    pub fn option(self) -> Option<&'static str> {
        match self {
            HandlerKind::Engine => None,
            HandlerKind::Reference => Some("reference"),
            HandlerKind::Minimal => Some("minimal"),
        }
    }
}

/// The engine's tuning options (all off by default but `exclusive`). Deserializes from a
/// TOML table with these field names (for `FaultEngineOptions`), parses from the `+` text
/// for the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineTuning {
    /// Which handler runs.
    pub handler: HandlerKind,
    /// Messages per `read()`, overriding `FaultEngineConfig::batch`.
    pub batch: Option<usize>,
    /// Install with DONTWAKE and wake every resolved range once, after the whole batch.
    pub dont_wake: bool,
    /// Fill every zero page with UFFDIO_COPY from the handler's never-written zero buffer:
    /// read faults (and fault-around after a read) get a private writable page instead of
    /// UFFDIO_ZEROPAGE's shared zero page, so a later write does not fault again. (Write
    /// faults get a COPY from that buffer in any case.)
    pub zero_pool: bool,
    /// On a MISSING or MINOR 4 KiB fault, also install up to this many following pages
    /// that the state table says are not populated (0: off).
    pub fault_around: u32,
    /// Spin on non-blocking reads of the userfaultfd instead of sleeping in poll(2).
    pub busy_poll: bool,
    /// Each handler sleeps in its own epoll with the userfaultfd added `EPOLLEXCLUSIVE`,
    /// so a fault wakes one handler instead of every handler polling the fd. On by
    /// default: with poll(2) every fault woke both default handlers and the loser's read
    /// found nothing (`docs/benchmarks.md`, "Where the default engine's time went");
    /// `noexclusive` brings the shared poll back for comparison.
    pub exclusive: bool,
}

impl Default for EngineTuning {
    fn default() -> Self {
        Self {
            handler: HandlerKind::Engine,
            batch: None,
            dont_wake: false,
            zero_pool: false,
            fault_around: 0,
            busy_poll: false,
            exclusive: true,
        }
    }
}

impl EngineTuning {
    /// Parses `default`, `reference`, or options joined by `+`.
    pub fn parse(text: &str) -> Result<Self, TuningError> {
        let mut t = EngineTuning::default();
        for option in text.split('+').map(str::trim).filter(|o| !o.is_empty()) {
            let (name, value) = option.split_once('=').map_or((option, None), |(n, v)| (n, Some(v)));
            let number = |max: u64| -> Result<u64, TuningError> {
                let bad = |reason: String| TuningError::BadValue { option: option.to_string(), reason };
                let v = value.ok_or_else(|| bad("needs a number, e.g. around=16".into()))?;
                let n: u64 = v.parse().map_err(|_| bad(format!("'{v}' is not a number")))?;
                if n == 0 || n > max {
                    return Err(bad(format!("must be 1..={max}")));
                }
                Ok(n)
            };
            match name {
                "default" => {}
                "reference" => t.handler = HandlerKind::Reference,
                "minimal" => t.handler = HandlerKind::Minimal,
                "batch" => t.batch = Some(number(4096)? as usize),
                "dontwake" => t.dont_wake = true,
                "zeropool" => t.zero_pool = true,
                "around" => t.fault_around = number(MAX_FAULT_AROUND as u64)? as u32,
                "busypoll" => t.busy_poll = true,
                "exclusive" => t.exclusive = true,
                "noexclusive" => t.exclusive = false,
                _ => return Err(TuningError::Unknown(option.to_string())),
            }
        }
        Ok(t)
    }

    /// [`EngineTuning::parse`] for clap's `value_parser`.
    pub fn parse_arg(text: &str) -> Result<Self, String> {
        Self::parse(text).map_err(|e| e.to_string())
    }

    /// The canonical text form (parses back to the same options).
    pub fn name(&self) -> String {
        let mut parts = Vec::new();
        if let Some(option) = self.handler.option() {
            parts.push(option.to_string());
        }
        if let Some(b) = self.batch {
            parts.push(format!("batch={b}"));
        }
        if self.dont_wake {
            parts.push("dontwake".into());
        }
        if self.zero_pool {
            parts.push("zeropool".into());
        }
        if self.fault_around > 0 {
            parts.push(format!("around={}", self.fault_around));
        }
        if self.busy_poll {
            parts.push("busypoll".into());
        }
        if !self.exclusive {
            parts.push("noexclusive".into());
        }
        if parts.is_empty() {
            "default".into()
        } else {
            parts.join("+")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_print_back() {
        assert_eq!(EngineTuning::parse("default").unwrap(), EngineTuning::default());
        assert_eq!(EngineTuning::parse("").unwrap(), EngineTuning::default());
        let t = EngineTuning::parse("dontwake+around=16+zeropool+busypoll+batch=8+noexclusive").unwrap();
        assert!(t.dont_wake && t.zero_pool && t.busy_poll && !t.exclusive);
        assert_eq!((t.fault_around, t.batch), (16, Some(8)));
        assert_eq!(EngineTuning::parse(&t.name()).unwrap(), t);
        assert_eq!(EngineTuning::parse("reference").unwrap().handler, HandlerKind::Reference);
        assert_eq!(EngineTuning::parse("minimal").unwrap().handler, HandlerKind::Minimal);
        assert_eq!(EngineTuning::parse("minimal").unwrap().name(), "minimal");
        assert_eq!(EngineTuning::default().name(), "default");
        // Exclusive wakeups are the default; naming them changes nothing.
        assert!(EngineTuning::default().exclusive);
        assert_eq!(EngineTuning::parse("exclusive").unwrap(), EngineTuning::default());
    }

    #[test]
    fn options_read_from_a_toml_table() {
        let t: EngineTuning = toml::from_str("handler = \"reference\"\nfault_around = 64\ndont_wake = true").unwrap();
        assert_eq!(t, EngineTuning::parse("reference+around=64+dontwake").unwrap());
        assert!(toml::from_str::<EngineTuning>("warp = 1").is_err());
    }

    #[test]
    fn bad_options_say_what_is_allowed() {
        let e = EngineTuning::parse("dontwake+turbo").unwrap_err().to_string();
        assert!(e.contains("'turbo'") && e.contains("around=N"), "{e}");
        let e = EngineTuning::parse("around=0").unwrap_err().to_string();
        assert!(e.contains("1..=512"), "{e}");
        assert!(EngineTuning::parse("around").is_err());
        assert!(EngineTuning::parse("batch=x").is_err());
    }
}
