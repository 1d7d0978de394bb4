//! A control API client over mTLS (what `pnp ctl` and the tests use).

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::control_client::ControlClient;
use crate::tls::{ClientTls, TlsError};

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TLS material.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The address.
    #[error("bad control API address {0:?}: expected host:port")]
    Address(String),
    /// The connection (TCP, TLS handshake, HTTP/2).
    #[error("connecting to {addr}: {source}")]
    Transport {
        /// The address.
        addr: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// Connects to the control API at `addr` (`host:port`, or `https://host:port`) over mTLS.
pub async fn connect(addr: &str, tls: &ClientTls) -> Result<ControlClient<Channel>, ConnectError> {
    let authority = addr
        .strip_prefix("https://")
        .unwrap_or(addr)
        .trim_end_matches('/')
        .to_owned();
    // The connector does TLS itself; the URI only names the authority.
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|_| ConnectError::Address(addr.to_owned()))?;
    let connector = TlsConnector::from(Arc::new(tls.client_config()?));
    let server_name = tls.server_name()?;
    let tcp_addr = authority.clone();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let tcp_addr = tcp_addr.clone();
            async move {
                let tcp = TcpStream::connect(&tcp_addr).await?;
                let _ = tcp.set_nodelay(true);
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|source| ConnectError::Transport {
            addr: addr.to_owned(),
            source,
        })?;
    Ok(ControlClient::new(channel))
}
