//! What the public API is when pnp-ucx is built without the `ucx` feature: the same types,
//! whose constructors fail with "built without UCX", so the proxy compiles either way.
#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use pnp_call::{Call, Part, Reply, Status};
use pnp_transport::{BoxFuture, Capabilities, Estimate, Kind, Transport, TransportError};

use crate::options::UcxOptions;

/// No value: the types below cannot be made without UCX.
#[derive(Clone, Copy, Debug)]
enum Never {}

fn unavailable() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "pnp was built without UCX (cargo feature `ucx` of pnp-ucx)",
    )
}

/// pnp's egress transport over UCX. This build has no UCX: [`UcxTransport::new`] fails.
#[derive(Clone, Debug)]
pub struct UcxTransport(Never);

impl UcxTransport {
    /// Fails: built without UCX.
    pub fn new(_peer: impl Into<String>, _options: UcxOptions) -> io::Result<Self> {
        Err(unavailable())
    }
}

impl Transport for UcxTransport {
    fn kind(&self) -> Kind {
        Kind::Ucx
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::FULL
    }

    fn ready(&self) -> BoxFuture<Result<(), TransportError>> {
        match self.0 {}
    }

    fn call(&self, _call: Call) -> BoxFuture<Result<Reply, TransportError>> {
        match self.0 {}
    }

    fn estimate(&self) -> Estimate {
        match self.0 {}
    }
}

/// One call that arrived over UCX. This build has no UCX: none ever arrives.
#[derive(Debug)]
pub struct IncomingCall {
    /// The call.
    pub call: Call,
    /// Where the reply goes.
    pub reply: ReplySink,
    /// The peer's side-channel address.
    pub peer: SocketAddr,
}

/// Where the handler of an incoming call sends its reply.
#[derive(Debug)]
pub struct ReplySink(Never);

impl ReplySink {
    /// Resolves when the client cancelled.
    pub async fn cancelled(&self) {
        match self.0 {}
    }

    /// Whether the call is over.
    pub fn is_cancelled(&self) -> bool {
        match self.0 {}
    }

    /// Send the reply.
    pub async fn send(self, _reply: Result<Reply, TransportError>) {
        match self.0 {}
    }
}

/// The request messages of an incoming call.
#[derive(Debug)]
pub struct RequestMessages(Never);

impl Stream for RequestMessages {
    type Item = Result<Part, Status>;

    fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.0 {}
    }
}

/// Accepts UCX connections. This build has no UCX: [`UcxListener::bind`] fails.
#[derive(Debug)]
pub struct UcxListener(Never);

impl UcxListener {
    /// Fails: built without UCX.
    pub async fn bind(_addr: SocketAddr, _options: UcxOptions) -> io::Result<UcxListener> {
        Err(unavailable())
    }

    /// The side channel's address.
    pub fn local_addr(&self) -> SocketAddr {
        match self.0 {}
    }

    /// The next incoming call.
    pub async fn accept(&mut self) -> Option<IncomingCall> {
        match self.0 {}
    }

    /// Start a graceful shutdown.
    pub fn drain(&self) {
        match self.0 {}
    }
}
