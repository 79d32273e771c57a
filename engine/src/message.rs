//! Received messages and events.

use std::fmt;
use std::ptr::NonNull;

use rkyv::{Archive, Portable};

use crate::endpoint::{LocalEndpoint, Mode, Route, Target};
use crate::error::{AccessError, SendError};
use crate::frame::{
    type_tag, Cell, FrameHeader, FrameKind, TransferPayload, TypeTag, CELL_BYTES, FLAG_CALL,
    FLAG_ERROR, FLAG_RAW, FLAG_REPLY, HEADER_BYTES,
};
use crate::isolate::{DownReason, IsolateRef};
use crate::link::RingFrame;
use crate::Payload;

/// What a broadcast did ([`Inbox::broadcast`](crate::Inbox::broadcast),
/// [`Cluster::broadcast`](crate::Cluster::broadcast)).
#[derive(Debug, Default)]
pub struct Broadcast {
    /// Isolates the message was delivered to (published into their rings).
    pub sent: usize,
    /// Isolates that matched but could not take it (most often: they stopped meanwhile).
    pub failed: Vec<(IsolateRef, crate::SendError)>,
}

/// What a receive loop gets.
pub enum Event<'a> {
    /// A message.
    Message(Message<'a>),
    /// A watched isolate is up (see [`Inbox::watch_isolates`](crate::Inbox::watch_isolates)).
    IsolateUp(IsolateRef),
    /// A watched isolate went down, and why. Everything it sent before is delivered first
    /// (unless a message of its is still held: drop messages before receiving again).
    IsolateDown(IsolateRef, DownReason),
    /// The node asks this isolate to shut down. It comes after every message that was
    /// already waiting in the isolate's rings when the request arrived.
    ShutdownRequested,
    /// A supervised child of this isolate failed (panicked, or its own supervision gave
    /// up), and why: the panic message is in the reason. The node's top-level children's
    /// failures go to watchers ([`Inbox::watch_isolates`](crate::Inbox::watch_isolates)).
    ChildFailed(IsolateRef, DownReason),
    /// A supervised child was restarted: its new incarnation.
    ChildRestarted(IsolateRef),
    /// This isolate's supervision gave up (its children exceeded the restart intensity):
    /// its children are being stopped and a shutdown request follows; it will go down as
    /// [`DownReason::Escalated`] with this text. For the node, sent to watchers.
    SupervisionGaveUp(String),
    /// Another node joined the network (see
    /// [`Inbox::watch_nodes`](crate::Inbox::watch_nodes)): its name.
    NodeUp(String),
    /// Another node left or was lost (its lease ran out): its name. Its isolates each go
    /// down too (for watchers and monitors of them).
    NodeDown(String),
    /// Bytes from another node were rejected (malformed, hostile, or of a type not
    /// registered here) and dropped. Counted in `NetStats::rejected`.
    Rejected {
        /// The node they came from (as named in the network key they arrived on).
        node: String,
        /// What was wrong.
        reason: String,
    },
}

impl fmt::Debug for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Message(m) => write!(f, "Message({m:?})"),
            Self::IsolateUp(r) => write!(f, "IsolateUp({r})"),
            Self::IsolateDown(r, why) => write!(f, "IsolateDown({r}, {why})"),
            Self::ShutdownRequested => f.write_str("ShutdownRequested"),
            Self::ChildFailed(r, why) => write!(f, "ChildFailed({r}, {why})"),
            Self::ChildRestarted(r) => write!(f, "ChildRestarted({r})"),
            Self::SupervisionGaveUp(why) => write!(f, "SupervisionGaveUp({why})"),
            Self::NodeUp(n) => write!(f, "NodeUp({n})"),
            Self::NodeDown(n) => write!(f, "NodeDown({n})"),
            Self::Rejected { node, reason } => write!(f, "Rejected({node}: {reason})"),
        }
    }
}

/// Where a message's frame lives, in the top bits of `Message::bits`.
const BODY_SHIFT: u32 = 60;
/// In place in a ring (`link` in bits 32..60); the frame is consumed when the message
/// drops.
const BODY_RING: u64 = 0;
/// A box of `cells` cells the message owns: the frame was moved out of its ring earlier
/// (the receiver was blocked sending).
const BODY_OWNED: u64 = 1;
/// In place in a ring read by a batch (`Inbox::try_recv_batch`), which consumes the whole
/// batch's cells at once after the last message.
const BODY_BATCH: u64 = 2;
/// An entry of a pack frame (see `frame.rs`) in place in ring `link`, `bits & 0xffff_ffff`
/// bytes into the pack's payload; the entry is consumed when the message drops (unless a
/// batch read hands it out, which consumes the whole batch at once).
const BODY_PACKED: u64 = 3;
/// The transferred value was taken.
const TAKEN: u64 = 1 << 63;
/// The ring link, in bits 32..60 (read it with `>> 32`).
const LINK_MASK: u64 = (1 << 28) - 1;

