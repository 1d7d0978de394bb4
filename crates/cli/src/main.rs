//! The `pnp` binary: parses arguments and starts the data plane (and, with no upstream given,
//! the built-in demo upstreams). Everything else lives in the library crates, so tests can start
//! the same thing in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod certs;
mod control;
mod ctl;
mod planes;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use pnp_config::{Config, UpstreamTarget};

#[derive(Parser, Debug)]
#[command(
    name = "pnp",
    version,
    about = "Protocol negotiation proxy: gRPC-Web and gRPC in, gRPC out."
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the proxy. With no arguments: 127.0.0.1:8080 in front of the built-in demo upstreams,
    /// admin on 127.0.0.1:9901. With --control-certs DIR, also the control plane (`pnp
    /// control`, mTLS gRPC on --control-listen) as a second process, linked by shared-memory
    /// rings.
    Serve(ServeArgs),
    /// Run only the data plane (one role of `pnp serve`): like `serve`, but never starts a
    /// control plane; with --link-dir, a control plane started apart (`pnp control`) steers it.
    Data(ServeArgs),
    /// Run only the built-in demo upstreams (gRPC interop TestService and demo.llm.v1.Generator)
    /// as a plain gRPC server over h2c.
    Demo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
    },
    /// Make certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the control plane: the mTLS control API over the link to a data plane.
    Control(control::ControlArgs),
    /// Talk to the control API (`pnp control`).
    Ctl(ctl::CtlArgs),
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Write a development CA (ca.pem, ca-key.pem), a server certificate for localhost,
    /// 127.0.0.1 and ::1 (server.pem, server-key.pem) and a client certificate for mTLS
    /// (client.pem, client-key.pem) into DIR. Keys are mode 0600; existing files are kept.
    Dev {
        /// Directory to write into (created if missing).
        dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// TOML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data-plane listen address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP/3 (QUIC, UDP) listen address beside the TCP one; needs --tls-cert and --tls-key.
    #[arg(long)]
    listen_h3: Option<SocketAddr>,
    /// UCX listener for peer pnp instances (`ucx://` upstreams): the address of its TCP side
    /// channel. Needs a build with the `ucx` feature (`cargo build --features ucx`).
    #[arg(long)]
    listen_ucx: Option<SocketAddr>,
    /// PEM certificate chain of the listeners (TLS on TCP, and HTTP/3); with --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Upstream gRPC server: http://host:port (h2c), https://host:port (TLS), h3://host:port
    /// (HTTP/3 to a peer pnp's --listen-h3), ucx://host:port (UCX to a peer pnp's
    /// --listen-ucx), h1://host:port (chunked HTTP/1.1) or `demo`.
    #[arg(long)]
    upstream: Option<String>,
    /// Extra PEM root certificates to trust for https:// and h3:// upstreams (beside the
    /// system roots), e.g. the ca.pem of `pnp certs dev`.
    #[arg(long)]
    upstream_ca: Option<PathBuf>,
    /// Admin listen address (/healthz, /readyz).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Grace period for in-flight streams on SIGTERM/SIGINT, e.g. 30s.
    #[arg(long, value_parser = humantime_duration)]
    grace_period: Option<Duration>,
    /// Calls in flight before new ones are shed with RESOURCE_EXHAUSTED.
    #[arg(long)]
    max_concurrent_streams: Option<usize>,
    /// Client connections open at once; over it new connections wait briefly, then are closed.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Longest silence between messages of a flowing stream (default profile), e.g. 30s, or `off`.
    #[arg(long, value_parser = optional_duration)]
    stream_idle_timeout: Option<OptionalDuration>,
    /// Longest wait for the first response message (default profile), e.g. 30s, or `off`.
    #[arg(long, value_parser = optional_duration)]
    first_message_timeout: Option<OptionalDuration>,
    /// Directory of the shared-memory rings to the control plane (`[control] link_dir`);
    /// `serve --control-certs` picks one in /dev/shm when not given.
    #[arg(long)]
    link_dir: Option<PathBuf>,
    /// `serve` only: also run the control plane, with the mTLS certificates in DIR (the layout
    /// of `pnp certs dev`: server.pem, server-key.pem, ca.pem).
    #[arg(long)]
    control_certs: Option<PathBuf>,
    /// `serve` only: the control plane's API address.
    #[arg(long, default_value = "127.0.0.1:9444")]
    control_listen: SocketAddr,
    /// `serve` only: where the control plane's freeze loop writes job snapshots.
    #[arg(long, default_value = "pnp-snapshots")]
    control_snapshots: PathBuf,
    /// `serve` only: an origin whose pages may call the control API from a browser (CORS;
    /// repeat for more), as `pnp control --cors-origin`.
    #[arg(long = "control-cors-origin", value_name = "ORIGIN")]
    control_cors_origins: Vec<String>,
}

