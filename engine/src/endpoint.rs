//! Endpoints: the per-thread owners of ring halves.
//!
//! Every thread that sends or receives through a cluster has one endpoint: an isolate's
//! thread has its own, and any other thread (main, a pool, an FFI caller) gets one lazily
//! the first time it sends, kept in a thread-local. An endpoint owns
//! - the producer half of one ring per target it has sent to ([`Outbound`]), created on the
//!   first send and handed to the target through the target's control queue;
//! - the consumer half of one ring per source that has sent to it ([`Inbound`]).
//!
//! The shared part ([`EndpointShared`]) is what other threads touch: the wake-up word, the
//! control queue (new links and cluster events, under a mutex — never on the data path)
//! and a graveyard where the rings of a closed endpoint are drained so nothing sent to it
//! is lost without being counted.

use std::cell::{Cell as StdCell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::mem::MaybeUninit;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use rkyv::ser::allocator::Arena;

use crate::cluster::{ClusterInner, WaitStrategy};
use crate::error::{CallError, SendError};
use crate::frame::{
    Cell, FrameHeader, FrameKind, RingError, TransferPayload, TypeTag, CELL_BYTES, FLAG_CALL,
    FLAG_ERROR, FLAG_REPLY,
};
use crate::isolate::{DownReason, IsolateRef};
use crate::link::{
    new_ring, plain_frame, FrameSource, InLink, LinkShared, OutLink, OwnedFrame, RingFrame,
    WriteOutcome,
};
use crate::wake::{ControlQueue, WakeState};
use crate::Payload;

/// Locks a mutex, recovering the data if a panicking thread poisoned it (every critical
/// section here leaves its data consistent before anything that can panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What travels through an endpoint's control queue.
pub(crate) enum Control {
    /// The receiving half of a new ring from `source`.
    NewLink(rtrb::Consumer<Cell>, Arc<EndpointShared>, Arc<LinkShared>),
    /// A watched isolate is up.
    Up(IsolateRef),
    /// A watched isolate went down.
    Down(IsolateRef, DownReason),
    /// The node asks this endpoint to shut down.
    Shutdown,
    /// A supervision event; `true` when it is the node's (delivered to watchers).
    Supervision(crate::supervise::Notice, bool),
    /// A node event (for node watchers).
    Node(crate::cluster::NodeNotice),
}

/// Counters of one endpoint. Each is written by one thread only (plain load+store, no
/// locked instruction), except `undelivered`, which closing and sending threads add to.
#[derive(Default)]
pub(crate) struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub full: AtomicU64,
    pub spilled: AtomicU64,
    pub undelivered: AtomicU64,
    pub late_replies: AtomicU64,
}

#[inline]
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// The part of an endpoint other threads touch.
pub(crate) struct EndpointShared {
    /// Unique within the cluster, never reused; 0 means "none" on the wire.
    pub id: u32,
    pub wake: CachePadded<WakeState>,
    control: ControlQueue<Control>,
    graveyard: Mutex<Vec<InLink>>,
    pub counters: CachePadded<Counters>,
    /// The cluster's total of messages never read (outlives any one endpoint).
    cluster_undelivered: Arc<AtomicU64>,
}

impl EndpointShared {
    pub(crate) fn new(id: u32, cluster_undelivered: Arc<AtomicU64>) -> Self {
        Self {
            id,
            cluster_undelivered,
            wake: CachePadded::new(WakeState::new()),
            control: ControlQueue::new(),
            graveyard: Mutex::new(Vec::new()),
            counters: CachePadded::new(Counters::default()),
        }
    }

