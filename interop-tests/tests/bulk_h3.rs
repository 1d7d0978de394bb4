//! 1 GiB each way across an HTTP/3 bridge (client → edge pnp → h3 → cluster pnp → upstream),
//! with a checksum compared end to end and the process's memory growth bounded by windows, not
//! by the message size. The download goes as native gRPC, the upload as gRPC-Web, so both
//! framings cross QUIC in fragments. One test per file: the peak RSS is the process's.

mod support;

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use pnp_interop_tests::stack::upstream_url;
use support::bulk::*;
use support::h3::{cluster, dev_certs, edge};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_across_an_h3_bridge_with_memory_bounded() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(serve_bulk(listener));
    let certs = dev_certs();
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
    let cluster = cluster(upstream_url(upstream), &certs, limit).await;
    let edge = edge(cluster.local_h3_addr().expect("h3").port(), &certs, limit).await;
    let addr = edge.local_addr();
    let want = expected(GIB);
    let before = peak_rss();

    // Download: 1 GiB from the upstream, as native gRPC.
    let started = Instant::now();
    let mut send = client(addr).await.ready().await.expect("ready");
    let (response, mut request) = send
        .send_request(head(addr, "/bulk/Download", false), false)
        .expect("request");
    let mut size = BytesMut::new();
    size.put_u8(0);
    size.put_u32(8);
    size.put_u64(GIB);
    request.send_data(size.freeze(), true).expect("size");
    let response = response.await.expect("response headers");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-pnp-transport"], "h3");
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
    let mut answer = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        answer.extend_from_slice(&chunk);
    }
    assert!(
        answer.len() >= 21,
        "no answer message after {:?}: headers {headers:?}, body {:?}",
        started.elapsed(),
        String::from_utf8_lossy(&answer)
    );
    let got = (
        u64::from_be_bytes(answer[5..13].try_into().expect("8")),
        u64::from_be_bytes(answer[13..21].try_into().expect("8")),
    );
    assert_eq!(got, want, "the uploaded message differs upstream");
    upload.await.expect("upload task");
    let block = (answer.len() > 26 && answer[21] == 0x80).then(|| answer.freeze().slice(26..));
    assert_eq!(status_of(None, block).as_deref(), Some("0"));
    let upload_time = started.elapsed();

    let growth = peak_rss().saturating_sub(before);
    let rate = |d: Duration| (GIB * 8) as f64 / d.as_secs_f64() / 1e9;
    eprintln!(
        "1 GiB over h3: download {download:.1?} ({:.2} Gbit/s), upload {upload_time:.1?} ({:.2} Gbit/s); \
         peak RSS grew by {} MiB (upstream, both pnps and the client in this process)",
        rate(download),
        rate(upload_time),
        growth >> 20
    );
    assert!(
        growth < 256 << 20,
        "the process grew by {} MiB moving 1 GiB messages over h3",
        growth >> 20
    );
    edge.shutdown_with_grace(Duration::from_millis(100)).await;
    cluster
        .shutdown_with_grace(Duration::from_millis(100))
        .await;
}
