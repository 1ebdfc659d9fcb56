//! The sink itself: it turns a batch's changes into document operations
//! (`request.rs`), completes the merges (`merge.rs`, `complete.rs`), sends
//! chunks through the [`Client`], classifies each answer (`retry.rs`) and
//! dead-letters what the cluster refuses for good (`dead_letter.rs`).
//!
//! Invariants:
//! - `apply` returns `Ok` only once every operation of the batch is applied
//!   (or older than the index's version, or dead-lettered with its line
//!   synced). Any failure that may pass is returned at once as transient:
//!   the pipeline retries the batch; the sink has no retry loop and no
//!   backoff of its own. A retry of the same batch resumes where it failed
//!   (`retry.rs`).
//! - Two phases per chunk: the documents that key changes were completed
//!   from (their old ids) are deleted, or written, only once every other
//!   operation, the completed documents among them, is acknowledged. A
//!   failure at any point before leaves them in place, so the retry (or the
//!   replay after a crash) completes the new documents from them again.
//! - A change that cannot become a whole document (no id, no complete base,
//!   a value the merge cannot parse) is dead-lettered (or stops pgferry
//!   with `on_error = "stop"`) and its document is counted as incomplete on
//!   `/readyz` until a later write repairs it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};

use super::client::{describe_error, Client, ItemResult};
use super::complete::{self, Counts, Item, Resolved};
use super::config::ElasticsearchConfig;
use super::dead_letter::{DeadLetters, Rejection};
use super::merge::{fill_unchanged, merge_action};
use super::request::{self, write_doc, Action, Chunk, Pending};
use super::retry::{outcome, BatchId, Outcome, Resume};
use super::route::{Plan, Routes};
use super::stream::ChangeStream;
use crate::event::{BeforeKind, Cell, Change, Op, Transaction, TxnMeta};
use crate::sink::rows::RowSource;
use crate::sink::{Sink, SinkError};

/// Counters, logged at shutdown.
#[derive(Debug, Default)]
struct Stats {
    indexed: u64,
    deleted: u64,
    /// Operations the index already had a newer (or the same) version of.
    older: u64,
    /// Updates with unchanged TOAST columns, and how they were completed.
    merges: Counts,
}

/// A failed send: the error, and for failed items the operations not
/// acknowledged (`None`: a whole request failed, the batch is retried
/// whole).
struct Unsent {
    error: SinkError,
    left: Option<Vec<Pending>>,
}

/// Writes rows of the configured tables as documents (see the module docs).
pub struct ElasticsearchSink {
    name: String,
    client: Client,
    routes: Routes,
    /// Indices known to exist.
    known: HashSet<String>,
    max_docs: usize,
    max_bytes: usize,
    dead: DeadLetters,
    stats: Stats,
    /// Reads rows from Postgres where the index cannot complete a change.
    rows: Option<Arc<dyn RowSource>>,
    /// Documents left unwritten because no complete one could be made
    /// (dead-lettered), until a later write repairs them (for `/readyz`).
    incomplete: HashSet<(Arc<str>, String)>,
    /// Where the batch that failed last resumes.
    resume: Resume,
}

impl ElasticsearchSink {
    /// `rows` reads rows from Postgres for the changes the index cannot
    /// complete; without it, such changes go to the dead letters.
    pub fn open(
        cfg: &ElasticsearchConfig,
        rows: Option<Arc<dyn RowSource>>,
    ) -> Result<ElasticsearchSink, SinkError> {
        let fatal = |m: String| SinkError::fatal(format!("sink {:?}: {m}", cfg.name));
        let client = Client::new(cfg).map_err(fatal)?;
        let routes = Routes::new(cfg).map_err(fatal)?;
        let dead_path = cfg
            .dead_letter_path
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.dead-letter.jsonl", cfg.name)));
        Ok(ElasticsearchSink {
            name: cfg.name.clone(),
            client,
            routes,
            known: HashSet::new(),
            max_docs: cfg.batch_max_docs,
            max_bytes: cfg.batch_max_bytes,
            dead: DeadLetters::new(&cfg.name, cfg.on_error, dead_path),
            stats: Stats::default(),
            rows,
            incomplete: HashSet::new(),
            resume: Resume::default(),
        })
    }

