//! A user-space TCP relay for links the kernel cannot fake here (no `netem`): a one-way
//! delay per direction (chunks queued with their arrival time, so the delay does not cut
//! the bandwidth), a cut of both directions at a byte offset of the forward stream, and a
//! bit flip at a byte offset. It counts what it forwarded.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the relay does to the link.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkFaults {
    /// Each direction's bytes arrive this much later than they were read.
    pub delay: Duration,
    /// Cut both directions once this many forward bytes went through.
    pub cut_at: Option<u64>,
    /// Flip bit `.1` of the forward byte at offset `.0`.
    pub flip: Option<(u64, u8)>,
}

/// What went through, once the relay ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct Forwarded {
    /// Bytes from the connecting side to the target.
    pub forward: u64,
    /// Bytes back.
    pub back: u64,
    /// True when the cut happened.
    pub cut: bool,
}

/// A relay for one connection, running on its own threads.
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    handle: JoinHandle<Forwarded>,
}

/// Up to this many chunks (of at most 64 KiB) wait in a direction's delay queue.
const QUEUE_CHUNKS: usize = 1024;

impl Relay {
    /// Listens on 127.0.0.1 (inside netns `netns` when given: the relay thread enters
    /// it), takes one connection and forwards it to `target` with `faults`.
    pub fn spawn(netns: Option<&str>, target: SocketAddr, faults: LinkFaults) -> Relay {
        let (tx, rx) = mpsc::channel();
        let netns = netns.map(str::to_string);
        let handle = std::thread::spawn(move || {
            if let Some(name) = &netns {
                super::netns::enter_named(name);
            }
            let listener = TcpListener::bind("127.0.0.1:0").expect("relay: bind 127.0.0.1:0");
            tx.send(listener.local_addr().unwrap()).unwrap();
            let Ok((from, _)) = listener.accept() else { return Forwarded::default() };
            let Ok(to) = TcpStream::connect(target) else {
                let _ = from.shutdown(Shutdown::Both);
                return Forwarded::default();
            };
            let _ = (from.set_nodelay(true), to.set_nodelay(true));
            let (back_from, back_to) = (to.try_clone().unwrap(), from.try_clone().unwrap());
            let back = std::thread::spawn(move || pump(back_from, back_to, faults.delay, None, None).0);
            let (forward, cut) = pump(from, to, faults.delay, faults.cut_at, faults.flip);
            Forwarded { forward, back: back.join().unwrap_or(0), cut }
        });
        let addr = rx.recv().expect("the relay thread failed before listening");
        Relay { addr, handle }
    }

    /// Waits for the connection to end.
    pub fn join(self) -> Forwarded {
        self.handle.join().expect("relay thread")
    }
}

/// One chunk in a delay queue; `None` bytes mean "cut here".
struct Chunk {
    due: Instant,
    bytes: Option<Vec<u8>>,
}

/// Copies `from` to `to`, each chunk written `delay` after it was read; at `cut_at`
/// both sockets are shut down both ways. Returns the bytes written and whether it cut.
fn pump(
    mut from: TcpStream,
    to: TcpStream,
    delay: Duration,
    cut_at: Option<u64>,
    flip: Option<(u64, u8)>,
) -> (u64, bool) {
    let (tx, rx) = mpsc::sync_channel::<Chunk>(QUEUE_CHUNKS);
    let from_writer = from.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut to = to;
        let mut written = 0u64;
        let mut cut = false;
        for chunk in rx {
            let now = Instant::now();
            if chunk.due > now {
                std::thread::sleep(chunk.due - now);
            }
            match chunk.bytes {
                Some(bytes) => {
                    if to.write_all(&bytes).is_err() {
                        break;
                    }
                    written += bytes.len() as u64;
                }
                None => {
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from_writer.shutdown(Shutdown::Both);
                    cut = true;
                    break;
                }
            }
        }
        if !cut {
            let _ = to.shutdown(Shutdown::Write);
        }
        (written, cut)
    });
    let mut buffer = vec![0u8; 64 << 10];
    let mut offset = 0u64;
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let end = offset + n as u64;
        let mut chunk = buffer[..n].to_vec();
        if let Some((at, bit)) = flip {
            if (offset..end).contains(&at) {
                chunk[(at - offset) as usize] ^= 1 << (bit % 8);
            }
        }
        let due = Instant::now() + delay;
        if let Some(at) = cut_at.filter(|&at| end > at) {
            chunk.truncate((at - offset) as usize);
            let _ = tx.send(Chunk { due, bytes: Some(chunk) });
            let _ = tx.send(Chunk { due, bytes: None });
            break;
        }
        if tx.send(Chunk { due, bytes: Some(chunk) }).is_err() {
            break;
        }
        offset = end;
    }
    drop(tx);
    writer.join().unwrap_or((0, false))
}
