//! The HTTP side: plain REST calls that work the same on Elasticsearch 7/8
//! and OpenSearch 1/2 (no mapping types, NDJSON `_bulk`).
//!
//! Every call maps its failure to a [`SinkError`]: the cluster being down,
//! slow, overloaded (429) or failing (5xx) is `Transient`; a refusal that
//! retrying cannot fix (bad credentials, missing privileges, a request too
//! large) is `Fatal` with what to change. Credentials travel only in the
//! `Authorization` header, which is marked sensitive, and the URL used in
//! requests and error messages never holds them.

use std::time::Duration;

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::config::ElasticsearchConfig;
use crate::sink::SinkError;

pub struct Client {
    http: reqwest::Client,
    base: Url,
    auth: Option<HeaderValue>,
}

/// One answered item of a `_bulk` request.
#[derive(Debug, Clone, Deserialize)]
pub struct ItemResult {
    pub status: u16,
    #[serde(default)]
    pub error: Option<Value>,
}

impl ItemResult {
    /// The error's `type`, e.g. `version_conflict_engine_exception`.
    pub fn error_type(&self) -> &str {
        self.error
            .as_ref()
            .and_then(|e| e.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// A document read back with `_mget`.
#[derive(Debug, Deserialize)]
pub struct Fetched {
    #[serde(default)]
    pub found: bool,
    #[serde(default, rename = "_version")]
    pub version: Option<u64>,
    #[serde(default, rename = "_source")]
    pub source: Option<Map<String, Value>>,
    #[serde(default)]
    pub error: Option<Value>,
}

impl Client {
    pub fn new(cfg: &ElasticsearchConfig) -> Result<Client, String> {
        let mut base = Url::parse(&cfg.url).map_err(|e| format!("url: {e}"))?;
        // Credentials in the URL become basic auth, and leave the URL.
        let mut user = cfg.username.clone();
        let mut pass = cfg.password.clone();
        if !base.username().is_empty() {
            let decode = |s: &str| {
                percent_decode(s)
                    .ok_or_else(|| "url: the credentials are not valid UTF-8".to_string())
            };
            user = Some(decode(base.username())?);
            pass = Some(decode(base.password().unwrap_or(""))?);
            let _ = base.set_username("");
            let _ = base.set_password(None);
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let auth = if let Some(key) = &cfg.api_key {
            let key = if key.contains(':') {
                base64(key.as_bytes())
            } else {
                key.clone()
            };
            Some(format!("ApiKey {key}"))
        } else {
            user.map(|u| {
                format!(
                    "Basic {}",
                    base64(format!("{u}:{}", pass.unwrap_or_default()).as_bytes())
                )
            })
        };
        let auth = match auth {
            Some(a) => {
                let mut v = HeaderValue::from_str(&a)
                    .map_err(|_| "the credentials hold characters not allowed in an HTTP header")?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(cfg.request_timeout_secs))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("pgferry/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &cfg.ca_file {
            let pem =
                std::fs::read(path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!(
                    "ca_file {}: not a PEM certificate file: {e}",
                    path.display()
                )
            })?;
            if certs.is_empty() {
                return Err(format!(
                    "ca_file {}: holds no PEM certificate",
                    path.display()
                ));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        Ok(Client { http, base, auth })
    }

    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty();
            p.extend(segments);
        }
        if !query.is_empty() {
            u.query_pairs_mut().extend_pairs(query);
        }
        u
    }

    /// Sends one request; transport failures are transient.
    pub async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<(Vec<u8>, &'static str)>,
    ) -> Result<(StatusCode, bytes::Bytes), SinkError> {
        let url = self.url(segments, query);
        let mut req = self.http.request(method.clone(), url.clone());
        if let Some(a) = &self.auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        if let Some((b, ctype)) = body {
            req = req.header(CONTENT_TYPE, ctype).body(b);
        }
        let what = format!("{method} {}", url.path());
        let resp = req.send().await.map_err(|e| {
            SinkError::transient(format!("{what} on {}: {}", self.base, error_chain(&e)))
                .caused_by(e)
        })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| {
            SinkError::transient(format!(
                "{what}: reading the response failed: {}",
                error_chain(&e)
            ))
            .caused_by(e)
        })?;
        Ok((status, body))
    }

    /// Like [`call`](Self::call), with a JSON body, and any non-2xx status an error.
    pub async fn json(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value, SinkError> {
        let what = format!("{method} /{}", segments.join("/"));
        let body = body.map(|b| {
            (
                serde_json::to_vec(b).unwrap_or_default(),
                "application/json",
            )
        });
        let (status, bytes) = self.call(method, segments, query, body).await?;
        if !status.is_success() {
            return Err(status_error(&what, status, &bytes));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| SinkError::transient(format!("{what}: the response is not JSON: {e}")))
    }

    /// `POST /_bulk` with an NDJSON body; one result per item, in order.
    pub async fn bulk(&self, body: Vec<u8>) -> Result<Vec<ItemResult>, SinkError> {
        #[derive(Deserialize)]
        struct Resp {
            #[serde(default)]
            items: Vec<std::collections::BTreeMap<String, ItemResult>>,
        }
        let (status, bytes) = self
            .call(
                Method::POST,
                &["_bulk"],
                &[("filter_path", "items.*.status,items.*.error")],
                Some((body, "application/x-ndjson")),
            )
            .await?;
        if !status.is_success() {
            return Err(status_error("POST /_bulk", status, &bytes));
        }
        let resp: Resp = serde_json::from_slice(&bytes)
            .map_err(|e| SinkError::transient(format!("POST /_bulk: unexpected response ({e})")))?;
        Ok(resp
            .items
            .into_iter()
            .map(|m| {
                m.into_values().next().unwrap_or(ItemResult {
                    status: 500,
                    error: None,
                })
            })
            .collect())
    }

    /// Reads documents by (index, id), in real time (unrefreshed writes included).
    pub async fn mget(&self, docs: &[(&str, &str)]) -> Result<Vec<Fetched>, SinkError> {
        #[derive(Deserialize)]
        struct Resp {
            docs: Vec<Fetched>,
        }
        let req: Vec<Value> = docs
            .iter()
            .map(|(i, id)| serde_json::json!({"_index": i, "_id": id}))
            .collect();
        let v = self
            .json(
                Method::POST,
                &["_mget"],
                &[],
                Some(&serde_json::json!({ "docs": req })),
            )
            .await?;
        let resp: Resp = serde_json::from_value(v)
            .map_err(|e| SinkError::transient(format!("POST /_mget: unexpected response ({e})")))?;
        if resp.docs.len() != docs.len() {
            return Err(SinkError::transient(format!(
                "POST /_mget: asked for {} documents, got {}",
                docs.len(),
                resp.docs.len()
            )));
        }
        Ok(resp.docs)
    }

    /// True when the index (or an alias of that name) exists.
    pub async fn index_exists(&self, index: &str) -> Result<bool, SinkError> {
        let (status, bytes) = self.call(Method::HEAD, &[index], &[], None).await?;
        match status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(status_error(&format!("HEAD /{index}"), s, &bytes)),
        }
    }

    /// Creates an index; one that already exists is fine.
    pub async fn create_index(&self, index: &str, body: &Value) -> Result<(), SinkError> {
        let what = format!("PUT /{index}");
        let (status, bytes) = self
            .call(
                Method::PUT,
                &[index],
                &[],
                Some((
                    serde_json::to_vec(body).unwrap_or_default(),
                    "application/json",
                )),
            )
            .await?;
        if status.is_success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&bytes);
        if status == StatusCode::BAD_REQUEST && text.contains("resource_already_exists_exception") {
            return Ok(());
        }
        if status == StatusCode::BAD_REQUEST {
            return Err(SinkError::fatal(format!(
                "{what}: the cluster refused to create the index: {}; fix mapping_file (or create the index yourself) and start pgferry again",
                reason(&bytes)
            )));
        }
        Err(status_error(&what, status, &bytes))
    }

    /// Makes every write to `index` visible to search. `false`: no such index.
    pub async fn refresh(&self, index: &str) -> Result<bool, SinkError> {
        let (status, bytes) = self
            .call(Method::POST, &[index, "_refresh"], &[], None)
            .await?;
        match status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(status_error(&format!("POST /{index}/_refresh"), s, &bytes)),
        }
    }

    /// Starts a scroll over every document id of `index`: (scroll id, ids).
    /// `None`: no such index.
    pub async fn scroll_start(
        &self,
        index: &str,
        size: usize,
    ) -> Result<Option<(Option<String>, Vec<String>)>, SinkError> {
        let body = serde_json::json!({
            "size": size,
            "_source": false,
            "sort": ["_doc"],
            "query": {"match_all": {}}
        });
        let (status, bytes) = self
            .call(
                Method::POST,
                &[index, "_search"],
                &[("scroll", "2m")],
                Some((body.to_string().into_bytes(), "application/json")),
            )
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(status_error(
                &format!("POST /{index}/_search"),
                status,
                &bytes,
            ));
        }
        Ok(Some(parse_hits(&bytes)?))
    }

