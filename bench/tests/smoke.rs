//! Smoke test: every scenario runs for a fraction of a second against direct, pnp and tonic-web
//! (all in this process) and produces sane numbers. No timing assertions: performance lives in
//! BENCHMARKS.md, measured by `bench/run.sh`.

use pnp_bench::client::Protocol;
use pnp_bench::idle::IdleGate;
use pnp_bench::peers::{PeerKind, Tools};
use pnp_bench::runner::{self, RunOptions};
use pnp_bench::scenarios::{Scale, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_against_pnp() {
    let workdir = std::env::temp_dir().join(format!("pnp-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).expect("workdir");
    let options = RunOptions {
        scale: Scale::smoke(),
        peers: vec![PeerKind::Direct, PeerKind::Pnp, PeerKind::TonicWeb],
        scenarios: Scenario::ALL.to_vec(),
        protocols: vec![Protocol::Grpc, Protocol::WebH2, Protocol::WebTextH1],
        repeats: 1,
        tools: Tools {
            pnp: None,
            envoy: None,
            nginx: None,
            bench: None,
            peer_cpu: None,
            upstream_cpu: None,
            workdir: workdir.clone(),
            dev_certs: None,
        },
        idle: IdleGate::never(),
        progress: false,
        checkpoint: None,
    };
    let results = runner::run(&options).await.expect("run");

    let failures: Vec<String> = results
        .records
        .iter()
        .filter_map(|r| {
            r.error.as_ref().map(|e| {
                format!(
                    "{} {:?} {} {}: {e}",
                    r.peer,
                    r.point.scenario,
                    r.point.variant,
                    r.point.protocol.name()
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "points failed:\n{}",
        failures.join("\n")
    );

    let scale = Scale::smoke();
    for m in &results.medians {
        let get = |name: &str| m.metrics.get(name).copied().unwrap_or(-1.0);
        let what = format!(
            "{} {:?} {} {}: {:?}",
            m.peer,
            m.point.scenario,
            m.point.variant,
            m.point.protocol.name(),
            m.metrics
        );
        match m.point.scenario {
            Scenario::S1 | Scenario::S7 => {
                assert!(get("calls") > 0.0, "{what}");
                assert_eq!(get("errors"), 0.0, "{what}");
                assert!(get("p50_us") > 0.0, "{what}");
            }
            Scenario::S2 => {
                assert!(get("msgs_per_s") > 0.0, "{what}");
                assert_eq!(get("broken_streams"), 0.0, "{what}");
                assert!(get("delay_p50_us") > 0.0, "{what}");
            }
            Scenario::S3 => assert!(get("msgs_per_s") > 0.0, "{what}"),
            Scenario::S4 => {
                assert!(get("streams_per_s") > 0.0, "{what}");
                assert_eq!(get("errors"), 0.0, "{what}");
            }
            Scenario::S5 => {
                let expected = if m.point.protocol.is_http1() {
                    scale.s5_http1_connections
                } else {
                    scale.s5_streams
                };
                assert_eq!(get("streams"), expected as f64, "{what}");
            }
            Scenario::S6 => {
                assert!(get("gib_per_s") > 0.0, "{what}");
                assert_eq!(get("streams"), 1.0, "{what}");
                let size = pnp_bench::runner::size_of(&m.point.variant).expect("a size");
                assert_eq!(get("size_mb"), size as f64 / 1e6, "{what}");
            }
            Scenario::S9 => {
                assert!(get("gib_per_s") > 0.0, "{what}");
                assert_eq!(get("streams"), scale.s9_streams as f64, "{what}");
                if m.peer == PeerKind::Pnp {
                    let bound = pnp_bench::peers::pnp_window_bound(scale.s9_streams);
                    assert_eq!(get("window_bound_mb"), bound as f64 / 1e6, "{what}");
                }
            }
            // Only that it ran: whether stalls cost the unary calls anything is what the
            // benchmark measures, not what the smoke test asserts.
            Scenario::S8 => {
                assert!(get("calm_calls") > 0.0, "{what}");
                assert_eq!(get("calm_errors"), 0.0, "{what}");
                assert!(get("stalled_p50_us") > 0.0, "{what}");
                assert!(get("stall_opened") >= get("stall_streams"), "{what}");
                assert!(get("stall_streams") > 0.0, "{what}");
            }
        }
    }
    // Every peer ran every scenario it supports.
    for peer in options.peers {
        for scenario in Scenario::ALL {
            assert!(
                results
                    .medians
                    .iter()
                    .any(|m| m.peer == peer && m.point.scenario == scenario && m.runs == 1),
                "{peer} {scenario:?} missing"
            );
        }
    }

    // S6 uploads as well as downloads, over both protocols that carry them.
    for protocol in [Protocol::Grpc, Protocol::WebH2] {
        let upload = pnp_bench::runner::upload_variant(scale.s6_upload_sizes[0]);
        assert!(
            results.medians.iter().any(|m| m.peer == PeerKind::Pnp
                && m.point.variant == upload
                && m.point.protocol == protocol
                && m.runs == 1),
            "pnp {upload} {protocol:?} missing"
        );
    }

    let report = pnp_bench::report::markdown(&results);
    assert!(report.contains("### S1 unary 100 B"), "{report}");
    assert!(report.contains("### S9 concurrent bulk"), "{report}");
    assert!(report.contains("| upload 5 MiB | grpc-h2 |"), "{report}");
    let plots = pnp_bench::plot::all(&results, &workdir).expect("plots");
    assert!(plots.iter().any(|p| p == "cpu-per-op.svg"), "{plots:?}");
    assert!(
        plots.iter().any(|p| p == "concurrent-bulk.svg"),
        "{plots:?}"
    );
    let _ = std::fs::remove_dir_all(&workdir);
}

/// The bridges (two pnps in this process, over HTTP/1.1, HTTP/2 and HTTP/3) and raw quinn run
/// S1, S2 and S6 beside direct and pnp; the report gets the bridge targets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridges_and_raw_quinn_run() {
    let workdir = std::env::temp_dir().join(format!("pnp-bench-bridges-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).expect("workdir");
    let peers = vec![
        PeerKind::Direct,
        PeerKind::Pnp,
        PeerKind::BridgeH1,
        PeerKind::BridgeH2,
        PeerKind::BridgeH3,
        PeerKind::Quinn,
        PeerKind::QuinnDefaults,
    ];
    let options = RunOptions {
        scale: Scale::smoke(),
        peers: peers.clone(),
        scenarios: vec![Scenario::S1, Scenario::S2, Scenario::S6],
        protocols: vec![Protocol::Grpc, Protocol::WebH2, Protocol::WebH1],
        repeats: 1,
        tools: Tools {
            pnp: None,
            envoy: None,
            nginx: None,
            bench: None,
            peer_cpu: None,
            upstream_cpu: None,
            workdir: workdir.clone(),
            dev_certs: None,
        },
        idle: IdleGate::never(),
        progress: false,
        checkpoint: None,
    };
    let results = runner::run(&options).await.expect("run");
    let failures: Vec<String> = results
        .records
        .iter()
        .filter_map(|r| {
            r.error.as_ref().map(|e| {
                format!(
                    "{} {:?} {} {}: {e}",
                    r.peer,
                    r.point.scenario,
                    r.point.variant,
                    r.point.protocol.name()
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "points failed:\n{}",
        failures.join("\n")
    );
    for peer in peers {
        for scenario in [Scenario::S1, Scenario::S2, Scenario::S6] {
            let ran = results
                .medians
                .iter()
                .any(|m| m.peer == peer && m.point.scenario == scenario && m.runs == 1);
            assert_eq!(
                ran,
                peer.runs(scenario, Protocol::Grpc),
                "{peer} {scenario:?}"
            );
        }
    }
    for m in results
        .medians
        .iter()
        .filter(|m| m.point.scenario == Scenario::S6)
    {
        assert!(
            m.metrics.get("gbit_per_s").copied().unwrap_or(0.0) > 0.0,
            "{} {}: {:?}",
            m.peer,
            m.point.variant,
            m.metrics
        );
    }
    let report = pnp_bench::report::markdown(&results);
    assert!(report.contains("### Bridges (issue #11)"), "{report}");
    assert!(report.contains("| bridge-h3 |"), "{report}");
    assert!(report.contains(" h3/pnp |"), "{report}");
    let _ = std::fs::remove_dir_all(&workdir);
}
