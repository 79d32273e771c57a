//! References to isolates (and to the endpoints of other threads).

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::cluster::ClusterInner;
use crate::endpoint::{local_endpoint, lock, EndpointShared, LocalEndpoint, Mode, Route, Target};
use crate::error::{CallError, ExitError, SendError};
use crate::path::{Properties, PropertyValue};
use crate::Payload;

/// Where an isolate's thread runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Pinned to a core no other isolate of this cluster uses.
    Dedicated(usize),
    /// Pinned to a core shared with other isolates (no free core was left).
    Shared(usize),
    /// Not pinned: the operating system places it.
    Unpinned,
}

/// Why an isolate stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DownReason {
    /// Its entry function returned.
    Normal,
    /// It called `Context::exit` with a value.
    Exited,
    /// It panicked; the panic message.
    Panicked(String),
    /// Its supervision gave up (too many restarts of its children); why.
    Escalated(String),
    /// It ran on another node, which left the network or was lost (its lease ran out):
    /// the node's name. Whether it still runs there is unknown.
    NodeLost(String),
}

impl DownReason {
    /// Whether this is a failure (a panic or an escalation), which a
    /// [`Restart::Transient`](crate::Restart::Transient) isolate is restarted after.
    pub fn is_failure(&self) -> bool {
        matches!(self, Self::Panicked(_) | Self::Escalated(_))
    }
}

impl fmt::Display for DownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Normal => f.write_str("normal exit"),
            Self::Exited => f.write_str("exited with a value"),
            Self::Panicked(m) => write!(f, "panicked: {m}"),
            Self::Escalated(m) => write!(f, "escalated: {m}"),
            Self::NodeLost(n) => write!(f, "its node {n} was lost"),
        }
    }
}

/// Is this endpoint an isolate or another thread, here or on another node?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
pub(crate) enum EndpointKind {
    Isolate,
    Thread,
    /// An isolate of another node (a proxy: sends to it go over the network).
    RemoteIsolate,
    /// Another thread's endpoint on another node (known from messages it sent).
    RemoteThread,
}

/// The way out to another node: whatever carries frames to it (the network layer).
pub(crate) trait Forward: Send + Sync {
    /// Sends `frame` to endpoint `id` of the node. A transferred value in the frame is
    /// consumed (serialised and dropped) only when this returns `Ok`; on error the caller
    /// still owns it.
    fn forward(&self, id: u32, frame: &crate::link::OwnedFrame) -> Result<(), SendError>;
}

/// Where a remote endpoint lives.
pub(crate) struct RemoteRoute {
    /// The link to its node.
    pub via: Arc<dyn Forward>,
    /// Its endpoint id on its node.
    pub id: u32,
    /// Its node's name.
    pub node: String,
}

pub(crate) struct IsolateInfo {
    pub path: String,
    pub props: Properties,
    pub kind: EndpointKind,
    pub placement: Mutex<Placement>,
    pub endpoint: Arc<EndpointShared>,
    /// `endpoint.id`, kept here too: a send reads it without following the pointer.
    pub id: u32,
    pub cluster: Weak<ClusterInner>,
    pub cluster_id: u64,
    pub remote: Option<RemoteRoute>,
    down: Mutex<Option<DownReason>>,
    down_cv: Condvar,
    exit_value: Mutex<Option<Box<dyn Any + Send>>>,
}

/// A reference to an isolate: cheap to clone (one reference count), `Send` and `Sync`.
///
/// It names the isolate's path and properties and sends to it from any thread: from an
/// isolate it uses that isolate's rings; from any other thread, a per-thread endpoint
/// created on first use (so replies can come back to that thread: see
/// [`Cluster::mailbox`](crate::Cluster::mailbox)).
///
/// A reference also names the endpoint of a thread that is not an isolate (the `sender`
/// of a message sent from `main`); such references have a path starting with `@` and
/// cannot be looked up.
///
/// A reference names one incarnation of an isolate. After the isolate stops (and after a
/// supervisor restarts it at the same path) it stays valid but names the stopped one:
/// [`is_alive`](Self::is_alive) is `false`, [`wait_down`](Self::wait_down) gives the
/// reason, sends fail with [`SendError::Disconnected`], and a call fails with
/// [`CallError::TargetDown`](crate::CallError::TargetDown). Look the path up again to
/// reach a restarted isolate (see [`supervise`](crate::supervise)).
#[derive(Clone)]
pub struct IsolateRef(pub(crate) Arc<IsolateInfo>);

