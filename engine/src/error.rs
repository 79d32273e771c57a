//! Error values. Every bad input has its own variant; nothing here panics.

use std::fmt;

use crate::frame::TypeTag;
use crate::isolate::DownReason;

/// Why a path was rejected. Paths are absolute (`/a/b`), with non-empty segments that are
/// neither `.` nor `..`, no trailing slash, and no NUL or other control characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// The path is the empty string.
    Empty,
    /// The path does not start with `/`.
    NotAbsolute,
    /// The path is `/` alone, which names the node itself.
    Root,
    /// Two slashes in a row (`/a//b`).
    EmptySegment,
    /// The path ends with `/`.
    TrailingSlash,
    /// A segment is `.` or `..`.
    DotSegment,
    /// A NUL byte or another control character.
    ControlCharacter,
    /// A node or cluster name (`node:/path`) that is not 1 to 32 ASCII letters, digits,
    /// `-` or `_`.
    InvalidName,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "path is empty",
            Self::NotAbsolute => "path must start with '/'",
            Self::Root => "path '/' names the node, not an isolate",
            Self::EmptySegment => "path has an empty segment ('//')",
            Self::TrailingSlash => "path ends with '/'",
            Self::DotSegment => "path has a '.' or '..' segment",
            Self::ControlCharacter => "path contains a NUL or control character",
            Self::InvalidName => "node and cluster names are 1 to 32 of [A-Za-z0-9_-]",
        })
    }
}

impl std::error::Error for PathError {}

/// Why a spawn failed.
#[derive(Debug)]
pub enum SpawnError {
    /// The path is not valid.
    InvalidPath(PathError),
    /// An isolate already lives at this path.
    Duplicate(String),
    /// The node is shutting down; it takes no new isolates.
    ShuttingDown,
    /// The operating system refused to start the thread.
    Thread(std::io::Error),
    /// A supervised isolate needs a live isolate at its parent path (or a top-level path).
    NoSupervisor(String),
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidPath(e) => write!(f, "invalid path: {e}"),
            Self::Duplicate(p) => write!(f, "an isolate already lives at {p}"),
            Self::ShuttingDown => f.write_str("the node is shutting down"),
            Self::Thread(e) => write!(f, "could not start the isolate's thread: {e}"),
            Self::NoSupervisor(p) => write!(f, "no live isolate at {p} to supervise this one"),
        }
    }
}

impl std::error::Error for SpawnError {}

impl From<PathError> for SpawnError {
    fn from(e: PathError) -> Self {
        Self::InvalidPath(e)
    }
}

/// Why a lookup failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupError {
    /// The path is not valid.
    InvalidPath(PathError),
    /// No live isolate at this path.
    NotFound(String),
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidPath(e) => write!(f, "invalid path: {e}"),
            Self::NotFound(p) => write!(f, "no isolate at {p}"),
        }
    }
}

impl std::error::Error for LookupError {}

impl From<PathError> for LookupError {
    fn from(e: PathError) -> Self {
        Self::InvalidPath(e)
    }
}

/// Why a send failed. `T` is what the caller gets back: `()` for copy sends (the caller
/// still holds the value it lent), the `Box` for transfer sends.
pub enum SendError<T = ()> {
    /// The ring to the target is full (only from `try_*` sends).
    Full(T),
    /// The target has stopped; it reads no more messages. (A copy send into a ring the
    /// stopped target still had is accepted, drained and counted as undelivered; the
    /// ring is then dropped and later sends fail with this.)
    Disconnected(T),
    /// The message can never fit in a ring of this cluster's capacity. Use a transfer
    /// send for large values, or a larger ring.
    TooLarge {
        /// The value handed back.
        value: T,
        /// The ring capacity in bytes.
        capacity: usize,
    },
    /// The value failed to serialise (rkyv reported an error other than lack of room).
    Serialize(T),
    /// The endpoint id a reply should go to is not known (its owner has gone).
    UnknownTarget(T),
    /// The target is on another node and the value's type is not registered for the
    /// network (`Network::wire_type`), so it cannot leave this process.
    Unregistered(T),
}

