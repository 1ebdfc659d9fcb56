//! The replication session: it wires the stages together.
//!
//! ```text
//! walsender ─CopyBoth─▶ wire::Reader ─▶ replication::parse_copy_data ─▶ pgoutput::parse
//!     ▲                                                                      │
//!     │ standby status updates (feedback task, own timer)                    ▼
//!     │                                                  Assembler (committed transactions)
//!     │                                                                      │ Budget
//!     └──── Progress::confirmed() ◀── checkpoints ◀── sink tasks ◀──── bounded channels
//! ```
//!
//! One [`run`] call is one session. Errors come in two tiers: a
//! [`SourceError::Transient`] (connection lost, server restarting) makes the
//! caller start a new session from the checkpoints after a backoff; a
//! [`SourceError::Fatal`] (slot gap, missing publication, wrong plugin) stops
//! pgferry with a message that tells the operator what to do.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use crate::checkpoint::CheckpointStore;
use crate::config::Config;
use crate::conn::{self, wire::ConnError, StartOptions, WriteSide};
use crate::decode::assembler::Assembler;
use crate::decode::types::TypeRegistry;
use crate::lsn::Lsn;
use crate::pipeline::{fan_out, Budget, Item, Progress, SinkLink, SinkState, SinkTask};
use crate::protocol::pgoutput::{self, LogicalMessage};
use crate::protocol::replication::{self, ReplicationMessage};
use crate::snapshot::Snapshots;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Fatal(String),
    /// A detached sink recovered: start a new session at once, from the
    /// minimum checkpoint.
    #[error("a detached sink recovered; replaying from its checkpoint")]
    Rejoin,
}

impl From<ConnError> for SourceError {
    fn from(e: ConnError) -> Self {
        if e.is_transient() {
            SourceError::Transient(e.to_string())
        } else {
            SourceError::Fatal(e.to_string())
        }
    }
}

impl From<crate::publication::PublicationError> for SourceError {
    fn from(e: crate::publication::PublicationError) -> Self {
        match e {
            crate::publication::PublicationError::Refused(m) => SourceError::Fatal(m),
            crate::publication::PublicationError::Postgres(e) => e.into(),
        }
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
            (Some(db), _) => format!("Postgres error {}: {}", db.code().code(), db.message()),
            (None, Some(c)) => format!("Postgres connection error: {e}: {c}"),
            (None, None) => format!("Postgres connection error: {e}"),
        };
        if transient {
            SourceError::Transient(msg)
        } else {
            SourceError::Fatal(msg)
        }
    }
}

fn fatal(msg: impl Into<String>) -> SourceError {
    SourceError::Fatal(msg.into())
}

/// Microseconds since 2000-01-01 UTC, the replication protocol's clock.
pub fn pg_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    unix.as_micros() as i64 - 946_684_800_000_000
}

/// Opens the ordinary SQL connection.
pub async fn sql_connect(config: &Config) -> Result<tokio_postgres::Client, SourceError> {
    sql_connect_url(&config.source.url).await
}

/// Opens an ordinary SQL connection to `url` (`source.url`); its driver
/// runs as a task of its own.
pub async fn sql_connect_url(url: &str) -> Result<tokio_postgres::Client, SourceError> {
    let pg: tokio_postgres::Config = url.parse().map_err(|e| fatal(format!("source.url: {e}")))?;
    let (client, connection) = pg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "SQL connection ended");
        }
    });
    Ok(client)
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

/// How `pgferry run` was asked to end, besides a signal.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// End once every sink has applied everything up to this position.
    pub until: Option<Lsn>,
    /// End once the snapshot jobs are durably done.
    pub exit_after_snapshot: bool,
}

