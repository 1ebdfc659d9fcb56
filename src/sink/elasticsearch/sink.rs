use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::client::{describe_error, Client, ItemResult};
use super::complete::{self, Counts, Item, Merge, Resolved, Shape};
use super::config::{render_index, ElasticsearchConfig, OnError};
use crate::event::{
    BeforeKind, Cell, Change, Changes, Op, RelationInfo, Row, Transaction, TxnMeta,
};
use crate::pipeline::Backoff;
use crate::sink::key::KeyTemplate;
use crate::sink::rows::RowSource;
use crate::sink::{Sink, SinkError};

/// How long failed bulk items are retried inside one `apply` before the
/// batch is handed back to the pipeline as a transient failure.
const ITEM_RETRY_FOR: Duration = Duration::from_secs(60);

/// Where one configured table goes.
struct Route {
    index: Arc<str>,
    id_columns: Option<Vec<String>>,
    columns: Option<Vec<String>>,
    exclude: Vec<String>,
    /// Other configured tables that write to the same index.
    shared_with: Vec<String>,
}

/// A route applied to one version of a relation.
struct Plan {
    index: Arc<str>,
    key: KeyTemplate,
    /// The relation, its document columns and its id columns.
    shape: Arc<Shape>,
}

enum Action {
    /// `index` with this `_source`.
    Index(Vec<u8>),
    Delete,
    /// An update whose unchanged TOAST columns were not sent: completed
    /// (see [`complete`]) and indexed as a whole before the chunk is sent.
    Merge(Box<Merge>),
    /// Nothing to send (the index already holds a newer version, or the
    /// change went to the dead letters).
    Skip,
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Delete => "delete",
            _ => "index",
        }
    }
}

/// One document operation, versioned with the commit LSN of its transaction.
struct Pending {
    index: Arc<str>,
    id: String,
    version: u64,
    action: Action,
    /// The change as a JSON event (the JSONL format), for dead letters.
    event: Arc<[u8]>,
}

impl Pending {
    fn size(&self) -> usize {
        100 + self.index.len()
            + self.id.len()
            + match &self.action {
                Action::Index(s) => s.len(),
                Action::Merge(m) => m.size,
                Action::Delete | Action::Skip => 0,
            }
    }
}

/// The operations of one `_bulk` request being assembled. Only the latest
/// operation per document is kept: every operation carries the full new
/// state (or a delete) and its own version, so the earlier ones would be
/// overwritten anyway.
#[derive(Default)]
struct Chunk {
    ops: Vec<Pending>,
    latest: HashMap<(Arc<str>, String), usize>,
    bytes: usize,
    /// Documents that key changes in the chunk complete from (their old
    /// ids): written only once those completions are acknowledged.
    bases: HashSet<(Arc<str>, String)>,
}

impl Chunk {
    fn get(&self, index: &Arc<str>, id: &str) -> Option<&Pending> {
        self.latest
            .get(&(index.clone(), id.to_string()))
            .map(|&i| &self.ops[i])
    }

    fn put(&mut self, p: Pending) {
        if let Action::Merge(m) = &p.action {
            if let Some(b) = m.base.as_ref().filter(|b| **b != p.id) {
                self.bases.insert((p.index.clone(), b.clone()));
            }
        }
        self.bytes += p.size();
        match self.latest.get(&(p.index.clone(), p.id.clone())) {
            Some(&i) => {
                self.bytes -= self.ops[i].size();
                self.ops[i] = p;
            }
            None => {
                self.latest
                    .insert((p.index.clone(), p.id.clone()), self.ops.len());
                self.ops.push(p);
            }
        }
    }

    /// True when a key change in the chunk completes from this document.
    fn is_base(&self, index: &Arc<str>, id: &str) -> bool {
        self.bases.contains(&(index.clone(), id.to_string()))
    }

    /// The operations, and the bases of the key changes among them (see
    /// [`ElasticsearchSink::flush`]).
    fn take(&mut self) -> (Vec<Pending>, HashSet<(Arc<str>, String)>) {
        self.latest.clear();
        self.bytes = 0;
        (
            std::mem::take(&mut self.ops),
            std::mem::take(&mut self.bases),
        )
    }
}

/// Counters, logged at shutdown.
#[derive(Debug, Default)]
struct Stats {
    indexed: u64,
    deleted: u64,
    /// Operations the index already had a newer (or the same) version of.
    older: u64,
    /// Updates with unchanged TOAST columns, and how they were completed.
    merges: Counts,
    dead_letters: u64,
}

/// Writes rows of the configured tables as documents (see the module docs).
pub struct ElasticsearchSink {
    name: String,
    client: Client,
    /// By `schema.table`.
    routes: HashMap<String, Route>,
    /// Create-index body per index.
    create_bodies: HashMap<String, Value>,
    default_body: Value,
    /// By relation oid.
    plans: HashMap<u32, Arc<Plan>>,
    /// Indices known to exist.
    known: HashSet<String>,
    max_docs: usize,
    max_bytes: usize,
    on_error: OnError,
    dead_path: PathBuf,
    dead_file: Option<File>,
    dead_buf: Vec<u8>,
    stats: Stats,
    /// Reads rows from Postgres where the index cannot complete a change.
    rows: Option<Arc<dyn RowSource>>,
    /// Documents left unwritten because no complete one could be made
    /// (dead-lettered), until a later write repairs them (for `/readyz`).
    incomplete: HashSet<(Arc<str>, String)>,
}

