//! Two network namespaces joined by a veth pair, for migrations over a real (shaped) link:
//! made with `ip`, shaped with `tc tbf`/`htb`, and removed on drop (a panic included).
//! Namespaces left by killed earlier runs are removed by their name prefix when the next
//! pair is made. Only these namespaces and loopback carry the tests' traffic.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Every namespace the harness makes is named `PREFIX-PID-N-a|b`.
const PREFIX: &str = "fltl";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One end of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Namespace `…-a`, address 10.77.0.1.
    A,
    /// Namespace `…-b`, address 10.77.0.2.
    B,
}

/// A queueing discipline on one end's egress.
#[derive(Debug, Clone, Copy)]
pub enum Shaping {
    /// `tc qdisc add dev DEV root tbf rate RATE burst BURST latency LATENCY`.
    Tbf { mbit: u32, burst_kib: u32, latency_ms: u32 },
    /// An htb root with one class of `mbit` that all traffic falls into.
    Htb { mbit: u32 },
}

/// Two namespaces and the veth between them.
pub struct NetnsPair {
    names: [String; 2],
    devices: [String; 2],
}

/// Runs `ip`/`tc` with `args`; panics with its stderr on failure.
fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {}: {e} (apt-get install iproute2)", args.join(" ")));
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// True when `ip` and `tc` are installed; otherwise a loud skip, or a panic under
/// FAULTLINE_REQUIRE_KVM=1 (CI installs iproute2).
pub fn tools_available() -> bool {
    let found = ["ip", "tc"].iter().all(|tool| Command::new(tool).arg("-V").output().is_ok_and(|o| o.status.success()));
    if !found {
        if std::env::var("FAULTLINE_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("`ip`/`tc` are not installed (apt-get install iproute2) and FAULTLINE_REQUIRE_KVM=1");
        }
        eprintln!("!!!! SKIPPED: `ip`/`tc` not installed (apt-get install iproute2) !!!!");
    }
    found
}

/// Removes the harness's namespaces whose process is gone (left by a killed run).
fn remove_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let mut parts = name.split('-');
        if parts.next() != Some(PREFIX) {
            continue;
        }
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

impl NetnsPair {
    /// Makes `PREFIX-PID-N-a` and `-b`, a veth between them (10.77.0.1/24 in a,
    /// 10.77.0.2/24 in b), loopback up in both.
    pub fn new() -> NetnsPair {
        remove_stale();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let names = [format!("{PREFIX}-{pid}-{n}-a"), format!("{PREFIX}-{pid}-{n}-b")];
        // Interface names are at most 15 bytes; they live only inside the namespaces.
        let devices = [format!("fl{n}v{pid}a"), format!("fl{n}v{pid}b")];
        let pair = NetnsPair { names, devices };
        for name in &pair.names {
            run("ip", &["netns", "add", name]);
        }
        // From here on Drop removes what exists.
        let [a, b] = pair.names.clone();
        let [da, db] = pair.devices.clone();
        run("ip", &["link", "add", "name", &da, "netns", &a, "type", "veth", "peer", "name", &db, "netns", &b]);
        for end in [End::A, End::B] {
            pair.ip(end, &["link", "set", "lo", "up"]);
            let address = format!("{}/24", pair.address(end));
            let device = pair.device(end).to_string();
            pair.ip(end, &["addr", "add", &address, "dev", &device]);
            pair.ip(end, &["link", "set", &device, "up"]);
        }
        pair
    }

    fn index(end: End) -> usize {
        match end {
            End::A => 0,
            End::B => 1,
        }
    }

    /// The namespace's name.
    pub fn name(&self, end: End) -> &str {
        &self.names[Self::index(end)]
    }

    /// The veth end's interface name.
    pub fn device(&self, end: End) -> &str {
        &self.devices[Self::index(end)]
    }

    /// The veth end's IPv4 address.
    pub fn address(&self, end: End) -> &'static str {
        match end {
            End::A => "10.77.0.1",
            End::B => "10.77.0.2",
        }
    }

    /// `ip netns exec NAME ip ARGS`.
    fn ip(&self, end: End, args: &[&str]) {
        let mut all = vec!["netns", "exec", self.name(end), "ip"];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Puts `shaping` on the egress of `end`'s veth.
    pub fn shape(&self, end: End, shaping: Shaping) {
        let (ns, dev) = (self.name(end), self.device(end));
        let tc = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns, "tc"];
            all.extend_from_slice(args);
            run("ip", &all);
        };
        match shaping {
            Shaping::Tbf { mbit, burst_kib, latency_ms } => tc(&[
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                &format!("{burst_kib}kb"),
                "latency",
                &format!("{latency_ms}ms"),
            ]),
            Shaping::Htb { mbit } => {
                tc(&["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"]);
                let rate = format!("{mbit}mbit");
                tc(&[
                    "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", &rate, "ceil", &rate,
                ]);
            }
        }
    }

    /// A command that runs `program` inside `end`'s namespace (`ip netns exec NAME ...`;
    /// `ip` execs, so the child's pid is the program's).
    pub fn command(&self, end: End, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.name(end)]).arg(program);
        command
    }

    /// Moves the calling thread into `end`'s namespace: sockets it makes from now on
    /// belong there (for a relay thread).
    pub fn enter(&self, end: End) {
        enter_named(self.name(end));
    }
}

/// Moves the calling thread into the named network namespace.
pub fn enter_named(name: &str) {
    let file = std::fs::File::open(format!("/run/netns/{name}")).unwrap_or_else(|e| panic!("/run/netns/{name}: {e}"));
    // SAFETY: setns on a valid namespace fd changes only this thread's network namespace.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns into {name}: {}", std::io::Error::last_os_error());
}

/// True once process `pid` (in whatever namespace) has a TCP socket listening on `port`.
pub fn listening_in(pid: u32, port: u16) -> bool {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[1].ends_with(&format!(":{port:04X}")) && fields[3] == "0A"
    })
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veth end, and so the pair.
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}
