//! Receive loops: [`Inbox`] (shared by isolates and other threads), [`Context`] (an
//! isolate's view of itself) and [`Mailbox`] (another thread's).

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::ops::Deref;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::cluster::{ClusterInner, Stats};
use crate::endpoint::{
    Control, Fast, IdleState, LocalEndpoint, Mode, Polled, Reply, Route, Target,
};
use crate::error::{CallError, LookupError, SendError, SpawnError};
use crate::frame::FrameHeader;
use crate::isolate::IsolateRef;
use crate::message::{Event, Message, Replier};
use crate::path::{Properties, PropertyValue};
use crate::supervise::{Notice, Restart, Supervision};
use crate::Payload;

type Filter = Box<dyn Fn(&IsolateRef) -> bool>;

/// A spinning receive loop with nothing to read runs one full turn (every kind of frame,
/// events, stopping) per this many turns; the others only look at the rings through the
/// fast poll, then wait as usual (a pause, and now and then a look at the clock). The
/// shorter turn sees a message sooner: the copy round trip, timed with the TSC in one
/// process, went from 342–347 to 275–289 ticks (mean of the fastest 90%) against a full
/// turn every time.
const FULL_TURN_EVERY: u32 = 8;

/// The id of a request sent with [`Inbox::request`]: it names the request within the
/// endpoint that sent it, and only that endpoint can wait for it or cancel it (another
/// endpoint's `wait_reply` gets [`CallError::UnknownRequest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId {
    /// The endpoint that sent the request.
    endpoint: u32,
    /// The request's correlation id within that endpoint.
    id: u64,
}

impl RequestId {
    pub(crate) fn new(ep: &LocalEndpoint, id: u64) -> Self {
        Self {
            endpoint: ep.shared.id,
            id,
        }
    }
}

/// The receiving side of an endpoint: messages and cluster events, one at a time, in one
/// loop. Reached through a [`Context`] (isolates) or a [`Mailbox`] (other threads).
///
/// Receiving is fair across senders (round-robin, at most 32 messages from one sender
/// before the next gets a turn); per sender, order is FIFO.
pub struct Inbox {
    ep: Rc<LocalEndpoint>,
    filters: RefCell<Vec<Filter>>,
    up: RefCell<HashSet<u32>>,
    monitored: RefCell<HashSet<u32>>,
    stopping: Cell<bool>,
    finished: Cell<bool>,
}

impl Inbox {
    pub(crate) fn new(ep: Rc<LocalEndpoint>) -> Self {
        ep.inbox_open.set(true);
        Self {
            ep,
            filters: RefCell::new(Vec::new()),
            up: RefCell::new(HashSet::new()),
            monitored: RefCell::new(HashSet::new()),
            stopping: Cell::new(false),
            finished: Cell::new(false),
        }
    }

    /// This endpoint's own reference (the `sender` of what it sends).
    pub fn me(&self) -> &IsolateRef {
        &self.ep.me
    }