/// A received message, read in place from the ring (no copy, no deserialisation).
///
/// While a message is alive, its ring's head stays where it is: the sender can fill the
/// rest of the ring, and later messages of the same sender wait until this one is
/// dropped. Messages from other senders keep flowing.
pub struct Message<'a> {
    pub(crate) ep: &'a LocalEndpoint,
    /// The frame's first cell (header, then payload).
    frame: NonNull<Cell>,
    /// Cells of the frame (bits 0..32), ring link (32..60), body kind (60..62), `TAKEN`.
    /// Three words in all, so handing a message out moves little.
    bits: u64,
}

impl<'a> Message<'a> {
    /// A frame read in place from ring `link`; the link is held until the message drops.
    #[inline(always)]
    pub(crate) fn in_ring(ep: &'a LocalEndpoint, link: usize, frame: RingFrame) -> Self {
        debug_assert!(link < 1 << 28 && frame.cells <= u32::MAX as usize);
        Self {
            ep,
            // SAFETY: ring frames point into the ring's buffer, never NULL.
            frame: unsafe { NonNull::new_unchecked(frame.frame.cast_mut()) },
            bits: frame.cells as u64 | (link as u64) << 32 | BODY_RING << BODY_SHIFT,
        }
    }

    /// A frame in place in a ring claimed by a batch read.
    pub(crate) fn in_batch(ep: &'a LocalEndpoint, first: &Cell, cells: usize) -> Self {
        Self {
            ep,
            frame: NonNull::from(first),
            bits: cells as u64 | BODY_BATCH << BODY_SHIFT,
        }
    }

    /// Entry `entry` of the pack frame starting at `first`, in place in ring `link`; the
    /// link is held until the message drops.
    #[inline(always)]
    pub(crate) fn in_pack(
        ep: &'a LocalEndpoint,
        link: usize,
        first: *const Cell,
        entry: u32,
    ) -> Self {
        debug_assert!(link < 1 << 28);
        // SAFETY: `first` is an initialised pack frame in place, not yet committed.
        let (len, count) = FrameHeader::read_in_process(unsafe { &*first }).pack();
        debug_assert!(entry < count);
        let offset = entry as usize * crate::frame::pack_stride(len as usize);
        Self {
            ep,
            // SAFETY: ring frames point into the ring's buffer, never NULL.
            frame: unsafe { NonNull::new_unchecked(first.cast_mut()) },
            bits: offset as u64 | (link as u64) << 32 | BODY_PACKED << BODY_SHIFT,
        }
    }

    /// A frame moved out of its ring: the message owns (and frees) the cells.
    /// The message of a reply that `ep` waited for.
    pub(crate) fn of_reply(ep: &'a LocalEndpoint, reply: crate::endpoint::Reply) -> Self {
        match reply {
            crate::endpoint::Reply::Owned(frame) => Self::owned(ep, frame.cells),
            crate::endpoint::Reply::InPlace { link, frame } => Self::in_ring(ep, link, frame),
        }
    }

    pub(crate) fn owned(ep: &'a LocalEndpoint, cells: Box<[Cell]>) -> Self {
        let n = cells.len();
        debug_assert!(n >= 1);
        // SAFETY: `Box::into_raw` never returns NULL; `Drop` rebuilds the box from it.
        let frame = unsafe { NonNull::new_unchecked(Box::into_raw(cells).cast::<Cell>()) };
        Self {
            ep,
            frame,
            bits: n as u64 | BODY_OWNED << BODY_SHIFT,
        }
    }

    #[inline(always)]
    fn body(&self) -> u64 {
        (self.bits >> BODY_SHIFT) & 3
    }

    /// The frame's header.
    ///
    /// For an entry of a pack frame this is the pack's header: its tag, flags, sender and
    /// reply-to are the entry's, but its kind is `Pack` (read it as `Copy`), its length
    /// the whole pack's and its correlation word the pack's shape (use [`span`](Self::span),
    /// [`correlation`](Self::correlation) and [`entry_header`](Self::entry_header)).
    /// Kept raw so that the fields every message reads cost no branch.
    #[inline(always)]
    pub(crate) fn header(&self) -> FrameHeader {
        // SAFETY: the frame's first cell stays in place, initialised, while `self` lives
        // (an uncommitted ring cell or an owned box).
        FrameHeader::read_in_process(unsafe { self.frame.as_ref() })
    }

