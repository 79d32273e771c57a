//! Cross-process cases (feature `net`): a round trip and one-way throughput between two
//! processes through the engine's network layer, next to raw Zenoh publish/subscribe over
//! the same kind of link (unix sockets, peer mode) in the same run.
//!
//! The bench binary starts itself again as the other process (`IC_BENCH_NET_CHILD`).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use isolate_cluster::net::zenoh::{self, Wait};
use isolate_cluster::net::Network;
use isolate_cluster::{Cluster, Event, Properties, WaitStrategy};

use crate::{histogram, record_since, Config};

const T: Duration = Duration::from_secs(10);

/// The wait strategy of both nodes: the default, or `IC_BENCH_NET_SPIN_US` of spinning
/// before parking (0 parks at once: no spinning thread competes with Zenoh's threads for
/// the cores).
fn wait() -> WaitStrategy {
    match std::env::var("IC_BENCH_NET_SPIN_US")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(us) => WaitStrategy::SpinThenPark {
            spin: Duration::from_micros(us),
        },
        None => WaitStrategy::default(),
    }
}

fn raw_config(listen: Option<&Path>, connect: Option<&Path>) -> zenoh::Config {
    let mut c = zenoh::Config::default();
    let ep = |p: &Path| format!("[\"unixsock-stream/{}\"]", p.display());
    c.insert_json5("mode", "\"peer\"").expect("mode");
    c.insert_json5("scouting/multicast/enabled", "false")
        .expect("scouting");
    if let Some(p) = listen {
        c.insert_json5("listen/endpoints", &ep(p)).expect("listen");
    }
    if let Some(p) = connect {
        c.insert_json5("connect/endpoints", &ep(p))
            .expect("connect");
    }
    c
}

/// The other process: node `far` with `/echo` and `/sink`, and a raw Zenoh session that
/// answers pings and counts a flood. Runs until stdin closes.
pub fn child() {
    let dir = PathBuf::from(std::env::var("IC_BENCH_NET_DIR").expect("IC_BENCH_NET_DIR"));
    let node = Cluster::builder()
        .node_name("far")
        .wait_strategy(wait())
        .join(Network::new("bench").rendezvous_dir(&dir))
        .expect("join");
    node.spawn("/echo", Properties::new(), |ctx| {
        while let Some(ev) = ctx.recv() {
            match ev {
                Event::Message(m) => {
                    let _ = m.reply(&m.get::<u64>().expect("u64").to_native());
                }
                Event::ShutdownRequested => return,
                _ => {}
            }
        }
    })
    .expect("echo");
    node.spawn("/sink", Properties::new(), |ctx| {
        let mut n = 0u64;
        while let Some(ev) = ctx.recv() {
            match ev {
                Event::Message(m) if m.is_request() => {
                    let _ = m.reply(&n);
                    n = 0;
                }
                Event::Message(_) => n += 1,
                Event::ShutdownRequested => return,
                _ => {}
            }
        }
    })
    .expect("sink");

    let raw = zenoh::open(raw_config(Some(&dir.join("raw-far.sock")), None))
        .wait()
        .expect("raw session");
    let pong = raw
        .declare_publisher("bench/raw/pong")
        .congestion_control(zenoh::qos::CongestionControl::Block)
        .wait()
        .expect("publisher");
    let _ping = raw
        .declare_subscriber("bench/raw/ping")
        .callback(move |s| {
            let _ = pong.put(s.payload().clone()).wait();
        })
        .wait()
        .expect("subscriber");
    let count = Arc::new(AtomicU64::new(0));
    let c2 = count.clone();
    let _flood = raw
        .declare_subscriber("bench/raw/flood")
        .callback(move |_| {
            c2.fetch_add(1, Ordering::Relaxed);
        })
        .wait()
        .expect("subscriber");
    let counted = raw
        .declare_publisher("bench/raw/counted")
        .congestion_control(zenoh::qos::CongestionControl::Block)
        .wait()
        .expect("publisher");
    let _end = raw
        .declare_subscriber("bench/raw/end")
        .callback(move |_| {
            let n = count.swap(0, Ordering::Relaxed);
            let _ = counted.put(n.to_le_bytes().to_vec()).wait();
        })
        .wait()
        .expect("subscriber");
    println!("READY");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
        line.clear();
    }
    drop(node);
    let _ = raw.close().wait();
}

/// A subscriber on `key` that hands each sample's first 8 bytes, as a `u64`, to the
/// returned channel.
fn u64_subscriber(
    raw: &zenoh::Session,
    key: &'static str,
) -> (zenoh::pubsub::Subscriber<()>, mpsc::Receiver<u64>) {
    let (tx, rx) = mpsc::channel::<u64>();
    let sub = raw
        .declare_subscriber(key)
        .callback(move |s| {
            let b = s.payload().to_bytes();
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8]);
            let _ = tx.send(u64::from_le_bytes(a));
        })
        .wait()
        .expect("subscriber");
    (sub, rx)
}

