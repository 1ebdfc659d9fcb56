//! One row change and its JSON form: [`Op`], [`RelationInfo`], [`Row`],
//! [`Cell`], [`Change`], [`TxnMeta`], and the writers of a change's JSON line.
//!
//! This is the part of the event format that spill files store, so it sits
//! below the `spill` module, which sits below [`Transaction`](super::Transaction)
//! (whose changes may be spilled). Everything here is re-exported by
//! [`crate::event`].

use std::sync::Arc;

use crate::json_write::{civil_from_days, write_json_string};
use crate::lsn::Lsn;

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A row loaded by a snapshot or backfill (`after` only). It carries the
    /// row as of its transaction's position in the stream.
    Read,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
            Op::Read => "read",
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            Op::Insert => 0,
            Op::Update => 1,
            Op::Delete => 2,
            Op::Truncate => 3,
            Op::Read => 4,
        }
    }

    pub fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            0 => Op::Insert,
            1 => Op::Update,
            2 => Op::Delete,
            3 => Op::Truncate,
            4 => Op::Read,
            _ => return None,
        })
    }
}

/// A column of a source table.
#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub name: String,
    pub type_oid: u32,
    /// The type modifier (`atttypmod`: `numeric(p,s)`, `varchar(n)`), or -1
    /// when unknown (rows of a snapshot) or none.
    pub type_mod: i32,
    /// Part of the event `key`.
    pub is_key: bool,
    /// The column name as a JSON string, quotes included, ready to write.
    pub json_name: Box<str>,
    /// The type as `format_type()` names it (`integer`, `numeric(10,2)`),
    /// when the catalog was asked; only `op:"schema"` events show it.
    pub type_name: Option<Box<str>>,
}

/// A source table as described by the latest Relation message.
#[derive(Debug, Clone)]
pub struct RelationInfo {
    pub oid: u32,
    pub schema: String,
    pub table: String,
    /// `schema.table`, for routing.
    pub qualified: String,
    pub replica_identity: u8,
    pub columns: Vec<ColumnInfo>,
    /// `"schema":"…","table":"…"` with JSON escaping, ready to write.
    pub json_ident: Box<str>,
    /// `,"schema_version":"…"`, ready to write: see [`schema_version`].
    json_version: Box<str>,
}

impl RelationInfo {
    /// Builds the relation and its pre-escaped JSON fragments. `key` holds the
    /// indexes of the key columns.
    pub fn new(
        oid: u32,
        schema: String,
        table: String,
        replica_identity: u8,
        columns: Vec<(String, u32, bool)>,
    ) -> RelationInfo {
        let mut ident = Vec::new();
        ident.extend_from_slice(b"\"schema\":");
        write_json_string(schema.as_bytes(), &mut ident);
        ident.extend_from_slice(b",\"table\":");
        write_json_string(table.as_bytes(), &mut ident);
        let columns = columns
            .into_iter()
            .map(|(name, type_oid, is_key)| {
                let mut j = Vec::new();
                write_json_string(name.as_bytes(), &mut j);
                ColumnInfo {
                    json_name: String::from_utf8_lossy(&j).into(),
                    name,
                    type_oid,
                    type_mod: -1,
                    is_key,
                    type_name: None,
                }
            })
            .collect();
        let mut rel = RelationInfo {
            oid,
            qualified: format!("{schema}.{table}"),
            schema,
            table,
            replica_identity,
            columns,
            json_ident: String::from_utf8_lossy(&ident).into(),
            json_version: Box::default(),
        };
        rel.seal();
        rel
    }

    /// Sets the columns' type modifiers (and, when known, type names) and
    /// computes the schema version again.
    pub fn with_types(mut self, types: impl IntoIterator<Item = (i32, Option<Box<str>>)>) -> Self {
        for (col, (type_mod, name)) in self.columns.iter_mut().zip(types) {
            col.type_mod = type_mod;
            col.type_name = name;
        }
        self.seal();
        self
    }

    /// Computes the schema version from the columns as they are now.
    fn seal(&mut self) {
        let v = schema_version(&self.columns);
        self.json_version = format!(",\"schema_version\":\"{v}\"").into();
    }

    /// A short, stable fingerprint of the columns: see [`schema_version`].
    pub fn schema_version(&self) -> &str {
        let s = &self.json_version;
        s.get(19..s.len().saturating_sub(1)).unwrap_or_default()
    }
}

/// The schema version of a relation with `columns`: the first 8 bytes of
/// the SHA-256 of a canonical encoding of each column's name, type OID,
/// type modifier and key flag, in column order, as 16 lower-case hex
/// digits. It depends on nothing else (not the table's name, not the
/// process, not the machine), so the same columns give the same version
/// across restarts and hosts. Type OIDs of built-in types are fixed; a user
/// type's OID is its identity within one database (a dump restored
/// elsewhere gives its columns other versions).
pub fn schema_version(columns: &[ColumnInfo]) -> String {
    let mut enc = Vec::with_capacity(32 + columns.len() * 24);
    enc.extend_from_slice(b"pgferry schema v1\0");
    enc.extend_from_slice(&(columns.len() as u32).to_be_bytes());
    for c in columns {
        enc.extend_from_slice(&(c.name.len() as u32).to_be_bytes());
        enc.extend_from_slice(c.name.as_bytes());
        enc.extend_from_slice(&c.type_oid.to_be_bytes());
        enc.extend_from_slice(&c.type_mod.to_be_bytes());
        enc.push(c.is_key as u8);
    }
    let d = ring::digest::digest(&ring::digest::SHA256, &enc);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// One column value of a row image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// SQL NULL (or, in a key-only old tuple, a column that was not sent).
    Null,
    /// A TOASTed value that did not change and was not sent.
    Unchanged,
    /// JSON text at `buf[start..end]` of the row.
    Value { start: u32, end: u32 },
}

