//! The transport layer: what every egress transport offers the call core.
//!
//! A transport carries calls of the call model ([`pnp_call::Call`] in, [`Reply`] out) to the
//! next hop over one protocol. The call core (profile, admission, clocks, retries, the reply
//! driver) sees only this trait, so it neither knows nor cares whether a call went over HTTP/2,
//! chunked HTTP/1.1, HTTP/3 or UCX, and the negotiation engine can pick among several
//! transports to one peer:
//!
//! - [`ready`](Transport::ready) is separate from [`call`](Transport::call): it makes or checks a
//!   connection without touching any call, so a transport that cannot connect within a budget is
//!   skipped with the request still unread.
//! - **Cancel** is dropping: a transport resets the call's stream (HTTP/2 `RST_STREAM`, HTTP/3
//!   `RESET_STREAM` + `STOP_SENDING`, HTTP/1.1 closes the connection) when the [`Reply`], its
//!   item stream or the pending call future is dropped before the call ended. A request that
//!   was cut short is never finished cleanly upstream.
//! - [`estimate`](Transport::estimate) reports what the transport has seen of the path
//!   (response-head latency, bandwidth of large transfers), measured by a [`Meter`] from the
//!   calls it carried.
//! - [`capabilities`](Transport::capabilities) says which calls it can carry.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_core::Stream;
use pnp_call::{BoxReplyStream, Call, Reply, ReplyItem};

use crate::TransportError;

/// A boxed future as transports return them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A transport shared by every call that may use it.
pub type SharedTransport = Arc<dyn Transport>;

/// The protocols pnp carries calls over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// gRPC over HTTP/2 (cleartext h2c or TLS).
    H2,
    /// gRPC-Web binary over HTTP/1.1 with chunked transfer encoding.
    H1,
    /// gRPC over HTTP/3 (QUIC).
    H3,
    /// pnp's call framing over UCX (RDMA, shared memory, TCP).
    Ucx,
}

impl Kind {
    /// The name used in `x-pnp-transport`, metric labels, logs and config (`h2`, `h1`, `h3`,
    /// `ucx`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::H2 => "h2",
            Kind::H1 => "h1",
            Kind::H3 => "h3",
            Kind::Ucx => "ucx",
        }
    }

    /// The kind an upstream URL's scheme selects: `http`/`https` (HTTP/2), `h1`, `h3`, `ucx`.
    pub fn from_scheme(scheme: &str) -> Option<Kind> {
        match scheme {
            "http" | "https" | "h2" | "h2c" => Some(Kind::H2),
            "h1" | "h1s" => Some(Kind::H1),
            "h3" => Some(Kind::H3),
            "ucx" => Some(Kind::Ucx),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a transport can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Requests of more than one message (client streaming). Over HTTP/1.1 a request body
    /// still streams, but gRPC-Web servers and middleboxes commonly read it whole first.
    pub client_streaming: bool,
    /// Request and reply messages interleaved (bidirectional streaming): the reply may start,
    /// and go on, while the request is still being sent.
    pub full_duplex: bool,
    /// Many calls share one connection.
    pub multiplexed: bool,
    /// The largest message it carries (4 GiB − 1 for gRPC framing).
    pub max_message_size: u64,
}

impl Capabilities {
    /// Everything gRPC allows: HTTP/2, HTTP/3, UCX.
    pub const FULL: Capabilities = Capabilities {
        client_streaming: true,
        full_duplex: true,
        multiplexed: true,
        max_message_size: u32::MAX as u64,
    };
}

/// What a transport has measured of its path.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Estimate {
    /// Smoothed time from sending a request to its response head (RFC 6298's SRTT filter): the
    /// round trip plus the upstream's time to answer, so an upper bound of the RTT.
    pub head_latency: Option<Duration>,
    /// The round-trip time the protocol itself measures, where it does (QUIC, from its
    /// acknowledgements).
    pub rtt: Option<Duration>,
    /// Smoothed throughput of large replies (at least [`Meter::BULK_BYTES`]), bytes per second.
    pub bandwidth: Option<f64>,
    /// Calls that got a reply.
    pub calls: u64,
    /// Calls that failed before a reply (connect errors, resets, refused streams).
    pub failures: u64,
}

