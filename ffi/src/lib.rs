//! The C ABI of isolate-cluster.
//!
//! Builds `libisolate_cluster` as a shared and a static library; the header is
//! `include/isolate_cluster.h`, generated from this file by cbindgen (`cbindgen.toml`) and
//! committed; a test regenerates it and fails on any difference.
//!
//! Safety at the boundary:
//! - every exported function runs inside `catch_unwind`: a panic becomes
//!   [`ic_error::IC_ERR_PANIC`], never an unwind into C;
//! - clusters, isolates, inboxes and messages are named by 64-bit handles whose upper half
//!   is a generation drawn from a global counter, so a freed, released or closed handle
//!   (and a double free) is reported as [`ic_error::IC_ERR_STALE_HANDLE`];
//! - inboxes belong to one thread (an isolate's, or the thread that opened a mailbox): a
//!   handle used on another thread is [`ic_error::IC_ERR_WRONG_THREAD`];
//! - bytes that arrive from C are sent as raw frames, which the engine never reads as an
//!   rkyv archive without validating them first (`Message::get_checked`).

#![allow(non_camel_case_types)]
// Every `extern "C"` function takes raw pointers from C; their contracts are stated in the
// doc comment each one carries into the header.
#![allow(clippy::missing_safety_doc)]

use std::cell::{RefCell, UnsafeCell};
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use engine::{
    CallError, Cluster, Context, CorePolicy, Event, Inbox, IsolateRef, Mailbox, MailboxError,
    Message, Properties, SendError, SpawnError, WaitStrategy,
};

/// Error codes. Every function returns one; `ic_error_str` names each.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ic_error {
    /// Success.
    IC_OK = 0,
    /// A required pointer argument was NULL.
    IC_ERR_NULL = 1,
    /// The handle was never valid, or was freed, released or closed.
    IC_ERR_STALE_HANDLE = 2,
    /// The inbox belongs to another thread.
    IC_ERR_WRONG_THREAD = 3,
    /// An argument is out of range (a tag with the top bit set, a bad enum value, a
    /// string that is not UTF-8...).
    IC_ERR_INVALID_ARGUMENT = 4,
    /// The path is not a valid isolate path.
    IC_ERR_INVALID_PATH = 5,
    /// An isolate already lives at this path.
    IC_ERR_DUPLICATE = 6,
    /// No isolate lives at this path.
    IC_ERR_NOT_FOUND = 7,
    /// The node is shutting down.
    IC_ERR_SHUTTING_DOWN = 8,
    /// The ring to the target is full (non-blocking send).
    IC_ERR_FULL = 9,
    /// The target has stopped.
    IC_ERR_DISCONNECTED = 10,
    /// The message can never fit in a ring.
    IC_ERR_TOO_LARGE = 11,
    /// Nothing arrived in time.
    IC_ERR_TIMEOUT = 12,
    /// The called isolate answered with an error (its text is in `ic_last_error`).
    IC_ERR_REMOTE = 13,
    /// The called isolate stopped without answering (why: `ic_last_error`).
    IC_ERR_TARGET_DOWN = 14,
    /// The inbox has stopped: no more events.
    IC_ERR_STOPPED = 15,
    /// This thread already has an open mailbox for this cluster; or the inbox is in a
    /// call already (a free function called back in with it).
    IC_ERR_IN_USE = 16,
    /// The message is not a request, or was a transfer already taken.
    IC_ERR_NOT_A_REQUEST = 17,
    /// The operating system refused a thread.
    IC_ERR_THREAD = 18,
    /// A panic inside the library was caught (detail in `ic_last_error`).
    IC_ERR_PANIC = 19,
    /// The network could not be joined: Zenoh refused the configuration or could not open
    /// its session, or the rendezvous directory could not be used (detail in
    /// `ic_last_error`).
    IC_ERR_NETWORK = 20,
    /// This build of the library has no network support (the `zenoh` cargo feature of
    /// isolate-cluster-ffi).
    IC_ERR_UNSUPPORTED = 21,
}

use ic_error::*;

/// The kind of an event `ic_recv` returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ic_event_kind {
    /// A message: `tag`, `data`, `len`, `sender_id`, `flags`.
    IC_EVENT_MESSAGE = 1,
    /// A watched isolate is up: `path`, `isolate_id`.
    IC_EVENT_ISOLATE_UP = 2,
    /// A watched isolate went down: `path`, `isolate_id`, `reason`.
    IC_EVENT_ISOLATE_DOWN = 3,
    /// The node asks this isolate to shut down (it stops after this event).
    IC_EVENT_SHUTDOWN_REQUESTED = 4,
    /// A supervised child failed: `path`, `isolate_id`, `reason`.
    IC_EVENT_CHILD_FAILED = 5,
    /// A supervised child was restarted: `path`, `isolate_id` (the new incarnation).
    IC_EVENT_CHILD_RESTARTED = 6,
    /// This isolate's supervision gave up: `reason`.
    IC_EVENT_SUPERVISION_GAVE_UP = 7,
    /// Another node joined the network: `path` is its name. (Node events reach only
    /// inboxes that called `ic_watch_nodes`.)
    IC_EVENT_NODE_UP = 8,
    /// Another node left or was lost: `path` is its name.
    IC_EVENT_NODE_DOWN = 9,
    /// Bytes from another node were rejected: `path` is its name, `reason` why.
    IC_EVENT_REJECTED = 10,
}

/// How idle isolates wait (`ic_config.wait_strategy`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ic_wait_strategy {
    /// Spin `spin_ns`, then park (the default).
    IC_WAIT_SPIN_THEN_PARK = 0,
    /// Spin forever: lowest latency, a core per isolate.
    IC_WAIT_BUSY_SPIN = 1,
    /// Spin, yielding the core on every round.
    IC_WAIT_YIELD = 2,
}

/// Where isolates' threads run (`ic_config.core_policy`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ic_core_policy {
    /// A dedicated core while free cores last, then unpinned (the default).
    IC_CORES_DEDICATED = 0,
    /// A dedicated core while free cores last, then the least loaded core.
    IC_CORES_SHARED = 1,
    /// No pinning.
    IC_CORES_UNPINNED = 2,
}

/// `ic_message.flags`: the message is a request; answer it with `ic_reply` or
/// `ic_reply_error`.
pub const IC_MSG_REQUEST: u32 = 1;
/// `ic_message.flags`: the message carries a moved buffer (see `ic_transfer`); take it
/// with `ic_message_take`, or it is freed on release.
pub const IC_MSG_TRANSFER: u32 = 2;
/// `ic_message.flags`: the message is an error reply.
pub const IC_MSG_ERROR: u32 = 4;

/// Cluster configuration. Fill it with `ic_config_init`, then change what you need.
/// Integer fields hold the values of the enums above.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ic_config {
    /// Bytes per ring (per pair of endpoints that talk); default 65536.
    pub ring_capacity: usize,
    /// An `ic_wait_strategy` value.
    pub wait_strategy: u32,
    /// Spin time before parking, for `IC_WAIT_SPIN_THEN_PARK`; default 50000.
    pub spin_ns: u64,
    /// An `ic_core_policy` value.
    pub core_policy: u32,
    /// How long `ic_cluster_free` waits for isolates to stop; default 2000.
    pub drop_timeout_ms: u64,
    /// The node's name (copied); may be NULL for "node".
    pub node_name: *const c_char,
    /// The cores isolates are placed on (copied), `n_cores` of them; may be NULL (with
    /// `n_cores` 0) for every core the process may use.
    pub cores: *const usize,
    /// How many entries `cores` has.
    pub n_cores: usize,
}

/// One property of an isolate: a key and a string value (both copied at spawn).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ic_property {
    /// The key, NUL-terminated UTF-8.
    pub key: *const c_char,
    /// The value, NUL-terminated UTF-8.
    pub value: *const c_char,
}

/// What `ic_recv` and `ic_call` fill in. Everything it points to stays valid until
/// `ic_message_release` (or `ic_message_take` for a transfer's buffer).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ic_message {
    /// Names this message for `ic_reply`, `ic_message_take` and `ic_message_release`.
    pub handle: u64,
    /// An `ic_event_kind` value.
    pub kind: u32,
    /// `IC_MSG_*` bits.
    pub flags: u32,
    /// The sender's tag (for a transfer, the tag given to `ic_transfer`).
    pub tag: u64,
    /// The payload (NULL when there is none).
    pub data: *const u8,
    /// Payload length in bytes.
    pub len: usize,
    /// Endpoint id of the sender (0 for events).
    pub sender_id: u32,
    /// Endpoint id replies go to (`ic_reply` uses it; 0 for events).
    pub reply_to_id: u32,
    /// For isolate events: the isolate's endpoint id.
    pub isolate_id: u32,
    /// For isolate events: its path, NUL-terminated; NULL otherwise.
    pub path: *const c_char,
    /// For down, failure and give-up events: why, NUL-terminated; NULL otherwise.
    pub reason: *const c_char,
}

/// A cluster handle (0 is never valid).
pub type ic_cluster = u64;
/// An isolate handle (0 is never valid).
pub type ic_isolate = u64;
/// An inbox handle: an isolate's own (given to its entry function) or a thread's mailbox
/// (0 is never valid).
pub type ic_inbox = u64;

