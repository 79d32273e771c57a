//! Supervision: restart policies, the three strategies, intensity and escalation, events
//! to supervisors, references across restarts, monitors, and ordered shutdown.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::with_timeout;
use isolate_cluster::{
    Cluster, Context, DownReason, Event, IsolateRef, Properties, Restart, SendError, SpawnError,
    Supervision,
};

const T: Duration = Duration::from_secs(20);
const LIMIT: Duration = Duration::from_secs(90);

/// A child that panics with "boom <path>" when it receives `1u8`, and returns normally on
/// `2u8`.
fn flaky(ctx: &Context) {
    while let Some(ev) = ctx.recv() {
        if let Event::Message(m) = ev {
            match m.get::<u8>().copied() {
                Ok(1) => panic!("boom {}", ctx.path()),
                Ok(2) => return,
                _ => {}
            }
        }
    }
}

/// Waits until `path` names a live incarnation other than `old`.
fn next_incarnation(cluster: &Cluster, path: &str, old: &IsolateRef) -> IsolateRef {
    let deadline = Instant::now() + T;
    loop {
        if let Ok(r) = cluster.lookup(path) {
            if r != *old && r.is_alive() {
                return r;
            }
        }
        assert!(Instant::now() < deadline, "{path} was not restarted");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A supervisor isolate that spawns `children` under itself and forwards every supervision
/// event it gets, as text, to `events`.
fn supervisor(
    cluster: &Cluster,
    path: &'static str,
    supervision: Supervision,
    children: &'static [&'static str],
    restart: Restart,
    events: mpsc::Sender<String>,
) -> IsolateRef {
    let events = Mutex::new(events);
    cluster
        .spawn_supervised(path, Properties::new(), Restart::Temporary, move |ctx| {
            ctx.supervise_children(supervision);
            for c in children {
                let p = format!("{path}/{c}");
                ctx.spawn_supervised(&p, Properties::new().with("name", *c), restart, flaky)
                    .expect("spawn child");
            }
            let tx = events.lock().unwrap().clone();
            tx.send("ready".into()).unwrap();
            while let Some(ev) = ctx.recv() {
                let line = match ev {
                    Event::ChildFailed(r, why) => format!("failed {} {why}", r.path()),
                    Event::ChildRestarted(r) => format!("restarted {}", r.path()),
                    Event::SupervisionGaveUp(why) => format!("gave up: {why}"),
                    _ => continue,
                };
                let _ = tx.send(line);
            }
        })
        .expect("spawn supervisor")
}

fn ids(cluster: &Cluster, paths: &[&str]) -> Vec<u32> {
    paths
        .iter()
        .map(|p| cluster.lookup(p).expect("live").id())
        .collect()
}

#[test]
fn one_for_one_restarts_only_the_failed_child_with_its_properties() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let (tx, rx) = mpsc::channel();
        supervisor(
            &cluster,
            "/sup",
            Supervision::one_for_one(),
            &["a", "b"],
            Restart::Transient,
            tx,
        );
        assert_eq!(rx.recv_timeout(T).unwrap(), "ready");
        let a = cluster.lookup("/sup/a").unwrap();
        let b = cluster.lookup("/sup/b").unwrap();
        a.send(&1u8).unwrap();
        assert_eq!(
            rx.recv_timeout(T).unwrap(),
            "failed /sup/a panicked: boom /sup/a"
        );
        assert_eq!(rx.recv_timeout(T).unwrap(), "restarted /sup/a");
        let a2 = next_incarnation(&cluster, "/sup/a", &a);
        assert_ne!(a2.id(), a.id());
        assert_eq!(a2.property("name").unwrap(), "a", "same properties");
        assert_eq!(
            cluster.lookup("/sup/b").unwrap().id(),
            b.id(),
            "b untouched"
        );
        // The old reference names the dead incarnation.
        assert!(!a.is_alive());
        assert_eq!(
            a.wait_down(Duration::ZERO),
            Some(DownReason::Panicked("boom /sup/a".into()))
        );
        assert!(matches!(a.send(&0u8), Err(SendError::Disconnected(()))));
        // The new one works.
        a2.send(&1u8).unwrap();
        assert_eq!(
            rx.recv_timeout(T).unwrap(),
            "failed /sup/a panicked: boom /sup/a"
        );
        assert_eq!(rx.recv_timeout(T).unwrap(), "restarted /sup/a");
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn restart_policies_decide_on_normal_exits() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let runs = Arc::new([
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        ]);
        let mut refs = Vec::new();
        for (i, (path, restart)) in [
            ("/permanent", Restart::Permanent),
            ("/transient", Restart::Transient),
            ("/temporary", Restart::Temporary),
        ]
        .into_iter()
        .enumerate()
        {
            let runs = runs.clone();
            let r = cluster
                .spawn_supervised(path, Properties::new(), restart, move |ctx| {
                    runs[i].fetch_add(1, Ordering::SeqCst);
                    flaky(ctx)
                })
                .unwrap();
            refs.push(r);
        }
        for r in &refs {
            r.send(&2u8).unwrap(); // return normally
            assert_eq!(r.wait_down(T), Some(DownReason::Normal));
        }
        let p2 = next_incarnation(&cluster, "/permanent", &refs[0]);
        // Give a wrong restart of the others every chance to show up.
        std::thread::sleep(Duration::from_millis(200));
        assert!(cluster.lookup("/transient").is_err());
        assert!(cluster.lookup("/temporary").is_err());
        let counts: Vec<usize> = runs.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        assert_eq!(counts, [2, 1, 1]);
        // A panic restarts a transient isolate.
        let t = cluster
            .spawn_supervised("/transient2", Properties::new(), Restart::Transient, flaky)
            .unwrap();
        t.send(&1u8).unwrap();
        next_incarnation(&cluster, "/transient2", &t);
        drop(p2);
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn one_for_all_restarts_every_sibling_in_start_order() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::builder()
            .supervision(Supervision::one_for_all().intensity(5, Duration::from_secs(30)))
            .build();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let paths = ["/x", "/y", "/z"];
        for p in paths {
            let starts = starts.clone();
            cluster
                .spawn_supervised(p, Properties::new(), Restart::Permanent, move |ctx| {
                    starts.lock().unwrap().push(ctx.path().to_owned());
                    flaky(ctx)
                })
                .unwrap();
        }
        let mailbox = cluster.mailbox().unwrap();
        mailbox.watch_isolates(|_| true);
        let before = ids(&cluster, &paths);
        cluster.lookup("/y").unwrap().send(&1u8).unwrap();
        // The node's supervision events go to watchers.
        let deadline = Instant::now() + T;
        let mut failed = Vec::new();
        let mut restarted = Vec::new();
        while restarted.len() < 3 {
            assert!(Instant::now() < deadline, "restarts missing: {restarted:?}");
            match mailbox.recv_timeout(T) {
                Some(Event::ChildFailed(r, why)) => failed.push((r.path().to_owned(), why)),
                Some(Event::ChildRestarted(r)) => restarted.push(r.path().to_owned()),
                Some(_) => {}
                None => panic!("no events"),
            }
        }
        assert_eq!(
            failed,
            [("/y".to_owned(), DownReason::Panicked("boom /y".into()))]
        );
        assert_eq!(restarted, paths);
        let after = ids(&cluster, &paths);
        for (b, a) in before.iter().zip(&after) {
            assert_ne!(b, a, "every sibling is a new incarnation");
        }
        // `ChildRestarted` follows the spawn; the entries run right after.
        let deadline = Instant::now() + T;
        while starts.lock().unwrap().len() < 6 {
            assert!(Instant::now() < deadline, "restarted entries did not run");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Spawned in start order (the events above); each entry then runs on its own
        // thread, so only the set of second runs is fixed.
        let mut second = starts.lock().unwrap()[3..].to_vec();
        second.sort();
        assert_eq!(second, paths);
        drop(mailbox);
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn rest_for_one_restarts_the_failed_child_and_those_started_after_it() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let (tx, rx) = mpsc::channel();
        supervisor(
            &cluster,
            "/rest",
            Supervision::rest_for_one(),
            &["a", "b", "c"],
            Restart::Permanent,
            tx,
        );
        assert_eq!(rx.recv_timeout(T).unwrap(), "ready");
        let paths = ["/rest/a", "/rest/b", "/rest/c"];
        let before = ids(&cluster, &paths);
        cluster.lookup("/rest/b").unwrap().send(&1u8).unwrap();
        assert_eq!(
            rx.recv_timeout(T).unwrap(),
            "failed /rest/b panicked: boom /rest/b"
        );
        assert_eq!(rx.recv_timeout(T).unwrap(), "restarted /rest/b");
        assert_eq!(rx.recv_timeout(T).unwrap(), "restarted /rest/c");
        let after = ids(&cluster, &paths);
        assert_eq!(after[0], before[0], "a was started before b: untouched");
        assert_ne!(after[1], before[1]);
        assert_ne!(after[2], before[2]);
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn a_restart_storm_escalates_up_the_tree_until_the_node_gives_up() {
    with_timeout(LIMIT, || {
        // The node restarts `/sup` once; `/sup` restarts its child 3 times per window.
        let cluster = Cluster::builder()
            .supervision(Supervision::one_for_one().intensity(1, Duration::from_secs(60)))
            .build();
        let child_runs = Arc::new(AtomicUsize::new(0));
        let sup_runs = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<String>();
        let tx = Mutex::new(tx);
        let (c, s) = (child_runs.clone(), sup_runs.clone());
        let first = cluster
            .spawn_supervised("/sup", Properties::new(), Restart::Transient, move |ctx| {
                s.fetch_add(1, Ordering::SeqCst);
                ctx.supervise_children(
                    Supervision::one_for_one().intensity(3, Duration::from_secs(60)),
                );
                let c = c.clone();
                ctx.spawn_supervised(
                    "/sup/crash",
                    Properties::new(),
                    Restart::Permanent,
                    move |_| {
                        c.fetch_add(1, Ordering::SeqCst);
                        panic!("crash on start");
                    },
                )
                .expect("spawn child");
                let tx = tx.lock().unwrap().clone();
                while let Some(ev) = ctx.recv() {
                    let line = match ev {
                        Event::ChildFailed(r, why) => format!("failed {} {why}", r.path()),
                        Event::ChildRestarted(r) => format!("restarted {}", r.path()),
                        Event::SupervisionGaveUp(_) => "gave up".to_owned(),
                        _ => continue,
                    };
                    let _ = tx.send(line);
                }
            })
            .unwrap();
        cluster
            .join(T)
            .expect("the node shuts down after giving up");
        assert_eq!(
            child_runs.load(Ordering::SeqCst),
            8,
            "1 + 3 restarts, twice"
        );
        assert_eq!(
            sup_runs.load(Ordering::SeqCst),
            2,
            "the supervisor restarted once"
        );
        let failure = cluster.failure().expect("the node gave up");
        assert!(failure.contains("/sup"), "{failure}");
        match first.wait_down(Duration::ZERO) {
            Some(DownReason::Escalated(why)) => assert!(why.contains("/sup/crash"), "{why}"),
            other => panic!("expected an escalation, got {other:?}"),
        }
        let lines: Vec<String> = rx.try_iter().collect();
        let failed = "failed /sup/crash panicked: crash on start";
        let one_round = [
            failed,
            "restarted /sup/crash",
            failed,
            "restarted /sup/crash",
            failed,
            "restarted /sup/crash",
            failed,
            "gave up",
        ];
        let expected: Vec<&str> = one_round.iter().chain(one_round.iter()).copied().collect();
        assert_eq!(lines, expected);
        assert!(matches!(
            cluster.spawn("/late", Properties::new(), |_| {}),
            Err(SpawnError::ShuttingDown)
        ));
    });
}

#[test]
fn a_supervised_isolate_needs_a_live_parent() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        match cluster.spawn_supervised(
            "/nobody/child",
            Properties::new(),
            Restart::Permanent,
            flaky,
        ) {
            Err(SpawnError::NoSupervisor(p)) => assert_eq!(p, "/nobody"),
            other => panic!("expected NoSupervisor, got {other:?}"),
        }
        assert!(matches!(
            cluster.spawn_supervised("bad path", Properties::new(), Restart::Permanent, flaky),
            Err(SpawnError::InvalidPath(_))
        ));
    });
}