/// A row image: the rendered JSON of each value, concatenated, and one cell per column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub buf: Vec<u8>,
    pub cells: Vec<Cell>,
}

impl Row {
    /// The JSON text of column `i`, or `None` for NULL / unchanged / out of range.
    pub fn json(&self, i: usize) -> Option<&[u8]> {
        match self.cells.get(i)? {
            Cell::Value { start, end } => self.buf.get(*start as usize..*end as usize),
            _ => None,
        }
    }

    /// The value of column `i` as text: a JSON string's content, or the JSON
    /// text of any other value (`42`, `true`, `{"a": 1}`). `None` for NULL,
    /// unchanged or out of range.
    pub fn text(&self, i: usize) -> Option<std::borrow::Cow<'_, str>> {
        let json = self.json(i)?;
        if json.first() == Some(&b'"') {
            if !json.contains(&b'\\') {
                return std::str::from_utf8(json.get(1..json.len() - 1)?)
                    .ok()
                    .map(std::borrow::Cow::Borrowed);
            }
            return serde_json::from_slice::<String>(json)
                .ok()
                .map(std::borrow::Cow::Owned);
        }
        std::str::from_utf8(json)
            .ok()
            .map(std::borrow::Cow::Borrowed)
    }

    pub fn cell(&self, i: usize) -> Cell {
        self.cells.get(i).copied().unwrap_or(Cell::Null)
    }

    /// Appends a column holding `json` (one rendered JSON value).
    pub fn push_value(&mut self, json: &[u8]) {
        let start = self.buf.len() as u32;
        self.buf.extend_from_slice(json);
        self.cells.push(Cell::Value {
            start,
            end: self.buf.len() as u32,
        });
    }

    /// A row from rendered JSON values; `None` is SQL NULL.
    pub fn from_values(values: &[Option<&str>]) -> Row {
        let mut r = Row::default();
        for v in values {
            match v {
                Some(json) => r.push_value(json.as_bytes()),
                None => r.cells.push(Cell::Null),
            }
        }
        r
    }

    /// Bytes held, for memory accounting.
    pub fn mem_size(&self) -> usize {
        self.buf.len() + self.cells.len() * std::mem::size_of::<Cell>()
    }
}

/// The old row image sent with an update or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeforeKind {
    /// Only the replica identity columns (`K`).
    Key,
    /// The whole old row (`O`, REPLICA IDENTITY FULL).
    Full,
}

/// One row change (or one truncated table).
#[derive(Debug, Clone)]
pub struct Change {
    pub op: Op,
    pub rel: Arc<RelationInfo>,
    /// The LSN of the change's own WAL record.
    pub lsn: Lsn,
    /// The (sub)transaction that made the change; used to drop aborted subtransactions.
    pub xid: u32,
    pub before: Option<(BeforeKind, Row)>,
    pub after: Option<Row>,
}

impl Change {
    /// Approximate bytes held, for memory accounting.
    pub fn mem_size(&self) -> usize {
        std::mem::size_of::<Change>()
            + self.before.as_ref().map_or(0, |(_, r)| r.mem_size())
            + self.after.as_ref().map_or(0, |r| r.mem_size())
    }

    /// The row that holds the key: the new row for insert and update, the old one for delete.
    pub fn key_row(&self) -> Option<&Row> {
        match self.op {
            Op::Insert | Op::Update | Op::Read => self.after.as_ref(),
            Op::Delete => self.before.as_ref().map(|(_, r)| r),
            Op::Truncate => None,
        }
    }

    /// The JSON object of the key columns, e.g. `{"id":1}`; `null` for truncate.
    pub fn write_key(&self, out: &mut Vec<u8>) {
        let Some(row) = self.key_row() else {
            out.extend_from_slice(b"null");
            return;
        };
        write_object(&self.rel, row, |_, col| col.is_key, out);
    }

    /// Writes one JSON line (without the newline) for this change.
    pub fn write_json(&self, txn: &TxnMeta, out: &mut Vec<u8>) {
        self.write_json_with(&txn.json_tail(), out);
    }

