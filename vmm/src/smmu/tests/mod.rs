//! Tests of the smmu on real userfaultfd and real memory (no VM): regions are mapped here,
//! registered with a fault engine, and touched from other threads. The stress test is in
//! `stress.rs`, the hugetlb tests in `hugetlb.rs`.

mod access;
mod coherence;
mod host_swap;
mod hugetlb;
mod pending;
mod stress;
mod tuning;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
use rustix::mm::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

use super::discard::Discarder;
use super::fault_engine::{FaultEngine, FaultEngineConfig, FaultKind};
use super::invalidation::Invalidation;
use super::page_source::{FileSource, PageData, PageSource, PageSourceError, ZeroSource};
use super::page_state::{PageState, PageStateTable};
use super::uffd::{Features, FillOutcome, RegisterMode, Uffd};
use super::{GuestRange, RegionBacking, Regions, UffdMode, UffdRegion, PAGE_2M, PAGE_4K};

/// A host mapping standing in for guest RAM; unmapped on drop.
struct Mapping {
    addr: u64,
    len: u64,
    fd: Option<Arc<OwnedFd>>,
}

impl Mapping {
    fn anon(len: u64) -> Mapping {
        // SAFETY: a fresh private anonymous mapping that nothing else references.
        let p = unsafe {
            mmap_anonymous(std::ptr::null_mut(), len as usize, ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE)
        }
        .expect("mmap anon");
        Mapping { addr: p as u64, len, fd: None }
    }

    fn memfd(len: u64, hugetlb: bool) -> std::io::Result<Mapping> {
        let mut flags = MemfdFlags::CLOEXEC;
        if hugetlb {
            flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
        }
        let fd = memfd_create("faultline-smmu-test", flags)?;
        ftruncate(&fd, len)?;
        // SAFETY: a fresh shared mapping of our own memfd.
        let p = unsafe {
            mmap(std::ptr::null_mut(), len as usize, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, &fd, 0)
        }?;
        Ok(Mapping { addr: p as u64, len, fd: Some(Arc::new(fd)) })
    }

    fn page(&self, i: u64) -> u64 {
        self.addr + i * PAGE_4K
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and every user (engine, threads) is gone.
        let _ = unsafe { munmap(self.addr as *mut _, self.len as usize) };
    }
}

/// Reads the u64 words of `[hva, hva + len)` (faulting them in if needed).
fn read_words(hva: u64, len: u64) -> Vec<u64> {
    (0..len / 8)
        // SAFETY: the range lies in a live test mapping; volatile because another thread
        // or the kernel changes it behind the compiler's back.
        .map(|i| unsafe { std::ptr::read_volatile((hva + i * 8) as *const u64) })
        .collect()
}

/// Fills `[hva, hva + len)` with `value`.
fn fill_words(hva: u64, len: u64, value: u64) {
    for i in 0..len / 8 {
        // SAFETY: as in `read_words`.
        unsafe { std::ptr::write_volatile((hva + i * 8) as *mut u64, value) };
    }
}

/// Runs `f` on a fresh thread (the faulting thread must not be a handler) and returns its
/// result.
fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().expect("toucher thread panicked")
}

/// Waits until `cond` holds: the engine records statistics just after the fill that woke
/// the faulting thread. The bound only turns a bug into a failure instead of a hang.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..60_000 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("never happened: {what}");
}

/// Fields drop in order: the engine stops (and unregisters) before the mapping goes.
struct Rig {
    engine: FaultEngine,
    discarder: Discarder,
    table: Arc<PageStateTable>,
    regions: Arc<Regions>,
    inv: Arc<Invalidation>,
    map: Mapping,
}

