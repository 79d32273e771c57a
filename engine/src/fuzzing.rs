//! Entry points for the fuzz targets in `fuzz/` (and the tests that replay their
//! corpora): each takes arbitrary bytes and panics only when the engine breaks one of its
//! guarantees. Not part of the API.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::endpoint::{BytesSource, EndpointShared};
use crate::frame::{frame_cells, FrameHeader, FrameKind, RingError, CELL_BYTES, HEADER_BYTES};
use crate::link::{new_ring, InLink, OutLink, WriteOutcome};

/// Reads bytes one at a time; zero once they run out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A payload that names itself: the frame's sequence number, then a pattern from it.
fn payload(seq: u32, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len)
        .map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8)
        .collect();
    for (d, s) in p.iter_mut().zip(seq.to_le_bytes()) {
        *d = s;
    }
    p
}

/// Frames on a tiny ring against a `VecDeque` model: arbitrary sequences of single
/// writes, batch writes and reads, with sizes that force wrap-around, skip frames, and
/// full and empty rings. Every frame reported written is read back once, in order, with
/// its exact bytes; a write into a ring that holds no frame succeeds (at the latest once
/// the reader has passed the skip frame that padded the ring's tail), and one is refused
/// as too large only when it could never fit.
pub fn frames(data: &[u8]) {
    let mut input = Input(data);
    let cap = 2 + usize::from(input.byte() % 15);
    let ring = new_ring(cap);
    let undelivered = Arc::new(AtomicU64::new(0));
    let ep = Arc::new(EndpointShared::new(1, undelivered));
    let mut out = OutLink::new(ring.producer, ring.shared.clone(), ep.clone());
    let mut inl = InLink::new(ring.consumer, ep, ring.shared);
    let mut model: VecDeque<Vec<u8>> = VecDeque::new();
    let mut seq = 0u32;
    let header = FrameHeader {
        len: 0,
        kind: FrameKind::Copy,
        flags: 0,
        tag: 7,
        sender: 1,
        reply_to: 1,
        correlation: 0,
    };
    // Payload sizes up to the whole ring and a little more.
    let size = |b: u8, scale: u8| -> usize {
        let max = cap * CELL_BYTES;
        (usize::from(b) * (usize::from(scale % 4) + 1) * 2) % (max + 8)
    };
    while !input.is_empty() {
        match input.byte() % 4 {
            0 => {
                let len = size(input.byte(), input.byte());
                let p = payload(seq, len);
                let mut outcome = out.write(header, &mut BytesSource(&p));
                if outcome == WriteOutcome::Full && model.is_empty() {
                    // Only a skip frame can be in the way (the tail of the ring was too
                    // short): once the reader has passed it, the frame must fit.
                    assert!(!read_one(&mut inl, &mut model));
                    outcome = out.write(header, &mut BytesSource(&p));
                    assert_ne!(
                        outcome,
                        WriteOutcome::Full,
                        "refused as full: {len} bytes into an empty ring of {cap} cells"
                    );
                }
                match outcome {
                    WriteOutcome::Written => {
                        model.push_back(p);
                        seq += 1;
                    }
                    // "Not now": the ring holds frames (a frame too large for any ring
                    // is only recognised as such on an empty ring; `send` checks it
                    // off the ring instead).
                    WriteOutcome::Full => assert!(!model.is_empty()),
                    WriteOutcome::TooLarge => {
                        assert!(frame_cells(len) > cap, "refused as too large: {len} bytes")
                    }
                    WriteOutcome::Failed => panic!("copying bytes cannot fail"),
                }
            }
            1 => {
                let count = usize::from(input.byte() % 8);
                let len = size(input.byte(), 0);
                let batch: Vec<Vec<u8>> =
                    (0..count).map(|k| payload(seq + k as u32, len)).collect();
                let written = out
                    .write_batch(header, count, |k, window: &mut [MaybeUninit<u8>]| {
                        let p = &batch[k];
                        if p.len() > window.len() {
                            return Err(RingError::NoRoom);
                        }
                        for (d, s) in window.iter_mut().zip(p) {
                            d.write(*s);
                        }
                        Ok(p.len())
                    })
                    .expect("copying bytes cannot fail");
                assert!(written <= count);
                for p in batch.into_iter().take(written) {
                    model.push_back(p);
                    seq += 1;
                }
            }
            2 => {
                read_one(&mut inl, &mut model);
            }
            _ => while read_one(&mut inl, &mut model) {},
        }
    }
    while read_one(&mut inl, &mut model) {}
    assert!(
        model.is_empty(),
        "{} frames written were never read",
        model.len()
    );
    assert!(
        !inl.ring_has_data(),
        "the ring holds cells after the last frame"
    );
}

/// Reads one frame and checks it against the model's next one. Returns whether a frame
/// was read.
fn read_one(inl: &mut InLink, model: &mut VecDeque<Vec<u8>>) -> bool {
    let Some(f) = inl.peek() else {
        assert!(
            model.is_empty(),
            "{} frames written but not readable",
            model.len()
        );
        return false;
    };
    let expected = model.pop_front().expect("a frame that was never written");
    // SAFETY: `peek` returned `f.cells` initialised cells in place, not yet committed.
    let cells = unsafe { std::slice::from_raw_parts(f.frame, f.cells) };
    let h = FrameHeader::read_from(&cells[0]).expect("a valid header");
    assert_eq!(h.kind, FrameKind::Copy);
    assert_eq!(h.len as usize, expected.len(), "frame length");
    assert_eq!(f.cells, frame_cells(expected.len()), "frame cells");
    // SAFETY: the frame's payload follows its header inside these cells.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            cells.as_ptr().cast::<u8>().add(HEADER_BYTES),
            expected.len(),
        )
    };
    assert_eq!(bytes, &expected[..], "frame bytes");
    inl.commit(f.cells);
    true
}

/// Arbitrary bytes presented as what arrives from outside the process: a frame header,
/// and a payload claimed to be each of the types the engine accepts from other languages
/// or nodes (the scheduler's requests, replies and results, and common values). Each must
/// be rejected with an error or validated; never a crash.
pub fn untrusted(data: &[u8]) {
    let _ = FrameHeader::decode(data);
    let _ = FrameHeader::decode_first(data);
    crate::task::check_untrusted(data);
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(data.len());
    aligned.extend_from_slice(data);
    macro_rules! check {
        ($($t:ty),*) => {$(
            if let Ok(v) = rkyv::access::<rkyv::Archived<$t>, rkyv::rancor::Error>(&aligned) {
                // A validated archive must be readable all the way through.
                let _ = format!("{v:?}");
            }
        )*};
    }
    check!(
        String,
        Vec<u8>,
        Vec<String>,
        (u32, String),
        Option<Vec<u64>>,
        u64
    );
}