    /// [`Change::write_json`] with the transaction's fields already
    /// rendered by [`TxnMeta::json_tail`] (once per transaction, not per change).
    pub fn write_json_with(&self, txn_tail: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"op\":\"");
        out.extend_from_slice(self.op.as_str().as_bytes());
        out.extend_from_slice(b"\",");
        out.extend_from_slice(self.rel.json_ident.as_bytes());
        out.extend_from_slice(self.rel.json_version.as_bytes());
        out.extend_from_slice(b",\"key\":");
        self.write_key(out);
        out.extend_from_slice(b",\"before\":");
        match &self.before {
            Some((kind, row)) => write_row(&self.rel, row, *kind == BeforeKind::Key, out),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"after\":");
        match &self.after {
            Some(row) => {
                write_row(&self.rel, row, false, out);
                if row.cells.contains(&Cell::Unchanged) {
                    out.extend_from_slice(b",\"unchanged\":[");
                    let mut first = true;
                    for (i, c) in row.cells.iter().enumerate() {
                        if *c == Cell::Unchanged {
                            if !first {
                                out.push(b',');
                            }
                            first = false;
                            if let Some(col) = self.rel.columns.get(i) {
                                out.extend_from_slice(col.json_name.as_bytes());
                            }
                        }
                    }
                    out.push(b']');
                }
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"lsn\":\"");
        write_lsn(self.lsn, out);
        out.extend_from_slice(txn_tail);
    }
}

/// Writes a row image as a JSON object; unchanged cells are left out. With
/// `key_only`, only key columns are written (a `K` old tuple).
pub fn write_row(rel: &RelationInfo, row: &Row, key_only: bool, out: &mut Vec<u8>) {
    write_object(rel, row, |_, col| !key_only || col.is_key, out);
}

/// Writes the columns of `row` for which `keep(index, column)` holds as a
/// JSON object; unchanged (unsent TOAST) cells are always left out, NULLs are
/// written as `null`.
pub fn write_object(
    rel: &RelationInfo,
    row: &Row,
    keep: impl Fn(usize, &ColumnInfo) -> bool,
    out: &mut Vec<u8>,
) {
    out.push(b'{');
    let mut first = true;
    for (i, col) in rel.columns.iter().enumerate() {
        if !keep(i, col) || row.cell(i) == Cell::Unchanged {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(col.json_name.as_bytes());
        out.push(b':');
        out.extend_from_slice(row.json(i).unwrap_or(b"null"));
    }
    out.push(b'}');
}

/// `X/Y` in upper-case hex, as Postgres prints an LSN.
pub(crate) fn write_lsn(lsn: Lsn, out: &mut Vec<u8>) {
    fn hex(v: u32, out: &mut Vec<u8>) {
        const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
        let n = (8 - v.leading_zeros() as usize / 4).max(1);
        for i in (0..n).rev() {
            out.push(DIGITS[((v >> (i * 4)) & 0xF) as usize]);
        }
    }
    hex((lsn.0 >> 32) as u32, out);
    out.push(b'/');
    hex(lsn.0 as u32, out);
}

/// Microseconds since 2000-01-01 UTC → RFC 3339 (`2024-05-01T12:00:00.123456Z`).
pub fn write_pg_timestamp(micros: i64, out: &mut Vec<u8>) {
    use std::io::Write;
    // 2000-01-01 is 10957 days after 1970-01-01.
    let unix_micros = micros as i128 + 946_684_800_000_000i128;
    let secs = unix_micros.div_euclid(1_000_000) as i64;
    let frac = unix_micros.rem_euclid(1_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    );
    if frac != 0 {
        let _ = write!(out, ".{frac:06}");
    }
    out.push(b'Z');
}

/// What every change of a transaction shares.
#[derive(Debug, Clone, Copy)]
pub struct TxnMeta {
    pub xid: u32,
    /// LSN of the commit record. Commit order is `commit_lsn` order.
    pub commit_lsn: Lsn,
    /// End of the commit record: where decoding resumes after this transaction,
    /// and the position checkpointed once it is applied.
    pub end_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

impl TxnMeta {
    /// The end of a change's JSON line that every change of the transaction
    /// shares: `","commit_lsn":"…","xid":…,"commit_time":"…"}`.
    pub fn json_tail(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.extend_from_slice(b"\",\"commit_lsn\":\"");
        write_lsn(self.commit_lsn, &mut out);
        out.extend_from_slice(b"\",\"xid\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.xid).as_bytes());
        out.extend_from_slice(b",\"commit_time\":\"");
        write_pg_timestamp(self.commit_time, &mut out);
        out.extend_from_slice(b"\"}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_are_written_like_postgres() {
        for (v, want) in [
            (0u64, "0/0"),
            (0x1_0000_00A0, "1/A0"),
            (0x16_B374_D848, "16/B374D848"),
            (u64::MAX, "FFFFFFFF/FFFFFFFF"),
        ] {
            let mut out = Vec::new();
            write_lsn(Lsn(v), &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), want);
            assert_eq!(Lsn(v).to_string(), want);
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let mut out = Vec::new();
        write_pg_timestamp(0, &mut out);
        assert_eq!(out, b"2000-01-01T00:00:00Z");
        out.clear();
        // 2024-02-29 13:14:15.000123
        let micros = ((8825i64 * 86_400) + 13 * 3600 + 14 * 60 + 15) * 1_000_000 + 123;
        write_pg_timestamp(micros, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2024-02-29T13:14:15.000123Z"
        );
    }
}
