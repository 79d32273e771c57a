//! Exactly-once, per-pair FIFO delivery with checksums across 16 isolates, every pair
//! talking, on small rings (so senders block and drain), whatever the number of cores.

mod common;

use std::time::Duration;

use common::{check, expect_message, with_timeout};
use isolate_cluster::rkyv::{Archive, Serialize};
use isolate_cluster::{Cluster, Event, IsolateRef, Properties};

#[derive(Archive, Serialize)]
struct Seq {
    from: u32,
    seq: u64,
    check: u64,
}

#[derive(Archive, Serialize)]
struct Report {
    index: u32,
    received: u64,
    checksum: u64,
    out_of_order: u64,
    bad_check: u64,
}

const ISOLATES: u32 = 16;
const PER_PEER: u64 = 3000;

fn lookup_retry(ctx: &isolate_cluster::Context, path: &str) -> IsolateRef {
    for _ in 0..10_000 {
        if let Ok(r) = ctx.lookup(path) {
            return r;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("{path} never appeared");
}

#[test]
fn sixteen_isolates_all_pairs_exactly_once_in_order() {
    with_timeout(Duration::from_secs(120), || {
        let cluster = Cluster::builder().ring_capacity(2048).build();
        let mailbox = cluster.mailbox().unwrap();
        let main_ref = mailbox.me().clone();
        for i in 0..ISOLATES {
            let main_ref = main_ref.clone();
            cluster
                .spawn(
                    &format!("/mesh/{i}"),
                    Properties::new().with("index", i as i64),
                    move |ctx| {
                        let peers: Vec<IsolateRef> = (0..ISOLATES)
                            .filter(|&j| j != i)
                            .map(|j| lookup_retry(ctx, &format!("/mesh/{j}")))
                            .collect();
                        let mut next = vec![0u64; ISOLATES as usize + 64];
                        let mut index_of = std::collections::HashMap::new();
                        for p in &peers {
                            index_of.insert(
                                p.id(),
                                p.property("index").and_then(|v| v.as_int()).unwrap() as u32,
                            );
                        }
                        let mut tally = [0u64; 4]; // received, checksum, out of order, bad check
                        let mut handle = |m: &isolate_cluster::Message<'_>, t: &mut [u64; 4]| {
                            let s = m.get::<Seq>().expect("a Seq");
                            let from = s.from.to_native();
                            let seq = s.seq.to_native();
                            assert_eq!(
                                index_of.get(&m.sender_id()),
                                Some(&from),
                                "sender id matches payload"
                            );
                            if next[from as usize] != seq {
                                t[2] += 1;
                            }
                            next[from as usize] = seq + 1;
                            if s.check.to_native() != check(from, seq) {
                                t[3] += 1;
                            }
                            t[0] += 1;
                            t[1] = t[1].wrapping_add(check(from, seq));
                        };
                        for seq in 0..PER_PEER {
                            for p in &peers {
                                ctx.send(
                                    p,
                                    &Seq {
                                        from: i,
                                        seq,
                                        check: check(i, seq),
                                    },
                                )
                                .unwrap();
                            }
                            while let Some(Event::Message(m)) = ctx.try_recv() {
                                handle(&m, &mut tally);
                            }
                        }
                        let expected = PER_PEER * u64::from(ISOLATES - 1);
                        while tally[0] < expected {
                            match ctx.recv() {
                                Some(Event::Message(m)) => handle(&m, &mut tally),
                                Some(_) => {}
                                None => break,
                            }
                        }
                        let [received, checksum, out_of_order, bad_check] = tally;
                        ctx.send(
                            &main_ref,
                            &Report {
                                index: i,
                                received,
                                checksum,
                                out_of_order,
                                bad_check,
                            },
                        )
                        .unwrap();
                        while ctx.recv().is_some() {}
                    },
                )
                .unwrap();
        }
        let mut expected_sum = 0u64;
        for from in 0..ISOLATES {
            for seq in 0..PER_PEER {
                expected_sum = expected_sum.wrapping_add(check(from, seq));
            }
        }
        let mut total = 0u64;
        let mut seen = vec![false; ISOLATES as usize];
        for _ in 0..ISOLATES {
            expect_message(&mailbox, Duration::from_secs(100), |m| {
                let r = m.get::<Report>().unwrap();
                let i = r.index.to_native();
                assert!(!seen[i as usize], "one report per isolate");
                seen[i as usize] = true;
                assert_eq!(r.received.to_native(), PER_PEER * u64::from(ISOLATES - 1));
                assert_eq!(r.out_of_order.to_native(), 0, "per-pair FIFO");
                assert_eq!(r.bad_check.to_native(), 0, "payload intact");
                let own: u64 = (0..PER_PEER).fold(0u64, |a, s| a.wrapping_add(check(i, s)));
                assert_eq!(r.checksum.to_native(), expected_sum.wrapping_sub(own));
                total += r.received.to_native();
            });
        }
        assert_eq!(
            total,
            PER_PEER * u64::from(ISOLATES) * u64::from(ISOLATES - 1)
        );
        cluster.shutdown();
        cluster.join(Duration::from_secs(30)).unwrap();
        assert_eq!(cluster.stats().undelivered, 0);
    });
}
