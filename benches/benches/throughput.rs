//! One-way throughput of isolate-cluster against raw `rtrb`, `crossbeam-channel` and
//! iceoryx2: messages/s and bytes/s over the payload sweep — copies of 8 B, 64 B, 256 B
//! and 4 KiB, and transfers (ownership moves) of 64 KiB, 1 MiB and 16 MiB — through a
//! large ring (no contention) and a tiny ring (maximum contention), with and without
//! batching.
//!
//! `cargo bench --bench throughput` (full: 64 cases of about 3 s each, under 5 minutes);
//! `IC_BENCH_QUICK=1 cargo bench --bench throughput` (quick: about 35 s). The producer is pinned to the second core,
//! the consumer to the first, as in the latency bench. After criterion's own output, a
//! table of messages/s and bytes/s per case (from the samples criterion timed, its
//! warm-up left out) is printed and written to `target/bench-report/throughput-<unix
//! seconds>/REPORT.md`.

#![allow(missing_docs)] // criterion_group! generates undocumented items.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use isolate_cluster::{Cluster, CorePolicy, Event, Mailbox, Properties, WaitStrategy};
use isolate_cluster_benches::report::{self, ThroughputRow};
use isolate_cluster_benches::{core_pair, cpu_model, pin, Config};

#[path = "throughput/transfer.rs"]
mod transfer;
use transfer::{Bank, TransferCrossbeam, TransferIsolates, TransferRtrb};

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

/// The consumer thread of a raw `rtrb` pipeline, pinned to `core`: pops every value into
/// `handle` and publishes the count to `p` (every 64 values, and whenever the ring is
/// empty) until told to stop.
fn rtrb_consumer<T: Send + 'static>(
    core: core_affinity::CoreId,
    mut rx: rtrb::Consumer<T>,
    p: Arc<Progress>,
    mut handle: impl FnMut(T) + Send + 'static,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        pin(core);
        let mut count = 0u64;
        while !p.stop.load(Ordering::Relaxed) {
            match rx.pop() {
                Ok(v) => {
                    handle(v);
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
    })
}

/// The consumer thread of a `crossbeam-channel` pipeline, pinned to `core`: receives every
/// value into `handle` and publishes the count to `p` (every 64 values, and whenever the
/// channel is empty) until the sender is dropped.
fn channel_consumer<T: Send + 'static>(
    core: core_affinity::CoreId,
    rx: crossbeam_channel::Receiver<T>,
    p: Arc<Progress>,
    mut handle: impl FnMut(T) + Send + 'static,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        pin(core);
        let mut count = 0u64;
        while let Ok(v) = rx.recv() {
            handle(v);
            count += 1;
            if count % 64 == 0 || rx.is_empty() {
                p.count.store(count, Ordering::Release);
            }
        }
    })
}

