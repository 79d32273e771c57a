//! Multi-node clusters over [Zenoh](https://zenoh.io) (cargo feature `zenoh`).
//!
//! A node joins a network with [`Builder::join`](crate::Builder::join). Nodes of the same
//! network find each other, and from then on the API is the one of a single node: an
//! isolate of another node is looked up by path, watched, monitored, sent to (copy or
//! transfer) and called like a local one.
//!
//! ```no_run
//! use std::time::Duration;
//! use isolate_cluster::{net::Network, Cluster, Event};
//!
//! // Process 1: a node "a" with an echo isolate.
//! let a = Cluster::builder().node_name("a").join(Network::new("demo")).unwrap();
//! a.spawn("/echo", Default::default(), |ctx| {
//!     while let Some(Event::Message(m)) = ctx.recv() {
//!         let _ = m.reply(&(*m.get::<u64>().unwrap() + 1));
//!     }
//! }).unwrap();
//!
//! // Process 2: a node "b" calls it.
//! let b = Cluster::builder().node_name("b").join(Network::new("demo")).unwrap();
//! let mailbox = b.mailbox().unwrap();
//! mailbox.watch_nodes();
//! let echo = loop {
//!     match b.lookup("a:/echo") {
//!         Ok(r) => break r,
//!         Err(_) => std::thread::sleep(Duration::from_millis(10)),
//!     }
//! };
//! let reply = mailbox.call(&echo, &41u64, Duration::from_secs(1)).unwrap();
//! assert_eq!(*reply.get::<u64>().unwrap(), 42);
//! ```
//!
//! ## Names
//!
//! A node has a name ([`Builder::node_name`](crate::Builder::node_name)), unique in its
//! network: a second live node with the same name is refused
//! ([`NetError::DuplicateNode`]). An isolate of another node is named `node:/path`
//! (`b.lookup("a:/echo")`); its [`IsolateRef::path`](crate::IsolateRef::path) says the
//! same, and [`IsolateRef::node`](crate::IsolateRef::node) gives the node. Paths without
//! a node name are this node's, as before.
//!
//! ## Guarantees
//!
//! - **Order.** Between a sending thread and a receiving isolate of another node,
//!   messages arrive in the order sent, once each, as locally. Isolate up and down
//!   announcements travel in the same stream as messages, so a remote isolate's
//!   messages are delivered before its [`Event::IsolateDown`](crate::Event::IsolateDown).
//! - **Membership.** Each node holds a Zenoh *liveliness token*. Watchers
//!   ([`Inbox::watch_nodes`](crate::Inbox::watch_nodes)) get
//!   [`Event::NodeUp`](crate::Event::NodeUp) when a node's token appears and
//!   [`Event::NodeDown`](crate::Event::NodeDown) when it goes: the node left, or Zenoh's
//!   lease on its session ran out ([`Network::lease`]): a node killed with `kill -9` is
//!   down within the lease (plus 100 ms, in which a leaving node's last announcements,
//!   which Zenoh may send after the token's removal, still arrive). Its isolates then go down with
//!   [`DownReason::NodeLost`](crate::DownReason::NodeLost); calls waiting on them return
//!   [`CallError::TargetDown`](crate::CallError::TargetDown).
//! - **Validation.** Nothing from the network is read before it is checked: envelopes
//!   are parsed with bounds checks, control messages are decoded with rkyv's validating
//!   access, and every message payload is validated as its type (with `bytecheck`) in the
//!   ring cell it is delivered into, before it is published. Malformed or hostile bytes,
//!   and types not registered here, are counted ([`NetStats::rejected`]) and dropped,
//!   with an [`Event::Rejected`](crate::Event::Rejected) for node watchers.
//! - **Backpressure.** A send to another node is published at once with Zenoh's blocking
//!   congestion control: it waits only when Zenoh's own queue to that node is full; it
//!   never reports `Full`. On arrival, a full ring spills (the frame keeps its FIFO place)
//!   rather than stalling the network for every other isolate.
//!
//! ## Types on the wire
//!
//! Local type tags come from `TypeId`, which differs between builds. On the wire a type
//! is named by a hash of its [`std::any::type_name`], the same in every build of the same
//! source. A type must be registered on both nodes with [`Network::wire_type`]: primitive
//! types, `String`, `Vec<u8>` and the task scheduler's messages are registered already.
//! Raw bytes with an application tag ([`Inbox::send_bytes`](crate::Inbox::send_bytes))
//! travel unchanged and are read with `get_checked`. A transfer to another node is
//! serialised once on the wire and arrives as a transfer of a new `Box` (its type needs
//! `rkyv::Deserialize`); a type that is not registered gives
//! [`SendError::Unregistered`](crate::SendError::Unregistered) with the value back.
//!
//! ## Finding each other, and security
//!
//! With no Zenoh configuration, a node runs in Zenoh peer mode with multicast scouting
//! off and listens on a unix socket in a rendezvous directory shared by the nodes of the
//! network on this machine (`$TMPDIR/isolate-cluster-<uid>/<network>`, or
//! [`Network::rendezvous_dir`]); it connects to every node already there. Two processes
//! on one machine therefore find each other with no other setup, and nothing listens on
//! a network interface.
//!
//! Across machines, pass a Zenoh configuration ([`Network::zenoh_config`]): endpoints to
//! listen on and connect to, a router, and security. Zenoh's TLS
//! (`transport/link/tls/*`: `root_ca_certificate`, `listen_certificate`,
//! `listen_private_key`, `enable_mtls`, with `tls/` endpoints; cargo feature `zenoh-tls`)
//! and user/password authentication (`transport/auth/usrpwd/*`) are Zenoh's own and
//! apply as configured, so a cluster spread over machines need not accept strangers:
//!
//! ```no_run
//! use isolate_cluster::net::{zenoh, Network};
//! let mut config = zenoh::Config::default();
//! config.insert_json5("mode", r#""peer""#).unwrap();
//! config.insert_json5("listen/endpoints", r#"["tcp/0.0.0.0:7447"]"#).unwrap();
//! config.insert_json5("scouting/multicast/enabled", "false").unwrap();
//! config.insert_json5("transport/auth/usrpwd/user", r#""node-a""#).unwrap();
//! config.insert_json5("transport/auth/usrpwd/password", r#""secret""#).unwrap();
//! config
//!     .insert_json5("transport/auth/usrpwd/dictionary_file", r#""/etc/ic/users.txt""#)
//!     .unwrap();
//! let network = Network::new("prod").zenoh_config(config);
//! ```

use std::any::type_name;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rkyv::api::high::HighValidator;
use rkyv::bytecheck::CheckBytes;
use rkyv::de::Pool;
use rkyv::rancor::Strategy;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Portable, Serialize};
use zenoh::qos::CongestionControl;
use zenoh::sample::{Sample, SampleKind};
use zenoh::Wait;