impl<T> SendError<T> {
    /// The value handed back.
    pub fn into_inner(self) -> T {
        match self {
            Self::Full(v)
            | Self::Disconnected(v)
            | Self::TooLarge { value: v, .. }
            | Self::Serialize(v)
            | Self::UnknownTarget(v)
            | Self::Unregistered(v) => v,
        }
    }

    /// The same error without its value.
    pub fn without_value(&self) -> SendError {
        match self {
            Self::Full(_) => SendError::Full(()),
            Self::Disconnected(_) => SendError::Disconnected(()),
            Self::TooLarge { capacity, .. } => SendError::TooLarge {
                value: (),
                capacity: *capacity,
            },
            Self::Serialize(_) => SendError::Serialize(()),
            Self::UnknownTarget(_) => SendError::UnknownTarget(()),
            Self::Unregistered(_) => SendError::Unregistered(()),
        }
    }

    /// Maps the value carried back (for example to take a transferred box out of it).
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> SendError<U> {
        match self {
            Self::Full(v) => SendError::Full(f(v)),
            Self::Disconnected(v) => SendError::Disconnected(f(v)),
            Self::TooLarge { value, capacity } => SendError::TooLarge {
                value: f(value),
                capacity,
            },
            Self::Serialize(v) => SendError::Serialize(f(v)),
            Self::UnknownTarget(v) => SendError::UnknownTarget(f(v)),
            Self::Unregistered(v) => SendError::Unregistered(f(v)),
        }
    }
}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(_) => f.write_str("Full(..)"),
            Self::Disconnected(_) => f.write_str("Disconnected(..)"),
            Self::TooLarge { capacity, .. } => write!(f, "TooLarge {{ capacity: {capacity} }}"),
            Self::Serialize(_) => f.write_str("Serialize(..)"),
            Self::UnknownTarget(_) => f.write_str("UnknownTarget(..)"),
            Self::Unregistered(_) => f.write_str("Unregistered(..)"),
        }
    }
}

impl<T> PartialEq for SendError<T> {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

impl<T> Eq for SendError<T> {}

impl<T> Clone for SendError<T>
where
    T: Clone,
{
    fn clone(&self) -> Self {
        match self {
            Self::Full(v) => Self::Full(v.clone()),
            Self::Disconnected(v) => Self::Disconnected(v.clone()),
            Self::TooLarge { value, capacity } => Self::TooLarge {
                value: value.clone(),
                capacity: *capacity,
            },
            Self::Serialize(v) => Self::Serialize(v.clone()),
            Self::UnknownTarget(v) => Self::UnknownTarget(v.clone()),
            Self::Unregistered(v) => Self::Unregistered(v.clone()),
        }
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(_) => f.write_str("the ring to the target is full"),
            Self::Disconnected(_) => f.write_str("the target has stopped"),
            Self::TooLarge { capacity, .. } => write!(
                f,
                "the message does not fit in a ring of {capacity} bytes; use a transfer send"
            ),
            Self::Serialize(_) => f.write_str("the value failed to serialise"),
            Self::UnknownTarget(_) => f.write_str("the reply target is not known"),
            Self::Unregistered(_) => f.write_str(
                "the target is on another node and the type is not registered for the network",
            ),
        }
    }
}

impl<T> std::error::Error for SendError<T> {}

/// Why a message could not be read as the requested type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessError {
    /// The payload's tag is not the tag of the requested type.
    TypeMismatch {
        /// The tag of the requested type.
        expected: TypeTag,
        /// The tag the message carries.
        found: TypeTag,
    },
    /// The message is a transfer; use `take`.
    NotCopy,
    /// The message is a copy; use `get`.
    NotTransfer,
    /// The transferred value was already taken.
    AlreadyTaken,
    /// The bytes are not a valid archive of the requested type (checked access only).
    Invalid,
}