    /// Waits for the next event. `None` once the endpoint has stopped (after
    /// `shutdown_isolate` and draining everything that was sent before).
    #[inline]
    pub fn recv(&self) -> Option<Event<'_>> {
        self.next(None, true)
    }

    /// Waits at most `timeout` for the next event. `None` on timeout or once stopped
    /// ([`is_finished`](Self::is_finished) tells which).
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event<'_>> {
        self.next(Some(crate::deadline_after(timeout)), true)
    }

    /// The next event if one is waiting.
    #[inline]
    pub fn try_recv(&self) -> Option<Event<'_>> {
        self.next(None, false)
    }

    /// Reads up to `max` messages waiting in one sender's ring, in place and in order,
    /// handing each to `f` (by reference: take a transfer with `m.take()`; the message
    /// is released when `f` returns), and frees their ring space with one index update for the
    /// whole batch instead of one per message: the consumer side of
    /// [`send_batch`](Self::send_batch), for streams of small messages. Never waits;
    /// returns how many messages `f` got (0 when nothing was waiting in a ring, or the
    /// sender's ring starts with a reply). Events, replies to this endpoint's requests
    /// and messages set aside while it was blocked sending are left to
    /// [`recv`](Self::recv) / [`try_recv`](Self::try_recv), which must still be called
    /// for them. Each call reads from the next sender with messages waiting.
    ///
    /// While `f` runs, the batch's sender's ring is held: a `call` from inside `f` to
    /// that same sender cannot see its reply (it queues behind the batch) and times
    /// out. Collect what to ask for and call after the batch.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use isolate_cluster::Cluster;
    /// let cluster = Cluster::single_node();
    /// let mailbox = cluster.mailbox().unwrap();
    /// let me = mailbox.me().clone();
    /// mailbox.send_batch(&me, &[1u64, 2, 3]).unwrap();
    /// let mut sum = 0;
    /// let n = mailbox.try_recv_batch(64, |m| sum += m.get::<u64>().unwrap().to_native());
    /// assert_eq!((n, sum), (3, 6));
    /// # drop(mailbox);
    /// # cluster.shutdown();
    /// # cluster.join(Duration::from_secs(5)).unwrap();
    /// ```
    pub fn try_recv_batch(&self, max: usize, mut f: impl FnMut(&mut Message<'_>)) -> usize {
        if self.finished.get() || max == 0 {
            return 0;
        }
        let Some((link, runs, pack_next)) = self.ep.claim_batch() else {
            return 0;
        };
        // Releases the link however this ends (`f` may panic): what was handed out is
        // consumed (a transfer nobody took is dropped), the rest stays for later.
        struct Claim<'e> {
            ep: &'e LocalEndpoint,
            link: usize,
            cells: usize,
            messages: u64,
            /// Entries handed out of the pack frame after `cells`.
            pack_next: u32,
            current: Option<Message<'e>>,
        }
        impl Drop for Claim<'_> {
            fn drop(&mut self) {
                drop(self.current.take());
                self.ep
                    .finish_batch(self.link, self.cells, self.messages, self.pack_next);
            }
        }
        let mut claim = Claim {
            ep: &self.ep,
            link,
            cells: 0,
            messages: 0,
            // The head of the ring may be a pack frame read in part.
            pack_next,
            current: None,
        };
        'runs: for (start, len) in runs {
            let mut pos = 0;
            while pos < len {
                if claim.messages as usize >= max {
                    break 'runs;
                }
                // SAFETY: `start..start + len` are initialised cells of a ring this
                // endpoint consumes, not yet committed, and the link is claimed (held), so
                // nothing else commits them before `claim` drops; `pos < len`.
                let first = unsafe { &*start.add(pos) };
                let Some(header) = FrameHeader::read_from(first) else {
                    unreachable!("in-process frames have valid headers")
                };
                if header.kind() == crate::frame::FrameKind::Skip {
                    pos += header.len() as usize;
                    claim.cells += header.len() as usize;
                    continue;
                }
                if header.flags() & crate::frame::FLAG_REPLY != 0 {
                    // Replies are routed to their request by `recv`/`wait_reply`.
                    break 'runs;
                }
                let cells = header.frame_cells();
                if header.kind() == crate::frame::FrameKind::Pack {
                    // Copies, each read in place: nothing to drop. A pack cut short by
                    // `max` (or a panic in `f`) goes on at the next read.
                    let count = header.pack().1;
                    while claim.pack_next < count {
                        if claim.messages as usize >= max {
                            break 'runs;
                        }
                        let m = Message::in_pack(&self.ep, link, first, claim.pack_next);
                        claim.pack_next += 1;
                        claim.messages += 1;
                        f(&mut std::mem::ManuallyDrop::new(m));
                    }
                    claim.pack_next = 0;
                    pos += cells;
                    claim.cells += cells;
                    continue;
                }
                pos += cells;
                claim.cells += cells;
                claim.messages += 1;
                let m = Message::in_batch(&self.ep, first, cells);
                if header.kind() == crate::frame::FrameKind::Transfer {
                    // Owns a value until taken: kept where the claim drops it even if `f`
                    // panics.
                    f(claim.current.insert(m));
                    drop(claim.current.take());
                } else {
                    // A copy read in place owns nothing: no drop to run (the batch frees
                    // its ring space at the end).
                    f(&mut std::mem::ManuallyDrop::new(m));
                }
            }
        }
        claim.messages as usize
    }

    /// Whether the endpoint has stopped: `recv` returns `None` from now on.
    pub fn is_finished(&self) -> bool {
        self.finished.get()
    }

    /// The next event, waiting per the wait strategy if `wait` (until `deadline`).
    ///
    /// The common case (a one-cell message at the head of the link being read) is taken
    /// here, inlined into the caller, on every turn of the wait; everything else is
    /// `next_turn`'s, out of line. The message is built from two words, never copied
    /// through memory on its way to the caller.
    #[inline(always)]
    fn next(&self, deadline: Option<Instant>, wait: bool) -> Option<Event<'_>> {
        self.next_with(deadline, wait, |_| {})
    }

    /// [`next`](Self::next), calling `seen` on every event that did not take the common
    /// case (a message the fast path read never goes through it), before returning it.
    #[inline(always)]
    pub(crate) fn next_with(
        &self,
        deadline: Option<Instant>,
        wait: bool,
        seen: impl Fn(&Event<'_>),
    ) -> Option<Event<'_>> {
        let mut idle = IdleState::default();
        let mut quiet = 0u32;
        loop {
            if !self.finished.get() {
                match self.ep.poll_fast() {
                    Fast::Plain(link, frame) => {
                        return Some(Event::Message(Message::in_ring(&self.ep, link, frame)));
                    }
                    Fast::Idle if wait && self.ep.spins() && !self.stopping.get() => {
                        // Nothing anywhere: spin on the fast poll alone, which keeps the
                        // turn short (a message is seen sooner), with a full turn now and
                        // then. Each turn still waits through `idle`, so the clock, the
                        // deadline and the move from spinning to parking keep the pace
                        // of the loop's turns.
                        quiet = quiet.wrapping_add(1);
                        if quiet % FULL_TURN_EVERY != 0 {
                            if !self.ep.idle(&mut idle, deadline) {
                                return None;
                            }
                            continue;
                        }
                    }
                    _ => {}
                }
            }
            if let Some(ev) = self.next_turn(deadline, wait, &mut idle) {
                if let Some(e) = &ev {
                    seen(e);
                }
                return ev;
            }
        }
    }

    /// One turn of `next` past its common case: every kind of frame, events, stopping,
    /// then one round of waiting. `Some(answer)` ends `next`; `None` means poll again.
    #[inline(never)]
    fn next_turn(
        &self,
        deadline: Option<Instant>,
        wait: bool,
        idle: &mut IdleState,
    ) -> Option<Option<Event<'_>>> {
        if self.finished.get() {
            return Some(None);
        }
        match self.ep.poll() {
            Some(Polled::Ring { link, frame }) => {
                return Some(Some(Event::Message(Message::in_ring(
                    &self.ep, link, frame,
                ))));
            }
            Some(Polled::Pack { link, frame, entry }) => {
                return Some(Some(Event::Message(Message::in_pack(
                    &self.ep,
                    link,
                    frame.frame,
                    entry,
                ))));
            }
            Some(Polled::Owned { frame }) => {
                return Some(Some(Event::Message(Message::owned(&self.ep, frame.cells))))
            }
            Some(Polled::Event(c)) => {
                // An event the filters drop: poll again at once.
                return self.filter_event(c).map(Some);
            }
            None => {}
        }
        if self.stopping.get() {
            // Everything sent before now was read. Close: what a sender still manages
            // to publish is drained and counted as undelivered at teardown, never
            // delivered, so a sender told `Disconnected` can trust it.
            self.ep.shared.wake.close();
            self.finished.set(true);
            return Some(None);
        }
        if !wait || !self.ep.idle(idle, deadline) {
            return Some(None);
        }
        None
    }

    fn filter_event(&self, c: Control) -> Option<Event<'_>> {
        match c {
            Control::Up(r) => {
                if r.id() == self.ep.me.id() || self.up.borrow().contains(&r.id()) {
                    return None;
                }
                if !self.filters.borrow().iter().any(|f| f(&r)) {
                    return None;
                }
                self.up.borrow_mut().insert(r.id());
                Some(Event::IsolateUp(r))
            }
            Control::Down(r, why) => {
                // Watched and monitored alike: one `IsolateDown` per isolate.
                let watched = self.up.borrow_mut().remove(&r.id());
                let monitored = self.monitored.borrow_mut().remove(&r.id());
                (watched || monitored).then_some(Event::IsolateDown(r, why))
            }
            Control::Shutdown => Some(Event::ShutdownRequested),
            Control::Supervision(notice, from_node) => {
                let child = match &notice {
                    Notice::Failed(r, _) | Notice::Restarted(r) => Some(r),
                    Notice::GaveUp(_) => None,
                };
                if from_node {
                    if let Some(r) = child {
                        if !self.filters.borrow().iter().any(|f| f(r)) {
                            return None;
                        }
                    }
                }
                Some(match notice {
                    Notice::Failed(r, why) => Event::ChildFailed(r, why),
                    Notice::Restarted(r) => Event::ChildRestarted(r),
                    Notice::GaveUp(why) => Event::SupervisionGaveUp(why),
                })
            }
            Control::Node(n) => Some(match n {
                crate::cluster::NodeNotice::Up(n) => Event::NodeUp(n),
                crate::cluster::NodeNotice::Down(n) => Event::NodeDown(n),
                crate::cluster::NodeNotice::Rejected { node, reason } => {
                    Event::Rejected { node, reason }
                }
            }),
            Control::NewLink(..) => None,
        }
    }

    /// Watches the other nodes of the network: an [`Event::NodeUp`] for every live one
    /// now and every later one, [`Event::NodeDown`] when one leaves or is lost, and
    /// [`Event::Rejected`] when bytes from one are dropped. (Their isolates are watched
    /// with [`watch_isolates`](Self::watch_isolates), like this node's.)
    pub fn watch_nodes(&self) {
        self.ep.cluster.watch_nodes(&self.ep.me);
    }

    /// Monitors `target`: exactly one [`Event::IsolateDown`] when it stops (at once if it
    /// already has), whatever else watches it and however often this is called. Works
    /// on any reference, from any isolate or mailbox; a restarted isolate is a new
    /// incarnation, so monitor the reference the restart announces to follow it.
    pub fn monitor(&self, target: &IsolateRef) {
        if self.monitored.borrow_mut().insert(target.id()) {
            self.ep.cluster.monitor(&self.ep.me, target);
        }
    }

    /// Watches isolates that match `filter`: an [`Event::IsolateUp`] for every live one
    /// now (none can be missed) and every later one, then one [`Event::IsolateDown`] when
    /// it stops. Several filters may be added; an isolate matching any is watched once.
    ///
    /// The seed's `onIsolateUp.where((ref) => ref.property('type') == 'receiver')` is
    /// `watch_isolates(|r| r.property("type").is_some_and(|v| v == "receiver"))`.
    pub fn watch_isolates(&self, filter: impl Fn(&IsolateRef) -> bool + 'static) {
        self.filters.borrow_mut().push(Box::new(filter));
        self.ep.cluster.watch(&self.ep.me);
    }

    /// Sends a copy of `value` to every live isolate that `filter` accepts, except this
    /// endpoint itself, in spawn order; waits while a ring is full, as [`send`](Self::send).
    /// Isolates that stop meanwhile are reported in [`Broadcast::failed`](crate::Broadcast::failed), never skipped
    /// silently. To address isolates by properties, filter with
    /// [`Properties::matches`](crate::Properties::matches):
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use isolate_cluster::{Cluster, Event, Properties};
    /// let cluster = Cluster::single_node();
    /// for (path, role) in [("/a", "web"), ("/b", "db"), ("/c", "web")] {
    ///     cluster.spawn(path, Properties::new().with("role", role), |ctx| {
    ///         while let Some(Event::Message(m)) = ctx.recv() {
    ///             let _ = m.reply(&format!("{} got {}", ctx.path(), m.get::<String>().unwrap()));
    ///         }
    ///     }).unwrap();
    /// }
    /// let mailbox = cluster.mailbox().unwrap();
    /// let web = Properties::new().with("role", "web");
    /// let sent = mailbox.broadcast(&"hello".to_string(), |r| r.properties().matches(&web));
    /// assert_eq!((sent.sent, sent.failed.len()), (2, 0));
    /// # for _ in 0..2 { assert!(matches!(mailbox.recv_timeout(Duration::from_secs(5)), Some(Event::Message(_)))); }
    /// # cluster.shutdown();
    /// # cluster.join(Duration::from_secs(5)).unwrap();
    /// ```
    pub fn broadcast<T: Payload>(
        &self,
        value: &T,
        filter: impl Fn(&IsolateRef) -> bool,
    ) -> crate::Broadcast {
        let me = self.ep.me.id();
        self.ep
            .cluster
            .broadcast(|r| r.id() != me && filter(r), |r| self.send(r, value))
    }

    /// Sends a copy of `value` to `target` from this endpoint (the fast path: no
    /// thread-local lookup). Waits while the ring is full.
    #[inline]
    pub fn send<T: Payload>(&self, target: &IsolateRef, value: &T) -> Result<(), SendError> {
        self.ep.send_copy(
            Target::Ref(target),
            value,
            Route::plain(self.ep.shared.id),
            Mode::Block,
        )
    }

    /// Like [`send`](Self::send), but [`SendError::Full`] instead of waiting.
    #[inline]
    pub fn try_send<T: Payload>(&self, target: &IsolateRef, value: &T) -> Result<(), SendError> {
        self.ep.send_copy(
            Target::Ref(target),
            value,
            Route::plain(self.ep.shared.id),
            Mode::Try,
        )
    }

    /// Sends copies of every value in `values`, in order, writing as many frames as fit
    /// into the ring before publishing them with one index update (and one wake-up
    /// check). Waits while the ring is full, like [`send`](Self::send).
    ///
    /// Small values (archives of at most 64 bytes) that serialise to the same length are
    /// packed behind one frame header, each in its length rounded up to 16 bytes: a run
    /// of `u64`s costs 16 bytes of ring apiece instead of a 64-byte cell. The receiver
    /// still gets one message per value, however it reads them.
    pub fn send_batch<T: Payload>(
        &self,
        target: &IsolateRef,
        values: &[T],
    ) -> Result<(), SendError> {
        self.ep
            .send_batch(Target::Ref(target), values, Mode::Block)
            .map(|_| ())
    }

    /// Like [`send_batch`](Self::send_batch), but stops when the ring is full: returns how
    /// many of `values` (a prefix) were sent.
    pub fn try_send_batch<T: Payload>(
        &self,
        target: &IsolateRef,
        values: &[T],
    ) -> Result<usize, SendError> {
        self.ep.send_batch(Target::Ref(target), values, Mode::Try)
    }

    /// Sends raw bytes with an application-chosen tag (for payloads shared with C or
    /// other languages; read them with [`Message::bytes`]). Waits while the ring is full.
    pub fn send_bytes(
        &self,
        target: &IsolateRef,
        tag: crate::TypeTag,
        bytes: &[u8],
    ) -> Result<(), SendError> {
        self.send_raw(target, tag, bytes, Mode::Block)
    }

    fn send_raw(
        &self,
        target: &IsolateRef,
        tag: crate::TypeTag,
        bytes: &[u8],
        mode: Mode,
    ) -> Result<(), SendError> {
        let route = Route {
            flags: crate::frame::FLAG_RAW,
            ..Route::plain(self.ep.shared.id)
        };
        self.ep
            .send_bytes(Target::Ref(target), tag, bytes, route, mode)
    }

    /// [`send_bytes`](Self::send_bytes) that returns [`SendError::Full`] instead of waiting.
    pub fn try_send_bytes(
        &self,
        target: &IsolateRef,
        tag: crate::TypeTag,
        bytes: &[u8],
    ) -> Result<(), SendError> {
        self.send_raw(target, tag, bytes, Mode::Try)
    }

    /// [`request`](Self::request) with raw bytes and an application tag (as
    /// [`send_bytes`](Self::send_bytes)): the form foreign callers use.
    pub fn request_bytes(
        &self,
        target: &IsolateRef,
        tag: crate::TypeTag,
        bytes: &[u8],
    ) -> Result<RequestId, SendError> {
        self.ep
            .request_bytes(target, tag, bytes, true, Mode::Block)
            .map(|id| RequestId::new(&self.ep, id))
    }

    /// Moves `value` to `target`; only the pointer travels.
    pub fn transfer<T: Send + 'static>(
        &self,
        target: &IsolateRef,
        value: Box<T>,
    ) -> Result<(), SendError<Box<T>>> {
        self.ep.send_transfer(
            Target::Ref(target),
            value,
            Route::plain(self.ep.shared.id),
            Mode::Block,
        )
    }

    /// Like [`transfer`](Self::transfer), but [`SendError::Full`] instead of waiting.
    pub fn try_transfer<T: Send + 'static>(
        &self,
        target: &IsolateRef,
        value: Box<T>,
    ) -> Result<(), SendError<Box<T>>> {
        self.ep.send_transfer(
            Target::Ref(target),
            value,
            Route::plain(self.ep.shared.id),
            Mode::Try,
        )
    }

    /// Sends `request` to `target` and waits up to `timeout` for its reply, which it
    /// returns as a message (read it with `get`/`take`). The timeout bounds the whole
    /// call: a request that finds the target's ring full waits for room only until then,
    /// and fails with [`CallError::Timeout`] unsent. The target answers with
    /// [`Message::reply`] (or `reply_transfer`, `reply_bytes`), or fails the request with
    /// [`Message::reply_error`].
    ///
    /// While it waits, messages and events from others keep their order and are handed
    /// out by the next `recv`. The reply is read in place in its ring; only a reply that
    /// came while another request was being waited for is copied out once. A message from
    /// `target` that this endpoint still holds blocks that ring: drop it before calling
    /// `target`.
    ///
    /// The caller waits as its wait strategy says, except for a target on another node
    /// (feature `zenoh`): with a spinning strategy it then keeps polling, yielding its core
    /// at each clock check, for up to 1 ms before it parks, since a network round trip is
    /// far longer than the usual spin and a parked caller adds a wake-up to it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use isolate_cluster::{CallError, Cluster, Event, Properties};
    ///
    /// let cluster = Cluster::single_node();
    /// let square = cluster
    ///     .spawn("/square", Properties::new(), |ctx| {
    ///         while let Some(Event::Message(m)) = ctx.recv() {
    ///             match m.get::<u32>().map(|v| v.to_native()) {
    ///                 Ok(v) if v < 65536 => m.reply(&(v * v)).unwrap(),
    ///                 Ok(_) => m.reply_error("too large").unwrap(),
    ///                 Err(e) => m.reply_error(&e.to_string()).unwrap(),
    ///             }
    ///         }
    ///     })
    ///     .unwrap();
    /// let mailbox = cluster.mailbox().unwrap();
    /// let reply = mailbox.call(&square, &12u32, Duration::from_secs(5)).unwrap();
    /// assert_eq!(*reply.get::<u32>().unwrap(), 144);
    /// drop(reply);
    /// let err = mailbox.call(&square, &70000u32, Duration::from_secs(5)).unwrap_err();
    /// assert_eq!(err, CallError::Remote("too large".into()));
    /// ```
    pub fn call<T: Payload>(
        &self,
        target: &IsolateRef,
        request: &T,
        timeout: Duration,
    ) -> Result<Message<'_>, CallError> {
        Ok(self.message(call_copy(&self.ep, target, request, timeout)?))
    }

    /// [`call`](Self::call) with raw bytes and an application tag (as
    /// [`request_bytes`](Self::request_bytes)).
    pub fn call_bytes(
        &self,
        target: &IsolateRef,
        tag: crate::TypeTag,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<Message<'_>, CallError> {
        let sent = self
            .ep
            .request_bytes(target, tag, bytes, false, Mode::Within(timeout));
        let deadline = crate::deadline_from(self.ep.call_started(), timeout);
        Ok(self.message(await_reply(&self.ep, target, sent, deadline)?))
    }

    /// Sends `request` to `target` without waiting: many requests can be outstanding at
    /// once, and their replies can come in any order. Collect each with
    /// [`wait_reply`](Self::wait_reply), or give it up with [`cancel`](Self::cancel):
    /// until then the endpoint remembers the request (and keeps its reply, if one came),
    /// for as long as the endpoint lives. Waits while the target's ring is full, as
    /// [`send`](Self::send) does.
    pub fn request<T: Payload>(
        &self,
        target: &IsolateRef,
        request: &T,
    ) -> Result<RequestId, SendError> {
        self.ep
            .request(target, request, true, Mode::Block)
            .map(|id| RequestId::new(&self.ep, id))
    }

    /// Waits up to `timeout` for the reply to `id`. On [`CallError::Timeout`] the request
    /// is forgotten; a late reply is dropped and counted, never delivered elsewhere.
    /// [`CallError::UnknownRequest`] if `id` is not waiting here: already answered, timed
    /// out, cancelled, made by a `call`, or sent by another endpoint.
    pub fn wait_reply(&self, id: RequestId, timeout: Duration) -> Result<Message<'_>, CallError> {
        if id.endpoint != self.ep.shared.id {
            return Err(CallError::UnknownRequest);
        }
        let deadline = crate::deadline_after(timeout);
        Ok(self.message(self.ep.wait_reply(id.id, deadline)?))
    }

    /// Moves `request` to `target` as a request, waiting for room in a full ring for at
    /// most `timeout` (then [`CallError::Timeout`]): the first half of a call made in two
    /// steps (the worker pool, the task scheduler). Returns its id and the call's
    /// deadline, `timeout` after the call began.
    pub(crate) fn request_transfer_within<T: Send + 'static>(
        &self,
        target: &IsolateRef,
        value: Box<T>,
        timeout: Duration,
    ) -> Result<(RequestId, Instant), CallError> {
        let sent = self
            .ep
            .request_transfer(target, value, Mode::Within(timeout));
        let deadline = crate::deadline_from(self.ep.call_started(), timeout);
        sent.map(|id| (RequestId::new(&self.ep, id), deadline))
            .map_err(|e| request_error(target, e.without_value()))
    }

    /// The message of a reply.
    fn message(&self, reply: Reply) -> Message<'_> {
        Message::of_reply(&self.ep, reply)
    }

    /// Answers a message through its [`Replier`] (taken with [`Message::replier`]).
    pub fn reply<T: Payload>(&self, to: &Replier, value: &T) -> Result<(), SendError> {
        if to.reply_to == 0 {
            return Err(SendError::UnknownTarget(()));
        }
        let route = to.route(self.ep.shared.id, 0);
        self.ep
            .send_copy(Target::Id(to.reply_to), value, route, Mode::Block)
    }

    /// Fails a request through its [`Replier`]: the caller gets [`CallError::Remote`].
    pub fn reply_error(&self, to: &Replier, error: &str) -> Result<(), SendError> {
        if to.reply_to == 0 {
            return Err(SendError::UnknownTarget(()));
        }
        let route = to.route(self.ep.shared.id, crate::frame::FLAG_ERROR);
        self.ep.send_copy(
            Target::Id(to.reply_to),
            &error.to_owned(),
            route,
            Mode::Block,
        )
    }

    /// Gives up request `id`: its reply, if it comes, is dropped and counted. (An id of
    /// another endpoint is ignored.)
    pub fn cancel(&self, id: RequestId) {
        if id.endpoint == self.ep.shared.id {
            self.ep.forget_request(id.id);
        }
    }

    /// Looks up a live isolate by path.
    pub fn lookup(&self, path: &str) -> Result<IsolateRef, LookupError> {
        self.ep.cluster.lookup(path)
    }

    /// Asks every isolate of the node to shut down.
    pub fn shutdown_node(&self) {
        self.ep.cluster.request_shutdown();
    }

    /// Occupancy of this endpoint's outgoing rings: `(target, bytes used, capacity)`.
    pub fn link_occupancy(&self) -> Vec<(u32, usize, usize)> {
        self.ep
            .outbound_occupancy()
            .into_iter()
            .map(|(id, used, cap)| {
                (
                    id,
                    used * crate::frame::CELL_BYTES,
                    cap * crate::frame::CELL_BYTES,
                )
            })
            .collect()
    }

    /// Counters of every endpoint of the cluster.
    pub fn cluster_stats(&self) -> Stats {
        self.ep.cluster.stats()
    }

    /// Stops receiving: what was sent before is still delivered, then `recv` returns
    /// `None`; later sends to this endpoint fail with `Disconnected`.
    pub(crate) fn stop(&self) {
        self.stopping.set(true);
    }

    pub(crate) fn cluster(&self) -> &std::sync::Arc<ClusterInner> {
        &self.ep.cluster
    }

    pub(crate) fn ep(&self) -> &LocalEndpoint {
        &self.ep
    }
}

