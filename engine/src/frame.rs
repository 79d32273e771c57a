//! The wire format of a link: 64-byte cells, a 32-byte frame header, skip frames.
//!
//! A ring is a sequence of [`Cell`]s, each one cache line (64 bytes, 64-aligned). A frame
//! is a [`FrameHeader`] (32 bytes) followed at once by its payload, rounded up to whole
//! cells: a message of up to 32 payload bytes is one cache line, so a small message costs
//! the receiver one line transfer, like a raw ring of words. Payloads start 16-aligned,
//! as rkyv's in-place access requires. A frame never wraps around the end of the ring:
//! when it does not fit before the end, the producer writes a *skip frame* that pads to
//! the end and starts the frame at the beginning. A skip frame is one header whose `len`
//! counts the cells to skip.
//!
//! A *pack frame* carries several messages of one sender, type and length in one header
//! (written by batch sends of small values): its payload is `count` entries of
//! [`pack_stride`]`(entry_len)` bytes each (the entry's bytes, then zeros), so an 8-byte
//! message costs 16 bytes of ring instead of a 64-byte cell. Its `len` is the whole
//! payload (`count * stride`) and its `correlation` holds `entry_len | count << 32`; it
//! never carries flags or a correlation id of its own. Readers present each entry as an
//! ordinary copy message; pack frames never leave the process.
//!
//! Header layout (little-endian, stable: C and the network read the same bytes):
//!
//! | bytes  | field                                                            |
//! |--------|------------------------------------------------------------------|
//! | 0..4   | `len`: payload bytes (for a skip frame: cells to skip)           |
//! | 4      | `kind`: [`FrameKind`]                                            |
//! | 5      | `flags`: [`FLAG_CALL`], [`FLAG_REPLY`], [`FLAG_ERROR`], [`FLAG_RAW`] |
//! | 6..8   | reserved, zero                                                   |
//! | 8..16  | `tag`: [`TypeTag`] of the payload                                |
//! | 16..20 | `sender`: endpoint id of the sender (0: none)                    |
//! | 20..24 | `reply_to`: endpoint id replies go to (0: none)                  |
//! | 24..32 | `correlation`: request/reply correlation id (0: none)            |
//! | 32..   | payload                                                          |

use std::alloc::Layout;
use std::any::TypeId;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ptr::NonNull;

use rkyv::rancor::{Source, Trace};
use rkyv::ser::allocator::{Allocator, Arena, ArenaHandle};
use rkyv::ser::writer::Positional;
use rkyv::ser::Writer;

/// The unit of ring memory: one cache line, 64-aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cell(pub [u8; 64]);

impl Default for Cell {
    fn default() -> Self {
        Self([0; 64])
    }
}

/// Bytes per cell.
pub const CELL_BYTES: usize = 64;
/// Bytes of a frame header; the payload follows at this offset.
pub const HEADER_BYTES: usize = 32;

/// A 64-bit tag naming the type of a payload.
///
/// Rust types get [`type_tag`]`::<T>()`, which has the top bit set. Tags with the top bit
/// clear are free for applications (C programs, explicit wire types).
pub type TypeTag = u64;

/// The top bit marks tags derived from Rust types.
pub const RUST_TAG_BIT: u64 = 1 << 63;

/// Header flag: a request made with `call`/`request`; its replies carry [`FLAG_REPLY`].
pub const FLAG_CALL: u8 = 1;
/// Header flag: the reply to a request; `correlation` names the request.
pub const FLAG_REPLY: u8 = 2;
/// Header flag (with [`FLAG_REPLY`]): the handler failed; the payload is the error text
/// (an archived `String`).
pub const FLAG_ERROR: u8 = 4;

/// Header flag: the payload is raw bytes from `send_bytes` (or C, or the network), not
/// an archive rkyv wrote in this process: typed access must validate it.
pub const FLAG_RAW: u8 = 8;