    /// Counts `n` messages sent to this endpoint that will never be read.
    pub(crate) fn count_undelivered(&self, n: u64) {
        if n > 0 {
            self.counters.undelivered.fetch_add(n, Ordering::Relaxed);
            self.cluster_undelivered.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Queues a control item and wakes the endpoint. Hands the item back if the endpoint
    /// is closed.
    pub(crate) fn enqueue(&self, item: Control) -> Result<(), Control> {
        self.control.push(&self.wake, item)
    }

    /// Whether control items are waiting.
    #[inline]
    pub(crate) fn control_pending(&self) -> bool {
        self.control.pending()
    }

    /// Takes every waiting control item.
    pub(crate) fn take_control(&self) -> VecDeque<Control> {
        self.control.take()
    }

    /// Closes the endpoint for good: moves `links` and any not yet accepted into the
    /// graveyard and discards every frame in them, counting each as undelivered.
    /// Returns the number discarded.
    pub(crate) fn close_and_drain(&self, links: Vec<InLink>) -> u64 {
        self.wake.close();
        let mut g = lock(&self.graveyard);
        let pending = self.control.take();
        g.extend(links);
        for c in pending {
            if let Control::NewLink(consumer, source, shared) = c {
                g.push(InLink::new(consumer, source, shared));
            }
        }
        let (n, drops) = drain_graveyard(&mut g);
        drop(g);
        self.count_undelivered(n);
        run_drops(drops);
        n
    }

    /// Discards what a sender published after the endpoint closed (called by that
    /// sender, who saw `CLOSED` after publishing).
    pub(crate) fn drain_after_close(&self) -> u64 {
        let mut g = lock(&self.graveyard);
        let (n, drops) = drain_graveyard(&mut g);
        drop(g);
        self.count_undelivered(n);
        run_drops(drops);
        n
    }
}

/// Builds the frame `src` writes off the ring, as a ring of `cap` cells would hold it:
/// `TooLarge` if it can never fit one.
#[cold]
fn build_off_ring(
    header: FrameHeader,
    src: &mut impl FrameSource,
    cap: usize,
) -> Result<OwnedFrame, SendError> {
    OwnedFrame::build(header, src, cap).map_err(|e| match e {
        RingError::NoRoom => SendError::TooLarge {
            value: (),
            capacity: cap * CELL_BYTES,
        },
        RingError::Failed => SendError::Serialize(()),
    })
}

/// Consumes every frame in the graveyard's rings. Returns how many, and the transferred
/// values to drop once the graveyard lock is released (their `Drop` is user code).
fn drain_graveyard(g: &mut Vec<InLink>) -> (u64, Vec<TransferPayload>) {
    let mut n = 0;
    let mut drops = Vec::new();
    for l in g.iter_mut() {
        n += l.discard_all(&mut drops);
    }
    g.retain(|l| !l.is_finished());
    (n, drops)
}

/// Drops transferred values nobody took.
fn run_drops(drops: Vec<TransferPayload>) {
    for t in drops {
        // SAFETY: each payload comes from a transfer frame of this process that was
        // consumed without its value being taken: we are its only owner.
        unsafe { (t.drop_fn)(t.ptr) };
    }
}

/// Hashes the small integer keys of the endpoint's maps (endpoint ids, sequential request
/// ids) with one multiplication (Fibonacci hashing spreads them over the high bits hashbrown
/// uses); SipHash cost more than the rest of a call's bookkeeping.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = u64::from(v);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

type RequestMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// The producer halves of an endpoint.
pub(crate) struct Outbound {
    links: Vec<OutLink>,
    index: IdMap<usize>,
    last: (u32, usize),
}

/// The consumer halves of an endpoint, plus events waiting to be handed out.
pub(crate) struct Inbound {
    pub links: Vec<InLink>,
    pub events: VecDeque<Control>,
    cursor: usize,
    burst: usize,
    since_event: usize,
    shutdown_requested: bool,
    pub held: usize,
    /// Requests this endpoint waits for: correlation id → the target asked (kept only
    /// for requests whose waiter does not hold it; see `request`).
    pub pending: RequestMap<Option<IsolateRef>>,
    /// The request of the `call` in progress, kept out of `pending` (0: none): a call
    /// then costs no map insertion or removal. Only one call waits at a time (it blocks
    /// the endpoint's thread); a nested one goes to `pending`.
    call_slot: u64,
    /// Replies to pending requests, set aside until their `wait_reply`.
    pub stash: RequestMap<OwnedFrame>,
    next_request: u64,
}

/// The link index `link_index` reports for an endpoint of another node (no ring).
const REMOTE: usize = usize::MAX;

/// Frames delivered from one link before the receiver moves on to the next.
const BURST: usize = 32;
/// Messages delivered at most while an event waits.
const EVENT_EVERY: usize = 64;
/// How long a caller keeps polling (and yielding) for a reply from another node before it
/// parks (see `idle_for_reply`).
const REMOTE_SPIN: Duration = Duration::from_millis(1);

/// What one poll of the inbox found.
pub(crate) enum Polled {
    Ring {
        link: usize,
        frame: RingFrame,
    },
    /// Entry `entry` of the pack frame `frame` (see `frame.rs`).
    Pack {
        link: usize,
        frame: RingFrame,
        entry: u32,
    },
    Owned {
        frame: OwnedFrame,
    },
    Event(Control),
}

impl Inbound {
    fn accept(&mut self, items: VecDeque<Control>) {
        let mut new_links = false;
        for c in items {
            match c {
                Control::NewLink(consumer, source, shared) => {
                    self.links.push(InLink::new(consumer, source, shared));
                    new_links = true;
                }
                Control::Shutdown => self.shutdown_requested = true,
                other => self.events.push_back(other),
            }
        }
        // A new sender is often a restarted one: drop the links of senders that have
        // gone, so an endpoint that never idles does not keep their rings forever.
        if new_links {
            self.prune();
        }
    }

    /// Whether request `id` waits for its reply.
    #[inline]
    fn awaits(&self, id: u64) -> bool {
        // Ids start at 1: 0 (an empty `call_slot`) names no request.
        id != 0 && (self.call_slot == id || self.pending.contains_key(&id))
    }

    /// Request `id` waits no more.
    #[inline]
    fn settle(&mut self, id: u64) {
        if self.call_slot == id {
            self.call_slot = 0;
        } else {
            self.pending.remove(&id);
        }
    }

    fn has_data(&self) -> bool {
        !self.events.is_empty()
            || self.shutdown_requested
            || self.links.iter().any(|l| !l.held && l.has_data())
    }

    /// Takes one frame from link `i`, marking the link held when read in place. Replies
    /// to requests never come out here: they go to the stash (or are dropped and counted
    /// when nobody waits for them any more).
    #[inline(always)]
    fn take_from(&mut self, i: usize, counters: &Counters) -> Option<Polled> {
        loop {
            let l = &mut self.links[i];
            if l.held {
                return None;
            }
            if let Some(frame) = l.overflow.pop_front() {
                // `move_out_of_rings` routes replies as it fills the overflow queues.
                debug_assert!(frame.header().flags() & FLAG_REPLY == 0);
                return Some(Polled::Owned { frame });
            }
            let frame = l.peek()?;
            // SAFETY: `peek` returned a frame in place, initialised and not yet committed.
            let [kind, flags] = unsafe { [(*frame.frame).0[4], (*frame.frame).0[5]] };
            if flags & FLAG_REPLY != 0 {
                let owned = l.take_owned(frame);
                self.route_reply(owned, counters);
                continue;
            }
            l.held = true;
            self.held += 1;
            if kind == FrameKind::Pack as u8 {
                let entry = l.pack_next;
                return Some(Polled::Pack {
                    link: i,
                    frame,
                    entry,
                });
            }
            return Some(Polled::Ring { link: i, frame });
        }
    }

    /// Stashes a reply for its waiting request, or drops a late one and counts it.
    #[cold]
    fn route_reply(&mut self, frame: OwnedFrame, counters: &Counters) {
        let id = frame.header().correlation();
        if self.awaits(id) {
            if let Some(old) = self.stash.insert(id, frame) {
                // A second reply to the same request: keep the first, drop this one.
                let newer = self.stash.insert(id, old);
                if let Some(f) = newer {
                    f.discard();
                }
                counters.late_replies.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            frame.discard();
            counters.late_replies.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Moves every frame out of every ring that is not held: replies to the stash (or
    /// dropped and counted when late), everything else to its link's overflow queue,
    /// where it keeps its order. So the overflow queues never hold replies. With
    /// `wanted`, stops at the successful reply to that request and returns it in place
    /// (its link marked held), saving a copy.
    fn move_out_of_rings(
        &mut self,
        shared: &EndpointShared,
        wanted: Option<u64>,
    ) -> Option<(usize, RingFrame)> {
        if shared.control_pending() {
            self.accept(shared.take_control());
        }
        for i in 0..self.links.len() {
            if self.links[i].held {
                continue;
            }
            while let Some(f) = self.links[i].peek() {
                // SAFETY: `peek` returned a frame in place, initialised, not yet committed.
                let first = unsafe { &*f.frame };
                let Some(h) = FrameHeader::read_from(first) else {
                    unreachable!("in-process frames have valid headers")
                };
                if h.flags() & FLAG_REPLY != 0 {
                    if wanted == Some(h.correlation()) && h.flags() & FLAG_ERROR == 0 {
                        self.links[i].held = true;
                        self.held += 1;
                        return Some((i, f));
                    }
                    let owned = self.links[i].take_owned(f);
                    self.route_reply(owned, &shared.counters);
                    continue;
                }
                self.links[i].set_aside(f);
            }
        }
        None
    }

    /// Whether any ring that is not held has a frame, or control items wait.
    fn rings_have_data(&self, shared: &EndpointShared) -> bool {
        shared.control_pending() || self.links.iter().any(|l| !l.held && l.ring_has_data())
    }

    #[inline]
    fn poll(&mut self, shared: &EndpointShared) -> Option<Polled> {
        if shared.control_pending() {
            self.accept(shared.take_control());
        }
        if self.events.is_empty() {
            // The common case, kept short: it is what a spinning receiver runs per turn.
            if let Some(p) = self.poll_links(&shared.counters) {
                return Some(p);
            }
            if !self.shutdown_requested {
                return None;
            }
        }
        self.poll_events(shared)
    }

    /// `poll` when events (or the shutdown request) wait.
    #[inline(never)]
    fn poll_events(&mut self, shared: &EndpointShared) -> Option<Polled> {
        // Messages first (what was sent before an event is usually read before it), but
        // an event never waits behind more than `EVENT_EVERY` messages.
        if !self.events.is_empty() && self.since_event < EVENT_EVERY {
            if let Some(p) = self.poll_links(&shared.counters) {
                self.since_event += 1;
                return Some(p);
            }
        }
        self.since_event = 0;
        let Some(ev) = self.events.pop_front() else {
            // The rings are empty (polled just above, or by `poll`): the shutdown request
            // comes last, after every message that was already in them.
            return std::mem::take(&mut self.shutdown_requested)
                .then(|| Polled::Event(Control::Shutdown));
        };
        // A down event waits until everything its isolate sent before dying is read.
        if let Control::Down(r, _) = &ev {
            let id = r.id();
            if let Some(i) = self
                .links
                .iter()
                .position(|l| l.source == id && l.has_data())
            {
                if let Some(p) = self.take_from(i, &shared.counters) {
                    self.events.push_front(ev);
                    return Some(p);
                }
            }
        }
        Some(Polled::Event(ev))
    }

    /// The common case of [`poll`](Self::poll), for receivers that read one message at a
    /// time: no event waits, and the link at the cursor holds a one-cell copy or
    /// transfer frame that is not a reply. Takes it exactly as `poll` would (the link is
    /// held, the burst counted). Otherwise changes nothing, and tells whether there is
    /// anything at all for the full poll to do.
    #[inline(always)]
    fn poll_fast(&mut self) -> Fast {
        if !self.events.is_empty() {
            return Fast::Busy;
        }
        let i = self.cursor;
        let Some(l) = self.links.get_mut(i) else {
            // No link at all, or the cursor past the end (the full poll wraps it).
            return if self.links.is_empty() && !self.shutdown_requested {
                Fast::Idle
            } else {
                Fast::Busy
            };
        };
        if l.held || !l.overflow.is_empty() {
            return Fast::Busy;
        }
        let Some(first) = l.peek_first() else {
            return if self.rest_idle(i) {
                Fast::Idle
            } else {
                Fast::Busy
            };
        };
        let Some(frame) = plain_frame(first) else {
            return Fast::Busy;
        };
        if first.0[5] & FLAG_REPLY != 0 {
            return Fast::Busy;
        }
        l.held = true;
        self.held += 1;
        self.took_from(i);
        Fast::Plain(i, frame)
    }

    /// With the ring of link `i` empty: whether nothing else waits to be read either
    /// (the shutdown request, or a frame on another link that is not held).
    #[inline(always)]
    fn rest_idle(&self, i: usize) -> bool {
        !self.shutdown_requested && (self.links.len() == 1 || self.others_idle(i))
    }

    #[inline(never)]
    fn others_idle(&self, i: usize) -> bool {
        self.links
            .iter()
            .enumerate()
            .all(|(j, l)| j == i || l.held || !l.has_data())
    }

    /// Counts a message taken from link `i` against the burst of the link at the cursor:
    /// after `BURST` messages in a row from one link, reading moves on to the next.
    #[inline(always)]
    fn took_from(&mut self, i: usize) {
        if i == self.cursor {
            self.burst += 1;
        } else {
            self.cursor = i;
            self.burst = 1;
        }
        if self.burst >= BURST {
            self.cursor = i + 1;
            self.burst = 0;
        }
    }

    #[inline]
    fn poll_links(&mut self, counters: &Counters) -> Option<Polled> {
        let n = self.links.len();
        let mut i = self.cursor;
        for _ in 0..n {
            if i >= n {
                i = 0;
            }
            if let Some(p) = self.take_from(i, counters) {
                self.took_from(i);
                return Some(p);
            }
            i += 1;
        }
        None
    }

    /// Drops links whose producer has gone and which hold nothing.
    fn prune(&mut self) {
        if self.held == 0 {
            let before = self.links.len();
            self.links.retain(|l| !l.is_finished());
            // Round robin goes on where it was unless links went (readers of the cursor
            // wrap it when it is past the end).
            if self.links.len() != before {
                self.cursor = 0;
            }
        }
    }

    /// Releases a frame read in place from link `i`.
    #[inline]
    pub(crate) fn release(&mut self, i: usize, cells: usize) {
        self.unhold(i).commit(cells);
    }

    /// Releases the entry of pack frame `frame` read in place from link `i`.
    pub(crate) fn release_entry(&mut self, i: usize, frame: RingFrame) {
        self.unhold(i).consume_one(frame);
    }

    /// Link `i`, no longer held.
    #[inline(always)]
    fn unhold(&mut self, i: usize) -> &mut InLink {
        self.held -= 1;
        let l = &mut self.links[i];
        debug_assert!(l.held);
        l.held = false;
        l
    }

    /// Frees ring space for blocked peers: moves every frame of every link that is not
    /// held out of its ring (see `move_out_of_rings`).
    fn drain_to_overflow(&mut self, shared: &EndpointShared) {
        self.move_out_of_rings(shared, None);
    }
}

/// What a spinning receiver's fast poll found (see `Inbound::poll_fast`).
pub(crate) enum Fast {
    /// A one-cell copy or transfer frame in place, taken, as (link, frame).
    Plain(usize, RingFrame),
    /// Nothing to read: every ring that is not held is empty, and no event, control item,
    /// spilled frame or shutdown request waits.
    Idle,
    /// Anything else: the full poll has to look.
    Busy,
}

/// A link claimed for a batch read: its index, its waiting cells in place (up to two runs
/// of cells, as first cell and count), and the entries of the pack frame at their head
/// already read.
pub(crate) type BatchClaim = (usize, [(*const Cell, usize); 2], u32);

/// A reply found by `wait_reply`: in place in a ring (the usual case), or set aside
/// earlier.
pub(crate) enum Reply {
    InPlace { link: usize, frame: RingFrame },
    Owned(OwnedFrame),
}

/// Who a frame goes to.
pub(crate) enum Target<'a> {
    /// A reference (carries the endpoint, no lookup needed).
    Ref(&'a IsolateRef),
    /// An endpoint id from a frame header (replies).
    Id(u32),
}

impl Target<'_> {
    fn id(&self) -> u32 {
        match self {
            Self::Ref(r) => r.id(),
            Self::Id(id) => *id,
        }
    }
}

/// Serialises a value in place.
pub(crate) struct CopySource<'v, 'a, T> {
    pub value: &'v T,
    pub arena: &'a mut Arena,
}

impl<T: Payload> FrameSource for CopySource<'_, '_, T> {
    #[inline]
    fn fill(&mut self, window: &mut [MaybeUninit<u8>]) -> Result<usize, RingError> {
        crate::frame::serialize_into(self.value, window, self.arena)
    }
}

/// Copies raw bytes (FFI and pre-serialised payloads).
pub(crate) struct BytesSource<'b>(pub &'b [u8]);

impl FrameSource for BytesSource<'_> {
    #[inline]
    fn fill(&mut self, window: &mut [MaybeUninit<u8>]) -> Result<usize, RingError> {
        if self.0.len() > window.len() {
            return Err(RingError::NoRoom);
        }
        if self.0.len() <= 16 && window.len() >= 16 {
            // A small payload (the common reply) without a call to `memcpy`: two
            // overlapping 8-byte moves, or byte moves under 8.
            copy_small(self.0, window);
            return Ok(self.0.len());
        }
        // SAFETY: the window holds at least `len` bytes (checked above) and is exclusively
        // ours until commit; the source slice cannot overlap uncommitted ring memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.0.as_ptr(),
                window.as_mut_ptr().cast::<u8>(),
                self.0.len(),
            );
        }
        Ok(self.0.len())
    }
}

/// Copies `src` (at most 16 bytes) to the start of `dst` (at least 16 bytes) inline.
#[inline(always)]
fn copy_small(src: &[u8], dst: &mut [MaybeUninit<u8>]) {
    let n = src.len();
    debug_assert!(n <= 16 && dst.len() >= 16);
    let d = dst.as_mut_ptr().cast::<u8>();
    let s = src.as_ptr();
    // SAFETY: `src` holds `n` bytes and `dst` at least 16 (checked by the caller); the
    // unaligned reads stay inside `src` (the two 8-byte windows start at 0 and `n - 8`,
    // both within `0..n` when `n >= 8`), the writes inside `dst`, and the two never
    // overlap (the source is not ring memory this sender owns).
    unsafe {
        if n >= 8 {
            let a = s.cast::<u64>().read_unaligned();
            let b = s.add(n - 8).cast::<u64>().read_unaligned();
            d.cast::<u64>().write_unaligned(a);
            d.add(n - 8).cast::<u64>().write_unaligned(b);
        } else {
            for k in 0..n {
                *d.add(k) = *s.add(k);
            }
        }
    }
}

/// Moves a pointer.
pub(crate) struct TransferSource(pub TransferPayload);

impl FrameSource for TransferSource {
    #[inline]
    fn fill(&mut self, window: &mut [MaybeUninit<u8>]) -> Result<usize, RingError> {
        if window.len() < TransferPayload::BYTES {
            return Err(RingError::NoRoom);
        }
        let bytes = self.0.encode();
        for (d, b) in window.iter_mut().zip(bytes) {
            d.write(b);
        }
        Ok(TransferPayload::BYTES)
    }
}

/// Where replies go, and which request a frame answers or opens.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Route {
    pub correlation: u64,
    pub reply_to: u32,
    pub flags: u8,
}