pub use zenoh;

use crate::cluster::{ClusterInner, NetHooks, NodeNotice};
use crate::endpoint::{lock, LocalEndpoint, Meta, TransferSource};
use crate::error::SendError;
use crate::frame::{
    drop_box, FrameKind, RingError, TransferPayload, TypeTag, FLAG_CALL, FLAG_ERROR, FLAG_RAW,
    FLAG_REPLY, RUST_TAG_BIT,
};
use crate::isolate::{DownReason, EndpointKind, Forward, IsolateRef, RemoteRoute};
use crate::link::{FrameSource, OwnedFrame};
use crate::path::{validate_name, validate_path, Properties, PropertyValue};
use crate::{Cluster, Payload};

/// How a node joins a network: the network's name, Zenoh's configuration, the lease,
/// and the types that may travel. See the [module documentation](self).
pub struct Network {
    name: String,
    zenoh: Option<zenoh::Config>,
    lease: Option<Duration>,
    dir: Option<PathBuf>,
    types: WireTypes,
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Network")
            .field("name", &self.name)
            .field("zenoh_config", &self.zenoh.is_some())
            .field("lease", &self.lease)
            .field("rendezvous_dir", &self.dir)
            .field("wire_types", &self.types.by_wire.len())
            .finish()
    }
}

impl Network {
    /// The network `name` (1 to 32 of `[A-Za-z0-9_-]`: nodes of different networks never
    /// see each other), with the default embedded configuration (see the module docs).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            zenoh: None,
            lease: None,
            dir: None,
            types: WireTypes::builtin(),
        }
    }

    /// Uses this Zenoh configuration as it is (mode, endpoints, scouting, TLS,
    /// authentication...) instead of the embedded default and its rendezvous directory.
    pub fn zenoh_config(mut self, config: zenoh::Config) -> Self {
        self.zenoh = Some(config);
        self
    }

    /// How long a node may stay silent before the others declare it lost (Zenoh's
    /// `transport/link/tx/lease`; Zenoh's default is 10 s). Also applied on top of a
    /// configuration given with [`zenoh_config`](Self::zenoh_config).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Where nodes of this network on this machine put their sockets to find each other
    /// (default `$TMPDIR/isolate-cluster-<uid>/<network>`). Unused with
    /// [`zenoh_config`](Self::zenoh_config).
    pub fn rendezvous_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Lets `T` travel between nodes: copies of it, and transfers of `Box<T>` (serialised
    /// once, rebuilt on arrival). Register it on every node, under the same type path
    /// ([`std::any::type_name`] names it on the wire).
    pub fn wire_type<T>(mut self) -> Self
    where
        T: Payload + Send + Archive,
        T::Archived: Portable
            + for<'b> CheckBytes<HighValidator<'b, rkyv::rancor::Error>>
            + Deserialize<T, Strategy<Pool, rkyv::rancor::Error>>,
    {
        self.types.add::<T>(Some(from_wire::<T>));
        self
    }
}

/// Why a node could not join a network.
#[derive(Debug)]
#[non_exhaustive]
pub enum NetError {
    /// The node or network name is not 1 to 32 of `[A-Za-z0-9_-]`.
    InvalidName(String),
    /// Zenoh refused the configuration, or the session could not open; Zenoh's text.
    Zenoh(String),
    /// A live node of the network already has this name.
    DuplicateNode(String),
    /// The rendezvous directory could not be used.
    Rendezvous(std::io::Error),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidName(n) => {
                write!(f, "invalid name {n:?}: use 1 to 32 of [A-Za-z0-9_-]")
            }
            Self::Zenoh(e) => write!(f, "zenoh: {e}"),
            Self::DuplicateNode(n) => write!(f, "a live node is already named {n:?}"),
            Self::Rendezvous(e) => write!(f, "rendezvous directory: {e}"),
        }
    }
}

impl std::error::Error for NetError {}

/// The network counters of a node ([`Cluster::net_stats`](crate::Cluster::net_stats)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Messages published to other nodes.
    pub sent: u64,
    /// Envelopes (messages and announcements) received from other nodes.
    pub received: u64,
    /// Envelopes dropped as malformed, hostile, or of an unregistered type.
    pub rejected: u64,
    /// Well-formed messages for an endpoint of this node that no longer exists (a request
    /// among them is answered with an error, so its caller does not wait).
    pub undeliverable: u64,
    /// Envelopes from a node (incarnation) that had already left or was lost when they
    /// arrived: dropped.
    pub stale: u64,
    /// Live other nodes.
    pub nodes: usize,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    rejected: AtomicU64,
    undeliverable: AtomicU64,
    stale: AtomicU64,
}

// ---------------------------------------------------------------------------------------
// Types on the wire.

type CheckFn = fn(&[u8]) -> bool;
/// Serialises the value behind a transfer pointer (not consuming it).
type ToWireFn = unsafe fn(*mut u8) -> Option<Vec<u8>>;
/// Validates and rebuilds a transferred value from 16-aligned bytes.
type FromWireFn = fn(&[u8]) -> Option<TransferPayload>;

struct WireType {
    wire: u64,
    local: TypeTag,
    check: CheckFn,
    to_wire: ToWireFn,
    from_wire: Option<FromWireFn>,
}

#[derive(Clone, Default)]
struct WireTypes {
    by_local: HashMap<TypeTag, Arc<WireType>>,
    by_wire: HashMap<u64, Arc<WireType>>,
}

/// The wire tag of a type: FNV-1a of its type path, top bit set.
fn wire_tag<T: ?Sized>() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in type_name::<T>().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h | RUST_TAG_BIT
}

fn check_bytes<T>(bytes: &[u8]) -> bool
where
    T: Archive,
    T::Archived: Portable + for<'b> CheckBytes<HighValidator<'b, rkyv::rancor::Error>>,
{
    rkyv::access::<T::Archived, rkyv::rancor::Error>(bytes).is_ok()
}

/// # Safety
/// `ptr` comes from `Box::<T>::into_raw` and the value is alive.
unsafe fn to_wire<T: Payload>(ptr: *mut u8) -> Option<Vec<u8>> {
    // SAFETY: per the contract, `ptr` points to a live `T`.
    let value = unsafe { &*ptr.cast::<T>() };
    crate::frame::encode(value).ok()
}

fn from_wire<T>(bytes: &[u8]) -> Option<TransferPayload>
where
    T: Archive + Send + 'static,
    T::Archived: Portable
        + for<'b> CheckBytes<HighValidator<'b, rkyv::rancor::Error>>
        + Deserialize<T, Strategy<Pool, rkyv::rancor::Error>>,
{
    let value = rkyv::from_bytes::<T, rkyv::rancor::Error>(bytes).ok()?;
    Some(TransferPayload {
        ptr: Box::into_raw(Box::new(value)).cast::<u8>(),
        drop_fn: drop_box::<T>,
    })
}

