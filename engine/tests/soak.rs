//! A randomized soak run: 32 supervised workers send copies and transfers to random
//! peers and calls to random servers (4 more supervised isolates that only answer: calls
//! in a cycle would wait for each other, as in any actor system) through small rings; now
//! and then a worker or a server panics and is restarted. Checked:
//!
//! - every copy and transfer sent is read exactly once or counted as undelivered (its
//!   receiver died first): sent = received + undelivered, over the whole run;
//! - per pair of incarnations, in order with no gap and no duplicate;
//! - every call gets its own answer or an error, never another call's answer;
//! - every transferred value is dropped exactly once;
//! - live heap memory is flat: the second half of the run peaks no higher than the first.
//!
//! `IC_SOAK_SECS` sets the length (default 15 s; CI runs it once more for 60 s).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::with_timeout;
use isolate_cluster::rkyv::{Archive, Serialize};
use isolate_cluster::{
    CallError, Cluster, Context, Event, IsolateRef, Properties, Restart, SendError, Supervision,
};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's layout guarantees pass through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as `GlobalAlloc::realloc` requires of its caller.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const WORKERS: usize = 32;
const SERVERS: usize = 4;

#[derive(Archive, Serialize)]
struct Seq {
    seq: u64,
}

/// A transferred value; counts its drop.
struct Moved {
    seq: u64,
    totals: Arc<Totals>,
}