/// The receive loop of a sink isolate: hands every message to `handle` (a run of them per
/// call with `batch`) and publishes the count to `p` (every 64 messages, and whenever the
/// inbox is empty) until the node shuts down.
fn sink_loop(
    ctx: &isolate_cluster::Context,
    p: &Progress,
    batch: bool,
    mut handle: impl FnMut(&mut isolate_cluster::Message<'_>),
) {
    let mut count = 0u64;
    loop {
        if batch {
            let n = ctx.try_recv_batch(256, |m| handle(m));
            if n > 0 {
                count += n as u64;
                p.count.store(count, Ordering::Release);
                continue;
            }
        }
        match ctx.try_recv() {
            Some(Event::Message(mut m)) => {
                handle(&mut m);
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
    fn new(cores: Cores, messages: usize) -> Self {
        let (tx, rx) = rtrb::RingBuffer::<[u8; N]>::new(messages);
        let progress = Progress::new();
        let consumer = rtrb_consumer(cores[0], rx, progress.clone(), |v| {
            std::hint::black_box(v);
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
    fn new(cores: Cores, messages: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<[u8; N]>(messages);
        let progress = Progress::new();
        let consumer = channel_consumer(cores[0], rx, progress.clone(), |v| {
            std::hint::black_box(v);
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
    fn new(cores: Cores, messages: usize, batch: usize) -> Self {
        // A frame is a 32-byte header and the payload, in whole 64-byte cells; a large
        // ring gets the same 1 MiB of memory as its peers', a tiny one room for 4 frames.
        let frame_bytes = (32 + N).div_ceil(64) * 64;
        let bytes = if messages > 4 {
            LARGE_RING_BYTES
        } else {
            messages * frame_bytes
        };
        let cluster = Cluster::builder()
            .ring_capacity(bytes)
            .wait_strategy(WaitStrategy::BusySpin)
            .core_policy(CorePolicy::Dedicated)
            .cores(vec![cores[0].id])
            .build();
        let progress = Progress::new();
        let p = progress.clone();
        let sink = cluster
            .spawn("/sink", Properties::new(), move |ctx| {
                // Touch every cache line of the payload, as a real consumer would (the
                // other peers copy each message out whole).
                let touch = |m: &isolate_cluster::Message<'_>| {
                    let b = m.bytes();
                    let mut x = 0u8;
                    for i in (0..b.len()).step_by(64) {
                        x ^= b[i];
                    }
                    std::hint::black_box(x);
                };
                // With batching, the receive side batches too: a whole run of messages
                // per call and per ring index update.
                sink_loop(ctx, &p, batch > 1, |m| touch(m));
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

/// iceoryx2 publish-subscribe of `[u8; N]` that never drops: the publisher retries until
/// the subscriber has room. Ports live on their own threads (they are not `Send`); the
/// bench thread tells the publisher how many to send and waits for the subscriber's count.
struct Iceoryx2<const N: usize> {
    orders: Option<std::sync::mpsc::Sender<u64>>,
    done: std::sync::mpsc::Receiver<()>,
    progress: Arc<Progress>,
    sent: u64,
    threads: Vec<thread::JoinHandle<()>>,
}

impl<const N: usize> Iceoryx2<N> {
    fn new(cores: Cores, buffer: usize) -> Self {
        use iceoryx2::prelude::*;
        static RUN: AtomicU64 = AtomicU64::new(0);
        set_log_level(LogLevel::Error);
        let run = RUN.fetch_add(1, Ordering::Relaxed);
        let name = format!("icthroughput/{}/{run}", std::process::id());
        let progress = Progress::new();
        let (orders, rx) = std::sync::mpsc::channel::<u64>();
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let ready = Arc::new(std::sync::Barrier::new(2));
        // One node and service per thread pair, created on the subscriber's thread; the
        // publisher opens the same service by name.
        let (p, r, n) = (progress.clone(), ready.clone(), name.clone());
        let sub = thread::spawn(move || {
            pin(cores[0]);
            let node = NodeBuilder::new()
                .config(&iceoryx2::config::Config::default())
                .create::<local::Service>()
                .expect("node");
            let service = node
                .service_builder(&ServiceName::new(&n).expect("name"))
                .publish_subscribe::<[u8; N]>()
                .max_publishers(1)
                .max_subscribers(1)
                .history_size(0)
                .subscriber_max_buffer_size(buffer)
                .enable_safe_overflow(false)
                .create()
                .expect("service");
            let sub = service.subscriber_builder().create().expect("subscriber");
            r.wait();
            let mut count = 0u64;
            while !p.stop.load(Ordering::Relaxed) {
                match sub.receive().expect("receive") {
                    Some(sample) => {
                        std::hint::black_box(*sample);
                        count += 1;
                        if count % 64 == 0 {
                            p.count.store(count, Ordering::Release);
                        }
                    }
                    None => {
                        p.count.store(count, Ordering::Release);
                        std::hint::spin_loop();
                    }
                }
            }
        });
        ready.wait();
        let publ = thread::spawn(move || {
            pin(cores[1]);
            let node = NodeBuilder::new()
                .config(&iceoryx2::config::Config::default())
                .create::<local::Service>()
                .expect("node");
            let service = node
                .service_builder(&ServiceName::new(&name).expect("name"))
                .publish_subscribe::<[u8; N]>()
                .open()
                .expect("open service");
            let publ = service
                .publisher_builder()
                .backpressure_strategy(BackpressureStrategy::RetryUntilDelivered)
                .create()
                .expect("publisher");
            let mut i = 0u64;
            while let Ok(n) = rx.recv() {
                for _ in 0..n {
                    loop {
                        if let Ok(sample) = publ.loan_uninit() {
                            sample.write_payload([i as u8; N]).send().expect("send");
                            break;
                        }
                        std::hint::spin_loop();
                    }
                    i += 1;
                }
                let _ = done_tx.send(());
            }
        });
        Self {
            orders: Some(orders),
            done,
            progress,
            sent: 0,
            threads: vec![sub, publ],
        }
    }
}

impl<const N: usize> Pipeline for Iceoryx2<N> {
    fn run(&mut self, n: u64) -> Duration {
        let t = Instant::now();
        self.orders
            .as_ref()
            .expect("open")
            .send(n)
            .expect("publisher alive");
        // Sleep (do not spin: the publisher shares this thread's core) until it is done.
        self.done.recv().expect("publisher alive");
        self.sent += n;
        self.progress.wait_for(self.sent);
        t.elapsed()
    }
}

impl<const N: usize> Drop for Iceoryx2<N> {
    fn drop(&mut self) {
        self.orders = None;
        self.progress.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Memory of a large ring, for every peer.
const LARGE_RING_BYTES: usize = 1 << 20;

/// Criterion samples per case (its warm-up calls come before them).
fn sample_size() -> usize {
    if Config::from_env().quick {
        10
    } else {
        20
    }
}

/// What the timed samples of every case moved, in the order the cases ran.
static ROWS: Mutex<Vec<ThroughputRow>> = Mutex::new(Vec::new());

/// Runs `p` as the criterion benchmark `peer` of `g`, and keeps the messages and the time
/// of the samples criterion timed (the last `sample_size` calls; the warm-up's came
/// first) for the summary.
fn measure(
    g: &mut BenchmarkGroup<'_, WallTime>,
    (group, peer): (&str, &str),
    (bytes, moved): (usize, bool),
    p: &mut dyn Pipeline,
) {
    let mut calls: Vec<(u64, Duration)> = Vec::new();
    g.bench_function(BenchmarkId::from_parameter(peer), |b| {
        b.iter_custom(|iters| {
            let d = p.run(iters);
            calls.push((iters, d));
            d
        })
    });
    let timed = &calls[calls.len().saturating_sub(sample_size())..];
    if timed.is_empty() {
        return; // filtered out on the command line
    }
    ROWS.lock().expect("rows").push(ThroughputRow {
        group: group.to_owned(),
        peer: peer.to_owned(),
        bytes,
        moved,
        messages: timed.iter().map(|(n, _)| n).sum(),
        time: timed.iter().map(|(_, d)| *d).sum(),
    });
}

/// Copy sends of `[u8; N]` through every peer, over a large and a tiny ring.
fn copy_sweep<const N: usize>(c: &mut Criterion, cores: Cores) {
    // A large ring is 1 MiB of ring memory (no contention); a tiny one holds 4 messages.
    let large = (LARGE_RING_BYTES / N).max(8);
    for (ring, messages) in [("large ring, 1 MiB", large), ("tiny ring, 4 messages", 4)] {
        let group = format!("one-way {N} B, {ring}");
        let mut g = c.benchmark_group(&group);
        g.throughput(Throughput::Bytes(N as u64));
        let mut run =
            |peer: &str, p: &mut dyn Pipeline| measure(&mut g, (&group, peer), (N, false), p);
        run("raw rtrb", &mut RawRtrb::<N>::new(cores, messages));
        run(
            "crossbeam-channel",
            &mut Crossbeam::<N>::new(cores, messages),
        );
        run(
            "isolate-cluster",
            &mut Isolates::<N>::new(cores, messages, 1),
        );
        run(
            "isolate-cluster batched x64",
            &mut Isolates::<N>::new(cores, messages, 64),
        );
        // The publisher's thread is pinned to the producer core, so the bench thread only
        // hands it the count: iceoryx2's figure includes no extra hop per message.
        run(
            "iceoryx2",
            &mut Iceoryx2::<N>::new(cores, messages.min(4096)),
        );
        g.finish();
    }
}

/// Transfers (ownership moves) of `size`-byte buffers through every peer that can move a
/// value, over a ring of a few hundred slots and one of 4. Every peer recycles its
/// buffers through the same return path (an `rtrb` ring back to the producer).
fn transfer_sweep(c: &mut Criterion, cores: Cores, size: usize, label: &str) {
    let bank = Bank::new(size);
    for (ring, slots) in [("large ring, 256 slots", 256), ("tiny ring, 4 slots", 4)] {
        let group = format!("one-way transfer {label}, {ring}");
        let mut g = c.benchmark_group(&group);
        g.throughput(Throughput::Elements(1));
        let mut run =
            |peer: &str, p: &mut dyn Pipeline| measure(&mut g, (&group, peer), (size, true), p);
        run(
            "raw rtrb, Vec<u8>",
            &mut TransferRtrb::new(cores, slots, &bank),
        );
        run(
            "crossbeam-channel, Vec<u8>",
            &mut TransferCrossbeam::new(cores, slots, &bank),
        );
        run(
            "isolate-cluster transfer",
            &mut TransferIsolates::new(cores, slots, &bank, false),
        );
        run(
            "isolate-cluster transfer, try_recv_batch",
            &mut TransferIsolates::new(cores, slots, &bank, true),
        );
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
    copy_sweep::<8>(c, cores);
    copy_sweep::<64>(c, cores);
    copy_sweep::<256>(c, cores);
    copy_sweep::<4096>(c, cores);
    transfer_sweep(c, cores, 64 << 10, "64 KiB");
    transfer_sweep(c, cores, 1 << 20, "1 MiB");
    transfer_sweep(c, cores, 16 << 20, "16 MiB");
}

fn config() -> Criterion {
    let c = Criterion::default()
        .sample_size(sample_size())
        .configure_from_args();
    if Config::from_env().quick {
        c.warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300))
    } else {
        c.warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = throughput
}

/// Criterion's runs, then the summary: messages/s and bytes/s of every case, printed and
/// written to a report folder.
fn main() {
    let started = Instant::now();
    benches();
    Criterion::default().configure_from_args().final_summary();
    let rows = std::mem::take(&mut *ROWS.lock().expect("rows"));
    if rows.is_empty() {
        return;
    }
    let cfg = Config::from_env();
    let cores = core_pair().map_or_else(String::new, |c| {
        format!(
            "; producer pinned to core {}, consumer to core {}",
            c[1].id, c[0].id
        )
    });
    let mut md = String::from("# isolate-cluster throughput report\n\n");
    let _ = writeln!(
        md,
        "Machine: {}{cores}. Mode: {}, criterion with {} samples per case. One-way messages/s: the messages of the samples criterion timed over their time (its warm-up left out); bytes/s: that times the payload (for transfers, the bytes whose ownership moved; nothing is copied). Ratios compare cases of this same run.\n",
        cpu_model(),
        if cfg.quick { "quick" } else { "full" },
        sample_size(),
    );
    md.push_str(&report::throughput_table(&rows));
    println!("\n{md}");
    match report::new_named_dir("throughput") {
        Ok(dir) => {
            let path = dir.join("REPORT.md");
            match std::fs::write(&path, &md) {
                Ok(()) => println!("report: {}", path.display()),
                Err(e) => println!("could not write {}: {e}", path.display()),
            }
        }
        Err(e) => println!("could not create the report folder: {e}"),
    }
    println!("took {:.1?}", started.elapsed());
}
