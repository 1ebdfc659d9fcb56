//! The event log: what the log sinks (Kafka, NATS JetStream) publish, built
//! once for both. A transport only moves the [`Record`]s this module makes.
//!
//! For each committed transaction, [`Encoder::encode`] calls back with its
//! records in WAL order. A record has a destination (a Kafka topic or a NATS
//! subject, from a `{schema}`/`{table}` template or a per-table override), a
//! key (the replica identity columns as JSON, `{"id":1}`; none for a
//! truncate), a value (the event in the chosen [`Format`]; none for a
//! tombstone), headers, and a [`Position`].
//!
//! Invariants:
//! - Positions increase strictly in the order records are produced:
//!   `(commit_lsn, index)`, where `index` counts the records of one
//!   transaction from 0. A transport that stores the position of the last
//!   record it published can therefore skip, after a restart, every record at
//!   or before it; the records after it come out as before (Debezium's
//!   processing-time `ts_ms` aside).
//! - A change that moves a row to a new key becomes a delete of the old key
//!   (plus a tombstone when asked) and an insert of the new one, so a
//!   key-partitioned log never keeps the old key alive.
//! - Values are the exact `to_jsonb()` text the decoder rendered; nothing is
//!   re-encoded. Unchanged TOAST columns are left out, never a placeholder.
//! - Snapshot and backfill rows come as `read` events (Debezium `r`), in the
//!   order the pipeline hands them over.

pub mod debezium;
pub mod route;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::event::{BeforeKind, Cell, Change, Op, Row, Transaction, TxnMeta};
use crate::lsn::Lsn;
use crate::sink::{SinkError, StreamOwner, TableFilter};

pub use route::Router;

/// How a record's value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The change event as one JSONL line of the `jsonl` sink.
    #[default]
    Pgferry,
    /// Debezium's PostgreSQL envelope, as its JSON converter writes it with
    /// `schemas.enable=false` (see [`debezium`]).
    Debezium,
}

/// Where a record sits in the stream: the commit LSN of its transaction and
/// its index among the records this encoder made for that transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub index: u64,
}

impl Position {
    /// `X/Y:index`, the form stored in logs and message ids.
    pub fn to_text(self) -> String {
        format!("{}:{}", self.commit_lsn, self.index)
    }

    /// Parses [`Position::to_text`]'s form.
    pub fn parse(s: &str) -> Option<Position> {
        let (lsn, index) = s.rsplit_once(':')?;
        Some(Position {
            commit_lsn: lsn.parse().ok()?,
            index: index.parse().ok()?,
        })
    }
}

/// The headers every record carries (Kafka headers, NATS headers).
#[derive(Debug, Clone, Copy)]
pub struct Headers<'a> {
    /// The change's own LSN (`X/Y`).
    pub lsn: &'a str,
    /// The commit LSN of its transaction (`X/Y`).
    pub commit_lsn: &'a str,
    /// The transaction id, in decimal.
    pub xid: &'a str,
    /// `insert`, `update`, `delete`, `truncate` or `read`.
    pub op: &'static str,
    /// `schema.table`.
    pub table: &'a str,
}

impl<'a> Headers<'a> {
    /// `(name, value)` pairs, in a fixed order.
    pub fn pairs(&self) -> [(&'static str, &'a str); 5] {
        [
            ("lsn", self.lsn),
            ("commit_lsn", self.commit_lsn),
            ("xid", self.xid),
            ("op", self.op),
            ("table", self.table),
        ]
    }
}

/// What every record of one transaction shares, rendered once.
struct TxnText {
    commit_lsn: String,
    xid: String,
    /// [`TxnMeta::json_tail`] (pgferry format; empty for Debezium).
    tail: Vec<u8>,
}

/// One record to publish. Borrowed from the encoder's buffers: a transport
/// copies what it keeps.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// The topic or subject.
    pub dest: &'a str,
    /// The key as JSON; `None` for a truncate.
    pub key: Option<&'a [u8]>,
    /// The event; `None` for a tombstone.
    pub value: Option<&'a [u8]>,
    pub headers: Headers<'a>,
    pub position: Position,
}

/// What an [`Encoder`] makes of the change stream.
#[derive(Debug, Clone)]
pub struct EncoderOptions {
    pub format: Format,
    /// The destination template: `{schema}` and `{table}` are replaced.
    pub dest: String,
    /// Destinations by `schema.table`, over the template.
    pub overrides: BTreeMap<String, String>,
    /// The tables published.
    pub tables: TableFilter,
    /// A record with no value after each delete (compacted Kafka topics).
    pub tombstones: bool,
    /// The sink's name (Debezium's `source.name`).
    pub sink: String,
    /// Which characters a destination may hold; others become `_`.
    pub valid_char: fn(char) -> bool,
}

/// Turns transactions into records. Holds reusable buffers and the routes of
/// the relations seen so far.
pub struct Encoder {
    opts: EncoderOptions,
    router: Router,
    owner: StreamOwner,
    key: Vec<u8>,
    value: Vec<u8>,
    /// The current change's LSN as text.
    lsn: String,
}