impl fmt::Display for AccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TypeMismatch { expected, found } => {
                write!(
                    f,
                    "type mismatch: expected tag {expected:#x}, message has {found:#x}"
                )
            }
            Self::NotCopy => f.write_str("the message is a transfer; use take()"),
            Self::NotTransfer => f.write_str("the message is a copy; use get()"),
            Self::AlreadyTaken => f.write_str("the transferred value was already taken"),
            Self::Invalid => f.write_str("the bytes are not a valid archive of that type"),
        }
    }
}

impl std::error::Error for AccessError {}

/// Why waiting for isolates failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinError {
    /// The timeout passed; these isolates were still running.
    Timeout {
        /// Paths of the isolates still running.
        running: Vec<String>,
    },
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout { running } => write!(f, "timed out; still running: {running:?}"),
        }
    }
}

impl std::error::Error for JoinError {}

/// Why waiting for an isolate's exit value failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitError {
    /// The isolate was still running when the timeout passed.
    Timeout,
    /// The isolate ended without calling `exit`.
    NoValue(DownReason),
    /// The exit value is of another type.
    TypeMismatch,
    /// Another waiter already took the value.
    AlreadyTaken,
}

impl fmt::Display for ExitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("the isolate is still running"),
            Self::NoValue(r) => write!(f, "the isolate ended without an exit value ({r})"),
            Self::TypeMismatch => f.write_str("the exit value has another type"),
            Self::AlreadyTaken => f.write_str("the exit value was already taken"),
        }
    }
}

impl std::error::Error for ExitError {}

/// Why a mailbox could not be opened on this thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailboxError {
    /// This thread already has an open mailbox (or is an isolate, whose `Context` is its
    /// mailbox).
    InUse,
    /// The cluster has been dropped.
    ClusterGone,
}

impl fmt::Display for MailboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InUse => f.write_str("this thread's mailbox is already open"),
            Self::ClusterGone => f.write_str("the cluster has been dropped"),
        }
    }
}

impl std::error::Error for MailboxError {}

/// Why a request got no reply value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The request could not be sent.
    Send(SendError),
    /// No reply before the timeout. The request is forgotten: a reply that still comes
    /// is dropped and counted (`EndpointStats::late_replies`), never handed to another
    /// request.
    Timeout,
    /// The handler answered with an error (`Message::reply_error`); its text.
    Remote(String),
    /// The target stopped without replying (a panic in the handler, for example), and
    /// why, if known.
    TargetDown(Option<DownReason>),
    /// No request with this id is waiting (already answered, timed out or cancelled).
    UnknownRequest,
    /// The worker was closed; it takes no new requests.
    Closed,
    /// The reply is of another type than the one expected.
    Access(AccessError),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Send(e) => write!(f, "the request could not be sent: {e}"),
            Self::Timeout => f.write_str("no reply before the timeout"),
            Self::Remote(m) => write!(f, "the handler failed: {m}"),
            Self::TargetDown(Some(r)) => write!(f, "the target stopped without replying ({r})"),
            Self::TargetDown(None) => f.write_str("the target stopped without replying"),
            Self::UnknownRequest => f.write_str("no such request is waiting"),
            Self::Closed => f.write_str("the worker is closed"),
            Self::Access(e) => write!(f, "unexpected reply: {e}"),
        }
    }
}

impl std::error::Error for CallError {}

impl From<SendError> for CallError {
    fn from(e: SendError) -> Self {
        Self::Send(e)
    }
}

/// Why `run`/`compute` produced no value.
#[derive(Debug)]
pub enum RunError {
    /// The isolate could not be spawned.
    Spawn(SpawnError),
    /// The closure panicked; the panic message.
    Panicked(String),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Spawn(e) => write!(f, "could not spawn the isolate: {e}"),
            Self::Panicked(m) => write!(f, "the closure panicked: {m}"),
        }
    }
}

impl std::error::Error for RunError {}
