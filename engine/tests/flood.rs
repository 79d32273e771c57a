//! Backpressure: two isolates flooding each other through rings that hold four messages.

mod common;

use std::time::Duration;

use common::{expect_message, with_timeout};
use isolate_cluster::{Cluster, Context, Event, IsolateRef, Properties};

fn peer(ctx: &Context, path: &str) -> IsolateRef {
    loop {
        if let Ok(r) = ctx.lookup(path) {
            return r;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Each side blasts `N` blocking sends at the other before reading anything. A ring of
/// the minimum capacity holds four 8-byte messages, so both block at once; each drains its own rings
/// while blocked, so both finish, and every message arrives once, in order.
#[test]
fn cross_flood_through_tiny_rings_loses_nothing() {
    const N: u64 = 20_000;
    with_timeout(Duration::from_secs(120), || {
        let cluster = Cluster::builder().ring_capacity(256).build();
        let mailbox = cluster.mailbox().unwrap();
        for (me, other) in [("/a", "/b"), ("/b", "/a")] {
            let main_ref = mailbox.me().clone();
            cluster
                .spawn(me, Properties::new(), move |ctx| {
                    let other = peer(ctx, other);
                    for i in 0..N {
                        ctx.send(&other, &i).unwrap();
                    }
                    let mut expect = 0u64;
                    while expect < N {
                        if let Some(Event::Message(m)) = ctx.recv() {
                            assert_eq!(*m.get::<u64>().unwrap(), expect, "FIFO");
                            expect += 1;
                        }
                    }
                    ctx.send(&main_ref, &expect).unwrap();
                    while ctx.recv().is_some() {}
                })
                .unwrap();
        }
        for _ in 0..2 {
            let n = expect_message(&mailbox, Duration::from_secs(100), |m| {
                *m.get::<u64>().unwrap()
            });
            assert_eq!(n, N);
        }
        let stats = cluster.stats();
        let full: u64 = stats.endpoints.iter().map(|e| e.full).sum();
        assert!(full > 0, "the rings really were full: {stats:?}");
        cluster.shutdown();
        cluster.join(Duration::from_secs(30)).unwrap();
        assert_eq!(cluster.stats().undelivered, 0);
    });
}

/// Handlers that reply while still holding the message they answer, through rings that
/// hold four messages: neither side can free its ring, so blocked sends spill to the heap
/// instead of deadlocking. Every chain runs to its end: exact counts on both sides.
#[test]
fn echo_storm_while_holding_messages_does_not_deadlock() {
    const CHAINS: u64 = 100;
    const TTL: u64 = 100;
    // A chain started by one side with ttl TTL delivers ttl TTL, TTL-2, .., 0 to the
    // other side (51) and TTL-1, .., 1 back (50).
    const EXPECTED: u64 = CHAINS * (TTL / 2 + 1) + CHAINS * (TTL / 2);
    with_timeout(Duration::from_secs(120), || {
        let cluster = Cluster::builder().ring_capacity(256).build();
        let mailbox = cluster.mailbox().unwrap();
        for (me, other) in [("/ping", "/pong"), ("/pong", "/ping")] {
            let main_ref = mailbox.me().clone();
            cluster
                .spawn(me, Properties::new(), move |ctx| {
                    let other = peer(ctx, other);
                    for _ in 0..CHAINS {
                        ctx.send(&other, &TTL).unwrap();
                    }
                    let mut received = 0u64;
                    while received < EXPECTED {
                        if let Some(Event::Message(m)) = ctx.recv() {
                            let ttl = *m.get::<u64>().unwrap();
                            received += 1;
                            if ttl > 0 {
                                m.reply(&(ttl - 1)).unwrap();
                            }
                        }
                    }
                    ctx.send(&main_ref, &received).unwrap();
                    while ctx.recv().is_some() {}
                })
                .unwrap();
        }
        for _ in 0..2 {
            let n = expect_message(&mailbox, Duration::from_secs(100), |m| {
                *m.get::<u64>().unwrap()
            });
            assert_eq!(n, EXPECTED);
        }
        cluster.shutdown();
        cluster.join(Duration::from_secs(30)).unwrap();
        assert_eq!(cluster.stats().undelivered, 0);
    });
}

/// A handler holding a message sends more than the ring to a reader that is not reading:
/// the sends spill (in order) instead of blocking forever, and the reader later gets all
/// of them, in order.
#[test]
fn blocked_sender_holding_a_message_spills_in_order() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::builder().ring_capacity(256).build();
        let mailbox = cluster.mailbox().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let done2 = done.clone();
        let x = cluster
            .spawn("/x", Properties::new(), move |ctx| {
                if let Some(Event::Message(m)) = ctx.recv() {
                    for i in 0..10u64 {
                        m.reply(&i).unwrap();
                    }
                    done2.store(true, Ordering::Release);
                }
                while ctx.recv().is_some() {}
            })
            .unwrap();
        x.send(&0u64).unwrap();
        while !done.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        for i in 0..10u64 {
            let n = expect_message(&mailbox, Duration::from_secs(10), |m| {
                *m.get::<u64>().unwrap()
            });
            assert_eq!(n, i);
        }
        let spilled = cluster
            .stats()
            .endpoints
            .iter()
            .find(|e| e.path == "/x")
            .unwrap()
            .spilled;
        assert!(
            spilled >= 5,
            "four messages fit the ring, one more may be read: {spilled}"
        );
        cluster.shutdown();
        cluster.join(Duration::from_secs(10)).unwrap();
    });
}