/// A duration flag that also takes `off`.
#[derive(Clone, Copy, Debug)]
struct OptionalDuration(Option<Duration>);

fn optional_duration(text: &str) -> Result<OptionalDuration, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(OptionalDuration(None));
    }
    humantime_duration(text).map(|d| OptionalDuration(Some(d)))
}

fn humantime_duration(text: &str) -> Result<Duration, String> {
    pnp_config::Config::from_toml(&format!("[shutdown]\ngrace_period = {text:?}"))
        .map(|c| c.shutdown.grace_period)
        .map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Held until main returns, so the last spans are exported before exit.
    let _tracing = init_tracing(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args, true).await,
            Command::Data(args) => serve(args, false).await,
            Command::Demo { listen } => demo(listen).await,
            Command::Certs(CertsCommand::Dev { dir }) => {
                for path in certs::write_dev(&dir)? {
                    println!("wrote {}", path.display());
                }
                Ok(())
            }
            Command::Control(args) => control::run(args).await,
            Command::Ctl(args) => ctl::run(args).await,
        }
    })
}

fn init_tracing(format: LogFormat) -> pnp_telemetry::TracingGuard {
    let format = match format {
        LogFormat::Text => pnp_telemetry::LogFormat::Text,
        LogFormat::Json => pnp_telemetry::LogFormat::Json,
    };
    pnp_telemetry::init_tracing_with(pnp_telemetry::TracingOptions::new(format, "info"))
}

