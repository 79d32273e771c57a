//! Multi-node clusters over Zenoh: the test binary starts other processes (itself, in
//! the `peer_process` role) as the other nodes, on unix sockets in a directory of its
//! own, so parallel tests never meet. Every wait is bounded.
#![cfg(feature = "zenoh")]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use isolate_cluster::net::{zenoh, Network};
use isolate_cluster::task::{Scheduler, TaskClient};
use isolate_cluster::{
    CallError, Cluster, DownReason, Event, IsolateRef, Mailbox, Properties, SendError,
};

const T: Duration = Duration::from_secs(10);

/// A fresh rendezvous directory and network name per test.
fn network(test: &str) -> (String, std::path::PathBuf) {
    let name = format!("{test}-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("ic-net-tests/{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    (name, dir)
}

fn join(node: &str, name: &str, dir: &std::path::Path, lease: Duration) -> Cluster {
    Cluster::builder()
        .node_name(node)
        .join(Network::new(name).rendezvous_dir(dir).lease(lease))
        .expect("join")
}

/// Another node, in another process.
struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Peer {
    fn start(node: &str, name: &str, dir: &std::path::Path) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["peer_process", "--exact", "--nocapture", "--test-threads=1"])
            .env("IC_NET_ROLE", "peer")
            .env("IC_NET_NODE", node)
            .env("IC_NET_NAME", name)
            .env("IC_NET_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a peer process");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stdin = child.stdin.take();
        let mut p = Peer {
            child,
            stdin,
            lines,
        };
        p.expect_line("READY");
        p
    }

    fn expect_line(&mut self, want: &str) {
        let until = Instant::now() + T;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.trim().ends_with(want) => return,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        panic!("the peer never said {want}");
    }

    /// Asks the peer to leave (closes its stdin) and waits for it to exit cleanly.
    fn finish(mut self) {
        drop(self.stdin.take());
        let until = Instant::now() + T;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "peer exited with {status}");
                return;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!("the peer did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9`.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The peer node's program: `/echo` answers and obeys commands, until stdin closes.
#[test]
fn peer_process() {
    if std::env::var("IC_NET_ROLE").as_deref() != Ok("peer") {
        return;
    }
    let node = std::env::var("IC_NET_NODE").unwrap();
    let name = std::env::var("IC_NET_NAME").unwrap();
    let dir = std::env::var("IC_NET_DIR").unwrap();
    let cluster = join(&node, &name, dir.as_ref(), Duration::from_secs(1));
    cluster
        .spawn("/echo", Properties::new().with("role", "echo"), echo)
        .unwrap();
    let mut scheduler = Scheduler::new();
    scheduler
        .named::<u64, _, _>("double", |_t, n: &isolate_cluster::rkyv::Archived<u64>| {
            Ok::<u64, String>(n.to_native() * 2)
        })
        .unwrap();
    scheduler.start(&cluster, "/tasks").unwrap();
    println!("READY");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
        line.clear();
    }
    drop(cluster);
}

fn lookup(ctx: &isolate_cluster::Inbox, path: &str) -> IsolateRef {
    let until = Instant::now() + T;
    loop {
        match ctx.lookup(path) {
            Ok(r) => return r,
            Err(e) if Instant::now() > until => panic!("{path}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn echo(ctx: &isolate_cluster::Context) {
    while let Some(ev) = ctx.recv() {
        let mut m = match ev {
            Event::Message(m) => m,
            Event::ShutdownRequested => return,
            _ => continue,
        };
        if let Ok(n) = m.get::<u64>() {
            m.reply(&(n.to_native() + 1)).unwrap();
        } else if let Ok(mut v) = m.take::<Vec<u64>>() {
            v.reverse();
            m.reply_transfer(v).unwrap();
        } else if let Ok(cmd) = m.get::<String>() {
            let cmd = cmd.as_str().to_owned();
            let parts: Vec<&str> = cmd.split(' ').collect();
            match parts[..] {
                ["send", path, n] => {
                    let to = lookup(ctx, path);
                    for i in 0..n.parse::<u64>().unwrap() {
                        ctx.send(&to, &i).unwrap();
                    }
                    m.reply(&"sent".to_string()).unwrap();
                }
                ["call", path] => {
                    let to = lookup(ctx, path);
                    let r = ctx.call(&to, &41u64, T).unwrap();
                    let v = r.get::<u64>().unwrap().to_native();
                    drop(r);
                    m.reply(&v).unwrap();
                }
                ["spawn", path] => {
                    ctx.spawn(path, Properties::new(), |c| {
                        while let Some(ev) = c.recv() {
                            match ev {
                                Event::Message(m)
                                    if m.get::<String>().is_ok_and(|s| s == "stop") =>
                                {
                                    return
                                }
                                Event::ShutdownRequested => return,
                                _ => {}
                            }
                        }
                    })
                    .unwrap();
                    m.reply(&"spawned".to_string()).unwrap();
                }
                ["panic"] => panic!("asked to"),
                _ => m.reply_error(&format!("unknown command {cmd}")).unwrap(),
            }
        }
    }
}

/// Waits for an event that `pick` accepts (others are skipped) and returns what it gives.
fn wait_for<R>(mb: &Mailbox, what: &str, mut pick: impl FnMut(Event<'_>) -> Option<R>) -> R {
    let until = Instant::now() + T;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if let Some(ev) = mb.recv_timeout(left) {
            if let Some(r) = pick(ev) {
                return r;
            }
        }
    }
    panic!("no {what} within {T:?}");
}

fn command(mb: &Mailbox, to: &IsolateRef, cmd: &str) -> String {
    let r = mb.call(to, &cmd.to_string(), T).unwrap();
    r.get::<String>().unwrap().as_str().to_owned()
}

/// An isolate that forwards each u64 it gets to the test thread, in arrival order.
fn collector(cluster: &Cluster) -> mpsc::Receiver<(u64, String)> {
    let (tx, rx) = mpsc::channel();
    cluster
        .spawn("/collector", Properties::new(), move |ctx| {
            while let Some(ev) = ctx.recv() {
                if let Event::Message(m) = ev {
                    let from = m.sender().map(|s| s.path().to_owned()).unwrap_or_default();
                    let _ = tx.send((m.get::<u64>().unwrap().to_native(), from));
                }
            }
        })
        .unwrap();
    rx
}

#[test]
fn two_processes_talk_both_ways() {
    let (name, dir) = network("two");
    let a = join("a", &name, &dir, Duration::from_secs(1));
    let from_b = collector(&a);
    let mb = a.mailbox().unwrap();
    mb.watch_nodes();
    mb.watch_isolates(|r| r.is_remote());
    let b = Peer::start("b", &name, &dir);
    wait_for(&mb, "NodeUp(b)", |e| {
        matches!(e, Event::NodeUp(n) if n == "b").then_some(())
    });
    let echo = wait_for(&mb, "IsolateUp(b:/echo)", |e| match e {
        Event::IsolateUp(r) if r.path() == "b:/echo" => Some(r),
        _ => None,
    });
    assert_eq!(echo.node(), Some("b"));
    assert_eq!(echo.property("role").and_then(|v| v.as_str()), Some("echo"));
    assert_eq!(a.lookup("b:/echo").unwrap(), echo);

    // Calls, many outstanding, replies matched by correlation.
    for i in 0..200u64 {
        let r = mb.call(&echo, &i, T).unwrap();
        assert_eq!(*r.get::<u64>().unwrap(), i + 1);
    }
    let ids: Vec<_> = (0..50u64)
        .map(|i| mb.request(&echo, &(i * 10)).unwrap())
        .collect();
    for (i, id) in ids.into_iter().enumerate().rev() {
        let r = mb.wait_reply(id, T).unwrap();
        assert_eq!(*r.get::<u64>().unwrap(), i as u64 * 10 + 1);
    }
    // A remote error comes back as one.
    match mb.call(&echo, &"bogus".to_string(), T) {
        Err(CallError::Remote(text)) => assert!(text.contains("unknown command"), "{text}"),
        other => panic!("{other:?}"),
    }

    // A transfer is serialised once and rebuilt there; the answer comes back the same way.
    let v: Vec<u64> = (0..100_000).collect();
    mb.transfer(&echo, Box::new(v)).unwrap();
    let back = wait_for(&mb, "the transfer back", |e| match e {
        Event::Message(mut m) => Some(m.take::<Vec<u64>>().unwrap()),
        _ => None,
    });
    assert_eq!(back.len(), 100_000);
    assert!(back.iter().rev().copied().eq(0..100_000));

    // The other way: b sends 2000 messages to a:/collector, in order, once each.
    assert_eq!(command(&mb, &echo, "send a:/collector 2000"), "sent");
    for i in 0..2000u64 {
        let (v, from) = from_b.recv_timeout(T).unwrap();
        assert_eq!((v, from.as_str()), (i, "b:/echo"));
    }
    assert!(from_b.recv_timeout(Duration::from_millis(100)).is_err());

    // Remote isolates come and go.
    assert_eq!(command(&mb, &echo, "spawn /flash"), "spawned");
    let flash = wait_for(&mb, "IsolateUp(b:/flash)", |e| match e {
        Event::IsolateUp(r) if r.path() == "b:/flash" => Some(r),
        _ => None,
    });
    mb.send(&flash, &"stop".to_string()).unwrap();
    let why = wait_for(&mb, "IsolateDown(b:/flash)", |e| match e {
        Event::IsolateDown(r, why) if r == flash => Some(why),
        _ => None,
    });
    assert_eq!(why, DownReason::Normal);
    assert_eq!(mb.send(&flash, &1u64), Err(SendError::Disconnected(())));

    // A type that is not registered for the network cannot leave.
    #[derive(rkyv::Archive, rkyv::Serialize)]
    #[rkyv(crate = isolate_cluster::rkyv)]
    struct Local(u32);
    assert_eq!(mb.send(&echo, &Local(1)), Err(SendError::Unregistered(())));
    match mb.transfer(&echo, Box::new(Local(2))) {
        Err(SendError::Unregistered(b)) => assert_eq!(b.0, 2),
        other => panic!("{:?}", other.map_err(|e| e.without_value())),
    }

    // The peer leaves: its isolates go down normally, then the node.
    b.finish();
    let why = wait_for(&mb, "IsolateDown(b:/echo)", |e| match e {
        Event::IsolateDown(r, why) if r == echo => Some(why),
        _ => None,
    });
    assert_eq!(why, DownReason::Normal);
    wait_for(&mb, "NodeDown(b)", |e| {
        matches!(e, Event::NodeDown(n) if n == "b").then_some(())
    });
    assert!(a.nodes().is_empty());
    let stats = a.net_stats().unwrap();
    assert_eq!(stats.rejected, 0);
    assert!(stats.sent >= 250, "{stats:?}");
}

#[test]
fn three_processes_reach_each_other() {
    let (name, dir) = network("three");
    let a = join("a", &name, &dir, Duration::from_secs(1));
    let mb = a.mailbox().unwrap();
    mb.watch_nodes();
    let b = Peer::start("b", &name, &dir);
    let c = Peer::start("c", &name, &dir);
    let mut up = Vec::new();
    while up.len() < 2 {
        up.push(wait_for(&mb, "NodeUp", |e| match e {
            Event::NodeUp(n) => Some(n),
            _ => None,
        }));
    }
    up.sort();
    assert_eq!(up, ["b", "c"]);
    let c_echo = lookup(&mb, "c:/echo");
    let b_echo = lookup(&mb, "b:/echo");
    // c calls b (a process the test only started), and answers a.
    let r = mb.call(&c_echo, &"call b:/echo".to_string(), T).unwrap();
    assert_eq!(*r.get::<u64>().unwrap(), 42);
    drop(r);
    let r = mb.call(&b_echo, &"call c:/echo".to_string(), T).unwrap();
    assert_eq!(*r.get::<u64>().unwrap(), 42);
    drop(r);
    b.finish();
    c.finish();
}

#[test]
fn killed_node_goes_down_within_the_lease_and_comes_back() {
    let (name, dir) = network("kill");
    let lease = Duration::from_secs(1);
    let a = join("a", &name, &dir, lease);
    let mb = a.mailbox().unwrap();
    mb.watch_nodes();
    let b = Peer::start("b", &name, &dir);
    let echo = lookup(&mb, "b:/echo");
    mb.monitor(&echo);
    assert_eq!(*mb.call(&echo, &1u64, T).unwrap().get::<u64>().unwrap(), 2);
    wait_for(&mb, "NodeUp(b)", |e| {
        matches!(e, Event::NodeUp(n) if n == "b").then_some(())
    });

    let killed = Instant::now();
    b.kill();
    let mut node_down = None;
    let mut echo_down = None;
    while node_down.is_none() || echo_down.is_none() {
        match mb.recv_timeout(lease * 3 + T) {
            Some(Event::NodeDown(n)) if n == "b" => node_down = Some(killed.elapsed()),
            Some(Event::IsolateDown(r, why)) if r == echo => {
                assert_eq!(why, DownReason::NodeLost("b".into()));
                echo_down = Some(killed.elapsed());
            }
            Some(_) => {}
            None => panic!("no NodeDown/IsolateDown after kill -9"),
        }
    }
    println!("kill -9: isolate down after {echo_down:?}, node down after {node_down:?}");
    assert!(!echo.is_alive());
    assert!(matches!(
        mb.call(&echo, &1u64, T),
        Err(CallError::Send(SendError::Disconnected(()))) | Err(CallError::TargetDown(_))
    ));
    assert!(a.lookup("b:/echo").is_err());

    // The same node name comes back as a new incarnation.
    let b = Peer::start("b", &name, &dir);
    wait_for(&mb, "NodeUp(b) again", |e| {
        matches!(e, Event::NodeUp(n) if n == "b").then_some(())
    });
    let echo2 = lookup(&mb, "b:/echo");
    assert_ne!(echo2, echo);
    assert_eq!(*mb.call(&echo2, &7u64, T).unwrap().get::<u64>().unwrap(), 8);
    b.finish();
}

#[test]
fn scheduler_client_drives_a_scheduler_on_another_node() {
    let (name, dir) = network("sched");
    let a = join("a", &name, &dir, Duration::from_secs(1));
    let b = Peer::start("b", &name, &dir);
    let mb = a.mailbox().unwrap();
    let client = TaskClient::connect(&mb, "b:/tasks", T).unwrap();
    let result = client.run(&mb, "double", &21u64, T).unwrap();
    assert!(result.successful, "{:?}", result.error);
    assert_eq!(*result.value::<u64>().unwrap(), 42);
    match client.run(&mb, "nope", &1u64, T) {
        Err(isolate_cluster::task::TaskError::UnknownTask(t)) => assert_eq!(t, "nope"),
        other => panic!("{other:?}"),
    }
    b.finish();
}

/// A stranger publishing garbage on a node's keys: every envelope is rejected, counted
/// and reported; the node keeps working.
#[test]
fn garbage_from_the_network_is_rejected() {
    let (name, dir) = network("garbage");
    let a = join("a", &name, &dir, Duration::from_secs(1));
    a.spawn("/echo", Properties::new(), echo).unwrap();
    let mb = a.mailbox().unwrap();
    mb.watch_nodes();

    let mut config = zenoh::Config::default();
    let socks: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .map(|p| format!("\"unixsock-stream/{}\"", p.display()))
        .collect();
    config.insert_json5("mode", "\"peer\"").unwrap();
    config
        .insert_json5("scouting/multicast/enabled", "false")
        .unwrap();
    config
        .insert_json5("connect/endpoints", &format!("[{}]", socks.join(",")))
        .unwrap();
    use zenoh::Wait;
    let stranger = zenoh::open(config).wait().unwrap();
    // Find node a's key from its liveliness token.
    let replies = stranger
        .liveliness()
        .get(format!("ic/{name}/node/a/*"))
        .timeout(T)
        .wait()
        .unwrap();
    let token = replies.recv().unwrap().into_result().unwrap();
    let inc = token
        .key_expr()
        .as_str()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let key = format!("ic/{name}/to/a/{inc}/evil/0000000000000001");

    let echo_id = a.lookup("/echo").unwrap().id();
    let msg = |flags: u8, kind: u8, tag: u64, payload: &[u8]| {
        let mut b = vec![1u8, 1, flags, kind];
        b.extend_from_slice(&echo_id.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(payload);
        b
    };
    // The wire tag of `String` (FNV-1a of its type path, top bit set).
    let string_tag = {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in std::any::type_name::<String>().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h | 1 << 63
    };
    // rkyv strings: inline and padded with 0xff, or out of line when the first byte is
    // 0b10xx_xxxx. An overlong (invalid) UTF-8 inline string, and an out-of-line one
    // pointing 4 KiB past the end.
    let lying_string = [0xc0u8, 0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    let far_string = [0x85u8, 0, 0, 0, 0, 0x10, 0, 0];
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![9, 9, 9],
        vec![1],
        vec![1, 7, 0, 0],
        msg(0, 0, string_tag, b"")[..20].to_vec(),
        msg(0x80, 0, string_tag, &[0; 16]),
        msg(0, 3, string_tag, &[0; 16]),
        msg(0, 0, 12345 | 1 << 63, &[0; 16]),
        msg(0, 0, string_tag, &lying_string),
        msg(0, 0, string_tag, &[1, 2, 3]),
        msg(0, 0, string_tag, &far_string),
        msg(0, 1, string_tag, &lying_string),
        msg(8, 0, 1 << 63, b"raw with a Rust tag"),
        msg(0, 0, 42, b"typed with an application tag"),
        vec![1, 2, 0, 0, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef],
        vec![1, 2, 1, 0, 0, 0, 0, 0],
    ];
    for g in &garbage {
        stranger.put(&key, g.clone()).wait().unwrap();
    }
    let mut rejected = 0;
    while rejected < garbage.len() {
        wait_for(&mb, "Rejected", |e| match e {
            Event::Rejected { node, .. } => {
                assert_eq!(node, "evil");
                Some(())
            }
            _ => None,
        });
        rejected += 1;
    }
    let stats = a.net_stats().unwrap();
    assert_eq!(stats.rejected, garbage.len() as u64, "{stats:?}");
    // Nothing reached the isolate, which still answers.
    let r = mb.call(&a.lookup("/echo").unwrap(), &1u64, T).unwrap();
    assert_eq!(*r.get::<u64>().unwrap(), 2);
    drop(r);
    let _ = stranger.close().wait();
}

#[test]
fn join_refuses_bad_names_and_duplicates() {
    let (name, dir) = network("names");
    let bad = Cluster::builder()
        .node_name("a/b")
        .join(Network::new(&name).rendezvous_dir(&dir));
    assert!(matches!(
        bad,
        Err(isolate_cluster::net::NetError::InvalidName(_))
    ));
    let bad = Cluster::builder()
        .node_name("a")
        .join(Network::new("no spaces"));
    assert!(matches!(
        bad,
        Err(isolate_cluster::net::NetError::InvalidName(_))
    ));
    let a = join("a", &name, &dir, Duration::from_secs(1));
    let again = Cluster::builder()
        .node_name("a")
        .join(Network::new(&name).rendezvous_dir(&dir));
    assert!(matches!(again, Err(isolate_cluster::net::NetError::DuplicateNode(n)) if n == "a"));
    assert!(a.lookup("zz:/nothing").is_err());
    assert!(a.lookup("bad name:/x").is_err());
}
