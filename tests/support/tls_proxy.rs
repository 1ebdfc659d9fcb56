//! A TLS-terminating proxy with basic auth in front of a plain HTTP server,
//! for testing `https` URLs, `ca_file` and credentials against the test
//! OpenSearch node (which has neither TLS nor security).
//!
//! Certificates are made at start with the `openssl` command: a throwaway CA,
//! and a server certificate it signs for `localhost` and `127.0.0.1`.
//! Each connection's first request must carry the expected
//! `Authorization` header; otherwise it is answered 401 and closed. After
//! that the bytes are copied both ways.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::pg::make_certs;

pub struct TlsProxy {
    pub port: u16,
    /// The CA certificate (PEM) that signed the proxy's certificate.
    pub ca_file: PathBuf,
    /// Connections whose first request had the right credentials.
    pub authorized: Arc<AtomicU64>,
    /// Connections refused with 401.
    pub refused: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl TlsProxy {
    /// Proxies `https://127.0.0.1:PORT` to `http://127.0.0.1:upstream`,
    /// requiring `Authorization: <auth>`.
    pub fn start(dir: &Path, upstream: u16, auth: &str) -> TlsProxy {
        make_certs(dir);
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("server.pem"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (rt, listener, port) = super::proxy_listener();
        let authorized = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let expected = format!("authorization: {auth}").to_lowercase();
        let (ok, no) = (authorized.clone(), refused.clone());
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let expected = expected.clone();
                let (ok, no) = (ok.clone(), no.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    // The first request's head.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_lowercase();
                    if !text.lines().any(|l| l.trim_end() == expected) {
                        no.fetch_add(1, Ordering::Relaxed);
                        let body = r#"{"error":{"type":"security_exception","reason":"missing authentication credentials"},"status":401}"#;
                        let _ = tls
                            .write_all(
                                format!(
                                    "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                    body.len()
                                )
                                .as_bytes(),
                            )
                            .await;
                        let _ = tls.shutdown().await;
                        return;
                    }
                    ok.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    if up.write_all(&head).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        TlsProxy {
            port,
            ca_file: dir.join("ca.pem"),
            authorized,
            refused,
            _rt: rt,
        }
    }
}
