//! The control protocol: newline-delimited JSON over a `SOCK_STREAM` Unix socket.
//!
//! Every request is one line `{"id": n, "cmd": "...", "args": {...}}` (`args` may be left
//! out when a command takes none); every response is one line, `{"id": n, "ok": true,
//! "result": {...}}` or `{"id": n, "ok": false, "error": {"kind": "...", "message":
//! "..."}}`. A response's `id` echoes its request's (null when the request was too broken
//! to carry one). Responses come in request order. `docs/control-api.md` is the user's
//! copy of this contract; keep the two in step.
//!
//! Growing the protocol: new commands and new result fields are added without changing
//! [`PROTOCOL_VERSION`] (clients ignore fields they do not know, and `hello` lists the
//! commands a server has); removing or changing the meaning of anything bumps it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version `hello` reports. Bumped only on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line the server accepts, in bytes (newline excluded).
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The balloon's page size: virtio-balloon counts in 4 KiB pages whatever the guest's
/// page size, so every balloon size on this protocol is a multiple of it.
pub const BALLOON_PAGE_BYTES: u64 = 4096;

/// Every command this server knows, as `hello` lists them.
pub const COMMANDS: &[&str] = &[
    "hello",
    "status",
    "pause",
    "resume",
    "snapshot.create",
    "balloon.get",
    "balloon.set",
    "balloon.stats",
    "paging.stats",
    "paging.check",
    "migrate",
    "migrate.status",
    "migrate.cancel",
];

/// A request as a client sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    /// The command, e.g. `balloon.set`.
    pub cmd: String,
    /// The command's arguments (an object), if it takes any.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
}

/// A response as the server sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id; `None` (JSON null) when the request line had no usable id.
    pub id: Option<u64>,
    /// Whether the command succeeded: then `result` is set, otherwise `error`.
    pub ok: bool,
    /// The command's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why the command failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    /// A success response.
    pub fn success(id: u64, result: Value) -> Self {
        Response { id: Some(id), ok: true, result: Some(result), error: None }
    }

    /// A failure response.
    pub fn failure(id: Option<u64>, error: ErrorBody) -> Self {
        Response { id, ok: false, result: None, error: Some(error) }
    }

    /// The response as one protocol line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("a response always serializes");
        line.push(b'\n');
        line
    }
}

/// What kind of failure a response reports; clients branch on this, humans read the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line is not JSON.
    BadJson,
    /// The line is JSON but not a request (not an object, no numeric `id`, no `cmd`).
    BadRequest,
    /// The line is longer than [`MAX_LINE_BYTES`]; it was discarded up to its newline.
    LineTooLong,
    /// `cmd` names no command this server knows (`hello` lists them).
    UnknownCommand,
    /// The arguments are missing, of the wrong type, or out of range.
    BadArgs,
    /// The VM has no balloon device.
    NoBalloon,
    /// The balloon device refused the request.
    BalloonError,
    /// The server has as many clients as it takes; try again later.
    Busy,
    /// The VM does not expose its paging state.
    NoPaging,
    /// The paging layer could not answer (e.g. the coherence checker could not read pagemap).
    PagingError,
    /// Pause, resume or snapshot failed (the message says why; the VM is unharmed).
    LifecycleError,
    /// A migration could not start, or there is none to ask about (the VM runs on).
    MigrationError,
    /// A kind this client does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

/// The `error` member of a failure response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ErrorBody {
    /// The kind of failure.
    pub kind: ErrorKind,
    /// What went wrong and what to do about it, for a human.
    pub message: String,
}

impl ErrorBody {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorBody { kind, message: message.into() }
    }
}

