//! Two pnp instances bridged over one transport, in front of the demo upstream: clients → edge
//! pnp → `h1://` | `http://` (HTTP/2) | `h3://` → cluster pnp → upstream. The suites of real
//! clients (Node, Python) run through it as they run through one pnp.

use std::net::SocketAddr;
use std::time::Duration;

use pnp_config::Config;
use pnp_demo::{DemoStats, DemoUpstream};
use pnp_interop_tests::stack::upstream_url;
use pnp_interop_tests::Stack;
use pnp_proxy::Proxy;

use super::h3::{cluster, dev_certs, edge, loopback, Certs};

/// The transport between the two instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// Chunked HTTP/1.1 (gRPC-Web binary).
    H1,
    /// HTTP/2 cleartext.
    H2,
    /// HTTP/3 over QUIC, TLS with a test CA.
    H3,
    /// pnp's call framing over UCX (loopback TCP here; `UCX_TLS=tcp`, `UCX_NET_DEVICES=lo`).
    Ucx,
    /// The same over UCX's shared memory (`UCX_TLS=sm`).
    UcxSm,
}

impl Hop {
    /// Every hop.
    pub const ALL: [Hop; 3] = [Hop::H1, Hop::H2, Hop::H3];

    /// The reply came over this hop: `x-pnp-transport` names it.
    pub fn assert_carried(self, headers: &http::HeaderMap) {
        assert_eq!(
            headers.get("x-pnp-transport").map(|v| v.as_bytes()),
            Some(self.name().as_bytes()),
            "x-pnp-transport in {headers:?}"
        );
    }

    /// The name in `x-pnp-transport`.
    pub fn name(self) -> &'static str {
        match self {
            Hop::H1 => "h1",
            Hop::H2 => "h2",
            Hop::H3 => "h3",
            Hop::Ucx | Hop::UcxSm => "ucx",
        }
    }
}

/// A cluster pnp in front of `upstream` and an edge pnp whose upstream is the cluster, over
/// `hop` (HTTP/3 with a test CA, kept alive by the returned certificates); `configure` applies
/// to both.
pub async fn pair(
    hop: Hop,
    upstream: url::Url,
    configure: impl Fn(&mut Config) + Clone,
) -> (Proxy, Proxy, Option<Certs>) {
    match hop {
        Hop::H3 => {
            let certs = dev_certs();
            let cluster = cluster(upstream, &certs, configure.clone()).await;
            let port = cluster.local_h3_addr().expect("an HTTP/3 listener").port();
            let edge = edge(port, &certs, configure).await;
            (cluster, edge, Some(certs))
        }
        Hop::Ucx | Hop::UcxSm => {
            let settings = if hop == Hop::UcxSm {
                pnp_config::UcxSettings {
                    tls: Some("sm".into()),
                    ..pnp_config::UcxSettings::default()
                }
            } else {
                ucx_loopback()
            };
            let listener_settings = settings.clone();
            let cluster = Stack::proxy_for(upstream, |config| {
                config.listener.ucx = Some(pnp_config::UcxListener {
                    addr: loopback(),
                    settings: listener_settings,
                });
                configure.clone()(config);
            })
            .await;
            let port = cluster.local_ucx_addr().expect("a UCX listener").port();
            let url = url::Url::parse(&format!("ucx://127.0.0.1:{port}")).expect("ucx URL");
            let edge = Stack::proxy_for(url, |config| {
                config.upstream.ucx = settings;
                configure(config);
            })
            .await;
            (cluster, edge, None)
        }
        Hop::H1 | Hop::H2 => {
            let cluster = Stack::proxy_for(upstream, configure.clone()).await;
            let scheme = if hop == Hop::H1 { "h1" } else { "http" };
            let url = url::Url::parse(&format!("{scheme}://{}", cluster.local_addr()))
                .expect("bridge URL");
            let edge = Stack::proxy_for(url, configure).await;
            (cluster, edge, None)
        }
    }
}

/// UCX over loopback TCP, as the UCX tests run it.
pub fn ucx_loopback() -> pnp_config::UcxSettings {
    pnp_config::UcxSettings {
        tls: Some("tcp".into()),
        net_devices: Some("lo".into()),
        ..pnp_config::UcxSettings::default()
    }
}

/// Client → edge → hop → cluster → the demo upstream.
pub struct BridgeStack {
    /// The gRPC server at the far end.
    pub upstream: DemoUpstream,
    cluster: Proxy,
    edge: Proxy,
    _certs: Option<Certs>,
}

impl BridgeStack {
    /// Upstream, cluster and edge over `hop`.
    pub async fn start(hop: Hop) -> BridgeStack {
        let upstream = DemoUpstream::start(loopback())
            .await
            .expect("demo upstream");
        let (cluster, edge, certs) = pair(hop, upstream_url(upstream.local_addr()), |_| {}).await;
        BridgeStack {
            upstream,
            cluster,
            edge,
            _certs: certs,
        }
    }

    /// Where clients connect: the edge.
    pub fn addr(&self) -> SocketAddr {
        self.edge.local_addr()
    }

    /// What the upstream handlers saw.
    pub fn stats(&self) -> DemoStats {
        self.upstream.stats()
    }

    /// Stop the edge, the cluster, then the upstream.
    pub async fn shutdown(self) {
        self.edge.shutdown_with_grace(Duration::from_secs(1)).await;
        self.cluster
            .shutdown_with_grace(Duration::from_secs(1))
            .await;
        self.upstream.shutdown().await;
    }
}