impl IsolateRef {
    pub(crate) fn new(
        path: String,
        props: Properties,
        kind: EndpointKind,
        placement: Placement,
        endpoint: Arc<EndpointShared>,
        cluster: &Arc<ClusterInner>,
    ) -> Self {
        Self::with_route(path, props, kind, placement, endpoint, cluster, None)
    }

    /// A reference to an endpoint of another node, reached through `route`.
    #[cfg_attr(not(feature = "zenoh"), allow(dead_code))]
    pub(crate) fn new_remote(
        path: String,
        props: Properties,
        isolate: bool,
        endpoint: Arc<EndpointShared>,
        cluster: &Arc<ClusterInner>,
        route: RemoteRoute,
    ) -> Self {
        let kind = if isolate {
            EndpointKind::RemoteIsolate
        } else {
            EndpointKind::RemoteThread
        };
        let placement = Placement::Unpinned;
        Self::with_route(path, props, kind, placement, endpoint, cluster, Some(route))
    }

    fn with_route(
        path: String,
        props: Properties,
        kind: EndpointKind,
        placement: Placement,
        endpoint: Arc<EndpointShared>,
        cluster: &Arc<ClusterInner>,
        remote: Option<RemoteRoute>,
    ) -> Self {
        Self(Arc::new(IsolateInfo {
            path,
            props,
            kind,
            placement: Mutex::new(placement),
            id: endpoint.id,
            endpoint,
            cluster: Arc::downgrade(cluster),
            cluster_id: cluster.id,
            remote,
            down: Mutex::new(None),
            down_cv: Condvar::new(),
            exit_value: Mutex::new(None),
        }))
    }

    /// The isolate's path (`@thread-N` for a thread that is not an isolate). An isolate
    /// of another node has the path `node:/its/path` (`node:@N` for another thread there).
    pub fn path(&self) -> &str {
        &self.0.path
    }

    /// The endpoint id: unique within this node's cluster, never reused (an endpoint of
    /// another node gets a local id too; [`remote_id`](Self::remote_id) is its own).
    #[inline]
    pub fn id(&self) -> u32 {
        self.0.id
    }

    /// The isolate's properties.
    pub fn properties(&self) -> &Properties {
        &self.0.props
    }

    /// One property.
    pub fn property(&self, key: &str) -> Option<&PropertyValue> {
        self.0.props.get(key)
    }

    /// Where the isolate's thread runs.
    pub fn placement(&self) -> Placement {
        *lock(&self.0.placement)
    }

    /// Whether this names an isolate, here or on another node (not another thread's
    /// endpoint).
    pub fn is_isolate(&self) -> bool {
        matches!(
            self.0.kind,
            EndpointKind::Isolate | EndpointKind::RemoteIsolate
        )
    }

    /// Whether this names an endpoint of another node (sends go over the network).
    pub fn is_remote(&self) -> bool {
        self.0.remote.is_some()
    }

    /// The node of an endpoint of another node; `None` for this node's own.
    pub fn node(&self) -> Option<&str> {
        self.0.remote.as_ref().map(|r| r.node.as_str())
    }

    /// The endpoint's id on its own node (the same as [`id`](Self::id) for this node's).
    pub fn remote_id(&self) -> u32 {
        self.0.remote.as_ref().map_or(self.id(), |r| r.id)
    }

    pub(crate) fn kind(&self) -> EndpointKind {
        self.0.kind
    }

