//! The task scheduler, as galileo_task's README uses it: a delayed one-off task, a
//! periodic task that cancels itself after three runs, a named greeting task run by name
//! from another isolate, a result read from a task's results stream, and a broadcast.
//!
//! ```text
//! cargo run --release --example scheduler
//! ```

use std::time::Duration;

use isolate_cluster::task::{Scheduler, TaskClient, TaskResult, TaskSpec};
use isolate_cluster::{rkyv, Cluster, Event, Properties};

const T: Duration = Duration::from_secs(10);

fn fibonacci(n: u64) -> u64 {
    (0..n).fold((0u64, 1u64), |(a, b), _| (b, a + b)).0
}

fn main() {
    let cluster = Cluster::single_node();
    let mut scheduler = Scheduler::new();

    // Run a one-off task, with an optional delay.
    scheduler
        .once(Duration::from_millis(300), |_t| {
            println!("300 ms later, the one-off task runs");
        })
        .expect("once");

    // Periodically run functionality; the task cancels itself after three runs.
    let mut i = 0;
    scheduler
        .every(Duration::from_millis(100), move |t| {
            i += 1;
            println!("Printing {i} time(s)!");
            if i >= 3 {
                println!("Cancelling foo task...");
                t.cancel();
            }
        })
        .expect("every");

    // Named tasks, with arguments.
    scheduler
        .named::<String, _, _>("greet", |_t, message: &rkyv::string::ArchivedString| {
            println!("greet: {message}");
            Ok::<String, String>(format!("greeted with {message:?}"))
        })
        .expect("named");

    // A periodic task with default arguments, whose results we will read from its stream.
    scheduler
        .add(
            TaskSpec::every(Duration::from_millis(50))
                .name("fibonacci")
                .args(&13u64)
                .run_with::<u64, _, _>(|_t, n: &rkyv::Archived<u64>| {
                    Ok::<u64, String>(fibonacci(n.to_native()))
                }),
        )
        .expect("add");

    // If you never start the scheduler, no tasks will ever run.
    let client = scheduler.start(&cluster, "/tasks").expect("start");

    // Another isolate (a "child node" of the seed) connects by path and runs a task.
    cluster
        .spawn(
            "/app/0",
            Properties::new().with("role", "app"),
            move |ctx| {
                let client = TaskClient::connect(ctx, "/tasks", T).expect("connect");
                let result = client
                    .run(ctx, "greet", &"Hello, world!".to_string(), T)
                    .expect("run greet");
                println!(
                    "/app/0: greet {} -> {}",
                    if result.successful {
                        "succeeded"
                    } else {
                        "failed"
                    },
                    result.value::<String>().expect("a String").as_str()
                );
                // Then waits for broadcasts.
                while let Some(ev) = ctx.recv() {
                    if let Event::Message(m) = ev {
                        if let Ok(text) = m.get::<String>() {
                            println!("/app/0 got the broadcast {:?}", text.as_str());
                        }
                    }
                }
            },
        )
        .expect("spawn app");

    // The first result of the fibonacci task's results stream.
    let mailbox = cluster.mailbox().expect("mailbox");
    client
        .subscribe(&mailbox, "fibonacci", T)
        .expect("subscribe");
    let fib13 = loop {
        match mailbox.recv_timeout(T) {
            Some(Event::Message(m)) => {
                if let Some(r) = TaskResult::from_message(&m) {
                    break r.expect("a valid result");
                }
            }
            other => panic!("no result: {other:?}"),
        }
    };
    println!(
        "fibonacci(13) = {} (run {}, {:?} late)",
        fib13.value::<u64>().expect("a u64"),
        fib13.run,
        fib13.lateness
    );
    client
        .unsubscribe(&mailbox, "fibonacci", T)
        .expect("unsubscribe");

    // Let the one-off and the periodic task finish, then broadcast to every app isolate.
    std::thread::sleep(Duration::from_millis(500));
    let sent = client.broadcast(
        &mailbox,
        &"michael jackson".to_string(),
        &Properties::new().with("role", "app"),
    );
    println!("broadcast reached {} isolate(s)", sent.sent);

    let status = client.status(&mailbox, T).expect("status");
    println!(
        "scheduler: {} task(s) left, {} run(s), {} failed",
        status.tasks, status.runs, status.failed
    );
    drop(mailbox);
    cluster.shutdown();
    cluster.join(T).expect("join");
}
