//! The server side: [`UcxListener`], where a peer pnp's [`UcxTransport`](crate::UcxTransport)
//! connects, and the calls it yields.
#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;

use tokio::sync::mpsc;

use crate::driver::{self, DriverOwner};
use crate::options::UcxOptions;
pub use crate::stream::{ReplySink, RequestMessages};

/// One call that arrived over UCX: the call as the call model has it (head and request
/// messages, a [`RequestMessages`] stream) and where its reply goes.
///
/// Nothing here enforces the call's deadline (`call.head.timeout`, the time left when the
/// edge sent it) or limits how many calls a peer opens: that is the proxy's call core, as for
/// every other ingress. Each call's memory is bounded by its flow-control windows.
#[derive(Debug)]
pub struct IncomingCall {
    /// Head (path, subtype, metadata, time left, largest message) and request messages. The
    /// message stream yields `Err(CANCELLED)` if the client cancels, `Err(UNAVAILABLE)` if its
    /// connection is lost.
    pub call: pnp_call::Call,
    /// Where the reply goes.
    pub reply: ReplySink,
    /// The peer's side-channel address.
    pub peer: SocketAddr,
}

/// Accepts UCX connections from peer pnp instances and yields their calls.
///
/// It listens on a TCP address (the side channel where a peer's
/// [`UcxTransport`](crate::UcxTransport) says hello and both exchange UCX worker addresses); the calls
/// themselves then travel over whatever UCX picked: RDMA, shared memory or TCP.
///
/// **Plugging it into the proxy** (`--listen-ucx ADDR`): run a task that loops on
/// [`accept`](Self::accept) and, for each [`IncomingCall`], spawns the call through the same
/// path a gRPC request takes (profile, admission, deadline from `call.head.timeout`, guarded
/// upstream) and hands what the upstream transport returned to
/// [`ReplySink::send`]; select on [`ReplySink::cancelled`] to drop the upstream call when the
/// edge cancels (dropping the reply does it too). The simplest first step is to call the
/// proxy's upstream `Transport` directly: `reply.send(upstream.call(call).await).await`.
/// On shutdown, [`drain`](Self::drain) first, wait for the calls in flight (the proxy's own
/// drain), then drop the listener: that ends whatever is left UNAVAILABLE.
#[derive(Debug)]
pub struct UcxListener {
    local_addr: SocketAddr,
    incoming: mpsc::UnboundedReceiver<crate::IncomingCall>,
    _owner: DriverOwner,
}

impl UcxListener {
    /// Listen for peers on `addr` (port 0 picks one), with UCX configured from
    /// `options.tuning`.
    pub async fn bind(addr: SocketAddr, options: UcxOptions) -> io::Result<UcxListener> {
        let (tx, incoming) = mpsc::unbounded_channel();
        // Starting the worker thread blocks briefly (UCX initialisation): not on the runtime.
        let (owner, bound) =
            tokio::task::spawn_blocking(move || driver::start(options, Some((addr, tx))))
                .await
                .map_err(io::Error::other)??;
        Ok(UcxListener {
            local_addr: bound.unwrap_or(addr),
            incoming,
            _owner: owner,
        })
    }

    /// The side channel's address (with the port chosen when binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next incoming call; `None` once the listener drains or its thread has stopped.
    pub async fn accept(&mut self) -> Option<IncomingCall> {
        self.incoming.recv().await
    }

    /// Start a graceful shutdown: the side channel stops accepting connections, every peer is
    /// told (a go-away frame naming the last call served) to open new calls elsewhere, calls
    /// the peer opened meanwhile end at the peer `UNAVAILABLE` and safe to retry, and
    /// [`accept`](Self::accept) returns `None` once the calls already accepted are taken. The
    /// calls in flight go on; drop the listener when they are done (or the grace period is
    /// over: that ends the rest `UNAVAILABLE`).
    pub fn drain(&self) {
        self._owner.handle.send(crate::driver::Command::Drain);
    }
}
