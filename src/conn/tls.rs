//! TLS to Postgres, the same for every connection pgferry opens.
//!
//! The settings are libpq's: `sslmode` (`disable`, `prefer`, `require`,
//! `verify-ca`, `verify-full`), `sslrootcert` (a PEM file, or `system` for
//! the system trust store), `sslcert` and `sslkey` (a PEM client
//! certificate and its key, for `cert` authentication), `sslpassword` (the
//! password of a PKCS#8 encrypted `sslkey`; never logged, redacted from
//! `Debug`), `sslcrl` (a PEM file of certificate revocation lists that the
//! server's certificate chain is checked against in `verify-ca` and
//! `verify-full`). They
//! come from the connection string (`?sslmode=verify-full&sslrootcert=…`);
//! `[source.tls]` keys are folded into `source.url` at config load, so every
//! connection sees one string. [`parse_url`] takes them out of the string
//! (tokio-postgres knows only `disable`, `prefer` and `require`) and gives
//! the shared [`TlsSetup`]: one rustls `ClientConfig` per distinct setting,
//! built once and shared by every connection (the replication connection,
//! the SQL connections, the snapshot workers, the observer, `check`).
//!
//! The replication connection does its SSLRequest itself ([`negotiate`]);
//! the SQL connections go through tokio-postgres with [`MakeRustls`].
//! A certificate problem ends in a [`TlsError`] whose text names the check
//! that failed and the setting that fixes it; it is never retried.
//!
//! This module is a leaf: it imports nothing from the crate, so the config
//! can validate TLS settings at load without a circle.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// `sslmode`, as libpq defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, plain otherwise; no certificate check
    /// (libpq's default).
    #[default]
    Prefer,
    /// TLS or nothing; no certificate check (with `sslrootcert` set, like
    /// libpq, it checks the chain as `verify-ca` does).
    Require,
    /// TLS, the server's certificate chain checked against `sslrootcert`.
    VerifyCa,
    /// `verify-ca`, and the host name checked against the certificate's SAN.
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// The TLS keys of a connection string (each `None` when absent); also
/// `[source.tls]` in the config file.
#[derive(Clone, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsParams {
    pub sslmode: Option<SslMode>,
    /// A PEM file of CA certificates, or `system`.
    pub sslrootcert: Option<String>,
    /// A PEM client certificate (chain).
    pub sslcert: Option<String>,
    /// The client certificate's private key (PEM: unencrypted, or PKCS#8
    /// encrypted with `sslpassword`). A path, never the key itself.
    pub sslkey: Option<String>,
    /// The password of an encrypted `sslkey`. A secret: `Debug` shows
    /// `***`.
    pub sslpassword: Option<String>,
    /// A PEM file of CRLs (`verify-ca`, `verify-full`).
    pub sslcrl: Option<String>,
}

impl std::fmt::Debug for TlsParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsParams")
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .field("sslpassword", &self.sslpassword.as_ref().map(|_| "***"))
            .field("sslcrl", &self.sslcrl)
            .finish()
    }
}

impl TlsParams {
    /// The keys that are set, as (name, value).
    pub fn entries(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(m) = self.sslmode {
            out.push(("sslmode", m.as_str().to_string()));
        }
        for (k, v) in [
            ("sslrootcert", &self.sslrootcert),
            ("sslcert", &self.sslcert),
            ("sslkey", &self.sslkey),
            ("sslpassword", &self.sslpassword),
            ("sslcrl", &self.sslcrl),
        ] {
            if let Some(v) = v {
                out.push((k, v.clone()));
            }
        }
        out
    }

    /// Whether `key` is set.
    pub fn is_set(&self, key: &str) -> bool {
        self.entries().iter().any(|(k, _)| *k == key)
    }

