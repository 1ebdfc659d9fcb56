//! A fault-injecting HTTP/1.1 proxy in front of the test OpenSearch node.
//!
//! Every request is passed through unchanged (keep-alive on both sides, one
//! upstream connection per client connection), except the `_bulk` requests
//! a test arms a fault for: the proxy counts `POST /_bulk` requests from the
//! moment it starts, and the request whose number is armed gets its fault:
//!
//! - [`Fault::Refuse`]: answered `502 Bad Gateway` and not forwarded, as
//!   when a load balancer loses the node: nothing of the request is applied;
//! - [`Fault::Partial`]: the first half of its operations is forwarded (and
//!   applied by the node), then the client gets a 502, as when the node dies
//!   in the middle of a request;
//! - [`Fault::Hold`]: neither forwarded nor answered until
//!   [`FaultProxy::release`]; the test kills pgferry meanwhile (kill -9
//!   between two requests).
//!
//! [`FaultProxy::walk`] arms a fault at every request boundary of a batch
//! that the client retries whole: the first attempt fails at its first
//! request, the second at its second, and so on.
//!
//! Requests must carry `Content-Length` (reqwest always sends it for a
//! buffered body). Responses are relayed by `Content-Length`, chunked
//! framing, or up to the end of the connection.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// What the armed `_bulk` request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Refuse,
    Partial,
    Hold,
}

#[derive(Default)]
struct State {
    /// `_bulk` requests seen so far.
    bulks: u64,
    /// Armed faults by `_bulk` request number (1-based).
    armed: BTreeMap<u64, Fault>,
    /// Faults that happened, with the request number.
    fired: Vec<(u64, Fault)>,
    /// Requests being held.
    held: u64,
}

pub struct FaultProxy {
    pub port: u16,
    state: Arc<Mutex<State>>,
    release: Arc<tokio::sync::Notify>,
    _rt: tokio::runtime::Runtime,
}

impl FaultProxy {
    /// Proxies `http://127.0.0.1:PORT` to `http://127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> FaultProxy {
        let (rt, listener, port) = super::proxy_listener();
        let state = Arc::new(Mutex::new(State::default()));
        let release = Arc::new(tokio::sync::Notify::new());
        let (st, rel) = (state.clone(), release.clone());
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (st, rel) = (st.clone(), rel.clone());
                tokio::spawn(async move {
                    let _ = serve(client, upstream, st, rel).await;
                });
            }
        });
        FaultProxy {
            port,
            state,
            release,
            _rt: rt,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `_bulk` requests seen so far.
    pub fn bulk_requests(&self) -> u64 {
        self.state().bulks
    }

    /// Arms `fault` for the `n`th `_bulk` request from now (`n` ≥ 1).
    pub fn arm(&self, n: u64, fault: Fault) {
        let mut s = self.state();
        let at = s.bulks + n;
        s.armed.insert(at, fault);
    }

    /// Arms a fault at each of the first `boundaries` request boundaries of
    /// a batch that is retried whole after each failure: attempt `k` passes
    /// its first `k - 1` requests and fails its `k`th.
    pub fn walk(&self, boundaries: u64, fault: Fault) {
        let mut s = self.state();
        let mut at = s.bulks;
        for k in 1..=boundaries {
            at += k;
            s.armed.insert(at, fault);
        }
    }

    /// The faults that happened: (request number counted from the start, fault).
    pub fn fired(&self) -> Vec<(u64, Fault)> {
        self.state().fired.clone()
    }

    /// Faults armed that did not happen yet.
    pub fn pending(&self) -> usize {
        self.state().armed.len()
    }

    /// Waits until a request is held (see [`Fault::Hold`]).
    pub fn wait_held(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.state().held == 0 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Drops the held requests' connections without an answer.
    pub fn release(&self) {
        self.state().held = 0;
        self.release.notify_waiters();
    }
}

/// One request as read from the client.
struct Request {
    /// Request line and headers, without the blank line.
    head: Vec<String>,
    body: Vec<u8>,
}

impl Request {
    fn method_path(&self) -> (&str, &str) {
        let mut parts = self.head[0].split(' ');
        (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
    }

    /// The request with `body` and a matching `Content-Length`.
    fn encode(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 512);
        for line in &self.head {
            if !line.to_ascii_lowercase().starts_with("content-length:") {
                out.extend_from_slice(line.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
        out
    }
}

/// Reads header lines up to the blank line; `None` at a clean end of stream.
async fn read_head<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return if lines.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            return Ok(Some(lines));
        }
        lines.push(line);
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<Request>> {
    let Some(head) = read_head(r).await? else {
        return Ok(None);
    };
    assert!(
        header(&head, "transfer-encoding").is_none(),
        "the fault proxy needs requests with content-length: {head:?}"
    );
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    Ok(Some(Request { head, body }))
}

/// Reads one response from upstream, framing included, as raw bytes.
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    head_request: bool,
) -> std::io::Result<Vec<u8>> {
    let head = read_head(r)
        .await?
        .ok_or(std::io::ErrorKind::UnexpectedEof)?;
    let mut out = Vec::new();
    for l in &head {
        out.extend_from_slice(l.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let status: u16 = head[0]
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(out);
    }
    if let Some(len) = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        let start = out.len();
        out.resize(start + len, 0);
        r.read_exact(&mut out[start..]).await?;
    } else if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size_line = String::new();
            r.read_line(&mut size_line).await?;
            out.extend_from_slice(size_line.as_bytes());
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            let start = out.len();
            out.resize(start + size + 2, 0);
            r.read_exact(&mut out[start..]).await?;
            if size == 0 {
                break;
            }
        }
    } else {
        r.read_to_end(&mut out).await?;
    }
    Ok(out)
}

