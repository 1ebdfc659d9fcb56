//! `op:"schema"` events: what a table's columns are, written before the
//! first change that uses a new set of them.
//!
//! A sink that writes them keeps one [`SchemaTracker`]. It is fed the
//! changes the sink writes, in order, and answers with a schema event when
//! a change's relation has another [`schema_version`](super::schema_version)
//! than the last one written for that table in this process (or none was).
//!
//! Why in the sink and not from the Relation messages: pgoutput sends a
//! Relation message per session (after every reconnect again, before the
//! first change of each table), so "the relation changed" is not a fact of
//! the WAL, and an event derived from it would sit elsewhere (or nowhere) on
//! a replay. Derived from the changes a sink writes, the invariants hold
//! across any crash and replay:
//! - every change is preceded, somewhere before it in the sink's output, by
//!   a schema event of its table with its `schema_version` (the nearest
//!   preceding schema event of that table has it);
//! - after a start (or a failed write) the first change of each table is
//!   preceded by a schema event again, with `previous_version` `null`: a
//!   consumer sees a schema event of a version more than once and treats
//!   them as one, keyed by `(schema, table, schema_version)`.
//!
//! Schema events are not counted in a sink's effectively-once positions
//! (they are derived, not WAL events), so they never shift a change's index.

use std::collections::HashMap;
use std::sync::Arc;

use super::change::{write_lsn, Change, Op, RelationInfo};
use crate::json_write::write_json_string;

/// The schema version last written per table (see the module docs).
#[derive(Default)]
pub struct SchemaTracker {
    /// The relation of the last change seen: most changes share it, so the
    /// per-change cost is one pointer comparison.
    last: Option<Arc<RelationInfo>>,
    written: HashMap<String, Box<str>>,
}

impl SchemaTracker {
    /// Forgets every version written (after a failed write: the output may
    /// not hold what was noted).
    pub fn reset(&mut self) {
        *self = SchemaTracker::default();
    }

    /// When `c` uses another schema version of its table than the one last
    /// written, appends the schema event's JSON line (with its newline) to
    /// `out` and notes the version. `txn_tail` is the transaction's
    /// [`TxnMeta::json_tail`](super::TxnMeta::json_tail). Truncates carry
    /// no columns and never give a schema event.
    pub fn write_if_new(&mut self, c: &Change, txn_tail: &[u8], out: &mut Vec<u8>) -> bool {
        if c.op == Op::Truncate || self.last.as_ref().is_some_and(|r| Arc::ptr_eq(r, &c.rel)) {
            return false;
        }
        self.last = Some(c.rel.clone());
        let version = c.rel.schema_version();
        let previous = match self.written.get(&c.rel.qualified) {
            Some(v) if &**v == version => return false,
            other => other.cloned(),
        };
        write_schema_event(&c.rel, previous.as_deref(), c, txn_tail, out);
        out.push(b'\n');
        self.written
            .insert(c.rel.qualified.clone(), version.to_string().into());
        true
    }
}

