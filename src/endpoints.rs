//! The HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the
//! process is alive) and `/readyz` (the truth about the stream and every
//! sink, see [`crate::metrics`]), served with hyper.
//!
//! Invariants:
//! - answering reads the process-wide [`metrics::global`] registry only:
//!   it never waits on the source or a sink;
//! - one request per connection, and a connection that has not been
//!   answered within `ANSWER_WITHIN` is closed, so a stuck scraper holds
//!   nothing;
//! - `GET` and `HEAD` only; any other method gets 405 with `Allow`.

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::metrics::{self, SinkHealth};

/// How long one connection may take, request and answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// Serves the endpoints on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(stream),
                    hyper::service::service_fn(answer),
                );
            let _ = tokio::time::timeout(ANSWER_WITHIN, conn).await;
        });
    }
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, ctype, body) = route(req.method(), req.uri().path());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    // hyper leaves the body out of the answer to a HEAD.
    Ok(r)
}

/// The status, content type and body for a request.
fn route(method: &Method, path: &str) -> (StatusCode, &'static str, String) {
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    let m = metrics::global();
    match path {
        "/metrics" => (StatusCode::OK, metrics::CONTENT_TYPE, m.render()),
        "/healthz" => (
            StatusCode::OK,
            "application/json",
            json!({"status": "alive", "version": env!("CARGO_PKG_VERSION")}).to_string(),
        ),
        "/readyz" => readyz(m),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn readyz(m: &metrics::Metrics) -> (StatusCode, &'static str, String) {
    let (ready, reasons) = m.readiness();
    let sinks: Map<String, Value> = m
        .sink_health()
        .into_iter()
        .map(|(n, h)| {
            let v = match h {
                SinkHealth::Ok => json!({"state": "ok"}),
                SinkHealth::Failing(e) => json!({"state": "failing", "error": e}),
                SinkHealth::Detached(e) => json!({"state": "detached", "error": e}),
            };
            (n, v)
        })
        .collect();
    let (status, body) = if ready {
        (
            StatusCode::OK,
            json!({"status": "ready", "streaming": true, "sinks": sinks}),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not ready", "streaming": m.streaming(), "reasons": reasons, "sinks": sinks}),
        )
    };
    (status, "application/json", body.to_string())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn ask(port: u16, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn each_endpoint_answers_and_the_connection_closes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(super::serve(listener));
        let got = ask(port, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains(r#""status":"alive""#), "{got}");
        // Nothing streams in a unit test: not ready, with the reasons.
        let got = ask(port, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            got.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{got}"
        );
        assert!(got.contains("\"reasons\""), "{got}");
        let got = ask(port, "GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            got.contains("content-type: application/openmetrics-text; version=1.0.0"),
            "{got}"
        );
        assert!(got.contains("# TYPE "), "{got}");
        // HEAD: the headers of a GET, no body.
        let got = ask(port, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with("\r\n\r\n"),
            "{got}"
        );
        let got = ask(
            port,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(
            got.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{got}"
        );
        assert!(got.contains("allow: GET, HEAD"), "{got}");
        let got = ask(port, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 404 Not Found\r\n"), "{got}");
        // Garbage is refused without harm, and the server goes on.
        let got = ask(port, "\x16\x03\x01 not http\r\n\r\n").await;
        assert!(got.is_empty() || got.starts_with("HTTP/1.1 400"), "{got}");
        let got = ask(port, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    }
}
