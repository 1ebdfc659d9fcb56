//! The replication connection: pgferry's own client for the walsender.
//!
//! Upstream tokio-postgres cannot enter CopyBoth mode, so this module speaks
//! the protocol itself on a tokio socket, using `postgres-protocol` for
//! message encoding and authentication (see [`wire`]). Ordinary SQL (catalog
//! look-ups, checks, publication set-up) goes through tokio-postgres on a
//! separate connection.
//!
//! Every connection is opened with `replication=database` and with session
//! settings that make the text output of values stable, whatever the server's
//! defaults: `TimeZone=UTC`, `DateStyle=ISO`, `IntervalStyle=postgres`,
//! `extra_float_digits=3`, `bytea_output=hex`.
//!
//! After `START_REPLICATION` the socket is split: the [`wire::Reader`] half
//! goes to the decoding loop, the write half to the feedback task, so status
//! updates keep flowing even while the reader waits on a slow sink.
//!
//! Liveness (`[source.network]`): every TCP connection, the replication one
//! and the SQL ones, has TCP keepalive (idle, interval, count), which finds
//! a peer that vanished. A path that stays open but carries nothing (a hung
//! proxy or firewall) is found by read deadlines instead: connecting, logging
//! in and every answer before streaming must come within
//! `connect_timeout_secs`, and the stream itself has the deadline the
//! session sets with [`wire::Reader::set_read_timeout`].

pub mod tls;
pub mod wire;

use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio_postgres::config::Host;

use crate::config::NetworkConfig;
use crate::lsn::Lsn;
use tls::{TlsInfo, TlsSetup};
use wire::{ConnError, Connection, Rows, Startup};

/// Any byte stream: TCP or a Unix socket.
pub trait Stream: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> Stream for T {}
pub type BoxStream = Pin<Box<dyn Stream>>;

/// The read half after START_REPLICATION.
pub type ReadSide = ReadHalf<BoxStream>;
/// The write half after START_REPLICATION.
pub type WriteSide = WriteHalf<BoxStream>;

/// Session settings sent at startup so that text values are stable.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("client_encoding", "UTF8"),
    ("application_name", "pgferry"),
];

/// Result of IDENTIFY_SYSTEM.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

/// A walsender connection in command mode.
pub struct ReplicationConn {
    conn: Connection<ReadSide, WriteSide>,
    tls: Option<TlsInfo>,
}

/// Opens a replication connection to the server named by `config`.
pub async fn connect(config: &tokio_postgres::Config) -> Result<ReplicationConn, ConnError> {
    connect_with(config, None).await
}

/// Like [`connect`], with an explicit socket receive buffer (bytes) for TCP.
pub async fn connect_with(
    config: &tokio_postgres::Config,
    recv_buffer: Option<u32>,
) -> Result<ReplicationConn, ConnError> {
    connect_opts(config, recv_buffer, &NetworkConfig::default()).await
}

/// Like [`connect_with`], with the keepalive and timeouts of `net`. The
/// connection keeps `net.connect_timeout_secs` as the deadline of every
/// answer until [`ReplicationConn::start_replication`].
pub async fn connect_opts(
    config: &tokio_postgres::Config,
    recv_buffer: Option<u32>,
    net: &NetworkConfig,
) -> Result<ReplicationConn, ConnError> {
    let setup = TlsSetup::for_mode(config.get_ssl_mode());
    connect_tls(config, &setup, recv_buffer, net).await
}

/// Opens a replication connection to `url` (`source.url`, TLS keys
/// included: see [`tls`]), with the keepalive and timeouts of `net`.
pub async fn connect_url(
    url: &str,
    recv_buffer: Option<u32>,
    net: &NetworkConfig,
) -> Result<ReplicationConn, ConnError> {
    let (pg, setup) =
        tls::parse_url(url).map_err(|e| ConnError::Tls(format!("source.url: {e}")))?;
    connect_tls(&pg, &setup, recv_buffer, net).await
}

/// [`connect_opts`] with the TLS setup given.
pub async fn connect_tls(
    config: &tokio_postgres::Config,
    setup: &TlsSetup,
    recv_buffer: Option<u32>,
    net: &NetworkConfig,
) -> Result<ReplicationConn, ConnError> {
    let timeout = net.connect_timeout();
    tokio::time::timeout(timeout, connect_inner(config, setup, recv_buffer, net))
        .await
        .map_err(|_| {
            ConnError::Timeout(format!(
                "connecting and logging in took longer than {} s (source.network.connect_timeout_secs)",
                timeout.as_secs()
            ))
        })?
}