    /// The next page of a scroll.
    pub async fn scroll_next(
        &self,
        scroll_id: &str,
    ) -> Result<(Option<String>, Vec<String>), SinkError> {
        let body = serde_json::json!({"scroll": "2m", "scroll_id": scroll_id});
        let (status, bytes) = self
            .call(
                Method::POST,
                &["_search", "scroll"],
                &[],
                Some((body.to_string().into_bytes(), "application/json")),
            )
            .await?;
        if !status.is_success() {
            return Err(status_error("POST /_search/scroll", status, &bytes));
        }
        parse_hits(&bytes)
    }

    /// Frees a scroll; failures only cost the cluster some memory until it expires.
    pub async fn scroll_clear(&self, scroll_id: &str) {
        let body = serde_json::json!({"scroll_id": [scroll_id]});
        let _ = self
            .call(
                Method::DELETE,
                &["_search", "scroll"],
                &[],
                Some((body.to_string().into_bytes(), "application/json")),
            )
            .await;
    }
}

fn parse_hits(bytes: &[u8]) -> Result<(Option<String>, Vec<String>), SinkError> {
    #[derive(Deserialize)]
    struct Hit {
        #[serde(rename = "_id")]
        id: String,
    }
    #[derive(Deserialize)]
    struct Hits {
        hits: Vec<Hit>,
    }
    #[derive(Deserialize)]
    struct Resp {
        #[serde(rename = "_scroll_id", default)]
        scroll_id: Option<String>,
        hits: Hits,
    }
    let r: Resp = serde_json::from_slice(bytes)
        .map_err(|e| SinkError::transient(format!("scroll search: unexpected response ({e})")))?;
    Ok((r.scroll_id, r.hits.hits.into_iter().map(|h| h.id).collect()))
}

