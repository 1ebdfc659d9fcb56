//! Frontend/backend message framing on a byte stream, startup and
//! authentication, and the simple-query sub-protocol used for replication
//! commands.
//!
//! Invariants:
//! - a backend message's declared length is checked (at least 4, at most
//!   [`MAX_MESSAGE`]) before any byte of its body is awaited or allocated;
//! - reads go through one large buffer, and every complete message in it is
//!   parsed before the next read, so many small messages cost one syscall;
//! - the password is used for authentication only: it is never logged and
//!   never kept in any error.

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Backend messages larger than this are refused as malformed (1 GiB, the
/// largest value Postgres itself can send).
pub const MAX_MESSAGE: usize = 1 << 30;

/// Errors of the connection layer.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("I/O error talking to Postgres: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    /// Nothing arrived within a deadline: the path to the server is hung.
    #[error("no answer from Postgres: {0}")]
    Timeout(String),
    #[error("Postgres error {code}: {message}{}", fmt_extra(.detail, .hint))]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    /// TLS could not be set up: a certificate check failed, or the server
    /// does not offer TLS that sslmode requires. The text names the check
    /// and the fix; never retried.
    #[error("{0}")]
    Tls(String),
}

fn fmt_extra(detail: &Option<String>, hint: &Option<String>) -> String {
    let mut s = String::new();
    if let Some(d) = detail {
        s.push_str(&format!(" (detail: {d})"));
    }
    if let Some(h) = hint {
        s.push_str(&format!(" (hint: {h})"));
    }
    s
}

impl ConnError {
    /// SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ConnError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Errors worth retrying from the last checkpoint: the connection was
    /// lost, or the server is starting up, shutting down or overloaded.
    pub fn is_transient(&self) -> bool {
        match self {
            ConnError::Io(_) | ConnError::Closed | ConnError::Timeout(_) => true,
            ConnError::Server { code, .. } => {
                // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now,
                // 53xxx insufficient resources, 08xxx connection exceptions,
                // 55006 object_in_use (slot still active after a quick restart).
                code.starts_with("57P")
                    || code.starts_with("53")
                    || code.starts_with("08")
                    || code == "55006"
            }
            _ => false,
        }
    }
}

/// A backend message body parsed by `postgres-protocol`: the body is framed
/// again (tag and length) because its parser takes whole messages.
fn parse_backend(tag: u8, body: &[u8]) -> std::io::Result<Option<backend::Message>> {
    let mut framed = BytesMut::with_capacity(body.len() + 5);
    framed.extend_from_slice(&[tag]);
    framed.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    framed.extend_from_slice(body);
    backend::Message::parse(&mut framed)
}

/// Parses the fields of an ErrorResponse body (with `postgres-protocol`).
/// A malformed body still gives an error, with what could be read of it.
pub fn parse_error_fields(body: &[u8]) -> ConnError {
    let (mut severity, mut code, mut message, mut detail, mut hint) =
        (String::new(), String::new(), String::new(), None, None);
    if let Ok(Some(backend::Message::ErrorResponse(e))) = parse_backend(b'E', body) {
        let mut fields = e.fields();
        while let Ok(Some(f)) = fields.next() {
            let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'V' => severity = value,
                b'S' if severity.is_empty() => severity = value,
                b'C' => code = value,
                b'M' => message = value,
                b'D' => detail = Some(value),
                b'H' => hint = Some(value),
                _ => {}
            }
        }
    }
    if message.is_empty() {
        message = format!("malformed ErrorResponse ({} bytes)", body.len());
    }
    let hint = hint.or_else(|| super::tls::refusal_hint(&message).map(str::to_string));
    ConnError::Server {
        severity,
        code,
        message,
        detail,
        hint,
    }
}

/// One backend message: its tag and body.
#[derive(Debug)]
pub struct BackendMessage {
    pub tag: u8,
    pub body: Bytes,
}

/// A read of at least this many bytes found data waiting: the stream is
/// thick (see [`Reader::set_pace`]); a shorter one is thin.
pub const THICK_READ: usize = 64 * 1024;

