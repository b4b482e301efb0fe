//! Sources that answer "later": faults complete through the installer while the handler
//! serves other faults, completions and background pushes honour the retry protocol, and
//! the coherence checker agrees with the table at the end.

use super::*;
use crate::smmu::coherence::check;
use crate::smmu::page_installer::{Completion, PageInstaller};
use crate::smmu::page_source::PageRequest;

/// Answers every MISSING fault "later": the request goes to the test through a channel.
struct LaterSource {
    requests: Mutex<mpsc::Sender<PageRequest>>,
}

impl PageSource for LaterSource {
    fn read_page(&self, gpa: u64, _buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        Err(PageSourceError::Failed { gpa, reason: "only answers later".into() })
    }

    fn request_page(&self, req: PageRequest, _buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        self.requests.lock().unwrap().send(req).expect("the test listens");
        Ok(PageData::Pending)
    }
}

/// Bounds a wait only so a broken engine fails the test instead of hanging it.
const BOUND: Duration = Duration::from_secs(60);

fn page_bytes_of(value: u64, bytes: u64) -> Vec<u8> {
    (0..bytes / 8).flat_map(|_| value.to_ne_bytes()).collect()
}

fn later_rig(map: Mapping, page_bytes: u64) -> (Rig, mpsc::Receiver<PageRequest>, PageInstaller) {
    let (tx, rx) = mpsc::channel();
    let region = region_of(&map, page_bytes, UffdMode::Missing, false);
    let src = Arc::new(LaterSource { requests: Mutex::new(tx) });
    // One handler: if it waited for a pending page, no other fault would be served.
    let r = rig(map, region, src, FaultEngineConfig { handler_threads: 1, ..Default::default() });
    let installer = r.engine.installer();
    (r, rx, installer)
}