    /// The mode in force: `prefer` by default; `require` with a root
    /// certificate is `verify-ca`, as in libpq.
    pub fn mode(&self) -> SslMode {
        match (self.sslmode.unwrap_or_default(), &self.sslrootcert) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (m, _) => m,
        }
    }

    /// Checks the combination and that every file exists; the error is
    /// `(key, message)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let mode = self.mode();
        if mode.verifies() && self.sslrootcert.is_none() {
            return Err((
                "sslrootcert",
                format!(
                    "is not set, but sslmode={} checks the server's certificate against it: set sslrootcert to the CA file that signed the server's certificate, or to `system` for the system trust store",
                    mode.as_str()
                ),
            ));
        }
        if self.sslcrl.is_some() && !mode.verifies() {
            return Err((
                "sslcrl",
                format!(
                    "is set, but sslmode={} does not check the server's certificate, so no CRL would be consulted: set sslmode=verify-full (or verify-ca) with sslrootcert",
                    mode.as_str()
                ),
            ));
        }
        if self.sslpassword.is_some() && self.sslkey.is_none() {
            return Err((
                "sslpassword",
                "is set, but sslkey is not: sslpassword decrypts the client key that sslkey names; set sslkey (and sslcert), or remove sslpassword".into(),
            ));
        }
        if self.sslcert.is_some() != self.sslkey.is_some() {
            return Err((
                if self.sslcert.is_some() { "sslkey" } else { "sslcert" },
                "must be set together with the other: sslcert is the client certificate, sslkey its private key".into(),
            ));
        }
        for (key, path) in [
            ("sslrootcert", &self.sslrootcert),
            ("sslcert", &self.sslcert),
            ("sslkey", &self.sslkey),
            ("sslcrl", &self.sslcrl),
        ] {
            let Some(p) = path else { continue };
            if key == "sslrootcert" && p == "system" {
                continue;
            }
            if !Path::new(p).is_file() {
                return Err((
                    key,
                    format!(
                        "names {p:?}, which is not a readable file: give the path of a PEM file"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The keys [`split_url`] takes out of a connection string.
const KEYS: [&str; 6] = [
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
];

/// Splits a connection string (URL or `key=value` form) into the string
/// without its TLS keys and those keys.
pub fn split_url(url: &str) -> Result<(String, TlsParams), String> {
    let mut params = TlsParams::default();
    let mut set = |k: &str, v: String| -> Result<(), String> {
        match k {
            "sslmode" => {
                params.sslmode = Some(SslMode::parse(&v).ok_or_else(|| {
                    format!(
                    "sslmode={v} is not one of disable, prefer, require, verify-ca, verify-full"
                )
                })?)
            }
            "sslrootcert" => params.sslrootcert = Some(v),
            "sslcert" => params.sslcert = Some(v),
            "sslkey" => params.sslkey = Some(v),
            "sslcrl" => params.sslcrl = Some(v),
            _ => params.sslpassword = Some(v),
        }
        Ok(())
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), params));
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if KEYS.contains(&k) {
                set(k, percent_decode(v)?)?;
            } else if !pair.is_empty() {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, params));
    }
    // key=value form: values may be 'quoted' with \ escapes.
    let mut rest = String::new();
    let mut chars = url.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut key = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|&(_, c)| c.is_whitespace()) {
            chars.next();
        }
        if chars.next().map(|(_, c)| c) != Some('=') {
            return Err(format!("{key:?} has no value (key=value expected)"));
        }
        while chars.peek().is_some_and(|&(_, c)| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek().map(|&(_, c)| c) == Some('\'') {
            chars.next();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next().map(|(_, c)| c)),
                    Some(c) => value.push(c),
                    None => return Err(format!("the value of {key:?} has no closing quote")),
                }
            }
        } else {
            while let Some(&(_, c)) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        let end = chars.peek().map_or(url.len(), |&(i, _)| i);
        if KEYS.contains(&key.as_str()) {
            set(&key, value)?;
        } else {
            if !rest.is_empty() {
                rest.push(' ');
            }
            rest.push_str(&url[start..end]);
        }
    }
    Ok((rest, params))
}

