//! Events, panics, exit values, shutdown with messages in flight, wait strategies, and
//! many more isolates than cores.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{expect_message, with_timeout};
use isolate_cluster::{Cluster, DownReason, Event, ExitError, Placement, Properties, WaitStrategy};

const T: Duration = Duration::from_secs(20);

#[test]
fn a_panic_stays_in_its_isolate_and_watchers_see_why() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        mailbox.watch_isolates(|r| r.path().starts_with("/flaky"));
        let echo = cluster
            .spawn("/echo", Properties::new(), |ctx| {
                while let Some(Event::Message(m)) = ctx.recv() {
                    m.reply(&(*m.get::<u32>().unwrap() + 1)).unwrap();
                }
            })
            .unwrap();
        let flaky = cluster
            .spawn("/flaky", Properties::new(), |ctx| {
                if let Some(Event::Message(m)) = ctx.recv() {
                    panic!("boom {}", m.get::<u32>().unwrap());
                }
            })
            .unwrap();
        match mailbox.recv_timeout(T) {
            Some(Event::IsolateUp(r)) => assert_eq!(r, flaky),
            other => panic!("expected IsolateUp, got {other:?}"),
        }
        flaky.send(&42u32).unwrap();
        match mailbox.recv_timeout(T) {
            Some(Event::IsolateDown(r, why)) => {
                assert_eq!(r.path(), "/flaky");
                assert_eq!(why, DownReason::Panicked("boom 42".into()));
            }
            other => panic!("expected IsolateDown, got {other:?}"),
        }
        assert_eq!(
            flaky.wait_down(T),
            Some(DownReason::Panicked("boom 42".into()))
        );
        assert!(!flaky.is_alive());
        // The rest of the node is unaffected.
        echo.send(&1u32).unwrap();
        assert_eq!(expect_message(&mailbox, T, |m| *m.get::<u32>().unwrap()), 2);
        assert!(matches!(
            cluster.lookup("/flaky"),
            Err(isolate_cluster::LookupError::NotFound(_))
        ));
        cluster.shutdown();
        cluster.join(T).unwrap();
        assert_eq!(echo.wait_down(T), Some(DownReason::Normal));
    });
}

#[test]
fn watching_replays_live_isolates_then_streams_and_filters() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let parked = |ctx: &isolate_cluster::Context| while ctx.recv().is_some() {};
        let w1 = cluster
            .spawn("/w/1", Properties::new().with("type", "worker"), parked)
            .unwrap();
        let w2 = cluster
            .spawn("/w/2", Properties::new().with("type", "worker"), parked)
            .unwrap();
        cluster
            .spawn("/other", Properties::new().with("type", "other"), parked)
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        mailbox.watch_isolates(|r| r.property("type").is_some_and(|v| v == "worker"));
        let mut up = Vec::new();
        for _ in 0..2 {
            match mailbox.recv_timeout(T) {
                Some(Event::IsolateUp(r)) => up.push(r.path().to_owned()),
                other => panic!("expected IsolateUp, got {other:?}"),
            }
        }
        up.sort();
        assert_eq!(up, ["/w/1", "/w/2"]);
        let w3 = cluster
            .spawn("/w/3", Properties::new().with("type", "worker"), parked)
            .unwrap();
        cluster
            .spawn("/other/2", Properties::new().with("type", "other"), parked)
            .unwrap();
        match mailbox.recv_timeout(T) {
            Some(Event::IsolateUp(r)) => assert_eq!(r, w3),
            other => panic!("expected IsolateUp(/w/3), got {other:?}"),
        }
        // A second filter matching the same isolates replays nothing new.
        mailbox.watch_isolates(|r| r.path().starts_with("/w/"));
        assert!(mailbox.recv_timeout(Duration::from_millis(100)).is_none());
        cluster.shutdown();
        let mut down = Vec::new();
        for _ in 0..3 {
            match mailbox.recv_timeout(T) {
                Some(Event::ShutdownRequested) => {}
                Some(Event::IsolateDown(r, why)) => {
                    assert_eq!(why, DownReason::Normal);
                    down.push(r.path().to_owned());
                }
                other => panic!("expected IsolateDown, got {other:?}"),
            }
        }
        // The shutdown request may come before or between the down events.
        while down.len() < 3 {
            match mailbox.recv_timeout(T) {
                Some(Event::IsolateDown(r, _)) => down.push(r.path().to_owned()),
                Some(Event::ShutdownRequested) => {}
                other => panic!("expected IsolateDown, got {other:?}"),
            }
        }
        down.sort();
        assert_eq!(down, ["/w/1", "/w/2", "/w/3"]);
        cluster.join(T).unwrap();
        drop((w1, w2));
    });
}

