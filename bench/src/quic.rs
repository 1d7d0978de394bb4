//! Raw quinn bulk throughput: the ceiling for pnp's HTTP/3 hop, measured the way
//! `shared/notes/transport-anchors.md` measured it (one connection, one stream, the payload in
//! 64 KiB writes, quinn's default MTU of 1452, TLS 1.3 on ring) between two processes.
//!
//! Two programs, each a subcommand of `pnp-bench`:
//!
//! - **server** (`pnp-bench quinn-server`): accepts connections; on each bidirectional stream
//!   it reads a 9-byte request (`D` or `U`, then a big-endian `u64` size). `D`: it writes that
//!   many bytes in 64 KiB writes and finishes the stream. `U`: it reads the stream to its end
//!   and answers with the 8-byte count it received.
//! - **client** (`pnp-bench quinn-client`): makes one connection to the server, then listens on
//!   a TCP *control* port; each line `download N` or `upload N` runs one transfer on a new
//!   stream of that connection and is answered with one JSON line ([`Transfer`]). The
//!   handshake is not part of any transfer.
//!
//! In the bench the client plays the edge pnp's part (the QUIC client, which receives the
//! downloads) and the server the cluster pnp's. With [`Windows::Pnp`] each side gets the
//! transport settings of its pnp counterpart (`crates/transport/src/http3.rs` for the client,
//! `crates/proxy/src/h3server.rs` for the server); with [`Windows::Defaults`], quinn's. Both
//! raise the UDP socket buffers as pnp does (the default 208 KiB drops thousands of packets
//! per GiB on loopback). Writes hand quinn shared 64 KiB [`Bytes`] (`write_chunk`, no copy) and
//! reads take quinn's chunks as they are (`read_chunk`, no copy): the cheapest use of quinn.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use quinn::VarInt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Size of each write (as in the anchors).
pub const WRITE_SIZE: usize = 64 << 10;
/// UDP socket buffers, as pnp's (`UDP_BUFFER` in both pnp crates; the kernel caps the request
/// at `net.core.rmem_max` / `wmem_max`).
pub const UDP_BUFFER: usize = 8 << 20;
/// pnp's QUIC send window, on both its egress and its listener (`SEND_WINDOW`, private there).
pub const PNP_SEND_WINDOW: u64 = 64 << 20;
/// ALPN of the raw protocol (not HTTP/3).
const ALPN: &[u8] = b"pnp-bench-quic";
/// The server name the client asks for (the certificate also names 127.0.0.1).
const SERVER_NAME: &str = "localhost";

/// Which QUIC transport settings both ends use.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
pub enum Windows {
    /// pnp's: the client as pnp's HTTP/3 egress (2 MiB per stream, 1 GiB per connection), the
    /// server as pnp's HTTP/3 listener (2 MiB per stream, 64 MiB per connection), both with a
    /// 64 MiB send window.
    Pnp,
    /// quinn's defaults (1.25 MB per stream, unlimited per connection, 10 MB send window).
    Defaults,
}

impl Windows {
    /// `pnp` or `defaults`.
    pub fn name(self) -> &'static str {
        match self {
            Windows::Pnp => "pnp",
            Windows::Defaults => "defaults",
        }
    }
}

/// Which way the bytes go.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
pub enum Direction {
    /// Server to client (as a reply through the h3 bridge).
    Download,
    /// Client to server (as a request through the h3 bridge).
    Upload,
}

impl Direction {
    /// `download` or `upload`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Download => "download",
            Direction::Upload => "upload",
        }
    }
}

/// What one transfer did, as the client saw it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Transfer {
    /// Payload bytes moved.
    pub bytes: u64,
    /// From opening the stream to the last byte read (download) or the server's count
    /// (upload), in seconds.
    pub wall_s: f64,
    /// Packets the client declared lost during the transfer (its own sends: the uploads' data,
    /// the downloads' acknowledgements).
    pub client_lost_packets: u64,
    /// Congestion events the client saw during the transfer.
    pub client_congestion_events: u64,
    /// The path MTU the client uses at the end (UDP payload bytes).
    pub mtu: u16,
    /// Smoothed RTT at the end, in microseconds.
    pub rtt_us: f64,
    /// UDP datagrams the client received during the transfer.
    pub client_datagrams_in: u64,
    /// UDP datagrams the client sent during the transfer.
    pub client_datagrams_out: u64,
}

impl Transfer {
    /// Throughput in Gbit/s (10⁹ bits per second).
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.wall_s.max(1e-9) / 1e9
    }
}

/// A self-signed certificate for `localhost` and `127.0.0.1` (DER), with its key.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The certificate.
    pub cert: Vec<u8>,
    /// Its PKCS#8 private key.
    pub key: Vec<u8>,
}

