//! The control server on real Unix sockets, served by a real EventManager loop on its own
//! thread, talked to by the real client and `faultline ctl` code. The VM behind it is a
//! test [`ControlTarget`] (pure logic).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use serde_json::Value;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::protocol::{ErrorKind, Response, MAX_LINE_BYTES};
use super::*;
use crate::cli::{Cli, Command};

const MEMORY_BYTES: u64 = 1 << 30;

/// A balloon whose guest follows every target at once, refusing targets above `limit_pages`.
struct TestBalloon {
    sizes: Mutex<BalloonSizes>,
    limit_pages: u64,
}

impl BalloonControl for TestBalloon {
    fn sizes(&self) -> BalloonSizes {
        *self.sizes.lock().unwrap()
    }

    fn set_target_pages(&self, pages: u64) -> Result<(), BalloonRefused> {
        if pages > self.limit_pages {
            return Err(BalloonRefused(format!("at most {} pages", self.limit_pages)));
        }
        let mut sizes = self.sizes.lock().unwrap();
        sizes.target_pages = pages;
        sizes.actual_pages = pages;
        sizes.host_freed_bytes = Some(pages * 4096);
        Ok(())
    }

    fn stats(&self) -> BalloonStats {
        BalloonStats { free_bytes: Some(100 << 20), major_faults: Some(2), age_ms: Some(250), ..Default::default() }
    }
}

struct TestVm {
    balloon: Option<TestBalloon>,
}

impl ControlTarget for TestVm {
    fn status(&self) -> VmStatus {
        VmStatus {
            state: VmState::Running,
            vcpus: 2,
            memory_bytes: MEMORY_BYTES,
            uptime_ms: 1234,
            guest_ready: true,
            balloon: self.balloon.is_some(),
            exit: None,
        }
    }

    fn balloon(&self) -> Option<&dyn BalloonControl> {
        self.balloon.as_ref().map(|b| b as &dyn BalloonControl)
    }
}

fn vm(with_balloon: bool) -> Arc<dyn ControlTarget> {
    let balloon = TestBalloon { sizes: Mutex::new(BalloonSizes::default()), limit_pages: (768 << 20) / 4096 };
    Arc::new(TestVm { balloon: with_balloon.then_some(balloon) })
}

/// Ends the test's event loop when its eventfd is written.
struct StopWatcher {
    event: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.event.read();
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.event, EventSet::IN)).unwrap();
    }
}

/// A server bound in a temporary directory, served by an EventManager thread.
struct Served {
    path: PathBuf,
    server: Arc<Mutex<ControlServer>>,
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(target: Arc<dyn ControlTarget>) -> Served {
        Self::start_with(target, DEFAULT_MAX_CLIENTS)
    }

    fn start_with(target: Arc<dyn ControlTarget>, max_clients: usize) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let server = Arc::new(Mutex::new(ControlServer::bind(&path, target).unwrap().with_max_clients(max_clients)));
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let watcher = StopWatcher { event: stop.try_clone().unwrap(), stopped: Arc::new(AtomicBool::new(false)) };
        let served = server.clone();
        let thread = std::thread::spawn(move || {
            let stopped = watcher.stopped.clone();
            let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber>>> = EventManager::new().unwrap();
            manager.add_subscriber(served);
            manager.add_subscriber(Arc::new(Mutex::new(watcher)));
            while !stopped.load(Ordering::SeqCst) {
                manager.run().unwrap();
            }
        });
        Served { path, server, stop, thread: Some(thread), _dir: dir }
    }

    fn client(&self) -> ControlClient {
        ControlClient::connect(&self.path, None).unwrap()
    }

    fn raw(&self) -> RawClient {
        RawClient::connect(&self.path)
    }

    /// Waits (without a time limit: a hang is the failure) until `condition` holds of the server.
    fn wait_until(&self, condition: impl Fn(&ControlServer) -> bool) {
        while !condition(&self.server.lock().unwrap()) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.write(1).unwrap();
        if let Some(thread) = self.thread.take() {
            let joined = thread.join();
            if !std::thread::panicking() {
                joined.expect("the event loop thread panicked");
            }
        }
    }
}

/// A client that writes raw bytes and reads raw response lines.
struct RawClient {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl RawClient {
    fn connect(path: &Path) -> RawClient {
        let stream = UnixStream::connect(path).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        RawClient { stream, reader }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn response(&mut self) -> Response {
        let mut line = String::new();
        assert!(self.reader.read_line(&mut line).unwrap() > 0, "the server closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad response line {line:?}: {e}"))
    }