impl Encoder {
    pub fn new(opts: EncoderOptions, owner: StreamOwner) -> Encoder {
        let router = Router::new(&opts.dest, opts.overrides.clone(), opts.valid_char);
        Encoder {
            opts,
            router,
            owner,
            key: Vec::with_capacity(256),
            value: Vec::with_capacity(4096),
            lsn: String::with_capacity(24),
        }
    }

    /// The options this encoder was built with.
    pub fn options(&self) -> &EncoderOptions {
        &self.opts
    }

    /// Calls `emit` with each record of `txn`, in order. Stops at the first
    /// error `emit` returns (a spill file read error is transient).
    pub fn encode(
        &mut self,
        txn: &Transaction,
        mut emit: impl FnMut(&Record<'_>) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        let mut index = 0u64;
        let mut failed = None;
        let text = TxnText {
            commit_lsn: txn.meta.commit_lsn.to_string(),
            xid: txn.meta.xid.to_string(),
            tail: match self.opts.format {
                Format::Pgferry => txn.meta.json_tail(),
                Format::Debezium => Vec::new(),
            },
        };
        let read = txn.for_each_change(|c| {
            if !self.opts.tables.accepts(&c.rel.qualified) {
                return Ok(());
            }
            if let Err(e) = self.encode_change(&txn.meta, &text, c, &mut index, &mut emit) {
                failed = Some(e);
                return Err(std::io::Error::other("stopped"));
            }
            Ok(())
        });
        match (failed, read) {
            (Some(e), _) => Err(e),
            (None, Err(e)) => Err(SinkError::transient(format!(
                "reading the spilled changes of transaction {} back: {e}",
                txn.meta.xid
            ))),
            (None, Ok(())) => Ok(()),
        }
    }

    /// The records of one change: a key change splits into delete + insert.
    fn encode_change(
        &mut self,
        meta: &TxnMeta,
        text: &TxnText,
        c: &Change,
        index: &mut u64,
        emit: &mut impl FnMut(&Record<'_>) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        if let Some(old) = moved_key(c) {
            let delete = Change {
                op: Op::Delete,
                before: Some(old),
                after: None,
                ..c.clone()
            };
            self.one(meta, text, &delete, index, emit)?;
            let insert = Change {
                op: Op::Insert,
                before: None,
                ..c.clone()
            };
            return self.one(meta, text, &insert, index, emit);
        }
        self.one(meta, text, c, index, emit)
    }

    /// The record of one change, and its tombstone after a delete.
    fn one(
        &mut self,
        meta: &TxnMeta,
        text: &TxnText,
        c: &Change,
        index: &mut u64,
        emit: &mut impl FnMut(&Record<'_>) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        self.key.clear();
        self.value.clear();
        let has_key = c.op != Op::Truncate;
        match self.opts.format {
            Format::Pgferry => {
                if has_key {
                    c.write_key(&mut self.key);
                }
                c.write_json_with(&text.tail, &mut self.value);
            }
            Format::Debezium => {
                if has_key {
                    debezium::write_key(c, &mut self.key);
                }
                debezium::write_value(c, meta, &self.owner, &self.opts.sink, &mut self.value);
            }
        }
        self.lsn.clear();
        {
            use std::fmt::Write;
            let _ = write!(self.lsn, "{}", c.lsn);
        }
        let dest = self.router.dest(&c.rel);
        let headers = Headers {
            lsn: &self.lsn,
            commit_lsn: &text.commit_lsn,
            xid: &text.xid,
            op: c.op.as_str(),
            table: &c.rel.qualified,
        };
        let mut record = Record {
            dest,
            key: has_key.then_some(self.key.as_slice()),
            value: Some(self.value.as_slice()),
            headers,
            position: Position {
                commit_lsn: meta.commit_lsn,
                index: *index,
            },
        };
        *index += 1;
        emit(&record)?;
        if c.op == Op::Delete && self.opts.tombstones {
            record.value = None;
            record.position.index = *index;
            *index += 1;
            emit(&record)?;
        }
        Ok(())
    }
}

/// The old key of an update that changed its row's key (or `None`): the
/// server sends the old key columns (`K`) only when they changed, and the
/// whole old row (`O`, REPLICA IDENTITY FULL) always, so the latter is
/// compared column by column. Compares the key columns' JSON text in place
/// (what [`crate::event::write_object`] would render for each side; an
/// unchanged TOAST cell is left out of both), without rendering the keys.
pub(crate) fn moved_key(c: &Change) -> Option<(BeforeKind, Row)> {
    if c.op != Op::Update {
        return None;
    }
    let (kind, old) = c.before.as_ref()?;
    let new = c.after.as_ref()?;
    let mut keys = c
        .rel
        .columns
        .iter()
        .enumerate()
        .filter(|(_, col)| col.is_key)
        .peekable();
    keys.peek()?;
    fn shown(row: &Row, i: usize) -> Option<Option<&[u8]>> {
        (row.cell(i) != Cell::Unchanged).then(|| row.json(i))
    }
    if keys.all(|(i, _)| shown(old, i) == shown(new, i)) {
        return None;
    }
    Some((*kind, old.clone()))
}

#[cfg(test)]
mod tests;