/// Runs one replication session until `shutdown` turns true (returns Ok) or
/// an error ends it.
///
/// With `until`, the session also ends (Ok) once every sink has applied
/// everything up to that position: a benchmarking and scripting aid.
pub async fn run(
    config: &Config,
    mut shutdown: watch::Receiver<bool>,
    opts: &RunOptions,
) -> Result<(), SourceError> {
    let until = opts.until;
    let s = &config.source;
    let pg: tokio_postgres::Config = s
        .url
        .parse()
        .map_err(|e| fatal(format!("source.url: {e}")))?;
    let client = sql_connect(config).await?;
    let slot = slot_info(&client, &s.slot).await?;
    let added = crate::publication::ensure(&client, config, slot.is_some()).await?;

    let mut repl =
        conn::connect_with(&pg, s.recv_buffer_kb.map(|k| k.saturating_mul(1024))).await?;
    let system = repl.identify_system().await?;
    let version = repl.server_version_num().unwrap_or(0);
    if version < 100000 {
        return Err(fatal(format!(
            "server version {version} is too old: logical replication with pgoutput needs PostgreSQL 10 or later"
        )));
    }
    let proto_version = if version >= 140000 { 2 } else { 1 };
    let streaming = s.streaming && version >= 140000;

    // The slot: create it, or check that it is ours to use.
    let created_at = match &slot {
        None if s.create_slot => {
            let lsn = repl.create_slot(&s.slot).await.map_err(slot_create_error)?;
            tracing::info!(slot = %s.slot, consistent_point = %lsn, "created replication slot");
            Some(lsn)
        }
        None => {
            return Err(fatal(format!(
                "replication slot {:?} does not exist and source.create_slot is false; create it with SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
                s.slot, s.slot
            )))
        }
        Some(info) => {
            if let Some(why) = slot_mismatch(info, &s.slot, system.dbname.as_deref()) {
                return Err(fatal(why));
            }
            if info.wal_status.as_deref() == Some("lost") {
                return Err(fatal(crate::observe::lost_slot_message(
                    &s.slot,
                    &config.checkpoint.dir,
                )));
            }
            None
        }
    };
    let slot_pos = match created_at {
        Some(l) => l,
        None => slot_info(&client, &s.slot)
            .await?
            .and_then(|i| i.confirmed_flush)
            .unwrap_or(Lsn::ZERO),
    };

    // Checkpoints and the gap check.
    let store = CheckpointStore::open(&config.checkpoint.dir).map_err(|e| fatal(e.to_string()))?;
    let mut checkpoints = Vec::new();
    let mut fresh = true;
    for sink in &config.sinks {
        let cp = store.load(sink.name()).map_err(|e| fatal(e.to_string()))?;
        fresh &= cp.is_none();
        if let Some(cp) = &cp {
            if cp.system_identifier != system.system_id || cp.slot != s.slot {
                return Err(fatal(format!(
                    "the checkpoint of sink {:?} belongs to slot {:?} on system {}, but this is slot {:?} on system {}; point checkpoint.dir at the right directory, or remove the file to start that sink afresh",
                    sink.name(), cp.slot, cp.system_identifier, s.slot, system.system_id
                )));
            }
            if slot_pos > cp.lsn {
                return Err(fatal(format!(
                    "changes were lost: slot {:?} has confirmed_flush_lsn {slot_pos}, ahead of the checkpoint {} of sink {:?}. \
                     The slot was dropped and recreated, or another consumer advanced it, so the changes in between are gone for this sink. \
                     pgferry will not stream on over the gap. Re-load the sink from the table (snapshot), then remove {} to resume from the slot's position",
                    s.slot,
                    cp.lsn,
                    sink.name(),
                    config.checkpoint.dir.join(format!("{}.checkpoint.json", sink.name())).display()
                )));
            }
        } else if created_at.is_none() {
            tracing::warn!(sink = sink.name(), slot = %s.slot, position = %slot_pos, "sink has no checkpoint; it starts at the slot's confirmed position");
        }
        checkpoints.push(cp.map(|c| c.lsn).unwrap_or(slot_pos));
    }
    let start = checkpoints.iter().copied().min().unwrap_or(slot_pos);
    backfill_added_tables(&client, config, &added, fresh).await;

    // Sinks.
    let progress = Progress::new(&checkpoints);
    let (sinks_stop_tx, sinks_stop) = watch::channel(false);
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    let owner = crate::sink::StreamOwner {
        system_identifier: system.system_id.clone(),
        database: system.dbname.clone().unwrap_or_default(),
        slot: s.slot.clone(),
    };
    for (i, sc) in config.sinks.iter().enumerate() {
        let sink = crate::sink::build(sc, &owner)
            .await
            .map_err(|e| fatal(e.to_string()))?;
        let (tx, rx) = mpsc::channel(64);
        let state = Arc::new(SinkState::default());
        senders.push(SinkLink {
            name: sc.name().to_string(),
            tx,
            state: state.clone(),
        });
        let task = SinkTask {
            index: i,
            name: sc.name().to_string(),
            sink,
            rx,
            store: store.clone(),
            slot: s.slot.clone(),
            system_identifier: system.system_id.clone(),
            checkpoint: checkpoints[i],
            progress: progress.clone(),
            batch_max_events: config.pipeline.batch_max_events,
            checkpoint_interval: Duration::from_millis(config.pipeline.checkpoint_interval_ms),
            linger: sc.linger(),
            state,
            max_failure: sc.max_failure_secs().map(Duration::from_secs),
            stop: sinks_stop.clone(),
        };
        tasks.push(tokio::spawn(task.run()));
    }

    // Status update interval: at most 10 s and at most wal_sender_timeout/2.
    let mut interval = Duration::from_secs(s.status_interval_secs.min(10));
    if let Some(t) = repl.show("wal_sender_timeout").await.ok().flatten() {
        if let Some(ms) = parse_duration_ms(&t).filter(|ms| *ms > 0) {
            interval = interval.min(Duration::from_millis((ms / 2).max(100)));
        }
    }

    let spill_dir = config.spill_dir();
    crate::spill::clean_dir(&spill_dir)
        .map_err(|e| fatal(format!("spill directory {}: {e}", spill_dir.display())))?;
    let memory = config.pipeline.memory_limit_mb * 1024 * 1024;
    let mut assembler = Assembler::new(TypeRegistry::builtin(), memory as usize, spill_dir);
    let budget = Budget::new(memory);
    let mut received = crate::metrics::ReceiveCounter::default();

    let opts_run = opts;
    let opts = StartOptions {
        slot: s.slot.clone(),
        start,
        proto_version,
        publications: crate::publication::stream_publications(config),
        messages: true,
        streaming,
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        slot = %s.slot,
        start = %start,
        server_version = version,
        proto_version,
        streaming,
        sinks = ?config.sinks.iter().map(|c| c.name()).collect::<Vec<_>>(),
        "pgferry streaming"
    );
    let mut snaps = Snapshots::start(
        config,
        &client,
        progress.clone(),
        fresh,
        opts_run.exit_after_snapshot,
    )
    .await?;
    let (mut reader, writer) = repl.start_replication(&opts).await?;
    let observed = crate::metrics::global().session(&progress, &senders);
    reader.set_coalesce(Duration::from_micros(s.read_coalesce_us));
    let started = Instant::now();
    progress.received.store(start.0, Ordering::Release);

    let (reply_tx, reply_rx) = mpsc::channel::<()>(4);
    let (stop_tx, stop_rx) = watch::channel(false);
    let feedback = tokio::spawn(feedback_loop(
        writer,
        progress.clone(),
        interval,
        reply_rx,
        stop_rx,
    ));

    let mut last_idle = Lsn::ZERO;
    let mut last_idle_at = Instant::now();
    let result: Result<(), SourceError> = async {
        loop {
            if until.is_some_and(|u| progress.confirmed() >= u) {
                tracing::info!(until = %until.unwrap_or_default(), "every sink reached the --until position");
                return Ok(());
            }
            if snaps.exit_now()? {
                tracing::info!("the snapshot is done in every sink (--exit-after-snapshot)");
                return Ok(());
            }
            let m = tokio::select! {
                m = reader.next() => m?,
                _ = progress.changed.notified(), if until.is_some() || opts_run.exit_after_snapshot => continue,
                _ = snaps.pickup().notified() => {
                    for t in snaps.service().await? {
                        deliver(&budget, &senders, t).await?;
                    }
                    continue;
                }
                _ = shutdown.changed() => {
                    tracing::info!("shutdown requested: finishing the batches in flight");
                    return Ok(());
                }
                _ = progress.rejoin.notified() => {
                    return Err(SourceError::Rejoin);
                }
            };
            match m.tag {
                b'd' => {}
                b'c' => return Err(SourceError::Transient("the server ended the replication stream".into())),
                b'E' => return Err(conn::wire::parse_error_fields(&m.body).into()),
                b'N' => continue,
                t => {
                    return Err(fatal(format!(
                        "unexpected message {:?} in the replication stream",
                        t as char
                    )))
                }
            }
            received.bytes(&m.body);
            let msg = replication::parse_copy_data(m.body)
                .map_err(|e| fatal(format!("{e}; this is a bug or a corrupted stream: please report it")))?;
            match msg {
                ReplicationMessage::XLogData { wal_start, data, .. } => {
                    progress.received.fetch_max(wal_start.0, Ordering::AcqRel);
                    let ctx = assembler.parse_context(proto_version);
                    let lm = pgoutput::parse(&data, ctx).map_err(|e| {
                        fatal(format!("at {wal_start}: {e}; this is a bug or a corrupted stream: please report it"))
                    })?;
                    received.message(&lm);
                    if let LogicalMessage::Relation(r) = &lm {
                        let oids: Vec<u32> = r.columns.iter().map(|c| c.type_oid).collect();
                        let missing = assembler.types_mut().missing(&oids);
                        if !missing.is_empty() {
                            assembler.types_mut().load(&client, &missing).await?;
                        }
                    }
                    let spilled_before = assembler.spilled_txns;
                    let committed = assembler
                        .handle(wal_start, lm)
                        .map_err(|e| fatal(format!("{e}; this is a bug or a corrupted stream: please report it")))?;
                    if assembler.spilled_txns != spilled_before {
                        tracing::info!(at = %wal_start, memory_limit_mb = config.pipeline.memory_limit_mb, "transaction spilled to disk");
                    }
                    if let Some(mut txn) = committed {
                        let before = snaps
                            .on_commit(&mut txn, &client, |oid| assembler.relation_info(oid))
                            .await?;
                        for t in before {
                            received.committed(&t);
                            deliver(&budget, &senders, t).await?;
                        }
                        received.committed(&txn);
                        let txn = deliver(&budget, &senders, txn).await?;
                        snaps.delivered(&txn)?;
                    }
                }
                ReplicationMessage::PrimaryKeepalive { wal_end, reply_requested, .. } => {
                    progress.received.fetch_max(wal_end.0, Ordering::AcqRel);
                    if reply_requested {
                        let _ = reply_tx.try_send(());
                    }
                    // Nothing open: every commit before wal_end was received,
                    // so the sinks may checkpoint it once they are caught up.
                    if assembler.is_idle() {
                        for t in snaps.on_idle(wal_end).await? {
                            deliver(&budget, &senders, t).await?;
                        }
                    }
                    if assembler.is_idle()
                        && wal_end > last_idle
                        && (reply_requested || last_idle_at.elapsed() >= Duration::from_secs(1))
                    {
                        last_idle = wal_end;
                        last_idle_at = Instant::now();
                        snaps.delivered_idle(wal_end);
                        fan_out(&senders, Item::Idle(wal_end)).await.map_err(|g| fatal(format!("sink {:?} stopped", g.0)))?;
                    }
                }
            }
        }
    }
    .await;
    drop(observed);

    // Drain: healthy sinks finish what they hold and checkpoint it; a sink
    // that is retrying gives up (it is replayed from its checkpoint).
    snaps.stop().await;
    drop(senders);
    let _ = sinks_stop_tx.send(true);
    let mut sink_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => sink_error = Some(e),
            Err(e) => sink_error = Some(format!("a sink task panicked: {e}")),
        }
    }
    let _ = stop_tx.send(true);
    let _ = feedback.await;
    tracing::info!(
        reads = reader.reads,
        bytes = reader.bytes,
        seconds = started.elapsed().as_secs_f64(),
        "session statistics"
    );
    if let Some(e) = sink_error {
        return Err(fatal(e));
    }
    result
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