    /// Turns one insert, update or delete into document operations. `at`:
    /// the changes of the batch before this one (where a flush it needs
    /// leaves the batch acknowledged).
    async fn add(
        &mut self,
        chunk: &mut Chunk,
        c: &Change,
        meta: &TxnMeta,
        at: usize,
    ) -> Result<(), SinkError> {
        let plan = self.routes.plan(&c.rel)?;
        let mut ev = Vec::new();
        c.write_json(meta, &mut ev);
        let event: Arc<[u8]> = ev.into();
        let version = meta.commit_lsn.0;
        let pending = |id: String, action: Action| Pending {
            index: plan.index.clone(),
            id,
            version,
            action,
            event: event.clone(),
        };
        // With REPLICA IDENTITY FULL the old row holds the values of the
        // unchanged TOAST columns (the server sends it detoasted).
        let filled = match (&c.before, &c.after) {
            (Some((BeforeKind::Full, before)), Some(after))
                if c.op == Op::Update && after.cells.contains(&Cell::Unchanged) =>
            {
                Some(fill_unchanged(after, before))
            }
            _ => None,
        };
        let Some(row) = filled.as_ref().or(c.key_row()) else {
            let reason = "the change carries no row with the key (replica identity NOTHING?)";
            return self.reject_change(&plan, None, &event, "pgferry_document_id_error", reason);
        };
        let id = match plan.key.render(&c.rel, row) {
            Ok(id) => id,
            Err(e) => {
                let reason = e.to_string();
                return self.reject_change(
                    &plan,
                    None,
                    &event,
                    "pgferry_document_id_error",
                    &reason,
                );
            }
        };
        if c.op == Op::Delete {
            chunk.put(pending(id, Action::Delete));
            return Ok(());
        }
        // An update that changed the key: the old document goes away.
        let old_id = match (&c.op, &c.before) {
            (Op::Update, Some((_, before))) => plan
                .key
                .render(&c.rel, before)
                .ok()
                .filter(|old| *old != id),
            _ => None,
        };
        let partial = row
            .cells
            .iter()
            .zip(&plan.shape.include)
            .any(|(cell, inc)| *inc && *cell == Cell::Unchanged);
        let action = if !partial {
            let mut doc = Vec::with_capacity(row.buf.len() + 16 * row.cells.len());
            write_doc(&c.rel, row, &plan.shape.include, &mut doc);
            Action::Index(doc)
        } else {
            // The new id is the base of another key change in the chunk (keys
            // rotated): its completion must be acknowledged before this one
            // can be ordered, so the chunk goes first.
            if old_id.is_some() && chunk.is_base(&plan.index, &id) {
                self.flush(chunk, at).await?;
            }
            let base = old_id.as_deref().unwrap_or(&id);
            match merge_action(chunk, &plan.index, &plan.shape, row, base, meta.xid) {
                Ok(action) => action,
                Err(e) => {
                    // Nothing of the change is written: not the new
                    // document, and not the delete of the old one.
                    let kind = "pgferry_unparsable_value";
                    self.reject_change(&plan, Some(&id), &event, kind, &e.0)?;
                    self.incomplete.insert((plan.index.clone(), id));
                    return Ok(());
                }
            }
        };
        if let Some(old) = old_id {
            chunk.put(pending(old, Action::Delete));
        }
        chunk.put(pending(id, action));
        Ok(())
    }

    /// A change the sink itself cannot turn into a document.
    fn reject_change(
        &mut self,
        plan: &Plan,
        id: Option<&str>,
        event: &[u8],
        kind: &str,
        reason: &str,
    ) -> Result<(), SinkError> {
        self.dead.reject(Rejection {
            index: &plan.index,
            id,
            action: "index",
            status: None,
            error: &json!({"type": kind, "reason": reason}),
            event,
        })
    }

    /// Sends the chunk's operations, in two phases (see the module docs);
    /// `Ok` once all are applied, older than the index's version, or
    /// dead-lettered, and the batch's first `at` changes are acknowledged.
    async fn flush(&mut self, chunk: &mut Chunk, at: usize) -> Result<(), SinkError> {
        if !chunk.ops.is_empty() {
            let (mut ops, bases) = chunk.take();
            self.resolve_merges(&mut ops).await?;
            self.send_phases(request::phases(ops, &bases), at).await?;
        }
        self.acknowledged(at).await
    }

