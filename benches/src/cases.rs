//! The latency cases: each runs a ping-pong on the pinned core pair and returns the
//! histogram of round trips measured on the ping side.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use isolate_cluster::{Cluster, Context, CorePolicy, Event, Payload, Properties, WaitStrategy};

use crate::report::Case;
use crate::{
    cpu_time, histogram, pin, record, record_since, rss_bytes, spin_until, Config, Dither,
};

type Cores = [core_affinity::CoreId; 2];

/// Runs `pong` pinned to core 0 and `ping` pinned to core 1; returns ping's histogram.
fn pair<P, Q>(cores: Cores, pong: P, ping: Q) -> Histogram<u64>
where
    P: FnOnce() + Send + 'static,
    Q: FnOnce() -> Histogram<u64> + Send + 'static,
{
    let c0 = cores[0];
    let c1 = cores[1];
    let pong = thread::spawn(move || {
        pin(c0);
        pong()
    });
    let ping = thread::spawn(move || {
        pin(c1);
        ping()
    });
    let h = ping.join().expect("ping side");
    pong.join().expect("pong side");
    h
}

/// The floor: two threads handing one atomic word back and forth.
pub fn floor(cfg: Config, cores: Cores) -> Histogram<u64> {
    let turn = Arc::new(AtomicU64::new(0));
    let t2 = turn.clone();
    let n = (cfg.warmup + cfg.samples) as u64;
    pair(
        cores,
        move || {
            for i in 0..n {
                while t2.load(Ordering::Acquire) != 2 * i + 1 {
                    std::hint::spin_loop();
                }
                t2.store(2 * i + 2, Ordering::Release);
            }
        },
        move || {
            let mut h = histogram();
            let mut d = Dither::new(cfg.dither);
            for i in 0..n {
                d.pause();
                let t = Instant::now();
                turn.store(2 * i + 1, Ordering::Release);
                while turn.load(Ordering::Acquire) != 2 * i + 2 {
                    std::hint::spin_loop();
                }
                if i as usize >= cfg.warmup {
                    record_since(&mut h, t);
                }
            }
            h
        },
    )
}

/// The pong side of a raw `rtrb` ping-pong: echoes `n` values, spinning.
fn rtrb_echo(n: u64, mut rx: rtrb::Consumer<u64>, mut tx: rtrb::Producer<u64>) {
    for _ in 0..n {
        let v = loop {
            match rx.pop() {
                Ok(v) => break v,
                Err(_) => std::hint::spin_loop(),
            }
        };
        while tx.push(v).is_err() {}
    }
}

/// Raw `rtrb`: a ring each way, spinning on `pop`.
pub fn raw_rtrb(cfg: Config, cores: Cores) -> Histogram<u64> {
    let (mut to_pong, from_ping) = rtrb::RingBuffer::<u64>::new(4096);
    let (to_ping, mut from_pong) = rtrb::RingBuffer::<u64>::new(4096);
    let n = (cfg.warmup + cfg.samples) as u64;
    pair(
        cores,
        move || rtrb_echo(n, from_ping, to_ping),
        move || {
            let mut h = histogram();
            let mut d = Dither::new(cfg.dither);
            for i in 0..n {
                d.pause();
                let t = Instant::now();
                while to_pong.push(i).is_err() {}
                loop {
                    match from_pong.pop() {
                        Ok(v) => {
                            debug_assert_eq!(v, i);
                            break;
                        }
                        Err(_) => std::hint::spin_loop(),
                    }
                }
                if i as usize >= cfg.warmup {
                    record_since(&mut h, t);
                }
            }
            h
        },
    )
}

/// A ping-pong over two blocking channels: `send` and `recv` adapt the channel type.
fn channel_pair<S, R>(
    cores: Cores,
    (warmup, samples, dither): (usize, usize, bool),
    (to_pong, from_ping): (S, R),
    (to_ping, from_pong): (S, R),
    send: fn(&S, u64),
    recv: fn(&R) -> u64,
) -> Histogram<u64>
where
    S: Send + 'static,
    R: Send + 'static,
{
    let n = (warmup + samples) as u64;
    pair(
        cores,
        move || {
            for _ in 0..n {
                send(&to_ping, recv(&from_ping));
            }
        },
        move || {
            let mut h = histogram();
            let mut d = Dither::new(dither);
            for i in 0..n {
                d.pause();
                let t = Instant::now();
                send(&to_pong, i);
                recv(&from_pong);
                if i as usize >= warmup {
                    record_since(&mut h, t);
                }
            }
            h
        },
    )
}

/// `crossbeam-channel` bounded, blocking `recv` (spins, then blocks).
pub fn crossbeam(cfg: Config, cores: Cores) -> Histogram<u64> {
    channel_pair(
        cores,
        (cfg.warmup, cfg.samples, cfg.dither),
        crossbeam_channel::bounded::<u64>(1024),
        crossbeam_channel::bounded::<u64>(1024),
        |tx, v| tx.send(v).expect("peer alive"),
        |rx| rx.recv().expect("peer alive"),
    )
}

/// `std::sync::mpsc::sync_channel`, blocking `recv`.
pub fn std_mpsc(cfg: Config, cores: Cores) -> Histogram<u64> {
    channel_pair(
        cores,
        (cfg.warmup, cfg.samples, cfg.dither),
        std::sync::mpsc::sync_channel::<u64>(1024),
        std::sync::mpsc::sync_channel::<u64>(1024),
        |tx, v| tx.send(v).expect("peer alive"),
        |rx| rx.recv().expect("peer alive"),
    )
}

