//! A tour of isolate-cluster: the `isolate_cluster` Dart package's example, in Rust.
//!
//! Run: `cargo run --release --example tour`
//!
//! Two senders and a receiver are spawned with properties. Each sender watches for isolates
//! whose `type` property is `receiver` and sends its `msg` property to it. `main` looks the
//! receiver up by path and sends it a message too. The receiver replies to every message,
//! looks up senders that are isolates, spawns `/spawned` for a message from a thread that
//! is not an isolate, and after three messages asks the node to shut down; its
//! shutdown-request handler then stops it.

use std::time::Duration;

use isolate_cluster::{Cluster, Context, Event, Properties};

fn receiver(ctx: &Context) {
    println!("[{}] receiver started", ctx.path());
    let mut count = 0;
    ctx.on_shutdown_request(|ctx| {
        println!("[{}] shutdown requested!", ctx.path());
        ctx.shutdown_isolate();
    });
    while let Some(event) = ctx.recv() {
        let Event::Message(msg) = event else { continue };
        let text = msg.get::<String>().expect("the receiver takes strings");
        println!("[{}] message received: {text}", ctx.path());
        msg.reply(&format!("re: {text}")).expect("reply");
        match msg.sender() {
            Some(sender) if sender.is_isolate() => {
                let looked_up = ctx.lookup(sender.path()).expect("the sender is alive");
                println!("[{}] looked up sender: {looked_up}", ctx.path());
            }
            _ => {
                let spawned = ctx
                    .spawn("/spawned", Properties::new(), spawned)
                    .expect("spawn");
                ctx.send(&spawned, &String::from("hello spawned!"))
                    .expect("send");
            }
        }
        count += 1;
        if count == 3 {
            ctx.shutdown_node();
        }
    }
}

fn sender(ctx: &Context) {
    println!("[{}] sender started", ctx.path());
    let msg = ctx
        .property("msg")
        .map(|v| v.to_string())
        .unwrap_or_default();
    ctx.watch_isolates(|r| r.property("type").is_some_and(|v| v == "receiver"));
    while let Some(event) = ctx.recv() {
        match event {
            Event::IsolateUp(receiver) => ctx.send(&receiver, &msg).expect("send"),
            Event::Message(reply) => {
                let text = reply.get::<String>().expect("a string");
                println!("[{}] message received: {text}", ctx.path());
            }
            _ => {}
        }
    }
}

fn spawned(ctx: &Context) {
    println!("[{}] spawned started", ctx.path());
    while let Some(event) = ctx.recv() {
        if let Event::Message(msg) = event {
            let text = msg.get::<String>().expect("a string");
            println!("[{}] message received: {text}", ctx.path());
        }
    }
}

fn main() {
    let cluster = Cluster::single_node();
    let s1 = cluster
        .spawn("/sender/1", Properties::new().with("msg", "foo"), sender)
        .expect("spawn");
    let s2 = cluster
        .spawn("/sender/2", Properties::new().with("msg", "bar"), sender)
        .expect("spawn");
    let receiver_ref = cluster
        .spawn(
            "/receiver",
            Properties::new().with("type", "receiver"),
            receiver,
        )
        .expect("spawn");
    for r in [&s1, &s2, &receiver_ref] {
        println!("[main] {r} placed: {:?}", r.placement());
    }

    let looked_up = cluster.lookup("/receiver").expect("lookup");
    println!("[main] looked up isolate: {looked_up:?}");

    // Replies to sends from `main` come back to main's mailbox.
    let mailbox = cluster.mailbox().expect("mailbox");
    receiver_ref.send(&String::from("foo bar")).expect("send");
    match mailbox.recv_timeout(Duration::from_secs(5)) {
        Some(Event::Message(reply)) => {
            println!(
                "[main] message received: {}",
                reply.get::<String>().expect("a string")
            );
        }
        other => panic!("expected the receiver's reply, got {other:?}"),
    }
    cluster
        .join(Duration::from_secs(5))
        .expect("every isolate stops");
    let stats = cluster.stats();
    println!(
        "[main] all isolates stopped; undelivered messages: {}",
        stats.undelivered
    );
}
