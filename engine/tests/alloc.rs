//! Zero heap allocations per copy send + receive in steady state, counted by a global
//! allocator (this file is its own test binary, with one test).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::with_timeout;
use isolate_cluster::rkyv::{Archive, Serialize};
use isolate_cluster::{Cluster, Event, Properties};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Archive, Serialize)]
struct Quote {
    symbol: [u8; 8],
    bid: u64,
    ask: u64,
    levels: [u32; 4],
}

#[test]
fn copy_sends_and_calls_allocate_nothing_in_steady_state() {
    with_timeout(Duration::from_secs(60), || {
        let cluster = Cluster::single_node();
        let echo = cluster
            .spawn("/echo", Properties::new(), |ctx| {
                while let Some(ev) = ctx.recv() {
                    if let Event::Message(m) = ev {
                        let q = m.get::<Quote>().unwrap();
                        let bid = q.bid.to_native();
                        m.reply(&Quote {
                            symbol: q.symbol,
                            bid: bid + 1,
                            ask: q.ask.to_native(),
                            levels: [1, 2, 3, 4],
                        })
                        .unwrap();
                    }
                }
            })
            .unwrap();
        let mailbox = cluster.mailbox().unwrap();
        let round_trip = |i: u64| {
            echo.send(&Quote {
                symbol: *b"EURUSD\0\0",
                bid: i,
                ask: i + 2,
                levels: [0; 4],
            })
            .unwrap();
            match mailbox.recv_timeout(Duration::from_secs(10)) {
                Some(Event::Message(m)) => {
                    assert_eq!(m.get::<Quote>().unwrap().bid.to_native(), i + 1)
                }
                other => panic!("no reply: {other:?}"),
            }
        };
        for i in 0..2_000 {
            round_trip(i);
        }
        let before = ALLOCS.load(Ordering::Relaxed);
        for i in 0..20_000 {
            round_trip(i);
        }
        let after = ALLOCS.load(Ordering::Relaxed);
        assert_eq!(after - before, 0, "allocations during 20k round trips");
        // Request/reply too: correlation ids, the pending table and in-place replies.
        let call = |i: u64| {
            let q = Quote {
                symbol: *b"EURUSD\0\0",
                bid: i,
                ask: i + 2,
                levels: [0; 4],
            };
            let reply = mailbox.call(&echo, &q, Duration::from_secs(10)).unwrap();
            assert_eq!(reply.get::<Quote>().unwrap().bid.to_native(), i + 1);
        };
        for i in 0..2_000 {
            call(i);
        }
        let before = ALLOCS.load(Ordering::Relaxed);
        for i in 0..20_000 {
            call(i);
        }
        let after = ALLOCS.load(Ordering::Relaxed);
        assert_eq!(after - before, 0, "allocations during 20k calls");
        cluster.shutdown();
        cluster.join(Duration::from_secs(10)).unwrap();
    });
}
