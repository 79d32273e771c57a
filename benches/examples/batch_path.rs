//! Instructions per message of the batched path on one thread, for callgrind: `n` rounds
//! of `send_batch` of 64 `u64`s to the calling thread and `try_recv_batch` of them.
//!
//! ```text
//! cargo build --release -p isolate-cluster-benches --example batch_path
//! valgrind --tool=callgrind target/release/examples/batch_path 2000
//! ```
//!
//! Run it with two counts and divide the difference of the totals by 64 times the
//! difference of the counts.

use std::hint::black_box;

use isolate_cluster::Cluster;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    let cluster = Cluster::single_node();
    let mb = cluster.mailbox().expect("mailbox");
    let me = mb.me().clone();
    let batch: Vec<u64> = (0..64).collect();
    let mut sum = 0u64;
    for _ in 0..n {
        mb.send_batch(&me, black_box(&batch)).expect("send_batch");
        let mut got = 0;
        while got < 64 {
            got += mb.try_recv_batch(64, |m| sum += m.get::<u64>().expect("a u64").to_native());
        }
    }
    assert_eq!(sum, n * (63 * 64 / 2), "every value came back once");
    println!("{n} batches of 64, checksum {sum}");
}
