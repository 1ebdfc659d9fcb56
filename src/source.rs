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
//! One [`run`] call is one session. Its error has one classification,
//! [`SourceError::is_transient`]: a transient one (connection lost, server
//! restarting) makes the caller start a new session from the checkpoints
//! after a backoff; a fatal one (slot gap, missing publication, wrong
//! plugin, a sink that failed for good) stops pgferry with a message that
//! tells the operator what to do, and keeps its typed cause.
//!
//! The stages, one file each below `source/`:
//! - `preflight`: connect, check the server and publication, read the
//!   checkpoints, find or create the slot (with the gap check);
//! - `sinks`: build each sink and start its task;
//! - this file: `Session::start` (snapshot machinery, START_REPLICATION),
//!   `Session::stream` (the read loop) and `Session::end`;
//! - `schema`: following DDL while streaming (type reloads, replaced tables);
//! - `feedback`: status updates, the read deadline, and the bounded drain.
//!
//! Sinks that must read a row back (the search sink, for an update without
//! its unchanged TOAST values that its index cannot complete) get
//! `rows::PgRows`, which reads over an ordinary SQL connection.

mod feedback;
mod preflight;
mod rows;
mod schema;
mod sinks;

use feedback::*;
pub use preflight::wal_sender_timeout;
use preflight::*;
use sinks::*;

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
use crate::snapshot::{Delivered, Seen, Snapshots};

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

/// How often the publications are checked while the stream is idle.
const PUBLICATION_CHECK: Duration = Duration::from_secs(5);

/// How often the composite types in use are reloaded while the stream is idle.
const COMPOSITE_REFRESH: Duration = Duration::from_secs(2);

/// Spill files could not be written at this position because the disk was
/// full (0: none): `/readyz` shows it until the stream gets past it.
static SPILL_FULL_AT: AtomicU64 = AtomicU64::new(0);

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
    tasks: Vec<tokio::task::JoinHandle<Result<(), crate::sink::SinkError>>>,
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
        reader.set_pace(Duration::from_micros(s.read_pace_us));
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
                _ = self.snaps.wake().notified() => {
                    for t in self.snaps.seen(&self.client, Seen::Wake).await? {
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
                return Err(SourceError::transient(
                    "the server ended the replication stream (CopyDone)",
                ))
            }
            b'C' | b'Z' => {
                return Err(SourceError::transient(
                    "the server ended the replication stream (CommandComplete): it is shutting down or restarting",
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
        let relation = |oid| self.assembler.relation_info(oid);
        let seen = Seen::Commit {
            txn: &mut txn,
            relation: &relation,
        };
        let before = self.snaps.seen(&self.client, seen).await?;
        for t in before {
            self.received.committed(&t);
            self.deliver(t).await?;
        }
        self.received.committed(&txn);
        let txn = self.deliver(txn).await?;
        self.snaps.delivered(Delivered::Txn(&txn))
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
                return Err(SourceError::transient(format!(
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
        for t in self.snaps.seen(&self.client, Seen::Idle(wal_end)).await? {
            self.deliver(t).await?;
        }
        if wal_end > self.last_idle
            && (reply_requested || self.last_idle_at.elapsed() >= Duration::from_secs(1))
        {
            self.last_idle = wal_end;
            self.last_idle_at = Instant::now();
            self.snaps.delivered(Delivered::Idle(wal_end))?;
            fan_out(&self.senders, Item::Idle(wal_end))
                .await
                .map_err(|g| fatal(format!("sink {:?} stopped", g.0)))?;
        }
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
                    SourceError::disk_full(m).caused_by(io)
                } else {
                    SourceError::transient(format!(
                        "spill file in {}: {io}; retrying from the checkpoints",
                        dir.display()
                    ))
                    .caused_by(io)
                }
            }
            e => fatal(format!(
                "{e}; this is a bug or a corrupted stream: please report it"
            ))
            .caused_by(e),
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
        let close_first = result.as_ref().is_err_and(SourceError::is_broken_stream);
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
            return Err(sink_fatal(e));
        }
        result
    }
}