/// A parsed, validated command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `hello`: the protocol version and the command list.
    Hello,
    /// `status`: the VM's state.
    Status,
    /// `balloon.get`: the balloon's target, actual size and statistics.
    BalloonGet,
    /// `balloon.set`: a new balloon target, in bytes (a multiple of [`BALLOON_PAGE_BYTES`]).
    BalloonSet {
        /// The new target.
        target_bytes: u64,
    },
    /// `balloon.stats`: the guest's latest memory statistics.
    BalloonStats,
    /// `paging.stats`: paging modes, fault counts and engine latency so far.
    PagingStats,
    /// `paging.check`: run the coherence checker (state table vs host page tables) now.
    PagingCheck,
    /// `pause`: stop every vCPU outside KVM_RUN.
    Pause,
    /// `resume`: let the vCPUs run again.
    Resume,
    /// `snapshot.create`: save the VM to a snapshot directory.
    SnapshotCreate(SnapshotRequest),
    /// `migrate`: start a live migration (returns at once; poll `migrate.status`).
    Migrate(MigrateRequest),
    /// `migrate.status`: the running or last migration's figures.
    MigrateStatus,
    /// `migrate.cancel`: stop the running migration; the VM runs on here.
    MigrateCancel,
}

/// The arguments of `migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Where the destination listens: `unix:PATH` or `tcp:HOST:PORT`.
    pub uri: String,
    /// How: `precopy`, `postcopy` or `hybrid`.
    #[serde(default)]
    pub mode: MigrateMode,
    /// Stop-and-copy once the estimated downtime is under this, ms (default 300).
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Send at most this many bytes per second (default: as fast as the link goes).
    #[serde(default)]
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Give up (and run on here) after this many ms (default: no limit).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Pre-copy rounds after the first before the stop-and-copy is forced (default 30).
    #[serde(default)]
    pub max_rounds: Option<u32>,
    /// Post-copy: the destination's page requests and their answers travel on a second
    /// connection (the preempt channel), so an urgent page never waits behind the
    /// background stream (default true; false: on the main connection).
    #[serde(default = "default_true")]
    pub postcopy_preempt: bool,
    /// Hybrid: pre-copy rounds after round 0 before switching to post-copy (default 1;
    /// it switches earlier if the downtime estimate is under the limit, and at the latest
    /// at `max_rounds`).
    #[serde(default)]
    pub postcopy_after_rounds: Option<u32>,
    /// Which dirty tracker drives the rounds (default: the VM's own, the ring on a VM
    /// made with `--dirty-ring`, else the log).
    #[serde(default)]
    pub dirty_tracking: Option<DirtyTracking>,
    /// Throttle the guest's vCPUs when the rounds do not converge (QEMU's auto-converge).
    #[serde(default)]
    pub auto_converge: bool,
}

fn default_true() -> bool {
    true
}

/// How pre-copy learns which pages the guest wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DirtyTracking {
    /// KVM's dirty log: a bitmap per memslot (`KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG`).
    Log,
    /// KVM's dirty ring: a ring of dirtied pages per vCPU (the VM needs `--dirty-ring`).
    Ring,
}

impl DirtyTracking {
    /// Its name on the command line and in figures.
    pub fn name(self) -> &'static str {
        match self {
            DirtyTracking::Log => "log",
            DirtyTracking::Ring => "ring",
        }
    }
}

fn default_downtime_ms() -> u64 {
    300
}

/// How a VM migrates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum MigrateMode {
    /// Copy memory while the guest runs, in rounds of dirty pages, then stop and copy the rest.
    #[default]
    Precopy,
    /// Stop at once, send the state and the table of existing pages, run on the
    /// destination, which asks for pages as the guest faults on them while the rest
    /// follows in the background.
    Postcopy,
    /// Pre-copy rounds first (`--postcopy-after-rounds`), then post-copy for the pages
    /// dirtied since they were sent (or, if the rounds converge, a stop-and-copy).
    Hybrid,
}

