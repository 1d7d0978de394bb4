//! The markdown report: one table per scenario (peers side by side, with ratios: pnp/Envoy,
//! and each bridge over pnp and over direct), the targets of issue #6 and, when bridges ran,
//! those of issue #11, with what was measured, and the machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::client::Protocol;
use crate::peers::PeerKind;
use crate::runner::{Median, Results};
use crate::scenarios::Scenario;

/// Metrics shown per scenario (variant prefix, metrics).
fn metrics_for(scenario: Scenario, variant: &str) -> &'static [&'static str] {
    match scenario {
        Scenario::S1 if variant == "c1" => &[
            "p50_us",
            "p99_us",
            "p999_us",
            "added_p50_us",
            "cpu_us_per_op",
            "edge_cpu_us_per_op",
            "cluster_cpu_us_per_op",
        ],
        Scenario::S1 if variant.starts_with("open") => &[
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "added_p50_us",
            "cpu_us_per_op",
            "edge_cpu_us_per_op",
            "cluster_cpu_us_per_op",
            "errors",
        ],
        Scenario::S1 => &[
            "calls_per_s",
            "cpu_us_per_op",
            "edge_cpu_us_per_op",
            "cluster_cpu_us_per_op",
            "p50_us",
            "p99_us",
            "peak_rss_mb",
            "edge_peak_rss_mb",
            "cluster_peak_rss_mb",
            "errors",
        ],
        Scenario::S2 => &[
            "ttfm_p50_us",
            "ttfm_p99_us",
            "delay_p50_us",
            "delay_p99_us",
            "added_delay_p50_us",
            "added_delay_p99_us",
            "cpu_us_per_op",
            "edge_cpu_us_per_op",
            "cluster_cpu_us_per_op",
            "msgs_per_s",
            "peak_rss_mb",
            "edge_peak_rss_mb",
            "cluster_peak_rss_mb",
            "broken_streams",
        ],
        Scenario::S3 => &[
            "msgs_per_s",
            "cpu_us_per_op",
            "peak_rss_mb",
            "broken_streams",
        ],
        Scenario::S4 => &[
            "streams_per_s",
            "cpu_us_per_op",
            "open_p50_us",
            "open_p99_us",
            "errors",
        ],
        Scenario::S5 => &[
            "rss_per_stream_kb",
            "rss_mb",
            "open_all_s",
            "first_message_p50_us",
            "first_message_p99_us",
            "cpu_us_per_op",
        ],
        Scenario::S6 => &[
            "gib_per_s",
            "gbit_per_s",
            "gib_per_cpu_s",
            "peak_rss_mb",
            "edge_peak_rss_mb",
            "cluster_peak_rss_mb",
            "window_bound_mb",
            "cpu_s",
            "edge_cpu_s",
            "cluster_cpu_s",
            "udp_rcvbuf_errors",
            "client_lost_packets",
        ],
        Scenario::S7 => &[
            "p50_us",
            "p99_us",
            "p999_us",
            "added_p50_us",
            "background_msgs_per_s",
        ],
        Scenario::S8 => &[
            "calm_p50_us",
            "stalled_p50_us",
            "calm_p99_us",
            "stalled_p99_us",
            "p99_ratio",
            "calm_calls_per_s",
            "stalled_calls_per_s",
            "calm_errors",
            "stalled_errors",
            "peak_rss_mb",
            "stall_added_rss_mb",
            "stall_life_p50_ms",
            "stall_longest_open_ms",
            "stall_open_at_end",
            "stall_resets",
            "stall_statuses",
        ],
        Scenario::S9 => &[
            "gib_per_s",
            "gib_per_cpu_s",
            "peak_rss_mb",
            "added_rss_mb",
            "window_bound_mb",
            "last_done_s",
            "cpu_s",
        ],
    }
}