/// `url` with `key=value` added in its own syntax (for `[source.tls]`).
pub fn add_param(url: &str, key: &str, value: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        let mut enc = String::new();
        for b in value.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                enc.push(b as char);
            } else {
                enc.push_str(&format!("%{b:02X}"));
            }
        }
        format!("{url}{sep}{key}={enc}")
    } else {
        let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
        format!("{url} {key}='{quoted}'")
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// Parses a connection string: the tokio-postgres configuration (its
/// `sslmode` set to what tokio-postgres knows) and the shared TLS setup.
pub fn parse_url(url: &str) -> Result<(tokio_postgres::Config, Arc<TlsSetup>), String> {
    let (rest, params) = split_url(url)?;
    let mut pg: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}"))?;
    let setup = TlsSetup::shared(&params)?;
    pg.ssl_mode(match setup.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    Ok((pg, setup))
}

/// One TLS setting made ready: the mode and, unless it is `disable`, the
/// rustls configuration every connection with this setting shares.
pub struct TlsSetup {
    pub mode: SslMode,
    /// Where the root certificates come from (a path, or `system`).
    pub rootcert: Option<String>,
    /// The CRL file the chain is checked against.
    pub crl: Option<String>,
    pub client_cert: bool,
    config: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("mode", &self.mode)
            .field("rootcert", &self.rootcert)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

impl TlsSetup {
    /// The setup for `params`, built on first use and shared after.
    pub fn shared(params: &TlsParams) -> Result<Arc<TlsSetup>, String> {
        static CACHE: OnceLock<Mutex<HashMap<TlsParams, Arc<TlsSetup>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(s) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(params) {
            return Ok(s.clone());
        }
        let setup = Arc::new(TlsSetup::build(params)?);
        cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(params.clone(), setup.clone());
        Ok(setup)
    }

    /// Builds the rustls configuration (reads and parses the PEM files).
    pub fn build(params: &TlsParams) -> Result<TlsSetup, String> {
        params.validate().map_err(|(k, m)| format!("{k} {m}"))?;
        let mode = params.mode();
        let mut setup = TlsSetup {
            mode,
            rootcert: params.sslrootcert.clone(),
            crl: params.sslcrl.clone(),
            client_cert: params.sslcert.is_some(),
            config: None,
        };
        if mode == SslMode::Disable {
            return Ok(setup);
        }
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = if mode.verifies() {
            let roots = Arc::new(load_roots(
                params.sslrootcert.as_deref().unwrap_or("system"),
            )?);
            let mut webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone());
            if let Some(crl) = &params.sslcrl {
                webpki = webpki.with_crls(load_crls(crl)?);
            }
            let webpki = webpki.build().map_err(|e| match &params.sslcrl {
                Some(crl) => format!("sslcrl {crl:?} (or sslrootcert): {e}"),
                None => format!("sslrootcert: {e}"),
            })?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(Relaxed {
                    chain: Some(webpki),
                    provider: provider.clone(),
                })
            }
        } else {
            Arc::new(Relaxed {
                chain: None,
                provider: provider.clone(),
            })
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&params.sslcert, &params.sslkey) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("sslcert {cert:?}: not a PEM certificate file: {e}"))?;
                if chain.is_empty() {
                    return Err(format!("sslcert {cert:?} holds no certificate"));
                }
                let key_der = load_key(key, params.sslpassword.as_deref())?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| format!("sslcert/sslkey: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        setup.config = Some(Arc::new(config));
        Ok(setup)
    }

    /// A setup with tokio-postgres's own mode only (no files).
    pub fn for_mode(mode: tokio_postgres::config::SslMode) -> Arc<TlsSetup> {
        let sslmode = match mode {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        TlsSetup::shared(&TlsParams {
            sslmode: Some(sslmode),
            ..Default::default()
        })
        .expect("a setting without files always builds")
    }

    fn connector(&self) -> Option<tokio_rustls::TlsConnector> {
        self.config.clone().map(tokio_rustls::TlsConnector::from)
    }
}

/// Reads the client key `path`: an unencrypted PEM key (PKCS#8, PKCS#1 or
/// SEC1), or a PKCS#8 encrypted one (`BEGIN ENCRYPTED PRIVATE KEY`, what
/// `openssl pkcs8 -topk8 -v2 aes-256-cbc` writes) decrypted with
/// `password`. The error names the key that fixes it and never holds the
/// password or key material.
fn load_key(path: &str, password: Option<&str>) -> Result<PrivateKeyDer<'static>, String> {
    use pkcs8::der::zeroize::Zeroizing;
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("sslkey {path:?}: cannot be read as a PEM file: {e}"))?,
    );
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(format!(
            "sslkey {path:?} is encrypted in the legacy OpenSSL format (Proc-Type: 4,ENCRYPTED), which pgferry cannot read: convert it to an encrypted PKCS#8 key (openssl pkcs8 -topk8 -v2 aes-256-cbc -in OLD -out NEW) and keep sslpassword"
        ));
    }
    if !text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        return PrivateKeyDer::from_pem_slice(text.as_bytes())
            .map_err(|e| format!("sslkey {path:?}: not a PEM private key: {e}"));
    }
    let Some(password) = password else {
        return Err(format!(
            "sslpassword is not set, but sslkey {path:?} is encrypted: set sslpassword to its password (in source.url or [source.tls])"
        ));
    };
    let (label, doc) = pkcs8::Document::from_pem(&text)
        .map_err(|e| format!("sslkey {path:?}: not a valid encrypted PKCS#8 PEM key: {e}"))?;
    if label != "ENCRYPTED PRIVATE KEY" {
        return Err(format!("sslkey {path:?}: unexpected PEM block {label:?}"));
    }
    let info = pkcs8::EncryptedPrivateKeyInfo::try_from(doc.as_bytes())
        .map_err(|e| format!("sslkey {path:?}: not a valid encrypted PKCS#8 key: {e}"))?;
    // A wrong password shows as bad padding (pkcs5 0.7 reports it as
    // EncryptFailed) or, rarely, as a plaintext that is not DER.
    let plain = info.decrypt(password).map_err(|e| match e {
        pkcs8::Error::EncryptedPrivateKey(
            pkcs8::pkcs5::Error::DecryptFailed | pkcs8::pkcs5::Error::EncryptFailed,
        )
        | pkcs8::Error::Asn1(_) => format!(
            "sslpassword does not decrypt sslkey {path:?}: the password is wrong"
        ),
        e => format!(
            "sslkey {path:?}: cannot decrypt it ({e}): check sslpassword; pgferry reads PBES2 keys (PBKDF2 or scrypt with AES-CBC): re-encrypt with openssl pkcs8 -topk8 -v2 aes-256-cbc"
        ),
    })?;
    Ok(PrivateKeyDer::Pkcs8(plain.as_bytes().to_vec().into()))
}