/// Frees a buffer moved with `ic_transfer`: called once, with the pointer and the
/// context given there, on whichever thread drops the buffer last.
pub type ic_free_fn = Option<unsafe extern "C" fn(data: *mut c_void, ctx: *mut c_void)>;

/// An isolate's entry function: runs on the isolate's own thread with the isolate's
/// inbox; the isolate stops when it returns. `user_data` is what was given to `ic_spawn`.
pub type ic_entry_fn = Option<unsafe extern "C" fn(inbox: ic_inbox, user_data: *mut c_void)>;

// ---------------------------------------------------------------------------------------
// Errors

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: impl Into<String>) {
    let mut s = msg.into();
    s.retain(|c| c != '\0');
    let c = CString::new(s).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning a panic into `IC_ERR_PANIC` and recording error detail.
fn guard(f: impl FnOnce() -> Result<(), (ic_error, String)>) -> ic_error {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => IC_OK,
        Ok(Err((code, msg))) => {
            set_last_error(msg);
            code
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_owned());
            set_last_error(format!("panic inside isolate-cluster: {msg}"));
            IC_ERR_PANIC
        }
    }
}

type R<T = ()> = Result<T, (ic_error, String)>;

fn err<T>(code: ic_error, msg: impl Into<String>) -> R<T> {
    Err((code, msg.into()))
}

fn non_null<T>(p: *const T, what: &str) -> R {
    if p.is_null() {
        return err(IC_ERR_NULL, format!("{what} is NULL"));
    }
    Ok(())
}

/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> R<&'a str> {
    non_null(p, what)?;
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| (IC_ERR_INVALID_ARGUMENT, format!("{what} is not UTF-8")))
}

/// # Safety
/// `data` is NULL (then `len` must be 0) or points to `len` readable bytes.
unsafe fn bytes_arg<'a>(data: *const c_void, len: usize) -> R<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    non_null(data, "data")?;
    // SAFETY: `data` points to `len` readable bytes per the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) })
}

fn check_tag(tag: u64) -> R {
    if tag & engine::frame::RUST_TAG_BIT != 0 {
        return err(
            IC_ERR_INVALID_ARGUMENT,
            "tags with the top bit set are reserved for Rust types",
        );
    }
    Ok(())
}

fn send_error<T>(e: SendError<T>) -> (ic_error, String) {
    let code = match &e {
        SendError::Full(_) => IC_ERR_FULL,
        SendError::Disconnected(_) => IC_ERR_DISCONNECTED,
        SendError::TooLarge { .. } => IC_ERR_TOO_LARGE,
        SendError::UnknownTarget(_) => IC_ERR_STALE_HANDLE,
        _ => IC_ERR_INVALID_ARGUMENT,
    };
    (code, e.to_string())
}

fn spawn_error(e: SpawnError) -> (ic_error, String) {
    let code = match &e {
        SpawnError::InvalidPath(_) => IC_ERR_INVALID_PATH,
        SpawnError::Duplicate(_) => IC_ERR_DUPLICATE,
        SpawnError::ShuttingDown => IC_ERR_SHUTTING_DOWN,
        SpawnError::Thread(_) => IC_ERR_THREAD,
        SpawnError::NoSupervisor(_) => IC_ERR_NOT_FOUND,
    };
    (code, e.to_string())
}

fn call_error(e: CallError) -> (ic_error, String) {
    let code = match &e {
        CallError::Send(s) => return send_error(s.clone()),
        CallError::Timeout => IC_ERR_TIMEOUT,
        CallError::Remote(text) => return (IC_ERR_REMOTE, text.clone()),
        CallError::TargetDown(_) => IC_ERR_TARGET_DOWN,
        CallError::Closed => IC_ERR_STOPPED,
        _ => IC_ERR_INVALID_ARGUMENT,
    };
    (code, e.to_string())
}

// ---------------------------------------------------------------------------------------
// Handles

/// Generations for every handle of every kind: never 0, so no handle is 0.
static GENERATION: AtomicU32 = AtomicU32::new(1);

fn next_generation() -> u32 {
    loop {
        let g = GENERATION.fetch_add(1, Ordering::Relaxed);
        if g != 0 {
            return g;
        }
    }
}

/// A table of values named by `(generation << 32) | index`.
struct Slab<T> {
    slots: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
    /// For tables only one thread uses: the next generation of a block reserved from the
    /// global counter (so handles stay unique across tables without touching the shared
    /// counter per insert), and how many are left in the block. `None`: global per insert.
    local: Option<(u32, u32)>,
}

/// Generations a local table reserves at once.
const GENERATION_BLOCK: u32 = 1024;

/// `GENERATION_BLOCK` consecutive non-zero generations, unique to the caller.
fn reserve_generations() -> u32 {
    loop {
        let g = GENERATION.fetch_add(GENERATION_BLOCK, Ordering::Relaxed);
        if g != 0 && g.checked_add(GENERATION_BLOCK).is_some() {
            return g;
        }
    }
}

impl<T> Slab<T> {
    /// A table whose handles are unique among all tables (global generations).
    const fn new() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            local: None,
        }
    }

    /// A table one thread uses: unique handles, the shared counter touched once per block.
    const fn new_local() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            local: Some((0, 0)),
        }
    }

    /// Stores `v` and returns its handle. The slot is found first and `v` written last,
    /// with nothing called in between: a held message then goes from registers straight
    /// into its slot (copying it through a temporary stalled on store forwarding).
    #[inline(always)]
    fn insert(&mut self, v: T) -> u64 {
        let gen = self.next_gen();
        let i = match self.free.pop() {
            Some(i) => i as usize,
            None => self.grow(),
        };
        let slot = &mut self.slots[i];
        debug_assert!(slot.1.is_none(), "a free slot holds nothing");
        slot.0 = gen;
        // SAFETY: `slot.1` is a valid, exclusively borrowed `Option<T>` holding `None`
        // (free slots and new ones hold nothing), so overwriting it without dropping the
        // old value leaks nothing. An assignment would run the (no-op) drop glue, whose
        // calls made the compiler keep `v` in a stack temporary.
        unsafe { std::ptr::write(&mut slot.1, Some(v)) };
        (u64::from(gen) << 32) | i as u64
    }

    /// A fresh generation for an insert.
    #[inline(always)]
    fn next_gen(&mut self) -> u32 {
        match &mut self.local {
            None => next_generation(),
            Some((next, left)) => {
                if *left == 0 {
                    *next = reserve_generations();
                    *left = GENERATION_BLOCK;
                }
                *left -= 1;
                *next += 1;
                *next - 1
            }
        }
    }

    /// A new empty slot at the end; its index.
    #[cold]
    fn grow(&mut self) -> usize {
        self.slots.push((0, None));
        self.slots.len() - 1
    }

    fn split(h: u64) -> (u32, usize) {
        ((h >> 32) as u32, (h & 0xffff_ffff) as usize)
    }

    #[inline(always)]
    fn get(&self, h: u64) -> Option<&T> {
        let (gen, i) = Self::split(h);
        match self.slots.get(i) {
            Some((g, Some(v))) if *g == gen => Some(v),
            _ => None,
        }
    }

    #[inline(always)]
    fn get_mut(&mut self, h: u64) -> Option<&mut T> {
        let (gen, i) = Self::split(h);
        match self.slots.get_mut(i) {
            Some((g, Some(v))) if *g == gen => Some(v),
            _ => None,
        }
    }

    #[inline(always)]
    fn remove(&mut self, h: u64) -> Option<T> {
        let (gen, i) = Self::split(h);
        match self.slots.get_mut(i) {
            Some((g, v @ Some(_))) if *g == gen => {
                *g = 0;
                self.free.push(i as u32);
                v.take()
            }
            _ => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Clusters, with the drop timeout they were built with.
static CLUSTERS: Mutex<Slab<(Arc<Cluster>, Duration)>> = Mutex::new(Slab::new());
static ISOLATES: Mutex<Slab<IsolateRef>> = Mutex::new(Slab::new());
/// Bumped by every isolate handle release: threads drop their cached copies.
static ISOLATE_EPOCH: Lines<AtomicU64> = Lines(AtomicU64::new(0));

/// A static that every call reads, aligned to a pair of cache lines (the unit the
/// adjacent-line prefetcher moves) so that it starts a line of its own. The linker places
/// this library's statics next to the program's, and a variable the program writes often
/// on the same line costs every call a cache miss: in a C ping-pong whose own counters
/// the linker put next to the inbox table, `ic_message_release` took 108–122 TSC ticks,
/// and 74–95 with the table on lines of its own.
#[repr(align(128))]
struct Lines<T>(T);

fn cluster(h: u64) -> R<Arc<Cluster>> {
    lock(&CLUSTERS)
        .get(h)
        .map(|(c, _)| Arc::clone(c))
        .ok_or_else(|| (IC_ERR_STALE_HANDLE, format!("no cluster {h:#x}")))
}

thread_local! {
    /// Isolate handles this thread used recently (sends look targets up without a lock).
    /// (`Rc`: handing one out costs no atomic operation.)
    static ISOLATE_CACHE: RefCell<IsolateCache> = const { RefCell::new((0, Vec::new())) };
}

/// The epoch the cached entries belong to, and (handle, reference) pairs.
type IsolateCache = (u64, Vec<(u64, Rc<IsolateRef>)>);

#[inline]
fn isolate(h: u64) -> R<Rc<IsolateRef>> {
    let epoch = ISOLATE_EPOCH.0.load(Ordering::Acquire);
    let cached = ISOLATE_CACHE.with(|c| {
        let c = c.borrow();
        if c.0 != epoch {
            return None;
        }
        c.1.iter().find(|(k, _)| *k == h).map(|(_, r)| r.clone())
    });
    match cached {
        Some(r) => Ok(r),
        None => isolate_slow(h, epoch),
    }
}

/// `isolate` for a handle this thread has not used since the last release of any.
#[cold]
#[inline(never)]
fn isolate_slow(h: u64, epoch: u64) -> R<Rc<IsolateRef>> {
    let r = lock(&ISOLATES)
        .get(h)
        .cloned()
        .map(Rc::new)
        .ok_or_else(|| (IC_ERR_STALE_HANDLE, format!("no isolate {h:#x}")))?;
    ISOLATE_CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != epoch {
            *c = (epoch, Vec::new());
        }
        if c.1.len() >= 16 {
            c.1.remove(0);
        }
        c.1.push((h, r.clone()));
    });
    Ok(r)
}

