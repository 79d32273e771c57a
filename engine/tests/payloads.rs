//! Copy sends of values whose serialisers need scratch space (nested collections): the
//! endpoint's arena is acquired only then, reused across sends, and every value arrives
//! intact.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::with_timeout;
use isolate_cluster::rkyv::{self, Archive, Deserialize, Serialize};
use isolate_cluster::{Cluster, Event};

const T: Duration = Duration::from_secs(20);

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
struct Order {
    id: u64,
    lines: Vec<(String, u32)>,
    notes: Option<Vec<String>>,
}

fn order(i: u64) -> Order {
    Order {
        id: i,
        lines: (0..(i % 7) as u32)
            .map(|k| (format!("item-{i}-{k}"), k * 3))
            .collect(),
        notes: (i % 2 == 0).then(|| vec!["fragile".repeat((i % 5) as usize); (i % 4) as usize]),
    }
}

#[test]
fn nested_values_survive_many_sends_interleaved_with_plain_ones() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let mb = cluster.mailbox().unwrap();
        let me = mb.me().clone();
        for i in 0..300u64 {
            let words: Vec<String> = (0..i % 40).map(|k| format!("w{k}")).collect();
            let map: HashMap<String, Vec<u8>> = (0..i % 9)
                .map(|k| (format!("k{k}"), vec![k as u8; k as usize]))
                .collect();
            let o = order(i);
            mb.send(&me, &words).unwrap();
            mb.send(&me, &i).unwrap();
            mb.send(&me, &map).unwrap();
            mb.send(&me, &o).unwrap();

            let Some(Event::Message(m)) = mb.recv_timeout(T) else {
                panic!("words {i} missing")
            };
            let got: Vec<&str> = m
                .get::<Vec<String>>()
                .unwrap()
                .iter()
                .map(|s| s.as_str())
                .collect();
            assert_eq!(got, words);
            drop(m);
            let Some(Event::Message(m)) = mb.recv_timeout(T) else {
                panic!("plain {i} missing")
            };
            assert_eq!(*m.get::<u64>().unwrap(), i);
            drop(m);
            let Some(Event::Message(m)) = mb.recv_timeout(T) else {
                panic!("map {i} missing")
            };
            let got = m.get::<HashMap<String, Vec<u8>>>().unwrap();
            assert_eq!(got.len(), map.len());
            for (k, v) in &map {
                assert_eq!(
                    got.get(k.as_str()).unwrap().as_slice(),
                    v.as_slice(),
                    "key {k}"
                );
            }
            drop(m);
            let Some(Event::Message(m)) = mb.recv_timeout(T) else {
                panic!("order {i} missing")
            };
            let got = m.get_checked::<Order>().unwrap();
            let back: Order = rkyv::deserialize::<Order, rkyv::rancor::Error>(got).unwrap();
            assert_eq!(back, o);
        }
        assert!(mb.try_recv().is_none(), "nothing extra arrived");
    });
}
