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
//!
//! Sinks that must read a row back (the search sink, for an update without
//! its unchanged TOAST values that its index cannot complete) get
//! `rows::PgRows`, which reads over an ordinary SQL connection.

mod rows;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::checkpoint::CheckpointStore;
use crate::config::{Config, OnDataLoss};
use crate::conn::{self, wire::ConnError, StartOptions, WriteSide};
use crate::decode::assembler::{AssembleError, Assembler};
use crate::decode::routes::Routes;
use crate::decode::types::TypeRegistry;
use crate::event::pg_now;
use crate::flow::{Progress, SinkState};
use crate::lsn::Lsn;
use crate::pg::{fatal, slot_info, slot_mismatch, sql_connect_watched, SlotInfo, SourceError};
use crate::pipeline::{fan_out, fan_out_to, Budget, DataLoss, Item, SinkLink, SinkTask};
use crate::protocol::pgoutput::{self, LogicalMessage};
use crate::protocol::replication::{self, ReplicationMessage};
use crate::snapshot::Snapshots;

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
    let prepared = tokio::select! {
        r = prepare(config) => r?,
        _ = shutdown.wait_for(|s| *s) => return Ok(()),
    };
    let mut session = Session::start(config, opts, prepared).await?;
    let result = session.stream(&mut shutdown).await;
    session.end(result).await
}

/// What [`prepare`] found and opened.
struct Prepared {
    client: tokio_postgres::Client,
    sql_end: oneshot::Receiver<Option<String>>,
    repl: conn::ReplicationConn,
    system: conn::SystemInfo,
    version: u32,
    /// Per sink: its checkpoint, if it has one.
    checkpoints: Vec<Option<Lsn>>,
    /// The slot's confirmed position (or its consistent point when created).
    slot_pos: Lsn,
    store: CheckpointStore,
    /// The server's `wal_sender_timeout` (`None`: disabled).
    wal_sender_timeout: Option<Duration>,
    /// Tables just added to the publication (their old rows need a backfill).
    added: Vec<String>,
}

/// Runs `f` within `source.network.connect_timeout_secs`.
async fn within<T>(
    config: &Config,
    what: &str,
    f: impl std::future::Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    let t = config.source.network.connect_timeout();
    tokio::time::timeout(t, f).await.map_err(|_| {
        SourceError::Transient(format!(
            "{what}: no answer from Postgres within {} s (source.network.connect_timeout_secs)",
            t.as_secs()
        ))
    })?
}

/// Connects, checks the publication, reads the checkpoints and finds (or
/// creates) the slot. The gap check runs before a slot is created, so a
/// dropped slot never leaves a new one behind that holds WAL for nothing.
async fn prepare(config: &Config) -> Result<Prepared, SourceError> {
    let s = &config.source;
    let (client, sql_end) = within(
        config,
        "connecting",
        sql_connect_watched(&s.url, &s.network),
    )
    .await?;
    let slot = within(config, "reading the slot", slot_info(&client, &s.slot)).await?;
    let added = within(config, "checking the publication", async {
        Ok(crate::publication::ensure(&client, config, slot.is_some()).await?)
    })
    .await?;
    let recv_buffer = s.recv_buffer_kb.map(|k| k.saturating_mul(1024));
    let mut repl = conn::connect_url(&s.url, recv_buffer, &s.network).await?;
    let system = repl.identify_system().await?;
    let version = repl.server_version_num().unwrap_or(0);
    if version < 100000 {
        return Err(fatal(format!(
            "server version {version} is too old: logical replication with pgoutput needs PostgreSQL 10 or later"
        )));
    }
    let shown = match repl.show("wal_sender_timeout").await {
        Ok(v) => v,
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(_) => None,
    };
    let wal_sender_timeout = shown
        .and_then(|t| parse_duration_ms(&t))
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    WAL_SENDER_TIMEOUT_MS.store(
        wal_sender_timeout.map_or(0, |t| t.as_millis() as u64),
        Ordering::Release,
    );
    let store = CheckpointStore::open(&config.checkpoint.dir).map_err(|e| fatal(e.to_string()))?;
    let mut checkpoints = Vec::new();
    for sink in &config.sinks {
        let cp = store.load(sink.name()).map_err(|e| fatal(e.to_string()))?;
        if let Some(cp) = &cp {
            if cp.system_identifier != system.system_id || cp.slot != s.slot {
                return Err(fatal(format!(
                    "the checkpoint of sink {:?} belongs to slot {:?} on system {}, but this is slot {:?} on system {}; point checkpoint.dir at the right directory, or remove the file to start that sink afresh",
                    sink.name(), cp.slot, cp.system_identifier, s.slot, system.system_id
                )));
            }
        }
        checkpoints.push(cp.map(|c| c.lsn));
    }
    let (slot_pos, created) = match &slot {
        None => {
            if let Some((sink, lsn)) = config
                .sinks
                .iter()
                .zip(&checkpoints)
                .find_map(|(c, l)| l.map(|l| (c.name(), l)))
            {
                return Err(fatal(format!(
                    "changes were lost: replication slot {:?} does not exist, but sink {sink:?} has a checkpoint at {lsn}. \
                     The slot was dropped, so the changes after that checkpoint are gone for the sinks, and a new slot would start after the gap; pgferry creates none. \
                     Re-load the sinks from the tables (source.snapshot = \"initial\"), then remove the checkpoint files in {} so that pgferry starts afresh with a new slot",
                    s.slot,
                    config.checkpoint.dir.display()
                )));
            }
            if !s.create_slot {
                return Err(fatal(format!(
                    "replication slot {:?} does not exist and source.create_slot is false; create it with SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
                    s.slot, s.slot
                )));
            }
            let lsn = repl.create_slot(&s.slot).await.map_err(slot_create_error)?;
            tracing::info!(slot = %s.slot, consistent_point = %lsn, "created replication slot");
            (lsn, true)
        }
        Some(info) => {
            check_slot(config, info, system.dbname.as_deref())?;
            (info.confirmed_flush.unwrap_or(Lsn::ZERO), false)
        }
    };
    gap_check(config, &checkpoints, slot_pos, created)?;
    Ok(Prepared {
        client,
        sql_end,
        repl,
        system,
        version,
        checkpoints,
        slot_pos,
        store,
        wal_sender_timeout,
        added,
    })
}

