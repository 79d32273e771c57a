//! `run` / `compute`, the worker pool and the robust worker.

mod common;

use std::time::Duration;

use common::with_timeout;
use isolate_cluster::{CallError, Cluster, DownReason, RunError};

const T: Duration = Duration::from_secs(20);

fn square(x: u64) -> u64 {
    x * x
}

#[test]
fn run_returns_the_value_moved_out_and_reports_panics() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::single_node();
        let v = cluster.run(|| vec![7u8; 1 << 20]).unwrap();
        assert_eq!((v.len(), v[12345]), (1 << 20, 7));
        assert_eq!(*cluster.compute(square, 12).unwrap(), 144);
        match cluster.run(|| -> u8 { panic!("no result today") }) {
            Err(RunError::Panicked(m)) => assert_eq!(m, "no result today"),
            other => panic!("expected Panicked, got {other:?}"),
        }
        // Short-lived isolates are gone when run returns.
        cluster.join(T).unwrap();
    });
}

#[test]
fn a_pool_runs_many_jobs_and_survives_a_panicking_one() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let pool = cluster.worker_pool("/pool", 3).unwrap();
        assert_eq!(pool.workers().len(), 3);
        let mailbox = cluster.mailbox().unwrap();
        for i in 0..300u64 {
            let r = pool
                .run(&mailbox, move || format!("job {i}: {}", i * 3), T)
                .unwrap();
            assert_eq!(*r, format!("job {i}: {}", i * 3));
        }
        match pool.run(&mailbox, || -> u32 { panic!("boom") }, T) {
            Err(CallError::Remote(m)) => assert_eq!(m, "job panicked: boom"),
            other => panic!("expected a remote error, got {other:?}"),
        }
        let after: Vec<u32> = (0..6)
            .map(|i| *pool.run(&mailbox, move || i + 1, T).unwrap())
            .collect();
        assert_eq!(after, [1, 2, 3, 4, 5, 6], "every worker still runs jobs");
        assert!(pool.workers().iter().all(|w| w.is_alive()));
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn the_robust_worker_answers_fails_and_closes() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let worker = cluster
            .worker::<u64, u64, _>("/worker", |n| match n.to_native() {
                0 => Err("zero is not allowed".to_owned()),
                7 => panic!("seven"),
                n => Ok(n * 2),
            })
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        assert_eq!(
            *worker.call(&mailbox, &21, T).unwrap().get::<u64>().unwrap(),
            42
        );
        assert_eq!(
            worker.call(&mailbox, &0, T).err(),
            Some(CallError::Remote("zero is not allowed".into()))
        );
        assert_eq!(
            worker.call(&mailbox, &7, T).err(),
            Some(CallError::Remote("handler panicked: seven".into()))
        );
        // Many in flight, then close: every one sent before close is answered.
        let ids: Vec<_> = (8..=107u64)
            .map(|n| (n, worker.request(&mailbox, &n).unwrap()))
            .collect();
        worker.close(&mailbox);
        assert!(worker.is_closed());
        assert_eq!(worker.request(&mailbox, &1).err(), Some(CallError::Closed));
        for (n, id) in ids {
            assert_eq!(
                *mailbox.wait_reply(id, T).unwrap().get::<u64>().unwrap(),
                n * 2
            );
        }
        assert_eq!(worker.isolate().wait_down(T), Some(DownReason::Normal));
        cluster.join(T).unwrap();
    });
}

#[test]
fn run_moves_its_result_out_without_copying() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::single_node();
        let (tx, rx) = std::sync::mpsc::channel();
        let v = cluster
            .run(move || {
                let v = vec![3u8; 1 << 20];
                tx.send(v.as_ptr() as usize).unwrap();
                v
            })
            .unwrap();
        assert_eq!(v.as_ptr() as usize, rx.recv().unwrap(), "the same buffer");
        cluster.join(T).unwrap();
    });
}

