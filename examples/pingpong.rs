//! A quick round-trip measurement: two pinned isolates ping-ponging a `u64`, next to raw
//! `rtrb` ping-pong on the same two cores, in the same run. (The full benchmark suite is
//! `cargo bench`.)
//!
//! Run: `cargo run --release --example pingpong`

use std::time::{Duration, Instant};

use isolate_cluster::{Cluster, CorePolicy, Event, Properties, WaitStrategy};

const WARMUP: usize = 20_000;
const SAMPLES: usize = 200_000;

fn percentiles(mut ns: Vec<u64>) -> [u64; 4] {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)];
    [at(0.5), at(0.99), at(0.999), *ns.last().unwrap_or(&0)]
}

fn raw_rtrb(cores: [core_affinity::CoreId; 2]) -> Vec<u64> {
    let (mut to_pong, mut from_ping) = rtrb::RingBuffer::<u64>::new(1024);
    let (mut to_ping, mut from_pong) = rtrb::RingBuffer::<u64>::new(1024);
    let pong = std::thread::spawn(move || {
        core_affinity::set_for_current(cores[0]);
        for _ in 0..WARMUP + SAMPLES {
            let v = loop {
                if let Ok(v) = from_ping.pop() {
                    break v;
                }
                std::hint::spin_loop();
            };
            while to_ping.push(v).is_err() {}
        }
    });
    let ping = std::thread::spawn(move || {
        core_affinity::set_for_current(cores[1]);
        let mut samples = Vec::with_capacity(SAMPLES);
        for i in 0..(WARMUP + SAMPLES) as u64 {
            let t = Instant::now();
            while to_pong.push(i).is_err() {}
            loop {
                if let Ok(v) = from_pong.pop() {
                    assert_eq!(v, i);
                    break;
                }
                std::hint::spin_loop();
            }
            if i as usize >= WARMUP {
                samples.push(t.elapsed().as_nanos() as u64);
            }
        }
        samples
    });
    pong.join().expect("pong");
    ping.join().expect("ping")
}

fn isolates(cores: [core_affinity::CoreId; 2]) -> Vec<u64> {
    let cluster = Cluster::builder()
        .wait_strategy(WaitStrategy::BusySpin)
        .core_policy(CorePolicy::Dedicated)
        .cores(vec![cores[0].id, cores[1].id])
        .build();
    let pong = cluster
        .spawn("/pong", Properties::new(), |ctx| {
            while let Some(Event::Message(m)) = ctx.recv() {
                let v = *m.get::<u64>().expect("u64");
                m.reply(&v.to_native()).expect("reply");
            }
        })
        .expect("spawn");
    let ping = cluster
        .spawn("/ping", Properties::new(), move |ctx| {
            let mut samples = Vec::with_capacity(SAMPLES);
            for i in 0..(WARMUP + SAMPLES) as u64 {
                let t = Instant::now();
                ctx.send(&pong, &i).expect("send");
                match ctx.recv() {
                    Some(Event::Message(m)) => assert_eq!(*m.get::<u64>().expect("u64"), i),
                    other => panic!("unexpected {other:?}"),
                }
                if i as usize >= WARMUP {
                    samples.push(t.elapsed().as_nanos() as u64);
                }
            }
            ctx.exit(Box::new(samples))
        })
        .expect("spawn");
    let samples = ping
        .join_exit::<Vec<u64>>(Duration::from_secs(120))
        .expect("samples");
    cluster.shutdown();
    cluster.join(Duration::from_secs(5)).expect("stop");
    *samples
}

fn main() {
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    if ids.len() < 2 {
        println!("needs two cores; found {}", ids.len());
        return;
    }
    let cores = [ids[0], ids[1]];
    println!(
        "round trip of a u64, {SAMPLES} samples after {WARMUP} warm-up, pinned to cores {} and {}",
        cores[0].id, cores[1].id
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>9}",
        "case", "p50 ns", "p99 ns", "p99.9 ns", "max ns"
    );
    let mut ratios = Vec::new();
    for _ in 0..2 {
        let raw = percentiles(raw_rtrb(cores));
        let ours = percentiles(isolates(cores));
        for (name, p) in [("raw rtrb", raw), ("isolate-cluster", ours)] {
            println!("{name:<22} {:>8} {:>8} {:>8} {:>9}", p[0], p[1], p[2], p[3]);
        }
        ratios.push((
            ours[0] as f64 / raw[0] as f64,
            ours[2] as f64 / raw[2] as f64,
        ));
    }
    for (p50, p999) in ratios {
        println!("ratio to raw rtrb: p50 {p50:.2}x, p99.9 {p999:.2}x");
    }
}
