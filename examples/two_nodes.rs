//! Two nodes in two processes, over Zenoh:
//!
//! ```text
//! cargo run --release --features isolate-cluster/zenoh --example two_nodes
//! ```
//!
//! The command starts node `a` (this process), which starts node `b` (this program again,
//! in a second process). They find each other through a rendezvous directory with no
//! other setup, watch each other's nodes and isolates, exchange messages both ways, make
//! calls, and see an isolate of the other node come and go. Then `b` leaves and `a` sees
//! it go.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use isolate_cluster::net::Network;
use isolate_cluster::{Cluster, Context, Event, Properties};

const T: Duration = Duration::from_secs(10);

fn network() -> Network {
    let dir = std::env::temp_dir().join(format!(
        "isolate-cluster-two-nodes-{}",
        std::env::var("IC_EXAMPLE_RUN").unwrap_or_default()
    ));
    Network::new("two-nodes").rendezvous_dir(dir)
}

/// Answers `u64` requests with their square; a `String` is a command.
fn calculator(ctx: &Context) {
    while let Some(ev) = ctx.recv() {
        match ev {
            Event::Message(m) => {
                if let Ok(n) = m.get::<u64>() {
                    let n = n.to_native();
                    m.reply(&(n * n)).expect("reply");
                } else if let Ok(cmd) = m.get::<String>() {
                    if cmd == "greet a" {
                        // Node a's isolate, looked up by `node:/path`, and messaged.
                        let a = ctx.lookup("a:/greeter").expect("a:/greeter");
                        for i in 1..=3u64 {
                            ctx.send(&a, &format!("hello {i} from {}", ctx.path()))
                                .expect("send");
                        }
                        m.reply(&"sent 3 greetings".to_string()).expect("reply");
                    }
                }
            }
            Event::ShutdownRequested => return,
            _ => {}
        }
    }
}

/// Node b: the calculator, and a short-lived isolate.
fn node_b() {
    let b = Cluster::builder()
        .node_name("b")
        .join(network())
        .expect("join as b");
    b.spawn(
        "/calc",
        Properties::new().with("kind", "calculator"),
        calculator,
    )
    .expect("spawn /calc");
    println!("[b] joined; /calc is up");
    // A worker that lives half a second, so node a sees it come and go.
    b.spawn("/brief", Properties::new().with("kind", "brief"), |ctx| {
        let until = Instant::now() + Duration::from_millis(500);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if let Some(Event::ShutdownRequested) = ctx.recv_timeout(left) {
                return;
            }
        }
    })
    .expect("spawn /brief");
    // Until node a closes our stdin.
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
        line.clear();
    }
    println!("[b] leaving");
}

fn main() {
    if std::env::args().any(|a| a == "--node-b") {
        return node_b();
    }
    let run = std::process::id().to_string();
    std::env::set_var("IC_EXAMPLE_RUN", &run);
    let a = Cluster::builder()
        .node_name("a")
        .join(network())
        .expect("join as a");
    a.spawn("/greeter", Properties::new(), |ctx| {
        while let Some(ev) = ctx.recv() {
            match ev {
                Event::Message(m) => {
                    let from = m.sender().map(|s| s.path().to_owned()).unwrap_or_default();
                    println!(
                        "[a] /greeter got {:?} from {from}",
                        m.get::<String>().unwrap()
                    );
                }
                Event::ShutdownRequested => return,
                _ => {}
            }
        }
    })
    .expect("spawn /greeter");
    let mailbox = a.mailbox().expect("mailbox");
    mailbox.watch_nodes();
    mailbox.watch_isolates(|r| r.is_remote());

    println!("[a] starting node b in a second process");
    let mut b = Command::new(std::env::current_exe().expect("this program"))
        .arg("--node-b")
        .env("IC_EXAMPLE_RUN", &run)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start node b");
    let out = b.stdout.take().expect("b's stdout");
    let echo_b = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
        }
    });

    // Events: b joins, its isolates come up, /brief goes down again.
    let mut calc = None;
    let mut brief_down = false;
    let until = Instant::now() + T;
    while calc.is_none() || !brief_down {
        let left = until.saturating_duration_since(Instant::now());
        match mailbox.recv_timeout(left) {
            Some(Event::NodeUp(n)) => println!("[a] node {n} is up"),
            Some(Event::IsolateUp(r)) => {
                println!("[a] {r} is up, properties {:?}", r.properties());
                if r.path() == "b:/calc" {
                    calc = Some(r);
                }
            }
            Some(Event::IsolateDown(r, why)) => {
                println!("[a] {r} is down: {why}");
                brief_down |= r.path() == "b:/brief";
            }
            Some(other) => println!("[a] {other:?}"),
            None => panic!("node b did not show up"),
        }
    }
    let calc = calc.expect("b:/calc");

    // Calls across processes.
    let started = Instant::now();
    for n in [3u64, 12, 99] {
        let r = mailbox.call(&calc, &n, T).expect("call b:/calc");
        println!("[a] b:/calc says {n}² = {}", r.get::<u64>().expect("u64"));
    }
    let calls = 1000;
    let t = Instant::now();
    for n in 0..calls {
        let r = mailbox.call(&calc, &n, T).expect("call");
        assert_eq!(*r.get::<u64>().expect("u64"), n * n);
    }
    println!(
        "[a] {calls} calls: {:.1} µs per round trip",
        t.elapsed().as_secs_f64() * 1e6 / calls as f64
    );
    // And the other way: b's isolate sends to a's.
    let r = mailbox
        .call(&calc, &"greet a".to_string(), T)
        .expect("greet");
    println!("[a] b:/calc: {}", r.get::<String>().expect("text"));
    drop(r);
    std::thread::sleep(Duration::from_millis(200));
    println!("[a] network: {:?}", a.net_stats().expect("joined"));

    // b leaves: its isolates go down, then the node.
    drop(b.stdin.take());
    let until = Instant::now() + T;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match mailbox.recv_timeout(left) {
            Some(Event::NodeDown(n)) => {
                println!("[a] node {n} is down");
                break;
            }
            Some(Event::IsolateDown(r, why)) => println!("[a] {r} is down: {why}"),
            Some(_) => {}
            None => panic!("node b did not leave"),
        }
    }
    let status = b.wait().expect("b exits");
    echo_b.join().expect("b's output");
    println!(
        "[a] b exited with {status}; all done in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(status.success());
}
