//! The guest's virtio-balloon driver against QEMU's virtio-balloon on virtio-mmio (the
//! reference device): QEMU's microvm names the window on the command line the way
//! Faultline does (`virtio_mmio.device=512@0xfeb00e00:12`), the test moves the target
//! over QMP, and the guest reports what it saw.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Guest RAM.
const RAM_MIB: u64 = 256;
/// Balloon size the test asks for.
const BALLOON_MIB: u64 = 64;
/// Free pages the guest reports after each change (fl.balloon_report_pages).
const REPORT_PAGES: u64 = 512;
/// How long to wait for one expected line or reply before calling the run hung.
const HANG_GUARD: Duration = Duration::from_secs(90);

/// A QMP connection (one command at a time; events are skipped).
struct Qmp(BufReader<UnixStream>);

impl Qmp {
    fn connect(path: &std::path::Path) -> Qmp {
        let deadline = Instant::now() + HANG_GUARD;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => panic!("cannot connect to QMP at {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
        let mut qmp = Qmp(BufReader::new(stream));
        let greeting = qmp.read();
        assert!(greeting.get("QMP").is_some(), "not a QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.0.read_line(&mut line).expect("QMP read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent '{line}': {e}"))
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.0.get_mut(), "{request}").expect("QMP write");
        loop {
            let reply = self.read();
            if let Some(value) = reply.get("return") {
                return value.clone();
            }
            assert!(reply.get("error").is_none(), "QMP {command} failed: {reply}");
        }
    }

    fn guest_stats(&mut self) -> Value {
        self.execute("qom-get", json!({"path": "/machine/peripheral/balloon0", "property": "guest-stats"}))["stats"]
            .clone()
    }

    fn set_balloon(&mut self, guest_bytes: u64) {
        self.execute("balloon", json!({ "value": guest_bytes }));
    }
}

/// The guest's serial lines, as they arrive.
struct Serial {
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Serial {
    fn new(child: &mut Child) -> Serial {
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Serial { lines, seen: Vec::new() }
    }

    /// The JSON of the next `FL <kind>` line (panics with everything seen if the guest
    /// ends or hangs first, or reports a failure).
    fn next_report(&mut self, kind: &str) -> Value {
        let prefix = format!("FL {kind} ");
        loop {
            let line = self.lines.recv_timeout(HANG_GUARD).unwrap_or_else(|_| {
                panic!("no 'FL {kind}' line within {HANG_GUARD:?}; the guest said:\n{}", self.seen.join("\n"))
            });
            self.seen.push(line.clone());
            if line.starts_with("FL error ") || line.starts_with("FL exception ") || line.starts_with("FL done ") {
                panic!("the guest stopped before 'FL {kind}':\n{}", self.seen.join("\n"));
            }
            if let Some(json) = line.strip_prefix(&prefix) {
                return serde_json::from_str(json).unwrap_or_else(|e| panic!("bad line '{line}': {e}"));
            }
        }
    }

    /// Every remaining line, until the guest's output ends.
    fn rest(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(HANG_GUARD) {
            self.seen.push(line);
        }
        self.seen.clone()
    }
}

fn assert_change(line: &Value, target: u64, inflated: u64, deflated: u64, region_pages: u64) {
    assert_eq!(line["target_pages"], target, "{line}");
    assert_eq!(line["actual_pages"], target, "{line}");
    assert_eq!(line["inflated"], inflated, "{line}");
    assert_eq!(line["deflated"], deflated, "{line}");
    assert_eq!(line["kept_pages"], region_pages - target, "{line}");
    assert_eq!(line["kept_ok"], true, "kept pages lost their pattern: {line}");
    assert_eq!(line["zero_ok"], true, "deflated pages did not read as zero: {line}");
    assert_eq!(line["mismatches"], 0, "{line}");
    // QEMU discards reported ranges: all of them read as zero afterwards (a report sent
    // to the wrong queue index would never get there).
    assert_eq!(line["reported_pages"], REPORT_PAGES, "{line}");
    assert_eq!(line["reported_zero_pages"], REPORT_PAGES, "{line}");
}

#[test]
fn balloon_inflates_and_deflates_under_qemu_virtio_mmio() {
    if !kvm_available() {
        return;
    }
    let Some(qemu) = qemu() else { return };
    let dir = ScratchDir::new("qemu-balloon");
    let image = guest_image_in(&dir.0);
    let qmp_path = dir.0.join("qmp.sock");
    let append = format!(
        "fl.steps=fill,balloon,verify fl.balloon_changes=2 fl.balloon_report_pages={REPORT_PAGES} \
         fl.balloon_timeout_ms=100000"
    );
    let mut child = Command::new("timeout")
        .args(["120", qemu])
        // acpi=off: microvm then names its virtio-mmio windows on the command line.
        .args(["-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host,-arch-capabilities"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-no-reboot", "-smp", "1", "-m", &format!("{RAM_MIB}M")])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        // QEMU's virtio-mmio defaults to the legacy (version 1) registers.
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(["-device", "virtio-balloon-device,id=balloon0,deflate-on-oom=on,free-page-reporting=on"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .arg("-kernel")
        .arg(&image)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn qemu");
    let mut serial = Serial::new(&mut child);
    let mut qmp = Qmp::connect(&qmp_path);

    let ready = serial.next_report("ready");
    let region_pages = ready["region_pages"].as_u64().unwrap();
    let balloon_pages = pages(BALLOON_MIB);
    qmp.set_balloon((RAM_MIB - BALLOON_MIB) << 20);
    let inflated = serial.next_report("balloon");
    eprintln!("inflated: {inflated}");
    assert_change(&inflated, balloon_pages, balloon_pages, 0, region_pages);
    assert_eq!(qmp.execute("query-balloon", json!({}))["actual"], (RAM_MIB - BALLOON_MIB) << 20);

    // The guest sent its statistics when the driver started: its workload region.
    let stats = qmp.guest_stats();
    assert_eq!(stats["stat-total-memory"], region_pages * 4096, "{stats}");
    assert_eq!(stats["stat-free-memory"], REPORT_PAGES * 4096, "{stats}");
    assert_eq!(stats["stat-available-memory"], region_pages * 4096, "{stats}");
    assert_eq!(stats["stat-swap-in"], 0, "{stats}");
    // Once QEMU polls (it hands the stats buffer back every second), the guest answers
    // with fresh numbers: the balloon is no longer available memory.
    qmp.execute(
        "qom-set",
        json!({"path": "/machine/peripheral/balloon0", "property": "guest-stats-polling-interval", "value": 1}),
    );
    let want_available = (region_pages - balloon_pages) * 4096;
    let deadline = Instant::now() + HANG_GUARD;
    while qmp.guest_stats()["stat-available-memory"] != want_available {
        assert!(Instant::now() < deadline, "the guest never refreshed its stats: {}", qmp.guest_stats());
        std::thread::sleep(Duration::from_millis(200));
    }

    qmp.set_balloon(RAM_MIB << 20);
    let deflated = serial.next_report("balloon");
    eprintln!("deflated: {deflated}");
    assert_change(&deflated, 0, 0, balloon_pages, region_pages);

    let lines = serial.rest();
    let status = child.wait().unwrap();
    let all = lines.join("\n");
    let verifies: Vec<Value> = lines
        .iter()
        .filter_map(|line| line.strip_prefix("FL verify "))
        .map(|json| serde_json::from_str(json).unwrap())
        .collect();
    assert_eq!(verifies.len(), 2, "one verify line for balloon, one for verify:\n{all}");
    for verify in &verifies {
        assert_eq!(verify["ok"], true, "{all}");
    }
    assert_eq!(verifies[1]["pages"], region_pages, "{all}");
    assert!(all.contains("FL done {\"status\":0,"), "{all}");
    // isa-debug-exit: QEMU exits with (status << 1) | 1; status 0 is success.
    assert_eq!(status.code(), Some(1), "{all}");
}