/// What a metric means, for the legend.
fn describe(metric: &str) -> &'static str {
    match metric {
        "calls_per_s" => "completed calls per second (higher is better)",
        "cpu_us_per_op" => {
            "CPU of the peer process per call / message / stream (µs); for a bridge, edge + \
             cluster pnp"
        }
        "edge_cpu_us_per_op" => "bridges: the edge pnp's share of `cpu_us_per_op` (µs)",
        "cluster_cpu_us_per_op" => "bridges: the cluster pnp's share of `cpu_us_per_op` (µs)",
        "p50_us" | "p90_us" | "p99_us" | "p999_us" => "call latency percentiles (µs)",
        "added_p50_us" => "p50 minus direct gRPC's p50 in the same scenario (µs)",
        "peak_rss_mb" => {
            "peak RSS of the peer during the point (MB); for a two-process peer, the larger of \
             its two processes' peaks"
        }
        "edge_peak_rss_mb" => {
            "peak RSS of a bridge's edge pnp (raw quinn: its client, the receiving end of \
             downloads) (MB)"
        }
        "cluster_peak_rss_mb" => {
            "peak RSS of a bridge's cluster pnp (raw quinn: its server) (MB)"
        }
        "ttfm_p50_us" | "ttfm_p99_us" => "time to first message (µs)",
        "delay_p50_us" | "delay_p99_us" => "upstream send → client receive, per message (µs)",
        "added_delay_p50_us" | "added_delay_p99_us" => "per-message delay minus direct's (µs)",
        "msgs_per_s" => "messages per second (higher is better)",
        "streams_per_s" => "streams opened and cancelled per second (higher is better)",
        "rss_per_stream_kb" => "(RSS with the streams open − RSS before) / streams (KiB)",
        "rss_mb" => "RSS with all streams open (MB)",
        "open_all_s" => "time to open all streams (s)",
        "gib_per_s" => "wall-clock throughput (GiB/s)",
        "gib_per_cpu_s" => {
            "GiB moved per CPU-second of the peer = GiB/s per core (two-process peers: per \
             CPU-second of both together)"
        }
        "gbit_per_s" => "wall-clock throughput (Gbit/s, 10⁹ bit/s)",
        "cpu_s" => "CPU seconds of the peer over the point (two-process peers: both together)",
        "edge_cpu_s" => "CPU seconds of a bridge's edge pnp (raw quinn: its client)",
        "cluster_cpu_s" => "CPU seconds of a bridge's cluster pnp (raw quinn: its server)",
        "udp_rcvbuf_errors" => {
            "UDP datagrams the kernel dropped for a full socket receive buffer during the point \
             (`RcvbufErrors`, /proc/net/snmp: the whole network namespace)"
        }
        "client_lost_packets" => {
            "raw quinn: packets its client declared lost during the transfer (its own sends)"
        }
        "window_bound_mb" => {
            "pnp's flow-control bound: streams × (upstream stream window + client-facing stream \
             window), 2 MiB per stream in the bench (MB); what pnp may hold beyond its baseline"
        }
        "added_rss_mb" => "peak RSS − RSS just before the downloads started (MB)",
        "last_done_s" => "time until the last of the concurrent downloads ended (s)",
        "calm_p50_us" | "calm_p99_us" => {
            "unary latency without stalled readers (µs; every call started in the window)"
        }
        "stalled_p50_us" | "stalled_p99_us" => {
            "unary latency while the stalled readers run (µs; a failed call counts at the time it took)"
        }
        "p99_ratio" => "stalled_p99_us / calm_p99_us in the same run (1 = no effect)",
        "calm_calls_per_s" | "stalled_calls_per_s" => {
            "unary calls per second answered OK, without / with stalled readers"
        }
        "calm_errors" | "stalled_errors" => {
            "unary calls that failed or got no answer within the call timeout (must be 0)"
        }
        "stall_added_rss_mb" => "peak RSS while stalled − RSS just before the stall (MB)",
        "stall_life_p50_ms" => {
            "open → end (RST_STREAM or trailers) of the stalled streams that ended, as their client saw it (ms)"
        }
        "stall_longest_open_ms" => {
            "longest any stalled stream stayed open, ended or still open at the end (ms)"
        }
        "stall_open_at_end" => "stalled streams open when the unary load ended (the stall held)",
        "stall_resets" => "stalled streams ended by RST_STREAM",
        "stall_statuses" => "stalled streams ended by trailers (a grpc-status)",
        _ => "",
    }
}

