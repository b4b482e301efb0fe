//! The invalidation layer: the userspace counterpart of Linux's `mmu_interval_notifier`
//! and KVM's `mmu_invalidate_seq` / `mmu_invalidate_in_progress`.
//!
//! **Invariant: after an invalidation of a range returns, nothing maps the old contents of
//! that range.** Not the host page tables (so not KVM's EPT), not a device's cached
//! translation, not a migration buffer that will be sent as current.
//!
//! # The retry protocol
//! A fault resolution (or any reader that caches a view of guest memory):
//! 1. `seq = read_begin(range)` — waits while an invalidation overlapping the range is in
//!    progress ([`Invalidation::try_read_begin`] returns `None` instead of waiting, for
//!    threads that must keep serving other events, like the fault engine);
//! 2. resolves (I/O allowed, no locks held);
//! 3. `let lock = lock(range)`; if `lock.read_retry(seq)` — the range was invalidated since
//!    step 1 — drops the result and starts again;
//! 4. otherwise installs and marks the state table while holding `lock`.
//!
//! An invalidator calls [`Invalidation::invalidate_range_start`] (which, under the same
//! locks, bumps the sequence count and marks the range in progress, then tells every
//! subscriber whose interest overlaps), zaps the host mapping, and calls
//! [`Invalidation::invalidate_range_end`]. An install that took its `seq` before the start
//! sees `read_retry == true`; an install that took the lock before the start finished
//! before it, so the zap removes what it installed. Either way nothing stale survives.
//!
//! # Locks
//! Guest-physical space is cut into 2 MiB chunks hashed onto [`STRIPES`] stripes; each
//! stripe has its own mutex, sequence count and list of in-progress ranges. A fault (one
//! 4 KiB page or one 2 MiB huge page) touches exactly one stripe, so faults in different
//! chunks proceed in parallel. Multi-stripe operations lock stripes in index order.
//! Sequence counts are per stripe, so a read may retry because a *neighbour* in its stripe
//! was invalidated: spurious retries are allowed, missed ones are not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use super::GuestRange;

/// Number of lock stripes.
pub const STRIPES: usize = 64;
const CHUNK_SHIFT: u32 = 21;

/// Someone who caches a view of guest memory and must drop it when the host mapping of a
/// range changes (device address caches, dirty tracker, migration, the fault engine).
pub trait InvalidationSubscriber: Send + Sync {
    /// Drop whatever is cached for `range` (already clipped to the interest range). Called
    /// after the range is marked in progress and before its `invalidate_range_end`
    /// returns; must not call `read_begin` on the range (it would wait for itself).
    fn invalidate(&self, range: GuestRange);

    /// The invalidation of `range` ended; readers may re-establish their view.
    fn invalidate_end(&self, _range: GuestRange) {}
}

/// Handle for [`Invalidation::unsubscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionId(u64);

/// A sequence snapshot taken by [`Invalidation::read_begin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSeq(u64);

#[derive(Debug, Default)]
struct StripeState {
    seq: u64,
    in_progress: Vec<GuestRange>,
}

#[derive(Debug, Default)]
struct Stripe {
    state: Mutex<StripeState>,
    ended: Condvar,
}

struct Subscription {
    id: u64,
    interest: GuestRange,
    subscriber: Arc<dyn InvalidationSubscriber>,
}

/// The invalidation layer for one guest-physical address space.
pub struct Invalidation {
    stripes: Vec<Stripe>,
    subscribers: RwLock<Vec<Subscription>>,
    next_id: AtomicU64,
    invalidations: AtomicU64,
}