fn new_isolate_handle(r: IsolateRef) -> u64 {
    lock(&ISOLATES).insert(r)
}

/// A received message or event kept alive for C, with what the view points to.
struct Held {
    msg: Option<Message<'static>>,
    /// Rarely used (transfers and events): boxed to keep the common case small to move.
    extra: Option<Box<HeldExtra>>,
}

#[derive(Default)]
struct HeldExtra {
    buffer: Option<Box<ForeignBuffer>>,
    path: Option<CString>,
    reason: Option<CString>,
}

/// The inbox an `ic_inbox` handle names.
enum InboxRef {
    /// An isolate's context, alive for the whole entry call (the handle is closed before
    /// the entry returns to the engine).
    Context(*const Context),
    /// A mailbox opened by this thread.
    Mailbox(Box<Mailbox>),
}

struct InboxState {
    /// Declared first: dropped before the inbox they borrow.
    held: Slab<Held>,
    inbox: InboxRef,
}

/// One entry of the inbox table. `gen` and `owner` may be read by any thread; `state` is
/// touched only by the owner thread, and only while it holds `busy` (see [`Entered`]).
///
/// Aligned to a pair of cache lines (the unit the adjacent-line prefetcher moves). At its
/// natural size (96 bytes) neighbouring slots shared a line, and every call writes `busy`
/// and the held table's header: two inboxes opened one after the other (a ping and its
/// pong) had each thread's calls invalidate the other's slot. (The C call bench did not
/// measure a difference: 220 ns p50 either way.)
#[repr(align(128))]
struct InboxSlot {
    /// The generation of the open inbox, 0 when free.
    gen: AtomicU32,
    /// Token of the owning thread (see [`thread_token`]).
    owner: AtomicU64,
    /// An FFI call on this inbox is running (re-entrant calls are refused).
    busy: AtomicBool,
    state: UnsafeCell<Option<InboxState>>,
}

// SAFETY: `state` is only accessed by the thread whose token is in `owner`, and only
// inside an `Entered` guard (which that thread alone can obtain); the other fields are
// atomics.
unsafe impl Sync for InboxSlot {}

const INBOX_CHUNK: usize = 256;
const INBOX_CHUNKS: usize = 1024;

/// Inbox slots in chunks allocated on demand and never freed (so a slot's address is
/// stable): at most `INBOX_CHUNK * INBOX_CHUNKS` inboxes open at once. Every call reads
/// it; on lines of its own (see [`Lines`]).
static INBOX_TABLE: Lines<[AtomicPtr<InboxSlot>; INBOX_CHUNKS]> =
    Lines([const { AtomicPtr::new(std::ptr::null_mut()) }; INBOX_CHUNKS]);

/// Free slot indices, and the next never-used one.
static INBOX_ALLOC: Mutex<(Vec<u32>, u32)> = Mutex::new((Vec::new(), 0));

fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    // `try_with`: a free function may run while the thread's locals are being destroyed;
    // token 0 then matches no inbox.
    TOKEN
        .try_with(|t| {
            let v = t.get();
            if v != 0 {
                return v;
            }
            let v = NEXT.fetch_add(1, Ordering::Relaxed);
            t.set(v);
            v
        })
        .unwrap_or(0)
}

fn slot_at(index: u32) -> Option<&'static InboxSlot> {
    let i = index as usize;
    let chunk = INBOX_TABLE.0.get(i / INBOX_CHUNK)?.load(Ordering::Acquire);
    if chunk.is_null() {
        return None;
    }
    // SAFETY: a non-null chunk pointer comes from a leaked `Box<[InboxSlot]>` of
    // `INBOX_CHUNK` slots (never freed), and `i % INBOX_CHUNK` is in bounds.
    Some(unsafe { &*chunk.add(i % INBOX_CHUNK) })
}

fn open_inbox(inbox: InboxRef) -> R<u64> {
    let index = {
        let mut a = lock(&INBOX_ALLOC);
        match a.0.pop() {
            Some(i) => i,
            None => {
                let i = a.1;
                let c = i as usize / INBOX_CHUNK;
                if c >= INBOX_CHUNKS {
                    return err(IC_ERR_INVALID_ARGUMENT, "too many inboxes open at once");
                }
                if INBOX_TABLE.0[c].load(Ordering::Acquire).is_null() {
                    let chunk: Box<[InboxSlot]> = (0..INBOX_CHUNK)
                        .map(|_| InboxSlot {
                            gen: AtomicU32::new(0),
                            owner: AtomicU64::new(0),
                            busy: AtomicBool::new(false),
                            state: UnsafeCell::new(None),
                        })
                        .collect();
                    let ptr = Box::into_raw(chunk).cast::<InboxSlot>();
                    INBOX_TABLE.0[c].store(ptr, Ordering::Release);
                }
                a.1 += 1;
                i
            }
        }
    };
    let Some(slot) = slot_at(index) else {
        return err(IC_ERR_INVALID_ARGUMENT, "inbox table");
    };
    // SAFETY: the slot is free (taken from the allocator): no thread reads its state, and
    // other threads only look at `gen`, which is 0 until the store below publishes it.
    unsafe {
        *slot.state.get() = Some(InboxState {
            held: Slab::new_local(),
            inbox,
        });
    }
    slot.owner.store(thread_token(), Ordering::Relaxed);
    let gen = next_generation();
    slot.gen.store(gen, Ordering::Release);
    let h = (u64::from(gen) << 32) | u64::from(index);
    let _ = OPEN_INBOXES.try_with(|o| o.0.borrow_mut().push(h));
    Ok(h)
}

/// An inbox entered by its owner thread for one call. While it lives, no other call can
/// enter the same inbox (a free function calling back in gets `IC_ERR_IN_USE`), so the
/// inbox and its held messages cannot disappear under the call.
struct Entered {
    slot: &'static InboxSlot,
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.slot.busy.store(false, Ordering::Relaxed);
    }
}

impl Entered {
    /// Exclusive access to the state. The caller must not call into the engine (which can
    /// run user code that calls back in) while the reference lives.
    #[allow(clippy::mut_from_ref)]
    fn state(&self) -> &mut InboxState {
        // SAFETY: only the owner thread holds an `Entered` for this slot, one at a time
        // (`busy`), and callers keep the reference short (see above); the state is `Some`
        // while the slot's generation matches, which `enter` checked.
        match unsafe { (*self.slot.state.get()).as_mut() } {
            Some(st) => st,
            None => unreachable!("an entered inbox is open"),
        }
    }

    fn inbox(&self) -> *const Inbox {
        match &self.state().inbox {
            // SAFETY: the context outlives the open handle (see `InboxRef::Context`).
            InboxRef::Context(c) => unsafe { std::ptr::from_ref::<Inbox>(&**c) },
            InboxRef::Mailbox(m) => std::ptr::from_ref::<Inbox>(m),
        }
    }

    fn context(&self) -> Option<*const Context> {
        match &self.state().inbox {
            InboxRef::Context(c) => Some(*c),
            InboxRef::Mailbox(_) => None,
        }
    }
}

/// Enters inbox `h` on the calling thread.
#[inline]
fn enter(h: u64) -> R<Entered> {
    let gen = (h >> 32) as u32;
    if let Some(slot) = slot_at((h & 0xffff_ffff) as u32) {
        // Only the owner thread (checked here) touches `busy`: no locked instruction.
        if gen != 0
            && slot.gen.load(Ordering::Acquire) == gen
            && slot.owner.load(Ordering::Relaxed) == thread_token()
            && !slot.busy.load(Ordering::Relaxed)
        {
            slot.busy.store(true, Ordering::Relaxed);
            return Ok(Entered { slot });
        }
    }
    Err(enter_error(h))
}