/// Connects and logs in. With `sslmode=prefer`, a server that refuses the
/// login over TLS (say a `hostnossl` line in pg_hba.conf) is asked again
/// without TLS, as libpq does; of the two refusals the more telling one is
/// kept.
async fn connect_inner(
    config: &tokio_postgres::Config,
    setup: &TlsSetup,
    recv_buffer: Option<u32>,
    net: &NetworkConfig,
) -> Result<ReplicationConn, ConnError> {
    let (first, over_tls) = match login(config, setup, recv_buffer, net).await {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    let refused = matches!(&first, ConnError::Server { code, .. } if code != "57P03");
    if !(over_tls && refused && setup.mode == tls::SslMode::Prefer) {
        return Err(first);
    }
    tracing::warn!(
        error = %first,
        "sslmode=prefer: the server refused the login over TLS; connecting again without TLS, as libpq does"
    );
    let plain = TlsSetup::for_mode(tokio_postgres::config::SslMode::Disable);
    match login(config, &plain, recv_buffer, net).await {
        Ok(c) => Ok(c),
        Err((second, _)) if tls::refusal_hint(&second.to_string()).is_some() => Err(first),
        Err((second, _)) => Err(second),
    }
}

/// One attempt of [`connect_inner`]; a failure says whether it was over TLS.
async fn login(
    config: &tokio_postgres::Config,
    setup: &TlsSetup,
    recv_buffer: Option<u32>,
    net: &NetworkConfig,
) -> Result<ReplicationConn, (ConnError, bool)> {
    let (stream, tls, end_point) = open_stream(config, setup, recv_buffer, net)
        .await
        .map_err(|e| (e, false))?;
    let over_tls = tls.is_some();
    let (r, w) = tokio::io::split(stream);
    let user = config.get_user().ok_or_else(|| {
        (
            ConnError::Auth("the connection string names no user".into()),
            false,
        )
    })?;
    let database = config.get_dbname().unwrap_or(user);
    let mut params: Vec<(&str, &str)> = vec![("replication", "database")];
    params.extend_from_slice(SESSION_SETTINGS);
    let conn = Connection::start(
        r,
        w,
        Startup {
            user,
            database,
            password: config.get_password(),
            params: &params,
            end_point,
            channel_binding: config.get_channel_binding(),
        },
    )
    .await
    .map_err(|e| (e, over_tls))?;
    let mut conn = ReplicationConn { conn, tls };
    conn.conn
        .reader
        .set_read_timeout(Some(net.connect_timeout()));
    Ok(conn)
}

/// The TCP keepalive of `net`.
fn keepalive(net: &NetworkConfig) -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(net.tcp_keepalive_idle_secs))
        .with_interval(std::time::Duration::from_secs(
            net.tcp_keepalive_interval_secs,
        ))
        .with_retries(net.tcp_keepalive_count)
}

/// Gives an ordinary SQL connection the keepalive and connect timeout of `net`.
pub fn sql_liveness(pg: &mut tokio_postgres::Config, net: &NetworkConfig) {
    pg.keepalives(true)
        .keepalives_idle(std::time::Duration::from_secs(net.tcp_keepalive_idle_secs))
        .keepalives_interval(std::time::Duration::from_secs(
            net.tcp_keepalive_interval_secs,
        ))
        .keepalives_retries(net.tcp_keepalive_count)
        .connect_timeout(net.connect_timeout());
}

/// The stream, its TLS facts and its channel-binding data.
type Opened = (BoxStream, Option<TlsInfo>, Option<Vec<u8>>);