/// Creating the slot failed: all slots in use is the operator's to fix,
/// not something a retry can.
fn slot_create_error(e: ConnError) -> SourceError {
    match &e {
        ConnError::Server { code, .. } if code == "53400" => fatal(format!(
            "cannot create the replication slot: {e}. Every slot is taken (max_replication_slots): drop an unused one \
             (SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active AND …), \
             or raise max_replication_slots (ALTER SYSTEM SET max_replication_slots = …; then restart Postgres)"
        )),
        _ => e.into(),
    }
}

/// Tables just added to a publication start with their changes only: the
/// rows they already hold need a backfill. With `source.snapshot =
/// "initial"` pgferry requests it itself (through the stream, like `pgferry
/// backfill`); otherwise it says so, with the command. On the very first
/// start (`fresh`) the initial snapshot, if any, covers them.
async fn backfill_added_tables(
    client: &tokio_postgres::Client,
    config: &Config,
    added: &[String],
    fresh: bool,
) {
    if fresh || added.is_empty() {
        return;
    }
    let auto = config.source.snapshot == crate::config::SnapshotMode::Initial;
    for table in added {
        if auto {
            match crate::snapshot::emit_backfill_request(client, config, table, None).await {
                Ok(lsn) => {
                    tracing::warn!(table = %table, at = %lsn, "table added to the publication: its changes are replicated from now on, and a backfill of its rows was requested (source.snapshot = \"initial\")");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(table = %table, error = %e, "could not request a backfill of the added table")
                }
            }
        }
        tracing::warn!(table = %table, "table added to the publication: its changes are replicated from now on, but the rows it already holds are not in the sinks; load them with: pgferry backfill --config <this config> --table {table}");
    }
}