/// Two threads that park until the other unparks them (a futex wake each way).
pub fn park_unpark(cfg: Config, cores: Cores) -> Histogram<u64> {
    let (warmup, samples) = (cfg.warmup, cfg.samples);
    let n = (warmup + samples) as u64;
    let turn = Arc::new(AtomicU64::new(0));
    let ping_thread: Arc<std::sync::OnceLock<thread::Thread>> =
        Arc::new(std::sync::OnceLock::new());
    let pong_thread: Arc<std::sync::OnceLock<thread::Thread>> =
        Arc::new(std::sync::OnceLock::new());
    let (t2, pi2, po2) = (turn.clone(), ping_thread.clone(), pong_thread.clone());
    let ready = Arc::new(AtomicBool::new(false));
    let r2 = ready.clone();
    pair(
        cores,
        move || {
            let _ = po2.set(thread::current());
            r2.store(true, Ordering::Release);
            for i in 0..n {
                while t2.load(Ordering::Acquire) != 2 * i + 1 {
                    thread::park();
                }
                t2.store(2 * i + 2, Ordering::Release);
                if let Some(p) = pi2.get() {
                    p.unpark();
                }
            }
        },
        move || {
            let _ = ping_thread.set(thread::current());
            while !ready.load(Ordering::Acquire) {
                thread::yield_now();
            }
            let pong = pong_thread.get().expect("pong registered").clone();
            let mut h = histogram();
            for i in 0..n {
                let t = Instant::now();
                turn.store(2 * i + 1, Ordering::Release);
                pong.unpark();
                while turn.load(Ordering::Acquire) != 2 * i + 2 {
                    thread::park();
                }
                if i as usize >= warmup {
                    record_since(&mut h, t);
                }
            }
            h
        },
    )
}

fn cluster(cores: Cores, wait: WaitStrategy) -> Cluster {
    Cluster::builder()
        .wait_strategy(wait)
        .core_policy(CorePolicy::Dedicated)
        .cores(vec![cores[0].id, cores[1].id])
        .ring_capacity(64 << 10)
        .build()
}

/// Spawns `/pong` (core 0, replies with what it got) and `/ping` (core 1, runs `ping` and
/// hands its histogram back with `exit`).
fn isolate_pair<F>(cluster: &Cluster, echo: fn(&Context), ping: F) -> Histogram<u64>
where
    F: FnOnce(&Context, &isolate_cluster::IsolateRef) -> Histogram<u64> + Send + 'static,
{
    let pong = cluster
        .spawn("/pong", Properties::new(), echo)
        .expect("spawn pong");
    let ping = cluster
        .spawn("/ping", Properties::new(), move |ctx| {
            let h = ping(ctx, &pong);
            ctx.exit(Box::new(h))
        })
        .expect("spawn ping");
    let h = ping
        .join_exit::<Histogram<u64>>(Duration::from_secs(600))
        .expect("ping's histogram");
    cluster.shutdown();
    cluster
        .join(Duration::from_secs(10))
        .expect("isolates stop");
    *h
}

/// isolate-cluster copy sends of `value`'s type, spinning receivers.
pub fn copy<T>(cfg: Config, cores: Cores, value: T) -> Histogram<u64>
where
    T: Payload + Send + isolate_cluster::rkyv::Archive,
    T::Archived: isolate_cluster::rkyv::Portable,
{
    let cluster = cluster(cores, WaitStrategy::BusySpin);
    isolate_pair(&cluster, echo_bytes, move |ctx, pong| {
        let mut h = histogram();
        let mut d = Dither::new(cfg.dither);
        for i in 0..cfg.warmup + cfg.samples {
            d.pause();
            let t = Instant::now();
            ctx.send(pong, &value).expect("send");
            match ctx.recv() {
                Some(Event::Message(m)) => {
                    debug_assert_eq!(m.tag(), isolate_cluster::type_tag::<T>())
                }
                other => panic!("unexpected {other:?}"),
            }
            if i >= cfg.warmup {
                record_since(&mut h, t);
            }
        }
        h
    })
}

/// Replies with the same bytes and tag (works for any copy payload).
fn echo_bytes(ctx: &Context) {
    while let Some(ev) = ctx.recv() {
        if let Event::Message(m) = ev {
            m.reply_bytes(m.tag(), m.bytes()).expect("reply");
        }
    }
}

/// isolate-cluster transfer sends of a `size`-byte buffer moved back and forth.
pub fn transfer(cfg: Config, cores: Cores, size: usize) -> Histogram<u64> {
    let cluster = cluster(cores, WaitStrategy::BusySpin);
    let echo: fn(&Context) = |ctx| {
        while let Some(ev) = ctx.recv() {
            if let Event::Message(mut m) = ev {
                let v = m.take::<Vec<u8>>().expect("a Vec<u8>");
                m.reply_transfer(v).expect("reply");
            }
        }
    };
    isolate_pair(&cluster, echo, move |ctx, pong| {
        let mut h = histogram();
        let mut buf = Box::new(vec![1u8; size]);
        let mut d = Dither::new(cfg.dither);
        for i in 0..cfg.warmup + cfg.samples {
            d.pause();
            let t = Instant::now();
            ctx.transfer(pong, buf).expect("transfer");
            buf = match ctx.recv() {
                Some(Event::Message(mut m)) => m.take::<Vec<u8>>().expect("the buffer back"),
                other => panic!("unexpected {other:?}"),
            };
            if i >= cfg.warmup {
                record_since(&mut h, t);
            }
        }
        h
    })
}

