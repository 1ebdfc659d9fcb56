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
//! Files: this one parses the settings; `setup` builds the rustls configs,
//! `negotiate` does the replication connection's handshake, `connector`
//! serves tokio-postgres, and `report` explains failures to the operator.
//!
//! This module is a leaf: it imports nothing from the crate, so the config
//! can validate TLS settings at load without a circle.

mod connector;
mod negotiate;
mod report;
mod setup;

pub use connector::*;
pub use negotiate::*;
pub use report::*;
pub use setup::*;

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