fn read_mapping(path: &std::path::Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("mapping_file {}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format!("mapping_file {}: not valid JSON: {e}", path.display()))?;
    let Value::Object(m) = &v else {
        return Err(format!(
            "mapping_file {}: must hold a JSON object",
            path.display()
        ));
    };
    // A bare mapping (`{"properties": …}`) is wrapped into a create-index body.
    if m.contains_key("mappings") || m.contains_key("settings") || m.contains_key("aliases") {
        Ok(v)
    } else {
        Ok(json!({ "mappings": v }))
    }
}

impl ElasticsearchSink {
    /// `rows` reads rows from Postgres for the changes the index cannot
    /// complete; without it, such changes go to the dead letters.
    pub fn open(
        cfg: &ElasticsearchConfig,
        rows: Option<Arc<dyn RowSource>>,
    ) -> Result<ElasticsearchSink, SinkError> {
        let fatal = |m: String| SinkError::Fatal(format!("sink {:?}: {m}", cfg.name));
        let client = Client::new(cfg).map_err(fatal)?;
        let default_body = match &cfg.mapping_file {
            Some(p) => read_mapping(p).map_err(fatal)?,
            None => json!({}),
        };
        let mut routes = HashMap::new();
        let mut create_bodies = HashMap::new();
        for (name, t) in &cfg.tables {
            let (schema, table) = crate::config::split_table(name)
                .ok_or_else(|| fatal(format!("{name:?} is not a table name")))?;
            let qualified = format!("{schema}.{table}");
            let index: Arc<str> = render_index(
                t.index.as_deref().unwrap_or("{schema}.{table}"),
                &schema,
                &table,
            )
            .into();
            if let Some(p) = &t.mapping_file {
                create_bodies.insert(index.to_string(), read_mapping(p).map_err(fatal)?);
            }
            routes.insert(
                qualified,
                Route {
                    index,
                    id_columns: t.id_columns.clone(),
                    columns: t.columns.clone(),
                    exclude: t.exclude_columns.clone(),
                    shared_with: Vec::new(),
                },
            );
        }
        let by_index: Vec<(String, Arc<str>)> = routes
            .iter()
            .map(|(q, r)| (q.clone(), r.index.clone()))
            .collect();
        for (q, r) in routes.iter_mut() {
            r.shared_with = by_index
                .iter()
                .filter(|(o, i)| o != q && *i == r.index)
                .map(|(o, _)| o.clone())
                .collect();
        }
        Ok(ElasticsearchSink {
            name: cfg.name.clone(),
            client,
            routes,
            create_bodies,
            default_body,
            plans: HashMap::new(),
            known: HashSet::new(),
            max_docs: cfg.batch_max_docs,
            max_bytes: cfg.batch_max_bytes,
            on_error: cfg.on_error,
            dead_path: cfg
                .dead_letter_path
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{}.dead-letter.jsonl", cfg.name))),
            dead_file: None,
            dead_buf: Vec::new(),
            stats: Stats::default(),
            rows,
            incomplete: HashSet::new(),
        })
    }

    /// The plan for a relation, built on first sight and after a schema change.
    fn plan(&mut self, rel: &Arc<RelationInfo>) -> Result<Arc<Plan>, SinkError> {
        if let Some(p) = self.plans.get(&rel.oid) {
            if Arc::ptr_eq(&p.shape.rel, rel) || same_shape(&p.shape.rel, rel) {
                return Ok(p.clone());
            }
        }
        let route = &self.routes[&rel.qualified];
        let fatal = |m: String| {
            SinkError::Fatal(format!(
                "sink {:?}: table {}: {m}",
                self.name, rel.qualified
            ))
        };
        let key = match &route.id_columns {
            Some(cols) => {
                if let Some(c) = cols
                    .iter()
                    .find(|c| !rel.columns.iter().any(|rc| &rc.name == *c))
                {
                    return Err(fatal(format!(
                        "id_columns names {c:?}, which is not a column of the table"
                    )));
                }
                KeyTemplate::for_columns(cols).map_err(|e| fatal(e.to_string()))?
            }
            None if rel.replica_identity == b'f' => {
                return Err(fatal(
                    "it has REPLICA IDENTITY FULL, so every column is part of its replication key and cannot make a document id; \
                     set id_columns (its primary key) in [sink.tables.\"{table}\"]"
                        .replace("{table}", &rel.qualified),
                ))
            }
            None => KeyTemplate::for_key_columns(rel).map_err(|e| {
                fatal(format!(
                    "{e}. Documents need an id: give the table a primary key (or REPLICA IDENTITY USING INDEX), set id_columns, or remove it from the sink's tables"
                ))
            })?,
        };
        let include: Vec<bool> = rel
            .columns
            .iter()
            .map(|c| {
                route.columns.as_ref().is_none_or(|l| l.contains(&c.name))
                    && !route.exclude.contains(&c.name)
            })
            .collect();
        for name in route.columns.iter().flatten().chain(&route.exclude) {
            if !rel.columns.iter().any(|c| &c.name == name) {
                tracing::warn!(sink = %self.name, table = %rel.qualified, column = %name, "a configured column is not in the table; ignored");
            }
        }
        let plan = Arc::new(Plan {
            index: route.index.clone(),
            shape: Arc::new(Shape {
                rel: rel.clone(),
                include,
                key_columns: key.columns().map(str::to_string).collect(),
            }),
            key,
        });
        self.plans.insert(rel.oid, plan.clone());
        Ok(plan)
    }

    /// Turns one insert, update or delete into document operations.
    async fn add(
        &mut self,
        chunk: &mut Chunk,
        c: &Change,
        meta: &TxnMeta,
    ) -> Result<(), SinkError> {
        let plan = self.plan(&c.rel)?;
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
            return self.reject_change(
                &plan,
                &event,
                "the change carries no row with the key (replica identity NOTHING?)",
            );
        };
        let id = match plan.key.render(&c.rel, row) {
            Ok(id) => id,
            Err(e) => return self.reject_change(&plan, &event, &e.to_string()),
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
                self.flush(chunk).await?;
            }
            let base = old_id.as_deref().unwrap_or(&id);
            merge_action(chunk, &plan, row, base, meta.xid)
        };
        if let Some(old) = old_id {
            chunk.put(pending(old, Action::Delete));
        }
        chunk.put(pending(id, action));
        Ok(())
    }

    fn reject_change(&mut self, plan: &Plan, event: &[u8], reason: &str) -> Result<(), SinkError> {
        self.reject(
            &plan.index,
            None,
            "index",
            None,
            &json!({"type": "pgferry_document_id_error", "reason": reason}),
            event,
        )
    }

    /// A change the cluster (or the sink) refuses for good: dead letter, or stop.
    fn reject(
        &mut self,
        index: &str,
        id: Option<&str>,
        action: &str,
        status: Option<u16>,
        error: &Value,
        event: &[u8],
    ) -> Result<(), SinkError> {
        let what = describe_error(error);
        if self.on_error == OnError::Stop {
            return Err(SinkError::Fatal(format!(
                "sink {:?}: {action} of document {:?} in index {index:?} was rejected ({}{what}). on_error = \"stop\": fix the mapping or the data \
                 (or set on_error = \"dead_letter\"), then start pgferry again; it resumes from the sink's checkpoint",
                self.name,
                id.unwrap_or("?"),
                status.map(|s| format!("{s} ")).unwrap_or_default(),
            )));
        }
        self.stats.dead_letters += 1;
        crate::metrics::global().sink(&self.name).dead_letter();
        tracing::warn!(
            sink = %self.name, index, id = id.unwrap_or(""), action, status = status.unwrap_or(0), error = %what,
            dead_letters = self.stats.dead_letters, path = %self.dead_path.display(),
            "change rejected: written to the dead-letter file"
        );
        let mut line = Vec::with_capacity(event.len() + 256);
        line.extend_from_slice(b"{\"time\":\"");
        crate::event::write_pg_timestamp(crate::event::pg_now(), &mut line);
        line.extend_from_slice(b"\",\"sink\":");
        crate::decode::value::write_json_string(self.name.as_bytes(), &mut line);
        line.extend_from_slice(b",\"index\":");
        crate::decode::value::write_json_string(index.as_bytes(), &mut line);
        line.extend_from_slice(b",\"id\":");
        match id {
            Some(id) => crate::decode::value::write_json_string(id.as_bytes(), &mut line),
            None => line.extend_from_slice(b"null"),
        }
        line.extend_from_slice(b",\"action\":\"");
        line.extend_from_slice(action.as_bytes());
        line.extend_from_slice(b"\",\"status\":");
        match status {
            Some(s) => line.extend_from_slice(itoa::Buffer::new().format(s).as_bytes()),
            None => line.extend_from_slice(b"null"),
        }
        line.extend_from_slice(b",\"error\":");
        line.extend_from_slice(error.to_string().as_bytes());
        line.extend_from_slice(b",\"event\":");
        line.extend_from_slice(event);
        line.extend_from_slice(b"}\n");
        self.dead_buf.extend_from_slice(&line);
        Ok(())
    }

    /// Makes the dead letters written so far durable.
    fn sync_dead(&mut self) -> Result<(), SinkError> {
        if self.dead_buf.is_empty() {
            return Ok(());
        }
        let path = self.dead_path.clone();
        let io = |e: std::io::Error| {
            SinkError::Transient(format!(
                "dead-letter file {}: {e}; check that its directory is writable",
                path.display()
            ))
        };
        if self.dead_file.is_none() {
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            self.dead_file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(io)?,
            );
        }
        let f = self.dead_file.as_mut().expect("opened above");
        let res = f.write_all(&self.dead_buf).and_then(|_| f.sync_data());
        self.dead_buf.clear();
        res.map_err(io)
    }

    /// Sends the chunk's operations; `Ok` once all are applied, older than
    /// the index's version, or dead-lettered.
    ///
    /// Two phases: the documents that key changes were completed from (their
    /// old ids) are deleted, or written, only once every other operation,
    /// the completed documents among them, is acknowledged. A failure at any
    /// point before leaves them in place, so the retry (or the replay after
    /// a crash) completes the new documents from them again.
    async fn flush(&mut self, chunk: &mut Chunk) -> Result<(), SinkError> {
        if !chunk.ops.is_empty() {
            let (mut ops, bases) = chunk.take();
            self.resolve_merges(&mut ops).await?;
            if bases.is_empty() {
                self.send(ops).await?;
            } else {
                let (first, then): (Vec<Pending>, Vec<Pending>) = ops
                    .into_iter()
                    .partition(|p| !bases.contains(&(p.index.clone(), p.id.clone())));
                self.send(first).await?;
                self.send(then).await?;
            }
        }
        crate::metrics::global()
            .sink(&self.name)
            .set_incomplete(self.incomplete.len() as u64);
        self.sync_dead()
    }

    /// Completes the chunk's merges (see [`complete`]): each becomes a whole
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
        let resolved = complete::resolve(
            &self.client,
            self.rows.as_deref(),
            &items,
            &mut self.stats.merges,
        )
        .await?;
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
                    let error = json!({"type": "pgferry_incomplete_document", "reason": reason});
                    self.reject(&p.index, Some(&p.id), "index", None, &error, &p.event)?;
                    self.incomplete.insert((p.index.clone(), p.id.clone()));
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

    /// The sink's indices (sorted, once each).
    fn indices(&self) -> Vec<String> {
        let mut v: Vec<String> = self.routes.values().map(|r| r.index.to_string()).collect();
        v.sort();
        v.dedup();
        v
    }

    async fn ensure_index(&mut self, index: &str) -> Result<(), SinkError> {
        if self.known.contains(index) {
            return Ok(());
        }
        if !self.client.index_exists(index).await? {
            let body = self
                .create_bodies
                .get(index)
                .unwrap_or(&self.default_body)
                .clone();
            self.client.create_index(index, &body).await?;
            tracing::info!(sink = %self.name, index, "created index");
        }
        self.known.insert(index.to_string());
        Ok(())
    }

    /// `_bulk`s the operations; failed items that may succeed later (429,
    /// 5xx, a missing index) are sent again, alone, with backoff.
    async fn send(&mut self, ops: Vec<Pending>) -> Result<(), SinkError> {
        let mut todo: Vec<usize> = (0..ops.len())
            .filter(|&i| !matches!(ops[i].action, Action::Skip))
            .collect();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let started = Instant::now();
        let mut attempt = 0u32;
        let mut body = Vec::new();
        while !todo.is_empty() {
            let mut need: Vec<Arc<str>> = Vec::new();
            for &i in &todo {
                let p = &ops[i];
                if matches!(p.action, Action::Index(_))
                    && !self.known.contains(&*p.index)
                    && !need.contains(&p.index)
                {
                    need.push(p.index.clone());
                }
            }
            for index in need {
                self.ensure_index(&index).await?;
            }
            // One request at most `max_bytes` (but at least one document).
            let mut results: Vec<ItemResult> = Vec::with_capacity(todo.len());
            let mut start = 0;
            while start < todo.len() {
                body.clear();
                let mut end = start;
                while end < todo.len() && (end == start || body.len() < self.max_bytes) {
                    let p = &ops[todo[end]];
                    if end > start && body.len() + p.size() > self.max_bytes {
                        break;
                    }
                    write_bulk_op(p, &mut body);
                    end += 1;
                }
                let got = self.client.bulk(std::mem::take(&mut body)).await?;
                if got.len() != end - start {
                    return Err(SinkError::Transient(format!(
                        "POST /_bulk: sent {} operations, got {} results",
                        end - start,
                        got.len()
                    )));
                }
                results.extend(got);
                start = end;
            }
            let mut retry = Vec::new();
            let mut last = String::new();
            for (&i, r) in todo.iter().zip(&results) {
                let p = &ops[i];
                let is_delete = matches!(p.action, Action::Delete);
                let outcome = outcome(is_delete, r);
                if matches!(outcome, Outcome::Applied | Outcome::Older | Outcome::Gone)
                    && !self.incomplete.is_empty()
                {
                    // Written whole, deleted, or superseded: no longer incomplete.
                    self.incomplete.remove(&(p.index.clone(), p.id.clone()));
                }
                match outcome {
                    Outcome::Applied if is_delete => self.stats.deleted += 1,
                    Outcome::Applied => self.stats.indexed += 1,
                    Outcome::Older => self.stats.older += 1,
                    Outcome::Gone => {}
                    Outcome::NoIndex => {
                        self.known.remove(&*p.index);
                        retry.push(i);
                        last = describe_error(r.error.as_ref().unwrap_or(&Value::Null));
                    }
                    Outcome::Retry => {
                        retry.push(i);
                        last = format!(
                            "{} {}",
                            r.status,
                            describe_error(r.error.as_ref().unwrap_or(&Value::Null))
                        );
                    }
                    Outcome::Rejected => {
                        let error = r.error.clone().unwrap_or(Value::Null);
                        self.reject(
                            &p.index,
                            Some(&p.id),
                            p.action.name(),
                            Some(r.status),
                            &error,
                            &p.event,
                        )?;
                    }
                }
            }
            if retry.is_empty() {
                break;
            }
            attempt += 1;
            if started.elapsed() >= ITEM_RETRY_FOR {
                return Err(SinkError::Transient(format!(
                    "{} of {} bulk items still failing after {attempt} attempts (last: {last})",
                    retry.len(),
                    ops.len()
                )));
            }
            let delay = backoff.next_delay();
            tracing::warn!(sink = %self.name, items = retry.len(), attempt, error = %last, retry_in_ms = delay.as_millis() as u64, "bulk items failed; sending them again");
            tokio::time::sleep(delay).await;
            todo = retry;
        }
        Ok(())
    }

    /// TRUNCATE: deletes every document of the table's index, each with the
    /// truncate's commit LSN as its external version (see the module docs).
    async fn truncate(&mut self, c: &Change, meta: &TxnMeta) -> Result<(), SinkError> {
        let route = &self.routes[&c.rel.qualified];
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
            return self.reject(
                &index,
                None,
                "truncate",
                None,
                &json!({"type": "pgferry_truncate_shared_index", "reason": reason}),
                &event,
            );
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
            if let Err(e) = self.send(ops).await {
                break Err(e);
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
}

#[async_trait::async_trait]
impl Sink for ElasticsearchSink {
    async fn apply(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        // Rejections of a chunk that failed last time are found again now.
        self.dead_buf.clear();
        let mut chunk = Chunk::default();
        for txn in batch {
            let mut stream = ChangeStream::new(txn);
            while let Some(c) = stream.next().await {
                let c = c.map_err(|e| {
                    SinkError::Transient(format!("reading spilled transaction: {e}"))
                })?;
                if !self.routes.contains_key(&c.rel.qualified) {
                    continue;
                }
                if c.op == Op::Truncate {
                    self.flush(&mut chunk).await?;
                    self.truncate(&c, &txn.meta).await?;
                    continue;
                }
                self.add(&mut chunk, &c, &txn.meta).await?;
                if chunk.ops.len() >= self.max_docs || chunk.bytes >= self.max_bytes {
                    self.flush(&mut chunk).await?;
                }
            }
        }
        self.flush(&mut chunk).await
    }

    /// Before the first checkpoint, every index of the sink exists (created
    /// empty when no document went to it yet): so a checkpoint implies its
    /// indices, and a missing one at start means it was lost.
    async fn flush(&mut self) -> Result<(), SinkError> {
        for index in self.indices() {
            self.ensure_index(&index).await?;
        }
        Ok(())
    }

    async fn lost_state(&mut self) -> Result<Option<String>, SinkError> {
        let mut missing = Vec::new();
        for index in self.indices() {
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
        self.sync_dead()?;
        let m = &self.stats.merges;
        tracing::info!(sink = %self.name, indexed = self.stats.indexed, deleted = self.stats.deleted,
            older_skipped = self.stats.older + m.older, completed_by_read = m.from_index,
            completed_from_postgres = m.from_source, gone_in_postgres = m.gone_at_source,
            dead_letters = self.stats.dead_letters, incomplete = self.incomplete.len(), "elasticsearch sink closed");
        Ok(())
    }
}

/// The changes of a transaction, in WAL order, without holding a spilled
/// transaction in memory: spilled changes are read on a blocking thread and
/// handed over through a small channel.
enum ChangeStream<'a> {
    Mem {
        it: std::slice::Iter<'a, Change>,
        aborted: &'a [u32],
    },
    Spilled(tokio::sync::mpsc::Receiver<std::io::Result<Change>>),
}

impl<'a> ChangeStream<'a> {
    fn new(txn: &'a Arc<Transaction>) -> ChangeStream<'a> {
        match &txn.changes {
            Changes::Memory(v) => ChangeStream::Mem {
                it: v.iter(),
                aborted: &txn.aborted_subxids,
            },
            Changes::Spilled { .. } => {
                let (tx, rx) = tokio::sync::mpsc::channel(256);
                let txn = txn.clone();
                tokio::task::spawn_blocking(move || {
                    let r = txn.for_each_change(|c| {
                        tx.blocking_send(Ok(c.clone()))
                            .map_err(|_| std::io::Error::other("the sink stopped reading"))
                    });
                    if let Err(e) = r {
                        let _ = tx.blocking_send(Err(e));
                    }
                });
                ChangeStream::Spilled(rx)
            }
        }
    }

    async fn next(&mut self) -> Option<std::io::Result<Cow<'a, Change>>> {
        match self {
            ChangeStream::Mem { it, aborted } => it
                .find(|c| !aborted.contains(&c.xid))
                .map(|c| Ok(Cow::Borrowed(c))),
            ChangeStream::Spilled(rx) => rx.recv().await.map(|r| r.map(Cow::Owned)),
        }
    }
}

/// What one answered bulk item means.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Applied,
    /// A 409 version conflict: the index holds this version or a newer one
    /// (a replay). Success.
    Older,
    /// A delete of a document (or index) that is not there. Success.
    Gone,
    /// The index is missing: create it again, then retry.
    NoIndex,
    /// Overloaded (429), failing (5xx), blocked or closed: retry with backoff.
    Retry,
    /// Final (a mapping error, an invalid document): dead letter or stop.
    Rejected,
}