impl Route {
    /// A plain message whose replies go to `reply_to`.
    pub(crate) fn plain(reply_to: u32) -> Self {
        Self {
            correlation: 0,
            reply_to,
            flags: 0,
        }
    }
}

/// The header fields a sender chooses (the sender id and length are filled in).
#[derive(Clone, Copy)]
pub(crate) struct Meta {
    pub kind: FrameKind,
    pub flags: u8,
    pub tag: TypeTag,
    pub correlation: u64,
    pub reply_to: u32,
}

impl Meta {
    pub(crate) fn new(kind: FrameKind, tag: TypeTag, route: Route) -> Self {
        Self {
            kind,
            flags: route.flags,
            tag,
            correlation: route.correlation,
            reply_to: route.reply_to,
        }
    }
}

/// How a send behaves when the ring is full.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Return `Full`.
    Try,
    /// Wait (see [`LocalEndpoint::send`]).
    Block,
    /// Wait as `Block` does, but for at most this long from the first refusal: then
    /// return `Full` (a call's request, which must not outlive the call's timeout behind
    /// a target that stopped reading). When it waits, the instant it began is kept for
    /// [`LocalEndpoint::call_started`].
    Within(Duration),
    /// Never wait: a full ring spills the frame to the heap, where it keeps its place in
    /// the link's FIFO order (for senders whose timing matters more than memory, such as
    /// the task scheduler publishing results).
    Spill,
}

