//! The task scheduler: start, deadline order, periodic deadlines (no drift, skip and
//! catch-up), cancel from inside and outside, failures, unknown names, argument types,
//! result streams, clients in isolates, broadcast, and use after stop.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::with_timeout;
use isolate_cluster::task::{
    Missed, Scheduler, TaskClient, TaskError, TaskKey, TaskResult, TaskSpec,
};
use isolate_cluster::{rkyv, Cluster, Event, Inbox, Properties};

const T: Duration = Duration::from_secs(20);
const LIMIT: Duration = Duration::from_secs(60);

/// Polls `f` until it holds, failing after `T`.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The next published task result in `inbox` (other events are a test failure).
fn next_result(inbox: &Inbox) -> TaskResult {
    match inbox.recv_timeout(T) {
        Some(Event::Message(m)) => TaskResult::from_message(&m)
            .expect("a published result")
            .expect("a valid result"),
        other => panic!("expected a result, got {other:?}"),
    }
}

fn finish(cluster: Cluster) {
    cluster.shutdown();
    cluster.join(T).expect("cluster stops");
}

#[test]
fn nothing_runs_before_start_then_one_offs_run_in_deadline_order() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut scheduler = Scheduler::new();
        // Delays out of order, and two equal ones (they run in the order they were added).
        for (label, ms) in [("c", 60u64), ("a1", 20), ("b", 40), ("a2", 20), ("now", 0)] {
            let order = order.clone();
            scheduler
                .once(Duration::from_millis(ms), move |_t| {
                    order.lock().unwrap().push(label)
                })
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            order.lock().unwrap().is_empty(),
            "nothing runs before start"
        );
        let client = scheduler.start(&cluster, "/scheduler").unwrap();
        eventually("five runs", || order.lock().unwrap().len() == 5);
        assert_eq!(*order.lock().unwrap(), ["now", "a1", "a2", "b", "c"]);
        // Unnamed one-off tasks are gone once they ran.
        let mailbox = cluster.mailbox().unwrap();
        assert!(client.tasks(&mailbox, T).unwrap().is_empty());
        assert_eq!(client.status(&mailbox, T).unwrap().runs, 5);
        finish(cluster);
    });
}

#[test]
fn periodic_task_cancels_itself_after_three_runs() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let runs = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut scheduler = Scheduler::new();
        let (r, s) = (runs.clone(), seen.clone());
        let foo = scheduler
            .every(Duration::from_millis(5), move |t| {
                let i = r.fetch_add(1, Ordering::SeqCst) + 1;
                s.lock().unwrap().push(t.run());
                if i >= 3 {
                    t.cancel();
                }
            })
            .unwrap();
        let client = scheduler.start(&cluster, "/scheduler").unwrap();
        let mailbox = cluster.mailbox().unwrap();
        eventually("three runs", || runs.load(Ordering::SeqCst) >= 3);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(runs.load(Ordering::SeqCst), 3, "no run after the cancel");
        assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
        assert!(client.tasks(&mailbox, T).unwrap().is_empty());
        assert_eq!(client.cancel(&mailbox, &foo, T), Ok(false));
        finish(cluster);
    });
}

#[test]
fn cancel_from_outside_by_handle_and_by_name() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let a = Arc::new(AtomicU64::new(0));
        let b = Arc::new(AtomicU64::new(0));
        let mut scheduler = Scheduler::new();
        let ca = a.clone();
        let task_a = scheduler
            .every(Duration::from_millis(2), move |_t| {
                ca.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        let cb = b.clone();
        scheduler
            .add(
                TaskSpec::every(Duration::from_millis(2))
                    .name("b")
                    .run(move |_t| {
                        cb.fetch_add(1, Ordering::SeqCst);
                    }),
            )
            .unwrap();
        let client = scheduler.start(&cluster, "/scheduler").unwrap();
        let mailbox = cluster.mailbox().unwrap();
        eventually("runs of both", || {
            a.load(Ordering::SeqCst) >= 2 && b.load(Ordering::SeqCst) >= 2
        });
        assert_eq!(client.cancel(&mailbox, &task_a, T), Ok(true));
        let after_a = a.load(Ordering::SeqCst);
        assert_eq!(client.cancel(&mailbox, "b", T), Ok(true));
        let after_b = b.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(a.load(Ordering::SeqCst), after_a, "a ran after its cancel");
        assert_eq!(b.load(Ordering::SeqCst), after_b, "b ran after its cancel");
        assert_eq!(client.cancel(&mailbox, "b", T), Ok(false));
        assert_eq!(client.cancel(&mailbox, TaskKey::Id(999), T), Ok(false));
        finish(cluster);
    });
}

