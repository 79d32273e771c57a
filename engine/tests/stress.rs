//! A bounded randomized run: isolates send copies, transfers and calls to random peers
//! through small rings. Every copy and transfer arrives exactly once and in per-pair
//! order, every call gets its own answer, every transferred value is dropped once.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{expect_message, with_timeout};
use isolate_cluster::rkyv::{Archive, Serialize};
use isolate_cluster::{Cluster, Event, IsolateRef, Properties};

const ISOLATES: usize = 8;
const OPS: u64 = 3000;

#[derive(Archive, Serialize)]
struct Seq {
    from: u32,
    seq: u64,
}

struct Moved {
    from: u32,
    seq: u64,
    drops: Arc<AtomicUsize>,
}

impl Drop for Moved {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Archive, Serialize)]
struct Report {
    received: u64,
    order_errors: u64,
    call_errors: u64,
    sent: u64,
    moved: u64,
}

fn peer(ctx: &isolate_cluster::Context, i: usize) -> IsolateRef {
    loop {
        if let Ok(r) = ctx.lookup(&format!("/s/{i}")) {
            return r;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn random_copies_transfers_and_calls_are_exactly_once_and_in_order() {
    with_timeout(Duration::from_secs(120), || {
        let cluster = Cluster::builder().ring_capacity(1024).build();
        let mailbox = cluster.mailbox().unwrap();
        let drops = Arc::new(AtomicUsize::new(0));
        let doubler = cluster
            .spawn("/doubler", Properties::new(), |ctx| {
                while let Some(ev) = ctx.recv() {
                    if let Event::Message(m) = ev {
                        let v = m.get::<u64>().unwrap().to_native();
                        m.reply(&(v * 2)).unwrap();
                    }
                }
            })
            .unwrap();
        for i in 0..ISOLATES {
            let main_ref = mailbox.me().clone();
            let drops = drops.clone();
            let doubler = doubler.clone();
            cluster
                .spawn(&format!("/s/{i}"), Properties::new(), move |ctx| {
                    let peers: Vec<IsolateRef> = (0..ISOLATES)
                        .filter(|&j| j != i)
                        .map(|j| peer(ctx, j))
                        .collect();
                    // Next expected sequence number per sender (copies and transfers share it).
                    let mut next = vec![0u64; ISOLATES];
                    let mut seq_to = [0u64; ISOLATES];
                    let (mut received, mut order_errors, mut call_errors, mut sent) =
                        (0u64, 0u64, 0u64, 0u64);
                    let mut moved_count = 0u64;
                    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ (i as u64 + 1);
                    let mut check = |from: u32, seq: u64, next: &mut Vec<u64>| {
                        if next[from as usize] != seq {
                            order_errors += 1;
                        }
                        next[from as usize] = seq + 1;
                        received += 1;
                    };
                    let mut handle = |ev: Event<'_>, next: &mut Vec<u64>| {
                        if let Event::Message(mut m) = ev {
                            if m.is_transfer() {
                                let v = m.take::<Moved>().unwrap();
                                check(v.from, v.seq, next);
                            } else {
                                let s = m.get::<Seq>().unwrap();
                                check(s.from.to_native(), s.seq.to_native(), next);
                            }
                        }
                    };
                    for _ in 0..OPS {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let k = (rng % peers.len() as u64) as usize;
                        let to = &peers[k];
                        let j = if k >= i { k + 1 } else { k };
                        match rng % 8 {
                            0 => {
                                let v = rng % 1000;
                                match ctx.call(&doubler, &v, Duration::from_secs(30)) {
                                    Ok(r) if *r.get::<u64>().unwrap() == v * 2 => {}
                                    _ => call_errors += 1,
                                }
                            }
                            1..=3 => {
                                let moved = Moved {
                                    from: i as u32,
                                    seq: seq_to[j],
                                    drops: drops.clone(),
                                };
                                ctx.transfer(to, Box::new(moved)).unwrap();
                                seq_to[j] += 1;
                                sent += 1;
                                moved_count += 1;
                            }
                            _ => {
                                ctx.send(
                                    to,
                                    &Seq {
                                        from: i as u32,
                                        seq: seq_to[j],
                                    },
                                )
                                .unwrap();
                                seq_to[j] += 1;
                                sent += 1;
                            }
                        }
                        while let Some(ev) = ctx.try_recv() {
                            handle(ev, &mut next);
                        }
                    }
                    // Tell main how much we sent; keep receiving until main says stop.
                    ctx.send(
                        &main_ref,
                        &Report {
                            received: 0,
                            order_errors: 0,
                            call_errors,
                            sent,
                            moved: moved_count,
                        },
                    )
                    .unwrap();
                    loop {
                        match ctx.recv() {
                            Some(Event::ShutdownRequested) | None => break,
                            Some(ev) => handle(ev, &mut next),
                        }
                    }
                    while let Some(ev) = ctx.try_recv() {
                        handle(ev, &mut next);
                    }
                    ctx.send(
                        &main_ref,
                        &Report {
                            received,
                            order_errors,
                            call_errors: 0,
                            sent: 0,
                            moved: 0,
                        },
                    )
                    .unwrap();
                })
                .unwrap();
        }
        let mut total_sent = 0u64;
        let mut total_moved = 0u64;
        for _ in 0..ISOLATES {
            expect_message(&mailbox, Duration::from_secs(100), |m| {
                let r = m.get::<Report>().unwrap();
                assert_eq!(
                    r.call_errors.to_native(),
                    0,
                    "every call got its own answer"
                );
                total_sent += r.sent.to_native();
                total_moved += r.moved.to_native();
            });
        }
        cluster.shutdown();
        let mut total_received = 0u64;
        let mut got = 0;
        while got < ISOLATES {
            match mailbox.recv_timeout(Duration::from_secs(100)) {
                Some(Event::Message(m)) => {
                    let r = m.get::<Report>().unwrap();
                    assert_eq!(r.order_errors.to_native(), 0, "per-pair FIFO");
                    total_received += r.received.to_native();
                    got += 1;
                }
                Some(Event::ShutdownRequested) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        cluster.join(Duration::from_secs(30)).unwrap();
        assert_eq!(total_received, total_sent, "exactly once");
        assert_eq!(cluster.stats().undelivered, 0);
        assert!(total_moved > 0);
        assert_eq!(
            drops.load(Ordering::Relaxed) as u64,
            total_moved,
            "every moved value dropped once"
        );
    });
}
