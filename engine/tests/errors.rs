//! Every bad input gets its own error value.

mod common;

use std::time::Duration;

use common::{expect_message, with_timeout};
use isolate_cluster::{
    AccessError, Cluster, Event, LookupError, MailboxError, PathError, Properties, SendError,
    SpawnError,
};

const T: Duration = Duration::from_secs(20);

#[test]
fn invalid_paths_are_rejected_by_spawn_and_lookup() {
    let cluster = Cluster::single_node();
    let cases = [
        ("", PathError::Empty),
        ("a", PathError::NotAbsolute),
        ("/", PathError::Root),
        ("/a//b", PathError::EmptySegment),
        ("/a/../b", PathError::DotSegment),
        ("/a/", PathError::TrailingSlash),
        ("/a\0b", PathError::ControlCharacter),
    ];
    for (path, err) in cases {
        match cluster.spawn(path, Properties::new(), |_| {}) {
            Err(SpawnError::InvalidPath(e)) => assert_eq!(e, err, "{path:?}"),
            other => panic!("{path:?}: expected InvalidPath, got {other:?}"),
        }
        assert_eq!(cluster.lookup(path), Err(LookupError::InvalidPath(err)));
    }
    assert!(cluster.stats().endpoints.is_empty(), "nothing was spawned");
}

#[test]
fn duplicate_paths_unknown_lookups_and_late_spawns() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::single_node();
        cluster
            .spawn(
                "/one",
                Properties::new(),
                |ctx| while ctx.recv().is_some() {},
            )
            .unwrap();
        match cluster.spawn("/one", Properties::new(), |_| {}) {
            Err(SpawnError::Duplicate(p)) => assert_eq!(p, "/one"),
            other => panic!("expected Duplicate, got {other:?}"),
        }
        assert_eq!(
            cluster.lookup("/two"),
            Err(LookupError::NotFound("/two".into()))
        );
        cluster.shutdown();
        assert!(matches!(
            cluster.spawn("/three", Properties::new(), |_| {}),
            Err(SpawnError::ShuttingDown)
        ));
        cluster.join(T).unwrap();
    });
}

#[test]
fn sends_to_a_dead_isolate_fail_with_disconnected() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::single_node();
        let gone = cluster.spawn("/gone", Properties::new(), |_| {}).unwrap();
        gone.wait_down(T).unwrap();
        assert_eq!(gone.send(&1u8), Err(SendError::Disconnected(())));
        assert_eq!(gone.try_send(&1u8), Err(SendError::Disconnected(())));
        match gone.transfer(Box::new(7u32)) {
            Err(SendError::Disconnected(b)) => assert_eq!(*b, 7, "the box comes back"),
            other => panic!("expected Disconnected, got {other:?}"),
        }
        cluster.join(T).unwrap();
    });
}

#[test]
fn reading_a_message_as_the_wrong_type_is_an_error() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let main_ref = mailbox.me().clone();
        let probe = cluster
            .spawn("/probe", Properties::new(), move |ctx| {
                while let Some(Event::Message(mut m)) = ctx.recv() {
                    let report = if m.is_transfer() {
                        let not_copy = m.get::<u64>().err();
                        let wrong = m.take::<u64>().err();
                        let right = m.take::<String>().map(|s| *s).ok();
                        let again = m.take::<String>().err();
                        format!(
                            "{not_copy:?}|{}|{right:?}|{again:?}",
                            matches!(wrong, Some(AccessError::TypeMismatch { .. }))
                        )
                    } else {
                        let wrong = m.get::<u32>().err();
                        let not_transfer = m.take::<u64>().err();
                        let right = m.get::<u64>().map(|v| v.to_native()).ok();
                        let checked = m.get_checked::<u64>().map(|v| v.to_native()).ok();
                        format!(
                            "{}|{not_transfer:?}|{right:?}|{checked:?}",
                            matches!(wrong, Some(AccessError::TypeMismatch { .. }))
                        )
                    };
                    ctx.send(&main_ref, &report).unwrap();
                }
            })
            .unwrap();
        probe.send(&99u64).unwrap();
        let copy = expect_message(&mailbox, T, |m| {
            m.get::<String>().unwrap().as_str().to_owned()
        });
        assert_eq!(copy, "true|Some(NotTransfer)|Some(99)|Some(99)");
        probe.transfer(Box::new(String::from("moved"))).unwrap();
        let moved = expect_message(&mailbox, T, |m| {
            m.get::<String>().unwrap().as_str().to_owned()
        });
        assert_eq!(
            moved,
            "Some(NotCopy)|true|Some(\"moved\")|Some(AlreadyTaken)"
        );
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

