//! Instructions per poll of an empty inbox: what a spinning receiver runs per turn of its
//! loop, which bounds how soon it sees a message (a separate program from `hotpath`, so
//! neither changes how the other is inlined). Under callgrind:
//!
//! ```text
//! cargo build --release -p isolate-cluster-benches --example idle_poll
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/idle_poll 100000
//! ```
//!
//! Run it with two counts and divide the difference of the totals by the difference of
//! the counts.

use std::hint::black_box;

use isolate_cluster::Cluster;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let cluster = Cluster::single_node();
    let mb = cluster.mailbox().expect("mailbox");
    let me = mb.me().clone();
    // One linked sender (itself), nothing waiting.
    mb.send(&me, &1u64).expect("send");
    drop(mb.try_recv());
    let mut seen = 0u64;
    for _ in 0..n {
        if black_box(mb.try_recv()).is_some() {
            seen += 1;
        }
    }
    println!("{n} empty polls, {seen} messages");
}
