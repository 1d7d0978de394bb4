//! `pnp-bench`: run the side-by-side benchmarks, or one of the servers they need.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use pnp_bench::client::Protocol;
use pnp_bench::idle::IdleGate;
use pnp_bench::peers::{PeerKind, Tools};
use pnp_bench::quic::{Direction, Windows};
use pnp_bench::runner::{self, RunOptions};
use pnp_bench::scenarios::{Scale, Scenario};

#[derive(Parser, Debug)]
#[command(
    name = "pnp-bench",
    about = "pnp side by side with direct, tonic-web, Envoy and nginx; pnp bridges beside raw quinn."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the scenarios against the peers; write results.json, results.md and plots.
    Run(Box<RunArgs>),
    /// Re-render results.md and the plots from a results.json.
    Report {
        /// The results.json of a run.
        results: PathBuf,
    },
    /// Serve the bench upstream (raw h2, precomputed replies).
    Upstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50061")]
        listen: SocketAddr,
    },
    /// Serve the bench service with tonic + tonic-web.
    TonicWeb {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50062")]
        listen: SocketAddr,
    },
    /// Raw quinn bulk throughput between two processes (a server and a client, both this
    /// program), as in shared/notes/transport-anchors.md: one connection, one stream per
    /// transfer, 64 KiB writes, default MTU. Prints Gbit/s and GiB per CPU-second (both
    /// processes' CPU).
    Quinn(QuinnArgs),
    /// UCX's own benchmark, the reference for the UCX bridges: `ucx_perftest` (ucx-utils)
    /// `tag_bw` for bulk sizes and `tag_lat` for small messages over `UCX_TLS=tcp` (on `lo`)
    /// and `UCX_TLS=sm`, a fresh server and client per run, medians; writes
    /// `ucx_perftest{SUFFIX}.json` and `.md` into `--out`.
    UcxPerftest(UcxPerftestArgs),
    /// pnp's own UCX hop alone: a pnp-ucx `UcxTransport` in this process calling a
    /// `UcxListener` in a child process (fresh for every run), bulk calls each way and
    /// sequential pings over `UCX_TLS=tcp` (on `lo`) and `UCX_TLS=sm`, beside the
    /// `ucx_perftest{SUFFIX}.json` (else `ucx_perftest.json`) found in `--out`; writes
    /// `ucx_hop{SUFFIX}.json` and `.md` there. Needs pnp-bench built with `--features ucx`.
    UcxHop(UcxHopArgs),
    /// The server of `ucx-hop` (started by it): prints its side-channel address, serves until
    /// stdin ends.
    #[command(hide = true)]
    UcxHopServe {
        /// UCX transport: tcp or sm.
        #[arg(long)]
        tls: String,
        /// `UcxOptions::busy_poll` in µs (default: pnp-ucx's).
        #[arg(long)]
        busy_poll_us: Option<u64>,
    },
    /// The raw quinn server (started by `run` and `quinn`).
    QuinnServer {
        /// UDP address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Transport settings.
        #[arg(long, value_enum, default_value_t = Windows::Pnp)]
        windows: Windows,
        /// Where to write the certificate (DER) once listening.
        #[arg(long)]
        cert_out: PathBuf,
    },
    /// The raw quinn client (started by `run` and `quinn`): connects, then runs the transfers
    /// asked for on its TCP control port.
    QuinnClient {
        /// The server's UDP address.
        #[arg(long)]
        server: SocketAddr,
        /// Transport settings.
        #[arg(long, value_enum, default_value_t = Windows::Pnp)]
        windows: Windows,
        /// The server's certificate (DER).
        #[arg(long)]
        cert: PathBuf,
        /// TCP address of the control port.
        #[arg(long)]
        control: SocketAddr,
    },
}

#[derive(clap::Args, Debug)]
struct QuinnArgs {
    /// Bytes per transfer, with units.
    #[arg(long, default_value = "1GiB")]
    size: String,
    /// Transport settings: `pnp` (pnp's HTTP/3 egress and listener windows), `defaults`
    /// (quinn's), or both in turn.
    #[arg(long, value_enum)]
    windows: Vec<Windows>,
    /// Directions (both by default).
    #[arg(long, value_enum)]
    direction: Vec<Direction>,
    /// Transfers of each kind (each with fresh processes).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Pin both processes to this CPU (default: not pinned, as in the anchors note).
    #[arg(long)]
    cpu: Option<usize>,
}

