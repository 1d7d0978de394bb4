//! What the listener tells the ingress about the connection a request came on, as request
//! extensions.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

/// The client's address (the TCP peer of the connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerAddr(pub(crate) SocketAddr);

/// Fired by the proxy when it has ended a call whose status the client is not reading: the
/// connection layer then resets the client's stream (HTTP/2 `RST_STREAM(CANCEL)`) or closes the
/// connection (HTTP/1.1, which carries one call at a time).
#[derive(Clone, Debug)]
pub(crate) struct ClientReset(pub(crate) CancellationToken);