#[test]
fn failing_tasks_give_failed_results_and_the_scheduler_keeps_running() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let mut scheduler = Scheduler::new();
        scheduler
            .add(
                TaskSpec::on_demand("panics")
                    .run(|_t| -> Result<u64, String> { panic!("boom in a task") }),
            )
            .unwrap();
        scheduler
            .add(TaskSpec::on_demand("errs").run(|_t| Err::<u64, _>("nope")))
            .unwrap();
        scheduler
            .add(TaskSpec::on_demand("ok").run(|t| Ok::<u64, String>(t.run())))
            .unwrap();
        let client = scheduler.start(&cluster, "/scheduler").unwrap();
        let mailbox = cluster.mailbox().unwrap();

        let r = client.run(&mailbox, "panics", &(), T).unwrap();
        assert!(!r.successful);
        assert_eq!(r.error.as_deref(), Some("panicked: boom in a task"));
        let bt = r.backtrace.clone().expect("a backtrace");
        assert!(bt.starts_with("at "), "{bt}");
        assert!(bt.contains("scheduler.rs"), "{bt}");
        assert_eq!(r.value::<u64>(), Err(TaskError::NoValue));

        let r = client.run(&mailbox, "errs", &(), T).unwrap();
        assert!(!r.successful);
        assert_eq!(r.error.as_deref(), Some("nope"));
        assert_eq!(r.backtrace, None);

        // Still running, and counting.
        let r = client.run(&mailbox, "ok", &(), T).unwrap();
        assert!(r.successful);
        assert_eq!(r.name.as_deref(), Some("ok"));
        assert_eq!(*r.value::<u64>().unwrap(), 1);
        assert_eq!(
            r.value::<String>(),
            Err(TaskError::ValueType {
                expected: "alloc::string::String".into(),
                found: "u64".into()
            })
        );
        let r = client.run(&mailbox, "panics", &(), T).unwrap();
        assert_eq!(r.run, 2);
        let s = client.status(&mailbox, T).unwrap();
        assert_eq!((s.tasks, s.runs, s.failed, s.rejected), (3, 4, 3, 0));
        finish(cluster);
    });
}

#[test]
fn unknown_names_and_wrong_argument_types_are_specific_errors() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let mut scheduler = Scheduler::new();
        scheduler
            .named::<String, _, _>("greet", |_t, msg: &rkyv::string::ArchivedString| {
                Ok::<String, String>(format!("{msg}!"))
            })
            .unwrap();
        let client = scheduler.start(&cluster, "/scheduler").unwrap();
        let mailbox = cluster.mailbox().unwrap();

        let r = client
            .run(&mailbox, "greet", &"Hello, world".to_string(), T)
            .unwrap();
        assert!(r.successful);
        assert_eq!(r.value::<String>().unwrap().as_str(), "Hello, world!");

        assert_eq!(
            client.run(&mailbox, "nope", &(), T).unwrap_err(),
            TaskError::UnknownTask("nope".into())
        );
        assert_eq!(
            client.run(&mailbox, "greet", &5u64, T).unwrap_err(),
            TaskError::WrongArguments {
                task: "greet".into(),
                expected: "alloc::string::String".into(),
                found: "u64".into()
            }
        );
        assert_eq!(
            client.run(&mailbox, "greet", &(), T).unwrap_err(),
            TaskError::WrongArguments {
                task: "greet".into(),
                expected: "alloc::string::String".into(),
                found: "()".into()
            }
        );
        assert_eq!(
            client.subscribe(&mailbox, "nope", T),
            Err(TaskError::UnknownTask("nope".into()))
        );
        // A fire-and-forget run that is refused is counted, not lost silently.
        client.dispatch(&mailbox, "nope", &()).unwrap();
        client.dispatch(&mailbox, "greet", &1u8).unwrap();
        let s = client.status(&mailbox, T).unwrap();
        assert_eq!((s.runs, s.rejected), (1, 2));
        finish(cluster);
    });
}