fn rig(map: Mapping, region: UffdRegion, source: Arc<dyn PageSource>, cfg: FaultEngineConfig) -> Rig {
    let table = Arc::new(PageStateTable::new(&[(region.guest_addr, region.len, region.page_bytes)]).unwrap());
    let inv = Arc::new(Invalidation::new());
    let regions = Arc::new(Regions::new(vec![region]));
    let engine = FaultEngine::start(regions.clone(), table.clone(), inv.clone(), source, cfg).unwrap();
    let discarder = Discarder::new(regions.clone(), table.clone(), inv.clone(), Some(engine.link()));
    Rig { engine, discarder, table, regions, inv, map }
}

fn region_of(map: &Mapping, page_bytes: u64, mode: UffdMode, wp: bool) -> UffdRegion {
    let backing = match (&map.fd, page_bytes) {
        (None, _) => RegionBacking::PrivateAnon,
        (Some(fd), PAGE_2M) => RegionBacking::Hugetlb { fd: Some(fd.clone()), file_offset: 0 },
        (Some(fd), _) => RegionBacking::Shared { fd: fd.clone(), file_offset: 0 },
    };
    UffdRegion { guest_addr: GPA, host_addr: map.addr, len: map.len, page_bytes, backing, mode, write_protect: wp }
}

const GPA: u64 = 0x40_0000;

fn pattern(page: u64, gen: u64) -> u64 {
    (page << 32) | gen | 0x8000_0000
}

fn image_file(pages: u64, page_bytes: u64) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    for p in 0..pages {
        let words: Vec<u8> = (0..page_bytes / 8).flat_map(|_| pattern(p, 1).to_ne_bytes()).collect();
        f.write_all(&words).unwrap();
    }
    f
}

fn summary(engine: &FaultEngine) -> String {
    let s = engine.stats();
    let mut out = String::new();
    for l in s.summaries() {
        out += &format!(
            "{:?}/{}K: n={} p50={:.1}us p99={:.1}us; ",
            l.kind,
            l.page_bytes / 1024,
            l.count,
            l.p50_ns as f64 / 1000.0,
            l.p99_ns as f64 / 1000.0
        );
    }
    out + &format!(
        "eexist={} eagain={} retries={} deferred={} removes={} external_removes={}",
        s.eexist, s.eagain, s.retries, s.deferred, s.remove_events, s.external_removes
    )
}

#[test]
fn missing_anon_zero_source_resolves_every_first_touch_with_zeros() {
    let map = Mapping::anon(64 * PAGE_4K);
    let region = region_of(&map, PAGE_4K, UffdMode::Missing, false);
    let r = rig(map, region, Arc::new(ZeroSource), FaultEngineConfig::default());
    let base = r.map.addr;
    let zeros = on_thread(move || (0..64).all(|i| read_words(base + i * PAGE_4K, PAGE_4K).iter().all(|&w| w == 0)));
    assert!(zeros);
    assert_eq!(r.table.count(PageState::POPULATED), 64);
    eventually("64 MISSING faults counted", || r.engine.stats().resolved(FaultKind::Missing) == 64);
    eprintln!("anon MISSING zero: {}", summary(&r.engine));
}

#[test]
fn missing_anon_file_source_fills_pages_from_the_image() {
    let map = Mapping::anon(32 * PAGE_4K);
    let region = region_of(&map, PAGE_4K, UffdMode::Missing, false);
    let src = Arc::new(FileSource::new(image_file(32, PAGE_4K), GPA).unwrap());
    let r = rig(map, region, src, FaultEngineConfig { handler_threads: 1, ..Default::default() });
    let base = r.map.addr;
    let ok =
        on_thread(move || (0..32).all(|i| read_words(base + i * PAGE_4K, PAGE_4K).iter().all(|&w| w == pattern(i, 1))));
    assert!(ok, "a page did not hold its image contents");
    assert_eq!(r.table.count(PageState::POPULATED), 32);
    eprintln!("anon MISSING file: {}", summary(&r.engine));
}

