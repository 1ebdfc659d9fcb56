//! Retry classification, Vector's `RetryLogic` for this sink: what each
//! answered `_bulk` item means, and where a failed batch resumes.
//!
//! There is one retry loop, the pipeline's (same batch, exponential backoff
//! with jitter, `max_failure_secs`). The sink does not wait or loop: a
//! failure is classified, and a transient one is returned at once.
//!
//! Invariants:
//! - [`outcome`] is the one place a bulk item's answer is classified:
//!   applied, already newer (409, success), gone (a delete of what is not
//!   there, success), index missing (created again, retried), retry (429,
//!   5xx, blocked or closed index) or rejected for good (dead letter, or
//!   stop).
//! - Retry-partial, for failed *items* only (what the sink's own item
//!   loop used to do): when items of an answered `_bulk` fail in a way that
//!   may pass, [`Resume`] remembers how far the batch is acknowledged (a
//!   count of its changes, whose operations are applied and whose dead
//!   letters are synced) and the chunk operations still unacknowledged
//!   (only the failed items, in their phases). When the pipeline hands the
//!   *same* batch again, the sink sends those first and skips the
//!   acknowledged changes. Any other failure (a whole request, a read, the
//!   dead-letter file) and any other batch start the batch afresh: it is
//!   sent whole again, as after a crash. That is always safe: every
//!   operation carries its external version, so sending it again is a no-op
//!   or a re-write of the same values (see `request.rs`); skipping is only
//!   an optimisation that keeps an overloaded cluster from getting the
//!   whole batch again for a few 429s.
//! - A chunk's second phase (the writes to the bases of its key changes)
//!   stays held behind its first until the first is acknowledged, across
//!   retries too.

use std::sync::Arc;

use super::client::ItemResult;
use super::request::Pending;
use crate::event::Transaction;

/// What one answered bulk item means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Applied,
    /// A 409 version conflict: the index holds this version or a newer one
    /// (a replay). Success.
    Older,
    /// A delete of a document (or index) that is not there. Success.
    Gone,
    /// The index is missing: create it again, then retry.
    NoIndex,
    /// Overloaded (429), failing (5xx), blocked or closed: retry with backoff.
    Retry,
    /// Final (a mapping error, an invalid document): dead letter or stop.
    Rejected,
}

pub(super) fn outcome(is_delete: bool, r: &ItemResult) -> Outcome {
    let t = r.error_type();
    match r.status {
        200..=299 => Outcome::Applied,
        409 if t == "version_conflict_engine_exception" => Outcome::Older,
        404 if is_delete => Outcome::Gone,
        404 if t == "index_not_found_exception" => Outcome::NoIndex,
        429 | 500..=599 => Outcome::Retry,
        _ if t == "cluster_block_exception" || t == "index_closed_exception" => Outcome::Retry,
        _ => Outcome::Rejected,
    }
}

/// Tells a retry of the same batch from another batch: its length, its
/// first and last end LSNs, and the first transaction's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BatchId(usize, u64, u64, usize);

impl BatchId {
    pub fn of(batch: &[Arc<Transaction>]) -> BatchId {
        let lsn = |t: Option<&Arc<Transaction>>| t.map_or(0, |t| t.meta.end_lsn.0);
        BatchId(
            batch.len(),
            lsn(batch.first()),
            lsn(batch.last()),
            batch.first().map_or(0, |t| Arc::as_ptr(t) as usize),
        )
    }
}

/// How far the current batch is acknowledged (see the module docs).
#[derive(Default)]
pub(super) struct Resume {
    batch: Option<BatchId>,
    /// The batch's first `done` changes are acknowledged.
    pub done: usize,
    /// Operations of the failed chunk still to send, phase by phase; they
    /// cover the changes up to `held_at`.
    pub held: Vec<Vec<Pending>>,
    pub held_at: usize,
}

impl Resume {
    /// Starts `batch`: `true` when it is the batch that failed last time
    /// (the state is kept), else the state starts afresh.
    pub fn start(&mut self, batch: BatchId) -> bool {
        if self.batch == Some(batch) {
            return true;
        }
        *self = Resume {
            batch: Some(batch),
            ..Resume::default()
        };
        false
    }

    /// Operations of the failed chunk wait: they cover the changes up to `at`.
    pub fn hold(&mut self, phases: Vec<Vec<Pending>>, at: usize) {
        self.held = phases.into_iter().filter(|p| !p.is_empty()).collect();
        self.held_at = at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bulk_item_answers_are_classified() {
        let item = |status: u16, t: &str| ItemResult {
            status,
            error: (!t.is_empty()).then(|| json!({"type": t, "reason": "r"})),
        };
        let cases = [
            (false, item(201, ""), Outcome::Applied),
            (true, item(200, ""), Outcome::Applied),
            (
                false,
                item(409, "version_conflict_engine_exception"),
                Outcome::Older,
            ),
            (
                true,
                item(409, "version_conflict_engine_exception"),
                Outcome::Older,
            ),
            (true, item(404, ""), Outcome::Gone),
            (true, item(404, "index_not_found_exception"), Outcome::Gone),
            (
                false,
                item(404, "index_not_found_exception"),
                Outcome::NoIndex,
            ),
            (
                false,
                item(429, "es_rejected_execution_exception"),
                Outcome::Retry,
            ),
            (
                false,
                item(503, "unavailable_shards_exception"),
                Outcome::Retry,
            ),
            (false, item(500, ""), Outcome::Retry),
            (false, item(403, "cluster_block_exception"), Outcome::Retry),
            (false, item(400, "index_closed_exception"), Outcome::Retry),
            (
                false,
                item(400, "mapper_parsing_exception"),
                Outcome::Rejected,
            ),
            (
                false,
                item(400, "illegal_argument_exception"),
                Outcome::Rejected,
            ),
            (false, item(409, "other"), Outcome::Rejected),
            (
                false,
                item(404, "document_missing_exception"),
                Outcome::Rejected,
            ),
        ];
        for (is_delete, r, want) in cases {
            assert_eq!(outcome(is_delete, &r), want, "{r:?}");
        }
    }

    #[test]
    fn only_a_retry_of_the_same_batch_resumes() {
        let mut r = Resume::default();
        let a = BatchId(2, 10, 20, 1);
        assert!(!r.start(a));
        r.done = 5;
        r.hold(
            vec![
                vec![],
                vec![super::super::request::tests::pending(
                    "x",
                    1,
                    super::super::request::Action::Delete,
                )],
            ],
            5,
        );
        assert_eq!(r.held.len(), 1, "empty phases are not held");
        assert!(r.start(a));
        assert_eq!(r.done, 5);
        assert!(!r.start(BatchId(2, 10, 20, 2)));
        assert_eq!((r.done, r.held.len()), (0, 0));
    }
}