impl WireTypes {
    fn add<T>(&mut self, from_wire: Option<FromWireFn>)
    where
        T: Payload + Archive,
        T::Archived: Portable + for<'b> CheckBytes<HighValidator<'b, rkyv::rancor::Error>>,
    {
        let t = Arc::new(WireType {
            wire: wire_tag::<T>(),
            local: crate::frame::type_tag::<T>(),
            check: check_bytes::<T>,
            to_wire: to_wire::<T>,
            from_wire,
        });
        self.by_local.insert(t.local, t.clone());
        self.by_wire.insert(t.wire, t);
    }

    fn builtin() -> Self {
        let mut t = Self::default();
        macro_rules! full {
            ($($ty:ty),*) => { $( t.add::<$ty>(Some(from_wire::<$ty>)); )* };
        }
        full!(
            (),
            bool,
            char,
            u8,
            u16,
            u32,
            u64,
            u128,
            i8,
            i16,
            i32,
            i64,
            i128,
            f32,
            f64,
            String,
            Vec<u8>,
            Vec<u32>,
            Vec<u64>,
            Vec<i64>,
            Vec<f32>,
            Vec<f64>,
            Vec<String>
        );
        for (check, local, wire) in crate::task::wire_types() {
            let w = Arc::new(WireType {
                wire,
                local,
                check,
                to_wire: no_transfer,
                from_wire: None,
            });
            t.by_local.insert(local, w.clone());
            t.by_wire.insert(wire, w);
        }
        t
    }
}

/// For types that travel by copy only.
unsafe fn no_transfer(_: *mut u8) -> Option<Vec<u8>> {
    None
}

/// A copy-only wire type: its check, local tag and wire tag.
pub(crate) type WireEntry = (CheckFn, TypeTag, u64);

/// The [`WireEntry`] of `T`.
pub(crate) fn wire_entry<T>() -> WireEntry
where
    T: Archive + 'static,
    T::Archived: Portable + for<'b> CheckBytes<HighValidator<'b, rkyv::rancor::Error>>,
{
    (
        check_bytes::<T>,
        crate::frame::type_tag::<T>(),
        wire_tag::<T>(),
    )
}

// ---------------------------------------------------------------------------------------
// Envelopes.

const VERSION: u8 = 1;
const KIND_MSG: u8 = 1;
const KIND_CTL: u8 = 2;
/// Bytes before a message's payload.
const MSG_HEADER: usize = 32;
/// Bytes before a control message's archive.
const CTL_HEADER: usize = 8;
const KNOWN_FLAGS: u8 = FLAG_CALL | FLAG_REPLY | FLAG_ERROR | FLAG_RAW;
/// Why an envelope from a node that has left is dropped (not a rejection).
const STALE: &str = "from a node that has left";

/// A message envelope's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MsgHeader {
    flags: u8,
    transfer: bool,
    target: u32,
    sender: u32,
    reply_to: u32,
    tag: u64,
    correlation: u64,
}

impl MsgHeader {
    fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(MSG_HEADER + payload.len());
        b.extend_from_slice(&[VERSION, KIND_MSG, self.flags, u8::from(self.transfer)]);
        b.extend_from_slice(&self.target.to_le_bytes());
        b.extend_from_slice(&self.sender.to_le_bytes());
        b.extend_from_slice(&self.reply_to.to_le_bytes());
        b.extend_from_slice(&self.tag.to_le_bytes());
        b.extend_from_slice(&self.correlation.to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn decode(b: &[u8]) -> Result<(Self, &[u8]), &'static str> {
        if b.len() < MSG_HEADER {
            return Err("message shorter than its header");
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let h = Self {
            flags: b[2],
            transfer: match b[3] {
                0 => false,
                1 => true,
                _ => return Err("bad frame kind"),
            },
            target: u32_at(4),
            sender: u32_at(8),
            reply_to: u32_at(12),
            tag: u64_at(16),
            correlation: u64_at(24),
        };
        if h.flags & !KNOWN_FLAGS != 0 {
            return Err("unknown flags");
        }
        if h.target == 0 || h.sender == 0 {
            return Err("no target or no sender");
        }
        let raw = h.flags & FLAG_RAW != 0;
        if raw && (h.transfer || h.tag & RUST_TAG_BIT != 0) {
            return Err("raw bytes must be a copy with an application tag");
        }
        if !raw && h.tag & RUST_TAG_BIT == 0 {
            return Err("typed payload without a wire type tag");
        }
        Ok((h, &b[MSG_HEADER..]))
    }
}

/// Announcements, in the same stream as messages.
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
enum Ctl {
    /// The sender's live isolates (the first envelope to a node).
    Hello(Vec<Desc>),
    /// An isolate started.
    Up(Desc),
    /// An isolate stopped.
    Down { id: u32, reason: WireReason },
}

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
struct Desc {
    id: u32,
    path: String,
    props: Vec<(String, WireProp)>,
}

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
enum WireProp {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
enum WireReason {
    Normal,
    Exited,
    Panicked(String),
    Escalated(String),
    NodeLost(String),
}

impl From<&DownReason> for WireReason {
    fn from(r: &DownReason) -> Self {
        match r {
            DownReason::Normal => Self::Normal,
            DownReason::Exited => Self::Exited,
            DownReason::Panicked(m) => Self::Panicked(m.clone()),
            DownReason::Escalated(m) => Self::Escalated(m.clone()),
            DownReason::NodeLost(n) => Self::NodeLost(n.clone()),
        }
    }
}

impl From<WireReason> for DownReason {
    fn from(r: WireReason) -> Self {
        match r {
            WireReason::Normal => Self::Normal,
            WireReason::Exited => Self::Exited,
            WireReason::Panicked(m) => Self::Panicked(m),
            WireReason::Escalated(m) => Self::Escalated(m),
            WireReason::NodeLost(n) => Self::NodeLost(n),
        }
    }
}

fn desc_of(r: &IsolateRef) -> Desc {
    Desc {
        id: r.id(),
        path: r.path().to_owned(),
        props: r
            .properties()
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    PropertyValue::Str(s) => WireProp::Str(s.clone()),
                    PropertyValue::Int(i) => WireProp::Int(*i),
                    PropertyValue::Float(x) => WireProp::Float(*x),
                    PropertyValue::Bool(b) => WireProp::Bool(*b),
                };
                (k.to_owned(), v)
            })
            .collect(),
    }
}

fn encode_ctl(ctl: &Ctl) -> Vec<u8> {
    let archive = match rkyv::to_bytes::<rkyv::rancor::Error>(ctl) {
        Ok(a) => a,
        Err(e) => unreachable!("announcements always serialise: {e}"),
    };
    let mut b = Vec::with_capacity(CTL_HEADER + archive.len());
    b.extend_from_slice(&[VERSION, KIND_CTL, 0, 0, 0, 0, 0, 0]);
    b.extend_from_slice(&archive);
    b
}