/// The arguments of `snapshot.create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The directory to create (must not exist, or be empty).
    pub dir: String,
    /// Only the pages written since the previous snapshot of this VM (a diff on top of it).
    #[serde(default)]
    pub diff: bool,
    /// Live: pause only to save the state and write-protect guest RAM, and copy the pages
    /// out while the VM runs (a full snapshot of the guest at the pause).
    #[serde(default)]
    pub live: bool,
    /// What the VM does afterwards.
    #[serde(default)]
    pub then: AfterSnapshot,
}

/// What a VM does after `snapshot.create`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSnapshot {
    /// Go back to what it did before (run on if it ran, stay paused if it was paused).
    #[default]
    AsBefore,
    /// Run, even if it was paused before.
    Resume,
    /// End the VM (its report says it was stopped for a snapshot).
    Stop,
}

/// The arguments of `balloon.set`: exactly one of the two.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonSetArgs {
    target_bytes: Option<u64>,
    target: Option<String>,
}

impl Command {
    /// Parses `cmd` and its `args` (JSON null when the request had none).
    pub fn parse(cmd: &str, args: &Value) -> Result<Command, ErrorBody> {
        let no_args = |command: Command| {
            if args.is_null() || args.as_object().is_some_and(|o| o.is_empty()) {
                Ok(command)
            } else {
                Err(ErrorBody::new(ErrorKind::BadArgs, format!("{cmd} takes no arguments; leave \"args\" out")))
            }
        };
        match cmd {
            "hello" => no_args(Command::Hello),
            "status" => no_args(Command::Status),
            "balloon.get" => no_args(Command::BalloonGet),
            "balloon.stats" => no_args(Command::BalloonStats),
            "balloon.set" => parse_balloon_set(args),
            "paging.stats" => no_args(Command::PagingStats),
            "paging.check" => no_args(Command::PagingCheck),
            "pause" => no_args(Command::Pause),
            "resume" => no_args(Command::Resume),
            "migrate.status" => no_args(Command::MigrateStatus),
            "migrate.cancel" => no_args(Command::MigrateCancel),
            "migrate" => serde_json::from_value(args.clone()).map(Command::Migrate).map_err(|e| {
                ErrorBody::new(
                    ErrorKind::BadArgs,
                    format!(
                        "migrate needs \"args\": {{\"uri\": \"unix:PATH\"|\"tcp:HOST:PORT\", \"mode\": \"precopy\"|\"postcopy\"|\"hybrid\", \"downtime_ms\": 300, \"bandwidth_bytes_per_s\": N, \"timeout_ms\": N, \"max_rounds\": N, \"postcopy_preempt\": true, \"postcopy_after_rounds\": N}}: {e}"
                    ),
                )
            }),
            "snapshot.create" => serde_json::from_value(args.clone()).map(Command::SnapshotCreate).map_err(|e| {
                ErrorBody::new(
                    ErrorKind::BadArgs,
                    format!(
                        "snapshot.create needs \"args\": {{\"dir\": \"PATH\", \"diff\": false, \"live\": false, \"then\": \"as_before\"|\"resume\"|\"stop\"}}: {e}"
                    ),
                )
            }),
            _ => Err(ErrorBody::new(
                ErrorKind::UnknownCommand,
                format!("unknown command \"{cmd}\"; this server knows: {}", COMMANDS.join(", ")),
            )),
        }
    }
}

fn parse_balloon_set(args: &Value) -> Result<Command, ErrorBody> {
    const USAGE: &str =
        "balloon.set needs \"args\": {\"target_bytes\": N} or {\"target\": \"SIZE\"} (e.g. \"512M\", \"1G\", \"0\")";
    let bad = |why: String| ErrorBody::new(ErrorKind::BadArgs, why);
    if args.is_null() {
        return Err(bad(USAGE.to_string()));
    }
    let parsed: BalloonSetArgs = serde_json::from_value(args.clone()).map_err(|e| bad(format!("{USAGE}: {e}")))?;
    let target_bytes = match (parsed.target_bytes, parsed.target) {
        (Some(bytes), None) => bytes,
        (None, Some(text)) => faultline_abi::parse_size(&text)
            .ok_or_else(|| bad(format!("cannot parse target \"{text}\" as a size (use e.g. 512M, 1G, 0)")))?,
        (Some(_), Some(_)) => return Err(bad("give either \"target_bytes\" or \"target\", not both".into())),
        (None, None) => return Err(bad(USAGE.to_string())),
    };
    if target_bytes % BALLOON_PAGE_BYTES != 0 {
        return Err(bad(format!(
            "target {target_bytes} bytes is not a multiple of the balloon page ({BALLOON_PAGE_BYTES} bytes)"
        )));
    }
    Ok(Command::BalloonSet { target_bytes })
}

