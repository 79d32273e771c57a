//! The report folder: `REPORT.md`, one `.hgrm` file per case, SVG percentile plots.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// One measured case.
pub struct Case {
    /// Which plot and table it belongs to.
    pub group: &'static str,
    /// Its name in tables and legends.
    pub name: String,
    /// Round-trip times in nanoseconds.
    pub hist: Histogram<u64>,
}

impl Case {
    /// A percentile in nanoseconds.
    pub fn p(&self, q: f64) -> u64 {
        self.hist.value_at_quantile(q)
    }
}

/// A file-system-safe version of a case name.
fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect::<String>()
        .split('_')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("_")
}

/// Creates `target/bench-report/<unix seconds>/` (or `$IC_BENCH_REPORT_DIR`).
pub fn new_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::var_os("IC_BENCH_REPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| reports_root().join(unix_secs().to_string()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Creates `target/bench-report/<prefix>-<unix seconds>/` (or the same folder under
/// `$IC_BENCH_REPORT_DIR`).
pub fn new_named_dir(prefix: &str) -> std::io::Result<PathBuf> {
    let base = std::env::var_os("IC_BENCH_REPORT_DIR").map_or_else(reports_root, PathBuf::from);
    let dir = base.join(format!("{prefix}-{}", unix_secs()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `target/bench-report` of the workspace.
fn reports_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("bench-report")
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes the percentile distribution in HdrHistogram's `.hgrm` text format (values in µs).
pub fn write_hgrm(path: &Path, h: &Histogram<u64>) -> std::io::Result<()> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            format!("{:>14.2}", 1.0 / (1.0 - q))
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "{:>12.3} {:>14.12} {:>10} {}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            v.count_since_last_iteration(),
            inv
        );
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        s,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    std::fs::write(path, s)
}

/// The points of a percentile-distribution curve: (1 / (1 - quantile), µs).
fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    h.iter_quantiles(5)
        .filter(|v| v.quantile_iterated_to() < 1.0)
        .map(|v| {
            (
                1.0 / (1.0 - v.quantile_iterated_to()),
                v.value_iterated_to() as f64 / 1000.0,
            )
        })
        .collect()
}

/// Plots the percentile distribution of every case of `group` on one set of axes, and
/// the `references` (cases of other groups measured in the same run, such as raw `rtrb`
/// and the floor) as dashed lines on the same axes.
pub fn plot_group(
    path: &Path,
    title: &str,
    cases: &[&Case],
    references: &[&Case],
) -> Result<(), String> {
    if cases.is_empty() {
        return Ok(());
    }
    let every = || cases.iter().chain(references);
    let max_y = every().map(|c| c.hist.max()).max().unwrap_or(1).max(2) as f64 / 1000.0;
    let min_y = every().map(|c| c.hist.min()).min().unwrap_or(1).max(1) as f64 / 1000.0;
    let root = SVGBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (1.0f64..1_000_000.0).log_scale(),
            (min_y * 0.8..max_y * 1.25).log_scale(),
        )
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("round trip (µs)")
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 1.0 / x);
            if p < 99.0 {
                format!("{p:.0}%")
            } else {
                format!("{}%", format!("{p:.4}").trim_end_matches('0'))
            }
        })
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, c) in cases.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(curve(&c.hist), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(c.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
            });
    }
    for (i, c) in references.iter().enumerate() {
        let color = Palette99::pick(cases.len() + i).to_rgba();
        chart
            .draw_series(DashedLineSeries::new(
                curve(&c.hist),
                6,
                4,
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(format!("{} (reference, dashed)", c.name))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 7, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// Formats nanoseconds for a table.
pub fn ns(v: u64) -> String {
    if v >= 10_000_000 {
        format!("{:.1} ms", v as f64 / 1e6)
    } else if v >= 10_000 {
        format!("{:.1} µs", v as f64 / 1e3)
    } else {
        format!("{v} ns")
    }
}

/// The markdown table of a group: percentiles and ratios to `base` and `floor` (p50 and
/// p99.9).
pub fn table(cases: &[&Case], base: Option<&Case>, floor: Option<&Case>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| case | p50 | p99 | p99.9 | p99.99 | max | p50 / rtrb | p99.9 / rtrb | p50 / floor |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cases {
        let ratio = |b: Option<&Case>, q: f64| {
            b.map_or_else(
                || "—".to_owned(),
                |b| format!("{:.2}×", c.p(q) as f64 / b.p(q).max(1) as f64),
            )
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.name,
            ns(c.p(0.5)),
            ns(c.p(0.99)),
            ns(c.p(0.999)),
            ns(c.p(0.9999)),
            ns(c.hist.max()),
            ratio(base, 0.5),
            ratio(base, 0.999),
            ratio(floor, 0.5),
        );
    }
    s
}

/// A group of cases: one plot and one table of the report.
pub struct Group {
    /// The [`Case::group`] of its members (and the SVG file's name).
    pub id: &'static str,
    /// The title of its plot and section.
    pub title: &'static str,
    /// Names of cases of other groups drawn on its plot as references (dashed).
    pub references: &'static [&'static str],
}

/// Writes every case's `.hgrm` file and every group's SVG plot into `dir`.
pub fn write_files(dir: &Path, cases: &[Case], groups: &[Group]) -> Result<(), String> {
    for c in cases {
        write_hgrm(&dir.join(format!("{}.hgrm", slug(&c.name))), &c.hist)
            .map_err(|e| e.to_string())?;
    }
    for g in groups {
        let members: Vec<&Case> = cases.iter().filter(|c| c.group == g.id).collect();
        let references: Vec<&Case> = g
            .references
            .iter()
            .filter_map(|name| cases.iter().find(|c| c.name == *name))
            .collect();
        plot_group(
            &dir.join(format!("{}.svg", g.id)),
            g.title,
            &members,
            &references,
        )?;
    }
    Ok(())
}

/// One measured throughput case: messages moved one way in the samples criterion timed
/// (its warm-up left out).
pub struct ThroughputRow {
    /// The criterion group: payload and ring.
    pub group: String,
    /// The peer (criterion's benchmark id within the group).
    pub peer: String,
    /// Payload bytes per message (copied, or moved by a transfer).
    pub bytes: usize,
    /// Whether the payload is moved (a transfer) rather than copied.
    pub moved: bool,
    /// Messages in the timed samples.
    pub messages: u64,
    /// Time of the timed samples.
    pub time: std::time::Duration,
}

impl ThroughputRow {
    /// One-way messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.time.as_secs_f64().max(1e-12)
    }
}

/// Formats a rate with a decimal prefix: `164.2 M`.
pub fn si(v: f64) -> String {
    let (scale, prefix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(scale, _)| v >= *scale)
        .unwrap_or((1.0, ""));
    format!("{:.1} {prefix}", v / scale)
}

/// The markdown table of the throughput cases: messages/s, bytes/s and the ratio to the
/// group's raw `rtrb` row, one row per case, in the order they ran.
pub fn throughput_table(rows: &[ThroughputRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| payload and ring | peer | messages/s | bytes/s | / raw rtrb (same group) |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|");
    for r in rows {
        let rtrb = rows
            .iter()
            .find(|b| b.group == r.group && b.peer.starts_with("raw rtrb"));
        let ratio = rtrb.map_or_else(
            || "—".to_owned(),
            |b| format!("{:.2}×", r.rate() / b.rate()),
        );
        let _ = writeln!(
            s,
            "| {} | {} | {}msg/s | {}B/s{} | {ratio} |",
            r.group,
            r.peer,
            si(r.rate()),
            si(r.rate() * r.bytes as f64),
            if r.moved { " (moved)" } else { "" }
        );
    }
    s
}
