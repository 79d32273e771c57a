//! One-way throughput of isolate-cluster against raw `rtrb`, `crossbeam-channel` and
//! iceoryx2: messages/s and bytes/s over a payload sweep, through a large ring (no
//! contention) and a tiny ring (maximum contention), with and without batching.
//!
//! `cargo bench --bench throughput` (full); `IC_BENCH_QUICK=1 cargo bench --bench
//! throughput` (quick). The producer is pinned to the second core, the consumer to the
//! first, as in the latency bench.

#![allow(missing_docs)] // criterion_group! generates undocumented items.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use isolate_cluster::{Cluster, CorePolicy, Event, Mailbox, Properties, WaitStrategy};
use isolate_cluster_benches::{core_pair, pin, Config};

type Cores = [core_affinity::CoreId; 2];

/// What a consumer has received so far, published now and then.
struct Progress {
    count: AtomicU64,
    stop: AtomicBool,
}

impl Progress {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            count: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    /// Waits until the consumer has seen `target` messages.
    fn wait_for(&self, target: u64) {
        while self.count.load(Ordering::Acquire) < target {
            std::hint::spin_loop();
        }
    }
}

/// A producer → consumer pipeline of `[u8; N]` messages.
trait Pipeline {
    /// Sends `n` messages and returns the time until the consumer has them all.
    fn run(&mut self, n: u64) -> Duration;
}

struct RawRtrb<const N: usize> {
    tx: rtrb::Producer<[u8; N]>,
    progress: Arc<Progress>,
    sent: u64,
    consumer: Option<thread::JoinHandle<()>>,
}

impl<const N: usize> RawRtrb<N> {
    fn new(cores: Cores, ring_bytes: usize) -> Self {
        let (tx, mut rx) = rtrb::RingBuffer::<[u8; N]>::new((ring_bytes / N.max(8)).max(2));
        let progress = Progress::new();
        let p = progress.clone();
        let c0 = cores[0];
        let consumer = thread::spawn(move || {
            pin(c0);
            let mut count = 0u64;
            while !p.stop.load(Ordering::Relaxed) {
                match rx.pop() {
                    Ok(v) => {
                        std::hint::black_box(v);
                        count += 1;
                        if count % 64 == 0 {
                            p.count.store(count, Ordering::Release);
                        }
                    }
                    Err(_) => {
                        p.count.store(count, Ordering::Release);
                        std::hint::spin_loop();
                    }
                }
            }
        });
        Self {
            tx,
            progress,
            sent: 0,
            consumer: Some(consumer),
        }
    }
}

impl<const N: usize> Pipeline for RawRtrb<N> {
    fn run(&mut self, n: u64) -> Duration {
        let t = Instant::now();
        for i in 0..n {
            let v = [i as u8; N];
            while self.tx.push(v).is_err() {
                std::hint::spin_loop();
            }
        }
        self.sent += n;
        self.progress.wait_for(self.sent);
        t.elapsed()
    }
}

impl<const N: usize> Drop for RawRtrb<N> {
    fn drop(&mut self) {
        self.progress.stop.store(true, Ordering::Relaxed);
        if let Some(c) = self.consumer.take() {
            let _ = c.join();
        }
    }
}

struct Crossbeam<const N: usize> {
    tx: Option<crossbeam_channel::Sender<[u8; N]>>,
    progress: Arc<Progress>,
    sent: u64,
    consumer: Option<thread::JoinHandle<()>>,
}

impl<const N: usize> Crossbeam<N> {
    fn new(cores: Cores, ring_bytes: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<[u8; N]>((ring_bytes / N.max(8)).max(2));
        let progress = Progress::new();
        let p = progress.clone();
        let c0 = cores[0];
        let consumer = thread::spawn(move || {
            pin(c0);
            let mut count = 0u64;
            while let Ok(v) = rx.recv() {
                std::hint::black_box(v);
                count += 1;
                if count % 64 == 0 || rx.is_empty() {
                    p.count.store(count, Ordering::Release);
                }
            }
        });
        Self {
            tx: Some(tx),
            progress,
            sent: 0,
            consumer: Some(consumer),
        }
    }
}

impl<const N: usize> Pipeline for Crossbeam<N> {
    fn run(&mut self, n: u64) -> Duration {
        let t = Instant::now();
        let tx = self.tx.as_ref().expect("open");
        for i in 0..n {
            tx.send([i as u8; N]).expect("consumer alive");
        }
        self.sent += n;
        self.progress.wait_for(self.sent);
        t.elapsed()
    }
}

impl<const N: usize> Drop for Crossbeam<N> {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(c) = self.consumer.take() {
            let _ = c.join();
        }
    }
}

struct Isolates<const N: usize> {
    cluster: Option<Cluster>,
    mailbox: Option<Mailbox>,
    sink: isolate_cluster::IsolateRef,
    progress: Arc<Progress>,
    sent: u64,
    batch: usize,
}

