//! # isolate-cluster
//!
//! A lock-free, zero-copy message bus of *isolates*: threads that share nothing, pinned to
//! their own cores, talking only through single-producer single-consumer rings of
//! [rkyv](https://docs.rs/rkyv) frames.
//!
//! ## Guarantees
//!
//! - **Per-pair FIFO, exactly once.** Between two threads, messages arrive in the order
//!   they were sent, each once. Nothing is dropped silently: a full ring makes `send` wait
//!   and `try_send` return [`SendError::Full`]; messages a stopped isolate never read are
//!   counted ([`Stats::undelivered`]) and transferred values among them are dropped.
//! - **Zero copy.** A copy send serialises the value with rkyv *directly into ring
//!   memory*; the receiver reads the archived value in place ([`Message::get`]). A
//!   transfer send ([`IsolateRef::transfer`]) moves a `Box` — only the pointer travels.
//! - **Hot path.** Send + receive of a small message between two isolates is a ring
//!   write, a ring read and a 32-byte header: no lock, no allocation (steady state), no
//!   syscall (unless the receiver is parked), no dynamic dispatch.
//! - **Typed access.** Every frame carries a [`TypeTag`]; reading it as another type is
//!   [`AccessError::TypeMismatch`], never undefined behaviour.
//! - **No lost wake-ups.** Idle isolates park ([`WaitStrategy::SpinThenPark`], the
//!   default) and use no CPU; a Dekker-style flag protocol, model-checked with loom,
//!   guarantees a sender always wakes a parked receiver. Many more isolates than cores work.
//! - **Isolation.** A panic in an isolate ends that isolate only; watchers and monitors
//!   ([`Inbox::monitor`]) get [`Event::IsolateDown`] with the panic message.
//! - **Supervision.** The path tree is the supervision tree: isolates spawned with
//!   [`Cluster::spawn_supervised`] are restarted by their parent per [`Restart`] and the
//!   parent's [`Supervision`] (one-for-one, one-for-all, rest-for-one, restart intensity,
//!   escalation up to the node). See [`supervise`].
//! - **Tasks.** The [`task`] module's scheduler runs one-off, periodic (on absolute
//!   deadlines: no drift) and named tasks on an isolate; any isolate or thread runs them by
//!   name, subscribes to their results or cancels them through a [`task::TaskClient`].
//! - **Shutdown never hangs.** [`Cluster::shutdown`] asks every isolate to stop, children
//!   before parents; each drains what was sent before it stopped. Dropping the
//!   [`Cluster`] waits a bounded time.
//!
//! ## Example
//!
//! ```
//! use std::time::Duration;
//! use isolate_cluster::{Cluster, Event, Properties};
//!
//! let cluster = Cluster::single_node();
//! let echo = cluster
//!     .spawn("/echo", Properties::new().with("type", "echo"), |ctx| {
//!         while let Some(event) = ctx.recv() {
//!             if let Event::Message(msg) = event {
//!                 let n = msg.get::<u64>().expect("a u64");
//!                 msg.reply(&(n.to_native() * 2)).expect("reply");
//!             }
//!         }
//!     })
//!     .unwrap();
//!
//! let mailbox = cluster.mailbox().unwrap();
//! echo.send(&21u64).unwrap();
//! match mailbox.recv_timeout(Duration::from_secs(5)) {
//!     Some(Event::Message(reply)) => assert_eq!(*reply.get::<u64>().unwrap(), 42),
//!     other => panic!("no reply: {other:?}"),
//! }
//! cluster.shutdown();
//! cluster.join(Duration::from_secs(5)).unwrap();
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod barrier;
mod cluster;
mod endpoint;
mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod inbox;
mod isolate;
mod link;
mod message;
#[cfg(feature = "zenoh")]
pub mod net;
mod path;
pub mod supervise;
mod sync;
pub mod task;
#[cfg(loom)]
#[doc(hidden)]
pub mod wake;
#[cfg(not(loom))]
mod wake;
mod wire;
mod work;

pub use cluster::{Builder, Cluster, CorePolicy, EndpointStats, Stats, WaitStrategy};
pub use error::{
    AccessError, CallError, ExitError, JoinError, LookupError, MailboxError, PathError, RunError,
    SendError, SpawnError,
};
pub use frame::{type_tag, TypeTag};
pub use inbox::{Context, Inbox, Mailbox, RequestId};
pub use isolate::{DownReason, IsolateRef, Placement};
pub use message::{Broadcast, Event, Message, Replier};
pub use path::{validate_name, validate_path, Properties, PropertyValue};
pub use supervise::{Restart, Strategy, Supervision};
pub use work::{Worker, WorkerPool};

pub use rkyv;

/// The instant `timeout` from now. A timeout too long to represent (`Duration::MAX`, for
/// a wait without end) gives an instant a century away instead of overflowing.
pub(crate) fn deadline_after(timeout: std::time::Duration) -> std::time::Instant {
    deadline_from(std::time::Instant::now(), timeout)
}

/// The instant `timeout` after `start`, as [`deadline_after`].
pub(crate) fn deadline_from(
    start: std::time::Instant,
    timeout: std::time::Duration,
) -> std::time::Instant {
    start
        .checked_add(timeout)
        .unwrap_or_else(|| start + std::time::Duration::from_secs(100 * 365 * 24 * 3600))
}

/// The serialiser a copy send runs: rkyv's high-level serialiser writing into ring cells.
pub type RingSerializer<'a> =
    rkyv::api::high::HighSerializer<frame::RingWriter, frame::Scratch<'a>, frame::RingError>;

/// A type that can be sent by copy: anything rkyv can archive (derive
/// `rkyv::Archive, rkyv::Serialize`; std types like integers, `String`, `Vec` work as is).
pub trait Payload: for<'a> rkyv::Serialize<RingSerializer<'a>> + 'static {}

impl<T> Payload for T where T: for<'a> rkyv::Serialize<RingSerializer<'a>> + 'static {}