#[test]
fn definitions_are_checked_when_added() {
    let mut s = Scheduler::new();
    s.add(TaskSpec::on_demand("x").run(|_t| ())).unwrap();
    assert_eq!(
        s.add(TaskSpec::on_demand("x").run(|_t| ())).unwrap_err(),
        TaskError::DuplicateName("x".into())
    );
    assert_eq!(
        s.add(TaskSpec::every(Duration::ZERO).run(|_t| ()))
            .unwrap_err(),
        TaskError::ZeroPeriod
    );
    // Scheduled runs of a task with arguments need default arguments of its type.
    let e = s
        .add(
            TaskSpec::every(Duration::from_secs(1))
                .name("fib")
                .run_with::<u64, _, _>(|_t, _n| ()),
        )
        .unwrap_err();
    assert!(
        matches!(e, TaskError::WrongArguments { ref found, .. } if found == "()"),
        "{e}"
    );
    let e = s
        .add(
            TaskSpec::every(Duration::from_secs(1))
                .name("fib")
                .args(&"13".to_string())
                .run_with::<u64, _, _>(|_t, _n| ()),
        )
        .unwrap_err();
    assert!(matches!(e, TaskError::WrongArguments { ref found, .. } if found.contains("String")));
    let ok = s
        .add(
            TaskSpec::every(Duration::from_secs(1))
                .name("fib")
                .args(&13u64)
                .run_with::<u64, _, _>(|_t, _n| ()),
        )
        .unwrap();
    assert_eq!((ok.id, ok.name.as_deref()), (2, Some("fib")));
}

#[test]
fn results_stream_to_subscribers_with_default_arguments() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let mut scheduler = Scheduler::new();
        // The seed's `scheduler.minutes(3, fibonacci, args: [13])`, faster.
        scheduler
            .add(
                TaskSpec::every(Duration::from_millis(3))
                    .name("fib")
                    .args(&13u64)
                    .run_with::<u64, _, _>(|t, n: &rkyv::Archived<u64>| {
                        Ok::<(u64, u64), String>((t.run(), fib(n.to_native())))
                    }),
            )
            .unwrap();
        let client = scheduler.start(&cluster, "/scheduler").unwrap();
        let mailbox = cluster.mailbox().unwrap();
        let id = client.subscribe(&mailbox, "fib", T).unwrap();
        let first = next_result(&mailbox);
        assert_eq!(first.task, id);
        let mut last = first.run;
        for _ in 0..5 {
            let r = next_result(&mailbox);
            assert!(r.successful);
            let v = r.value::<(u64, u64)>().unwrap();
            assert_eq!(v.0.to_native(), r.run);
            assert_eq!(v.1.to_native(), 233);
            // Every run reaches the subscriber, in order (skipped deadlines are no runs).
            assert_eq!(r.run, last + 1);
            last = r.run;
        }
        assert_eq!(client.unsubscribe(&mailbox, "fib", T), Ok(true));
        assert_eq!(client.unsubscribe(&mailbox, "fib", T), Ok(false));
        // Results already published may still arrive; after them, nothing.
        std::thread::sleep(Duration::from_millis(20));
        while let Some(ev) = mailbox.try_recv() {
            assert!(matches!(ev, Event::Message(_)));
        }
        std::thread::sleep(Duration::from_millis(30));
        assert!(mailbox.try_recv().is_none(), "a result after unsubscribe");
        finish(cluster);
    });
}