/// An endpoint as its owner thread sees it.
pub(crate) struct LocalEndpoint {
    pub shared: Arc<EndpointShared>,
    pub cluster: Arc<ClusterInner>,
    pub me: IsolateRef,
    pub inbound: RefCell<Inbound>,
    pub outbound: RefCell<Outbound>,
    /// Scratch space rkyv serialises with (reused: no allocation in steady state).
    arena: RefCell<Arena>,
    pub strategy: WaitStrategy,
    /// The strategy spins between polls (`BusySpin`, or `SpinThenPark` with a spin).
    spins: bool,
    /// Links with spilled frames (checked without borrowing `outbound`).
    spilled_links: StdCell<usize>,
    /// A `Context` or `Mailbox` is reading this endpoint.
    pub inbox_open: StdCell<bool>,
    /// Frames whose transferred values are dropped once no borrow is held.
    deferred: RefCell<Vec<OwnedFrame>>,
    has_deferred: StdCell<bool>,
    /// When a `Mode::Within` send began waiting for room (see `call_started`).
    waited_since: StdCell<Option<Instant>>,
    torn_down: StdCell<bool>,
}

impl LocalEndpoint {
    pub(crate) fn new(cluster: Arc<ClusterInner>, me: IsolateRef, strategy: WaitStrategy) -> Self {
        let shared = me.endpoint().clone();
        shared.wake.register_current_thread();
        Self {
            shared,
            cluster,
            me,
            inbound: RefCell::new(Inbound {
                links: Vec::new(),
                events: VecDeque::new(),
                cursor: 0,
                burst: 0,
                since_event: 0,
                shutdown_requested: false,
                held: 0,
                pending: RequestMap::default(),
                call_slot: 0,
                stash: RequestMap::default(),
                next_request: 0,
            }),
            outbound: RefCell::new(Outbound {
                links: Vec::new(),
                index: IdMap::default(),
                last: (0, 0),
            }),
            arena: RefCell::new(Arena::new()),
            strategy,
            spins: match strategy {
                WaitStrategy::BusySpin => true,
                WaitStrategy::Yield => false,
                WaitStrategy::SpinThenPark { spin } => !spin.is_zero(),
            },
            spilled_links: StdCell::new(0),
            inbox_open: StdCell::new(false),
            deferred: RefCell::new(Vec::new()),
            has_deferred: StdCell::new(false),
            waited_since: StdCell::new(None),
            torn_down: StdCell::new(false),
        }
    }

    /// Finds or creates the link to `target`.
    #[inline]
    fn link_index(&self, out: &mut Outbound, target: &Target<'_>) -> Result<usize, SendError> {
        if let Target::Ref(r) = target {
            if r.0.cluster_id != self.cluster.id {
                // Ids are per cluster: a reference from another cluster names nobody here.
                return Err(SendError::UnknownTarget(()));
            }
        }
        let id = target.id();
        if out.last.0 == id && id != 0 {
            return Ok(out.last.1);
        }
        self.link_index_slow(out, target)
    }

    #[cold]
    fn link_index_slow(&self, out: &mut Outbound, target: &Target<'_>) -> Result<usize, SendError> {
        let id = target.id();
        if let Some(&i) = out.index.get(&id) {
            out.last = (id, i);
            return Ok(i);
        }
        let target_ref = match target {
            Target::Ref(r) => (*r).clone(),
            Target::Id(id) => match self.cluster.ref_by_id(*id) {
                Some(r) => r,
                None => return Err(SendError::UnknownTarget(())),
            },
        };
        let endpoint = target_ref.endpoint().clone();
        if endpoint.wake.is_closed() {
            return Err(SendError::Disconnected(()));
        }
        if target_ref.is_remote() {
            // No ring: frames to another node go through the network (`send_remote`).
            return Ok(REMOTE);
        }
        // A new target is often the restart of one that stopped: drop the links to
        // targets that have gone, so their rings do not stay allocated for as long as
        // this endpoint lives (their unsent frames are counted as undelivered).
        for k in (0..out.links.len()).rev() {
            if out.links[k].target.wake.is_closed() {
                self.remove_link(out, k);
            }
        }
        let ring = new_ring(self.cluster.config.ring_cells);
        let control = Control::NewLink(ring.consumer, self.shared.clone(), ring.shared.clone());
        if endpoint.enqueue(control).is_err() {
            return Err(SendError::Disconnected(()));
        }
        let i = out.links.len();
        out.links
            .push(OutLink::new(ring.producer, ring.shared, endpoint));
        out.index.insert(id, i);
        out.last = (id, i);
        Ok(i)
    }

    fn remove_link(&self, out: &mut Outbound, i: usize) {
        let link = out.links.swap_remove(i);
        let id = link.target.id;
        out.index.remove(&id);
        if let Some(moved) = out.links.get(i) {
            out.index.insert(moved.target.id, i);
        }
        out.last = (0, 0);
        if !link.spill.is_empty() {
            self.spilled_links.set(self.spilled_links.get() - 1);
            link.target.count_undelivered(link.spill.len() as u64);
            self.defer_discard(link.spill);
        }
    }

    /// Frames to discard once no borrow of this endpoint is held: a transferred value's
    /// `Drop` is user code and may send through this very endpoint.
    fn defer_discard(&self, frames: impl IntoIterator<Item = OwnedFrame>) {
        self.deferred.borrow_mut().extend(frames);
        self.has_deferred.set(true);
    }

    /// Discards the deferred frames. Called with no borrow of this endpoint held.
    #[cold]
    fn run_deferred(&self) {
        self.has_deferred.set(false);
        let frames = std::mem::take(&mut *self.deferred.borrow_mut());
        for f in frames {
            f.discard();
        }
    }