fn fmt(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn find<'a>(
    results: &'a Results,
    scenario: Scenario,
    variant_prefix: &str,
    protocol: Protocol,
    peer: PeerKind,
) -> Option<&'a Median> {
    results.medians.iter().find(|m| {
        m.point.scenario == scenario
            && m.point.variant.starts_with(variant_prefix)
            && m.point.protocol == protocol
            && m.peer == peer
    })
}

fn metric(
    results: &Results,
    scenario: Scenario,
    variant_prefix: &str,
    protocol: Protocol,
    peer: PeerKind,
    name: &str,
) -> Option<f64> {
    find(results, scenario, variant_prefix, protocol, peer)?
        .metrics
        .get(name)
        .copied()
}

/// Whether pnp's value over Envoy's means something (not for differences, counts of failures
/// or events, or ratios that are already within one peer).
fn comparable(name: &str) -> bool {
    !name.starts_with("added_")
        && !name.ends_with("errors")
        && !name.starts_with("broken")
        && !name.ends_with("_ratio")
        && !name.ends_with("_packets")
        && name != "udp_rcvbuf_errors"
        && !matches!(
            name,
            "stall_open_at_end" | "stall_resets" | "stall_statuses"
        )
}

/// A short name for ratio headers (`h3` for `bridge-h3`).
fn short(peer: PeerKind) -> &'static str {
    match peer {
        PeerKind::BridgeH1 => "h1",
        PeerKind::BridgeH2 => "h2",
        PeerKind::BridgeH3 => "h3",
        PeerKind::BridgeUcxTcp => "ucx-tcp",
        PeerKind::BridgeUcxSm => "ucx-sm",
        other => other.name(),
    }
}

/// The ratio columns for the peers in the run: pnp/envoy (when Envoy ran, or no bridge did),
/// each bridge over pnp and over direct, and each UCX bridge over the HTTP/2 bridge.
fn ratio_columns(peers: &[PeerKind]) -> Vec<(PeerKind, PeerKind)> {
    let has = |p| peers.contains(&p);
    let mut columns = Vec::new();
    let bridges: Vec<PeerKind> = PeerKind::BRIDGES.into_iter().filter(|b| has(*b)).collect();
    if has(PeerKind::Envoy) || bridges.is_empty() {
        columns.push((PeerKind::Pnp, PeerKind::Envoy));
    }
    for &bridge in &bridges {
        for base in [PeerKind::Pnp, PeerKind::Direct] {
            if has(base) {
                columns.push((bridge, base));
            }
        }
    }
    for ucx in [PeerKind::BridgeUcxTcp, PeerKind::BridgeUcxSm] {
        if has(ucx) && has(PeerKind::BridgeH2) {
            columns.push((ucx, PeerKind::BridgeH2));
        }
    }
    columns
}