    /// The header as this message alone would have it (a pack entry's reads as a copy
    /// frame of the entry's length, with no correlation id).
    fn entry_header(&self) -> FrameHeader {
        if self.body() == BODY_PACKED {
            return self.header().entry();
        }
        self.header()
    }

    /// Where the payload starts in the frame's payload area, and its length in bytes.
    #[inline(always)]
    fn span(&self) -> (usize, usize) {
        let h = self.header();
        if self.body() == BODY_PACKED {
            return (self.bits as u32 as usize, h.pack().0 as usize);
        }
        (0, h.len() as usize)
    }

    /// The frame's first cell; the payload starts `HEADER_BYTES` into it.
    #[inline(always)]
    fn frame(&self) -> *const Cell {
        self.frame.as_ptr()
    }

    /// The ring link a message read in place came from.
    #[inline(always)]
    fn link(&self) -> usize {
        ((self.bits >> 32) & LINK_MASK) as usize
    }

    fn frame_cells(&self) -> usize {
        self.bits as u32 as usize
    }

    /// Where the frame's payload starts (for a pack entry, where the pack's does).
    fn payload_ptr(&self) -> *const u8 {
        // SAFETY: every frame is at least one cell, longer than the header.
        unsafe { self.frame().cast::<u8>().add(HEADER_BYTES) }
    }

    /// The type tag of the payload.
    #[inline]
    pub fn tag(&self) -> TypeTag {
        self.header().tag()
    }

    /// Whether this is a transfer (use [`take`](Self::take)) rather than a copy (use
    /// [`get`](Self::get)).
    #[inline]
    pub fn is_transfer(&self) -> bool {
        self.header().kind() == FrameKind::Transfer
    }

    /// The correlation id (0 for none).
    #[inline]
    pub fn correlation(&self) -> u64 {
        if self.body() == BODY_PACKED {
            return 0;
        }
        self.header().correlation()
    }

