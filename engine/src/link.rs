//! One direction of one pair: an `rtrb` ring of [`Cell`]s carrying frames.
//!
//! The producer half ([`OutLink`]) lives in the sending thread's endpoint, the consumer
//! half ([`InLink`]) in the receiving thread's: each half has exactly one owner thread, so
//! the ring is never used as MPSC or MPMC.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rtrb::{Consumer, Producer, RingBuffer};

use crate::barrier;
use crate::endpoint::EndpointShared;
use crate::frame::{
    frame_cells, pack_stride, Cell, FrameHeader, FrameKind, RingError, TransferPayload, CELL_BYTES,
    HEADER_BYTES,
};

/// What a frame writer produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteOutcome {
    /// The frame is published.
    Written,
    /// Not enough free space now.
    Full,
    /// The frame can never fit in this ring.
    TooLarge,
    /// The payload failed to serialise.
    Failed,
}

/// Something that can fill the payload of one frame.
pub(crate) trait FrameSource {
    /// Writes the payload into `window` and returns its length in bytes;
    /// [`RingError::NoRoom`] if the window is too small.
    fn fill(&mut self, window: &mut [MaybeUninit<u8>]) -> Result<usize, RingError>;
}

/// The payload window of `cells` contiguous cells: everything after the header.
#[inline]
fn payload_window(cells: &mut [MaybeUninit<Cell>]) -> &mut [MaybeUninit<u8>] {
    let bytes = cells.len() * CELL_BYTES;
    debug_assert!(bytes >= HEADER_BYTES);
    // SAFETY: `cells` is an exclusive slice of `bytes` bytes; `MaybeUninit<u8>` has no
    // validity requirement and alignment 1, so viewing its tail past the header as bytes
    // is sound, and the returned borrow keeps `cells` exclusively borrowed.
    unsafe {
        std::slice::from_raw_parts_mut(
            cells
                .as_mut_ptr()
                .cast::<MaybeUninit<u8>>()
                .add(HEADER_BYTES),
            bytes - HEADER_BYTES,
        )
    }
}

/// Zeroes the first cell's payload area before a frame is filled: a frame of one cell
/// (the common case) then needs no clearing afterwards (see [`zero_tail`]). Two fixed
/// 16-byte stores, no call.
#[inline(always)]
fn zero_first_cell_payload(cells: &mut [MaybeUninit<Cell>]) {
    debug_assert!(!cells.is_empty());
    // SAFETY: `cells` holds at least one exclusive 64-byte cell; bytes HEADER_BYTES..64 of
    // it are in bounds, and the cell is 64-aligned so the u128 stores are 16-aligned.
    unsafe {
        let p = cells
            .as_mut_ptr()
            .cast::<u8>()
            .add(HEADER_BYTES)
            .cast::<[u128; 2]>();
        p.write([0; 2]);
    }
}

/// Zeroes the bytes of the frame's last cell after its `len` payload bytes, so every byte
/// of a published frame is initialised (readers copy whole cells). A frame of one cell
/// was cleared before it was filled ([`zero_first_cell_payload`]).
#[inline(always)]
fn zero_tail(cells: &mut [MaybeUninit<Cell>], len: usize) {
    if cells.len() == 1 {
        return;
    }
    zero_tail_slow(cells, len);
}

#[inline(never)]
fn zero_tail_slow(cells: &mut [MaybeUninit<Cell>], len: usize) {
    let end = HEADER_BYTES + len;
    let total = cells.len() * CELL_BYTES;
    debug_assert!(end <= total);
    // SAFETY: `end..total` lies inside the exclusive `cells` slice.
    unsafe {
        std::ptr::write_bytes(cells.as_mut_ptr().cast::<u8>().add(end), 0, total - end);
    }
}

/// Zeroes `window[from..to]`.
#[inline(always)]
fn zero_bytes(window: &mut [MaybeUninit<u8>], from: usize, to: usize) {
    if from < to {
        window[from..to].fill(MaybeUninit::new(0));
    }
}

/// The largest pack entry (see `frame.rs`): past it, a frame header per message costs
/// less than a third of the message anyway.
pub(crate) const PACK_MAX_STRIDE: usize = 64;