/// isolate-cluster with receivers that park as soon as they are idle.
pub fn parked(cfg: Config, cores: Cores) -> Histogram<u64> {
    let cluster = cluster(
        cores,
        WaitStrategy::SpinThenPark {
            spin: Duration::ZERO,
        },
    );
    let (warmup, samples) = (cfg.warmup, cfg.samples);
    isolate_pair(&cluster, echo_bytes, move |ctx, pong| {
        let mut h = histogram();
        for i in 0..warmup + samples {
            let t = Instant::now();
            ctx.send(pong, &(i as u64)).expect("send");
            match ctx.recv() {
                Some(Event::Message(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
            if i >= warmup {
                record_since(&mut h, t);
            }
        }
        h
    })
}

/// isolate-cluster (default wait strategy) at a fixed rate, timed from the intended send.
/// Below 20k/s the interval is longer than the default 50 µs spin, so the receiver parks
/// between messages and every sample includes its wake-up.
pub fn fixed_rate(cfg: Config, cores: Cores, per_sec: u64) -> Histogram<u64> {
    let cluster = cluster(cores, WaitStrategy::default());
    let (warmup, samples) = (cfg.warmup, cfg.samples);
    isolate_pair(&cluster, echo_bytes, move |ctx, pong| {
        let mut h = histogram();
        let interval = Duration::from_nanos(1_000_000_000 / per_sec);
        let start = Instant::now();
        for i in 0..warmup + samples {
            let intended = start + interval * i as u32;
            spin_until(intended);
            ctx.send(pong, &(i as u64)).expect("send");
            match ctx.recv() {
                Some(Event::Message(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
            if i >= warmup {
                record(&mut h, intended.elapsed());
            }
        }
        h
    })
}

/// Raw `rtrb` at a fixed rate, timed from the intended send.
pub fn fixed_rate_rtrb(cfg: Config, cores: Cores, per_sec: u64) -> Histogram<u64> {
    let (mut to_pong, from_ping) = rtrb::RingBuffer::<u64>::new(4096);
    let (to_ping, mut from_pong) = rtrb::RingBuffer::<u64>::new(4096);
    let (warmup, samples) = (cfg.warmup, cfg.samples);
    let n = warmup + samples;
    pair(
        cores,
        move || rtrb_echo(n as u64, from_ping, to_ping),
        move || {
            let mut h = histogram();
            let interval = Duration::from_nanos(1_000_000_000 / per_sec);
            let start = Instant::now();
            for i in 0..n {
                let intended = start + interval * i as u32;
                spin_until(intended);
                while to_pong.push(i as u64).is_err() {}
                while from_pong.pop().is_err() {
                    std::hint::spin_loop();
                }
                if i >= warmup {
                    record(&mut h, intended.elapsed());
                }
            }
            h
        },
    )
}

/// The scale run: random meshes of 2..64 isolates on this machine's cores, memory, and the
/// CPU use of idle isolates. Returns a markdown section and the idle-CPU target line (for
/// the report's targets).
///
/// Rates and the share of full rings come from the cluster's own counters
/// ([`Cluster::stats`]) at go and at stop; ring occupancy from each isolate's
/// [`link_occupancy`](isolate_cluster::Inbox::link_occupancy) the moment it sees stop.
pub fn scale(cfg: Config) -> (String, String) {
    let mut md = String::from(
        "## Scale: random meshes, memory, idle isolates

",
    );
    let _ = writeln!(
        md,
        "Each isolate sends 8-byte values to 4 random peers (all of them if fewer), 64 `try_send`s then draining its inbox, in a loop; 64 KiB rings. Messages/s and the share of `try_send`s that found the ring full (`full` / (`sent` + `full`)) come from `Cluster::stats()` taken at go and at stop; ring occupancy from every isolate's `link_occupancy()` the moment it sees stop (before anyone drains). RSS per ring: RSS growth from idle to busy (rings are allocated at the first send and touched over their whole length) over the links; free memory is handed back to the system (`malloc_trim`) before each RSS reading.\n"
    );
    let _ = writeln!(
        md,
        "| isolates | links | messages/s (all isolates) | `try_send`s finding the ring full | ring occupancy at stop, mean / max | heap per isolate | heap per ring (64 KiB rings) | RSS growth per isolate | RSS per ring |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let run_for = if cfg.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(2)
    };
    for n in [2usize, 8, 32, 64] {
        let m = mesh(n, run_for);
        let _ = writeln!(
            md,
            "| {n} | {} | {:.2} M | {:.1} % | {:.1} % / {:.1} % | {:.1} KiB | {:.1} KiB | {:.0} KiB | {:.1} KiB |",
            m.links,
            m.rate / 1e6,
            100.0 * m.full_share,
            100.0 * m.occupancy_mean,
            100.0 * m.occupancy_max,
            m.heap_per_isolate / 1024.0,
            m.heap_per_ring / 1024.0,
            m.rss_per_isolate / 1024.0,
            m.rss_per_ring / 1024.0
        );
    }
    let idle_for = if cfg.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let (cpu, wall) = idle_cpu(64, idle_for);
    let share = 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
    let _ = writeln!(
        md,
        "\n64 idle isolates (parked, default wait strategy): {:.1} ms of CPU over {:.1} s ({share:.3} % of one core).\n",
        cpu.as_secs_f64() * 1e3,
        wall.as_secs_f64(),
    );
    // "No measurable CPU": under a thousandth of a core (the process's own timers and
    // this thread's sleeps included).
    let target = IDLE_CPU_TARGET_PERCENT;
    let verdict = if share < target { "met" } else { "missed" };
    let line = format!(
        "- 64 idle isolates, CPU over {:.0} s: {share:.3} % of one core (target: < {target} % of one core) — {verdict}",
        wall.as_secs_f64()
    );
    (md, line)
}

/// The idle-CPU target: 64 parked isolates use less than this share of one core.
const IDLE_CPU_TARGET_PERCENT: f64 = 0.1;

/// What one mesh run measured.
struct Mesh {
    /// Messages received per second by all isolates together (engine counters).
    rate: f64,
    links: usize,
    /// `try_send`s that found the ring full, over all `try_send`s (engine counters).
    full_share: f64,
    /// Mean and max bytes used over capacity, over every link, at stop.
    occupancy_mean: f64,
    occupancy_max: f64,
    heap_per_isolate: f64,
    heap_per_ring: f64,
    rss_per_isolate: f64,
    rss_per_ring: f64,
}

/// Hands the allocator's free memory back to the system, so that memory freed by earlier
/// cases (still resident) does not hide the growth of the RSS that follows.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free pages of glibc's arenas; it touches no
    // memory that is allocated.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sums of the counters the scale run reads: (received, sent, full).
fn totals(stats: &isolate_cluster::Stats) -> (u64, u64, u64) {
    stats.endpoints.iter().fold((0, 0, 0), |(r, s, f), e| {
        (r + e.received, s + e.sent, f + e.full)
    })
}

/// `n` isolates, each sending to 4 random peers (or all, if fewer) for `run_for`.
fn mesh(n: usize, run_for: Duration) -> Mesh {
    use std::sync::{Barrier, Mutex};
    let ring = 64 << 10;
    let cluster = Cluster::builder()
        .ring_capacity(ring)
        .core_policy(CorePolicy::Shared)
        .build();
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    // Every link's used / capacity at stop, and a barrier that holds every isolate's
    // draining until all have taken theirs (each isolate runs on its own thread).
    let occupancy = Arc::new(Mutex::new(Vec::<f64>::new()));
    let sampled = Arc::new(Barrier::new(n));
    release_free_memory();
    let before = rss_bytes();
    let heap_before = crate::live_heap_bytes();
    let fanout = 4.min(n - 1);
    for i in 0..n {
        let (stop, go) = (stop.clone(), go.clone());
        let (occupancy, sampled) = (occupancy.clone(), sampled.clone());
        cluster
            .spawn(&format!("/mesh/{i}"), Properties::new(), move |ctx| {
                while !go.load(Ordering::Acquire) {
                    if ctx.recv_timeout(Duration::from_millis(1)).is_some() {
                        // Nothing is sent before `go`.
                    }
                }
                let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ i as u64;
                let mut next = || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                let mut peers = Vec::new();
                while peers.len() < fanout {
                    let j = (next() % n as u64) as usize;
                    if j != i
                        && !peers
                            .iter()
                            .any(|p: &isolate_cluster::IsolateRef| p.path() == format!("/mesh/{j}"))
                    {
                        if let Ok(r) = ctx.lookup(&format!("/mesh/{j}")) {
                            peers.push(r);
                        }
                    }
                }
                let mut k = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        let _ = ctx.try_send(&peers[k % fanout], &(k as u64));
                        k += 1;
                    }
                    while ctx.try_recv().is_some() {}
                }
                let links: Vec<f64> = ctx
                    .link_occupancy()
                    .into_iter()
                    .map(|(_, used, capacity)| used as f64 / capacity.max(1) as f64)
                    .collect();
                occupancy.lock().expect("occupancy").extend(links);
                sampled.wait();
                while ctx.recv().is_some() {}
            })
            .expect("spawn");
    }
    thread::sleep(Duration::from_millis(50));
    release_free_memory();
    let idle = rss_bytes();
    let heap_idle = crate::live_heap_bytes();
    let at_go = totals(&cluster.stats());
    let t = Instant::now();
    go.store(true, Ordering::Release);
    thread::sleep(run_for);
    let at_stop = totals(&cluster.stats());
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    thread::sleep(Duration::from_millis(20));
    let heap_busy = crate::live_heap_bytes();
    let busy = rss_bytes();
    cluster.shutdown();
    cluster.join(Duration::from_secs(30)).expect("mesh stops");
    let links = n * fanout;
    let occupancy = occupancy.lock().expect("occupancy").clone();
    let (received, sent, full) = (
        at_stop.0 - at_go.0,
        at_stop.1 - at_go.1,
        at_stop.2 - at_go.2,
    );
    Mesh {
        rate: received as f64 / elapsed.as_secs_f64(),
        links,
        // Every send here is a `try_send`: one that finds the ring full counts in `full`
        // only, one that goes through in `sent` only.
        full_share: full as f64 / (sent + full).max(1) as f64,
        occupancy_mean: occupancy.iter().sum::<f64>() / occupancy.len().max(1) as f64,
        occupancy_max: occupancy.iter().copied().fold(0.0, f64::max),
        heap_per_isolate: (heap_idle - heap_before) as f64 / n as f64,
        heap_per_ring: (heap_busy - heap_idle) as f64 / links as f64,
        rss_per_isolate: idle.saturating_sub(before) as f64 / n as f64,
        rss_per_ring: busy.saturating_sub(idle) as f64 / links as f64,
    }
}

/// CPU time used by the process while `n` isolates sit idle for `d`.
fn idle_cpu(n: usize, d: Duration) -> (Duration, Duration) {
    let cluster = Cluster::single_node();
    for i in 0..n {
        cluster
            .spawn(&format!("/idle/{i}"), Properties::new(), |ctx| {
                while ctx.recv().is_some() {}
            })
            .expect("spawn");
    }
    thread::sleep(Duration::from_millis(200));
    let c0 = cpu_time();
    let t0 = Instant::now();
    thread::sleep(d);
    let cpu = cpu_time() - c0;
    let wall = t0.elapsed();
    cluster.shutdown();
    cluster
        .join(Duration::from_secs(10))
        .expect("idle isolates stop");
    (cpu, wall)
}

/// The targets of the benchmark issues, each with its measured value.
pub fn targets(all: &[Case]) -> String {
    let find = |name: &str| all.iter().find(|c| c.name == name);
    // (what, measured case, reference case, quantile, target ratio)
    let checks = [
        (
            "copy round trip p50 / raw rtrb p50",
            "isolate-cluster copy 8 B",
            "raw rtrb",
            0.5,
            1.15,
        ),
        (
            "copy round trip p99.9 / raw rtrb p99.9",
            "isolate-cluster copy 8 B",
            "raw rtrb",
            0.999,
            1.5,
        ),
        (
            "copy round trip p50 / crossbeam-channel p50",
            "isolate-cluster copy 8 B",
            "crossbeam-channel bounded",
            0.5,
            0.5,
        ),
        (
            "copy round trip p50 / iceoryx2 p50",
            "isolate-cluster copy 8 B",
            "iceoryx2 publish-subscribe",
            0.5,
            0.25,
        ),
        (
            "call round trip p50 / raw rtrb p50",
            "isolate-cluster call (request/reply)",
            "raw rtrb",
            0.5,
            1.3,
        ),
        (
            "C API call round trip p50 / Rust API call p50",
            "C API call (request/reply, through the FFI)",
            "isolate-cluster call (request/reply)",
            0.5,
            1.2,
        ),
        (
            "1 MiB transfer p50 / 8 B copy p50",
            "isolate-cluster transfer 1 MiB",
            "isolate-cluster copy 8 B",
            0.5,
            1.5,
        ),
    ];
    let mut s = String::new();
    for (what, case, reference, q, target) in checks {
        let (Some(c), Some(r)) = (find(case), find(reference)) else {
            continue;
        };
        let value = c.p(q) as f64 / r.p(q).max(1) as f64;
        let verdict = if value <= target { "met" } else { "missed" };
        // Three decimals: 150 ns against 130 ns is 1.154×, which two would print as the
        // 1.15× it misses.
        let _ = writeln!(
            s,
            "- {what}: {value:.3}× ({} / {}; target ≤ {target}×) — {verdict}",
            crate::report::ns(c.p(q)),
            crate::report::ns(r.p(q)),
        );
    }
    s
}

/// iceoryx2 publish-subscribe (process-local service), spinning on `receive`. Ports are
/// created on the threads that use them.
pub fn iceoryx2(cfg: Config, cores: Cores) -> Histogram<u64> {
    use iceoryx2::prelude::*;
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let name = |kind: &str| {
        ServiceName::new(&format!("icbench/{}/{run}/{kind}", std::process::id()))
            .expect("service name")
    };
    set_log_level(LogLevel::Error);
    let node = NodeBuilder::new()
        .config(&iceoryx2::config::Config::default())
        .create::<local::Service>()
        .expect("iceoryx2 node");
    let make = |n: &ServiceName| {
        node.service_builder(n)
            .publish_subscribe::<u64>()
            .max_publishers(1)
            .max_subscribers(1)
            .history_size(0)
            .subscriber_max_buffer_size(1)
            .enable_safe_overflow(true)
            .create()
            .expect("iceoryx2 service")
    };
    let (ping, pong) = (make(&name("ping")), make(&name("pong")));
    let ready = std::sync::Barrier::new(2);
    let n = (cfg.warmup + cfg.samples) as u64;
    let (ping, pong, ready) = (&ping, &pong, &ready);
    thread::scope(|s| {
        s.spawn(move || {
            pin(cores[0]);
            let sub = ping.subscriber_builder().create().expect("subscriber");
            let publ = pong.publisher_builder().create().expect("publisher");
            ready.wait();
            for _ in 0..n {
                let v = loop {
                    if let Some(sample) = sub.receive().expect("receive") {
                        break *sample;
                    }
                    std::hint::spin_loop();
                };
                publ.loan_uninit()
                    .expect("loan")
                    .write_payload(v)
                    .send()
                    .expect("send");
            }
        });
        s.spawn(move || {
            pin(cores[1]);
            let publ = ping.publisher_builder().create().expect("publisher");
            let sub = pong.subscriber_builder().create().expect("subscriber");
            ready.wait();
            let mut h = histogram();
            let mut d = Dither::new(cfg.dither);
            for i in 0..n {
                d.pause();
                let t = Instant::now();
                publ.loan_uninit()
                    .expect("loan")
                    .write_payload(i)
                    .send()
                    .expect("send");
                loop {
                    if let Some(sample) = sub.receive().expect("receive") {
                        debug_assert_eq!(*sample, i);
                        break;
                    }
                    std::hint::spin_loop();
                }
                if i as usize >= cfg.warmup {
                    record_since(&mut h, t);
                }
            }
            h
        })
        .join()
        .expect("iceoryx2 ping")
    })
}

/// The ractor actor the request/reply case calls.
struct Echo;

enum EchoMsg {
    Ping(u64, ractor::RpcReplyPort<u64>),
}

impl ractor::Actor for Echo {
    type Msg = EchoMsg;
    type State = ();
    type Arguments = ();
    async fn pre_start(
        &self,
        _me: ractor::ActorRef<Self::Msg>,
        _args: (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        Ok(())
    }
    async fn handle(
        &self,
        _me: ractor::ActorRef<Self::Msg>,
        msg: Self::Msg,
        _state: &mut (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        let EchoMsg::Ping(x, reply) = msg;
        let _ = reply.send(x);
        Ok(())
    }
}

/// ractor `call` round trip: the actor on a one-worker tokio runtime pinned to core 0, the
/// caller on core 1.
pub fn ractor_call(cfg: Config, cores: Cores) -> Histogram<u64> {
    let c0 = cores[0];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(move || {
            pin(c0);
        })
        .build()
        .expect("tokio runtime");
    let (actor, handle) = rt
        .block_on(ractor::Actor::spawn(None, Echo, ()))
        .expect("spawn actor");
    let (warmup, samples) = (cfg.warmup, cfg.samples);
    let c1 = cores[1];
    let h = thread::scope(|s| {
        s.spawn(|| {
            pin(c1);
            let mut h = histogram();
            let mut d = Dither::new(cfg.dither);
            rt.block_on(async {
                for i in 0..(warmup + samples) as u64 {
                    d.pause();
                    let t = Instant::now();
                    let v = ractor::call!(actor, EchoMsg::Ping, i).expect("rpc");
                    debug_assert_eq!(v, i);
                    if i as usize >= warmup {
                        record_since(&mut h, t);
                    }
                }
            });
            h
        })
        .join()
        .expect("ractor caller")
    });
    actor.stop(None);
    let _ = rt.block_on(handle);
    h
}

/// isolate-cluster `call` round trip (request with a correlation id, reply routed back to
/// the waiting request), spinning receivers.
pub fn call(cfg: Config, cores: Cores) -> Histogram<u64> {
    let cluster = cluster(cores, WaitStrategy::BusySpin);
    isolate_pair(&cluster, echo_bytes, move |ctx, pong| {
        let mut h = histogram();
        let mut d = Dither::new(cfg.dither);
        for i in 0..cfg.warmup + cfg.samples {
            d.pause();
            let t = Instant::now();
            let reply = ctx
                .call(pong, &(i as u64), Duration::from_secs(10))
                .expect("call");
            drop(reply);
            if i >= cfg.warmup {
                record_since(&mut h, t);
            }
        }
        h
    })
}

/// The cost of one small job: a fresh isolate per job (`run`) or a pooled worker.
pub fn jobs(cfg: Config) -> String {
    let cluster = Cluster::single_node();
    let n = if cfg.quick { 200 } else { 2_000 };
    let mut spawn = histogram();
    for i in 0..n {
        let t = Instant::now();
        let r = cluster.run(move || i * 2).expect("run");
        std::hint::black_box(r);
        record_since(&mut spawn, t);
    }
    // One worker: with two, both spin for 50 µs after each job (SpinThenPark) and take
    // both cores from the caller on this 2-core machine.
    let pool = cluster.worker_pool("/pool", 1).expect("pool");
    let mailbox = cluster.mailbox().expect("mailbox");
    let mut pooled = histogram();
    for i in 0..n {
        let t = Instant::now();
        let r = pool
            .run(&mailbox, move || i * 2, Duration::from_secs(10))
            .expect("job");
        std::hint::black_box(r);
        record_since(&mut pooled, t);
    }
    cluster.shutdown();
    cluster.join(Duration::from_secs(10)).expect("stop");
    let mut md = String::from("## Jobs: an isolate per job (`run`) vs a worker pool\n\n");
    quantile_table(
        &mut md,
        &format!("{n} jobs returning a number"),
        &[
            ("`Cluster::run` (spawn per job)".into(), &spawn),
            ("`WorkerPool::run` (1 worker)".into(), &pooled),
        ],
    );
    let _ = writeln!(
        md,
        "\nPooled / spawned p50: {:.3}×.\n",
        pooled.value_at_quantile(0.5) as f64 / spawn.value_at_quantile(0.5).max(1) as f64
    );
    md
}

/// The task scheduler: the round trip of `run(name)` for a trivial task next to a plain
/// `call` to an echo isolate (same cluster, same thread, same run), and the lateness of
/// a 1 ms periodic task, sleeping until each deadline and spinning the last 100 µs.
pub fn tasks(cfg: Config) -> String {
    use isolate_cluster::task::{Scheduler, TaskSpec};
    use std::sync::Mutex;
    let t = Duration::from_secs(10);
    let n = if cfg.quick { 2_000 } else { 20_000 };
    let cluster = Cluster::single_node();
    let mut scheduler = Scheduler::new();
    scheduler
        .add(TaskSpec::on_demand("trivial").run(|t| Ok::<u64, String>(t.run())))
        .expect("task");
    let client = scheduler.start(&cluster, "/scheduler").expect("start");
    let echo = cluster
        .spawn("/echo", Properties::new(), |ctx| {
            while let Some(Event::Message(m)) = ctx.recv() {
                let _ = m.reply(&m.get::<u64>().expect("u64").to_native());
            }
        })
        .expect("echo");
    let mailbox = cluster.mailbox().expect("mailbox");
    // One loop each (interleaved, each would find the other server asleep).
    let mut by_name = histogram();
    for i in 0..(n + n / 5) {
        let s = Instant::now();
        let r = client.run(&mailbox, "trivial", &(), t).expect("run");
        assert!(r.successful);
        if i >= n / 5 {
            record_since(&mut by_name, s);
        }
    }
    let mut plain = histogram();
    for i in 0..(n + n / 5) {
        let s = Instant::now();
        drop(mailbox.call(&echo, &(i as u64), t).expect("call"));
        if i >= n / 5 {
            record_since(&mut plain, s);
        }
    }
    client.stop(&mailbox, t).expect("stop");

    let runs = if cfg.quick { 300 } else { 3_000 };
    let mut lateness = Vec::new();
    for spin in [Duration::ZERO, Duration::from_micros(100)] {
        let h = Arc::new(Mutex::new(histogram()));
        let done = Arc::new(AtomicBool::new(false));
        let (h2, done2) = (h.clone(), done.clone());
        let mut scheduler = Scheduler::new().precision(spin);
        scheduler
            .every(Duration::from_millis(1), move |t| {
                record(&mut h2.lock().expect("histogram"), t.lateness());
                if t.run() == runs {
                    done2.store(true, Ordering::Release);
                    t.cancel();
                }
            })
            .expect("periodic");
        let client = scheduler.start(&cluster, "/periodic").expect("start");
        while !done.load(Ordering::Acquire) {
            thread::sleep(Duration::from_millis(10));
        }
        client.stop(&mailbox, t).expect("stop");
        let h = h.lock().expect("histogram").clone();
        lateness.push((spin, h));
    }
    drop(mailbox);
    cluster.shutdown();
    cluster.join(t).expect("stop");

    let mut md = String::from("## Task scheduler\n\n");
    quantile_table(
        &mut md,
        &format!("{n} round trips from a mailbox thread"),
        &[
            ("`TaskClient::run(\"trivial\")`".into(), &by_name),
            ("`Inbox::call` to an echo isolate".into(), &plain),
        ],
    );
    let _ = writeln!(
        md,
        "\n`run(name)` / `call` p50: {:.2}×.\n",
        by_name.value_at_quantile(0.5) as f64 / plain.value_at_quantile(0.5).max(1) as f64
    );
    let rows: Vec<(String, &Histogram<u64>)> = lateness
        .iter()
        .map(|(spin, h)| {
            let name = if spin.is_zero() {
                "sleeps until each deadline".to_owned()
            } else {
                format!("sleeps, then spins the last {} µs", spin.as_micros())
            };
            (name, h)
        })
        .collect();
    quantile_table(
        &mut md,
        &format!("1 ms periodic task, {runs} runs: lateness"),
        &rows,
    );
    md.push('\n');
    md
}

/// A markdown table of p50 / p99 / max, one row per histogram.
pub(crate) fn quantile_table(md: &mut String, heading: &str, rows: &[(String, &Histogram<u64>)]) {
    let _ = writeln!(md, "| {heading} | p50 | p99 | max |");
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for (name, h) in rows {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} |",
            crate::report::ns(h.value_at_quantile(0.5)),
            crate::report::ns(h.value_at_quantile(0.99)),
            crate::report::ns(h.max())
        );
    }
}

/// The request/reply ping-pong of [`call`] written in C against the C API
/// (`benches/c/call_bench.c`), on the same cores. The library is built by a nested
/// `cargo build --release -p isolate-cluster-ffi` into `target/ffi-bench` (the running
/// `cargo bench` holds the main target directory), once per process; the harness is
/// compiled with the system C compiler. Its samples come back on stdout.
pub fn c_call(cfg: Config, cores: Cores) -> Histogram<u64> {
    let exe = c_harness();
    let out = std::process::Command::new(exe)
        .arg(cores[0].id.to_string())
        .arg(cores[1].id.to_string())
        .arg(cfg.warmup.to_string())
        .arg(cfg.samples.to_string())
        .arg(u8::from(cfg.dither).to_string())
        .output()
        .expect("run the C harness");
    assert!(
        out.status.success(),
        "the C harness failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut h = histogram();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let ns: u64 = line.trim().parse().expect("a sample in ns");
        record(&mut h, Duration::from_nanos(ns));
    }
    assert_eq!(h.len(), cfg.samples as u64, "one sample per round trip");
    h
}

fn c_harness() -> &'static std::path::Path {
    static EXE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let target = root.join("target").join("ffi-bench");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "isolate-cluster-ffi",
                "--target-dir",
            ])
            .arg(&target)
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the C library failed");
        let lib = target.join("release");
        let exe = lib.join("call_bench");
        let status = std::process::Command::new("cc")
            .args(["-O2", "-std=c11", "-pthread", "-I"])
            .arg(root.join("ffi").join("include"))
            .arg(root.join("benches").join("c").join("call_bench.c"))
            .arg("-o")
            .arg(&exe)
            .arg(lib.join("libisolate_cluster.a"))
            .args(["-ldl", "-lm"])
            .status()
            .expect("run cc");
        assert!(status.success(), "compiling the C harness failed");
        exe
    })
}

