//! Snapshots and backfills: loading the rows that already exist, online,
//! while the change stream keeps flowing.
//!
//! ```text
//!  worker (own SQL connection)                     stream (source's main loop)
//!  ─────────────────────────────                   ──────────────────────────────
//!  register chunk c ───────────────────────────▶   registry
//!  emit low watermark  (pg_logical_emit_message) ─▶  … L(c) commits → Merger waits for c's rows
//!  REPEATABLE READ: txid snapshot + COPY chunk
//!  send rows ──────────────────────────────────▶   Window(c) opens: every change committed
//!  emit high watermark ────────────────────────▶     from here to H(c) is replayed onto it
//!                                                   H(c) commits → the window's rows become
//!  ◀─────────────────────────── done(H end) ────     `read` events of H's transaction
//!  next chunk (keyset: key > last key)
//! ```
//!
//! The design is DBLog's (low and high watermarks in the WAL, chunked
//! keyset reads, no long transaction) with two changes, both in
//! [`merge`]:
//! - rows the window touched are not dropped but *rebased*: the window's
//!   changes are replayed onto them, so a read event is always a whole row
//!   as of the high watermark, even when the change in the window left a
//!   TOASTed column unsent;
//! - the read's snapshot (`txid_current_snapshot()` in the same
//!   REPEATABLE READ transaction as the COPY) is checked against the
//!   transactions committed before the low watermark: a transaction whose
//!   commit record precedes the watermark but which was still finishing
//!   when the read started would be invisible to the read, yet before the
//!   window; the chunk is then read again instead of being trusted.
//!
//! Read events carry the high watermark's commit LSN: stream order, which
//! is the order the sinks apply in (the search sink's versions are commit
//! LSNs for that reason).
//!
//! Durability: a chunk counts as done (and its range moves past it in
//! `snapshot.json`, see [`state`]) only once every sink has checkpointed
//! its high watermark. A killed pgferry re-reads only the chunks in flight.
//!
//! Tables without a primary key or replica identity index cannot be read in
//! key order. They are copied whole inside the exported snapshot of a
//! temporary replication slot (`CREATE_REPLICATION_SLOT … TEMPORARY …
//! EXPORT_SNAPSHOT`), whose consistent point P is exactly where the copy
//! belongs in the stream: transactions that commit before P are in it,
//! the others are not. The stream pauses while the slot is created (so it
//! cannot pass P unseen), delivers what commits before P, then waits for
//! the copy (spilled to disk, so memory stays bounded) and delivers it as
//! one transaction at P. The price, documented for users: one transaction
//! as long as the copy (it holds back vacuum), the stream stalls for the
//! copy, the copy restarts from zero after a crash, and the spill needs the
//! table's size in disk.
//!
//! Backfills are requested through the stream itself: `pgferry backfill`
//! (or any SQL client) emits a transactional logical message with prefix
//! [`BACKFILL_PREFIX`]. The request is persisted before its transaction can
//! be checkpointed, so it survives a crash, and runs like the initial
//! snapshot. A job that fails with a definite error (SQLSTATE classes 42,
//! 22, 0A, and read-only violations: a bad `--where`, a missing column, no
//! permission) is not retried: it is marked failed in `snapshot.json`,
//! logged, counted (`pgferry_snapshot_failures_total`) and shown by
//! `/readyz` until the operator cancels it (`pgferry backfill --cancel ID`,
//! which travels through the stream too). `--exit-after-snapshot` then ends
//! with an error instead of waiting forever. Other errors (a lost
//! connection) are retried with backoff.
//!
//! Layout: this file holds the registry the workers and the stream share
//! (`Shared`) and [`Snapshots`], the stream's one handle on it; the
//! stream side of the protocol is `merger.rs` (with the row merge of a
//! window in [`merge`]), the read side `worker.rs` (keyset chunks) and
//! [`copy`] (exported-snapshot copies); `plan.rs` plans a job,
//! `coordinator.rs` makes finished chunks durable and reports progress,
//! [`state`] is `snapshot.json`, and `backfill.rs` holds the
//! `pgferry backfill` commands.

mod backfill;
mod coordinator;
pub mod copy;
pub mod merge;
mod merger;
mod plan;
pub mod state;
pub mod table;
mod worker;