#[derive(clap::Args, Debug)]
struct UcxPerftestArgs {
    /// Output directory.
    #[arg(long, default_value = "bench/results/ucx")]
    out: PathBuf,
    /// `tag_bw` message sizes, comma-separated, with units.
    #[arg(long, default_value = "1MiB,16MiB,256MiB,1GiB")]
    bw_sizes: String,
    /// `tag_lat` message sizes, comma-separated, with units (an empty string runs none).
    #[arg(long, default_value = "8B,100B")]
    lat_sizes: String,
    /// Transports, comma-separated: tcp (`UCX_TLS=tcp UCX_NET_DEVICES=lo`), sm (`UCX_TLS=sm`).
    #[arg(long, default_value = "tcp,sm")]
    transports: String,
    /// Runs of each point (fresh processes each); the report shows medians.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Pin the server and the client: `S,C` (e.g. `1,1` puts both on CPU 1, the layout of a
    /// bridge's two pnps in `run`); not pinned by default.
    #[arg(long)]
    cpus: Option<String>,
    /// Suffix of the output file names (`ucx_perftest{SUFFIX}.json`).
    #[arg(long, default_value = "")]
    suffix: String,
}

#[derive(clap::Args, Debug)]
struct UcxHopArgs {
    /// Output directory (also where the `ucx_perftest` reference is looked for).
    #[arg(long, default_value = "bench/results/ucx")]
    out: PathBuf,
    /// Transports, comma-separated: tcp (`UCX_TLS=tcp`, `UCX_NET_DEVICES=lo`), sm
    /// (`UCX_TLS=sm`).
    #[arg(long, default_value = "tcp,sm")]
    transports: String,
    /// Bandwidth message sizes, comma-separated, with units (an empty string runs none); the
    /// message counts are `tag_bw`'s.
    #[arg(long, default_value = "1MiB,16MiB,256MiB,1GiB")]
    bw_sizes: String,
    /// Latency (ping) message sizes, comma-separated, with units (an empty string runs none).
    #[arg(long, default_value = "8B,100B")]
    lat_sizes: String,
    /// Runs of each point (a fresh server process and client each); the report shows medians.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Busy-poll time of both sides' UCX threads, µs (default: pnp-ucx's default).
    #[arg(long)]
    busy_poll_us: Option<u64>,
    /// Pin the server and the client: `S,C`; not pinned by default.
    #[arg(long)]
    cpus: Option<String>,
    /// Suffix of the output file names (`ucx_hop{SUFFIX}.json`), e.g. `-cpu1`.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    suffix: String,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Output directory.
    #[arg(long, default_value = "bench/results/latest")]
    out: PathBuf,
    /// Peers, comma-separated: direct,pnp,tonic-web,envoy,nginx, and the bridges bridge-h1,
    /// bridge-h2, bridge-h3, bridge-ucx-tcp, bridge-ucx-sm (these two need pnp built with
    /// `--features ucx`) and raw quinn (quinn, quinn-defaults; S6 only).
    #[arg(long, default_value = "direct,pnp,tonic-web,envoy,nginx")]
    peers: String,
    /// Scenarios, comma-separated: S1..S9.
    #[arg(long, default_value = "S1,S2,S3,S4,S5,S6,S7,S8,S9")]
    scenarios: String,
    /// Only these protocols (grpc-h2, web-h2, web-text-h2, web-h1, web-text-h1).
    #[arg(long)]
    protocols: Option<String>,
    /// Runs of each point; the report shows medians.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// A few seconds in all, no waiting for an idle machine.
    #[arg(long)]
    smoke: bool,
    /// Measured seconds per timed point.
    #[arg(long)]
    duration: Option<f64>,
    /// S2/S7 streams.
    #[arg(long)]
    s2_streams: Option<usize>,
    /// S5 HTTP/2 streams.
    #[arg(long)]
    s5_streams: Option<usize>,
    /// S6 download sizes in MiB, comma-separated (see --s6-sizes for other units).
    #[arg(long, conflicts_with = "s6_sizes")]
    s6_mib: Option<String>,
    /// S6 download sizes, comma-separated, with units: `100MiB,1GiB,4GiB-1` (the default;
    /// 4 GiB − 1 is the largest gRPC message).
    #[arg(long)]
    s6_sizes: Option<String>,
    /// S6 upload sizes (one client-streaming message each), comma-separated with units:
    /// `1GiB` (the default); an empty string runs no upload.
    #[arg(long)]
    s6_upload: Option<String>,
    /// S9 concurrent downloads.
    #[arg(long)]
    s9_streams: Option<usize>,
    /// S9 size of each download, with units (`64MiB` by default).
    #[arg(long)]
    s9_size: Option<String>,
    /// S8 stalled readers as CONNECTIONSxSTREAMS (e.g. `8x8`).
    #[arg(long)]
    s8_stall: Option<String>,
    /// S8 closed-loop unary concurrency.
    #[arg(long)]
    s8_concurrency: Option<usize>,
    /// S8 `grpc-timeout` of the stalled streams, in milliseconds.
    #[arg(long)]
    s8_deadline_ms: Option<u64>,
    /// The pnp binary (default: `pnp` beside this binary).
    #[arg(long)]
    pnp: Option<PathBuf>,
    /// CPU to pin the peer to (`-1`: no pinning). The load client should be pinned elsewhere
    /// (bench/run.sh runs it under `taskset -c 0`).
    #[arg(long, default_value_t = 1)]
    peer_cpu: i64,
    /// CPU to pin the upstream to (`-1`: no pinning).
    #[arg(long, default_value_t = 0)]
    upstream_cpu: i64,
    /// Busy share of all CPUs under which the machine counts as idle.
    #[arg(long, default_value_t = 0.10)]
    idle_threshold: f64,
    /// Longest wait for an idle machine before a point, in seconds.
    #[arg(long, default_value_t = 10.0)]
    idle_max_wait: f64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn list<T>(text: &str, parse: impl Fn(&str) -> Option<T>, what: &str) -> anyhow::Result<Vec<T>> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| parse(s.trim()).with_context(|| format!("unknown {what} `{s}`")))
        .collect()
}