fn outcome(is_delete: bool, r: &ItemResult) -> Outcome {
    let t = r.error_type();
    match r.status {
        200..=299 => Outcome::Applied,
        409 if t == "version_conflict_engine_exception" => Outcome::Older,
        404 if is_delete => Outcome::Gone,
        404 if t == "index_not_found_exception" => Outcome::NoIndex,
        429 | 500..=599 => Outcome::Retry,
        _ if t == "cluster_block_exception" || t == "index_closed_exception" => Outcome::Retry,
        _ => Outcome::Rejected,
    }
}

fn same_shape(a: &RelationInfo, b: &RelationInfo) -> bool {
    a.qualified == b.qualified
        && a.columns.len() == b.columns.len()
        && a.columns
            .iter()
            .zip(&b.columns)
            .all(|(x, y)| x.name == y.name && x.is_key == y.is_key)
}

/// The document: the row's included columns as a JSON object (the same
/// values as `to_jsonb(row)`); unchanged TOAST columns are left out.
pub fn write_doc(rel: &RelationInfo, row: &Row, include: &[bool], out: &mut Vec<u8>) {
    crate::event::write_object(
        rel,
        row,
        |i, _| include.get(i).copied().unwrap_or(false),
        out,
    );
}

/// `row` with its unchanged cells taken from `from` (a full old row).
fn fill_unchanged(row: &Row, from: &Row) -> Row {
    let mut out = Row {
        buf: row.buf.clone(),
        cells: row.cells.clone(),
    };
    for (i, cell) in out.cells.iter_mut().enumerate() {
        if *cell != Cell::Unchanged {
            continue;
        }
        *cell = match from.cell(i) {
            Cell::Value { .. } => {
                let v = from.json(i).unwrap_or(b"null");
                let start = out.buf.len() as u32;
                out.buf.extend_from_slice(v);
                Cell::Value {
                    start,
                    end: out.buf.len() as u32,
                }
            }
            other => other,
        };
    }
    out
}