    /// The payload bytes of a copy message (empty for a transfer).
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        if self.is_transfer() {
            return &[];
        }
        let (at, len) = self.span();
        debug_assert!(
            self.body() == BODY_PACKED || HEADER_BYTES + len <= self.frame_cells() * CELL_BYTES
        );
        // SAFETY: the payload holds `len` initialised bytes `at` bytes into the frame's
        // payload area (0, or a pack entry's offset, a multiple of 16, inside the pack),
        // 16-aligned, that stay in place (uncommitted ring cells or an owned box) for as
        // long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.payload_ptr().add(at), len) }
    }

    fn transfer_payload(&self) -> TransferPayload {
        // SAFETY: only called on transfer frames, which were written by `TransferSource`
        // in this process: 16 payload bytes holding a pointer and its drop function.
        unsafe {
            TransferPayload::decode(std::slice::from_raw_parts(
                self.payload_ptr(),
                TransferPayload::BYTES,
            ))
        }
    }

    #[inline]
    fn check<T: 'static>(&self, kind: FrameKind) -> Result<(), AccessError> {
        let found = self.header().kind();
        // A pack entry is a copy.
        if found != kind && !(found == FrameKind::Pack && kind == FrameKind::Copy) {
            return Err(match kind {
                FrameKind::Copy => AccessError::NotCopy,
                _ => AccessError::NotTransfer,
            });
        }
        let expected = type_tag::<T>();
        if self.header().tag() != expected {
            return Err(AccessError::TypeMismatch {
                expected,
                found: self.header().tag(),
            });
        }
        Ok(())
    }

    /// The payload as the archived form of `T`, read in place. An error if the message
    /// carries another type (tags are compared; nothing is read on a mismatch).
    ///
    /// Frames from this process were written by rkyv from a `T`, so they are read without
    /// validation; bytes from outside go through [`get_checked`](Self::get_checked).
    #[inline]
    pub fn get<T>(&self) -> Result<&T::Archived, AccessError>
    where
        T: Archive + 'static,
        T::Archived: Portable,
    {
        self.check::<T>(FrameKind::Copy)?;
        if self.header().flags() & FLAG_RAW != 0 || std::mem::align_of::<T::Archived>() > 16 {
            // Raw bytes (`send_bytes`) were not written by rkyv from a `T`: only the
            // validating `get_checked` may read them. Payloads are only 16-aligned.
            return Err(AccessError::Invalid);
        }
        // SAFETY: the tag matches `T`, and in-process copy frames with a Rust type tag are
        // only written by `CopySource`, which serialised a `T` with rkyv into exactly these
        // bytes; the bytes are 16-aligned and end where the archive ends, as rkyv requires.
        Ok(unsafe { rkyv::api::access_unchecked::<T::Archived>(self.bytes()) })
    }

    /// Like [`get`](Self::get), but validates the bytes first (for payloads that came
    /// from outside the process). [`AccessError::Invalid`] if they are not a valid archive.
    pub fn get_checked<T>(&self) -> Result<&T::Archived, AccessError>
    where
        T: Archive + 'static,
        T::Archived: Portable
            + for<'b> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'b, rkyv::rancor::Error>,
            >,
    {
        self.check::<T>(FrameKind::Copy)?;
        rkyv::access::<T::Archived, rkyv::rancor::Error>(self.bytes())
            .map_err(|_| AccessError::Invalid)
    }

    /// Takes the value of a transfer message: the very allocation the sender boxed.
    pub fn take<T: Send + 'static>(&mut self) -> Result<Box<T>, AccessError> {
        self.check::<T>(FrameKind::Transfer)?;
        if self.bits & TAKEN != 0 {
            return Err(AccessError::AlreadyTaken);
        }
        self.bits |= TAKEN;
        // SAFETY: a transfer frame with `T`'s tag was written by `send_transfer::<T>` in
        // this process from `Box::<T>::into_raw`; `taken` guarantees we reclaim it once.
        unsafe { Ok(Box::from_raw(self.transfer_payload().ptr.cast::<T>())) }
    }

    /// The id of the sending endpoint.
    #[inline]
    pub fn sender_id(&self) -> u32 {
        self.header().sender()
    }

    /// The id of the endpoint replies go to (0: none); usually the sender's.
    #[inline]
    pub fn reply_to_id(&self) -> u32 {
        self.header().reply_to()
    }

    /// The sender, if it is still known to the cluster.
    pub fn sender(&self) -> Option<IsolateRef> {
        self.ep.cluster.ref_by_id(self.header().sender())
    }

    /// Where replies go, if anywhere and still known to the cluster.
    pub fn reply_to(&self) -> Option<IsolateRef> {
        self.ep.cluster.ref_by_id(self.header().reply_to())
    }

    /// Replies with a copy of `value` to the message's reply-to endpoint (an isolate or
    /// any other thread), with the same correlation id. Waits while the ring is full.
    #[inline]
    pub fn reply<T: Payload>(&self, value: &T) -> Result<(), SendError> {
        if self.header().reply_to() == 0 {
            return Err(SendError::UnknownTarget(()));
        }
        self.ep.send_copy(
            Target::Id(self.header().reply_to()),
            value,
            self.reply_route(0),
            Mode::Block,
        )
    }

    /// Replies with raw bytes and an explicit tag (for example the bytes and tag of this
    /// very message, to echo it).
    #[inline]
    pub fn reply_bytes(&self, tag: TypeTag, bytes: &[u8]) -> Result<(), SendError> {
        if self.header().reply_to() == 0 {
            return Err(SendError::UnknownTarget(()));
        }
        self.ep.send_bytes(
            Target::Id(self.header().reply_to()),
            tag,
            bytes,
            Route {
                flags: crate::frame::FLAG_RAW | self.reply_route(0).flags,
                ..self.reply_route(0)
            },
            Mode::Block,
        )
    }

    /// Replies by moving `value` to the reply-to endpoint.
    pub fn reply_transfer<T: Send + 'static>(
        &self,
        value: Box<T>,
    ) -> Result<(), SendError<Box<T>>> {
        if self.header().reply_to() == 0 {
            return Err(SendError::UnknownTarget(value));
        }
        self.ep.send_transfer(
            Target::Id(self.header().reply_to()),
            value,
            self.reply_route(0),
            Mode::Block,
        )
    }

    /// Answers a request with an error: the caller's `call`/`wait_reply` returns
    /// [`CallError::Remote`](crate::CallError::Remote) with this text. For a message that
    /// is not a request, sends the text as a `String` flagged as an error.
    pub fn reply_error(&self, error: &str) -> Result<(), SendError> {
        if self.header().reply_to() == 0 {
            return Err(SendError::UnknownTarget(()));
        }
        self.ep.send_copy(
            Target::Id(self.header().reply_to()),
            &error.to_owned(),
            self.reply_route(FLAG_ERROR),
            Mode::Block,
        )
    }

    /// The route of a reply to this message: same correlation id, marked as a reply if
    /// this message is a request.
    #[inline]
    fn reply_route(&self, flags: u8) -> Route {
        self.replier().route(self.ep.shared.id, flags)
    }

    /// A detached handle to answer this message later, after it is dropped (to answer
    /// requests out of order, or from another moment of the receive loop): see
    /// [`Inbox::reply`](crate::Inbox::reply).
    #[inline]
    pub fn replier(&self) -> Replier {
        Replier {
            reply_to: self.header().reply_to(),
            correlation: self.correlation(),
            request: self.header().flags() & FLAG_CALL != 0,
        }
    }

    /// Whether this message is a request (sent with `call`/`request`): reply to it.
    #[inline]
    pub fn is_request(&self) -> bool {
        self.header().flags() & FLAG_CALL != 0
    }

    /// Whether this message is an error (see [`reply_error`](Self::reply_error)).
    #[inline]
    pub fn is_error(&self) -> bool {
        self.header().flags() & FLAG_ERROR != 0
    }
}

