//! The client side: [`UcxTransport`], pnp's egress transport to a peer pnp's
//! [`UcxListener`](crate::UcxListener).
#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use pnp_call::{Call, Code, Reply, Status};
use pnp_transport::{
    Blame, BoxFuture, Capabilities, Estimate, Kind, Meter, Transport, TransportError,
};
use tokio::sync::oneshot;

use crate::driver::{self, Attached, Command, DriverOwner, Slot};
use crate::frame::Frame;
use crate::options::UcxOptions;
use crate::stream::{pump_requests, send_ready, PartSender, ReplyItems};

/// pnp's egress transport over UCX to a peer pnp's [`UcxListener`](crate::UcxListener)
/// (`ucx://host:port`): one connection (made on the first call, again after it died, by one
/// attempt that concurrent calls share) carries every call, multiplexed by call id.
///
/// The UCX worker runs on a thread of its own; this handle is `Send + Sync` and cheap to
/// clone. Dropping the reply, its item stream or the pending call future cancels the call at
/// the peer. A lost peer ends every call it carried UNAVAILABLE (see [`UcxOptions::keepalive`]).
#[derive(Clone)]
pub struct UcxTransport {
    inner: Arc<Inner>,
}

struct Inner {
    peer: String,
    options: UcxOptions,
    owner: DriverOwner,
    conn: tokio::sync::Mutex<ConnSlot>,
    /// The next call id. Taken and the open frame queued under this lock, so a connection
    /// sees its calls open in id order (a go-away names the last one served).
    next_call: std::sync::Mutex<u64>,
    meter: Arc<Meter>,
}

/// The shared connection, and the last failed attempt (which calls that waited for it share).
#[derive(Default)]
struct ConnSlot {
    conn: Option<Attached>,
    failed: Option<(Instant, TransportError)>,
}

impl fmt::Debug for UcxTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UcxTransport")
            .field("peer", &self.inner.peer)
            .finish_non_exhaustive()
    }
}

impl UcxTransport {
    /// A transport to the listener whose side channel is at `peer` (`host:port`). Starts the
    /// UCX worker thread (UCX configured from `options.tuning`; this blocks for UCX's
    /// initialisation, tens of milliseconds: call it at start-up or from `spawn_blocking`);
    /// connects on the first call or [`ready`](Transport::ready). Fails if UCX cannot start
    /// (a bad setting, no usable transport).
    pub fn new(peer: impl Into<String>, options: UcxOptions) -> io::Result<Self> {
        let (owner, _) = driver::start(options.clone(), None)?;
        Ok(Self {
            inner: Arc::new(Inner {
                peer: peer.into(),
                options,
                owner,
                conn: tokio::sync::Mutex::default(),
                next_call: std::sync::Mutex::new(1),
                meter: Meter::new(),
            }),
        })
    }
}

/// The peer could not be reached: nothing was sent, a retry is safe.
fn unreachable_peer(message: String) -> TransportError {
    TransportError {
        status: Box::new(Status::new(
            Code::Unavailable,
            format!("UCX upstream connection failed: {message}"),
        )),
        blame: Blame::Upstream,
        unprocessed: true,
    }
}

impl Inner {
    async fn connection(&self) -> Result<Attached, TransportError> {
        let asked = Instant::now();
        let mut slot = self.conn.lock().await;
        if let Some(conn) = &slot.conn {
            // A draining connection finishes its calls; new ones go over a new connection.
            if !conn.dead.is_cancelled() && !conn.draining.is_cancelled() {
                return Ok(conn.clone());
            }
            slot.conn = None;
        }
        if let Some((at, err)) = &slot.failed {
            if *at >= asked {
                return Err(err.clone());
            }
        }
        let (reply, answer) = oneshot::channel();
        self.owner.handle.send(Command::Connect {
            peer: self.peer.clone(),
            reply,
        });
        let limit = self.options.connect_timeout + std::time::Duration::from_millis(500);
        let result = match tokio::time::timeout(limit, answer).await {
            Ok(Ok(Ok(attached))) => Ok(attached),
            Ok(Ok(Err(e))) => Err(unreachable_peer(e)),
            Ok(Err(_)) => Err(unreachable_peer("the UCX thread stopped".into())),
            Err(_) => Err(unreachable_peer(format!(
                "no UCX connection to {} within {:?}",
                self.peer, self.options.connect_timeout
            ))),
        };
        match result {
            Ok(attached) => {
                slot.failed = None;
                slot.conn = Some(attached.clone());
                Ok(attached)
            }
            Err(err) => {
                slot.failed = Some((Instant::now(), err.clone()));
                Err(err)
            }
        }
    }

    /// Register a call on `conn` and queue its open frame: its request sender and reply items.
    fn open(&self, conn: &Attached, head: pnp_call::CallHead) -> (PartSender, ReplyItems) {
        let mut next_call = self
            .next_call
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = *next_call;
        *next_call += 1;
        let (slot, rx) = Slot::new(conn.peer_window);
        let sender = PartSender {
            driver: self.owner.handle.clone(),
            conn: conn.conn,
            call: id,
            credit: slot.credit.clone(),
            done: slot.done.clone(),
            max_fragment: self.options.fragment_for(conn.peer_window),
            request: true,
        };
        // Dropped unfinished (the call future dropped before the head), it cancels the call.
        let items = ReplyItems::new(
            rx,
            self.owner.handle.clone(),
            conn.conn,
            id,
            self.options.call_window,
        );
        self.owner.handle.send(Command::Open {
            conn: conn.conn,
            call: id,
            head,
            slot,
        });
        (sender, items)
    }

    async fn call(self: Arc<Self>, call: Call) -> Result<Reply, TransportError> {
        let conn = self.connection().await?;
        let (sender, mut items) = self.open(&conn, call.head);
        if let Some(rest) = send_ready(call.messages, &sender) {
            tokio::spawn(pump_requests(rest, sender));
        }
        match items.recv().await {
            Some(Ok(Frame::ResponseHead { head, .. })) => Ok(Reply::Stream {
                head,
                items: Box::pin(items),
            }),
            Some(Ok(Frame::Status { status, .. })) => {
                items.finish();
                Ok(Reply::TrailersOnly(status))
            }
            Some(Ok(_)) => Err(TransportError::upstream(
                Code::Internal,
                "UCX peer answered with an unexpected frame",
            )),
            Some(Err(status)) => {
                items.finish();
                Err(TransportError {
                    unprocessed: status.message == driver::NOT_SENT,
                    status,
                    blame: Blame::Upstream,
                })
            }
            None => {
                items.finish();
                Err(TransportError::upstream(
                    Code::Unavailable,
                    "the UCX transport shut down",
                ))
            }
        }
    }
}

impl tower::Service<Call> for UcxTransport {
    type Response = Reply;
    type Error = TransportError;
    type Future = BoxFuture<Result<Reply, TransportError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        Transport::call(self, call)
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
        let inner = self.inner.clone();
        Box::pin(async move { inner.connection().await.map(drop) })
    }

    fn call(&self, call: Call) -> BoxFuture<Result<Reply, TransportError>> {
        let inner = self.inner.clone();
        self.inner.meter.measure(inner.call(call))
    }

    fn estimate(&self) -> Estimate {
        self.inner.meter.estimate()
    }
}