/// Why inbox `h` cannot be entered (the error path of `enter`, kept out of its way).
#[cold]
#[inline(never)]
fn enter_error(h: u64) -> (ic_error, String) {
    let gen = (h >> 32) as u32;
    match slot_at((h & 0xffff_ffff) as u32) {
        Some(s) if gen != 0 && s.gen.load(Ordering::Acquire) == gen => {
            if s.owner.load(Ordering::Relaxed) != thread_token() {
                (
                    IC_ERR_WRONG_THREAD,
                    format!("inbox {h:#x} belongs to another thread"),
                )
            } else {
                (
                    IC_ERR_IN_USE,
                    "the inbox is in a call already (a free function called back in)".to_owned(),
                )
            }
        }
        _ => (IC_ERR_STALE_HANDLE, format!("no inbox {h:#x}")),
    }
}

/// Closes inbox `h` (its held messages are released, then a mailbox is dropped).
fn close_inbox(h: u64) -> R {
    let e = enter(h)?;
    // SAFETY: entered; the reference ends with this statement.
    let state = unsafe { (*e.slot.state.get()).take() };
    release_slot(e.slot, h);
    drop(e);
    let _ = OPEN_INBOXES.try_with(|o| o.0.borrow_mut().retain(|k| *k != h));
    // Dropped last, with the slot already free: user free functions may call back in.
    drop(state);
    Ok(())
}

fn release_slot(slot: &InboxSlot, h: u64) {
    slot.gen.store(0, Ordering::Release);
    slot.owner.store(0, Ordering::Relaxed);
    slot.busy.store(false, Ordering::Relaxed);
    lock(&INBOX_ALLOC).0.push((h & 0xffff_ffff) as u32);
}

/// The inboxes this thread opened and has not closed. A thread that ends with mailboxes
/// open (C code often forgets) closes them on the way out, so their endpoints are torn
/// down (monitors hear of it, nothing waits on them) and their slots come back.
struct OpenInboxes(RefCell<Vec<u64>>);

impl Drop for OpenInboxes {
    fn drop(&mut self) {
        for h in std::mem::take(&mut *self.0.borrow_mut()) {
            let Some(slot) = slot_at((h & 0xffff_ffff) as u32) else {
                continue;
            };
            if slot.gen.load(Ordering::Acquire) != (h >> 32) as u32 {
                continue;
            }
            // SAFETY: this thread opened the inbox (the list is thread-local) and is
            // ending, so no call of it is running: the state is ours to take.
            let state = unsafe { (*slot.state.get()).take() };
            release_slot(slot, h);
            drop(state);
        }
    }
}

thread_local! {
    static OPEN_INBOXES: OpenInboxes = const { OpenInboxes(RefCell::new(Vec::new())) };
}

/// A buffer moved from C with `ic_transfer`.
struct ForeignBuffer {
    data: *mut c_void,
    len: usize,
    tag: u64,
    free: ic_free_fn,
    ctx: *mut c_void,
}

// SAFETY: the buffer is owned by exactly one holder at a time (it moves through the ring);
// `ic_transfer`'s contract makes the caller promise that the buffer and its free function
// may be used from any thread.
unsafe impl Send for ForeignBuffer {}

impl Drop for ForeignBuffer {
    fn drop(&mut self) {
        if let Some(f) = self.free.take() {
            // SAFETY: called once (the function is taken), with the pointer and context
            // given to `ic_transfer`, per its contract.
            unsafe { f(self.data, self.ctx) };
        }
    }
}

/// Keeps a received event for C and fills `out`.
/// (Copy messages take `hold_copy`, which its callers pick; this handles them too.)
fn hold(e: &Entered, ev: Event<'_>, out: &mut ic_message) -> R {
    let mut view = ic_message {
        handle: 0,
        kind: 0,
        flags: 0,
        tag: 0,
        data: std::ptr::null(),
        len: 0,
        sender_id: 0,
        reply_to_id: 0,
        isolate_id: 0,
        path: std::ptr::null(),
        reason: std::ptr::null(),
    };
    let mut held = Held {
        msg: None,
        extra: None,
    };
    let cstr = |s: &str| CString::new(s.replace('\0', "")).unwrap_or_default();
    let mut isolate_event = |kind: ic_event_kind, r: &IsolateRef, why: Option<String>| {
        view.kind = kind as u32;
        view.isolate_id = r.id();
        held.extra = Some(Box::new(HeldExtra {
            buffer: None,
            path: Some(cstr(r.path())),
            reason: why.map(|w| cstr(&w)),
        }));
    };
    match ev {
        Event::Message(mut m) => {
            view.kind = ic_event_kind::IC_EVENT_MESSAGE as u32;
            view.sender_id = m.sender_id();
            view.reply_to_id = m.reply_to_id();
            view.tag = m.tag();
            if m.is_request() {
                view.flags |= IC_MSG_REQUEST;
            }
            if m.is_error() {
                view.flags |= IC_MSG_ERROR;
            }
            if m.is_transfer() {
                view.flags |= IC_MSG_TRANSFER;
                if let Ok(b) = m.take::<ForeignBuffer>() {
                    view.tag = b.tag;
                    view.data = b.data.cast_const().cast::<u8>();
                    view.len = b.len;
                    held.extra = Some(Box::new(HeldExtra {
                        buffer: Some(b),
                        ..HeldExtra::default()
                    }));
                }
            } else {
                let bytes = m.bytes();
                view.data = bytes.as_ptr();
                view.len = bytes.len();
            }
            // SAFETY: the message borrows the inbox, which outlives the held message: the
            // held table is dropped before the inbox (field order of `InboxState`), and a
            // context's handle is closed before its entry returns.
            held.msg = Some(unsafe { std::mem::transmute::<Message<'_>, Message<'static>>(m) });
        }
        Event::IsolateUp(r) => isolate_event(ic_event_kind::IC_EVENT_ISOLATE_UP, &r, None),
        Event::IsolateDown(r, why) => isolate_event(
            ic_event_kind::IC_EVENT_ISOLATE_DOWN,
            &r,
            Some(why.to_string()),
        ),
        Event::ChildFailed(r, why) => isolate_event(
            ic_event_kind::IC_EVENT_CHILD_FAILED,
            &r,
            Some(why.to_string()),
        ),
        Event::ChildRestarted(r) => {
            isolate_event(ic_event_kind::IC_EVENT_CHILD_RESTARTED, &r, None)
        }
        Event::SupervisionGaveUp(why) => {
            view.kind = ic_event_kind::IC_EVENT_SUPERVISION_GAVE_UP as u32;
            held.extra = Some(Box::new(HeldExtra {
                reason: Some(cstr(&why)),
                ..HeldExtra::default()
            }));
        }
        Event::ShutdownRequested => {
            view.kind = ic_event_kind::IC_EVENT_SHUTDOWN_REQUESTED as u32;
        }
        Event::NodeUp(node) => {
            view.kind = ic_event_kind::IC_EVENT_NODE_UP as u32;
            held.extra = Some(Box::new(HeldExtra {
                path: Some(cstr(&node)),
                ..HeldExtra::default()
            }));
        }
        Event::NodeDown(node) => {
            view.kind = ic_event_kind::IC_EVENT_NODE_DOWN as u32;
            held.extra = Some(Box::new(HeldExtra {
                path: Some(cstr(&node)),
                ..HeldExtra::default()
            }));
        }
        Event::Rejected { node, reason } => {
            view.kind = ic_event_kind::IC_EVENT_REJECTED as u32;
            held.extra = Some(Box::new(HeldExtra {
                path: Some(cstr(&node)),
                reason: Some(cstr(&reason)),
                ..HeldExtra::default()
            }));
        }
    }
    if let Some(x) = &held.extra {
        view.path = x.path.as_ref().map_or(std::ptr::null(), |p| p.as_ptr());
        view.reason = x.reason.as_ref().map_or(std::ptr::null(), |p| p.as_ptr());
    }
    view.handle = e.state().held.insert(held);
    *out = view;
    Ok(())
}

/// `hold` for the common case, a copy message: no event fields, nothing extra to keep.
#[inline(always)]
fn hold_copy(e: &Entered, m: Message<'_>, out: &mut ic_message) -> R {
    let mut flags = 0;
    if m.is_request() {
        flags |= IC_MSG_REQUEST;
    }
    if m.is_error() {
        flags |= IC_MSG_ERROR;
    }
    let bytes = m.bytes();
    let (data, len) = (bytes.as_ptr(), bytes.len());
    let (tag, sender_id, reply_to_id) = (m.tag(), m.sender_id(), m.reply_to_id());
    let held = Held {
        // SAFETY: as in `hold`: the held table is dropped before the inbox the message
        // borrows.
        msg: Some(unsafe { std::mem::transmute::<Message<'_>, Message<'static>>(m) }),
        extra: None,
    };
    *out = ic_message {
        handle: e.state().held.insert(held),
        kind: ic_event_kind::IC_EVENT_MESSAGE as u32,
        flags,
        tag,
        data,
        len,
        sender_id,
        reply_to_id,
        isolate_id: 0,
        path: std::ptr::null(),
        reason: std::ptr::null(),
    };
    Ok(())
}