/// Measures, and returns the report section.
pub fn cases(cfg: Config) -> String {
    let dir = std::env::temp_dir().join(format!("ic-bench-net-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("rendezvous dir");
    let node = Cluster::builder()
        .node_name("near")
        .wait_strategy(wait())
        .join(Network::new("bench").rendezvous_dir(&dir))
        .expect("join");
    let mut child = Command::new(std::env::current_exe().expect("this bench"))
        .env("IC_BENCH_NET_CHILD", "1")
        .env("IC_BENCH_NET_DIR", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the other process");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.trim() == "READY" => break,
            Some(Ok(_)) => {}
            _ => panic!("the other process did not start"),
        }
    }
    let mailbox = node.mailbox().expect("mailbox");
    let lookup = |p: &str| {
        let until = Instant::now() + T;
        loop {
            match node.lookup(p) {
                Ok(r) => return r,
                Err(e) if Instant::now() > until => panic!("{p}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    };
    let echo = lookup("far:/echo");
    let sink = lookup("far:/sink");

    let raw = zenoh::open(raw_config(None, Some(&dir.join("raw-far.sock"))))
        .wait()
        .expect("raw session");
    let (_pong, pongs) = u64_subscriber(&raw, "bench/raw/pong");
    let (_counted, counted) = u64_subscriber(&raw, "bench/raw/counted");
    let block = zenoh::qos::CongestionControl::Block;
    let ping = raw
        .declare_publisher("bench/raw/ping")
        .congestion_control(block)
        .wait()
        .expect("publisher");
    let flood = raw
        .declare_publisher("bench/raw/flood")
        .congestion_control(block)
        .wait()
        .expect("publisher");
    let end = raw
        .declare_publisher("bench/raw/end")
        .congestion_control(block)
        .wait()
        .expect("publisher");
    // Until the other side's subscriptions are known here.
    let until = Instant::now() + T;
    loop {
        ping.put(0u64.to_le_bytes().to_vec()).wait().expect("put");
        if pongs.recv_timeout(Duration::from_millis(100)).is_ok() {
            break;
        }
        assert!(Instant::now() < until, "raw zenoh never answered");
    }
    while pongs.try_recv().is_ok() {}

    let n = if cfg.quick { 2_000 } else { 20_000 };
    let warm = n / 5;
    let mut engine = histogram();
    let mut zenoh_rt = histogram();
    // Interleaved rounds, so drifting load hits both alike.
    let rounds = 4;
    for _ in 0..rounds {
        for i in 0..(n / rounds + warm / rounds) {
            let s = Instant::now();
            let r = mailbox.call(&echo, &(i as u64), T).expect("call");
            debug_assert_eq!(*r.get::<u64>().expect("u64"), i as u64);
            drop(r);
            if i >= warm / rounds {
                record_since(&mut engine, s);
            }
        }
        for i in 0..(n / rounds + warm / rounds) {
            let s = Instant::now();
            ping.put((i as u64).to_le_bytes().to_vec())
                .wait()
                .expect("put");
            let got = pongs.recv_timeout(T).expect("pong");
            debug_assert_eq!(got, i as u64);
            if i >= warm / rounds {
                record_since(&mut zenoh_rt, s);
            }
        }
    }

    // One-way throughput of 8-byte messages, counted at the far end.
    let m = if cfg.quick { 20_000u64 } else { 200_000 };
    let s = Instant::now();
    for i in 0..m {
        mailbox.send(&sink, &i).expect("send");
    }
    let r = mailbox
        .call(&sink, &"count".to_string(), T * 3)
        .expect("count");
    let engine_secs = s.elapsed().as_secs_f64();
    assert_eq!(*r.get::<u64>().expect("u64"), m);
    drop(r);
    let s = Instant::now();
    for i in 0..m {
        flood.put(i.to_le_bytes().to_vec()).wait().expect("put");
    }
    end.put(vec![0u8]).wait().expect("put");
    let got = counted.recv_timeout(T * 3).expect("count");
    let zenoh_secs = s.elapsed().as_secs_f64();
    assert_eq!(got, m);

    drop(child.stdin.take());
    let _ = child.wait();
    let _ = raw.close().wait();
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);

    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n## Across processes (Zenoh, unix sockets, peer mode)\n\nTwo processes on this machine, {n} round trips each after {warm} warm-up, interleaved in {rounds} rounds; isolates wait with {:?}. The engine: a mailbox calls an isolate of the other node (`call`). Raw Zenoh: a publisher and a subscriber on each side, the far callback publishing the answer at once.\n",
        wait()
    );
    let rows = vec![
        ("isolate-cluster call across processes".to_owned(), &engine),
        (
            "raw Zenoh publish/subscribe round trip".to_owned(),
            &zenoh_rt,
        ),
    ];
    crate::cases::quantile_table(&mut md, "Round trip", &rows);
    let ratio = engine.value_at_quantile(0.5) as f64 / zenoh_rt.value_at_quantile(0.5) as f64;
    let _ = writeln!(
        md,
        "\nRound trip p50, engine / raw Zenoh: **{ratio:.2}×** (target at most 1.2×).\n"
    );
    let _ = writeln!(
        md,
        "One-way throughput of {m} 8-byte messages, counted at the far end: isolate-cluster {:.0} msg/s, raw Zenoh {:.0} msg/s (**{:.2}×**).",
        m as f64 / engine_secs,
        m as f64 / zenoh_secs,
        zenoh_secs / engine_secs
    );
    md
}
