//! Request/reply: correlation ids, many outstanding requests answered out of order,
//! timeouts with late replies dropped and counted, remote errors, panicking handlers.

mod common;

use std::time::{Duration, Instant};

use common::with_timeout;
use isolate_cluster::{CallError, Cluster, Context, DownReason, Event, Properties, SendError};

const T: Duration = Duration::from_secs(20);
const PANIC: u64 = u64::MAX - 1;

/// Doubles every request; `u64::MAX` fails, `PANIC` panics, values above 1000 are
/// answered after that many microseconds.
fn doubler(ctx: &Context) {
    while let Some(ev) = ctx.recv() {
        let Event::Message(m) = ev else { continue };
        let v = m.get::<u64>().unwrap().to_native();
        match v {
            u64::MAX => m.reply_error(&format!("bad input: {v}")).unwrap(),
            PANIC => panic!("unlucky {v}"),
            v if v > 1000 => {
                std::thread::sleep(Duration::from_micros(v));
                m.reply(&(v * 2)).unwrap();
            }
            v => m.reply(&(v * 2)).unwrap(),
        }
    }
}

#[test]
fn a_call_from_main_gets_its_reply() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::single_node();
        let d = cluster
            .spawn("/doubler", Properties::new(), doubler)
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        for i in 0..1000u64 {
            let reply = mailbox.call(&d, &i, T).unwrap();
            assert_eq!(*reply.get::<u64>().unwrap(), i * 2);
        }
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn many_outstanding_requests_answered_out_of_order() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::single_node();
        // Collects 50 requests, then answers them newest first.
        let rev = cluster
            .spawn("/reverser", Properties::new(), |ctx| {
                let mut held = Vec::new();
                while held.len() < 50 {
                    if let Some(Event::Message(m)) = ctx.recv() {
                        assert!(m.is_request());
                        held.push((m.replier(), m.get::<u64>().unwrap().to_native()));
                    }
                }
                for (replier, v) in held.into_iter().rev() {
                    ctx.reply(&replier, &(v + 1000)).unwrap();
                }
                while ctx.recv().is_some() {}
            })
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        let ids: Vec<_> = (0..50u64)
            .map(|i| (i, mailbox.request(&rev, &i).unwrap()))
            .collect();
        // Collect them in an order unrelated to both the sending and the answering order.
        let mut order: Vec<usize> = (0..50).collect();
        order.sort_by_key(|&k| (k * 37) % 50);
        for k in order {
            let (i, id) = ids[k];
            let reply = mailbox.wait_reply(id, T).unwrap();
            assert_eq!(
                *reply.get::<u64>().unwrap(),
                i + 1000,
                "reply {k} matches its request"
            );
        }
        assert_eq!(
            mailbox.wait_reply(ids[0].1, T).err(),
            Some(CallError::UnknownRequest)
        );
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn a_timed_out_call_drops_and_counts_its_late_reply() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::single_node();
        let d = cluster
            .spawn("/doubler", Properties::new(), doubler)
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        // Answered after 300 ms; we wait 20 ms.
        assert_eq!(
            mailbox
                .call(&d, &300_000u64, Duration::from_millis(20))
                .err(),
            Some(CallError::Timeout)
        );
        // The next call gets its own reply, not the late one.
        let reply = mailbox.call(&d, &21u64, T).unwrap();
        assert_eq!(*reply.get::<u64>().unwrap(), 42);
        drop(reply);
        // A cancelled request's reply is dropped too.
        let id = mailbox.request(&d, &5u64).unwrap();
        mailbox.cancel(id);
        assert_eq!(
            *mailbox.call(&d, &7u64, T).unwrap().get::<u64>().unwrap(),
            14
        );
        // Nothing else reaches the receive loop.
        assert!(mailbox.recv_timeout(Duration::from_millis(50)).is_none());
        let me = cluster
            .stats()
            .endpoints
            .into_iter()
            .find(|e| e.id == mailbox.me().id())
            .unwrap();
        assert_eq!(
            me.late_replies, 2,
            "the timed-out reply and the cancelled one"
        );
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn handler_errors_and_panics_reach_the_caller() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::single_node();
        let d = cluster
            .spawn("/doubler", Properties::new(), doubler)
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        assert_eq!(
            mailbox.call(&d, &u64::MAX, T).err(),
            Some(CallError::Remote(format!("bad input: {}", u64::MAX)))
        );
        let t = Instant::now();
        assert_eq!(
            mailbox.call(&d, &PANIC, T).err(),
            Some(CallError::TargetDown(Some(DownReason::Panicked(format!(
                "unlucky {PANIC}"
            )))))
        );
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the panic is noticed, not waited out"
        );
        // Later calls to the dead isolate fail at once with the same reason; a plain send
        // reports it disconnected.
        for _ in 0..2 {
            assert_eq!(
                mailbox.call(&d, &1u64, T).err(),
                Some(CallError::TargetDown(Some(DownReason::Panicked(format!(
                    "unlucky {PANIC}"
                )))))
            );
        }
        assert!(matches!(d.send(&1u64), Err(SendError::Disconnected(()))));
        cluster.join(T).unwrap();
    });
}