/// Writes the header at the start of the first cell.
#[inline]
fn put_header(cells: &mut [MaybeUninit<Cell>], header: &FrameHeader) {
    debug_assert!(!cells.is_empty());
    header.write_to(cells.as_mut_ptr().cast::<Cell>());
}

/// A whole frame held outside a ring (header and payload in one 64-aligned buffer):
/// drained from a ring while its owner was blocked (receiver side), or spilled by a
/// sender that could not wait (sender side).
pub(crate) struct OwnedFrame {
    pub cells: Box<[Cell]>,
}

impl OwnedFrame {
    /// Builds a frame from `src`, growing the buffer up to `max_cells`.
    pub(crate) fn build(
        mut header: FrameHeader,
        src: &mut impl FrameSource,
        max_cells: usize,
    ) -> Result<Self, RingError> {
        let mut n = 1usize;
        loop {
            let mut buf: Vec<MaybeUninit<Cell>> = vec![MaybeUninit::new(Cell::default()); n];
            match src.fill(payload_window(&mut buf)) {
                Ok(len) => {
                    header.set_len(len as u32);
                    buf.truncate(frame_cells(len));
                    put_header(&mut buf, &header);
                    let cells = buf
                        .into_iter()
                        // SAFETY: every cell was initialised with `Cell::default()` above
                        // and then partly overwritten with bytes.
                        .map(|c| unsafe { c.assume_init() })
                        .collect();
                    return Ok(Self { cells });
                }
                Err(RingError::NoRoom) if n < max_cells => n = (n * 2).min(max_cells),
                Err(e) => return Err(e),
            }
        }
    }

    /// The frame's header.
    pub(crate) fn header(&self) -> FrameHeader {
        match FrameHeader::read_from(&self.cells[0]) {
            Some(h) => h,
            None => unreachable!("owned frames are built with a valid header"),
        }
    }

    /// The payload bytes (16-aligned).
    pub(crate) fn payload(&self) -> &[u8] {
        let len = self.header().len() as usize;
        debug_assert!(HEADER_BYTES + len <= self.cells.len() * CELL_BYTES);
        // SAFETY: the frame holds `len` payload bytes after its header, inside `cells`.
        unsafe {
            std::slice::from_raw_parts(self.cells.as_ptr().cast::<u8>().add(HEADER_BYTES), len)
        }
    }

    /// The moved value this frame carries, if it is a transfer.
    pub(crate) fn transfer(&self) -> Option<TransferPayload> {
        (self.header().kind() == FrameKind::Transfer).then(|| {
            // SAFETY: transfer frames are only built by `TransferSource` in this process.
            unsafe { TransferPayload::decode(&self.cells[0].0[HEADER_BYTES..]) }
        })
    }

    /// Drops the transferred value, if this frame carries one that nobody took.
    pub(crate) fn discard(self) {
        if let Some(t) = self.transfer() {
            // SAFETY: the value was not taken (the frame is being discarded whole), so
            // this frame is its only owner.
            unsafe { (t.drop_fn)(t.ptr) };
        }
    }
}

impl FrameSource for OwnedFrame {
    fn fill(&mut self, window: &mut [MaybeUninit<u8>]) -> Result<usize, RingError> {
        let len = self.header().len() as usize;
        if len > window.len() {
            return Err(RingError::NoRoom);
        }
        // SAFETY: the frame holds `len` payload bytes after its header (it was built by
        // `build` or drained whole from a ring); the window has room for them (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.cells.as_ptr().cast::<u8>().add(HEADER_BYTES),
                window.as_mut_ptr().cast::<u8>(),
                len,
            );
        }
        Ok(len)
    }
}

/// What both halves of a link share besides the ring.
///
/// `sender_waiting` carries the "wake me when there is space" protocol, the mirror of the
/// one in `wake.rs`: a sender that finds the ring full sets it, then parks through its own
/// endpoint's `prepare_park` (a heavy barrier) after re-checking the free space; the
/// receiver, after freeing cells, issues a light barrier and reads it, and if set clears
/// it and notifies the sender's endpoint. The hot side (every commit) pays a compiler
/// fence and one read of a line that is written only when a sender blocks.
#[derive(Default)]
pub(crate) struct LinkShared {
    /// On a cache line of its own: the receiver reads it after every commit, so it must
    /// not share a line with anything the sender writes per message.
    pub sender_waiting: crossbeam_utils::CachePadded<AtomicBool>,
}