/// Reads framed backend messages through one large buffer.
pub struct Reader<R> {
    io: R,
    buf: BytesMut,
    /// How much to ask the kernel for at once.
    read_size: usize,
    /// After a short read, wait this long before reading again, so that the
    /// server's many small writes arrive as one read (zero: off).
    coalesce: std::time::Duration,
    /// After a thick read (at least [`THICK_READ`] bytes: data was waiting in
    /// the socket), wait this long before reading again, so that the
    /// server's socket fills and it sends fewer, larger segments (zero: off).
    /// A thin read never waits, so a thin stream keeps its latency.
    pace: std::time::Duration,
    /// When the next read may start (set by `coalesce` or `pace`).
    next_read_at: Option<tokio::time::Instant>,
    /// When nothing arrives for this long, [`Reader::next`] fails with
    /// [`ConnError::Timeout`] (`None`: wait forever).
    read_timeout: Option<std::time::Duration>,
    /// When bytes last arrived (or the deadline was set).
    last_data: tokio::time::Instant,
    /// `read` calls made and bytes received, for statistics.
    pub reads: u64,
    pub bytes: u64,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R) -> Self {
        Reader {
            io,
            buf: BytesMut::with_capacity(1 << 20),
            read_size: 1 << 20,
            coalesce: std::time::Duration::ZERO,
            pace: std::time::Duration::ZERO,
            next_read_at: None,
            read_timeout: None,
            last_data: tokio::time::Instant::now(),
            reads: 0,
            bytes: 0,
        }
    }

    /// Sets the pause after a short read (see the field's doc).
    pub fn set_coalesce(&mut self, d: std::time::Duration) {
        self.coalesce = d;
    }

    /// Sets the pause after a thick read (see the field's doc).
    pub fn set_pace(&mut self, d: std::time::Duration) {
        self.pace = d;
    }

    /// Sets the read deadline (see the field's doc); the time without data
    /// counts from now. The deadline is measured from the last bytes
    /// received, not from each call, so it holds even when `next` is
    /// cancelled and called again; data already in the socket is always read
    /// before the deadline is checked.
    pub fn set_read_timeout(&mut self, t: Option<std::time::Duration>) {
        self.read_timeout = t;
        self.last_data = tokio::time::Instant::now();
    }

    /// The read deadline.
    pub fn read_timeout(&self) -> Option<std::time::Duration> {
        self.read_timeout
    }

    /// The next complete message, reading from the socket only when the
    /// buffer holds none.
    pub async fn next(&mut self) -> Result<BackendMessage, ConnError> {
        loop {
            if let Some(m) = self.try_parse()? {
                return Ok(m);
            }
            if self.buf.capacity() - self.buf.len() < self.read_size / 4 {
                self.buf.reserve(self.read_size);
            }
            if let Some(at) = self.next_read_at.take() {
                tokio::time::sleep_until(at).await;
            }
            let read = self.io.read_buf(&mut self.buf);
            let n = match self.read_timeout {
                None => read.await?,
                Some(t) => match tokio::time::timeout_at(self.last_data + t, read).await {
                    Ok(r) => r?,
                    Err(_) => {
                        return Err(ConnError::Timeout(format!(
                            "nothing received for {:.1} s",
                            t.as_secs_f64()
                        )))
                    }
                },
            };
            self.last_data = tokio::time::Instant::now();
            self.reads += 1;
            self.bytes += n as u64;
            if !self.coalesce.is_zero() && n < THICK_READ {
                self.next_read_at = Some(self.last_data + self.coalesce);
            } else if !self.pace.is_zero() && n >= THICK_READ {
                self.next_read_at = Some(self.last_data + self.pace);
            }
            if n == 0 {
                return Err(ConnError::Closed);
            }
        }
    }

    /// A complete message already in the buffer, without reading.
    pub fn try_parse(&mut self) -> Result<Option<BackendMessage>, ConnError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let tag = self.buf[0];
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 || len as usize > MAX_MESSAGE {
            return Err(ConnError::Protocol(format!(
                "backend message {:?} declares length {len}",
                tag as char
            )));
        }
        let total = 1 + len as usize;
        if self.buf.len() < total {
            // Make room for the whole message in one go.
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(total);
        frame.advance(5);
        Ok(Some(BackendMessage {
            tag,
            body: frame.freeze(),
        }))
    }
}