/// A request line, parsed as far as it goes: the id (when there is a usable one) and the
/// command, or the error to answer with.
pub fn parse_request_line(line: &[u8]) -> (Option<u64>, Result<Command, ErrorBody>) {
    let value: Value = match serde_json::from_slice(line) {
        Ok(value) => value,
        Err(e) => return (None, Err(ErrorBody::new(ErrorKind::BadJson, format!("the request is not JSON: {e}")))),
    };
    let Some(object) = value.as_object() else {
        return (None, Err(bad_request("the request must be a JSON object")));
    };
    let Some(id) = object.get("id").and_then(Value::as_u64) else {
        return (None, Err(bad_request("the request needs an \"id\": a non-negative integer the response echoes")));
    };
    let Some(cmd) = object.get("cmd").and_then(Value::as_str) else {
        return (Some(id), Err(bad_request("the request needs a \"cmd\": a command name such as \"status\"")));
    };
    let args = object.get("args").unwrap_or(&Value::Null);
    if !(args.is_null() || args.is_object()) {
        return (Some(id), Err(ErrorBody::new(ErrorKind::BadArgs, "\"args\" must be a JSON object")));
    }
    (Some(id), Command::parse(cmd, args))
}

fn bad_request(message: &str) -> ErrorBody {
    ErrorBody::new(ErrorKind::BadRequest, format!("{message}; a request looks like {{\"id\": 1, \"cmd\": \"status\"}}"))
}

/// The result of `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloResult {
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The server program and its version, e.g. `faultline 0.1.0`.
    pub server: String,
    /// The commands this server knows.
    pub commands: Vec<String>,
}

impl HelloResult {
    /// This server's hello.
    pub fn current() -> Self {
        HelloResult {
            protocol: PROTOCOL_VERSION,
            server: format!("faultline {}", env!("CARGO_PKG_VERSION")),
            commands: COMMANDS.iter().map(|c| c.to_string()).collect(),
        }
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// Every vCPU is paused (`pause`, or during a snapshot).
    Paused,
    /// The VM was asked to end (or a vCPU ended it) and is shutting down.
    Stopping,
    /// The VM ended; the process is about to exit.
    Ended,
}

/// The result of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Where the VM is in its life.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM, all zones, in bytes.
    pub memory_bytes: u64,
    /// Milliseconds since the VM was started.
    pub uptime_ms: u64,
    /// Whether the guest said it is ready (the built-in guest's `FL ready` line).
    pub guest_ready: bool,
    /// Whether the VM has a balloon device.
    pub balloon: bool,
    /// How the VM ended, once it has (a human sentence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
}

/// The guest's memory statistics, as virtio-balloon's statistics queue reports them
/// (virtio 1.2, 5.5.6.3). Each is `None` when the guest did not report it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Bytes swapped in (VIRTIO_BALLOON_S_SWAP_IN, converted from pages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in_bytes: Option<u64>,
    /// Bytes swapped out (VIRTIO_BALLOON_S_SWAP_OUT, converted from pages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out_bytes: Option<u64>,
    /// Major page faults (VIRTIO_BALLOON_S_MAJFLT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults (VIRTIO_BALLOON_S_MINFLT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Free memory, bytes (VIRTIO_BALLOON_S_MEMFREE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// Total memory the guest sees, bytes (VIRTIO_BALLOON_S_MEMTOT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Memory available for new work, bytes (VIRTIO_BALLOON_S_AVAIL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    /// Disk caches, bytes (VIRTIO_BALLOON_S_CACHES).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches_bytes: Option<u64>,
    /// Successful hugetlb allocations (VIRTIO_BALLOON_S_HTLB_PGALLOC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb allocations (VIRTIO_BALLOON_S_HTLB_PGFAIL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    /// Milliseconds since the guest last reported; `None` if it never has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
}

