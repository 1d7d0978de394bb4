//! Plots (SVG, no system fonts needed): latency CDFs, CPU per operation by peer, bulk memory
//! against message size, and concurrent bulk memory and throughput by peer.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::client::Protocol;
use crate::peers::PeerKind;
use crate::runner::{Median, Results};
use crate::scenarios::Scenario;

fn color(peer: PeerKind) -> RGBColor {
    match peer {
        PeerKind::Direct => RGBColor(60, 60, 60),
        PeerKind::Pnp => RGBColor(31, 119, 180),
        PeerKind::TonicWeb => RGBColor(44, 160, 44),
        PeerKind::Envoy => RGBColor(214, 39, 40),
        PeerKind::Nginx => RGBColor(255, 127, 14),
        PeerKind::BridgeH1 => RGBColor(148, 103, 189),
        PeerKind::BridgeH2 => RGBColor(140, 86, 75),
        PeerKind::BridgeH3 => RGBColor(227, 119, 194),
        PeerKind::Quinn => RGBColor(23, 190, 207),
        PeerKind::QuinnDefaults => RGBColor(188, 189, 34),
        PeerKind::BridgeUcxTcp => RGBColor(0, 128, 128),
        PeerKind::BridgeUcxSm => RGBColor(128, 0, 64),
    }
}

type Fallible = Result<(), Box<dyn std::error::Error>>;

/// Write every plot into `dir`; returns the file names written.
pub fn all(results: &Results, dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut written = Vec::new();
    let mut cdfs = vec![];
    for protocol in [Protocol::Grpc, Protocol::WebH2, Protocol::WebH1] {
        cdfs.push((
            Scenario::S1,
            "c1",
            protocol,
            "S1 unary at concurrency 1",
            "latency (µs)",
        ));
        cdfs.push((
            Scenario::S1,
            "open",
            protocol,
            "S1 unary, open loop",
            "latency (µs)",
        ));
        cdfs.push((
            Scenario::S2,
            "",
            protocol,
            "S2 per-message delay",
            "upstream send → client receive (µs)",
        ));
        cdfs.push((
            Scenario::S7,
            "",
            protocol,
            "S7 unary while S2 runs",
            "latency (µs)",
        ));
        cdfs.push((
            Scenario::S8,
            "",
            protocol,
            "S8 unary beside stalled readers",
            "latency (µs)",
        ));
    }
    for (scenario, variant, protocol, title, x_label) in cdfs {
        let series: Vec<&Median> = results
            .medians
            .iter()
            .filter(|m| {
                m.point.scenario == scenario
                    && m.point.variant.starts_with(variant)
                    && !m.cdf.is_empty()
                    && (m.point.protocol == protocol
                        || (m.peer == PeerKind::Direct && m.point.protocol == Protocol::Grpc))
            })
            .collect();
        if series.iter().all(|m| m.peer == PeerKind::Direct) {
            continue;
        }
        let name = format!(
            "cdf-{}-{}-{}.svg",
            format!("{scenario:?}").to_lowercase(),
            if variant.is_empty() { "all" } else { variant },
            protocol.name()
        );
        let title = format!("{title} — {}", protocol.name());
        cdf_chart(&dir.join(&name), &title, x_label, &series)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        written.push(name);
    }
    cpu_chart(&dir.join("cpu-per-op.svg"), results)
        .map_err(|e| anyhow::anyhow!("cpu-per-op.svg: {e}"))?;
    written.push("cpu-per-op.svg".into());
    if results
        .medians
        .iter()
        .any(|m| m.point.scenario == Scenario::S6)
    {
        bulk_chart(&dir.join("bulk.svg"), results).map_err(|e| anyhow::anyhow!("bulk.svg: {e}"))?;
        written.push("bulk.svg".into());
    }
    if results
        .medians
        .iter()
        .any(|m| m.point.scenario == Scenario::S9)
    {
        concurrent_chart(&dir.join("concurrent-bulk.svg"), results)
            .map_err(|e| anyhow::anyhow!("concurrent-bulk.svg: {e}"))?;
        written.push("concurrent-bulk.svg".into());
    }
    Ok(written)
}

/// S9: memory the concurrent downloads added to each peer (with pnp's window bound in the
/// title) and GiB per CPU-second, per protocol.
fn concurrent_chart(path: &Path, results: &Results) -> Fallible {
    let bound = crate::peers::pnp_window_bound(results.scale.s9_streams) as f64 / 1e6;
    let variant = crate::runner::s9_variant(&results.scale);
    let root = SVGBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!("S9 concurrent bulk, {variant} (pnp's windows × streams bound: {bound:.1} MB)"),
        ("sans-serif", 18),
    )?;
    let areas = root.split_evenly((2, 2));
    let panels = [
        (Protocol::Grpc, "added_rss_mb", "grpc-h2: RSS added (MB)"),
        (
            Protocol::Grpc,
            "gib_per_cpu_s",
            "grpc-h2: GiB per CPU-second",
        ),
        (Protocol::WebH2, "added_rss_mb", "web-h2: RSS added (MB)"),
        (
            Protocol::WebH2,
            "gib_per_cpu_s",
            "web-h2: GiB per CPU-second",
        ),
    ];
    for (area, (protocol, metric, title)) in areas.iter().zip(panels) {
        let bars: Vec<(PeerKind, f64)> = PeerKind::ALL
            .into_iter()
            .filter_map(|peer| {
                let m = results.medians.iter().find(|m| {
                    m.peer == peer
                        && m.point.scenario == Scenario::S9
                        && m.point.protocol == protocol
                })?;
                Some((peer, m.metrics.get(metric).copied()?))
            })
            .collect();
        if !bars.is_empty() {
            bar_panel(area, title, &bars)?;
        }
    }
    root.present()?;
    Ok(())
}

