//! Sinks: where committed transactions go.
//!
//! A sink receives batches of whole transactions, in commit order; the
//! pipeline asks it to make what it applied durable (`flush`) and only then
//! checkpoints the last `end_lsn` applied for that sink. Each sink lives in its own folder
//! with its config struct (`deny_unknown_fields`, one doc comment per field:
//! those are the user docs) and its implementation.
//!
//! Errors: [`SinkError`] (in `error.rs`) has one classification,
//! [`SinkError::is_transient`]. A transient failure is retried by the
//! pipeline (same batch, exponential backoff with jitter), so `apply` must
//! be idempotent for transactions it has already seen; a fatal one stops
//! pgferry with the message, which must tell the operator what to do.
//!
//! Delivery guarantees:
//! - `jsonl` to a file: effectively-once. The file itself is the sink's
//!   truth; on start it drops a torn last line and skips what it already holds.
//! - `jsonl` to stdout: at-least-once (a restart can repeat the transactions
//!   after the last checkpoint).
//! - `null`: discards everything (benchmarks); checkpoints still advance.
//! - `redis`: effectively-once final state: each `MULTI` also records the
//!   position it brings Redis to, and transactions Redis already holds are
//!   skipped (commands are at-least-once on the wire).
//! - `elasticsearch` (alias `opensearch`): effectively-once per document:
//!   every write carries the change's LSN as an external version, so the
//!   changes a restart sends again cannot overwrite newer documents.
//! - `iceberg` (feature `iceberg`): effectively-once: each commit's
//!   snapshot carries the position of its last row, and rows at or before
//!   the table's current position are skipped.
//! - `nats`: effectively-once: each message carries a `Nats-Msg-Id` made of
//!   its position, and the sink reads its position back from the stream's
//!   last message before publishing, so nothing is repeated.

pub mod elasticsearch;
mod error;
pub mod eventlog;
#[cfg(feature = "iceberg")]
pub mod iceberg;
pub mod jsonl;
pub mod kafka;
pub mod key;
pub mod nats;
pub mod null;
pub mod redis;
pub mod rows;

use std::sync::Arc;

use crate::event::Transaction;

pub use error::{Cause, SinkError};

/// A destination for committed transactions.
#[async_trait::async_trait]
pub trait Sink: Send {
    /// Applies a batch of committed transactions, in commit order. Called
    /// again with the same or overlapping transactions after an error or a
    /// restart, so it must be idempotent.
    async fn apply(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError>;

    /// Makes everything applied so far durable. The pipeline calls it before
    /// it checkpoints (at most every `pipeline.checkpoint_interval_ms`), so
    /// a sink with an expensive durability step (an `fsync`) pays it once per
    /// checkpoint, not once per batch. Sinks whose `apply` is durable by
    /// itself keep the default.
    async fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Whether the store still holds pgferry's state. Called before the
    /// first batch when the sink has a checkpoint: `Ok(Some(what))` says
    /// what the store lost (it restarted empty, was flushed, or an index was
    /// deleted), so the rows applied before the checkpoint are gone from it.
    /// A sink must make sure that a checkpoint implies the state exists
    /// (write it in `flush` when nothing else did). Default: nothing to lose.
    async fn lost_state(&mut self) -> Result<Option<String>, SinkError> {
        Ok(None)
    }

    /// Flushes and releases resources at shutdown.
    async fn close(&mut self) -> Result<(), SinkError> {
        self.flush().await
    }
}

/// Which tables a sink takes.
#[derive(Debug, Clone, Default)]
pub struct TableFilter {
    /// `None`: every replicated table.
    only: Option<Vec<String>>,
}

impl TableFilter {
    pub fn new(only: Option<Vec<String>>) -> Self {
        TableFilter { only }
    }

    pub fn accepts(&self, qualified: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|t| t.iter().any(|n| n == qualified))
    }
}

/// The change stream a sink follows: the server (its system identifier),
/// the database and the slot. Sinks that record their position inside
/// their store record it too, so that two pgferry instances sharing a store
/// never take each other's position for their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOwner {
    pub system_identifier: String,
    pub database: String,
    pub slot: String,
}

/// Builds the sink described by a config entry, for the stream `owner`.
/// `rows` reads rows back from Postgres, for the search sink's updates it
/// cannot complete otherwise.
pub async fn build(
    cfg: &crate::config::SinkConfig,
    owner: &StreamOwner,
    rows: Arc<dyn rows::RowSource>,
) -> Result<Box<dyn Sink>, SinkError> {
    match cfg {
        crate::config::SinkConfig::Jsonl(c) => Ok(Box::new(jsonl::JsonlSink::open(c)?)),
        crate::config::SinkConfig::Null(_) => Ok(Box::new(null::NullSink)),
        crate::config::SinkConfig::Redis(c) => {
            Ok(Box::new(redis::RedisSink::open(c, owner.clone()).await?))
        }
        crate::config::SinkConfig::Nats(c) => Ok(Box::new(nats::NatsSink::open(c, owner.clone())?)),
        crate::config::SinkConfig::Elasticsearch(c) => Ok(Box::new(
            elasticsearch::ElasticsearchSink::open(c, Some(rows))?,
        )),
        #[cfg(feature = "iceberg")]
        crate::config::SinkConfig::Iceberg(c) => Ok(Box::new(iceberg::IcebergSink::open(c).await?)),
        crate::config::SinkConfig::Kafka(c) => Ok(Box::new(
            kafka::KafkaSink::open(Arc::new(c.clone()), owner.clone()).await?,
        )),
    }
}
