//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::mpsc;
use std::time::Duration;

use isolate_cluster::{Event, Inbox};

/// Runs `f` on its own thread and fails the test if it does not finish within `limit`
/// (a hang becomes a failure instead of eating CI's time).
pub fn with_timeout<F: FnOnce() + Send + 'static>(limit: Duration, f: F) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::Builder::new()
        .name("test-body".into())
        .spawn(move || {
            f();
            let _ = tx.send(());
        })
        .expect("spawn test body");
    match rx.recv_timeout(limit) {
        Ok(()) => h.join().expect("test body panicked"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p)
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test timed out after {limit:?}"),
    }
}

/// Receives the next message within `limit` and maps it with `f`; panics on timeout or
/// on any other event.
pub fn expect_message<R>(
    inbox: &Inbox,
    limit: Duration,
    f: impl FnOnce(&isolate_cluster::Message<'_>) -> R,
) -> R {
    match inbox.recv_timeout(limit) {
        Some(Event::Message(m)) => f(&m),
        Some(other) => panic!("expected a message, got {other:?}"),
        None => panic!("no message within {limit:?}"),
    }
}

/// A checksum of (sender, sequence number) that a receiver can verify.
pub fn check(from: u32, seq: u64) -> u64 {
    let mut x = (u64::from(from) << 40) ^ seq ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}
