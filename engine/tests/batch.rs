//! Batched sends: many frames per index update, same order and exactly-once delivery.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{expect_message, with_timeout};
use isolate_cluster::{Cluster, Event, Properties, SendError};

const T: Duration = Duration::from_secs(30);

#[test]
fn a_batch_arrives_whole_and_in_order_through_a_small_ring() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::builder().ring_capacity(4096).build();
        let mailbox = cluster.mailbox().unwrap();
        let main_ref = mailbox.me().clone();
        let sink = cluster
            .spawn("/sink", Properties::new(), move |ctx| {
                let mut expect = 0u64;
                let mut bad = 0u64;
                while expect < 100_000 {
                    match ctx.recv() {
                        Some(Event::Message(m)) => {
                            if *m.get::<u64>().unwrap() != expect {
                                bad += 1;
                            }
                            expect += 1;
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
                ctx.send(&main_ref, &[expect, bad]).unwrap();
                while ctx.recv().is_some() {}
            })
            .unwrap();
        let values: Vec<u64> = (0..100_000).collect();
        for chunk in values.chunks(1000) {
            mailbox.send_batch(&sink, chunk).unwrap();
        }
        let [got, bad] = expect_message(&mailbox, T, |m| {
            let r = m.get::<[u64; 2]>().unwrap();
            [r[0].to_native(), r[1].to_native()]
        });
        assert_eq!((got, bad), (100_000, 0));
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn try_send_batch_stops_at_a_full_ring_and_says_how_many_went() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::builder().ring_capacity(256).build();
        let mailbox = cluster.mailbox().unwrap();
        let gate = Arc::new(Barrier::new(2));
        let g2 = gate.clone();
        let main_ref = mailbox.me().clone();
        let sink = cluster
            .spawn("/sink", Properties::new(), move |ctx| {
                g2.wait();
                let mut got = Vec::new();
                while got.len() < 14 {
                    if let Some(Event::Message(m)) = ctx.recv() {
                        got.push(m.get::<u32>().unwrap().to_native());
                    }
                }
                ctx.send(&main_ref, &got).unwrap();
                while ctx.recv().is_some() {}
            })
            .unwrap();
        let too_big = vec![[0u8; 512]; 2];
        assert!(matches!(
            mailbox.try_send_batch(&sink, &too_big),
            Err(SendError::TooLarge { capacity: 256, .. })
        ));
        let values: Vec<u32> = (10..30).collect();
        let n = mailbox.try_send_batch(&sink, &values).unwrap();
        // Small values of one length are packed 16 bytes apiece behind one header:
        // 4 cells of 64 bytes hold (256 - 32) / 16 of them.
        assert_eq!(n, 14, "a 4-cell ring takes one pack of fourteen");
        assert_eq!(mailbox.try_send_batch(&sink, &[16u32]), Ok(0));
        assert_eq!(
            mailbox.link_occupancy(),
            [(sink.id(), 256, 256)],
            "the ring is full"
        );
        let me = cluster
            .stats()
            .endpoints
            .into_iter()
            .find(|e| e.id == mailbox.me().id())
            .unwrap();
        assert_eq!(
            (me.sent, me.full),
            (14, 2),
            "fourteen sent; the rest of the batch and the lone frame found it full"
        );
        gate.wait();
        let got = expect_message(&mailbox, T, |m| {
            m.get::<Vec<u32>>()
                .unwrap()
                .iter()
                .map(|v| v.to_native())
                .collect::<Vec<u32>>()
        });
        assert_eq!(got, (10..24).collect::<Vec<u32>>());
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

/// Sent one at a time and in batches, copies of several sizes and transfers, through a
/// small ring that wraps many times: a batched receiver reads every message once, in
/// order, and every transferred value is dropped once (taken or not).
#[test]
fn batched_receives_see_every_message_once_in_order() {
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Counted(u64, Arc<AtomicU64>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
    }

    with_timeout(Duration::from_secs(60), || {
        const N: u64 = 20_000;
        let cluster = Cluster::builder().ring_capacity(2048).build();
        let mailbox = cluster.mailbox().unwrap();
        let main_ref = mailbox.me().clone();
        let drops = Arc::new(AtomicU64::new(0));
        let sink = cluster
            .spawn("/sink", Properties::new(), move |ctx| {
                use std::cell::Cell;
                let (next, bad, taken) = (Cell::new(0u64), Cell::new(0u64), Cell::new(0u64));
                let mut batches = 0u64;
                let on_message = |m: &mut isolate_cluster::Message<'_>| {
                    let seq = if let Ok(v) = m.get::<u64>() {
                        v.to_native()
                    } else if let Ok(s) = m.get::<String>() {
                        s.split(':').next().unwrap().parse().unwrap()
                    } else {
                        match m.take::<Counted>() {
                            // Every other transfer is taken; the rest drop with the message.
                            Ok(c) if c.0 % 2 == 0 => {
                                taken.set(taken.get() + 1);
                                c.0
                            }
                            Ok(c) => c.0,
                            Err(e) => panic!("{e}"),
                        }
                    };
                    if seq != next.get() {
                        bad.set(bad.get() + 1);
                    }
                    next.set(seq + 1);
                };
                while next.get() < N {
                    if ctx.try_recv_batch(64, on_message) > 0 {
                        batches += 1;
                    } else if let Some(Event::Message(mut m)) =
                        ctx.recv_timeout(Duration::from_millis(1))
                    {
                        // Frames set aside while the ring was full come this way.
                        on_message(&mut m);
                    }
                }
                ctx.send(&main_ref, &(bad.get(), batches, taken.get()))
                    .unwrap();
                while ctx.recv().is_some() {}
            })
            .unwrap();
        let d = drops.clone();
        let transfers = Arc::new(AtomicU64::new(0));
        let t = transfers.clone();
        let sender = cluster
            .spawn("/source", Properties::new(), move |ctx| {
                let (mut seq, mut op) = (0u64, 0u64);
                while seq < N {
                    op += 1;
                    match op % 7 {
                        0 => {
                            let n = (N - seq).min(40);
                            let batch: Vec<u64> = (seq..seq + n).collect();
                            ctx.send_batch(&sink, &batch).unwrap();
                            seq += n;
                        }
                        1 | 2 => {
                            let text = format!("{seq}:{}", "x".repeat((op % 300) as usize));
                            ctx.send(&sink, &text).unwrap();
                            seq += 1;
                        }
                        3 | 4 => {
                            ctx.transfer(&sink, Box::new(Counted(seq, d.clone())))
                                .map_err(|e| e.without_value())
                                .unwrap();
                            t.fetch_add(1, Ordering::Relaxed);
                            seq += 1;
                        }
                        _ => {
                            ctx.send(&sink, &seq).unwrap();
                            seq += 1;
                        }
                    }
                }
            })
            .unwrap();
        let (bad, batches, taken) = expect_message(&mailbox, T, |m| {
            let r = m.get::<(u64, u64, u64)>().unwrap();
            (r.0.to_native(), r.1.to_native(), r.2.to_native())
        });
        assert_eq!(bad, 0, "out of order, duplicated or lost");
        assert!(batches > 0 && batches < N, "{batches} batches");
        let sent = transfers.load(Ordering::Relaxed);
        assert!(
            taken > 0 && taken < sent,
            "{taken} of {sent} transfers taken"
        );
        sender.wait_down(T).unwrap();
        cluster.shutdown();
        cluster.join(T).unwrap();
        assert_eq!(
            drops.load(Ordering::Relaxed),
            sent,
            "every transfer dropped once"
        );
    });
}

/// A batch stops before a reply (replies go to their request), a panic in the handler
/// releases the ring with what was handed out consumed, and `recv` inside the handler
/// works (the batch's sender is skipped meanwhile).
#[test]
fn batches_leave_replies_to_requests_and_survive_a_panicking_handler() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let echo = cluster
            .spawn("/echo", Properties::new(), |ctx| {
                while let Some(Event::Message(m)) = ctx.recv() {
                    let v = m.get::<u64>().unwrap().to_native();
                    // A plain message first, then the reply, on the same ring.
                    let to = m.sender().unwrap();
                    ctx.send(&to, &(v + 1)).unwrap();
                    m.reply(&(v * 2)).unwrap();
                }
            })
            .unwrap();
        let id = mailbox.request(&echo, &21u64).unwrap();
        // Wait until both frames are in our ring.
        std::thread::sleep(Duration::from_millis(50));
        let mut got = Vec::new();
        assert_eq!(
            mailbox.try_recv_batch(64, |m| got.push(m.get::<u64>().unwrap().to_native())),
            1
        );
        assert_eq!(got, [22]);
        let reply = mailbox.wait_reply(id, T).unwrap();
        assert_eq!(reply.get::<u64>().unwrap().to_native(), 42);
        drop(reply);

        let me = mailbox.me().clone();
        mailbox.send_batch(&me, &[1u64, 2, 3, 4]).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            mailbox.try_recv_batch(64, |m| {
                if m.get::<u64>().unwrap().to_native() == 2 {
                    panic!("handler fails");
                }
            })
        }));
        assert!(r.is_err());
        // 1 and 2 were handed out; 3 and 4 are still there, once.
        let mut rest = Vec::new();
        mailbox.try_recv_batch(64, |m| {
            rest.push(m.get::<u64>().unwrap().to_native());
            // Receiving inside a batch: nothing else is waiting.
            assert!(mailbox.try_recv().is_none());
        });
        assert_eq!(rest, [3, 4]);
        assert_eq!(mailbox.try_recv_batch(64, |_| panic!("nothing left")), 0);
        drop(mailbox);
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

