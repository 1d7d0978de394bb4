//! Pieces for clients that misbehave on purpose (the edge-hardening tests, and the same
//! clients against a bridge): raw gRPC frames, a StreamingOutputCall body, a native gRPC
//! request head, and an HTTP/2 client with a chosen receive window (0: it never reads).

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http::Request;
use pnp_demo::pb::grpc_testing::{ResponseParameters, StreamingOutputCallRequest};
use pnp_interop_tests::interop::encode;
use tokio::net::TcpStream;

/// A gRPC frame around `message`.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).expect("small message"));
    out.put_slice(message);
    out.freeze()
}

/// `count` responses of `size` bytes each.
pub fn streaming_output(count: usize, size: i32) -> Vec<u8> {
    encode(&StreamingOutputCallRequest {
        response_parameters: (0..count)
            .map(|_| ResponseParameters {
                size,
                ..ResponseParameters::default()
            })
            .collect(),
        ..StreamingOutputCallRequest::default()
    })
}

/// A native gRPC request head for the raw h2 client.
pub fn grpc_head(addr: SocketAddr, path: &str, timeout: Option<&str>) -> Request<()> {
    let mut builder = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(timeout) = timeout {
        builder = builder.header("grpc-timeout", timeout);
    }
    builder.body(()).expect("request head")
}

/// A raw HTTP/2 client whose streams get `window` bytes of receive window.
pub async fn h2_client(addr: SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(tcp)
        .await
        .expect("h2 handshake");
    tokio::spawn(connection);
    send
}
