//! Building the document of an update whose unchanged TOAST values were
//! not sent: from the full old row (`REPLICA IDENTITY FULL`), from the
//! chunk's own earlier write of the base, or as a [`Merge`] that
//! `complete.rs` resolves against the index or Postgres before the chunk
//! is sent.
//!
//! Invariants:
//! - A partial document is never indexed: every included column ends up
//!   either with the value the change sent or with one taken from a whole
//!   base.
//! - A value is never changed on the way. The merge path has to parse the
//!   rendered values (to put them over a base); a value the sink cannot
//!   parse (for example a `jsonb` nested deeper than the JSON parser's
//!   limit) is an [`Unparsable`] error naming the column, which the sink
//!   dead-letters (or stops on), never a silent `null`.

use serde_json::{Map, Value};

use super::complete::{Merge, Shape};
use super::request::{Action, Chunk};
use crate::event::{Cell, RelationInfo, Row};

/// A value the merge path could not parse: the change cannot be merged.
#[derive(Debug)]
pub(super) struct Unparsable(pub String);

/// `row` with its unchanged cells taken from `from` (a full old row). The
/// values are copied as rendered, never parsed.
pub(super) fn fill_unchanged(row: &Row, from: &Row) -> Row {
    let mut out = Row {
        buf: row.buf.clone(),
        cells: row.cells.clone(),
    };
    for (i, cell) in out.cells.iter_mut().enumerate() {
        if *cell != Cell::Unchanged {
            continue;
        }
        *cell = match (from.cell(i), from.json(i)) {
            (Cell::Value { .. }, Some(v)) => {
                let start = out.buf.len() as u32;
                out.buf.extend_from_slice(v);
                Cell::Value {
                    start,
                    end: out.buf.len() as u32,
                }
            }
            (Cell::Value { .. }, None) => Cell::Unchanged,
            (other, _) => other,
        };
    }
    out
}

/// The included columns that were sent, as a map, and their JSON size.
pub(super) fn overlay(
    rel: &RelationInfo,
    row: &Row,
    include: &[bool],
) -> Result<(Map<String, Value>, usize), Unparsable> {
    let mut m = Map::new();
    let mut size = 2;
    for (i, col) in rel.columns.iter().enumerate() {
        if !include.get(i).copied().unwrap_or(false) {
            continue;
        }
        let v = match row.cell(i) {
            Cell::Unchanged => continue,
            Cell::Null => Value::Null,
            Cell::Value { .. } => {
                let raw = row.json(i).unwrap_or_default();
                size += raw.len();
                serde_json::from_slice(raw).map_err(|e| {
                    Unparsable(format!(
                        "column {:?} of {}: its value ({} bytes) cannot be parsed to merge it over the stored document: {e}",
                        col.name,
                        rel.qualified,
                        raw.len()
                    ))
                })?
            }
        };
        size += col.json_name.len() + 2;
        m.insert(col.name.clone(), v);
    }
    Ok((m, size))
}