/// An egress transport. See the module documentation.
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// The protocol.
    fn kind(&self) -> Kind;

    /// Which calls it can carry.
    fn capabilities(&self) -> Capabilities;

    /// Resolves once the transport can start a call without connecting first (a connection is
    /// up, or was just made), or fails the way a call would. Touches no call: the caller bounds
    /// it with its own budget and moves on to another transport if it runs out.
    fn ready(&self) -> BoxFuture<Result<(), TransportError>>;

    /// Carry one call. The request parts are read as the transport sends them; the reply's
    /// items arrive as they come. Dropping the future or the reply cancels the call upstream.
    fn call(&self, call: Call) -> BoxFuture<Result<Reply, TransportError>>;

    /// What it has measured so far.
    fn estimate(&self) -> Estimate;
}

/// Measures the calls of one transport for its [`Estimate`].
#[derive(Debug, Default)]
pub struct Meter {
    state: Mutex<Estimate>,
}

impl Meter {
    /// Replies shorter than this say nothing about bandwidth (they are all latency).
    pub const BULK_BYTES: u64 = 1 << 20;

    /// A meter with nothing measured.
    pub fn new() -> Arc<Meter> {
        Arc::new(Meter::default())
    }

    /// What has been measured.
    pub fn estimate(&self) -> Estimate {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Estimate> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A call got its response head `latency` after it was sent.
    pub fn head(&self, latency: Duration) {
        let mut state = self.lock();
        state.calls += 1;
        state.head_latency = Some(match state.head_latency {
            None => latency,
            // SRTT = 7/8 SRTT + 1/8 sample.
            Some(srtt) => (srtt * 7 + latency) / 8,
        });
    }

    /// A call failed before its reply.
    pub fn failure(&self) {
        self.lock().failures += 1;
    }

    /// A reply carried `bytes` of payload in `elapsed` (from its head to its end).
    pub fn transfer(&self, bytes: u64, elapsed: Duration) {
        if bytes < Self::BULK_BYTES || elapsed.is_zero() {
            return;
        }
        let sample = bytes as f64 / elapsed.as_secs_f64();
        let mut state = self.lock();
        state.bandwidth = Some(match state.bandwidth {
            None => sample,
            Some(smoothed) => smoothed * 0.75 + sample * 0.25,
        });
    }

    /// Run `call` and measure it: the time to its reply, a failure, and the payload its reply
    /// stream carries until it ends.
    pub fn measure(
        self: &Arc<Self>,
        call: impl Future<Output = Result<Reply, TransportError>> + Send + 'static,
    ) -> BoxFuture<Result<Reply, TransportError>> {
        let meter = self.clone();
        Box::pin(async move {
            let sent = Instant::now();
            match call.await {
                Ok(Reply::Stream { head, items }) => {
                    let now = Instant::now();
                    meter.head(now - sent);
                    Ok(Reply::Stream {
                        head,
                        items: Box::pin(Metered {
                            items,
                            meter,
                            started: now,
                            bytes: 0,
                        }),
                    })
                }
                Ok(reply) => {
                    meter.head(sent.elapsed());
                    Ok(reply)
                }
                Err(e) => {
                    meter.failure();
                    Err(e)
                }
            }
        })
    }
}

/// A reply stream that reports its payload to a [`Meter`] when it ends.
struct Metered {
    items: BoxReplyStream,
    meter: Arc<Meter>,
    started: Instant,
    bytes: u64,
}

impl Stream for Metered {
    type Item = ReplyItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ReplyItem>> {
        let item = std::task::ready!(self.items.as_mut().poll_next(cx));
        match &item {
            Some(ReplyItem::Message(m)) => self.bytes += m.data.len() as u64,
            Some(ReplyItem::Fragment { data, .. }) => self.bytes += data.len() as u64,
            Some(ReplyItem::Status(_)) | None => {
                let (bytes, elapsed) = (self.bytes, self.started.elapsed());
                self.bytes = 0;
                self.meter.transfer(bytes, elapsed);
            }
            Some(ReplyItem::Head { .. }) => {}
        }
        Poll::Ready(item)
    }
}

/// Any `tower::Service` over the call model as a [`Transport`] that is always ready (tests,
/// in-process upstreams).
pub struct ServiceTransport<S> {
    kind: Kind,
    service: S,
    meter: Arc<Meter>,
}

impl<S> ServiceTransport<S> {
    /// `service` presented as a transport of `kind`.
    pub fn new(kind: Kind, service: S) -> Self {
        Self {
            kind,
            service,
            meter: Meter::new(),
        }
    }
}

impl<S> fmt::Debug for ServiceTransport<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceTransport")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl<S> Transport for ServiceTransport<S>
where
    S: tower::Service<Call, Response = Reply, Error = TransportError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    fn kind(&self) -> Kind {
        self.kind
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::FULL
    }