/// A call of `target` from `ep` with a copy of `request`, sending and waiting for at
/// most `timeout` in all: what [`Inbox::call`] and [`IsolateRef::call`] share.
#[inline]
pub(crate) fn call_copy<T: Payload>(
    ep: &LocalEndpoint,
    target: &IsolateRef,
    request: &T,
    timeout: Duration,
) -> Result<Reply, CallError> {
    let sent = ep.request(target, request, false, Mode::Within(timeout));
    let deadline = crate::deadline_from(ep.call_started(), timeout);
    await_reply(ep, target, sent, deadline)
}

/// The second half of a call: its reply, or why there is none. A target known to be
/// down when the request could not be sent is `TargetDown` with its reason, as a call
/// that was already waiting would report. A request still not in the target's ring at
/// the deadline (the target stopped reading) is a `Timeout` like a late reply.
#[inline]
fn await_reply(
    ep: &LocalEndpoint,
    target: &IsolateRef,
    sent: Result<u64, SendError>,
    deadline: Instant,
) -> Result<Reply, CallError> {
    match sent {
        Ok(id) => ep.wait_reply_for(id, target, deadline),
        Err(e) => Err(request_error(target, e)),
    }
}

/// Why a request could not be sent, as a call reports it: a target known to be down is
/// `TargetDown` with its reason; a ring still full at the call's deadline is `Timeout`.
fn request_error(target: &IsolateRef, e: SendError) -> CallError {
    match e {
        SendError::Disconnected(()) => match target.wait_down(Duration::ZERO) {
            Some(why) => CallError::TargetDown(Some(why)),
            None => CallError::Send(SendError::Disconnected(())),
        },
        SendError::Full(()) => CallError::Timeout,
        e => CallError::Send(e),
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.ep.inbox_open.set(false);
    }
}