impl Identity {
    /// Generate one.
    pub fn generate() -> anyhow::Result<Self> {
        let rcgen::CertifiedKey { cert, key_pair } =
            rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned(), "127.0.0.1".into()])
                .context("generating a self-signed certificate")?;
        Ok(Self {
            cert: cert.der().to_vec(),
            key: key_pair.serialize_der(),
        })
    }
}

fn varint(value: u64) -> VarInt {
    VarInt::from_u64(value).unwrap_or(VarInt::MAX)
}

/// The transport settings of the client (`server == false`) or the server.
pub fn transport_config(windows: Windows, server: bool) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    if windows == Windows::Pnp {
        let (stream, connection) = if server {
            (
                pnp_config::DEFAULT_H3_STREAM_WINDOW,
                pnp_config::DEFAULT_H3_CONNECTION_WINDOW,
            )
        } else {
            (
                pnp_transport::http3::DEFAULT_STREAM_WINDOW,
                pnp_transport::http3::DEFAULT_CONNECTION_WINDOW,
            )
        };
        transport
            .stream_receive_window(varint(stream))
            .receive_window(varint(connection))
            .send_window(PNP_SEND_WINDOW);
    }
    transport
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> anyhow::Result<quinn::Endpoint> {
    let socket = udp_socket(addr).with_context(|| format!("binding UDP {addr}"))?;
    let runtime = quinn::default_runtime().context("no async runtime for quinn")?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        runtime,
    )?)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's endpoint on `addr`.
pub fn server_endpoint(
    addr: SocketAddr,
    windows: Windows,
    identity: &Identity,
) -> anyhow::Result<quinn::Endpoint> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key.clone()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(identity.cert.clone())], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(windows, true)));
    endpoint(addr, Some(config))
}

/// Serve transfers on `endpoint` until it closes.
pub async fn serve(endpoint: quinn::Endpoint) {
    let payload = payload();
    while let Some(incoming) = endpoint.accept().await {
        let payload = payload.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                let payload = payload.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_stream(send, recv, payload).await {
                        tracing::debug!(error = %e, "raw quinn stream failed");
                    }
                });
            }
        });
    }
}

fn payload() -> Bytes {
    Bytes::from(vec![0x5a; WRITE_SIZE])
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    payload: Bytes,
) -> anyhow::Result<()> {
    let mut head = [0u8; 9];
    recv.read_exact(&mut head).await?;
    let mut size = [0u8; 8];
    size.copy_from_slice(&head[1..]);
    let size = u64::from_be_bytes(size);
    match head[0] {
        b'D' => {
            write_bytes(&mut send, &payload, size).await?;
            send.finish()?;
            // Keep the stream until the client has it all (dropping it would be fine for
            // quinn, but this way the task's end means the transfer's).
            let _ = send.stopped().await;
        }
        b'U' => {
            let received = read_to_end(&mut recv).await?;
            send.write_all(&received.to_be_bytes()).await?;
            send.finish()?;
            let _ = send.stopped().await;
        }
        other => bail!("unknown request {other:#x}"),
    }
    Ok(())
}

async fn write_bytes(
    send: &mut quinn::SendStream,
    payload: &Bytes,
    size: u64,
) -> anyhow::Result<()> {
    let mut left = size;
    while left > 0 {
        let n = left.min(payload.len() as u64) as usize;
        send.write_chunk(payload.slice(..n)).await?;
        left -= n as u64;
    }
    Ok(())
}

async fn read_to_end(recv: &mut quinn::RecvStream) -> anyhow::Result<u64> {
    let mut received = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        received += chunk.bytes.len() as u64;
    }
    Ok(received)
}

/// Connect a client to the server at `server`, trusting `cert`.
pub async fn connect(
    server: SocketAddr,
    windows: Windows,
    cert: &[u8],
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert.to_vec()))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(windows, false)));
    let local: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, 0).into()
    };
    let endpoint = endpoint(local, None)?;
    let conn = endpoint
        .connect_with(config, server, SERVER_NAME)?
        .await
        .with_context(|| format!("QUIC handshake with {server}"))?;
    Ok((endpoint, conn))
}

/// One transfer of `bytes` on a new stream of `conn`.
pub async fn transfer(
    conn: &quinn::Connection,
    direction: Direction,
    bytes: u64,
) -> anyhow::Result<Transfer> {
    let before = conn.stats();
    let t0 = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut head = [0u8; 9];
    head[0] = match direction {
        Direction::Download => b'D',
        Direction::Upload => b'U',
    };
    head[1..].copy_from_slice(&bytes.to_be_bytes());
    send.write_all(&head).await?;
    let moved = match direction {
        Direction::Download => {
            send.finish()?;
            read_to_end(&mut recv).await?
        }
        Direction::Upload => {
            write_bytes(&mut send, &payload(), bytes).await?;
            send.finish()?;
            let mut count = [0u8; 8];
            recv.read_exact(&mut count).await?;
            u64::from_be_bytes(count)
        }
    };
    let wall = t0.elapsed();
    if moved != bytes {
        bail!("raw quinn {}: {moved} of {bytes} bytes", direction.name());
    }
    let after = conn.stats();
    Ok(Transfer {
        bytes,
        wall_s: wall.as_secs_f64(),
        client_lost_packets: after.path.lost_packets - before.path.lost_packets,
        client_congestion_events: after.path.congestion_events - before.path.congestion_events,
        mtu: after.path.current_mtu,
        rtt_us: after.path.rtt.as_secs_f64() * 1e6,
        client_datagrams_in: after.udp_rx.datagrams - before.udp_rx.datagrams,
        client_datagrams_out: after.udp_tx.datagrams - before.udp_tx.datagrams,
    })
}

