//! The robust JSON worker of Dart's isolate documentation, in Rust.
//!
//! Run: `cargo run --release --example worker`
//!
//! A long-lived worker isolate parses large JSON documents. The main thread sends several
//! documents at once (each request has its own id), collects the answers in another order,
//! sees a malformed document fail only its own request, then closes the worker: requests
//! already sent are answered, a request after `close` is refused.

use std::time::{Duration, Instant};

use isolate_cluster::{CallError, Cluster};

/// A document of `n` records, about 100 bytes each.
fn document(n: usize) -> String {
    let records: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"id":{i},"name":"item-{i}","price":{}.5,"tags":["a","b","c"]}}"#,
                i % 97
            )
        })
        .collect();
    format!(r#"{{"records":[{}]}}"#, records.join(","))
}

fn main() {
    // Documents travel by copy, serialised straight into the ring: make it large enough
    // for the biggest one (about 13 MiB here). Rings are allocated per pair that talks.
    let cluster = Cluster::builder().ring_capacity(32 << 20).build();
    // The worker answers each document with (records, sum of prices).
    let worker = cluster
        .worker::<String, (u64, f64), _>("/json", |text| {
            let v: serde_json::Value =
                serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
            let records = v["records"].as_array().ok_or("no records array")?;
            let sum = records.iter().filter_map(|r| r["price"].as_f64()).sum();
            Ok((records.len() as u64, sum))
        })
        .expect("spawn the worker");
    let mailbox = cluster.mailbox().expect("mailbox");

    let sizes = [10_000, 50_000, 100, 200_000];
    let t = Instant::now();
    let ids: Vec<_> = sizes
        .iter()
        .map(|&n| {
            let doc = document(n);
            println!(
                "[main] sending a document of {n} records ({} KiB)",
                doc.len() / 1024
            );
            (n, worker.request(&mailbox, &doc).expect("send"))
        })
        .collect();
    // Collect the answers in reverse order: each comes back under its own id.
    for (n, id) in ids.into_iter().rev() {
        let reply = mailbox
            .wait_reply(id, Duration::from_secs(60))
            .expect("reply");
        let r = reply.get::<(u64, f64)>().expect("(records, sum)");
        println!(
            "[main] {n} records -> parsed {} records, prices sum to {:.1}",
            r.0, r.1
        );
        assert_eq!(r.0.to_native(), n as u64);
    }
    println!("[main] four documents parsed in {:.1?}", t.elapsed());

    match worker.call(
        &mailbox,
        &String::from("{ not json"),
        Duration::from_secs(5),
    ) {
        Err(CallError::Remote(e)) => println!("[main] malformed document fails alone: {e}"),
        other => panic!("expected a remote error, got {other:?}"),
    }

    let last = worker.request(&mailbox, &document(1_000)).expect("send");
    worker.close(&mailbox);
    let reply = mailbox
        .wait_reply(last, Duration::from_secs(10))
        .expect("answered though closed after");
    println!(
        "[main] the request sent before close was answered: {} records",
        reply.get::<(u64, f64)>().unwrap().0
    );
    match worker.request(&mailbox, &document(1)) {
        Err(CallError::Closed) => println!("[main] a request after close is refused"),
        other => panic!("expected Closed, got {other:?}"),
    }
    println!(
        "[main] worker stopped: {:?}",
        worker.isolate().wait_down(Duration::from_secs(5))
    );
}
