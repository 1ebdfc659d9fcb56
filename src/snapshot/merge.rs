//! The stream side of a chunk: what happens between its two watermarks.
//! Pure logic over events, no I/O (the caller awaits the chunk's rows).
//!
//! A chunk is read after its low watermark committed and before its high
//! watermark is emitted, so its rows show the table somewhere inside that
//! window. The stream delivers every transaction that committed inside the
//! window before the high watermark. When the high watermark arrives, the
//! chunk's rows go out as read events in that transaction, so they must
//! show the table *as of the high watermark*. A [`Window`] gets there by
//! replaying onto the chunk, in commit order, every change the window's
//! transactions made to the chunk's rows:
//!
//! - delete → the row leaves the chunk (the stream already deleted it);
//! - insert/update of a row in the chunk → its sent columns replace the
//!   chunk's values; columns the server did not send (unchanged TOAST) keep
//!   the chunk's value, which is right because nothing in the window
//!   changed them;
//! - key change → the row moves to its new key;
//! - truncate → the chunk is emptied;
//! - a row the chunk does not hold → nothing: the stream delivers it.
//!
//! Replaying a change the chunk already reflects is harmless: every column
//! ends at the value of the last change that sent it. So the result is
//! exact whatever moment inside the window the read saw, and unlike a plain
//! DBLog "drop the rows the stream touched", a row updated in the window
//! keeps its unsent TOAST values: the read event is always a whole row.

use std::collections::HashMap;
use std::sync::Arc;

use super::copy::key_of_opt;
use crate::event::{Cell, Change, Op, RelationInfo, Row};

/// A chunk between its watermarks.
pub struct Window {
    pub id: String,
    /// The table's OID (stream changes are matched on it).
    pub oid: u32,
    /// The chunk's columns (the read events use this relation).
    pub rel: Arc<RelationInfo>,
    /// Key columns by name, in key order.
    key_names: Vec<String>,
    key_cols: Vec<usize>,
    rows: Vec<Option<Row>>,
    /// Row by key; built when the first change of the table comes (a
    /// window the stream does not touch never hashes its keys).
    index: Option<HashMap<Vec<u8>, usize>>,
    /// Column mapping from a stream relation (by pointer) to chunk columns:
    /// for each chunk column, the stream column index holding it.
    maps: Vec<(Arc<RelationInfo>, ColumnMap)>,
}

/// For each chunk column, and for each key column: the stream column holding it.
type ColumnMap = (Vec<Option<usize>>, Vec<Option<usize>>);

impl Window {
    pub fn new(id: String, rel: Arc<RelationInfo>, key_cols: &[usize], rows: Vec<Row>) -> Self {
        let key_names = key_cols
            .iter()
            .map(|&c| rel.columns[c].name.clone())
            .collect();
        Window {
            id,
            oid: rel.oid,
            rel,
            key_names,
            key_cols: key_cols.to_vec(),
            rows: rows.into_iter().map(Some).collect(),
            index: None,
            maps: Vec::new(),
        }
    }

