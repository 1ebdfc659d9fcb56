//! The watchers that run beside the replication sessions, once per process:
//! the metrics endpoint, the heartbeat, lag and slot polling, and the
//! periodic progress log line.
//!
//! ```text
//! heartbeat ──pg_logical_emit_message(true, 'pgferry.heartbeat', …)──▶ WAL ──▶ slot ──▶ source
//! poller ──pg_current_wal_lsn(), pg_replication_slots──▶ metrics::global().server
//! HTTP ◀── /metrics /healthz /readyz ── metrics::global()
//! ```
//!
//! Why a heartbeat: a slot only advances when pgferry confirms a position,
//! and pgferry can only confirm what the server sent it. When the database
//! is idle, or only tables outside the publication are written, the server
//! may send little or nothing that lets the slot move while other databases
//! of the cluster keep writing WAL, and the slot then holds that WAL. A
//! transactional logical message is decoded in our database like any other
//! transaction: it arrives as a committed transaction without changes (its
//! message rides on [`crate::event::Transaction::messages`]), every sink
//! applies it as a no-op (no JSONL line, no Redis or search request), and
//! its end LSN is checkpointed, so the slot advances.
//!
//! Invariants:
//! - these tasks use their own ordinary SQL connections and never touch the
//!   replication connection; a failing poll or heartbeat is logged and
//!   retried, never fatal, except a slot found invalidated (`wal_status =
//!   lost`), which ends pgferry with [`lost_slot_message`];
//! - the endpoint binds once per process; failing to bind is a start-up error
//!   naming `metrics.listen`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Config;
use crate::lsn::Lsn;
use crate::metrics::{self, SinkHealth};

/// What an operator must do about an invalidated slot.
pub fn lost_slot_message(slot: &str, checkpoint_dir: &Path) -> String {
    format!(
        "replication slot {slot:?} is invalidated (wal_status = lost): the server removed WAL the slot still needed \
         (it held more than max_slot_wal_keep_size), so changes were lost and the sinks cannot be caught up from the stream. \
         To recover: drop the slot (pgferry slot drop --config FILE), remove the checkpoint files in {}, and start again with \
         source.snapshot = \"initial\" to reload every table (a single table can be reloaded with \
         pgferry backfill --config FILE --table schema.table). To avoid it next time, watch pgferry_slot_retained_wal_bytes \
         and /readyz (metrics.wal_warn_bytes), keep pgferry running, and raise max_slot_wal_keep_size",
        checkpoint_dir.display()
    )
}

/// The running watchers.
pub struct Observer {
    fatal: watch::Receiver<Option<String>>,
    /// The endpoint's address (useful with port 0).
    pub local_addr: Option<std::net::SocketAddr>,
}

impl Observer {
    /// Resolves when a watcher found a condition pgferry must stop for.
    pub async fn fatal(&mut self) -> String {
        match self.fatal.wait_for(|f| f.is_some()).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }
}

/// Settings the tasks own (the config itself is borrowed by the sessions).
struct Settings {
    url: String,
    network: crate::config::NetworkConfig,
    user: String,
    slot: String,
    checkpoint_dir: std::path::PathBuf,
    poll: Duration,
    progress_log: Option<Duration>,
    heartbeat: Option<Duration>,
}

/// Binds the endpoint (when enabled) and starts the watchers.
pub async fn start(config: &Config) -> Result<Observer, String> {
    let m = metrics::global();
    m.configure(config);
    let mut local_addr = None;
    if config.metrics.enabled {
        let listener = tokio::net::TcpListener::bind(&config.metrics.listen)
            .await
            .map_err(|e| {
                format!(
                    "metrics.listen = {:?}: cannot listen there ({e}); choose a free address, or set metrics.enabled = false",
                    config.metrics.listen
                )
            })?;
        local_addr = listener.local_addr().ok();
        if let Some(a) = local_addr {
            tracing::info!(address = %a, "metrics endpoint listening (/metrics, /healthz, /readyz)");
        }
        tokio::spawn(crate::endpoints::serve(listener));
    }
    let user = crate::conn::tls::parse_url(&config.source.url)
        .ok()
        .and_then(|(c, _)| c.get_user().map(str::to_string))
        .unwrap_or_else(|| "<pgferry's user>".into());
    let s = Arc::new(Settings {
        url: config.source.url.clone(),
        network: config.source.network,
        user,
        slot: config.source.slot.clone(),
        checkpoint_dir: config.checkpoint.dir.clone(),
        poll: Duration::from_secs(config.metrics.poll_interval_secs.max(1)),
        progress_log: (config.metrics.progress_log_secs > 0)
            .then(|| Duration::from_secs(config.metrics.progress_log_secs)),
        heartbeat: config
            .heartbeat
            .enabled
            .then(|| Duration::from_secs(config.heartbeat.interval_secs.max(1))),
    });
    let (fatal_tx, fatal) = watch::channel(None);
    tokio::spawn(poll_loop(s.clone(), fatal_tx));
    if let Some(every) = s.heartbeat {
        tokio::spawn(heartbeat_loop(s.clone(), every));
    }
    if let Some(every) = s.progress_log {
        tokio::spawn(progress_loop(every));
    }
    Ok(Observer { fatal, local_addr })
}