#[test]
fn requests_racing_close_on_other_threads_are_answered_or_closed() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let worker = cluster
            .worker::<u64, u64, _>("/worker", |n| Ok(n.to_native() + 1))
            .unwrap();
        let (answered, closed) = std::thread::scope(|s| {
            let callers: Vec<_> = (0..4u64)
                .map(|t| {
                    let (cluster, worker) = (&cluster, &worker);
                    s.spawn(move || {
                        let mailbox = cluster.mailbox().unwrap();
                        let (mut answered, mut closed) = (0u64, 0u64);
                        for i in 0..100_000u64 {
                            let n = t * 1_000_000 + i;
                            match worker.call(&mailbox, &n, T) {
                                Ok(m) => {
                                    assert_eq!(closed, 0, "an answer after Closed");
                                    assert_eq!(*m.get::<u64>().unwrap(), n + 1);
                                    answered += 1;
                                }
                                Err(CallError::Closed) => {
                                    closed += 1;
                                    if closed == 10 {
                                        break;
                                    }
                                }
                                Err(e) => panic!("request {n}: {e:?}"),
                            }
                        }
                        (answered, closed)
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(20));
            let mailbox = cluster.mailbox().unwrap();
            worker.close(&mailbox);
            callers
                .into_iter()
                .map(|c| c.join().unwrap())
                .fold((0, 0), |(a, c), (a2, c2)| (a + a2, c + c2))
        });
        assert!(answered > 0, "some calls were made before close");
        assert_eq!(closed, 40, "every caller ends on Closed");
        assert_eq!(worker.isolate().wait_down(T), Some(DownReason::Normal));
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn dropping_a_worker_or_a_pool_stops_their_isolates() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let worker = cluster
            .worker::<u64, u64, _>("/worker", |n| Ok(n.to_native()))
            .unwrap();
        let id = worker.request(&mailbox, &9).unwrap();
        let isolate = worker.isolate().clone();
        drop(worker);
        // A request sent before the drop is still answered.
        assert_eq!(*mailbox.wait_reply(id, T).unwrap().get::<u64>().unwrap(), 9);
        assert_eq!(isolate.wait_down(T), Some(DownReason::Normal));
        let pool = cluster.worker_pool("/pool", 3).unwrap();
        assert_eq!(*pool.run(&mailbox, || 5u8, T).unwrap(), 5);
        let workers = pool.workers().to_vec();
        drop(pool);
        for w in workers {
            assert_eq!(w.wait_down(T), Some(DownReason::Normal), "{}", w.path());
        }
        // The paths are free again.
        let again = cluster.worker_pool("/pool", 2).unwrap();
        assert_eq!(*again.run(&mailbox, || 6u8, T).unwrap(), 6);
        drop(again);
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn a_call_to_a_worker_that_died_fails_with_its_reason() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        // `/parent` returns on its first message; the worker below it is stopped first.
        let parent = cluster
            .spawn("/parent", isolate_cluster::Properties::new(), |ctx| {
                ctx.recv();
            })
            .unwrap();
        let worker = cluster
            .worker::<u64, u64, _>("/parent/worker", |n| Ok(n.to_native()))
            .unwrap();
        assert_eq!(
            *worker.call(&mailbox, &4, T).unwrap().get::<u64>().unwrap(),
            4
        );
        parent.send(&0u8).unwrap();
        assert_eq!(worker.isolate().wait_down(T), Some(DownReason::Normal));
        assert!(!worker.is_closed());
        assert_eq!(
            worker.call(&mailbox, &1, T).err(),
            Some(CallError::TargetDown(Some(DownReason::Normal)))
        );
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn a_pool_job_past_its_timeout_is_dropped_and_counted_when_it_ends() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts its drops.
    struct Tracked(Arc<AtomicUsize>);
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let pool = cluster.worker_pool("/pool", 1).unwrap();
        let drops = Arc::new(AtomicUsize::new(0));
        let d = drops.clone();
        let slow = move || {
            std::thread::sleep(Duration::from_millis(300));
            Tracked(d)
        };
        assert_eq!(
            pool.run(&mailbox, slow, Duration::from_millis(50)).err(),
            Some(CallError::Timeout)
        );
        assert_eq!(drops.load(Ordering::SeqCst), 0, "still running");
        // The one worker answers the slow job first: its late result is read while this
        // call waits, dropped (not leaked) and counted.
        assert_eq!(*pool.run(&mailbox, || 1u8, T).unwrap(), 1);
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "the late result was dropped"
        );
        let stats = cluster.stats();
        let me = stats
            .endpoints
            .iter()
            .find(|e| e.id == mailbox.me().id())
            .unwrap();
        assert_eq!(me.late_replies, 1);
        drop(pool);
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn a_pool_that_cannot_spawn_every_worker_stops_those_it_started() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        // `/pool/1` is taken: the pool starts `/pool/0`, then fails on `/pool/1`.
        let squatter = cluster
            .spawn("/pool/1", isolate_cluster::Properties::new(), |ctx| {
                while ctx.recv().is_some() {}
            })
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        mailbox.watch_isolates(|r| r.path() == "/pool/0");
        match cluster.worker_pool("/pool", 3) {
            Err(isolate_cluster::SpawnError::Duplicate(p)) => assert_eq!(p, "/pool/1"),
            Err(e) => panic!("expected Duplicate, got {e:?}"),
            Ok(_) => panic!("expected Duplicate, got a pool"),
        }
        let started = match mailbox.recv_timeout(T) {
            Some(isolate_cluster::Event::IsolateUp(r)) => r,
            other => panic!("expected /pool/0 up, got {other:?}"),
        };
        assert_eq!(started.wait_down(T), Some(DownReason::Normal));
        assert!(squatter.is_alive(), "only the pool's own workers stop");
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}