impl Drop for Moved {
    fn drop(&mut self) {
        self.totals.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    received: AtomicU64,
    order_errors: AtomicU64,
    created: AtomicU64,
    dropped: AtomicU64,
    calls_ok: AtomicU64,
    calls_failed: AtomicU64,
    wrong_answers: AtomicU64,
    panics: AtomicU64,
    incarnations: AtomicU64,
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Per receiving incarnation: the next sequence number expected from each sender
/// incarnation (its endpoint id; a restarted sender starts again at 0 under a new id).
type Expected = std::collections::HashMap<u32, u64>;

fn check_order(expected: &mut Expected, from: u32, seq: u64, totals: &Totals) {
    let e = expected.entry(from).or_insert(0);
    if seq != *e {
        totals.order_errors.fetch_add(1, Ordering::Relaxed);
    }
    *e = seq + 1;
    totals.received.fetch_add(1, Ordering::Relaxed);
}

/// Handles one event; returns whether the worker should stop.
fn handle(ev: Event<'_>, expected: &mut Expected, totals: &Totals) -> bool {
    match ev {
        Event::Message(mut m) => {
            let from = m.sender_id();
            if m.is_request() {
                let v = m.get::<u64>().expect("a u64 request").to_native();
                totals.received.fetch_add(1, Ordering::Relaxed);
                if m.reply(&(v * 2)).is_ok() {
                    totals.sent.fetch_add(1, Ordering::Relaxed);
                }
            } else if m.is_transfer() {
                let v = m.take::<Moved>().expect("a Moved");
                check_order(expected, from, v.seq, totals);
            } else {
                let s = m.get::<Seq>().expect("a Seq");
                check_order(expected, from, s.seq.to_native(), totals);
            }
            false
        }
        Event::ShutdownRequested => true,
        _ => false,
    }
}

fn worker(ctx: &Context, i: usize, totals: &Arc<Totals>, stop: &AtomicBool) {
    let inc = totals.incarnations.fetch_add(1, Ordering::Relaxed);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((i as u64) << 32) ^ (inc + 1));
    let mut peers: Vec<Option<IsolateRef>> = vec![None; WORKERS];
    // Next sequence number to send, per target incarnation.
    let mut next: std::collections::HashMap<u32, u64> = Default::default();
    let mut expected = Expected::default();
    loop {
        while let Some(ev) = ctx.try_recv() {
            if handle(ev, &mut expected, totals) {
                return;
            }
        }
        if ctx.is_finished() {
            return;
        }
        if stop.load(Ordering::Relaxed) {
            // Keep reading until the node asks us to stop.
            let stopped = match ctx.recv_timeout(Duration::from_millis(5)) {
                Some(ev) => handle(ev, &mut expected, totals),
                None => ctx.is_finished(),
            };
            if stopped {
                return;
            }
            continue;
        }
        for _ in 0..8 {
            let j = rng.below(WORKERS as u64) as usize;
            let target = match &peers[j] {
                Some(r) if r.is_alive() => r.clone(),
                _ => match ctx.lookup(&format!("/w{j}")) {
                    Ok(r) => {
                        peers[j] = Some(r.clone());
                        r
                    }
                    Err(_) => continue,
                },
            };
            let seq = next.entry(target.id()).or_insert(0);
            match rng.below(100) {
                0..=59 => match ctx.send(&target, &Seq { seq: *seq }) {
                    Ok(()) => {
                        *seq += 1;
                        totals.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(SendError::Disconnected(())) => {}
                    Err(e) => panic!("send failed: {e}"),
                },
                60..=89 => {
                    totals.created.fetch_add(1, Ordering::Relaxed);
                    let v = Box::new(Moved {
                        seq: *seq,
                        totals: totals.clone(),
                    });
                    match ctx.transfer(&target, v) {
                        Ok(()) => {
                            *seq += 1;
                            totals.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        // The value comes back and is dropped here.
                        Err(SendError::Disconnected(_)) => {}
                        Err(e) => panic!("transfer failed: {e}"),
                    }
                }
                _ => {
                    let k = rng.below(SERVERS as u64);
                    let Ok(target) = ctx.lookup(&format!("/s{k}")) else {
                        continue;
                    };
                    let v = rng.below(1 << 40);
                    // `request` + `wait_reply` rather than `call`: a request that was never
                    // published (the server had died) must not count as sent.
                    let id = match ctx.request(&target, &v) {
                        Ok(id) => id,
                        Err(SendError::Disconnected(())) => {
                            totals.calls_failed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Err(e) => panic!("request failed: {e}"),
                    };
                    totals.sent.fetch_add(1, Ordering::Relaxed);
                    match ctx.wait_reply(id, Duration::from_secs(30)) {
                        Ok(reply) => {
                            totals.received.fetch_add(1, Ordering::Relaxed);
                            if reply.get::<u64>().map(|r| r.to_native()) == Ok(v * 2) {
                                totals.calls_ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                totals.wrong_answers.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // The request was read (counted there) or not (undelivered).
                        Err(CallError::TargetDown(_)) => {
                            totals.calls_failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("call failed: {e}"),
                    }
                }
            }
        }
        if rng.below(4000) == 0 {
            totals.panics.fetch_add(1, Ordering::Relaxed);
            panic!("soak: worker {i} fails on purpose");
        }
    }
}

/// Answers calls; panics now and then.
fn server(ctx: &Context, k: usize, totals: &Arc<Totals>) {
    let inc = totals.incarnations.fetch_add(1, Ordering::Relaxed);
    let mut rng = Rng(0x51ed_270b_2734_97f1 ^ ((k as u64) << 40) ^ (inc + 1));
    let mut expected = Expected::default();
    while let Some(ev) = ctx.recv() {
        if handle(ev, &mut expected, totals) {
            return;
        }
        if rng.below(3000) == 0 {
            totals.panics.fetch_add(1, Ordering::Relaxed);
            panic!("soak: server {k} fails on purpose");
        }
    }
}

#[test]
fn soak_random_traffic_with_panics_and_restarts() {
    let secs: u64 = std::env::var("IC_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    // The purposeful panics would fill the log.
    std::panic::set_hook(Box::new(|info| {
        let text = info.to_string();
        if !text.contains("fails on purpose") {
            eprintln!("{text}");
        }
    }));
    with_timeout(Duration::from_secs(secs + 120), move || {
        let cluster = Cluster::builder()
            .ring_capacity(2048)
            .supervision(Supervision::one_for_one().intensity(1_000_000, Duration::from_secs(1)))
            .build();
        let totals = Arc::new(Totals::default());
        let stop = Arc::new(AtomicBool::new(false));
        for i in 0..WORKERS {
            let (t, s) = (totals.clone(), stop.clone());
            cluster
                .spawn_supervised(
                    &format!("/w{i}"),
                    Properties::new(),
                    Restart::Permanent,
                    move |ctx| worker(ctx, i, &t, &s),
                )
                .unwrap();
        }
        for k in 0..SERVERS {
            let t = totals.clone();
            cluster
                .spawn_supervised(
                    &format!("/s{k}"),
                    Properties::new(),
                    Restart::Permanent,
                    move |ctx| server(ctx, k, &t),
                )
                .unwrap();
        }
        let started = Instant::now();
        let run = Duration::from_secs(secs);
        let samples = Mutex::new(Vec::new());
        while started.elapsed() < run {
            std::thread::sleep(Duration::from_millis(250));
            samples
                .lock()
                .unwrap()
                .push((started.elapsed(), LIVE.load(Ordering::Relaxed)));
        }
        stop.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        cluster.shutdown();
        cluster
            .join(Duration::from_secs(60))
            .expect("the node stops");
        let stats = cluster.stats();

        let t = &totals;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (sent, received) = (get(&t.sent), get(&t.received));
        let undelivered = stats.undelivered;
        let late: u64 = stats.endpoints.iter().map(|e| e.late_replies).sum();
        println!(
            "soak {secs}s: {sent} sent, {received} read, {undelivered} undelivered, {late} late replies, {} calls ok, {} failed, {} panics, {} incarnations, {} transfers",
            get(&t.calls_ok),
            get(&t.calls_failed),
            get(&t.panics),
            get(&t.incarnations),
            get(&t.created)
        );
        assert!(sent > 10_000, "too little traffic to mean anything: {sent}");
        assert!(get(&t.panics) > 0 && get(&t.incarnations) > (WORKERS + SERVERS) as u64);
        assert_eq!(
            get(&t.order_errors),
            0,
            "out of order, duplicated or missing"
        );
        assert_eq!(get(&t.wrong_answers), 0, "a call got another call's answer");
        assert_eq!(
            sent,
            received + undelivered + late,
            "every message read once or counted as undelivered"
        );
        assert_eq!(
            get(&t.created),
            get(&t.dropped),
            "every transferred value dropped exactly once"
        );

        // Live heap: the second half of the run peaks no higher than the first (plus
        // slack for allocator noise), so nothing grows with the traffic or the restarts.
        let samples = samples.into_inner().unwrap();
        let half = run / 2;
        let peak = |from: Duration, to: Duration| {
            samples
                .iter()
                .filter(|(at, _)| *at >= from && *at < to)
                .map(|&(_, b)| b)
                .max()
                .unwrap_or(0)
        };
        let first = peak(run / 8, half);
        let second = peak(half, run + Duration::from_secs(1));
        let quarters: Vec<isize> = (0..4)
            .map(|q| peak(run * q / 4, run * (q + 1) / 4))
            .collect();
        println!("live heap: first half peak {first} B, second half peak {second} B (quarters {quarters:?})");
        assert!(
            second <= first + first / 4 + (2 << 20),
            "heap grew from {first} to {second} bytes"
        );
    });
}