/// The client: run the transfers asked for on `control` (one JSON line per `download N` /
/// `upload N` line) on `conn`, until the connection or the listener fails.
pub async fn client(
    conn: quinn::Connection,
    control: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    loop {
        let (stream, _) = control.accept().await?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        while let Some(line) = lines.next_line().await? {
            let answer = match parse_command(&line) {
                Some((direction, bytes)) => match transfer(&conn, direction, bytes).await {
                    Ok(t) => serde_json::to_string(&t)?,
                    Err(e) => {
                        serde_json::to_string(&serde_json::json!({ "error": format!("{e:#}") }))?
                    }
                },
                None => serde_json::to_string(
                    &serde_json::json!({ "error": format!("bad command `{line}`") }),
                )?,
            };
            write.write_all(answer.as_bytes()).await?;
            write.write_all(b"\n").await?;
        }
    }
}

fn parse_command(line: &str) -> Option<(Direction, u64)> {
    let (verb, n) = line.trim().split_once(' ')?;
    let direction = match verb {
        "download" => Direction::Download,
        "upload" => Direction::Upload,
        _ => return None,
    };
    Some((direction, n.trim().parse().ok()?))
}

/// Ask the client listening on `control` for one transfer; waits for its answer.
pub async fn request(
    control: SocketAddr,
    direction: Direction,
    bytes: u64,
    timeout: Duration,
) -> anyhow::Result<Transfer> {
    let stream = tokio::net::TcpStream::connect(control)
        .await
        .with_context(|| format!("the raw quinn client's control port {control}"))?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("{} {bytes}\n", direction.name()).as_bytes())
        .await?;
    let mut lines = BufReader::new(read).lines();
    let line = tokio::time::timeout(timeout, lines.next_line())
        .await
        .context("the raw quinn transfer timed out")??
        .context("the raw quinn client closed its control connection")?;
    let value: serde_json::Value = serde_json::from_str(&line)?;
    if let Some(error) = value.get("error") {
        bail!("raw quinn client: {error}");
    }
    Ok(serde_json::from_value(value)?)
}

/// The `quinn-server` subcommand: bind, write the certificate (DER) to `cert_out` once
/// listening, serve.
pub async fn server_main(
    listen: SocketAddr,
    windows: Windows,
    cert_out: &Path,
) -> anyhow::Result<()> {
    let identity = Identity::generate()?;
    let endpoint = server_endpoint(listen, windows, &identity)?;
    let partial = cert_out.with_extension("partial");
    std::fs::write(&partial, &identity.cert)?;
    std::fs::rename(&partial, cert_out)?;
    serve(endpoint).await;
    Ok(())
}

/// The `quinn-client` subcommand.
pub async fn client_main(
    server: SocketAddr,
    windows: Windows,
    cert: &Path,
    control: SocketAddr,
) -> anyhow::Result<()> {
    let cert = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    // Connect first, listen after: once the control port answers, the connection is up.
    let (_endpoint, conn) = connect(server, windows, &cert).await?;
    let listener = tokio::net::TcpListener::bind(control).await?;
    client(conn, listener).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transfers_both_ways_in_process() {
        let identity = Identity::generate().expect("identity");
        for windows in [Windows::Pnp, Windows::Defaults] {
            let server = server_endpoint("127.0.0.1:0".parse().expect("addr"), windows, &identity)
                .expect("server");
            let addr = server.local_addr().expect("addr");
            let serving = tokio::spawn(serve(server));
            let (_endpoint, conn) = connect(addr, windows, &identity.cert)
                .await
                .expect("connect");
            for direction in [Direction::Download, Direction::Upload] {
                let t = transfer(&conn, direction, (3 << 20) + 17)
                    .await
                    .expect("transfer");
                assert_eq!(t.bytes, (3 << 20) + 17);
                assert!(t.mtu >= 1200, "{t:?}");
            }
            serving.abort();
        }
    }

    #[test]
    fn commands_parse() {
        assert_eq!(
            parse_command("download 1073741824"),
            Some((Direction::Download, 1 << 30))
        );
        assert_eq!(parse_command("upload 5\n"), Some((Direction::Upload, 5)));
        assert_eq!(parse_command("sideload 5"), None);
    }
}