/// What a frame carries.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// An rkyv archive (or raw bytes), read in place by the receiver.
    Copy = 1,
    /// An owned pointer moved through the ring (a pointer and its drop function, 16 bytes).
    Transfer = 2,
    /// Padding to the end of the ring; `len` counts the cells to skip.
    Skip = 3,
    /// Several copy messages of one length (see the module docs).
    Pack = 4,
}

impl FrameKind {
    #[inline]
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Copy),
            2 => Some(Self::Transfer),
            3 => Some(Self::Skip),
            4 => Some(Self::Pack),
            _ => None,
        }
    }
}

/// The decoded frame header, held as the four little-endian words it occupies in a cell
/// (see the table above): `head` = len | kind << 32 | flags << 40, `tag`,
/// `ids` = sender | reply_to << 32, `correlation`. Words rather than narrow fields, so
/// that building a header and then copying it moves whole words: a wide load of several
/// narrow stores just made cannot be forwarded from the store buffer and stalls.
///
/// Invariant: the kind byte is a valid [`FrameKind`] (every constructor checks it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    head: u64,
    tag: u64,
    ids: u64,
    correlation: u64,
}

impl fmt::Debug for FrameHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameHeader")
            .field("len", &self.len())
            .field("kind", &self.kind())
            .field("flags", &self.flags())
            .field("tag", &format_args!("{:#x}", self.tag))
            .field("sender", &self.sender())
            .field("reply_to", &self.reply_to())
            .field("correlation", &self.correlation)
            .finish()
    }
}