#[test]
fn monitors_get_exactly_one_down_per_isolate() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let target = cluster.spawn("/target", Properties::new(), flaky).unwrap();
        let (tx, rx) = mpsc::channel();
        let t2 = target.clone();
        cluster
            .spawn("/watcher", Properties::new(), move |ctx| {
                ctx.monitor(&t2);
                ctx.monitor(&t2);
                ctx.watch_isolates(|r| r.path() == "/target");
                tx.send(()).unwrap();
                let mut downs = 0;
                while let Some(ev) = ctx.recv_timeout(Duration::from_millis(500)) {
                    if let Event::IsolateDown(r, why) = ev {
                        assert_eq!(r.path(), "/target");
                        assert_eq!(why, DownReason::Panicked("boom /target".into()));
                        downs += 1;
                    }
                }
                // After the quiet period: exactly one.
                ctx.exit(Box::new(downs))
            })
            .unwrap();
        rx.recv_timeout(T).unwrap();
        let mailbox = cluster.mailbox().unwrap();
        mailbox.monitor(&target);
        target.send(&1u8).unwrap();
        let watcher = cluster.lookup("/watcher").unwrap();
        assert_eq!(*watcher.join_exit::<i32>(T).unwrap(), 1);
        match mailbox.recv_timeout(T) {
            Some(Event::IsolateDown(r, _)) => assert_eq!(r, target),
            other => panic!("expected the down event, got {other:?}"),
        }
        // Monitoring a dead isolate reports it at once, with its reason.
        mailbox.monitor(&watcher);
        match mailbox.recv_timeout(T) {
            Some(Event::IsolateDown(r, DownReason::Exited)) => assert_eq!(r, watcher),
            other => panic!("expected the down event, got {other:?}"),
        }
        assert!(mailbox.recv_timeout(Duration::from_millis(100)).is_none());
    });
}

