//! Debezium's PostgreSQL change-event envelope, as Debezium's JSON converter
//! writes it with `schemas.enable=false`: the value is the payload object
//! itself, `{"before","after","source","op","ts_ms","ts_us","transaction"}`,
//! and the key is the replica-identity columns as a plain object.
//!
//! Invariants (and where pgferry differs from Debezium's defaults, which
//! `docs/kafka-sink.md` lists for users):
//! - column values are pgferry's `to_jsonb()` text, never Debezium's
//!   encodings (numeric as a JSON number, not base64 bytes; timestamps as
//!   ISO 8601 text, not epoch micros; arrays, json and ranges as Postgres
//!   renders them);
//! - an unchanged TOAST column is left out of `after`, never given
//!   Debezium's `__debezium_unavailable_value` placeholder;
//! - `op` is `c`, `u`, `d`, `r` (snapshot or backfill rows) or `t`;
//!   `source.snapshot` is `"true"` on `r` events and `"false"` otherwise;
//! - `source.lsn` is the change's LSN and `source.txId` its transaction id, as
//!   numbers; `source.sequence` is `["<commit lsn>","<lsn>"]` in decimal;
//!   `source.ts_ms` is the commit time, the top-level `ts_ms` the time pgferry
//!   wrote the event.

use crate::event::{write_object, write_row, BeforeKind, Change, Op, TxnMeta};
use crate::json_write::write_json_string;
use crate::sink::StreamOwner;

/// Debezium's one-letter operation.
pub fn op_letter(op: Op) -> &'static str {
    match op {
        Op::Insert => "c",
        Op::Update => "u",
        Op::Delete => "d",
        Op::Read => "r",
        Op::Truncate => "t",
    }
}

/// The key object, as Debezium's key (`{"id":1}`).
pub fn write_key(c: &Change, out: &mut Vec<u8>) {
    match c.key_row() {
        Some(row) => write_object(&c.rel, row, |_, col| col.is_key, out),
        None => out.extend_from_slice(b"null"),
    }
}

/// The value: the envelope's payload.
pub fn write_value(c: &Change, meta: &TxnMeta, owner: &StreamOwner, sink: &str, out: &mut Vec<u8>) {
    let mut ints = itoa::Buffer::new();
    out.extend_from_slice(b"{\"before\":");
    match &c.before {
        Some((kind, row)) => write_row(&c.rel, row, *kind == BeforeKind::Key, out),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"after\":");
    match &c.after {
        Some(row) => write_row(&c.rel, row, false, out),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"source\":{\"version\":\"pgferry-");
    out.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
    out.extend_from_slice(b"\",\"connector\":\"postgresql\",\"name\":");
    write_json_string(sink.as_bytes(), out);
    let commit_ms = unix_micros(meta.commit_time) / 1000;
    out.extend_from_slice(b",\"ts_ms\":");
    out.extend_from_slice(ints.format(commit_ms).as_bytes());
    out.extend_from_slice(b",\"snapshot\":");
    out.extend_from_slice(if c.op == Op::Read {
        b"\"true\""
    } else {
        b"\"false\""
    });
    out.extend_from_slice(b",\"db\":");
    write_json_string(owner.database.as_bytes(), out);
    out.extend_from_slice(b",\"sequence\":\"[\\\"");
    out.extend_from_slice(ints.format(meta.commit_lsn.0).as_bytes());
    out.extend_from_slice(b"\\\",\\\"");
    out.extend_from_slice(ints.format(c.lsn.0).as_bytes());
    out.extend_from_slice(b"\\\"]\",");
    out.extend_from_slice(c.rel.json_ident.as_bytes());
    out.extend_from_slice(b",\"txId\":");
    out.extend_from_slice(ints.format(meta.xid).as_bytes());
    out.extend_from_slice(b",\"lsn\":");
    out.extend_from_slice(ints.format(c.lsn.0).as_bytes());
    out.extend_from_slice(b",\"xmin\":null},\"op\":\"");
    out.extend_from_slice(op_letter(c.op).as_bytes());
    let now_us = unix_micros(crate::event::pg_now());
    out.extend_from_slice(b"\",\"ts_ms\":");
    out.extend_from_slice(ints.format(now_us / 1000).as_bytes());
    out.extend_from_slice(b",\"ts_us\":");
    out.extend_from_slice(ints.format(now_us).as_bytes());
    out.extend_from_slice(b",\"transaction\":null}");
}

/// Microseconds since 2000-01-01 (Postgres) → since 1970-01-01 (Unix).
fn unix_micros(pg_micros: i64) -> i64 {
    pg_micros + 946_684_800_000_000
}