type ShutdownHandler = Box<dyn FnMut(&Context)>;

/// An isolate's view of itself, handed to its entry function: receive loop, sends,
/// spawn, lookup, events, shutdown. Derefs to [`Inbox`].
///
/// ```no_run
/// # use isolate_cluster::*;
/// fn receiver(ctx: &Context) {
///     while let Some(event) = ctx.recv() {
///         if let Event::Message(msg) = event {
///             if let Ok(text) = msg.get::<String>() {
///                 let _ = msg.reply(&format!("re: {text}"));
///             }
///         }
///     }
/// }
/// ```
pub struct Context {
    inbox: Inbox,
    on_shutdown: RefCell<Option<ShutdownHandler>>,
}

impl Deref for Context {
    type Target = Inbox;
    fn deref(&self) -> &Inbox {
        &self.inbox
    }
}

impl Context {
    pub(crate) fn new(inbox: Inbox) -> Self {
        Self {
            inbox,
            on_shutdown: RefCell::new(None),
        }
    }

    /// The isolate's path.
    pub fn path(&self) -> &str {
        self.inbox.me().path()
    }

    /// The isolate's properties.
    pub fn properties(&self) -> &Properties {
        self.inbox.me().properties()
    }

    /// One property.
    pub fn property(&self, key: &str) -> Option<&PropertyValue> {
        self.inbox.me().property(key)
    }

