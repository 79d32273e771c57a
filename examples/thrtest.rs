use isolate_cluster::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
fn main() {
    let ids = core_affinity::get_core_ids().unwrap();
    let pin_main = std::env::args().any(|a| a == "pin");
    let one_core = std::env::args().any(|a| a == "one");
    let mut b = Cluster::builder()
        .ring_capacity(1 << 20)
        .wait_strategy(WaitStrategy::BusySpin)
        .core_policy(CorePolicy::Dedicated);
    if one_core {
        b = b.cores(vec![ids[0].id]);
    }
    let cluster = b.build();
    if pin_main {
        core_affinity::set_for_current(ids[1]);
    }
    let count = Arc::new(AtomicU64::new(0));
    let c2 = count.clone();
    let sink = cluster
        .spawn("/sink", Properties::new(), move |ctx| {
            let mut n = 0u64;
            loop {
                match ctx.try_recv() {
                    Some(Event::Message(_)) => {
                        n += 1;
                        if n % 64 == 0 {
                            c2.store(n, Ordering::Release);
                        }
                    }
                    Some(Event::ShutdownRequested) => break,
                    Some(_) => {}
                    None => {
                        c2.store(n, Ordering::Release);
                        std::hint::spin_loop();
                    }
                }
            }
        })
        .unwrap();
    println!("sink placed {:?}", sink.placement());
    let mb = cluster.mailbox().unwrap();
    for round in 0..3 {
        let t = std::time::Instant::now();
        let n = 1_000_000u64;
        for i in 0..n {
            mb.send(&sink, &i).unwrap();
        }
        while count.load(Ordering::Acquire) < n * (round + 1) {}
        println!("{:.1} ns/msg", t.elapsed().as_nanos() as f64 / n as f64);
    }
    println!("{:?}", cluster.stats());
}