/// Connects over TCP to `addr` (a host name or IP address), then
/// negotiates TLS as `setup` says, checking the certificate against `host`
/// (the same, unless `hostaddr` gave the address).
async fn open_tcp(
    addr: &str,
    host: &str,
    port: u16,
    setup: &TlsSetup,
    recv_buffer: Option<u32>,
    net: &NetworkConfig,
) -> Result<Opened, ConnError> {
    let tcp = || async {
        let s = tcp_connect(addr, port, recv_buffer).await?;
        let _ = s.set_nodelay(true);
        socket2::SockRef::from(&s).set_tcp_keepalive(&keepalive(net))?;
        Ok::<_, std::io::Error>(s)
    };
    let n = match tls::negotiate(tcp().await?, setup, host).await {
        Err(tls::NegotiateError::Handshake(e)) if setup.mode == tls::SslMode::Prefer => {
            // libpq: a failed handshake under prefer is retried without TLS.
            tracing::warn!(
                host,
                error = %negotiate_error(*e),
                "sslmode=prefer: the TLS handshake failed; connecting again without TLS, as libpq does"
            );
            let plain = TlsSetup::for_mode(tokio_postgres::config::SslMode::Disable);
            tls::negotiate(tcp().await?, &plain, host).await
        }
        other => other,
    }
    .map_err(negotiate_error)?;
    let stream: BoxStream = match n.stream {
        tls::MaybeTls::Plain(s) => Box::pin(s),
        tls::MaybeTls::Tls(t) => Box::pin(*t),
    };
    Ok((stream, n.info, n.end_point))
}

fn negotiate_error(e: tls::NegotiateError) -> ConnError {
    match e.io_or_tls() {
        Ok(io) => ConnError::Io(io),
        Err(t) => ConnError::Tls(t.0),
    }
}

/// Opens the byte stream: TCP (with TLS as `setup` says) or a Unix socket
/// (never TLS, as in libpq). Hosts are tried in turn; a TLS failure stops
/// at once.
async fn open_stream(
    config: &tokio_postgres::Config,
    setup: &TlsSetup,
    recv_buffer: Option<u32>,
    net: &NetworkConfig,
) -> Result<Opened, ConnError> {
    let hosts = config.get_hosts();
    let ports = config.get_ports();
    let addrs = config.get_hostaddrs();
    let mut last = None;
    for (i, host) in hosts.iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let res: Result<Opened, ConnError> = match host {
            Host::Tcp(h) => {
                let addr = addrs.get(i).map_or_else(|| h.clone(), |a| a.to_string());
                open_tcp(&addr, h, port, setup, recv_buffer, net).await
            }
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(|s| (Box::pin(s) as BoxStream, None, None))
                    .map_err(ConnError::Io)
            }
        };
        match res {
            Ok(s) => return Ok(s),
            Err(ConnError::Io(e)) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    if hosts.is_empty() {
        let port = ports.first().copied().unwrap_or(5432);
        let addr = addrs.first().map_or("127.0.0.1".into(), |a| a.to_string());
        return open_tcp(&addr, &addr, port, setup, recv_buffer, net).await;
    }
    Err(ConnError::Io(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no host to connect to")
    })))
}

async fn tcp_connect(
    host: &str,
    port: u16,
    recv_buffer: Option<u32>,
) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(n) = recv_buffer {
            socket.set_recv_buffer_size(n)?;
        }
        match socket.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        )
    }))
}

/// Quotes an identifier for a replication command.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Options of START_REPLICATION for pgoutput.
#[derive(Debug, Clone)]
pub struct StartOptions {
    pub slot: String,
    pub start: Lsn,
    pub proto_version: u32,
    /// `publication_names`: the main publication, and the insert-only one
    /// when a table is insert-only.
    pub publications: Vec<String>,
    pub messages: bool,
    pub streaming: bool,
}

impl StartOptions {
    /// The command text.
    pub fn command(&self) -> String {
        let mut opts = vec![
            format!("proto_version '{}'", self.proto_version),
            format!(
                "publication_names {}",
                quote_literal(
                    &self
                        .publications
                        .iter()
                        .map(|p| quote_ident(p))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            ),
        ];
        if self.messages {
            opts.push("messages 'true'".into());
        }
        if self.streaming {
            opts.push("streaming 'on'".into());
        }
        // EXPERIMENT, for benches/run.sh only: values in binary. Exact only
        // for the types `decode::binary` knows; never set it in production.
        if std::env::var_os("PGFERRY_EXPERIMENT_BINARY").is_some() {
            opts.push("binary 'true'".into());
        }
        format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            quote_ident(&self.slot),
            self.start,
            opts.join(", ")
        )
    }
}

impl ReplicationConn {
    /// What TLS this connection has (`None`: plain).
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// `server_version_num` as reported at startup (e.g. 150004), if parseable.
    pub fn server_version_num(&self) -> Option<u32> {
        let v = self.conn.param("server_version")?;
        let mut parts = v.split(|c: char| !c.is_ascii_digit());
        let major: u32 = parts.next()?.parse().ok()?;
        let minor: u32 = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
        Some(if major >= 10 {
            major * 10000 + minor
        } else {
            major * 10000 + minor * 100
        })
    }