/// The CRLs of `path` (PEM, `BEGIN X509 CRL`), as libpq's `sslcrl` reads.
fn load_crls(
    path: &str,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, String> {
    let crls = rustls::pki_types::CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("sslcrl {path:?}: not a PEM CRL file: {e}"))?;
    if crls.is_empty() {
        return Err(format!(
            "sslcrl {path:?} holds no CRL (PEM `BEGIN X509 CRL` expected; convert a DER one with openssl crl -inform DER)"
        ));
    }
    Ok(crls)
}

fn load_roots(rootcert: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if rootcert == "system" {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(
                "sslrootcert=system: the system trust store holds no certificate (install ca-certificates, or give sslrootcert a CA file)".into(),
            );
        }
        return Ok(roots);
    }
    let certs = CertificateDer::pem_file_iter(rootcert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("sslrootcert {rootcert:?}: not a PEM certificate file: {e}"))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "sslrootcert {rootcert:?} holds no usable CA certificate (PEM expected)"
        ));
    }
    Ok(roots)
}

/// `verify-ca` (the chain is checked against the roots, the name is not)
/// and `prefer`/`require` (`chain: None`: nothing is checked). The
/// handshake's signatures are checked in both.
#[derive(Debug)]
struct Relaxed {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a connection's TLS turned out to be, for `pgferry check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3`, `TLSv1.2`.
    pub protocol: String,
    /// The name the certificate was checked against (SNI).
    pub server_name: String,
    pub mode: SslMode,
}