#[test]
fn isolates_call_each_other_and_other_messages_keep_their_order() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let main_ref = mailbox.me().clone();
        let d = cluster
            .spawn("/doubler", Properties::new(), doubler)
            .unwrap();
        let caller = cluster
            .spawn("/caller", Properties::new(), move |ctx| {
                // Wait for main's go, then call while main's numbered messages arrive.
                let mut seen = Vec::new();
                if let Some(Event::Message(m)) = ctx.recv() {
                    seen.push(m.get::<u32>().unwrap().to_native());
                }
                let mut sum = 0u64;
                for i in 0..100u64 {
                    sum += ctx
                        .call(&d, &i, T)
                        .unwrap()
                        .get::<u64>()
                        .unwrap()
                        .to_native();
                }
                while seen.len() < 1000 {
                    if let Some(Event::Message(m)) = ctx.recv() {
                        seen.push(m.get::<u32>().unwrap().to_native());
                    }
                }
                let in_order = seen.iter().enumerate().all(|(k, &v)| v == k as u32);
                ctx.send(&main_ref, &(sum, in_order)).unwrap();
                while ctx.recv().is_some() {}
            })
            .unwrap();
        for k in 0..1000u32 {
            caller.send(&k).unwrap();
        }
        let (sum, in_order) = common::expect_message(&mailbox, T, |m| {
            let r = m.get::<(u64, bool)>().unwrap();
            (r.0.to_native(), r.1)
        });
        assert_eq!(sum, (0..100u64).map(|i| i * 2).sum::<u64>());
        assert!(
            in_order,
            "messages that arrived during the calls kept their order"
        );
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn a_call_whose_request_finds_the_ring_full_still_ends_at_its_timeout() {
    with_timeout(Duration::from_secs(60), || {
        // A 4-cell ring: four one-cell messages fill it.
        let cluster = Cluster::builder().ring_capacity(256).build();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = std::sync::Mutex::new(go_rx);
        let stuck = cluster
            .spawn("/stuck", Properties::new(), move |ctx| {
                // Stops reading until told to go on, then doubles as `doubler` does.
                go_rx.lock().unwrap().recv().unwrap();
                doubler(ctx);
            })
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        let mut filled = 0u64;
        while mailbox.try_send(&stuck, &filled).is_ok() {
            filled += 1;
        }
        assert_eq!(filled, 4, "a 4-cell ring holds four one-cell messages");
        assert!(matches!(
            mailbox.try_send(&stuck, &0u64),
            Err(SendError::Full(()))
        ));
        let t = Instant::now();
        assert_eq!(
            mailbox
                .call(&stuck, &21u64, Duration::from_millis(200))
                .unwrap_err(),
            CallError::Timeout
        );
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        // The target reads again: the four plain messages, never the timed-out request
        // (it was not sent), and calls work again.
        go_tx.send(()).unwrap();
        let reply = mailbox.call(&stuck, &21u64, T).unwrap();
        assert_eq!(reply.get::<u64>().unwrap().to_native(), 42);
        drop(reply);
        let me = mailbox.cluster_stats();
        let mine = me
            .endpoints
            .iter()
            .find(|e| e.id == mailbox.me().id())
            .unwrap()
            .clone();
        assert_eq!(mine.late_replies, 0, "the unsent request has no reply");
        assert_eq!(mine.received, 1, "one reply");
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn a_request_id_is_only_good_on_the_endpoint_that_sent_it() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let d = cluster
            .spawn("/doubler", Properties::new(), doubler)
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        let id = mailbox.request(&d, &5u64).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let theirs = cluster.mailbox().unwrap();
                // Its own first request has the same number as ours.
                let mine = theirs.request(&d, &7u64).unwrap();
                // Another endpoint's id: not waiting here (it does not take this
                // endpoint's reply to the same number), and cancelling it does nothing.
                assert_eq!(
                    theirs
                        .wait_reply(id, Duration::from_millis(50))
                        .unwrap_err(),
                    CallError::UnknownRequest
                );
                theirs.cancel(id);
                let reply = theirs.wait_reply(mine, T).unwrap();
                assert_eq!(reply.get::<u64>().unwrap().to_native(), 14);
            });
        });
        let reply = mailbox.wait_reply(id, T).unwrap();
        assert_eq!(reply.get::<u64>().unwrap().to_native(), 10);
        drop(reply);
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn timeouts_too_long_to_represent_mean_no_deadline() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let d = cluster
            .spawn("/doubler", Properties::new(), doubler)
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        let reply = mailbox.call(&d, &8u64, Duration::MAX).unwrap();
        assert_eq!(reply.get::<u64>().unwrap().to_native(), 16);
        drop(reply);
        let id = mailbox.request(&d, &9u64).unwrap();
        let reply = mailbox.wait_reply(id, Duration::MAX).unwrap();
        assert_eq!(reply.get::<u64>().unwrap().to_native(), 18);
        drop(reply);
        d.send(&PANIC).unwrap();
        assert_eq!(
            d.wait_down(Duration::MAX),
            Some(DownReason::Panicked(format!("unlucky {PANIC}")))
        );
        cluster.shutdown();
        cluster.join(Duration::MAX).unwrap();
    });
}