fn decode_ctl(b: &[u8]) -> Result<Ctl, &'static str> {
    if b.len() < CTL_HEADER || b[2..CTL_HEADER].iter().any(|&x| x != 0) {
        return Err("bad announcement header");
    }
    let mut aligned = AlignedVec::<16>::with_capacity(b.len() - CTL_HEADER);
    aligned.extend_from_slice(&b[CTL_HEADER..]);
    let ctl = rkyv::from_bytes::<Ctl, rkyv::rancor::Error>(&aligned)
        .map_err(|_| "invalid announcement archive")?;
    let valid = |d: &Desc| d.id != 0 && validate_path(&d.path).is_ok();
    let ok = match &ctl {
        Ctl::Hello(ds) => ds.iter().all(valid),
        Ctl::Up(d) => valid(d),
        Ctl::Down { id, .. } => *id != 0,
    };
    if ok {
        Ok(ctl)
    } else {
        Err("announcement names an invalid isolate")
    }
}

/// Parses `bytes` as an envelope from the network the way a node does before anything
/// reads them, and reports whether it would pass the checks that need no node state
/// (for fuzzing).
#[doc(hidden)]
pub fn check_envelope(bytes: &[u8]) -> Result<(), &'static str> {
    if bytes.len() < 2 || bytes[0] != VERSION {
        return Err("unknown envelope version");
    }
    match bytes[1] {
        KIND_MSG => {
            let (h, payload) = MsgHeader::decode(bytes)?;
            if h.flags & FLAG_RAW == 0 {
                let types = WireTypes::builtin();
                let t = types.by_wire.get(&h.tag).ok_or("unregistered type")?;
                let mut aligned = AlignedVec::<16>::with_capacity(payload.len());
                aligned.extend_from_slice(payload);
                if !(t.check)(&aligned) {
                    return Err("invalid payload");
                }
                if h.transfer {
                    let from = t.from_wire.ok_or("type cannot be transferred")?;
                    let p = from(&aligned).ok_or("invalid payload")?;
                    // SAFETY: `from_wire` boxed a fresh value; nobody else has it.
                    unsafe { (p.drop_fn)(p.ptr) };
                }
            }
            Ok(())
        }
        KIND_CTL => decode_ctl(bytes).map(|_| ()),
        _ => Err("unknown envelope kind"),
    }
}

// ---------------------------------------------------------------------------------------
// Links to other nodes.

/// The way to one other node: a publisher on its key for envelopes from this node.
struct NodeLink {
    publisher: zenoh::pubsub::Publisher<'static>,
    types: Arc<WireTypes>,
    counters: Arc<Counters>,
}

impl NodeLink {
    fn put(&self, envelope: Vec<u8>) -> Result<(), SendError> {
        self.publisher
            .put(envelope)
            .wait()
            .map_err(|_| SendError::Disconnected(()))
    }

    fn send_ctl(&self, ctl: &Ctl) {
        // A node that cannot be reached any more is declared lost by its token.
        let _ = self.put(encode_ctl(ctl));
    }
}

impl Forward for NodeLink {
    fn forward(&self, id: u32, frame: &OwnedFrame) -> Result<(), SendError> {
        let h = frame.header();
        let transfer = frame.transfer();
        let mut header = MsgHeader {
            flags: h.flags(),
            transfer: transfer.is_some(),
            target: id,
            sender: h.sender(),
            reply_to: h.reply_to(),
            tag: h.tag(),
            correlation: h.correlation(),
        };
        let envelope = if h.flags() & FLAG_RAW != 0 {
            header.encode(frame.payload())
        } else {
            let t = self
                .types
                .by_local
                .get(&h.tag())
                .ok_or(SendError::Unregistered(()))?;
            header.tag = t.wire;
            match transfer {
                None => header.encode(frame.payload()),
                Some(p) => {
                    if t.from_wire.is_none() {
                        return Err(SendError::Unregistered(()));
                    }
                    // SAFETY: the frame carries a live value of the type registered
                    // under its tag; it is only read here.
                    let bytes = unsafe { (t.to_wire)(p.ptr) }.ok_or(SendError::Serialize(()))?;
                    header.encode(&bytes)
                }
            }
        };
        self.put(envelope)?;
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = transfer {
            // SAFETY: the value was serialised and sent: the transfer consumed it, and the
            // caller drops the frame without its value (see `Forward::forward`).
            unsafe { (p.drop_fn)(p.ptr) };
        }
        Ok(())
    }
}

/// What this node knows of another.
struct NodeState {
    inc: u64,
    link: Arc<NodeLink>,
    /// Its endpoints this node has proxies for, by their id there.
    proxies: HashMap<u32, Proxy>,
}

/// A remote endpoint as this node sees it: its reference, and the endpoint that writes
/// its messages into this node's rings (created with its first message). Each remote
/// sender so has its own ring to each local receiver, as a local sender would: holding
/// a message from one sender never holds up another's messages or replies.
struct Proxy {
    r: IsolateRef,
    out: Option<Delivery>,
}

impl Proxy {
    /// Writes spilled frames, waiting up to `limit` for room (before the endpoint goes
    /// down: what it sent is delivered first).
    fn flush(&self, limit: Duration) {
        let Some(out) = &self.out else { return };
        let until = Instant::now() + limit;
        out.0.flush_spills();
        while out.0.has_spills() && Instant::now() < until {
            std::thread::sleep(Duration::from_micros(200));
            out.0.flush_spills();
        }
    }
}

#[derive(Default)]
struct State {
    nodes: HashMap<String, NodeState>,
    /// Incarnations that left: their late envelopes are ignored.
    gone: HashSet<(String, u64)>,
}

/// The sending side of a proxy: writes what its remote endpoint sent into local rings.
struct Delivery(LocalEndpoint);

// SAFETY: `LocalEndpoint` is not `Send` because of its `RefCell`s and the raw pointers
// into the rings and frames it owns, all of which move with it. A delivery endpoint is
// only ever used under `Net::state`'s mutex, by one thread at a time. It only sends, and
// only with `Mode::Spill`, which never parks, so the thread registered for its wake-ups
// (the one that created it) is never needed; nothing reads its inbound side.
unsafe impl Send for Delivery {}

/// Copies a payload from the network into ring memory and validates it there, before
/// the frame is published.
struct WireSource<'b> {
    bytes: &'b [u8],
    check: Option<CheckFn>,
}