/// A cluster with 256-byte rings and an isolate that reads nothing until `gate` is
/// passed a second time (by the test).
fn held_receiver() -> (
    Cluster,
    isolate_cluster::IsolateRef,
    std::sync::Arc<std::sync::Barrier>,
) {
    let cluster = Cluster::builder().ring_capacity(256).build();
    let gate = std::sync::Arc::new(std::sync::Barrier::new(2));
    let g2 = gate.clone();
    let slow = cluster
        .spawn("/slow", Properties::new(), move |ctx| {
            g2.wait();
            while ctx.recv().is_some() {}
        })
        .unwrap();
    (cluster, slow, gate)
}

#[test]
fn oversize_messages_full_rings_and_mailbox_misuse() {
    with_timeout(Duration::from_secs(30), || {
        let (cluster, slow, gate) = held_receiver();
        let big = vec![7u8; 1024];
        match slow.send(&big) {
            Err(SendError::TooLarge { capacity, .. }) => assert_eq!(capacity, 256),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // Fill the ring while the receiver is held at the gate.
        let mut sent = 0;
        loop {
            match slow.try_send(&sent) {
                Ok(()) => sent += 1,
                Err(SendError::Full(())) => break,
                Err(e) => panic!("unexpected {e:?}"),
            }
            assert!(sent < 100, "a 256-byte ring cannot take 100 messages");
        }
        assert!(
            sent >= 4,
            "a 256-byte ring holds several 48-byte frames, got {sent}"
        );
        // A full ring: `try_send` may only say "not now" (finding out costs a build off
        // the ring, which a stream of small frames into a full ring must not pay), but
        // `send` must not wait for space that would never be enough.
        assert!(matches!(
            slow.try_send(&big),
            Err(SendError::Full(()) | SendError::TooLarge { .. })
        ));
        match slow.send(&big) {
            Err(SendError::TooLarge { capacity, .. }) => assert_eq!(capacity, 256),
            other => panic!("expected TooLarge from a full ring, got {other:?}"),
        }
        match slow.try_transfer(Box::new([1u64; 4])) {
            Err(SendError::Full(b)) => assert_eq!(*b, [1u64; 4], "the box comes back on Full"),
            other => panic!("expected Full, got {other:?}"),
        }
        let stats = cluster.stats();
        assert!(stats.endpoints.iter().any(|e| e.full >= 2));
        gate.wait();
        let mailbox = cluster.mailbox().unwrap();
        assert_eq!(cluster.mailbox().err(), Some(MailboxError::InUse));
        drop(mailbox);
        assert!(cluster.mailbox().is_ok());
        cluster.shutdown();
        cluster.join(T).unwrap();
        assert_eq!(cluster.stats().undelivered, 0);
    });
}

#[test]
fn replies_to_a_thread_that_has_gone_are_errors() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let main_ref = mailbox.me().clone();
        let gate = std::sync::Arc::new(std::sync::Barrier::new(2));
        let g2 = gate.clone();
        let echo = cluster
            .spawn("/echo", Properties::new(), move |ctx| {
                while let Some(Event::Message(m)) = ctx.recv() {
                    if *m.get::<u8>().unwrap() == 1 {
                        g2.wait();
                    }
                    let r = m.reply(&1u8);
                    ctx.send(&main_ref, &format!("{r:?}")).unwrap();
                }
            })
            .unwrap();
        let e2 = echo.clone();
        std::thread::spawn(move || e2.send(&1u8).unwrap())
            .join()
            .unwrap();
        gate.wait();
        let first = expect_message(&mailbox, T, |m| {
            m.get::<String>().unwrap().as_str().to_owned()
        });
        assert_eq!(first, "Err(UnknownTarget(..))");
        echo.send(&0u8).unwrap();
        let mut texts = Vec::new();
        let mut replies = 0;
        for _ in 0..2 {
            expect_message(&mailbox, T, |m| match m.get::<String>() {
                Ok(s) => texts.push(s.as_str().to_owned()),
                Err(_) => {
                    assert_eq!(*m.get::<u8>().unwrap(), 1);
                    replies += 1;
                }
            });
        }
        assert_eq!((texts, replies), (vec!["Ok(())".to_owned()], 1));
        cluster.shutdown();
        cluster.join(T).unwrap();
    });
}