/// The slot exists: it must be ours to use.
fn check_slot(config: &Config, info: &SlotInfo, database: Option<&str>) -> Result<(), SourceError> {
    let s = &config.source;
    if let Some(why) = slot_mismatch(info, &s.slot, database) {
        return Err(fatal(why));
    }
    if info.wal_status.as_deref() == Some("lost") {
        return Err(fatal(crate::observe::lost_slot_message(
            &s.slot,
            &config.checkpoint.dir,
        )));
    }
    Ok(())
}

/// No sink may start behind the slot: the changes in between are gone.
fn gap_check(
    config: &Config,
    checkpoints: &[Option<Lsn>],
    slot_pos: Lsn,
    created: bool,
) -> Result<(), SourceError> {
    let s = &config.source;
    for (sink, cp) in config.sinks.iter().zip(checkpoints) {
        match cp {
            Some(cp) if slot_pos > *cp => {
                return Err(fatal(format!(
                    "changes were lost: slot {:?} has confirmed_flush_lsn {slot_pos}, ahead of the checkpoint {cp} of sink {:?}. \
                     The slot was dropped and recreated, or another consumer advanced it, so the changes in between are gone for this sink. \
                     pgferry will not stream on over the gap. Re-load the sink from the table (snapshot), then remove {} to resume from the slot's position",
                    s.slot,
                    sink.name(),
                    config.checkpoint.dir.join(format!("{}.checkpoint.json", sink.name())).display()
                )));
            }
            Some(_) => {}
            None if !created => {
                tracing::warn!(sink = sink.name(), slot = %s.slot, position = %slot_pos, "sink has no checkpoint; it starts at the slot's confirmed position");
            }
            None => {}
        }
    }
    Ok(())
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

/// The configured tables, each bound to the relation the catalog gives its
/// name now (see `decode::routes`: a configured name then follows its
/// table by OID through renames).
async fn table_routes(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<Routes, SourceError> {
    let names = config.source.table_names();
    let mut routes = Routes::only(names.iter().cloned());
    let sql: Vec<String> = names
        .iter()
        .map(|(s, t)| crate::config::sql_table(s, t))
        .collect();
    let rows = client
        .query(
            "SELECT n.i::int, pg_catalog.to_regclass(n.name)::pg_catalog.oid \
             FROM unnest($1::pg_catalog.text[]) WITH ORDINALITY AS n(name, i)",
            &[&sql],
        )
        .await?;
    for row in rows {
        let i: i32 = row.get(0);
        let oid: Option<u32> = row.get(1);
        if let (Some((schema, table)), Some(oid)) = (names.get(i as usize - 1), oid) {
            routes.bind_initial(schema, table, oid);
        }
    }
    Ok(routes)
}

/// How often the publications are checked while the stream is idle.
const PUBLICATION_CHECK: Duration = Duration::from_secs(5);

/// How often the composite types in use are reloaded while the stream is idle.
const COMPOSITE_REFRESH: Duration = Duration::from_secs(2);

/// The server's `wal_sender_timeout` as last read (0: disabled or unknown).
static WAL_SENDER_TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);

/// The server's `wal_sender_timeout`, as the last session read it (`None`:
/// disabled, or no session got that far yet).
pub fn wal_sender_timeout() -> Option<Duration> {
    match WAL_SENDER_TIMEOUT_MS.load(Ordering::Acquire) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

/// Spill files could not be written at this position because the disk was
/// full (0: none): `/readyz` shows it until the stream gets past it.
static SPILL_FULL_AT: AtomicU64 = AtomicU64::new(0);

/// Consecutive keepalives that ask for a reply: the walsender asks again
/// at once after each answer only when it is shutting down and waits for
/// the client to confirm everything it sent (see proto-notes/replication.md).
#[derive(Default)]
struct Pings {
    count: u32,
    last: Option<Instant>,
}

impl Pings {
    /// Notes one; true once they have come back to back long enough.
    fn note(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(500))
        {
            self.count += 1;
        } else {
            self.count = 1;
        }
        self.last = Some(now);
        self.count >= 20
    }
}

/// One streaming session: the stages wired together.
struct Session<'a> {
    config: &'a Config,
    opts: &'a RunOptions,
    client: tokio_postgres::Client,
    /// Ends with the SQL connection (`Some(SQLSTATE)` when the server ended it).
    sql_end: oneshot::Receiver<Option<String>>,
    sql_watch: bool,
    reader: conn::wire::Reader<conn::ReadSide>,
    progress: Arc<Progress>,
    senders: Vec<SinkLink>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
    sinks_stop: watch::Sender<bool>,
    loss_rx: mpsc::UnboundedReceiver<DataLoss>,
    loss_open: bool,
    snaps: Snapshots,
    assembler: Assembler,
    budget: Budget,
    received: crate::metrics::ReceiveCounter,
    proto_version: u32,
    reply_tx: mpsc::Sender<()>,
    feedback: tokio::task::JoinHandle<()>,
    feedback_stop: watch::Sender<bool>,
    observed: Option<crate::metrics::SessionGuard>,
    last_idle: Lsn,
    last_idle_at: Instant,
    pings: Pings,
    streamed: bool,
    started: Instant,
    spill_dir: std::path::PathBuf,
    /// When the composite types were last reloaded (see `refresh_composites`).
    types_refreshed: Instant,
    /// When the publications were last checked (see `check_publication`).
    publication_checked: Instant,
}

