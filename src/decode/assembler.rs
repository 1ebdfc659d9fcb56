//! Transaction assembly: pgoutput messages in, committed transactions out.
//!
//! The [`Assembler`] is a state machine fed one parsed message at a time, in
//! the order the walsender sent them. It does no network I/O (spill files are
//! its only I/O) and keeps these invariants:
//!
//! - a transaction is returned only at its Commit (or Stream Commit), so
//!   output is in commit order, and its changes are in WAL order;
//! - a streamed transaction (protocol 2) is held across any number of Stream
//!   Start/Stop blocks, interleaved with other transactions, and dropped whole
//!   on a top-level Stream Abort; a subtransaction's Stream Abort drops only
//!   that subtransaction's changes;
//! - the rendered changes held in memory by all open transactions together
//!   never exceed the configured limit: the largest open transaction is
//!   spilled to disk first, and once spilled, a transaction keeps appending
//!   to its file;
//! - every surprise from the wire (a change outside a transaction, an unknown
//!   relation, a column count that does not match) is an error, never a panic;
//! - only configured tables are delivered, followed by OID through renames
//!   (see [`super::routes`]); the changes of other published relations are
//!   skipped before they are rendered;
//! - a value of a user type that does not parse as the registry describes
//!   the type (a composite that gained or lost an attribute: pgoutput sends
//!   no Relation message for an `ALTER TYPE`) is reported as
//!   [`AssembleError::StaleType`] before any state changes, so the caller
//!   can reload the type and feed the same message again.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use crate::decode::routes::{Route, Routes, DDL_PREFIX, REPLACED_PREFIX};
use crate::decode::types::TypeRegistry;
use crate::decode::value;
use crate::event::{
    BeforeKind, Cell, Change, Changes, LogicalMessage as EventMessage, Op, RelationInfo, Row,
    Transaction, TxnMeta,
};
use crate::lsn::Lsn;
use crate::protocol::pgoutput::{self, LogicalMessage, OldTuple, TupleData, TupleValue};
use crate::spill::SpillWriter;

/// The stream did not follow the protocol, or a spill file failed.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("protocol violation at {lsn}: {what}")]
    Protocol { lsn: Lsn, what: String },
    #[error("spill file I/O failed: {0}")]
    Spill(#[from] std::io::Error),
    /// A value of user type `type_oid` did not parse as the registry
    /// describes the type: reload it ([`Assembler::types_mut`]), then feed
    /// the same message again after [`Assembler::types_reloaded_at`].
    #[error("at {lsn}: a value of type {type_oid} does not match the type as loaded")]
    StaleType { lsn: Lsn, type_oid: u32 },
}

#[derive(Default)]
struct Builder {
    xid: u32,
    changes: Vec<Change>,
    mem: usize,
    spill: Option<SpillWriter>,
    messages: Vec<EventMessage>,
    aborted: Vec<u32>,
}

/// Turns pgoutput messages into committed [`Transaction`]s.
pub struct Assembler {
    relations: HashMap<u32, Arc<RelationInfo>>,
    /// Relations of the publication that are not configured tables.
    skipped: HashSet<u32>,
    routes: Routes,
    types: TypeRegistry,
    /// The position whose message is fed again after a type reload: values
    /// that still do not parse there are kept as strings.
    reloaded_at: Option<Lsn>,
    /// The open non-streamed transaction (between Begin and Commit).
    current: Option<Builder>,
    /// Open streamed transactions by top-level xid.
    streams: HashMap<u32, Builder>,
    /// The xid of the stream block we are inside, if any.
    in_stream: Option<u32>,
    mem_used: usize,
    mem_limit: usize,
    spill_dir: PathBuf,
    /// Transactions spilled so far (for metrics and tests).
    pub spilled_txns: u64,
}

impl Assembler {
    pub fn new(types: TypeRegistry, mem_limit: usize, spill_dir: PathBuf) -> Assembler {
        Assembler {
            relations: HashMap::new(),
            skipped: HashSet::new(),
            routes: Routes::all(),
            types,
            reloaded_at: None,
            current: None,
            streams: HashMap::new(),
            in_stream: None,
            mem_used: 0,
            mem_limit,
            spill_dir,
            spilled_txns: 0,
        }
    }

    /// Delivers only the relations `routes` takes (default: all).
    pub fn with_routes(mut self, routes: Routes) -> Assembler {
        self.routes = routes;
        self
    }

