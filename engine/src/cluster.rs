//! The node: registry of isolates, core allocator, spawn, lookup, shutdown, join.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::endpoint::{
    install_local, local_endpoint, lock, uninstall_local, Control, EndpointShared, LocalEndpoint,
};
use crate::error::{JoinError, LookupError, MailboxError, PathError, SpawnError};
use crate::frame::CELL_BYTES;
use crate::inbox::{Context, ExitSignal, Inbox, Mailbox};
use crate::isolate::{DownReason, EndpointKind, IsolateRef, Placement};
use crate::path::{validate_path, Properties};
use crate::supervise::{
    is_below, parent_of, ChildRecord, Entry, Job, Notice, Restart, Supervision,
};

/// How a thread waits when it has nothing to read (and a sender when a ring is full).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Spin forever: the lowest latency, a whole core per isolate. Only sensible when
    /// every isolate has a dedicated core.
    BusySpin,
    /// Spin, yielding the core to other threads on every round.
    Yield,
    /// Spin for `spin`, then park until a sender wakes the thread (the default). Parked
    /// isolates use no CPU; a wake-up costs a futex round trip (tens of µs on VMs).
    SpinThenPark {
        /// How long to spin before parking.
        spin: Duration,
    },
}

impl Default for WaitStrategy {
    fn default() -> Self {
        Self::SpinThenPark {
            spin: Duration::from_micros(50),
        }
    }
}

impl WaitStrategy {
    pub(crate) fn spin_time(&self) -> Duration {
        match self {
            Self::SpinThenPark { spin } => *spin,
            _ => Duration::from_micros(50),
        }
    }
}

/// Where isolates' threads are placed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CorePolicy {
    /// A dedicated core per isolate while free cores last; later isolates are unpinned
    /// (the default).
    #[default]
    Dedicated,
    /// A dedicated core per isolate while free cores last; later isolates are pinned to
    /// the least loaded core.
    Shared,
    /// No pinning.
    Unpinned,
}

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub node_name: String,
    pub ring_cells: usize,
    pub wait: WaitStrategy,
    pub core_policy: CorePolicy,
    pub cores: Option<Vec<usize>>,
    pub drop_timeout: Duration,
    /// The node's own supervision of top-level isolates.
    pub supervision: Supervision,
}

/// Configures a [`Cluster`].
///
/// ```
/// use isolate_cluster::{Cluster, CorePolicy, WaitStrategy};
/// let cluster = Cluster::builder()
///     .node_name("edge-1")
///     .ring_capacity(64 * 1024)
///     .wait_strategy(WaitStrategy::default())
///     .core_policy(CorePolicy::Unpinned)
///     .build();
/// assert_eq!(cluster.node_name(), "edge-1");
/// ```
#[derive(Clone, Debug)]
pub struct Builder {
    config: Config,
}

impl Builder {
    /// Names the node (default `"node"`).
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.config.node_name = name.into();
        self
    }

    /// How the node supervises top-level isolates spawned with
    /// [`Cluster::spawn_supervised`] (default: one-for-one, 3 restarts in 5 s). Past the
    /// intensity, the node shuts down and [`Cluster::failure`] says why.
    pub fn supervision(mut self, supervision: Supervision) -> Self {
        self.config.supervision = supervision;
        self
    }

    /// Capacity of each ring in bytes, rounded up to whole 64-byte cells and to at least
    /// 4 cells (default 64 KiB). A frame takes a 32-byte header plus its payload, rounded
    /// up to whole cells: up to 32 payload bytes is one cell. A copy message larger than
    /// the ring fails with `SendError::TooLarge`.
    pub fn ring_capacity(mut self, bytes: usize) -> Self {
        self.config.ring_cells = bytes.div_ceil(CELL_BYTES).max(4);
        self
    }

    /// How idle threads wait (default [`WaitStrategy::SpinThenPark`] for 50 µs).
    pub fn wait_strategy(mut self, wait: WaitStrategy) -> Self {
        self.config.wait = wait;
        self
    }

    /// How isolates are placed on cores (default [`CorePolicy::Dedicated`]).
    pub fn core_policy(mut self, policy: CorePolicy) -> Self {
        self.config.core_policy = policy;
        self
    }

    /// Restricts pinning to these core ids (default: every core the building thread may
    /// run on, read once when the cluster is built).
    pub fn cores(mut self, cores: Vec<usize>) -> Self {
        self.config.cores = Some(cores);
        self
    }

    /// How long dropping the [`Cluster`] waits for isolates to stop (default 2 s).
    pub fn drop_timeout(mut self, timeout: Duration) -> Self {
        self.config.drop_timeout = timeout;
        self
    }

    /// The node name configured.
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    pub(crate) fn node(&self) -> &str {
        &self.config.node_name
    }

    /// Builds the cluster. Nothing runs until the first spawn.
    pub fn build(self) -> Cluster {
        static NEXT_CLUSTER: AtomicU64 = AtomicU64::new(1);
        let cores = match &self.config.cores {
            Some(ids) => ids.iter().map(|&id| core_affinity::CoreId { id }).collect(),
            None => process_cores(),
        };
        let load = vec![0; cores.len()];
        Cluster {
            inner: Arc::new(ClusterInner {
                id: NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed),
                config: self.config,
                registry: Mutex::new(Registry::default()),
                all_down: Condvar::new(),
                next_id: AtomicU32::new(1),
                cores: Mutex::new(CoreAllocator { cores, load }),
                undelivered: Arc::new(AtomicU64::new(0)),
                jobs: Mutex::new(None),
                net: std::sync::OnceLock::new(),
            }),
        }
    }
}

