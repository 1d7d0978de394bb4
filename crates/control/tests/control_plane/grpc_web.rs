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
    let mut sender = http1(&harness).await;

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

/// A TLS connection with the test client's certificate, HTTP/1.1 agreed by ALPN, as a
/// browser's fetch would make it.
async fn http1(harness: &Harness) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
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
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http/1.1");
    tokio::spawn(connection);
    sender
}

fn preflight(origin: &str) -> http::Request<Full<Bytes>> {
    http::Request::options("/pnp.control.v1.Control/ListJobs")
        .header("host", "localhost")
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-grpc-web,x-user-agent",
        )
        .body(Full::new(Bytes::new()))
        .expect("request")
}

fn list_jobs(origin: &str) -> http::Request<Full<Bytes>> {
    http::Request::post("/pnp.control.v1.Control/ListJobs")
        .header("host", "localhost")
        .header("origin", origin)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .expect("request")
}

/// A browser console on an allowed origin can call the API: its preflight is answered and the
/// reply carries the CORS headers (credentials allowed, gRPC status exposed); a page on
/// another origin gets none, and without a configured list no origin does.
#[tokio::test]
async fn a_console_on_an_allowed_origin_passes_cors_and_others_do_not() {
    const CONSOLE: &str = "https://console.example.com";
    let (harness, _fake) = Harness::start_after(
        |link| FakeDataPlane::start(link, vec![job("chat")]),
        |options| options.cors_origins = vec![CONSOLE.to_owned()],
    )
    .await;
    let mut sender = http1(&harness).await;

    let answer = sender
        .send_request(preflight(CONSOLE))
        .await
        .expect("preflight");
    assert!(answer.status().is_success(), "{}", answer.status());
    let headers = answer.headers();
    assert_eq!(headers["access-control-allow-origin"], CONSOLE);
    assert_eq!(headers["access-control-allow-credentials"], "true");
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .expect("text");
    assert!(allowed.contains("x-grpc-web"), "{allowed}");
    let methods = headers["access-control-allow-methods"]
        .to_str()
        .expect("text");
    assert!(methods.contains("POST"), "{methods}");
    let _ = answer.into_body().collect().await;

    let reply = sender.send_request(list_jobs(CONSOLE)).await.expect("call");
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.headers()["access-control-allow-origin"], CONSOLE);
    let exposed = reply.headers()["access-control-expose-headers"]
        .to_str()
        .expect("text")
        .to_owned();
    assert!(exposed.contains("grpc-status"), "{exposed}");
    let body = reply.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body[0], 0, "a data frame first: the call was served");

    // Another origin: the call is served (the certificate is what lets it in), but without
    // CORS headers the browser keeps the reply from the page.
    let evil = sender
        .send_request(preflight("https://evil.example.com"))
        .await
        .expect("preflight");
    assert!(!evil.headers().contains_key("access-control-allow-origin"));
    let _ = evil.into_body().collect().await;
    let evil = sender
        .send_request(list_jobs("https://evil.example.com"))
        .await
        .expect("call");
    assert!(!evil.headers().contains_key("access-control-allow-origin"));
    let _ = evil.into_body().collect().await;

    // No list: no CORS at all.
    let (plain, _fake) =
        Harness::start_after(|link| FakeDataPlane::start(link, vec![job("chat")]), |_| {}).await;
    let mut sender = http1(&plain).await;
    let reply = sender.send_request(list_jobs(CONSOLE)).await.expect("call");
    assert!(!reply.headers().contains_key("access-control-allow-origin"));
}

/// An origin that is not one is refused at start-up, naming it.
#[tokio::test]
async fn a_bad_cors_origin_is_refused_at_start() {
    for bad in ["console.example.com", "https://*.example.com"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = crate::support::Ca::new("test CA");
        let mut options = pnp_control::ControlOptions::new(
            dir.path().join("link"),
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            pnp_control::ServerTls {
                identity: ca.server(),
                client_ca_pem: ca.pem(),
                allowed_clients: Vec::new(),
            },
        );
        options.cors_origins = vec![bad.to_owned()];
        let Err(err) = pnp_control::ControlPlane::start(options).await else {
            panic!("{bad} accepted")
        };
        assert!(err.to_string().contains(bad), "{err}");
    }
}
