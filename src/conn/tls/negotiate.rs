//! The replication connection's own SSLRequest and handshake
//! ([`negotiate`]), with libpq's `prefer` fallback: a server that answers
//! `N`, or refuses the handshake, gets a plain connection only under
//! `prefer`. The channel-binding end point (`tls-server-end-point`) is taken
//! from the server certificate's signature hash, for SCRAM-SHA-256-PLUS.

use super::*;

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

pub(super) fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_string())
        .map_err(|e| TlsError(format!("TLS: {host:?} is not a valid server name: {e}")))
}

/// `tls-server-end-point` data: the hash of the server's certificate with
/// its signature's hash (SHA-256 for MD5, SHA-1 and the rest), RFC 5929.
pub(super) fn end_point(conn: &rustls::ClientConnection) -> Option<Vec<u8>> {
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
pub(super) fn signature_oid(der: &[u8]) -> Option<&[u8]> {
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
