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

pub mod copy;
pub mod merge;
pub mod state;
pub mod table;
mod worker;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{oneshot, Notify};

use crate::config::{Config, SnapshotMode};
use crate::event::{Changes, RelationInfo, Transaction, TxnMeta};
use crate::flow::Progress;
use crate::lsn::Lsn;
use crate::pg::SourceError;
use crate::spill::SpillReader;
use merge::Window;
use state::{Job, Method, Range, State, StateFile};
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
}

impl Shared {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, s: &State) -> Result<(), String> {
        self.file.save(s)
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
    fn fail_job(&self, id: u64, error: &str) {
        let mut st = self.lock_state();
        let Some(job) = st.jobs.iter().find(|j| j.id == id).cloned() else {
            return;
        };
        st.fail(id, error);
        if let Err(e) = self.save(&st) {
            tracing::error!(error = %e, "could not record the failed snapshot job");
        }
        drop(st);
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

/// The snapshot machinery of one replication session.
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
        let mut st = file.load().map_err(SourceError::Fatal)?;
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
        let shared = Arc::new(Shared {
            config: config.snapshot.clone(),
            tables: config.source.tables.clone(),
            slot: config.source.slot.clone(),
            sql_url: config.source.url.clone(),
            spill_dir: config.spill_dir(),
            network: config.source.network,
            file,
            state: Mutex::new(State::default()),
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
        });
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
            file_save(&shared, &st)?;
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
        crate::flow::set_snapshot_open(!st.jobs.is_empty());
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
        Err(SourceError::Fatal(format!(
            "the snapshot ended, but {} job(s) failed: {}; fix the cause and request them again, and acknowledge the failures with pgferry backfill --cancel ID",
            list.len(),
            list.join("; ")
        )))
    }

    /// Woken when a worker needs the stream side to act between transactions.
    pub fn pickup(&self) -> &Notify {
        &self.shared.pickup
    }

    /// Handles a committed transaction before it goes to the sinks: replays
    /// it onto open windows, acts on watermarks and backfill requests, and
    /// returns the transactions to deliver *before* it (an exported-snapshot
    /// copy whose point it crosses). `relation` looks up the stream's
    /// current relation by OID.
    pub async fn on_commit(
        &mut self,
        txn: &mut Transaction,
        client: &tokio_postgres::Client,
        relation: impl Fn(u32) -> Option<Arc<RelationInfo>>,
    ) -> Result<Vec<Transaction>, SourceError> {
        let before = self.merger.cross(Some(txn.meta.commit_lsn), None).await?;
        self.merger.poll_pending();
        self.merger.replay(txn)?;
        let requests = self.merger.watermarks(txn, &relation).await?;
        for r in requests {
            self.backfill_request(client, r).await?;
        }
        self.merger.remember(txn.meta.xid);
        self.merger.delivered = self.merger.delivered.max(txn.meta.end_lsn);
        Ok(before)
    }

    /// Called with each transaction once it is handed to the sinks.
    pub fn delivered(&mut self, txn: &Transaction) -> Result<(), SourceError> {
        self.merger.buffer(txn)
    }

    /// A keepalive with nothing open: every commit before `wal_end` was seen.
    pub async fn on_idle(&mut self, wal_end: Lsn) -> Result<Vec<Transaction>, SourceError> {
        let out = self.merger.cross(None, Some(wal_end)).await?;
        Ok(out)
    }

    /// Idle positions handed to the sinks (a copy's point must stay ahead of them).
    pub fn delivered_idle(&mut self, wal_end: Lsn) {
        self.merger.delivered = self.merger.delivered.max(wal_end);
    }

