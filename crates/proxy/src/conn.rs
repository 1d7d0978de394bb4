//! What the listener tells the ingress about the connection a request came on, as request
//! extensions.

use std::net::SocketAddr;

/// The client's address (the TCP peer of the connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerAddr(pub(crate) SocketAddr);