/// A transferred value handed to a batch handler that panics before taking it is dropped
/// once, and not delivered again.
#[test]
fn a_panicking_batch_handler_drops_an_untaken_transfer_once() {
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Counted(Arc<AtomicU64>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let me = mailbox.me().clone();
        let drops = Arc::new(AtomicU64::new(0));
        mailbox
            .transfer(&me, Box::new(Counted(drops.clone())))
            .map_err(|e| e.without_value())
            .unwrap();
        mailbox.send(&me, &7u64).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            mailbox.try_recv_batch(64, |m| {
                if m.is_transfer() {
                    panic!("handler fails");
                }
            })
        }));
        assert!(r.is_err());
        assert_eq!(drops.load(Ordering::Relaxed), 1);
        let mut rest = Vec::new();
        mailbox.try_recv_batch(64, |m| rest.push(m.get::<u64>().unwrap().to_native()));
        assert_eq!(rest, [7]);
        drop(mailbox);
        cluster.shutdown();
        cluster.join(T).unwrap();
        assert_eq!(drops.load(Ordering::Relaxed), 1);
    });
}

/// Small values sent in a batch travel packed (several per frame): each is still its own
/// message, read in order exactly once whether it is received one at a time, in batches
/// that stop inside a pack, or after being set aside while the receiver waited for a
/// reply; and packed values never read are each counted as undelivered.
#[test]
fn packed_values_are_messages_however_they_are_read() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let me = mailbox.me().clone();
        let echo = cluster
            .spawn("/echo", Properties::new(), |ctx| {
                while let Some(ev) = ctx.recv() {
                    if let Event::Message(m) = ev {
                        m.reply(&(m.get::<u64>().unwrap().to_native() + 1)).unwrap();
                    }
                }
            })
            .unwrap();
        let values: Vec<u64> = (0..100).collect();
        mailbox.send_batch(&me, &values).unwrap();
        // The 100 values take far fewer bytes than 100 one-cell frames.
        let [(_, used, _)] = mailbox.link_occupancy()[..] else {
            panic!("one link")
        };
        assert!(used <= 30 * 64, "100 packed values take {used} bytes");

        let mut got = Vec::new();
        let one = |got: &mut Vec<u64>| match mailbox.try_recv() {
            Some(Event::Message(m)) => {
                assert_eq!(m.correlation(), 0);
                assert_eq!(m.sender_id(), me.id());
                assert_eq!(m.bytes().len(), 8);
                got.push(m.get::<u64>().unwrap().to_native());
            }
            other => panic!("{other:?}"),
        };
        // One at a time, then a batch that stops inside a pack, then one at a time again.
        one(&mut got);
        one(&mut got);
        assert_eq!(
            mailbox.try_recv_batch(3, |m| got.push(m.get::<u64>().unwrap().to_native())),
            3,
            "a batch goes on inside a pack read in part"
        );
        for _ in 0..20 {
            one(&mut got);
        }
        let mut batches = 0;
        while got.len() < 60 {
            let n = mailbox.try_recv_batch(7, |m| got.push(m.get::<u64>().unwrap().to_native()));
            if n == 0 {
                one(&mut got);
            } else {
                assert!(n <= 7);
                batches += 1;
            }
        }
        assert!(batches > 0);
        one(&mut got);
        // Waiting for a reply moves everything else in the rings aside, the rest of
        // the pack under way included.
        let reply = mailbox.call(&echo, &41u64, T).unwrap();
        assert_eq!(reply.get::<u64>().unwrap().to_native(), 42);
        drop(reply);
        while got.len() < 100 {
            one(&mut got);
        }
        assert!(mailbox.try_recv().is_none());
        assert_eq!(got, values, "every value once, in order");

        // Packed values nobody reads are counted one by one.
        let gate = Arc::new(Barrier::new(2));
        let g2 = gate.clone();
        let deaf = cluster
            .spawn("/deaf", Properties::new(), move |_ctx| {
                g2.wait();
            })
            .unwrap();
        mailbox.send_batch(&deaf, &values[..50]).unwrap();
        gate.wait();
        deaf.wait_down(T).unwrap();
        assert_eq!(cluster.stats().undelivered, 50);
        drop(mailbox);
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}