    fn ready(&self) -> BoxFuture<Result<(), TransportError>> {
        Box::pin(async { Ok(()) })
    }

    fn call(&self, call: Call) -> BoxFuture<Result<Reply, TransportError>> {
        use tower::ServiceExt as _;
        self.meter.measure(self.service.clone().oneshot(call))
    }

    fn estimate(&self) -> Estimate {
        self.meter.estimate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures_util::StreamExt;
    use pnp_call::{Code, Message, ResponseHead, Status};

    #[test]
    fn kinds_round_trip_through_their_scheme_names() {
        for kind in [Kind::H2, Kind::H1, Kind::H3, Kind::Ucx] {
            assert_eq!(Kind::from_scheme(kind.name()), Some(kind));
        }
        assert_eq!(Kind::from_scheme("https"), Some(Kind::H2));
        assert_eq!(Kind::from_scheme("ftp"), None);
    }

    #[test]
    fn head_latency_is_smoothed_and_small_replies_say_nothing_of_bandwidth() {
        let meter = Meter::default();
        meter.head(Duration::from_millis(8));
        meter.head(Duration::from_millis(16));
        assert_eq!(
            meter.estimate().head_latency,
            Some(Duration::from_millis(9))
        );
        meter.transfer(1000, Duration::from_millis(1));
        assert_eq!(meter.estimate().bandwidth, None);
        meter.transfer(4 << 20, Duration::from_secs(1));
        assert_eq!(meter.estimate().bandwidth, Some((4 << 20) as f64));
        assert_eq!(meter.estimate().calls, 2);
    }

    #[tokio::test]
    async fn a_measured_call_counts_its_reply_bytes_and_failures() {
        let meter = Meter::new();
        let chunk = Bytes::from(vec![7u8; 1 << 20]);
        let items: Vec<ReplyItem> = vec![
            ReplyItem::Message(Message::new(chunk.clone())),
            ReplyItem::Message(Message::new(chunk)),
            ReplyItem::Status(Status::new(Code::Ok, "")),
        ];
        let reply = meter
            .measure(async move {
                Ok(Reply::Stream {
                    head: ResponseHead::default(),
                    items: Box::pin(futures_util::stream::iter(items)),
                })
            })
            .await;
        let Ok(Reply::Stream { mut items, .. }) = reply else {
            panic!("a stream")
        };
        let mut n = 0;
        while items.next().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
        let estimate = meter.estimate();
        assert_eq!(estimate.calls, 1);
        assert!(estimate.bandwidth.is_some_and(|b| b > 0.0));

        let failed = meter
            .measure(async { Err(TransportError::upstream(Code::Unavailable, "down")) })
            .await;
        assert!(failed.is_err());
        assert_eq!(meter.estimate().failures, 1);
    }
}