/// The result rows of a simple query, all values as text.
pub type Rows = Vec<Vec<Option<String>>>;

/// The startup parameters and credentials of a connection.
pub struct Startup<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub password: Option<&'a [u8]>,
    /// Extra startup parameters, e.g. `replication=database`, `TimeZone=UTC`.
    pub params: &'a [(&'a str, &'a str)],
    /// Over TLS: the `tls-server-end-point` data for SCRAM-SHA-256-PLUS.
    pub end_point: Option<Vec<u8>>,
    /// `channel_binding`: disable, prefer (default) or require.
    pub channel_binding: tokio_postgres::config::ChannelBinding,
}

/// A connection in the simple-query state: startup done, authenticated.
pub struct Connection<R, W> {
    pub reader: Reader<R>,
    pub writer: W,
    /// ParameterStatus values, e.g. `server_version`.
    pub params: Vec<(String, String)>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Connection<R, W> {
    /// Sends the startup message and authenticates (trust, cleartext, MD5 or
    /// SCRAM-SHA-256), then waits for ReadyForQuery.
    pub async fn start(read: R, write: W, s: Startup<'_>) -> Result<Self, ConnError> {
        let mut conn = Connection {
            reader: Reader::new(read),
            writer: write,
            params: Vec::new(),
        };
        let mut out = BytesMut::new();
        let mut params: Vec<(&str, &str)> = vec![("user", s.user), ("database", s.database)];
        params.extend_from_slice(s.params);
        frontend::startup_message(params.iter().copied(), &mut out)?;
        conn.send(&out).await?;
        conn.authenticate(&s).await?;
        loop {
            let m = conn.reader.next().await?;
            match m.tag {
                b'Z' => return Ok(conn),
                b'S' => conn.parameter_status(&m.body),
                b'K' | b'N' => {}
                b'E' => return Err(parse_error_fields(&m.body)),
                t => {
                    return Err(ConnError::Protocol(format!(
                        "unexpected message {:?} during startup",
                        t as char
                    )))
                }
            }
        }
    }

    fn parameter_status(&mut self, body: &[u8]) {
        let mut parts = body.split(|&b| b == 0);
        if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
            self.params.push((
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            ));
        }
    }