impl FrameSource for WireSource<'_> {
    fn fill(&mut self, window: &mut [MaybeUninit<u8>]) -> Result<usize, RingError> {
        let n = self.bytes.len();
        if n > window.len() {
            return Err(RingError::NoRoom);
        }
        // SAFETY: the window holds at least `n` bytes and is ours until commit; the
        // source is a network buffer, never ring memory.
        unsafe {
            std::ptr::copy_nonoverlapping(self.bytes.as_ptr(), window.as_mut_ptr().cast(), n);
        }
        if let Some(check) = self.check {
            // SAFETY: the first `n` bytes of the window were just initialised; the window
            // starts 16-aligned (frame payloads do), as validation needs.
            let written = unsafe { std::slice::from_raw_parts(window.as_ptr().cast::<u8>(), n) };
            if !check(written) {
                return Err(RingError::Failed);
            }
        }
        Ok(n)
    }
}

/// The network side of a node.
pub(crate) struct Net {
    cluster: Weak<ClusterInner>,
    me: String,
    inc: u64,
    prefix: String,
    /// `ic/<network>/to/<me>/<incarnation>/`: where envelopes for this node arrive.
    inbox_key: String,
    session: zenoh::Session,
    types: Arc<WireTypes>,
    counters: Arc<Counters>,
    state: Mutex<State>,
    /// Links to live nodes, for announcements (taken with the registry locked).
    links: RwLock<Vec<Arc<NodeLink>>>,
    /// Subscribers and the liveliness token, dropped when the node leaves.
    keep: Mutex<Vec<Box<dyn std::any::Any + Send + Sync>>>,
    flusher: OnceLock<std::thread::Thread>,
    /// Nodes whose token went, to be declared lost after `LOST_GRACE`.
    losing: Mutex<Vec<(String, u64, Instant)>>,
    left: AtomicBool,
}

/// How long a node whose liveliness token went is given for its last envelopes to arrive.
const LOST_GRACE: Duration = Duration::from_millis(100);

fn hex(v: u64) -> String {
    format!("{v:016x}")
}

impl Net {
    /// Opens the session, announces the node and starts listening.
    pub(crate) fn join(
        builder: crate::Builder,
        network: Network,
    ) -> Result<crate::Cluster, NetError> {
        let me = builder.node().to_owned();
        validate_name(&me).map_err(|_| NetError::InvalidName(me.clone()))?;
        validate_name(&network.name).map_err(|_| NetError::InvalidName(network.name.clone()))?;
        let inc = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            .max(1);
        let prefix = format!("ic/{}", network.name);
        let session = open_session(&network, inc)?;
        let others = session
            .liveliness()
            .get(format!("{prefix}/node/{me}/*"))
            .timeout(Duration::from_millis(300))
            .wait()
            .map_err(|e| NetError::Zenoh(e.to_string()))?;
        while let Ok(reply) = others.recv() {
            if reply.result().is_ok() {
                let _ = session.close().wait();
                return Err(NetError::DuplicateNode(me));
            }
        }
        let cluster = builder.build();
        let inner = cluster.inner().clone();
        let net = Arc::new(Net {
            cluster: Arc::downgrade(&inner),
            me: me.clone(),
            inc,
            inbox_key: format!("{prefix}/to/{me}/{}/", hex(inc)),
            prefix: prefix.clone(),
            session,
            types: Arc::new(network.types),
            counters: Arc::new(Counters::default()),
            state: Mutex::new(State::default()),
            links: RwLock::new(Vec::new()),
            keep: Mutex::new(Vec::new()),
            flusher: OnceLock::new(),
            losing: Mutex::new(Vec::new()),
            left: AtomicBool::new(false),
        });
        let hooks: Arc<dyn NetHooks> = net.clone();
        if inner.net.set(hooks).is_err() {
            unreachable!("a fresh cluster has no network yet");
        }
        net.start().inspect_err(|_| net.leave())?;
        Ok(cluster)
    }

    fn start(self: &Arc<Self>) -> Result<(), NetError> {
        let z = |e: zenoh::Error| NetError::Zenoh(e.to_string());
        let weak = Arc::downgrade(self);
        let data = self
            .session
            .declare_subscriber(format!("{}*/*", self.inbox_key))
            .callback(move |s: Sample| {
                if let Some(net) = weak.upgrade() {
                    net.on_data(&s);
                }
            })
            .wait()
            .map_err(z)?;
        let weak = Arc::downgrade(self);
        let nodes = self
            .session
            .liveliness()
            .declare_subscriber(format!("{}/node/*/*", self.prefix))
            .history(true)
            .callback(move |s: Sample| {
                if let Some(net) = weak.upgrade() {
                    net.on_liveliness(&s);
                }
            })
            .wait()
            .map_err(z)?;
        let token = self
            .session
            .liveliness()
            .declare_token(format!(
                "{}/node/{}/{}",
                self.prefix,
                self.me,
                hex(self.inc)
            ))
            .wait()
            .map_err(z)?;
        let mut keep = lock(&self.keep);
        keep.push(Box::new(data));
        keep.push(Box::new(nodes));
        keep.push(Box::new(token));
        drop(keep);
        let weak = Arc::downgrade(self);
        let flusher = std::thread::Builder::new()
            .name("ic-net".into())
            .spawn(move || flush_loop(weak))
            .map_err(NetError::Rendezvous)?;
        let _ = self.flusher.set(flusher.thread().clone());
        Ok(())
    }

    fn cluster(&self) -> Option<Arc<ClusterInner>> {
        self.cluster.upgrade()
    }