#[test]
fn messages_sent_before_shutdown_are_delivered() {
    const N: u64 = 50_000;
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::builder().ring_capacity(4096).build();
        let count = Arc::new(AtomicU64::new(0));
        let sum = Arc::new(AtomicU64::new(0));
        let (c2, s2) = (count.clone(), sum.clone());
        let sink = cluster
            .spawn("/sink", Properties::new(), move |ctx| {
                while let Some(ev) = ctx.recv() {
                    if let Event::Message(m) = ev {
                        c2.fetch_add(1, Ordering::Relaxed);
                        s2.fetch_add(m.get::<u64>().unwrap().to_native(), Ordering::Relaxed);
                    }
                }
            })
            .unwrap();
        for i in 0..N {
            sink.send(&i).unwrap();
        }
        cluster.shutdown();
        cluster.join(T).unwrap();
        assert_eq!(count.load(Ordering::Relaxed), N);
        assert_eq!(sum.load(Ordering::Relaxed), N * (N - 1) / 2);
        assert_eq!(cluster.stats().undelivered, 0);
        // The ring to the stopped sink still exists, but a send checks first: nothing is
        // published into it, nothing is counted.
        for _ in 0..2 {
            assert!(matches!(
                sink.send(&0u64),
                Err(isolate_cluster::SendError::Disconnected(()))
            ));
        }
        assert_eq!(cluster.stats().undelivered, 0);
    });
}

struct Counted(Arc<AtomicUsize>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn messages_an_isolate_never_reads_are_counted_and_transfers_dropped() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let gate = Arc::new(Barrier::new(2));
        let g2 = gate.clone();
        let lazy = cluster
            .spawn("/lazy", Properties::new(), move |_ctx| {
                g2.wait();
            })
            .unwrap();
        let drops = Arc::new(AtomicUsize::new(0));
        for i in 0..100u64 {
            lazy.send(&i).unwrap();
        }
        for _ in 0..10 {
            lazy.transfer(Box::new(Counted(drops.clone()))).unwrap();
        }
        gate.wait();
        assert_eq!(lazy.wait_down(T), Some(DownReason::Normal));
        cluster.join(T).unwrap();
        assert_eq!(cluster.stats().undelivered, 110);
        assert_eq!(
            drops.load(Ordering::Relaxed),
            10,
            "each transferred value dropped once"
        );
    });
}

#[test]
fn exit_hands_over_the_value_without_copying() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let addr = Arc::new(AtomicUsize::new(0));
        let a2 = addr.clone();
        let worker = cluster
            .spawn("/worker", Properties::new(), move |ctx| {
                let data: Box<Vec<u8>> = Box::new((0..1 << 20).map(|i| i as u8).collect());
                a2.store(data.as_ptr() as usize, Ordering::Relaxed);
                ctx.exit(data)
            })
            .unwrap();
        let value = worker.join_exit::<Vec<u8>>(T).unwrap();
        assert_eq!(
            value.as_ptr() as usize,
            addr.load(Ordering::Relaxed),
            "same allocation"
        );
        assert_eq!(value.len(), 1 << 20);
        assert_eq!(value[12345], (12345 % 256) as u8);
        assert_eq!(worker.join_exit::<Vec<u8>>(T), Err(ExitError::AlreadyTaken));
        let plain = cluster.spawn("/plain", Properties::new(), |_| {}).unwrap();
        assert_eq!(
            plain.join_exit::<u8>(T),
            Err(ExitError::NoValue(DownReason::Normal))
        );
        let typed = cluster
            .spawn("/typed", Properties::new(), |ctx| ctx.exit(Box::new(5u8)))
            .unwrap();
        assert_eq!(typed.join_exit::<u16>(T), Err(ExitError::TypeMismatch));
        assert_eq!(*typed.join_exit::<u8>(T).unwrap(), 5);
        cluster.join(T).unwrap();
    });
}

