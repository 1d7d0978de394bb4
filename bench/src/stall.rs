//! Stalled readers, the misbehaving background load of scenario S8: raw HTTP/2 client
//! connections that advertise a zero stream window, open server streams of large replies with a
//! `grpc-timeout`, and never read them.
//!
//! A stalled stream can receive its response headers and its end (trailers or RST_STREAM) but
//! no byte of DATA, because the client never grants window. Whatever the server side sends
//! towards it therefore sits in the peer under test until the peer gives up on the call. Each
//! stream that ends is opened again at once, so the stall lasts as long as [`StalledReaders`]
//! runs. The client records how long each stream stayed open: a peer that runs the call's
//! clock on its own ends them at about the deadline.

use std::collections::{BTreeMap, HashMap};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use http::{HeaderMap, HeaderValue, Request};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::service::{self, Method, Params};

/// The smallest connection window HTTP/2 allows: the initial 65 535 bytes, never raised.
const MIN_CONNECTION_WINDOW: u32 = 65_535;

/// A slot opens its next stream no sooner than this after the previous one: a peer that ends
/// stalled streams at once must not turn the stall into a busy loop of new streams.
const MIN_REOPEN_GAP: Duration = Duration::from_millis(50);

/// What the stalled readers do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StallSpec {
    /// HTTP/2 connections.
    pub connections: usize,
    /// Streams held open on each connection.
    pub streams_per_connection: usize,
    /// Bytes of reply each stream asks the upstream for.
    pub reply_bytes: u64,
    /// Size of each reply message (the reply is `reply_bytes / message_bytes` of them).
    pub message_bytes: u64,
    /// The `grpc-timeout` each stream carries.
    pub deadline: Duration,
}

impl StallSpec {
    /// Streams open at once.
    pub fn streams(&self) -> usize {
        self.connections * self.streams_per_connection
    }

    /// The reply each stream asks for: unpaced [`Method::Tokens`] messages.
    pub fn params(&self) -> Params {
        let message = self.message_bytes.max(1);
        Params {
            count: self.reply_bytes.div_ceil(message).max(1),
            size: message,
            interval_us: 0,
        }
    }
}

/// `grpc-timeout` text for `deadline`: whole seconds as `S`, anything else in milliseconds.
pub fn grpc_timeout(deadline: Duration) -> String {
    if deadline.subsec_nanos() == 0 && deadline.as_secs() < 100_000_000 {
        format!("{}S", deadline.as_secs())
    } else {
        format!("{}m", deadline.as_millis().clamp(1, 99_999_999))
    }
}

/// How a stalled stream ended, as its client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// RST_STREAM (or the connection went away).
    Reset,
    /// End of stream with this `grpc-status` (`u32::MAX`: none or unreadable).
    Status(u32),
}

#[derive(Debug, Default)]
struct Log {
    next_id: u64,
    open: HashMap<u64, Instant>,
    lifetimes: Vec<Duration>,
    opened: u64,
    resets: u64,
    statuses: u64,
    status_codes: BTreeMap<u32, u64>,
    reconnects: u64,
}

type SharedLog = Arc<Mutex<Log>>;