fn cdf_chart(path: &Path, title: &str, x_label: &str, series: &[&Median]) -> Fallible {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let values = series.iter().flat_map(|m| m.cdf.iter().map(|p| p.1));
    let lo = values.clone().fold(f64::MAX, f64::min).max(1.0);
    let hi = values.fold(1.0f64, f64::max).max(lo * 2.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("fraction of calls ≤ x")
        .draw()?;
    for m in series {
        let c = color(m.peer);
        let label = format!("{} ({})", m.peer, m.point.protocol.name());
        chart
            .draw_series(LineSeries::new(
                m.cdf.iter().map(|&(q, v)| (v.max(lo), q)),
                c.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn bar_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    bars: &[(PeerKind, f64)],
) -> Fallible {
    let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9) * 1.2;
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..max)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.name().to_owned()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (peer, v))| {
        Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *v),
            ],
            color(*peer).filled(),
        )
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        Text::new(
            format_value(*v),
            (SegmentValue::CenterOf(i), *v),
            ("sans-serif", 13).into_font(),
        )
    }))?;
    Ok(())
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cpu_chart(path: &Path, results: &Results) -> Fallible {
    let closed = format!("closed c{}", results.scale.s1_concurrency);
    let panels: Vec<(String, Scenario, &str, Protocol)> = vec![
        (
            "S1 unary, grpc-h2: µs CPU per call".into(),
            Scenario::S1,
            closed.as_str(),
            Protocol::Grpc,
        ),
        (
            "S1 unary, web-h2: µs CPU per call".into(),
            Scenario::S1,
            closed.as_str(),
            Protocol::WebH2,
        ),
        (
            "S1 unary, web-h1: µs CPU per call".into(),
            Scenario::S1,
            closed.as_str(),
            Protocol::WebH1,
        ),
        (
            "S2 paced, grpc-h2: µs CPU per message".into(),
            Scenario::S2,
            "",
            Protocol::Grpc,
        ),
        (
            "S2 paced, web-h2: µs CPU per message".into(),
            Scenario::S2,
            "",
            Protocol::WebH2,
        ),
        (
            "S3 unpaced, grpc-h2: µs CPU per message".into(),
            Scenario::S3,
            "",
            Protocol::Grpc,
        ),
        (
            "S3 unpaced, web-h2: µs CPU per message".into(),
            Scenario::S3,
            "",
            Protocol::WebH2,
        ),
        (
            "S4 churn, grpc-h2: µs CPU per stream".into(),
            Scenario::S4,
            "",
            Protocol::Grpc,
        ),
        (
            "S4 churn, web-h2: µs CPU per stream".into(),
            Scenario::S4,
            "",
            Protocol::WebH2,
        ),
    ];
    let root = SVGBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "CPU of the peer process per operation (lower is better; direct and tonic-web include the service's own work)",
        ("sans-serif", 18),
    )?;
    let areas = root.split_evenly((3, 3));
    for (area, (title, scenario, variant, protocol)) in areas.iter().zip(panels) {
        let bars: Vec<(PeerKind, f64)> = PeerKind::ALL
            .into_iter()
            .filter_map(|peer| {
                let m = results.medians.iter().find(|m| {
                    m.peer == peer
                        && m.point.scenario == scenario
                        && m.point.variant.starts_with(variant)
                        && m.point.protocol == protocol
                })?;
                Some((peer, m.metrics.get("cpu_us_per_op").copied()?))
            })
            .collect();
        if bars.is_empty() {
            continue;
        }
        bar_panel(area, &title, &bars)?;
    }
    root.present()?;
    Ok(())
}

fn bulk_chart(path: &Path, results: &Results) -> Fallible {
    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    for (area, metric, title) in [
        (
            &left,
            "peak_rss_mb",
            "S6 bulk download (grpc-h2): peak RSS of the peer (MB)",
        ),
        (
            &right,
            "gib_per_cpu_s",
            "S6 bulk download (grpc-h2): GiB/s per peer core",
        ),
    ] {
        let mut series: Vec<(PeerKind, Vec<(f64, f64)>)> = Vec::new();
        for peer in PeerKind::ALL {
            let mut points: Vec<(f64, f64)> = results
                .medians
                .iter()
                .filter(|m| {
                    m.peer == peer
                        && m.point.scenario == Scenario::S6
                        && m.point.protocol == Protocol::Grpc
                        && !m.point.variant.starts_with(crate::runner::UPLOAD_PREFIX)
                })
                .filter_map(|m| {
                    Some((
                        m.metrics.get("size_mb").copied()?,
                        m.metrics.get(metric).copied()?,
                    ))
                })
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            if !points.is_empty() {
                series.push((peer, points));
            }
        }
        let x_max = series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.0))
            .fold(1.0f64, f64::max)
            * 1.05;
        let y_max = series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.1))
            .fold(1e-9f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart.configure_mesh().x_desc("message size (MB)").draw()?;
        for (peer, points) in series {
            let c = color(peer);
            chart
                .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
                .label(peer.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