#[test]
fn shutdown_handler_decides_when_to_stop_and_isolates_spawn_isolates() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let main_ref = mailbox.me().clone();
        let asked = Arc::new(AtomicBool::new(false));
        let a2 = asked.clone();
        cluster
            .spawn("/parent", Properties::new(), move |ctx| {
                let m2 = main_ref.clone();
                let child = ctx
                    .spawn(
                        "/parent/child",
                        Properties::new().with("role", "child"),
                        move |c| {
                            c.send(&m2, &String::from("child up")).unwrap();
                            while c.recv().is_some() {}
                        },
                    )
                    .unwrap();
                assert_eq!(ctx.lookup("/parent/child").unwrap(), child);
                ctx.on_shutdown_request(move |ctx| {
                    a2.store(true, Ordering::Relaxed);
                    ctx.send(&main_ref, &String::from("parent stopping"))
                        .unwrap();
                    ctx.shutdown_isolate();
                });
                while ctx.recv().is_some() {}
            })
            .unwrap();
        let text = expect_message(&mailbox, T, |m| {
            m.get::<String>().unwrap().as_str().to_owned()
        });
        assert_eq!(text, "child up");
        cluster.shutdown();
        let mut got = false;
        while let Some(ev) = mailbox.recv_timeout(T) {
            match ev {
                Event::Message(m) => {
                    assert_eq!(m.get::<String>().unwrap().as_str(), "parent stopping");
                    got = true;
                    break;
                }
                Event::ShutdownRequested => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(got && asked.load(Ordering::Relaxed));
        cluster.join(T).unwrap();
        assert!(matches!(
            cluster.spawn("/late", Properties::new(), |_| {}),
            Err(isolate_cluster::SpawnError::ShuttingDown)
        ));
    });
}