pub use backfill::{cancel_backfill, emit_backfill_request, list_backfills, request_backfill};
use coordinator::{coordinate, file_save, report_failure};
use merger::{Mark, Merger};
pub(crate) use plan::is_definite;
use plan::plan_job;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Deserialize;
use tokio::sync::{oneshot, Notify};

use crate::config::{Config, SnapshotMode};
use crate::event::{RelationInfo, Transaction};
use crate::flow::Progress;
use crate::lsn::Lsn;
use crate::pg::SourceError;
use crate::spill::SpillReader;
use state::{Job, State, StateFile};
use table::TableInfo;

/// Prefix of the watermark messages pgferry writes.
pub const WATERMARK_PREFIX: &str = "pgferry.snapshot";
/// Prefix of a backfill request: content `{"table": "schema.table", "where": "…"}`
/// (`where` and `slot` optional).
pub const BACKFILL_PREFIX: &str = "pgferry.backfill";

/// How many recently committed xids are remembered for the read-snapshot check.
const RECENT_XIDS: usize = 65_536;

/// A chunk read by a worker, handed to the stream side.
pub(crate) struct ChunkData {
    info: Arc<TableInfo>,
    rows: Vec<crate::event::Row>,
    /// In-progress transactions of the read's snapshot.
    xip: Vec<u32>,
}

/// Why the stream side did not take a chunk.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The read may have missed a transaction committed before the low watermark.
    Race,
    /// The exported snapshot's point was already passed.
    Passed,
}

pub(crate) enum Registered {
    Chunk {
        /// The table (stream changes are matched on its OID).
        oid: u32,
        rows: oneshot::Receiver<ChunkData>,
        done: oneshot::Sender<Result<Lsn, Refused>>,
        /// The job's sinks (`None`: all).
        only: Option<Vec<String>>,
    },
    Copy {
        /// Tells the worker the stream is paused; it may create the slot.
        paused: oneshot::Sender<()>,
        /// The consistent point of the temporary slot.
        point: oneshot::Receiver<Lsn>,
        data: oneshot::Receiver<(SpillReader, u64)>,
        done: oneshot::Sender<Result<Lsn, Refused>>,
        /// The job's sinks (`None`: all).
        only: Option<Vec<String>>,
    },
}

/// A chunk delivered but not yet durable everywhere.
#[derive(Debug)]
pub(crate) struct Completion {
    end: Lsn,
    job: u64,
    range: usize,
    after: Option<Vec<String>>,
    rows: u64,
    range_done: bool,
}

/// Rows read this session, per job (for rates and the progress bar).
#[derive(Debug, Default, Clone)]
struct Live {
    rows_read: u64,
    since: Option<Instant>,
}

/// State shared by the workers, the stream side and the coordinator.
pub(crate) struct Shared {
    config: crate::config::SnapshotConfig,
    tables: Vec<String>,
    slot: String,
    sql_url: String,
    spill_dir: std::path::PathBuf,
    /// Keepalive and timeouts of the snapshot connections.
    network: crate::config::NetworkConfig,
    file: StateFile,
    state: Mutex<State>,
    /// Held across a save of `state` (see [`Shared::persist`]).
    save_order: tokio::sync::Mutex<()>,
    registry: Mutex<HashMap<String, Registered>>,
    /// (job, range) units a worker holds.
    taken: Mutex<HashSet<(u64, usize)>>,
    infos: Mutex<HashMap<u64, Arc<TableInfo>>>,
    completions: Mutex<Vec<Completion>>,
    live: Mutex<HashMap<u64, Live>>,
    /// New work or a shutdown.
    work: Notify,
    /// A registration the stream side must pick up now (exported-snapshot copy).
    pickup: Notify,
    stopping: AtomicBool,
    run_id: String,
    next_chunk: std::sync::atomic::AtomicU64,
    /// The session's positions; also told whether jobs are open.
    progress: Arc<Progress>,
}