/// The sink tasks of a session, and their ends.
struct Sinks {
    senders: Vec<SinkLink>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
    stop: watch::Sender<bool>,
    loss_rx: mpsc::UnboundedReceiver<DataLoss>,
}

/// Builds every sink and starts its task; the sinks with a checkpoint
/// check first that their store still holds pgferry's state.
async fn start_sinks(
    config: &Config,
    p: &Prepared,
    starts: &[Lsn],
    progress: &Arc<Progress>,
) -> Result<Sinks, SourceError> {
    let s = &config.source;
    let (stop, stop_rx) = watch::channel(false);
    let (loss_tx, loss_rx) = mpsc::unbounded_channel();
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    let owner = crate::sink::StreamOwner {
        system_identifier: p.system.system_id.clone(),
        database: p.system.dbname.clone().unwrap_or_default(),
        slot: s.slot.clone(),
    };
    let row_source: Arc<dyn crate::sink::rows::RowSource> = Arc::new(rows::PgRows::new(
        &config.source.url,
        &config.source.network,
    ));
    for (i, sc) in config.sinks.iter().enumerate() {
        let sink = crate::sink::build(sc, &owner, row_source.clone())
            .await
            .map_err(|e| fatal(e.to_string()))?;
        let (tx, rx) = mpsc::channel(64);
        let state = Arc::new(SinkState::default());
        let slow_after = crate::pipeline::slow_bound(
            sc.name(),
            Duration::from_millis(config.pipeline.slow_sink_detach_ms),
        );
        senders.push(SinkLink {
            name: sc.name().to_string(),
            tx,
            state: state.clone(),
            slow_after,
            progress: progress.clone(),
        });
        let task = SinkTask {
            index: i,
            name: sc.name().to_string(),
            sink,
            rx,
            store: p.store.clone(),
            slot: s.slot.clone(),
            system_identifier: p.system.system_id.clone(),
            checkpoint: starts[i],
            progress: progress.clone(),
            batch_max_events: config.pipeline.batch_max_events,
            checkpoint_interval: Duration::from_millis(config.pipeline.checkpoint_interval_ms),
            linger: sc.linger(),
            state,
            max_failure: sc.max_failure_secs().map(Duration::from_secs),
            stop: stop_rx.clone(),
            loss: p.checkpoints[i].is_some().then(|| loss_tx.clone()),
            disk_full_path: None,
            slow_after,
        };
        tasks.push(tokio::spawn(task.run()));
    }

    Ok(Sinks {
        senders,
        tasks,
        stop,
        loss_rx,
    })
}