/// The result of `balloon.get` and `balloon.set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonInfo {
    /// The size the host asks the balloon to reach, bytes.
    pub target_bytes: u64,
    /// The same in 4 KiB balloon pages.
    pub target_pages: u64,
    /// The size the guest has given, bytes.
    pub actual_bytes: u64,
    /// The same in 4 KiB balloon pages.
    pub actual_pages: u64,
    /// Host memory actually freed by the balloon, bytes, when the device measures it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_freed_bytes: Option<u64>,
    /// Huge pages of which only part is ballooned (so not yet freed), when the backend is hugetlb.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_huge_pages: Option<u64>,
    /// The guest's latest statistics.
    pub stats: BalloonStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> (Option<u64>, Result<Command, ErrorBody>) {
        parse_request_line(line.as_bytes())
    }

    fn kind(line: &str) -> ErrorKind {
        parse(line).1.unwrap_err().kind
    }

    #[test]
    fn commands_parse_with_and_without_args() {
        assert_eq!(parse(r#"{"id": 7, "cmd": "status"}"#), (Some(7), Ok(Command::Status)));
        assert_eq!(parse(r#"{"id": 1, "cmd": "hello", "args": {}}"#), (Some(1), Ok(Command::Hello)));
        assert_eq!(parse(r#"{"id": 2, "cmd": "balloon.get", "args": null}"#).1, Ok(Command::BalloonGet));
        assert_eq!(parse(r#"{"id": 2, "cmd": "balloon.stats"}"#).1, Ok(Command::BalloonStats));
        assert_eq!(
            parse(r#"{"id": 3, "cmd": "balloon.set", "args": {"target": "512M"}}"#).1,
            Ok(Command::BalloonSet { target_bytes: 512 << 20 })
        );
        assert_eq!(
            parse(r#"{"id": 3, "cmd": "balloon.set", "args": {"target_bytes": 8192}}"#).1,
            Ok(Command::BalloonSet { target_bytes: 8192 })
        );
        assert_eq!(
            parse(r#"{"id": 3, "cmd": "balloon.set", "args": {"target": "0"}}"#).1,
            Ok(Command::BalloonSet { target_bytes: 0 })
        );
    }

    #[test]
    fn broken_requests_get_the_right_kind_and_id() {
        assert_eq!(kind("{nope"), ErrorKind::BadJson);
        assert_eq!(kind("[1, 2]"), ErrorKind::BadRequest);
        assert_eq!(parse(r#"{"cmd": "status"}"#).0, None);
        assert_eq!(kind(r#"{"cmd": "status"}"#), ErrorKind::BadRequest);
        assert_eq!(kind(r#"{"id": -1, "cmd": "status"}"#), ErrorKind::BadRequest);
        assert_eq!(parse(r#"{"id": 4}"#).0, Some(4));
        assert_eq!(kind(r#"{"id": 4}"#), ErrorKind::BadRequest);
        assert_eq!(kind(r#"{"id": 4, "cmd": "reboot"}"#), ErrorKind::UnknownCommand);
        assert!(parse(r#"{"id": 4, "cmd": "reboot"}"#).1.unwrap_err().message.contains("balloon.set"));
        assert_eq!(kind(r#"{"id": 4, "cmd": "status", "args": [1]}"#), ErrorKind::BadArgs);
        assert_eq!(kind(r#"{"id": 4, "cmd": "status", "args": {"x": 1}}"#), ErrorKind::BadArgs);
    }

    #[test]
    fn balloon_set_args_are_checked() {
        for args in [
            "",
            r#", "args": {}"#,
            r#", "args": {"target": "lots"}"#,
            r#", "args": {"target_bytes": "1G"}"#,
            r#", "args": {"target_bytes": 4097}"#,
            r#", "args": {"target_bytes": 4096, "target": "4K"}"#,
            r#", "args": {"size": "1G"}"#,
            r#", "args": {"target": "99999999999T"}"#,
        ] {
            let line = format!(r#"{{"id": 9, "cmd": "balloon.set"{args}}}"#);
            let (id, result) = parse(&line);
            assert_eq!(id, Some(9), "{line}");
            let err = result.unwrap_err();
            assert_eq!(err.kind, ErrorKind::BadArgs, "{line}: {err}");
            assert!(err.message.contains("target"), "{line}: {err}");
        }
    }

    #[test]
    fn responses_round_trip_and_unknown_kinds_are_tolerated() {
        let ok = Response::success(5, serde_json::json!({"a": 1}));
        let line = ok.to_line();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(serde_json::from_slice::<Response>(&line).unwrap(), ok);
        let text = String::from_utf8(Response::failure(None, ErrorBody::new(ErrorKind::NoBalloon, "x")).to_line());
        assert_eq!(text.unwrap(), "{\"id\":null,\"ok\":false,\"error\":{\"kind\":\"no_balloon\",\"message\":\"x\"}}\n");
        let newer: Response =
            serde_json::from_str(r#"{"id":1,"ok":false,"error":{"kind":"migration_failed","message":"m"}}"#).unwrap();
        assert_eq!(newer.error.unwrap().kind, ErrorKind::Unknown);
    }

    #[test]
    fn snapshot_create_takes_a_dir_and_optional_diff_and_then() {
        let parsed = Command::parse("snapshot.create", &serde_json::json!({"dir": "/s", "diff": true, "then": "stop"}));
        assert_eq!(
            parsed,
            Ok(Command::SnapshotCreate(SnapshotRequest {
                dir: "/s".into(),
                diff: true,
                live: false,
                then: AfterSnapshot::Stop
            }))
        );
        let live = Command::parse("snapshot.create", &serde_json::json!({"dir": "/s", "live": true})).unwrap();
        assert!(matches!(live, Command::SnapshotCreate(SnapshotRequest { live: true, diff: false, .. })), "{live:?}");
        let defaults = Command::parse("snapshot.create", &serde_json::json!({"dir": "/s"})).unwrap();
        assert_eq!(
            defaults,
            Command::SnapshotCreate(SnapshotRequest {
                dir: "/s".into(),
                diff: false,
                live: false,
                then: AfterSnapshot::AsBefore
            })
        );
        for bad in [Value::Null, serde_json::json!({"dir": 3}), serde_json::json!({"dir": "/s", "then": "later"})] {
            assert_eq!(Command::parse("snapshot.create", &bad).unwrap_err().kind, ErrorKind::BadArgs, "{bad}");
        }
        assert_eq!(Command::parse("pause", &serde_json::json!({"x": 1})).unwrap_err().kind, ErrorKind::BadArgs);
    }

    #[test]
    fn hello_lists_every_command() {
        let hello = HelloResult::current();
        assert_eq!(hello.protocol, PROTOCOL_VERSION);
        for cmd in COMMANDS {
            let args = match *cmd {
                "balloon.set" => serde_json::json!({"target": "4K"}),
                "snapshot.create" => serde_json::json!({"dir": "/tmp/s"}),
                "migrate" => serde_json::json!({"uri": "unix:/tmp/m.sock"}),
                _ => Value::Null,
            };
            assert!(Command::parse(cmd, &args).is_ok(), "{cmd}");
            assert!(hello.commands.iter().any(|c| c == cmd));
        }
    }
}