/// Messages per throughput round: enough for a round to last a tenth of a second or more
/// at the rates seen here, so that starting the threads and touching the rings for the
/// first time weigh nothing.
fn throughput_messages(cfg: Config) -> u64 {
    if cfg.quick {
        20_000_000
    } else {
        50_000_000
    }
}

/// Raw `rtrb`, one 8-byte value per push and per pop, over a 1 MiB ring: messages/s.
fn rtrb_one_way(cores: Cores, n: u64) -> f64 {
    let (mut tx, mut rx) = rtrb::RingBuffer::<[u8; 8]>::new(1 << 17);
    let consumer = thread::spawn(move || {
        pin(cores[0]);
        let (mut got, mut x) = (0u64, 0u8);
        while got < n {
            match rx.pop() {
                Ok(v) => {
                    x ^= v[0];
                    got += 1;
                }
                Err(_) => std::hint::spin_loop(),
            }
        }
        std::hint::black_box(x);
    });
    let producer = thread::spawn(move || {
        pin(cores[1]);
        let t = Instant::now();
        for i in 0..n {
            while tx.push([i as u8; 8]).is_err() {
                std::hint::spin_loop();
            }
        }
        t
    });
    let t = producer.join().expect("producer");
    consumer.join().expect("consumer");
    n as f64 / t.elapsed().as_secs_f64()
}