    /// A ParameterStatus value reported by the server.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await?;
        Ok(())
    }

    async fn authenticate(&mut self, s: &Startup<'_>) -> Result<(), ConnError> {
        let need_password = || {
            s.password.ok_or_else(|| {
                ConnError::Auth(
                    "the server asks for a password, but the connection string has none; add it to source.url (e.g. via ${PGPASSWORD})"
                        .into(),
                )
            })
        };
        let mut scram: Option<ScramSha256> = None;
        let mut bound = false;
        loop {
            let m = self.reader.next().await?;
            match m.tag {
                b'E' => return Err(parse_error_fields(&m.body)),
                b'R' => {}
                t => {
                    return Err(ConnError::Protocol(format!(
                        "expected an authentication request, got {:?}",
                        t as char
                    )))
                }
            }
            let body = &m.body[..];
            if body.len() < 4 {
                return Err(ConnError::Protocol("short authentication request".into()));
            }
            let kind = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            let data = &body[4..];
            let mut out = BytesMut::new();
            if s.channel_binding == tokio_postgres::config::ChannelBinding::Require
                && matches!(kind, 0 | 3 | 5)
                && !bound
            {
                return Err(ConnError::Auth(
                    "channel_binding=require, but the server authenticated without SCRAM-SHA-256-PLUS (trust, password or md5): use scram-sha-256 in pg_hba.conf over TLS, or drop channel_binding=require".into(),
                ));
            }
            match kind {
                0 => return Ok(()),
                3 => frontend::password_message(need_password()?, &mut out)?,
                5 => {
                    let salt: [u8; 4] = data
                        .get(..4)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(|| ConnError::Protocol("short MD5 salt".into()))?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        s.user.as_bytes(),
                        need_password()?,
                        salt,
                    );
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                }
                10 => {
                    use tokio_postgres::config::ChannelBinding as Cb;
                    let offers = |m: &str| data.split(|&b| b == 0).any(|mech| mech == m.as_bytes());
                    let plus = offers(SCRAM_SHA_256_PLUS)
                        && s.channel_binding != Cb::Disable
                        && s.end_point.is_some();
                    if s.channel_binding == Cb::Require && !plus {
                        return Err(ConnError::Auth(format!(
                            "channel_binding=require, but {}: use TLS (sslmode=verify-full) and scram-sha-256 on a server that offers SCRAM-SHA-256-PLUS (PostgreSQL 11+ built with OpenSSL)",
                            if s.end_point.is_none() { "the connection is not over TLS" } else { "the server offers no SCRAM-SHA-256-PLUS" }
                        )));
                    }
                    let (mech, binding) = match (&s.end_point, plus) {
                        (Some(ep), true) => (SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(ep.clone())),
                        (Some(_), false) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                        (None, _) => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                    };
                    if !plus && !offers(SCRAM_SHA_256) {
                        return Err(ConnError::Auth(format!(
                            "the server offers only SASL mechanisms {:?}; pgferry supports SCRAM-SHA-256 and, over TLS, SCRAM-SHA-256-PLUS",
                            String::from_utf8_lossy(data)
                        )));
                    }
                    bound = plus;
                    let sc = ScramSha256::new(need_password()?, binding);
                    frontend::sasl_initial_response(mech, sc.message(), &mut out)?;
                    scram = Some(sc);
                }
                11 => {
                    let sc = scram
                        .as_mut()
                        .ok_or_else(|| ConnError::Protocol("SASL continue before SASL start".into()))?;
                    sc.update(data)
                        .map_err(|e| ConnError::Auth(format!("SCRAM exchange failed: {e}")))?;
                    frontend::sasl_response(sc.message(), &mut out)?;
                }
                12 => {
                    let sc = scram
                        .as_mut()
                        .ok_or_else(|| ConnError::Protocol("SASL final before SASL start".into()))?;
                    sc.finish(data).map_err(|e| {
                        ConnError::Auth(format!("the server's SCRAM signature is invalid: {e}"))
                    })?;
                    continue;
                }
                k => {
                    return Err(ConnError::Auth(format!(
                        "authentication method {k} is not supported (pgferry supports trust, password, md5 and scram-sha-256)"
                    )))
                }
            }
            self.send(&out).await?;
        }
    }

    /// Runs one command through the simple-query protocol and returns its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, ConnError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let m = self.reader.next().await?;
            match m.tag {
                b'D' => rows.push(parse_data_row(&m.body)?),
                b'E' => error = Some(parse_error_fields(&m.body)),
                b'Z' => break,
                b'S' => self.parameter_status(&m.body),
                b'T' | b'C' | b'I' | b'N' => {}
                // A COPY we did not ask for: refuse rather than hang.
                b'G' | b'H' | b'W' => {
                    return Err(ConnError::Protocol(format!(
                        "unexpected COPY response to {sql:?}"
                    )))
                }
                t => {
                    return Err(ConnError::Protocol(format!(
                        "unexpected message {:?} in reply to a query",
                        t as char
                    )))
                }
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }
}