/// The whole report.
pub fn markdown(results: &Results) -> String {
    let mut out = String::new();
    let peers: Vec<PeerKind> = PeerKind::ALL
        .into_iter()
        .filter(|p| results.medians.iter().any(|m| m.peer == *p))
        .collect();
    let ratios = ratio_columns(&peers);
    let _ = writeln!(out, "## Targets\n");
    out.push_str(&targets(results));
    if peers
        .iter()
        .any(|p| p.bridge_scheme().is_some() || p.is_raw_quic())
    {
        let _ = writeln!(out, "\n### Bridges (issue #11)\n");
        out.push_str(&bridge_targets(results));
    }
    for scenario in Scenario::ALL {
        let mut rows: BTreeMap<(String, Protocol), Vec<&Median>> = BTreeMap::new();
        for m in results
            .medians
            .iter()
            .filter(|m| m.point.scenario == scenario)
        {
            rows.entry((m.point.variant.clone(), m.point.protocol))
                .or_default()
                .push(m);
        }
        if rows.is_empty() {
            continue;
        }
        // The peers (and ratios) of this scenario: raw quinn runs S6 only.
        let peers: Vec<PeerKind> = peers
            .iter()
            .copied()
            .filter(|p| rows.values().flatten().any(|m| m.peer == *p))
            .collect();
        let ratios: Vec<(PeerKind, PeerKind)> = ratios
            .iter()
            .copied()
            .filter(|(a, b)| peers.contains(a) && (peers.contains(b) || *b == PeerKind::Envoy))
            .chain(
                (peers.contains(&PeerKind::BridgeH3) && peers.contains(&PeerKind::Quinn))
                    .then_some((PeerKind::BridgeH3, PeerKind::Quinn)),
            )
            .collect();
        let _ = writeln!(out, "\n### {}\n", scenario.title());
        let _ = write!(out, "| variant | protocol | metric |");
        for p in &peers {
            let _ = write!(out, " {p} |");
        }
        for (a, b) in &ratios {
            let _ = write!(out, " {}/{} |", short(*a), short(*b));
        }
        let _ = writeln!(out);
        let _ = write!(out, "|---|---|---|");
        for _ in peers.iter().chain(ratios.iter().map(|(a, _)| a)) {
            let _ = write!(out, "---:|");
        }
        let _ = writeln!(out);
        // Variants in plan order: sort by their first appearance.
        let mut keys: Vec<&(String, Protocol)> = rows.keys().collect();
        keys.sort_by_key(|(variant, protocol)| {
            (
                // S6 variants are sizes: downloads, then uploads, smallest first.
                variant.starts_with(crate::runner::UPLOAD_PREFIX),
                crate::runner::size_of(variant).unwrap_or(0),
                results
                    .medians
                    .iter()
                    .position(|m| m.point.scenario == scenario && &m.point.variant == variant)
                    .unwrap_or(0),
                *protocol,
            )
        });
        let mut legend: Vec<&str> = Vec::new();
        for key in keys {
            let medians = &rows[key];
            // A point no peer could run still gets its first row, so its `n/a` shows.
            let any_not_applicable = medians
                .iter()
                .any(|m| m.runs == 0 && m.not_applicable.is_some());
            for (i, name) in metrics_for(scenario, &key.0).iter().enumerate() {
                let value = |peer: PeerKind| {
                    medians
                        .iter()
                        .find(|m| m.peer == peer)
                        .and_then(|m| m.metrics.get(*name).copied())
                };
                if peers.iter().all(|p| value(*p).is_none()) && !(any_not_applicable && i == 0) {
                    continue;
                }
                if !legend.contains(name) {
                    legend.push(name);
                }
                let _ = write!(out, "| {} | {} | {} |", key.0, key.1.name(), name);
                for p in &peers {
                    let cell = match (value(*p), medians.iter().find(|m| m.peer == *p)) {
                        (Some(v), _) => fmt(v),
                        (None, Some(m)) if m.not_applicable.is_some() && m.runs == 0 => {
                            "n/a".into()
                        }
                        (None, Some(m)) if m.error.is_some() && m.runs == 0 => "failed".into(),
                        _ => "–".into(),
                    };
                    let _ = write!(out, " {cell} |");
                }
                for (a, b) in &ratios {
                    let ratio = match (value(*a), value(*b)) {
                        (Some(a), Some(b)) if b != 0.0 && comparable(name) => {
                            format!("{:.2}", a / b)
                        }
                        _ => "–".into(),
                    };
                    let _ = write!(out, " {ratio} |");
                }
                let _ = writeln!(out);
            }
        }
        let failures: Vec<String> = rows
            .values()
            .flatten()
            .filter_map(|m| {
                m.error.as_ref().map(|e| {
                    format!(
                        "{} {} {}: {}",
                        m.peer,
                        m.point.variant,
                        m.point.protocol.name(),
                        e
                    )
                })
            })
            .collect();
        let not_applicable: Vec<String> = rows
            .values()
            .flatten()
            .filter(|m| m.runs == 0)
            .filter_map(|m| {
                m.not_applicable.as_ref().map(|why| {
                    format!(
                        "{} {} {}: {}",
                        m.peer,
                        m.point.variant,
                        m.point.protocol.name(),
                        why
                    )
                })
            })
            .collect();
        out.push('\n');
        if scenario == Scenario::S6 && peers.iter().any(|p| p.is_raw_quic()) {
            let _ = writeln!(
                out,
                "- quinn, quinn-defaults: raw quinn, no gRPC and no HTTP/3 (one QUIC stream of \
                 the size, 64 KiB writes, client and server in two processes; `quinn` with pnp's \
                 QUIC windows, `quinn-defaults` with quinn's), shown in the `grpc-h2` rows"
            );
        }
        for name in legend {
            let d = describe(name);
            if !d.is_empty() {
                let _ = writeln!(out, "- `{name}`: {d}");
            }
        }
        for f in failures {
            let _ = writeln!(out, "- failed: {f}");
        }
        for n in not_applicable {
            let _ = writeln!(out, "- n/a: {n}");
        }
    }
    if !results.skipped.is_empty() {
        let _ = writeln!(out, "\nPeers skipped:\n");
        for (peer, why) in &results.skipped {
            let _ = writeln!(out, "- {peer}: {why}");
        }
    }
    let _ = writeln!(out, "\n### Machine\n");
    for (k, v) in &results.machine {
        let _ = writeln!(out, "- {k}: {v}");
    }
    let _ = writeln!(
        out,
        "- scale: {} s measured after {} s warm-up per point, {} repeats, medians shown",
        results.scale.duration.as_secs_f64(),
        results.scale.warmup.as_secs_f64(),
        results.repeats
    );
    out
}

