//! Prometheus metrics, and the readiness that `/readyz` reports (the
//! endpoints themselves are served by the `endpoints` module).
//!
//! One process-wide registry, [`global()`], outlives the replication
//! sessions (a session restarts on transient errors; counters do not).
//! Its parts are fed by:
//!
//! - the source loop, through a per-session [`ReceiveCounter`]: bytes of
//!   CopyData, row changes per table (looked up by relation OID, with the
//!   last one cached, counted in plain integers and published in bulk), and
//!   committed transactions;
//! - the sink tasks, through a [`SinkMetrics`] handle fetched once per task:
//!   changes applied per table (counted once per batch, relation by
//!   relation), batch latency, errors, retries, the last error (for
//!   `/readyz`), dead letters, rows held incompletely;
//! - the `observe` module's poller: the server's WAL position, the slot's
//!   `confirmed_flush_lsn`, retained WAL and `wal_status`, and the heartbeat;
//! - a [`SessionGuard`] the source holds while it streams: it shares the
//!   session's [`Progress`] and sink states, so positions and sink health are
//!   read where they live instead of being copied on every change.
//!
//! Snapshot progress: the snapshot stage reports through
//! [`Metrics::snapshot_progress`]`(table, rows_done, rows_estimate, finished)`;
//! it becomes `pgferry_snapshot_rows_done{table}`,
//! `pgferry_snapshot_rows_estimate{table}` and `pgferry_snapshot_active{table}`.
//!
//! Invariants:
//! - nothing here blocks the source or a sink on a lock held while
//!   rendering: locks guard maps of `Arc`ed atomics and are held only to
//!   look up or list them;
//! - counters only go up; LSNs are plain numbers (bytes into the WAL);
//! - `/readyz` is ready only while a session streams, every sink is healthy
//!   (not failing, not detached, no row held incompletely), the retained WAL is under
//!   `metrics.wal_warn_bytes` and the slot is not lost; otherwise its JSON
//!   body lists every reason.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::event::{Changes, RelationInfo, Transaction};
use crate::flow::{Progress, SinkState};
use crate::protocol::pgoutput::LogicalMessage;

mod render;
pub use render::CONTENT_TYPE;

/// Upper bounds of the sink batch latency histogram, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide registry.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

/// Locks a mutex, going on with the data if a panicking thread poisoned it
/// (the data are counters: always consistent enough to report).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every series pgferry exports.
#[derive(Default)]
pub struct Metrics {
    /// Committed transactions received (before the sinks).
    pub transactions: AtomicU64,
    /// Replication sessions that received data from the stream (each
    /// counted once): a new one resets the reconnect backoff.
    pub sessions_streamed: AtomicU64,
    /// Bytes of CopyData received on the replication connection.
    pub bytes_received: AtomicU64,
    /// Heartbeats emitted, and those that failed.
    pub heartbeats: AtomicU64,
    pub heartbeat_errors: AtomicU64,
    /// End LSN of the last transaction handed to the sinks.
    last_txn_end: AtomicU64,
    received: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    sinks: Mutex<BTreeMap<String, Arc<SinkMetrics>>>,
    /// Per sink name, the tables it takes (`None`: all).
    sink_tables: Mutex<HashMap<String, Option<Vec<String>>>>,
    snapshots: Mutex<BTreeMap<String, SnapshotProgress>>,
    /// Snapshot jobs that failed for good and are not cancelled yet: id →
    /// (table, error). Shown by `/readyz`.
    failed_jobs: Mutex<BTreeMap<u64, (String, String)>>,
    /// Snapshot jobs that failed for good, since the process started.
    snapshot_failures: AtomicU64,
    session: Mutex<Option<Session>>,
    /// Positions of the last session, reported while none streams.
    last_received: AtomicU64,
    last_checkpointed: AtomicU64,
    /// What the poller saw on the server.
    pub server: ServerState,
    /// `metrics.wal_warn_bytes` (0: no threshold).
    pub wal_warn_bytes: AtomicU64,
    /// Paths where a write last failed because the disk is full, with the
    /// message; removed once a write there succeeds.
    disk_full: Mutex<BTreeMap<String, String>>,
    /// Writes that failed because a disk was full.
    disk_full_errors: AtomicU64,
    /// Sinks whose store lost pgferry's state, with what it lost, until it
    /// is resolved (their backfill finished).
    data_loss: Mutex<BTreeMap<String, String>>,
}