    /// Whether a Relation message describes a relation that is delivered
    /// (its types are worth loading).
    pub fn takes(&self, oid: u32, schema: &str, table: &str) -> bool {
        self.routes.peek(oid, schema, table)
    }

    /// The routing of configured tables (see [`super::routes`]).
    pub fn routes_mut(&mut self) -> &mut Routes {
        &mut self.routes
    }

    /// The types were reloaded for the message at `lsn`: when it is fed
    /// again, a value that still does not parse is kept as a string.
    pub fn types_reloaded_at(&mut self, lsn: Lsn) {
        self.reloaded_at = Some(lsn);
    }

    /// The type registry, so the caller can load missing user types before
    /// handing over a Relation message.
    pub fn types_mut(&mut self) -> &mut TypeRegistry {
        &mut self.types
    }

    /// The parse context for the next message.
    pub fn parse_context(&self, proto_version: u32) -> pgoutput::ParseContext {
        pgoutput::ParseContext {
            in_stream: self.in_stream.is_some(),
            proto_version,
            parallel_stream_abort: false,
        }
    }

    /// True when no transaction is open: every commit received so far has
    /// been returned, so the stream position is a safe resume point.
    pub fn is_idle(&self) -> bool {
        self.current.is_none() && self.streams.is_empty()
    }

    /// The current relation of `oid`, as the last Relation message described it.
    pub fn relation_info(&self, oid: u32) -> Option<Arc<RelationInfo>> {
        self.relations.get(&oid).cloned()
    }

    /// Bytes of rendered changes held in memory by open transactions.
    pub fn mem_used(&self) -> usize {
        self.mem_used
    }

    /// Feeds one message; `lsn` is the XLogData start position that carried it.
    ///
    /// Row messages borrow the XLogData buffer; their values are rendered
    /// here, so nothing borrowed outlives the call. A logical decoding
    /// message's content is copied, so a held transaction never pins the
    /// (possibly much larger) network read buffer it came in.
    pub fn handle(
        &mut self,
        lsn: Lsn,
        msg: LogicalMessage<'_>,
    ) -> Result<Option<Transaction>, AssembleError> {
        let proto = |what: String| AssembleError::Protocol { lsn, what };
        if self.reloaded_at.is_some_and(|at| at != lsn) {
            // Past the message that was fed again after a type reload.
            self.reloaded_at = None;
        }
        match msg {
            LogicalMessage::Begin(b) => {
                if self.current.is_some() {
                    return Err(proto("Begin inside an open transaction".into()));
                }
                self.current = Some(Builder {
                    xid: b.xid,
                    ..Builder::default()
                });
            }
            LogicalMessage::Commit(c) => {
                let b = self
                    .current
                    .take()
                    .ok_or_else(|| proto("Commit without Begin".into()))?;
                let meta = TxnMeta {
                    xid: b.xid,
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_time: c.commit_time,
                };
                return self.finish(b, meta).map(Some);
            }
            LogicalMessage::StreamStart(s) => {
                if self.in_stream.is_some() {
                    return Err(proto("Stream Start inside a stream block".into()));
                }
                self.in_stream = Some(s.xid);
                self.streams.entry(s.xid).or_insert_with(|| Builder {
                    xid: s.xid,
                    ..Builder::default()
                });
            }
            LogicalMessage::StreamStop => {
                if self.in_stream.take().is_none() {
                    return Err(proto("Stream Stop outside a stream block".into()));
                }
            }
            LogicalMessage::StreamCommit(c) => {
                let b = self.streams.remove(&c.xid).ok_or_else(|| {
                    proto(format!("Stream Commit for unknown transaction {}", c.xid))
                })?;
                let meta = TxnMeta {
                    xid: c.xid,
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_time: c.commit_time,
                };
                return self.finish(b, meta).map(Some);
            }
            LogicalMessage::StreamAbort(a) => self.on_stream_abort(&a),
            LogicalMessage::Relation(r) => self.on_relation(&r),
            LogicalMessage::Insert(i) if self.skipped.contains(&i.relation_oid) => {}
            LogicalMessage::Update(u) if self.skipped.contains(&u.relation_oid) => {}
            LogicalMessage::Delete(d) if self.skipped.contains(&d.relation_oid) => {}
            LogicalMessage::Insert(i) => {
                let rel = self.relation(i.relation_oid, lsn)?;
                let after = self.row(&rel, &i.new, lsn)?;
                self.push(lsn, i.xid, rel, Op::Insert, None, Some(after))?;
            }
            LogicalMessage::Update(u) => {
                let rel = self.relation(u.relation_oid, lsn)?;
                let before = match &u.old {
                    Some(old) => Some(self.old_row(&rel, old, lsn)?),
                    None => None,
                };
                let after = self.row(&rel, &u.new, lsn)?;
                self.push(lsn, u.xid, rel, Op::Update, before, Some(after))?;
            }
            LogicalMessage::Delete(d) => {
                let rel = self.relation(d.relation_oid, lsn)?;
                let before = self.old_row(&rel, &d.old, lsn)?;
                self.push(lsn, d.xid, rel, Op::Delete, Some(before), None)?;
            }
            LogicalMessage::Truncate(t) => {
                for oid in &t.relation_oids {
                    if self.skipped.contains(oid) {
                        continue;
                    }
                    let rel = self.relation(*oid, lsn)?;
                    self.push(lsn, t.xid, rel, Op::Truncate, None, None)?;
                }
            }
            LogicalMessage::Message(m)
                if m.is_transactional() && &m.prefix[..] == REPLACED_PREFIX.as_bytes() =>
            {
                self.on_replaced(lsn, m.xid, &m.content)?;
            }
            LogicalMessage::Message(m)
                if m.is_transactional() && &m.prefix[..] == DDL_PREFIX.as_bytes() =>
            {
                self.on_ddl(lsn, &m)?;
            }
            LogicalMessage::Message(m) => self.on_message(lsn, &m)?,
            LogicalMessage::Origin(_) | LogicalMessage::Type(_) => {}
            LogicalMessage::BeginPrepare(_)
            | LogicalMessage::Prepare(_)
            | LogicalMessage::CommitPrepared(_)
            | LogicalMessage::RollbackPrepared(_)
            | LogicalMessage::StreamPrepare(_) => {
                return Err(proto(
                    "two-phase message received, but two_phase decoding was not requested".into(),
                ));
            }
        }
        Ok(None)
    }

