//! Loom models of the wake-up protocol (`engine/src/wake.rs`).
//!
//! Run with: `RUSTFLAGS="--cfg loom" cargo test --release -p isolate-cluster --test loom_wake`
#![cfg(loom)]

use std::sync::Arc;

use isolate_cluster::wake::WakeState;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;

/// A consumer that parks when its "ring" is empty is always woken by a producer that
/// publishes: loom reports a deadlock if any interleaving loses the wake-up.
#[test]
fn a_publish_always_wakes_a_parking_consumer() {
    loom::model(|| {
        let wake = Arc::new(WakeState::new());
        let ring = Arc::new(AtomicUsize::new(0));
        let (w2, r2) = (wake.clone(), ring.clone());
        let consumer = thread::spawn(move || {
            w2.register_current_thread();
            loop {
                if r2.load(Ordering::Acquire) > 0 {
                    return;
                }
                w2.prepare_park();
                if r2.load(Ordering::Acquire) > 0 {
                    w2.cancel_park();
                    return;
                }
                w2.park(None);
            }
        });
        ring.store(1, Ordering::Release);
        wake.notify();
        consumer.join().unwrap();
    });
}

/// Two producers, one consumer that needs both items.
#[test]
fn two_producers_never_lose_a_wake_up() {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(|| {
        let wake = Arc::new(WakeState::new());
        let ring = Arc::new(AtomicUsize::new(0));
        let (w2, r2) = (wake.clone(), ring.clone());
        let consumer = thread::spawn(move || {
            w2.register_current_thread();
            loop {
                if r2.load(Ordering::Acquire) == 2 {
                    return;
                }
                w2.prepare_park();
                if r2.load(Ordering::Acquire) == 2 {
                    w2.cancel_park();
                    return;
                }
                w2.park(None);
            }
        });
        let producers: Vec<_> = (0..2)
            .map(|_| {
                let (w, r) = (wake.clone(), ring.clone());
                thread::spawn(move || {
                    r.fetch_add(1, Ordering::Release);
                    w.notify();
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        consumer.join().unwrap();
    });
}

/// Closing races with a publish: either the closing side's final drain sees the item, or
/// the producer sees `CLOSED` and drains it itself. Draining happens under the graveyard
/// mutex, as in `endpoint.rs`, so the item is never lost and never taken twice.
#[test]
fn a_publish_racing_a_close_is_drained_exactly_once() {
    use loom::sync::Mutex;

    /// The ring's tail (published by the producer) and the head behind the mutex.
    struct Ring {
        tail: AtomicUsize,
        head: Mutex<usize>,
    }
    impl Ring {
        fn drain(&self) -> usize {
            let mut head = self.head.lock().unwrap();
            let tail = self.tail.load(Ordering::Acquire);
            let n = tail - *head;
            *head = tail;
            n
        }
    }

    loom::model(|| {
        let wake = Arc::new(WakeState::new());
        let ring = Arc::new(Ring {
            tail: AtomicUsize::new(0),
            head: Mutex::new(0),
        });
        let (w2, r2) = (wake.clone(), ring.clone());
        let closer = thread::spawn(move || {
            w2.close();
            r2.drain()
        });
        ring.tail.store(1, Ordering::Release);
        let mine = if wake.notify() { ring.drain() } else { 0 };
        let theirs = closer.join().unwrap();
        assert_eq!(mine + theirs, 1);
    });
}

/// The "sender waiting for space" protocol of `link.rs` (`LinkShared`): the sender sets
/// the flag, announces parking on its own endpoint (heavy barrier), re-checks the free
/// space, parks; the receiver frees space, issues the light barrier (a SeqCst fence under
/// loom), reads the flag and wakes the sender. The sender is never left asleep.
#[test]
fn a_sender_waiting_for_space_is_always_woken() {
    use loom::sync::atomic::{fence, AtomicBool};
    loom::model(|| {
        let sender_wake = Arc::new(WakeState::new());
        let head = Arc::new(AtomicUsize::new(0)); // 0: the one-slot ring is full
        let waiting = Arc::new(AtomicBool::new(false));
        let (w2, h2, f2) = (sender_wake.clone(), head.clone(), waiting.clone());
        let receiver = thread::spawn(move || {
            h2.store(1, Ordering::Release); // commit: the slot is free
            fence(Ordering::SeqCst); // barrier::light()
            if f2.load(Ordering::Relaxed) && f2.swap(false, Ordering::AcqRel) {
                w2.notify();
            }
        });
        sender_wake.register_current_thread();
        loop {
            if head.load(Ordering::Acquire) == 1 {
                break;
            }
            waiting.store(true, Ordering::Relaxed);
            sender_wake.prepare_park();
            if head.load(Ordering::Acquire) == 1 {
                sender_wake.cancel_park();
                break;
            }
            sender_wake.park(None);
        }
        receiver.join().unwrap();
    });
}

/// The hand-over of a new link (or any control item) to an endpoint's thread: the sender
/// pushes into the control queue and notifies; the consumer checks the queue's flag again
/// after announcing that it parks. The item is never left behind a sleeping consumer.
#[test]
fn a_control_item_always_reaches_a_parking_consumer() {
    use isolate_cluster::wake::ControlQueue;
    loom::model(|| {
        let wake = Arc::new(WakeState::new());
        let queue = Arc::new(ControlQueue::<u32>::new());
        let (w2, q2) = (wake.clone(), queue.clone());
        let consumer = thread::spawn(move || {
            w2.register_current_thread();
            loop {
                if q2.pending() {
                    let items = q2.take();
                    if !items.is_empty() {
                        return items.into_iter().collect::<Vec<_>>();
                    }
                }
                w2.prepare_park();
                if q2.pending() {
                    w2.cancel_park();
                    continue;
                }
                w2.park(None);
            }
        });
        queue.push(&wake, 7).unwrap();
        assert_eq!(consumer.join().unwrap(), [7]);
    });
}

/// A push racing the endpoint's close: the item is either handed back to the pusher or
/// taken by the closing side's drain; never both, never neither.
#[test]
fn a_control_item_racing_a_close_is_taken_exactly_once() {
    use isolate_cluster::wake::ControlQueue;
    loom::model(|| {
        let wake = Arc::new(WakeState::new());
        let queue = Arc::new(ControlQueue::<u32>::new());
        let (w2, q2) = (wake.clone(), queue.clone());
        let closer = thread::spawn(move || {
            w2.close();
            q2.take().len()
        });
        let accepted = queue.push(&wake, 1).is_ok();
        let drained = closer.join().unwrap();
        // Whatever the closer did not take is still queued only if it was accepted after
        // the take; the close check under the lock rules that out.
        let left = queue.take().len();
        assert_eq!(usize::from(accepted), drained + left);
        assert_eq!(left, 0, "an item was accepted after the close was drained");
    });
}
