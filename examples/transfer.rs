//! Moving a 64 MiB value by transfer next to sending it by copy.
//!
//! Run: `cargo run --release --example transfer`
//!
//! A copy send serialises the bytes into the ring (one memcpy of 64 MiB; the receiver
//! reads them in place). A transfer send moves the `Box`: only a pointer travels, so its
//! cost does not depend on the size. Each is timed from the send to the receiver's reply.

use std::time::{Duration, Instant};

use isolate_cluster::{Cluster, Event, Properties};

const SIZE: usize = 64 << 20;

fn main() {
    // The ring must hold the 64 MiB copy frame.
    let cluster = Cluster::builder().ring_capacity(SIZE + (1 << 20)).build();
    let mailbox = cluster.mailbox().expect("mailbox");
    let sink = cluster
        .spawn("/sink", Properties::new(), |ctx| {
            while let Some(event) = ctx.recv() {
                let Event::Message(mut msg) = event else {
                    continue;
                };
                // Reply with (length, last byte, address of the bytes); a moved value is
                // freed only after the reply, so the timing shows the move, not `free`.
                if msg.is_transfer() {
                    let v = msg.take::<Vec<u8>>().expect("a Vec<u8>");
                    msg.reply(&(v.len() as u64, v[v.len() - 1], v.as_ptr() as u64))
                        .expect("reply");
                    drop(v);
                } else {
                    let v = msg.get::<Vec<u8>>().expect("a Vec<u8>");
                    msg.reply(&(v.len() as u64, v[v.len() - 1], v.as_ptr() as u64))
                        .expect("reply");
                }
            }
        })
        .expect("spawn");
    let wait_reply = || match mailbox.recv_timeout(Duration::from_secs(30)) {
        Some(Event::Message(m)) => {
            let r = m.get::<(u64, u8, u64)>().expect("a reply");
            (r.0.to_native(), r.1, r.2.to_native())
        }
        other => panic!("no reply: {other:?}"),
    };

    let mut best_copy = Duration::MAX;
    let mut best_transfer = Duration::MAX;
    for round in 0..3 {
        let value: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        let t = Instant::now();
        sink.send(&value).expect("copy send");
        let (len, last, _) = wait_reply();
        let copy = t.elapsed();
        assert_eq!((len as usize, last), (SIZE, ((SIZE - 1) % 251) as u8));

        let addr = value.as_ptr() as u64;
        let t = Instant::now();
        sink.transfer(Box::new(value)).expect("transfer");
        let (len, last, seen_addr) = wait_reply();
        let transfer = t.elapsed();
        assert_eq!((len as usize, last), (SIZE, ((SIZE - 1) % 251) as u8));
        assert_eq!(seen_addr, addr, "the receiver got the same allocation");
        println!("round {round}: copy {copy:>10.2?}   transfer {transfer:>10.2?}");
        best_copy = best_copy.min(copy);
        best_transfer = best_transfer.min(transfer);
    }
    println!(
        "64 MiB, best of 3: copy {best_copy:.2?}, transfer {best_transfer:.2?} ({:.0}x faster, same address on both sides)",
        best_copy.as_secs_f64() / best_transfer.as_secs_f64()
    );
    cluster.shutdown();
    cluster.join(Duration::from_secs(5)).expect("stop");
}
