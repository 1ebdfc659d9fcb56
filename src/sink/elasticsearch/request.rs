//! Request building: document operations, the chunk they are gathered in,
//! and the `_bulk` NDJSON they become.
//!
//! Invariants:
//! - Every operation is a whole `index` or a `delete`, with
//!   `version_type=external_gte` and the commit LSN of its transaction as
//!   `version` (a row read from Postgres may carry a marked version, see
//!   `complete.rs`). So sending an operation again, or a whole chunk again,
//!   is a no-op or a re-write of the same values: the sink and the pipeline
//!   may retry freely.
//! - A chunk keeps only the latest operation per document; each carries the
//!   full new state, so the earlier ones would be overwritten anyway.
//! - A chunk remembers its *bases*: the old ids that its key changes
//!   complete from. Writes to them are sent only after everything else of
//!   the chunk is acknowledged (see `sink.rs`).
//! - One request holds at most `batch_max_bytes` (but at least one
//!   operation); `Merge` and `Skip` operations are never written.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::complete::Merge;
use crate::event::{RelationInfo, Row};
use crate::json_write::write_json_string;

pub(super) enum Action {
    /// `index` with this `_source`.
    Index(Vec<u8>),
    Delete,
    /// An update whose unchanged TOAST columns were not sent: completed
    /// (see `complete.rs`) and indexed as a whole before the chunk is sent.
    Merge(Box<Merge>),
    /// Nothing to send (the index already holds a newer version, or the
    /// change went to the dead letters).
    Skip,
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Delete => "delete",
            _ => "index",
        }
    }
}

/// One document operation, versioned with the commit LSN of its transaction.
pub(super) struct Pending {
    pub index: Arc<str>,
    pub id: String,
    pub version: u64,
    pub action: Action,
    /// The change as a JSON event (the JSONL format), for dead letters.
    pub event: Arc<[u8]>,
}

impl Pending {
    pub fn size(&self) -> usize {
        100 + self.index.len()
            + self.id.len()
            + match &self.action {
                Action::Index(s) => s.len(),
                Action::Merge(m) => m.size,
                Action::Delete | Action::Skip => 0,
            }
    }

    /// The document it writes, as a key.
    pub fn doc(&self) -> (Arc<str>, String) {
        (self.index.clone(), self.id.clone())
    }
}

/// The operations of one chunk being assembled (see the module docs).
#[derive(Default)]
pub(super) struct Chunk {
    pub ops: Vec<Pending>,
    latest: HashMap<(Arc<str>, String), usize>,
    pub bytes: usize,
    /// Documents that key changes in the chunk complete from (their old
    /// ids): written only once those completions are acknowledged.
    bases: HashSet<(Arc<str>, String)>,
}

impl Chunk {
    pub fn get(&self, index: &Arc<str>, id: &str) -> Option<&Pending> {
        self.latest
            .get(&(index.clone(), id.to_string()))
            .map(|&i| &self.ops[i])
    }

    pub fn put(&mut self, p: Pending) {
        if let Action::Merge(m) = &p.action {
            if let Some(b) = m.base.as_ref().filter(|b| **b != p.id) {
                self.bases.insert((p.index.clone(), b.clone()));
            }
        }
        self.bytes += p.size();
        match self.latest.get(&p.doc()) {
            Some(&i) => {
                self.bytes -= self.ops[i].size();
                self.ops[i] = p;
            }
            None => {
                self.latest.insert(p.doc(), self.ops.len());
                self.ops.push(p);
            }
        }
    }

    /// True when a key change in the chunk completes from this document.
    pub fn is_base(&self, index: &Arc<str>, id: &str) -> bool {
        self.bases.contains(&(index.clone(), id.to_string()))
    }

    /// The operations, and the bases of the key changes among them.
    pub fn take(&mut self) -> (Vec<Pending>, HashSet<(Arc<str>, String)>) {
        self.latest.clear();
        self.bytes = 0;
        (
            std::mem::take(&mut self.ops),
            std::mem::take(&mut self.bases),
        )
    }
}

/// The chunk's operations in the order they may be sent: everything else
/// first, then the writes to `bases` (a phase is left out when empty).
pub(super) fn phases(ops: Vec<Pending>, bases: &HashSet<(Arc<str>, String)>) -> Vec<Vec<Pending>> {
    if bases.is_empty() {
        return vec![ops];
    }
    let (first, then): (Vec<Pending>, Vec<Pending>) =
        ops.into_iter().partition(|p| !bases.contains(&p.doc()));
    [first, then]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect()
}