/// A new ring: the producer half, and what the receiver needs to build its `InLink`.
pub(crate) struct NewRing {
    pub producer: Producer<Cell>,
    pub consumer: Consumer<Cell>,
    pub shared: Arc<LinkShared>,
}

/// Creates a ring of `cells` cells.
pub(crate) fn new_ring(cells: usize) -> NewRing {
    let (producer, consumer) = RingBuffer::new(cells);
    NewRing {
        producer,
        consumer,
        shared: Arc::new(LinkShared::default()),
    }
}

/// The sending half of a link.
pub(crate) struct OutLink {
    producer: Producer<Cell>,
    /// Shared with the receiving half.
    pub shared: Arc<LinkShared>,
    /// The receiving endpoint.
    pub target: Arc<EndpointShared>,
    cap: usize,
    /// Our write position modulo `cap` (we are the only writer, so it is exact). It
    /// walks the whole ring: a sender never goes back to the start of the ring early
    /// (see [`wrapped`](Self::wrapped)).
    pos: usize,
    /// Frames that could not be written yet; they go before any later frame.
    pub spill: VecDeque<OwnedFrame>,
    /// The free cells the last refused write found, before it padded the ring's tail.
    pub free_at_refusal: usize,
}

impl OutLink {
    pub(crate) fn new(
        producer: Producer<Cell>,
        shared: Arc<LinkShared>,
        target: Arc<EndpointShared>,
    ) -> Self {
        let cap = producer.buffer().capacity();
        Self {
            producer,
            shared,
            target,
            cap,
            pos: 0,
            spill: VecDeque::new(),
            free_at_refusal: 0,
        }
    }

    /// Ring capacity in cells.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Free cells right now.
    pub(crate) fn free_cells(&self) -> usize {
        self.producer.slots()
    }

    /// Cells the ring currently holds (written, not yet read).
    pub(crate) fn occupancy(&self) -> usize {
        self.cap - self.producer.slots()
    }

    /// The write position went back to the start of the ring: only at its end.
    ///
    /// (Going back early, once past a window of 32 cells with the ring empty, kept a
    /// ping-pong on a few cache lines, but each return cost the sender a read of the
    /// receiver's index, a line the receiver writes with every message, and the receiver
    /// a skip frame: one message in 32 took about 80 ns longer. Without it, the copy
    /// round trip's p50 went from 160 to 130–131 ns, and its p99.9 from 281–311 ns to
    /// 220–231 ns in three pairs of four, in alternating runs of both builds.)
    #[inline(always)]
    fn wrapped(&mut self) {
        self.pos = 0;
    }

    /// Writes one frame: `header` (its `len` is set from what `src` wrote) and the payload
    /// `src` produces, contiguous, never wrapping. Publishes it with one index store.
    #[inline(always)]
    pub(crate) fn write(
        &mut self,
        mut header: FrameHeader,
        src: &mut impl FrameSource,
    ) -> WriteOutcome {
        let mut refreshed = false;
        let mut free_before_pad = None;
        loop {
            let avail = if refreshed {
                self.producer.slots()
            } else {
                self.producer.cached_slots()
            };
            let to_end = self.cap - self.pos;
            let contiguous = avail.min(to_end);
            if contiguous >= 1 {
                let Ok(mut chunk) = self.producer.write_chunk_uninit(contiguous) else {
                    // Cannot happen: `contiguous <= avail`, and free space only grows.
                    refreshed = true;
                    continue;
                };
                let (first, _) = chunk.as_mut_slices();
                debug_assert_eq!(first.len(), contiguous);
                zero_first_cell_payload(first);
                match src.fill(payload_window(first)) {
                    Ok(len) => {
                        let Ok(len32) = u32::try_from(len) else {
                            return WriteOutcome::TooLarge;
                        };
                        header.set_len(len32);
                        let cells = header.frame_cells();
                        debug_assert!(cells <= contiguous);
                        put_header(first, &header);
                        zero_tail(&mut first[..cells], len);
                        // SAFETY: cell 0 starts with the header written just above and the
                        // `len` payload bytes `fill` wrote follow it; the rest of the last
                        // cell is padding that no reader interprets.
                        unsafe { chunk.commit(cells) };
                        self.pos += cells;
                        if self.pos == self.cap {
                            self.wrapped();
                        }
                        return WriteOutcome::Written;
                    }
                    Err(RingError::Failed) => return WriteOutcome::Failed,
                    Err(RingError::NoRoom) => {}
                }
            }
            if !refreshed {
                refreshed = true;
                continue;
            }
            if avail >= to_end && to_end < self.cap {
                free_before_pad.get_or_insert(avail);
                // The whole rest of the ring is free but too small: pad it with a skip
                // frame so the next attempt starts at the beginning.
                let Ok(mut chunk) = self.producer.write_chunk_uninit(to_end) else {
                    return WriteOutcome::Full;
                };
                chunk.as_mut_slices().0[0].write(FrameHeader::skip_cell(to_end));
                // SAFETY: only the first cell of a skip frame is ever read; it is written.
                unsafe { chunk.commit(to_end) };
                self.wrapped();
                // The receiver must consume the skip for the space to come back: wake it,
                // it may be parked on an otherwise empty ring.
                self.target.wake.notify();
                continue;
            }
            if self.pos == 0 && avail == self.cap {
                return WriteOutcome::TooLarge;
            }
            self.free_at_refusal = free_before_pad.unwrap_or(avail);
            return WriteOutcome::Full;
        }
    }