    pub async fn query(&mut self, sql: &str) -> Result<Rows, ConnError> {
        self.conn.simple_query(sql).await
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo, ConnError> {
        let rows = self.query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| ConnError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let get = |i: usize| row.get(i).cloned().flatten();
        let bad =
            |what: &str| ConnError::Protocol(format!("IDENTIFY_SYSTEM returned a bad {what}"));
        Ok(SystemInfo {
            system_id: get(0).ok_or_else(|| bad("systemid"))?,
            timeline: get(1)
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad("timeline"))?,
            xlogpos: get(2)
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| bad("xlogpos"))?,
            dbname: get(3),
        })
    }

    /// `SHOW name` on the walsender.
    pub async fn show(&mut self, name: &str) -> Result<Option<String>, ConnError> {
        let rows = self.query(&format!("SHOW {name}")).await?;
        Ok(rows
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next())
            .flatten())
    }

    /// Creates a logical slot using pgoutput; returns its consistent point.
    /// No deadline: the server waits for the transactions running now.
    pub async fn create_slot(&mut self, slot: &str) -> Result<Lsn, ConnError> {
        let deadline = self.conn.reader.read_timeout();
        self.conn.reader.set_read_timeout(None);
        let rows = self
            .query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                quote_ident(slot)
            ))
            .await;
        self.conn.reader.set_read_timeout(deadline);
        let rows = rows?;
        rows.first()
            .and_then(|r| r.get(1).cloned().flatten())
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| {
                ConnError::Protocol("CREATE_REPLICATION_SLOT returned no consistent point".into())
            })
    }

    /// Creates a temporary slot that exports its snapshot: the snapshot
    /// stays importable (`SET TRANSACTION SNAPSHOT`) while this connection
    /// stays open and idle, and the slot goes away with the connection.
    /// Returns the consistent point and the snapshot's name.
    pub async fn create_exported_slot(&mut self, slot: &str) -> Result<(Lsn, String), ConnError> {
        self.conn.reader.set_read_timeout(None);
        let rows = self
            .query(&format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(slot)
            ))
            .await?;
        let row = rows.first();
        let point = row
            .and_then(|r| r.get(1).cloned().flatten())
            .and_then(|l| l.parse().ok());
        let name = row.and_then(|r| r.get(2).cloned().flatten());
        match (point, name) {
            (Some(p), Some(n)) => Ok((p, n)),
            _ => Err(ConnError::Protocol(
                "CREATE_REPLICATION_SLOT returned no consistent point or snapshot name".into(),
            )),
        }
    }

    /// Sends START_REPLICATION and waits for CopyBothResponse. Returns the
    /// two halves of the socket, now in CopyBoth mode.
    pub async fn start_replication(
        mut self,
        opts: &StartOptions,
    ) -> Result<(wire::Reader<ReadSide>, WriteSide), ConnError> {
        let mut out = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query(&opts.command(), &mut out)?;
        self.conn.send(&out).await?;
        loop {
            let m = self.conn.reader.next().await?;
            match m.tag {
                b'W' => return Ok((self.conn.reader, self.conn.writer)),
                b'E' => return Err(wire::parse_error_fields(&m.body)),
                b'N' | b'S' => {}
                t => {
                    return Err(ConnError::Protocol(format!(
                        "expected CopyBothResponse after START_REPLICATION, got {:?}",
                        t as char
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_command_quotes_names_and_lists_options() {
        let o = StartOptions {
            slot: "pgferry".into(),
            start: Lsn(0x1_0000_0010),
            proto_version: 2,
            publications: vec!["pub".into()],
            messages: true,
            streaming: true,
        };
        assert_eq!(
            o.command(),
            "START_REPLICATION SLOT \"pgferry\" LOGICAL 1/10 (proto_version '2', publication_names '\"pub\"', messages 'true', streaming 'on')"
        );
        let two = StartOptions {
            publications: vec!["pub".into(), "pub_insert".into()],
            ..o
        };
        assert!(
            two.command()
                .contains("publication_names '\"pub\",\"pub_insert\"'"),
            "{}",
            two.command()
        );
    }
}