    /// The sinks that alone get the transaction ending at `end` (the rows
    /// of a job for some sinks only); `None`: every sink.
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
        let mut st = self.shared.lock_state();
        st.next_job = scratch.next_job;
        for (job, info) in planned {
            self.shared.add_job(&mut st, job, info);
        }
        file_save(&self.shared, &st)?;
        drop(st);
        self.shared.work.notify_waiters();
        tracing::info!(sink, tables = ?tables, "reload of the sink's tables planned");
        Ok(())
    }

    /// Picks up registrations (called when [`Self::pickup`] fires).
    pub async fn service(&mut self) -> Result<Vec<Transaction>, SourceError> {
        self.merger.cross(None, None).await
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
                st.next_job = scratch.next_job;
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
        file_save(&self.shared, &st)?;
        drop(st);
        self.shared.work.notify_waiters();
        Ok(())
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
            Err(SourceError::Fatal(e)) => Ok(Err((table, e))),
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

fn file_save(shared: &Shared, st: &State) -> Result<(), SourceError> {
    crate::flow::set_snapshot_open(!st.jobs.is_empty());
    shared.save(st).map_err(|e| {
        if e.starts_with("disk full") {
            // Retried from the checkpoints, like a full spill directory.
            crate::metrics::global().disk_full(shared.file.path(), &e);
            SourceError::DiskFull(e)
        } else {
            SourceError::Fatal(format!("{e}; check that checkpoint.dir is writable"))
        }
    })?;
    crate::metrics::global().disk_ok(shared.file.path());
    Ok(())
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

/// Logs a job that failed for good and shows it in the metrics and `/readyz`.
/// `now`: it failed just now (counted), rather than in an earlier run.
fn report_failure(id: u64, table: &str, kind: &str, error: &str, now: bool) {
    if now {
        tracing::error!(job = id, table = %table, kind = %kind, error = %error,
            "snapshot job failed, and retrying cannot help: fix the cause and request it again; acknowledge with pgferry backfill --cancel {id}");
    }
    crate::metrics::global().snapshot_job_failed(id, table, error, now);
}

/// Describes the table, checks the filter, and cuts the table into ranges.
/// A `Fatal` error is definite (no such table, a condition Postgres
/// refuses); the caller inserts the returned info into `shared.infos`.
async fn plan_job(
    shared: &Shared,
    client: &tokio_postgres::Client,
    st: &mut State,
    qualified: &str,
    filter: Option<String>,
    kind: &str,
) -> Result<(Job, TableInfo), SourceError> {
    let Some((schema, table)) = crate::config::split_table(qualified) else {
        return Err(SourceError::Fatal(format!(
            "{qualified:?} is not schema.table"
        )));
    };
    let info = table::describe(client, &schema, &table)
        .await?
        .ok_or_else(|| {
            SourceError::Fatal(format!(
                "table {qualified} does not exist; remove it from source.tables or create it"
            ))
        })?;
    if let Some(f) = &filter {
        check_filter(client, &info.qualified_sql(), f)
            .await
            .map_err(|e| match e {
                FilterError::Refused(m) => SourceError::Fatal(format!(
                    "the condition {f:?} cannot be used on {qualified}: {m}"
                )),
                FilterError::Other(e) => e.into(),
            })?;
    }
    let method = if info.key_cols.is_empty() {
        tracing::info!(table = qualified, "no primary key or replica identity index: the table will be copied in an exported snapshot");
        Method::Copy
    } else {
        Method::Keyset
    };
    let chunk = shared.config.chunk_rows as u64;
    let parts = if method == Method::Keyset && info.rows_estimate > chunk * 4 {
        ((info.rows_estimate / (chunk * 2)) as usize)
            .min(shared.config.workers * 2)
            .clamp(1, 32)
    } else {
        1
    };
    let points = if parts > 1 && filter.is_none() {
        table::split_points(client, &info, parts).await?
    } else {
        Vec::new()
    };
    let mut ranges = Vec::new();
    let mut lower: Option<Vec<String>> = None;
    for p in points
        .iter()
        .cloned()
        .map(Some)
        .chain(std::iter::once(None))
    {
        ranges.push(Range {
            after: lower.clone(),
            upper: p.clone(),
            done: false,
            chunks_done: 0,
        });
        lower = p;
    }
    st.next_job += 1;
    let job = Job {
        id: st.next_job,
        table: qualified.to_string(),
        filter,
        kind: kind.to_string(),
        sinks: None,
        method,
        rows_estimate: info.rows_estimate,
        rows_done: 0,
        planned_at: state::unix_now(),
        ranges,
    };
    Ok((job, info))
}

/// Why a backfill condition cannot be used.
pub(crate) enum FilterError {
    /// Postgres refused it for good (syntax, unknown column, permission).
    Refused(String),
    Other(tokio_postgres::Error),
}

/// SQLSTATEs that no retry can fix in a snapshot read: syntax errors and
/// access rules (42), data exceptions (22), unsupported features (0A),
/// and writing in a read-only transaction (25006).
pub(crate) fn is_definite(code: &str) -> bool {
    code.starts_with("42") || code.starts_with("22") || code.starts_with("0A") || code == "25006"
}

/// Checks a `--where` condition on `table` (SQL name) without reading a
/// row, in a read-only transaction, as one statement (the extended
/// protocol runs no second statement smuggled in with `;`).
pub(crate) async fn check_filter(
    client: &tokio_postgres::Client,
    table: &str,
    filter: &str,
) -> Result<(), FilterError> {
    let sql = format!("SELECT 1 FROM {table} WHERE ({filter}) LIMIT 0");
    client
        .batch_execute("BEGIN READ ONLY")
        .await
        .map_err(FilterError::Other)?;
    let res = client.query(sql.as_str(), &[]).await.map(|_| ());
    let _ = client.batch_execute("ROLLBACK").await;
    res.map_err(|e| match e.as_db_error() {
        Some(d) if is_definite(d.code().code()) => {
            FilterError::Refused(format!("{}: {}", d.code().code(), d.message()))
        }
        _ => FilterError::Other(e),
    })
}

/// An exported-snapshot copy waiting for the stream to reach its point.
struct PendingCopy {
    point: Lsn,
    data: oneshot::Receiver<(SpillReader, u64)>,
    done: oneshot::Sender<Result<Lsn, Refused>>,
    only: Option<Vec<String>>,
}

/// A chunk whose low watermark the stream passed.
struct OpenWindow {
    id: String,
    state: WinState,
    done: oneshot::Sender<Result<Lsn, Refused>>,
    /// The job's sinks (`None`: all).
    only: Option<Vec<String>>,
}

enum WinState {
    /// The worker is still reading: the window's changes to the table are
    /// kept (copies, outside the memory budget, so that they can never hold
    /// the budget the stream waits for) and replayed when the rows come.
    /// The stream does not wait. Past `max_buffer` bytes the chunk is given
    /// up and read again, so memory stays bounded.
    Pending {
        oid: u32,
        rows: oneshot::Receiver<ChunkData>,
        /// Commit sequence number at the low watermark.
        low_seq: u64,
        buffered: Vec<crate::event::Change>,
        bytes: usize,
        overflow: bool,
    },
    Active(Window),
}

/// The stream side.
struct Merger {
    shared: Arc<Shared>,
    open: Vec<OpenWindow>,
    copies: Vec<PendingCopy>,
    /// Commit sequence numbers of recently committed xids (oldest first).
    recent: VecDeque<u32>,
    recent_set: HashMap<u32, u64>,
    seq: u64,
    /// Bytes of changes a pending window may keep before its chunk is read again.
    max_buffer: usize,
    /// Highest end position handed to the sinks.
    delivered: Lsn,
    /// End positions of transactions that carry the rows of a job for some
    /// sinks only, with those sinks (see [`Snapshots::only_for`]).
    targets: HashMap<Lsn, Vec<String>>,
}

impl Merger {
    fn remember(&mut self, xid: u32) {
        self.seq += 1;
        self.recent.push_back(xid);
        self.recent_set.insert(xid, self.seq);
        if self.recent.len() > RECENT_XIDS {
            if let Some(old) = self.recent.pop_front() {
                if self
                    .recent_set
                    .get(&old)
                    .is_some_and(|s| *s + RECENT_XIDS as u64 <= self.seq)
                {
                    self.recent_set.remove(&old);
                }
            }
        }
    }

    /// Turns a pending window active once its rows are in: checks the read's
    /// snapshot, then replays the transactions that committed since the low
    /// watermark. `None`: the chunk was refused or its worker went away.
    fn activate(&mut self, w: OpenWindow, data: ChunkData) -> Option<OpenWindow> {
        let WinState::Pending {
            low_seq,
            buffered,
            overflow,
            ..
        } = w.state
        else {
            return Some(w);
        };
        if overflow {
            tracing::debug!(chunk = %w.id, "too many changes to the table while the chunk was read: reading it again");
            let _ = w.done.send(Err(Refused::Race));
            return None;
        }
        let raced = data
            .xip
            .iter()
            .find(|x| self.recent_set.get(x).is_some_and(|s| *s <= low_seq))
            .copied();
        if let Some(x) = raced {
            tracing::debug!(chunk = %w.id, xid = x, "a transaction committed before the low watermark was invisible to the read: reading the chunk again");
            let _ = w.done.send(Err(Refused::Race));
            return None;
        }
        let mut window = Window::new(
            w.id.clone(),
            data.info.rel.clone(),
            &data.info.key_cols,
            data.rows,
        );
        for c in &buffered {
            window.apply(c);
        }
        Some(OpenWindow {
            id: w.id,
            state: WinState::Active(window),
            done: w.done,
            only: w.only,
        })
    }

    /// Activates the pending windows whose rows arrived.
    fn poll_pending(&mut self) {
        let open = std::mem::take(&mut self.open);
        for mut w in open {
            let got = match &mut w.state {
                WinState::Pending { rows, .. } => match rows.try_recv() {
                    Ok(d) => Some(Some(d)),
                    Err(oneshot::error::TryRecvError::Empty) => None,
                    Err(oneshot::error::TryRecvError::Closed) => Some(None),
                },
                WinState::Active(_) => None,
            };
            match got {
                None => self.open.push(w),
                Some(None) => {}
                Some(Some(d)) => {
                    if let Some(w) = self.activate(w, d) {
                        self.open.push(w);
                    }
                }
            }
        }
    }

    /// Keeps the changes of a delivered transaction that the windows still
    /// waiting for rows will need.
    fn buffer(&mut self, txn: &Transaction) -> Result<(), SourceError> {
        if txn.is_empty()
            || !self
                .open
                .iter()
                .any(|w| matches!(w.state, WinState::Pending { .. }))
        {
            return Ok(());
        }
        let max = self.max_buffer;
        let open = &mut self.open;
        txn.for_each_change(|c| {
            if c.op == crate::event::Op::Read {
                return Ok(());
            }
            for w in open.iter_mut() {
                if let WinState::Pending {
                    oid,
                    buffered,
                    bytes,
                    overflow,
                    ..
                } = &mut w.state
                {
                    if *oid != c.rel.oid || *overflow {
                        continue;
                    }
                    *bytes += c.mem_size();
                    if *bytes > max {
                        *overflow = true;
                        *buffered = Vec::new();
                    } else {
                        buffered.push(c.clone());
                    }
                }
            }
            Ok(())
        })
        .map_err(|e| SourceError::Fatal(format!("reading a spilled transaction: {e}")))
    }

    /// Picks up copy registrations, and delivers the copies whose point the
    /// stream reaches: the next commit at `commit`, or an idle `wal_end`.
    async fn cross(
        &mut self,
        commit: Option<Lsn>,
        idle: Option<Lsn>,
    ) -> Result<Vec<Transaction>, SourceError> {
        let regs: Vec<(String, Registered)> = {
            let mut reg = self
                .shared
                .registry
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> = reg
                .iter()
                .filter(|(_, r)| matches!(r, Registered::Copy { .. }))
                .map(|(k, _)| k.clone())
                .collect();
            ids.into_iter()
                .filter_map(|k| reg.remove(&k).map(|r| (k, r)))
                .collect()
        };
        for (_, r) in regs {
            let Registered::Copy {
                paused,
                point,
                data,
                done,
                only,
            } = r
            else {
                continue;
            };
            // Nothing is delivered while the worker creates its slot, so
            // the slot's point cannot be passed unseen.
            if paused.send(()).is_err() {
                continue;
            }
            let Ok(p) = point.await else { continue };
            if self.delivered >= p {
                let _ = done.send(Err(Refused::Passed));
                continue;
            }
            self.copies.push(PendingCopy {
                point: p,
                data,
                done,
                only,
            });
        }
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.copies.len() {
            let p = self.copies[i].point;
            let reached = commit.is_some_and(|c| c >= p) || idle.is_some_and(|w| w >= p);
            if !reached {
                i += 1;
                continue;
            }
            let c = self.copies.remove(i);
            let Ok((reader, rows)) = c.data.await else {
                // The worker failed; it will try again with a new slot.
                continue;
            };
            tracing::info!(at = %p, rows, "exported-snapshot copy delivered");
            if let Some(only) = c.only {
                self.targets.insert(p, only);
            }
            out.push(Transaction {
                meta: TxnMeta {
                    xid: 0,
                    commit_lsn: p,
                    end_lsn: p,
                    commit_time: crate::event::pg_now(),
                },
                changes: Changes::Spilled {
                    reader,
                    tail: Vec::new(),
                },
                messages: Vec::new(),
                aborted_subxids: Vec::new(),
                mem_bytes: 0,
                _budget: None,
            });
            self.delivered = self.delivered.max(p);
            let _ = c.done.send(Ok(p));
        }
        Ok(out)
    }

    /// Replays the transaction's changes onto the active windows.
    fn replay(&mut self, txn: &Transaction) -> Result<(), SourceError> {
        if txn.is_empty()
            || !self
                .open
                .iter()
                .any(|w| matches!(w.state, WinState::Active(_)))
        {
            return Ok(());
        }
        let open = &mut self.open;
        txn.for_each_change(|c| {
            for w in open.iter_mut() {
                if let WinState::Active(win) = &mut w.state {
                    win.apply(c);
                }
            }
            Ok(())
        })
        .map_err(|e| SourceError::Fatal(format!("reading a spilled transaction: {e}")))
    }

    /// Acts on the watermarks in the transaction; returns backfill requests.
    async fn watermarks(
        &mut self,
        txn: &mut Transaction,
        relation: &impl Fn(u32) -> Option<Arc<RelationInfo>>,
    ) -> Result<Vec<(Lsn, Request)>, SourceError> {
        let mut requests = Vec::new();
        if txn.messages.is_empty() {
            return Ok(requests);
        }
        let messages = std::mem::take(&mut txn.messages);
        for m in &messages {
            if m.prefix == BACKFILL_PREFIX {
                match serde_json::from_slice::<Request>(&m.content) {
                    Ok(r) if r.slot.as_ref().is_none_or(|s| *s == self.shared.slot) => {
                        requests.push((m.lsn, r))
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(at = %m.lsn, error = %e, "malformed backfill request ignored; the content must be JSON like {{\"table\": \"public.products\", \"where\": \"id < 100\"}}")
                    }
                }
                continue;
            }
            if m.prefix != WATERMARK_PREFIX {
                continue;
            }
            let Ok(mark) = serde_json::from_slice::<Mark>(&m.content) else {
                continue;
            };
            match mark.mark.as_str() {
                "low" => {
                    let reg = self
                        .shared
                        .registry
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&mark.id);
                    let Some(Registered::Chunk {
                        oid,
                        rows,
                        done,
                        only,
                    }) = reg
                    else {
                        // Another session's or process's watermark.
                        continue;
                    };
                    self.open.push(OpenWindow {
                        id: mark.id.clone(),
                        state: WinState::Pending {
                            oid,
                            rows,
                            low_seq: self.seq,
                            buffered: Vec::new(),
                            bytes: 0,
                            overflow: false,
                        },
                        done,
                        only,
                    });
                }
                "high" => {
                    let Some(i) = self.open.iter().position(|w| w.id == mark.id) else {
                        continue;
                    };
                    let mut w = self.open.remove(i);
                    if let WinState::Pending { rows, .. } = &mut w.state {
                        // The rows were sent before this watermark was written.
                        let Ok(data) = rows.await else { continue };
                        match self.activate(w, data) {
                            Some(a) => w = a,
                            None => continue,
                        }
                    }
                    let WinState::Active(window) = w.state else {
                        continue;
                    };
                    let chunk_rel = window.rel.clone();
                    // The stream's own relation when it matches, so sinks
                    // see one relation per table.
                    let rel = relation(chunk_rel.oid)
                        .filter(|r| same_columns(r, &chunk_rel))
                        .unwrap_or(chunk_rel);
                    let changes = window.into_changes(rel, txn.meta.commit_lsn, txn.meta.xid);
                    // The high watermark is a transaction of its own, so it
                    // normally holds no change for any other sink.
                    let had_changes = !txn.is_empty();
                    let bytes: usize = changes.iter().map(|c| c.mem_size()).sum();
                    match &mut txn.changes {
                        Changes::Memory(v) => v.extend(changes),
                        Changes::Spilled { tail, .. } => tail.extend(changes),
                    }
                    txn.mem_bytes += bytes;
                    if let Some(only) = w.only {
                        if had_changes {
                            tracing::warn!(chunk = %w.id, "a chunk for some sinks only closed in a transaction with changes of its own: every sink gets its rows");
                        } else {
                            self.targets.insert(txn.meta.end_lsn, only);
                        }
                    }
                    let _ = w.done.send(Ok(txn.meta.end_lsn));
                }
                _ => {}
            }
        }
        txn.messages = messages;
        Ok(requests)
    }
}

fn same_columns(a: &RelationInfo, b: &RelationInfo) -> bool {
    a.columns.len() == b.columns.len()
        && a.columns
            .iter()
            .zip(&b.columns)
            .all(|(x, y)| x.name == y.name && x.type_oid == y.type_oid && x.is_key == y.is_key)
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Mark {
    id: String,
    mark: String,
}

/// Reports the sinks whose reload (after a data loss) is now complete.
fn repaired(done: &[Job], open: &[Job]) {
    for sink in done.iter().flat_map(|j| j.sinks.iter().flatten()) {
        let pending = open
            .iter()
            .any(|o| o.sinks.as_ref().is_some_and(|s| s.contains(sink)));
        if !pending {
            tracing::info!(sink = %sink, "the sink's tables are reloaded: its data loss is repaired");
            crate::metrics::global().data_restored(sink);
        }
    }
}

/// Moves durable chunks into `snapshot.json`, logs progress, draws the bar.
async fn coordinate(shared: Arc<Shared>, progress: Arc<Progress>) {
    let log_every = Duration::from_secs(shared.config.progress_log_secs);
    let bar = shared.config.progress_bar && std::io::stderr().is_terminal();
    let mut last_log = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(if bar { 250 } else { 200 }));
    loop {
        tick.tick().await;
        let confirmed = progress.confirmed();
        let ready: Vec<Completion> = {
            let mut c = shared.completions.lock().unwrap_or_else(|p| p.into_inner());
            let (ready, rest): (Vec<_>, Vec<_>) = c.drain(..).partition(|x| x.end <= confirmed);
            *c = rest;
            ready
        };
        if !ready.is_empty() {
            // Under the lock throughout: the stream side and the workers
            // change the state too (requests, cancels, failures).
            let mut st = shared.lock_state();
            for c in &ready {
                let Some(j) = st.jobs.iter_mut().find(|j| j.id == c.job) else {
                    continue;
                };
                j.rows_done += c.rows;
                if let Some(r) = j.ranges.get_mut(c.range) {
                    if c.after.is_some() {
                        r.after = c.after.clone();
                    }
                    r.chunks_done += 1;
                    r.done |= c.range_done;
                }
            }
            let (done, open): (Vec<Job>, Vec<Job>) = st.jobs.drain(..).partition(|j| j.is_done());
            st.jobs = open;
            repaired(&done, &st.jobs);
            for j in done {
                let secs = state::unix_now().saturating_sub(j.planned_at);
                tracing::info!(table = %j.table, kind = %j.kind, rows = j.rows_done, seconds = secs, "snapshot of table finished");
                crate::metrics::global().snapshot_progress(
                    &j.table,
                    j.rows_done,
                    j.rows_estimate,
                    true,
                );
                st.finished.push(state::Finished {
                    table: j.table.clone(),
                    kind: j.kind.clone(),
                    rows: j.rows_done,
                    seconds: secs,
                });
                if st.finished.len() > 50 {
                    st.finished.remove(0);
                }
            }
            if let Err(e) = shared.save(&st) {
                tracing::error!(error = %e, "could not record snapshot progress; chunks will be read again after a restart");
            }
            drop(st);
            progress.changed.notify_waiters();
        }
        let st = shared.lock_state().clone();
        if st.jobs.is_empty() {
            if bar {
                eprint!("\r\x1b[K");
            }
            continue;
        }
        let live = shared
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let lines: Vec<(String, u64, u64, f64)> = st
            .jobs
            .iter()
            .map(|j| {
                let l = live.get(&j.id).cloned().unwrap_or_default();
                let rate = l
                    .since
                    .map(|s| l.rows_read as f64 / s.elapsed().as_secs_f64().max(0.001))
                    .unwrap_or(0.0);
                (
                    j.table.clone(),
                    j.rows_done.max(l.rows_read),
                    j.rows_estimate,
                    rate,
                )
            })
            .collect();
        for (table, done, est, _) in &lines {
            crate::metrics::global().snapshot_progress(table, *done, *est, false);
        }
        if last_log.elapsed() >= log_every {
            last_log = Instant::now();
            for (table, done, est, rate) in &lines {
                let eta = if *rate > 0.0 && est > done {
                    Some(((est - done) as f64 / rate).round() as u64)
                } else {
                    None
                };
                tracing::info!(table = %table, rows_done = done, rows_estimate = est, rows_per_sec = rate.round() as u64, eta_secs = ?eta, "snapshot progress");
            }
        }
        if bar {
            let (table, done, est, rate) = &lines[0];
            let frac = if *est > 0 {
                (*done as f64 / *est as f64).min(1.0)
            } else {
                0.0
            };
            let filled = (frac * 30.0) as usize;
            eprint!(
                "\r\x1b[K{table} [{}{}] {:>3}% {done}/{est} rows {:.0} rows/s{}",
                "#".repeat(filled),
                "-".repeat(30 - filled),
                (frac * 100.0) as u32,
                rate,
                if lines.len() > 1 {
                    format!(" (+{} tables)", lines.len() - 1)
                } else {
                    String::new()
                }
            );
        }
    }
}

/// `pgferry backfill`: asks the running pgferry (through the stream) to
/// re-load a table. Returns the request's LSN.
pub async fn request_backfill(
    config: &Config,
    table: &str,
    filter: Option<&str>,
) -> Result<Lsn, String> {
    let table = crate::config::canonical_table(table)
        .filter(|t| config.source.tables.contains(t))
        .ok_or_else(|| {
            format!(
                "{table} is not in source.tables ({}); only replicated tables can be backfilled",
                config.source.tables.join(", ")
            )
        })?;
    let client = crate::pg::sql_connect(config)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(f) = filter {
        // Check the condition now rather than in the running pgferry's log.
        let (schema, name) = crate::config::split_table(&table).unwrap_or_default();
        let sql_name = format!(
            "{}.{}",
            crate::conn::quote_ident(&schema),
            crate::conn::quote_ident(&name)
        );
        check_filter(&client, &sql_name, f).await.map_err(|e| {
            let why = match e {
                FilterError::Refused(m) => m,
                FilterError::Other(e) => e.to_string(),
            };
            format!("--where {f:?} is not a valid condition on {table}: {why}")
        })?;
    }
    emit_backfill_request(&client, config, &table, filter).await
}

/// Emits a backfill request for `table` into the WAL (the running pgferry
/// of `source.slot` acts on it from the stream). Returns its LSN.
pub async fn emit_backfill_request(
    client: &tokio_postgres::Client,
    config: &Config,
    table: &str,
    filter: Option<&str>,
) -> Result<Lsn, String> {
    let body = serde_json::json!({"table": table, "where": filter, "slot": config.source.slot});
    emit_request(client, &body).await
}

/// `pgferry backfill --cancel ID`: asks the running pgferry (through the
/// stream) to cancel a snapshot job, running or failed. Returns the
/// request's LSN.
pub async fn cancel_backfill(config: &Config, id: u64) -> Result<Lsn, String> {
    let st = StateFile::new(&config.checkpoint.dir).load()?;
    if !st.jobs.iter().any(|j| j.id == id) && !st.failed.iter().any(|j| j.id == id) {
        return Err(format!(
            "there is no snapshot job {id} in {}; pgferry backfill --list shows them",
            StateFile::new(&config.checkpoint.dir).path().display()
        ));
    }
    let client = crate::pg::sql_connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let body = serde_json::json!({"cancel": id, "slot": config.source.slot});
    emit_request(&client, &body).await
}

async fn emit_request(
    client: &tokio_postgres::Client,
    body: &serde_json::Value,
) -> Result<Lsn, String> {
    let row = client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1::text, $2::text)::text",
            &[&BACKFILL_PREFIX, &body.to_string()],
        )
        .await
        .map_err(|e| {
            format!(
                "emitting the request failed: {}; the role needs EXECUTE on pg_logical_emit_message (GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO <role>)",
                e.as_db_error().map(|d| d.message().to_string()).unwrap_or(e.to_string())
            )
        })?;
    let lsn: String = row.get(0);
    lsn.parse().map_err(|_| format!("unexpected LSN {lsn:?}"))
}

