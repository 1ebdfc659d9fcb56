use std::sync::Arc;

use super::*;
use crate::event::RelationInfo;

fn rel(schema: &str, table: &str) -> Arc<RelationInfo> {
    Arc::new(RelationInfo::new(
        16384,
        schema.into(),
        table.into(),
        b'd',
        vec![("id".into(), 23, true), ("name".into(), 25, false)],
    ))
}

fn change(op: Op, before: Option<(BeforeKind, Row)>, after: Option<Row>, lsn: u64) -> Change {
    Change {
        op,
        rel: rel("public", "items"),
        lsn: Lsn(lsn),
        xid: 700,
        before,
        after,
    }
}

fn txn(commit: u64, changes: Vec<Change>) -> Transaction {
    crate::event::fixtures::txn(700, commit, commit + 8, changes)
}

fn owner() -> StreamOwner {
    StreamOwner {
        system_identifier: "1".into(),
        database: "shop".into(),
        slot: "pgferry".into(),
    }
}

fn encoder(format: Format, tombstones: bool) -> Encoder {
    Encoder::new(
        EncoderOptions {
            format,
            dest: "pgferry.{schema}.{table}".into(),
            overrides: BTreeMap::new(),
            tables: TableFilter::new(None),
            tombstones,
            sink: "events".into(),
            valid_char: route::kafka_topic_char,
        },
        owner(),
    )
}

/// (dest, key, value as JSON or None, position index)
type Out = (String, Option<String>, Option<serde_json::Value>, u64);

fn records(enc: &mut Encoder, t: &Transaction) -> Vec<Out> {
    let mut out = Vec::new();
    enc.encode(t, |r| {
        assert_eq!(r.position.commit_lsn, t.meta.commit_lsn);
        out.push((
            r.dest.to_string(),
            r.key.map(|k| String::from_utf8(k.to_vec()).unwrap()),
            r.value.map(|v| serde_json::from_slice(v).unwrap()),
            r.position.index,
        ));
        Ok(())
    })
    .unwrap();
    out
}

fn row(id: &str, name: &str) -> Row {
    Row::from_values(&[Some(id), Some(name)])
}

#[test]
fn a_key_change_is_a_delete_of_the_old_key_a_tombstone_and_an_insert() {
    let t = txn(
        0x100,
        vec![change(
            Op::Update,
            Some((BeforeKind::Key, Row::from_values(&[Some("1"), None]))),
            Some(row("2", "\"b\"")),
            0x90,
        )],
    );
    let out = records(&mut encoder(Format::Pgferry, true), &t);
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(out[0].1.as_deref(), Some("{\"id\":1}"));
    assert_eq!(out[0].2.as_ref().unwrap()["op"], "delete");
    assert_eq!(out[1].1.as_deref(), Some("{\"id\":1}"));
    assert_eq!(out[1].2, None, "the tombstone has no value");
    assert_eq!(out[2].1.as_deref(), Some("{\"id\":2}"));
    assert_eq!(out[2].2.as_ref().unwrap()["op"], "insert");
    assert_eq!(out[2].2.as_ref().unwrap()["after"]["name"], "b");
    assert_eq!(
        out.iter().map(|o| o.3).collect::<Vec<_>>(),
        vec![0, 1, 2],
        "indexes count records"
    );
    assert!(out.iter().all(|o| o.0 == "pgferry.public.items"));
}

#[test]
fn an_update_that_keeps_its_key_is_one_record() {
    let t = txn(
        0x100,
        vec![change(Op::Update, None, Some(row("1", "\"b\"")), 0x90)],
    );
    let out = records(&mut encoder(Format::Pgferry, true), &t);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].2.as_ref().unwrap()["op"], "update");
}

#[test]
fn a_full_old_image_moves_the_key_only_when_a_key_column_changed() {
    let full = |id: &str, name: &str| Some((BeforeKind::Full, row(id, name)));
    // REPLICA IDENTITY FULL: the whole old row comes with every update.
    let same = change(
        Op::Update,
        full("1", "\"a\""),
        Some(row("1", "\"b\"")),
        0x90,
    );
    assert!(moved_key(&same).is_none());
    let moved = change(
        Op::Update,
        full("1", "\"a\""),
        Some(row("2", "\"a\"")),
        0x90,
    );
    let (kind, old) = moved_key(&moved).expect("the key changed");
    assert_eq!((kind, old.json(0)), (BeforeKind::Full, Some(&b"1"[..])));
    // NULL against a value in a key column is a change; NULL against NULL is not.
    let nulls = |a: Option<&str>, b: Option<&str>| {
        change(
            Op::Update,
            Some((BeforeKind::Full, Row::from_values(&[a, Some("\"x\"")]))),
            Some(Row::from_values(&[b, Some("\"y\"")])),
            0x90,
        )
    };
    assert!(moved_key(&nulls(None, Some("1"))).is_some());
    assert!(moved_key(&nulls(None, None)).is_none());
    // Not an update, or no key columns: never a move.
    let mut del = moved.clone();
    del.op = Op::Delete;
    assert!(moved_key(&del).is_none());
}

#[test]
fn headers_carry_the_change_and_its_transaction() {
    let t = txn(
        0x1_0000_0100,
        vec![
            change(Op::Insert, None, Some(row("1", "\"a\"")), 0x90),
            change(
                Op::Delete,
                Some((BeforeKind::Key, row("1", "null"))),
                None,
                0xA0,
            ),
        ],
    );
    let mut seen = Vec::new();
    encoder(Format::Pgferry, false)
        .encode(&t, |r| {
            seen.push(r.headers.pairs().map(|(k, v)| format!("{k}={v}")).join(" "));
            Ok(())
        })
        .unwrap();
    assert_eq!(
        seen,
        [
            "lsn=0/90 commit_lsn=1/100 xid=700 op=insert table=public.items",
            "lsn=0/A0 commit_lsn=1/100 xid=700 op=delete table=public.items",
        ]
    );
}

