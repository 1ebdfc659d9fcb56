//! A plain HTTP/1.1 GET, for pgferry's `/metrics`, `/healthz` and `/readyz`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// `GET path` on `127.0.0.1:port`: (status, body), or `None` when nothing answers.
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// The value of the series `series` (name with its labels, exactly as
/// exposed) in a Prometheus exposition, if present.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `GET /readyz` on `port` until it answers `status` with a body
/// holding `holds`, and returns the body; panics after `timeout` with the
/// last answer and `log()`.
pub fn wait_readyz(
    port: u16,
    status: u16,
    holds: &str,
    timeout: Duration,
    log: impl Fn() -> String,
) -> String {
    let start = std::time::Instant::now();
    loop {
        let answer = get(port, "/readyz");
        if let Some((s, body)) = &answer {
            if *s == status && body.contains(holds) {
                return body.clone();
            }
        }
        assert!(
            start.elapsed() < timeout,
            "/readyz never answered {status} with {holds:?}; last: {answer:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Gives `pgferry.toml`'s metrics endpoint (written as `127.0.0.1:0` by
/// [`super::ferry::FerryDir::write_config`]) a fixed free port, and returns it.
pub fn fix_metrics_port(config: &std::path::Path) -> u16 {
    let port = super::pg::free_port();
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(
        config,
        text.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    port
}