    fn reject(&self, node: &str, reason: &str) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self.cluster() {
            c.node_event(NodeNotice::Rejected {
                node: node.to_owned(),
                reason: reason.to_owned(),
            });
        }
    }

    fn on_liveliness(&self, s: &Sample) {
        let key = s.key_expr().as_str();
        let Some(rest) = key.strip_prefix(&format!("{}/node/", self.prefix)) else {
            return;
        };
        let Some((name, inc)) = parse_node(rest) else {
            return;
        };
        if name == self.me {
            return;
        }
        match s.kind() {
            SampleKind::Put => {
                let _ = self.node_seen(name, inc);
            }
            SampleKind::Delete => {
                // Zenoh sends the token's removal at a higher priority than data: what
                // the node sent just before leaving (its isolates' down announcements)
                // may still be in flight. It gets a moment to arrive first.
                let at = Instant::now() + LOST_GRACE;
                lock(&self.losing).push((name.to_owned(), inc, at));
                if let Some(t) = self.flusher.get() {
                    t.unpark();
                }
            }
        }
    }

    /// Records another node (first contact, from its token or its first envelope):
    /// creates the link to it and greets it with this node's live isolates.
    fn node_seen(&self, name: &str, inc: u64) -> Result<(), &'static str> {
        let cluster = self.cluster().ok_or("node stopping")?;
        let mut st = lock(&self.state);
        // Every envelope passes here: the known node costs one lookup, no allocation.
        if st.nodes.get(name).is_some_and(|ns| ns.inc == inc) {
            return Ok(());
        }
        if st.gone.contains(&(name.to_owned(), inc)) {
            return Err(STALE);
        }
        if let Some(ns) = st.nodes.get(name) {
            match ns.inc.cmp(&inc) {
                std::cmp::Ordering::Equal => return Ok(()),
                std::cmp::Ordering::Greater => {
                    st.gone.insert((name.to_owned(), inc));
                    return Err(STALE);
                }
                // Restarted before its old session's lease ran out: the old one is gone.
                std::cmp::Ordering::Less => {
                    let old = ns.inc;
                    self.node_lost_locked(&mut st, &cluster, name, old);
                }
            }
        }
        let key = format!(
            "{}/to/{}/{}/{}/{}",
            self.prefix,
            name,
            hex(inc),
            self.me,
            hex(self.inc)
        );
        let publisher = self
            .session
            .declare_publisher(key)
            .congestion_control(CongestionControl::Block)
            .wait()
            .map_err(|_| "cannot publish to the node")?;
        let link = Arc::new(NodeLink {
            publisher,
            types: self.types.clone(),
            counters: self.counters.clone(),
        });
        st.nodes.insert(
            name.to_owned(),
            NodeState {
                inc,
                link: link.clone(),
                proxies: HashMap::new(),
            },
        );
        cluster.with_local_isolates(|isolates| {
            link.send_ctl(&Ctl::Hello(isolates.iter().map(desc_of).collect()));
            self.links
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .push(link.clone());
        });
        cluster.node_event(NodeNotice::Up(name.to_owned()));
        Ok(())
    }

    fn node_lost(&self, name: &str, inc: u64) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        let mut st = lock(&self.state);
        self.node_lost_locked(&mut st, &cluster, name, inc);
    }

    fn node_lost_locked(&self, st: &mut State, cluster: &ClusterInner, name: &str, inc: u64) {
        st.gone.insert((name.to_owned(), inc));
        if !matches!(st.nodes.get(name), Some(n) if n.inc == inc) {
            return;
        }
        let Some(ns) = st.nodes.remove(name) else {
            return;
        };
        self.links
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|l| !Arc::ptr_eq(l, &ns.link));
        let mut proxies: Vec<Proxy> = ns.proxies.into_values().collect();
        proxies.sort_by_key(|p| p.r.id());
        for p in proxies {
            p.flush(Duration::from_millis(100));
            cluster.remote_down(&p.r, DownReason::NodeLost(name.to_owned()));
        }
        cluster.node_event(NodeNotice::Down(name.to_owned()));
    }

    fn on_data(&self, s: &Sample) {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let key = s.key_expr().as_str();
        let Some((node, inc)) = key.strip_prefix(&self.inbox_key).and_then(parse_node) else {
            return self.reject("?", "unexpected key");
        };
        let bytes = s.payload().to_bytes();
        match self.handle(node, inc, &bytes) {
            Ok(()) => {}
            Err(STALE) => {
                self.counters.stale.fetch_add(1, Ordering::Relaxed);
            }
            Err(why) => self.reject(node, why),
        }
    }

    /// Handles one envelope from `node`.
    fn handle(&self, node: &str, inc: u64, bytes: &[u8]) -> Result<(), &'static str> {
        if bytes.len() < 2 || bytes[0] != VERSION {
            return Err("unknown envelope version");
        }
        if node == self.me {
            return Err("envelope claims to come from this node");
        }
        self.node_seen(node, inc)?;
        match bytes[1] {
            KIND_MSG => self.on_msg(node, inc, bytes),
            KIND_CTL => self.on_ctl(node, inc, decode_ctl(bytes)?),
            _ => Err("unknown envelope kind"),
        }
    }

    fn on_ctl(&self, node: &str, inc: u64, ctl: Ctl) -> Result<(), &'static str> {
        let cluster = self.cluster().ok_or("node stopping")?;
        let mut st = lock(&self.state);
        let ns = match st.nodes.get_mut(node) {
            Some(ns) if ns.inc == inc => ns,
            _ => return Err(STALE),
        };
        match ctl {
            Ctl::Hello(descs) => {
                for d in descs {
                    self.isolate_up(&cluster, node, ns, d);
                }
            }
            Ctl::Up(d) => self.isolate_up(&cluster, node, ns, d),
            Ctl::Down { id, reason } => {
                if let Some(p) = ns.proxies.remove(&id) {
                    drop(st);
                    // What it sent before is delivered first (spilled frames included).
                    p.flush(Duration::from_millis(100));
                    cluster.remote_down(&p.r, reason.into());
                }
            }
        }
        Ok(())
    }

    fn isolate_up(&self, cluster: &Arc<ClusterInner>, node: &str, ns: &mut NodeState, d: Desc) {
        if ns.proxies.contains_key(&d.id) {
            return;
        }
        let mut props = Properties::new();
        for (k, v) in d.props {
            props.insert(
                k,
                match v {
                    WireProp::Str(s) => PropertyValue::Str(s),
                    WireProp::Int(i) => PropertyValue::Int(i),
                    WireProp::Float(x) => PropertyValue::Float(x),
                    WireProp::Bool(b) => PropertyValue::Bool(b),
                },
            );
        }
        let r = self.proxy(
            cluster,
            node,
            ns,
            d.id,
            Some((format!("{node}:{}", d.path), props)),
        );
        cluster.remote_up(&r);
    }

    /// The proxy of endpoint `id` of `node`, created if needed (a thread's endpoint when
    /// no description is given).
    fn proxy(
        &self,
        cluster: &Arc<ClusterInner>,
        node: &str,
        ns: &mut NodeState,
        id: u32,
        desc: Option<(String, Properties)>,
    ) -> IsolateRef {
        if let Some(p) = ns.proxies.get(&id) {
            return p.r.clone();
        }
        let isolate = desc.is_some();
        let (path, props) = desc.unwrap_or_else(|| (format!("{node}:@{id}"), Properties::new()));
        let route = RemoteRoute {
            via: ns.link.clone(),
            id,
            node: node.to_owned(),
        };
        let endpoint = cluster.proxy_endpoint();
        let r = IsolateRef::new_remote(path, props, isolate, endpoint, cluster, route);
        ns.proxies.insert(
            id,
            Proxy {
                r: r.clone(),
                out: None,
            },
        );
        if !isolate {
            cluster.remote_up(&r);
        }
        r
    }

    fn on_msg(&self, node: &str, inc: u64, bytes: &[u8]) -> Result<(), &'static str> {
        let (h, payload) = MsgHeader::decode(bytes)?;
        let cluster = self.cluster().ok_or("node stopping")?;
        let target = cluster
            .ref_by_id(h.target)
            .filter(|t| matches!(t.kind(), EndpointKind::Isolate | EndpointKind::Thread));
        let raw = h.flags & FLAG_RAW != 0;
        let (tag, wire) = if raw {
            (h.tag, None)
        } else {
            let t = self.types.by_wire.get(&h.tag).ok_or("unregistered type")?;
            (t.local, Some(t))
        };
        let mut st = lock(&self.state);
        let ns = match st.nodes.get_mut(node) {
            Some(ns) if ns.inc == inc => ns,
            _ => return Err(STALE),
        };
        let Some(target) = target else {
            let link = ns.link.clone();
            drop(st);
            return self.undeliverable(&link, &h);
        };
        let reply_to = match h.reply_to {
            0 => 0,
            id => self.proxy(&cluster, node, ns, id, None).id(),
        };
        self.proxy(&cluster, node, ns, h.sender, None);
        let link = ns.link.clone();
        let Some(proxy) = ns.proxies.get_mut(&h.sender) else {
            unreachable!("created just above");
        };
        let out = &proxy
            .out
            .get_or_insert_with(|| {
                Delivery(LocalEndpoint::new(
                    cluster.clone(),
                    proxy.r.clone(),
                    cluster.config.wait,
                ))
            })
            .0;
        let meta = Meta {
            kind: if h.transfer {
                FrameKind::Transfer
            } else {
                FrameKind::Copy
            },
            flags: h.flags,
            tag,
            correlation: h.correlation,
            reply_to,
        };
        let result = if h.transfer {
            let from = wire
                .and_then(|t| t.from_wire)
                .ok_or("type cannot be transferred")?;
            let mut aligned = AlignedVec::<16>::with_capacity(payload.len());
            aligned.extend_from_slice(payload);
            let value = from(&aligned).ok_or("invalid payload")?;
            let (ptr, drop_fn) = (value.ptr, value.drop_fn);
            let r = out.deliver(target.id(), meta, &mut TransferSource(value));
            if r.is_err() {
                // SAFETY: the delivery failed, so no frame holds the value: drop it here.
                unsafe { drop_fn(ptr) };
            }
            r
        } else {
            let mut src = WireSource {
                bytes: payload,
                check: wire.map(|t| t.check),
            };
            out.deliver(target.id(), meta, &mut src)
        };
        let spilled = out.has_spills();
        drop(st);
        if spilled {
            if let Some(t) = self.flusher.get() {
                t.unpark();
            }
        }
        match result {
            Ok(()) => Ok(()),
            Err(SendError::Serialize(())) => Err("invalid payload"),
            Err(SendError::TooLarge { .. }) => Err("too large for this node's rings"),
            Err(_) => self.undeliverable(&link, &h),
        }
    }

    /// A message for an endpoint that has gone: counted; a request is answered with an
    /// error so its caller does not wait for its timeout.
    fn undeliverable(&self, link: &NodeLink, h: &MsgHeader) -> Result<(), &'static str> {
        self.counters.undeliverable.fetch_add(1, Ordering::Relaxed);
        if h.flags & FLAG_CALL != 0 && h.reply_to != 0 {
            let text = format!("endpoint {} of node {} is not running", h.target, self.me);
            if let Ok(bytes) = crate::frame::encode(&text) {
                let reply = MsgHeader {
                    flags: FLAG_REPLY | FLAG_ERROR,
                    transfer: false,
                    target: h.reply_to,
                    sender: h.target,
                    reply_to: 0,
                    tag: wire_tag::<String>(),
                    correlation: h.correlation,
                };
                let _ = link.put(reply.encode(&bytes));
            }
        }
        Ok(())
    }

    /// Writes spilled deliveries that fit now; whether some still wait.
    fn flush_spills(&self) -> bool {
        let st = lock(&self.state);
        let mut pending = false;
        for p in st.nodes.values().flat_map(|n| n.proxies.values()) {
            if let Some(out) = &p.out {
                out.0.flush_spills();
                pending |= out.0.has_spills();
            }
        }
        pending
    }

    /// Sends an announcement to every known node (built only if there is one).
    fn announce(&self, ctl: impl FnOnce() -> Ctl) {
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        if links.is_empty() {
            return;
        }
        let envelope = encode_ctl(&ctl());
        for l in links.iter() {
            let _ = l.put(envelope.clone());
        }
    }

    pub(crate) fn stats(&self) -> NetStats {
        NetStats {
            sent: self.counters.sent.load(Ordering::Relaxed),
            received: self.counters.received.load(Ordering::Relaxed),
            rejected: self.counters.rejected.load(Ordering::Relaxed),
            undeliverable: self.counters.undeliverable.load(Ordering::Relaxed),
            stale: self.counters.stale.load(Ordering::Relaxed),
            nodes: lock(&self.state).nodes.len(),
        }
    }
}

