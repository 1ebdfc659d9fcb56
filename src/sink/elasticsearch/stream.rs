//! The changes of a batch's transactions, in WAL order, as the sink reads
//! them.
//!
//! Invariants:
//! - Changes of aborted subtransactions are left out; the order is the
//!   order of the WAL, the same on every read of the same transaction (the
//!   sink counts changes to resume a batch, see `retry.rs`).
//! - A spilled transaction is never held in memory: it is read on a
//!   blocking thread and handed over through a small channel; dropping the
//!   stream stops the reader.

use std::borrow::Cow;
use std::sync::Arc;

use crate::event::{Change, Changes, Transaction};

/// The changes of a transaction, in WAL order, without holding a spilled
/// transaction in memory: spilled changes are read on a blocking thread and
/// handed over through a small channel.
pub(super) enum ChangeStream<'a> {
    Mem {
        it: std::slice::Iter<'a, Change>,
        aborted: &'a [u32],
    },
    Spilled(tokio::sync::mpsc::Receiver<std::io::Result<Change>>),
}

impl<'a> ChangeStream<'a> {
    pub fn new(txn: &'a Arc<Transaction>) -> ChangeStream<'a> {
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

    pub async fn next(&mut self) -> Option<std::io::Result<Cow<'a, Change>>> {
        match self {
            ChangeStream::Mem { it, aborted } => it
                .find(|c| !aborted.contains(&c.xid))
                .map(|c| Ok(Cow::Borrowed(c))),
            ChangeStream::Spilled(rx) => rx.recv().await.map(|r| r.map(Cow::Owned)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Op, RelationInfo, Row, TxnMeta};

    #[tokio::test]
    async fn spilled_changes_stream_in_order_without_aborted_subtransactions() {
        let dir = tempfile::tempdir().unwrap();
        let rel = Arc::new(RelationInfo::new(
            7,
            "public".into(),
            "docs".into(),
            b'd',
            vec![("id".into(), 23, true)],
        ));
        let change = |i: u64, xid: u32| Change {
            op: Op::Insert,
            rel: rel.clone(),
            lsn: crate::lsn::Lsn(i),
            xid,
            before: None,
            after: Some(Row::from_values(&[Some(&i.to_string())])),
        };
        let mut w = crate::spill::SpillWriter::create(dir.path(), 1).unwrap();
        for i in 0..600 {
            w.append(&change(i, if i % 7 == 0 { 2 } else { 1 }))
                .unwrap();
        }
        let txn = Arc::new(Transaction {
            aborted_subxids: vec![2],
            ..Transaction::new(
                TxnMeta {
                    xid: 1,
                    commit_lsn: crate::lsn::Lsn(1000),
                    end_lsn: crate::lsn::Lsn(1001),
                    commit_time: 0,
                },
                Changes::Spilled {
                    reader: w.finish().unwrap(),
                    tail: (600..610).map(|i| change(i, 1)).collect(),
                },
            )
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
}