    /// A reference to this isolate.
    pub fn self_ref(&self) -> IsolateRef {
        self.inbox.me().clone()
    }

    /// Waits for the next event, running the shutdown-request handler when the node asks
    /// this isolate to stop (see [`on_shutdown_request`](Self::on_shutdown_request)).
    #[inline]
    pub fn recv(&self) -> Option<Event<'_>> {
        self.inbox.next_with(None, true, |ev| self.after(ev))
    }

    /// Like [`recv`](Self::recv) with a timeout.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event<'_>> {
        let deadline = crate::deadline_after(timeout);
        self.inbox
            .next_with(Some(deadline), true, |ev| self.after(ev))
    }

    /// Like [`recv`](Self::recv) without waiting.
    #[inline]
    pub fn try_recv(&self) -> Option<Event<'_>> {
        self.inbox.next_with(None, false, |ev| self.after(ev))
    }

    /// Runs the shutdown-request handler if `ev` is the request. Only events the receive
    /// path's common case did not read come here (that case reads messages only), so a
    /// message is never copied through it.
    #[inline(always)]
    fn after(&self, ev: &Event<'_>) {
        if let Event::ShutdownRequested = ev {
            self.run_shutdown_handler();
        }
    }

    #[cold]
    fn run_shutdown_handler(&self) {
        let handler = self.on_shutdown.borrow_mut().take();
        match handler {
            Some(mut h) => {
                h(self);
                let mut slot = self.on_shutdown.borrow_mut();
                if slot.is_none() {
                    *slot = Some(h);
                }
            }
            None => self.shutdown_isolate(),
        }
    }

    /// Sets what happens when the node asks this isolate to shut down. The default stops
    /// the isolate (as [`shutdown_isolate`](Self::shutdown_isolate)); a handler may finish
    /// work first and call `shutdown_isolate` later. The event is still returned by `recv`.
    pub fn on_shutdown_request(&self, handler: impl FnMut(&Context) + 'static) {
        *self.on_shutdown.borrow_mut() = Some(Box::new(handler));
    }

    /// Stops this isolate: messages already sent to it are still delivered, then `recv`
    /// returns `None` and the entry function should return.
    pub fn shutdown_isolate(&self) {
        self.inbox.stop();
    }

    /// Spawns an isolate (see [`Cluster::spawn`](crate::Cluster::spawn)).
    pub fn spawn<F>(
        &self,
        path: &str,
        properties: Properties,
        entry: F,
    ) -> Result<IsolateRef, SpawnError>
    where
        F: FnOnce(&Context) + Send + 'static,
    {
        ClusterInner::spawn(self.inbox.cluster(), path, properties, entry)
    }

    /// Spawns a supervised child (see
    /// [`Cluster::spawn_supervised`](crate::Cluster::spawn_supervised)); this isolate is its
    /// supervisor when `path` lies directly below this isolate's path.
    pub fn spawn_supervised<F>(
        &self,
        path: &str,
        properties: Properties,
        restart: Restart,
        entry: F,
    ) -> Result<IsolateRef, SpawnError>
    where
        F: Fn(&Context) + Send + Sync + 'static,
    {
        ClusterInner::spawn_supervised(
            self.inbox.cluster(),
            path,
            properties,
            restart,
            std::sync::Arc::new(entry),
        )
    }

    /// Sets how this isolate supervises its children; it holds for later incarnations of
    /// this path too (set it before spawning children, as a restarted isolate re-runs its
    /// entry anyway).
    pub fn supervise_children(&self, supervision: Supervision) {
        let _ = self
            .inbox
            .cluster()
            .set_supervision(self.path(), supervision);
    }

    /// Runs `f` on a new short-lived isolate and returns its result, moved out without a
    /// copy (Dart's `Isolate.run`). Blocks this isolate until `f` is done.
    pub fn run<T, F>(&self, f: F) -> Result<Box<T>, crate::RunError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        crate::work::run(self.inbox.cluster(), f)
    }

    /// Ends this isolate now and hands `value` to whoever waits with
    /// [`IsolateRef::join_exit`]: the box moves, its contents are never copied (Dart's
    /// `Isolate.exit`). Unwinds the isolate's stack (destructors run).
    pub fn exit<T: Send + 'static>(&self, value: Box<T>) -> ! {
        let value: Box<dyn std::any::Any + Send> = value;
        std::panic::resume_unwind(Box::new(ExitSignal(value)))
    }
}

/// The unwind payload of [`Context::exit`].
pub(crate) struct ExitSignal(pub Box<dyn std::any::Any + Send>);

/// The receive side of a thread that is not an isolate (for example `main`): replies and
/// events sent to this thread's endpoint. Derefs to [`Inbox`]. One per thread per
/// cluster at a time; see [`Cluster::mailbox`](crate::Cluster::mailbox).
pub struct Mailbox {
    inbox: Inbox,
}

impl Mailbox {
    pub(crate) fn new(ep: Rc<LocalEndpoint>) -> Self {
        Self {
            inbox: Inbox::new(ep),
        }
    }
}

impl Deref for Mailbox {
    type Target = Inbox;
    fn deref(&self) -> &Inbox {
        &self.inbox
    }
}