    /// Sends one frame to `target`.
    ///
    /// With [`Mode::Block`], a full ring makes the sender wait: it spins, yields, then naps
    /// (up to 1 ms at a time), and meanwhile moves the frames waiting in its *own* inbound
    /// rings into overflow queues, so two endpoints flooding each other both progress.
    /// If the sender holds a received message (that ring cannot be freed), it stops
    /// waiting after the spin phase and spills the frame to the heap instead, where it
    /// keeps its place in the link's FIFO order: a cycle of handlers replying to each
    /// other can therefore never deadlock. Spilled frames are written by later sends and
    /// by the receive loop; they count in `Stats::spilled`.
    #[inline(always)]
    pub(crate) fn send(
        &self,
        target: Target<'_>,
        meta: Meta,
        src: &mut impl FrameSource,
        mode: Mode,
    ) -> Result<(), SendError> {
        let result = self.send_borrowed(target, meta, src, mode);
        if self.has_deferred.get() {
            self.run_deferred();
        }
        result
    }

    /// Delivers a frame that came from another node to the endpoint `target` of this
    /// node (this endpoint is the proxy of its remote sender). Never waits: a full ring
    /// spills (the frame keeps its place in FIFO order; see `has_spills`).
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    pub(crate) fn deliver(
        &self,
        target: u32,
        meta: Meta,
        src: &mut impl FrameSource,
    ) -> Result<(), SendError> {
        self.send(Target::Id(target), meta, src, Mode::Spill)
    }

    /// Whether frames wait in spill queues (`flush_spills` writes those that fit now).
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    pub(crate) fn has_spills(&self) -> bool {
        self.spilled_links.get() != 0
    }

    /// `send`, with `outbound` borrowed throughout.
    #[inline(always)]
    fn send_borrowed(
        &self,
        target: Target<'_>,
        meta: Meta,
        src: &mut impl FrameSource,
        mode: Mode,
    ) -> Result<(), SendError> {
        let mut guard = self.outbound.borrow_mut();
        let out = &mut *guard;
        let i = self.link_index(out, &target)?;
        if i == REMOTE {
            drop(guard);
            return self.send_remote(&target, self.header(meta), src);
        }
        // Built here and handed to `write` by value only: the slow path builds its own
        // from `meta`, so this one never goes through memory (a copy of it made right
        // after building it would stall on store forwarding).
        let header = self.header(meta);
        let link = &mut out.links[i];
        // The fast path: nothing spilled, target open, room in the ring. A target that
        // closes after the check is caught by `notify` after publishing (the frame is then
        // drained and counted as undelivered); checking first means a send to an isolate
        // known to be down reports `Disconnected`, and a transfer handed back in an error
        // was never published.
        if link.spill.is_empty()
            && !link.target.wake.is_closed()
            && link.write(header, src) == WriteOutcome::Written
        {
            bump(&self.shared.counters.sent);
            if link.target.wake.notify() {
                // Published into an endpoint that has closed: the frame is drained and
                // counted as undelivered; the link goes, so the next send reports
                // `Disconnected`.
                link.target.drain_after_close();
                self.remove_link(out, i);
            }
            return Ok(());
        }
        self.send_slow(out, i, meta, src, mode)
    }

    /// The header of a frame this endpoint sends (its length is set by the writer).
    #[inline(always)]
    fn header(&self, meta: Meta) -> FrameHeader {
        FrameHeader::new(
            meta.kind,
            meta.flags,
            meta.tag,
            self.shared.id,
            meta.reply_to,
            meta.correlation,
        )
    }

    /// Sends a frame to an endpoint of another node: built off the ring (at most a ring's
    /// capacity, as for a local target) and handed to the network layer, which carries
    /// it in order with this thread's other frames to that node. It never reports
    /// `Full`: the network layer queues (and, when its queue is full, waits).
    #[cold]
    #[inline(never)]
    fn send_remote(
        &self,
        target: &Target<'_>,
        header: FrameHeader,
        src: &mut impl FrameSource,
    ) -> Result<(), SendError> {
        let r = match target {
            Target::Ref(r) => (*r).clone(),
            Target::Id(id) => self
                .cluster
                .ref_by_id(*id)
                .ok_or(SendError::UnknownTarget(()))?,
        };
        let Some(route) = &r.0.remote else {
            return Err(SendError::UnknownTarget(()));
        };
        let frame = build_off_ring(header, src, self.cluster.config.ring_cells)?;
        route.via.forward(route.id, &frame)?;
        bump(&self.shared.counters.sent);
        Ok(())
    }

    /// Everything but the fast path: spilled frames, a closed target, a full ring (wait
    /// or fail), a frame that can never fit, a failed serialisation.
    #[cold]
    #[inline(never)]
    fn send_slow(
        &self,
        out: &mut Outbound,
        i: usize,
        meta: Meta,
        src: &mut impl FrameSource,
        mode: Mode,
    ) -> Result<(), SendError> {
        let header = self.header(meta);
        if out.links[i].target.wake.is_closed() {
            self.remove_link(out, i);
            return Err(SendError::Disconnected(()));
        }
        let link = &mut out.links[i];
        if !link.spill.is_empty() {
            if link.flush_spill() > 0 && link.target.wake.notify() {
                link.target.drain_after_close();
            }
            if link.spill.is_empty() {
                self.spilled_links.set(self.spilled_links.get() - 1);
            }
        }
        if !link.spill.is_empty() {
            if mode == Mode::Try {
                bump(&self.shared.counters.full);
                return Err(SendError::Full(()));
            }
            return self.spill(link, header, src);
        }
        let mut waited: Option<Instant> = None;
        let mut round = 0u32;
        // Transfers always fit; a spill checks the size itself; other frames are checked
        // once (see below).
        let mut fit_checked = header.kind() == FrameKind::Transfer || mode == Mode::Spill;
        // What the refused fast-path attempt found free (a later attempt finds its padding).
        let mut roomy = out.links[i].free_at_refusal * 2 >= out.links[i].capacity();
        loop {
            let link = &mut out.links[i];
            match link.write(header, src) {
                WriteOutcome::Written => {
                    bump(&self.shared.counters.sent);
                    if link.target.wake.notify() {
                        link.target.drain_after_close();
                    }
                    return Ok(());
                }
                WriteOutcome::TooLarge => {
                    return Err(SendError::TooLarge {
                        value: (),
                        capacity: link.capacity() * CELL_BYTES,
                    })
                }
                WriteOutcome::Failed => return Err(SendError::Serialize(())),
                WriteOutcome::Full => {}
            }
            if waited.is_none() {
                bump(&self.shared.counters.full);
            }
            // A frame that can never fit must not wait for space, nor be reported as
            // `Full` for ever: the ring only says `TooLarge` when it is empty. When the
            // ring is at most half full (a frame that fits is rarely refused then), or
            // once this sender has spun a while, build the frame off the ring once to
            // find out. A ring kept full by a stream of small frames never pays for it.
            roomy |= link.free_at_refusal * 2 >= link.capacity();
            if !fit_checked && (roomy || round >= 64) {
                fit_checked = true;
                build_off_ring(header, src, link.capacity())?;
            }
            match mode {
                Mode::Try => return Err(SendError::Full(())),
                Mode::Spill => return self.spill(&mut out.links[i], header, src),
                Mode::Block | Mode::Within(_) => {}
            }
            let start = *waited.get_or_insert_with(|| {
                let now = Instant::now();
                if let Mode::Within(_) = mode {
                    self.waited_since.set(Some(now));
                }
                now
            });
            if link.target.wake.is_closed() {
                self.remove_link(out, i);
                return Err(SendError::Disconnected(()));
            }
            if let Mode::Within(limit) = mode {
                if start.elapsed() >= limit {
                    return Err(SendError::Full(()));
                }
            }
            let holding = {
                let mut inbound = self.inbound.borrow_mut();
                inbound.drain_to_overflow(&self.shared);
                inbound.held > 0
            };
            let spin = self.strategy.spin_time();
            let waited_for = start.elapsed();
            if holding && waited_for >= spin {
                return self.spill(&mut out.links[i], header, src);
            }
            round += 1;
            if round < 64 || waited_for < spin {
                std::hint::spin_loop();
                continue;
            }
            self.wait_for_space(&out.links[i]);
        }
    }