/// The document: the row's included columns as a JSON object (the same
/// values as `to_jsonb(row)`); unchanged TOAST columns are left out.
pub fn write_doc(rel: &RelationInfo, row: &Row, include: &[bool], out: &mut Vec<u8>) {
    crate::event::write_object(
        rel,
        row,
        |i, _| include.get(i).copied().unwrap_or(false),
        out,
    );
}

/// Writes the body of the next `_bulk` request into `out` (cleared first):
/// operations from the front of `ops`, at most `max_bytes` but at least
/// one. Returns how many it took.
pub(super) fn next_request(ops: &[Pending], max_bytes: usize, out: &mut Vec<u8>) -> usize {
    out.clear();
    let mut n = 0;
    for p in ops {
        if n > 0 && (out.len() >= max_bytes || out.len() + p.size() > max_bytes) {
            break;
        }
        write_bulk_op(p, out);
        n += 1;
    }
    n
}

/// One `_bulk` action line (and source line), external version in the action.
pub(super) fn write_bulk_op(p: &Pending, out: &mut Vec<u8>) {
    let (action, source) = match &p.action {
        Action::Index(s) => ("index", Some(s)),
        Action::Delete => ("delete", None),
        Action::Merge { .. } | Action::Skip => return,
    };
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(action.as_bytes());
    out.extend_from_slice(b"\":{\"_index\":");
    write_json_string(p.index.as_bytes(), out);
    out.extend_from_slice(b",\"_id\":");
    write_json_string(p.id.as_bytes(), out);
    out.extend_from_slice(b",\"version\":");
    out.extend_from_slice(itoa::Buffer::new().format(p.version).as_bytes());
    out.extend_from_slice(b",\"version_type\":\"external_gte\"}}\n");
    if let Some(s) = source {
        out.extend_from_slice(s);
        out.push(b'\n');
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub fn pending(id: &str, version: u64, action: Action) -> Pending {
        Pending {
            index: "i".into(),
            id: id.into(),
            version,
            action,
            event: Arc::from(&b"{}"[..]),
        }
    }

    #[test]
    fn bulk_lines_carry_the_external_version_in_the_action() {
        let mut out = Vec::new();
        write_bulk_op(
            &pending("a\"b", 42, Action::Index(b"{\"x\":1}".to_vec())),
            &mut out,
        );
        write_bulk_op(&pending("c", 43, Action::Delete), &mut out);
        write_bulk_op(&pending("d", 44, Action::Skip), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"index\":{\"_index\":\"i\",\"_id\":\"a\\\"b\",\"version\":42,\"version_type\":\"external_gte\"}}\n{\"x\":1}\n\
             {\"delete\":{\"_index\":\"i\",\"_id\":\"c\",\"version\":43,\"version_type\":\"external_gte\"}}\n"
        );
    }

    #[test]
    fn a_request_holds_at_most_max_bytes_but_at_least_one_operation() {
        let ops: Vec<Pending> = (0..5)
            .map(|i| pending(&i.to_string(), 1, Action::Index(vec![b'x'; 100])))
            .collect();
        let mut out = Vec::new();
        assert_eq!(next_request(&ops, 10, &mut out), 1, "one even when too big");
        assert_eq!(next_request(&ops, 2 * ops[0].size(), &mut out), 2);
        assert!(out.len() <= 2 * ops[0].size());
        assert_eq!(next_request(&ops, usize::MAX, &mut out), 5);
        assert_eq!(next_request(&ops[5..], 10, &mut out), 0);
    }

    #[test]
    fn a_chunk_keeps_the_latest_operation_per_document() {
        let mut c = Chunk::default();
        c.put(pending("1", 10, Action::Index(b"{}".to_vec())));
        c.put(pending("2", 11, Action::Delete));
        c.put(pending("1", 12, Action::Delete));
        assert_eq!(c.ops.len(), 2);
        assert!(matches!(c.ops[0].action, Action::Delete));
        assert_eq!(c.ops[0].version, 12);
        assert_eq!(c.bytes, c.ops.iter().map(Pending::size).sum::<usize>());
        let (ops, bases) = c.take();
        assert_eq!(ops.len(), 2);
        assert!(c.latest.is_empty() && c.bytes == 0);
        assert_eq!(phases(ops, &bases).len(), 1);
    }
}