impl std::fmt::Debug for Invalidation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidation")
            .field("invalidations", &self.invalidations.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for Invalidation {
    fn default() -> Self {
        Self::new()
    }
}

/// Bitmask of the stripes `range` touches.
fn stripe_mask(range: GuestRange) -> u64 {
    if range.len == 0 {
        return 0;
    }
    let first = range.gpa >> CHUNK_SHIFT;
    let last = (range.end() - 1) >> CHUNK_SHIFT;
    if last - first + 1 >= STRIPES as u64 {
        return !0;
    }
    (first..=last).fold(0, |m, c| m | 1u64 << (c % STRIPES as u64))
}

fn stripes_of(mask: u64) -> impl Iterator<Item = usize> {
    (0..STRIPES).filter(move |i| mask & (1u64 << i) != 0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a stripe lock leaves only counters behind, which stay
    // consistent (every update is a single push/remove/increment): keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stripe locks covering a range, held by an installer between the `read_retry`
/// check and the end of its install.
pub struct RangeLock<'a> {
    range: GuestRange,
    guards: Vec<MutexGuard<'a, StripeState>>,
}

impl RangeLock<'_> {
    /// Whether the range was invalidated (or is being invalidated) since `seq` was taken:
    /// if so, the caller must drop what it read and start again.
    pub fn read_retry(&self, seq: ReadSeq) -> bool {
        let now: u64 = self.guards.iter().map(|g| g.seq).sum();
        now != seq.0 || self.guards.iter().any(|g| g.in_progress.iter().any(|r| r.overlaps(&self.range)))
    }
}

impl Invalidation {
    /// A layer with no invalidation in progress and no subscribers.
    pub fn new() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            subscribers: RwLock::new(Vec::new()),
            next_id: AtomicU64::new(1),
            invalidations: AtomicU64::new(0),
        }
    }

    /// Registers `subscriber` for invalidations overlapping `interest`.
    pub fn subscribe(&self, interest: GuestRange, subscriber: Arc<dyn InvalidationSubscriber>) -> SubscriptionId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.subscribers.write().unwrap_or_else(|p| p.into_inner()).push(Subscription { id, interest, subscriber });
        SubscriptionId(id)
    }

    /// Removes a subscription (no-op if already removed).
    pub fn unsubscribe(&self, id: SubscriptionId) {
        self.subscribers.write().unwrap_or_else(|p| p.into_inner()).retain(|s| s.id != id.0);
    }

    /// Number of invalidations started so far.
    pub fn invalidation_count(&self) -> u64 {
        self.invalidations.load(Ordering::Relaxed)
    }

    /// Step 1 of the retry protocol: waits while an invalidation overlapping `range` is in
    /// progress, then returns the sequence snapshot to check with
    /// [`RangeLock::read_retry`].
    pub fn read_begin(&self, range: GuestRange) -> ReadSeq {
        let mut sum = 0;
        for i in stripes_of(stripe_mask(range)) {
            let stripe = &self.stripes[i];
            let mut g = lock(&stripe.state);
            while g.in_progress.iter().any(|r| r.overlaps(&range)) {
                g = stripe.ended.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            sum += g.seq;
        }
        ReadSeq(sum)
    }

    /// Like [`Invalidation::read_begin`] but returns `None` instead of waiting when an
    /// overlapping invalidation is in progress (subscribe to learn when it ends).
    pub fn try_read_begin(&self, range: GuestRange) -> Option<ReadSeq> {
        let mut sum = 0;
        for i in stripes_of(stripe_mask(range)) {
            let g = lock(&self.stripes[i].state);
            if g.in_progress.iter().any(|r| r.overlaps(&range)) {
                return None;
            }
            sum += g.seq;
        }
        Some(ReadSeq(sum))
    }

    /// Step 3: takes the locks an installer holds while it checks `read_retry` and
    /// installs. Invalidations of overlapping stripes wait until it is dropped.
    pub fn lock(&self, range: GuestRange) -> RangeLock<'_> {
        let guards = stripes_of(stripe_mask(range)).map(|i| lock(&self.stripes[i].state)).collect();
        RangeLock { range, guards }
    }

    /// The lock of `range` at a moment when no invalidation of it is in progress (waits
    /// for those running, retries if one starts in between): what a reader that needs the
    /// table and the host to agree takes (the coherence checker, coherent accesses).
    pub fn lock_stable(&self, range: GuestRange) -> RangeLock<'_> {
        loop {
            let seq = self.read_begin(range);
            let lock = self.lock(range);
            if !lock.read_retry(seq) {
                return lock;
            }
        }
    }

    /// Starts invalidating `range`: bumps the sequence count and marks the range in
    /// progress (under the installers' locks), then tells every subscriber whose interest
    /// overlaps. Until the matching [`Invalidation::invalidate_range_end`], readers of the
    /// range wait in `read_begin`. Prefer [`Invalidation::invalidate`], which cannot
    /// forget the end.
    pub fn invalidate_range_start(&self, range: GuestRange) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        {
            let mut guards = self.lock(range);
            for g in guards.guards.iter_mut() {
                g.seq += 1;
                g.in_progress.push(range);
            }
        }
        for (sub, part) in self.interested(range) {
            sub.invalidate(part);
        }
    }

    /// Ends an invalidation started with the same `range`: readers waiting on it resume,
    /// subscribers get `invalidate_end`.
    pub fn invalidate_range_end(&self, range: GuestRange) {
        for i in stripes_of(stripe_mask(range)) {
            let stripe = &self.stripes[i];
            let mut g = lock(&stripe.state);
            if let Some(pos) = g.in_progress.iter().position(|r| *r == range) {
                g.in_progress.swap_remove(pos);
            }
            stripe.ended.notify_all();
        }
        for (sub, part) in self.interested(range) {
            sub.invalidate_end(part);
        }
    }

    /// Starts invalidating `range` and returns a guard that ends the invalidation when
    /// dropped (also on panic, so readers never wait forever).
    pub fn invalidate(&self, range: GuestRange) -> InvalidationGuard<'_> {
        self.invalidate_range_start(range);
        InvalidationGuard { layer: self, range }
    }

    fn interested(&self, range: GuestRange) -> Vec<(Arc<dyn InvalidationSubscriber>, GuestRange)> {
        // Collected first so callbacks run without the subscriber lock held.
        self.subscribers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|s| s.interest.intersect(&range).map(|p| (s.subscriber.clone(), p)))
            .collect()
    }
}