/// isolate-cluster, 8-byte values sent in batches of 64 and read with `try_recv_batch`,
/// over a 1 MiB ring: messages/s.
fn isolates_one_way(cores: Cores, n: u64) -> f64 {
    let producer = thread::spawn(move || {
        pin(cores[1]);
        let cluster = Cluster::builder()
            .ring_capacity(1 << 20)
            .wait_strategy(WaitStrategy::BusySpin)
            .core_policy(CorePolicy::Dedicated)
            .cores(vec![cores[0].id])
            .build();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let sink = cluster
            .spawn("/sink", Properties::new(), move |ctx| {
                let (mut got, mut x) = (0u64, 0u8);
                while got < n {
                    let k = ctx.try_recv_batch(256, |m| x ^= m.bytes()[0]);
                    if k == 0 {
                        std::hint::spin_loop();
                    }
                    got += k as u64;
                }
                std::hint::black_box(x);
                d.store(true, Ordering::Release);
                while ctx.recv().is_some() {}
            })
            .expect("spawn sink");
        let mailbox = cluster.mailbox().expect("mailbox");
        let batch = [[7u8; 8]; 64];
        let t = Instant::now();
        let mut left = n as usize;
        while left > 0 {
            let k = left.min(batch.len());
            mailbox.send_batch(&sink, &batch[..k]).expect("send_batch");
            left -= k;
        }
        while !done.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        let rate = n as f64 / t.elapsed().as_secs_f64();
        drop(mailbox);
        cluster.shutdown();
        cluster
            .join(Duration::from_secs(10))
            .expect("isolates stop");
        rate
    });
    producer.join().expect("producer")
}