    fn error_kind(&mut self) -> (Option<u64>, ErrorKind) {
        let response = self.response();
        assert!(!response.ok, "{response:?}");
        (response.id, response.error.unwrap().kind)
    }
}

/// Runs `faultline ctl --socket PATH <args>` through the real CLI parser and ctl code.
fn ctl(path: &Path, args: &[&str]) -> Result<String, ClientError> {
    let argv = ["faultline", "ctl", "--socket", path.to_str().unwrap()].into_iter().chain(args.iter().copied());
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Ctl(args) => ctl::execute(&args),
        other => panic!("parsed as {other:?}"),
    }
}

fn server_error(result: Result<impl std::fmt::Debug, ClientError>) -> protocol::ErrorBody {
    match result {
        Err(ClientError::Server(body)) => body,
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[test]
fn hello_status_and_balloon_round_trip_through_faultline_ctl() {
    let served = Served::start(vm(true));
    let hello = ctl(&served.path, &["hello"]).unwrap();
    assert!(hello.contains("control protocol 1") && hello.contains("balloon.set"), "{hello}");
    let status = ctl(&served.path, &["status"]).unwrap();
    assert_eq!(status, "running: 2 vCPUs, 1 GiB RAM, up 1.2 s, guest ready, balloon");

    assert_eq!(ctl(&served.path, &["balloon", "get"]).unwrap(), "balloon: target 0 B (0 pages), actual 0 B (0 pages)");
    let set = ctl(&served.path, &["balloon", "set", "512M"]).unwrap();
    assert_eq!(
        set,
        "balloon target set: target 512 MiB (131072 pages), actual 512 MiB (131072 pages), host freed 512 MiB"
    );
    let got: Value = serde_json::from_str(&ctl(&served.path, &["balloon", "get", "--json"]).unwrap()).unwrap();
    assert_eq!(got["target_bytes"], 512u64 << 20);
    assert_eq!(got["actual_pages"], 131072);
    assert_eq!(got["stats"]["free_bytes"], 100u64 << 20);
    let stats = ctl(&served.path, &["--json", "balloon", "stats"]).unwrap();
    assert_eq!(serde_json::from_str::<BalloonStats>(&stats).unwrap().major_faults, Some(2));
    assert_eq!(
        ctl(&served.path, &["balloon", "stats"]).unwrap(),
        "guest memory: free 100 MiB, major faults 2 (reported 0.2 s ago)"
    );

    // The typed client over one connection, several calls.
    let mut client = served.client();
    assert_eq!(client.hello().unwrap().protocol, protocol::PROTOCOL_VERSION);
    assert_eq!(client.status().unwrap().memory_bytes, MEMORY_BYTES);
    assert_eq!(client.balloon_set("0").unwrap().target_pages, 0);
    assert_eq!(client.balloon_get().unwrap().actual_bytes, 0);
    assert_eq!(client.balloon_stats().unwrap().age_ms, Some(250));
}

#[test]
fn balloon_targets_the_vm_cannot_take_are_refused_clearly() {
    let served = Served::start(vm(true));
    let too_big = server_error(ctl(&served.path, &["balloon", "set", "2G"]));
    assert_eq!(too_big.kind, ErrorKind::BadArgs);
    assert!(too_big.message.contains("smaller than guest RAM"), "{too_big}");
    // The same rule as the command line's --balloon-schedule: all of RAM, or part of a
    // page, is refused too.
    let all_of_ram = server_error(ctl(&served.path, &["balloon", "set", "1G"]));
    assert_eq!(all_of_ram.kind, ErrorKind::BadArgs, "{all_of_ram}");
    assert!(all_of_ram.message.contains("smaller than guest RAM"), "{all_of_ram}");
    let part_page = server_error(ctl(&served.path, &["balloon", "set", "5000"]));
    assert_eq!(part_page.kind, ErrorKind::BadArgs, "{part_page}");
    assert!(part_page.message.contains("multiple of the balloon page"), "{part_page}");
    let refused = server_error(ctl(&served.path, &["balloon", "set", "1020M"]));
    assert_eq!(refused.kind, ErrorKind::BalloonError);
    assert!(refused.message.contains("at most"), "{refused}");
    let garbage = server_error(ctl(&served.path, &["balloon", "set", "lots"]));
    assert_eq!(garbage.kind, ErrorKind::BadArgs);
    assert!(garbage.message.contains("512M"), "{garbage}");
    // Nothing changed.
    assert_eq!(served.client().balloon_get().unwrap().target_pages, 0);
}

#[test]
fn a_vm_without_balloon_says_how_to_get_one() {
    let served = Served::start(vm(false));
    for args in [&["balloon", "get"][..], &["balloon", "set", "64M"], &["balloon", "stats"]] {
        let err = server_error(ctl(&served.path, args));
        assert_eq!(err.kind, ErrorKind::NoBalloon, "{args:?}");
        assert!(err.message.contains("no balloon") && err.message.contains("--balloon"), "{err}");
    }
    assert!(ctl(&served.path, &["status"]).unwrap().ends_with("no balloon"));
}

#[test]
fn broken_requests_get_errors_and_the_connection_lives_on() {
    let served = Served::start(vm(true));
    let mut raw = served.raw();
    raw.send(b"{this is not json\n");
    assert_eq!(raw.error_kind(), (None, ErrorKind::BadJson));
    raw.send(b"{\"id\": 3, \"cmd\": \"reboot\"}\n");
    assert_eq!(raw.error_kind(), (Some(3), ErrorKind::UnknownCommand));
    raw.send(b"{\"id\": 4, \"cmd\": \"balloon.set\"}\n");
    assert_eq!(raw.error_kind(), (Some(4), ErrorKind::BadArgs));
    raw.send(b"{\"cmd\": \"status\"}\n");
    assert_eq!(raw.error_kind(), (None, ErrorKind::BadRequest));
    // Blank lines are skipped; CRLF is fine.
    raw.send(b"\n  \r\n{\"id\": 5, \"cmd\": \"status\"}\r\n");
    let response = raw.response();
    assert_eq!((response.id, response.ok), (Some(5), true));
    assert_eq!(response.result.unwrap()["state"], "running");
}

#[test]
fn an_oversized_line_is_skipped_whole_and_the_next_one_answered() {
    let served = Served::start(vm(true));
    let mut raw = served.raw();
    // In one write, newline included.
    let mut line = vec![b'x'; MAX_LINE_BYTES + 1];
    line.push(b'\n');
    raw.send(&line);
    assert_eq!(raw.error_kind(), (None, ErrorKind::LineTooLong));
    // In many writes, the error comes before the newline does; the tail is skipped.
    for _ in 0..20 {
        raw.send(&[b'{'; 8192]);
    }
    assert_eq!(raw.error_kind(), (None, ErrorKind::LineTooLong));
    raw.send(b"still the same long line\n{\"id\": 8, \"cmd\": \"hello\"}\n");
    let response = raw.response();
    assert_eq!((response.id, response.ok), (Some(8), true), "{response:?}");
    // A line of exactly the limit is read (and is bad JSON, not too long).
    let mut line = vec![b' '; MAX_LINE_BYTES - 2];
    line.extend_from_slice(b"{]\n");
    raw.send(&line);
    assert_eq!(raw.error_kind(), (None, ErrorKind::BadJson));
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let served = Served::start(vm(true));
    let mut raw = served.raw();
    let mut batch = Vec::new();
    for id in 0..50u64 {
        let cmd = ["hello", "status", "balloon.get", "nope"][id as usize % 4];
        batch.extend_from_slice(format!("{{\"id\": {id}, \"cmd\": \"{cmd}\"}}\n").as_bytes());
    }
    raw.send(&batch);
    for id in 0..50u64 {
        let response = raw.response();
        assert_eq!(response.id, Some(id));
        assert_eq!(response.ok, id % 4 != 3);
    }
}

#[test]
fn two_clients_are_served_at_once_and_a_half_line_blocks_nobody() {
    let served = Served::start(vm(true));
    let mut a = served.raw();
    let mut b = served.raw();
    a.send(b"{\"id\": 1, \"cmd\": ");
    b.send(b"{\"id\": 2, \"cmd\": \"status\"}\n");
    assert_eq!(b.response().id, Some(2));
    a.send(b"\"balloon.get\"}\n");
    let response = a.response();
    assert_eq!((response.id, response.ok), (Some(1), true));
    served.wait_until(|s| s.clients() == 2);
}

#[test]
fn a_client_that_leaves_mid_request_is_cleaned_up() {
    let served = Served::start(vm(true));
    {
        let mut a = served.raw();
        a.send(b"{\"id\": 1, \"cmd\": \"stat");
        served.wait_until(|s| s.clients() == 1);
    }
    served.wait_until(|s| s.clients() == 0);
    // A client that sends a request and leaves without reading the answer.
    {
        let mut a = served.raw();
        a.send(b"{\"id\": 1, \"cmd\": \"status\"}\n{\"id\": 2, \"cmd\": \"hello\"}\n");
    }
    served.wait_until(|s| s.clients() == 0);
    assert_eq!(served.client().status().unwrap().state, VmState::Running);
}

#[test]
fn a_client_that_never_reads_stalls_only_itself() {
    let served = Served::start(vm(true));
    let mut flood = served.raw();
    let mut writer = flood.stream.try_clone().unwrap();
    // Far more answers than the server queues for one client plus both socket buffers.
    const REQUESTS: u64 = 40_000;
    let sender = std::thread::spawn(move || {
        for id in 0..REQUESTS {
            writer.write_all(format!("{{\"id\": {id}, \"cmd\": \"hello\"}}\n").as_bytes()).unwrap();
        }
    });
    served.wait_until(|s| s.paused_clients() == 1);
    // While the flooding client is stalled, another is served.
    let mut other = served.client();
    assert_eq!(other.status().unwrap().vcpus, 2);
    assert_eq!(
        ctl(&served.path, &["balloon", "set", "4K"]).unwrap().split(',').next(),
        Some("balloon target set: target 4 KiB (1 pages)")
    );
    // Once it reads, the flooding client gets every answer, in order.
    for id in 0..REQUESTS {
        let response = flood.response();
        assert_eq!((response.id, response.ok), (Some(id), true));
    }
    sender.join().unwrap();
    assert_eq!(served.server.lock().unwrap().paused_clients(), 0);
}

#[test]
fn clients_beyond_the_limit_are_told_the_server_is_busy() {
    let served = Served::start_with(vm(true), 1);
    let mut first = served.client();
    served.wait_until(|s| s.clients() == 1);
    let mut second = served.raw();
    assert_eq!(second.error_kind(), (None, ErrorKind::Busy));
    let mut rest = Vec::new();
    assert_eq!(second.reader.read_to_end(&mut rest).unwrap(), 0, "closed after the busy answer");
    assert_eq!(first.hello().unwrap().protocol, protocol::PROTOCOL_VERSION);
    // The busy error reaches the client's user.
    let err = server_error(ControlClient::connect(&served.path, None).unwrap().status());
    assert_eq!(err.kind, ErrorKind::Busy);
}

#[test]
fn the_socket_file_is_private_and_removed_when_the_server_goes() {
    let served = Served::start(vm(true));
    let path = served.path.clone();
    let mode = std::fs::symlink_metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    drop(served);
    assert!(!path.exists(), "the socket file outlived the server");
    let err = ControlClient::connect(&path, None).unwrap_err();
    assert!(err.to_string().contains("is the VM running"), "{err}");
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    // A VMM that died: the file is there, nobody listens.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = ControlServer::bind(&path, vm(true)).unwrap();
    // Someone listens now: refused, and the live socket is left alone.
    let err = ControlServer::bind(&path, vm(true)).unwrap_err();
    assert!(matches!(err, ApiError::InUse(_)), "{err:?}");
    assert!(err.to_string().contains("another process"), "{err}");
    assert!(UnixStream::connect(&path).is_ok());
    drop(server);
    assert!(!path.exists());

    // Not a socket: refused, not removed.
    std::fs::write(&path, b"precious").unwrap();
    let err = ControlServer::bind(&path, vm(true)).unwrap_err();
    assert!(matches!(err, ApiError::NotASocket(_)), "{err:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");

    let long = dir.path().join("x".repeat(120));
    assert!(matches!(ControlServer::bind(&long, vm(true)).unwrap_err(), ApiError::PathTooLong(_)));
}

#[test]
fn a_server_does_not_remove_a_successors_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let first = ControlServer::bind(&path, vm(true)).unwrap();
    let lock = dir.path().join("ctl.sock.lock");
    // While the first holds the path, a second server is refused even if the socket file
    // went away (the path's lock says who owns it).
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(ControlServer::bind(&path, vm(true)).unwrap_err(), ApiError::InUse(_)));
    // Someone removed our files and another server took the path.
    std::fs::remove_file(&lock).unwrap();
    let second = ControlServer::bind(&path, vm(true)).unwrap();
    drop(first);
    assert!(UnixStream::connect(&path).is_ok(), "the first server removed the second's socket");
    assert!(lock.exists(), "the first server removed the second's lock file");
    drop(second);
    assert!(!path.exists() && !lock.exists());
}

#[test]
fn a_vm_that_does_not_answer_times_the_client_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut client = ControlClient::connect(&path, Some(std::time::Duration::from_millis(20))).unwrap();
    let _accepted = listener.accept().unwrap();
    let err = client.status().unwrap_err();
    assert!(matches!(err, ClientError::Timeout(_)), "{err:?}");
    assert!(err.to_string().contains("--timeout"), "{err}");
}
