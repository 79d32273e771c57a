//! One direction of one pair: an `rtrb` ring of [`Cell`]s carrying frames.
//!
//! The producer half ([`OutLink`]) lives in the sending thread's endpoint, the consumer
//! half ([`InLink`]) in the receiving thread's: each half has exactly one owner thread, so
//! the ring is never used as MPSC or MPMC.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::sync::Arc;

use rtrb::{Consumer, Producer, RingBuffer};

use crate::endpoint::EndpointShared;
use crate::frame::{
    payload_cells, Cell, FrameHeader, FrameKind, RingError, TransferPayload, HEADER_CELLS,
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
    /// Writes the payload into `cells` and returns its length in bytes.
    fn fill(&mut self, cells: &mut [MaybeUninit<Cell>]) -> Result<usize, RingError>;
}

/// A frame held outside a ring: drained from a ring while its owner was blocked
/// (receiver side), or spilled by a sender that could not wait (sender side).
pub(crate) struct OwnedFrame {
    pub header: FrameHeader,
    pub payload: Box<[Cell]>,
}

impl OwnedFrame {
    /// Drops the transferred value, if this frame carries one that nobody took.
    pub(crate) fn discard(self) {
        if self.header.kind == FrameKind::Transfer {
            if let Some(cell) = self.payload.first() {
                // SAFETY: transfer frames are only built by `TransferSource` in this
                // process; the value was not taken (the frame is being discarded whole).
                unsafe {
                    let t = TransferPayload::decode(cell);
                    (t.drop_fn)(t.ptr);
                }
            }
        }
    }
}

impl FrameSource for OwnedFrame {
    fn fill(&mut self, cells: &mut [MaybeUninit<Cell>]) -> Result<usize, RingError> {
        let n = self.payload.len();
        if n > cells.len() {
            return Err(RingError::NoRoom);
        }
        for (dst, src) in cells.iter_mut().zip(self.payload.iter()) {
            dst.write(*src);
        }
        Ok(self.header.len as usize)
    }
}

/// Creates a ring of `cells` cells.
pub(crate) fn new_ring(cells: usize) -> (Producer<Cell>, Consumer<Cell>) {
    RingBuffer::new(cells)
}

/// The sending half of a link.
pub(crate) struct OutLink {
    producer: Producer<Cell>,
    /// The receiving endpoint.
    pub target: Arc<EndpointShared>,
    cap: usize,
    /// Our write position modulo `cap` (we are the only writer, so it is exact).
    pos: usize,
    /// Frames that could not be written yet; they go before any later frame.
    pub spill: VecDeque<OwnedFrame>,
}

impl OutLink {
    pub(crate) fn new(producer: Producer<Cell>, target: Arc<EndpointShared>) -> Self {
        let cap = producer.buffer().capacity();
        Self {
            producer,
            target,
            cap,
            pos: 0,
            spill: VecDeque::new(),
        }
    }

    /// Ring capacity in cells.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Cells the ring currently holds (written, not yet read).
    pub(crate) fn occupancy(&self) -> usize {
        self.cap - self.producer.slots()
    }