impl Shared {
    /// The registry of a session for `config`, with an empty state (the
    /// caller puts the loaded one in once it planned) and nothing running.
    fn new(config: &Config, file: StateFile, progress: Arc<Progress>) -> Shared {
        Shared {
            config: config.snapshot.clone(),
            tables: config.source.tables.clone(),
            slot: config.source.slot.clone(),
            sql_url: config.source.url.clone(),
            spill_dir: config.spill_dir(),
            network: config.source.network,
            file,
            state: Mutex::new(State::default()),
            save_order: tokio::sync::Mutex::new(()),
            registry: Mutex::new(HashMap::new()),
            taken: Mutex::new(HashSet::new()),
            infos: Mutex::new(HashMap::new()),
            completions: Mutex::new(Vec::new()),
            live: Mutex::new(HashMap::new()),
            work: Notify::new(),
            pickup: Notify::new(),
            stopping: AtomicBool::new(false),
            run_id: format!("{:08x}", rand::random::<u32>()),
            next_chunk: std::sync::atomic::AtomicU64::new(0),
            progress,
        }
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves the state as it is now to `snapshot.json`, off the executor,
    /// and tells the session whether jobs are open (no slow-sink detach
    /// meanwhile): every change to the jobs is saved this way, after the
    /// state lock is released.
    ///
    /// Saves are serialized (`save_order`), and each copies the state only
    /// once it holds that lock, so the last save to finish wrote the newest
    /// state: a save that lost the race can never overwrite a newer one.
    async fn persist(&self) -> Result<(), state::StateError> {
        let _order = self.save_order.lock().await;
        let st = self.lock_state().clone();
        self.progress.set_snapshot_open(!st.jobs.is_empty());
        self.file.save_off_executor(&st).await
    }

    /// Adds a planned job (under the state lock the caller holds).
    fn add_job(&self, st: &mut State, job: Job, info: TableInfo) {
        self.infos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.id, Arc::new(info));
        st.jobs.push(job);
    }

    /// A range of an unfinished job that no worker holds.
    fn take_unit(&self) -> Option<(Job, usize)> {
        let s = self.lock_state();
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        for j in &s.jobs {
            for (i, r) in j.ranges.iter().enumerate() {
                if !r.done && !taken.contains(&(j.id, i)) {
                    taken.insert((j.id, i));
                    return Some((j.clone(), i));
                }
            }
        }
        None
    }

    /// Marks job `id` failed for good (a definite error): no worker takes
    /// it again, and it is shown until cancelled.
    async fn fail_job(&self, id: u64, error: &str) {
        let job = {
            let mut st = self.lock_state();
            let Some(job) = st.jobs.iter().find(|j| j.id == id).cloned() else {
                return;
            };
            st.fail(id, error);
            job
        };
        if let Err(e) = self.persist().await {
            tracing::error!(error = %e, "could not record the failed snapshot job");
        }
        report_failure(id, &job.table, &job.kind, error, true);
    }

    /// Job `id` is still planned (not finished, failed or cancelled).
    fn job_active(&self, id: u64) -> bool {
        self.lock_state().jobs.iter().any(|j| j.id == id)
    }

    fn release(&self, job: u64, range: usize) {
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(job, range));
    }

    fn chunk_id(&self) -> String {
        let n = self.next_chunk.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.run_id)
    }

    /// A chunk the stream side took; durable once every sink passed `end`.
    fn complete(&self, c: Completion) {
        self.completions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c);
    }

    fn count_read(&self, job: u64, rows: u64) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let l = live.entry(job).or_default();
        l.since.get_or_insert_with(Instant::now);
        l.rows_read += rows;
    }
}

/// What the stream saw, told to [`Snapshots::seen`] before it delivers it.
pub enum Seen<'a> {
    /// A committed transaction: replayed onto the open windows (a change
    /// inside a window rebases the chunk's rows), its watermarks and
    /// backfill requests acted on (a request is persisted before this
    /// returns, so before its transaction can be checkpointed).
    /// `relation` looks up the stream's current relation by OID.
    Commit {
        txn: &'a mut Transaction,
        relation: &'a (dyn Fn(u32) -> Option<Arc<RelationInfo>> + Sync),
    },
    /// A keepalive with nothing open: every commit before this position
    /// was seen, so a copy whose point it passes can be delivered.
    Idle(Lsn),
    /// [`Snapshots::wake`] fired: a worker registered a copy that needs
    /// the stream paused now.
    Wake,
}

/// What the stream handed to the sinks, told to [`Snapshots::delivered`].
pub enum Delivered<'a> {
    /// A transaction (after those [`Snapshots::seen`] returned before it):
    /// its changes are buffered for the windows still open.
    Txn(&'a Transaction),
    /// An idle position: a copy's point must stay ahead of it.
    Idle(Lsn),
}