    /// Sends the phases in order; on a failure, holds what is left of them
    /// for the retry of the batch.
    async fn send_phases(&mut self, phases: Vec<Vec<Pending>>, at: usize) -> Result<(), SinkError> {
        let mut phases = phases.into_iter();
        while let Some(ops) = phases.next() {
            if let Err(Unsent { error, left }) = self.send(ops).await {
                if let Some(left) = left {
                    self.resume
                        .hold(std::iter::once(left).chain(phases).collect(), at);
                }
                return Err(error);
            }
        }
        Ok(())
    }

    /// The batch's first `at` changes are applied: their dead letters are
    /// made durable and a retry of the batch skips them.
    async fn acknowledged(&mut self, at: usize) -> Result<(), SinkError> {
        crate::metrics::global()
            .sink(&self.name)
            .set_incomplete(self.incomplete.len() as u64);
        self.dead.sync().await?;
        self.resume.done = at;
        Ok(())
    }

    /// Completes the chunk's merges (see `complete.rs`): each becomes a whole
    /// `index`, or nothing. One that cannot be completed is dead-lettered and
    /// its document remembered as incomplete until a later write.
    async fn resolve_merges(&mut self, ops: &mut [Pending]) -> Result<(), SinkError> {
        let wanted: Vec<usize> = (0..ops.len())
            .filter(|&i| matches!(ops[i].action, Action::Merge(_)))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let items: Vec<Item<'_>> = wanted
            .iter()
            .filter_map(|&i| match &ops[i].action {
                Action::Merge(m) => Some(Item {
                    index: &ops[i].index,
                    id: &ops[i].id,
                    version: ops[i].version,
                    merge: m,
                }),
                _ => None,
            })
            .collect();
        let from_source = self.stats.merges.from_source;
        let rows = self.rows.as_deref();
        let resolved =
            complete::resolve(&self.client, rows, &items, &mut self.stats.merges).await?;
        drop(items);
        for (&i, r) in wanted.iter().zip(resolved) {
            let p = &mut ops[i];
            p.action = match r {
                Resolved::Index { doc, version } => {
                    p.version = version;
                    Action::Index(doc)
                }
                Resolved::Skip => Action::Skip,
                Resolved::Incomplete(reason) => {
                    self.dead.reject(Rejection {
                        index: &p.index,
                        id: Some(&p.id),
                        action: "index",
                        status: None,
                        error: &json!({"type": "pgferry_incomplete_document", "reason": reason}),
                        event: &p.event,
                    })?;
                    self.incomplete.insert(p.doc());
                    Action::Skip
                }
            };
        }
        let n = self.stats.merges.from_source - from_source;
        if n > 0 {
            tracing::info!(sink = %self.name, documents = n, "completed updates without their unchanged TOAST values from the rows in Postgres (the index held no complete document to take them from)");
        }
        Ok(())
    }

    async fn ensure_index(&mut self, index: &str) -> Result<(), SinkError> {
        if self.known.contains(index) {
            return Ok(());
        }
        if !self.client.index_exists(index).await? {
            let body = self.routes.create_body(index).clone();
            self.client.create_index(index, &body).await?;
            tracing::info!(sink = %self.name, index, "created index");
        }
        self.known.insert(index.to_string());
        Ok(())
    }

