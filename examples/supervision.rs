//! A small supervision tree: a flaky child panics and is restarted, until the restart
//! intensity is exceeded and the failure escalates to the node.
//!
//! Run: `cargo run --release --example supervision`
//!
//! ```text
//! node (one-for-one, gives up at the first escalation)
//! └── /app            supervisor, transient, at most 2 restarts of its children in 10 s
//!     ├── /app/steady permanent: counts what it gets
//!     └── /app/flaky  permanent: panics on a poisoned job
//! ```
//!
//! The main thread sends jobs to `/app/flaky`, every fourth one poisoned. Each panic comes
//! back to `/app` as `ChildFailed` with the panic message and the child is restarted at
//! the same path with the same properties (`ChildRestarted`); a reference held across the
//! restart names the dead incarnation, so main looks the path up again. The third panic
//! within the window is one too many: `/app` gives up, its children are stopped first, it
//! goes down as `Escalated`, and the node — allowed no restarts — shuts down.

use std::time::{Duration, Instant};

use isolate_cluster::{
    Cluster, Context, DownReason, Event, IsolateRef, Properties, Restart, SendError, Supervision,
};

fn flaky(ctx: &Context) {
    let name = ctx
        .property("name")
        .map(|v| v.to_string())
        .unwrap_or_default();
    println!("  {} started ({name})", ctx.path());
    while let Some(ev) = ctx.recv() {
        if let Event::Message(m) = ev {
            let job = *m.get::<u32>().expect("a job number");
            if job % 4 == 3 {
                panic!("poisoned job {job}");
            }
        }
    }
}

fn steady(ctx: &Context) {
    let mut seen = 0u32;
    while let Some(ev) = ctx.recv() {
        match ev {
            Event::Message(_) => seen += 1,
            Event::ShutdownRequested => println!("  /app/steady stops after {seen} jobs"),
            _ => {}
        }
    }
}

fn app(ctx: &Context) {
    ctx.supervise_children(Supervision::one_for_one().intensity(2, Duration::from_secs(10)));
    ctx.spawn_supervised("/app/steady", Properties::new(), Restart::Permanent, steady)
        .expect("spawn /app/steady");
    ctx.spawn_supervised(
        "/app/flaky",
        Properties::new().with("name", "the flaky one"),
        Restart::Permanent,
        flaky,
    )
    .expect("spawn /app/flaky");
    while let Some(ev) = ctx.recv() {
        match ev {
            Event::ChildFailed(child, why) => println!("/app: {} failed: {why}", child.path()),
            Event::ChildRestarted(child) => {
                println!("/app: {} restarted (endpoint {})", child.path(), child.id())
            }
            Event::SupervisionGaveUp(why) => println!("/app: giving up: {why}"),
            _ => {}
        }
    }
}

/// The live incarnation at `path`, waiting for a restart if needed; `None` once the
/// node has given up (nothing will be restarted).
fn current(cluster: &Cluster, path: &str) -> Option<IsolateRef> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && cluster.failure().is_none() {
        match cluster.lookup(path) {
            Ok(r) if r.is_alive() => return Some(r),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    None
}

fn main() {
    // One line per panic instead of the default report with a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        eprintln!("  panic in {}: {info}", thread.name().unwrap_or("?"));
    }));
    let cluster = Cluster::builder()
        .supervision(Supervision::one_for_one().intensity(0, Duration::from_secs(10)))
        .build();
    let app_ref = cluster
        .spawn_supervised("/app", Properties::new(), Restart::Transient, app)
        .expect("spawn /app");
    let steady_ref = current(&cluster, "/app/steady").expect("/app/steady is up");

    let mut flaky = current(&cluster, "/app/flaky").expect("/app/flaky is up");
    for job in 0u32.. {
        let _ = steady_ref.send(&job);
        match flaky.send(&job) {
            Ok(()) => {}
            Err(SendError::Disconnected(())) => {
                // The incarnation we held is gone: look the path up again.
                match current(&cluster, "/app/flaky") {
                    Some(r) => {
                        flaky = r;
                        let _ = flaky.send(&job);
                    }
                    None => break,
                }
            }
            Err(e) => panic!("send failed: {e}"),
        }
        if job % 4 == 3 {
            // Let the panic and the restart happen before the next job.
            let _ = flaky.wait_down(Duration::from_secs(5));
        }
    }

    cluster
        .join(Duration::from_secs(10))
        .expect("the node shut down");
    match app_ref.wait_down(Duration::ZERO) {
        Some(DownReason::Escalated(why)) => println!("main: /app went down escalated: {why}"),
        other => println!("main: /app went down: {other:?}"),
    }
    println!(
        "main: the node gave up: {}",
        cluster.failure().unwrap_or_else(|| "(no)".into())
    );
}