/// Runs `f` on the held message `msg` of the entered inbox (`f` must not call into the
/// engine).
fn with_held<T>(e: &Entered, msg: u64, f: impl FnOnce(&mut Held) -> R<T>) -> R<T> {
    let held = e
        .state()
        .held
        .get_mut(msg)
        .ok_or_else(|| (IC_ERR_STALE_HANDLE, format!("no message {msg:#x}")))?;
    f(held)
}

// ---------------------------------------------------------------------------------------
// Library

/// The library version, for example "0.1.0". Static; never NULL. Any thread.
#[no_mangle]
pub extern "C" fn ic_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The name of an error code, for example "IC_ERR_TIMEOUT: nothing arrived in time".
/// Static; never NULL ("unknown error code" for values outside ic_error). Any thread.
#[no_mangle]
pub extern "C" fn ic_error_str(code: i32) -> *const c_char {
    let s: &'static str = match code {
        0 => "IC_OK: success\0",
        1 => "IC_ERR_NULL: a required pointer was NULL\0",
        2 => "IC_ERR_STALE_HANDLE: the handle is not (or no longer) valid\0",
        3 => "IC_ERR_WRONG_THREAD: the inbox belongs to another thread\0",
        4 => "IC_ERR_INVALID_ARGUMENT: an argument is out of range\0",
        5 => "IC_ERR_INVALID_PATH: not a valid isolate path\0",
        6 => "IC_ERR_DUPLICATE: an isolate already lives at this path\0",
        7 => "IC_ERR_NOT_FOUND: no isolate at this path\0",
        8 => "IC_ERR_SHUTTING_DOWN: the node is shutting down\0",
        9 => "IC_ERR_FULL: the ring is full\0",
        10 => "IC_ERR_DISCONNECTED: the target has stopped\0",
        11 => "IC_ERR_TOO_LARGE: the message can never fit in a ring\0",
        12 => "IC_ERR_TIMEOUT: nothing arrived in time\0",
        13 => "IC_ERR_REMOTE: the called isolate answered with an error\0",
        14 => "IC_ERR_TARGET_DOWN: the called isolate stopped without answering\0",
        15 => "IC_ERR_STOPPED: the inbox has stopped\0",
        16 => "IC_ERR_IN_USE: this thread already has a mailbox for this cluster\0",
        17 => "IC_ERR_NOT_A_REQUEST: not a request, or nothing to take\0",
        18 => "IC_ERR_THREAD: the operating system refused a thread\0",
        19 => "IC_ERR_PANIC: a panic inside the library was caught\0",
        20 => "IC_ERR_NETWORK: the network could not be joined\0",
        21 => "IC_ERR_UNSUPPORTED: this library was built without network support\0",
        _ => "unknown error code\0",
    };
    s.as_ptr().cast()
}

/// Detail about the last error on the calling thread (empty if none yet). Valid until the
/// next failing call on this thread; never NULL.
#[no_mangle]
pub extern "C" fn ic_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

// ---------------------------------------------------------------------------------------
// Clusters

/// Fills `cfg` with the defaults. `cfg` must not be NULL. Any thread.
#[no_mangle]
pub unsafe extern "C" fn ic_config_init(cfg: *mut ic_config) -> ic_error {
    guard(|| {
        non_null(cfg, "cfg")?;
        // SAFETY: non-NULL and writable per the contract.
        unsafe {
            cfg.write(ic_config {
                ring_capacity: 64 * 1024,
                wait_strategy: ic_wait_strategy::IC_WAIT_SPIN_THEN_PARK as u32,
                spin_ns: 50_000,
                core_policy: ic_core_policy::IC_CORES_DEDICATED as u32,
                drop_timeout_ms: 2_000,
                node_name: std::ptr::null(),
                cores: std::ptr::null(),
                n_cores: 0,
            })
        };
        Ok(())
    })
}

/// A builder configured as `cfg` says (NULL: the defaults), and its drop timeout.
///
/// # Safety
/// `cfg` is NULL or points to an `ic_config` whose pointers follow its documentation.
unsafe fn builder_from(cfg: *const ic_config) -> R<(engine::Builder, Duration)> {
    let mut b = Cluster::builder();
    if !cfg.is_null() {
        // SAFETY: non-NULL, points to an ic_config per the contract.
        let c = unsafe { *cfg };
        b = b.ring_capacity(c.ring_capacity);
        b = b.wait_strategy(match c.wait_strategy {
            0 => WaitStrategy::SpinThenPark {
                spin: Duration::from_nanos(c.spin_ns),
            },
            1 => WaitStrategy::BusySpin,
            2 => WaitStrategy::Yield,
            v => return err(IC_ERR_INVALID_ARGUMENT, format!("wait_strategy {v}")),
        });
        b = b.core_policy(match c.core_policy {
            0 => CorePolicy::Dedicated,
            1 => CorePolicy::Shared,
            2 => CorePolicy::Unpinned,
            v => return err(IC_ERR_INVALID_ARGUMENT, format!("core_policy {v}")),
        });
        b = b.drop_timeout(Duration::from_millis(c.drop_timeout_ms));
        if c.n_cores > 0 {
            non_null(c.cores, "cores")?;
            // SAFETY: `cores` points to `n_cores` entries per the contract.
            let list = unsafe { std::slice::from_raw_parts(c.cores, c.n_cores) };
            b = b.cores(list.to_vec());
        }
        if !c.node_name.is_null() {
            // SAFETY: a NUL-terminated string per the contract.
            b = b.node_name(unsafe { str_arg(c.node_name, "node_name") }?);
        }
    }
    let drop_timeout = if cfg.is_null() {
        Duration::from_secs(2)
    } else {
        // SAFETY: non-NULL, points to an ic_config per the contract.
        Duration::from_millis(unsafe { (*cfg).drop_timeout_ms })
    };
    Ok((b, drop_timeout))
}

/// Creates a cluster. `cfg` may be NULL (defaults); `out` receives the handle. The
/// caller owns the cluster and frees it with `ic_cluster_free`. Any thread.
#[no_mangle]
pub unsafe extern "C" fn ic_cluster_new(cfg: *const ic_config, out: *mut ic_cluster) -> ic_error {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: `cfg` is NULL or a valid ic_config per the contract.
        let (b, drop_timeout) = unsafe { builder_from(cfg) }?;
        let h = lock(&CLUSTERS).insert((Arc::new(b.build()), drop_timeout));
        // SAFETY: non-NULL and writable per the contract.
        unsafe { out.write(h) };
        Ok(())
    })
}

/// Creates a cluster that joins the network `network` as node `cfg->node_name` (NULL
/// names it "node"): nodes of the same network find each other, and an isolate of
/// another node is named "node:/path" (`ic_lookup`, then send, transfer and call as to a
/// local one; `ic_watch_nodes` gives node up and down events). Messages from C travel as
/// raw bytes with their tags.
///
/// `network` (1 to 32 of `[A-Za-z0-9_-]`, like node names) is required. `zenoh_json5`
/// may be NULL: nodes then meet on this machine through unix sockets in `rendezvous_dir`
/// (NULL: `$TMPDIR/isolate-cluster-<uid>/<network>`); otherwise it is a whole Zenoh
/// configuration in JSON5 (endpoints, routers, TLS, user/password authentication).
/// `lease_ms` is how long a silent node stays up (0: Zenoh's default, 10 s). `cfg` may be
/// NULL (defaults); `out` receives the handle, freed with `ic_cluster_free`, which leaves
/// the network.
///
/// Errors: IC_ERR_INVALID_ARGUMENT (a bad node or network name, a configuration Zenoh
/// refuses to parse), IC_ERR_DUPLICATE (a live node of the network has this name),
/// IC_ERR_NETWORK (the session or the rendezvous directory failed), IC_ERR_UNSUPPORTED
/// (built without the `zenoh` feature). Any thread.
#[no_mangle]
pub unsafe extern "C" fn ic_cluster_join_network(
    cfg: *const ic_config,
    network: *const c_char,
    zenoh_json5: *const c_char,
    rendezvous_dir: *const c_char,
    lease_ms: u64,
    out: *mut ic_cluster,
) -> ic_error {
    guard(|| {
        non_null(out, "out")?;
        // SAFETY: NUL-terminated per the contract.
        let name = unsafe { str_arg(network, "network") }?;
        let json = if zenoh_json5.is_null() {
            None
        } else {
            // SAFETY: NUL-terminated per the contract.
            Some(unsafe { str_arg(zenoh_json5, "zenoh_json5") }?)
        };
        let dir = if rendezvous_dir.is_null() {
            None
        } else {
            // SAFETY: NUL-terminated per the contract.
            Some(unsafe { str_arg(rendezvous_dir, "rendezvous_dir") }?)
        };
        // SAFETY: `cfg` is NULL or a valid ic_config per the contract.
        let (b, drop_timeout) = unsafe { builder_from(cfg) }?;
        let cluster = join_network(b, name, json, dir, lease_ms)?;
        let h = lock(&CLUSTERS).insert((Arc::new(cluster), drop_timeout));
        // SAFETY: non-NULL and writable per the contract.
        unsafe { out.write(h) };
        Ok(())
    })
}