    /// A streamed (sub)transaction aborted: drop it, or its subtransaction's changes.
    fn on_stream_abort(&mut self, a: &pgoutput::StreamAbort) {
        if a.xid == a.subxid {
            if let Some(b) = self.streams.remove(&a.xid) {
                self.mem_used -= b.mem;
                // Dropping the builder deletes its spill file.
            }
        } else if let Some(b) = self.streams.get_mut(&a.xid) {
            b.aborted.push(a.subxid);
            let before = b.mem;
            b.changes.retain(|c| c.xid != a.subxid);
            b.mem = b.changes.iter().map(Change::mem_size).sum();
            self.mem_used -= before - b.mem;
        }
    }

    /// A Relation message: (re)describe the relation under its routed name,
    /// or remember to skip its changes.
    fn on_relation(&mut self, r: &pgoutput::Relation) {
        let schema = String::from_utf8_lossy(&r.namespace).into_owned();
        let table = String::from_utf8_lossy(&r.name).into_owned();
        let cols = r
            .columns
            .iter()
            .map(|c| {
                (
                    String::from_utf8_lossy(&c.name).into_owned(),
                    c.type_oid,
                    c.is_key(),
                )
            })
            .collect();
        let (schema, table) = match self.routes.on_relation(r.oid, &schema, &table) {
            Route::To { schema, table } => (schema, table),
            Route::Skip => {
                self.relations.remove(&r.oid);
                self.skipped.insert(r.oid);
                return;
            }
        };
        self.skipped.remove(&r.oid);
        let types = r.columns.iter().map(|c| {
            (
                c.type_modifier,
                self.types.name(c.type_oid, c.type_modifier),
            )
        });
        let info =
            RelationInfo::new(r.oid, schema, table, r.replica_identity, cols).with_types(types);
        self.relations.insert(r.oid, Arc::new(info));
    }

    /// A logical decoding message: transactional ones travel with their transaction.
    fn on_message(&mut self, lsn: Lsn, m: &pgoutput::Message) -> Result<(), AssembleError> {
        if m.is_transactional() {
            let msg = EventMessage {
                lsn: m.lsn,
                prefix: String::from_utf8_lossy(&m.prefix).into_owned(),
                content: Bytes::copy_from_slice(&m.content),
            };
            self.builder(lsn)?.messages.push(msg);
        }
        Ok(())
    }