fn fib(n: u64) -> u64 {
    if n < 2 {
        n
    } else {
        fib(n - 1) + fib(n - 2)
    }
}

/// Per run: deadlines skipped before it, its deadline, its end and its lateness.
type RunLog = Arc<Mutex<Vec<(u64, Instant, Instant, Duration)>>>;

/// Records each run's deadline; the first run sleeps `stall` (the scheduler is busy past
/// later deadlines).
fn stalling_task(missed: Missed, period: Duration, stall: Duration, log: RunLog) -> TaskSpec {
    TaskSpec::every(period)
        .name("stall")
        .missed(missed)
        .run(move |t| {
            if t.run() == 1 {
                std::thread::sleep(stall);
            }
            log.lock()
                .unwrap()
                .push((t.missed(), t.scheduled_for(), Instant::now(), t.lateness()));
            if t.run() == 4 {
                t.cancel();
            }
        })
}

/// Runs `stalling_task` (20 ms period, the first run taking 70 ms) until its fourth run
/// and returns the log of the four runs.
fn stalled_runs(missed: Missed) -> Vec<(u64, Instant, Instant, Duration)> {
    let cluster = Cluster::single_node();
    let period = Duration::from_millis(20);
    let log: RunLog = Arc::new(Mutex::new(Vec::new()));
    let mut scheduler = Scheduler::new();
    scheduler
        .add(stalling_task(
            missed,
            period,
            Duration::from_millis(70),
            log.clone(),
        ))
        .unwrap();
    scheduler.start(&cluster, "/scheduler").unwrap();
    eventually("four runs", || log.lock().unwrap().len() == 4);
    finish(cluster);
    let runs = log.lock().unwrap().clone();
    runs
}

#[test]
fn missed_deadlines_are_skipped_by_default() {
    with_timeout(LIMIT, || {
        let period = Duration::from_millis(20);
        let log = stalled_runs(Missed::Skip);
        let (_, _, end1, _) = log[0];
        // Run 1 ended at least 70 ms after its deadline: at least 3 deadlines passed.
        assert!(log[1].0 >= 3, "skipped {}", log[1].0);
        // Run 2 is on the grid, at the first deadline after run 1 ended.
        assert!(log[1].1 > end1 - period, "run 2 was a late catch-up");
        for w in log.windows(2) {
            // Each run is `missed + 1` periods after the one before, exactly.
            assert_eq!(w[1].1 - w[0].1, period * (w[1].0 as u32 + 1), "{:?}", w[1]);
        }
    });
}

#[test]
fn missed_deadlines_are_caught_up_when_asked() {
    with_timeout(LIMIT, || {
        let period = Duration::from_millis(20);
        let log = stalled_runs(Missed::CatchUp);
        let (_, _, end1, _) = log[0];
        for w in log.windows(2) {
            // Every deadline runs, one period apart on the grid, none skipped.
            assert_eq!(w[1].1 - w[0].1, period);
            assert_eq!(w[1].0, 0);
        }
        // Run 2's deadline passed while run 1 slept: it ran late, right after.
        let (_, s2, _, late2) = log[1];
        assert!(s2 < end1);
        assert!(late2 >= Duration::from_millis(40), "lateness {late2:?}");
    });
}

#[test]
fn periodic_deadlines_do_not_drift() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let period = Duration::from_millis(3);
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut scheduler = Scheduler::new();
        let l = log.clone();
        scheduler
            .every(period, move |t| {
                // Work that takes a while: a scheduler that re-armed from "now" would drift.
                let spin = Instant::now();
                while spin.elapsed() < Duration::from_micros(500) {}
                l.lock().unwrap().push(t.scheduled_for());
                if t.run() == 30 {
                    t.cancel();
                }
            })
            .unwrap();
        scheduler.start(&cluster, "/scheduler").unwrap();
        eventually("30 runs", || log.lock().unwrap().len() == 30);
        let log = log.lock().unwrap();
        for w in log.windows(2) {
            let gap = w[1] - w[0];
            // Exactly on the grid: one period, or a whole number of them if the machine
            // stalled the scheduler past a deadline (skipped).
            assert!(
                gap >= period && gap.as_nanos() % period.as_nanos() == 0,
                "{gap:?}"
            );
        }
        drop(log);
        finish(cluster);
    });
}