    /// Sleeps until the receiver frees space in `link` (see `LinkShared`), something
    /// arrives in this endpoint's own rings, or 1 ms passes (then the caller re-checks
    /// whether the target has stopped).
    fn wait_for_space(&self, link: &OutLink) {
        let free = link.free_cells();
        link.shared.sender_waiting.store(true, Ordering::Relaxed);
        self.shared.wake.prepare_park();
        let moved = link.free_cells() > free
            || self.shared.control_pending()
            || self
                .inbound
                .borrow()
                .links
                .iter()
                .any(|l| !l.held && l.ring_has_data());
        if moved {
            self.shared.wake.cancel_park();
        } else {
            self.shared
                .wake
                .park(Some(Instant::now() + Duration::from_millis(1)));
        }
        link.shared.sender_waiting.store(false, Ordering::Relaxed);
    }

    fn spill(
        &self,
        link: &mut OutLink,
        header: FrameHeader,
        src: &mut impl FrameSource,
    ) -> Result<(), SendError> {
        let f = build_off_ring(header, src, link.capacity())?;
        if link.spill.is_empty() {
            self.spilled_links.set(self.spilled_links.get() + 1);
        }
        link.spill.push_back(f);
        bump(&self.shared.counters.spilled);
        Ok(())
    }

    /// Writes spilled frames that fit now.
    #[inline]
    pub(crate) fn flush_spills(&self) {
        if self.spilled_links.get() != 0 {
            self.flush_spills_slow();
        }
    }

    #[cold]
    fn flush_spills_slow(&self) {
        let mut out = self.outbound.borrow_mut();
        let mut remaining = 0;
        for link in out.links.iter_mut().filter(|l| !l.spill.is_empty()) {
            if link.target.wake.is_closed() {
                link.target.count_undelivered(link.spill.len() as u64);
                let frames: Vec<OwnedFrame> = link.spill.drain(..).collect();
                self.defer_discard(frames);
                continue;
            }
            if link.flush_spill() > 0 && link.target.wake.notify() {
                link.target.drain_after_close();
            }
            if !link.spill.is_empty() {
                remaining += 1;
            }
        }
        self.spilled_links.set(remaining);
        drop(out);
        if self.has_deferred.get() {
            self.run_deferred();
        }
    }

    /// Sends a copy of `value`.
    #[inline(always)]
    pub(crate) fn send_copy<T: Payload>(
        &self,
        target: Target<'_>,
        value: &T,
        route: Route,
        mode: Mode,
    ) -> Result<(), SendError> {
        let mut arena = self.arena.borrow_mut();
        let mut src = CopySource {
            value,
            arena: &mut arena,
        };
        let meta = Meta::new(FrameKind::Copy, crate::frame::type_tag::<T>(), route);
        self.send(target, meta, &mut src, mode)
    }

