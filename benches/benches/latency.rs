//! Round-trip latency of isolate-cluster against the machine's floor and its peers, all in
//! one process run, on one pinned core pair, recorded in HDR histograms.
//!
//! `cargo bench --bench latency` (full, under 10 minutes on 2 cores);
//! `IC_BENCH_QUICK=1 cargo bench --bench latency` (quick, under a minute);
//! `IC_BENCH_DITHER=0` runs the spinning ping-pongs back to back instead of spacing their
//! round trips at random (see `isolate_cluster_benches::Dither`);
//! `IC_BENCH_GROUP=core` runs one group of cases only (core, payload, wake or rate; `task`
//! runs only the scheduler section; `throughput` only the interleaved 8-byte throughput
//! section; `net`, with `--features net`, only the cross-process section).
//! The report folder's path is printed at the end.

use isolate_cluster_benches::cases;

/// The cross-process section (with the `net` feature).
fn net(cfg: Config) -> String {
    #[cfg(feature = "net")]
    return isolate_cluster_benches::net::cases(cfg);
    #[cfg(not(feature = "net"))]
    {
        let _ = cfg;
        String::new()
    }
}

use std::fmt::Write as _;

use isolate_cluster_benches::report::{self, Case, Group};
use isolate_cluster_benches::{core_pair, cpu_model, Config, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn main() {
    // The other process of the cross-process cases.
    #[cfg(feature = "net")]
    if std::env::var_os("IC_BENCH_NET_CHILD").is_some() {
        return isolate_cluster_benches::net::child();
    }
    let cfg = Config::from_env();
    let Some(cores) = core_pair() else {
        println!("the latency bench needs two cores");
        return;
    };
    let started = std::time::Instant::now();
    // Ten rounds: each starts fresh threads and rings, and one round that lands badly
    // (the two sides' polling out of step, a burst of load) then weighs a tenth of the
    // samples. With four rounds such a round moved a p50 by a whole 10 ns clock step.
    let rounds = if cfg.quick { 1 } else { 10 };
    let method = format!(
        "{} samples per latency case in {rounds} round(s) of {}, each round after {} warm-up round trips; {}",
        cfg.samples,
        cfg.samples / rounds,
        cfg.warmup,
        if cfg.dither {
            "the spinning ping-pongs' round trips spaced at random (see `Dither`)"
        } else {
            "round trips back to back (IC_BENCH_DITHER=0)"
        }
    );
    println!(
        "isolate-cluster latency: {} mode, {method}, cores {} and {} (pinned)",
        if cfg.quick { "quick" } else { "full" },
        cores[0].id,
        cores[1].id
    );
    // Every case is registered first, then the whole list runs in rounds, interleaved,
    // each round recording its share of the samples into the case's histogram: load
    // that drifts during the run (these machines are shared) hits every peer alike.
    type Measure = Box<dyn Fn(Config) -> hdrhistogram::Histogram<u64>>;
    let mut plan: Vec<(&'static str, &'static str, Measure)> = Vec::new();
    let mut run = |group: &'static str, name: &'static str, f: Measure| plan.push((group, name, f));

    // The core comparison: small messages between two spinning threads.
    run(
        "core",
        "floor: atomic flag",
        Box::new(move |cfg: Config| cases::floor(cfg, cores)),
    );
    run(
        "core",
        "raw rtrb",
        Box::new(move |cfg: Config| cases::raw_rtrb(cfg, cores)),
    );
    run(
        "core",
        "isolate-cluster copy 8 B",
        Box::new(move |cfg: Config| cases::copy::<u64>(cfg, cores, 7)),
    );
    run(
        "core",
        "crossbeam-channel bounded",
        Box::new(move |cfg: Config| cases::crossbeam(cfg, cores)),
    );
    run(
        "core",
        "isolate-cluster call (request/reply)",
        Box::new(move |cfg: Config| cases::call(cfg, cores)),
    );
    run(
        "core",
        "C API call (request/reply, through the FFI)",
        Box::new(move |cfg: Config| cases::c_call(cfg, cores)),
    );
    run(
        "core",
        "iceoryx2 publish-subscribe",
        Box::new(move |cfg: Config| cases::iceoryx2(cfg, cores)),
    );
    run(
        "core",
        "ractor call (request/reply)",
        Box::new(move |cfg: Config| cases::ractor_call(cfg, cores)),
    );
    run(
        "core",
        "std::sync::mpsc sync_channel",
        Box::new(move |cfg: Config| cases::std_mpsc(cfg, cores)),
    );
    // Payload sweep.
    run(
        "payload",
        "isolate-cluster copy 8 B (sweep)",
        Box::new(move |cfg: Config| cases::copy::<u64>(cfg, cores, 7)),
    );
    run(
        "payload",
        "isolate-cluster copy 64 B",
        Box::new(move |cfg: Config| cases::copy::<[u8; 64]>(cfg, cores, [7; 64])),
    );
    run(
        "payload",
        "isolate-cluster copy 256 B",
        Box::new(move |cfg: Config| cases::copy::<[u8; 256]>(cfg, cores, [7; 256])),
    );
    run(
        "payload",
        "isolate-cluster copy 4 KiB",
        Box::new(move |cfg: Config| cases::copy::<[u8; 4096]>(cfg, cores, [7; 4096])),
    );
    run(
        "payload",
        "isolate-cluster transfer 64 KiB",
        Box::new(move |cfg: Config| cases::transfer(cfg, cores, 64 << 10)),
    );
    run(
        "payload",
        "isolate-cluster transfer 1 MiB",
        Box::new(move |cfg: Config| cases::transfer(cfg, cores, 1 << 20)),
    );
    run(
        "payload",
        "isolate-cluster transfer 16 MiB",
        Box::new(move |cfg: Config| cases::transfer(cfg, cores, 16 << 20)),
    );
    // Wake-ups: both sides sleep between messages.
    run(
        "wake",
        "isolate-cluster parked (SpinThenPark, no spin)",
        Box::new(move |cfg: Config| cases::parked(cfg, cores)),
    );
    run(
        "wake",
        "thread park/unpark",
        Box::new(move |cfg: Config| cases::park_unpark(cfg, cores)),
    );
    // Fixed rate, measured from the intended send time.
    run(
        "rate",
        "raw rtrb at 50k/s",
        Box::new(move |cfg: Config| cases::fixed_rate_rtrb(cfg, cores, 50_000)),
    );
    run(
        "rate",
        "isolate-cluster at 50k/s",
        Box::new(move |cfg: Config| cases::fixed_rate(cfg, cores, 50_000)),
    );
    run(
        "rate",
        "isolate-cluster at 10k/s (parks)",
        Box::new(move |cfg: Config| cases::fixed_rate(cfg, cores, 10_000)),
    );

    // `IC_BENCH_GROUP=core` (or payload, wake, rate) runs one group only, without the
    // scale run: for quick before/after comparisons while tuning.
    let only = std::env::var("IC_BENCH_GROUP").ok();
    if let Some(g) = &only {
        plan.retain(|(group, _, _)| group == g);
    }
    let round_cfg = Config {
        samples: cfg.samples / rounds,
        ..cfg
    };
    let mut all: Vec<Case> = plan
        .iter()
        .map(|(group, name, _)| Case {
            group,
            name: (*name).to_owned(),
            hist: isolate_cluster_benches::histogram(),
        })
        .collect();
    for _ in 0..rounds {
        for ((_, _, f), case) in plan.iter().zip(all.iter_mut()) {
            case.hist.add(f(round_cfg)).expect("same histogram bounds");
        }
    }
    for c in &all {
        // The header promises this many samples of every case.
        assert_eq!(
            c.hist.len(),
            (round_cfg.samples * rounds) as u64,
            "samples recorded for {}",
            c.name
        );
    }
    for c in &all {
        println!(
            "  {:<48} p50 {:>9}  p99.9 {:>9}  max {:>9}",
            c.name,
            report::ns(c.p(0.5)),
            report::ns(c.p(0.999)),
            report::ns(c.hist.max())
        );
    }

    let throughput = match only.as_deref() {
        None | Some("throughput") => cases::throughput(cfg, cores),
        Some(_) => String::new(),
    };
    // The scale section returns its idle-CPU target line as well.
    let (scale, idle_target) = match only.as_deref() {
        None => {
            let (scale, idle) = cases::scale(cfg);
            let rest = cases::jobs(cfg) + &cases::tasks(cfg) + &net(cfg);
            (scale + &rest, Some(idle))
        }
        Some("task") => (cases::tasks(cfg), None),
        Some("net") => (net(cfg), None),
        Some(_) => (String::new(), None),
    };

    let dir = report::new_dir().expect("report folder");
    let groups = [
        Group {
            id: "core",
            title: "Round trip, small messages, spinning",
            references: &[],
        },
        // The sweep has no peer of its own: the design's limit and the machine's floor
        // go on its plot (its table has their ratios).
        Group {
            id: "payload",
            title: "isolate-cluster round trip by payload (copy vs transfer)",
            references: &["raw rtrb", "floor: atomic flag"],
        },
        Group {
            id: "wake",
            title: "Round trip when the receiver sleeps",
            references: &[],
        },
        Group {
            id: "rate",
            title: "Fixed rate, from the intended send time",
            references: &[],
        },
    ];
    if let Err(e) = report::write_files(&dir, &all, &groups) {
        println!("could not write the plots: {e}");
    }
    let find = |name: &str| all.iter().find(|c| c.name == name);
    let rtrb = find("raw rtrb");
    let floor = find("floor: atomic flag");
    let mut md = String::new();
    let _ = writeln!(md, "# isolate-cluster latency report\n");
    let _ = writeln!(
        md,
        "Machine: {}, {} cores online; ping-pong pinned to cores {} and {}. Mode: {}, {method}. Every figure is a round trip; ratios compare cases of this same run.\n",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cores[0].id,
        cores[1].id,
        if cfg.quick { "quick" } else { "full" },
    );
    for Group { id, title, .. } in groups {
        let members: Vec<&Case> = all.iter().filter(|c| c.group == id).collect();
        let _ = writeln!(md, "## {title}\n\n![{title}]({id}.svg)\n");
        md.push_str(&report::table(&members, rtrb, floor));
        md.push('\n');
    }
    md.push_str(&throughput);
    md.push('\n');
    md.push_str(&scale);
    let mut targets = cases::targets(&all);
    // The throughput section ends with its target line.
    if let Some(line) = throughput.lines().last().filter(|l| l.starts_with("- ")) {
        targets.push_str(line);
        targets.push('\n');
    }
    if let Some(line) = idle_target {
        targets.push_str(&line);
        targets.push('\n');
    }
    let _ = writeln!(md, "\n## Targets\n\n{targets}");
    std::fs::write(dir.join("REPORT.md"), &md).expect("write REPORT.md");

    println!("\n{}", scale.trim_end());
    println!("\nreport: {}", dir.display());
    println!("took {:.1?}", started.elapsed());
    println!("{}", targets.trim_end());
    println!("cores used: {} and {} (pinned)", cores[0].id, cores[1].id);
}