async fn connect(s: &Settings) -> Result<tokio_postgres::Client, String> {
    crate::pg::sql_connect_url(&s.url, &s.network)
        .await
        .map_err(|e| e.to_string())
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("Postgres error {}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(c) => format!("{e}: {c}"),
            None => e.to_string(),
        },
    }
}

/// Polls the server's WAL position and the slot every `poll`.
async fn poll_loop(s: Arc<Settings>, fatal: watch::Sender<Option<String>>) {
    let m = metrics::global();
    let mut client: Option<(tokio_postgres::Client, bool)> = None;
    let mut last_warn: Option<Instant> = None;
    let mut last_error_log: Option<Instant> = None;
    let mut tick = tokio::time::interval(s.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            client = None;
            match connect(&s).await {
                Ok(c) => {
                    let v13 = crate::pg::server_version(&c)
                        .await
                        .map(|v| v >= 130000)
                        .unwrap_or(false);
                    client = Some((c, v13));
                }
                Err(e) => {
                    if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        tracing::warn!(error = %e, "lag and slot polling: cannot connect; retrying");
                        last_error_log = Some(Instant::now());
                    }
                    continue;
                }
            }
        }
        let Some((c, v13)) = &client else { continue };
        let wal_status = if *v13 {
            "s.wal_status::text"
        } else {
            "NULL::text"
        };
        let q = format!(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END)::text, \
             s.slot_name IS NOT NULL, s.confirmed_flush_lsn::text, s.restart_lsn::text, {wal_status} \
             FROM (SELECT 1) one LEFT JOIN pg_replication_slots s ON s.slot_name = $1"
        );
        // A hung path to the server must not stall the poller for good.
        let limit = s.poll.max(s.network.connect_timeout());
        let row = match tokio::time::timeout(limit, c.query_one(&q, &[&s.slot])).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(error = %describe(&e), "lag and slot polling failed; retrying");
                    last_error_log = Some(Instant::now());
                }
                continue;
            }
            Err(_) => {
                tracing::debug!("lag and slot polling: no answer in time; reconnecting");
                client = None;
                continue;
            }
        };
        let lsn = |i: usize| -> Option<Lsn> {
            row.try_get::<_, Option<String>>(i)
                .ok()
                .flatten()
                .and_then(|t| t.parse().ok())
        };
        let current = lsn(0).unwrap_or_default();
        let present: bool = row.try_get(1).unwrap_or(false);
        let srv = &m.server;
        srv.current_wal.store(current.0, Ordering::Release);
        srv.slot_present.store(present, Ordering::Release);
        if let Some(c) = lsn(2) {
            srv.confirmed_flush.store(c.0, Ordering::Release);
        }
        let retained = lsn(3).map_or(0, |r| current.0.saturating_sub(r.0));
        srv.retained_wal.store(retained, Ordering::Release);
        let status: Option<String> = row.try_get(4).ok().flatten();
        *srv.wal_status.lock().unwrap_or_else(|e| e.into_inner()) = status.clone();
        srv.polled.store(true, Ordering::Release);

        if present && status.as_deref() == Some("lost") {
            let msg = lost_slot_message(&s.slot, &s.checkpoint_dir);
            tracing::error!("{msg}");
            let _ = fatal.send(Some(msg));
            return;
        }
        match m.wal_over_threshold() {
            Some((retained, warn)) => {
                if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(300)) {
                    tracing::warn!(
                        slot = %s.slot,
                        retained_wal = %metrics::human_bytes(retained),
                        threshold = %metrics::human_bytes(warn),
                        wal_status = status.as_deref().unwrap_or("unknown"),
                        "the slot retains more WAL than metrics.wal_warn_bytes: a sink is behind or failing, or pgferry cannot confirm positions; the server's disk fills while this lasts"
                    );
                    last_warn = Some(Instant::now());
                }
            }
            None => {
                if last_warn.take().is_some() {
                    tracing::info!(slot = %s.slot, retained_wal = %metrics::human_bytes(retained), "retained WAL is back under metrics.wal_warn_bytes");
                }
            }
        }
    }
}