impl<'a> Session<'a> {
    /// Starts the sink tasks and the snapshot machinery, then streaming.
    async fn start(
        config: &'a Config,
        opts: &'a RunOptions,
        p: Prepared,
    ) -> Result<Session<'a>, SourceError> {
        let s = &config.source;
        let proto_version = if p.version >= 140000 { 2 } else { 1 };
        let streaming = s.streaming && p.version >= 140000;
        let starts: Vec<Lsn> = p
            .checkpoints
            .iter()
            .map(|c| c.unwrap_or(p.slot_pos))
            .collect();
        let start = starts.iter().copied().min().unwrap_or(p.slot_pos);
        let fresh = p.checkpoints.iter().all(Option::is_none);
        backfill_added_tables(&p.client, config, &p.added, fresh).await;
        let progress = Progress::new(&starts);
        let sinks = start_sinks(config, &p, &starts, &progress).await?;
        // Status updates: at most every 10 s and every wal_sender_timeout/2.
        let mut interval = Duration::from_secs(s.status_interval_secs.min(10));
        if let Some(t) = p.wal_sender_timeout {
            interval = interval.min((t / 2).max(Duration::from_millis(100)));
        }
        let spill_dir = config.spill_dir();
        crate::spill::clean_dir(&spill_dir)
            .map_err(|e| fatal(format!("spill directory {}: {e}", spill_dir.display())))?;
        let memory = config.pipeline.memory_limit_mb * 1024 * 1024;
        let assembler = Assembler::new(TypeRegistry::builtin(), memory as usize, spill_dir.clone())
            .with_routes(table_routes(&p.client, config).await?);
        let snaps = Snapshots::start(
            config,
            &p.client,
            progress.clone(),
            fresh,
            opts.exit_after_snapshot,
        )
        .await?;
        let start_opts = StartOptions {
            slot: s.slot.clone(),
            start,
            proto_version,
            publications: crate::publication::stream_publications(config),
            messages: true,
            streaming,
        };
        let (mut reader, writer) = p.repl.start_replication(&start_opts).await?;
        // Only now, with CopyBoth, does the session stream.
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            slot = %s.slot,
            start = %start,
            server_version = p.version,
            proto_version,
            streaming,
            sinks = ?config.sinks.iter().map(|c| c.name()).collect::<Vec<_>>(),
            "pgferry streaming"
        );
        let deadline = stream_deadline(p.wal_sender_timeout, interval);
        tracing::debug!(
            read_deadline_ms = deadline.as_millis() as u64,
            status_interval_ms = interval.as_millis() as u64,
            "liveness of the stream"
        );
        reader.set_read_timeout(Some(deadline));
        reader.set_coalesce(Duration::from_micros(s.read_coalesce_us));
        let states = sinks.senders.iter();
        let states = states.map(|l| (l.name.clone(), l.state.clone())).collect();
        let observed = crate::metrics::global().session(&progress, states);
        progress.received.store(start.0, Ordering::Release);
        let (reply_tx, reply_rx) = mpsc::channel::<()>(4);
        let (feedback_stop, stop_rx) = watch::channel(false);
        let feedback = tokio::spawn(feedback_loop(
            writer,
            progress.clone(),
            interval,
            reply_rx,
            stop_rx,
        ));
        Ok(Session {
            config,
            opts,
            client: p.client,
            sql_end: p.sql_end,
            sql_watch: true,
            reader,
            progress,
            senders: sinks.senders,
            tasks: sinks.tasks,
            sinks_stop: sinks.stop,
            loss_rx: sinks.loss_rx,
            loss_open: true,
            snaps,
            assembler,
            budget: Budget::new(memory),
            received: crate::metrics::ReceiveCounter::default(),
            proto_version,
            reply_tx,
            feedback,
            feedback_stop,
            observed: Some(observed),
            last_idle: Lsn::ZERO,
            last_idle_at: Instant::now(),
            pings: Pings::default(),
            streamed: false,
            started: Instant::now(),
            spill_dir,
            types_refreshed: Instant::now(),
            publication_checked: Instant::now(),
        })
    }

    /// Reads the stream until it ends, an error, or `shutdown`.
    async fn stream(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), SourceError> {
        let until = self.opts.until;
        let watch_progress = until.is_some() || self.opts.exit_after_snapshot;
        loop {
            if until.is_some_and(|u| self.progress.confirmed() >= u) {
                tracing::info!(until = %until.unwrap_or_default(), "every sink reached the --until position");
                return Ok(());
            }
            if self.snaps.exit_now()? {
                tracing::info!("the snapshot is done in every sink (--exit-after-snapshot)");
                return Ok(());
            }
            let m = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => {
                    tracing::info!("shutdown requested: finishing the batches in flight");
                    return Ok(());
                }
                m = self.reader.next() => m?,
                end = &mut self.sql_end, if self.sql_watch => {
                    self.sql_watch = false;
                    server_shutting_down(end.ok().flatten())?;
                    continue;
                }
                loss = self.loss_rx.recv(), if self.loss_open => {
                    match loss {
                        Some(loss) => self.on_data_loss(loss).await?,
                        // Every sink task has checked its store.
                        None => self.loss_open = false,
                    }
                    continue;
                }
                _ = self.progress.changed.notified(), if watch_progress => continue,
                _ = self.snaps.pickup().notified() => {
                    for t in self.snaps.service().await? {
                        self.deliver(t).await?;
                    }
                    continue;
                }
                _ = self.progress.rejoin.notified() => return Err(SourceError::Rejoin),
            };
            // Handing a transaction over can wait on the sinks: a shutdown
            // does not wait with it (what was not delivered is replayed).
            tokio::select! {
                r = self.handle(m) => r?,
                _ = shutdown.wait_for(|s| *s) => {
                    tracing::info!("shutdown requested: finishing the batches in flight");
                    return Ok(());
                }
            }
        }
    }

    /// One message of the CopyBoth stream.
    async fn handle(&mut self, m: conn::wire::BackendMessage) -> Result<(), SourceError> {
        match m.tag {
            b'd' => {}
            // How the walsender ends a session (proto-notes/replication.md):
            // CopyDone, or CommandComplete "COPY 0" once the client confirmed
            // everything at shutdown; either way the session is over.
            b'c' => {
                return Err(SourceError::Transient(
                    "the server ended the replication stream (CopyDone)".into(),
                ))
            }
            b'C' | b'Z' => {
                return Err(SourceError::Transient(
                    "the server ended the replication stream (CommandComplete): it is shutting down or restarting".into(),
                ))
            }
            b'E' => return Err(conn::wire::parse_error_fields(&m.body).into()),
            b'N' | b'S' => return Ok(()),
            t => {
                return Err(fatal(format!(
                    "unexpected message {:?} in the replication stream",
                    t as char
                )))
            }
        }
        if !self.streamed {
            self.streamed = true;
            crate::metrics::global()
                .sessions_streamed
                .fetch_add(1, Ordering::Relaxed);
        }
        self.received.bytes(&m.body);
        let msg = replication::parse_copy_data(m.body).map_err(|e| {
            fatal(format!(
                "{e}; this is a bug or a corrupted stream: please report it"
            ))
        })?;
        match msg {
            ReplicationMessage::XLogData {
                wal_start, data, ..
            } => self.on_xlog(wal_start, &data).await,
            ReplicationMessage::PrimaryKeepalive {
                wal_end,
                reply_requested,
                ..
            } => self.on_keepalive(wal_end, reply_requested).await,
        }
    }

    async fn on_xlog(&mut self, wal_start: Lsn, data: &bytes::Bytes) -> Result<(), SourceError> {
        self.progress
            .received
            .fetch_max(wal_start.0, Ordering::AcqRel);
        let ctx = self.assembler.parse_context(self.proto_version);
        let lm = pgoutput::parse(data, ctx).map_err(|e| {
            fatal(format!(
                "at {wal_start}: {e}; this is a bug or a corrupted stream: please report it"
            ))
        })?;
        self.received.message(&lm);
        if let LogicalMessage::Relation(r) = &lm {
            self.before_relation(r).await?;
        }
        let spilled_before = self.assembler.spilled_txns;
        let committed = match self.assembler.handle(wal_start, lm) {
            Err(AssembleError::StaleType { type_oid, .. }) => {
                // A user type changed (ALTER TYPE sends nothing): reload it
                // and decode the same message again.
                tracing::info!(at = %wal_start, type_oid, "a value does not match its type as loaded: reloading the type from the catalog");
                self.assembler.types_mut().load(&self.client, &[type_oid]).await?;
                self.assembler.types_reloaded_at(wal_start);
                let lm = pgoutput::parse(data, ctx).map_err(|e| fatal(format!("at {wal_start}: {e}")))?;
                self.assembler.handle(wal_start, lm)
            }
            r => r,
        }
        .map_err(|e| self.assemble_error(wal_start, e))?;
        if self.assembler.spilled_txns != spilled_before {
            tracing::info!(at = %wal_start, memory_limit_mb = self.config.pipeline.memory_limit_mb, "transaction spilled to disk");
        }
        let Some(mut txn) = committed else {
            return Ok(());
        };
        self.past_spill_failure(txn.meta.end_lsn);
        let before = self
            .snaps
            .on_commit(&mut txn, &self.client, |oid| {
                self.assembler.relation_info(oid)
            })
            .await?;
        for t in before {
            self.received.committed(&t);
            self.deliver(t).await?;
        }
        self.received.committed(&txn);
        let txn = self.deliver(txn).await?;
        self.snaps.delivered(&txn)
    }

    /// Prepares for a Relation message. It comes at each session's first
    /// change of a table and after its columns changed: the user types it
    /// uses are (re)loaded, as they may have changed too (tables that are
    /// not delivered are left alone). When it would bind a configured name
    /// to a new relation, the routes learn whether that relation is gone
    /// (a replay meeting a dropped predecessor, see `decode::routes`).
    async fn before_relation(&mut self, r: &pgoutput::Relation) -> Result<(), SourceError> {
        let schema = String::from_utf8_lossy(&r.namespace);
        let table = String::from_utf8_lossy(&r.name);
        if self
            .assembler
            .routes_mut()
            .would_rebind(r.oid, &schema, &table)
        {
            let q = "SELECT 1 FROM pg_catalog.pg_class WHERE oid = $1";
            if self.client.query_opt(q, &[&r.oid]).await?.is_none() {
                self.assembler.routes_mut().note_gone(r.oid);
            }
        }
        if self.assembler.takes(r.oid, &schema, &table) {
            let oids: Vec<u32> = r.columns.iter().map(|c| c.type_oid).collect();
            let user = self.assembler.types_mut().loaded(&oids);
            self.assembler.types_mut().load(&self.client, &user).await?;
        }
        Ok(())
    }

    async fn on_keepalive(
        &mut self,
        wal_end: Lsn,
        reply_requested: bool,
    ) -> Result<(), SourceError> {
        self.progress
            .received
            .fetch_max(wal_end.0, Ordering::AcqRel);
        if reply_requested {
            let _ = self.reply_tx.try_send(());
            let confirmed = self.progress.confirmed();
            if self.pings.note() && confirmed < wal_end {
                return Err(SourceError::Transient(format!(
                    "the server is shutting down and waits for pgferry to confirm {wal_end}, but the sinks hold the flush position back at {confirmed}: \
                     closing the session so that the server can stop; resuming from the checkpoints"
                )));
            }
        }
        // Nothing open: every commit before wal_end was received, so the
        // sinks may checkpoint it once they are caught up.
        if !self.assembler.is_idle() {
            return Ok(());
        }
        self.past_spill_failure(wal_end);
        self.refresh_composites().await?;
        self.check_publication().await?;
        for t in self.snaps.on_idle(wal_end).await? {
            self.deliver(t).await?;
        }
        if wal_end > self.last_idle
            && (reply_requested || self.last_idle_at.elapsed() >= Duration::from_secs(1))
        {
            self.last_idle = wal_end;
            self.last_idle_at = Instant::now();
            self.snaps.delivered_idle(wal_end);
            fan_out(&self.senders, Item::Idle(wal_end))
                .await
                .map_err(|g| fatal(format!("sink {:?} stopped", g.0)))?;
        }
        Ok(())
    }

    /// `ALTER TYPE … RENAME ATTRIBUTE` shows nowhere in the stream (no
    /// Relation message, and the values parse as before), so while the
    /// stream is caught up the composite types in use are reloaded now and
    /// then. Changes decoded between the rename and the next refresh keep
    /// the old name (see proto-notes/schema-changes.md).
    async fn refresh_composites(&mut self) -> Result<(), SourceError> {
        if self.types_refreshed.elapsed() < COMPOSITE_REFRESH {
            return Ok(());
        }
        self.types_refreshed = Instant::now();
        let user: Vec<u32> = (self.assembler.types_mut().composites().into_iter())
            .filter(|o| *o >= crate::decode::types::FIRST_NORMAL_OID)
            .collect();
        let types = self.assembler.types_mut();
        let before: Vec<_> = user.iter().map(|o| types.kind(*o).cloned()).collect();
        types.load(&self.client, &user).await?;
        for (oid, old) in user.iter().zip(before) {
            if types.kind(*oid) != old.as_ref() {
                tracing::warn!(type_oid = oid, "a composite type changed (ALTER TYPE … RENAME ATTRIBUTE shows nowhere in the stream): reloaded; changes decoded from here on use its new attribute names");
            }
        }
        Ok(())
    }

    /// A table dropped and created again under its name is not in a `FOR
    /// TABLE` publication, and nothing in the stream shows it: while the
    /// stream is idle, the publications are checked now and then. A
    /// configured table they lack is added back (when pgferry manages them),
    /// its old rows are cleared in the sinks (a `pgferry.replaced` message,
    /// see `decode::routes`) and its backfill is requested (with
    /// `source.snapshot = "initial"`; otherwise the log names the command).
    async fn check_publication(&mut self) -> Result<(), SourceError> {
        if self.publication_checked.elapsed() < PUBLICATION_CHECK {
            return Ok(());
        }
        self.publication_checked = Instant::now();
        let insp = crate::publication::inspect(&self.client, self.config).await?;
        if !insp.main.exists || !insp.insert.exists {
            // A dropped publication ends the stream with its own error;
            // re-creating it here would hide that.
            return Ok(());
        }
        let found = crate::publication::findings(&insp, true);
        let adds: Vec<&crate::publication::Finding> = found
            .iter()
            .filter(|f| !f.adds.is_empty() && f.repair.is_some())
            .collect();
        if adds.is_empty() {
            return Ok(());
        }
        if !self.config.source.create_publication {
            for f in adds {
                tracing::error!(what = %f.what, fix = %f.fix, "a configured table is not published (dropped and created again, or removed from the publication): its changes do not reach the sinks. Run the fix, then load its rows with pgferry backfill --table");
            }
            return Ok(());
        }
        for f in adds {
            let sql = f.repair.as_deref().unwrap_or_default();
            self.client.batch_execute(sql).await?;
            tracing::warn!(statement = %sql, tables = ?f.adds, "a configured table was not published any more (dropped and created again, or removed from the publication): added it back");
            for table in &f.adds {
                self.replace_table(table).await?;
            }
        }
        Ok(())
    }

    /// Clears a replaced table's old rows in the sinks at this point of the
    /// WAL, then requests its backfill (or names the command).
    async fn replace_table(&mut self, table: &str) -> Result<(), SourceError> {
        let Some(t) = self
            .config
            .source
            .table_names()
            .into_iter()
            .find(|(s, t)| format!("{s}.{t}") == table)
        else {
            return Ok(());
        };
        let sql = crate::config::sql_table(&t.0, &t.1);
        let row = self
            .client
            .query_one("SELECT pg_catalog.to_regclass($1)::pg_catalog.oid", &[&sql])
            .await?;
        let Some(oid) = row.get::<_, Option<u32>>(0) else {
            return Ok(());
        };
        let body = serde_json::json!({"schema": t.0, "table": t.1, "oid": oid}).to_string();
        self.client
            .execute(
                "SELECT pg_catalog.pg_logical_emit_message(true, $1, $2::text)",
                &[&crate::decode::routes::REPLACED_PREFIX, &body],
            )
            .await?;
        backfill_added_tables(&self.client, self.config, &[table.to_string()], false).await;
        Ok(())
    }

    /// Hands one committed transaction to its sinks, within the memory budget.
    async fn deliver(
        &mut self,
        mut txn: crate::event::Transaction,
    ) -> Result<Arc<crate::event::Transaction>, SourceError> {
        let only = self.snaps.only_for(txn.meta.end_lsn);
        self.budget.admit(&mut txn, &self.senders).await;
        let txn = Arc::new(txn);
        fan_out_to(&self.senders, Item::Txn(txn.clone()), only.as_deref())
            .await
            .map_err(|g| fatal(format!("sink {:?} stopped", g.0)))?;
        Ok(txn)
    }

    /// A spill file failed: a full disk is retried (and reported), other
    /// I/O errors are retried too; only protocol violations are bugs.
    fn assemble_error(&self, at: Lsn, e: AssembleError) -> SourceError {
        match e {
            AssembleError::Spill(io) => {
                let dir = &self.spill_dir;
                if crate::disk::is_full(&io) {
                    let m = crate::disk::full_message("writing a spill file in", dir, &io);
                    crate::metrics::global().disk_full(dir, &m);
                    SPILL_FULL_AT.store(at.0.max(1), Ordering::Release);
                    SourceError::DiskFull(m)
                } else {
                    SourceError::Transient(format!(
                        "spill file in {}: {io}; retrying from the checkpoints",
                        dir.display()
                    ))
                }
            }
            e => fatal(format!(
                "{e}; this is a bug or a corrupted stream: please report it"
            )),
        }
    }

    /// The stream got past the position where spilling failed.
    fn past_spill_failure(&self, at: Lsn) {
        let failed = SPILL_FULL_AT.load(Ordering::Acquire);
        if failed != 0 && at.0 > failed {
            SPILL_FULL_AT.store(0, Ordering::Release);
            crate::metrics::global().disk_ok(&self.spill_dir);
            tracing::info!(dir = %self.spill_dir.display(), "spilling works again: the disk is no longer full");
        }
    }

    /// A sink's store lost pgferry's state: act as its `on_data_loss` says,
    /// then let the sink go on.
    async fn on_data_loss(&mut self, loss: DataLoss) -> Result<(), SourceError> {
        let sc = &self.config.sinks[loss.index];
        crate::metrics::global().data_lost(&loss.sink, &loss.what);
        match sc.on_data_loss() {
            OnDataLoss::Stop => {
                return Err(fatal(format!(
                    "sink {:?} lost its data: {}. The rows it held before its checkpoint are gone from it. on_data_loss = \"stop\": pgferry stops. \
                     To refill it, set on_data_loss = \"backfill\" for this sink and start again (its tables are reloaded into it alone), or reload them with pgferry backfill; \
                     to go on without the old rows, set on_data_loss = \"warn\"",
                    loss.sink, loss.what
                )))
            }
            OnDataLoss::Warn => {
                tracing::warn!(sink = %loss.sink, lost = %loss.what,
                    "the sink's store lost pgferry's state: the rows it held before its checkpoint are gone from it, and only rows that change again come back (on_data_loss = \"warn\"). \
                     Set on_data_loss = \"backfill\" to have pgferry reload its tables into it, or run pgferry backfill");
            }
            OnDataLoss::Backfill => {
                tracing::warn!(sink = %loss.sink, lost = %loss.what,
                    "the sink's store lost pgferry's state: reloading its tables into this sink alone (on_data_loss = \"backfill\"); the other sinks are not sent the rows again");
                let tables = sc
                    .tables()
                    .unwrap_or_else(|| self.config.source.tables.clone());
                self.snaps
                    .backfill_sink(&self.client, &loss.sink, &tables)
                    .await?;
            }
        }
        let _ = loss.go_on.send(());
        Ok(())
    }

    /// Ends the session. When the connection is broken or the server wants
    /// to go (an error), the replication connection is closed first, so
    /// that the server is never held while the sinks drain; after a clean
    /// stop the sinks drain first, and the final position is reported.
    async fn end(self, result: Result<(), SourceError>) -> Result<(), SourceError> {
        let Session {
            reader,
            observed,
            snaps,
            senders,
            sinks_stop,
            tasks,
            feedback_stop,
            feedback,
            started,
            ..
        } = self;
        drop(observed);
        let close_first = matches!(
            result,
            Err(SourceError::Transient(_)
                | SourceError::DiskFull(_)
                | SourceError::SlotActive { .. })
        );
        let mut reader = Some(reader);
        let mut feedback = Some(feedback);
        let stats = reader
            .as_ref()
            .map(|r| (r.reads, r.bytes))
            .unwrap_or_default();
        if close_first {
            close_stream(&feedback_stop, feedback.take()).await;
            drop(reader.take());
        }
        snaps.stop().await;
        drop(senders);
        let _ = sinks_stop.send(true);
        let sink_error = drain(tasks).await;
        close_stream(&feedback_stop, feedback.take()).await;
        drop(reader);
        tracing::info!(
            reads = stats.0,
            bytes = stats.1,
            seconds = started.elapsed().as_secs_f64(),
            "session statistics"
        );
        if let Some(e) = sink_error {
            if let Err(ended) = &result {
                tracing::warn!(error = %ended, "the session had ended with this error before a sink failed for good");
            }
            return Err(fatal(e));
        }
        result
    }
}