    /// Sends copies of `values` in order, publishing as many frames per index update as
    /// fit. With [`Mode::Try`], stops at the first full ring and returns how many went.
    pub(crate) fn send_batch<T: Payload>(
        &self,
        target: Target<'_>,
        values: &[T],
        mode: Mode,
    ) -> Result<usize, SendError> {
        let tag = crate::frame::type_tag::<T>();
        let mut sent = 0;
        while sent < values.len() {
            let written = {
                let mut guard = self.outbound.borrow_mut();
                let out = &mut *guard;
                let i = self.link_index(out, &target)?;
                let link = match out.links.get_mut(i) {
                    Some(l) => l,
                    // Another node's endpoint (no ring): one frame at a time below.
                    None => {
                        debug_assert_eq!(i, REMOTE);
                        drop(guard);
                        let route = Route::plain(self.shared.id);
                        for v in &values[sent..] {
                            self.send_copy(Target::Id(target.id()), v, route, mode)?;
                        }
                        return Ok(values.len());
                    }
                };
                if link.spill.is_empty() && !link.target.wake.is_closed() {
                    let header = FrameHeader::new(
                        FrameKind::Copy,
                        0,
                        tag,
                        self.shared.id,
                        self.shared.id,
                        0,
                    );
                    let mut arena = self.arena.borrow_mut();
                    let rest = &values[sent..];
                    let n = link
                        .write_batch(header, rest.len(), |k, window| {
                            CopySource {
                                value: &rest[k],
                                arena: &mut arena,
                            }
                            .fill(window)
                        })
                        .map_err(|_| SendError::Serialize(()))?;
                    if n > 0 {
                        let c = &self.shared.counters.sent;
                        c.store(c.load(Ordering::Relaxed) + n as u64, Ordering::Relaxed);
                        if link.target.wake.notify() {
                            link.target.drain_after_close();
                        }
                    }
                    n
                } else {
                    0
                }
            };
            if written > 0 {
                sent += written;
                continue;
            }
            // Nothing fit in the contiguous space: one frame the ordinary way (it wraps,
            // waits, spills or reports the error).
            let route = Route::plain(self.shared.id);
            match self.send_copy(Target::Id(target.id()), &values[sent], route, mode) {
                Ok(()) => sent += 1,
                Err(SendError::Full(())) if mode == Mode::Try => return Ok(sent),
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    }

    /// Sends raw bytes with an application tag (top bit clear, see [`TypeTag`]).
    #[inline]
    pub(crate) fn send_bytes(
        &self,
        target: Target<'_>,
        tag: TypeTag,
        bytes: &[u8],
        route: Route,
        mode: Mode,
    ) -> Result<(), SendError> {
        let meta = Meta::new(FrameKind::Copy, tag, route);
        self.send(target, meta, &mut BytesSource(bytes), mode)
    }

    /// Moves `value` (only its pointer travels).
    pub(crate) fn send_transfer<T: Send + 'static>(
        &self,
        target: Target<'_>,
        value: Box<T>,
        route: Route,
        mode: Mode,
    ) -> Result<(), SendError<Box<T>>> {
        let ptr = Box::into_raw(value);
        let mut src = TransferSource(TransferPayload {
            ptr: ptr.cast::<u8>(),
            drop_fn: crate::frame::drop_box::<T>,
        });
        let meta = Meta::new(FrameKind::Transfer, crate::frame::type_tag::<T>(), route);
        self.send(target, meta, &mut src, mode).map_err(|e| {
            // SAFETY: the send failed, so no frame holds `ptr`: we still own the box.
            e.map(|()| unsafe { Box::from_raw(ptr) })
        })
    }

    /// The common case of [`poll`](Self::poll): a one-cell copy or transfer frame in place
    /// (see `Inbound::poll_fast`), or whether a full poll has anything to do. Inlined into
    /// the receive loop, it hands over the link and the frame without building a
    /// `Polled`, so the message is built in registers.
    #[inline(always)]
    pub(crate) fn poll_fast(&self) -> Fast {
        if self.spilled_links.get() != 0 || self.shared.control_pending() {
            return Fast::Busy;
        }
        let p = self.inbound.borrow_mut().poll_fast();
        if let Fast::Plain(..) = p {
            bump(&self.shared.counters.received);
        }
        p
    }

    /// Whether the wait strategy spins between polls.
    #[inline(always)]
    pub(crate) fn spins(&self) -> bool {
        self.spins
    }

    /// One poll of the inbox, no waiting.
    #[inline]
    pub(crate) fn poll(&self) -> Option<Polled> {
        self.flush_spills();
        let p = self.inbound.borrow_mut().poll(&self.shared);
        if p.is_some() {
            bump(&self.shared.counters.received);
        }
        p
    }

    /// Claims one link whose ring holds frames for a batch read (round robin over the
    /// links, after those already claimed): marks it held, so nothing else consumes it,
    /// and returns its waiting cells in place, and the entries of the pack frame at their
    /// head already read (0 for other frames). Links with frames set aside (overflow) are
    /// left to `poll`, which reads those first.
    pub(crate) fn claim_batch(&self) -> Option<BatchClaim> {
        self.flush_spills();
        let mut guard = self.inbound.borrow_mut();
        let inb = &mut *guard;
        if self.shared.control_pending() {
            inb.accept(self.shared.take_control());
        }
        let n = inb.links.len();
        for k in 0..n {
            let i = (inb.cursor + k) % n;
            let l = &mut inb.links[i];
            if l.held || !l.overflow.is_empty() || !l.ring_has_data() {
                continue;
            }
            let runs = l.peek_all();
            l.held = true;
            inb.held += 1;
            inb.cursor = (i + 1) % n;
            return Some((i, runs, l.pack_next));
        }
        None
    }

    /// Ends a batch read of link `link`: consumes the `cells` it read and counts the
    /// `messages` it delivered; `pack_next` entries of the pack frame after those cells
    /// were delivered too (0: none).
    pub(crate) fn finish_batch(&self, link: usize, cells: usize, messages: u64, pack_next: u32) {
        let mut inb = self.inbound.borrow_mut();
        let l = &mut inb.links[link];
        debug_assert!(l.held);
        if cells > 0 {
            l.commit(cells);
        }
        l.pack_next = pack_next;
        l.held = false;
        inb.held -= 1;
        let c = &self.shared.counters.received;
        c.store(c.load(Ordering::Relaxed) + messages, Ordering::Relaxed);
    }

    /// Waits a little for work per the wait strategy. Returns `false` once `deadline`
    /// has passed. Spurious returns are fine (the caller polls again). The clock is read
    /// only every 64 rounds, so spinning stays a tight loop.
    #[inline(always)]
    pub(crate) fn idle(&self, idle: &mut IdleState, deadline: Option<Instant>) -> bool {
        idle.round = idle.round.wrapping_add(1);
        if idle.round % 64 != 0 && self.spins {
            std::hint::spin_loop();
            return true;
        }
        self.idle_slow(idle, deadline)
    }

    /// `idle` for the rounds that yield, read the clock or park.
    #[inline(never)]
    fn idle_slow(&self, idle: &mut IdleState, deadline: Option<Instant>) -> bool {
        let park_at_once =
            matches!(self.strategy, WaitStrategy::SpinThenPark { spin } if spin.is_zero());
        if idle.round % 64 != 0 && !park_at_once {
            // Yield (spinning strategies take the inline path in `idle`).
            std::thread::yield_now();
            return true;
        }
        if deadline.is_none() && self.strategy == WaitStrategy::BusySpin {
            // Nothing to time: a busy-spinning wait without a deadline never reads the
            // clock (a read costs as much as a turn of the loop).
            std::hint::spin_loop();
            return true;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return false;
        }
        let since = *idle.since.get_or_insert(now);
        match self.strategy {
            WaitStrategy::BusySpin => std::hint::spin_loop(),
            WaitStrategy::Yield => std::thread::yield_now(),
            WaitStrategy::SpinThenPark { spin } => {
                if now - since < spin {
                    std::hint::spin_loop();
                    return true;
                }
                self.inbound.borrow_mut().prune();
                self.shared.wake.prepare_park();
                if self.inbound.borrow().has_data() || self.shared.control_pending() {
                    self.shared.wake.cancel_park();
                    return true;
                }
                // With spilled frames to write, wake up now and then to retry.
                let deadline = if self.spilled_links.get() > 0 {
                    let retry = Instant::now() + Duration::from_millis(1);
                    Some(deadline.map_or(retry, |d| d.min(retry)))
                } else {
                    deadline
                };
                self.shared.wake.park(deadline);
            }
        }
        true
    }

    /// Sends `value` as a request to `target`: a fresh correlation id, remembered until
    /// its reply is taken or the wait is given up.
    ///
    /// `remember` keeps `target` with the request, for a later [`wait_reply`](Self::wait_reply)
    /// that knows only the id; a caller that waits with [`wait_reply_for`](Self::wait_reply_for)
    /// passes `false` and saves two reference-count updates per request.
    ///
    /// `mode` is `Block`, or `Within` the call's timeout for a call.
    pub(crate) fn request<T: Payload>(
        &self,
        target: &IsolateRef,
        value: &T,
        remember: bool,
        mode: Mode,
    ) -> Result<u64, SendError> {
        let (id, route) = self.open_request(target, remember);
        self.send_copy(Target::Ref(target), value, route, mode)
            .map(|()| id)
            .inspect_err(|_| self.forget_request(id))
    }

    /// Like [`request`](Self::request), with raw bytes and an application tag.
    pub(crate) fn request_bytes(
        &self,
        target: &IsolateRef,
        tag: TypeTag,
        bytes: &[u8],
        remember: bool,
        mode: Mode,
    ) -> Result<u64, SendError> {
        let (id, route) = self.open_request(target, remember);
        let route = Route {
            flags: route.flags | crate::frame::FLAG_RAW,
            ..route
        };
        self.send_bytes(Target::Ref(target), tag, bytes, route, mode)
            .map(|()| id)
            .inspect_err(|_| self.forget_request(id))
    }

    /// Like [`request`](Self::request), moving `value` instead of copying it.
    pub(crate) fn request_transfer<T: Send + 'static>(
        &self,
        target: &IsolateRef,
        value: Box<T>,
        mode: Mode,
    ) -> Result<u64, SendError<Box<T>>> {
        let (id, route) = self.open_request(target, true);
        self.send_transfer(Target::Ref(target), value, route, mode)
            .map(|()| id)
            .inspect_err(|_| self.forget_request(id))
    }

    /// A fresh request id, remembered as pending (with its target if `remember`), and the
    /// route its frame carries.
    fn open_request(&self, target: &IsolateRef, remember: bool) -> (u64, Route) {
        let mut inb = self.inbound.borrow_mut();
        inb.next_request += 1;
        let id = inb.next_request;
        if !remember && inb.call_slot == 0 {
            inb.call_slot = id;
        } else {
            inb.pending.insert(id, remember.then(|| target.clone()));
        }
        let route = Route {
            correlation: id,
            reply_to: self.shared.id,
            flags: FLAG_CALL,
        };
        (id, route)
    }

    /// When the call whose request was just sent with `Mode::Within` began: when that send
    /// began waiting for room, or now if it did not wait (it then took no time). Read
    /// after the send, so a call reads the clock while its request travels, not before.
    #[inline]
    pub(crate) fn call_started(&self) -> Instant {
        self.waited_since.take().unwrap_or_else(Instant::now)
    }

    /// Forgets request `id`: a reply that still comes is dropped and counted as late.
    pub(crate) fn forget_request(&self, id: u64) {
        let mut inb = self.inbound.borrow_mut();
        inb.settle(id);
        if let Some(f) = inb.stash.remove(&id) {
            f.discard();
        }
    }

