//! The wire format of a link: 16-byte cells, a two-cell frame header, skip frames.
//!
//! A ring is a sequence of [`Cell`]s. A frame is a [`FrameHeader`] (two cells) followed by
//! its payload, rounded up to whole cells. A frame never wraps around the end of the ring:
//! when it does not fit before the end, the producer writes a *skip frame* that pads to the
//! end and starts the frame at the beginning. Only the first cell of a skip frame is
//! meaningful, so a skip frame fits in any gap of at least one cell.
//!
//! Layout (little-endian, stable: C and the network read the same bytes):
//!
//! | cell | bytes  | field                                                          |
//! |------|--------|----------------------------------------------------------------|
//! | 0    | 0..4   | `len`: payload bytes (for a skip frame: cells to skip)         |
//! | 0    | 4      | `kind`: [`FrameKind`]                                          |
//! | 0    | 5      | `flags`: reserved, zero                                        |
//! | 0    | 6..8   | reserved, zero                                                 |
//! | 0    | 8..16  | `tag`: [`TypeTag`] of the payload                              |
//! | 1    | 0..4   | `sender`: endpoint id of the sender (0: none)                  |
//! | 1    | 4..8   | `reply_to`: endpoint id replies go to (0: none)                |
//! | 1    | 8..16  | `correlation`: request/reply correlation id (0: none)          |

use std::any::TypeId;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::mem::MaybeUninit;

use rkyv::rancor::{Source, Trace};
use rkyv::ser::writer::Positional;
use rkyv::ser::Writer;

/// The unit of ring memory: 16 bytes, 16-aligned, so every frame payload starts at an
/// address rkyv can read archived values from in place.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cell(pub [u8; 16]);

/// Bytes per cell.
pub const CELL_BYTES: usize = 16;
/// Cells taken by a frame header.
pub const HEADER_CELLS: usize = 2;

/// A 64-bit tag naming the type of a payload.
///
/// Rust types get [`type_tag`]`::<T>()`, which has the top bit set. Tags with the top bit
/// clear are free for applications (C programs, explicit wire types).
pub type TypeTag = u64;

/// The top bit marks tags derived from Rust types.
pub const RUST_TAG_BIT: u64 = 1 << 63;

/// What a frame carries.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// An rkyv archive (or raw bytes), read in place by the receiver.
    Copy = 1,
    /// An owned pointer moved through the ring: [`TransferPayload`].
    Transfer = 2,
    /// Padding to the end of the ring; `len` counts the cells to skip.
    Skip = 3,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Copy),
            2 => Some(Self::Transfer),
            3 => Some(Self::Skip),
            _ => None,
        }
    }
}

/// The decoded two-cell frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length in bytes (skip frames: cells to skip).
    pub len: u32,
    /// What the payload is.
    pub kind: FrameKind,
    /// Type tag of the payload.
    pub tag: TypeTag,
    /// Endpoint id of the sender, 0 for none.
    pub sender: u32,
    /// Endpoint id replies should go to, 0 for none.
    pub reply_to: u32,
    /// Correlation id for request/reply, 0 for none.
    pub correlation: u64,
}

impl FrameHeader {
    /// Cells taken by the whole frame, header included.
    #[inline]
    pub fn frame_cells(&self) -> usize {
        match self.kind {
            FrameKind::Skip => self.len as usize,
            _ => HEADER_CELLS + payload_cells(self.len as usize),
        }
    }

    /// Encodes the header into its two cells.
    #[inline]
    pub fn encode(&self) -> [Cell; HEADER_CELLS] {
        let mut a = [0u8; 16];
        a[0..4].copy_from_slice(&self.len.to_le_bytes());
        a[4] = self.kind as u8;
        a[8..16].copy_from_slice(&self.tag.to_le_bytes());
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.sender.to_le_bytes());
        b[4..8].copy_from_slice(&self.reply_to.to_le_bytes());
        b[8..16].copy_from_slice(&self.correlation.to_le_bytes());
        [Cell(a), Cell(b)]
    }

    /// Decodes the first cell: length and kind. `None` for an unknown kind.
    #[inline]
    pub fn decode_first(cell: &Cell) -> Option<(u32, FrameKind)> {
        let len = u32::from_le_bytes(cell.0[0..4].try_into().ok()?);
        Some((len, FrameKind::from_u8(cell.0[4])?))
    }

    /// Decodes both header cells. `None` for an unknown kind.
    #[inline]
    pub fn decode(cells: &[Cell; HEADER_CELLS]) -> Option<Self> {
        let (len, kind) = Self::decode_first(&cells[0])?;
        let a = &cells[0].0;
        let b = &cells[1].0;
        Some(Self {
            len,
            kind,
            tag: u64::from_le_bytes(a[8..16].try_into().ok()?),
            sender: u32::from_le_bytes(b[0..4].try_into().ok()?),
            reply_to: u32::from_le_bytes(b[4..8].try_into().ok()?),
            correlation: u64::from_le_bytes(b[8..16].try_into().ok()?),
        })
    }

    /// The first cell of a skip frame covering `cells` cells.
    pub fn skip_cell(cells: usize) -> Cell {
        let mut a = [0u8; 16];
        a[0..4].copy_from_slice(&(cells as u32).to_le_bytes());
        a[4] = FrameKind::Skip as u8;
        Cell(a)
    }
}

/// Cells needed for `bytes` bytes of payload.
#[inline]
pub const fn payload_cells(bytes: usize) -> usize {
    bytes.div_ceil(CELL_BYTES)
}

