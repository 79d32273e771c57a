//! The engine's hot path on one thread, for instruction counting: `n` rounds of a copy
//! send of a `u64` from the calling thread to itself followed by its receive, and the
//! same with raw `rtrb` for reference. Run under callgrind, whose counts are stable on a
//! noisy machine:
//!
//! ```text
//! cargo build --release -p isolate-cluster-benches --example hotpath
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/hotpath engine 100000
//! ```
//!
//! Divide the total by `n` (the set-up is a few hundred thousand instructions) and compare
//! with `hotpath rtrb 100000`.

use std::hint::black_box;

use isolate_cluster::{Cluster, Event};

fn main() {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_else(|| "engine".into());
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let started = std::time::Instant::now();
    let sum = match what.as_str() {
        "engine" => engine(n),
        "rtrb" => raw(n),
        other => {
            eprintln!("usage: hotpath engine|rtrb [rounds] (not {other:?})");
            std::process::exit(2);
        }
    };
    assert_eq!(sum, n * (n - 1) / 2, "every value came back once");
    let per = started.elapsed().as_secs_f64() * 1e9 / n as f64;
    println!("{what}: {n} rounds, checksum {sum}, {per:.1} ns per round");
}

fn engine(n: u64) -> u64 {
    let cluster = Cluster::single_node();
    let mb = cluster.mailbox().expect("mailbox");
    let me = mb.me().clone();
    let mut sum = 0u64;
    for i in 0..n {
        mb.send(&me, black_box(&i)).expect("send");
        match mb.try_recv() {
            Some(Event::Message(m)) => sum += u64::from(*m.get::<u64>().expect("a u64")),
            other => panic!("unexpected {other:?}"),
        }
    }
    sum
}

fn raw(n: u64) -> u64 {
    let (mut tx, mut rx) = rtrb::RingBuffer::<u64>::new(4096);
    let mut sum = 0u64;
    for i in 0..n {
        tx.push(black_box(i)).expect("room");
        sum += rx.pop().expect("a value");
    }
    sum
}