fn answers_later_while_serving_other_faults(map: Mapping) {
    let (r, rx, installer) = later_rig(map, PAGE_4K);
    let (a, b) = (r.map.page(5), r.map.page(9));
    let ta = std::thread::spawn(move || read_words(a, PAGE_4K));
    let first = rx.recv_timeout(BOUND).expect("no request for the first fault");
    // The first page is still pending: the single handler must take the second fault.
    let tb = std::thread::spawn(move || read_words(b, PAGE_4K));
    let second = rx.recv_timeout(BOUND).expect("the handler blocked on a pending page");
    assert!(first.is_fault() && second.is_fault());
    let mut seen = vec![first.gpa(), second.gpa()];
    seen.sort_unstable();
    assert_eq!(seen, vec![GPA + 5 * PAGE_4K, GPA + 9 * PAGE_4K]);
    // Completed in the other order than asked.
    for req in [second, first] {
        let i = (req.gpa() - GPA) / PAGE_4K;
        let data = page_bytes_of(pattern(i, 4), PAGE_4K);
        assert_eq!(installer.complete(req, Some(&data)).unwrap(), Completion::Installed);
    }
    assert!(ta.join().unwrap().iter().all(|&w| w == pattern(5, 4)));
    assert!(tb.join().unwrap().iter().all(|&w| w == pattern(9, 4)));
    let st = r.engine.stats();
    assert_eq!((st.pending, st.completed, st.pending_latency_ns.len()), (2, 2, 2), "{}", summary(&r.engine));
    assert_eq!(r.table.count(PageState::POPULATED), 2);
    let report = check(&r.regions, &r.table, &r.inv).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn anon_faults_answered_later_complete_while_the_handler_serves_others() {
    answers_later_while_serving_other_faults(Mapping::anon(16 * PAGE_4K));
}

#[test]
fn memfd_faults_answered_later_complete_while_the_handler_serves_others() {
    answers_later_while_serving_other_faults(Mapping::memfd(16 * PAGE_4K, false).unwrap());
}

#[test]
fn a_discard_between_request_and_data_is_not_undone_by_the_completion() {
    let (r, rx, installer) = later_rig(Mapping::anon(8 * PAGE_4K), PAGE_4K);
    let hva = r.map.page(3);
    let toucher = std::thread::spawn(move || read_words(hva, PAGE_4K));
    let req = rx.recv_timeout(BOUND).expect("no request");
    let page = GuestRange::new(GPA + 3 * PAGE_4K, PAGE_4K);
    // The handler is free (the page is pending), so it reads the discard's REMOVE event.
    r.discarder.discard(page).unwrap();
    let stale = page_bytes_of(0xee, PAGE_4K);
    assert_eq!(installer.complete(req, Some(&stale)).unwrap(), Completion::Retry);
    // The woken toucher faults again; the handler finds the page discarded: zeros, at once.
    let words = toucher.join().unwrap();
    assert!(words.iter().all(|&w| w == 0), "the completion undid a discard");
    assert!(rx.try_recv().is_err(), "a discarded page was asked of the source again");
    let st = r.engine.stats();
    assert_eq!((st.pending, st.completed, st.completions_dropped), (1, 0, 1), "{}", summary(&r.engine));
    assert_eq!(r.table.get(page.gpa), PageState::POPULATED);
    let report = check(&r.regions, &r.table, &r.inv).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn background_pushes_never_overwrite_installed_or_discarded_pages() {
    let (r, rx, installer) = later_rig(Mapping::anon(8 * PAGE_4K), PAGE_4K);
    let page = |i: u64| GPA + i * PAGE_4K;
    let data = |i: u64, gen: u64| page_bytes_of(pattern(i, gen), PAGE_4K);
    // Page 0: the guest writes it first (its fault is answered, then it writes).
    let h0 = r.map.page(0);
    let w = std::thread::spawn(move || fill_words(h0, PAGE_4K, 0x77));
    let req = rx.recv_timeout(BOUND).expect("no request");
    assert_eq!(installer.complete(req, Some(&data(0, 1))).unwrap(), Completion::Installed);
    w.join().unwrap();
    // Page 1 discarded before its push begins, page 2 discarded between begin and data.
    r.discarder.discard(GuestRange::new(page(1), PAGE_4K)).unwrap();
    let early = installer.begin(page(2) + 100).expect("in a region");
    assert_eq!(early.gpa(), page(2));
    r.discarder.discard(GuestRange::new(page(2), PAGE_4K)).unwrap();
    assert!(installer.settled(page(0)) && installer.settled(page(1)) && !installer.settled(page(3)));
    let push = |i: u64| installer.complete(installer.begin(page(i)).unwrap(), Some(&data(i, 2))).unwrap();
    assert_eq!(push(0), Completion::AlreadyPresent);
    assert_eq!(push(1), Completion::Discarded);
    assert_eq!(installer.complete(early, Some(&data(2, 2))).unwrap(), Completion::Retry);
    assert_eq!(push(2), Completion::Discarded, "a retried push of a discarded page");
    for i in 3..8 {
        assert_eq!(push(i), Completion::Installed);
    }
    assert!(installer.begin(page(8)).is_none(), "outside the region");
    let base = r.map.addr;
    let seen = on_thread(move || (0..8).map(|i| read_words(base + i * PAGE_4K, 8)[0]).collect::<Vec<_>>());
    let mut want = vec![0x77, 0, 0];
    want.extend((3..8).map(|i| pattern(i, 2)));
    assert_eq!(seen, want);
    assert!(rx.try_recv().is_err(), "a pushed or discarded page faulted to the source");
    let report = check(&r.regions, &r.table, &r.inv).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn a_source_that_cannot_deliver_stops_the_engine_and_releases_the_waiter() {
    let (r, rx, installer) = later_rig(Mapping::anon(4 * PAGE_4K), PAGE_4K);
    let hva = r.map.page(1);
    let toucher = std::thread::spawn(move || read_words(hva, 8)[0]);
    let req = rx.recv_timeout(BOUND).expect("no request");
    installer.fail(req.gpa(), PageSourceError::Failed { gpa: req.gpa(), reason: "peer gone".into() });
    let msg = r.engine.wait_failure(BOUND).expect("no failure reported");
    assert!(msg.contains("peer gone"), "{msg}");
    // Unregistering woke the stuck toucher (the kernel filled its page normally).
    assert_eq!(toucher.join().unwrap(), 0);
    let Rig { engine, .. } = r;
    assert!(engine.shutdown().is_err());
}

/// A hybrid migration's destination: pages written by their owner (installed when
/// missing, overwritten in place when present), then some evicted, which makes their
/// next touch a fault that asks the source again, not a zero fill.
fn owned_writes_then_eviction_make_pages_ask_the_source_again(map: Mapping) {
    let (r, rx, installer) = later_rig(map, PAGE_4K);
    let page = |i: u64| GPA + i * PAGE_4K;
    let data = |i: u64, gen: u64| page_bytes_of(pattern(i, gen), PAGE_4K);
    for i in 0..4 {
        installer.write_owned(page(i), Some(&data(i, 1))).unwrap();
    }
    // A second round overwrites page 1 in place; a zero marker clears page 2 and leaves
    // the missing page 5 missing.
    installer.write_owned(page(1), Some(&data(1, 2))).unwrap();
    installer.write_owned(page(2), None).unwrap();
    installer.write_owned(page(5), None).unwrap();
    assert!(rx.try_recv().is_err(), "owned writes raised faults");
    assert_eq!(r.table.count(PageState::POPULATED), 4);
    assert!(!installer.settled(page(5)));
    assert!(read_words(r.map.page(1), PAGE_4K).iter().all(|&w| w == pattern(1, 2)));
    assert!(read_words(r.map.page(2), PAGE_4K).iter().all(|&w| w == 0));
    // Pages 1 and 2 are stale: evicted, they are missing (not discarded) again.
    r.discarder.evict(GuestRange::new(page(1), 2 * PAGE_4K)).unwrap();
    assert_eq!(r.table.get(page(1)), PageState::EMPTY);
    assert!(!installer.settled(page(2)));
    let hva = r.map.page(1);
    let toucher = std::thread::spawn(move || read_words(hva, PAGE_4K));
    let req = rx.recv_timeout(BOUND).expect("an evicted page did not ask the source");
    assert_eq!(req.gpa(), page(1));
    assert_eq!(installer.complete(req, Some(&data(1, 3))).unwrap(), Completion::Installed);
    assert!(toucher.join().unwrap().iter().all(|&w| w == pattern(1, 3)));
    // Pages never evicted kept their contents.
    assert!(read_words(r.map.page(3), PAGE_4K).iter().all(|&w| w == pattern(3, 1)));
    let report = check(&r.regions, &r.table, &r.inv).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn anon_owned_writes_and_eviction() {
    owned_writes_then_eviction_make_pages_ask_the_source_again(Mapping::anon(8 * PAGE_4K));
}

#[test]
fn memfd_owned_writes_and_eviction() {
    owned_writes_then_eviction_make_pages_ask_the_source_again(Mapping::memfd(8 * PAGE_4K, false).unwrap());
}
