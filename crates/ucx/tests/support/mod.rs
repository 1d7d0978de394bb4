//! An echo service behind a real `UcxListener`, in this process or in a child process (the
//! test binary run again), and helpers to make and read calls.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{stream, StreamExt};
use http::{HeaderMap, HeaderValue};
use pnp_call::{Call, CallHead, Code, Message, Part, Reply, ReplyItem, ResponseHead, Status};
use pnp_ucx::{IncomingCall, UcxListener, UcxOptions, UcxTuning};
use tokio::sync::mpsc;

/// What the echo service saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Calls whose client cancelled (or whose connection was lost) while they ran.
    pub cancelled: AtomicUsize,
}

/// UCX options for `tls` (`tcp` on loopback, or `sm`).
pub fn options(tls: &str) -> UcxOptions {
    let tuning = if tls == "tcp" {
        UcxTuning::loopback_tcp()
    } else {
        UcxTuning {
            tls: Some(tls.to_owned()),
            ..UcxTuning::default()
        }
    };
    let mut options = UcxOptions::with_tuning(tuning);
    // Measurement knobs (bytes), e.g. to compare windows in a release run; unset in CI.
    let knob = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    if let Some(window) = knob("PNP_UCX_TEST_WINDOW") {
        options.call_window = window;
    }
    if let Some(fragment) = knob("PNP_UCX_TEST_FRAGMENT") {
        options.max_fragment = fragment;
    }
    if let Some(micros) = knob("PNP_UCX_TEST_BUSY_POLL_US") {
        options.busy_poll = Duration::from_micros(micros.into());
    }
    options
}

/// Start the echo service in this process.
pub async fn serve(tls: &str) -> (SocketAddr, Arc<Seen>) {
    let listener = UcxListener::bind("127.0.0.1:0".parse().expect("addr"), options(tls))
        .await
        .expect("bind the UCX listener");
    let addr = listener.local_addr();
    let seen = Arc::new(Seen::default());
    tokio::spawn(accept(listener, seen.clone()));
    (addr, seen)
}

async fn accept(mut listener: UcxListener, seen: Arc<Seen>) {
    while let Some(incoming) = listener.accept().await {
        tokio::spawn(handle(incoming, seen.clone()));
    }
}

/// The echo service:
/// - `/test.Echo/Echo`: every request part back as it comes, then OK with a trailer;
/// - `/test.Echo/Count`: one reply message with the request's message count and bytes;
/// - `/test.Echo/Repeat`: the request's one message (a decimal N) back N times;
/// - `/test.Echo/Forever`: a message every 10 ms until cancelled;
/// - `/test.Echo/Hang`: nothing until cancelled;
/// - `/test.Echo/Fail`: trailers-only NOT_FOUND.
pub async fn handle(incoming: IncomingCall, seen: Arc<Seen>) {
    let IncomingCall { call, reply, .. } = incoming;
    let mut head = ResponseHead::default();
    head.metadata
        .insert("x-echo", HeaderValue::from_static("yes"));
    // What the head carried: the time left and the request id.
    if let Some(timeout) = call.head.timeout {
        head.metadata.insert(
            "x-timeout-ms",
            HeaderValue::from(timeout.as_millis() as u64),
        );
    }
    if let Some(id) = call.head.metadata.get("x-request-id") {
        head.metadata.insert("x-seen-request-id", id.clone());
    }
    head.subtype = call.head.subtype.clone();
    let mut messages = call.messages;
    match call.head.path.path() {
        "/test.Echo/Echo" => {
            let items = stream::unfold(Some(messages), |state| async move {
                let mut messages = state?;
                match messages.next().await {
                    Some(Ok(part)) => Some((ReplyItem::from(part), Some(messages))),
                    Some(Err(status)) => Some((ReplyItem::Status(status), None)),
                    None => {
                        let mut ok = Status::ok();
                        ok.metadata
                            .insert("x-trailer", HeaderValue::from_static("done"));
                        Some((ReplyItem::Status(ok), None))
                    }
                }
            });
            reply
                .send(Ok(Reply::Stream {
                    head,
                    items: Box::pin(items),
                }))
                .await;
        }
        "/test.Echo/Count" => {
            let (mut count, mut bytes) = (0u64, 0u64);
            while let Some(part) = messages.next().await {
                match part {
                    Ok(part) => {
                        count += u64::from(part.starts_message());
                        bytes += part.payload_len() as u64;
                    }
                    Err(status) => return reply.send(Ok(Reply::TrailersOnly(status))).await,
                }
            }
            let answer = Message::new(format!("{count} {bytes}"));
            reply
                .send(Ok(Reply::Stream {
                    head,
                    items: Box::pin(stream::iter([
                        ReplyItem::Message(answer),
                        ReplyItem::Status(Status::ok()),
                    ])),
                }))
                .await;
        }
        "/test.Echo/Repeat" => {
            let Some(Ok(Part::Message(m))) = messages.next().await else {
                return;
            };
            let n: usize = std::str::from_utf8(&m.data)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let items = (0..n)
                .map(|i| ReplyItem::Message(Message::new(format!("token {i}"))))
                .chain([ReplyItem::Status(Status::ok())]);
            reply
                .send(Ok(Reply::Stream {
                    head,
                    items: Box::pin(stream::iter(items)),
                }))
                .await;
        }
        "/test.Echo/Forever" => {
            let items = stream::unfold(0u64, |i| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Some((ReplyItem::Message(Message::new(format!("tick {i}"))), i + 1))
            });
            let sent = reply.send(Ok(Reply::Stream {
                head,
                items: Box::pin(items),
            }));
            sent.await;
            seen.cancelled.fetch_add(1, Ordering::SeqCst);
        }
        "/test.Echo/Hang" => {
            reply.cancelled().await;
            // The request stream says why.
            if let Some(Err(status)) = messages.next().await {
                assert_eq!(status.code, Code::Cancelled);
            }
            seen.cancelled.fetch_add(1, Ordering::SeqCst);
        }
        _ => {
            reply
                .send(Ok(Reply::TrailersOnly(Status::new(
                    Code::NotFound,
                    "no such method",
                ))))
                .await
        }
    }
}

