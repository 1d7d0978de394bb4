//! Bulk transfers for the large-message tests: a generated message of any size, a checksum
//! over a byte stream cut anywhere, an HTTP/2 sender and receiver with flow control (one block
//! in hand), and a bulk upstream (`/bulk/Download`, `/bulk/Upload`, `/bulk/DownloadThenDie`).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderMap, Request, Response};
use tokio::net::{TcpListener, TcpStream};

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
