//! Shared machinery of the isolate-cluster benchmarks: configuration, core pinning,
//! histograms and the report (markdown table, `.hgrm` files, SVG percentile plots).
//!
//! Method (see `BENCHMARKS.md` of the project): every figure is measured next to its peers
//! in the same process run, on the same pinned core pair; round trips are recorded one by
//! one in an HDR histogram after a warm-up; ratios, not absolute times, are what travel.

pub mod cases;
#[cfg(feature = "net")]
pub mod net;
pub mod report;

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Quick mode (CI smoke run): fewer samples, shorter runs.
    pub quick: bool,
    /// Round trips before recording.
    pub warmup: usize,
    /// Round trips recorded per case.
    pub samples: usize,
    /// Space the round trips of the spinning ping-pongs at random (see [`Dither`]); on
    /// unless `IC_BENCH_DITHER=0`.
    pub dither: bool,
}

impl Config {
    /// Reads `IC_BENCH_QUICK=1` or a `--quick` argument, and `IC_BENCH_DITHER=0`.
    pub fn from_env() -> Self {
        let quick = std::env::var("IC_BENCH_QUICK").is_ok_and(|v| v != "0")
            || std::env::args().any(|a| a == "--quick");
        let dither = std::env::var("IC_BENCH_DITHER").map_or(true, |v| v != "0");
        if quick {
            Self {
                quick,
                warmup: 2_000,
                samples: 10_000,
                dither,
            }
        } else {
            Self {
                quick,
                warmup: 10_000,
                samples: 100_000,
                dither,
            }
        }
    }
}

/// The two cores every ping-pong runs on, read once before anything is pinned.
pub fn core_pair() -> Option<[core_affinity::CoreId; 2]> {
    let ids = core_affinity::get_core_ids()?;
    (ids.len() >= 2).then(|| [ids[0], ids[1]])
}

/// Pins the calling thread; `false` if the system refused.
pub fn pin(core: core_affinity::CoreId) -> bool {
    core_affinity::set_for_current(core)
}

/// A histogram of nanoseconds, 1 ns to 100 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// Records the time since `t` in nanoseconds.
#[inline]
pub fn record_since(h: &mut Histogram<u64>, t: Instant) {
    let ns = t.elapsed().as_nanos().max(1) as u64;
    let _ = h.record(ns.min(h.high()));
}

/// Records a duration in nanoseconds.
#[inline]
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = d.as_nanos().max(1) as u64;
    let _ = h.record(ns.min(h.high()));
}

/// Busy-waits until `deadline` (for fixed-rate sending).
#[inline]
pub fn spin_until(deadline: Instant) {
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

/// The CPU model line of `/proc/cpuinfo`, or "unknown".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Resident set size of this process in bytes (Linux), 0 elsewhere.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// User + system CPU time of this process.
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A global allocator that keeps a count of live heap bytes (for the scale run's memory
/// figures). A bench binary installs it with `#[global_allocator]`.
pub struct CountingAlloc;

static LIVE_BYTES: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Live heap bytes, if the binary installed [`CountingAlloc`] (0 otherwise).
pub fn live_heap_bytes() -> i64 {
    LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as i64 - layout.size() as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
        // SAFETY: same contract as our caller's.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

/// A pseudo-random pause before each round trip of a spinning ping-pong, outside the timed
/// interval.
///
/// Back to back, the two spinning sides of a ping-pong fall into a fixed phase of each
/// other's polling loops (a pause instruction takes about 25 ns on these CPUs), and a p50
/// then says more about where that phase landed than about the code: the same build read
/// 1.00× and 1.27× of raw `rtrb` within one hour. Spacing the round trips at random (0 to
/// 255 turns of a dependent add: up to about 70 ns here, more than two pauses) makes each
/// round trip meet the other side at a random point of its loop, so the percentiles
/// average over the phases, for every peer alike. The sequence is the same in every case
/// and every run (the C harness, `benches/c/call_bench.c`, runs the same one).
pub struct Dither {
    on: bool,
    state: u64,
}

impl Dither {
    /// A dither that pauses if `on` (see [`Config::dither`]).
    pub fn new(on: bool) -> Self {
        Self {
            on,
            state: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Waits the next pseudo-random number of turns (xorshift64: its top byte).
    #[inline]
    pub fn pause(&mut self) {
        if !self.on {
            return;
        }
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        let mut k = 0u64;
        for _ in 0..x >> 56 {
            k = std::hint::black_box(k + 1);
        }
    }
}
