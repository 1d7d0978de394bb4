//! `pnp-bench ucx-perftest`: UCX's own benchmark (`ucx_perftest` from Debian's `ucx-utils`) over
//! the transports the UCX bridges use, as the reference the bridges are measured against:
//! `tag_bw` for bulk sizes and `tag_lat` for small messages, each run several times with a fresh
//! server and client process, medians reported.
//!
//! `ucx_perftest` busy-polls its worker, so each of its two processes spins a core for the
//! whole run; `tag_lat` reports half a round trip (ping-pong), `tag_bw` one direction with
//! many sends in flight.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::runner::size_name;

/// A UCX transport setting, as the bridges use it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Transport {
    /// `UCX_TLS=tcp UCX_NET_DEVICES=lo`.
    Tcp,
    /// `UCX_TLS=sm`.
    Sm,
}

impl Transport {
    /// Its name (`tcp`, `sm`).
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Sm => "sm",
        }
    }

    /// Parse a [`name`](Self::name).
    pub fn parse(text: &str) -> Option<Self> {
        [Transport::Tcp, Transport::Sm]
            .into_iter()
            .find(|t| t.name() == text)
    }

    /// The environment `ucx_perftest` runs with.
    pub fn env(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Transport::Tcp => vec![("UCX_TLS", "tcp"), ("UCX_NET_DEVICES", "lo")],
            Transport::Sm => vec![("UCX_TLS", "sm")],
        }
    }
}

/// One `ucx_perftest` test to run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Test {
    /// `tag_bw` or `tag_lat`.
    pub test: &'static str,
    /// Message size in bytes.
    pub size: u64,
    /// Measured iterations (`-n`).
    pub iterations: u64,
    /// Warm-up iterations (`-w`).
    pub warmup: u64,
}

impl Test {
    /// `tag_bw` of `size`: about 2 GiB per run for small sizes, at least 4 messages for the
    /// large ones (a 1 GiB run moves 4 GiB), a tenth of that as warm-up (at least one).
    pub fn bandwidth(size: u64) -> Self {
        let iterations = ((2u64 << 30) / size.max(1)).clamp(4, 100_000);
        Test {
            test: "tag_bw",
            size,
            iterations,
            warmup: (iterations / 10).max(1),
        }
    }

    /// `tag_lat` of `size`: 20 000 round trips after 2 000 of warm-up.
    pub fn latency(size: u64) -> Self {
        Test {
            test: "tag_lat",
            size,
            iterations: 20_000,
            warmup: 2_000,
        }
    }
}

/// The figures of one run (the last CSV line of `ucx_perftest -f -v`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Run {
    /// `50.0_percentile_lat`, µs (half a round trip for `tag_lat`).
    pub p50_lat_us: f64,
    /// `overall_lat`, µs.
    pub avg_lat_us: f64,
    /// `overall_bw`, MiB/s (ucx_perftest's "MB/s" are 2²⁰ bytes).
    pub bw_mib_s: f64,
}

impl Run {
    /// Bandwidth in Gbit/s (10⁹ bits), the unit of the bench's S6 tables.
    pub fn gbit_per_s(&self) -> f64 {
        self.bw_mib_s * 1_048_576.0 * 8.0 / 1e9
    }
}

/// One test on one transport: every run and the medians.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// The transport.
    pub transport: Transport,
    /// The test.
    pub test: Test,
    /// Its runs (each a fresh server and client).
    pub runs: Vec<Run>,
    /// Runs that failed, with the reason.
    pub errors: Vec<String>,
    /// Median of `p50_lat_us`.
    #[serde(deserialize_with = "nan_if_null")]
    pub median_p50_lat_us: f64,
    /// Median of `bw_mib_s`.
    #[serde(deserialize_with = "nan_if_null")]
    pub median_bw_mib_s: f64,
    /// Median bandwidth in Gbit/s.
    #[serde(deserialize_with = "nan_if_null")]
    pub median_gbit_per_s: f64,
}

/// All of a `ucx-perftest` run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// `ucx_perftest`'s version line (`ucx_info -v`).
    pub ucx_version: String,
    /// CPUs the server and the client were pinned to (`taskset`), or `None`.
    pub cpus: Option<(usize, usize)>,
    /// Runs per point.
    pub runs: usize,
    /// The points.
    pub points: Vec<Point>,
}

/// A [`Test`] as its JSON has it (the name then matched to the names this module runs).
#[derive(serde::Deserialize)]
struct TestRecord {
    test: String,
    size: u64,
    iterations: u64,
    warmup: u64,
}

impl<'de> serde::Deserialize<'de> for Test {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = TestRecord::deserialize(d)?;
        let test = ["tag_bw", "tag_lat"]
            .into_iter()
            .find(|n| *n == r.test)
            .ok_or_else(|| {
                <D::Error as serde::de::Error>::custom(format!(
                    "unknown ucx_perftest test `{}`",
                    r.test
                ))
            })?;
        Ok(Test {
            test,
            size: r.size,
            iterations: r.iterations,
            warmup: r.warmup,
        })
    }
}