/// The snapshot machinery of one replication session, and the stream's
/// one narrow interface to it.
///
/// The stream calls, in stream order and from its one task:
/// 1. [`Snapshots::seen`] with each committed transaction, each idle
///    position it is about to hand to the sinks, and each
///    [`Snapshots::wake`]; it delivers what `seen` returns first, in order,
///    asking [`Snapshots::only_for`] which sinks each goes to;
/// 2. [`Snapshots::delivered`] with the transaction (or idle position)
///    once it is handed to the sinks.
///
/// Invariants the stream keeps: nothing is delivered that `seen` was not
/// told first; `delivered` follows in the same order; and transactions that
/// `seen` returned are delivered before the one it was called with. Besides
/// those, the session asks [`Snapshots::exit_now`] between messages, plans
/// a reload with [`Snapshots::backfill_sink`], and ends with
/// [`Snapshots::stop`].
pub struct Snapshots {
    shared: Arc<Shared>,
    merger: Merger,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    exit_when_done: bool,
}

impl Snapshots {
    /// Loads `snapshot.json`, plans the initial snapshot when this is the
    /// first start (`fresh`: no sink has a checkpoint) and `source.snapshot`
    /// asks for it, and starts the workers and the coordinator.
    pub async fn start(
        config: &Config,
        client: &tokio_postgres::Client,
        progress: Arc<Progress>,
        fresh: bool,
        exit_when_done: bool,
    ) -> Result<Snapshots, SourceError> {
        let file = StateFile::new(&config.checkpoint.dir);
        let mut st = file
            .load()
            .map_err(|e| SourceError::fatal(e.to_string()).caused_by(e))?;
        if fresh {
            // No sink has a checkpoint, so no chunk can have been durable:
            // progress recorded here belongs to sinks whose checkpoints were
            // removed (to reload them). Resuming it would skip rows.
            let before = st.jobs.len();
            st.jobs
                .retain(|j| j.rows_done == 0 && j.ranges.iter().all(|r| r.chunks_done == 0));
            if st.jobs.len() != before {
                tracing::warn!(
                    dropped = before - st.jobs.len(),
                    "the sinks have no checkpoint, so the snapshot progress in snapshot.json is stale: those jobs start over"
                );
                st.initial_planned = false;
            }
        }
        let resumed = st.active();
        let shared = Arc::new(Shared::new(config, file, progress.clone()));
        // Fresh sinks get the initial snapshot, unless one is already under
        // way (a crash before the first checkpoint resumes it). Removing the
        // checkpoint files, as the lost-slot advice says, plans a new one.
        let initial_running = st.jobs.iter().any(|j| j.kind == "initial");
        if config.source.snapshot == SnapshotMode::Initial && fresh && !initial_running {
            for t in &config.source.tables {
                let (job, info) = plan_job(&shared, client, &mut st, t, None, "initial").await?;
                shared.add_job(&mut st, job, info);
            }
            st.initial_planned = true;
            *shared.lock_state() = st.clone();
            file_save(&shared).await?;
            tracing::info!(
                tables = config.source.tables.len(),
                "initial snapshot planned"
            );
        } else if config.source.snapshot == SnapshotMode::Initial && !fresh && !st.initial_planned {
            tracing::info!("source.snapshot = \"initial\", but the sinks already have checkpoints: no initial snapshot (use pgferry backfill to re-load a table)");
        }
        if resumed {
            let pending: Vec<String> = st
                .jobs
                .iter()
                .map(|j| format!("{} ({} rows done)", j.table, j.rows_done))
                .collect();
            tracing::info!(jobs = ?pending, "resuming snapshot jobs");
        }
        for f in &st.failed {
            report_failure(f.id, &f.table, &f.kind, &f.error, false);
        }
        shared.progress.set_snapshot_open(!st.jobs.is_empty());
        *shared.lock_state() = st;
        let mut tasks = Vec::new();
        for n in 0..config.snapshot.workers {
            tasks.push(tokio::spawn(worker::run(shared.clone(), n)));
        }
        tasks.push(tokio::spawn(coordinate(shared.clone(), progress)));
        Ok(Snapshots {
            merger: Merger {
                shared: shared.clone(),
                open: Vec::new(),
                copies: Vec::new(),
                recent: VecDeque::new(),
                recent_set: HashMap::new(),
                seq: 0,
                max_buffer: (config.pipeline.memory_limit_mb as usize).saturating_mul(1 << 20),
                delivered: Lsn::ZERO,
                targets: HashMap::new(),
            },
            shared,
            tasks,
            exit_when_done,
        })
    }