/// The payload of a transfer frame: the moved pointer and the function that drops it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TransferPayload {
    pub ptr: *mut u8,
    pub drop_fn: unsafe fn(*mut u8),
}

impl TransferPayload {
    pub const BYTES: usize = 16;

    pub fn encode(&self) -> Cell {
        let mut a = [0u8; 16];
        a[0..8].copy_from_slice(&(self.ptr as usize as u64).to_le_bytes());
        a[8..16].copy_from_slice(&(self.drop_fn as usize as u64).to_le_bytes());
        Cell(a)
    }

    /// # Safety
    /// `cell` must have been produced by [`TransferPayload::encode`] in this process.
    pub unsafe fn decode(cell: &Cell) -> Self {
        let ptr = u64::from_le_bytes(cell.0[0..8].try_into().unwrap_or([0; 8])) as usize;
        let f = u64::from_le_bytes(cell.0[8..16].try_into().unwrap_or([0; 8])) as usize;
        debug_assert!(f != 0);
        Self {
            ptr: ptr as *mut u8,
            // SAFETY: the caller guarantees `f` came from `encode` of a valid
            // `unsafe fn(*mut u8)` in this process, and fn pointers round-trip through usize.
            drop_fn: unsafe { std::mem::transmute::<usize, unsafe fn(*mut u8)>(f) },
        }
    }
}

/// Drops a `Box<T>` leaked with `Box::into_raw`.
///
/// # Safety
/// `ptr` must come from `Box::<T>::into_raw` and not have been reclaimed.
pub(crate) unsafe fn drop_box<T>(ptr: *mut u8) {
    // SAFETY: guaranteed by the caller.
    drop(unsafe { Box::from_raw(ptr.cast::<T>()) });
}

/// Folds the words a [`TypeId`] hashes into one `u64`.
struct FoldHasher(u64);

impl Hasher for FoldHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.0 = self.0.rotate_left(29) ^ v;
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The [`TypeTag`] of a Rust type: derived from its `TypeId`, stable within one build of
/// a program, top bit set. Computed at compile time in optimised builds.
#[inline]
pub fn type_tag<T: ?Sized + 'static>() -> TypeTag {
    let mut h = FoldHasher(0);
    TypeId::of::<T>().hash(&mut h);
    h.finish() | RUST_TAG_BIT
}

/// The error of serialising into ring memory: out of room (try elsewhere or later), or a
/// failure reported by the value's own serialiser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The window of cells was too small.
    NoRoom,
    /// The serialiser failed for another reason.
    Failed,
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoRoom => "no room in the ring window",
            Self::Failed => "serialisation failed",
        })
    }
}

impl std::error::Error for RingError {}

impl Trace for RingError {
    fn trace<R>(self, _trace: R) -> Self
    where
        R: fmt::Debug + fmt::Display + Send + Sync + 'static,
    {
        self
    }
}

impl Source for RingError {
    fn new<T: std::error::Error + Send + Sync + 'static>(_source: T) -> Self {
        Self::Failed
    }
}

/// The writer rkyv serialises into: a window of uninitialised ring cells (or a spill
/// buffer). Users never build one; it appears in the [`Payload`](crate::Payload) bound.
pub struct RingWriter {
    ptr: *mut u8,
    cap: usize,
    pos: usize,
}

impl RingWriter {
    pub(crate) fn new(cells: &mut [MaybeUninit<Cell>]) -> Self {
        Self {
            ptr: cells.as_mut_ptr().cast::<u8>(),
            cap: cells.len() * CELL_BYTES,
            pos: 0,
        }
    }
}

impl Positional for RingWriter {
    #[inline]
    fn pos(&self) -> usize {
        self.pos
    }
}

impl Writer<RingError> for RingWriter {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), RingError> {
        if bytes.len() > self.cap - self.pos {
            return Err(RingError::NoRoom);
        }
        debug_assert!(self.pos + bytes.len() <= self.cap);
        // SAFETY: `ptr..ptr+cap` is a region of cells this writer borrows exclusively (the
        // uncommitted part of a write chunk or a spill buffer); the bounds check above keeps
        // the copy inside it, and `bytes` cannot overlap memory we hold exclusively.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(self.pos), bytes.len());
        }
        self.pos += bytes.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = FrameHeader {
            len: 1234,
            kind: FrameKind::Transfer,
            tag: 0xdead_beef_1234_5678,
            sender: 7,
            reply_to: 9,
            correlation: u64::MAX - 1,
        };
        let cells = h.encode();
        assert_eq!(FrameHeader::decode(&cells), Some(h));
        assert_eq!(h.frame_cells(), 2 + 78);
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let mut c = FrameHeader::skip_cell(3);
        c.0[4] = 99;
        assert_eq!(FrameHeader::decode_first(&c), None);
    }

    #[test]
    fn type_tags_differ_and_are_marked() {
        assert_ne!(type_tag::<u64>(), type_tag::<u32>());
        assert_ne!(type_tag::<String>(), type_tag::<Vec<u8>>());
        assert_eq!(type_tag::<u64>(), type_tag::<u64>());
        assert!(type_tag::<u8>() & RUST_TAG_BIT != 0);
    }

    #[test]
    fn writer_reports_overflow() {
        let mut cells = [MaybeUninit::<Cell>::uninit(); 1];
        let mut w = RingWriter::new(&mut cells);
        assert!(w.write(&[1; 10]).is_ok());
        assert_eq!(w.write(&[1; 7]), Err(RingError::NoRoom));
        assert_eq!(w.pos(), 10);
    }
}