/// A DataRow's values as text (with `postgres-protocol`); `None` is NULL.
fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, ConnError> {
    let bad = || ConnError::Protocol("malformed DataRow".into());
    let Ok(Some(backend::Message::DataRow(row))) = parse_backend(b'D', body) else {
        return Err(bad());
    };
    let buf = row.buffer();
    let mut out = Vec::new();
    let mut ranges = row.ranges();
    while let Some(r) = ranges.next().map_err(|_| bad())? {
        out.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reader_rejects_negative_and_oversized_lengths_without_allocating() {
        for len in [-1i32, 0, 3, i32::MAX] {
            let mut bytes = vec![b'd'];
            bytes.extend_from_slice(&len.to_be_bytes());
            let mut r = Reader::new(&bytes[..]);
            assert!(
                matches!(r.next().await, Err(ConnError::Protocol(_))),
                "len {len}"
            );
        }
    }

    #[tokio::test]
    async fn reader_splits_many_messages_from_one_read_and_reports_eof() {
        let mut bytes = Vec::new();
        for i in 0..100u8 {
            bytes.push(b'd');
            bytes.extend_from_slice(&5i32.to_be_bytes());
            bytes.push(i);
        }
        bytes.extend_from_slice(&[b'd', 0, 0]); // truncated header
        let mut r = Reader::new(&bytes[..]);
        for i in 0..100u8 {
            let m = r.next().await.unwrap();
            assert_eq!((m.tag, &m.body[..]), (b'd', &[i][..]));
        }
        assert!(matches!(r.next().await, Err(ConnError::Closed)));
    }

    /// `n` bytes of 'd' messages of 1 KiB each (5-byte header included).
    fn messages(n: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        while bytes.len() < n {
            bytes.push(b'd');
            bytes.extend_from_slice(&1023i32.to_be_bytes());
            bytes.extend(std::iter::repeat_n(7u8, 1019));
        }
        bytes
    }

    #[tokio::test]
    async fn paced_reads_wait_after_a_thick_read_and_never_after_a_thin_one() {
        use tokio::io::AsyncWriteExt;
        let pace = std::time::Duration::from_millis(150);
        let (mut server, client) = tokio::io::duplex(4 << 20);
        let mut r = Reader::new(client);
        r.set_pace(pace);
        // Thin: one message at a time is read at once, no pause is set.
        for _ in 0..3 {
            server.write_all(&messages(1024)).await.unwrap();
            r.next().await.unwrap();
            assert!(r.next_read_at.is_none(), "a thin read must not pause");
        }
        // Thick: 128 KiB waiting; once they are consumed, the next read
        // waits for the pace even though data is there.
        server.write_all(&messages(128 * 1024)).await.unwrap();
        let first = r.next().await.unwrap();
        assert_eq!(first.body.len(), 1019);
        let at = r.next_read_at.expect("a thick read sets a pause");
        assert_eq!(at, r.last_data + pace);
        server.write_all(&messages(1024)).await.unwrap();
        while r.try_parse().unwrap().is_some() {}
        r.next().await.unwrap();
        assert!(
            tokio::time::Instant::now() >= at,
            "read before the pause ended"
        );
    }

    #[tokio::test]
    async fn a_silent_peer_hits_the_read_deadline_but_buffered_data_is_read_first() {
        let (mut server, client) = tokio::io::duplex(1024);
        let mut r = Reader::new(client);
        r.set_read_timeout(Some(std::time::Duration::from_millis(200)));
        use tokio::io::AsyncWriteExt;
        server.write_all(&[b'd', 0, 0, 0, 5, 7]).await.unwrap();
        // Past the deadline, but the message is already there.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(r.next().await.unwrap().body[..], [7]);
        let started = std::time::Instant::now();
        let e = r.next().await.unwrap_err();
        assert!(
            matches!(e, ConnError::Timeout(_)) && e.is_transient(),
            "{e}"
        );
        assert!(started.elapsed() >= std::time::Duration::from_millis(150));
    }

    #[test]
    fn error_fields_are_parsed_and_data_rows_checked() {
        let e = parse_error_fields(b"SERROR\0VERROR\0C42704\0Mno such slot\0Hcreate it\0\0");
        assert_eq!(e.code(), Some("42704"));
        assert!(e.to_string().contains("no such slot") && e.to_string().contains("create it"));
        assert!(parse_data_row(&[0, 1, 0, 0, 0, 9, b'x']).is_err());
        assert!(parse_data_row(&[0xff, 0xff]).is_err());
        assert_eq!(
            parse_data_row(&[0, 2, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, b'x']).unwrap(),
            vec![None, Some("x".to_string())]
        );
    }
}
