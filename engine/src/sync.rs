//! The atomics, mutex and thread parking the wake-up and control-queue protocols use,
//! behind one shim so the `loom` model checker can replace them (`RUSTFLAGS="--cfg loom"`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Mutex;
#[cfg(loom)]
pub(crate) use loom::thread::{current, park, Thread};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Mutex;
#[cfg(not(loom))]
pub(crate) use std::thread::{current, park, Thread};

/// Parks with a timeout (loom has no timed park: it parks until unparked).
#[cfg(not(loom))]
pub(crate) fn park_timeout(d: std::time::Duration) {
    std::thread::park_timeout(d)
}

/// Parks with a timeout (loom has no timed park: it parks until unparked).
#[cfg(loom)]
pub(crate) fn park_timeout(_d: std::time::Duration) {
    loom::thread::yield_now()
}
