//! Completing updates whose unchanged TOAST values were not sent.
//!
//! Postgres leaves a large value out of an update that did not change it.
//! The sink writes whole documents (a partial `update` cannot carry an
//! external version), so such a change is a [`Merge`]: the columns sent,
//! put over a *base* that holds the others. The base is, in order of
//! preference:
//!
//! 1. an earlier operation on the same document in the same request chunk
//!    (merged in memory by the sink, before anything is read);
//! 2. the current document in the index (`_mget`, real time): the document
//!    itself, or for a key change the old id's document;
//! 3. the current row in Postgres, through a [`RowSource`], when the index
//!    cannot be trusted to hold the state just before the change.
//!
//! **Rows read from Postgres are marked.** A row read now can be newer than
//! the change, and can even be another row that took the key since (keys
//! rotated, an old key reused): as a base for a later key change it would
//! hand that row's values to the wrong document. Versions are commit LSNs,
//! and commit records start on 8-byte boundaries, so a row read from
//! Postgres is written with version `V + 1` unless it is exactly as the
//! change's transaction left it (its `xmin` is that transaction): `V + 1`
//! still sorts after `V` and before every later commit, so later changes
//! override it and replays of earlier ones are refused; and a version that
//! is not a multiple of 8 tells the sink never to complete from it.
//!
//! [`decide`] holds the rules. With `V` the change's version (its commit
//! LSN), a key change from `B` to `T`, versions as the index reports them,
//! and a base *usable* when it is not marked and holds every unsent column:
//!
//! | key change | `T` > V | `T` = V | `B` < V, usable | otherwise |
//! |---|---|---|---|---|
//! | | skip (newer) | Postgres (or skip) | complete from `B` | Postgres |
//!
//! | same id `X` | `X` > V | `X` ≤ V, usable | otherwise |
//! |---|---|---|---|
//! | | skip (newer) | complete from `X` | Postgres |
//!
//! A key change's base at version `V` or above was written by its own
//! transaction or a later one: it may hold another row that took the old
//! key since, so it is never used. Its target at exactly `V` is most often
//! the change itself, written by an earlier attempt, but can be an earlier
//! change of the same transaction replayed over it: the row is read again.
//! Without a row source that case keeps the document (skip), as before.
//! An unmarked document at a version below `V` holds exactly the row that
//! had its key at that version: every write of the stream does, and a
//! replay applies the changes in order.
//!
//! The sink keeps the bases intact until the documents completed from them
//! are acknowledged: a chunk's writes to its bases go in a second phase
//! (see `docs/search-sink.md`, "Key changes and failures", for the argument
//! over every split and failure point). A row read from Postgres is the
//! current one, possibly newer than the change: it is written with the
//! change's version, so the later changes, which follow in the stream,
//! override it. No row under the key means a later change deleted the row
//! or moved it: nothing is written, and that change comes.
//!
//! When none of this works (no row source, or Postgres refuses the read),
//! the change is [`Resolved::Incomplete`]: the sink writes nothing and
//! dead-letters the change with the reason; a partial document is never
//! indexed.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::client::{describe_error, Client, Fetched};
use crate::event::{Cell, RelationInfo, Row};
use crate::sink::rows::{RowError, RowQuery, RowSource};
use crate::sink::SinkError;

/// How a table's rows become documents, and how to read one back.
pub(super) struct Shape {
    pub rel: Arc<RelationInfo>,
    /// Per column: goes into the document.
    pub include: Vec<bool>,
    /// The columns of the document id: the key to read the row by.
    pub key_columns: Vec<String>,
}

impl Shape {
    /// The included columns of `row` that were not sent.
    pub fn unsent(&self, row: &Row) -> Vec<String> {
        self.rel
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| self.include[*i] && row.cell(*i) == Cell::Unchanged)
            .map(|(_, c)| c.name.clone())
            .collect()
    }

    /// The key values of `row`, as JSON values, in `key_columns` order
    /// (SQL NULL as `null`). A value that cannot be parsed is an error,
    /// never a `null`: the row would be looked up under the wrong key.
    pub fn key_values(&self, row: &Row) -> Result<Vec<Value>, String> {
        self.key_columns
            .iter()
            .map(|name| {
                let raw = self
                    .rel
                    .columns
                    .iter()
                    .position(|c| &c.name == name)
                    .and_then(|i| row.json(i));
                match raw {
                    None => Ok(Value::Null),
                    Some(j) => serde_json::from_slice(j).map_err(|e| {
                        format!(
                            "key column {name:?} of {}: its value cannot be parsed to read the row: {e}",
                            self.rel.qualified
                        )
                    }),
                }
            })
            .collect()
    }

    /// The document of a row read from Postgres (`to_jsonb(row)`): its
    /// included columns, in table order.
    fn document(&self, row: &Map<String, Value>) -> Vec<u8> {
        let mut out = vec![b'{'];
        for (i, col) in self.rel.columns.iter().enumerate() {
            let Some(v) = row.get(&col.name).filter(|_| self.include[i]) else {
                continue;
            };
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(col.json_name.as_bytes());
            out.push(b':');
            out.extend_from_slice(v.to_string().as_bytes());
        }
        out.push(b'}');
        out
    }
}

