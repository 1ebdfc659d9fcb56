//! Reading rows back from the source database, for a sink that must
//! complete a change it cannot complete from its own store.
//!
//! An update that leaves a TOASTed value unchanged does not carry that
//! value. A sink that keeps whole rows (the search sink's documents) fills
//! it in from what it stored before; when that is gone (a key change whose
//! old document was deleted, an index deleted by hand, a row older than the
//! sink), the only complete copy of the row is in Postgres.
//!
//! The sink layer defines this trait and the session implements it (over an
//! ordinary SQL connection), so a sink needs nothing of the session to use
//! it. The rows read are the *current* rows, which can be newer than the
//! change being applied: a sink may write them only under a version that
//! later changes of the row override (the search sink's external versions
//! do), and must take "no such row" to mean that a later change, still to
//! come in the stream, deleted the row or changed its key.

use serde_json::{Map, Value};

/// Which rows to read: those of `schema.table` whose `key_columns` equal
/// one of `keys` (values as `to_jsonb` renders them, one per key column).
pub struct RowQuery<'a> {
    pub schema: &'a str,
    pub table: &'a str,
    pub key_columns: &'a [String],
    pub keys: &'a [Vec<Value>],
    /// Transactions whose effects the read must see: the changes being
    /// completed. A transaction is sent to the stream once its commit record
    /// is written, which can be a moment before other sessions see it.
    pub xids: &'a [u32],
}

/// Why rows could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RowError {
    /// Worth retrying: the connection failed, the server is restarting, a
    /// transaction is not visible yet.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help for this table (no privilege to read it, the
    /// table or a key column is gone): the sink must do without.
    #[error("{0}")]
    Refused(String),
}

/// A row as it is now.
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentRow {
    /// The row as `to_jsonb(row)` gives it (rendered with the replication
    /// connection's settings).
    pub values: Map<String, Value>,
    /// The transaction that wrote this version of the row (its `xmin`).
    /// Equal to the xid of the change being completed, the row is exactly
    /// as that transaction left it; otherwise a later transaction changed it
    /// (or put another row under the key), or the change was made in a
    /// subtransaction.
    pub xmin: u32,
}

/// Reads current rows by key.
#[async_trait::async_trait]
pub trait RowSource: Send + Sync {
    /// One entry per key, in order: the row, or `None` when no row has that
    /// key.
    async fn fetch(&self, q: &RowQuery<'_>) -> Result<Vec<Option<CurrentRow>>, RowError>;
}