/// `pgferry backfill --list`: the snapshot jobs in `snapshot.json`, one
/// per line: running, failed (with the error), and the last finished.
pub fn list_backfills<W: std::io::Write>(config: &Config, out: &mut W) -> Result<(), String> {
    let file = StateFile::new(&config.checkpoint.dir);
    let st = file.load()?;
    let io = |e: std::io::Error| e.to_string();
    let filter = |f: &Option<String>| {
        f.as_ref()
            .map(|f| format!(" where {f:?}"))
            .unwrap_or_default()
    };
    if st.jobs.is_empty() && st.failed.is_empty() {
        writeln!(
            out,
            "no snapshot job is running or failed ({})",
            file.path().display()
        )
        .map_err(io)?;
    }
    for j in &st.jobs {
        let ranges_done = j.ranges.iter().filter(|r| r.done).count();
        writeln!(
            out,
            "job {} {} {}{}: running, {} of ~{} rows, {ranges_done}/{} ranges done",
            j.id,
            j.kind,
            j.table,
            filter(&j.filter),
            j.rows_done,
            j.rows_estimate,
            j.ranges.len()
        )
        .map_err(io)?;
    }
    for f in &st.failed {
        writeln!(
            out,
            "job {} {} {}{}: FAILED: {} (cancel with pgferry backfill --cancel {})",
            f.id,
            f.kind,
            f.table,
            filter(&f.filter),
            f.error,
            f.id
        )
        .map_err(io)?;
    }
    for f in st.finished.iter().rev().take(10) {
        writeln!(
            out,
            "finished: {} {} ({} rows, {} s)",
            f.kind, f.table, f.rows, f.seconds
        )
        .map_err(io)?;
    }
    Ok(())
}