/// The server and slot as last polled on an ordinary SQL connection.
#[derive(Default)]
pub struct ServerState {
    /// A poll succeeded at least once.
    pub polled: AtomicBool,
    /// `pg_current_wal_lsn()`.
    pub current_wal: AtomicU64,
    /// The slot exists (its series below are valid).
    pub slot_present: AtomicBool,
    /// The slot's `confirmed_flush_lsn`.
    pub confirmed_flush: AtomicU64,
    /// `pg_current_wal_lsn() - restart_lsn`: the WAL the slot keeps.
    pub retained_wal: AtomicU64,
    /// `wal_status` (PostgreSQL 13+), e.g. `reserved`, `extended`, `unreserved`, `lost`.
    pub wal_status: Mutex<Option<String>>,
}

impl ServerState {
    /// Replication lag in bytes: the server's WAL position minus the slot's
    /// confirmed position.
    pub fn lag_bytes(&self) -> Option<u64> {
        (self.polled.load(Ordering::Acquire) && self.slot_present.load(Ordering::Acquire)).then(
            || {
                self.current_wal
                    .load(Ordering::Acquire)
                    .saturating_sub(self.confirmed_flush.load(Ordering::Acquire))
            },
        )
    }
}

#[derive(Debug, Clone, Copy)]
struct SnapshotProgress {
    done: u64,
    estimate: u64,
    finished: bool,
}

struct Session {
    progress: Arc<Progress>,
    sinks: Vec<(String, Arc<SinkState>)>,
}

/// Marks a session as streaming while it lives.
pub struct SessionGuard {
    _private: (),
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let m = global();
        if let Some(s) = lock(&m.session).take() {
            m.last_received.store(
                s.progress.received.load(Ordering::Acquire),
                Ordering::Release,
            );
            m.last_checkpointed
                .store(s.progress.confirmed().0, Ordering::Release);
        }
    }
}

/// Health and counters of one sink, shared by its task and the registry.
pub struct SinkMetrics {
    name: String,
    /// Tables the sink takes (`None`: all).
    filter: Option<Vec<String>>,
    applied: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    batch: Histogram,
    pub errors: AtomicU64,
    pub retries: AtomicU64,
    pub dead_letters: AtomicU64,
    /// Documents the sink could not write whole and left out (dead-lettered),
    /// not yet repaired by a later write (see [`SinkMetrics::set_incomplete`]).
    incomplete: AtomicU64,
    /// Times the sink's store was found without pgferry's state at start.
    pub data_losses: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Commit time (µs since 2000-01-01) of the last transaction applied; 0: none yet.
    last_commit_time: AtomicI64,
    /// End LSN of the last transaction applied.
    applied_end: AtomicU64,
}

impl SinkMetrics {
    fn table_counter(&self, table: &str) -> Arc<AtomicU64> {
        lock(&self.applied)
            .entry(table.to_string())
            .or_default()
            .clone()
    }