#[test]
fn clients_in_isolates_connect_with_a_timeout_and_run_by_name() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let me = mailbox.me().clone();
        // The client isolate starts first and waits for the scheduler to appear.
        cluster
            .spawn("/app/0", Properties::new(), move |ctx| {
                let client = TaskClient::connect(ctx, "/scheduler", T).expect("connect");
                let r = client
                    .run(ctx, "greet", &"from an isolate".to_string(), T)
                    .expect("run");
                let text = r.value::<String>().unwrap().as_str().to_owned();
                ctx.send(&me, &text).unwrap();
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut scheduler = Scheduler::new();
        scheduler
            .named::<String, _, _>("greet", |t, msg: &rkyv::string::ArchivedString| {
                Ok::<String, String>(format!("{} ran {msg}", t.name().unwrap()))
            })
            .unwrap();
        scheduler.start(&cluster, "/scheduler").unwrap();
        match mailbox.recv_timeout(T) {
            Some(Event::Message(m)) => {
                assert_eq!(
                    m.get::<String>().unwrap().as_str(),
                    "greet ran from an isolate"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            TaskClient::connect(&mailbox, "/nobody", Duration::from_millis(30)).unwrap_err(),
            TaskError::NotFound("/nobody".into())
        );
        assert!(matches!(
            TaskClient::connect(&mailbox, "nobody", T),
            Err(TaskError::Path(_))
        ));
        finish(cluster);
    });
}

#[test]
fn connect_to_something_else_is_a_protocol_error() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        cluster
            .spawn("/echo", Properties::new(), |ctx| {
                while let Some(Event::Message(m)) = ctx.recv() {
                    let _ = m.reply(&7u64);
                }
            })
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        assert!(matches!(
            TaskClient::connect(&mailbox, "/echo", T),
            Err(TaskError::Protocol(_))
        ));
        finish(cluster);
    });
}

#[test]
fn tasks_added_after_start_and_run_after_stop() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let client = Scheduler::new().start(&cluster, "/scheduler").unwrap();
        let mailbox = cluster.mailbox().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let task = client
            .add(
                &mailbox,
                TaskSpec::once(Duration::from_millis(5))
                    .name("later")
                    .run(move |_t| {
                        h.fetch_add(1, Ordering::SeqCst);
                    }),
                T,
            )
            .unwrap();
        assert_eq!(task.name.as_deref(), Some("later"));
        eventually("the delayed run", || hits.load(Ordering::SeqCst) == 1);
        // A named one-off stays runnable by name.
        assert!(client.run(&mailbox, "later", &(), T).unwrap().successful);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        assert_eq!(
            client
                .add(&mailbox, TaskSpec::on_demand("later").run(|_t| ()), T)
                .unwrap_err(),
            TaskError::DuplicateName("later".into())
        );
        let list = client.tasks(&mailbox, T).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0].id, list[0].runs, list[0].next_in),
            (task.id, 2, None)
        );
        assert_eq!(list[0].kind, "once");

        client.stop(&mailbox, T).unwrap();
        assert_eq!(
            client.run(&mailbox, "later", &(), T).unwrap_err(),
            TaskError::Stopped
        );
        assert_eq!(client.status(&mailbox, T).unwrap_err(), TaskError::Stopped);
        assert_eq!(
            client.dispatch(&mailbox, "later", &()).unwrap_err(),
            TaskError::Stopped
        );
        finish(cluster);
    });
}