    /// Every planned job is durably done (and `--exit-after-snapshot` was
    /// asked). An error when some failed for good: exiting as if the
    /// snapshot were complete would hide it.
    pub fn exit_now(&self) -> Result<bool, SourceError> {
        if !self.exit_when_done {
            return Ok(false);
        }
        let st = self.shared.lock_state();
        if st.active() {
            return Ok(false);
        }
        if st.failed.is_empty() {
            return Ok(true);
        }
        let list: Vec<String> = st
            .failed
            .iter()
            .map(|f| format!("job {} ({}): {}", f.id, f.table, f.error))
            .collect();
        Err(SourceError::fatal(format!(
            "the snapshot ended, but {} job(s) failed: {}; fix the cause and request them again, and acknowledge the failures with pgferry backfill --cancel ID",
            list.len(),
            list.join("; ")
        )))
    }

    /// Fires when the snapshot side needs the stream to call
    /// [`Snapshots::seen`] with [`Seen::Wake`] between two transactions.
    pub fn wake(&self) -> &Notify {
        &self.shared.pickup
    }

    /// The stream saw `what`, and has not delivered it yet. Returns the
    /// transactions to deliver *before* it, in order (the rows of an
    /// exported-snapshot copy whose point it crosses; the read events of a
    /// chunk). See [`Seen`] for what each case does.
    pub async fn seen(
        &mut self,
        client: &tokio_postgres::Client,
        what: Seen<'_>,
    ) -> Result<Vec<Transaction>, SourceError> {
        match what {
            Seen::Commit { txn, relation } => {
                let before = self.merger.cross(Some(txn.meta.commit_lsn), None).await?;
                self.merger.poll_pending();
                self.merger.replay(txn)?;
                let requests = self.merger.watermarks(txn, relation).await?;
                for r in requests {
                    self.backfill_request(client, r).await?;
                }
                self.merger.remember(txn.meta.xid);
                self.merger.delivered = self.merger.delivered.max(txn.meta.end_lsn);
                Ok(before)
            }
            Seen::Idle(wal_end) => self.merger.cross(None, Some(wal_end)).await,
            Seen::Wake => self.merger.cross(None, None).await,
        }
    }

    /// The stream handed `what` to the sinks.
    pub fn delivered(&mut self, what: Delivered<'_>) -> Result<(), SourceError> {
        match what {
            Delivered::Txn(txn) => self.merger.buffer(txn),
            Delivered::Idle(at) => {
                self.merger.delivered = self.merger.delivered.max(at);
                Ok(())
            }
        }
    }

    /// The sinks that alone get the transaction ending at `end` (the rows
    /// of a job for some sinks only); `None`: every sink. Asked once for
    /// each transaction the stream delivers.
    pub fn only_for(&mut self, end: Lsn) -> Option<Vec<String>> {
        if self.merger.targets.is_empty() {
            return None;
        }
        self.merger.targets.remove(&end)
    }

    /// Plans a reload of `tables` into `sink` alone (its store lost its
    /// data): persisted, and run like a backfill.
    pub async fn backfill_sink(
        &mut self,
        client: &tokio_postgres::Client,
        sink: &str,
        tables: &[String],
    ) -> Result<(), SourceError> {
        let targets_sink = |j: &Job, t: &str| {
            j.table == t
                && !j.is_done()
                && j.sinks
                    .as_ref()
                    .is_some_and(|s| s.iter().any(|n| n == sink))
        };
        // Planning reads the catalog: outside the lock, on a scratch state
        // (only this task allocates job ids).
        let (next_job, todo) = {
            let st = self.shared.lock_state();
            // Found again by a later session before the sink wrote anything.
            let todo: Vec<&String> = tables
                .iter()
                .filter(|t| !st.jobs.iter().any(|j| targets_sink(j, t)))
                .collect();
            (st.next_job, todo)
        };
        let mut scratch = State {
            next_job,
            ..State::default()
        };
        let mut planned = Vec::new();
        for t in todo {
            let (mut job, info) =
                plan_job(&self.shared, client, &mut scratch, t, None, "data-loss").await?;
            job.sinks = Some(vec![sink.to_string()]);
            planned.push((job, info));
        }
        {
            let mut st = self.shared.lock_state();
            st.next_job = scratch.next_job;
            for (job, info) in planned {
                self.shared.add_job(&mut st, job, info);
            }
        }
        file_save(&self.shared).await?;
        self.shared.work.notify_waiters();
        tracing::info!(sink, tables = ?tables, "reload of the sink's tables planned");
        Ok(())
    }

