//! The control API answers gRPC-Web over HTTP/1.1 on the same port, as a browser console would
//! call it.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use pnp_control::proto;
use prost::Message;
use tokio::net::TcpStream;

use crate::support::{eventually, job, FakeDataPlane, Harness, CLIENT_NAME};

#[tokio::test]
async fn list_jobs_over_grpc_web_on_http_1_1() {
    let (harness, _fake) =
        Harness::start_after(|link| FakeDataPlane::start(link, vec![job("chat")]), |_| {}).await;
    assert!(
        eventually(Duration::from_secs(5), || !harness
            .plane
            .hub()
            .jobs()
            .jobs
            .is_empty())
        .await
    );
    let tls = harness
        .client_tls(Some(harness.ca.client(CLIENT_NAME)))
        .client_config_with_alpn(vec![b"http/1.1".to_vec()])
        .expect("client config");
    let tcp = TcpStream::connect(harness.addr).await.expect("tcp");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("tls");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http/1.1");
    tokio::spawn(connection);

    // An empty ListJobsRequest in one gRPC frame.
    let request = http::Request::post("/pnp.control.v1.Control/ListJobs")
        .header("host", "localhost")
        .header("content-type", "application/grpc-web+proto")
        .header("accept", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_11);
    assert_eq!(
        response.headers()["content-type"],
        "application/grpc-web+proto"
    );
    let mut body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    // A data frame with the reply, then the trailer frame.
    assert_eq!(body.get_u8(), 0);
    let len = body.get_u32() as usize;
    let reply = proto::ListJobsResponse::decode(body.split_to(len)).expect("reply");
    assert_eq!(reply.jobs.len(), 1);
    assert_eq!(reply.jobs[0].name, "chat");
    assert_eq!(body.get_u8(), 0x80);
    let len = body.get_u32() as usize;
    let trailers = String::from_utf8(body.split_to(len).to_vec()).expect("trailers");
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
}
