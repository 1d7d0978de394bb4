//! A peer reachable over several transports, for the negotiation tests: a cluster pnp with TLS
//! on TCP (HTTP/2, and chunked HTTP/1.1 on the same port) and an HTTP/3 listener, in front of
//! the demo upstream; an edge pnp whose `upstream.transports` and profiles come from TOML, as
//! an operator writes them; calls that report which transport carried them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pnp_config::Config;
use pnp_demo::pb::grpc_testing::SimpleRequest;
use pnp_demo::DemoUpstream;
use pnp_interop_tests::interop::{encode, zero_payload};
use pnp_interop_tests::stack::upstream_url;
use pnp_interop_tests::{Mode, RawClient, RawReply, Stack};
use pnp_proxy::Proxy;

use super::h3::{cluster, dev_certs, loopback, Certs};

/// The demo upstream behind a cluster pnp that listens on TCP (TLS) and QUIC.
pub struct Peer {
    pub upstream: DemoUpstream,
    pub cluster: Proxy,
    pub certs: Certs,
}

impl Peer {
    pub async fn start() -> Peer {
        let upstream = DemoUpstream::start(loopback())
            .await
            .expect("demo upstream");
        let certs = dev_certs();
        let cluster = cluster(upstream_url(upstream.local_addr()), &certs, |_| {}).await;
        Peer {
            upstream,
            cluster,
            certs,
        }
    }

    /// `https://localhost:PORT`: HTTP/2 over TLS to the cluster.
    pub fn h2(&self) -> String {
        format!("https://localhost:{}", self.cluster.local_addr().port())
    }

    /// `h1s://localhost:PORT`: chunked HTTP/1.1 over TLS to the cluster.
    pub fn h1(&self) -> String {
        format!("h1s://localhost:{}", self.cluster.local_addr().port())
    }

    /// `h3://localhost:PORT`: HTTP/3 to the cluster.
    pub fn h3(&self) -> String {
        let port = self.cluster.local_h3_addr().expect("an h3 listener").port();
        format!("h3://localhost:{port}")
    }

    pub async fn shutdown(self) {
        self.cluster
            .shutdown_with_grace(Duration::from_secs(1))
            .await;
        self.upstream.shutdown().await;
    }
}

/// An edge pnp configured from `toml` (its `[upstream] transports` and profiles), trusting the
/// test CA, listening on loopback ports the OS picks.
pub async fn edge(toml: &str, certs: &Certs) -> Proxy {
    let parsed = Config::from_toml(toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let first = parsed.upstream.peer()[0].clone();
    let ca = certs.ca.clone();
    Stack::proxy_for(first, move |config| {
        config.upstream.transports = parsed.upstream.transports;
        config.upstream.connect_timeout = parsed.upstream.connect_timeout;
        config.jobs = parsed.jobs;
        config.upstream.ca = Some(ca);
    })
    .await
}

/// A UDP port that swallows everything: a QUIC peer that never answers (as when a firewall
/// drops UDP). Keep the socket for as long as the port must stay black.
pub fn black_hole() -> (std::net::UdpSocket, u16) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp bind");
    let port = socket.local_addr().expect("udp addr").port();
    (socket, port)
}

/// A unary call through `edge` (native gRPC over HTTP/2) asking for `response_size` bytes and
/// sending `request_size`, with `headers`; returns the reply and how long it took.
pub async fn unary(
    edge: SocketAddr,
    headers: &[(&str, &str)],
    request_size: usize,
    response_size: i32,
) -> (RawReply, Duration) {
    let request = SimpleRequest {
        response_size,
        payload: (request_size > 0).then(|| zero_payload(request_size)),
        ..SimpleRequest::default()
    };
    let body = encode(&request);
    let started = Instant::now();
    let reply = RawClient::new(edge, Mode::GrpcH2)
        .call("/grpc.testing.TestService/UnaryCall", headers, &[&body])
        .await;
    (reply, started.elapsed())
}

/// The transport that carried a reply (`x-pnp-transport`).
pub fn carried_by(reply: &RawReply) -> &str {
    reply
        .headers
        .get("x-pnp-transport")
        .or_else(|| reply.trailers.get("x-pnp-transport"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Whether the reply says a fallback carried it (`x-grpc-web-fallback: true`).
pub fn fell_back(reply: &RawReply) -> bool {
    reply
        .headers
        .get("x-grpc-web-fallback")
        .or_else(|| reply.trailers.get("x-grpc-web-fallback"))
        .is_some_and(|v| v == "true")
}

/// `METHOD path` on the admin listener; the status code and body.
pub async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin connect");
    stream
        .write_all(
            format!("{method} {path} HTTP/1.1\r\nhost: pnp\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("admin write");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("admin read");
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}