/// A message size with units, 1 byte to 4 GiB − 1.
fn message_size(text: &str) -> Option<u64> {
    runner::parse_size(text).filter(|&s| (1..=pnp_bench::service::MAX_MESSAGE).contains(&s))
}

/// `--cpus S,C`.
fn cpu_pair(text: Option<&str>) -> anyhow::Result<Option<(usize, usize)>> {
    text.map(|text| {
        text.split_once(',')
            .and_then(|(s, c)| Some((s.trim().parse().ok()?, c.trim().parse().ok()?)))
            .with_context(|| format!("--cpus `{text}`: expected SERVER,CLIENT"))
    })
    .transpose()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber_init();
    // These two build runtimes of their own (two workers), outside the one below.
    let command = match cli.command {
        Command::UcxHop(args) => return ucx_hop(&args),
        Command::UcxHopServe { tls, busy_poll_us } => {
            let transport = pnp_bench::ucxperf::Transport::parse(&tls)
                .with_context(|| format!("--tls `{tls}`: expected tcp or sm"))?;
            return pnp_bench::ucxhop::serve_main(transport, busy_poll_us);
        }
        command => command,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match command {
            Command::Upstream { listen } => {
                let listener = pnp_bench::upstream::bind(listen)?;
                println!("listening on {}", listener.local_addr()?);
                pnp_bench::upstream::serve(listener).await;
                Ok(())
            }
            Command::TonicWeb { listen } => pnp_bench::tonic_peer::serve(listen).await,
            Command::QuinnServer {
                listen,
                windows,
                cert_out,
            } => pnp_bench::quic::server_main(listen, windows, &cert_out).await,
            Command::QuinnClient {
                server,
                windows,
                cert,
                control,
            } => pnp_bench::quic::client_main(server, windows, &cert, control).await,
            Command::Quinn(args) => quinn(args).await,
            Command::UcxPerftest(args) => ucx_perftest(&args),
            Command::UcxHop(_) | Command::UcxHopServe { .. } => {
                unreachable!("run before the runtime is built")
            }
            Command::Report { results } => {
                let text = std::fs::read_to_string(&results)?;
                let parsed: runner::Results = serde_json::from_str(&text)?;
                let dir = results.parent().map(PathBuf::from).unwrap_or_default();
                write_outputs(&parsed, &dir)
            }
            Command::Run(args) => run(*args).await,
        }
    })
}