/// The stream's read deadline: the server answers every status update
/// pgferry sends (they ask for a reply) and sends keepalives of its own, so
/// silence for the server's own `wal_sender_timeout` (at least two status
/// intervals) plus a margin means the path is hung.
fn stream_deadline(wal_sender_timeout: Option<Duration>, interval: Duration) -> Duration {
    const MARGIN: Duration = Duration::from_secs(5);
    wal_sender_timeout
        .unwrap_or(Duration::from_secs(60))
        .max(interval * 2)
        + MARGIN
}

/// The session's SQL connection ended; `code` is the SQLSTATE the server
/// ended it with. A fast or immediate shutdown ends every SQL session
/// first (57P01, 57P02), before the walsender is asked to stop: closing the
/// replication session then means the server never waits for pgferry.
fn server_shutting_down(code: Option<String>) -> Result<(), SourceError> {
    match code.as_deref() {
        Some(c @ ("57P01" | "57P02")) => Err(SourceError::Transient(format!(
            "the server is shutting down (it ended pgferry's SQL connection with {c}): closing the replication session at once so that the server is not held up; resuming from the checkpoints"
        ))),
        other => {
            tracing::debug!(code = ?other, "the session's SQL connection ended");
            Ok(())
        }
    }
}

/// Stops the feedback task (a last status update and CopyDone, bounded in
/// time: the path may be hung).
async fn close_stream(stop: &watch::Sender<bool>, feedback: Option<tokio::task::JoinHandle<()>>) {
    let Some(feedback) = feedback else { return };
    let _ = stop.send(true);
    let abort = feedback.abort_handle();
    if tokio::time::timeout(Duration::from_secs(1), feedback)
        .await
        .is_err()
    {
        abort.abort();
    }
}