#[test]
fn shutdown_stops_children_before_parents() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let order = Arc::new(Mutex::new(Vec::new()));
        let node = |order: Arc<Mutex<Vec<String>>>| {
            move |ctx: &Context| {
                while let Some(ev) = ctx.recv() {
                    if let Event::ShutdownRequested = ev {
                        // Everything below is already down.
                        let below = ["/p/c/g", "/p/c", "/p/d"]
                            .iter()
                            .filter(|p| p.starts_with(&format!("{}/", ctx.path())))
                            .filter(|p| ctx.lookup(p).is_ok())
                            .count();
                        order
                            .lock()
                            .unwrap()
                            .push(format!("{} ({below} below alive)", ctx.path()));
                    }
                }
            }
        };
        for p in ["/p", "/p/c", "/p/d", "/p/c/g"] {
            cluster
                .spawn(p, Properties::new(), node(order.clone()))
                .unwrap();
        }
        cluster.shutdown();
        cluster.join(T).unwrap();
        let order = order.lock().unwrap().clone();
        assert_eq!(order.len(), 4, "{order:?}");
        assert_eq!(order[0], "/p/c/g (0 below alive)");
        assert_eq!(order[3], "/p (0 below alive)");
        assert!(order[1..3].contains(&"/p/c (0 below alive)".to_owned()));
        assert!(order[1..3].contains(&"/p/d (0 below alive)".to_owned()));
    });
}