/// Joins the network (or says that this build cannot).
fn join_network(
    b: engine::Builder,
    name: &str,
    json: Option<&str>,
    dir: Option<&str>,
    lease_ms: u64,
) -> R<Cluster> {
    #[cfg(not(feature = "zenoh"))]
    {
        let _ = (b, name, json, dir, lease_ms);
        err(
            IC_ERR_UNSUPPORTED,
            "built without network support: build isolate-cluster-ffi with the `zenoh` feature",
        )
    }
    #[cfg(feature = "zenoh")]
    {
        use engine::net::{zenoh, NetError, Network};
        let mut n = Network::new(name);
        if let Some(j) = json {
            let config = zenoh::Config::from_json5(j).map_err(|e| {
                (
                    IC_ERR_INVALID_ARGUMENT,
                    format!("zenoh_json5 is not a Zenoh configuration: {e}"),
                )
            })?;
            n = n.zenoh_config(config);
        }
        if let Some(d) = dir {
            n = n.rendezvous_dir(d);
        }
        if lease_ms > 0 {
            n = n.lease(Duration::from_millis(lease_ms));
        }
        b.join(n).map_err(|e| {
            let code = match &e {
                NetError::InvalidName(_) => IC_ERR_INVALID_ARGUMENT,
                NetError::DuplicateNode(_) => IC_ERR_DUPLICATE,
                _ => IC_ERR_NETWORK,
            };
            (code, e.to_string())
        })
    }
}

/// Asks every isolate to shut down (children before parents); returns at once. Any
/// thread.
#[no_mangle]
pub extern "C" fn ic_cluster_shutdown(cluster_handle: ic_cluster) -> ic_error {
    guard(|| {
        cluster(cluster_handle)?.shutdown();
        Ok(())
    })
}

/// Waits up to `timeout_ms` for every isolate to stop: IC_OK, or IC_ERR_TIMEOUT (the
/// isolates still running are named in `ic_last_error`). Any thread but an isolate of
/// this cluster.
#[no_mangle]
pub extern "C" fn ic_cluster_join(cluster_handle: ic_cluster, timeout_ms: u64) -> ic_error {
    guard(|| {
        let c = cluster(cluster_handle)?;
        c.join(Duration::from_millis(timeout_ms))
            .map_err(|e| (IC_ERR_TIMEOUT, e.to_string()))
    })
}

