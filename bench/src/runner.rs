//! The side-by-side runner: every scenario against every peer, each point repeated, medians
//! reported. Peers are restarted for each repeat and the repeats go round the peers in turn, so
//! slow drift on the machine spreads over all of them instead of landing on one.

use std::collections::BTreeMap;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::client::Protocol;
use crate::idle::{IdleGate, IdleReport};
use crate::peers::{self, PeerKind, Tools};
use crate::scenarios::{self, Sample, Scale, Scenario, Target};

/// One point of the matrix: a scenario variant for one protocol.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// The scenario.
    pub scenario: Scenario,
    /// Which variant (`closed c32`, `c1`, `open 2000/s`, a message size…).
    pub variant: String,
    /// How the client speaks.
    pub protocol: Protocol,
}

/// Everything to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Sizes and durations.
    pub scale: Scale,
    /// Peers, in table order.
    pub peers: Vec<PeerKind>,
    /// Scenarios to run.
    pub scenarios: Vec<Scenario>,
    /// Only these protocols (all when empty).
    pub protocols: Vec<Protocol>,
    /// Runs of each point.
    pub repeats: usize,
    /// Programs and pinning.
    pub tools: Tools,
    /// When to start measuring.
    pub idle: IdleGate,
    /// Show a progress bar.
    pub progress: bool,
    /// Write the records so far here after each peer, so an interrupted run keeps its data.
    pub checkpoint: Option<std::path::PathBuf>,
}

/// One run of one point at one peer.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// What was run.
    pub point: Point,
    /// Against whom.
    pub peer: PeerKind,
    /// Which repeat (0-based).
    pub repeat: usize,
    /// How idle the machine was.
    pub idle: IdleReport,
    /// The numbers, if it worked.
    pub sample: Option<Sample>,
    /// Why not, if it did not.
    pub error: Option<String>,
    /// Seconds the point took, idle wait included.
    #[serde(default)]
    pub took_s: f64,
    /// Why the peer cannot run this point here (the point was not run; reported as `n/a`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_applicable: Option<String>,
}

/// The median over the repeats of one point at one peer.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Median {
    /// What was run.
    pub point: Point,
    /// Against whom.
    pub peer: PeerKind,
    /// Median of each metric over the successful runs.
    pub metrics: BTreeMap<String, f64>,
    /// The latency distribution of the median run, if the point has one.
    pub cdf: Vec<(f64, f64)>,
    /// Successful runs.
    pub runs: usize,
    /// The last error, if any run failed.
    pub error: Option<String>,
    /// Why the peer cannot run this point here, if it could not (shown as `n/a`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_applicable: Option<String>,
}

/// A whole run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Results {
    /// The machine and the peers' versions.
    pub machine: BTreeMap<String, String>,
    /// Unix time the run started.
    pub started_unix: u64,
    /// Sizes and durations.
    pub scale: Scale,
    /// Runs of each point.
    pub repeats: usize,
    /// Peers that were asked for but could not run, and why.
    pub skipped: BTreeMap<String, String>,
    /// Every run.
    pub records: Vec<Record>,
    /// Medians per point and peer.
    pub medians: Vec<Median>,
}

