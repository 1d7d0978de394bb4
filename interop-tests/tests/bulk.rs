//! Large messages through pnp: a 1 GiB message in each direction, as gRPC and as gRPC-Web,
//! with a checksum compared end to end and the process's memory growth far below the message
//! size (pnp passes large messages on in fragments, bounded by flow-control windows); and an
//! upstream that dies inside a large message gives the client an error, never OK.
//!
//! The upstream and the clients here stream too (they never hold a message whole), so what the
//! process's peak RSS shows beyond its start is pnp's buffering. One test per file: the peak is
//! the process's, and no other test may share it.

mod support;

use bytes::Bytes;
use pnp_interop_tests::Stack;
use support::bulk::*;
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_with_memory_bounded_and_a_death_inside_a_message_is_an_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(serve_bulk(listener));
    let proxy = Stack::proxy_for(pnp_interop_tests::stack::upstream_url(upstream), |c| {
        c.limits.max_message_size = (GIB + 1) as usize
    })
    .await;
    let addr = proxy.local_addr();
    let want = expected(GIB);
    let before = peak_rss();

    for web in [false, true] {
        // Download: 1 GiB from the upstream through pnp.
        let mut send = client(addr).await.ready().await.expect("ready");
        let (response, mut request) = send
            .send_request(head(addr, "/bulk/Download", web), false)
            .expect("request");
        request.send_data(size_request(GIB), true).expect("size");
        let response = response.await.expect("response headers");
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let (len, hash, block) = receive_bulk(&mut body).await.expect("the download");
        let trailers = body.trailers().await.expect("trailers");
        assert_eq!(
            (len, hash),
            want,
            "web={web}: the downloaded message differs"
        );
        assert_eq!(
            status_of(trailers, block).as_deref(),
            Some("0"),
            "web={web}"
        );

        // Upload: 1 GiB from the client through pnp; the upstream answers its checksum.
        let mut send = client(addr).await.ready().await.expect("ready");
        let (response, mut request) = send
            .send_request(head(addr, "/bulk/Upload", web), false)
            .expect("request");
        let upload = tokio::spawn(async move {
            send_bulk(&mut request, GIB, None)
                .await
                .expect("the upload");
            request.send_data(Bytes::new(), true).expect("end");
        });
        let response = response.await.expect("response headers");
        let mut body = response.into_body();
        let answer = read_all(&mut body).await;
        upload.await.expect("upload task");
        let trailers = body.trailers().await.expect("trailers");
        assert!(answer.len() >= 21, "web={web}: no answer message");
        let (got, block) = upload_answer(answer);
        assert_eq!(
            got, want,
            "web={web}: the uploaded message differs upstream"
        );
        assert_eq!(
            status_of(trailers, block).as_deref(),
            Some("0"),
            "web={web}"
        );
    }
    let growth = peak_rss().saturating_sub(before);
    eprintln!(
        "peak RSS grew by {} MiB moving 4 × 1 GiB (upstream, pnp and clients in this process)",
        growth >> 20
    );
    assert!(
        growth < 256 << 20,
        "the process grew by {} MiB moving 1 GiB messages",
        growth >> 20
    );

    // The upstream dies halfway through a 64 MiB message: the client sees an error (a reset
    // stream), never a clean end with OK.
    for web in [false, true] {
        let mut send = client(addr).await.ready().await.expect("ready");
        let (response, mut request) = send
            .send_request(head(addr, "/bulk/DownloadThenDie", web), false)
            .expect("request");
        request
            .send_data(size_request(64 << 20), true)
            .expect("size");
        let mut body = response.await.expect("headers").into_body();
        let outcome = receive_bulk(&mut body).await;
        let status = match outcome {
            Err(e) => {
                assert_eq!(
                    e.reason(),
                    Some(h2::Reason::INTERNAL_ERROR),
                    "web={web}: {e}"
                );
                None
            }
            Ok((len, _, block)) => {
                let trailers = body.trailers().await.ok().flatten();
                assert!(len < 64 << 20, "web={web}: the whole message arrived");
                status_of(trailers, block)
            }
        };
        assert_ne!(
            status.as_deref(),
            Some("0"),
            "web={web}: a cut message ended OK"
        );
    }
}