    /// Records a batch applied in `seconds`: its changes per table, its
    /// latency, and the commit time of its last transaction.
    ///
    /// Changes of a transaction spilled to disk are not read back to be
    /// counted: they are counted under `table="_spilled"`.
    pub fn applied(&self, batch: &[Arc<Transaction>], seconds: f64) {
        self.batch.observe(seconds);
        // Relations in the batch: pointer, counter (None: filtered out), count.
        type Seen = Vec<(*const RelationInfo, Option<Arc<AtomicU64>>, u64)>;
        let mut seen: Seen = Vec::new();
        let mut spilled = 0u64;
        let count = |rel: &Arc<RelationInfo>, seen: &mut Seen| {
            let p = Arc::as_ptr(rel);
            if let Some(e) = seen.iter_mut().rev().find(|e| e.0 == p) {
                e.2 += 1;
                return;
            }
            let accepted = self
                .filter
                .as_ref()
                .is_none_or(|t| t.iter().any(|n| *n == rel.qualified));
            let c = accepted.then(|| self.table_counter(&rel.qualified));
            seen.push((p, c, 1));
        };
        for t in batch {
            let keep = |c: &crate::event::Change| {
                t.aborted_subxids.is_empty() || !t.aborted_subxids.contains(&c.xid)
            };
            match &t.changes {
                Changes::Memory(v) => v
                    .iter()
                    .filter(|c| keep(c))
                    .for_each(|c| count(&c.rel, &mut seen)),
                Changes::Spilled { reader, tail } => {
                    spilled += reader.len();
                    tail.iter()
                        .filter(|c| keep(c))
                        .for_each(|c| count(&c.rel, &mut seen));
                }
            }
        }
        for (_, c, n) in seen {
            if let Some(c) = c {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
        if spilled > 0 {
            self.table_counter("_spilled")
                .fetch_add(spilled, Ordering::Relaxed);
        }
        if let Some(last) = batch.last() {
            self.last_commit_time
                .store(last.meta.commit_time, Ordering::Release);
            self.applied_end
                .fetch_max(last.meta.end_lsn.0, Ordering::AcqRel);
        }
        *lock(&self.last_error) = None;
    }

    /// Records a failed attempt; `retrying` when it will be tried again.
    pub fn failed(&self, error: &str, retrying: bool) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if retrying {
            self.retries.fetch_add(1, Ordering::Relaxed);
        }
        *lock(&self.last_error) = Some(error.to_string());
    }

    /// A change was written to the dead-letter file.
    pub fn dead_letter(&self) {
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
    }

    /// How many rows the sink holds incompletely: changes it could not
    /// apply whole (e.g. an update without its unchanged TOAST values and
    /// nothing to complete it from) and dead-lettered instead, until a later
    /// write of the same row repairs them. `/readyz` is not ready meanwhile.
    pub fn set_incomplete(&self, n: u64) {
        self.incomplete.store(n, Ordering::Relaxed);
    }

    /// Seconds behind: now minus the commit time of the last transaction
    /// applied, or 0 when the sink applied every transaction received.
    fn lag_seconds(&self, last_txn_end: u64) -> Option<f64> {
        if self.applied_end.load(Ordering::Acquire) >= last_txn_end {
            return Some(0.0);
        }
        let t = self.last_commit_time.load(Ordering::Acquire);
        (t != 0).then(|| ((crate::event::pg_now() - t) as f64 / 1e6).max(0.0))
    }
}

/// A Prometheus histogram over [`BUCKETS`], lock-free.
#[derive(Default)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last one is `+Inf`.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, seconds: f64) {
        let i = BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }
}

/// Counts what the source receives, per session. Owned by the source loop.
///
/// Counts accumulate in plain integers and are published to the registry's
/// atomics every [`ReceiveCounter::FLUSH_EVERY`] messages, at every commit,
/// at every keepalive and when the counter is dropped: the hot path is an
/// integer compare and two additions, and a scrape is at most one
/// transaction (or that many messages) behind.
#[derive(Default)]
pub struct ReceiveCounter {
    by_oid: HashMap<u32, usize>,
    /// Per table seen: the registry's counter and the count not yet published.
    tables: Vec<(Arc<AtomicU64>, u64)>,
    /// The last relation counted: (OID, index in `tables`).
    last: Option<(u32, usize)>,
    bytes: u64,
    unflushed: u32,
}

impl ReceiveCounter {
    pub const FLUSH_EVERY: u32 = 1024;