/// The targets of issue #6: pnp's number, Envoy's, and whether pnp meets the target.
pub fn targets(results: &Results) -> String {
    use Protocol::*;
    use Scenario::*;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| target | where measured | pnp | envoy | pnp/envoy | met |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|:---:|");
    let closed = format!("closed c{}", results.scale.s1_concurrency);
    let smallest = results.scale.s6_sizes.iter().min().copied().unwrap_or(0);
    let smallest = crate::runner::size_name(smallest);
    let largest = results.scale.s6_sizes.iter().max().copied().unwrap_or(0);
    let largest = crate::runner::size_name(largest);
    let upload = results.scale.s6_upload_sizes.iter().max().copied();
    let upload = upload.map(crate::runner::upload_variant);
    let concurrent = crate::runner::s9_variant(&results.scale);
    let bound = crate::peers::pnp_window_bound(results.scale.s9_streams) as f64 / 1e6;
    let concurrent_memory =
        format!("concurrent bulk memory ≤ windows × streams (added RSS ≤ {bound:.1} MB)");
    let mut rows: Vec<(&str, Scenario, String, Protocol, &str, f64, bool)> = vec![
        (
            "proxy CPU per unary call ≤ 8 µs",
            S1,
            closed.clone(),
            Grpc,
            "cpu_us_per_op",
            8.0,
            false,
        ),
        (
            "proxy CPU per unary call ≤ 8 µs",
            S1,
            closed,
            WebH2,
            "cpu_us_per_op",
            8.0,
            false,
        ),
        (
            "added latency at concurrency 1 ≤ +25 µs p50",
            S1,
            "c1".into(),
            Grpc,
            "added_p50_us",
            25.0,
            false,
        ),
        (
            "added latency at concurrency 1 ≤ +25 µs p50",
            S1,
            "c1".into(),
            WebH2,
            "added_p50_us",
            25.0,
            false,
        ),
        (
            "added latency at concurrency 1 ≤ +25 µs p50",
            S1,
            "c1".into(),
            WebH1,
            "added_p50_us",
            25.0,
            false,
        ),
        (
            "CPU per paced token message ≤ 3 µs",
            S2,
            String::new(),
            Grpc,
            "cpu_us_per_op",
            3.0,
            false,
        ),
        (
            "CPU per paced token message ≤ 3 µs",
            S2,
            String::new(),
            WebH2,
            "cpu_us_per_op",
            3.0,
            false,
        ),
        (
            "memory per idle HTTP/2 stream ≤ 8 KB",
            S5,
            String::new(),
            Grpc,
            "rss_per_stream_kb",
            8.0,
            false,
        ),
        (
            "memory per idle HTTP/1.1 connection ≤ 16 KB",
            S5,
            String::new(),
            WebH1,
            "rss_per_stream_kb",
            16.0,
            false,
        ),
        (
            "idle streams on 2 cores ≤ 150 MB RSS",
            S5,
            String::new(),
            Grpc,
            "rss_mb",
            150.0,
            false,
        ),
        (
            "bulk ≥ 3.5 GiB/s per core",
            S6,
            largest.clone(),
            Grpc,
            "gib_per_cpu_s",
            3.5,
            true,
        ),
        (
            "bulk ≥ 3.5 GiB/s per core",
            S6,
            largest.clone(),
            WebH2,
            "gib_per_cpu_s",
            3.5,
            true,
        ),
        (
            "bulk memory bounded by windows (peak RSS ≤ 64 MB)",
            S6,
            largest.clone(),
            Grpc,
            "peak_rss_mb",
            64.0,
            false,
        ),
        (
            "bulk memory bounded by windows (peak RSS ≤ 64 MB)",
            S6,
            largest.clone(),
            WebH2,
            "peak_rss_mb",
            64.0,
            false,
        ),
    ];
    if let Some(upload) = upload {
        rows.push((
            "bulk upload ≥ 3.5 GiB/s per core",
            S6,
            upload.clone(),
            Grpc,
            "gib_per_cpu_s",
            3.5,
            true,
        ));
        rows.push((
            "bulk upload memory bounded by windows (peak RSS ≤ 64 MB)",
            S6,
            upload,
            Grpc,
            "peak_rss_mb",
            64.0,
            false,
        ));
    }
    rows.push((
        "concurrent bulk ≥ 3.5 GiB/s per core",
        S9,
        concurrent.clone(),
        Grpc,
        "gib_per_cpu_s",
        3.5,
        true,
    ));
    rows.push((
        concurrent_memory.as_str(),
        S9,
        concurrent,
        Grpc,
        "added_rss_mb",
        bound,
        false,
    ));
    for (label, scenario, variant, protocol, name, limit, higher_is_better) in rows {
        let pnp = metric(results, scenario, &variant, protocol, PeerKind::Pnp, name);
        let envoy = metric(results, scenario, &variant, protocol, PeerKind::Envoy, name);
        if pnp.is_none() && envoy.is_none() {
            // Not measured in this run (a subset of scenarios or peers).
            continue;
        }
        let met = match pnp {
            Some(v) if higher_is_better => {
                if v >= limit {
                    "yes"
                } else {
                    "no"
                }
            }
            Some(v) => {
                if v <= limit {
                    "yes"
                } else {
                    "no"
                }
            }
            None => "–",
        };
        let ratio = match (pnp, envoy) {
            (Some(a), Some(b)) if b != 0.0 && !name.starts_with("added_") => {
                format!("{:.2}", a / b)
            }
            _ => "–".into(),
        };
        let show = |v: Option<f64>| v.map_or("–".into(), fmt);
        let variant = if variant.is_empty() {
            find(results, scenario, "", protocol, PeerKind::Pnp)
                .map_or(String::new(), |m| m.point.variant.clone())
        } else {
            variant
        };
        let _ = writeln!(
            out,
            "| {label} | {scenario:?} {variant} {} `{name}` | {} | {} | {ratio} | {met} |",
            protocol.name(),
            show(pnp),
            show(envoy)
        );
    }
    // Flat: the peak at the largest size over the peak at the smallest.
    if smallest != largest {
        for protocol in [Grpc, WebH2] {
            let flat = |peer| {
                let small = metric(results, S6, &smallest, protocol, peer, "peak_rss_mb")?;
                let large = metric(results, S6, &largest, protocol, peer, "peak_rss_mb")?;
                (small > 0.0).then_some(large / small)
            };
            let (pnp, envoy) = (flat(PeerKind::Pnp), flat(PeerKind::Envoy));
            let met = pnp.map_or("–", |v| if v <= 1.1 { "yes" } else { "no" });
            let ratio = match (pnp, envoy) {
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
                _ => "–".into(),
            };
            let show = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.3}"));
            let _ = writeln!(
                out,
                "| bulk memory flat from {smallest} to {largest} (peak RSS ratio ≤ 1.1) | S6 \
                 {largest} / {smallest} {} `peak_rss_mb` | {} | {} | {ratio} | {met} |",
                protocol.name(),
                show(pnp),
                show(envoy)
            );
        }
    }
    out
}