#[inline]
fn le32(b: &[u8], at: usize) -> u32 {
    let mut x = [0; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

#[inline]
fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl FrameHeader {
    /// A header with payload length 0 (writers set the length once the payload is in).
    #[inline(always)]
    pub fn new(
        kind: FrameKind,
        flags: u8,
        tag: TypeTag,
        sender: u32,
        reply_to: u32,
        correlation: u64,
    ) -> Self {
        Self {
            head: (kind as u64) << 32 | u64::from(flags) << 40,
            tag,
            ids: u64::from(sender) | u64::from(reply_to) << 32,
            correlation,
        }
    }

    /// Payload length in bytes (skip frames: cells to skip).
    #[allow(clippy::len_without_is_empty)] // a header field, not a collection
    #[inline(always)]
    pub fn len(&self) -> u32 {
        self.head as u32
    }

    /// Sets the payload length.
    #[inline(always)]
    pub fn set_len(&mut self, len: u32) {
        self.head = (self.head & !0xffff_ffff) | u64::from(len);
    }

    /// What the payload is.
    #[inline(always)]
    pub fn kind(&self) -> FrameKind {
        match (self.head >> 32) as u8 {
            1 => FrameKind::Copy,
            2 => FrameKind::Transfer,
            4 => FrameKind::Pack,
            _ => FrameKind::Skip,
        }
    }

    /// Whether the frame carries a moved value.
    #[inline(always)]
    pub fn is_transfer(&self) -> bool {
        (self.head >> 32) as u8 == FrameKind::Transfer as u8
    }

    /// `FLAG_*` bits.
    #[inline(always)]
    pub fn flags(&self) -> u8 {
        (self.head >> 40) as u8
    }

    /// Type tag of the payload.
    #[inline(always)]
    pub fn tag(&self) -> TypeTag {
        self.tag
    }

    /// Replaces the type tag.
    #[inline(always)]
    pub fn set_tag(&mut self, tag: TypeTag) {
        self.tag = tag;
    }

    /// Endpoint id of the sender, 0 for none.
    #[inline(always)]
    pub fn sender(&self) -> u32 {
        self.ids as u32
    }

    /// Endpoint id replies should go to, 0 for none.
    #[inline(always)]
    pub fn reply_to(&self) -> u32 {
        (self.ids >> 32) as u32
    }

    /// Correlation id for request/reply, 0 for none.
    #[inline(always)]
    pub fn correlation(&self) -> u64 {
        self.correlation
    }

    /// A pack frame's entry length and entry count.
    #[inline(always)]
    pub fn pack(&self) -> (u32, u32) {
        (self.correlation as u32, (self.correlation >> 32) as u32)
    }

    /// Makes this (copy) header the header of a pack of `count` entries of `entry_len`
    /// bytes each.
    #[inline]
    pub fn set_pack(&mut self, entry_len: u32, count: u32) {
        let len = pack_stride(entry_len as usize) * count as usize;
        self.head = (self.head & !0xff_ffff_ffff) | (FrameKind::Pack as u64) << 32 | len as u64;
        self.correlation = u64::from(entry_len) | u64::from(count) << 32;
    }

    /// The header each entry of this pack frame reads as: a copy frame of the entry's
    /// length, with no correlation id.
    #[inline(always)]
    pub fn entry(&self) -> Self {
        Self {
            head: (self.head & !0xff_ffff_ffff)
                | (FrameKind::Copy as u64) << 32
                | (self.correlation & 0xffff_ffff),
            tag: self.tag,
            ids: self.ids,
            correlation: 0,
        }
    }

    /// Cells taken by the whole frame, header included.
    #[inline]
    pub fn frame_cells(&self) -> usize {
        match self.kind() {
            FrameKind::Skip => self.len() as usize,
            _ => frame_cells(self.len() as usize),
        }
    }

    /// Encodes the header into its 32 bytes.
    #[inline]
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&self.head.to_le_bytes());
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..24].copy_from_slice(&self.ids.to_le_bytes());
        b[24..32].copy_from_slice(&self.correlation.to_le_bytes());
        b
    }

    /// Decodes length and kind from the first bytes of a frame. `None` for an unknown
    /// kind.
    #[inline]
    pub fn decode_first(bytes: &[u8]) -> Option<(u32, FrameKind)> {
        if bytes.len() < 5 {
            return None;
        }
        Some((le32(bytes, 0), FrameKind::from_u8(bytes[4])?))
    }

    /// Decodes a whole header. `None` if it is short or of an unknown kind. The reserved
    /// bytes 6 and 7 are ignored.
    #[inline]
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < HEADER_BYTES {
            return None;
        }
        Self::from_words([
            le64(bytes, 0),
            le64(bytes, 8),
            le64(bytes, 16),
            le64(bytes, 24),
        ])
    }

    /// The header from its four words; `None` for an unknown kind.
    #[inline(always)]
    fn from_words(w: [u64; 4]) -> Option<Self> {
        FrameKind::from_u8((w[0] >> 32) as u8)?;
        Some(Self::from_words_unchecked(w))
    }

    /// The header from its four words, kind unchecked; the reserved bytes are dropped.
    #[inline(always)]
    fn from_words_unchecked(w: [u64; 4]) -> Self {
        Self {
            head: w[0] & 0x0000_ffff_ffff_ffff,
            tag: w[1],
            ids: w[2],
            correlation: w[3],
        }
    }

    /// The four words at the start of `cell`, in native byte order.
    #[inline(always)]
    fn words(cell: &Cell) -> [u64; 4] {
        // SAFETY: a Cell is 64 initialised bytes, 64-aligned; any bit pattern is a valid
        // `[u64; 4]`.
        let w = unsafe { std::ptr::from_ref(cell).cast::<[u64; 4]>().read() };
        w.map(u64::from_le)
    }

    /// Writes the header at the start of `cell`.
    #[inline(always)]
    pub fn write_to(&self, cell: *mut Cell) {
        let w = [
            self.head.to_le(),
            self.tag.to_le(),
            self.ids.to_le(),
            self.correlation.to_le(),
        ];
        // SAFETY: callers pass a pointer to a cell they may write (64-aligned, 64 bytes);
        // the header is its first 32 bytes.
        unsafe { cell.cast::<[u64; 4]>().write(w) }
    }

    /// Reads the header of a frame this process wrote (or validated) into `cell`: no kind
    /// check (an unknown kind would read as `Skip`, never as undefined behaviour).
    #[inline(always)]
    pub fn read_in_process(cell: &Cell) -> Self {
        Self::from_words_unchecked(Self::words(cell))
    }

    /// Reads the header at the start of `cell`; `None` for an unknown kind.
    #[inline(always)]
    pub fn read_from(cell: &Cell) -> Option<Self> {
        Self::from_words(Self::words(cell))
    }

    /// A skip frame covering `cells` cells.
    pub fn skip_cell(cells: usize) -> Cell {
        let mut c = Cell::default();
        c.0[0..4].copy_from_slice(&(cells as u32).to_le_bytes());
        c.0[4] = FrameKind::Skip as u8;
        c
    }
}