impl TlsInfo {
    fn of(conn: &rustls::ClientConnection, server_name: &str, mode: SslMode) -> TlsInfo {
        let protocol = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(v) => format!("{v:?}"),
            None => "unknown".into(),
        };
        TlsInfo {
            protocol,
            server_name: server_name.to_string(),
            mode,
        }
    }

    /// One line: `TLSv1.3, server name localhost verified (verify-full)`.
    pub fn describe(&self) -> String {
        match self.mode {
            SslMode::VerifyFull => format!(
                "TLS on ({}), certificate verified for server name {} (sslmode=verify-full)",
                self.protocol, self.server_name
            ),
            SslMode::VerifyCa => format!(
                "TLS on ({}), certificate chain verified, server name {} not checked (sslmode=verify-ca)",
                self.protocol, self.server_name
            ),
            m => format!(
                "TLS on ({}), certificate NOT verified (sslmode={}; use verify-full with sslrootcert to check it)",
                self.protocol,
                m.as_str()
            ),
        }
    }
}

/// A TLS failure that no retry fixes: the text names the check and the fix.
#[derive(Debug, Clone)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// Explains a failed handshake: a [`TlsError`] when it is the certificate
/// or the configuration, the I/O error itself otherwise (worth a retry).
pub fn explain(e: io::Error, setup: &TlsSetup, host: &str) -> Result<io::Error, TlsError> {
    let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return Ok(e);
    };
    let root = setup.rootcert.as_deref().unwrap_or("(not set)");
    let crl = setup.crl.as_deref().unwrap_or("(not set)");
    let mode = setup.mode.as_str();
    Err(TlsError(match err {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => format!(
                "TLS certificate check failed (sslmode={mode}, CA check): the server's certificate is signed by an unknown CA, not by one in sslrootcert={root}: set sslrootcert to the CA file that signed the server's certificate"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "TLS hostname check failed (sslmode=verify-full): the server's certificate is not valid for the host {host:?}: connect with a host name its subjectAltName lists, or use sslmode=verify-ca to check the CA only"
            ),
            CertificateError::Revoked => format!(
                "TLS certificate check failed (sslmode={mode}, CRL check): the server's certificate is revoked by the CRL in sslcrl={crl}: the server needs a new certificate (ssl_cert_file)"
            ),
            CertificateError::UnknownRevocationStatus => format!(
                "TLS certificate check failed (sslmode={mode}, CRL check): sslcrl={crl} holds no CRL from the CA that issued the server's certificate (or an intermediate of its chain): add that CA's CRL to sslcrl"
            ),
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => format!(
                "TLS certificate check failed (sslmode={mode}, CRL check): the CRL in sslcrl={crl} is past its next update: fetch a current CRL"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "TLS certificate check failed (sslmode={mode}, validity): the server's certificate has expired: renew it on the server"
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
                "TLS certificate check failed (sslmode={mode}, validity): the server's certificate is not valid yet: check the clocks"
            ),
            other => format!(
                "TLS certificate check failed (sslmode={mode}): {other:?}: check the server's certificate and sslrootcert={root}"
            ),
        },
        rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion) => format!(
            "TLS handshake refused by the server (ProtocolVersion, sslmode={mode}): the server accepts no TLS version pgferry speaks (TLS 1.2 and 1.3): set ssl_min_protocol_version / ssl_max_protocol_version in the server's postgresql.conf to allow TLSv1.2 or TLSv1.3"
        ),
        rustls::Error::AlertReceived(
            alert @ (rustls::AlertDescription::HandshakeFailure
            | rustls::AlertDescription::InsufficientSecurity),
        ) if !setup.client_cert => format!(
            "TLS handshake refused by the server ({alert:?}, sslmode={mode}): the server and pgferry share no TLS cipher suite (pgferry offers TLS 1.3, and TLS 1.2 ECDHE with AES-GCM or ChaCha20-Poly1305): allow one in the server's ssl_ciphers (and ssl_max_protocol_version) in postgresql.conf"
        ),
        rustls::Error::AlertReceived(alert) => format!(
            "TLS handshake refused by the server ({alert:?}){}",
            if setup.client_cert {
                ": the server does not accept pgferry's client certificate: set sslcert/sslkey to a certificate signed by the server's ssl_ca_file, with CN equal to the user"
            } else {
                ": if the server requires a client certificate, set sslcert and sslkey"
            }
        ),
        other => format!("TLS handshake failed (sslmode={mode}): {other}"),
    }))
}