/// The action of an update whose unchanged TOAST columns were not sent,
/// to be completed from `base` (the document itself, or a key change's old
/// id): merged over the chunk's operation on `base` when it has one, else a
/// [`Merge`] resolved before the chunk is sent.
pub(super) fn merge_action(
    chunk: &Chunk,
    index: &std::sync::Arc<str>,
    shape: &std::sync::Arc<Shape>,
    row: &Row,
    base: &str,
    xid: u32,
) -> Result<Action, Unparsable> {
    let (overlay, size) = overlay(&shape.rel, row, &shape.include)?;
    let merge = Merge {
        base: Some(base.to_string()),
        overlay,
        size,
        unsent: shape.unsent(row),
        shape: shape.clone(),
        key: shape.key_values(row).map_err(Unparsable)?,
        xid,
    };
    Ok(match chunk.get(index, base).map(|p| &p.action) {
        Some(Action::Index(src)) => {
            let mut doc: Map<String, Value> = serde_json::from_slice(src).map_err(|e| {
                Unparsable(format!(
                    "the document {base:?} written earlier in the same request cannot be parsed to merge the update over it: {e}"
                ))
            })?;
            doc.extend(merge.overlay);
            Action::Index(serde_json::to_vec(&doc).map_err(|e| Unparsable(e.to_string()))?)
        }
        Some(Action::Merge(earlier)) => Action::Merge(Box::new(earlier.then(merge))),
        // The chunk deletes the base: only Postgres has the row.
        Some(Action::Delete) | Some(Action::Skip) => Action::Merge(Box::new(Merge {
            base: None,
            ..merge
        })),
        None => Action::Merge(Box::new(merge)),
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::request::tests::pending;
    use super::*;
    use crate::sink::elasticsearch::request::write_doc;
    use serde_json::json;
    use std::sync::Arc;

    pub fn rel() -> Arc<RelationInfo> {
        Arc::new(RelationInfo::new(
            7,
            "public".into(),
            "docs".into(),
            b'd',
            vec![
                ("id".into(), 23, true),
                ("body".into(), 25, false),
                ("n".into(), 23, false),
            ],
        ))
    }

    pub fn row(cells: &[Option<&str>], unchanged: &[usize]) -> Row {
        let mut r = Row::from_values(cells);
        for &i in unchanged {
            r.cells[i] = Cell::Unchanged;
        }
        r
    }

    fn shape() -> Arc<Shape> {
        Arc::new(Shape {
            rel: rel(),
            include: vec![true; 3],
            key_columns: vec!["id".into()],
        })
    }

    #[test]
    fn documents_follow_the_column_mask_and_skip_unchanged_values() {
        let r = row(&[Some("1"), Some("\"x\""), None], &[]);
        let mut out = Vec::new();
        write_doc(&rel(), &r, &[true, true, true], &mut out);
        assert_eq!(out, br#"{"id":1,"body":"x","n":null}"#);
        out.clear();
        write_doc(&rel(), &r, &[true, false, true], &mut out);
        assert_eq!(out, br#"{"id":1,"n":null}"#);
        let r = row(&[Some("1"), None, Some("5")], &[1]);
        out.clear();
        write_doc(&rel(), &r, &[true, true, true], &mut out);
        assert_eq!(out, br#"{"id":1,"n":5}"#);
        // A full old row fills in the unchanged value.
        let old = row(&[Some("1"), Some("\"long\""), Some("4")], &[]);
        out.clear();
        write_doc(
            &rel(),
            &fill_unchanged(&r, &old),
            &[true, true, true],
            &mut out,
        );
        assert_eq!(out, br#"{"id":1,"body":"long","n":5}"#);
        let (m, _) = overlay(&rel(), &r, &[true, true, true]).unwrap();
        assert_eq!(Value::Object(m), json!({"id": 1, "n": 5}));
    }

    /// The old code turned a value it could not parse into `null` and
    /// indexed the document with it.
    #[test]
    fn a_value_the_merge_cannot_parse_is_an_error_not_a_null() {
        // Valid JSON (a jsonb value Postgres accepts), deeper than the parser's limit.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let r = row(&[Some("1"), None, Some(&deep)], &[1]);
        let err = overlay(&rel(), &r, &[true, true, true]).unwrap_err();
        assert!(
            err.0.contains("\"n\"") && err.0.contains("public.docs"),
            "{}",
            err.0
        );
        let c = Chunk::default();
        assert!(merge_action(&c, &"i".into(), &shape(), &r, "1", 7).is_err());
        // The same for the chunk's earlier write of the base.
        let mut c = Chunk::default();
        c.put(pending(
            "1",
            9,
            Action::Index(format!("{{\"n\":{deep}}}").into_bytes()),
        ));
        let r = row(&[Some("1"), None, Some("5")], &[1]);
        assert!(merge_action(&c, &"i".into(), &shape(), &r, "1", 7).is_err());
    }

    #[test]
    fn a_key_change_without_its_toast_value_completes_from_its_old_document() {
        let (index, shape): (Arc<str>, _) = ("i".into(), shape());
        // Row 1 moved to 2 without its body.
        let moved = row(&[Some("2"), None, Some("5")], &[1]);
        let mut c = Chunk::default();
        let Ok(Action::Merge(m)) = merge_action(&c, &index, &shape, &moved, "1", 7) else {
            panic!("nothing to merge with in the chunk: a merge to resolve")
        };
        assert_eq!(m.base.as_deref(), Some("1"));
        assert_eq!(m.unsent, ["body"]);
        assert_eq!(m.key, [json!(2)]);
        assert_eq!(Value::Object(m.overlay.clone()), json!({"id": 2, "n": 5}));
        c.put(pending("1", 10, Action::Delete));
        c.put(pending("2", 10, Action::Merge(m)));
        assert!(c.is_base(&index, "1") && !c.is_base(&index, "2"));
        let (_, bases) = c.take();
        assert!(bases.contains(&(index.clone(), "1".to_string())));
        // The chunk's own write of the old document completes it in memory.
        c.put(pending(
            "1",
            9,
            Action::Index(br#"{"id":1,"body":"long","n":4}"#.to_vec()),
        ));
        let Ok(Action::Index(doc)) = merge_action(&c, &index, &shape, &moved, "1", 7) else {
            panic!("merged in memory")
        };
        let doc: Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(doc, json!({"id": 2, "body": "long", "n": 5}));
        // The chunk deletes the old document: only Postgres has the row.
        c.put(pending("1", 10, Action::Delete));
        let Ok(Action::Merge(m)) = merge_action(&c, &index, &shape, &moved, "1", 7) else {
            panic!("a merge to resolve")
        };
        assert_eq!(m.base, None);
    }
}
