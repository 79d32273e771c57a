//! Received messages and events.

use std::fmt;

use rkyv::{Archive, Portable};

use crate::endpoint::{LocalEndpoint, Mode, Route, Target};
use crate::error::{AccessError, SendError};
use crate::frame::{
    type_tag, Cell, FrameHeader, FrameKind, TransferPayload, TypeTag, CELL_BYTES, FLAG_CALL,
    FLAG_ERROR, FLAG_RAW, FLAG_REPLY, HEADER_BYTES,
};
use crate::isolate::{DownReason, IsolateRef};
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

pub(crate) enum Body {
    /// In place in ring `link`; the frame is consumed when the message is dropped.
    Ring {
        link: usize,
        frame: *const Cell,
        cells: usize,
    },
    /// The whole frame, moved out of its ring earlier (the receiver was blocked sending).
    Owned(Box<[Cell]>),
    /// In place in a ring read by a batch (`Inbox::try_recv_batch`), which consumes the
    /// whole batch's cells at once after the last message.
    Batch { frame: *const Cell, cells: usize },
}

/// A received message, read in place from the ring (no copy, no deserialisation).
///
/// While a message is alive, its ring's head stays where it is: the sender can fill the
/// rest of the ring, and later messages of the same sender wait until this one is
/// dropped. Messages from other senders keep flowing.
pub struct Message<'a> {
    pub(crate) ep: &'a LocalEndpoint,
    pub(crate) header: FrameHeader,
    pub(crate) body: Body,
    pub(crate) taken: bool,
}

impl<'a> Message<'a> {
    /// The frame's first cell; the payload starts `HEADER_BYTES` into it.
    fn frame(&self) -> *const Cell {
        match &self.body {
            Body::Ring { frame, .. } | Body::Batch { frame, .. } => *frame,
            Body::Owned(b) => b.as_ptr(),
        }
    }

    fn frame_cells(&self) -> usize {
        match &self.body {
            Body::Ring { cells, .. } | Body::Batch { cells, .. } => *cells,
            Body::Owned(b) => b.len(),
        }
    }

    fn payload_ptr(&self) -> *const u8 {
        // SAFETY: every frame is at least one cell, longer than the header.
        unsafe { self.frame().cast::<u8>().add(HEADER_BYTES) }
    }

    /// The type tag of the payload.
    pub fn tag(&self) -> TypeTag {
        self.header.tag
    }

    /// Whether this is a transfer (use [`take`](Self::take)) rather than a copy (use
    /// [`get`](Self::get)).
    pub fn is_transfer(&self) -> bool {
        self.header.kind == FrameKind::Transfer
    }

    /// The correlation id (0 for none).
    pub fn correlation(&self) -> u64 {
        self.header.correlation
    }

