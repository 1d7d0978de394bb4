//! A cluster pnp in a process of its own, in front of the demo upstreams it starts itself: what
//! the network-namespace tests run inside the namespace (`ip netns exec NS interop-cluster …`),
//! so the edge pnp in the test reaches it over a veth pair whose packets nftables can drop.
//!
//! Usage: `interop-cluster IP CERT KEY`. Listens with TLS on `IP:0` over TCP (HTTP/2 and
//! HTTP/1.1) and QUIC (HTTP/3), the demo upstream on `127.0.0.1:0`; with
//! `PNP_CLUSTER_UCX=1` also for UCX peers on `IP:0` (UCX over TCP on `lo`); prints
//! `listening tcp=PORT udp=PORT [ucx=PORT]` on stdout once it serves, then serves until killed.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use pnp_config::{Config, H3Listener, TlsFiles, UpstreamTarget};
use pnp_demo::DemoUpstream;
use pnp_proxy::Proxy;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [ip, cert, key] = args.as_slice() else {
        eprintln!("usage: interop-cluster IP CERT KEY");
        return ExitCode::from(2);
    };
    let ip: IpAddr = match ip.parse() {
        Ok(ip) => ip,
        Err(e) => {
            eprintln!("interop-cluster: bad address {ip:?}: {e}");
            return ExitCode::from(2);
        }
    };
    let upstream = match DemoUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0))).await {
        Ok(upstream) => upstream,
        Err(e) => {
            eprintln!("interop-cluster: demo upstream: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = match url::Url::parse(&format!("http://{}", upstream.local_addr())) {
        Ok(url) => url,
        Err(e) => {
            eprintln!("interop-cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = Config::with_upstream(UpstreamTarget::Url(url));
    config.listener.addr = SocketAddr::new(ip, 0);
    config.listener.tls = Some(TlsFiles {
        cert: PathBuf::from(cert),
        key: PathBuf::from(key),
    });
    config.listener.h3 = Some(H3Listener::new(SocketAddr::new(ip, 0)));
    config.admin = None;
    if std::env::var_os("PNP_CLUSTER_UCX").is_some_and(|v| v == "1") {
        config.listener.ucx = Some(pnp_config::UcxListener {
            addr: SocketAddr::new(ip, 0),
            settings: pnp_config::UcxSettings {
                tls: Some("tcp".into()),
                net_devices: Some("lo".into()),
                ..pnp_config::UcxSettings::default()
            },
        });
    }
    let proxy = match Proxy::start(config).await {
        Ok(proxy) => proxy,
        Err(e) => {
            eprintln!("interop-cluster: starting pnp: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(udp) = proxy.local_h3_addr() else {
        eprintln!("interop-cluster: no HTTP/3 listener");
        return ExitCode::FAILURE;
    };
    let mut stdout = std::io::stdout().lock();
    let ucx = proxy
        .local_ucx_addr()
        .map(|addr| format!(" ucx={}", addr.port()))
        .unwrap_or_default();
    if writeln!(
        stdout,
        "listening tcp={} udp={}{ucx}",
        proxy.local_addr().port(),
        udp.port()
    )
    .and_then(|()| stdout.flush())
    .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(stdout);
    // Runs until killed; the test that started it kills it.
    std::future::pending::<()>().await;
    drop(proxy);
    drop(upstream);
    ExitCode::SUCCESS
}