    /// A message of the DDL event trigger (`sql/capture_ddl.sql`): kept,
    /// as `{"tag","statement","tables"}`, when it names a configured table
    /// (`tables`: their configured names); dropped otherwise.
    fn on_ddl(&mut self, lsn: Lsn, m: &pgoutput::Message) -> Result<(), AssembleError> {
        #[derive(serde::Deserialize)]
        struct Object {
            #[serde(default)]
            oid: u32,
            #[serde(default)]
            schema: Option<String>,
            #[serde(default)]
            name: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Ddl {
            tag: String,
            #[serde(default)]
            statement: Option<String>,
            #[serde(default)]
            objects: Vec<Object>,
        }
        let Ok(d) = serde_json::from_slice::<Ddl>(&m.content) else {
            return self.on_message(lsn, m);
        };
        let mut tables: Vec<String> = Vec::new();
        for o in &d.objects {
            let (Some(schema), Some(name)) = (&o.schema, &o.name) else {
                continue;
            };
            if let Some(t) = self.routes.configured_name(o.oid, schema, name) {
                if !tables.contains(&t) {
                    tables.push(t);
                }
            }
        }
        if tables.is_empty() {
            return Ok(());
        }
        let content = serde_json::json!({"tag": d.tag, "statement": d.statement, "tables": tables});
        let msg = EventMessage {
            lsn: m.lsn,
            prefix: DDL_PREFIX.to_string(),
            content: Bytes::from(content.to_string()),
        };
        self.builder(lsn)?.messages.push(msg);
        Ok(())
    }

    /// A configured table was replaced by a new relation (see
    /// [`super::routes`]): its old rows are cleared here, in WAL order.
    fn on_replaced(
        &mut self,
        lsn: Lsn,
        xid: Option<u32>,
        content: &[u8],
    ) -> Result<(), AssembleError> {
        #[derive(serde::Deserialize)]
        struct Replaced {
            schema: String,
            table: String,
            oid: u32,
        }
        let Ok(r) = serde_json::from_slice::<Replaced>(content) else {
            // Not ours to understand: a message like any other.
            return Ok(());
        };
        let Some(old) = self.routes.replaced(r.oid, &r.schema, &r.table) else {
            return Ok(());
        };
        let rel = old
            .and_then(|o| self.relations.get(&o).cloned())
            .unwrap_or_else(|| {
                Arc::new(RelationInfo::new(
                    r.oid,
                    r.schema,
                    r.table,
                    b'd',
                    Vec::new(),
                ))
            });
        self.push(lsn, xid, rel, Op::Truncate, None, None)
    }

    fn relation(&self, oid: u32, lsn: Lsn) -> Result<Arc<RelationInfo>, AssembleError> {
        self.relations
            .get(&oid)
            .cloned()
            .ok_or_else(|| AssembleError::Protocol {
                lsn,
                what: format!("change for relation {oid} before its Relation message"),
            })
    }

    fn builder(&mut self, lsn: Lsn) -> Result<&mut Builder, AssembleError> {
        let b = match self.in_stream {
            Some(xid) => self.streams.get_mut(&xid),
            None => self.current.as_mut(),
        };
        b.ok_or(AssembleError::Protocol {
            lsn,
            what: "change outside a transaction".into(),
        })
    }

    fn push(
        &mut self,
        lsn: Lsn,
        xid: Option<u32>,
        rel: Arc<RelationInfo>,
        op: Op,
        before: Option<(BeforeKind, Row)>,
        after: Option<Row>,
    ) -> Result<(), AssembleError> {
        if op != Op::Truncate && self.routes.take_truncate_first(rel.oid) {
            // The relation replaced a dropped one of the same name.
            self.push(lsn, xid, rel.clone(), Op::Truncate, None, None)?;
        }
        let b = self.builder(lsn)?;
        let change = Change {
            op,
            rel,
            lsn,
            xid: xid.unwrap_or(b.xid),
            before,
            after,
        };
        if let Some(w) = b.spill.as_mut() {
            w.append(&change)?;
            return Ok(());
        }
        let size = change.mem_size();
        b.mem += size;
        b.changes.push(change);
        self.mem_used += size;
        if self.mem_used > self.mem_limit {
            self.spill_largest()?;
        }
        Ok(())
    }

    /// Moves the in-memory changes of the largest open transaction to disk.
    fn spill_largest(&mut self) -> Result<(), AssembleError> {
        let largest = self
            .current
            .iter_mut()
            .chain(self.streams.values_mut())
            .filter(|b| b.spill.is_none())
            .max_by_key(|b| b.mem);
        let Some(b) = largest else { return Ok(()) };
        let mut w = SpillWriter::create(&self.spill_dir, b.xid)?;
        for c in &b.changes {
            w.append(c)?;
        }
        b.changes = Vec::new();
        b.spill = Some(w);
        self.mem_used -= b.mem;
        b.mem = 0;
        self.spilled_txns += 1;
        Ok(())
    }

    fn finish(&mut self, b: Builder, meta: TxnMeta) -> Result<Transaction, AssembleError> {
        self.mem_used -= b.mem;
        let mut b = b;
        let changes = match b.spill.take() {
            Some(w) => Changes::Spilled {
                reader: w.finish()?,
                tail: std::mem::take(&mut b.changes),
            },
            None => Changes::Memory(std::mem::take(&mut b.changes)),
        };
        Ok(Transaction {
            messages: std::mem::take(&mut b.messages),
            aborted_subxids: std::mem::take(&mut b.aborted),
            mem_bytes: b.mem,
            ..Transaction::new(meta, changes)
        })
    }

    fn old_row(
        &self,
        rel: &RelationInfo,
        old: &OldTuple<'_>,
        lsn: Lsn,
    ) -> Result<(BeforeKind, Row), AssembleError> {
        Ok(match old {
            OldTuple::Key(t) => (BeforeKind::Key, self.row(rel, t, lsn)?),
            OldTuple::Full(t) => (BeforeKind::Full, self.row(rel, t, lsn)?),
        })
    }

    /// Renders a tuple into a row image, each value as `to_jsonb()` would.
    fn row(&self, rel: &RelationInfo, t: &TupleData<'_>, lsn: Lsn) -> Result<Row, AssembleError> {
        if t.len() != rel.columns.len() {
            return Err(AssembleError::Protocol {
                lsn,
                what: format!(
                    "tuple of {} columns for {} which has {}",
                    t.len(),
                    rel.qualified,
                    rel.columns.len()
                ),
            });
        }
        let mut row = Row {
            // The wire bytes (values plus 5 bytes of framing per column)
            // are a close upper bound of the rendered JSON for most rows.
            buf: Vec::with_capacity(t.raw().len() + 4 * t.len()),
            cells: Vec::with_capacity(t.len()),
        };
        for (col, v) in rel.columns.iter().zip(t.iter()) {
            let cell = match v {
                TupleValue::Null => Cell::Null,
                TupleValue::Unchanged => Cell::Unchanged,
                TupleValue::Text(text) => {
                    let start = row.buf.len();
                    if value::render(&self.types, col.type_oid, text, &mut row.buf).is_err() {
                        if !self.types.is_builtin(col.type_oid) && self.reloaded_at != Some(lsn) {
                            return Err(AssembleError::StaleType {
                                lsn,
                                type_oid: col.type_oid,
                            });
                        }
                        crate::json_write::write_json_string(text, &mut row.buf);
                    }
                    Cell::Value {
                        start: start as u32,
                        end: row.buf.len() as u32,
                    }
                }
                TupleValue::Binary(bin) => {
                    let start = row.buf.len();
                    // EXPERIMENT: exact for the few types `binary` decodes;
                    // any other type keeps its raw bytes as hex (see there).
                    if super::binary::render(&self.types, col.type_oid, bin, &mut row.buf).is_ok() {
                        row.cells.push(Cell::Value {
                            start: start as u32,
                            end: row.buf.len() as u32,
                        });
                        continue;
                    }
                    let mut hex = String::with_capacity(2 + bin.len() * 2);
                    hex.push_str("\\x");
                    for b in bin {
                        hex.push_str(&format!("{b:02x}"));
                    }
                    crate::json_write::write_json_string(hex.as_bytes(), &mut row.buf);
                    Cell::Value {
                        start: start as u32,
                        end: row.buf.len() as u32,
                    }
                }
            };
            row.cells.push(cell);
        }
        Ok(row)
    }
}