    /// Writes one frame: `header` (its `len` is set from what `src` wrote) and the payload
    /// `src` produces, contiguous, never wrapping. Publishes it with one index store.
    pub(crate) fn write(
        &mut self,
        mut header: FrameHeader,
        src: &mut impl FrameSource,
    ) -> WriteOutcome {
        let mut refreshed = false;
        loop {
            let avail = if refreshed {
                self.producer.slots()
            } else {
                self.producer.cached_slots()
            };
            let to_end = self.cap - self.pos;
            let contiguous = avail.min(to_end);
            if contiguous >= HEADER_CELLS {
                let Ok(mut chunk) = self.producer.write_chunk_uninit(contiguous) else {
                    // Cannot happen: `contiguous <= avail`, and free space only grows.
                    refreshed = true;
                    continue;
                };
                let (first, _) = chunk.as_mut_slices();
                debug_assert_eq!(first.len(), contiguous);
                match src.fill(&mut first[HEADER_CELLS..]) {
                    Ok(len) => {
                        let Ok(len32) = u32::try_from(len) else {
                            return WriteOutcome::TooLarge;
                        };
                        header.len = len32;
                        let cells = header.frame_cells();
                        debug_assert!(cells <= contiguous);
                        let [h0, h1] = header.encode();
                        first[0].write(h0);
                        first[1].write(h1);
                        // Padding bytes of the last cell are never read; leave them.
                        // SAFETY: cells 0..2 are the header written just above and
                        // 2..cells hold the `len` payload bytes `fill` wrote; the tail of the
                        // last cell is padding that no reader interprets.
                        unsafe { chunk.commit(cells) };
                        self.pos += cells;
                        if self.pos == self.cap {
                            self.pos = 0;
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
                // The whole rest of the ring is free but too small: pad it with a skip
                // frame so the next attempt starts at the beginning.
                let Ok(mut chunk) = self.producer.write_chunk_uninit(to_end) else {
                    return WriteOutcome::Full;
                };
                chunk.as_mut_slices().0[0].write(FrameHeader::skip_cell(to_end));
                // SAFETY: only the first cell of a skip frame is ever read; it is written.
                unsafe { chunk.commit(to_end) };
                self.pos = 0;
                continue;
            }
            if self.pos == 0 && avail == self.cap {
                return WriteOutcome::TooLarge;
            }
            return WriteOutcome::Full;
        }
    }

    /// Writes spilled frames while they fit. Returns how many were written; the caller
    /// must wake the target if any were.
    pub(crate) fn flush_spill(&mut self) -> usize {
        let mut written = 0;
        while let Some(mut f) = self.spill.pop_front() {
            match self.write(f.header, &mut f) {
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

/// Where the payload of a frame read in place lives.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingFrame {
    pub header: FrameHeader,
    pub payload: *const Cell,
    pub cells: usize,
}

/// The receiving half of a link.
pub(crate) struct InLink {
    consumer: Consumer<Cell>,
    /// Endpoint id of the producer.
    pub source: u32,
    /// Frames drained from the ring while the owner was blocked; they come first.
    pub overflow: VecDeque<OwnedFrame>,
    /// A message read from this link is held by the user (the ring head is pinned).
    pub held: bool,
}

impl InLink {
    pub(crate) fn new(consumer: Consumer<Cell>, source: u32) -> Self {
        Self {
            consumer,
            source,
            overflow: VecDeque::new(),
            held: false,
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
        self.consumer.is_abandoned() && !self.has_data()
    }

    /// The next frame in the ring, in place, without consuming it. Skip frames are
    /// consumed on the way.
    #[inline]
    pub(crate) fn peek(&mut self) -> Option<RingFrame> {
        loop {
            let first = *self.consumer.peek().ok()?;
            let Some((len, kind)) = FrameHeader::decode_first(&first) else {
                debug_assert!(false, "corrupt frame kind in an in-process ring");
                return None;
            };
            if kind == FrameKind::Skip {
                debug_assert!(len >= 1);
                self.commit(len as usize);
                continue;
            }
            let cells = HEADER_CELLS + payload_cells(len as usize);
            let chunk = self.consumer.read_chunk(cells).ok()?;
            let (a, b) = chunk.as_slices();
            debug_assert!(b.is_empty(), "frames never wrap");
            let header = FrameHeader::decode(&[a[0], a[1]])?;
            return Some(RingFrame {
                header,
                payload: a[HEADER_CELLS..].as_ptr(),
                cells,
            });
        }
    }

    /// Consumes `cells` cells (a frame previously returned by [`peek`](Self::peek)).
    #[inline]
    pub(crate) fn commit(&mut self, cells: usize) {
        if let Ok(chunk) = self.consumer.read_chunk(cells) {
            chunk.commit_all();
        } else {
            debug_assert!(false, "committing more cells than the ring holds");
        }
    }

    /// Moves every frame of the ring into `overflow` (frees the ring for the producer).
    /// Returns the number of frames moved.
    pub(crate) fn drain_to_overflow(&mut self) -> usize {
        debug_assert!(!self.held);
        let mut n = 0;
        while let Some(f) = self.peek() {
            let payload_len = f.cells - HEADER_CELLS;
            // SAFETY: `peek` returned a frame whose `cells - HEADER_CELLS` payload cells
            // are initialised, contiguous and not yet committed (so not overwritten).
            let payload = unsafe { std::slice::from_raw_parts(f.payload, payload_len) };
            self.overflow.push_back(OwnedFrame {
                header: f.header,
                payload: payload.into(),
            });
            self.commit(f.cells);
            n += 1;
        }
        n
    }

    /// Consumes and discards every frame (dropping untaken transfers). Returns how many.
    pub(crate) fn discard_all(&mut self) -> u64 {
        let mut n = 0;
        for f in self.overflow.drain(..) {
            f.discard();
            n += 1;
        }
        while let Some(f) = self.peek() {
            if f.header.kind == FrameKind::Transfer {
                // SAFETY: the payload cell of a transfer frame written in this process;
                // nobody took the value (the frame is still in the ring).
                unsafe {
                    let t = TransferPayload::decode(&*f.payload);
                    (t.drop_fn)(t.ptr);
                }
            }
            self.commit(f.cells);
            n += 1;
        }
        n
    }
}