#[test]
fn a_reference_calls_from_any_thread_without_an_inbox() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let d = cluster
            .spawn("/doubler", Properties::new(), doubler)
            .unwrap();
        // From a thread that opened no mailbox.
        for i in 0..100u64 {
            let v = d.call(&i, T, |m| m.get::<u64>().unwrap().to_native());
            assert_eq!(v, Ok(i * 2));
        }
        assert_eq!(
            d.call(&u64::MAX, T, |_| ()).unwrap_err(),
            CallError::Remote(format!("bad input: {}", u64::MAX))
        );
        assert_eq!(
            d.call(&5000u64, Duration::from_millis(1), |_| ())
                .unwrap_err(),
            CallError::Timeout
        );
        // From an isolate, through its own endpoint.
        let target = d.clone();
        let caller = cluster
            .spawn("/caller", Properties::new(), move |ctx| {
                let v = target.call(&21u64, T, |m| m.get::<u64>().unwrap().to_native());
                assert_eq!(v, Ok(42));
                ctx.exit(Box::new(v.unwrap()));
            })
            .unwrap();
        assert_eq!(*caller.join_exit::<u64>(T).unwrap(), 42);
        // A dead target.
        d.send(&PANIC).unwrap();
        assert!(d.wait_down(T).is_some());
        assert_eq!(
            d.call(&1u64, T, |_| ()).unwrap_err(),
            CallError::TargetDown(Some(DownReason::Panicked(format!("unlucky {PANIC}"))))
        );
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}