    /// `_bulk`s the operations, in requests of at most `max_bytes`. `Err`
    /// at the first failed request (the batch is retried whole, as after a
    /// crash), or once all are answered when items failed in a way that may
    /// pass (429, 5xx, a missing index): then with the operations not
    /// acknowledged, which the retry of the batch sends first.
    async fn send(&mut self, mut ops: Vec<Pending>) -> Result<(), Unsent> {
        ops.retain(|p| !matches!(p.action, Action::Skip));
        let mut need: Vec<Arc<str>> = Vec::new();
        for p in &ops {
            let missing = !self.known.contains(&*p.index) && !need.contains(&p.index);
            if matches!(p.action, Action::Index(_)) && missing {
                need.push(p.index.clone());
            }
        }
        for index in need {
            if let Err(error) = self.ensure_index(&index).await {
                return Err(Unsent { error, left: None });
            }
        }
        let total = ops.len();
        // Per operation: not acknowledged (yet).
        let mut open = vec![true; total];
        let mut last = String::new();
        let mut body = Vec::new();
        let mut start = 0;
        while start < total {
            let end = start + request::next_request(&ops[start..], self.max_bytes, &mut body);
            let got = match self.client.bulk(std::mem::take(&mut body)).await {
                Ok(got) if got.len() == end - start => got,
                Ok(got) => {
                    let error = SinkError::transient(format!(
                        "POST /_bulk: sent {} operations, got {} results",
                        end - start,
                        got.len()
                    ));
                    return Err(Unsent { error, left: None });
                }
                Err(error) => return Err(Unsent { error, left: None }),
            };
            for (i, r) in (start..end).zip(&got) {
                match self.settle(&ops[i], r) {
                    Ok(None) => open[i] = false,
                    Ok(Some(why)) => last = why,
                    Err(error) => return Err(Unsent { error, left: None }),
                }
            }
            start = end;
        }
        let left = only(ops, &open);
        if left.is_empty() {
            return Ok(());
        }
        tracing::warn!(sink = %self.name, items = left.len(), error = %last, "bulk items failed; sending them again when the pipeline retries the batch");
        let error = SinkError::transient(format!(
            "{} of {total} bulk items failed (last: {last})",
            left.len()
        ));
        Err(Unsent {
            error,
            left: Some(left),
        })
    }

    /// Accounts for one answered item. `Ok(Some(why))`: it failed in a way
    /// that may pass, send it again.
    fn settle(&mut self, p: &Pending, r: &ItemResult) -> Result<Option<String>, SinkError> {
        let is_delete = matches!(p.action, Action::Delete);
        let outcome = outcome(is_delete, r);
        if matches!(outcome, Outcome::Applied | Outcome::Older | Outcome::Gone)
            && !self.incomplete.is_empty()
        {
            // Written whole, deleted, or superseded: no longer incomplete.
            self.incomplete.remove(&p.doc());
        }
        let error = || r.error.clone().unwrap_or(Value::Null);
        match outcome {
            Outcome::Applied if is_delete => self.stats.deleted += 1,
            Outcome::Applied => self.stats.indexed += 1,
            Outcome::Older => self.stats.older += 1,
            Outcome::Gone => {}
            Outcome::NoIndex => {
                self.known.remove(&*p.index);
                return Ok(Some(describe_error(&error())));
            }
            Outcome::Retry => {
                return Ok(Some(format!("{} {}", r.status, describe_error(&error()))))
            }
            Outcome::Rejected => self.dead.reject(Rejection {
                index: &p.index,
                id: Some(&p.id),
                action: p.action.name(),
                status: Some(r.status),
                error: &error(),
                event: &p.event,
            })?,
        }
        Ok(None)
    }

    /// TRUNCATE: deletes every document of the table's index, each with the
    /// truncate's commit LSN as its external version (see the module docs).
    async fn truncate(&mut self, c: &Change, meta: &TxnMeta) -> Result<(), SinkError> {
        let route = self.routes.route(&c.rel.qualified);
        let index = route.index.clone();
        let mut ev = Vec::new();
        c.write_json(meta, &mut ev);
        let event: Arc<[u8]> = ev.into();
        if !route.shared_with.is_empty() {
            let reason = format!(
                "table {} was truncated, but its index {index:?} also holds {}: its documents cannot be told apart, so none were deleted. \
                 Give each table its own index, or delete the table's documents yourself",
                c.rel.qualified,
                route.shared_with.join(", ")
            );
            return self.dead.reject(Rejection {
                index: &index,
                id: None,
                action: "truncate",
                status: None,
                error: &json!({"type": "pgferry_truncate_shared_index", "reason": reason}),
                event: &event,
            });
        }
        // Make every write so far visible to search, then delete what it sees.
        if !self.client.refresh(&index).await? {
            return Ok(());
        }
        let size = self.max_docs.clamp(1, 10_000);
        let Some((mut scroll, mut ids)) = self.client.scroll_start(&index, size).await? else {
            return Ok(());
        };
        let mut total = 0usize;
        let res = loop {
            if ids.is_empty() {
                break Ok(());
            }
            total += ids.len();
            let ops: Vec<Pending> = ids
                .drain(..)
                .map(|id| Pending {
                    index: index.clone(),
                    id,
                    version: meta.commit_lsn.0,
                    action: Action::Delete,
                    event: event.clone(),
                })
                .collect();
            if let Err(u) = self.send(ops).await {
                break Err(u.error);
            }
            let Some(s) = scroll.clone() else {
                break Ok(());
            };
            match self.client.scroll_next(&s).await {
                Ok((next, page)) => {
                    if next.is_some() {
                        scroll = next;
                    }
                    ids = page;
                }
                Err(e) => break Err(e),
            }
        };
        if let Some(s) = scroll {
            self.client.scroll_clear(&s).await;
        }
        if res.is_ok() {
            tracing::info!(sink = %self.name, table = %c.rel.qualified, index = %index, documents = total, "truncate: documents deleted");
        }
        res
    }