/// Emits a transactional logical message every `every`.
async fn heartbeat_loop(s: Arc<Settings>, every: Duration) {
    let m = metrics::global();
    let mut client: Option<tokio_postgres::Client> = None;
    let mut warned_permission = false;
    let mut last_error_log: Option<Instant> = None;
    // The first one after one interval: a session is usually streaming by then.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match connect(&s).await {
                Ok(c) => Some(c),
                Err(e) => {
                    m.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                    if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        tracing::warn!(error = %e, "heartbeat: cannot connect; retrying");
                        last_error_log = Some(Instant::now());
                    }
                    continue;
                }
            };
        }
        let Some(c) = &client else { continue };
        let r = c
            .query_one(
                "SELECT pg_logical_emit_message(true, 'pgferry.heartbeat', now()::text)::text",
                &[],
            )
            .await;
        match r {
            Ok(row) => {
                m.heartbeats.fetch_add(1, Ordering::Relaxed);
                let at: Option<String> = row.try_get(0).ok();
                tracing::debug!(lsn = at.as_deref().unwrap_or("?"), "heartbeat emitted");
                warned_permission = false;
            }
            Err(e) => {
                m.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                let code = e.as_db_error().map(|d| d.code().code().to_string());
                match code.as_deref() {
                    Some("42501") => {
                        if !warned_permission {
                            tracing::warn!(
                                user = %s.user,
                                "heartbeat: permission denied for pg_logical_emit_message. Without it an idle database, or one that only writes \
                                 tables outside the publication, can pile up WAL behind the slot. Grant it with: \
                                 GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO {}; \
                                 or set heartbeat.enabled = false. pgferry keeps running and tries again",
                                s.user
                            );
                            warned_permission = true;
                        }
                    }
                    _ => {
                        if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                            tracing::warn!(error = %describe(&e), "heartbeat failed; retrying");
                            last_error_log = Some(Instant::now());
                        }
                        if e.is_closed() || e.as_db_error().is_none() {
                            client = None;
                        }
                    }
                }
            }
        }
    }
}

/// Logs events/s, lag and sink states every `every`.
async fn progress_loop(every: Duration) {
    let m = metrics::global();
    let mut last_events = m.events_received();
    let mut last_txns = m.transactions.load(Ordering::Relaxed);
    let mut last_at = Instant::now();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let events = m.events_received();
        let txns = m.transactions.load(Ordering::Relaxed);
        let secs = last_at.elapsed().as_secs_f64().max(1e-3);
        let sinks = m
            .sink_health()
            .into_iter()
            .map(|(n, h)| match h {
                SinkHealth::Ok => format!("{n}=ok"),
                SinkHealth::Failing(_) => format!("{n}=failing"),
                SinkHealth::Detached(_) => format!("{n}=detached"),
            })
            .collect::<Vec<_>>()
            .join(" ");
        let lag_bytes = m.server.lag_bytes();
        let lag_seconds = m.lag_seconds();
        tracing::info!(
            events_per_sec = ((events - last_events) as f64 / secs).round() as u64,
            txns_per_sec = ((txns - last_txns) as f64 / secs).round() as u64,
            events_total = events,
            lag_bytes = lag_bytes.map_or(-1, |b| b as i64),
            lag_seconds = lag_seconds.map_or(-1.0, |s| (s * 1000.0).round() / 1000.0),
            retained_wal_bytes = m.server.retained_wal.load(Ordering::Acquire),
            streaming = m.streaming(),
            sinks = %if sinks.is_empty() { "-".to_string() } else { sinks },
            "progress"
        );
        last_events = events;
        last_txns = txns;
        last_at = Instant::now();
    }
}