/// An invalidation in progress; ends it when dropped.
pub struct InvalidationGuard<'a> {
    layer: &'a Invalidation,
    range: GuestRange,
}

impl InvalidationGuard<'_> {
    /// The range being invalidated.
    pub fn range(&self) -> GuestRange {
        self.range
    }
}

impl Drop for InvalidationGuard<'_> {
    fn drop(&mut self) {
        self.layer.invalidate_range_end(self.range);
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    const PAGE: u64 = 4096;

    #[test]
    fn read_retry_sees_an_invalidation_between_begin_and_lock() {
        let inv = Invalidation::new();
        let page = GuestRange::new(5 * PAGE, PAGE);
        let seq = inv.read_begin(page);
        assert!(!inv.lock(page).read_retry(seq));
        drop(inv.invalidate(GuestRange::new(0, 64 * PAGE)));
        assert!(inv.lock(page).read_retry(seq));
        let seq = inv.read_begin(page);
        assert!(!inv.lock(page).read_retry(seq));
    }

    #[test]
    fn invalidation_of_another_chunk_does_not_force_a_retry() {
        let inv = Invalidation::new();
        let page = GuestRange::new(PAGE, PAGE);
        let seq = inv.read_begin(page);
        drop(inv.invalidate(GuestRange::new(2 << 20, PAGE)));
        assert!(!inv.lock(page).read_retry(seq));
    }

    #[test]
    fn try_read_begin_refuses_while_in_progress() {
        let inv = Invalidation::new();
        let page = GuestRange::new(0, PAGE);
        let other = GuestRange::new(PAGE, PAGE); // same stripe, no overlap
        let g = inv.invalidate(page);
        assert!(inv.try_read_begin(page).is_none());
        assert!(inv.try_read_begin(other).is_some());
        drop(g);
        assert!(inv.try_read_begin(page).is_some());
    }

    #[test]
    fn read_begin_waits_for_the_end_of_an_overlapping_invalidation() {
        let inv = Arc::new(Invalidation::new());
        let page = GuestRange::new(3 * PAGE, PAGE);
        let ended = Arc::new(AtomicBool::new(false));
        inv.invalidate_range_start(page);
        let reader = {
            let (inv, ended) = (inv.clone(), ended.clone());
            std::thread::spawn(move || {
                let seq = inv.read_begin(page);
                // Deterministic: if read_begin did not wait, `ended` is still false.
                assert!(ended.load(Ordering::SeqCst), "read_begin returned mid-invalidation");
                assert!(!inv.lock(page).read_retry(seq));
            })
        };
        std::thread::yield_now();
        ended.store(true, Ordering::SeqCst);
        inv.invalidate_range_end(page);
        reader.join().unwrap();
    }

    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<(&'static str, GuestRange)>>,
    }
    impl InvalidationSubscriber for Recorder {
        fn invalidate(&self, range: GuestRange) {
            self.seen.lock().unwrap().push(("start", range));
        }
        fn invalidate_end(&self, range: GuestRange) {
            self.seen.lock().unwrap().push(("end", range));
        }
    }

    #[test]
    fn subscribers_are_told_their_part_before_end_returns() {
        let inv = Invalidation::new();
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        inv.subscribe(GuestRange::new(0, 8 * PAGE), a.clone());
        let id_b = inv.subscribe(GuestRange::new(100 * PAGE, PAGE), b.clone());
        let r = GuestRange::new(4 * PAGE, 8 * PAGE);
        {
            let _g = inv.invalidate(r);
            assert_eq!(*a.seen.lock().unwrap(), vec![("start", GuestRange::new(4 * PAGE, 4 * PAGE))]);
        }
        assert_eq!(a.seen.lock().unwrap().len(), 2);
        assert!(b.seen.lock().unwrap().is_empty());
        inv.unsubscribe(id_b);
        drop(inv.invalidate(GuestRange::new(100 * PAGE, PAGE)));
        assert!(b.seen.lock().unwrap().is_empty());
    }

    /// A model of a secondary mapping: one "host page" slot that an installer fills from a
    /// source and an invalidator zaps, with the source changing at each invalidation.
    struct Model {
        inv: Invalidation,
        source: Mutex<u64>,
        mapped: Mutex<Option<u64>>,
    }

    impl Model {
        fn invalidate_and_change_source(&self, page: GuestRange) {
            let _g = self.inv.invalidate(page);
            *self.mapped.lock().unwrap() = None; // zap
            *self.source.lock().unwrap() += 1; // the old contents are gone for good
        }
    }

    #[test]
    fn a_resolution_racing_an_invalidation_installs_nothing_stale() {
        let m = Model { inv: Invalidation::new(), source: Mutex::new(1), mapped: Mutex::new(None) };
        let page = GuestRange::new(7 * PAGE, PAGE);
        let mut retries = 0;
        loop {
            // 1. read_begin, 2. read the source with no lock held.
            let seq = m.inv.read_begin(page);
            let data = *m.source.lock().unwrap();
            // Controlled interleaving: the invalidation runs between read and install,
            // once.
            if retries == 0 {
                m.invalidate_and_change_source(page);
            }
            // 3. lock + read_retry, 4. install under the lock.
            let lock = m.inv.lock(page);
            if lock.read_retry(seq) {
                retries += 1;
                continue;
            }
            *m.mapped.lock().unwrap() = Some(data);
            break;
        }
        assert_eq!(retries, 1);
        assert_eq!(*m.mapped.lock().unwrap(), Some(2), "stale data installed");
    }
}