/// Bytes each entry of a pack frame takes: its length rounded up to 16 (at least 16), so
/// every entry starts 16-aligned as rkyv requires.
#[inline(always)]
pub const fn pack_stride(entry_len: usize) -> usize {
    if entry_len == 0 {
        16
    } else {
        entry_len.next_multiple_of(16)
    }
}

/// Cells taken by a frame with `payload` bytes of payload.
#[inline]
pub const fn frame_cells(payload: usize) -> usize {
    (HEADER_BYTES + payload).div_ceil(CELL_BYTES)
}

/// The payload of a transfer frame: the moved pointer and the function that drops it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TransferPayload {
    pub ptr: *mut u8,
    pub drop_fn: unsafe fn(*mut u8),
}

impl TransferPayload {
    pub const BYTES: usize = 16;

    pub fn encode(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[0..8].copy_from_slice(&(self.ptr as usize as u64).to_le_bytes());
        a[8..16].copy_from_slice(&(self.drop_fn as usize as u64).to_le_bytes());
        a
    }

    /// # Safety
    /// `bytes` must have been produced by [`TransferPayload::encode`] in this process.
    pub unsafe fn decode(bytes: &[u8]) -> Self {
        debug_assert!(bytes.len() >= Self::BYTES);
        let ptr = le64(bytes, 0) as usize;
        let f = le64(bytes, 8) as usize;
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
    pub(crate) fn new(window: &mut [std::mem::MaybeUninit<u8>]) -> Self {
        Self {
            ptr: window.as_mut_ptr().cast::<u8>(),
            cap: window.len(),
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

/// Serialises `value` into `window` (ring cells or a spill buffer) with the endpoint's
/// scratch arena; returns the bytes written.
#[inline]
pub(crate) fn serialize_into<T: crate::Payload>(
    value: &T,
    window: &mut [std::mem::MaybeUninit<u8>],
    arena: &mut Arena,
) -> Result<usize, RingError> {
    let w = rkyv::api::high::to_bytes_in_with_alloc::<_, _, RingError>(
        value,
        RingWriter::new(window),
        Scratch::new(arena),
    )?;
    Ok(w.pos())
}

/// Serialises `value` into a byte vector, exactly as a copy send would into ring memory
/// (for payloads nested inside other messages). Read the bytes back from 16-aligned
/// memory.
pub(crate) fn encode<T: crate::Payload>(value: &T) -> Result<Vec<u8>, RingError> {
    let mut arena = Arena::new();
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `MaybeUninit<u8>` has the layout of `u8`; the writer only ever stores
        // initialised bytes through this view, so `buf` stays initialised.
        let window = unsafe {
            std::slice::from_raw_parts_mut(
                buf.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(),
                buf.len(),
            )
        };
        match serialize_into(value, window, &mut arena) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Err(RingError::NoRoom) if buf.len() < 1 << 31 => buf.resize(buf.len() * 2, 0),
            Err(e) => return Err(e),
        }
    }
}

/// The scratch space rkyv serialises with: the endpoint's reusable arena, acquired only
/// when a value's serialiser first asks for scratch memory (most payloads never do, and
/// acquiring costs more than the rest of a small send). Users never build one; it
/// appears in the [`Payload`](crate::Payload) bound.
pub struct Scratch<'a>(ScratchState<'a>);

enum ScratchState<'a> {
    Idle(&'a mut Arena),
    Active(ArenaHandle<'a>),
    Taken,
}

impl<'a> Scratch<'a> {
    #[inline]
    pub(crate) fn new(arena: &'a mut Arena) -> Self {
        Self(ScratchState::Idle(arena))
    }

    #[cold]
    fn activate(&mut self) -> &mut ArenaHandle<'a> {
        if let ScratchState::Idle(arena) = std::mem::replace(&mut self.0, ScratchState::Taken) {
            self.0 = ScratchState::Active(arena.acquire());
        }
        match &mut self.0 {
            ScratchState::Active(h) => h,
            _ => unreachable!("activated above"),
        }
    }
}

// SAFETY: both methods forward to the arena's handle, which upholds the contract
// (unaliased memory fitting the layout; pops in reverse order); the handle is created
// once, before the first allocation, and lives as long as this value.
unsafe impl Allocator<RingError> for Scratch<'_> {
    #[inline]
    unsafe fn push_alloc(&mut self, layout: Layout) -> Result<NonNull<[u8]>, RingError> {
        let handle = match &mut self.0 {
            ScratchState::Active(h) => h,
            _ => self.activate(),
        };
        // SAFETY: the caller's guarantees (non-zero size) pass through unchanged.
        unsafe { Allocator::<RingError>::push_alloc(handle, layout) }
    }