/// Hands one committed transaction to every sink, within the memory budget.
async fn deliver(
    budget: &Budget,
    senders: &[SinkLink],
    mut txn: crate::event::Transaction,
) -> Result<Arc<crate::event::Transaction>, SourceError> {
    budget.admit(&mut txn, senders).await;
    let txn = Arc::new(txn);
    fan_out(senders, Item::Txn(txn.clone()))
        .await
        .map_err(|g| fatal(format!("sink {:?} stopped", g.0)))?;
    Ok(txn)
}

/// Sends standby status updates: on a timer, when the server asks, and when
/// a checkpoint moves; a last one at shutdown, followed by CopyDone.
async fn feedback_loop(
    mut w: WriteSide,
    progress: Arc<Progress>,
    interval: Duration,
    mut reply_rx: mpsc::Receiver<()>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent_flush = Lsn::ZERO;
    let mut buf = BytesMut::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = reply_rx.recv() => if r.is_none() { break },
            _ = progress.changed.notified() => {
                // Tell the server promptly, but not more than ~10 times a second.
                if progress.confirmed() == sent_flush { continue; }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ = stop.changed() => break,
        }
        let flush = progress.confirmed();
        let write = Lsn(progress.received.load(Ordering::Acquire)).max(flush);
        buf.clear();
        replication::write_standby_status_update(write, flush, flush, pg_now(), false, &mut buf);
        if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
            return;
        }
        sent_flush = flush;
    }
    // Final report of what is durable, then end the copy.
    let flush = progress.confirmed();
    let write = Lsn(progress.received.load(Ordering::Acquire)).max(flush);
    buf.clear();
    replication::write_standby_status_update(write, flush, flush, pg_now(), false, &mut buf);
    postgres_protocol::message::frontend::copy_done(&mut buf);
    let _ = w.write_all(&buf).await;
    let _ = w.flush().await;
    tracing::info!(flush = %flush, "final position reported to the server");
}

/// Parses a GUC duration as SHOW prints it (`60s`, `500ms`, `1min`, `0`).
fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    Some(match unit.trim() {
        "" | "ms" => n,
        "s" => n * 1000,
        "min" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guc_durations() {
        assert_eq!(parse_duration_ms("60s"), Some(60_000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("2min"), Some(120_000));
        assert_eq!(parse_duration_ms("0"), Some(0));
        assert_eq!(parse_duration_ms("x"), None);
    }
}
