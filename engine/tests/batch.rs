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
                while got.len() < 4 {
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
        let n = mailbox
            .try_send_batch(&sink, &[10u32, 11, 12, 13, 14, 15])
            .unwrap();
        assert_eq!(n, 4, "a 4-cell ring takes four one-cell frames");
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
            (4, 2),
            "four sent; the rest of the batch and the lone frame found it full"
        );
        gate.wait();
        let got = expect_message(&mailbox, T, |m| {
            m.get::<Vec<u32>>()
                .unwrap()
                .iter()
                .map(|v| v.to_native())
                .collect::<Vec<u32>>()
        });
        assert_eq!(got, [10, 11, 12, 13]);
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}