#[test]
fn broadcast_reaches_every_isolate_or_those_whose_properties_match() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        for (path, role) in [("/w/0", "web"), ("/w/1", "web"), ("/d/0", "db")] {
            cluster
                .spawn(path, Properties::new().with("role", role), |ctx| {
                    while let Some(Event::Message(m)) = ctx.recv() {
                        let text = m.get::<String>().unwrap().as_str().to_owned();
                        let _ = m.reply(&format!("{} {text}", ctx.path()));
                    }
                })
                .unwrap();
        }
        let stopped = cluster
            .spawn("/gone", Properties::new().with("role", "web"), |_ctx| {})
            .unwrap();
        stopped.wait_down(T).expect("stopped");
        let client = Scheduler::new().start(&cluster, "/scheduler").unwrap();

        let collect = |n: usize| {
            let mut got: Vec<String> = (0..n)
                .map(|_| match mailbox.recv_timeout(T) {
                    Some(Event::Message(m)) => m.get::<String>().unwrap().as_str().to_owned(),
                    other => panic!("{other:?}"),
                })
                .collect();
            got.sort();
            assert!(mailbox.recv_timeout(Duration::from_millis(20)).is_none());
            got
        };
        let web = Properties::new().with("role", "web");
        let b = client.broadcast(&mailbox, &"hi".to_string(), &web);
        assert_eq!((b.sent, b.failed.len()), (2, 0));
        assert_eq!(collect(2), ["/w/0 hi", "/w/1 hi"]);

        // Everyone but the scheduler (it would ignore a message that is no request).
        let b = mailbox.broadcast(&"all".to_string(), |r| r.path() != "/scheduler");
        assert_eq!(b.sent, 3);
        assert_eq!(collect(3), ["/d/0 all", "/w/0 all", "/w/1 all"]);

        let b = cluster.broadcast(&"db".to_string(), |r| {
            r.property("role").is_some_and(|v| v == "db")
        });
        assert_eq!(b.sent, 1);
        assert_eq!(collect(1), ["/d/0 db"]);
        finish(cluster);
    });
}

#[test]
fn results_too_large_for_a_ring_arrive_without_their_value() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::builder().ring_capacity(4096).build();
        let mut scheduler = Scheduler::new();
        scheduler
            .add(TaskSpec::on_demand("big").run(|_t| Ok::<Vec<u8>, String>(vec![7; 100_000])))
            .unwrap();
        scheduler
            .add(TaskSpec::on_demand("small").run(|_t| Ok::<u8, String>(1)))
            .unwrap();
        let client = scheduler.start(&cluster, "/scheduler").unwrap();
        let mailbox = cluster.mailbox().unwrap();
        client.subscribe(&mailbox, "big", T).unwrap();
        let r = client.run(&mailbox, "big", &(), T).unwrap();
        assert!(!r.successful);
        assert!(
            r.error
                .as_deref()
                .unwrap()
                .contains("larger than the caller's ring (4096 bytes)"),
            "{:?}",
            r.error
        );
        assert_eq!(r.value::<Vec<u8>>(), Err(TaskError::NoValue));
        let published = next_result(&mailbox);
        assert_eq!(published.run, 1);
        assert!(published.error.unwrap().contains("subscriber's ring"));
        // The scheduler is not stuck.
        assert!(client.run(&mailbox, "small", &(), T).unwrap().successful);
        finish(cluster);
    });
}

#[test]
fn far_away_delays_are_accepted_and_never_come() {
    with_timeout(LIMIT, || {
        let cluster = Cluster::single_node();
        let mut scheduler = Scheduler::new();
        scheduler
            .add(TaskSpec::once(Duration::MAX).name("never").run(|_t| ()))
            .unwrap();
        scheduler
            .add(TaskSpec::every(Duration::MAX).name("rarely").run(|_t| ()))
            .unwrap();
        let client = scheduler.start(&cluster, "/scheduler").unwrap();
        let mailbox = cluster.mailbox().unwrap();
        let list = client.tasks(&mailbox, T).unwrap();
        assert_eq!(list.len(), 2);
        assert!(list.iter().all(|t| t.runs == 0 && t.next_in.is_some()));
        // Still runnable by name.
        assert!(client.run(&mailbox, "never", &(), T).unwrap().successful);
        finish(cluster);
    });
}
