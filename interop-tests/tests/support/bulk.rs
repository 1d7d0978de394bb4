//! Bulk transfers for the large-message tests: a generated message of any size, a checksum
//! over a byte stream cut anywhere, an HTTP/2 sender and receiver with flow control (one block
//! in hand), and a bulk upstream (`/bulk/Download`, `/bulk/Upload`, `/bulk/DownloadThenDie`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderMap, Request, Response};
use pnp_interop_tests::stack::upstream_url;
use tokio::net::{TcpListener, TcpStream};

use super::bridge::{pair, Hop};

pub const GIB: u64 = 1 << 30;
/// The blocks a bulk message is made of.
pub const BLOCK: usize = 64 * 1024;

/// The `block`-th block of a bulk message: its index, then a filler that depends on it.
pub fn block(index: u64, len: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(len);
    let mut word = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    out.put_u64(index);
    while out.len() + 8 <= len {
        word ^= word << 13;
        word ^= word >> 7;
        word ^= word << 17;
        out.put_u64(word);
    }
    out.resize(len, 0xAB);
    out.freeze()
}

/// A running checksum over a byte stream, cut anywhere.
#[derive(Default)]
pub struct Checksum {
    hash: u64,
    pending: Vec<u8>,
    len: u64,
}

impl Checksum {
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.pending.is_empty() {
            let take = (8 - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == 8 {
                let word = u64::from_be_bytes(self.pending[..].try_into().expect("8 bytes"));
                self.mix(word);
                self.pending.clear();
            }
        }
        let mut words = data.chunks_exact(8);
        for word in &mut words {
            self.mix(u64::from_be_bytes(word.try_into().expect("8 bytes")));
        }
        self.pending.extend_from_slice(words.remainder());
    }

    fn mix(&mut self, word: u64) {
        self.hash = (self.hash ^ word)
            .wrapping_mul(0x0000_0100_0000_01B3)
            .rotate_left(5);
    }

    pub fn finish(mut self) -> (u64, u64) {
        for byte in std::mem::take(&mut self.pending) {
            self.mix(u64::from(byte));
        }
        (self.len, self.hash)
    }
}

/// The checksum of a whole bulk message of `len` bytes, computed the way the sender makes it.
pub fn expected(len: u64) -> (u64, u64) {
    let mut sum = Checksum::default();
    let mut sent = 0u64;
    let mut index = 0;
    while sent < len {
        let n = BLOCK.min((len - sent) as usize);
        sum.update(&block(index, n));
        sent += n as u64;
        index += 1;
    }
    sum.finish()
}

/// Send a bulk message of `len` bytes (frame header first) with flow control: a block is
/// queued only once h2 has window for it, so the sender holds at most one block.
pub async fn send_bulk(
    send: &mut h2::SendStream<Bytes>,
    len: u64,
    cut_after: Option<u64>,
) -> Result<(), h2::Error> {
    let mut header = BytesMut::with_capacity(5);
    header.put_u8(0);
    header.put_u32(u32::try_from(len).expect("a gRPC frame"));
    send.send_data(header.freeze(), false)?;
    let mut sent = 0u64;
    let mut index = 0;
    while sent < len {
        if cut_after.is_some_and(|cut| sent >= cut) {
            return Ok(());
        }
        let n = BLOCK.min((len - sent) as usize);
        send.reserve_capacity(n);
        while send.capacity() == 0 {
            match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
        send.send_data(block(index, n), false)?;
        sent += n as u64;
        index += 1;
    }
    Ok(())
}

/// Read a body of gRPC (or gRPC-Web binary) frames: the checksum of the first message's payload,
/// and the gRPC-Web trailer block if one came. Releases window as it reads.
pub async fn receive_bulk(body: &mut RecvStream) -> Result<(u64, u64, Option<Bytes>), h2::Error> {
    let mut header = BytesMut::new();
    let mut remaining: Option<u64> = None;
    let mut sum = Checksum::default();
    let mut tail = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let mut chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        while chunk.has_remaining() {
            match remaining {
                None => {
                    let take = (5 - header.len()).min(chunk.len());
                    header.extend_from_slice(&chunk.split_to(take));
                    if header.len() == 5 {
                        remaining = Some(u64::from(u32::from_be_bytes(
                            header[1..5].try_into().expect("4 bytes"),
                        )));
                    }
                }
                Some(0) => {
                    tail.extend_from_slice(&chunk);
                    chunk.clear();
                }
                Some(left) => {
                    let take = (left as usize).min(chunk.len());
                    sum.update(&chunk.split_to(take));
                    remaining = Some(left - take as u64);
                }
            }
        }
    }
    let (len, hash) = sum.finish();
    let trailer_block = (tail.len() > 5 && tail[0] == 0x80).then(|| tail.freeze().slice(5..));
    Ok((len, hash, trailer_block))
}