/// Waits for the sink tasks (healthy sinks finish and checkpoint what they
/// hold; a failing or hung one gives up after [`crate::pipeline::STOP_GRACE`]),
/// but no longer than [`DRAIN_LIMIT`]. Returns a sink's fatal error.
async fn drain(tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>) -> Option<String> {
    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
    let mut sink_error = None;
    for t in tasks {
        let abort = t.abort_handle();
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => sink_error = Some(e),
            Ok(Err(e)) => sink_error = Some(format!("a sink task panicked: {e}")),
            Err(_) => {
                tracing::warn!("a sink did not finish in time at the end of the session: abandoned, its batch is replayed");
                abort.abort();
            }
        }
    }
    sink_error
}

/// Longest wait for the sinks at the end of a session.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Sends standby status updates: on a timer, when the server asks, and when
/// a checkpoint moves; a last one at shutdown, followed by CopyDone.
///
/// Those sent on the timer ask for a reply, so the server answers each with
/// a keepalive: a healthy stream is never silent for longer than the
/// interval plus a round trip, which the read deadline relies on.
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
        let ask = tokio::select! {
            _ = tick.tick() => true,
            r = reply_rx.recv() => if r.is_none() { break } else { false },
            _ = progress.changed.notified() => {
                // Tell the server promptly, but not more than ~10 times a second.
                if progress.confirmed() == sent_flush { continue; }
                tokio::time::sleep(Duration::from_millis(100)).await;
                false
            }
            _ = stop.changed() => break,
        };
        let flush = progress.confirmed();
        let write = Lsn(progress.received.load(Ordering::Acquire)).max(flush);
        buf.clear();
        replication::write_standby_status_update(write, flush, flush, pg_now(), ask, &mut buf);
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
    fn back_to_back_reply_requests_mean_the_server_waits_to_shut_down() {
        let mut p = Pings::default();
        for _ in 0..19 {
            assert!(!p.note());
        }
        assert!(p.note());
        // Apart, as the walsender asks while it runs: never.
        let mut p = Pings {
            count: 0,
            last: Some(Instant::now() - Duration::from_secs(3)),
        };
        assert!(!p.note());
        assert_eq!(p.count, 1);
    }

    #[test]
    fn the_stream_deadline_follows_wal_sender_timeout() {
        let s = Duration::from_secs;
        assert_eq!(
            stream_deadline(Some(s(5)), Duration::from_millis(2500)),
            s(10)
        );
        assert_eq!(stream_deadline(Some(s(60)), s(10)), s(65));
        assert_eq!(stream_deadline(None, s(10)), s(65));
        assert_eq!(stream_deadline(Some(s(1)), s(10)), s(25));
    }

    #[test]
    fn guc_durations() {
        assert_eq!(parse_duration_ms("60s"), Some(60_000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("2min"), Some(120_000));
        assert_eq!(parse_duration_ms("0"), Some(0));
        assert_eq!(parse_duration_ms("x"), None);
    }
}