    /// Whether the isolate still reads messages.
    pub fn is_alive(&self) -> bool {
        !self.0.endpoint.wake.is_closed()
    }

    pub(crate) fn endpoint(&self) -> &Arc<EndpointShared> {
        &self.0.endpoint
    }

    pub(crate) fn set_placement(&self, p: Placement) {
        *lock(&self.0.placement) = p;
    }

    pub(crate) fn set_down(&self, reason: DownReason, exit_value: Option<Box<dyn Any + Send>>) {
        if let Some(v) = exit_value {
            *lock(&self.0.exit_value) = Some(v);
        }
        *lock(&self.0.down) = Some(reason);
        self.0.down_cv.notify_all();
    }

    /// Waits until the isolate has stopped, for at most `timeout`. `None` if it is still
    /// running.
    pub fn wait_down(&self, timeout: Duration) -> Option<DownReason> {
        let deadline = crate::deadline_after(timeout);
        let mut g = lock(&self.0.down);
        loop {
            if let Some(r) = &*g {
                return Some(r.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self
                .0
                .down_cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the isolate to end with [`Context::exit`](crate::Context::exit) and takes
    /// the value it handed over: the same allocation, never copied. Only one caller gets it.
    pub fn join_exit<T: Send + 'static>(&self, timeout: Duration) -> Result<Box<T>, ExitError> {
        let Some(reason) = self.wait_down(timeout) else {
            return Err(ExitError::Timeout);
        };
        if reason != DownReason::Exited {
            return Err(ExitError::NoValue(reason));
        }
        let mut slot = lock(&self.0.exit_value);
        let Some(v) = slot.take() else {
            return Err(ExitError::AlreadyTaken);
        };
        match v.downcast::<T>() {
            Ok(b) => Ok(b),
            Err(v) => {
                *slot = Some(v);
                Err(ExitError::TypeMismatch)
            }
        }
    }

    /// Runs `f` with the calling thread's endpoint in this reference's cluster.
    #[inline]
    fn with_local<R>(
        &self,
        f: impl FnOnce(&LocalEndpoint) -> Result<(), SendError<R>>,
        v: R,
    ) -> Result<(), SendError<R>> {
        match self.local() {
            Some(ep) => f(&ep),
            None => Err(SendError::Disconnected(v)),
        }
    }

    /// The calling thread's endpoint in this reference's cluster (made on first use);
    /// `None` once the cluster is gone.
    #[inline]
    fn local(&self) -> Option<std::rc::Rc<LocalEndpoint>> {
        local_endpoint(self.0.cluster_id, || {
            let c = self.0.cluster.upgrade()?;
            Some(c.thread_endpoint())
        })
    }

    /// Sends `request` to this isolate and waits up to `timeout` for the reply, from any
    /// thread: [`Inbox::call`](crate::Inbox::call) for code that holds no inbox. The
    /// calling thread's endpoint sends it (an isolate's own; for another thread, the one
    /// [`send`](Self::send) uses), and `read` gets the reply in place (`get` it, or `take`
    /// a transfer): what `read` returns is the call's result. Errors and the timeout are
    /// those of `Inbox::call`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use isolate_cluster::{CallError, Cluster, Event, Properties};
    ///
    /// let cluster = Cluster::single_node();
    /// let square = cluster
    ///     .spawn("/square", Properties::new(), |ctx| {
    ///         while let Some(Event::Message(m)) = ctx.recv() {
    ///             match m.get::<u32>().map(|v| v.to_native()) {
    ///                 Ok(v) if v < 65536 => m.reply(&(v * v)).unwrap(),
    ///                 _ => m.reply_error("too large").unwrap(),
    ///             }
    ///         }
    ///     })
    ///     .unwrap();
    /// let t = Duration::from_secs(5);
    /// let n = square.call(&12u32, t, |m| m.get::<u32>().map(|v| v.to_native()));
    /// assert_eq!(n, Ok(Ok(144)));
    /// let e = square.call(&70000u32, t, |_| ()).unwrap_err();
    /// assert_eq!(e, CallError::Remote("too large".into()));
    /// ```
    pub fn call<T: Payload, R>(
        &self,
        request: &T,
        timeout: Duration,
        read: impl FnOnce(crate::Message<'_>) -> R,
    ) -> Result<R, CallError> {
        let ep = self
            .local()
            .ok_or(CallError::Send(SendError::Disconnected(())))?;
        let reply = crate::inbox::call_copy(&ep, self, request, timeout)?;
        Ok(read(crate::Message::of_reply(&ep, reply)))
    }

    /// Sends a copy of `value`: serialised straight into the ring, read in place by the
    /// receiver. Waits while the ring is full (see [`SendError`] for what can fail).
    /// The sender and reply-to are the calling thread's endpoint.
    ///
    /// Per pair of threads, messages arrive in the order they were sent, exactly once.
    #[inline]
    pub fn send<T: Payload>(&self, value: &T) -> Result<(), SendError> {
        self.with_local(
            |ep| {
                ep.send_copy(
                    Target::Ref(self),
                    value,
                    Route::plain(ep.shared.id),
                    Mode::Block,
                )
            },
            (),
        )
    }

    /// Like [`send`](Self::send), but returns [`SendError::Full`] instead of waiting.
    #[inline]
    pub fn try_send<T: Payload>(&self, value: &T) -> Result<(), SendError> {
        self.with_local(
            |ep| {
                ep.send_copy(
                    Target::Ref(self),
                    value,
                    Route::plain(ep.shared.id),
                    Mode::Try,
                )
            },
            (),
        )
    }

    /// Sends a copy of `value` whose replies should go to `reply_to`.
    pub fn send_with_reply_to<T: Payload>(
        &self,
        value: &T,
        reply_to: &IsolateRef,
    ) -> Result<(), SendError> {
        self.with_local(
            |ep| {
                ep.send_copy(
                    Target::Ref(self),
                    value,
                    Route::plain(reply_to.id()),
                    Mode::Block,
                )
            },
            (),
        )
    }

    /// Moves `value` to the isolate: only the pointer travels, whatever the size. Waits
    /// while the ring is full. On error the box comes back.
    pub fn transfer<T: Send + 'static>(&self, value: Box<T>) -> Result<(), SendError<Box<T>>> {
        let ep = local_endpoint(self.0.cluster_id, || {
            Some(self.0.cluster.upgrade()?.thread_endpoint())
        });
        match ep {
            Some(ep) => ep.send_transfer(
                Target::Ref(self),
                value,
                Route::plain(ep.shared.id),
                Mode::Block,
            ),
            None => Err(SendError::Disconnected(value)),
        }
    }

    /// Like [`transfer`](Self::transfer), but returns [`SendError::Full`] (with the box)
    /// instead of waiting.
    pub fn try_transfer<T: Send + 'static>(&self, value: Box<T>) -> Result<(), SendError<Box<T>>> {
        let ep = local_endpoint(self.0.cluster_id, || {
            Some(self.0.cluster.upgrade()?.thread_endpoint())
        });
        match ep {
            Some(ep) => ep.send_transfer(
                Target::Ref(self),
                value,
                Route::plain(ep.shared.id),
                Mode::Try,
            ),
            None => Err(SendError::Disconnected(value)),
        }
    }
}

impl PartialEq for IsolateRef {
    fn eq(&self, other: &Self) -> bool {
        self.0.cluster_id == other.0.cluster_id && self.id() == other.id()
    }
}

impl Eq for IsolateRef {}

impl std::hash::Hash for IsolateRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.cluster_id.hash(state);
        self.id().hash(state);
    }
}

impl fmt::Debug for IsolateRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IsolateRef")
            .field("path", &self.0.path)
            .field("id", &self.id())
            .field("properties", &self.0.props)
            .field("placement", &self.placement())
            .finish()
    }
}

impl fmt::Display for IsolateRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.path)
    }
}
