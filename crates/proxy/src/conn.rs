//! What the listener tells the ingress about the connection a request came on, as request
//! extensions.

use std::net::SocketAddr;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// The client's address (the TCP peer of the connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerAddr(pub(crate) SocketAddr);

/// Fired by the proxy when it has ended a call whose status the client is not reading: the
/// connection layer then resets the client's stream (HTTP/2 `RST_STREAM(CANCEL)`) or closes the
/// connection (HTTP/1.1, which carries one call at a time).
#[derive(Clone, Debug, Default)]
pub(crate) struct ClientReset {
    /// Cancelled to reset.
    pub(crate) token: CancellationToken,
    /// Set while the connection waits for the client to open its window for this stream
    /// (HTTP/2 only): then nothing more can reach the client, and an ended call's stream is
    /// reset at once instead of after a grace period.
    pub(crate) stalled: Arc<AtomicBool>,
}

impl ClientReset {
    /// A signal around an existing token (HTTP/1.1: the connection's).
    pub(crate) fn with_token(token: CancellationToken) -> Self {
        Self {
            token,
            stalled: Arc::default(),
        }
    }

    /// Whether the client has no window for what waits to be written.
    pub(crate) fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }
}