    /// One CopyData message (its body, first byte the replication message tag).
    pub fn bytes(&mut self, body: &[u8]) {
        self.bytes += body.len() as u64;
        self.unflushed += 1;
        // A keepalive: the stream is quiet or between transactions.
        if self.unflushed >= Self::FLUSH_EVERY || body.first() == Some(&b'k') {
            self.flush();
        }
    }

    /// A decoded pgoutput message: Relation messages name the OIDs; row
    /// changes count against their table.
    pub fn message(&mut self, m: &LogicalMessage<'_>) {
        match m {
            LogicalMessage::Relation(r) => {
                let name = format!(
                    "{}.{}",
                    String::from_utf8_lossy(&r.namespace),
                    String::from_utf8_lossy(&r.name)
                );
                let c = global().table_counter(&name);
                let i = match self.tables.iter().position(|(t, _)| Arc::ptr_eq(t, &c)) {
                    Some(i) => i,
                    None => {
                        self.tables.push((c, 0));
                        self.tables.len() - 1
                    }
                };
                self.by_oid.insert(r.oid, i);
                self.last = None;
            }
            LogicalMessage::Insert(i) => self.count(i.relation_oid),
            LogicalMessage::Update(u) => self.count(u.relation_oid),
            LogicalMessage::Delete(d) => self.count(d.relation_oid),
            LogicalMessage::Truncate(t) => t.relation_oids.iter().for_each(|o| self.count(*o)),
            _ => {}
        }
    }

    fn count(&mut self, oid: u32) {
        let i = match self.last {
            Some((o, i)) if o == oid => i,
            // A change before its Relation message is the assembler's error to report.
            _ => match self.by_oid.get(&oid) {
                Some(&i) => {
                    self.last = Some((oid, i));
                    i
                }
                None => return,
            },
        };
        if let Some(t) = self.tables.get_mut(i) {
            t.1 += 1;
        }
    }

    /// A committed transaction, about to be handed to the sinks.
    pub fn committed(&mut self, txn: &Transaction) {
        let m = global();
        m.transactions.fetch_add(1, Ordering::Relaxed);
        m.last_txn_end
            .fetch_max(txn.meta.end_lsn.0, Ordering::AcqRel);
        self.flush();
    }

    /// Publishes the counts accumulated so far.
    pub fn flush(&mut self) {
        for (c, n) in &mut self.tables {
            if *n > 0 {
                c.fetch_add(std::mem::take(n), Ordering::Relaxed);
            }
        }
        if self.bytes > 0 {
            global()
                .bytes_received
                .fetch_add(std::mem::take(&mut self.bytes), Ordering::Relaxed);
        }
        self.unflushed = 0;
    }
}

impl Drop for ReceiveCounter {
    fn drop(&mut self) {
        self.flush();
    }
}

/// `1.5 GiB`, for log lines and `/readyz`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Escapes a label value for the text exposition format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The state of one sink, for logs and `/readyz`.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkHealth {
    Ok,
    Failing(String),
    Detached(String),
}

impl Metrics {
    fn table_counter(&self, table: &str) -> Arc<AtomicU64> {
        lock(&self.received)
            .entry(table.to_string())
            .or_default()
            .clone()
    }

    /// Records which tables each sink takes, so that applied changes of
    /// other tables are not counted for it. Called once at start-up.
    pub fn configure(&self, config: &crate::config::Config) {
        let mut t = lock(&self.sink_tables);
        for s in &config.sinks {
            t.insert(s.name().to_string(), s.tables());
        }
        self.wal_warn_bytes
            .store(config.metrics.wal_warn_bytes, Ordering::Release);
    }