/// An update whose unchanged TOAST values must be filled in.
pub(super) struct Merge {
    /// The document that holds the unsent values: the document itself, or
    /// the old id of a key change. `None`: the chunk deletes it.
    pub base: Option<String>,
    /// The columns sent.
    pub overlay: Map<String, Value>,
    /// Estimated JSON bytes of `overlay`.
    pub size: usize,
    /// The included columns that were not sent (the base must hold them).
    pub unsent: Vec<String>,
    pub shape: Arc<Shape>,
    /// The row's key values, to read it from Postgres.
    pub key: Vec<Value>,
    /// The change's transaction.
    pub xid: u32,
}

impl Merge {
    /// This merge followed by a later update of the same row (same chunk):
    /// the later one's columns win, the base stays.
    pub fn then(&self, later: Merge) -> Merge {
        let mut overlay = self.overlay.clone();
        overlay.extend(later.overlay);
        let mut unsent = self.unsent.clone();
        unsent.extend(later.unsent);
        unsent.retain(|c| !overlay.contains_key(c));
        unsent.dedup();
        Merge {
            base: self.base.clone(),
            overlay,
            size: self.size + later.size,
            unsent,
            shape: later.shape,
            key: later.key,
            xid: later.xid,
        }
    }
}

/// A merge to resolve: the document it writes, and its version.
pub(super) struct Item<'a> {
    pub index: &'a str,
    pub id: &'a str,
    pub version: u64,
    pub merge: &'a Merge,
}

/// The version of a row read from Postgres that may be newer than the
/// change at `version`: see the module docs.
fn marked(version: u64) -> u64 {
    version + 1
}

/// True for a version [`marked`] gave.
fn is_marked(version: u64) -> bool {
    !version.is_multiple_of(8)
}

/// What a merge became.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Resolved {
    /// Index this whole document, with this version.
    Index { doc: Vec<u8>, version: u64 },
    /// Nothing to write: the index holds this change or a newer one, or the
    /// row is gone from the table (a change still to come removed it).
    Skip,
    /// No complete document can be made: why. Nothing is written.
    Incomplete(String),
}

/// How merges were resolved, for the sink's counters.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub from_index: u64,
    pub from_source: u64,
    /// Read from Postgres and found no row (a later change removed it).
    pub gone_at_source: u64,
    pub older: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    FromBase,
    Skip,
    /// Read the row from Postgres; without a row source, skip when
    /// `or_skip`, else the change is incomplete.
    FromSource {
        or_skip: bool,
    },
}

/// The rules of the module docs. `base` and `target`: the version of the
/// document when the index has it (`target` only for a key change);
/// `base_whole`: the base holds every unsent column.
fn decide(
    version: u64,
    key_change: bool,
    base: Option<u64>,
    base_whole: bool,
    target: Option<u64>,
) -> Decision {
    let usable = |b: u64| base_whole && !is_marked(b);
    if key_change {
        match target {
            Some(t) if t > version => return Decision::Skip,
            Some(t) if t == version => return Decision::FromSource { or_skip: true },
            _ => {}
        }
        match base {
            Some(b) if b < version && usable(b) => Decision::FromBase,
            _ => Decision::FromSource { or_skip: false },
        }
    } else {
        match base {
            Some(b) if b > version => Decision::Skip,
            Some(b) if usable(b) => Decision::FromBase,
            _ => Decision::FromSource { or_skip: false },
        }
    }
}

