//! Change events: pgferry's public output format.
//!
//! A [`Transaction`] is one committed source transaction; its [`Change`]s are
//! in WAL order. Column values are stored already rendered as JSON text (equal
//! to what Postgres's `to_jsonb()` gives), in one buffer per row image, so a
//! sink that writes JSON copies bytes and never re-encodes.
//!
//! The JSON form of one change (one JSONL line) has these fixed fields:
//! `op`, `schema`, `table`, `schema_version`, `key`, `before`, `after`,
//! `unchanged` (omitted when empty), `lsn`, `commit_lsn`, `xid`, `commit_time`.
//! `schema_version` is computed once per Relation message
//! ([`change::schema_version`]); sinks that announce schemas write
//! `op:"schema"` events through a [`schema::SchemaTracker`].
//!
//! Invariants:
//! - a `Row`'s cells index the relation's columns one to one;
//! - a cell is `Unchanged` only for a TOASTed value the server did not send;
//!   such a column is absent from the rendered object, never `null`;
//! - changes of a transaction are visited in WAL order, whether they sit in
//!   memory or in a spill file.

pub mod change;
#[cfg(test)]
pub mod fixtures;
pub mod schema;

pub use change::*;
pub use schema::SchemaTracker;

use crate::lsn::Lsn;
use crate::spill::SpillReader;

/// A transactional logical decoding message (`pg_logical_emit_message(true, …)`).
#[derive(Debug, Clone)]
pub struct LogicalMessage {
    pub lsn: Lsn,
    pub prefix: String,
    pub content: bytes::Bytes,
}

/// The changes of a committed transaction: in memory, or partly spilled to disk.
#[derive(Debug)]
pub enum Changes {
    Memory(Vec<Change>),
    /// The first part sits in a spill file, the rest (`tail`) in memory.
    Spilled {
        reader: SpillReader,
        tail: Vec<Change>,
    },
}

/// One committed transaction, shared (through `Arc`) by every sink.
#[derive(Debug)]
pub struct Transaction {
    pub meta: TxnMeta,
    pub changes: Changes,
    /// Transactional logical messages, in WAL order.
    pub messages: Vec<LogicalMessage>,
    /// Subtransactions that aborted: their changes are skipped when reading.
    pub aborted_subxids: Vec<u32>,
    /// Bytes of rendered changes held in memory (spilled ones do not count).
    pub mem_bytes: usize,
    /// Bytes of memory the transaction holds; released to the pipeline's
    /// memory budget when the last sink drops it.
    pub(crate) _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Transaction {
    /// A transaction of `changes` with no logical messages, no aborted
    /// subtransactions and no memory budget held (snapshot copies, tests).
    pub fn new(meta: TxnMeta, changes: Changes) -> Transaction {
        Transaction {
            meta,
            changes,
            messages: Vec::new(),
            aborted_subxids: Vec::new(),
            mem_bytes: 0,
            _budget: None,
        }
    }

    /// Visits every change in WAL order. Spilled changes are read back from
    /// disk in a streaming fashion, so memory stays bounded.
    pub fn for_each_change(
        &self,
        mut f: impl FnMut(&Change) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let keep = |c: &Change| !self.aborted_subxids.contains(&c.xid);
        match &self.changes {
            Changes::Memory(v) => {
                for c in v.iter().filter(|c| keep(c)) {
                    f(c)?;
                }
            }
            Changes::Spilled { reader, tail } => {
                reader.for_each(|c| if keep(&c) { f(&c) } else { Ok(()) })?;
                for c in tail.iter().filter(|c| keep(c)) {
                    f(c)?;
                }
            }
        }
        Ok(())
    }

    /// True when the transaction holds no row change.
    pub fn is_empty(&self) -> bool {
        match &self.changes {
            Changes::Memory(v) => v.is_empty(),
            Changes::Spilled { .. } => false,
        }
    }
}

/// Microseconds since 2000-01-01 UTC, the replication protocol's clock.
pub fn pg_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    unix.as_micros() as i64 - 946_684_800_000_000
}