    /// The handle of sink `name` (created on first use, kept across sessions).
    pub fn sink(&self, name: &str) -> Arc<SinkMetrics> {
        let filter = lock(&self.sink_tables).get(name).cloned().flatten();
        lock(&self.sinks)
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(SinkMetrics {
                    name: name.to_string(),
                    filter,
                    applied: Mutex::default(),
                    batch: Histogram::default(),
                    errors: AtomicU64::new(0),
                    retries: AtomicU64::new(0),
                    dead_letters: AtomicU64::new(0),
                    incomplete: AtomicU64::new(0),
                    data_losses: AtomicU64::new(0),
                    last_error: Mutex::default(),
                    last_commit_time: AtomicI64::new(0),
                    applied_end: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Called by the source once it streams; the session counts as
    /// streaming (for `/readyz`) until the guard is dropped.
    pub fn session(
        &self,
        progress: &Arc<Progress>,
        sinks: Vec<(String, Arc<SinkState>)>,
    ) -> SessionGuard {
        *lock(&self.session) = Some(Session {
            progress: progress.clone(),
            sinks,
        });
        SessionGuard { _private: () }
    }

    /// True while a replication session streams.
    pub fn streaming(&self) -> bool {
        lock(&self.session).is_some()
    }

    /// Snapshot (backfill) progress of one table, for the snapshot stage:
    /// rows copied so far, the estimated total (e.g. `pg_class.reltuples`;
    /// 0 when unknown), and whether the table is done.
    pub fn snapshot_progress(
        &self,
        table: &str,
        rows_done: u64,
        rows_estimate: u64,
        finished: bool,
    ) {
        lock(&self.snapshots).insert(
            table.to_string(),
            SnapshotProgress {
                done: rows_done,
                estimate: rows_estimate,
                finished,
            },
        );
    }

    /// A snapshot job failed for good (`counted`: just now, rather than in
    /// an earlier run, found in `snapshot.json`).
    pub fn snapshot_job_failed(&self, id: u64, table: &str, error: &str, counted: bool) {
        if counted {
            self.snapshot_failures.fetch_add(1, Ordering::Relaxed);
        }
        lock(&self.failed_jobs).insert(id, (table.to_string(), error.to_string()));
    }

    /// A failed snapshot job was cancelled (acknowledged).
    pub fn snapshot_job_cleared(&self, id: u64) {
        lock(&self.failed_jobs).remove(&id);
    }

    /// Row changes received so far, over all tables.
    pub fn events_received(&self) -> u64 {
        lock(&self.received)
            .values()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Each sink of the current session with its health.
    pub fn sink_health(&self) -> Vec<(String, SinkHealth)> {
        let session = lock(&self.session);
        let Some(s) = session.as_ref() else {
            return Vec::new();
        };
        s.sinks
            .iter()
            .map(|(name, state)| {
                let err = || {
                    lock(&self.sink(name).last_error)
                        .clone()
                        .unwrap_or_else(|| "unknown error".into())
                };
                let h = if let Some(why) = state.detached_because() {
                    let last = lock(&self.sink(name).last_error).clone();
                    SinkHealth::Detached(match last {
                        Some(e) => format!("{why}; last error: {e}"),
                        None => why,
                    })
                } else if state.failing.load(Ordering::Acquire) {
                    SinkHealth::Failing(err())
                } else {
                    SinkHealth::Ok
                };
                (name.clone(), h)
            })
            .collect()
    }

    /// Lag in seconds: the largest over the sinks (see [`SinkMetrics`]).
    pub fn lag_seconds(&self) -> Option<f64> {
        let end = self.last_txn_end.load(Ordering::Acquire);
        lock(&self.sinks)
            .values()
            .filter_map(|s| s.lag_seconds(end))
            .reduce(f64::max)
    }

    /// True when the retained WAL is above the warning threshold.
    pub fn wal_over_threshold(&self) -> Option<(u64, u64)> {
        let warn = self.wal_warn_bytes.load(Ordering::Acquire);
        let s = &self.server;
        let retained = s.retained_wal.load(Ordering::Acquire);
        (warn > 0 && s.slot_present.load(Ordering::Acquire) && retained > warn)
            .then_some((retained, warn))
    }

    /// A write to `path` failed because its disk is full (see [`crate::disk`]).
    pub fn disk_full(&self, path: &std::path::Path, message: &str) {
        self.disk_full_errors.fetch_add(1, Ordering::Relaxed);
        lock(&self.disk_full).insert(path.display().to_string(), message.to_string());
    }

    /// A write to `path` succeeded: its disk is no longer reported full.
    pub fn disk_ok(&self, path: &std::path::Path) {
        let mut d = lock(&self.disk_full);
        if !d.is_empty() {
            d.remove(&path.display().to_string());
        }
    }

    /// The paths currently reported full, with their messages.
    pub fn disks_full(&self) -> Vec<(String, String)> {
        lock(&self.disk_full)
            .iter()
            .map(|(p, m)| (p.clone(), m.clone()))
            .collect()
    }

    /// At start, `sink`'s store was found without pgferry's state.
    /// Counted once until repaired (a later session that finds the same
    /// loss before the sink wrote anything does not count it again).
    pub fn data_lost(&self, sink: &str, what: &str) {
        let new = lock(&self.data_loss)
            .insert(sink.to_string(), what.to_string())
            .is_none();
        if new {
            self.sink(sink).data_losses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The loss of `sink` is repaired (its backfill finished).
    pub fn data_restored(&self, sink: &str) {
        lock(&self.data_loss).remove(sink);
    }

    /// `(ready, reasons)` for `/readyz`.
    pub fn readiness(&self) -> (bool, Vec<String>) {
        let mut reasons = Vec::new();
        if !self.streaming() {
            reasons.push(
                "the replication session is not streaming (starting, or reconnecting after an error)"
                    .to_string(),
            );
        }
        for (name, h) in self.sink_health() {
            match h {
                SinkHealth::Ok => {}
                SinkHealth::Failing(e) => reasons.push(format!("sink {name} is failing: {e}")),
                SinkHealth::Detached(e) => reasons.push(format!(
                    "sink {name} is detached (it is replayed from its checkpoint when it catches up): {e}"
                )),
            }
        }
        for s in lock(&self.sinks).values() {
            let n = s.incomplete.load(Ordering::Relaxed);
            if n > 0 {
                reasons.push(format!(
                    "sink {} holds {n} row(s) incompletely: changes it could not complete went to its dead-letter file; re-save those rows in Postgres or run pgferry backfill on their table",
                    s.name
                ));
            }
        }
        if let Some((retained, warn)) = self.wal_over_threshold() {
            reasons.push(format!(
                "retained WAL {} above warning threshold {} (metrics.wal_warn_bytes)",
                human_bytes(retained),
                human_bytes(warn)
            ));
        }
        if lock(&self.server.wal_status).as_deref() == Some("lost") {
            reasons.push("the replication slot is invalidated (wal_status = lost)".into());
        }
        for (_, message) in self.disks_full() {
            reasons.push(message);
        }
        for (sink, what) in lock(&self.data_loss).iter() {
            reasons.push(format!("sink {sink} lost data: {what}"));
        }
        for (id, (table, error)) in lock(&self.failed_jobs).iter() {
            reasons.push(format!(
                "snapshot job {id} of {table} failed: {error} (acknowledge with pgferry backfill --cancel {id})"
            ));
        }
        (reasons.is_empty(), reasons)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_exposition() {
        let m = Metrics::default();
        let s = m.sink("s");
        s.applied(&[], 0.003);
        s.applied(&[], 0.2);
        s.applied(&[], 100.0);
        let text = m.render();
        assert!(
            text.contains("pgferry_sink_batch_seconds_bucket{le=\"0.0025\",sink=\"s\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("pgferry_sink_batch_seconds_bucket{le=\"0.005\",sink=\"s\"} 1\n"));
        assert!(text.contains("pgferry_sink_batch_seconds_bucket{le=\"0.25\",sink=\"s\"} 2\n"));
        assert!(text.contains("pgferry_sink_batch_seconds_bucket{le=\"+Inf\",sink=\"s\"} 3\n"));
        assert!(text.contains("pgferry_sink_batch_seconds_count{sink=\"s\"} 3\n"));
    }

    #[test]
    fn received_changes_are_published_per_table_in_bulk() {
        use crate::protocol::pgoutput::{parse, ParseContext};
        use bytes::{BufMut, BytesMut};
        let ctx = || ParseContext {
            in_stream: false,
            proto_version: 1,
            parallel_stream_abort: false,
        };
        let mut r = BytesMut::new();
        r.put_u8(b'R');
        r.put_u32(4242);
        r.put_slice(b"metrics_test\0items\0");
        r.put_u8(b'd');
        r.put_u16(1);
        r.put_u8(1);
        r.put_slice(b"id\0");
        r.put_u32(23);
        r.put_i32(-1);
        let rel = r.freeze();
        let mut i = BytesMut::new();
        i.put_u8(b'I');
        i.put_u32(4242);
        i.put_u8(b'N');
        i.put_u16(1);
        i.put_u8(b't');
        i.put_u32(1);
        i.put_slice(b"7");
        let ins = i.freeze();
        let counter = global().table_counter("metrics_test.items");
        let mut rc = ReceiveCounter::default();
        rc.message(&parse(&rel, ctx()).unwrap());
        for _ in 0..3 {
            rc.bytes(&ins);
            rc.message(&parse(&ins, ctx()).unwrap());
        }
        // Not yet published: no commit, no keepalive, fewer than FLUSH_EVERY.
        assert_eq!(counter.load(Ordering::Relaxed), 0);
        rc.bytes(b"k...");
        assert_eq!(counter.load(Ordering::Relaxed), 3);
        for _ in 0..ReceiveCounter::FLUSH_EVERY {
            rc.bytes(&ins);
            rc.message(&parse(&ins, ctx()).unwrap());
        }
        // Published with the bytes of the last message, before its change.
        assert_eq!(
            counter.load(Ordering::Relaxed),
            3 + ReceiveCounter::FLUSH_EVERY as u64 - 1
        );
        rc.message(&parse(&ins, ctx()).unwrap());
        drop(rc);
        assert_eq!(
            counter.load(Ordering::Relaxed),
            3 + ReceiveCounter::FLUSH_EVERY as u64 + 1
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn readiness_names_every_reason() {
        let m = Metrics::default();
        let (ready, reasons) = m.readiness();
        assert!(!ready);
        assert!(reasons[0].contains("not streaming"), "{reasons:?}");
        m.wal_warn_bytes.store(1 << 30, Ordering::Release);
        m.server.slot_present.store(true, Ordering::Release);
        m.server.retained_wal.store(3 << 30, Ordering::Release);
        let (_, reasons) = m.readiness();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("retained WAL 3.0 GiB above warning threshold 1.0 GiB")),
            "{reasons:?}"
        );
    }

    #[test]
    fn a_full_disk_and_a_data_loss_are_reported_until_cleared() {
        let m = Metrics::default();
        let spill = std::path::Path::new("/var/spill");
        m.disk_full(
            spill,
            "disk full: writing a spill file in /var/spill: no space",
        );
        m.data_lost("cache", "Redis no longer holds the position");
        let (ready, reasons) = m.readiness();
        assert!(!ready);
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("disk full") && r.contains("/var/spill")),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("sink cache lost data")),
            "{reasons:?}"
        );
        let text = m.render();
        assert!(
            text.contains("pgferry_disk_full{path=\"/var/spill\"} 1"),
            "{text}"
        );
        assert!(text.contains("pgferry_disk_full_errors_total 1"), "{text}");
        assert!(
            text.contains("pgferry_sink_data_loss_total{sink=\"cache\"} 1"),
            "{text}"
        );
        m.disk_ok(spill);
        m.data_restored("cache");
        let (_, reasons) = m.readiness();
        assert!(
            !reasons
                .iter()
                .any(|r| r.contains("disk full") || r.contains("lost data")),
            "{reasons:?}"
        );
        assert!(!m.render().contains("pgferry_disk_full{"));
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
