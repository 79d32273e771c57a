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
//!   [`DownReason::NodeLost`]; calls waiting on them return
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
//! [`SendError::Unregistered`] with the value back.
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
use rkyv::{Archive, Deserialize, Portable};
use zenoh::qos::CongestionControl;
use zenoh::sample::{Sample, SampleKind};
use zenoh::Wait;

pub use zenoh;

use crate::cluster::{ClusterInner, NetHooks, NodeNotice};
use crate::endpoint::{lock, LocalEndpoint, Meta, TransferSource};
use crate::error::SendError;
use crate::frame::{FrameKind, RingError, FLAG_CALL, FLAG_ERROR, FLAG_RAW, FLAG_REPLY};
use crate::isolate::{DownReason, EndpointKind, Forward, IsolateRef, RemoteRoute};
use crate::link::{FrameSource, OwnedFrame};
use crate::path::{validate_name, Properties, PropertyValue};
use crate::wire::{
    decode_ctl, desc_of, encode_ctl, from_wire, wire_tag, CheckFn, Ctl, Desc, MsgHeader, WireProp,
    WireTypes, KIND_CTL, KIND_MSG, VERSION,
};
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

/// Why an envelope from a node that has left is dropped (not a rejection).
const STALE: &str = "from a node that has left";

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