/// A hint for the server's refusal of a connection without TLS, when that
/// is what the message says.
pub fn refusal_hint(message: &str) -> Option<&'static str> {
    (message.contains("no encryption")).then_some(
        "the server accepts this connection only over TLS (a hostssl line in pg_hba.conf): set sslmode=verify-full with sslrootcert (or at least sslmode=require) in source.url or [source.tls]",
    )
}

/// The fix for a TLS failure, from its message (for `pgferry check`).
pub fn fix_for(message: &str) -> Option<&'static str> {
    Some(if message.contains("unknown CA") {
        "set sslrootcert (in source.url or [source.tls]) to the CA file that signed the server's certificate (the server's ssl_cert_file's issuer), or to system for a publicly trusted one"
    } else if message.contains("CRL check") {
        "the server's certificate fails the revocation check against sslcrl: give the server a certificate that is not revoked, or sslcrl a current CRL from its CA"
    } else if message.contains("hostname check failed") {
        "connect with a host name that the server certificate's subjectAltName lists, or use sslmode=verify-ca to check the CA only"
    } else if message.contains("no encryption") {
        "set sslmode=verify-full with sslrootcert (or at least sslmode=require): the server accepts this connection over TLS only"
    } else if message.contains("does not accept TLS") {
        "turn on ssl (ssl = on, ssl_cert_file, ssl_key_file) in the server's postgresql.conf, or on a trusted network only set sslmode=prefer"
    } else if message.contains("share no TLS cipher suite") || message.contains("no TLS version") {
        "allow TLS 1.3, or TLS 1.2 with an ECDHE AES-GCM or ChaCha20-Poly1305 suite, in the server's ssl_ciphers and ssl_min/max_protocol_version"
    } else if message.contains("client certificate") {
        "set sslcert and sslkey to a client certificate signed by the server's ssl_ca_file, whose CN is the user"
    } else if message.contains("TLS") {
        "check the server's certificate against sslmode and sslrootcert (in source.url or [source.tls])"
    } else {
        return None;
    })
}

/// A byte stream that is plain or TLS (after [`negotiate`]); the caller
/// boxes either as its stream.
pub enum MaybeTls<S> {
    Plain(S),
    Tls(Box<tokio_rustls::client::TlsStream<S>>),
}

/// Why [`negotiate`] failed.
#[derive(Debug)]
pub enum NegotiateError {
    Io(io::Error),
    Tls(TlsError),
    /// The server agreed to TLS (it answered `S`), then the handshake
    /// failed; inside, `Io` or `Tls` as above. With `sslmode=prefer` the
    /// caller connects again without TLS, as libpq does.
    Handshake(Box<NegotiateError>),
}

impl NegotiateError {
    /// The I/O error (worth a retry) or the TLS error (not), whether or
    /// not the handshake had begun.
    pub fn io_or_tls(self) -> Result<io::Error, TlsError> {
        match self {
            NegotiateError::Io(e) => Ok(e),
            NegotiateError::Tls(e) => Err(e),
            NegotiateError::Handshake(e) => e.io_or_tls(),
        }
    }
}

/// The outcome of [`negotiate`]: the stream, and its TLS facts when on.
pub struct Negotiated<S> {
    pub stream: MaybeTls<S>,
    pub info: Option<TlsInfo>,
    /// `tls-server-end-point` channel-binding data (RFC 5929).
    pub end_point: Option<Vec<u8>>,
}

