//! Reading the daemon's Prometheus endpoint (shared by the tests and the benchmark).

/// Reads one metric series (exact line prefix, e.g. `floorgate_store_events` or
/// `floorgate_device_online{device="a"}`) from the metrics endpoint on `port`.
pub async fn scrape(port: u16, series: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}