fn tracing_subscriber_init() {}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut scale = if args.smoke {
        Scale::smoke()
    } else {
        Scale::full()
    };
    if let Some(d) = args.duration {
        scale.duration = Duration::from_secs_f64(d);
    }
    if let Some(n) = args.s2_streams {
        scale.s2_streams = n;
    }
    if let Some(n) = args.s5_streams {
        scale.s5_streams = n;
        scale.s5_connections = n.div_ceil(1000).max(1);
    }
    if let Some(sizes) = &args.s6_mib {
        scale.s6_sizes = list(
            sizes,
            |s| message_size(&format!("{}MiB", s.parse::<u64>().ok()?)),
            "S6 size (MiB, at most 4095)",
        )?;
    }
    if let Some(sizes) = &args.s6_sizes {
        scale.s6_sizes = list(sizes, message_size, "S6 size (1 B … 4 GiB − 1)")?;
    }
    if let Some(sizes) = &args.s6_upload {
        scale.s6_upload_sizes = list(sizes, message_size, "S6 upload size (1 B … 4 GiB − 1)")?;
    }
    if let Some(n) = args.s9_streams {
        scale.s9_streams = n.max(1);
    }
    if let Some(size) = &args.s9_size {
        scale.s9_size = message_size(size)
            .with_context(|| format!("--s9-size `{size}`: expected a size, 1 B … 4 GiB − 1"))?;
    }
    if let Some(stall) = &args.s8_stall {
        let (connections, streams) = stall
            .split_once(['x', '×'])
            .and_then(|(c, s)| Some((c.trim().parse().ok()?, s.trim().parse().ok()?)))
            .filter(|&(c, s): &(usize, usize)| c > 0 && s > 0)
            .with_context(|| format!("--s8-stall `{stall}`: expected CONNECTIONSxSTREAMS"))?;
        scale.s8_stall_connections = connections;
        scale.s8_stall_streams = streams;
    }
    if let Some(n) = args.s8_concurrency {
        scale.s8_concurrency = n.max(1);
    }
    if let Some(ms) = args.s8_deadline_ms {
        scale.s8_deadline = Duration::from_millis(ms);
    }
    let exe = std::env::current_exe()?;
    let pnp = args
        .pnp
        .clone()
        .or_else(|| exe.parent().map(|d| d.join("pnp")))
        .filter(|p| p.exists())
        .context("the pnp binary was not found beside pnp-bench; build it (`cargo build --release -p pnp`) or pass --pnp")?;
    std::fs::create_dir_all(&args.out)?;
    // Absolute, because nginx resolves its paths against its prefix.
    let out = std::fs::canonicalize(&args.out)?;
    // Peer configurations and logs stay beside the results, for inspection.
    let workdir = out.join("work");
    std::fs::create_dir_all(&workdir)?;
    let cpu = |c: i64| (c >= 0).then_some(c as usize);
    let mut tools = Tools {
        pnp: Some(pnp),
        envoy: None,
        nginx: None,
        bench: Some(exe),
        peer_cpu: cpu(args.peer_cpu),
        upstream_cpu: cpu(args.upstream_cpu),
        workdir: workdir.clone(),
        dev_certs: None,
    };
    tools.discover_envoy_nginx();
    let options = RunOptions {
        scale,
        peers: list(&args.peers, PeerKind::parse, "peer")?,
        scenarios: list(&args.scenarios, Scenario::parse, "scenario")?,
        protocols: match &args.protocols {
            Some(p) => list(p, Protocol::parse, "protocol")?,
            None => Vec::new(),
        },
        repeats: args.repeats.max(1),
        tools,
        idle: if args.smoke {
            IdleGate::never()
        } else {
            IdleGate {
                threshold: args.idle_threshold,
                samples: 2,
                max_wait: Duration::from_secs_f64(args.idle_max_wait),
            }
        },
        progress: !args.quiet,
        checkpoint: Some(args.out.join("records.partial.json")),
    };
    let results = runner::run(&options).await?;
    write_outputs(&results, &args.out)?;
    println!("{}", pnp_bench::report::markdown(&results));
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// `pnp-bench quinn`: fresh server and client processes for each transfer, one transfer each.
async fn quinn(args: QuinnArgs) -> anyhow::Result<()> {
    let size = message_size(&args.size)
        .or_else(|| runner::parse_size(&args.size))
        .with_context(|| format!("--size `{}`: expected a size", args.size))?;
    let windows = if args.windows.is_empty() {
        vec![Windows::Pnp, Windows::Defaults]
    } else {
        args.windows.clone()
    };
    let directions = if args.direction.is_empty() {
        vec![Direction::Download, Direction::Upload]
    } else {
        args.direction.clone()
    };
    let workdir = std::env::temp_dir().join(format!("pnp-bench-quinn-{}", std::process::id()));
    std::fs::create_dir_all(&workdir)?;
    let tools = Tools {
        pnp: None,
        envoy: None,
        nginx: None,
        bench: Some(std::env::current_exe()?),
        peer_cpu: args.cpu,
        upstream_cpu: None,
        workdir: workdir.clone(),
        dev_certs: None,
    };
    println!(
        "raw quinn, {} per transfer, 64 KiB writes, two processes{}",
        runner::size_name(size),
        args.cpu.map_or(String::from(", not pinned"), |c| format!(
            ", both on CPU {c}"
        ))
    );
    println!("windows   direction  Gbit/s  GiB/CPU-s  client CPU s  server CPU s  client/server peak RSS MB  lost (client)  RcvbufErrors  MTU");
    for &w in &windows {
        let kind = match w {
            Windows::Pnp => PeerKind::Quinn,
            Windows::Defaults => PeerKind::QuinnDefaults,
        };
        for &direction in &directions {
            for _ in 0..args.repeats.max(1) {
                let peer = pnp_bench::peers::start_quinn(kind, &tools).await?;
                let target = pnp_bench::scenarios::Target {
                    addr: peer.addr,
                    protocol: Protocol::Grpc,
                    peer_pid: peer.pid,
                    cluster_pid: peer.cluster_pid,
                    upstream_pid: None,
                    peer: Some(kind),
                };
                let result =
                    pnp_bench::scenarios::s6_quinn(&target, size, direction == Direction::Upload)
                        .await;
                peer.stop().await;
                let sample = result?;
                let m = |k: &str| sample.metrics.get(k).copied().unwrap_or(f64::NAN);
                println!(
                    "{:<9} {:<10} {:>6.2}  {:>9.3}  {:>12.2}  {:>12.2}  {:>12.1} / {:<11.1}  {:>13}  {:>12}  {:>4}",
                    w.name(),
                    direction.name(),
                    m("gbit_per_s"),
                    m("gib_per_cpu_s"),
                    m("edge_cpu_s"),
                    m("cluster_cpu_s"),
                    m("edge_peak_rss_mb"),
                    m("cluster_peak_rss_mb"),
                    m("client_lost_packets"),
                    m("udp_rcvbuf_errors"),
                    m("path_mtu"),
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(())
}

/// `pnp-bench ucx-perftest`.
fn ucx_perftest(args: &UcxPerftestArgs) -> anyhow::Result<()> {
    use pnp_bench::ucxperf::{self, Test, Transport};
    let sizes = |text: &str, what: &str| list(text, runner::parse_size, what);
    let mut tests: Vec<Test> = sizes(&args.bw_sizes, "tag_bw size")?
        .into_iter()
        .map(Test::bandwidth)
        .collect();
    tests.extend(
        sizes(&args.lat_sizes, "tag_lat size")?
            .into_iter()
            .map(Test::latency),
    );
    let transports = list(&args.transports, Transport::parse, "UCX transport")?;
    let cpus = cpu_pair(args.cpus.as_deref())?;
    let report = ucxperf::run_all(&transports, &tests, args.runs.max(1), cpus, |line| {
        eprintln!("{line}")
    })?;
    ucxperf::write(&report, &args.out, &args.suffix)?;
    println!("{}", ucxperf::markdown(&report));
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// `pnp-bench ucx-hop`.
fn ucx_hop(args: &UcxHopArgs) -> anyhow::Result<()> {
    use pnp_bench::ucxhop::{self, Settings};
    use pnp_bench::ucxperf::Transport;
    let settings = Settings {
        transports: list(&args.transports, Transport::parse, "UCX transport")?,
        bw_sizes: list(
            &args.bw_sizes,
            message_size,
            "bandwidth size (1 B … 4 GiB − 1)",
        )?,
        lat_sizes: list(
            &args.lat_sizes,
            message_size,
            "latency size (1 B … 4 GiB − 1)",
        )?,
        runs: args.runs.max(1),
        busy_poll_us: args.busy_poll_us,
        cpus: cpu_pair(args.cpus.as_deref())?,
    };
    let reference = match ucxhop::load_reference(&args.out, &args.suffix) {
        Ok(reference) => reference,
        Err(e) => {
            eprintln!("not comparing with ucx_perftest: {e:#}");
            None
        }
    };
    let report = ucxhop::run_all(&settings, |line| eprintln!("{line}"))?;
    ucxhop::write(&report, reference.as_ref(), &args.out, &args.suffix)?;
    println!("{}", ucxhop::markdown(&report, reference.as_ref()));
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn write_outputs(results: &runner::Results, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    std::fs::write(dir.join("results.md"), pnp_bench::report::markdown(results))?;
    let _ = pnp_bench::plot::all(results, dir)?;
    Ok(())
}
