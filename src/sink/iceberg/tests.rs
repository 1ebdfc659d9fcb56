//! The sink against a real sqlite catalog and Parquet files in a temp dir.

use std::sync::Arc;

use iceberg::Catalog;

use super::*;
use crate::event::{BeforeKind, Changes, Row, TxnMeta};
use crate::lsn::Lsn;
use crate::sink::Sink;

fn rel() -> Arc<RelationInfo> {
    let mut r = RelationInfo::new(
        16384,
        "public".into(),
        "items".into(),
        b'd',
        vec![
            ("id".into(), 23, true),
            ("amount".into(), 1700, false),
            ("tags".into(), 1009, false),
            ("doc".into(), 25, false),
        ],
    );
    r.columns[1].type_mod = (10 << 16 | 2) + 4;
    Arc::new(r)
}

fn change(
    rel: &Arc<RelationInfo>,
    op: Op,
    before: Option<Row>,
    after: Option<Row>,
    lsn: u64,
) -> Change {
    Change {
        op,
        rel: rel.clone(),
        lsn: Lsn(lsn),
        xid: 700,
        before: before.map(|r| (BeforeKind::Key, r)),
        after,
    }
}

fn txn(commit: u64, changes: Vec<Change>) -> Arc<Transaction> {
    Arc::new(Transaction {
        meta: TxnMeta {
            xid: 700,
            commit_lsn: Lsn(commit),
            end_lsn: Lsn(commit + 8),
            commit_time: 0,
        },
        changes: Changes::Memory(changes),
        messages: Vec::new(),
        aborted_subxids: Vec::new(),
        mem_bytes: 0,
        _budget: None,
    })
}

fn config(dir: &std::path::Path) -> IcebergConfig {
    let text = format!("name = \"lake\"\nwarehouse = \"{}\"\n", dir.display());
    toml::from_str(&text).unwrap()
}

/// The current snapshot's position and total record count.
async fn state(sink: &IcebergSink) -> (Option<String>, Option<String>) {
    let ident = TableIdent::new(NamespaceIdent::new("pgferry".into()), "public_items".into());
    let t = sink.catalog.load_table(&ident).await.unwrap();
    let snap = t.metadata().current_snapshot().unwrap();
    let props = &snap.summary().additional_properties;
    (
        props.get("pgferry.position").cloned(),
        props.get("total-records").cloned(),
    )
}

#[tokio::test]
async fn replays_add_nothing_and_a_key_change_is_a_delete_and_an_insert() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let r = rel();
    let row = |id: &str| {
        Row::from_values(&[Some(id), Some("12.50"), Some("[\"a\",null]"), Some("\"x\"")])
    };
    let batch = vec![
        txn(
            1000,
            vec![
                change(&r, Op::Insert, None, Some(row("1")), 900),
                change(&r, Op::Insert, None, Some(row("2")), 910),
            ],
        ),
        // id 2 -> 3: a delete of 2 and an insert of 3.
        txn(
            2000,
            vec![change(
                &r,
                Op::Update,
                Some(Row::from_values(&[Some("2"), None, None, None])),
                Some(row("3")),
                1900,
            )],
        ),
    ];
    let mut sink = IcebergSink::open(&cfg).await.unwrap();
    sink.apply(&batch).await.unwrap();
    sink.flush().await.unwrap();
    assert_eq!(
        state(&sink).await,
        (Some("0/7D0:1".into()), Some("4".into()))
    );

    // After a restart the same batch, and one more transaction, come again.
    drop(sink);
    let mut sink = IcebergSink::open(&cfg).await.unwrap();
    let mut again = batch.clone();
    again.push(txn(
        3000,
        vec![change(
            &r,
            Op::Delete,
            Some(Row::from_values(&[Some("1"), None, None, None])),
            None,
            2900,
        )],
    ));
    sink.apply(&again).await.unwrap();
    sink.apply(&again).await.unwrap();
    sink.flush().await.unwrap();
    sink.flush().await.unwrap();
    assert_eq!(
        state(&sink).await,
        (Some("0/BB8:0".into()), Some("5".into()))
    );

    // A second writer (a stale copy of the sink) is refused, not interleaved.
    let mut other = IcebergSink::open(&cfg).await.unwrap();
    other
        .apply(&[txn(
            5000,
            vec![change(&r, Op::Insert, None, Some(row("5")), 4900)],
        )])
        .await
        .unwrap();
    sink.apply(&[txn(
        4000,
        vec![change(&r, Op::Insert, None, Some(row("4")), 3900)],
    )])
    .await
    .unwrap();
    sink.flush().await.unwrap();
    match other.flush().await {
        Err(SinkError::Fatal { message: m, .. }) => assert!(m.contains("another writer"), "{m}"),
        other => panic!("a second writer committed: {other:?}"),
    }
}

#[tokio::test]
async fn a_value_the_column_cannot_hold_stops_the_sink_with_the_column_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = IcebergSink::open(&config(dir.path())).await.unwrap();
    let r = rel();
    let bad = Row::from_values(&[Some("1"), Some("\"NaN\""), None, None]);
    sink.apply(&[txn(
        1000,
        vec![change(&r, Op::Insert, None, Some(bad), 900)],
    )])
    .await
    .unwrap();
    match sink.flush().await {
        Err(SinkError::Fatal { message: m, .. }) => {
            assert!(m.contains("amount") && m.contains("NaN"), "{m}")
        }
        other => panic!("{other:?}"),
    }
}
