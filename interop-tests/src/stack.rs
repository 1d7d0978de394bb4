//! A demo upstream with a pnp proxy in front of it, both on loopback ports the OS picks.

use std::net::SocketAddr;
use std::time::Duration;

use pnp_config::{Config, UpstreamTarget};
use pnp_demo::{DemoStats, DemoUpstream};
use pnp_proxy::Proxy;

/// The demo upstream (`TestService` and `Generator`) and a proxy in front of it.
#[derive(Debug)]
pub struct Stack {
    /// The gRPC server behind the proxy.
    pub upstream: DemoUpstream,
    /// The proxy under test.
    pub proxy: Proxy,
}

fn loopback_any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

impl Stack {
    /// Upstream and proxy with the default configuration.
    pub async fn start() -> Stack {
        Self::start_with(|_| {}).await
    }

    /// Upstream and proxy; `configure` may change the proxy's configuration (its listener,
    /// admin and upstream are already set to loopback addresses).
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Stack {
        let upstream = DemoUpstream::start(loopback_any_port())
            .await
            .unwrap_or_else(|e| panic!("starting the demo upstream: {e}"));
        let url = upstream_url(upstream.local_addr());
        let proxy = Self::proxy_for(url, configure).await;
        Stack { upstream, proxy }
    }

    /// Only a proxy, in front of `upstream_url` (any upstream: a dead port, a custom server).
    pub async fn proxy_for(upstream_url: url::Url, configure: impl FnOnce(&mut Config)) -> Proxy {
        let mut config = Config::with_upstream(UpstreamTarget::Url(upstream_url));
        config.listener.addr = loopback_any_port();
        config.admin = Some(loopback_any_port());
        configure(&mut config);
        Proxy::start(config)
            .await
            .unwrap_or_else(|e| panic!("starting the proxy: {e}"))
    }

    /// Where clients connect.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy.local_addr()
    }

    /// What the upstream handlers saw.
    pub fn stats(&self) -> DemoStats {
        self.upstream.stats()
    }

    /// Stops the proxy (giving streams `grace` to finish) and then the upstream.
    pub async fn shutdown(self, grace: Duration) {
        self.proxy.shutdown_with_grace(grace).await;
        self.upstream.shutdown().await;
    }
}

/// The `http://` (h2c) URL of an upstream listening on `addr`.
pub fn upstream_url(addr: SocketAddr) -> url::Url {
    url::Url::parse(&format!("http://{addr}"))
        .unwrap_or_else(|e| panic!("upstream URL for {addr}: {e}"))
}