    /// Acts on a backfill request or cancellation from the stream. A request
    /// that cannot run (unknown table, bad condition) becomes a failed job,
    /// visible until cancelled; a lost connection ends the session, and the
    /// request is read again from the stream.
    async fn backfill_request(
        &mut self,
        client: &tokio_postgres::Client,
        r: (Lsn, Request),
    ) -> Result<(), SourceError> {
        let (lsn, req) = r;
        let next_job = {
            let st = self.shared.lock_state();
            if lsn <= st.last_request() {
                return Ok(());
            }
            st.next_job
        };
        // Planning reads the catalog: outside the lock, on a scratch state
        // (only this task allocates job ids).
        let mut scratch = State {
            next_job,
            ..State::default()
        };
        let planned = match (&req.cancel, &req.table) {
            (Some(_), _) => None,
            (None, Some(t)) => Some(self.plan_request(client, &mut scratch, t, &req).await?),
            (None, None) => Some(Err((
                "(none)".to_string(),
                "the request names no table".to_string(),
            ))),
        };
        self.record_request(lsn, &req, planned, scratch.next_job);
        file_save(&self.shared).await?;
        self.shared.work.notify_waiters();
        Ok(())
    }

    /// Writes a request's outcome into the state (saved by the caller): a
    /// cancellation, a planned job, or a job that cannot run.
    fn record_request(
        &self,
        lsn: Lsn,
        req: &Request,
        planned: Option<Result<(Job, TableInfo), (String, String)>>,
        next_job: u64,
    ) {
        let mut st = self.shared.lock_state();
        st.last_request_lsn = Some(lsn.to_string());
        if let Some(id) = req.cancel {
            if st.cancel(id) {
                tracing::info!(job = id, at = %lsn, "snapshot job cancelled");
                crate::metrics::global().snapshot_job_cleared(id);
            } else {
                tracing::warn!(job = id, at = %lsn, "cancel request for a snapshot job that does not exist (finished, or already cancelled): ignored");
            }
        }
        match planned {
            None => {}
            Some(Ok((job, info))) => {
                tracing::info!(job = job.id, table = %job.table, filter = ?job.filter, at = %lsn, rows_estimate = job.rows_estimate, "backfill requested");
                st.next_job = next_job;
                self.shared.add_job(&mut st, job, info);
            }
            Some(Err((table, error))) => {
                st.next_job += 1;
                let id = st.next_job;
                st.failed.push(state::FailedJob {
                    id,
                    table: table.clone(),
                    filter: req.filter.clone(),
                    kind: "backfill".into(),
                    error: error.clone(),
                    failed_at: state::unix_now(),
                    rows_done: 0,
                });
                report_failure(id, &table, "backfill", &error, true);
            }
        }
    }

    /// Plans a requested backfill. `Err` inside: (table, why it cannot run).
    async fn plan_request(
        &self,
        client: &tokio_postgres::Client,
        scratch: &mut State,
        table: &str,
        req: &Request,
    ) -> Result<Result<(Job, TableInfo), (String, String)>, SourceError> {
        let Some(table) = crate::config::canonical_table(table) else {
            return Ok(Err((
                table.to_string(),
                format!("{table:?} is not a table name (schema.table)"),
            )));
        };
        if !self.shared.tables.contains(&table) {
            return Ok(Err((
                table.clone(),
                format!(
                    "{table} is not in source.tables; only replicated tables can be backfilled"
                ),
            )));
        }
        match plan_job(
            &self.shared,
            client,
            scratch,
            &table,
            req.filter.clone(),
            "backfill",
        )
        .await
        {
            Ok(x) => Ok(Ok(x)),
            Err(e) if !e.is_transient() => Ok(Err((table, e.to_string()))),
            Err(e) => Err(e),
        }
    }

    /// Ends the session's workers; unfinished chunks are read again next time.
    pub async fn stop(self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.work.notify_waiters();
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// A backfill request read from the stream.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Request {
    #[serde(default)]
    table: Option<String>,
    #[serde(default, rename = "where")]
    filter: Option<String>,
    #[serde(default)]
    slot: Option<String>,
    /// Cancel this job (active or failed) instead of planning one.
    #[serde(default)]
    cancel: Option<u64>,
}