    /// Waits for the reply to request `id` until `deadline`. Other messages and events
    /// that arrive meanwhile wait, in order, for the receive loop.
    pub(crate) fn wait_reply(&self, id: u64, deadline: Instant) -> Result<Reply, CallError> {
        let target = match self.inbound.borrow().pending.get(&id) {
            Some(Some(t)) => t.clone(),
            // Made by a `call`, which waits for it itself.
            Some(None) | None => return Err(CallError::UnknownRequest),
        };
        self.wait_reply_for(id, &target, deadline)
    }

    /// [`wait_reply`](Self::wait_reply) for a request whose target the caller holds.
    pub(crate) fn wait_reply_for(
        &self,
        id: u64,
        target: &IsolateRef,
        deadline: Instant,
    ) -> Result<Reply, CallError> {
        if !self.inbound.borrow().awaits(id) {
            return Err(CallError::UnknownRequest);
        }
        let mut idle = IdleState::default();
        let mut target_gone = false;
        loop {
            self.flush_spills();
            {
                let mut inb = self.inbound.borrow_mut();
                // (`is_empty` first: the stash is almost always empty, and a lookup in an
                // empty map still hashes and probes, on every turn of this loop.)
                if let Some(f) = (!inb.stash.is_empty())
                    .then(|| inb.stash.remove(&id))
                    .flatten()
                {
                    inb.settle(id);
                    bump(&self.shared.counters.received);
                    if f.header().flags() & FLAG_ERROR != 0 {
                        let text = error_text(&f);
                        f.discard();
                        return Err(CallError::Remote(text));
                    }
                    return Ok(Reply::Owned(f));
                }
                if let Some((link, frame)) = inb.move_out_of_rings(&self.shared, Some(id)) {
                    inb.settle(id);
                    bump(&self.shared.counters.received);
                    return Ok(Reply::InPlace { link, frame });
                }
                if !inb.stash.is_empty() && inb.stash.contains_key(&id) {
                    continue;
                }
            }
            if target_gone {
                // The target closed and one more pass found no reply: it never will.
                self.forget_request(id);
                let reason = target.wait_down(Duration::from_millis(100));
                return Err(CallError::TargetDown(reason));
            }
            if !target.is_alive() {
                target_gone = true;
                continue;
            }
            if !self.idle_for_reply(&mut idle, deadline, target.is_remote()) {
                self.forget_request(id);
                return Err(CallError::Timeout);
            }
        }
    }

    /// Waits a little for a reply: spins first, then parks until a ring gets a frame (or
    /// `deadline`, or 1 ms to re-check whether the target is still alive).
    /// Returns `false` once `deadline` has passed. The clock is read only every 64 rounds
    /// (a read costs as much as a turn of the loop), so a spinning caller sees its reply
    /// soon after it lands.
    ///
    /// A reply from another node (`remote`) takes a network round trip, a hundred µs or
    /// more, during which the network layer's threads need the cores: the caller then
    /// keeps polling, yielding its core at every clock check, for up to `REMOTE_SPIN`
    /// before it parks (if its strategy spins at all). Parking at once measured worse:
    /// waking a parked thread on an idle virtual CPU is what a round trip cannot afford.
    fn idle_for_reply(&self, idle: &mut IdleState, deadline: Instant, remote: bool) -> bool {
        idle.round = idle.round.wrapping_add(1);
        if idle.round % 64 != 1 {
            std::hint::spin_loop();
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let since = *idle.since.get_or_insert(now);
        if remote {
            if self.spins && now - since < REMOTE_SPIN {
                std::thread::yield_now();
                return true;
            }
        } else if now - since < self.strategy.spin_time() {
            std::hint::spin_loop();
            return true;
        }
        self.shared.wake.prepare_park();
        if self.inbound.borrow().rings_have_data(&self.shared) {
            self.shared.wake.cancel_park();
            return true;
        }
        let recheck = Instant::now() + Duration::from_millis(1);
        self.shared.wake.park(Some(deadline.min(recheck)));
        true
    }

    /// Tears the endpoint down: flushes what spilled frames it can, closes it, drains and
    /// counts what was never read, and removes it from the cluster.
    pub(crate) fn teardown(&self) {
        if self.torn_down.replace(true) {
            return;
        }
        // Spilled frames still go out if their targets read within a second.
        let give_up = Instant::now() + Duration::from_secs(1);
        self.flush_spills();
        while self.spilled_links.get() > 0 && Instant::now() < give_up {
            std::thread::sleep(Duration::from_micros(200));
            self.flush_spills();
        }
        {
            let mut out = self.outbound.borrow_mut();
            while !out.links.is_empty() {
                self.remove_link(&mut out, 0);
            }
        }
        let links = std::mem::take(&mut self.inbound.borrow_mut().links);
        self.shared.close_and_drain(links);
        let mut inb = self.inbound.borrow_mut();
        inb.events.clear();
        inb.pending.clear();
        inb.call_slot = 0;
        let stashed: Vec<OwnedFrame> = inb.stash.drain().map(|(_, f)| f).collect();
        drop(inb);
        self.defer_discard(stashed);
        self.run_deferred();
        self.cluster.forget_endpoint(self.shared.id);
    }

    /// Per-link occupancy of the outbound rings: (target id, cells used, capacity).
    pub(crate) fn outbound_occupancy(&self) -> Vec<(u32, usize, usize)> {
        self.outbound
            .borrow()
            .links
            .iter()
            .map(|l| (l.target.id, l.occupancy(), l.capacity()))
            .collect()
    }
}

impl Drop for LocalEndpoint {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Where a receiver is in its wait.
#[derive(Default)]
pub(crate) struct IdleState {
    round: u32,
    since: Option<Instant>,
}

thread_local! {
    /// This thread's endpoint in each cluster it has used.
    static LOCAL: RefCell<Vec<Rc<LocalEndpoint>>> = const { RefCell::new(Vec::new()) };
}

/// Installs `ep` as this thread's endpoint in its cluster.
pub(crate) fn install_local(ep: Rc<LocalEndpoint>) {
    LOCAL.with(|l| l.borrow_mut().push(ep));
}

/// Removes this thread's endpoint in cluster `cluster_id`.
pub(crate) fn uninstall_local(cluster_id: u64) -> Option<Rc<LocalEndpoint>> {
    LOCAL
        .try_with(|l| {
            let mut v = l.borrow_mut();
            let i = v.iter().position(|e| e.cluster.id == cluster_id)?;
            Some(v.swap_remove(i))
        })
        .ok()
        .flatten()
}

/// This thread's endpoint in cluster `cluster_id`, created on first use with `make`.
/// `None` if the cluster is gone or the thread is exiting.
#[inline]
pub(crate) fn local_endpoint(
    cluster_id: u64,
    make: impl FnOnce() -> Option<Rc<LocalEndpoint>>,
) -> Option<Rc<LocalEndpoint>> {
    let found = LOCAL
        .try_with(|l| {
            l.borrow()
                .iter()
                .find(|e| e.cluster.id == cluster_id)
                .cloned()
        })
        .ok()?;
    if found.is_some() {
        return found;
    }
    let ep = make()?;
    LOCAL.try_with(|l| l.borrow_mut().push(ep.clone())).ok()?;
    Some(ep)
}

/// The text of an error reply (an archived `String`), or a placeholder if it is not one.
fn error_text(frame: &OwnedFrame) -> String {
    let h = frame.header();
    let bytes = frame.payload();
    if h.kind() == FrameKind::Copy && h.tag() == crate::frame::type_tag::<String>() {
        // SAFETY: in-process frames with the tag of `String` were serialised by rkyv from
        // a `String` (`reply_error`), 16-aligned, ending where the archive ends.
        let s = unsafe { rkyv::api::access_unchecked::<rkyv::Archived<String>>(bytes) };
        s.as_str().to_owned()
    } else {
        "remote error (no text)".to_owned()
    }
}