#[test]
fn an_isolate_that_stops_takes_its_subtree_with_it() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let parent = cluster.spawn("/parent", Properties::new(), flaky).unwrap();
        let child = cluster
            .spawn("/parent/child", Properties::new(), flaky)
            .unwrap();
        let grandchild = cluster
            .spawn("/parent/child/g", Properties::new(), flaky)
            .unwrap();
        let bystander = cluster
            .spawn("/parentless", Properties::new(), flaky)
            .unwrap();
        parent.send(&1u8).unwrap();
        assert!(parent.wait_down(T).is_some());
        assert_eq!(child.wait_down(T), Some(DownReason::Normal));
        assert_eq!(grandchild.wait_down(T), Some(DownReason::Normal));
        assert!(bystander.is_alive(), "a path prefix is not a parent");
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn one_for_all_stops_a_temporary_sibling_without_restarting_it() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::builder()
            .supervision(Supervision::one_for_all())
            .build();
        let temp = cluster
            .spawn_supervised("/temp", Properties::new(), Restart::Temporary, flaky)
            .unwrap();
        let perm = cluster
            .spawn_supervised("/perm", Properties::new(), Restart::Permanent, flaky)
            .unwrap();
        perm.send(&1u8).unwrap();
        assert_eq!(
            temp.wait_down(T),
            Some(DownReason::Normal),
            "stopped with the others"
        );
        next_incarnation(&cluster, "/perm", &perm);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            cluster.lookup("/temp").is_err(),
            "a temporary child is not restarted"
        );
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