async fn serve(args: ServeArgs, with_control: bool) -> anyhow::Result<()> {
    let stop = ShutdownSignal::listen();
    let source = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    let mut config = match &args.config {
        Some(path) => {
            let text = source.as_deref().unwrap_or_default();
            Config::from_toml(text).with_context(|| format!("in {}", path.display()))?
        }
        None => Config::demo(),
    };
    if let Some(listen) = args.listen {
        config.listener.addr = listen;
    }
    if let Some(admin) = args.admin {
        config.admin = Some(admin);
    }
    if let Some(upstream) = &args.upstream {
        config.upstream.target = Config::parse_upstream(upstream)?;
        // One upstream on the command line replaces the config's set of transports.
        config.upstream.transports.clear();
    }
    if let Some(ca) = &args.upstream_ca {
        config.upstream.ca = Some(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.listener.tls = Some(pnp_config::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        });
    }
    if let Some(addr) = args.listen_h3 {
        let mut h3 = config
            .listener
            .h3
            .take()
            .unwrap_or_else(|| pnp_config::H3Listener::new(addr));
        h3.addr = addr;
        config.listener.h3 = Some(h3);
    }
    if let Some(addr) = args.listen_ucx {
        let mut ucx = config
            .listener
            .ucx
            .take()
            .unwrap_or(pnp_config::UcxListener {
                addr,
                settings: pnp_config::UcxSettings::default(),
            });
        ucx.addr = addr;
        config.listener.ucx = Some(ucx);
    }
    if let Some(grace) = args.grace_period {
        config.shutdown.grace_period = grace;
    }
    if let Some(limit) = args.max_concurrent_streams {
        anyhow::ensure!(limit > 0, "--max-concurrent-streams must be at least 1");
        config.resilience.max_concurrent_streams = limit;
    }
    if let Some(limit) = args.max_connections {
        anyhow::ensure!(limit > 0, "--max-connections must be at least 1");
        config.listener.max_connections = limit;
    }
    if let Some(OptionalDuration(idle)) = args.stream_idle_timeout {
        let profile = config.jobs.default_profile_mut();
        profile.idle_timeout = idle;
        profile.idle_timeout_explicit = true;
    }
    if let Some(OptionalDuration(first)) = args.first_message_timeout {
        let profile = config.jobs.default_profile_mut();
        profile.first_message = match first {
            Some(d) => pnp_config::FirstMessage::After(d),
            None => pnp_config::FirstMessage::Off,
        };
        profile.first_message_explicit = true;
    }

    let control = match (&args.control_certs, with_control) {
        (Some(certs), true) => {
            let link_dir = config
                .control
                .link_dir
                .clone()
                .or_else(|| args.link_dir.clone())
                .unwrap_or_else(planes::default_link_dir);
            std::fs::create_dir_all(&link_dir)
                .with_context(|| format!("creating the link directory {}", link_dir.display()))?;
            Some(planes::ControlChild {
                link_dir,
                listen: args.control_listen,
                snapshots: args.control_snapshots.clone(),
                certs: certs.clone(),
                cors_origins: args.control_cors_origins.clone(),
            })
        }
        (Some(_), false) => anyhow::bail!(
            "--control-certs is for `pnp serve`; `pnp data` runs the data plane alone"
        ),
        (None, _) => None,
    };
    if let Some(dir) = &args.link_dir {
        config.control.link_dir = Some(dir.clone());
    }
    if let Some(dir) = &config.control.link_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the link directory {}", dir.display()))?;
    }
    if let Some(control) = &control {
        config.control.link_dir = Some(control.link_dir.clone());
    }

    // The demo upstreams run in this process on a loopback port the OS picks.
    let demo = match config.upstream.target {
        UpstreamTarget::Demo => {
            let demo = pnp_demo::DemoUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .context("starting the demo upstreams")?;
            let url = url::Url::parse(&format!("http://{}", demo.local_addr()))?;
            tracing::info!(upstream = %url, "serving the built-in demo upstreams");
            config.upstream.target = UpstreamTarget::Url(url);
            Some(demo)
        }
        UpstreamTarget::Url(_) => None,
    };

    let scheme = if config.listener.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let proxy = pnp_proxy::Proxy::start(config).await?;
    eprintln!(
        "pnp listening on {scheme}://{} (admin {})",
        proxy.local_addr(),
        proxy
            .admin_addr()
            .map_or_else(|| "off".to_owned(), |a| format!("http://{a}"))
    );
    if let Some(h3) = proxy.local_h3_addr() {
        eprintln!("pnp listening for HTTP/3 on {h3} (UDP)");
    }
    if let Some(ucx) = proxy.local_ucx_addr() {
        eprintln!("pnp listening for UCX peers on {ucx} (TCP side channel)");
    }
    let stop_control = tokio_util::sync::CancellationToken::new();
    let supervisor = control.map(|control| {
        eprintln!(
            "pnp control plane on https://{} (mTLS), linked through {}",
            control.listen,
            control.link_dir.display()
        );
        control.supervise(stop_control.clone())
    });
    let reload = async {
        match &args.config {
            Some(path) => planes::reload_on_sighup(&proxy, path).await,
            None => std::future::pending().await,
        }
    };
    let grace = tokio::select! {
        () = stop.received() => {
            tracing::info!("signal received: stopping");
            None
        }
        grace = proxy.drain_requested() => Some(grace),
        () = reload => None,
    };
    let drained_on_request = grace.is_some();
    match grace {
        Some(grace) => proxy.shutdown_with_grace(grace).await,
        None => proxy.shutdown().await,
    }
    if drained_on_request {
        // The control plane asked for the drain: let its answer reach the operator first.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop_control.cancel();
    if let Some(supervisor) = supervisor {
        let _ = supervisor.await;
    }
    if let Some(demo) = demo {
        demo.shutdown().await;
    }
    Ok(())
}

async fn demo(listen: SocketAddr) -> anyhow::Result<()> {
    let stop = ShutdownSignal::listen();
    let demo = pnp_demo::DemoUpstream::start(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    // Tests read this line to learn the port.
    println!("listening on {}", demo.local_addr());
    stop.received().await;
    demo.shutdown().await;
    Ok(())
}

/// SIGTERM or SIGINT, listened for from the moment this is made: one that arrives while pnp is
/// still starting (a pod deleted at once, a test that does not wait) is kept for the drain
/// instead of killing the process, which is the signals' default action before a handler is
/// installed.
pub(crate) struct ShutdownSignal {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignal {
    /// Installs the handlers (needs the tokio runtime).
    pub(crate) fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Resolves at the first signal, or at once if one came since [`ShutdownSignal::listen`].
    pub(crate) async fn received(mut self) {
        #[cfg(unix)]
        {
            async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            if self.term.is_none() && self.int.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
            tokio::select! {
                () = next(&mut self.term) => {}
                () = next(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