impl<const N: usize> Isolates<N> {
    fn new(cores: Cores, ring_bytes: usize, batch: usize) -> Self {
        let cluster = Cluster::builder()
            .ring_capacity(ring_bytes)
            .wait_strategy(WaitStrategy::BusySpin)
            .core_policy(CorePolicy::Dedicated)
            .cores(vec![cores[0].id])
            .build();
        let progress = Progress::new();
        let p = progress.clone();
        let sink = cluster
            .spawn("/sink", Properties::new(), move |ctx| {
                let mut count = 0u64;
                loop {
                    match ctx.try_recv() {
                        Some(Event::Message(m)) => {
                            std::hint::black_box(m.bytes());
                            count += 1;
                            if count % 64 == 0 {
                                p.count.store(count, Ordering::Release);
                            }
                        }
                        Some(Event::ShutdownRequested) => break,
                        Some(_) => {}
                        None => {
                            p.count.store(count, Ordering::Release);
                            if ctx.is_finished() {
                                break;
                            }
                            std::hint::spin_loop();
                        }
                    }
                }
                while ctx.recv().is_some() {}
            })
            .expect("spawn sink");
        let mailbox = cluster.mailbox().expect("mailbox");
        Self {
            cluster: Some(cluster),
            mailbox: Some(mailbox),
            sink,
            progress,
            sent: 0,
            batch,
        }
    }
}

impl<const N: usize> Pipeline for Isolates<N> {
    fn run(&mut self, n: u64) -> Duration {
        let mailbox = self.mailbox.as_ref().expect("open");
        let t = Instant::now();
        if self.batch <= 1 {
            for i in 0..n {
                mailbox.send(&self.sink, &[i as u8; N]).expect("send");
            }
        } else {
            let buf = vec![[7u8; N]; self.batch];
            let mut left = n as usize;
            while left > 0 {
                let k = left.min(self.batch);
                mailbox
                    .send_batch(&self.sink, &buf[..k])
                    .expect("send_batch");
                left -= k;
            }
        }
        self.sent += n;
        self.progress.wait_for(self.sent);
        t.elapsed()
    }
}

impl<const N: usize> Drop for Isolates<N> {
    fn drop(&mut self) {
        self.mailbox = None;
        if let Some(c) = self.cluster.take() {
            c.shutdown();
            let _ = c.join(Duration::from_secs(10));
        }
    }
}

/// iceoryx2 publish-subscribe of `u64` that never drops: the publisher retries until the
/// subscriber has room.
fn iceoryx2_8b(cores: Cores, buffer: usize, iters: u64) -> Duration {
    use iceoryx2::prelude::*;
    static RUN: AtomicU64 = AtomicU64::new(0);
    set_log_level(LogLevel::Error);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let name =
        ServiceName::new(&format!("icthroughput/{}/{run}", std::process::id())).expect("name");
    let node = NodeBuilder::new()
        .config(&iceoryx2::config::Config::default())
        .create::<local::Service>()
        .expect("node");
    let service = node
        .service_builder(&name)
        .publish_subscribe::<u64>()
        .max_publishers(1)
        .max_subscribers(1)
        .history_size(0)
        .subscriber_max_buffer_size(buffer)
        .enable_safe_overflow(false)
        .create()
        .expect("service");
    let ready = std::sync::Barrier::new(2);
    let (service, ready) = (&service, &ready);
    thread::scope(|s| {
        s.spawn(move || {
            pin(cores[0]);
            let sub = service.subscriber_builder().create().expect("subscriber");
            ready.wait();
            let mut got = 0u64;
            while got < iters {
                match sub.receive().expect("receive") {
                    Some(sample) => {
                        std::hint::black_box(*sample);
                        got += 1;
                    }
                    None => std::hint::spin_loop(),
                }
            }
        });
        s.spawn(move || {
            pin(cores[1]);
            let publ = service
                .publisher_builder()
                .backpressure_strategy(BackpressureStrategy::RetryUntilDelivered)
                .create()
                .expect("publisher");
            ready.wait();
            let t = Instant::now();
            for i in 0..iters {
                loop {
                    if let Ok(sample) = publ.loan_uninit() {
                        sample.write_payload(i).send().expect("send");
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
            t
        })
        .join()
        .expect("publisher")
    })
    .elapsed()
}

fn sweep<const N: usize>(c: &mut Criterion, cores: Cores) {
    for (ring, bytes) in [("large ring", 1usize << 20), ("tiny ring", 256)] {
        let mut g = c.benchmark_group(format!("one-way {N} B, {ring}"));
        g.throughput(Throughput::Bytes(N as u64));
        let mut run = |name: &str, p: &mut dyn Pipeline| {
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter_custom(|iters| p.run(iters))
            });
        };
        run("raw rtrb", &mut RawRtrb::<N>::new(cores, bytes));
        run("crossbeam-channel", &mut Crossbeam::<N>::new(cores, bytes));
        run("isolate-cluster", &mut Isolates::<N>::new(cores, bytes, 1));
        run(
            "isolate-cluster batched x64",
            &mut Isolates::<N>::new(cores, bytes, 64),
        );
        if N == 8 {
            let buffer = if bytes > 256 { 4096 } else { 4 };
            g.bench_function(BenchmarkId::from_parameter("iceoryx2"), |b| {
                b.iter_custom(|iters| iceoryx2_8b(cores, buffer, iters))
            });
        }
        g.finish();
    }
}

fn throughput(c: &mut Criterion) {
    let Some(cores) = core_pair() else {
        println!("the throughput bench needs two cores");
        return;
    };
    pin(cores[1]);
    println!(
        "producer pinned to core {}, consumer to core {}",
        cores[1].id, cores[0].id
    );
    sweep::<8>(c, cores);
    sweep::<64>(c, cores);
    sweep::<256>(c, cores);
    sweep::<4096>(c, cores);
}

fn config() -> Criterion {
    let c = Criterion::default().configure_from_args();
    if Config::from_env().quick {
        c.sample_size(10)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300))
    } else {
        c.sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = throughput
}
criterion_main!(benches);