    /// Writes frames for values `0..count` (each filled by `fill(k, window)`) into the
    /// contiguous free space, as many as fit, and publishes them all with one index store.
    /// Runs of small values of one length go into pack frames (see `frame.rs`): a value
    /// of at most [`PACK_MAX_STRIDE`] bytes is followed in its frame by the next values for
    /// as long as they serialise to the same length. Returns how many values were written:
    /// 0 when not even the first fits there (the caller then writes one frame with
    /// [`write`](Self::write), which handles wrapping, full rings and frames too large for
    /// the ring).
    #[inline]
    pub(crate) fn write_batch<F>(
        &mut self,
        header: FrameHeader,
        count: usize,
        mut fill: F,
    ) -> Result<usize, RingError>
    where
        F: FnMut(usize, &mut [MaybeUninit<u8>]) -> Result<usize, RingError>,
    {
        if count == 0 {
            return Ok(0);
        }
        let contiguous = self.producer.slots().min(self.cap - self.pos);
        if contiguous == 0 {
            return Ok(0);
        }
        let Ok(mut chunk) = self.producer.write_chunk_uninit(contiguous) else {
            return Ok(0);
        };
        let (first, _) = chunk.as_mut_slices();
        let mut used = 0;
        let mut written = 0;
        let mut failed = false;
        while written < count && used < contiguous {
            let frame = &mut first[used..];
            zero_first_cell_payload(frame);
            let window = payload_window(frame);
            let room = window.len();
            match fill(written, window) {
                Ok(len) => {
                    let stride = pack_stride(len);
                    let mut k = 1;
                    if stride <= PACK_MAX_STRIDE {
                        zero_bytes(window, len, stride.min(room));
                        while written + k < count && (k + 1) * stride <= room {
                            let entry = &mut window[k * stride..(k + 1) * stride];
                            match fill(written + k, entry) {
                                Ok(l) if l == len => {
                                    zero_bytes(entry, len, stride);
                                    k += 1;
                                }
                                // Another length (or an error, reported when the value
                                // starts a frame of its own): the pack ends here.
                                _ => break,
                            }
                        }
                    }
                    let mut h = header;
                    let payload = if k == 1 {
                        h.set_len(len as u32);
                        len
                    } else {
                        h.set_pack(len as u32, k as u32);
                        k * stride
                    };
                    put_header(frame, &h);
                    let cells = frame_cells(payload);
                    zero_tail(&mut frame[..cells], payload);
                    used += cells;
                    written += k;
                }
                Err(RingError::NoRoom) => break,
                Err(RingError::Failed) => {
                    failed = true;
                    break;
                }
            }
        }
        debug_assert!(used <= contiguous);
        // SAFETY: cells 0..used hold complete frames (header then payload, every byte
        // written above: payloads, the zeros after each pack entry and after each frame's
        // last byte).
        unsafe { chunk.commit(used) };
        self.pos += used;
        if self.pos == self.cap {
            self.wrapped();
        }
        if failed && written == 0 {
            return Err(RingError::Failed);
        }
        Ok(written)
    }