/// A frame larger than half the ring, sent while the write position is mid-ring and the
/// receiver sleeps: the skip frame that pads to the end must wake the receiver, or neither
/// side ever moves again.
#[test]
fn a_large_frame_after_a_wrap_wakes_a_parked_receiver() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::builder().ring_capacity(64 << 10).build();
        let mailbox = cluster.mailbox().unwrap();
        let main_ref = mailbox.me().clone();
        let sink = cluster
            .spawn("/sink", Properties::new(), move |ctx| {
                let mut sizes = Vec::new();
                while sizes.len() < 6 {
                    if let Some(Event::Message(m)) = ctx.recv() {
                        sizes.push(m.get::<Vec<u8>>().unwrap().len() as u64);
                    }
                }
                ctx.send(&main_ref, &sizes).unwrap();
                while ctx.recv().is_some() {}
            })
            .unwrap();
        for size in [20 << 10, 40 << 10, 20 << 10, 40 << 10, 50 << 10, 10 << 10] {
            // Let the receiver drain and park between sends.
            std::thread::sleep(Duration::from_millis(20));
            sink.send(&vec![3u8; size]).unwrap();
        }
        let sizes = expect_message(&mailbox, Duration::from_secs(30), |m| {
            m.get::<Vec<u64>>()
                .unwrap()
                .iter()
                .map(|v| v.to_native())
                .collect::<Vec<u64>>()
        });
        assert_eq!(
            sizes,
            [20 << 10, 40 << 10, 20 << 10, 40 << 10, 50 << 10, 10 << 10]
        );
        cluster.shutdown();
        cluster.join(Duration::from_secs(10)).unwrap();
    });
}

/// A transferred value whose `Drop` sends a message, spilled towards an isolate that then
/// stops: discarding it must not happen while the sender's own endpoint is borrowed.
#[test]
fn dropping_a_spilled_transfer_may_send_messages() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};
    struct Noisy(isolate_cluster::IsolateRef);
    impl Drop for Noisy {
        fn drop(&mut self) {
            let _ = self.0.send(&1u64);
        }
    }
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::builder().ring_capacity(256).build();
        let mailbox = cluster.mailbox().unwrap();
        let main_ref = mailbox.me().clone();
        let gate = Arc::new(Barrier::new(2));
        let g2 = gate.clone();
        let target = cluster
            .spawn("/t", Properties::new(), move |_| {
                g2.wait();
            })
            .unwrap();
        let spilled = Arc::new(AtomicBool::new(false));
        let s2 = spilled.clone();
        let t2 = target.clone();
        let x = cluster
            .spawn("/x", Properties::new(), move |ctx| {
                if let Some(Event::Message(held)) = ctx.recv() {
                    for _ in 0..10 {
                        ctx.transfer(&t2, Box::new(Noisy(main_ref.clone())))
                            .unwrap();
                    }
                    drop(held);
                }
                s2.store(true, Ordering::Release);
                // Wait for the go, then send once more to the stopped target.
                if let Some(Event::Message(_)) = ctx.recv() {
                    let r = ctx.transfer(&t2, Box::new(Noisy(main_ref.clone())));
                    assert!(matches!(
                        r,
                        Err(isolate_cluster::SendError::Disconnected(_))
                    ));
                }
                ctx.send(&main_ref, &u64::MAX).unwrap();
                while ctx.recv().is_some() {}
            })
            .unwrap();
        x.send(&0u8).unwrap();
        while !spilled.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        gate.wait();
        target.wait_down(Duration::from_secs(10)).unwrap();
        x.send(&0u8).unwrap();
        let (mut drops, mut done) = (0, false);
        while !(done && drops == 11) {
            let v = expect_message(&mailbox, Duration::from_secs(20), |m| {
                *m.get::<u64>().unwrap()
            });
            if v == u64::MAX {
                done = true;
            } else {
                drops += 1;
            }
        }
        assert_eq!(
            x.wait_down(Duration::from_millis(0)),
            None,
            "the sender did not panic"
        );
        cluster.shutdown();
        cluster.join(Duration::from_secs(10)).unwrap();
    });
}

/// Two senders fill their rings to one receiver before it reads anything. Read one at a
/// time, the receiver takes at most a burst (32 messages) from one ring while the other
/// has messages waiting, then moves on: a flooding sender never starves another. Every
/// message arrives once, in per-sender order.
#[test]
fn a_flooding_sender_does_not_starve_another() {
    const N: u64 = 300;
    const BURST: usize = 32;
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let mut senders = Vec::new();
        for (k, path) in ["/s0", "/s1"].into_iter().enumerate() {
            let to = mailbox.me().clone();
            let r = cluster
                .spawn(path, Properties::new(), move |ctx: &Context| {
                    for i in 0..N {
                        ctx.send(&to, &(k as u64 * 1_000_000 + i)).unwrap();
                    }
                })
                .unwrap();
            senders.push(r);
        }
        for r in &senders {
            assert!(
                r.wait_down(Duration::from_secs(30)).is_some(),
                "sender stops"
            );
        }
        let mut next = [0u64; 2];
        let (mut run_of, mut run) = (usize::MAX, 0usize);
        for _ in 0..2 * N {
            let v = expect_message(&mailbox, Duration::from_secs(10), |m| {
                u64::from(*m.get::<u64>().unwrap())
            });
            let k = (v / 1_000_000) as usize;
            assert_eq!(v % 1_000_000, next[k], "sender {k} in order");
            next[k] += 1;
            run = if k == run_of { run + 1 } else { 1 };
            run_of = k;
            if next[1 - k] < N {
                assert!(
                    run <= BURST,
                    "{run} in a row from sender {k} while the other waits"
                );
            }
        }
        assert_eq!(next, [N, N], "every message once");
        assert!(mailbox.try_recv().is_none());
    });
}