    /// Where `batch` starts: on a retry of the batch that failed, its held
    /// operations are sent first, and the changes acknowledged are skipped
    /// (how many is returned).
    async fn resume(&mut self, batch: &[Arc<Transaction>]) -> Result<usize, SinkError> {
        let again = self.resume.start(BatchId::of(batch));
        if !again || self.resume.held.is_empty() {
            // Rejections of the chunk that failed are found again now.
            self.dead.discard();
        }
        if !self.resume.held.is_empty() {
            let held = std::mem::take(&mut self.resume.held);
            let at = self.resume.held_at;
            self.send_phases(held, at).await?;
            self.acknowledged(at).await?;
        }
        Ok(self.resume.done)
    }

    /// Applies the batch, from where it failed last time if it is the same.
    async fn apply_batch(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        let skip = self.resume(batch).await?;
        let mut chunk = Chunk::default();
        // Changes of the batch read so far, routed or not.
        let mut pos = 0usize;
        for txn in batch {
            let mut stream = ChangeStream::new(txn);
            while let Some(c) = stream.next().await {
                let c = c.map_err(|e| {
                    SinkError::transient(format!("reading spilled transaction: {e}"))
                })?;
                pos += 1;
                if pos <= skip || !self.routes.takes(&c.rel.qualified) {
                    continue;
                }
                if c.op == Op::Truncate {
                    self.flush(&mut chunk, pos - 1).await?;
                    self.truncate(&c, &txn.meta).await?;
                    self.acknowledged(pos).await?;
                    continue;
                }
                self.add(&mut chunk, &c, &txn.meta, pos - 1).await?;
                if chunk.ops.len() >= self.max_docs || chunk.bytes >= self.max_bytes {
                    self.flush(&mut chunk, pos).await?;
                }
            }
        }
        self.flush(&mut chunk, pos).await
    }
}

/// The operations whose flag is set.
fn only(ops: Vec<Pending>, keep: &[bool]) -> Vec<Pending> {
    ops.into_iter()
        .zip(keep)
        .filter_map(|(p, &k)| k.then_some(p))
        .collect()
}

#[async_trait::async_trait]
impl Sink for ElasticsearchSink {
    async fn apply(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        let res = self.apply_batch(batch).await;
        if res.is_ok() || self.resume.held.is_empty() {
            // Done, or failed in a way that retries the batch whole.
            self.resume = Resume::default();
        }
        res
    }

    /// Before the first checkpoint, every index of the sink exists (created
    /// empty when no document went to it yet): so a checkpoint implies its
    /// indices, and a missing one at start means it was lost.
    async fn flush(&mut self) -> Result<(), SinkError> {
        for index in self.routes.indices() {
            self.ensure_index(&index).await?;
        }
        Ok(())
    }

    async fn lost_state(&mut self) -> Result<Option<String>, SinkError> {
        let mut missing = Vec::new();
        for index in self.routes.indices() {
            if !self.client.index_exists(&index).await? {
                missing.push(index);
            }
        }
        Ok((!missing.is_empty()).then(|| {
            format!(
                "the cluster has no index {} (deleted, or the cluster was rebuilt)",
                missing.join(", ")
            )
        }))
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        self.resume = Resume::default();
        self.dead.sync().await?;
        let m = &self.stats.merges;
        tracing::info!(sink = %self.name, indexed = self.stats.indexed, deleted = self.stats.deleted,
            older_skipped = self.stats.older + m.older, completed_by_read = m.from_index,
            completed_from_postgres = m.from_source, gone_in_postgres = m.gone_at_source,
            dead_letters = self.dead.count, incomplete = self.incomplete.len(), "elasticsearch sink closed");
        Ok(())
    }
}
