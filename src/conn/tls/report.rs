//! What the operator is told about TLS: [`TlsInfo`] for `pgferry check`,
//! and [`explain`], which turns a failed handshake into a [`TlsError`]
//! naming the check that failed and the setting that fixes it. Only
//! certificate and configuration failures become a [`TlsError`] (never
//! retried); anything else stays an I/O error, which is retried.

use super::*;

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
    pub(super) fn of(conn: &rustls::ClientConnection, server_name: &str, mode: SslMode) -> TlsInfo {
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