/// The bulk upstream: `/bulk/Download` answers a message of the size its request names,
/// `/bulk/Upload` reads one message and answers its length and checksum (16 bytes),
/// `/bulk/DownloadThenDie` sends half of the message and drops the connection.
pub async fn serve_bulk(listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut builder = h2::server::Builder::new();
            builder
                .initial_window_size(1 << 20)
                .initial_connection_window_size(4 << 20);
            let Ok(mut conn) = builder.handshake::<_, Bytes>(tcp).await else {
                return;
            };
            while let Some(Ok((request, respond))) = conn.accept().await {
                let die = request.uri().path().ends_with("ThenDie");
                let task = tokio::spawn(bulk_call(request, respond));
                if die {
                    // Keep serving until the call has sent half its message, then cut the TCP
                    // connection with everything on it.
                    loop {
                        tokio::select! {
                            _ = conn.accept() => {}
                            _ = tokio::time::sleep(Duration::from_millis(5)) => {
                                if task.is_finished() {
                                    return;
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}

pub async fn bulk_call(request: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let path = request.uri().path().to_owned();
    let mut body = request.into_body();
    let headers = Response::builder()
        .header("content-type", "application/grpc")
        .body(())
        .expect("response");
    if path.ends_with("/Upload") {
        let Ok((len, hash, _)) = receive_bulk(&mut body).await else {
            return;
        };
        let Ok(mut send) = respond.send_response(headers, false) else {
            return;
        };
        let mut message = BytesMut::new();
        message.put_u8(0);
        message.put_u32(16);
        message.put_u64(len);
        message.put_u64(hash);
        let _ = send.send_data(message.freeze(), false);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("value"));
        let _ = send.send_trailers(trailers);
        return;
    }
    // Download: the request's one message is the size, as 8 bytes.
    let mut request_bytes = BytesMut::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        request_bytes.extend_from_slice(&chunk);
    }
    if request_bytes.len() < 13 {
        return;
    }
    let len = u64::from_be_bytes(request_bytes[5..13].try_into().expect("8 bytes"));
    let Ok(mut send) = respond.send_response(headers, false) else {
        return;
    };
    let cut = path.ends_with("ThenDie").then_some(len / 2);
    if send_bulk(&mut send, len, cut).await.is_err() || cut.is_some() {
        return;
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().expect("value"));
    let _ = send.send_trailers(trailers);
}

pub fn content_type(web: bool) -> &'static str {
    if web {
        "application/grpc-web"
    } else {
        "application/grpc"
    }
}

pub async fn client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake(tcp)
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

pub fn head(addr: SocketAddr, path: &str, web: bool) -> Request<()> {
    Request::post(format!("http://{addr}{path}"))
        .header("content-type", content_type(web))
        .header("te", "trailers")
        .body(())
        .expect("request")
}

/// The grpc-status of a reply: from HTTP/2 trailers (gRPC) or the trailer frame (gRPC-Web).
pub fn status_of(trailers: Option<HeaderMap>, block: Option<Bytes>) -> Option<String> {
    if let Some(trailers) = trailers {
        return trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
    }
    let block = block?;
    let text = String::from_utf8_lossy(&block).to_string();
    text.lines()
        .find_map(|line| line.strip_prefix("grpc-status:"))
        .map(|v| v.trim().to_owned())
}

/// Peak resident memory of this process so far, in bytes.
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .expect("VmHWM")
}

/// The request message of `/bulk/Download` and `/bulk/DownloadThenDie`: the size to send, as
/// one framed message of 8 bytes.
pub fn size_request(size: u64) -> Bytes {
    let mut frame = BytesMut::with_capacity(13);
    frame.put_u8(0);
    frame.put_u32(8);
    frame.put_u64(size);
    frame.freeze()
}

/// Everything left of a response body, its flow-control capacity given back as it comes.
pub async fn read_all(body: &mut RecvStream) -> BytesMut {
    let mut all = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        all.extend_from_slice(&chunk);
    }
    all
}

/// The `/bulk/Upload` answer: the (length, hash) the upstream computed (a 16-byte message),
/// and the gRPC-Web trailer frame's block after it, if the answer has one.
pub fn upload_answer(answer: BytesMut) -> ((u64, u64), Option<Bytes>) {
    let got = (
        u64::from_be_bytes(answer[5..13].try_into().expect("8")),
        u64::from_be_bytes(answer[13..21].try_into().expect("8")),
    );
    let block = (answer.len() > 26 && answer[21] == 0x80).then(|| answer.freeze().slice(26..));
    (got, block)
}

/// 1 GiB each way across a bridge over `hop` (client → edge pnp → hop → cluster pnp → bulk
/// upstream), checksums compared end to end, the process's peak RSS growth bounded. The
/// download goes as native gRPC, the upload as gRPC-Web. Peak RSS is the process's: call it
/// from a test binary of its own.
pub async fn one_gib_each_way(hop: Hop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(serve_bulk(listener));
    // A bulk upload has no response message until it is all there, and one message in flight
    // for longer than the idle gap (the stream clocks count messages, not fragments): no
    // first-message or idle clock, as a checkpoint profile would have.
    let limit = |c: &mut pnp_config::Config| {
        c.limits.max_message_size = (GIB + 1) as usize;
        let profile = c.jobs.default_profile_mut();
        profile.first_message = pnp_config::FirstMessage::Off;
        profile.first_message_explicit = true;
        profile.idle_timeout = None;
        profile.idle_timeout_explicit = true;
        c.resilience.keepalive_timeout = Duration::from_secs(120);
    };
    let (cluster, edge, _certs) = pair(hop, upstream_url(upstream), limit).await;
    let addr = edge.local_addr();
    let want = expected(GIB);
    let before = peak_rss();

    // Download: 1 GiB from the upstream, as native gRPC.
    let started = Instant::now();
    let mut send = client(addr).await.ready().await.expect("ready");
    let (response, mut request) = send
        .send_request(head(addr, "/bulk/Download", false), false)
        .expect("request");
    request.send_data(size_request(GIB), true).expect("size");
    let response = response.await.expect("response headers");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-pnp-transport"], hop.name());
    let mut body = response.into_body();
    let (len, hash, _) = receive_bulk(&mut body).await.expect("the download");
    let trailers = body.trailers().await.expect("trailers");
    assert_eq!((len, hash), want, "the downloaded message differs");
    assert_eq!(status_of(trailers, None).as_deref(), Some("0"));
    let download = started.elapsed();
    eprintln!(
        "download: {download:?}, peak RSS grew by {} MiB so far",
        peak_rss().saturating_sub(before) >> 20
    );

    // Upload: 1 GiB from the client, as gRPC-Web; the upstream answers its checksum.
    let started = Instant::now();
    let mut send = client(addr).await.ready().await.expect("ready");
    let (response, mut request) = send
        .send_request(head(addr, "/bulk/Upload", true), false)
        .expect("request");
    let upload = tokio::spawn(async move {
        send_bulk(&mut request, GIB, None)
            .await
            .expect("the upload");
        request.send_data(Bytes::new(), true).expect("end");
    });
    let response = response.await.expect("response headers");
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let answer = read_all(&mut body).await;
    assert!(
        answer.len() >= 21,
        "no answer message after {:?}: headers {headers:?}, body {:?}",
        started.elapsed(),
        String::from_utf8_lossy(&answer)
    );
    let (got, block) = upload_answer(answer);
    assert_eq!(got, want, "the uploaded message differs upstream");
    upload.await.expect("upload task");
    assert_eq!(status_of(None, block).as_deref(), Some("0"));
    let upload_time = started.elapsed();

    let growth = peak_rss().saturating_sub(before);
    let rate = |d: Duration| (GIB * 8) as f64 / d.as_secs_f64() / 1e9;
    eprintln!(
        "1 GiB over {}: download {download:.1?} ({:.2} Gbit/s), upload {upload_time:.1?} ({:.2} Gbit/s); \
         peak RSS grew by {} MiB (upstream, both pnps and the client in this process)",
        hop.name(),
        rate(download),
        rate(upload_time),
        growth >> 20
    );
    assert!(
        growth < 256 << 20,
        "the process grew by {} MiB moving 1 GiB messages over {}",
        growth >> 20,
        hop.name()
    );
    edge.shutdown_with_grace(Duration::from_millis(100)).await;
    cluster
        .shutdown_with_grace(Duration::from_millis(100))
        .await;
}