/// Sends the SSLRequest on a fresh TCP connection and, when the server
/// agrees, does the TLS handshake against `host`.
pub async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    setup: &TlsSetup,
    host: &str,
) -> Result<Negotiated<S>, NegotiateError> {
    let Some(connector) = setup.connector() else {
        return Ok(Negotiated {
            stream: MaybeTls::Plain(stream),
            info: None,
            end_point: None,
        });
    };
    // SSLRequest: length 8, code 80877103.
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&8i32.to_be_bytes());
    req[4..].copy_from_slice(&80877103i32.to_be_bytes());
    stream.write_all(&req).await.map_err(NegotiateError::Io)?;
    stream.flush().await.map_err(NegotiateError::Io)?;
    let answer = stream.read_u8().await.map_err(NegotiateError::Io)?;
    match answer {
        b'S' => {}
        b'N' if setup.mode == SslMode::Prefer => {
            return Ok(Negotiated {
                stream: MaybeTls::Plain(stream),
                info: None,
                end_point: None,
            })
        }
        b'N' => {
            return Err(NegotiateError::Tls(TlsError(format!(
                "the server does not accept TLS connections (it answered the SSLRequest with N), but sslmode={} needs TLS: turn on ssl in the server's postgresql.conf, or (on a trusted network only) set sslmode=prefer",
                setup.mode.as_str()
            ))))
        }
        other => {
            return Err(NegotiateError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer {:?} to the SSLRequest", other as char),
            )))
        }
    }
    let name = server_name(host).map_err(NegotiateError::Tls)?;
    let tls = connector.connect(name, stream).await.map_err(|e| {
        NegotiateError::Handshake(Box::new(match explain(e, setup, host) {
            Ok(io) => NegotiateError::Io(io),
            Err(t) => NegotiateError::Tls(t),
        }))
    })?;
    let (_, conn) = tls.get_ref();
    let info = TlsInfo::of(conn, host, setup.mode);
    let end_point = end_point(conn);
    Ok(Negotiated {
        stream: MaybeTls::Tls(Box::new(tls)),
        info: Some(info),
        end_point,
    })
}

fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_string())
        .map_err(|e| TlsError(format!("TLS: {host:?} is not a valid server name: {e}")))
}

/// `tls-server-end-point` data: the hash of the server's certificate with
/// its signature's hash (SHA-256 for MD5, SHA-1 and the rest), RFC 5929.
fn end_point(conn: &rustls::ClientConnection) -> Option<Vec<u8>> {
    let cert = conn.peer_certificates()?.first()?;
    let alg = match signature_oid(cert) {
        Some(oid) if oid.ends_with(&[0x01, 0x01, 0x0c]) || oid.ends_with(&[0x04, 0x03, 0x03]) => {
            &ring::digest::SHA384
        }
        Some(oid) if oid.ends_with(&[0x01, 0x01, 0x0d]) || oid.ends_with(&[0x04, 0x03, 0x04]) => {
            &ring::digest::SHA512
        }
        _ => &ring::digest::SHA256,
    };
    Some(ring::digest::digest(alg, cert.as_ref()).as_ref().to_vec())
}

/// The OID bytes of a DER certificate's outer signatureAlgorithm.
fn signature_oid(der: &[u8]) -> Option<&[u8]> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&l, rest) = rest.split_first()?;
        let (len, rest) = if l < 0x80 {
            (l as usize, rest)
        } else {
            let n = (l & 0x7f) as usize;
            if n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, _tbs, after) = tlv(cert)?;
    let (_, alg, _) = tlv(after)?;
    let (tag, oid, _) = tlv(alg)?;
    (tag == 0x06).then_some(oid)
}

/// tokio-postgres's TLS for the SQL connections: the shared configuration,
/// with what the last handshake found kept for `check`.
#[derive(Clone)]
pub struct MakeRustls {
    setup: Arc<TlsSetup>,
    pub info: Arc<Mutex<Option<TlsInfo>>>,
    /// Set when a server agreed to TLS and the handshake began: a failure
    /// after that is one `sslmode=prefer` retries without TLS.
    pub tried: Arc<AtomicBool>,
}

impl MakeRustls {
    pub fn new(setup: Arc<TlsSetup>) -> MakeRustls {
        MakeRustls {
            setup,
            info: Default::default(),
            tried: Default::default(),
        }
    }
}