/// The points of the matrix, whatever the peer.
pub fn plan(scale: &Scale, scenarios: &[Scenario], protocols: &[Protocol]) -> Vec<Point> {
    use Protocol::*;
    let mut points = Vec::new();
    let mut add = |scenario, variant: String, list: &[Protocol]| {
        for &protocol in list {
            if protocols.is_empty() || protocols.contains(&protocol) {
                points.push(Point {
                    scenario,
                    variant: variant.clone(),
                    protocol,
                });
            }
        }
    };
    for &scenario in scenarios {
        match scenario {
            Scenario::S1 => {
                add(
                    scenario,
                    format!("closed c{}", scale.s1_concurrency),
                    &[Grpc, WebH2, WebTextH2, WebH1, WebTextH1],
                );
                add(scenario, "c1".into(), &[Grpc, WebH2, WebH1]);
                add(
                    scenario,
                    format!("open {}/s", scale.s1_rate),
                    &[Grpc, WebH2],
                );
            }
            Scenario::S2 => add(
                scenario,
                format!("{} streams", scale.s2_streams),
                &[Grpc, WebH2, WebH1],
            ),
            Scenario::S3 => add(
                scenario,
                format!("{} streams", scale.s3_streams),
                &[Grpc, WebH2],
            ),
            Scenario::S4 => add(
                scenario,
                format!("c{}", scale.s4_concurrency),
                &[Grpc, WebH2],
            ),
            Scenario::S5 => {
                add(
                    scenario,
                    format!(
                        "{} streams / {} conns",
                        scale.s5_streams, scale.s5_connections
                    ),
                    &[Grpc],
                );
                add(
                    scenario,
                    format!("{} HTTP/1.1 conns", scale.s5_http1_connections),
                    &[WebH1],
                );
            }
            Scenario::S6 => {
                for &size in &scale.s6_sizes {
                    add(scenario, size_name(size), &[Grpc, WebH2]);
                }
                for &size in &scale.s6_upload_sizes {
                    add(scenario, upload_variant(size), &[Grpc, WebH2]);
                }
            }
            Scenario::S7 => add(
                scenario,
                format!("{} streams", scale.s2_streams),
                &[Grpc, WebH2],
            ),
            Scenario::S8 => add(scenario, s8_variant(scale), &[Grpc, WebH2]),
            Scenario::S9 => add(scenario, s9_variant(scale), &[Grpc, WebH2]),
        }
    }
    points
}

/// `c8 + 8×8 stalled`: the unary concurrency and the stalled connections × streams.
pub fn s8_variant(scale: &Scale) -> String {
    format!(
        "c{} + {}×{} stalled",
        scale.s8_concurrency, scale.s8_stall_connections, scale.s8_stall_streams
    )
}

/// `16 × 64 MiB`: the concurrent downloads and the size of each.
pub fn s9_variant(scale: &Scale) -> String {
    format!("{} × {}", scale.s9_streams, size_name(scale.s9_size))
}

/// Prefix of the S6 variants that upload (client → upstream) instead of download.
pub const UPLOAD_PREFIX: &str = "upload ";

/// `upload 1 GiB`: the S6 variant that uploads one `size`-byte message.
pub fn upload_variant(size: u64) -> String {
    format!("{UPLOAD_PREFIX}{}", size_name(size))
}

/// `100 MiB`, `1 GiB`, `4 GiB − 1` (the largest gRPC message), `512 KiB`, `1000 B`.
pub fn size_name(size: u64) -> String {
    const UNITS: [(u32, &str); 3] = [(30, "GiB"), (20, "MiB"), (10, "KiB")];
    for (shift, unit) in UNITS {
        let step = 1u64 << shift;
        if size >= step && size.is_multiple_of(step) {
            return format!("{} {unit}", size >> shift);
        }
    }
    for (shift, unit) in UNITS {
        let step = 1u64 << shift;
        let next = size + 1;
        if next >= step && next.is_multiple_of(step) {
            return format!("{} {unit} − 1", next >> shift);
        }
    }
    format!("{size} B")
}

/// A size as [`size_name`] writes it or as typed on the command line: a number, an optional
/// unit (`B`, `KiB`, `MiB`, `GiB`; `k`/`M`/`G` alone mean the binary units), optionally minus a
/// number of bytes: `100MiB`, `1 GiB`, `4GiB-1`, `4 GiB − 1`, `4294967295`.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (base, minus) = match text.split_once(['-', '−']) {
        Some((base, minus)) => (base.trim(), minus.trim().parse::<u64>().ok()?),
        None => (text, 0),
    };
    let digits = base
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(base.len());
    let (number, unit) = base.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "k" | "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)?.checked_sub(minus)
}

/// The message size an S6 variant (`100 MiB`, `4 GiB − 1`, `upload 1 GiB`) names.
pub fn size_of(variant: &str) -> Option<u64> {
    parse_size(variant.strip_prefix(UPLOAD_PREFIX).unwrap_or(variant))
}