/// `error.type: error.reason` of an error response, or its first 500 bytes.
pub fn reason(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(e) = v.get("error") {
            return describe_error(e);
        }
    }
    let text = String::from_utf8_lossy(body);
    truncate(&text, 500).to_string()
}

/// `type: reason` of an Elasticsearch error object.
pub fn describe_error(e: &Value) -> String {
    match (
        e.get("type").and_then(Value::as_str),
        e.get("reason").and_then(Value::as_str),
    ) {
        (Some(t), Some(r)) => format!("{t}: {}", truncate(r, 500)),
        (Some(t), None) => t.to_string(),
        _ => truncate(&e.to_string(), 500).to_string(),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Classifies a failed whole request.
pub fn status_error(what: &str, status: StatusCode, body: &[u8]) -> SinkError {
    let r = reason(body);
    match status.as_u16() {
        401 => SinkError::fatal(format!(
            "{what}: authentication failed ({status}: {r}); check username/password or api_key"
        )),
        403 => SinkError::fatal(format!(
            "{what}: not allowed ({status}: {r}); grant the sink's user the index privileges it needs (create_index, index, delete, read) on its indices"
        )),
        413 => SinkError::fatal(format!(
            "{what}: the cluster refused the request as too large ({status}); lower batch_max_bytes below the cluster's http.max_content_length"
        )),
        408 | 429 => SinkError::transient(format!("{what}: {status}: {r}")),
        s if s >= 500 => SinkError::transient(format!("{what}: {status}: {r}")),
        _ => SinkError::fatal(format!(
            "{what}: the cluster answered {status}: {r}; this request shape is expected to work on Elasticsearch 7/8 and OpenSearch 1/2, so check the url (is it a search cluster, behind a proxy that rewrites requests?)"
        )),
    }
}

/// The error and its causes, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    /// Answers one request with `status` and returns the request's head.
    fn one_shot_server(status: &'static str) -> (u16, std::thread::JoinHandle<String>) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                head.extend_from_slice(&buf[..n]);
            }
            let body = r#"{"error":{"type":"security_exception","reason":"nope"}}"#;
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            String::from_utf8_lossy(&head).to_string()
        });
        (port, h)
    }

    fn cfg(extra: &str, url: &str) -> ElasticsearchConfig {
        toml::from_str(&format!(
            "name = \"s\"\nurl = \"{url}\"\n{extra}\n[tables.\"public.t\"]\n"
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn credentials_travel_in_the_authorization_header_only() {
        // An "id:key" API key is base64-encoded.
        let (port, h) = one_shot_server("200 OK");
        let c = Client::new(&cfg(
            "api_key = \"kid:ksecret\"",
            &format!("http://127.0.0.1:{port}"),
        ))
        .unwrap();
        c.index_exists("x").await.unwrap();
        let head = h.join().unwrap();
        assert!(head.starts_with("HEAD /x HTTP/1.1"), "{head}");
        assert!(
            head.contains(&format!("ApiKey {}", base64(b"kid:ksecret"))),
            "{head}"
        );
        // Credentials in the URL become basic auth and leave the URL; a 401 stops.
        let (port, h) = one_shot_server("401 Unauthorized");
        let c = Client::new(&cfg(
            "",
            &format!("http://u%40x:p%3Ass@127.0.0.1:{port}/prefix"),
        ))
        .unwrap();
        let err = c.index_exists("idx").await.unwrap_err();
        let head = h.join().unwrap();
        assert!(head.starts_with("HEAD /prefix/idx HTTP/1.1"), "{head}");
        assert!(
            head.contains(&format!("Basic {}", base64(b"u@x:p:ss"))),
            "{head}"
        );
        let SinkError::Fatal { message: m, .. } = err else {
            panic!("{err}")
        };
        assert!(
            m.contains("authentication failed") && !m.contains("p%3Ass"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_cluster_is_transient_and_a_bad_ca_file_is_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Client::new(&cfg("", &format!("http://127.0.0.1:{port}"))).unwrap();
        assert!(matches!(
            c.index_exists("x").await,
            Err(SinkError::Transient { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let e = Client::new(&cfg(
            &format!("ca_file = \"{}\"", ca.display()),
            "https://h:9200",
        ))
        .err()
        .unwrap();
        assert!(e.contains("ca_file") && e.contains("PEM"), "{e}");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Ab%40c").as_deref(), Some("a:b@c"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%4"), Some("bad%4".into()));
    }
}
