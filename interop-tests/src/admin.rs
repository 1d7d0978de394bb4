//! The proxy's admin listener as an operator's scraper sees it.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` from the admin listener at `admin`: the whole HTTP response (head and
/// OpenMetrics text). Fails the test unless it is a 200 with the OpenMetrics content type.
pub async fn scrape_metrics(admin: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(admin)
        .await
        .unwrap_or_else(|e| panic!("connecting to the admin listener {admin}: {e}"));
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: pnp\r\nconnection: close\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("writing to the admin listener: {e}"));
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .unwrap_or_else(|e| panic!("reading /metrics: {e}"));
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("application/openmetrics-text"),
        "{response}"
    );
    response
}

/// The value of the sample whose name and labels are exactly `series`, e.g.
/// `pnp_active_streams{transport="h2"}`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}