/// Dropped with the supervised entry that captured it: looks the cluster up, which takes
/// the registry lock.
struct Probe(Arc<Cluster>, Arc<AtomicUsize>);
impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.0.lookup("/anything");
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn an_entry_dropped_by_supervision_may_use_the_cluster() {
    with_timeout(LIMIT, || {
        let cluster = Arc::new(Cluster::single_node());
        let dropped = Arc::new(AtomicUsize::new(0));
        let probe = Probe(cluster.clone(), dropped.clone());
        let r = cluster
            .spawn_supervised("/once", Properties::new(), Restart::Transient, move |ctx| {
                let _keep = &probe;
                flaky(ctx)
            })
            .unwrap();
        r.send(&2u8).unwrap(); // a normal return: not restarted, its record goes
        assert_eq!(r.wait_down(T), Some(DownReason::Normal));
        cluster
            .join(T)
            .expect("the supervision thread is not stuck");
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "the entry was dropped once"
        );
        cluster.shutdown();
    });
}

#[test]
fn a_plainly_spawned_supervisor_that_gives_up_is_reported_to_its_parent() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let (tx, rx) = mpsc::channel::<String>();
        let tx = Mutex::new(tx);
        // `/top` spawns `/top/sup` with plain `spawn` (temporary: never restarted);
        // `/top/sup` restarts its crashing child once, then gives up.
        cluster
            .spawn("/top", Properties::new(), move |ctx| {
                let tx = tx.lock().unwrap().clone();
                ctx.spawn("/top/sup", Properties::new(), |ctx| {
                    ctx.supervise_children(
                        Supervision::one_for_one().intensity(1, Duration::from_secs(60)),
                    );
                    ctx.spawn_supervised(
                        "/top/sup/crash",
                        Properties::new(),
                        Restart::Permanent,
                        |_| panic!("crash on start"),
                    )
                    .expect("spawn child");
                    while ctx.recv().is_some() {}
                })
                .expect("spawn /top/sup");
                while let Some(ev) = ctx.recv() {
                    if let Event::ChildFailed(r, why) = ev {
                        let kind = match why {
                            DownReason::Escalated(_) => "escalated",
                            _ => "other",
                        };
                        let _ = tx.send(format!("failed {} {kind}", r.path()));
                    }
                }
            })
            .unwrap();
        assert_eq!(rx.recv_timeout(T).unwrap(), "failed /top/sup escalated");
        // Not restarted, and the node carries on: `/top` is alive, nothing failed.
        assert!(cluster.lookup("/top").unwrap().is_alive());
        assert!(cluster.lookup("/top/sup").is_err());
        assert_eq!(cluster.failure(), None);
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "one event"
        );
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn a_call_through_a_reference_held_across_a_restart_reports_the_old_incarnation_down() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        // Echoes `u64`s; panics on 0.
        let old = cluster
            .spawn_supervised("/echo", Properties::new(), Restart::Permanent, |ctx| {
                while let Some(ev) = ctx.recv() {
                    if let Event::Message(m) = ev {
                        let v = m.get::<u64>().unwrap().to_native();
                        assert_ne!(v, 0, "zero");
                        m.reply(&v).unwrap();
                    }
                }
            })
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        let reply = mailbox.call(&old, &5u64, T).unwrap();
        assert_eq!(reply.get::<u64>().unwrap().to_native(), 5);
        drop(reply);
        old.send(&0u64).unwrap();
        let new = next_incarnation(&cluster, "/echo", &old);
        let why = Some(DownReason::Panicked(
            "assertion `left != right` failed: zero\n  left: 0\n right: 0".into(),
        ));
        assert_eq!(
            mailbox.call(&old, &5u64, T).unwrap_err(),
            isolate_cluster::CallError::TargetDown(why)
        );
        assert!(matches!(
            mailbox.transfer(&old, Box::new(5u64)),
            Err(SendError::Disconnected(_))
        ));
        let reply = mailbox.call(&new, &7u64, T).unwrap();
        assert_eq!(reply.get::<u64>().unwrap().to_native(), 7);
        drop(reply);
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}