/// One-way throughput of 8-byte messages, raw `rtrb` one at a time against isolate-cluster
/// with batches, in alternating rounds on the pinned core pair (criterion's `throughput`
/// bench runs its peers minutes apart; this machine's speed drifts more than that):
/// the report section, with the target line last.
pub fn throughput(cfg: Config, cores: Cores) -> String {
    let rounds = if cfg.quick { 3 } else { 9 };
    let n = throughput_messages(cfg);
    let (mut raw, mut ours, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let r = rtrb_one_way(cores, n);
        let o = isolates_one_way(cores, n);
        raw.push(r);
        ours.push(o);
        ratios.push(o / r);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (lo, hi) = (
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
    );
    let (r, o, ratio) = (median(&mut raw), median(&mut ours), median(&mut ratios));
    let mut s = String::new();
    let _ = writeln!(s, "## Throughput, 8-byte messages, interleaved\n");
    let _ = writeln!(
        s,
        "{rounds} alternating rounds of {n} one-way messages each, 1 MiB rings, producer on core {}, consumer on core {}. Medians over the rounds.\n",
        cores[1].id, cores[0].id
    );
    let _ = writeln!(s, "| peer | messages/s |\n|---|---:|");
    let _ = writeln!(
        s,
        "| raw rtrb, one push and one pop per value | {:.1} M |",
        r / 1e6
    );
    let _ = writeln!(
        s,
        "| isolate-cluster, `send_batch` of 64, `try_recv_batch` | {:.1} M |\n",
        o / 1e6
    );
    let verdict = if ratio >= 1.0 { "met" } else { "missed" };
    let _ = writeln!(
        s,
        "- 8-byte batched throughput / raw rtrb one at a time: {ratio:.2}× (median of the rounds' ratios; range {lo:.2}–{hi:.2}×; target ≥ 1×) — {verdict}"
    );
    s
}
