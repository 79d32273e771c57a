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