/// The bridge targets of issue #11: QUIC bulk ≥ 2.5 Gbit/s per connection at an Ethernet
/// MTU (the HTTP/3 bridge's S6 figures beside raw quinn's), and peak RSS ≤ 64 MB per pnp
/// process in S6 (each bridge's edge / cluster; raw quinn's client / server for reference).
pub fn bridge_targets(results: &Results) -> String {
    use Protocol::*;
    use Scenario::*;
    const QUIC_GBIT: f64 = 2.5;
    const RSS_MB: f64 = 64.0;
    let mut out = String::new();
    let columns = [
        PeerKind::BridgeH1,
        PeerKind::BridgeH2,
        PeerKind::BridgeH3,
        PeerKind::Quinn,
        PeerKind::QuinnDefaults,
        PeerKind::BridgeUcxTcp,
        PeerKind::BridgeUcxSm,
    ];
    let _ = write!(out, "| target | where measured |");
    for c in columns {
        let _ = write!(out, " {c} |");
    }
    let _ = writeln!(out, " met |");
    let _ = write!(out, "|---|---|");
    for _ in columns {
        let _ = write!(out, "---:|");
    }
    let _ = writeln!(out, ":---:|");
    let show = |v: Option<f64>| v.map_or("–".into(), fmt);
    let mut variants: Vec<String> = results
        .scale
        .s6_sizes
        .iter()
        .map(|&s| crate::runner::size_name(s))
        .collect();
    variants.extend(
        results
            .scale
            .s6_upload_sizes
            .iter()
            .map(|&s| crate::runner::upload_variant(s)),
    );
    // Throughput: the HTTP/3 bridge against the target, raw quinn beside it (its rows are the
    // gRPC ones).
    for variant in &variants {
        for protocol in [Grpc, WebH2] {
            let get = |peer: PeerKind, name: &str| {
                let protocol = if peer.is_raw_quic() { Grpc } else { protocol };
                results
                    .medians
                    .iter()
                    .find(|m| {
                        m.point.scenario == S6
                            && &m.point.variant == variant
                            && m.point.protocol == protocol
                            && m.peer == peer
                    })
                    .and_then(|m| m.metrics.get(name).copied())
            };
            if columns.iter().all(|c| get(*c, "gbit_per_s").is_none()) {
                continue;
            }
            let h3 = get(PeerKind::BridgeH3, "gbit_per_s");
            let met = h3.map_or("–", |v| if v >= QUIC_GBIT { "yes" } else { "no" });
            let _ = write!(
                out,
                "| QUIC bulk on loopback ≥ {QUIC_GBIT} Gbit/s per connection at an Ethernet MTU \
                 (met: bridge-h3) | S6 {variant} {} `gbit_per_s` |",
                protocol.name()
            );
            for c in columns {
                let _ = write!(out, " {} |", show(get(c, "gbit_per_s")));
            }
            let _ = writeln!(out, " {met} |");
            let _ = write!(
                out,
                "| (same point: GiB per CPU-second, both processes) | S6 {variant} {} \
                 `gib_per_cpu_s` |",
                protocol.name()
            );
            for c in columns {
                let _ = write!(out, " {} |", show(get(c, "gib_per_cpu_s")));
            }
            let _ = writeln!(out, " – |");
        }
    }
    // Memory: each bridge's edge / cluster peak.
    for variant in &variants {
        for protocol in [Grpc, WebH2] {
            let pair = |peer: PeerKind| {
                let m = results.medians.iter().find(|m| {
                    m.point.scenario == S6
                        && &m.point.variant == variant
                        && m.point.protocol == protocol
                        && m.peer == peer
                })?;
                Some((
                    m.metrics.get("edge_peak_rss_mb").copied()?,
                    m.metrics.get("cluster_peak_rss_mb").copied()?,
                ))
            };
            let cells: Vec<Option<(f64, f64)>> = columns.into_iter().map(pair).collect();
            let bridges: Vec<(f64, f64)> = PeerKind::BRIDGES
                .into_iter()
                .filter_map(|b| columns.iter().position(|c| *c == b).and_then(|i| cells[i]))
                .collect();
            if bridges.is_empty() {
                continue;
            }
            let measured = bridges;
            let met = if measured.iter().all(|(e, c)| *e <= RSS_MB && *c <= RSS_MB) {
                "yes"
            } else {
                "no"
            };
            let _ = write!(
                out,
                "| RSS bounded as in the data-path issue (peak ≤ {RSS_MB} MB per pnp process; \
                 edge / cluster) | S6 {variant} {} `edge_peak_rss_mb / cluster_peak_rss_mb` |",
                protocol.name()
            );
            for cell in &cells {
                let cell = cell.map_or("–".into(), |(e, c)| format!("{} / {}", fmt(e), fmt(c)));
                let _ = write!(out, " {cell} |");
            }
            let _ = writeln!(out, " {met} |");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::Point;
    use crate::scenarios::Scale;

    #[test]
    fn not_applicable_points_show_as_n_a_with_the_reason() {
        let point = Point {
            scenario: Scenario::S6,
            variant: "4 GiB − 1".into(),
            protocol: Protocol::Grpc,
        };
        let median = |peer, metrics: &[(&str, f64)], not_applicable: Option<&str>| Median {
            point: point.clone(),
            peer,
            metrics: metrics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            cdf: Vec::new(),
            runs: usize::from(not_applicable.is_none()),
            error: None,
            not_applicable: not_applicable.map(str::to_owned),
        };
        let results = Results {
            machine: BTreeMap::new(),
            started_unix: 0,
            scale: Scale::full(),
            repeats: 1,
            skipped: BTreeMap::new(),
            records: Vec::new(),
            medians: vec![
                median(PeerKind::Pnp, &[("peak_rss_mb", 10.0)], None),
                median(PeerKind::TonicWeb, &[], Some("too big for tonic")),
            ],
        };
        let report = markdown(&results);
        assert!(
            report.contains("| 4 GiB − 1 | grpc-h2 | peak_rss_mb | 10.00 | n/a |"),
            "{report}"
        );
        assert!(
            report.contains("- n/a: tonic-web 4 GiB − 1 grpc-h2: too big for tonic"),
            "{report}"
        );
    }
}