#[test]
fn pgferry_values_are_the_jsonl_lines() {
    let c = change(Op::Insert, None, Some(row("1", "\"a\"")), 0x90);
    let t = txn(0x100, vec![c.clone()]);
    let mut line = Vec::new();
    c.write_json(&t.meta, &mut line);
    let mut got = Vec::new();
    encoder(Format::Pgferry, false)
        .encode(&t, |r| {
            got.push(r.value.unwrap().to_vec());
            Ok(())
        })
        .unwrap();
    assert_eq!(got, vec![line]);
}

#[test]
fn debezium_envelope_has_before_after_source_and_op() {
    let t = txn(
        0x100,
        vec![
            change(Op::Insert, None, Some(row("1", "\"a\"")), 0x90),
            change(
                Op::Delete,
                Some((BeforeKind::Key, Row::from_values(&[Some("1"), None]))),
                None,
                0x98,
            ),
            Change {
                op: Op::Truncate,
                before: None,
                after: None,
                ..change(Op::Insert, None, None, 0xA0)
            },
        ],
    );
    let out = records(&mut encoder(Format::Debezium, true), &t);
    assert_eq!(out.len(), 4, "insert, delete, tombstone, truncate: {out:?}");
    let c = out[0].2.as_ref().unwrap();
    assert_eq!(c["op"], "c");
    assert_eq!(c["before"], serde_json::Value::Null);
    assert_eq!(c["after"], serde_json::json!({"id": 1, "name": "a"}));
    let src = &c["source"];
    assert_eq!(src["connector"], "postgresql");
    assert_eq!(src["db"], "shop");
    assert_eq!(src["schema"], "public");
    assert_eq!(src["table"], "items");
    assert_eq!(src["txId"], 700);
    assert_eq!(src["lsn"], 0x90);
    assert_eq!(src["snapshot"], "false");
    assert_eq!(src["ts_ms"], 946_684_800_000i64);
    assert_eq!(src["sequence"], format!("[\"{}\",\"{}\"]", 0x100, 0x90));
    assert!(c["ts_ms"].as_i64().unwrap() > 1_700_000_000_000);
    assert_eq!(out[0].1.as_deref(), Some("{\"id\":1}"));
    let d = out[1].2.as_ref().unwrap();
    assert_eq!(d["op"], "d");
    assert_eq!(d["before"], serde_json::json!({"id": 1}));
    assert_eq!(d["after"], serde_json::Value::Null);
    assert_eq!(out[2].2, None);
    assert_eq!(out[3].1, None, "a truncate has no key");
    assert_eq!(out[3].2.as_ref().unwrap()["op"], "t");
}

#[test]
fn snapshot_rows_are_debezium_reads() {
    let t = txn(
        0x100,
        vec![change(Op::Read, None, Some(row("1", "\"a\"")), 0x90)],
    );
    let out = records(&mut encoder(Format::Debezium, false), &t);
    let v = out[0].2.as_ref().unwrap();
    assert_eq!(v["op"], "r");
    assert_eq!(v["source"]["snapshot"], "true");
}

#[test]
fn unchanged_toast_is_left_out_never_a_placeholder() {
    let mut after = Row::from_values(&[Some("1")]);
    after.cells.push(crate::event::Cell::Unchanged);
    let t = txn(0x100, vec![change(Op::Update, None, Some(after), 0x90)]);
    for format in [Format::Pgferry, Format::Debezium] {
        let out = records(&mut encoder(format, false), &t);
        let after = &out[0].2.as_ref().unwrap()["after"];
        assert_eq!(after, &serde_json::json!({"id": 1}), "{format:?}");
    }
}

#[test]
fn destinations_follow_the_template_overrides_and_the_transport_rules() {
    let mut overrides = BTreeMap::new();
    overrides.insert("public.items".to_string(), "items".to_string());
    let r = Router::new("cdc.{schema}.{table}", overrides, route::nats_subject_char);
    assert_eq!(r.compute("public", "items", "public.items"), "items");
    assert_eq!(
        r.compute("my schema", "a.b>", "my schema.a.b>"),
        "cdc.my_schema.a_b_"
    );
    assert!(route::check_kafka_topic("pgferry.public.items").is_ok());
    assert!(route::check_kafka_topic("bad topic").is_err());
    assert!(route::check_nats_subject("a..b").is_err());
    assert!(route::check_nats_subject("a.*").is_err());
    assert!(route::check_template("pgferry.{schema}.{table}", route::check_nats_subject).is_ok());
}

#[test]
fn a_filtered_table_makes_no_records() {
    let mut enc = encoder(Format::Pgferry, false);
    enc.opts.tables = TableFilter::new(Some(vec!["public.other".into()]));
    let t = txn(
        0x100,
        vec![change(Op::Insert, None, Some(row("1", "\"a\"")), 0x90)],
    );
    assert!(records(&mut enc, &t).is_empty());
}

#[test]
fn positions_round_trip_as_text() {
    let p = Position {
        commit_lsn: Lsn(0x16_B374_D848),
        index: 7,
    };
    assert_eq!(p.to_text(), "16/B374D848:7");
    assert_eq!(Position::parse(&p.to_text()), Some(p));
    assert_eq!(Position::parse("nope"), None);
}