    /// Writes spilled frames while they fit. Returns how many were written; the caller
    /// must wake the target if any were.
    pub(crate) fn flush_spill(&mut self) -> usize {
        let mut written = 0;
        while let Some(mut f) = self.spill.pop_front() {
            match self.write(f.header(), &mut f) {
                WriteOutcome::Written => written += 1,
                _ => {
                    self.spill.push_front(f);
                    break;
                }
            }
        }
        written
    }
}

/// A frame read in place: its first cell (header, then payload) and its size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingFrame {
    pub frame: *const Cell,
    pub cells: usize,
}

/// The frame starting at `first` if it is a data frame (copy or transfer) of one cell.
#[inline(always)]
pub(crate) fn plain_frame(first: &Cell) -> Option<RingFrame> {
    let b = &first.0;
    let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let kind = b[4];
    (len as usize <= CELL_BYTES - HEADER_BYTES
        && (kind == FrameKind::Copy as u8 || kind == FrameKind::Transfer as u8))
        .then(|| RingFrame {
            frame: std::ptr::from_ref(first),
            cells: 1,
        })
}

/// The receiving half of a link.
pub(crate) struct InLink {
    consumer: Consumer<Cell>,
    /// Endpoint id of the producer.
    pub source: u32,
    /// The producer's endpoint (woken when it waits for space).
    source_ep: Arc<EndpointShared>,
    shared: Arc<LinkShared>,
    /// Frames drained from the ring while the owner was blocked; they come first.
    pub overflow: VecDeque<OwnedFrame>,
    /// A message read from this link is held by the user (the ring head is pinned).
    pub held: bool,
    /// Entries of the pack frame at the ring's head already consumed (0 for other frames).
    pub pack_next: u32,
}

impl InLink {
    pub(crate) fn new(
        consumer: Consumer<Cell>,
        source_ep: Arc<EndpointShared>,
        shared: Arc<LinkShared>,
    ) -> Self {
        Self {
            consumer,
            source: source_ep.id,
            source_ep,
            shared,
            overflow: VecDeque::new(),
            held: false,
            pack_next: 0,
        }
    }

    /// Whether a frame is waiting (overflow or ring). Skip frames count: reading
    /// consumes them.
    #[inline]
    pub(crate) fn has_data(&self) -> bool {
        !self.overflow.is_empty() || !self.consumer.is_empty()
    }

    /// The producer has gone and nothing is left.
    pub(crate) fn is_finished(&self) -> bool {
        if !self.consumer.is_abandoned() {
            return false;
        }
        // `is_abandoned` does not synchronise with the producer's last writes (rtrb#114):
        // acquire them before looking at the ring.
        std::sync::atomic::fence(Ordering::Acquire);
        !self.has_data()
    }

    /// The next frame in the ring, in place, without consuming it. Skip frames are
    /// consumed on the way.
    #[inline(always)]
    pub(crate) fn peek(&mut self) -> Option<RingFrame> {
        let first = self.consumer.peek().ok()?;
        if let Some(f) = plain_frame(first) {
            return Some(f);
        }
        self.peek_slow()
    }

    /// The first cell waiting in the ring, in place, without consuming it (`None`: the
    /// ring is empty).
    #[inline(always)]
    pub(crate) fn peek_first(&self) -> Option<&Cell> {
        self.consumer.peek().ok()
    }

    /// `peek` for skip frames and frames of several cells.
    #[inline(never)]
    fn peek_slow(&mut self) -> Option<RingFrame> {
        loop {
            let first = self.consumer.peek().ok()?;
            let Some((len, kind)) = FrameHeader::decode_first(&first.0) else {
                debug_assert!(false, "corrupt frame kind in an in-process ring");
                return None;
            };
            if kind == FrameKind::Skip {
                debug_assert!(len >= 1);
                self.commit(len as usize);
                continue;
            }
            let cells = frame_cells(len as usize);
            if cells == 1 {
                return Some(RingFrame {
                    frame: std::ptr::from_ref(first),
                    cells,
                });
            }
            let chunk = self.consumer.read_chunk(cells).ok()?;
            let (a, b) = chunk.as_slices();
            debug_assert!(b.is_empty(), "frames never wrap");
            return Some(RingFrame {
                frame: a.as_ptr(),
                cells,
            });
        }
    }

