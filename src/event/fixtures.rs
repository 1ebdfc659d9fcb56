//! Building blocks for unit tests across the crate: relations, rows and
//! transactions, so that tests of each sink and stage build their input the
//! same way (and a change to the event types is made in one place).

use std::sync::Arc;

use super::{Change, Changes, Op, RelationInfo, Row, Transaction, TxnMeta};
use crate::lsn::Lsn;

/// A relation `schema.table` with columns `(name, type oid, is key)`.
pub fn relation(
    oid: u32,
    schema: &str,
    table: &str,
    cols: &[(&str, u32, bool)],
) -> Arc<RelationInfo> {
    Arc::new(RelationInfo::new(
        oid,
        schema.into(),
        table.into(),
        b'd',
        cols.iter()
            .map(|(n, t, k)| (n.to_string(), *t, *k))
            .collect(),
    ))
}

/// A row of rendered JSON values (`None`: SQL NULL).
pub fn row(values: &[Option<&str>]) -> Row {
    Row::from_values(values)
}

/// An insert of `after` into `rel` at `lsn`.
pub fn insert(rel: &Arc<RelationInfo>, lsn: u64, after: Row) -> Change {
    Change {
        op: Op::Insert,
        rel: rel.clone(),
        lsn: Lsn(lsn),
        xid: 1,
        before: None,
        after: Some(after),
    }
}

/// A committed transaction `xid` whose commit record is at `commit` and ends at `end`.
pub fn txn(xid: u32, commit: u64, end: u64, changes: Vec<Change>) -> Transaction {
    Transaction::new(
        TxnMeta {
            xid,
            commit_lsn: Lsn(commit),
            end_lsn: Lsn(end),
            commit_time: 0,
        },
        Changes::Memory(changes),
    )
}