/// The first half (rounded down, at least one) of a `_bulk` body's operations.
fn first_half(body: &[u8]) -> Vec<u8> {
    let lines: Vec<&[u8]> = body
        .split_inclusive(|b| *b == b'\n')
        .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()))
        .collect();
    // An operation is its action line, plus a source line unless it is a delete.
    let mut ops: Vec<Vec<u8>> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let mut op = lines[i].to_vec();
        let is_delete = lines[i].starts_with(b"{\"delete\"");
        i += 1;
        if !is_delete && i < lines.len() {
            op.extend_from_slice(lines[i]);
            i += 1;
        }
        ops.push(op);
    }
    let keep = (ops.len() / 2).max(1);
    ops.into_iter().take(keep).flatten().collect()
}

/// The answer to a failed request.
fn bad_gateway() -> Vec<u8> {
    let body = r#"{"error":"injected by the test proxy","status":502}"#;
    format!(
        "HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn serve(
    client: TcpStream,
    upstream: u16,
    state: Arc<Mutex<State>>,
    release: Arc<tokio::sync::Notify>,
) -> std::io::Result<()> {
    let (cr, mut cw) = client.into_split();
    let mut cr = BufReader::new(cr);
    let up = TcpStream::connect(("127.0.0.1", upstream)).await?;
    let (ur, mut uw) = up.into_split();
    let mut ur = BufReader::new(ur);
    while let Some(req) = read_request(&mut cr).await? {
        let (method, path) = req.method_path();
        let fault = if method == "POST" && (path == "/_bulk" || path.starts_with("/_bulk?")) {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.bulks += 1;
            let n = s.bulks;
            let f = s.armed.remove(&n);
            if let Some(f) = f {
                s.fired.push((n, f));
                if f == Fault::Hold {
                    s.held += 1;
                }
            }
            f
        } else {
            None
        };
        let head_request = method == "HEAD";
        match fault {
            None => {
                uw.write_all(&req.encode(&req.body)).await?;
                let resp = read_response(&mut ur, head_request).await?;
                cw.write_all(&resp).await?;
            }
            Some(Fault::Refuse) => cw.write_all(&bad_gateway()).await?,
            Some(Fault::Partial) => {
                uw.write_all(&req.encode(&first_half(&req.body))).await?;
                read_response(&mut ur, false).await?;
                cw.write_all(&bad_gateway()).await?;
            }
            Some(Fault::Hold) => {
                // Until released, or until the client goes away (killed).
                tokio::select! {
                    _ = release.notified() => {}
                    _ = cr.fill_buf() => {}
                }
                return Ok(());
            }
        }
    }
    Ok(())
}