    /// Every cell the ring holds now, in place, without consuming any: up to two runs of
    /// cells (the second when the ring wraps), as (first cell, count). Frames never
    /// straddle the runs (the producer pads the end of the ring with a skip frame).
    pub(crate) fn peek_all(&mut self) -> [(*const Cell, usize); 2] {
        let n = self.consumer.slots();
        match self.consumer.read_chunk(n) {
            Ok(chunk) => {
                let (a, b) = chunk.as_slices();
                [(a.as_ptr(), a.len()), (b.as_ptr(), b.len())]
            }
            Err(_) => [(std::ptr::null(), 0); 2],
        }
    }

    /// Consumes `cells` cells (a frame previously returned by [`peek`](Self::peek)).
    #[inline]
    pub(crate) fn commit(&mut self, cells: usize) {
        if cells == 1 {
            let popped = self.consumer.pop();
            debug_assert!(popped.is_ok(), "committing a cell the ring does not hold");
        } else if let Ok(chunk) = self.consumer.read_chunk(cells) {
            chunk.commit_all();
        } else {
            debug_assert!(false, "committing more cells than the ring holds");
        }
        // SYNC POINT with the heavy barrier of a sender parking for space (`LinkShared`).
        barrier::light();
        if self.shared.sender_waiting.load(Ordering::Relaxed) {
            self.wake_sender();
        }
    }

    #[cold]
    fn wake_sender(&self) {
        if self.shared.sender_waiting.swap(false, Ordering::AcqRel) {
            self.source_ep.wake.notify();
        }
    }

    /// Whether the ring itself (not the overflow queue) has a frame waiting.
    pub(crate) fn ring_has_data(&self) -> bool {
        !self.consumer.is_empty()
    }

    /// Consumes one message of frame `f` (the head of the ring, from [`peek`](Self::peek)):
    /// the next entry of a pack frame (the frame itself once its last entry is consumed),
    /// or the whole frame.
    #[inline]
    pub(crate) fn consume_one(&mut self, f: RingFrame) {
        // SAFETY: `peek` returned an initialised frame in place, not yet committed.
        let h = FrameHeader::read_in_process(unsafe { &*f.frame });
        if h.kind() == FrameKind::Pack {
            self.pack_next += 1;
            if self.pack_next < h.pack().1 {
                return;
            }
            self.pack_next = 0;
        }
        self.commit(f.cells);
    }

    /// Copies a frame read in place out of the ring and consumes it there.
    pub(crate) fn take_owned(&mut self, f: RingFrame) -> OwnedFrame {
        debug_assert!(
            self.pack_next == 0,
            "a pack frame is taken with take_frames"
        );
        // SAFETY: `peek` returned `cells` initialised, contiguous cells that are not yet
        // committed (so not overwritten); they are copied before the commit.
        let cells = unsafe { std::slice::from_raw_parts(f.frame, f.cells) };
        let owned = OwnedFrame {
            cells: cells.into(),
        };
        self.commit(f.cells);
        owned
    }