    /// The payload bytes of a copy message (empty for a transfer).
    pub fn bytes(&self) -> &[u8] {
        if self.is_transfer() {
            return &[];
        }
        let len = self.header.len as usize;
        debug_assert!(HEADER_BYTES + len <= self.frame_cells() * CELL_BYTES);
        // SAFETY: the payload holds `len` initialised bytes, 16-aligned, that stay in place
        // (uncommitted ring cells or an owned box) for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.payload_ptr(), len) }
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
        if self.header.kind != kind {
            return Err(match kind {
                FrameKind::Copy => AccessError::NotCopy,
                _ => AccessError::NotTransfer,
            });
        }
        let expected = type_tag::<T>();
        if self.header.tag != expected {
            return Err(AccessError::TypeMismatch {
                expected,
                found: self.header.tag,
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
        if self.header.flags & FLAG_RAW != 0 || std::mem::align_of::<T::Archived>() > 16 {
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
        if self.taken {
            return Err(AccessError::AlreadyTaken);
        }
        self.taken = true;
        // SAFETY: a transfer frame with `T`'s tag was written by `send_transfer::<T>` in
        // this process from `Box::<T>::into_raw`; `taken` guarantees we reclaim it once.
        unsafe { Ok(Box::from_raw(self.transfer_payload().ptr.cast::<T>())) }
    }

    /// The id of the sending endpoint.
    pub fn sender_id(&self) -> u32 {
        self.header.sender
    }

    /// The id of the endpoint replies go to (0: none); usually the sender's.
    pub fn reply_to_id(&self) -> u32 {
        self.header.reply_to
    }

    /// The sender, if it is still known to the cluster.
    pub fn sender(&self) -> Option<IsolateRef> {
        self.ep.cluster.ref_by_id(self.header.sender)
    }

    /// Where replies go, if anywhere and still known to the cluster.
    pub fn reply_to(&self) -> Option<IsolateRef> {
        self.ep.cluster.ref_by_id(self.header.reply_to)
    }

    /// Replies with a copy of `value` to the message's reply-to endpoint (an isolate or
    /// any other thread), with the same correlation id. Waits while the ring is full.
    #[inline]
    pub fn reply<T: Payload>(&self, value: &T) -> Result<(), SendError> {
        if self.header.reply_to == 0 {
            return Err(SendError::UnknownTarget(()));
        }
        self.ep.send_copy(
            Target::Id(self.header.reply_to),
            value,
            self.reply_route(0),
            Mode::Block,
        )
    }

    /// Replies with raw bytes and an explicit tag (for example the bytes and tag of this
    /// very message, to echo it).
    pub fn reply_bytes(&self, tag: TypeTag, bytes: &[u8]) -> Result<(), SendError> {
        if self.header.reply_to == 0 {
            return Err(SendError::UnknownTarget(()));
        }
        self.ep.send_bytes(
            Target::Id(self.header.reply_to),
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
        if self.header.reply_to == 0 {
            return Err(SendError::UnknownTarget(value));
        }
        self.ep.send_transfer(
            Target::Id(self.header.reply_to),
            value,
            self.reply_route(0),
            Mode::Block,
        )
    }

    /// Answers a request with an error: the caller's `call`/`wait_reply` returns
    /// [`CallError::Remote`](crate::CallError::Remote) with this text. For a message that
    /// is not a request, sends the text as a `String` flagged as an error.
    pub fn reply_error(&self, error: &str) -> Result<(), SendError> {
        if self.header.reply_to == 0 {
            return Err(SendError::UnknownTarget(()));
        }
        self.ep.send_copy(
            Target::Id(self.header.reply_to),
            &error.to_owned(),
            self.reply_route(FLAG_ERROR),
            Mode::Block,
        )
    }

    /// The route of a reply to this message: same correlation id, marked as a reply if
    /// this message is a request.
    fn reply_route(&self, flags: u8) -> Route {
        self.replier().route(self.ep.shared.id, flags)
    }

    /// A detached handle to answer this message later, after it is dropped (to answer
    /// requests out of order, or from another moment of the receive loop): see
    /// [`Inbox::reply`](crate::Inbox::reply).
    pub fn replier(&self) -> Replier {
        Replier {
            reply_to: self.header.reply_to,
            correlation: self.header.correlation,
            request: self.header.flags & FLAG_CALL != 0,
        }
    }

    /// Whether this message is a request (sent with `call`/`request`): reply to it.
    pub fn is_request(&self) -> bool {
        self.header.flags & FLAG_CALL != 0
    }

    /// Whether this message is an error (see [`reply_error`](Self::reply_error)).
    pub fn is_error(&self) -> bool {
        self.header.flags & FLAG_ERROR != 0
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
    fn drop(&mut self) {
        if self.header.kind == FrameKind::Transfer && !self.taken {
            // SAFETY: transfer frame written in this process; the value was not taken, so
            // this message is its only owner.
            unsafe {
                let t = self.transfer_payload();
                (t.drop_fn)(t.ptr);
            }
        }
        if let Body::Ring { link, cells, .. } = self.body {
            self.ep.inbound.borrow_mut().release(link, cells);
        }
    }
}

impl fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("kind", &self.header.kind)
            .field("flags", &self.header.flags)
            .field("tag", &format_args!("{:#x}", self.header.tag))
            .field("len", &self.header.len)
            .field("sender", &self.header.sender)
            .field("reply_to", &self.header.reply_to)
            .field("correlation", &self.header.correlation)
            .finish()
    }
}