/// Passes a token around a ring of `n` isolates `laps` times.
fn token_ring(n: usize, laps: u64, wait: WaitStrategy) {
    let cluster = Cluster::builder().wait_strategy(wait).build();
    let mailbox = cluster.mailbox().unwrap();
    let main_ref = mailbox.me().clone();
    for i in 0..n {
        let main_ref = main_ref.clone();
        cluster
            .spawn(&format!("/ring/{i}"), Properties::new(), move |ctx| {
                let next = loop {
                    if let Ok(r) = ctx.lookup(&format!("/ring/{}", (i + 1) % n)) {
                        break r;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                };
                while let Some(ev) = ctx.recv() {
                    if let Event::Message(m) = ev {
                        let hops = *m.get::<u64>().unwrap();
                        if hops == 0 {
                            ctx.send(&main_ref, &i).unwrap();
                        } else {
                            ctx.send(&next, &(hops - 1)).unwrap();
                        }
                    }
                }
            })
            .unwrap();
    }
    let first = cluster.lookup("/ring/0").unwrap();
    let hops = laps * n as u64;
    first.send(&hops).unwrap();
    let last = expect_message(&mailbox, Duration::from_secs(100), |m| {
        *m.get::<usize>().unwrap()
    });
    assert_eq!(u64::from(last.to_native()), hops % n as u64);
    let placements: Vec<Placement> = (0..n)
        .map(|i| cluster.lookup(&format!("/ring/{i}")).unwrap().placement())
        .collect();
    let dedicated = placements
        .iter()
        .filter(|p| matches!(p, Placement::Dedicated(_)))
        .count();
    assert!(dedicated <= std::thread::available_parallelism().map_or(1, |n| n.get()));
    cluster.shutdown();
    cluster.join(T).unwrap();
}

#[test]
fn sixty_four_parking_isolates_on_few_cores() {
    with_timeout(Duration::from_secs(120), || {
        token_ring(64, 20, WaitStrategy::default())
    });
}

#[test]
fn every_wait_strategy_delivers() {
    with_timeout(Duration::from_secs(120), || {
        token_ring(4, 200, WaitStrategy::Yield);
        token_ring(2, 500, WaitStrategy::BusySpin);
        token_ring(
            8,
            50,
            WaitStrategy::SpinThenPark {
                spin: Duration::ZERO,
            },
        );
    });
}

/// A busy-spinning receiver with nothing to read spins on its fast poll and runs the full
/// turn only now and then: its deadline must still hold (no early `None`), and a message on
/// a link other than the one it last read must still arrive.
#[test]
fn a_busy_spinning_receiver_keeps_its_deadline_and_reads_every_link() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::builder()
            .wait_strategy(WaitStrategy::BusySpin)
            .build();
        let mailbox = cluster.mailbox().unwrap();
        let me = mailbox.me().clone();

        let wait = Duration::from_millis(30);
        let t = std::time::Instant::now();
        assert!(mailbox.recv_timeout(wait).is_none(), "nothing was sent");
        assert!(t.elapsed() >= wait, "returned after {:?}", t.elapsed());
        assert!(!mailbox.is_finished(), "a timeout, not a stop");

        // Two senders, each on its own link: the second message comes on a link that is
        // not the one the receiver read last.
        for v in [1u64, 2] {
            std::thread::scope(|s| {
                s.spawn(|| cluster.mailbox().unwrap().send(&me, &v).unwrap());
            });
            match mailbox.recv_timeout(T) {
                Some(Event::Message(m)) => assert_eq!(*m.get::<u64>().unwrap(), v),
                other => panic!("expected message {v}, got {other:?}"),
            }
        }
        assert!(mailbox.recv_timeout(Duration::from_millis(5)).is_none());
    });
}

#[test]
fn dropping_the_cluster_never_hangs_on_an_isolate_that_ignores_shutdown() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::builder()
            .drop_timeout(Duration::from_millis(300))
            .build();
        let stubborn = cluster
            .spawn("/stubborn", Properties::new(), |ctx| {
                ctx.on_shutdown_request(|_| {});
                while ctx.recv().is_some() {}
            })
            .unwrap();
        cluster.shutdown();
        assert!(matches!(
            cluster.join(Duration::from_millis(100)),
            Err(isolate_cluster::JoinError::Timeout { running }) if running == ["/stubborn"]
        ));
        let t = std::time::Instant::now();
        drop(cluster);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "drop waited {:?}",
            t.elapsed()
        );
        assert!(
            stubborn.is_alive(),
            "the isolate still runs; the program may exit"
        );
    });
}

/// A sender that never idles keeps talking to new incarnations at one path: its links to
/// the stopped ones are dropped (with their rings) when it links to the next, instead of
/// piling up for as long as it lives (found by the soak test's heap check).
#[test]
fn links_to_stopped_isolates_do_not_pile_up() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        for n in 0..40u64 {
            let t = cluster
                .spawn("/short", Properties::new(), |ctx| {
                    // One message, then stop.
                    let _ = ctx.recv();
                })
                .unwrap();
            mailbox.send(&t, &n).unwrap();
            t.wait_down(Duration::from_secs(20)).expect("stopped");
            let links = mailbox.link_occupancy().len();
            assert!(links <= 1, "{links} links after {} incarnations", n + 1);
        }
        cluster.shutdown();
        cluster.join(Duration::from_secs(20)).unwrap();
    });
}