/// Where and how to answer a message, kept after the message itself is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replier {
    pub(crate) reply_to: u32,
    pub(crate) correlation: u64,
    pub(crate) request: bool,
}

impl Replier {
    pub(crate) fn route(&self, from: u32, flags: u8) -> Route {
        Route {
            correlation: self.correlation,
            reply_to: from,
            flags: if self.request {
                FLAG_REPLY | flags
            } else {
                flags
            },
        }
    }
}

impl Drop for Message<'_> {
    /// Hands the message's three words to an out-of-line release by value: the drop glue
    /// is then small enough to inline, and the message's address is never taken, so a
    /// message received and dropped in one scope stays in registers. (Taking its address
    /// forced every received message through the stack, where copying it back out
    /// stalled on store forwarding: a fifth of a send + receive.)
    #[inline(always)]
    fn drop(&mut self) {
        Self::drop_parts(self.ep, self.frame, self.bits);
    }
}

impl<'a> Message<'a> {
    /// `drop`, from the message's words.
    #[inline(never)]
    fn drop_parts(ep: &'a LocalEndpoint, frame: NonNull<Cell>, bits: u64) {
        // SAFETY: the frame's first cell stays in place, initialised, until released here.
        let kind = unsafe { frame.as_ref().0[4] };
        if bits & !(LINK_MASK << 32) == 1 && kind != FrameKind::Transfer as u8 {
            // The common case: in place in a ring (`BODY_RING`, `TAKEN` clear), one cell,
            // not a transfer; every bit above the cell count is then the link's.
            ep.inbound.borrow_mut().release((bits >> 32) as usize, 1);
            return;
        }
        let this = std::mem::ManuallyDrop::new(Self { ep, frame, bits });
        this.release();
    }

    /// Drops an untaken transferred value and gives the frame back to where it came from.
    fn release(&self) {
        if self.header().is_transfer() && self.bits & TAKEN == 0 {
            // SAFETY: transfer frame written in this process; the value was not taken, so
            // this message is its only owner.
            unsafe {
                let t = self.transfer_payload();
                (t.drop_fn)(t.ptr);
            }
        }
        match self.body() {
            BODY_RING => {
                let link = self.link();
                self.ep
                    .inbound
                    .borrow_mut()
                    .release(link, self.frame_cells());
            }
            BODY_PACKED => {
                let link = self.link();
                let frame = RingFrame {
                    frame: self.frame(),
                    cells: self.header().frame_cells(),
                };
                self.ep.inbound.borrow_mut().release_entry(link, frame);
            }
            BODY_OWNED => {
                let cells =
                    std::ptr::slice_from_raw_parts_mut(self.frame.as_ptr(), self.frame_cells());
                // SAFETY: made by `Box::into_raw` of a boxed slice of exactly this many
                // cells in `owned`, and freed only here.
                drop(unsafe { Box::from_raw(cells) });
            }
            _ => {}
        }
    }
}

impl fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = self.entry_header();
        f.debug_struct("Message")
            .field("kind", &h.kind())
            .field("flags", &h.flags())
            .field("tag", &format_args!("{:#x}", h.tag()))
            .field("len", &h.len())
            .field("sender", &h.sender())
            .field("reply_to", &h.reply_to())
            .field("correlation", &h.correlation())
            .finish()
    }
}