    fn index(&mut self) -> &mut HashMap<Vec<u8>, usize> {
        let (rows, cols) = (&self.rows, &self.key_cols);
        self.index.get_or_insert_with(|| {
            rows.iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let r = r.as_ref()?;
                    key_of_opt(r, cols.iter().map(|&c| Some(c))).map(|k| (k, i))
                })
                .collect()
        })
    }

    /// Rows currently held.
    pub fn len(&self) -> usize {
        self.rows.iter().filter(|r| r.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (chunk column → stream column, key position → stream column) for a stream relation.
    fn mapping(&mut self, rel: &Arc<RelationInfo>) -> ColumnMap {
        if let Some((_, m)) = self.maps.iter().find(|(r, _)| Arc::ptr_eq(r, rel)) {
            return m.clone();
        }
        let find = |name: &str| rel.columns.iter().position(|c| c.name == name);
        let cols: Vec<Option<usize>> = self.rel.columns.iter().map(|c| find(&c.name)).collect();
        let keys: Vec<Option<usize>> = self.key_names.iter().map(|n| find(n)).collect();
        self.maps.push((rel.clone(), (cols.clone(), keys.clone())));
        (cols, keys)
    }

    /// Replays one committed change of the window onto the chunk.
    pub fn apply(&mut self, c: &Change) {
        // Read events (another chunk's) change nothing in the table.
        if c.rel.oid != self.oid || c.op == Op::Read {
            return;
        }
        if c.op == Op::Truncate {
            self.rows.clear();
            self.index = Some(HashMap::new());
            return;
        }
        let (cols, keys) = self.mapping(&c.rel);
        let old_key = c
            .before
            .as_ref()
            .and_then(|(_, r)| key_of_opt(r, keys.iter().copied()));
        match c.op {
            Op::Delete => {
                if let Some(k) = old_key {
                    self.remove(&k);
                }
            }
            Op::Insert | Op::Update | Op::Read => {
                let Some(after) = &c.after else { return };
                let new_key = key_of_opt(after, keys.iter().copied());
                let Some(new_key) = new_key.or_else(|| old_key.clone()) else {
                    return;
                };
                // The base: the row under its old key (a key change), else under the new one.
                let base = match &old_key {
                    Some(k) if *k != new_key => self.remove(k),
                    _ => None,
                }
                .or_else(|| self.remove(&new_key));
                let Some(base) = base else { return };
                let row = overlay(&base, after, &cols);
                let at = self.rows.len();
                self.index().insert(new_key, at);
                self.rows.push(Some(row));
            }
            Op::Truncate => {}
        }
    }

    fn remove(&mut self, key: &[u8]) -> Option<Row> {
        let i = self.index().remove(key)?;
        self.rows.get_mut(i).and_then(Option::take)
    }

    /// The rows as of the high watermark, in read order (moved rows last).
    pub fn into_rows(self) -> impl Iterator<Item = Row> {
        self.rows.into_iter().flatten()
    }

    /// Read events for the rows, in a transaction at `lsn`.
    pub fn into_changes(
        self,
        rel: Arc<RelationInfo>,
        lsn: crate::lsn::Lsn,
        xid: u32,
    ) -> Vec<Change> {
        self.into_rows()
            .map(|row| Change {
                op: Op::Read,
                rel: rel.clone(),
                lsn,
                xid,
                before: None,
                after: Some(row),
            })
            .collect()
    }
}

/// `base` with the columns `after` sent put over it.
fn overlay(base: &Row, after: &Row, cols: &[Option<usize>]) -> Row {
    let mut row = Row {
        buf: Vec::with_capacity(base.buf.len().max(after.buf.len())),
        cells: Vec::with_capacity(base.cells.len()),
    };
    for (j, m) in cols.iter().enumerate() {
        let from_after = m.map(|i| after.cell(i)).filter(|c| *c != Cell::Unchanged);
        let (src, cell) = match from_after {
            Some(c) => (after, (c, m.unwrap_or(0))),
            None => (base, (base.cell(j), j)),
        };
        match cell.0 {
            Cell::Value { .. } => row.push_value(src.json(cell.1).unwrap_or(b"null")),
            other => row.cells.push(other),
        }
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::BeforeKind;
    use crate::lsn::Lsn;

    fn rel(oid: u32) -> Arc<RelationInfo> {
        Arc::new(RelationInfo::new(
            oid,
            "public".into(),
            "t".into(),
            b'd',
            vec![
                ("id".into(), 20, true),
                ("v".into(), 25, false),
                ("body".into(), 25, false),
            ],
        ))
    }

    fn crow(id: i64, v: &str, body: &str) -> Row {
        Row::from_values(&[
            Some(&id.to_string()),
            Some(&format!("\"{v}\"")),
            Some(&format!("\"{body}\"")),
        ])
    }

    fn change(op: Op, rel: &Arc<RelationInfo>, before: Option<Row>, after: Option<Row>) -> Change {
        Change {
            op,
            rel: rel.clone(),
            lsn: Lsn(1),
            xid: 1,
            before: before.map(|r| (BeforeKind::Key, r)),
            after,
        }
    }

    fn texts(w: Window) -> Vec<String> {
        w.into_rows()
            .map(|r| {
                (0..3)
                    .map(|i| String::from_utf8_lossy(r.json(i).unwrap_or(b"-")).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    #[test]
    fn window_changes_are_replayed_onto_the_chunk() {
        let r = rel(7);
        let mut w = Window::new(
            "c".into(),
            r.clone(),
            &[0],
            vec![
                crow(1, "a", "B1"),
                crow(2, "b", "B2"),
                crow(3, "c", "B3"),
                crow(4, "d", "B4"),
            ],
        );
        // Update with an unchanged body: the chunk keeps its body.
        let mut after = Row::from_values(&[Some("1"), Some("\"a2\""), None]);
        after.cells[2] = Cell::Unchanged;
        w.apply(&change(Op::Update, &r, None, Some(after)));
        // Delete of 2.
        w.apply(&change(
            Op::Delete,
            &r,
            Some(Row::from_values(&[Some("2"), None, None])),
            None,
        ));
        // Key change 3 → 30, body unchanged.
        let mut after = Row::from_values(&[Some("30"), Some("\"c2\""), None]);
        after.cells[2] = Cell::Unchanged;
        w.apply(&change(
            Op::Update,
            &r,
            Some(Row::from_values(&[Some("3"), None, None])),
            Some(after),
        ));
        // Insert of a row the chunk does not hold: left to the stream.
        w.apply(&change(
            Op::Insert,
            &r,
            None,
            Some(Row::from_values(&[Some("9"), Some("\"n\""), Some("\"x\"")])),
        ));
        // Another table: ignored.
        let other = rel(8);
        w.apply(&change(
            Op::Delete,
            &other,
            Some(Row::from_values(&[Some("4"), None, None])),
            None,
        ));
        assert_eq!(
            texts(w),
            vec!["4 \"d\" \"B4\"", "1 \"a2\" \"B1\"", "30 \"c2\" \"B3\""]
        );
    }

    #[test]
    fn truncate_empties_the_chunk() {
        let r = rel(7);
        let mut w = Window::new("c".into(), r.clone(), &[0], vec![crow(1, "a", "B")]);
        w.apply(&change(Op::Truncate, &r, None, None));
        assert!(w.is_empty());
        // A later insert of the same key is the stream's to deliver.
        w.apply(&change(
            Op::Insert,
            &r,
            None,
            Some(Row::from_values(&[Some("1"), Some("\"z\""), Some("\"z\"")])),
        ));
        assert!(w.is_empty());
    }
}