impl NetHooks for Net {
    fn local_up(&self, isolate: &IsolateRef) {
        if isolate.kind() != EndpointKind::Isolate {
            return;
        }
        self.announce(|| Ctl::Up(desc_of(isolate)));
    }

    fn local_down(&self, isolate: &IsolateRef, reason: &DownReason) {
        if isolate.kind() != EndpointKind::Isolate {
            return;
        }
        self.announce(|| Ctl::Down {
            id: isolate.id(),
            reason: reason.into(),
        });
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }

    fn leave(&self) {
        if self.left.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(t) = self.flusher.get() {
            t.unpark();
        }
        let keep = std::mem::take(&mut *lock(&self.keep));
        drop(keep);
        let _ = self.session.close().wait();
        // Other nodes' isolates are unreachable from now on.
        if let Some(cluster) = self.cluster() {
            let mut st = lock(&self.state);
            let nodes: Vec<(String, u64)> =
                st.nodes.iter().map(|(n, s)| (n.clone(), s.inc)).collect();
            for (n, inc) in nodes {
                self.node_lost_locked(&mut st, &cluster, &n, inc);
            }
        }
    }
}

/// Writes spilled deliveries as rings free up (woken when a delivery spills), and
/// declares nodes lost once their grace has passed.
fn flush_loop(net: Weak<Net>) {
    loop {
        let mut nap = Duration::from_millis(100);
        match net.upgrade() {
            Some(n) if !n.left.load(Ordering::Acquire) => {
                if n.flush_spills() {
                    nap = Duration::from_micros(500);
                }
                let now = Instant::now();
                let due: Vec<(String, u64, Instant)> = {
                    let mut losing = lock(&n.losing);
                    let (due, later) = losing.drain(..).partition(|l| l.2 <= now);
                    *losing = later;
                    if let Some(next) = losing.iter().map(|l| l.2).min() {
                        nap = nap.min(next - now);
                    }
                    due
                };
                for (name, inc, _) in due {
                    n.node_lost(&name, inc);
                }
            }
            _ => return,
        }
        std::thread::park_timeout(nap);
    }
}

