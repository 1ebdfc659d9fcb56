//! Ordinary SQL connections to the source, what is read through them (the
//! slot, the server version), and the one error type of a session.
//!
//! Everything that talks SQL to Postgres opens its connection here, so one
//! place applies `source.network` (keepalive, connect timeout) to all of
//! them. [`SourceError`] is the session's error, with one classification,
//! [`SourceError::is_transient`]: retry (after a backoff that depends on the
//! kind: slot still active, disk full, rejoin) or stop, with the operator's
//! fix in the message; it keeps its typed cause. It sits here, below the session and the snapshot, so that both
//! can return it without importing each other.

use tokio::sync::oneshot;

use crate::config::Config;
use crate::conn::{self, wire::ConnError};
use crate::lsn::Lsn;

/// The typed cause of a [`SourceError`], kept as its `source()`.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a session ended, classified by [`SourceError::is_transient`].
///
/// Invariants: the message is the operator's text and complete on its own
/// (it names the cause in words; a fatal one says what to fix): print the
/// `Display`, not the chain. The typed cause (a [`ConnError`], a
/// `tokio_postgres::Error`, a sink's error) is kept as the `source()` for
/// code that inspects it. Build errors with the constructors
/// ([`SourceError::transient`], [`fatal`], `From`); only the caller that
/// picks the backoff (`main`) looks at the variants.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Retry after a backoff: connection lost, server restarting.
    #[error("{message}")]
    Transient {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    /// Stop: retrying cannot help; the message says what to fix.
    #[error("{message}")]
    Fatal {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    /// A detached sink recovered: start a new session at once, from the
    /// minimum checkpoint.
    #[error("a detached sink recovered; replaying from its checkpoint")]
    Rejoin,
    /// The slot is still held by another walsender (55006), typically the
    /// one of pgferry's previous connection that the server has not noticed
    /// gone yet: it is freed within `wal_sender_timeout`, so retry soon.
    #[error("{message}")]
    SlotActive {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    /// A disk is full (spill files): retried with its own, slower backoff.
    #[error("{message}")]
    DiskFull {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
}

impl SourceError {
    /// Retry after a backoff; `message` says what happened.
    pub fn transient(message: impl Into<String>) -> SourceError {
        SourceError::Transient {
            message: message.into(),
            cause: None,
        }
    }

    /// Stop; `message` says what to fix.
    pub fn fatal(message: impl Into<String>) -> SourceError {
        SourceError::Fatal {
            message: message.into(),
            cause: None,
        }
    }

    /// A full disk; `message` names it (see [`crate::disk::full_message`]).
    pub fn disk_full(message: impl Into<String>) -> SourceError {
        SourceError::DiskFull {
            message: message.into(),
            cause: None,
        }
    }

    /// Keeps `cause` as this error's `source()`; the message is unchanged.
    pub fn caused_by(mut self, cause: impl Into<Cause>) -> SourceError {
        match &mut self {
            SourceError::Transient { cause: c, .. }
            | SourceError::Fatal { cause: c, .. }
            | SourceError::SlotActive { cause: c, .. }
            | SourceError::DiskFull { cause: c, .. } => *c = Some(cause.into()),
            SourceError::Rejoin => {}
        }
        self
    }

    /// The one classification: `true` when a new session is worth starting
    /// (after the backoff its variant picks), `false` when pgferry stops.
    pub fn is_transient(&self) -> bool {
        !matches!(self, SourceError::Fatal { .. })
    }

    /// The stream broke or the server wants it gone (every transient error
    /// but a rejoin): the session closes the replication connection before
    /// it drains the sinks, so that the server is never held.
    pub fn is_broken_stream(&self) -> bool {
        self.is_transient() && !matches!(self, SourceError::Rejoin)
    }
}

impl From<ConnError> for SourceError {
    fn from(e: ConnError) -> Self {
        let message = e.to_string();
        let class = if e.code() == Some("55006") {
            SourceError::SlotActive {
                message,
                cause: None,
            }
        } else if e.is_transient() {
            SourceError::transient(message)
        } else {
            SourceError::fatal(message)
        };
        class.caused_by(e)
    }
}

impl From<tokio_postgres::Error> for SourceError {
    fn from(e: tokio_postgres::Error) -> Self {
        // tokio-postgres's Display omits the cause ("invalid configuration"),
        // so the cause is named here ("...: password missing").
        let cause = std::error::Error::source(&e);
        let transient = match e.as_db_error() {
            Some(db) => {
                let c = db.code().code();
                c.starts_with("57P") || c.starts_with("08") || c.starts_with("53")
            }
            // Lost connection, I/O, timeout: retry. A cause that is not I/O is a
            // configuration or authentication problem (e.g. the server asks for
            // a password the URL lacks) that no retry can fix.
            None => e.is_closed() || cause.is_none_or(|c| c.is::<std::io::Error>()),
        };
        let msg = match (e.as_db_error(), cause) {
            (Some(db), _) => match conn::tls::refusal_hint(db.message()) {
                Some(hint) => format!(
                    "Postgres error {}: {} (hint: {hint})",
                    db.code().code(),
                    db.message()
                ),
                None => format!("Postgres error {}: {}", db.code().code(), db.message()),
            },
            (None, Some(c)) if c.to_string() == "server does not support TLS" => {
                "Postgres connection error: the server does not accept TLS connections, but sslmode requires TLS: \
                 turn on ssl in the server's postgresql.conf, or (on a trusted network only) set sslmode=prefer"
                    .to_string()
            }
            (None, Some(c)) => format!("Postgres connection error: {e}: {c}"),
            (None, None) => format!("Postgres connection error: {e}"),
        };
        let class = if transient {
            SourceError::transient(msg)
        } else {
            SourceError::fatal(msg)
        };
        class.caused_by(e)
    }
}

/// A fatal [`SourceError`] (short for [`SourceError::fatal`]).
pub(crate) fn fatal(msg: impl Into<String>) -> SourceError {
    SourceError::fatal(msg)
}

/// Opens the ordinary SQL connection.
pub async fn sql_connect(config: &Config) -> Result<tokio_postgres::Client, SourceError> {
    sql_connect_url(&config.source.url, &config.source.network).await
}

/// Opens an ordinary SQL connection to `url` (`source.url`), with the
/// keepalive and connect timeout of `net`; its driver runs as a task of
/// its own.
pub async fn sql_connect_url(
    url: &str,
    net: &crate::config::NetworkConfig,
) -> Result<tokio_postgres::Client, SourceError> {
    Ok(sql_connect_watched(url, net).await?.0)
}

/// [`sql_connect_url`], with a receiver that gets the SQLSTATE the server
/// ended the connection with (`None`: it ended otherwise).
pub async fn sql_connect_watched(
    url: &str,
    net: &crate::config::NetworkConfig,
) -> Result<(tokio_postgres::Client, oneshot::Receiver<Option<String>>), SourceError> {
    let (client, ended, _) = sql_connect_tls(url, net).await?;
    Ok((client, ended))
}

/// [`sql_connect_watched`], with what TLS the connection has (`None`:
/// plain). The TLS settings are those of `url` (`source.url`, into which
/// `[source.tls]` was folded at config load), their rustls configuration
/// shared by every connection.
pub async fn sql_connect_tls(
    url: &str,
    net: &crate::config::NetworkConfig,
) -> Result<
    (
        tokio_postgres::Client,
        oneshot::Receiver<Option<String>>,
        Option<conn::tls::TlsInfo>,
    ),
    SourceError,
> {
    let (mut pg, setup) =
        conn::tls::parse_url(url).map_err(|e| fatal(format!("source.url: {e}")))?;
    if matches!(
        pg.get_hosts().first(),
        Some(tokio_postgres::config::Host::Unix(_))
    ) {
        // No TLS over a Unix socket, as in libpq.
        pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    conn::sql_liveness(&mut pg, net);
    let tls = conn::tls::MakeRustls::new(setup.clone());
    let (info, tried) = (tls.info.clone(), tls.tried.clone());
    let (client, connection) = match pg.connect(tls).await {
        Ok(c) => c,
        // libpq: under prefer, a failed handshake, or a login the server
        // refuses over TLS (but not "starting up"), is tried again without.
        Err(first)
            if setup.mode == conn::tls::SslMode::Prefer
                && tried.load(std::sync::atomic::Ordering::Relaxed)
                && first.code() != Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW) =>
        {
            let first = SourceError::from(first);
            tracing::warn!(
                error = %first,
                "sslmode=prefer: the connection over TLS failed; connecting again without TLS, as libpq does"
            );
            *info.lock().unwrap_or_else(|e| e.into_inner()) = None;
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let plain = conn::tls::MakeRustls::new(setup.clone());
            match pg.connect(plain).await {
                Ok(c) => c,
                Err(second) => {
                    let second = SourceError::from(second);
                    return Err(if conn::tls::refusal_hint(&second.to_string()).is_some() {
                        first
                    } else {
                        second
                    });
                }
            }
        }
        Err(e) => return Err(e.into()),
    };
    let info = info.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let code = match connection.await {
            Ok(()) => None,
            Err(e) => {
                tracing::debug!(error = %e, "SQL connection ended");
                e.as_db_error().map(|d| d.code().code().to_string())
            }
        };
        let _ = tx.send(code);
    });
    Ok((client, rx, info))
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active: bool,
    pub confirmed_flush: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    pub wal_status: Option<String>,
}

pub async fn slot_info(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotInfo>, SourceError> {
    let wal_status = if server_version(client).await? >= 130000 {
        "wal_status::text"
    } else {
        "NULL::text"
    };
    let rows = client
        .query(
            &format!(
                "SELECT plugin::text, database::text, active, confirmed_flush_lsn::text, restart_lsn::text, {wal_status} \
                 FROM pg_replication_slots WHERE slot_name = $1"
            ),
            &[&slot],
        )
        .await?;
    Ok(rows.first().map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active: r.get(2),
        confirmed_flush: r.get::<_, Option<String>>(3).and_then(|s| s.parse().ok()),
        restart_lsn: r.get::<_, Option<String>>(4).and_then(|s| s.parse().ok()),
        wal_status: r.get(5),
    }))
}

pub async fn server_version(client: &tokio_postgres::Client) -> Result<u32, SourceError> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?;
    Ok(row.get::<_, i32>(0) as u32)
}

/// Why an existing slot cannot be this session's, or `None`: another
/// plugin than pgoutput, or another database than the one connected to.
pub fn slot_mismatch(info: &SlotInfo, slot: &str, database: Option<&str>) -> Option<String> {
    if info.plugin.as_deref() != Some("pgoutput") {
        let plugin = info.plugin.as_deref().unwrap_or("(none)");
        return Some(format!(
            "replication slot {slot:?} uses the plugin {plugin}, not pgoutput; drop it (pgferry slot drop) or choose another source.slot"
        ));
    }
    match (info.database.as_deref(), database) {
        (Some(theirs), Some(ours)) if theirs != ours => Some(format!(
            "replication slot {slot:?} belongs to database {theirs:?}, but source.url connects to database {ours:?}; \
             choose another source.slot, or point source.url at database {theirs:?}"
        )),
        _ => None,
    }
}
