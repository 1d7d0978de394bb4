//! The contract between the load client and the bench upstreams: method paths, the request
//! headers that parameterise a call, and the precomputed messages.
//!
//! Parameters travel as request headers so that every proxy forwards them untouched and the
//! upstream never has to decode a request message.

use std::sync::LazyLock;

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;

/// Unary: the reply is one precomputed [`UNARY_SIZE`]-byte message.
pub const UNARY: &str = "/bench.Bench/Unary";
/// Server streaming: `x-bench-count` messages (0 = until the client resets) of `x-bench-size`
/// bytes, one every `x-bench-interval-us` (0 = as fast as flow control allows). Paced messages
/// start with the upstream's send time in nanoseconds since the Unix epoch (u64, little endian);
/// unpaced messages of 16 KiB to 1 MiB are slices of [`BULK_BYTES`] (scenario S8's 2 MiB
/// replies).
pub const TOKENS: &str = "/bench.Bench/Tokens";
/// One message, then the stream stays open and silent until the client resets it.
pub const IDLE: &str = "/bench.Bench/Idle";
/// One message of `x-bench-size` bytes (up to 4 GiB − 1), written as its 5-byte header and
/// then slices of a shared 1 MiB chunk: nothing is copied and nothing is held whole.
pub const BULK: &str = "/bench.Bench/Bulk";
/// Client streaming upload: the request is one message of `x-bench-size` bytes, which the
/// upstream scans as it arrives without keeping it; the reply is one 8-byte message, the
/// payload length it received (u64, little endian). A request of any other shape than one
/// message ends with INVALID_ARGUMENT.
pub const UPLOAD: &str = "/bench.Bench/Upload";

/// Header: number of messages.
pub const COUNT: &str = "x-bench-count";
/// Header: message size in bytes.
pub const SIZE: &str = "x-bench-size";
/// Header: gap between messages in microseconds.
pub const INTERVAL_US: &str = "x-bench-interval-us";

/// Size of the unary request and reply payloads (scenario S1).
pub const UNARY_SIZE: usize = 100;
/// Default size of a streamed token message (scenario S2, S3).
pub const TOKEN_SIZE: usize = 64;
/// Size of the shared chunk bulk replies are written from.
pub const BULK_CHUNK: usize = 1 << 20;

/// HTTP/2 stream window used by every client, upstream and proxy the runner configures.
pub const STREAM_WINDOW: u32 = 1 << 20;
/// HTTP/2 connection window used everywhere.
pub const CONNECTION_WINDOW: u32 = 4 << 20;

/// Smallest message an unpaced stream writes from [`BULK_BYTES`] rather than in a batch.
pub const LARGE_MESSAGE: usize = 16 << 10;

/// Largest gRPC message: the frame header's length field is a u32.
pub const MAX_MESSAGE: u64 = u32::MAX as u64;

/// The 5-byte header of an uncompressed `len`-byte gRPC message (`len` ≤ [`MAX_MESSAGE`]).
pub fn frame_header(len: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(5);
    out.put_u8(0);
    out.put_u32(len.min(MAX_MESSAGE) as u32);
    out.freeze()
}

/// The `len`-byte payload of a bulk message as slices of [`BULK_BYTES`], in order: what the
/// upstream writes after [`frame_header`] for [`BULK`] and the load client for [`UPLOAD`].
pub fn bulk_chunks(len: u64) -> impl Iterator<Item = Bytes> {
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(BULK_CHUNK as u64);
        left -= n;
        Some(BULK_BYTES.slice(..n as usize))
    })
}

/// A gRPC frame: the 5-byte header and `payload`.
pub fn frame(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(0);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    out.freeze()
}

/// The unary request and reply frame: 100 bytes of payload.
pub static UNARY_FRAME: LazyLock<Bytes> = LazyLock::new(|| frame(&[0x61; UNARY_SIZE]));
/// A request frame with an empty payload (streaming calls carry their parameters in headers).
pub static EMPTY_FRAME: LazyLock<Bytes> = LazyLock::new(|| frame(&[]));
/// The chunk bulk messages are made of.
pub static BULK_BYTES: LazyLock<Bytes> = LazyLock::new(|| Bytes::from(vec![0x5a; BULK_CHUNK]));

/// How many frames an unpaced stream writes per `send_data`.
pub const BATCH: usize = 64;

/// Parameters of a streaming call, read from its request headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// Messages to send; 0 = until reset.
    pub count: u64,
    /// Message size in bytes.
    pub size: u64,
    /// Gap between messages in microseconds; 0 = unpaced.
    pub interval_us: u64,
}

impl Params {
    /// Read the parameters from request headers; missing or malformed values take defaults.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let get = |name: &str, default: u64| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Self {
            count: get(COUNT, 1),
            size: get(SIZE, TOKEN_SIZE as u64),
            interval_us: get(INTERVAL_US, 0),
        }
    }

    /// Write the parameters as request headers.
    pub fn to_headers(self, headers: &mut HeaderMap) {
        headers.insert(COUNT, self.count.into());
        headers.insert(SIZE, self.size.into());
        headers.insert(INTERVAL_US, self.interval_us.into());
    }
}

/// [`BATCH`] frames of `size` zero bytes, written in one go by unpaced streams.
pub fn batch(size: usize) -> Bytes {
    let one = frame(&vec![0u8; size]);
    let mut out = BytesMut::with_capacity(one.len() * BATCH);
    for _ in 0..BATCH {
        out.put_slice(&one);
    }
    out.freeze()
}

/// A paced message: `size` bytes starting with the send time.
pub fn stamped(size: usize) -> Bytes {
    let size = size.max(8);
    let mut out = BytesMut::with_capacity(5 + size);
    out.put_u8(0);
    out.put_u32(size as u32);
    out.put_u64_le(now_nanos());
    out.put_bytes(0, size - 8);
    out.freeze()
}

/// Wall-clock nanoseconds since the Unix epoch: the one clock the upstream and client processes
/// share (both run on this machine).
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Which method a path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// [`UNARY`].
    Unary,
    /// [`TOKENS`].
    Tokens,
    /// [`IDLE`].
    Idle,
    /// [`BULK`].
    Bulk,
    /// [`UPLOAD`].
    Upload,
}

impl Method {
    /// The method a request path names, if any.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            UNARY => Some(Self::Unary),
            TOKENS => Some(Self::Tokens),
            IDLE => Some(Self::Idle),
            BULK => Some(Self::Bulk),
            UPLOAD => Some(Self::Upload),
            _ => None,
        }
    }

    /// The request path.
    pub fn path(self) -> &'static str {
        match self {
            Self::Unary => UNARY,
            Self::Tokens => TOKENS,
            Self::Idle => IDLE,
            Self::Bulk => BULK,
            Self::Upload => UPLOAD,
        }
    }
}
