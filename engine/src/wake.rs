//! The wake-up protocol between the producers of an endpoint's rings and its consumer.
//!
//! One `AtomicU32` per endpoint holds two bits: `PARKED` (the consumer is about to sleep
//! or sleeping) and `CLOSED` (the endpoint will read no more; see `endpoint.rs`).
//!
//! Consumer (the endpoint's own thread), before sleeping:
//! 1. `prepare_park`: set `PARKED`, then a heavy barrier (see `barrier.rs`);
//! 2. re-check every ring and the control queue; if anything is there, `cancel_park`;
//! 3. otherwise `park` until `PARKED` is cleared by a producer (spurious wake-ups loop).
//!
//! Producer, after publishing (ring tail store with Release, or control-queue push):
//! 1. `notify`: a light barrier, then load the state;
//! 2. if `PARKED` is set, clear it with a swap and, if this producer cleared it, unpark.
//!
//! Why no wake-up is lost: the barriers order "consumer sets PARKED → consumer reads the
//! ring tail" against "producer writes the tail → producer reads PARKED". With SeqCst
//! fences on both sides, one fence comes first in their single total order; if the
//! consumer's is first, the producer's load sees `PARKED` and unparks; if the producer's
//! is first, the consumer's re-check sees the published tail and does not sleep. The
//! asymmetric pair (compiler fence + `membarrier`) gives the same guarantee. Both may
//! happen (a harmless extra unpark); neither happening is impossible.
//! `tests/loom_wake.rs` checks this exhaustively under the loom model checker.

use std::sync::OnceLock;
use std::time::Instant;

use std::collections::VecDeque;

use crate::barrier;
use crate::sync::{current, park, park_timeout, AtomicBool, AtomicU32, Mutex, Ordering, Thread};

const PARKED: u32 = 1;
const CLOSED: u32 = 2;

/// The wake-up state of one endpoint.
pub struct WakeState {
    state: AtomicU32,
    thread: OnceLock<Thread>,
    /// A copy of the `CLOSED` bit on a cache line of its own, for the checks senders make
    /// before publishing (reading the state word there slowed streaming sends 7x).
    closed: crossbeam_utils::CachePadded<std::sync::atomic::AtomicBool>,
}

impl WakeState {
    pub fn new() -> Self {
        barrier::init();
        Self {
            state: AtomicU32::new(0),
            thread: OnceLock::new(),
            closed: crossbeam_utils::CachePadded::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// Records the calling thread as the one to unpark. Called once by the consumer
    /// thread before it first parks.
    pub fn register_current_thread(&self) {
        let _ = self.thread.set(current());
    }

    /// Producer side, after publishing. Returns whether the endpoint is closed.
    #[inline]
    pub fn notify(&self) -> bool {
        // SYNC POINT with the heavy barrier in `prepare_park` and `close`.
        barrier::light();
        let s = self.state.load(Ordering::Relaxed);
        if s == 0 {
            return false;
        }
        self.notify_slow(s)
    }

    #[cold]
    fn notify_slow(&self, s: u32) -> bool {
        if s & PARKED != 0 && self.state.fetch_and(!PARKED, Ordering::AcqRel) & PARKED != 0 {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
        s & CLOSED != 0
    }

    /// Consumer side: announce the intent to sleep. The caller must re-check its rings
    /// afterwards and call [`cancel_park`](Self::cancel_park) or [`park`](Self::park).
    pub fn prepare_park(&self) {
        self.state.fetch_or(PARKED, Ordering::Relaxed);
        // SYNC POINT with the light barrier in `notify`.
        barrier::heavy();
    }

    /// Consumer side: withdraw the intent to sleep.
    pub fn cancel_park(&self) {
        self.state.fetch_and(!PARKED, Ordering::Relaxed);
    }

    /// Consumer side: sleep until a producer clears `PARKED`, or until `deadline`.
    pub fn park(&self, deadline: Option<Instant>) {
        while self.state.load(Ordering::Acquire) & PARKED != 0 {
            match deadline {
                None => park(),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    park_timeout(d - now);
                }
            }
        }
        self.cancel_park();
    }

    /// Marks the endpoint closed, then a SeqCst fence: a producer that published before
    /// this point is seen by the consumer's final drain; one that publishes after it sees
    /// `CLOSED` in its `notify`).
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.state.fetch_or(CLOSED, Ordering::Relaxed);
        // SYNC POINT with the light barrier in `notify`.
        barrier::heavy();
    }

    /// Whether the endpoint is closed.
    #[inline]
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// An endpoint's control queue: what other threads hand to the endpoint's thread (new
/// links, cluster events) goes in under a mutex, never on the data path, with a flag the
/// consumer polls without locking. The consumer checks the flag in its re-check before
/// sleeping (after `prepare_park`), and a push sets it before `notify`, so an item is never
/// left waiting behind a sleeping consumer (modelled in `tests/loom_wake.rs`).
pub struct ControlQueue<T> {
    pending: crossbeam_utils::CachePadded<AtomicBool>,
    items: Mutex<VecDeque<T>>,
}

impl<T> Default for ControlQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> ControlQueue<T> {
    pub fn new() -> Self {
        Self {
            pending: crossbeam_utils::CachePadded::new(AtomicBool::new(false)),
            items: Mutex::new(VecDeque::new()),
        }
    }

    /// Queues `item` and wakes the consumer behind `wake`. Hands the item back if `wake`
    /// is closed; the check is made under the queue's lock, so an endpoint that closes
    /// and then takes the queue sees every item accepted before.
    pub fn push(&self, wake: &WakeState, item: T) -> Result<(), T> {
        {
            let mut q = self.items.lock().unwrap_or_else(|e| e.into_inner());
            if wake.is_closed() {
                return Err(item);
            }
            q.push_back(item);
            self.pending.store(true, Ordering::Release);
        }
        wake.notify();
        Ok(())
    }

    /// Whether items are waiting.
    #[inline]
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Takes every waiting item.
    pub fn take(&self) -> VecDeque<T> {
        let mut q = self.items.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.store(false, Ordering::Relaxed);
        std::mem::take(&mut *q)
    }
}
