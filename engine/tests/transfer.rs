//! Transfer sends move the allocation itself; every transferred value is dropped once.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::with_timeout;
use isolate_cluster::{Cluster, Event, Properties};

const T: Duration = Duration::from_secs(20);

#[test]
fn a_transferred_value_keeps_its_address_there_and_back() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let back = cluster
            .spawn("/back", Properties::new(), |ctx| {
                let mut expected_addr = 0u64;
                while let Some(Event::Message(mut m)) = ctx.recv() {
                    if m.is_transfer() {
                        let mut v = m.take::<Vec<u8>>().unwrap();
                        assert_eq!(v.as_ptr() as u64, expected_addr, "not copied on the way in");
                        v[0] = 0xAB;
                        m.reply_transfer(v).unwrap();
                    } else {
                        expected_addr = m.get::<u64>().unwrap().to_native();
                    }
                }
            })
            .unwrap();
        for size in [64usize, 1 << 20, 16 << 20] {
            let v = vec![1u8; size];
            let addr = v.as_ptr() as u64;
            back.send(&addr).unwrap();
            back.transfer(Box::new(v)).unwrap();
            match mailbox.recv_timeout(T) {
                Some(Event::Message(mut m)) => {
                    let v = m.take::<Vec<u8>>().unwrap();
                    assert_eq!(v.as_ptr() as u64, addr, "not copied on the way back");
                    assert_eq!((v.len(), v[0], v[size - 1]), (size, 0xAB, 1));
                }
                other => panic!("expected the value back, got {other:?}"),
            }
        }
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

struct Counted(Arc<AtomicUsize>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn every_transferred_value_is_dropped_exactly_once() {
    const N: usize = 10_000;
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::builder().ring_capacity(512).build();
        let drops = Arc::new(AtomicUsize::new(0));
        let taken = Arc::new(AtomicUsize::new(0));
        let t2 = taken.clone();
        let sink = cluster
            .spawn("/sink", Properties::new(), move |ctx| {
                let mut i = 0;
                while let Some(Event::Message(mut m)) = ctx.recv() {
                    // Take every other value; the message drops the rest.
                    if i % 2 == 0 {
                        let v = m.take::<Counted>().unwrap();
                        t2.fetch_add(1, Ordering::Relaxed);
                        drop(v);
                    }
                    i += 1;
                }
            })
            .unwrap();
        for _ in 0..N {
            sink.transfer(Box::new(Counted(drops.clone()))).unwrap();
        }
        cluster.shutdown();
        cluster.join(T).unwrap();
        assert_eq!(taken.load(Ordering::Relaxed), N / 2);
        assert_eq!(drops.load(Ordering::Relaxed), N);
    });
}