/// The included columns that were sent, as a map, and their JSON size.
fn overlay(rel: &RelationInfo, row: &Row, include: &[bool]) -> (Map<String, Value>, usize) {
    let mut m = Map::new();
    let mut size = 2;
    for (i, col) in rel.columns.iter().enumerate() {
        if !include.get(i).copied().unwrap_or(false) {
            continue;
        }
        let v = match row.cell(i) {
            Cell::Unchanged => continue,
            Cell::Null => Value::Null,
            Cell::Value { .. } => {
                let raw = row.json(i).unwrap_or(b"null");
                size += raw.len();
                serde_json::from_slice(raw).unwrap_or(Value::Null)
            }
        };
        size += col.json_name.len() + 2;
        m.insert(col.name.clone(), v);
    }
    (m, size)
}

/// The action of an update whose unchanged TOAST columns were not sent,
/// to be completed from `base` (the document itself, or a key change's old
/// id): merged over the chunk's operation on `base` when it has one, else a
/// [`Merge`] resolved before the chunk is sent.
fn merge_action(chunk: &Chunk, plan: &Plan, row: &Row, base: &str, xid: u32) -> Action {
    let shape = &plan.shape;
    let (overlay, size) = overlay(&shape.rel, row, &shape.include);
    let merge = Merge {
        base: Some(base.to_string()),
        overlay,
        size,
        unsent: shape.unsent(row),
        shape: shape.clone(),
        key: shape.key_values(row),
        xid,
    };
    match chunk.get(&plan.index, base).map(|p| &p.action) {
        Some(Action::Index(src)) => {
            let mut doc: Map<String, Value> = serde_json::from_slice(src).unwrap_or_default();
            doc.extend(merge.overlay);
            Action::Index(serde_json::to_vec(&doc).unwrap_or_default())
        }
        Some(Action::Merge(earlier)) => Action::Merge(Box::new(earlier.then(merge))),
        // The chunk deletes the base: only Postgres has the row.
        Some(Action::Delete) | Some(Action::Skip) => Action::Merge(Box::new(Merge {
            base: None,
            ..merge
        })),
        None => Action::Merge(Box::new(merge)),
    }
}