/// One `op:"schema"` line (without the newline): the table, its version,
/// its columns (`name`, `type`, `type_oid`, `type_mod`, `key`), the version
/// before it (or `null`), and the position of the change `c` it precedes.
pub fn write_schema_event(
    rel: &RelationInfo,
    previous: Option<&str>,
    c: &Change,
    txn_tail: &[u8],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"{\"op\":\"schema\",");
    out.extend_from_slice(rel.json_ident.as_bytes());
    out.extend_from_slice(b",\"schema_version\":\"");
    out.extend_from_slice(rel.schema_version().as_bytes());
    out.extend_from_slice(b"\",\"columns\":[");
    for (i, col) in rel.columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"name\":");
        out.extend_from_slice(col.json_name.as_bytes());
        out.extend_from_slice(b",\"type\":");
        match &col.type_name {
            Some(name) => write_json_string(name.as_bytes(), out),
            None => write_json_string(col.type_oid.to_string().as_bytes(), out),
        }
        out.extend_from_slice(b",\"type_oid\":");
        out.extend_from_slice(itoa::Buffer::new().format(col.type_oid).as_bytes());
        out.extend_from_slice(b",\"type_mod\":");
        out.extend_from_slice(itoa::Buffer::new().format(col.type_mod).as_bytes());
        out.extend_from_slice(if col.is_key {
            b",\"key\":true}"
        } else {
            b",\"key\":false}"
        });
    }
    out.extend_from_slice(b"],\"previous_version\":");
    match previous {
        Some(p) => write_json_string(p.as_bytes(), out),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"lsn\":\"");
    write_lsn(c.lsn, out);
    out.extend_from_slice(txn_tail);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::fixtures::{insert, relation, row};
    use crate::event::TxnMeta;

    fn meta() -> TxnMeta {
        TxnMeta {
            xid: 7,
            commit_lsn: crate::lsn::Lsn(0x200),
            end_lsn: crate::lsn::Lsn(0x208),
            commit_time: 0,
        }
    }

    #[test]
    fn the_version_is_a_fixed_function_of_the_columns() {
        let a = relation(1, "public", "t", &[("id", 23, true), ("v", 25, false)]);
        // Another table, another oid, same columns: same version; and a
        // golden value, so a change of the encoding (or a randomized hash)
        // cannot go unnoticed.
        let b = relation(9, "s", "u", &[("id", 23, true), ("v", 25, false)]);
        assert_eq!(a.schema_version(), b.schema_version());
        // Checked with Python's hashlib over the same encoding.
        assert_eq!(a.schema_version(), "74e9bc1eb2cbf7c0");
        assert_eq!(a.schema_version().len(), 16);
        // Each part counts: name, type, key flag, type modifier, order.
        for other in [
            relation(1, "public", "t", &[("id", 23, true), ("w", 25, false)]),
            relation(1, "public", "t", &[("id", 20, true), ("v", 25, false)]),
            relation(1, "public", "t", &[("id", 23, false), ("v", 25, false)]),
            relation(1, "public", "t", &[("v", 25, false), ("id", 23, true)]),
            relation(1, "public", "t", &[("id", 23, true)]),
        ] {
            assert_ne!(other.schema_version(), a.schema_version());
        }
        let m = (*a)
            .clone()
            .with_types([(-1, None), (14, Some("varchar(10)".into()))]);
        assert_ne!(m.schema_version(), a.schema_version());
    }

    #[test]
    fn a_schema_event_precedes_the_first_change_of_each_version() {
        let tail = meta().json_tail();
        let v1 = relation(1, "public", "t", &[("id", 23, true)]);
        let v1_again = relation(1, "public", "t", &[("id", 23, true)]);
        let v2 = relation(1, "public", "t", &[("id", 23, true), ("c", 25, false)]);
        let mut tr = SchemaTracker::default();
        let mut out = Vec::new();
        let ins = |r: &Arc<RelationInfo>, lsn| insert(r, lsn, row(&[Some("1"), Some("\"x\"")]));
        assert!(tr.write_if_new(&ins(&v1, 0x100), &tail, &mut out));
        assert!(!tr.write_if_new(&ins(&v1, 0x101), &tail, &mut out));
        // A Relation message after a reconnect: a new Arc, same columns.
        assert!(!tr.write_if_new(&ins(&v1_again, 0x102), &tail, &mut out));
        assert!(tr.write_if_new(&ins(&v2, 0x103), &tail, &mut out));
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["op"], "schema");
        assert_eq!(lines[0]["previous_version"], serde_json::Value::Null);
        assert_eq!(lines[0]["lsn"], "0/100");
        assert_eq!(lines[0]["commit_lsn"], "0/200");
        assert_eq!(lines[1]["previous_version"], v1.schema_version());
        assert_eq!(lines[1]["schema_version"], v2.schema_version());
        assert_eq!(
            lines[1]["columns"],
            serde_json::json!([
                {"name": "id", "type": "23", "type_oid": 23, "type_mod": -1, "key": true},
                {"name": "c", "type": "25", "type_oid": 25, "type_mod": -1, "key": false}
            ])
        );
        // After a reset (a start, a failed write) it is announced again.
        tr.reset();
        let mut out = Vec::new();
        assert!(tr.write_if_new(&ins(&v2, 0x104), &tail, &mut out));
    }
}
