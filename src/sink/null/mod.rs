//! The null sink: accepts every batch and discards it. For benchmarks and for
//! measuring the source side alone; its "delivery guarantee" is that nothing
//! is delivered, while checkpoints still advance.

use std::sync::Arc;

use serde::Deserialize;

use crate::event::Transaction;
use crate::sink::{Sink, SinkError};

/// `[[sink]] type = "null"`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullConfig {
    /// Unique sink name; names its checkpoint file.
    pub name: String,
    /// Only these `schema.table`s (default: all of `source.tables`).
    #[serde(default)]
    pub tables: Option<Vec<String>>,
}

/// Discards everything, after visiting every change (so spilled
/// transactions are still read back, as a real sink would).
pub struct NullSink;

#[async_trait::async_trait]
impl Sink for NullSink {
    async fn apply(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        for txn in batch {
            txn.for_each_change(|_| Ok(()))
                .map_err(|e| SinkError::transient(format!("reading spilled transaction: {e}")))?;
        }
        Ok(())
    }
}