/// Frees the cluster: shuts it down and waits up to its `drop_timeout_ms` for the
/// isolates. The handle is invalid afterwards (a second free is IC_ERR_STALE_HANDLE).
/// Isolate handles of the cluster stay valid to release, but name stopped isolates. Any
/// thread but an isolate of this cluster.
#[no_mangle]
pub extern "C" fn ic_cluster_free(cluster_handle: ic_cluster) -> ic_error {
    guard(|| {
        let (c, patience) = lock(&CLUSTERS).remove(cluster_handle).ok_or_else(|| {
            (
                IC_ERR_STALE_HANDLE,
                format!("no cluster {cluster_handle:#x}"),
            )
        })?;
        // Shut down and wait here, even if another call still holds the cluster for a
        // moment (the last reference, wherever it drops, then has nothing left to wait for).
        c.shutdown();
        let _ = c.join(patience);
        drop(c);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Isolates

struct Entry {
    f: unsafe extern "C" fn(u64, *mut c_void),
    user: *mut c_void,
}

// SAFETY: `ic_spawn`'s contract makes the caller promise `user_data` may be used from the
// isolate's thread; the function pointer is plain code.
unsafe impl Send for Entry {}

/// Spawns an isolate at `path` (for example "/workers/1") running `entry(inbox,
/// user_data)` on its own thread. `props` points to `n_props` properties (may be NULL when
/// `n_props` is 0; strings are copied). `user_data` is passed as is and must be usable
/// from the isolate's thread. `out` may be NULL; else it receives an isolate handle the
/// caller releases with `ic_isolate_release`. Any thread.
#[no_mangle]
pub unsafe extern "C" fn ic_spawn(
    cluster_handle: ic_cluster,
    path: *const c_char,
    props: *const ic_property,
    n_props: usize,
    entry: ic_entry_fn,
    user_data: *mut c_void,
    out: *mut ic_isolate,
) -> ic_error {
    guard(|| {
        let c = cluster(cluster_handle)?;
        // SAFETY: NUL-terminated per the contract.
        let path = unsafe { str_arg(path, "path") }?;
        let Some(f) = entry else {
            return err(IC_ERR_NULL, "entry is NULL");
        };
        let mut properties = Properties::new();
        if n_props > 0 {
            non_null(props, "props")?;
            // SAFETY: `props` points to `n_props` properties per the contract.
            let list = unsafe { std::slice::from_raw_parts(props, n_props) };
            for p in list {
                // SAFETY: NUL-terminated strings per the contract.
                let (k, v) = unsafe { (str_arg(p.key, "key")?, str_arg(p.value, "value")?) };
                properties = properties.with(k, v);
            }
        }
        let e = Entry { f, user: user_data };
        let r = c
            .spawn(path, properties, move |ctx| {
                let e = e;
                let h = match open_inbox(InboxRef::Context(std::ptr::from_ref(ctx))) {
                    Ok(h) => h,
                    // The isolate goes down `Panicked` with the reason.
                    Err((_, why)) => panic!("the isolate's inbox could not be opened: {why}"),
                };
                // SAFETY: the entry function and its data come from `ic_spawn`'s caller.
                let ran = catch_unwind(AssertUnwindSafe(|| unsafe { (e.f)(h, e.user) }));
                // Held messages go before the context does.
                let _ = close_inbox(h);
                if let Err(p) = ran {
                    std::panic::resume_unwind(p);
                }
            })
            .map_err(spawn_error)?;
        if !out.is_null() {
            // SAFETY: non-NULL and writable per the contract.
            unsafe { out.write(new_isolate_handle(r)) };
        }
        Ok(())
    })
}

/// Looks up a live isolate by path. `out` receives a handle the caller releases with
/// `ic_isolate_release`. Any thread.
#[no_mangle]
pub unsafe extern "C" fn ic_lookup(
    cluster_handle: ic_cluster,
    path: *const c_char,
    out: *mut ic_isolate,
) -> ic_error {
    guard(|| {
        non_null(out, "out")?;
        let c = cluster(cluster_handle)?;
        // SAFETY: NUL-terminated per the contract.
        let path = unsafe { str_arg(path, "path") }?;
        let r = c.lookup(path).map_err(|e| {
            let code = match e {
                engine::LookupError::InvalidPath(_) => IC_ERR_INVALID_PATH,
                _ => IC_ERR_NOT_FOUND,
            };
            (code, e.to_string())
        })?;
        // SAFETY: non-NULL and writable per the contract.
        unsafe { out.write(new_isolate_handle(r)) };
        Ok(())
    })
}

/// The endpoint id of an isolate (what `ic_message.sender_id` and `isolate_id` hold).
/// `out` must not be NULL. Any thread.
#[no_mangle]
pub unsafe extern "C" fn ic_isolate_id(isolate_handle: ic_isolate, out: *mut u32) -> ic_error {
    guard(|| {
        non_null(out, "out")?;
        let r = isolate(isolate_handle)?;
        // SAFETY: non-NULL and writable per the contract.
        unsafe { out.write(r.id()) };
        Ok(())
    })
}

/// Whether the isolate still runs: 1 yes, 0 no, in `out`. Any thread.
#[no_mangle]
pub unsafe extern "C" fn ic_isolate_alive(isolate_handle: ic_isolate, out: *mut i32) -> ic_error {
    guard(|| {
        non_null(out, "out")?;
        let r = isolate(isolate_handle)?;
        // SAFETY: non-NULL and writable per the contract.
        unsafe { out.write(i32::from(r.is_alive())) };
        Ok(())
    })
}

/// Releases an isolate handle (the isolate keeps running). A second release is
/// IC_ERR_STALE_HANDLE. Any thread.
#[no_mangle]
pub extern "C" fn ic_isolate_release(isolate_handle: ic_isolate) -> ic_error {
    guard(|| {
        lock(&ISOLATES).remove(isolate_handle).ok_or_else(|| {
            (
                IC_ERR_STALE_HANDLE,
                format!("no isolate {isolate_handle:#x}"),
            )
        })?;
        ISOLATE_EPOCH.0.fetch_add(1, Ordering::AcqRel);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Inboxes

/// Opens the calling thread's mailbox for the cluster (a thread that is not an isolate
/// receives replies and events there). `out` receives an inbox handle usable on this
/// thread only; close it with `ic_mailbox_close` (a thread that ends with it open closes
/// it on the way out). IC_ERR_IN_USE if this thread has one open already.
#[no_mangle]
pub unsafe extern "C" fn ic_mailbox_open(
    cluster_handle: ic_cluster,
    out: *mut ic_inbox,
) -> ic_error {
    guard(|| {
        non_null(out, "out")?;
        let c = cluster(cluster_handle)?;
        let m = c.mailbox().map_err(|e| match e {
            MailboxError::InUse => (IC_ERR_IN_USE, e.to_string()),
            _ => (IC_ERR_STALE_HANDLE, e.to_string()),
        })?;
        let h = open_inbox(InboxRef::Mailbox(Box::new(m)))?;
        // SAFETY: non-NULL and writable per the contract.
        unsafe { out.write(h) };
        Ok(())
    })
}

/// Closes a mailbox opened with `ic_mailbox_open`, releasing the messages it still
/// holds. An isolate's own inbox cannot be closed (IC_ERR_INVALID_ARGUMENT). The
/// opening thread only.
#[no_mangle]
pub extern "C" fn ic_mailbox_close(inbox: ic_inbox) -> ic_error {
    guard(|| {
        let is_context = enter(inbox)?.context().is_some();
        if is_context {
            return err(
                IC_ERR_INVALID_ARGUMENT,
                "an isolate's inbox closes when it returns",
            );
        }
        close_inbox(inbox)
    })
}

/// The endpoint id of an inbox (the `sender_id` its messages carry). The inbox's thread
/// only.
#[no_mangle]
pub unsafe extern "C" fn ic_inbox_id(inbox: ic_inbox, out: *mut u32) -> ic_error {
    guard(|| {
        non_null(out, "out")?;
        let e = enter(inbox)?;
        let p = e.inbox();
        // SAFETY: the inbox is entered: it stays open for this whole call.
        let id = unsafe { &*p }.me().id();
        // SAFETY: non-NULL and writable per the contract.
        unsafe { out.write(id) };
        Ok(())
    })
}

/// Sends a copy of `len` bytes at `data` (may be NULL when `len` is 0) with an
/// application `tag` (top bit clear) from `inbox` to the isolate. Waits while the ring is
/// full. The bytes are copied into the ring before this returns. The inbox's thread
/// only.
#[no_mangle]
pub unsafe extern "C" fn ic_send(
    inbox: ic_inbox,
    to: ic_isolate,
    tag: u64,
    data: *const c_void,
    len: usize,
) -> ic_error {
    // SAFETY: the caller's contract is `send_raw`'s.
    unsafe { send_raw(inbox, to, tag, data, len, false) }
}

/// `ic_send` (`only_try` false) and `ic_try_send` (true).
///
/// # Safety
/// `data` is NULL with `len` 0, or points to `len` readable bytes.
unsafe fn send_raw(
    inbox: ic_inbox,
    to: ic_isolate,
    tag: u64,
    data: *const c_void,
    len: usize,
    only_try: bool,
) -> ic_error {
    guard(|| {
        check_tag(tag)?;
        let e = enter(inbox)?;
        let target = isolate(to)?;
        // SAFETY: `data` points to `len` readable bytes per the contract.
        let bytes = unsafe { bytes_arg(data, len) }?;
        // SAFETY: the inbox is entered: it stays open for this whole call.
        let inb = unsafe { &*e.inbox() };
        let sent = if only_try {
            inb.try_send_bytes(&target, tag, bytes)
        } else {
            inb.send_bytes(&target, tag, bytes)
        };
        sent.map_err(send_error)
    })
}

/// `ic_send` that fails with IC_ERR_FULL instead of waiting. The inbox's thread only.
#[no_mangle]
pub unsafe extern "C" fn ic_try_send(
    inbox: ic_inbox,
    to: ic_isolate,
    tag: u64,
    data: *const c_void,
    len: usize,
) -> ic_error {
    // SAFETY: the caller's contract is `send_raw`'s.
    unsafe { send_raw(inbox, to, tag, data, len, true) }
}

/// Moves a caller-owned buffer to the isolate without copying it: only the pointer
/// travels. On success the library owns `data` and calls `free_fn(data, free_ctx)` once
/// when nobody wants it any more (the receiver may take it over with `ic_message_take`);
/// `free_fn` may be NULL if nothing needs freeing, and must be callable from any thread;
/// if it calls this library with the inbox whose call frees the buffer, that call returns
/// IC_ERR_IN_USE.
/// On failure the caller still owns `data`. The inbox's thread only.
#[no_mangle]
pub unsafe extern "C" fn ic_transfer(
    inbox: ic_inbox,
    to: ic_isolate,
    tag: u64,
    data: *mut c_void,
    len: usize,
    free_fn: ic_free_fn,
    free_ctx: *mut c_void,
) -> ic_error {
    guard(|| {
        check_tag(tag)?;
        if len > 0 {
            non_null(data, "data")?;
        }
        let e = enter(inbox)?;
        let p = e.inbox();
        let target = isolate(to)?;
        let buf = Box::new(ForeignBuffer {
            data,
            len,
            tag,
            free: free_fn,
            ctx: free_ctx,
        });
        // SAFETY: the inbox is entered: it stays open for this whole call.
        unsafe { &*p }.transfer(&target, buf).map_err(|e| {
            // The buffer came back: the caller keeps ownership, so it must not be freed.
            let e = e.map(|mut b| {
                b.free = None;
            });
            send_error(e)
        })
    })
}

/// Receives the next message or event. `timeout_us` < 0 waits until one comes, 0 only
/// looks, > 0 waits at most that many microseconds. On IC_OK `out` describes it until
/// `ic_message_release`; IC_ERR_TIMEOUT if nothing came; IC_ERR_STOPPED once the inbox
/// has stopped (for an isolate: return from the entry function). The inbox's thread only.
#[no_mangle]
pub unsafe extern "C" fn ic_recv(
    inbox: ic_inbox,
    timeout_us: i64,
    out: *mut ic_message,
) -> ic_error {
    guard(|| {
        non_null(out, "out")?;
        let e = enter(inbox)?;
        let (p, ctx) = (e.inbox(), e.context());
        // SAFETY: `out` is non-NULL (checked) and writable per the contract.
        let out = unsafe { &mut *out };
        match (ctx, timeout_us) {
            // An isolate's blocking receive, inlined here on its own: merged with the other
            // ways of receiving, every message went through a stack temporary whose copy
            // into the held table stalled on store forwarding.
            // SAFETY: the inbox is entered: it and its context stay valid for this call.
            (Some(c), t) if t < 0 => unsafe { deliver(&e, p, (*c).recv(), out) },
            // SAFETY: as above.
            _ => unsafe { recv_other(&e, p, ctx, timeout_us, out) },
        }
    })
}

/// `ic_recv` other than an isolate's blocking receive: with a timeout, without waiting,
/// or on a mailbox.
///
/// # Safety
/// `p` (and `ctx`, if any) are those of the inbox `e` entered.
#[inline(never)]
unsafe fn recv_other(
    e: &Entered,
    p: *const Inbox,
    ctx: Option<*const Context>,
    timeout_us: i64,
    out: &mut ic_message,
) -> R {
    let timeout = Duration::from_micros(timeout_us.unsigned_abs());
    // SAFETY: the inbox is entered: it and its context stay valid for this whole call.
    let ev = unsafe {
        match (ctx, timeout_us) {
            (Some(c), t) if t < 0 => (*c).recv(),
            (Some(c), 0) => (*c).try_recv(),
            (Some(c), _) => (*c).recv_timeout(timeout),
            (None, t) if t < 0 => (*p).recv(),
            (None, 0) => (*p).try_recv(),
            (None, _) => (*p).recv_timeout(timeout),
        }
    };
    // SAFETY: the caller's contract.
    unsafe { deliver(e, p, ev, out) }
}

/// What `ic_recv` got: a message or event held for the caller, or why nothing came.
///
/// # Safety
/// `p` is the inbox `e` entered.
#[inline(always)]
unsafe fn deliver(e: &Entered, p: *const Inbox, ev: Option<Event<'_>>, out: &mut ic_message) -> R {
    match ev {
        Some(Event::Message(m)) if !m.is_transfer() => hold_copy(e, m, out),
        Some(ev) => hold(e, ev, out),
        // SAFETY: the inbox is entered (the caller's contract): it stays open for this call.
        None if unsafe { &*p }.is_finished() => err(IC_ERR_STOPPED, "the inbox has stopped"),
        None => err(IC_ERR_TIMEOUT, "nothing arrived"),
    }
}

/// Releases a message or event received on `inbox`: its ring space is freed, and a
/// transferred buffer nobody took is freed. `msg->handle` is set to 0; releasing the same
/// message twice is IC_ERR_STALE_HANDLE. The inbox's thread only.
#[no_mangle]
pub unsafe extern "C" fn ic_message_release(inbox: ic_inbox, msg: *mut ic_message) -> ic_error {
    guard(|| {
        non_null(msg, "msg")?;
        // SAFETY: non-NULL, points to an ic_message per the contract.
        let m = unsafe { &mut *msg };
        let e = enter(inbox)?;
        let held = e
            .state()
            .held
            .remove(m.handle)
            .ok_or_else(|| (IC_ERR_STALE_HANDLE, format!("no message {:#x}", m.handle)))?;
        m.handle = 0;
        // Dropped while entered: a buffer's free function that calls back in with this
        // inbox gets IC_ERR_IN_USE instead of pulling the inbox away.
        drop(held);
        Ok(())
    })
}

/// Takes over the buffer of a transfer (`IC_MSG_TRANSFER`): `*data` and `*len` receive
/// it, and `*free_fn` / `*free_ctx` (each may be NULL if not wanted) how to free it; the
/// caller now owns it and the message no longer frees it. IC_ERR_NOT_A_REQUEST if there is
/// no buffer to take. The message still needs `ic_message_release`. The inbox's thread
/// only.
#[no_mangle]
pub unsafe extern "C" fn ic_message_take(
    inbox: ic_inbox,
    msg: *const ic_message,
    data: *mut *mut c_void,
    len: *mut usize,
    free_fn: *mut ic_free_fn,
    free_ctx: *mut *mut c_void,
) -> ic_error {
    guard(|| {
        non_null(msg, "msg")?;
        non_null(data, "data")?;
        non_null(len, "len")?;
        // SAFETY: non-NULL, points to an ic_message per the contract.
        let handle = unsafe { (*msg).handle };
        let e = enter(inbox)?;
        let mut b = with_held(&e, handle, |h| {
            h.extra
                .as_mut()
                .and_then(|x| x.buffer.take())
                .ok_or_else(|| (IC_ERR_NOT_A_REQUEST, "no buffer to take".to_owned()))
        })?;
        let f = b.free.take();
        // SAFETY: the out-pointers are non-NULL (checked) or NULL-tolerated, and writable.
        unsafe {
            data.write(b.data);
            len.write(b.len);
            if !free_fn.is_null() {
                free_fn.write(f);
            }
            if !free_ctx.is_null() {
                free_ctx.write(b.ctx);
            }
        }
        Ok(())
    })
}

/// Answers a request (or any message: the answer goes to its reply-to endpoint) with a
/// copy of `len` bytes and an application `tag`. The inbox's thread only.
#[no_mangle]
pub unsafe extern "C" fn ic_reply(
    inbox: ic_inbox,
    msg: *const ic_message,
    tag: u64,
    data: *const c_void,
    len: usize,
) -> ic_error {
    guard(|| {
        non_null(msg, "msg")?;
        check_tag(tag)?;
        // SAFETY: `data` points to `len` readable bytes per the contract.
        let bytes = unsafe { bytes_arg(data, len) }?;
        // SAFETY: non-NULL, points to an ic_message per the contract.
        let handle = unsafe { (*msg).handle };
        let e = enter(inbox)?;
        let m = held_message(&e, handle)?;
        // SAFETY: the inbox is entered, so the message cannot be released meanwhile.
        unsafe { &*m }.reply_bytes(tag, bytes).map_err(send_error)
    })
}

/// Fails a request: the caller's `ic_call` returns IC_ERR_REMOTE with `error` (a
/// NUL-terminated string) in its `ic_last_error`. IC_ERR_NOT_A_REQUEST if the message is
/// not a request. The inbox's thread only.
#[no_mangle]
pub unsafe extern "C" fn ic_reply_error(
    inbox: ic_inbox,
    msg: *const ic_message,
    error: *const c_char,
) -> ic_error {
    guard(|| {
        non_null(msg, "msg")?;
        // SAFETY: NUL-terminated per the contract.
        let text = unsafe { str_arg(error, "error") }?;
        // SAFETY: non-NULL, points to an ic_message per the contract.
        let handle = unsafe { (*msg).handle };
        let e = enter(inbox)?;
        let m = held_message(&e, handle)?;
        // SAFETY: the inbox is entered, so the message cannot be released meanwhile.
        let m = unsafe { &*m };
        if !m.is_request() {
            return err(IC_ERR_NOT_A_REQUEST, "the message is not a request");
        }
        m.reply_error(text).map_err(send_error)
    })
}

/// The held message behind `handle`, as a pointer (no table borrow is kept while it is
/// used: replying may run user code).
fn held_message(e: &Entered, handle: u64) -> R<*const Message<'static>> {
    with_held(e, handle, |h| {
        h.msg
            .as_ref()
            .map(std::ptr::from_ref)
            .ok_or_else(|| (IC_ERR_NOT_A_REQUEST, "an event, not a message".to_owned()))
    })
}

/// Sends a request of `len` bytes with `tag` and waits up to `timeout_ms` for its answer,
/// which `reply` receives (release it with `ic_message_release`). The timeout bounds the
/// whole call: a request that finds the target's ring full waits for room only until
/// then. Errors: IC_ERR_TIMEOUT (a late answer is dropped; a request that never found
/// room was not sent), IC_ERR_REMOTE (the handler's error text is
/// in `ic_last_error`), IC_ERR_TARGET_DOWN, IC_ERR_DISCONNECTED. The inbox's thread only.
#[no_mangle]
pub unsafe extern "C" fn ic_call(
    inbox: ic_inbox,
    to: ic_isolate,
    tag: u64,
    data: *const c_void,
    len: usize,
    timeout_ms: u64,
    reply: *mut ic_message,
) -> ic_error {
    guard(|| {
        non_null(reply, "reply")?;
        check_tag(tag)?;
        let e = enter(inbox)?;
        let p = e.inbox();
        let target = isolate(to)?;
        // SAFETY: `data` points to `len` readable bytes per the contract.
        let bytes = unsafe { bytes_arg(data, len) }?;
        // SAFETY: the inbox is entered: it stays open for this whole call.
        let m = unsafe { &*p }
            .call_bytes(&target, tag, bytes, Duration::from_millis(timeout_ms))
            .map_err(call_error)?;
        // SAFETY: `reply` is non-NULL and writable per the contract.
        let reply = unsafe { &mut *reply };
        if m.is_transfer() {
            hold(&e, Event::Message(m), reply)
        } else {
            hold_copy(&e, m, reply)
        }
    })
}

/// Subscribes `inbox` to every isolate of the cluster: an IC_EVENT_ISOLATE_UP for each
/// live one now and each later one, then one IC_EVENT_ISOLATE_DOWN when it stops (and the
/// node's supervision events). The inbox's thread only.
#[no_mangle]
pub extern "C" fn ic_watch_isolates(inbox: ic_inbox) -> ic_error {
    guard(|| {
        let e = enter(inbox)?;
        let p = e.inbox();
        // SAFETY: the inbox is entered: it stays open for this whole call.
        unsafe { &*p }.watch_isolates(|_| true);
        Ok(())
    })
}

/// Subscribes `inbox` to the nodes of its cluster's network: an IC_EVENT_NODE_UP (the
/// node's name in `path`) for each other live node now and each later one, an
/// IC_EVENT_NODE_DOWN when one leaves or is lost, and an IC_EVENT_REJECTED (node in
/// `path`, why in `reason`) when bytes from one are refused. IC_ERR_UNSUPPORTED without
/// network support; on a cluster that joined no network, nothing ever arrives. The
/// inbox's thread only.
#[no_mangle]
pub extern "C" fn ic_watch_nodes(inbox: ic_inbox) -> ic_error {
    guard(|| {
        let e = enter(inbox)?;
        let p = e.inbox();
        #[cfg(feature = "zenoh")]
        {
            // SAFETY: the inbox is entered: it stays open for this whole call.
            unsafe { &*p }.watch_nodes();
            Ok(())
        }
        #[cfg(not(feature = "zenoh"))]
        {
            let _ = p;
            err(IC_ERR_UNSUPPORTED, "built without network support")
        }
    })
}

/// Stops an isolate's receive loop: what was sent before is still delivered, then
/// `ic_recv` returns IC_ERR_STOPPED. For an isolate's own inbox only
/// (IC_ERR_INVALID_ARGUMENT for a mailbox). The inbox's thread only.
#[no_mangle]
pub extern "C" fn ic_shutdown_isolate(inbox: ic_inbox) -> ic_error {
    guard(|| {
        let e = enter(inbox)?;
        match e.context() {
            // SAFETY: valid while the handle is open (see `InboxRef::Context`).
            Some(c) => unsafe { &*c }.shutdown_isolate(),
            None => return err(IC_ERR_INVALID_ARGUMENT, "a mailbox is not an isolate"),
        }
        Ok(())
    })
}

#[cfg(all(test, not(feature = "zenoh")))]
mod tests {
    use super::*;

    /// Without the `zenoh` feature the network calls exist (the header is the same) and
    /// say so, with nothing created.
    #[test]
    fn network_calls_are_unsupported_without_the_feature() {
        let mut out: ic_cluster = 0;
        // SAFETY: a valid network name and a writable `out`; the other pointers may be NULL.
        let e = unsafe {
            ic_cluster_join_network(
                std::ptr::null(),
                c"net".as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
                &mut out,
            )
        };
        assert_eq!(e, IC_ERR_UNSUPPORTED);
        assert_eq!(out, 0);
        // SAFETY: `ic_last_error` returns a NUL-terminated string.
        let detail = unsafe { CStr::from_ptr(ic_last_error()) };
        assert!(detail.to_string_lossy().contains("zenoh"), "{detail:?}");

        let mut c: ic_cluster = 0;
        let mut mb: ic_inbox = 0;
        // SAFETY: writable out-pointers.
        unsafe {
            assert_eq!(ic_cluster_new(std::ptr::null(), &mut c), IC_OK);
            assert_eq!(ic_mailbox_open(c, &mut mb), IC_OK);
        }
        assert_eq!(ic_watch_nodes(mb), IC_ERR_UNSUPPORTED);
        assert_eq!(ic_mailbox_close(mb), IC_OK);
        assert_eq!(ic_cluster_free(c), IC_OK);
    }
}