/// Bytes of bulk messages a point moves at once (S6: its message; S9: all its downloads);
/// `None` for the other scenarios.
fn bulk_bytes(point: &Point, scale: &Scale) -> Option<u64> {
    match point.scenario {
        Scenario::S6 => size_of(&point.variant),
        Scenario::S9 => Some(scale.s9_streams as u64 * scale.s9_size),
        _ => None,
    }
}

/// Why `peer` cannot run `point` (on this machine), if it cannot; the point is then reported
/// as `n/a` with the reason instead of being run.
///
/// - A reply larger than the peer can send at all ([`PeerKind::largest_reply`]: tonic-web
///   over 2 GiB − 6 bytes).
/// - A peer that holds messages whole (tonic-web) needs about twice the bulk bytes in memory
///   (the service's message and tonic's encode or decode buffer); with less available, the
///   point is not run rather than driving the machine into swap or the OOM killer.
fn not_applicable(peer: PeerKind, point: &Point, scale: &Scale) -> Option<String> {
    let download = point.scenario == Scenario::S6 && !point.variant.starts_with(UPLOAD_PREFIX);
    if let (true, Some(size), Some(largest)) =
        (download, size_of(&point.variant), peer.largest_reply())
    {
        if size > largest {
            return Some(format!(
                "{peer} cannot send a message over {largest} bytes: tonic hands each encoded \
                 message to hyper's HTTP/2 as one buffer and h2 refuses DATA buffers over \
                 2^31 − 1 bytes (PayloadTooBig; the stream is reset with CANCEL)"
            ));
        }
    }
    if !peer.holds_whole_messages() {
        return None;
    }
    let need = bulk_bytes(point, scale)?.saturating_mul(2) + (1 << 30);
    let available = crate::procstat::mem_available_bytes()?;
    (available < need).then(|| {
        format!(
            "{peer} holds each message whole, twice (the message and tonic's codec buffer): \
             ≈ {:.1} GB needed, {:.1} GB available",
            need as f64 / 1e9,
            available as f64 / 1e9
        )
    })
}

/// How long a point may take: 180 s, plus 1 s per 32 MiB of bulk bytes (a 4 GiB − 1 message
/// at the slowest peer's rate here takes about 15 s).
fn point_timeout(point: &Point, scale: &Scale) -> Duration {
    let bulk = bulk_bytes(point, scale).unwrap_or(0);
    Duration::from_secs(180 + bulk / (32 << 20))
}

async fn run_point(point: &Point, target: &Target, scale: &Scale) -> anyhow::Result<Sample> {
    if target.peer.is_some_and(PeerKind::is_raw_quic) {
        let size = size_of(&point.variant).unwrap_or(1 << 20);
        let upload = point.variant.starts_with(UPLOAD_PREFIX);
        return scenarios::s6_quinn(target, size, upload).await;
    }
    scenarios::check(target).await?;
    match point.scenario {
        Scenario::S1 if point.variant == "c1" => scenarios::s1_closed(target, scale, 1).await,
        Scenario::S1 if point.variant.starts_with("open") => {
            scenarios::s1_open(target, scale).await
        }
        Scenario::S1 => scenarios::s1_closed(target, scale, scale.s1_concurrency).await,
        Scenario::S2 => scenarios::s2_paced(target, scale, scale.s2_streams).await,
        Scenario::S3 => scenarios::s3_unpaced(target, scale).await,
        Scenario::S4 => scenarios::s4_churn(target, scale).await,
        Scenario::S5 => scenarios::s5_idle(target, scale).await,
        Scenario::S6 => {
            let size = size_of(&point.variant).unwrap_or(1 << 20);
            if point.variant.starts_with(UPLOAD_PREFIX) {
                scenarios::s6_upload(target, size).await
            } else {
                scenarios::s6_bulk(target, size).await
            }
        }
        Scenario::S7 => scenarios::s7_busy(target, scale).await,
        Scenario::S8 => scenarios::s8_stalled(target, scale).await,
        Scenario::S9 => scenarios::s9_concurrent(target, scale).await,
    }
}