/// The cores this process may use, read once, the first time any cluster is built.
///
/// `core_affinity::get_core_ids` reports the *calling thread's* mask: once a thread is
/// pinned it sees one core, and so would every thread it spawns. Reading the list once,
/// early, and keeping it avoids that trap (a thread pinned before the first cluster is
/// built still restricts it: pass `Builder::cores` then).
fn process_cores() -> Vec<core_affinity::CoreId> {
    static CORES: std::sync::OnceLock<Vec<core_affinity::CoreId>> = std::sync::OnceLock::new();
    CORES
        .get_or_init(|| core_affinity::get_core_ids().unwrap_or_default())
        .clone()
}

/// Lets the calling thread run on any of `cores` (undoing a mask inherited from a pinned
/// spawning thread). Linux only; elsewhere a no-op.
pub(crate) fn unpin_to(cores: &[core_affinity::CoreId]) {
    #[cfg(target_os = "linux")]
    {
        if cores.is_empty() {
            return;
        }
        // SAFETY: cpu_set_t is plain data, zeroed is a valid empty set; CPU_SET only
        // writes inside it for ids below CPU_SETSIZE (checked); sched_setaffinity reads it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for c in cores {
                if c.id < libc::CPU_SETSIZE as usize {
                    libc::CPU_SET(c.id, &mut set);
                }
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

struct CoreAllocator {
    cores: Vec<core_affinity::CoreId>,
    load: Vec<u32>,
}

impl CoreAllocator {
    fn place(&mut self, policy: CorePolicy) -> (Placement, Option<core_affinity::CoreId>) {
        // An unpinned isolate may run on any core of the cluster (see `unpin_to`).
        if policy == CorePolicy::Unpinned || self.cores.is_empty() {
            return (Placement::Unpinned, None);
        }
        if let Some(i) = self.load.iter().position(|&l| l == 0) {
            self.load[i] += 1;
            return (Placement::Dedicated(self.cores[i].id), Some(self.cores[i]));
        }
        if policy == CorePolicy::Shared {
            let i = (0..self.load.len())
                .min_by_key(|&i| self.load[i])
                .unwrap_or(0);
            self.load[i] += 1;
            return (Placement::Shared(self.cores[i].id), Some(self.cores[i]));
        }
        (Placement::Unpinned, None)
    }

    fn release(&mut self, p: Placement) {
        if let Placement::Dedicated(c) | Placement::Shared(c) = p {
            if let Some(i) = self.cores.iter().position(|x| x.id == c) {
                self.load[i] = self.load[i].saturating_sub(1);
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct Registry {
    pub by_path: HashMap<String, IsolateRef>,
    pub by_id: HashMap<u32, IsolateRef>,
    pub watchers: Vec<IsolateRef>,
    pub shutting_down: bool,
    live_isolates: usize,
    /// Supervision jobs queued or running (`join` waits for them: a restart may follow).
    pub pending_jobs: usize,
    /// Supervised isolates by path.
    pub children: HashMap<String, ChildRecord>,
    /// Supervision of the children of a path (`/` is the node's, else the builder's).
    pub supervision: HashMap<String, Supervision>,
    /// Recent restarts per supervisor path, for the intensity limit.
    pub restarts: HashMap<String, VecDeque<Instant>>,
    /// Supervisors told to give up: their down reason becomes `Escalated`.
    pub escalations: HashMap<u32, String>,
    /// Monitored endpoint id → who gets its `IsolateDown`.
    pub monitors: HashMap<u32, Vec<IsolateRef>>,
    next_order: u64,
    /// Why the node's supervision gave up, if it did.
    pub failure: Option<String>,
    /// Supervision records forgotten under the lock, dropped after it (`unlock`).
    pub released: Vec<ChildRecord>,
    /// Live isolates of other nodes by `node:/path`.
    pub remote: HashMap<String, IsolateRef>,
    /// Live other nodes.
    pub nodes: std::collections::BTreeSet<String>,
    /// Who gets node events (`Inbox::watch_nodes`).
    pub node_watchers: Vec<IsolateRef>,
}

impl Registry {
    /// Hands `IsolateDown` for `r` to its monitors (who stop monitoring it) and, with
    /// `watchers`, to every watcher.
    fn tell_down(&mut self, r: &IsolateRef, reason: &DownReason, watchers: bool) {
        let monitors = self.monitors.remove(&r.id()).unwrap_or_default();
        let all = if watchers { &self.watchers[..] } else { &[] };
        for w in all.iter().chain(&monitors) {
            let _ = w
                .endpoint()
                .enqueue(Control::Down(r.clone(), reason.clone()));
        }
    }
}

/// What the network layer is told about this node's isolates (called with the registry
/// locked, so announcements keep the order of spawns and stops).
pub(crate) trait NetHooks: Send + Sync {
    /// An isolate is about to start (its thread is not running yet).
    fn local_up(&self, isolate: &IsolateRef);
    /// An isolate has stopped (everything it sent has been sent).
    fn local_down(&self, isolate: &IsolateRef, reason: &DownReason);
    /// The node leaves the network (at shutdown).
    fn leave(&self);
    /// The concrete type (for the network layer's own queries).
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
}

/// A node event for the endpoints that watch nodes.
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
pub(crate) enum NodeNotice {
    Up(String),
    Down(String),
    Rejected { node: String, reason: String },
}

/// Counters of one endpoint, as [`Cluster::stats`] reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointStats {
    /// Path of the isolate (`@thread-N` for other threads).
    pub path: String,
    /// Endpoint id.
    pub id: u32,
    /// Messages sent.
    pub sent: u64,
    /// Messages and events received (replies to its calls and requests included).
    pub received: u64,
    /// Sends that found the ring full.
    pub full: u64,
    /// Sends that were spilled to the heap (a blocked sender holding a message).
    pub spilled: u64,
    /// Messages sent to this endpoint that it never read (it stopped first).
    pub undelivered: u64,
    /// Replies that came after their request timed out or was cancelled (dropped).
    pub late_replies: u64,
}

/// A snapshot of the cluster's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Per live endpoint.
    pub endpoints: Vec<EndpointStats>,
    /// Messages never read, over the whole life of the cluster (stopped endpoints too).
    pub undelivered: u64,
}

pub(crate) struct ClusterInner {
    pub id: u64,
    pub config: Config,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) all_down: Condvar,
    next_id: AtomicU32,
    cores: Mutex<CoreAllocator>,
    undelivered: Arc<AtomicU64>,
    /// The supervision thread's queue (started with the first job).
    pub(crate) jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// The network layer, once the node has joined one.
    pub(crate) net: std::sync::OnceLock<Arc<dyn NetHooks>>,
}

impl ClusterInner {
    fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn spawn<F>(
        self: &Arc<Self>,
        path: &str,
        props: Properties,
        entry: F,
    ) -> Result<IsolateRef, SpawnError>
    where
        F: FnOnce(&Context) + Send + 'static,
    {
        validate_path(path)?;
        let mut reg = lock(&self.registry);
        self.spawn_locked(&mut reg, path, props, entry)
    }

    /// Spawns a supervised isolate (see [`Cluster::spawn_supervised`]).
    pub(crate) fn spawn_supervised(
        self: &Arc<Self>,
        path: &str,
        props: Properties,
        restart: Restart,
        entry: Entry,
    ) -> Result<IsolateRef, SpawnError> {
        validate_path(path)?;
        let mut reg = lock(&self.registry);
        let sup = parent_of(path);
        if sup != "/" && !reg.by_path.contains_key(sup) {
            return Err(SpawnError::NoSupervisor(sup.to_owned()));
        }
        let run = Arc::clone(&entry);
        let me = self.spawn_locked(&mut reg, path, props.clone(), move |ctx: &Context| run(ctx))?;
        let order = reg.next_order;
        reg.next_order += 1;
        let replaced = reg.children.insert(
            path.to_owned(),
            ChildRecord {
                props,
                restart,
                entry,
                current: me.clone(),
                order,
                stopping: false,
            },
        );
        if let Some(old) = replaced {
            reg.released.push(old);
        }
        self.unlock(reg);
        Ok(me)
    }

    /// Spawns with the registry locked (the path is valid).
    pub(crate) fn spawn_locked<F>(
        self: &Arc<Self>,
        reg: &mut Registry,
        path: &str,
        props: Properties,
        entry: F,
    ) -> Result<IsolateRef, SpawnError>
    where
        F: FnOnce(&Context) + Send + 'static,
    {
        if reg.shutting_down {
            return Err(SpawnError::ShuttingDown);
        }
        if reg.by_path.contains_key(path) {
            return Err(SpawnError::Duplicate(path.to_owned()));
        }
        let (placement, core) = lock(&self.cores).place(self.config.core_policy);
        let shared = Arc::new(EndpointShared::new(
            self.next_id(),
            self.undelivered.clone(),
        ));
        let me = IsolateRef::new(
            path.to_owned(),
            props,
            EndpointKind::Isolate,
            placement,
            shared,
            self,
        );
        // Other nodes hear of it before it can send them anything.
        let net = self.net.get();
        if let Some(net) = net {
            net.local_up(&me);
        }
        let inner = Arc::clone(self);
        let me2 = me.clone();
        let spawned = std::thread::Builder::new()
            .name(path.to_owned())
            .spawn(move || run_isolate(inner, me2, core, entry));
        if let Err(e) = spawned {
            lock(&self.cores).release(placement);
            if let Some(net) = net {
                net.local_down(&me, &DownReason::Normal);
            }
            return Err(SpawnError::Thread(e));
        }
        reg.by_path.insert(path.to_owned(), me.clone());
        reg.by_id.insert(me.id(), me.clone());
        reg.live_isolates += 1;
        for w in &reg.watchers {
            let _ = w.endpoint().enqueue(Control::Up(me.clone()));
        }
        Ok(me)
    }

    /// A new endpoint for the calling thread (not an isolate).
    pub(crate) fn thread_endpoint(self: &Arc<Self>) -> Rc<LocalEndpoint> {
        let id = self.next_id();
        let shared = Arc::new(EndpointShared::new(id, self.undelivered.clone()));
        let name = std::thread::current()
            .name()
            .map(|n| format!("@{n}-{id}"))
            .unwrap_or_else(|| format!("@thread-{id}"));
        let me = IsolateRef::new(
            name,
            Properties::new(),
            EndpointKind::Thread,
            Placement::Unpinned,
            shared,
            self,
        );
        let mut reg = lock(&self.registry);
        reg.by_id.insert(id, me.clone());
        if reg.shutting_down {
            let _ = me.endpoint().enqueue(Control::Shutdown);
        }
        drop(reg);
        Rc::new(LocalEndpoint::new(Arc::clone(self), me, self.config.wait))
    }

    /// A fresh endpoint for a proxy of another node's endpoint (nobody reads it).
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    pub(crate) fn proxy_endpoint(&self) -> Arc<EndpointShared> {
        Arc::new(EndpointShared::new(
            self.next_id(),
            self.undelivered.clone(),
        ))
    }

    /// Registers a proxy of another node's endpoint; watchers hear of an isolate.
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    pub(crate) fn remote_up(&self, r: &IsolateRef) {
        let mut reg = lock(&self.registry);
        reg.by_id.insert(r.id(), r.clone());
        if r.is_isolate() {
            reg.remote.insert(r.path().to_owned(), r.clone());
            for w in &reg.watchers {
                let _ = w.endpoint().enqueue(Control::Up(r.clone()));
            }
        }
    }

    /// A proxy's endpoint went down (it stopped, or its node was lost): closes it, so
    /// sends and calls to it fail, and tells watchers and monitors.
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    pub(crate) fn remote_down(&self, r: &IsolateRef, reason: DownReason) {
        let mut reg = lock(&self.registry);
        if !matches!(reg.by_id.get(&r.id()), Some(x) if x == r) {
            return;
        }
        r.set_down(reason.clone(), None);
        r.endpoint().close_and_drain(Vec::new());
        reg.by_id.remove(&r.id());
        if reg.remote.get(r.path()).is_some_and(|x| x == r) {
            reg.remote.remove(r.path());
        }
        reg.tell_down(r, &reason, r.is_isolate());
    }

    /// Tells the node watchers; keeps the set of live nodes.
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    pub(crate) fn node_event(&self, notice: NodeNotice) {
        let mut reg = lock(&self.registry);
        match &notice {
            NodeNotice::Up(n) => {
                reg.nodes.insert(n.clone());
            }
            NodeNotice::Down(n) => {
                reg.nodes.remove(n);
            }
            NodeNotice::Rejected { .. } => {}
        }
        for w in &reg.node_watchers {
            let _ = w.endpoint().enqueue(Control::Node(notice.clone()));
        }
    }

    /// Registers `me` as a node watcher and replays every live node to it.
    pub(crate) fn watch_nodes(&self, me: &IsolateRef) {
        let mut reg = lock(&self.registry);
        if !reg.node_watchers.iter().any(|w| w == me) {
            reg.node_watchers.push(me.clone());
        }
        for n in &reg.nodes {
            let _ = me
                .endpoint()
                .enqueue(Control::Node(NodeNotice::Up(n.clone())));
        }
    }

    /// The live other nodes, by name.
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    pub(crate) fn nodes(&self) -> Vec<String> {
        lock(&self.registry).nodes.iter().cloned().collect()
    }

    /// Runs `f` with the registry locked and this node's live isolates (for the network
    /// layer's greeting of a new node: no spawn or stop can slip between).
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    pub(crate) fn with_local_isolates<R>(&self, f: impl FnOnce(&[IsolateRef]) -> R) -> R {
        let reg = lock(&self.registry);
        let mut live: Vec<IsolateRef> = reg.by_path.values().cloned().collect();
        live.sort_by_key(IsolateRef::id);
        let r = f(&live);
        drop(reg);
        r
    }

    pub(crate) fn set_supervision(&self, path: &str, sv: Supervision) -> Result<(), PathError> {
        if path != "/" {
            validate_path(path)?;
        }
        lock(&self.registry).supervision.insert(path.to_owned(), sv);
        Ok(())
    }

    pub(crate) fn lookup(&self, path: &str) -> Result<IsolateRef, LookupError> {
        // `node:/path` names an isolate of another node (local paths start with '/').
        if let Some((node, local)) = path.split_once(':').filter(|_| !path.starts_with('/')) {
            validate_path(local)?;
            crate::path::validate_name(node)?;
            if node != self.config.node_name {
                return lock(&self.registry)
                    .remote
                    .get(path)
                    .cloned()
                    .ok_or_else(|| LookupError::NotFound(path.to_owned()));
            }
            return self.lookup(local);
        }
        validate_path(path)?;
        lock(&self.registry)
            .by_path
            .get(path)
            .cloned()
            .ok_or_else(|| LookupError::NotFound(path.to_owned()))
    }

    /// Sends through `send` to every live isolate (not other threads' endpoints) that
    /// `filter` accepts, in spawn order, and reports who took it.
    pub(crate) fn broadcast(
        &self,
        filter: impl Fn(&IsolateRef) -> bool,
        mut send: impl FnMut(&IsolateRef) -> Result<(), crate::SendError>,
    ) -> crate::Broadcast {
        let mut targets: Vec<IsolateRef> = lock(&self.registry)
            .by_id
            .values()
            .filter(|r| r.is_isolate() && r.is_alive())
            .cloned()
            .collect();
        targets.sort_by_key(IsolateRef::id);
        let mut report = crate::Broadcast::default();
        for r in targets.into_iter().filter(|r| filter(r)) {
            match send(&r) {
                Ok(()) => report.sent += 1,
                Err(e) => report.failed.push((r, e)),
            }
        }
        report
    }

    pub(crate) fn ref_by_id(&self, id: u32) -> Option<IsolateRef> {
        lock(&self.registry).by_id.get(&id).cloned()
    }

    pub(crate) fn forget_endpoint(&self, id: u32) {
        let mut reg = lock(&self.registry);
        if let Some(r) = reg.by_id.get(&id).cloned() {
            if !r.is_isolate() {
                reg.by_id.remove(&id);
                // A thread's endpoint "goes down" when it is torn down.
                for w in reg.monitors.remove(&id).unwrap_or_default() {
                    let _ = w
                        .endpoint()
                        .enqueue(Control::Down(r.clone(), DownReason::Normal));
                }
            }
        }
        reg.watchers.retain(|w| w.id() != id);
        for ws in reg.monitors.values_mut() {
            ws.retain(|w| w.id() != id);
        }
    }

    /// Sends `me` one `Down` for `target` when it stops (at once if it has stopped).
    pub(crate) fn monitor(&self, me: &IsolateRef, target: &IsolateRef) {
        let mut reg = lock(&self.registry);
        let live = target.0.cluster_id == self.id
            && reg.by_id.get(&target.id()).is_some_and(|r| r == target);
        if live {
            let ws = reg.monitors.entry(target.id()).or_default();
            if !ws.iter().any(|w| w == me) {
                ws.push(me.clone());
            }
        } else {
            let why = target
                .wait_down(Duration::ZERO)
                .unwrap_or(DownReason::Normal);
            let _ = me.endpoint().enqueue(Control::Down(target.clone(), why));
        }
    }

    /// Registers `me` as a watcher and replays every live isolate to it.
    pub(crate) fn watch(&self, me: &IsolateRef) {
        let mut reg = lock(&self.registry);
        if !reg.watchers.iter().any(|w| w == me) {
            reg.watchers.push(me.clone());
        }
        for r in reg.by_path.values().chain(reg.remote.values()) {
            let _ = me.endpoint().enqueue(Control::Up(r.clone()));
        }
    }

    /// Node shutdown: no more spawns, and isolates are asked to stop, children before
    /// parents (on the supervision thread); other threads' endpoints are asked at once.
    pub(crate) fn request_shutdown(self: &Arc<Self>) {
        self.begin_shutdown();
        self.submit(Job::StopAll);
    }

    /// Refuses spawns from now on and asks the endpoints of plain threads to stop.
    pub(crate) fn begin_shutdown(&self) {
        let mut reg = lock(&self.registry);
        reg.shutting_down = true;
        for r in reg
            .by_id
            .values()
            .filter(|r| r.kind() == EndpointKind::Thread)
        {
            let _ = r.endpoint().enqueue(Control::Shutdown);
        }
    }

    /// The cores isolates may run on.
    pub(crate) fn cluster_cores(&self) -> Vec<core_affinity::CoreId> {
        lock(&self.cores).cores.clone()
    }

    /// Bookkeeping for a stopped isolate: registry, watchers, monitors, supervision.
    fn isolate_down(
        self: &Arc<Self>,
        me: &IsolateRef,
        reason: DownReason,
        value: Option<Box<dyn std::any::Any + Send>>,
    ) {
        let mut reg = lock(&self.registry);
        let reason = match reg.escalations.remove(&me.id()) {
            Some(msg) => DownReason::Escalated(msg),
            None => reason,
        };
        // Before any event goes out, so whoever gets one sees the reason in `wait_down`.
        me.set_down(reason.clone(), value);
        if let Some(net) = self.net.get() {
            net.local_down(me, &reason);
        }
        if reg.by_path.get(me.path()).is_some_and(|r| r == me) {
            reg.by_path.remove(me.path());
        }
        reg.by_id.remove(&me.id());
        reg.watchers.retain(|w| w != me);
        reg.tell_down(me, &reason, true);
        for ws in reg.monitors.values_mut() {
            ws.retain(|w| w != me);
        }
        // An isolate without a supervision record (spawned with `spawn`: temporary,
        // never restarted) that fails is still reported to a supervisor isolate, as a
        // failed temporary child would be; for a supervisor that gave up, that is its
        // escalation. (The node's watchers hear of top-level ones through `IsolateDown`.)
        let sup = parent_of(me.path());
        if reason.is_failure()
            && sup != "/"
            && !reg.shutting_down
            && !reg.children.contains_key(me.path())
        {
            reg.notify(sup, Notice::Failed(me.clone(), reason.clone()));
        }
        let job = match reg.children.get(me.path()) {
            Some(rec) if rec.current == *me => (!rec.stopping).then(|| Job::ChildDown {
                path: me.path().to_owned(),
                id: me.id(),
                reason,
            }),
            _ => None,
        };
        let job = job.or_else(|| {
            let below = !reg.shutting_down && reg.by_path.keys().any(|p| is_below(p, me.path()));
            below.then(|| Job::StopDescendants(me.path().to_owned(), me.id()))
        });
        if job.is_some() {
            reg.pending_jobs += 1;
        }
        reg.live_isolates -= 1;
        lock(&self.cores).release(me.placement());
        self.all_down.notify_all();
        drop(reg);
        if let Some(job) = job {
            self.enqueue_job(job);
        }
    }

    pub(crate) fn join(&self, timeout: Duration) -> Result<(), JoinError> {
        let deadline = crate::deadline_after(timeout);
        let mut reg = lock(&self.registry);
        while reg.live_isolates > 0 || reg.pending_jobs > 0 {
            let now = Instant::now();
            if now >= deadline {
                let mut running: Vec<String> = reg.by_path.keys().cloned().collect();
                running.sort();
                return Err(JoinError::Timeout { running });
            }
            reg = self
                .all_down
                .wait_timeout(reg, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    pub(crate) fn stats(&self) -> Stats {
        let reg = lock(&self.registry);
        let mut endpoints: Vec<EndpointStats> = reg
            .by_id
            .values()
            .filter(|r| !r.is_remote())
            .map(|r| {
                let c = &r.endpoint().counters;
                EndpointStats {
                    path: r.path().to_owned(),
                    id: r.id(),
                    sent: c.sent.load(Ordering::Relaxed),
                    received: c.received.load(Ordering::Relaxed),
                    full: c.full.load(Ordering::Relaxed),
                    spilled: c.spilled.load(Ordering::Relaxed),
                    undelivered: c.undelivered.load(Ordering::Relaxed),
                    late_replies: c.late_replies.load(Ordering::Relaxed),
                }
            })
            .collect();
        endpoints.sort_by_key(|e| e.id);
        Stats {
            endpoints,
            undelivered: self.undelivered.load(Ordering::Relaxed),
        }
    }
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

fn run_isolate<F>(
    inner: Arc<ClusterInner>,
    me: IsolateRef,
    core: Option<core_affinity::CoreId>,
    entry: F,
) where
    F: FnOnce(&Context),
{
    match core {
        Some(c) => {
            if !core_affinity::set_for_current(c) {
                lock(&inner.cores).release(me.placement());
                me.set_placement(Placement::Unpinned);
            }
        }
        None => {
            let cores = lock(&inner.cores).cores.clone();
            unpin_to(&cores);
        }
    }
    let ep = Rc::new(LocalEndpoint::new(
        Arc::clone(&inner),
        me.clone(),
        inner.config.wait,
    ));
    install_local(Rc::clone(&ep));
    let ctx = Context::new(Inbox::new(Rc::clone(&ep)));
    let outcome = catch_unwind(AssertUnwindSafe(|| entry(&ctx)));
    drop(ctx);
    let (reason, value) = match outcome {
        Ok(()) => (DownReason::Normal, None),
        Err(payload) => match payload.downcast::<ExitSignal>() {
            Ok(exit) => (DownReason::Exited, Some(exit.0)),
            Err(payload) => (DownReason::Panicked(panic_message(&*payload)), None),
        },
    };
    uninstall_local(inner.id);
    ep.teardown();
    drop(ep);
    inner.isolate_down(&me, reason, value);
}

/// A node of isolates: the handle that spawns, looks up and shuts down.
///
/// Dropping it asks every isolate to shut down and waits for them up to the builder's
/// `drop_timeout` (2 s by default), so a `main` that returns never hangs.
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

impl Cluster {
    pub(crate) fn inner(&self) -> &Arc<ClusterInner> {
        &self.inner
    }

    /// A single-node cluster with the default configuration.
    pub fn single_node() -> Self {
        Self::builder().build()
    }

    /// A builder for a configured cluster.
    pub fn builder() -> Builder {
        Builder {
            config: Config {
                node_name: "node".to_owned(),
                ring_cells: 64 * 1024 / CELL_BYTES,
                wait: WaitStrategy::default(),
                core_policy: CorePolicy::default(),
                cores: None,
                drop_timeout: Duration::from_secs(2),
                supervision: Supervision::default(),
            },
        }
    }

    /// The node's name.
    pub fn node_name(&self) -> &str {
        &self.inner.config.node_name
    }

    /// Ring capacity in bytes.
    pub fn ring_capacity(&self) -> usize {
        self.inner.config.ring_cells * CELL_BYTES
    }

    /// Spawns an isolate at `path` with `properties`: a new OS thread, pinned per the
    /// core policy, running `entry` with the isolate's [`Context`]. The isolate can be
    /// messaged at once (messages wait in its rings until it reads them).
    pub fn spawn<F>(
        &self,
        path: &str,
        properties: Properties,
        entry: F,
    ) -> Result<IsolateRef, SpawnError>
    where
        F: FnOnce(&Context) + Send + 'static,
    {
        ClusterInner::spawn(&self.inner, path, properties, entry)
    }

    /// Spawns a supervised isolate: like [`spawn`](Self::spawn), but when it stops its
    /// supervisor (the isolate at the parent path, or the node for a top-level path)
    /// restarts it per `restart` and the supervisor's [`Supervision`] — the same `entry`
    /// at the same path with the same properties, as a new incarnation. See
    /// [`supervise`](crate::supervise) for the rules. The parent path must be `/` or a live
    /// isolate ([`SpawnError::NoSupervisor`] otherwise).
    ///
    /// ```
    /// use std::time::Duration;
    /// use isolate_cluster::{Cluster, Properties, Restart};
    ///
    /// let cluster = Cluster::single_node();
    /// let first = cluster
    ///     .spawn_supervised("/flaky", Properties::new(), Restart::Transient, |ctx| {
    ///         if ctx.recv().is_some() {
    ///             panic!("a bad day");
    ///         }
    ///     })
    ///     .unwrap();
    /// first.send(&1u8).unwrap();
    /// first.wait_down(Duration::from_secs(5)).expect("it panicked");
    /// let deadline = std::time::Instant::now() + Duration::from_secs(5);
    /// let second = loop {
    ///     match cluster.lookup("/flaky") {
    ///         Ok(r) if r != first => break r,
    ///         _ if std::time::Instant::now() < deadline => std::thread::yield_now(),
    ///         _ => panic!("not restarted"),
    ///     }
    /// };
    /// assert!(second.is_alive() && !first.is_alive());
    /// ```
    pub fn spawn_supervised<F>(
        &self,
        path: &str,
        properties: Properties,
        restart: Restart,
        entry: F,
    ) -> Result<IsolateRef, SpawnError>
    where
        F: Fn(&Context) + Send + Sync + 'static,
    {
        ClusterInner::spawn_supervised(&self.inner, path, properties, restart, Arc::new(entry))
    }

    /// Sets how the isolate at `path` supervises its children (`/` for the node's own
    /// top-level isolates). It holds for every incarnation of that path; an isolate can
    /// also set it for itself with [`Context::supervise_children`].
    pub fn supervise(&self, path: &str, supervision: Supervision) -> Result<(), PathError> {
        self.inner.set_supervision(path, supervision)
    }

    /// Why the node's supervision gave up (a top-level isolate exceeded the node's restart
    /// intensity, and the node shut down), if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.inner.registry).failure.clone()
    }

    /// Sends a copy of `value` to every live isolate that `filter` accepts, from the
    /// calling thread (see [`Inbox::broadcast`](crate::Inbox::broadcast)).
    pub fn broadcast<T: crate::Payload>(
        &self,
        value: &T,
        filter: impl Fn(&IsolateRef) -> bool,
    ) -> crate::Broadcast {
        self.inner.broadcast(filter, |r| r.send(value))
    }

    /// Looks up a live isolate by path.
    pub fn lookup(&self, path: &str) -> Result<IsolateRef, LookupError> {
        self.inner.lookup(path)
    }

    /// Runs `f` on a new short-lived isolate and returns its result, moved out of the
    /// isolate without a copy (Dart's `Isolate.run`). A panic in `f` is
    /// [`RunError::Panicked`](crate::RunError::Panicked) with its message.
    ///
    /// ```
    /// let cluster = isolate_cluster::Cluster::single_node();
    /// let sum = cluster.run(|| (1..=100u64).sum::<u64>()).unwrap();
    /// assert_eq!(*sum, 5050);
    /// ```
    pub fn run<T, F>(&self, f: F) -> Result<Box<T>, crate::RunError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        crate::work::run(&self.inner, f)
    }

    /// `run(move || f(arg))`, as Flutter's `compute`.
    pub fn compute<A, T>(&self, f: fn(A) -> T, arg: A) -> Result<Box<T>, crate::RunError>
    where
        A: Send + 'static,
        T: Send + 'static,
    {
        self.run(move || f(arg))
    }

    /// Spawns a pool of `size` long-lived isolates at `path/0`, `path/1`, ... that run
    /// closures (see [`WorkerPool::run`](crate::WorkerPool::run)).
    pub fn worker_pool(&self, path: &str, size: usize) -> Result<crate::WorkerPool, SpawnError> {
        crate::WorkerPool::spawn(&self.inner, path, size)
    }

    /// Spawns a [`Worker`](crate::Worker) at `path` answering each `Req` with
    /// `handler(&archived_request)`.
    pub fn worker<Req, Resp, H>(
        &self,
        path: &str,
        handler: H,
    ) -> Result<crate::Worker<Req, Resp>, SpawnError>
    where
        Req: crate::Payload + rkyv::Archive,
        Req::Archived: rkyv::Portable,
        Resp: crate::Payload,
        H: FnMut(&Req::Archived) -> Result<Resp, String> + Send + 'static,
    {
        crate::Worker::spawn(&self.inner, path, handler)
    }

    /// The calling thread's mailbox: where replies to its sends arrive, and its cluster
    /// events. One open mailbox per thread.
    pub fn mailbox(&self) -> Result<Mailbox, MailboxError> {
        let ep = local_endpoint(self.inner.id, || Some(self.inner.thread_endpoint()))
            .ok_or(MailboxError::ClusterGone)?;
        if ep.inbox_open.get() {
            return Err(MailboxError::InUse);
        }
        Ok(Mailbox::new(ep))
    }

    /// Asks every isolate (and every mailbox) to shut down: each gets
    /// [`Event::ShutdownRequested`](crate::Event::ShutdownRequested), isolates deepest path
    /// first — a level is asked once the one below it has stopped (or after the
    /// `drop_timeout` if one does not). Mailboxes are asked at once. Later spawns fail;
    /// nothing is restarted. Returns at once; [`join`](Self::join) waits.
    pub fn shutdown(&self) {
        self.inner.request_shutdown();
    }

    /// Waits for every isolate to stop, and for pending supervision work (a restart may
    /// follow a stop), for at most `timeout`.
    pub fn join(&self, timeout: Duration) -> Result<(), JoinError> {
        self.inner.join(timeout)
    }

    /// Counters of every endpoint.
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.inner.request_shutdown();
        let _ = self.inner.join(self.inner.config.drop_timeout);
        // After the isolates' stops were announced: other nodes then see this one leave.
        if let Some(net) = self.inner.net.get() {
            net.leave();
        }
        if let Some(ep) = uninstall_local(self.inner.id) {
            // With a mailbox open (its messages may still be alive), the endpoint is torn
            // down when the mailbox drops it.
            if !ep.inbox_open.get() {
                ep.teardown();
            }
        }
    }
}