/// A call to `path` with these request parts.
pub fn call(path: &str, parts: Vec<Part>) -> Call {
    call_from(path, Box::pin(stream::iter(parts.into_iter().map(Ok))))
}

/// A call whose request parts come from `messages`.
pub fn call_from(path: &str, messages: pnp_call::BoxMessageStream) -> Call {
    let mut metadata = HeaderMap::new();
    metadata.insert("x-request-id", HeaderValue::from_static("t-1"));
    Call {
        head: CallHead {
            path: path.parse().expect("path"),
            subtype: Some("proto".into()),
            metadata,
            timeout: Some(Duration::from_secs(30)),
            max_message_size: usize::MAX,
        },
        messages,
    }
}

/// A call whose request parts the test sends through the returned channel.
pub fn streaming_call(path: &str) -> (mpsc::Sender<Result<Part, Status>>, Call) {
    let (tx, rx) = mpsc::channel(16);
    let messages = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    (tx, call_from(path, Box::pin(messages)))
}

/// A whole message part.
pub fn message(text: &str) -> Part {
    Part::Message(Message::new(Bytes::copy_from_slice(text.as_bytes())))
}

/// Read a reply to its end: the messages (fragments joined) and the status.
pub async fn collect(reply: Reply) -> (ResponseHead, Vec<Bytes>, Status) {
    let (head, mut items) = match reply {
        Reply::Stream { head, items } => (head, items),
        Reply::TrailersOnly(status) => return (ResponseHead::default(), Vec::new(), status),
    };
    let mut messages = Vec::new();
    let mut partial = BytesMut::new();
    while let Some(item) = items.next().await {
        match item {
            ReplyItem::Message(m) => messages.push(m.data),
            ReplyItem::Head { len, .. } => partial.reserve(len as usize),
            ReplyItem::Fragment { data, last } => {
                partial.extend_from_slice(&data);
                if last {
                    messages.push(partial.split().freeze());
                }
            }
            ReplyItem::Status(status) => return (head, messages, status),
        }
    }
    panic!("the reply ended without a status");
}

/// `len` bytes of a pattern that differs at every position of a 64-bit word.
pub fn bulk(len: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(len + 8);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    while buf.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        buf.put_u64_le(x);
    }
    buf.truncate(len);
    buf.freeze()
}

/// A checksum that sees every byte and its position (FNV-1a over 64-bit words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksum {
    pub len: u64,
    pub hash: u64,
    carry: [u8; 8],
    carried: usize,
}

impl Default for Checksum {
    fn default() -> Self {
        Self {
            len: 0,
            hash: 0xcbf2_9ce4_8422_2325,
            carry: [0; 8],
            carried: 0,
        }
    }
}

impl Checksum {
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        while self.carried > 0 && !data.is_empty() {
            self.carry[self.carried] = data[0];
            self.carried = (self.carried + 1) % 8;
            data = &data[1..];
            if self.carried == 0 {
                self.word(u64::from_le_bytes(self.carry));
            }
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.word(u64::from_le_bytes(b));
        }
        for &b in words.remainder() {
            self.carry[self.carried] = b;
            self.carried += 1;
        }
    }

    fn word(&mut self, w: u64) {
        self.hash = (self.hash ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }

    pub fn finish(mut self) -> (u64, u64) {
        for i in 0..self.carried {
            self.word(u64::from(self.carry[i]));
        }
        (self.len, self.hash)
    }
}

/// A child process (this test binary, run again) serving the echo service over `tls`.
pub struct ChildServer {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ChildServer {
    /// Start it; `test` is the name of the test function in this binary that serves when
    /// `PNP_UCX_CHILD` is set.
    pub fn start(test: &str, tls: &str) -> ChildServer {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env("PNP_UCX_CHILD", tls)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the child server");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the child printed its address")
                .expect("read the child's stdout");
            // libtest may have written "test child_server ... " on the same line.
            if let Some((_, addr)) = line.split_once("PNP_UCX_LISTENING ") {
                break addr.trim().parse().expect("address");
            }
        };
        // Keep draining the child's stdout so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        ChildServer { child, addr }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of the child process: serve until killed.
pub async fn child_main(tls: &str) {
    let (addr, _seen) = serve(tls).await;
    println!("PNP_UCX_LISTENING {addr}");
    std::future::pending::<()>().await;
}