/// One `_bulk` action line (and source line), external version in the action.
fn write_bulk_op(p: &Pending, out: &mut Vec<u8>) {
    let (action, source) = match &p.action {
        Action::Index(s) => ("index", Some(s)),
        Action::Delete => ("delete", None),
        Action::Merge { .. } | Action::Skip => return,
    };
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(action.as_bytes());
    out.extend_from_slice(b"\":{\"_index\":");
    crate::decode::value::write_json_string(p.index.as_bytes(), out);
    out.extend_from_slice(b",\"_id\":");
    crate::decode::value::write_json_string(p.id.as_bytes(), out);
    out.extend_from_slice(b",\"version\":");
    out.extend_from_slice(itoa::Buffer::new().format(p.version).as_bytes());
    out.extend_from_slice(b",\"version_type\":\"external_gte\"}}\n");
    if let Some(s) = source {
        out.extend_from_slice(s);
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel() -> Arc<RelationInfo> {
        Arc::new(RelationInfo::new(
            7,
            "public".into(),
            "docs".into(),
            b'd',
            vec![
                ("id".into(), 23, true),
                ("body".into(), 25, false),
                ("n".into(), 23, false),
            ],
        ))
    }

    fn row(cells: &[Option<&str>], unchanged: &[usize]) -> Row {
        let mut r = Row::from_values(cells);
        for &i in unchanged {
            r.cells[i] = Cell::Unchanged;
        }
        r
    }

    #[test]
    fn documents_follow_the_column_mask_and_skip_unchanged_values() {
        let r = row(&[Some("1"), Some("\"x\""), None], &[]);
        let mut out = Vec::new();
        write_doc(&rel(), &r, &[true, true, true], &mut out);
        assert_eq!(out, br#"{"id":1,"body":"x","n":null}"#);
        out.clear();
        write_doc(&rel(), &r, &[true, false, true], &mut out);
        assert_eq!(out, br#"{"id":1,"n":null}"#);
        let r = row(&[Some("1"), None, Some("5")], &[1]);
        out.clear();
        write_doc(&rel(), &r, &[true, true, true], &mut out);
        assert_eq!(out, br#"{"id":1,"n":5}"#);
        // A full old row fills in the unchanged value.
        let old = row(&[Some("1"), Some("\"long\""), Some("4")], &[]);
        out.clear();
        write_doc(
            &rel(),
            &fill_unchanged(&r, &old),
            &[true, true, true],
            &mut out,
        );
        assert_eq!(out, br#"{"id":1,"body":"long","n":5}"#);
        let (m, _) = overlay(&rel(), &r, &[true, true, true]);
        assert_eq!(Value::Object(m), json!({"id": 1, "n": 5}));
    }

    fn pending(id: &str, version: u64, action: Action) -> Pending {
        Pending {
            index: "i".into(),
            id: id.into(),
            version,
            action,
            event: Arc::from(&b"{}"[..]),
        }
    }

    #[test]
    fn bulk_lines_carry_the_external_version_in_the_action() {
        let mut out = Vec::new();
        write_bulk_op(
            &pending("a\"b", 42, Action::Index(b"{\"x\":1}".to_vec())),
            &mut out,
        );
        write_bulk_op(&pending("c", 43, Action::Delete), &mut out);
        write_bulk_op(&pending("d", 44, Action::Skip), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"index\":{\"_index\":\"i\",\"_id\":\"a\\\"b\",\"version\":42,\"version_type\":\"external_gte\"}}\n{\"x\":1}\n\
             {\"delete\":{\"_index\":\"i\",\"_id\":\"c\",\"version\":43,\"version_type\":\"external_gte\"}}\n"
        );
    }

    #[test]
    fn id_columns_escape_like_the_default_key() {
        let t = KeyTemplate::for_columns(&["body", "id"]).unwrap();
        let r = row(&[Some("7"), Some("\"a:b%\""), None], &[]);
        assert_eq!(t.render(&rel(), &r).unwrap(), "a%3Ab%25:7");
        let t = KeyTemplate::for_columns(&["id"]).unwrap();
        let r = row(&[Some("\"x:y\""), None, None], &[]);
        assert_eq!(t.render(&rel(), &r).unwrap(), "x%3Ay");
    }

    #[test]
    fn a_full_identity_table_needs_id_columns() {
        let cfg: ElasticsearchConfig = toml::from_str(
            "name = \"s\"\nurl = \"http://127.0.0.1:1\"\n[tables.\"public.docs\"]\n[tables.\"public.other\"]\nid_columns = [\"n\", \"id\"]\n",
        )
        .unwrap();
        let mut sink = ElasticsearchSink::open(&cfg, None).unwrap();
        let cols = || {
            vec![
                ("id".to_string(), 23, true),
                ("body".to_string(), 25, true),
                ("n".to_string(), 23, true),
            ]
        };
        let full = Arc::new(RelationInfo::new(
            1,
            "public".into(),
            "docs".into(),
            b'f',
            cols(),
        ));
        match sink.plan(&full) {
            Err(SinkError::Fatal(m)) => {
                assert!(m.contains("id_columns") && m.contains("FULL"), "{m}")
            }
            _ => panic!("a FULL table without id_columns must stop"),
        }
        let other = Arc::new(RelationInfo::new(
            2,
            "public".into(),
            "other".into(),
            b'f',
            cols(),
        ));
        let plan = sink.plan(&other).unwrap();
        let r = row(&[Some("7"), Some("\"b\""), Some("3")], &[]);
        assert_eq!(plan.key.render(&other, &r).unwrap(), "3:7");
        assert_eq!(&*plan.index, "public.other");
    }

    #[test]
    fn bulk_item_answers_are_classified() {
        let item = |status: u16, t: &str| ItemResult {
            status,
            error: (!t.is_empty()).then(|| json!({"type": t, "reason": "r"})),
        };
        let cases = [
            (false, item(201, ""), Outcome::Applied),
            (true, item(200, ""), Outcome::Applied),
            (
                false,
                item(409, "version_conflict_engine_exception"),
                Outcome::Older,
            ),
            (
                true,
                item(409, "version_conflict_engine_exception"),
                Outcome::Older,
            ),
            (true, item(404, ""), Outcome::Gone),
            (true, item(404, "index_not_found_exception"), Outcome::Gone),
            (
                false,
                item(404, "index_not_found_exception"),
                Outcome::NoIndex,
            ),
            (
                false,
                item(429, "es_rejected_execution_exception"),
                Outcome::Retry,
            ),
            (
                false,
                item(503, "unavailable_shards_exception"),
                Outcome::Retry,
            ),
            (false, item(500, ""), Outcome::Retry),
            (false, item(403, "cluster_block_exception"), Outcome::Retry),
            (false, item(400, "index_closed_exception"), Outcome::Retry),
            (
                false,
                item(400, "mapper_parsing_exception"),
                Outcome::Rejected,
            ),
            (
                false,
                item(400, "illegal_argument_exception"),
                Outcome::Rejected,
            ),
            (false, item(409, "other"), Outcome::Rejected),
            (
                false,
                item(404, "document_missing_exception"),
                Outcome::Rejected,
            ),
        ];
        for (is_delete, r, want) in cases {
            assert_eq!(outcome(is_delete, &r), want, "{r:?}");
        }
    }

    #[test]
    fn a_chunk_keeps_the_latest_operation_per_document() {
        let mut c = Chunk::default();
        c.put(pending("1", 10, Action::Index(b"{}".to_vec())));
        c.put(pending("2", 11, Action::Delete));
        c.put(pending("1", 12, Action::Delete));
        assert_eq!(c.ops.len(), 2);
        assert!(matches!(c.ops[0].action, Action::Delete));
        assert_eq!(c.ops[0].version, 12);
        assert_eq!(c.bytes, c.ops.iter().map(Pending::size).sum::<usize>());
        let (ops, _) = c.take();
        assert_eq!(ops.len(), 2);
        assert!(c.latest.is_empty() && c.bytes == 0);
    }

    #[test]
    fn a_key_change_without_its_toast_value_completes_from_its_old_document() {
        let plan = Plan {
            index: "i".into(),
            key: KeyTemplate::for_columns(&["id"]).unwrap(),
            shape: Arc::new(Shape {
                rel: rel(),
                include: vec![true; 3],
                key_columns: vec!["id".into()],
            }),
        };
        // Row 1 moved to 2 without its body.
        let moved = row(&[Some("2"), None, Some("5")], &[1]);
        let mut c = Chunk::default();
        let Action::Merge(m) = merge_action(&c, &plan, &moved, "1", 7) else {
            panic!("nothing to merge with in the chunk: a merge to resolve")
        };
        assert_eq!(m.base.as_deref(), Some("1"));
        assert_eq!(m.unsent, ["body"]);
        assert_eq!(m.key, [json!(2)]);
        assert_eq!(Value::Object(m.overlay.clone()), json!({"id": 2, "n": 5}));
        c.put(pending("1", 10, Action::Delete));
        c.put(pending("2", 10, Action::Merge(m)));
        assert!(c.is_base(&"i".into(), "1") && !c.is_base(&"i".into(), "2"));
        let (_, bases) = c.take();
        assert!(bases.contains(&("i".into(), "1".to_string())));
        // The chunk's own write of the old document completes it in memory.
        c.put(pending(
            "1",
            9,
            Action::Index(br#"{"id":1,"body":"long","n":4}"#.to_vec()),
        ));
        let Action::Index(doc) = merge_action(&c, &plan, &moved, "1", 7) else {
            panic!("merged in memory")
        };
        let doc: Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(doc, json!({"id": 2, "body": "long", "n": 5}));
        // The chunk deletes the old document: only Postgres has the row.
        c.put(pending("1", 10, Action::Delete));
        let Action::Merge(m) = merge_action(&c, &plan, &moved, "1", 7) else {
            panic!("a merge to resolve")
        };
        assert_eq!(m.base, None);
    }

    #[tokio::test]
    async fn spilled_changes_stream_in_order_without_aborted_subtransactions() {
        let dir = tempfile::tempdir().unwrap();
        let rel = rel();
        let change = |i: u64, xid: u32| Change {
            op: Op::Insert,
            rel: rel.clone(),
            lsn: crate::lsn::Lsn(i),
            xid,
            before: None,
            after: Some(row(&[Some(&i.to_string()), None, None], &[])),
        };
        let mut w = crate::spill::SpillWriter::create(dir.path(), 1).unwrap();
        for i in 0..600 {
            w.append(&change(i, if i % 7 == 0 { 2 } else { 1 }))
                .unwrap();
        }
        let txn = Arc::new(Transaction {
            meta: TxnMeta {
                xid: 1,
                commit_lsn: crate::lsn::Lsn(1000),
                end_lsn: crate::lsn::Lsn(1001),
                commit_time: 0,
            },
            changes: Changes::Spilled {
                reader: w.finish().unwrap(),
                tail: (600..610).map(|i| change(i, 1)).collect(),
            },
            messages: Vec::new(),
            aborted_subxids: vec![2],
            mem_bytes: 0,
            _budget: None,
        });
        let mut want = Vec::new();
        txn.for_each_change(|c| {
            want.push(c.lsn.0);
            Ok(())
        })
        .unwrap();
        let mut got = Vec::new();
        let mut s = ChangeStream::new(&txn);
        while let Some(c) = s.next().await {
            got.push(c.unwrap().lsn.0);
        }
        assert_eq!(got, want);
        assert_eq!(got.len(), 610 - 86);
        // Dropping a stream half-way stops the reader thread.
        let mut s = ChangeStream::new(&txn);
        assert!(s.next().await.is_some());
        drop(s);
    }

    #[test]
    fn mapping_files_may_hold_a_bare_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        std::fs::write(&p, r#"{"properties":{"n":{"type":"integer"}}}"#).unwrap();
        assert_eq!(
            read_mapping(&p).unwrap(),
            json!({"mappings": {"properties": {"n": {"type": "integer"}}}})
        );
        std::fs::write(&p, r#"{"settings":{"number_of_shards":1}}"#).unwrap();
        assert_eq!(
            read_mapping(&p).unwrap(),
            json!({"settings": {"number_of_shards": 1}})
        );
        std::fs::write(&p, "[1]").unwrap();
        assert!(read_mapping(&p).is_err());
    }
}