    /// Copies the messages of a frame read in place out of the ring, in order, and
    /// consumes the frame there: a pack frame gives one ordinary copy frame per entry not
    /// yet consumed; any other frame gives itself.
    pub(crate) fn take_frames(&mut self, f: RingFrame, mut put: impl FnMut(OwnedFrame)) {
        // SAFETY: `peek` returned an initialised frame in place, not yet committed.
        let h = FrameHeader::read_in_process(unsafe { &*f.frame });
        if h.kind() != FrameKind::Pack {
            put(self.take_owned(f));
            return;
        }
        let (len, count) = h.pack();
        let stride = pack_stride(len as usize);
        let entry = h.entry();
        for k in self.pack_next..count {
            let mut cells = vec![Cell::default(); frame_cells(len as usize)].into_boxed_slice();
            entry.write_to(cells.as_mut_ptr());
            // SAFETY: entry `k` of the pack lies inside its `f.cells` cells (`len` bytes at
            // `HEADER_BYTES + k * stride`), which are initialised and not yet committed;
            // the new frame has room for `len` bytes after its header.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    f.frame.cast::<u8>().add(HEADER_BYTES + k as usize * stride),
                    cells.as_mut_ptr().cast::<u8>().add(HEADER_BYTES),
                    len as usize,
                );
            }
            put(OwnedFrame { cells });
        }
        self.pack_next = 0;
        self.commit(f.cells);
    }

    /// Moves the messages of frame `f` (the head of the ring, from [`peek`](Self::peek))
    /// to the end of the overflow queue, in order (see [`take_frames`](Self::take_frames)).
    pub(crate) fn set_aside(&mut self, f: RingFrame) {
        let mut overflow = std::mem::take(&mut self.overflow);
        self.take_frames(f, |owned| overflow.push_back(owned));
        self.overflow = overflow;
    }

    /// Consumes every frame; the transferred values nobody took go to `drops` (the caller
    /// drops them once it holds no lock). Returns how many messages.
    pub(crate) fn discard_all(&mut self, drops: &mut Vec<TransferPayload>) -> u64 {
        let mut n = 0;
        for f in self.overflow.drain(..) {
            if let Some(t) = f.transfer() {
                drops.push(t);
            }
            n += 1;
        }
        while let Some(f) = self.peek() {
            self.take_frames(f, |owned| {
                if let Some(t) = owned.transfer() {
                    drops.push(t);
                }
                n += 1;
            });
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::endpoint::BytesSource;

    fn pair(cells: usize) -> (OutLink, InLink) {
        let ring = new_ring(cells);
        let ep = Arc::new(EndpointShared::new(1, Arc::new(AtomicU64::new(0))));
        let out = OutLink::new(ring.producer, ring.shared.clone(), ep.clone());
        let inl = InLink::new(ring.consumer, ep, ring.shared);
        (out, inl)
    }

    fn header() -> FrameHeader {
        FrameHeader::new(FrameKind::Copy, 0, 7, 1, 1, 0)
    }

    /// Reads one frame and returns its payload.
    fn read(inl: &mut InLink) -> Option<Vec<u8>> {
        let f = inl.peek()?;
        // SAFETY: `peek` returned an initialised frame in place, not yet committed.
        let cell = unsafe { &*f.frame };
        let h = FrameHeader::read_from(cell).expect("a valid header");
        // SAFETY: the frame's `len` payload bytes follow its header, inside its cells.
        let bytes = unsafe {
            std::slice::from_raw_parts(f.frame.cast::<u8>().add(HEADER_BYTES), h.len() as usize)
        }
        .to_vec();
        inl.commit(f.cells);
        Some(bytes)
    }

    #[test]
    fn a_stream_still_fills_the_whole_ring() {
        let (mut out, mut inl) = pair(1024);
        // The reader keeps up for a while, then stops: the writer fills every cell of the
        // ring, wrapping past its end.
        for i in 0..100u8 {
            assert_eq!(
                out.write(header(), &mut BytesSource(&[i])),
                WriteOutcome::Written
            );
            assert_eq!(read(&mut inl), Some(vec![i]));
        }
        let mut written = 0u32;
        while out.write(header(), &mut BytesSource(&written.to_le_bytes())) == WriteOutcome::Written
        {
            written += 1;
        }
        // One-cell frames: every cell of the ring holds one.
        assert_eq!(written, 1024, "{written} frames fit");
        for k in 0..written {
            assert_eq!(read(&mut inl), Some(k.to_le_bytes().to_vec()), "frame {k}");
        }
        assert!(read(&mut inl).is_none());
        // Once read, the whole ring is free again.
        let mut again = 0;
        while out.write(header(), &mut BytesSource(&[1])) == WriteOutcome::Written {
            again += 1;
        }
        assert!(again >= 1024 - 1, "{again} frames fit after draining");
    }

    #[test]
    fn a_receiver_that_keeps_up_sees_the_sender_use_every_cell_in_turn() {
        for cap in [64, 1024] {
            let (mut out, mut inl) = pair(cap);
            let mut positions = Vec::new();
            for i in 0..3 * cap as u64 {
                positions.push(out.pos);
                assert_eq!(
                    out.write(header(), &mut BytesSource(&i.to_le_bytes())),
                    WriteOutcome::Written
                );
                assert_eq!(read(&mut inl), Some(i.to_le_bytes().to_vec()), "frame {i}");
                assert!(read(&mut inl).is_none());
            }
            // One-cell frames, written at 0, 1, 2, ... and around again: never back to
            // the start before the end of the ring.
            let expected: Vec<usize> = (0..3 * cap).map(|k| k % cap).collect();
            assert_eq!(positions, expected, "ring of {cap} cells");
        }
    }
}