/// Resolves the merges of one chunk: one `_mget` for their bases (and key
/// changes' targets), then one Postgres read per table for those the index
/// cannot complete.
pub(super) async fn resolve(
    client: &Client,
    rows: Option<&dyn RowSource>,
    items: &[Item<'_>],
    counts: &mut Counts,
) -> Result<Vec<Resolved>, SinkError> {
    let decisions = read_documents(client, items).await?;
    let mut out = Vec::with_capacity(items.len());
    let mut from_source: Vec<(usize, bool)> = Vec::new();
    for (i, d) in decisions.into_iter().enumerate() {
        out.push(match d {
            (Decision::FromBase, Some(mut doc)) => {
                counts.from_index += 1;
                doc.extend(items[i].merge.overlay.clone());
                Resolved::Index {
                    doc: serde_json::to_vec(&doc).unwrap_or_default(),
                    version: items[i].version,
                }
            }
            (Decision::FromSource { or_skip }, _) => {
                from_source.push((i, or_skip));
                Resolved::Skip
            }
            _ => {
                counts.older += 1;
                Resolved::Skip
            }
        });
    }
    if !from_source.is_empty() {
        read_rows(rows, items, &from_source, &mut out, counts).await?;
    }
    Ok(out)
}

/// Reads the bases and targets, and decides each merge; the base's
/// `_source` comes with [`Decision::FromBase`].
async fn read_documents(
    client: &Client,
    items: &[Item<'_>],
) -> Result<Vec<(Decision, Option<Map<String, Value>>)>, SinkError> {
    let mut keys: Vec<(&str, &str)> = Vec::new();
    let mut slots: Vec<(Option<usize>, Option<usize>)> = Vec::new();
    for it in items {
        let base = it.merge.base.as_deref();
        let b = base.map(|id| {
            keys.push((it.index, id));
            keys.len() - 1
        });
        let t = (base != Some(it.id)).then(|| {
            keys.push((it.index, it.id));
            keys.len() - 1
        });
        slots.push((b, t));
    }
    let mut fetched: Vec<Option<Fetched>> = if keys.is_empty() {
        Vec::new()
    } else {
        client.mget(&keys).await?.into_iter().map(Some).collect()
    };
    let mut out = Vec::with_capacity(items.len());
    for (it, (b, t)) in items.iter().zip(slots) {
        let b = b.and_then(|i| fetched[i].take());
        let t = t.and_then(|i| fetched[i].take());
        for doc in b.iter().chain(&t) {
            check_read(doc, it)?;
        }
        let version = |f: &Option<Fetched>| {
            f.as_ref()
                .filter(|f| f.found)
                .map(|f| f.version.unwrap_or(0))
        };
        let (base_version, target_version) = (version(&b), version(&t));
        let source = b.filter(|f| f.found).and_then(|f| f.source);
        let whole = source
            .as_ref()
            .is_some_and(|s| it.merge.unsent.iter().all(|c| s.contains_key(c)));
        let key_change = it.merge.base.as_deref() != Some(it.id);
        let d = decide(it.version, key_change, base_version, whole, target_version);
        if d != Decision::FromBase {
            tracing::trace!(index = it.index, id = it.id, base = ?it.merge.base, version = it.version,
                base_version, target_version, base_whole = whole, decision = ?d, "update without its unchanged TOAST values");
        }
        out.push((d, source.filter(|_| d == Decision::FromBase)));
    }
    Ok(out)
}

/// A document read back with an error other than a missing index is a
/// failed read: transient.
fn check_read(doc: &Fetched, it: &Item<'_>) -> Result<(), SinkError> {
    match &doc.error {
        Some(e) if e.get("type").and_then(Value::as_str) != Some("index_not_found_exception") => {
            Err(SinkError::transient(format!(
                "reading document {:?} of index {:?}: {}",
                it.id,
                it.index,
                describe_error(e)
            )))
        }
        _ => Ok(()),
    }
}

/// Reads the rows of the merges in `wanted` (index into `items`, `or_skip`)
/// from Postgres, one query per table, and resolves them in `out`.
async fn read_rows(
    rows: Option<&dyn RowSource>,
    items: &[Item<'_>],
    wanted: &[(usize, bool)],
    out: &mut [Resolved],
    counts: &mut Counts,
) -> Result<(), SinkError> {
    // Group by table (the shape), keeping the order of first appearance.
    type Group<'s> = (&'s Arc<Shape>, Vec<(usize, bool)>);
    let mut groups: Vec<Group<'_>> = Vec::new();
    for &(i, or_skip) in wanted {
        let shape = &items[i].merge.shape;
        match groups.iter_mut().find(|(s, _)| Arc::ptr_eq(s, shape)) {
            Some((_, g)) => g.push((i, or_skip)),
            None => groups.push((shape, vec![(i, or_skip)])),
        }
    }
    for (shape, group) in groups {
        let keys: Vec<Vec<Value>> = group
            .iter()
            .map(|(i, _)| items[*i].merge.key.clone())
            .collect();
        let mut xids: Vec<u32> = group.iter().map(|(i, _)| items[*i].merge.xid).collect();
        xids.sort_unstable();
        xids.dedup();
        let got = match rows {
            None => Err("pgferry has no connection to read rows with".to_string()),
            Some(r) => {
                let q = RowQuery {
                    schema: &shape.rel.schema,
                    table: &shape.rel.table,
                    key_columns: &shape.key_columns,
                    keys: &keys,
                    xids: &xids,
                };
                match r.fetch(&q).await {
                    Ok(v) if v.len() == keys.len() => Ok(v),
                    Ok(v) => {
                        return Err(SinkError::transient(format!(
                            "reading rows of {}: asked for {} keys, got {} answers",
                            shape.rel.qualified,
                            keys.len(),
                            v.len()
                        )))
                    }
                    Err(RowError::Transient(e)) => {
                        return Err(SinkError::transient(format!(
                            "reading rows of {} from Postgres to complete documents: {e}",
                            shape.rel.qualified
                        )))
                    }
                    Err(RowError::Refused(e)) => Err(e),
                }
            }
        };
        for (n, &(i, or_skip)) in group.iter().enumerate() {
            out[i] = match &got {
                Ok(found) => match &found[n] {
                    Some(row) => {
                        counts.from_source += 1;
                        let it = &items[i];
                        Resolved::Index {
                            doc: shape.document(&row.values),
                            version: if row.xmin == it.merge.xid {
                                it.version
                            } else {
                                marked(it.version)
                            },
                        }
                    }
                    None => {
                        counts.gone_at_source += 1;
                        Resolved::Skip
                    }
                },
                Err(_) if or_skip => {
                    counts.older += 1;
                    Resolved::Skip
                }
                Err(e) => Resolved::Incomplete(incomplete_reason(&items[i], shape, e)),
            };
        }
    }
    Ok(())
}

fn incomplete_reason(it: &Item<'_>, shape: &Shape, err: &str) -> String {
    format!(
        "the update left {:?} unsent (unchanged TOAST values); the index holds no complete document {:?} to take them from, \
         and the row could not be read from Postgres: {err}. The document {:?} was not written: \
         re-save the row in Postgres, or run pgferry backfill --table {}",
        it.merge.unsent,
        it.merge.base.as_deref().unwrap_or(it.id),
        it.id,
        shape.rel.qualified
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_follow_the_table_of_the_module_docs() {
        use Decision::*;
        let from_source = FromSource { or_skip: false };
        // Versions are commit LSNs: multiples of 8.
        let v = 800;
        // Key changes: the target decides first, then the base.
        assert_eq!(decide(v, true, Some(400), true, Some(808)), Skip);
        assert_eq!(
            decide(v, true, Some(400), true, Some(v)),
            FromSource { or_skip: true }
        );
        assert_eq!(decide(v, true, Some(400), true, Some(792)), FromBase);
        assert_eq!(decide(v, true, Some(400), true, None), FromBase);
        assert_eq!(decide(v, true, Some(792), false, None), from_source);
        assert_eq!(decide(v, true, Some(v), true, None), from_source);
        assert_eq!(decide(v, true, Some(960), true, None), from_source);
        assert_eq!(decide(v, true, None, false, None), from_source);
        // The same document.
        assert_eq!(decide(v, false, Some(808), true, None), Skip);
        assert_eq!(decide(v, false, Some(v), true, None), FromBase);
        assert_eq!(decide(v, false, Some(24), true, None), FromBase);
        assert_eq!(decide(v, false, Some(24), false, None), from_source);
        assert_eq!(decide(v, false, None, false, None), from_source);
        // A row read from Postgres is never a base; newer is newer.
        assert_eq!(marked(v), 801);
        assert!(is_marked(marked(v)) && !is_marked(v));
        assert_eq!(decide(v, true, Some(marked(96)), true, None), from_source);
        assert_eq!(decide(v, false, Some(marked(96)), true, None), from_source);
        assert_eq!(decide(v, false, Some(marked(v)), true, None), Skip);
        assert_eq!(decide(v, true, Some(96), true, Some(marked(v))), Skip);
        assert_eq!(decide(v, true, Some(96), true, Some(marked(96))), FromBase);
    }
}