    #[inline]
    unsafe fn pop_alloc(&mut self, ptr: NonNull<u8>, layout: Layout) -> Result<(), RingError> {
        match &mut self.0 {
            // SAFETY: `ptr` was pushed through this handle (nothing can be pushed before
            // it exists), and the caller pops in order.
            ScratchState::Active(h) => unsafe { Allocator::<RingError>::pop_alloc(h, ptr, layout) },
            // Nothing was pushed, so there is nothing to pop: a serialiser bug.
            _ => Err(RingError::Failed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut h = FrameHeader::new(
            FrameKind::Transfer,
            FLAG_REPLY | FLAG_ERROR,
            0xdead_beef_1234_5678,
            7,
            9,
            u64::MAX - 1,
        );
        h.set_len(1234);
        assert_eq!(
            (
                h.len(),
                h.kind(),
                h.flags(),
                h.tag(),
                h.sender(),
                h.reply_to()
            ),
            (
                1234,
                FrameKind::Transfer,
                FLAG_REPLY | FLAG_ERROR,
                0xdead_beef_1234_5678,
                7,
                9
            )
        );
        assert_eq!(h.correlation(), u64::MAX - 1);
        let bytes = h.encode();
        assert_eq!(FrameHeader::decode(&bytes), Some(h));
        let mut cell = Cell::default();
        h.write_to(&mut cell);
        assert_eq!(&cell.0[..HEADER_BYTES], &bytes[..]);
        assert_eq!(FrameHeader::read_from(&cell), Some(h));
        assert_eq!(h.frame_cells(), (32 + 1234usize).div_ceil(64));
        assert_eq!(frame_cells(0), 1);
        assert_eq!(frame_cells(32), 1);
        assert_eq!(frame_cells(33), 2);
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let mut c = FrameHeader::skip_cell(3);
        assert_eq!(FrameHeader::decode_first(&c.0), Some((3, FrameKind::Skip)));
        c.0[4] = 99;
        assert_eq!(FrameHeader::decode_first(&c.0), None);
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
        let mut window = [std::mem::MaybeUninit::<u8>::uninit(); 16];
        let mut w = RingWriter::new(&mut window);
        assert!(w.write(&[1; 10]).is_ok());
        assert_eq!(w.write(&[1; 7]), Err(RingError::NoRoom));
        assert_eq!(w.pos(), 10);
    }
}