/// `name/incarnation` from the end of a key.
fn parse_node(s: &str) -> Option<(&str, u64)> {
    let (name, inc) = s.split_once('/')?;
    if validate_name(name).is_err() || inc.len() != 16 {
        return None;
    }
    Some((name, u64::from_str_radix(inc, 16).ok()?))
}

/// Opens the Zenoh session: the caller's configuration, or the embedded default with
/// its rendezvous directory.
fn open_session(network: &Network, inc: u64) -> Result<zenoh::Session, NetError> {
    let z = |e: zenoh::Error| NetError::Zenoh(e.to_string());
    let mut config = match &network.zenoh {
        Some(c) => c.clone(),
        None => zenoh::Config::default(),
    };
    if let Some(lease) = network.lease {
        let ms = lease.as_millis().max(1);
        config
            .insert_json5("transport/link/tx/lease", &ms.to_string())
            .map_err(z)?;
    }
    if network.zenoh.is_some() {
        return zenoh::open(config).wait().map_err(z);
    }
    let dir = match &network.dir {
        Some(d) => d.clone(),
        None => {
            // SAFETY: `getuid` has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            std::env::temp_dir()
                .join(format!("isolate-cluster-{uid}"))
                .join(&network.name)
        }
    };
    std::fs::create_dir_all(&dir).map_err(NetError::Rendezvous)?;
    // One node at a time scans the directory and starts listening, so two nodes starting
    // together never both miss each other.
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))
        .map_err(NetError::Rendezvous)?;
    let _held = FileLock::new(&lock_file).map_err(NetError::Rendezvous)?;
    let mut peers = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(NetError::Rendezvous)? {
        let path = entry.map_err(NetError::Rendezvous)?.path();
        if path.extension().is_some_and(|e| e == "sock") {
            // A socket nobody accepts on belongs to a node that died: remove it.
            match std::os::unix::net::UnixStream::connect(&path) {
                Ok(_) => peers.push(path),
                Err(_) => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
    let mine = dir.join(format!("{}.sock", hex(inc)));
    let endpoint = |p: &std::path::Path| format!("\"unixsock-stream/{}\"", p.display());
    let listen = format!("[{}]", endpoint(&mine));
    let connect = format!(
        "[{}]",
        peers
            .iter()
            .map(|p| endpoint(p))
            .collect::<Vec<_>>()
            .join(",")
    );
    config.insert_json5("mode", "\"peer\"").map_err(z)?;
    config
        .insert_json5("scouting/multicast/enabled", "false")
        .map_err(z)?;
    config
        .insert_json5("listen/endpoints", &listen)
        .map_err(z)?;
    config
        .insert_json5("connect/endpoints", &connect)
        .map_err(z)?;
    zenoh::open(config).wait().map_err(z)
}

/// An exclusive `flock` held until dropped.
struct FileLock<'f>(&'f std::fs::File);

impl<'f> FileLock<'f> {
    fn new(f: &'f std::fs::File) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for as long as `f` is borrowed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(f))
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as in `new`.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl crate::Builder {
    /// Builds the cluster as a node of `network` (see [`net`](crate::net)): opens the
    /// Zenoh session, finds the other nodes, and announces this one.
    pub fn join(self, network: Network) -> Result<Cluster, NetError> {
        Net::join(self, network)
    }
}

impl Cluster {
    /// The live other nodes of the network, by name (empty for a node that has not
    /// joined one).
    pub fn nodes(&self) -> Vec<String> {
        self.inner().nodes()
    }

    /// The node's network counters (`None` if it has not joined a network).
    pub fn net_stats(&self) -> Option<NetStats> {
        let hooks = self.inner().net.get()?.clone();
        let net: Arc<dyn std::any::Any + Send + Sync> = hooks.as_any();
        net.downcast::<Net>().ok().map(|n| n.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let h = MsgHeader {
            flags: FLAG_CALL,
            transfer: false,
            target: 7,
            sender: 9,
            reply_to: 9,
            tag: wire_tag::<u64>(),
            correlation: 1 << 40,
        };
        let payload = crate::frame::encode(&5u64).unwrap();
        let b = h.encode(&payload);
        let (back, p) = MsgHeader::decode(&b).unwrap();
        assert_eq!((back, p), (h, &payload[..]));
        assert_eq!(check_envelope(&b), Ok(()));
        let ctl = Ctl::Up(Desc {
            id: 3,
            path: "/a/b".into(),
            props: vec![("k".into(), WireProp::Int(-1))],
        });
        assert_eq!(decode_ctl(&encode_ctl(&ctl)), Ok(ctl));
        let bad = Ctl::Up(Desc {
            id: 3,
            path: "relative".into(),
            props: vec![],
        });
        assert!(decode_ctl(&encode_ctl(&bad)).is_err());
    }

    /// Every prefix and every single-byte corruption of valid envelopes, and random
    /// bytes, are judged without a panic.
    #[test]
    fn mangled_envelopes_never_panic() {
        let payload = crate::frame::encode(&"hello".to_string()).unwrap();
        let msg = MsgHeader {
            flags: 0,
            transfer: false,
            target: 1,
            sender: 2,
            reply_to: 2,
            tag: wire_tag::<String>(),
            correlation: 0,
        }
        .encode(&payload);
        let transfer = MsgHeader {
            flags: 0,
            transfer: true,
            target: 1,
            sender: 2,
            reply_to: 0,
            tag: wire_tag::<Vec<u64>>(),
            correlation: 0,
        }
        .encode(&crate::frame::encode(&vec![1u64, 2, 3]).unwrap());
        let ctl = encode_ctl(&Ctl::Hello(vec![Desc {
            id: 1,
            path: "/x".into(),
            props: vec![("s".into(), WireProp::Str("v".into()))],
        }]));
        for valid in [&msg, &transfer, &ctl] {
            assert_eq!(check_envelope(valid), Ok(()));
            for n in 0..valid.len() {
                let _ = check_envelope(&valid[..n]);
            }
            for i in 0..valid.len() {
                for x in [0x01u8, 0x80, 0xff] {
                    let mut m = valid.clone();
                    m[i] ^= x;
                    let _ = check_envelope(&m);
                }
            }
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 96) as usize;
            let mut b: Vec<u8> = (0..len).map(|k| (seed >> (k % 8 * 8)) as u8).collect();
            if b.len() > 1 {
                b[0] = VERSION;
                b[1] = 1 + (seed >> 60) as u8 % 2;
            }
            let _ = check_envelope(&b);
        }
    }

    #[test]
    fn wire_tags_name_types_by_path() {
        assert_ne!(wire_tag::<u64>(), wire_tag::<i64>());
        assert_eq!(wire_tag::<String>() & RUST_TAG_BIT, RUST_TAG_BIT);
        let t = WireTypes::builtin();
        assert!(t.by_wire.contains_key(&wire_tag::<String>()));
        assert_eq!(t.by_local.len(), t.by_wire.len());
    }
}