#[test]
fn raw_bytes_under_a_rust_tag_are_never_read_unchecked() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::single_node();
        let mailbox = cluster.mailbox().unwrap();
        let me = mailbox.me().clone();
        // Garbage claiming to be a bool (only 0 and 1 are), then a valid archive sent as
        // raw bytes.
        mailbox
            .send_bytes(&me, isolate_cluster::type_tag::<bool>(), &[7])
            .unwrap();
        let m = mailbox.recv_timeout(T);
        match m {
            Some(Event::Message(m)) => {
                assert_eq!(m.get::<bool>().err(), Some(AccessError::Invalid));
                assert_eq!(m.get_checked::<bool>().err(), Some(AccessError::Invalid));
            }
            other => panic!("expected the raw message, got {other:?}"),
        }
        let archive =
            isolate_cluster::rkyv::to_bytes::<isolate_cluster::rkyv::rancor::Error>(&7u64).unwrap();
        mailbox
            .send_bytes(&me, isolate_cluster::type_tag::<u64>(), &archive)
            .unwrap();
        match mailbox.recv_timeout(T) {
            Some(Event::Message(m)) => {
                assert_eq!(
                    m.get::<u64>().err(),
                    Some(AccessError::Invalid),
                    "raw bytes are not trusted"
                );
                assert_eq!(
                    m.get_checked::<u64>().map(|v| v.to_native()),
                    Ok(7),
                    "but they validate"
                );
            }
            other => panic!("expected the raw message, got {other:?}"),
        };
    });
}

#[test]
fn a_reference_from_another_cluster_names_nobody_here() {
    with_timeout(Duration::from_secs(30), || {
        let a = Cluster::single_node();
        let b = Cluster::single_node();
        let in_b = b
            .spawn("/x", Properties::new(), |ctx| while ctx.recv().is_some() {})
            .unwrap();
        let _in_a = a
            .spawn("/x", Properties::new(), |ctx| while ctx.recv().is_some() {})
            .unwrap();
        let mailbox = a.mailbox().unwrap();
        assert_eq!(mailbox.send(&in_b, &1u8), Err(SendError::UnknownTarget(())));
        // Through the reference itself (this thread's endpoint in b) it works.
        assert_eq!(in_b.send(&1u8), Ok(()));
    });
}

#[test]
fn dropping_the_cluster_while_a_message_is_held_is_safe() {
    with_timeout(Duration::from_secs(30), || {
        let cluster = Cluster::builder()
            .drop_timeout(Duration::from_millis(500))
            .build();
        let mailbox = cluster.mailbox().unwrap();
        let me = mailbox.me().clone();
        mailbox.send(&me, &String::from("still here")).unwrap();
        mailbox.transfer(&me, Box::new(vec![1u8; 1000])).unwrap();
        let Some(Event::Message(m)) = mailbox.recv_timeout(T) else {
            panic!("no message")
        };
        drop(cluster);
        assert_eq!(m.get::<String>().unwrap().as_str(), "still here");
        drop(m);
        let Some(Event::Message(mut t)) = mailbox.recv_timeout(T) else {
            panic!("no transfer")
        };
        assert_eq!(t.take::<Vec<u8>>().unwrap().len(), 1000);
        drop(t);
    });
}

/// A ring holding a frame says `TooLarge` only when empty; the sender finds out itself
/// (by building the frame off the ring) for `try_send` into a ring with room to spare.
#[test]
fn try_send_of_a_message_that_can_never_fit_is_too_large_with_frames_waiting() {
    with_timeout(Duration::from_secs(30), || {
        let (cluster, slow, gate) = held_receiver();
        slow.try_send(&0u64).unwrap();
        match slow.try_send(&vec![7u8; 1024]) {
            Err(SendError::TooLarge { capacity, .. }) => assert_eq!(capacity, 256),
            other => panic!("expected TooLarge from a ring holding a frame, got {other:?}"),
        }
        gate.wait();
        cluster.shutdown();
        cluster.join(T).unwrap();
        assert_eq!(cluster.stats().undelivered, 0);
    });
}