#[test]
fn minor_memfd_maps_page_cache_contents_with_continue() {
    let pages = 16;
    let map = Mapping::memfd(pages * PAGE_4K, false).unwrap();
    let fd = map.fd.clone().unwrap();
    for p in 0..pages {
        let bytes: Vec<u8> = (0..PAGE_4K / 8).flat_map(|_| pattern(p, 7).to_ne_bytes()).collect();
        rustix::io::pwrite(&*fd, &bytes, p * PAGE_4K).unwrap();
    }
    let region = region_of(&map, PAGE_4K, UffdMode::Minor, false);
    let r = rig(map, region, Arc::new(ZeroSource), FaultEngineConfig::default());
    let base = r.map.addr;
    let ok = on_thread(move || {
        (0..pages).all(|i| read_words(base + i * PAGE_4K, PAGE_4K).iter().all(|&w| w == pattern(i, 7)))
    });
    assert!(ok, "a page did not show its page-cache contents");
    eventually("MINOR faults counted", || r.engine.stats().resolved(FaultKind::Minor) == pages);
    assert_eq!(r.table.count(PageState::POPULATED), pages);
    eprintln!("memfd MINOR: {}", summary(&r.engine));
}

#[test]
fn uffd_copy_over_a_present_page_reports_already_filled_and_zeropage_too() {
    let map = Mapping::anon(2 * PAGE_4K);
    let uffd = Uffd::open(Features(0), Features(0)).unwrap();
    let io = uffd.register(map.addr, map.len, RegisterMode { missing: true, ..Default::default() }).unwrap();
    assert!(io.copy() && io.zeropage());
    let page = vec![0x42u8; PAGE_4K as usize];
    assert_eq!(uffd.copy(map.addr, &page, false, false).unwrap(), FillOutcome::Filled);
    assert_eq!(uffd.copy(map.addr, &page, false, false).unwrap(), FillOutcome::AlreadyFilled);
    assert_eq!(uffd.zeropage(map.addr, PAGE_4K, false).unwrap(), FillOutcome::AlreadyFilled);
    uffd.wake(map.addr, PAGE_4K).unwrap();
    assert_eq!(read_words(map.addr, 8)[0], 0x4242_4242_4242_4242);
    uffd.unregister(map.addr, map.len).unwrap();
}

/// A source that resolves the page itself (as a racing resolver would) before answering,
/// so the engine's own COPY meets EEXIST.
struct RacingSource {
    uffd: OnceLock<Arc<Uffd>>,
    host_base: u64,
}

impl PageSource for RacingSource {
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        let hva = self.host_base + (gpa - GPA);
        let winner = vec![0x5au8; buf.len()];
        let uffd = self.uffd.get().expect("set after start");
        assert_eq!(uffd.copy(hva, &winner, false, true).unwrap(), FillOutcome::Filled);
        buf.fill(0x11);
        Ok(PageData::Filled)
    }
}

#[test]
fn eexist_from_a_racing_resolver_wakes_the_faulting_thread() {
    let map = Mapping::anon(4 * PAGE_4K);
    let src = Arc::new(RacingSource { uffd: OnceLock::new(), host_base: map.addr });
    let region = region_of(&map, PAGE_4K, UffdMode::Missing, false);
    let r = rig(map, region, src.clone(), FaultEngineConfig { handler_threads: 1, ..Default::default() });
    src.uffd.set(r.engine.uffd().clone()).unwrap();
    let hva = r.map.page(2);
    let first = on_thread(move || read_words(hva, PAGE_4K)[0]);
    assert_eq!(first, 0x5a5a_5a5a_5a5a_5a5a, "the racing resolver's page must win");
    eventually("one EEXIST counted", || r.engine.stats().eexist == 1);
    assert!(r.table.get(GPA + 2 * PAGE_4K).contains(PageState::POPULATED));
}