/// Run the matrix.
pub async fn run(options: &RunOptions) -> anyhow::Result<Results> {
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let points = plan(&options.scale, &options.scenarios, &options.protocols);
    let mut skipped = BTreeMap::new();
    let mut tools = options.tools.clone();
    // The HTTP/3 bridge's certificates: once per run.
    let certs = if options.peers.contains(&PeerKind::BridgeH3) {
        tools.make_dev_certs().map_err(|e| format!("{e:#}"))
    } else {
        Ok(())
    };
    let peers: Vec<PeerKind> = options
        .peers
        .iter()
        .copied()
        .filter(|&peer| {
            if peer == PeerKind::BridgeH3 {
                if let Err(why) = &certs {
                    let _ = skipped.insert(peer.name().to_owned(), why.clone());
                    return false;
                }
            }
            let ok = tools.can_run(peer);
            if !ok {
                let _ = skipped.insert(peer.name().to_owned(), "binary not found".to_owned());
            }
            ok
        })
        .collect();
    let total: usize = peers
        .iter()
        .map(|peer| {
            points
                .iter()
                .filter(|p| peer.runs(p.scenario, p.protocol))
                .count()
        })
        .sum::<usize>()
        * options.repeats;
    let bar = if options.progress {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut records = Vec::new();
    for repeat in 0..options.repeats {
        for &peer in &peers {
            let mine: Vec<&Point> = points
                .iter()
                .filter(|p| peer.runs(p.scenario, p.protocol))
                .collect();
            // A fresh upstream and peer for each scenario, and for each point of S5, S6, S8 and
            // S9, so memory one point leaves behind (allocators keep freed pages) is not charged
            // to the next.
            let mut current: Option<(peers::Peer, peers::Peer)> = None;
            let mut last_scenario = None;
            for point in mine {
                let fresh = current.is_none()
                    || last_scenario != Some(point.scenario)
                    || matches!(
                        point.scenario,
                        Scenario::S5 | Scenario::S6 | Scenario::S8 | Scenario::S9
                    );
                last_scenario = Some(point.scenario);
                if let Some(reason) = not_applicable(peer, point, &options.scale) {
                    bar.println(format!(
                        "{peer} {:?} {} {}: n/a: {reason}",
                        point.scenario,
                        point.variant,
                        point.protocol.name()
                    ));
                    bar.inc(1);
                    records.push(Record {
                        point: point.clone(),
                        peer,
                        repeat,
                        idle: IdleReport::default(),
                        sample: None,
                        error: None,
                        took_s: 0.0,
                        not_applicable: Some(reason),
                    });
                    continue;
                }
                if fresh {
                    if let Some((upstream, running)) = current.take() {
                        running.stop().await;
                        upstream.stop().await;
                    }
                    let started = async {
                        let upstream = peers::start_upstream(&tools).await?;
                        let running = match peers::start(peer, &upstream, &tools).await {
                            Ok(running) => running,
                            Err(e) => {
                                upstream.stop().await;
                                return Err(e);
                            }
                        };
                        Ok::<_, anyhow::Error>((upstream, running))
                    }
                    .await;
                    match started {
                        Ok(started) => current = Some(started),
                        Err(e) => {
                            let message = format!("{e:#}");
                            let _ = skipped.insert(peer.name().to_owned(), message.clone());
                            bar.inc(1);
                            records.push(Record {
                                point: point.clone(),
                                peer,
                                repeat,
                                idle: IdleReport::default(),
                                sample: None,
                                error: Some(message),
                                took_s: 0.0,
                                not_applicable: None,
                            });
                            continue;
                        }
                    }
                }
                let Some((upstream, running)) = current.as_ref() else {
                    continue;
                };
                bar.set_message(format!(
                    "#{} {peer} {:?} {} {}",
                    repeat + 1,
                    point.scenario,
                    point.variant,
                    point.protocol.name()
                ));
                let point_started = std::time::Instant::now();
                let idle = options.idle.wait().await;
                let target = Target {
                    addr: running.addr,
                    protocol: point.protocol,
                    peer_pid: running.pid,
                    cluster_pid: running.cluster_pid,
                    upstream_pid: upstream.pid,
                    peer: Some(peer),
                };
                let limit = point_timeout(point, &options.scale);
                let result = tokio::time::timeout(limit, run_point(point, &target, &options.scale))
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!("timed out after {} s", limit.as_secs()))
                    });
                let (sample, error) = match result {
                    Ok(sample) => (Some(sample), None),
                    Err(e) => (None, Some(format!("{e:#}"))),
                };
                if let Some(error) = &error {
                    bar.println(format!(
                        "{peer} {:?} {} {}: {error}",
                        point.scenario,
                        point.variant,
                        point.protocol.name()
                    ));
                }
                records.push(Record {
                    point: point.clone(),
                    peer,
                    repeat,
                    idle,
                    sample,
                    error,
                    took_s: point_started.elapsed().as_secs_f64(),
                    not_applicable: None,
                });
                bar.inc(1);
                // Let closed streams and connections drain before the next point.
                tokio::time::sleep(options.scale.warmup.min(Duration::from_millis(200))).await;
            }
            if let Some((upstream, running)) = current.take() {
                running.stop().await;
                upstream.stop().await;
            }
            if let Some(path) = &options.checkpoint {
                if let Ok(json) = serde_json::to_string(&records) {
                    let _ = std::fs::write(path, json);
                }
            }
        }
    }
    bar.finish_and_clear();
    let medians = medians(&records);
    Ok(Results {
        machine: machine(&options.tools),
        started_unix,
        scale: options.scale.clone(),
        repeats: options.repeats,
        skipped,
        records,
        medians,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Medians per point and peer, plus the derived "added over direct" metrics.
pub fn medians(records: &[Record]) -> Vec<Median> {
    let mut groups: BTreeMap<(Point, PeerKind), Vec<&Record>> = BTreeMap::new();
    for record in records {
        groups
            .entry((record.point.clone(), record.peer))
            .or_default()
            .push(record);
    }
    let mut out: Vec<Median> = groups
        .into_iter()
        .map(|((point, peer), records)| {
            let ok: Vec<&Sample> = records.iter().filter_map(|r| r.sample.as_ref()).collect();
            let mut names: Vec<&String> = ok.iter().flat_map(|s| s.metrics.keys()).collect();
            names.sort();
            names.dedup();
            let metrics: BTreeMap<String, f64> = names
                .into_iter()
                .map(|name| {
                    let mut values: Vec<f64> = ok
                        .iter()
                        .filter_map(|s| s.metrics.get(name).copied())
                        .collect();
                    (name.clone(), median(&mut values))
                })
                .collect();
            // The distribution of the run whose p50 is closest to the median p50.
            let key = ["p50_us", "delay_p50_us", "stalled_p50_us"]
                .into_iter()
                .find(|k| metrics.contains_key(*k));
            let cdf = key
                .and_then(|key| {
                    let target = metrics[key];
                    ok.iter()
                        .filter(|s| !s.cdf.is_empty())
                        .min_by(|a, b| {
                            let da =
                                (a.metrics.get(key).copied().unwrap_or(f64::MAX) - target).abs();
                            let db =
                                (b.metrics.get(key).copied().unwrap_or(f64::MAX) - target).abs();
                            da.total_cmp(&db)
                        })
                        .map(|s| s.cdf.clone())
                })
                .unwrap_or_default();
            Median {
                error: records.iter().rev().find_map(|r| r.error.clone()),
                not_applicable: records.iter().rev().find_map(|r| r.not_applicable.clone()),
                runs: ok.len(),
                point,
                peer,
                metrics,
                cdf,
            }
        })
        .collect();
    // Added latency over direct gRPC (same scenario and variant).
    let direct: BTreeMap<(Scenario, String), BTreeMap<String, f64>> = out
        .iter()
        .filter(|m| m.peer == PeerKind::Direct && m.point.protocol == Protocol::Grpc)
        .map(|m| {
            (
                (m.point.scenario, m.point.variant.clone()),
                m.metrics.clone(),
            )
        })
        .collect();
    for m in &mut out {
        let Some(base) = direct.get(&(m.point.scenario, m.point.variant.clone())) else {
            continue;
        };
        for name in [
            "p50_us",
            "p99_us",
            "delay_p50_us",
            "delay_p99_us",
            "ttfm_p50_us",
        ] {
            if let (Some(v), Some(b)) = (m.metrics.get(name).copied(), base.get(name).copied()) {
                let _ = m.metrics.insert(format!("added_{name}"), v - b);
            }
        }
    }
    out
}

fn first_line(program: &std::path::Path, arg: &str) -> Option<String> {
    let out = std::process::Command::new(program).arg(arg).output().ok()?;
    let text = String::from_utf8_lossy(if out.stdout.is_empty() {
        &out.stderr
    } else {
        &out.stdout
    })
    .into_owned();
    text.lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
}

/// What this machine is, for the report.
pub fn machine(tools: &Tools) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(model) = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")) {
        let _ = m.insert(
            "cpu".into(),
            model.trim_start_matches([' ', '\t', ':']).to_owned(),
        );
    }
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let _ = m.insert("cores".into(), cores.to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(total) = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")) {
        let _ = m.insert("memory".into(), total.trim().to_owned());
    }
    if let Ok(kernel) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        let _ = m.insert("kernel".into(), kernel.trim().to_owned());
    }
    if let Some(envoy) = &tools.envoy {
        if let Some(v) = first_line(envoy, "--version") {
            let _ = m.insert("envoy".into(), v);
        }
    }
    if let Some(nginx) = &tools.nginx {
        if let Some(v) = first_line(nginx, "-v") {
            let _ = m.insert("nginx".into(), v);
        }
    }
    let pinning = format!(
        "peer on CPU {:?} (both processes of a two-process peer: a bridge's edge and cluster \
         pnp, raw quinn's client and server), upstream on CPU {:?}, load client on the rest",
        tools.peer_cpu, tools.upstream_cpu
    );
    let _ = m.insert("pinning".into(), pinning);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip() {
        for size in [
            100 << 20,
            1 << 30,
            crate::service::MAX_MESSAGE,
            64 << 20,
            512 << 10,
            1000,
            (1 << 20) - 1,
        ] {
            let name = size_name(size);
            assert_eq!(size_of(&name), Some(size), "{name}");
            assert_eq!(
                size_of(&format!("{UPLOAD_PREFIX}{name}")),
                Some(size),
                "{name}"
            );
        }
        assert_eq!(size_name(crate::service::MAX_MESSAGE), "4 GiB − 1");
        assert_eq!(parse_size("4GiB-1"), Some(crate::service::MAX_MESSAGE));
        assert_eq!(parse_size("4294967295"), Some(crate::service::MAX_MESSAGE));
        assert_eq!(parse_size("100MiB"), Some(100 << 20));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(size_of("10000 streams / 10 conns"), None);
        assert_eq!(size_of("closed c32"), None);
        assert_eq!(parse_size("1 parsec"), None);
    }

    #[test]
    fn tonic_web_cannot_send_4_gib() {
        let scale = Scale::full();
        let point = |variant: &str| Point {
            scenario: Scenario::S6,
            variant: variant.into(),
            protocol: Protocol::Grpc,
        };
        let largest = size_name(crate::service::MAX_MESSAGE);
        let why = not_applicable(PeerKind::TonicWeb, &point(&largest), &scale);
        assert!(why.is_some_and(|w| w.contains("PayloadTooBig")));
        for peer in [
            PeerKind::Direct,
            PeerKind::Pnp,
            PeerKind::Envoy,
            PeerKind::Nginx,
        ] {
            assert_eq!(
                not_applicable(peer, &point(&largest), &scale),
                None,
                "{peer}"
            );
        }
        // Receiving is not limited that way: a large upload is not ruled out for that reason.
        let upload = upload_variant(crate::service::MAX_MESSAGE);
        let why = not_applicable(PeerKind::TonicWeb, &point(&upload), &scale);
        assert!(!why.is_some_and(|w| w.contains("PayloadTooBig")));
    }

    #[test]
    fn plan_has_the_bulk_points() {
        let scale = Scale::full();
        let points = plan(&scale, &[Scenario::S6, Scenario::S9], &[Protocol::Grpc]);
        let variants: Vec<&str> = points.iter().map(|p| p.variant.as_str()).collect();
        assert_eq!(
            variants,
            [
                "100 MiB",
                "1 GiB",
                "4 GiB − 1",
                "upload 1 GiB",
                "16 × 64 MiB"
            ]
        );
    }
}