fn lock(log: &SharedLog) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the stalled readers saw, up to [`StalledReaders::stop`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StallReport {
    /// Streams opened (the first ones and every re-open).
    pub opened: u64,
    /// Streams that ended with RST_STREAM.
    pub resets: u64,
    /// Streams that ended with a status (trailers).
    pub statuses: u64,
    /// Those, by `grpc-status` (`u32::MAX`: none or unreadable).
    pub status_codes: BTreeMap<u32, u64>,
    /// Times a connection had to be made again.
    pub reconnects: u64,
    /// How long each ended stream stayed open, sorted.
    pub lifetimes: Vec<Duration>,
    /// The longest any stream stayed open: the ended ones and the age of those still open.
    pub longest_open: Duration,
}

impl StallReport {
    /// A quantile of the lifetimes of the streams that ended, if any did.
    pub fn lifetime_quantile(&self, q: f64) -> Option<Duration> {
        if self.lifetimes.is_empty() {
            return None;
        }
        let rank = ((self.lifetimes.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        self.lifetimes.get(rank).copied()
    }
}

/// Running stalled readers; [`stop`](Self::stop) them to read what they saw.
#[derive(Debug)]
pub struct StalledReaders {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    log: SharedLog,
}

impl StalledReaders {
    /// Connect `spec.connections` connections to `addr` and open every stream; returns once the
    /// connections are up (the streams open in the background).
    pub async fn start(addr: SocketAddr, spec: StallSpec) -> anyhow::Result<Self> {
        let (stop, stopped) = watch::channel(false);
        let log = SharedLog::default();
        let request = request(addr, &spec)?;
        let mut tasks = JoinSet::new();
        for _ in 0..spec.connections {
            let send = connect(addr).await?;
            tasks.spawn(connection(
                addr,
                send,
                request.clone(),
                spec.streams_per_connection,
                stopped.clone(),
                log.clone(),
            ));
        }
        Ok(Self { stop, tasks, log })
    }

    /// Streams open right now.
    pub fn open_now(&self) -> usize {
        lock(&self.log).open.len()
    }

    /// Stop: snapshot what was seen, then reset every stream still open and close the
    /// connections.
    pub async fn stop(mut self) -> StallReport {
        let report = {
            let log = lock(&self.log);
            let now = Instant::now();
            let mut lifetimes = log.lifetimes.clone();
            lifetimes.sort();
            let oldest_open = log
                .open
                .values()
                .map(|opened| now - *opened)
                .max()
                .unwrap_or_default();
            StallReport {
                opened: log.opened,
                resets: log.resets,
                statuses: log.statuses,
                status_codes: log.status_codes.clone(),
                reconnects: log.reconnects,
                longest_open: lifetimes
                    .last()
                    .copied()
                    .unwrap_or_default()
                    .max(oldest_open),
                lifetimes,
            }
        };
        let _ = self.stop.send(true);
        let drained = tokio::time::timeout(Duration::from_secs(2), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
        }
        report
    }
}

/// The request every stalled stream sends (native gRPC, so every peer forwards it).
fn request(addr: SocketAddr, spec: &StallSpec) -> anyhow::Result<Request<()>> {
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(addr.to_string())
        .path_and_query(Method::Tokens.path())
        .build()?;
    let mut request = Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri;
    let headers: &mut HeaderMap = request.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("te", HeaderValue::from_static("trailers"));
    headers.insert(
        "grpc-timeout",
        HeaderValue::from_str(&grpc_timeout(spec.deadline))?,
    );
    spec.params().to_headers(headers);
    Ok(request)
}

/// An HTTP/2 connection that grants no stream window and never raises the connection window.
async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Bytes>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .initial_connection_window_size(MIN_CONNECTION_WINDOW)
        .max_concurrent_reset_streams(1 << 16)
        .handshake::<_, Bytes>(tcp)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Keep `streams` stalled streams open on one connection, reconnecting if it goes away.
async fn connection(
    addr: SocketAddr,
    mut send: SendRequest<Bytes>,
    request: Request<()>,
    streams: usize,
    stopped: watch::Receiver<bool>,
    log: SharedLog,
) {
    loop {
        let mut slots = JoinSet::new();
        for _ in 0..streams {
            slots.spawn(slot(
                send.clone(),
                request.clone(),
                stopped.clone(),
                log.clone(),
            ));
        }
        while slots.join_next().await.is_some() {}
        drop(send);
        if *stopped.borrow() {
            return;
        }
        // The connection failed under the slots: make another, as a client would.
        let mut pause = stopped.clone();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = pause.changed() => return,
        }
        match connect(addr).await {
            Ok(again) => {
                send = again;
                lock(&log).reconnects += 1;
            }
            Err(_) => return,
        }
    }
}

/// One stream at a time, opened again as soon as the previous one ends. Returns when stopped
/// or when the connection can take no more streams.
async fn slot(
    mut send: SendRequest<Bytes>,
    request: Request<()>,
    mut stopped: watch::Receiver<bool>,
    log: SharedLog,
) {
    let mut next_open = Instant::now();
    loop {
        if *stopped.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next_open.into()) => {}
            _ = stopped.changed() => return,
        }
        let ready = tokio::select! {
            ready = poll_fn(|cx| send.poll_ready(cx)) => ready,
            _ = stopped.changed() => return,
        };
        if ready.is_err() {
            return;
        }
        let opened = Instant::now();
        next_open = opened + MIN_REOPEN_GAP;
        let Ok((response, mut body)) = send.send_request(request.clone(), false) else {
            return;
        };
        // The request message: empty (the parameters travel in headers).
        if body.send_data(service::EMPTY_FRAME.clone(), true).is_err() {
            return;
        }
        let id = {
            let mut log = lock(&log);
            let id = log.next_id;
            log.next_id += 1;
            log.opened += 1;
            let _ = log.open.insert(id, opened);
            id
        };
        let end = tokio::select! {
            end = wait_end(response) => Some(end),
            // Dropping the response resets the stream.
            _ = stopped.changed() => None,
        };
        let mut log = lock(&log);
        let _ = log.open.remove(&id);
        let Some(end) = end else { return };
        log.lifetimes.push(opened.elapsed());
        match end {
            End::Reset => log.resets += 1,
            End::Status(code) => {
                log.statuses += 1;
                *log.status_codes.entry(code).or_default() += 1;
            }
        }
    }
}

fn status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Wait for the stream's end without releasing any window: DATA cannot arrive (the window is
/// zero), only the response head, trailers or a reset.
async fn wait_end(response: ResponseFuture) -> End {
    let Ok(response) = response.await else {
        return End::Reset;
    };
    let head_status = status(response.headers());
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        if chunk.is_err() {
            return End::Reset;
        }
        // Held, never released: a stalled reader grants no window.
    }
    match body.trailers().await {
        Ok(trailers) => End::Status(
            trailers
                .as_ref()
                .and_then(status)
                .or(head_status)
                .unwrap_or(u32::MAX),
        ),
        Err(_) => End::Reset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_text() {
        assert_eq!(grpc_timeout(Duration::from_secs(2)), "2S");
        assert_eq!(grpc_timeout(Duration::from_millis(250)), "250m");
        assert_eq!(grpc_timeout(Duration::ZERO), "0S");
    }

    #[test]
    fn params_cover_the_reply() {
        let spec = StallSpec {
            connections: 8,
            streams_per_connection: 8,
            reply_bytes: 2 << 20,
            message_bytes: 64 << 10,
            deadline: Duration::from_secs(2),
        };
        assert_eq!(spec.streams(), 64);
        assert_eq!(spec.params().count, 32);
        assert_eq!(spec.params().size, 64 << 10);
    }

    #[test]
    fn lifetime_quantiles() {
        let report = StallReport {
            lifetimes: vec![Duration::from_millis(1), Duration::from_millis(2)],
            ..StallReport::default()
        };
        assert_eq!(
            report.lifetime_quantile(0.0),
            Some(Duration::from_millis(1))
        );
        assert_eq!(
            report.lifetime_quantile(1.0),
            Some(Duration::from_millis(2))
        );
        assert_eq!(StallReport::default().lifetime_quantile(0.5), None);
    }
}