/// A source that, on its first read, announces it and blocks until released.
struct GatedSource {
    reading: Mutex<Option<mpsc::Sender<()>>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl PageSource for GatedSource {
    fn read_page(&self, _gpa: u64, buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        if let Some(tx) = self.reading.lock().unwrap().take() {
            tx.send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
        }
        buf.fill(0xee); // the "old contents" a stale install would expose
        Ok(PageData::Filled)
    }
}

#[test]
fn a_fault_racing_a_discard_of_its_page_retries_and_installs_nothing_stale() {
    let map = Mapping::anon(8 * PAGE_4K);
    let (reading_tx, reading_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let src = Arc::new(GatedSource { reading: Mutex::new(Some(reading_tx)), release: Mutex::new(release_rx) });
    let region = region_of(&map, PAGE_4K, UffdMode::Missing, false);
    // Two handlers: one is held inside the source, the other reads the REMOVE event that
    // the discard's MADV_DONTNEED waits for.
    let r = rig(map, region, src, FaultEngineConfig { handler_threads: 2, ..Default::default() });
    let hva = r.map.page(3);
    let toucher = std::thread::spawn(move || read_words(hva, PAGE_4K));
    reading_rx.recv().unwrap(); // step 2 of the protocol is under way
    let page = GuestRange::new(GPA + 3 * PAGE_4K, PAGE_4K);
    r.discarder.discard(page).unwrap(); // the invalidation runs and returns
    release_tx.send(()).unwrap(); // now let the resolution try to install
    let words = toucher.join().unwrap();
    assert!(words.iter().all(|&w| w == 0), "stale source data was installed after a discard");
    assert_eq!(r.engine.stats().retries, 1, "{}", summary(&r.engine));
    assert_eq!(r.table.get(page.gpa), PageState::POPULATED, "{}", summary(&r.engine));
}

#[test]
fn discard_of_populated_anon_pages_reads_zero_afterwards() {
    let map = Mapping::anon(16 * PAGE_4K);
    let region = region_of(&map, PAGE_4K, UffdMode::Missing, false);
    let src = Arc::new(FileSource::new(image_file(16, PAGE_4K), GPA).unwrap());
    let r = rig(map, region, src, FaultEngineConfig::default());
    let base = r.map.addr;
    on_thread(move || (0..16).for_each(|i| drop(read_words(base + i * PAGE_4K, 8))));
    assert_eq!(r.table.count(PageState::POPULATED), 16);
    let rep = r.discarder.discard(GuestRange::new(GPA + 4 * PAGE_4K, 3 * PAGE_4K)).unwrap();
    assert_eq!(rep.freed.len(), 1);
    assert_eq!(r.table.count(PageState::DISCARDED), 3);
    let (z, kept) = on_thread(move || {
        let z = (4..7).all(|i| read_words(base + i * PAGE_4K, PAGE_4K).iter().all(|&w| w == 0));
        (z, read_words(base + 7 * PAGE_4K, 8)[0])
    });
    assert!(z, "a discarded page showed old data");
    assert_eq!(kept, pattern(7, 1));
    let states: Vec<_> = r.table.pages().map(|(_, _, s)| s.0).collect();
    assert_eq!(r.table.count(PageState::POPULATED), 16, "{states:?} {}", summary(&r.engine));
}

#[test]
fn discard_of_memfd_pages_frees_blocks_and_reads_zero() {
    let pages = 64;
    let map = Mapping::memfd(pages * PAGE_4K, false).unwrap();
    let region = region_of(&map, PAGE_4K, UffdMode::Missing, false);
    let r = rig(map, region, Arc::new(ZeroSource), FaultEngineConfig::default());
    let base = r.map.addr;
    on_thread(move || (0..pages).for_each(|i| fill_words(base + i * PAGE_4K, PAGE_4K, pattern(i, 3))));
    let fd = r.map.fd.clone().unwrap();
    let before = rustix::fs::fstat(&*fd).unwrap().st_blocks;
    r.discarder.discard(GuestRange::new(GPA, 32 * PAGE_4K)).unwrap();
    let after = rustix::fs::fstat(&*fd).unwrap().st_blocks;
    assert!(after < before, "punching a hole freed no blocks ({before} -> {after})");
    let (z, kept) = on_thread(move || {
        let z = (0..32).all(|i| read_words(base + i * PAGE_4K, PAGE_4K).iter().all(|&w| w == 0));
        (z, (32..pages).all(|i| read_words(base + i * PAGE_4K, 8)[0] == pattern(i, 3)))
    });
    assert!(z, "a discarded memfd page showed old data");
    assert!(kept, "a page outside the discard lost its data");
}

#[test]
fn a_write_to_a_write_protected_page_is_resolved_and_marked_dirty() {
    let map = Mapping::anon(8 * PAGE_4K);
    let region = region_of(&map, PAGE_4K, UffdMode::Missing, true);
    let r = rig(map, region, Arc::new(ZeroSource), FaultEngineConfig::default());
    let base = r.map.addr;
    on_thread(move || (0..8).for_each(|i| fill_words(base + i * PAGE_4K, PAGE_4K, pattern(i, 1))));
    assert_eq!(r.table.count(PageState::DIRTY), 8);
    let range = GuestRange::new(GPA, 4 * PAGE_4K);
    r.discarder.write_protect(range).unwrap();
    assert_eq!(r.table.count(PageState::WRITE_PROTECTED), 4);
    assert_eq!(r.table.count(PageState::DIRTY), 4);
    on_thread(move || fill_words(base + PAGE_4K, 8, 0xd1d1));
    eventually("one WP fault counted", || r.engine.stats().resolved(FaultKind::WriteProtect) == 1);
    assert_eq!(r.table.get(GPA + PAGE_4K), PageState::POPULATED.union(PageState::DIRTY));
    assert_eq!(r.table.get(GPA + 2 * PAGE_4K), PageState::POPULATED.union(PageState::WRITE_PROTECTED));
    assert_eq!(read_words(base + PAGE_4K, 16)[..2], [0xd1d1, pattern(1, 1)]);
    r.discarder.unprotect(range).unwrap();
    assert_eq!(r.table.count(PageState::WRITE_PROTECTED), 0);
    eprintln!("anon WP: {}", summary(&r.engine));
}

struct FailingSource {
    panic: bool,
}

impl PageSource for FailingSource {
    fn read_page(&self, gpa: u64, _buf: &mut [u8]) -> Result<PageData, PageSourceError> {
        if self.panic {
            panic!("injected source panic");
        }
        Err(PageSourceError::Failed { gpa, reason: "injected failure".into() })
    }
}

fn dead_handler_is_reported(panic: bool) {
    let map = Mapping::anon(4 * PAGE_4K);
    let region = region_of(&map, PAGE_4K, UffdMode::Missing, false);
    let called = Arc::new(AtomicBool::new(false));
    let cb_called = called.clone();
    let cfg = FaultEngineConfig {
        handler_threads: 2,
        on_failure: Some(Arc::new(move |_| cb_called.store(true, Ordering::SeqCst))),
        ..Default::default()
    };
    let r = rig(map, region, Arc::new(FailingSource { panic }), cfg);
    let hva = r.map.page(1);
    let toucher = std::thread::spawn(move || read_words(hva, 8)[0]);
    // A generous bound only so a broken engine fails the test instead of hanging it.
    let msg = r.engine.wait_failure(Duration::from_secs(60)).expect("no failure reported");
    assert!(msg.contains(if panic { "panicked" } else { "injected failure" }), "{msg}");
    assert!(called.load(Ordering::SeqCst));
    let Rig { engine, .. } = r;
    assert!(engine.shutdown().is_err());
    // Unregistering woke the stuck toucher: the kernel filled its page normally.
    assert_eq!(toucher.join().unwrap(), 0);
}

#[test]
fn a_handler_whose_source_fails_reports_the_error_instead_of_hanging() {
    dead_handler_is_reported(false);
}

#[test]
fn a_handler_that_panics_reports_the_panic_instead_of_hanging() {
    dead_handler_is_reported(true);
}