/// An `f64` that may have been written as `null` (serde_json writes NaN so): NaN then.
pub(crate) fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Median of `values` (NaN when empty; the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Parse the output of `ucx_perftest -f -v`: a CSV header and one line of final figures.
pub fn parse_output(stdout: &str) -> anyhow::Result<Run> {
    let mut lines = stdout.lines().map(str::trim).filter(|l| !l.is_empty());
    let header = lines
        .by_ref()
        .find(|l| l.starts_with("iterations,"))
        .context("no CSV header in ucx_perftest's output")?;
    let values = lines
        .next_back()
        .context("no figures after ucx_perftest's CSV header")?;
    let columns: Vec<&str> = header.split(',').collect();
    let values: Vec<f64> = values
        .split(',')
        .map(|v| v.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("ucx_perftest figures `{values}`"))?;
    let get = |name: &str| -> anyhow::Result<f64> {
        let i = columns
            .iter()
            .position(|c| c.trim().ends_with(name))
            .with_context(|| format!("no `{name}` column in `{header}`"))?;
        values
            .get(i)
            .copied()
            .with_context(|| format!("no value for `{name}`"))
    };
    Ok(Run {
        p50_lat_us: get("percentile_lat")?,
        avg_lat_us: get("overall_lat")?,
        bw_mib_s: get("overall_bw")?,
    })
}

/// `program` as a command, under `taskset -c CPU` when `cpu` is given.
pub(crate) fn command(program: impl AsRef<std::ffi::OsStr>, cpu: Option<usize>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// One run: a fresh server, then the client; the client's figures.
pub fn run_once(
    transport: Transport,
    test: &Test,
    port: u16,
    cpus: Option<(usize, usize)>,
) -> anyhow::Result<Run> {
    let mut server = command("ucx_perftest", cpus.map(|c| c.0));
    server
        .args(["-p", &port.to_string()])
        .envs(transport.env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut server = server
        .spawn()
        .context("starting ucx_perftest (ucx-utils)")?;
    // The server has no readiness signal (a probe connection would be taken as the client):
    // retry the client while the server is coming up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let result = loop {
        std::thread::sleep(Duration::from_millis(200));
        let mut client = command("ucx_perftest", cpus.map(|c| c.1));
        client
            .arg("127.0.0.1")
            .args(["-p", &port.to_string()])
            .args(["-t", test.test])
            .args(["-s", &test.size.to_string()])
            .args(["-n", &test.iterations.to_string()])
            .args(["-w", &test.warmup.to_string()])
            .args(["-f", "-v"])
            .envs(transport.env())
            .stdin(Stdio::null());
        let out = client.output().context("running the ucx_perftest client")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            break parse_output(&stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if Instant::now() > deadline || server.try_wait()?.is_some() {
            break Err(anyhow::anyhow!(
                "ucx_perftest client failed ({}): {} {}",
                out.status,
                stdout.trim(),
                stderr.trim()
            ));
        }
    };
    // The server ends after its one test; do not wait for a stuck one.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = server.kill();
            let _ = server.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    result
}

/// Run every test on every transport `runs` times (each run on a fresh port), in the order
/// transport × test × run (so a transient load spreads over points, not one whole point).
pub fn run_all(
    transports: &[Transport],
    tests: &[Test],
    runs: usize,
    cpus: Option<(usize, usize)>,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Report> {
    if Command::new("ucx_perftest")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        bail!("ucx_perftest not found (apt-get install ucx-utils)");
    }
    let ucx_version = Command::new("ucx_info")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().find(|l| l.contains("Version")).map(str::to_owned))
        .unwrap_or_default()
        .trim_start_matches(['#', ' '])
        .to_owned();
    let mut points = Vec::new();
    for &transport in transports {
        for test in tests {
            let mut point = Point {
                transport,
                test: test.clone(),
                runs: Vec::new(),
                errors: Vec::new(),
                median_p50_lat_us: f64::NAN,
                median_bw_mib_s: f64::NAN,
                median_gbit_per_s: f64::NAN,
            };
            for i in 0..runs {
                let port = crate::peers::free_port()?;
                match run_once(transport, test, port, cpus) {
                    Ok(run) => {
                        progress(&format!(
                            "{} {} {} run {}: {:.0} MiB/s, p50 {:.2} µs",
                            transport.name(),
                            test.test,
                            size_name(test.size),
                            i + 1,
                            run.bw_mib_s,
                            run.p50_lat_us
                        ));
                        point.runs.push(run);
                    }
                    Err(e) => {
                        progress(&format!(
                            "{} {} {} run {}: failed: {e:#}",
                            transport.name(),
                            test.test,
                            size_name(test.size),
                            i + 1
                        ));
                        point.errors.push(format!("{e:#}"));
                    }
                }
            }
            let lat: Vec<f64> = point.runs.iter().map(|r| r.p50_lat_us).collect();
            let bw: Vec<f64> = point.runs.iter().map(|r| r.bw_mib_s).collect();
            point.median_p50_lat_us = median(&lat);
            point.median_bw_mib_s = median(&bw);
            point.median_gbit_per_s = point.median_bw_mib_s * 1_048_576.0 * 8.0 / 1e9;
            points.push(point);
        }
    }
    Ok(Report {
        ucx_version,
        cpus,
        runs,
        points,
    })
}

/// The report as Markdown: one row per transport and test, medians and the spread of the runs.
pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## ucx_perftest ({}; {}; {} runs per point, medians)\n",
        if report.ucx_version.is_empty() {
            "UCX"
        } else {
            &report.ucx_version
        },
        match report.cpus {
            Some((s, c)) => format!("server on CPU {s}, client on CPU {c}"),
            None => "not pinned".to_owned(),
        },
        report.runs
    );
    let _ = writeln!(
        out,
        "| transport | test | size | iterations (warm-up) | median MiB/s | median Gbit/s | \
         MiB/s min–max | median p50 latency µs | p50 min–max µs | median mean latency µs | \
         failed runs |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut by_key: BTreeMap<(Transport, &str, u64), &Point> = BTreeMap::new();
    for p in &report.points {
        let _ = by_key.insert((p.transport, p.test.test, p.test.size), p);
    }
    for ((transport, test, size), p) in by_key {
        let range = |f: fn(&Run) -> f64| {
            let v: Vec<f64> = p.runs.iter().map(f).collect();
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if v.is_empty() {
                "–".to_owned()
            } else {
                format!("{min:.2}–{max:.2}")
            }
        };
        let _ = writeln!(
            out,
            "| {} | {test} | {} | {} ({}) | {:.0} | {:.2} | {} | {:.2} | {} | {:.2} | {} |",
            transport.name(),
            size_name(size),
            p.test.iterations,
            p.test.warmup,
            p.median_bw_mib_s,
            p.median_gbit_per_s,
            range(|r| r.bw_mib_s),
            p.median_p50_lat_us,
            range(|r| r.p50_lat_us),
            median(&p.runs.iter().map(|r| r.avg_lat_us).collect::<Vec<_>>()),
            p.errors.len(),
        );
    }
    out
}

/// Write `ucx_perftest.json` and `ucx_perftest.md` into `dir` (with a suffix when given, e.g.
/// `ucx_perftest-cpu1.json`).
pub fn write(report: &Report, dir: &Path, suffix: &str) -> anyhow::Result<()> {
    write_pair(dir, "ucx_perftest", suffix, report, &markdown(report))
}

/// Write `{stem}{suffix}.json` (the report) and `{stem}{suffix}.md` (its Markdown) into `dir`,
/// creating it.
pub(crate) fn write_pair(
    dir: &Path,
    stem: &str,
    suffix: &str,
    report: &impl serde::Serialize,
    markdown: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(format!("{stem}{suffix}.json")),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join(format!("{stem}{suffix}.md")), markdown)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_final_csv_line() {
        let out = "+----+\n| Send memory: host |\n+----+\niterations,50.0_percentile_lat,avg_lat,overall_lat,avg_bw,overall_bw,avg_mr,overall_mr\n 200,0.441,1551.784,1551.784,644.42,644.42,644,644\n";
        let run = parse_output(out).expect("parsed");
        assert_eq!(run.p50_lat_us, 0.441);
        assert_eq!(run.avg_lat_us, 1551.784);
        assert_eq!(run.bw_mib_s, 644.42);
        assert!((run.gbit_per_s() - 5.405).abs() < 0.01);
        assert!(parse_output("no figures").is_err());
    }

    #[test]
    fn a_report_reads_back_with_nan_medians() {
        let report = Report {
            ucx_version: "Version 1.13.1".into(),
            cpus: None,
            runs: 1,
            points: vec![Point {
                transport: Transport::Sm,
                test: Test::latency(8),
                runs: Vec::new(),
                errors: vec!["failed".into()],
                median_p50_lat_us: f64::NAN,
                median_bw_mib_s: 1.5,
                median_gbit_per_s: f64::NAN,
            }],
        };
        let text = serde_json::to_string(&report).expect("json");
        let back: Report = serde_json::from_str(&text).expect("read back");
        let p = &back.points[0];
        assert_eq!(
            (p.transport, p.test.test, p.test.size),
            (Transport::Sm, "tag_lat", 8)
        );
        assert!(p.median_p50_lat_us.is_nan());
        assert_eq!(p.median_bw_mib_s, 1.5);
        assert!(serde_json::from_str::<Report>(&text.replace("tag_lat", "tag_x")).is_err());
    }

    #[test]
    fn medians_and_iterations() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(Test::bandwidth(1 << 20).iterations, 2048);
        assert_eq!(Test::bandwidth(1 << 30).iterations, 4);
        assert_eq!(Test::bandwidth(1 << 30).warmup, 1);
    }
}