pub struct RustlsConnect {
    setup: Arc<TlsSetup>,
    host: String,
    info: Arc<Mutex<Option<TlsInfo>>>,
    tried: Arc<AtomicBool>,
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, TlsError> {
        Ok(RustlsConnect {
            setup: self.setup.clone(),
            host: domain.to_string(),
            info: self.info.clone(),
            tried: self.tried.clone(),
        })
    }
}

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, Self::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            self.tried.store(true, Ordering::Relaxed);
            let connector = self
                .setup
                .connector()
                .ok_or_else(|| TlsError("TLS asked for with sslmode=disable".into()))?;
            let name = server_name(&self.host)?;
            let tls = match connector.connect(name, stream).await {
                Ok(t) => t,
                Err(e) => {
                    return Err(match explain(e, &self.setup, &self.host) {
                        Ok(io) => io.into(),
                        Err(t) => t.into(),
                    })
                }
            };
            let (_, conn) = tls.get_ref();
            *self.info.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(TlsInfo::of(conn, &self.host, self.setup.mode));
            let end_point = end_point(conn);
            Ok(RustlsStream {
                inner: Box::new(tls),
                end_point,
            })
        })
    }
}

/// A TLS stream for tokio-postgres, with its channel-binding data.
pub struct RustlsStream<S> {
    inner: Box<tokio_rustls::client::TlsStream<S>>,
    end_point: Option<Vec<u8>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match &self.end_point {
            Some(h) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(h.clone()),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner.as_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().inner.as_mut()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner.as_mut()).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner.as_mut()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_keys_come_out_of_both_forms() {
        let (rest, p) = split_url(
            "postgres://u:p@h:5/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(p.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(p.sslrootcert.as_deref(), Some("/tmp/ca.pem"));
        let (rest, p) =
            split_url("host=h user=u sslmode = require sslkey='/a b/k.pem' dbname=d").unwrap();
        assert_eq!(rest, "host=h user=u dbname=d");
        assert_eq!(p.sslmode, Some(SslMode::Require));
        assert_eq!(p.sslkey.as_deref(), Some("/a b/k.pem"));
        assert!(split_url("postgres://h/d?sslmode=maybe").is_err());
        let (rest, p) = split_url("postgres://h/d?sslkey=%2Fk.pem&sslpassword=s%20cret").unwrap();
        assert_eq!(rest, "postgres://h/d");
        assert_eq!(p.sslpassword.as_deref(), Some("s cret"));
        let dbg = format!("{p:?}");
        assert!(!dbg.contains("cret") && dbg.contains("***"), "{dbg}");
        let (k, _) = p.validate().unwrap_err();
        assert_eq!(k, "sslcert", "sslkey without sslcert");
        let alone = TlsParams {
            sslpassword: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(alone.validate().unwrap_err().0, "sslpassword");
        let added = add_param("postgres://h/d", "sslrootcert", "/x y/ca.pem");
        assert_eq!(
            split_url(&added).unwrap().1.sslrootcert.as_deref(),
            Some("/x y/ca.pem")
        );
        let added = add_param("host=h", "sslcert", "/it's.pem");
        assert_eq!(
            split_url(&added).unwrap().1.sslcert.as_deref(),
            Some("/it's.pem")
        );
    }

    #[test]
    fn modes_follow_libpq() {
        let p = |m: &str, root: Option<&str>| TlsParams {
            sslmode: SslMode::parse(m),
            sslrootcert: root.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(TlsParams::default().mode(), SslMode::Prefer);
        assert_eq!(p("require", Some("system")).mode(), SslMode::VerifyCa);
        assert_eq!(p("require", None).mode(), SslMode::Require);
        let (k, m) = p("verify-full", None).validate().unwrap_err();
        assert_eq!(k, "sslrootcert");
        assert!(m.contains("system"), "{m}");
        let (k, _) = p("verify-ca", Some("/no/such/ca.pem"))
            .validate()
            .unwrap_err();
        assert_eq!(k, "sslrootcert");
        assert!(TlsSetup::build(&p("require", None)).is_ok());
    }
}
