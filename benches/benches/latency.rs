//! Round-trip latency of isolate-cluster against the machine's floor and its peers, all in
//! one process run, on one pinned core pair, recorded in HDR histograms.
//!
//! `cargo bench --bench latency` (full, under 10 minutes on 2 cores);
//! `IC_BENCH_QUICK=1 cargo bench --bench latency` (quick, under a minute).
//! The report folder's path is printed at the end.

use isolate_cluster_benches::cases;

use std::fmt::Write as _;

use isolate_cluster_benches::report::{self, Case};
use isolate_cluster_benches::{core_pair, cpu_model, Config};

fn main() {
    let cfg = Config::from_env();
    let Some(cores) = core_pair() else {
        println!("the latency bench needs two cores");
        return;
    };
    let started = std::time::Instant::now();
    println!(
        "isolate-cluster latency: {} mode, {} samples after {} warm-up round trips per case, cores {} and {} (pinned)",
        if cfg.quick { "quick" } else { "full" },
        cfg.samples,
        cfg.warmup,
        cores[0].id,
        cores[1].id
    );
    let mut all: Vec<Case> = Vec::new();
    let mut run =
        |group: &'static str, name: &str, f: &dyn Fn() -> hdrhistogram::Histogram<u64>| {
            let hist = f();
            println!(
                "  {name:<40} p50 {:>9}  p99.9 {:>9}  max {:>9}",
                report::ns(hist.value_at_quantile(0.5)),
                report::ns(hist.value_at_quantile(0.999)),
                report::ns(hist.max())
            );
            all.push(Case {
                group,
                name: name.to_owned(),
                hist,
            });
        };

    // The core comparison: small messages between two spinning threads.
    run("core", "floor: atomic flag", &|| cases::floor(cfg, cores));
    run("core", "raw rtrb", &|| cases::raw_rtrb(cfg, cores));
    run("core", "isolate-cluster copy 8 B", &|| {
        cases::copy::<u64>(cfg, cores, 7)
    });
    run("core", "crossbeam-channel bounded", &|| {
        cases::crossbeam(cfg, cores)
    });
    run("core", "iceoryx2 publish-subscribe", &|| {
        cases::iceoryx2(cfg, cores)
    });
    run("core", "ractor call (request/reply)", &|| {
        cases::ractor_call(cfg, cores)
    });
    run("core", "std::sync::mpsc sync_channel", &|| {
        cases::std_mpsc(cfg, cores)
    });
    // Payload sweep.
    run("payload", "isolate-cluster copy 8 B ", &|| {
        cases::copy::<u64>(cfg, cores, 7)
    });
    run("payload", "isolate-cluster copy 64 B", &|| {
        cases::copy::<[u8; 64]>(cfg, cores, [7; 64])
    });
    run("payload", "isolate-cluster copy 256 B", &|| {
        cases::copy::<[u8; 256]>(cfg, cores, [7; 256])
    });
    run("payload", "isolate-cluster copy 4 KiB", &|| {
        cases::copy::<[u8; 4096]>(cfg, cores, [7; 4096])
    });
    run("payload", "isolate-cluster transfer 64 KiB", &|| {
        cases::transfer(cfg, cores, 64 << 10)
    });
    run("payload", "isolate-cluster transfer 1 MiB", &|| {
        cases::transfer(cfg, cores, 1 << 20)
    });
    run("payload", "isolate-cluster transfer 16 MiB", &|| {
        cases::transfer(cfg, cores, 16 << 20)
    });
    // Wake-ups: both sides sleep between messages.
    run(
        "wake",
        "isolate-cluster parked (SpinThenPark, no spin)",
        &|| cases::parked(cfg, cores),
    );
    run("wake", "thread park/unpark", &|| {
        cases::park_unpark(cfg, cores)
    });
    // Fixed rate, measured from the intended send time.
    run("rate", "raw rtrb at 20k/s", &|| {
        cases::fixed_rate_rtrb(cfg, cores, 20_000)
    });
    run("rate", "isolate-cluster at 20k/s", &|| {
        cases::fixed_rate(cfg, cores, 20_000)
    });
    run("rate", "isolate-cluster at 2k/s (parks)", &|| {
        cases::fixed_rate(cfg, cores, 2_000)
    });

    let scale = cases::scale(cfg);

    let dir = report::new_dir().expect("report folder");
    let groups = [
        ("core", "Round trip, small messages, spinning"),
        (
            "payload",
            "isolate-cluster round trip by payload (copy vs transfer)",
        ),
        ("wake", "Round trip when the receiver sleeps"),
        ("rate", "Fixed rate, from the intended send time"),
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
        "Machine: {}, {} cores online; ping-pong pinned to cores {} and {}. Mode: {}, {} samples after {} warm-up round trips per case. Every figure is a round trip; ratios compare cases of this same run.\n",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cores[0].id,
        cores[1].id,
        if cfg.quick { "quick" } else { "full" },
        cfg.samples,
        cfg.warmup
    );
    for (group, title) in groups {
        let members: Vec<&Case> = all.iter().filter(|c| c.group == group).collect();
        let _ = writeln!(md, "## {title}\n\n![{title}]({group}.svg)\n");
        md.push_str(&report::table(&members, rtrb, floor));
        md.push('\n');
    }
    md.push_str(&scale);
    let targets = cases::targets(&all);
    let _ = writeln!(md, "\n## Targets\n\n{targets}");
    std::fs::write(dir.join("REPORT.md"), &md).expect("write REPORT.md");

    println!("\n{}", scale.trim_end());
    println!("\nreport: {}", dir.display());
    println!("took {:.1?}", started.elapsed());
    println!("{}", targets.trim_end());
    println!("cores used: {} and {} (pinned)", cores[0].id, cores[1].id);
}
