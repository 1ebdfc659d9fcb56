//! The Kafka sink: the event log's records ([`crate::sink::eventlog`]) on
//! Kafka topics, through librdkafka (`rdkafka`, vendored, built with its own
//! `./configure` and `make`: no cmake; Debian's librdkafka is too old for
//! the crate).
//!
//! Invariants:
//! - With `exactly_once` (the default) each `apply` batch is one Kafka
//!   transaction holding its records and one record of the sink's position
//!   (`(commit_lsn, index)` of its last record) on the compacted topic
//!   `__pgferry_position.<sink>`. At start and after any error a new
//!   producer is made; its `init_transactions` aborts whatever the previous
//!   one left open (and fences another process with the same
//!   `transactional.id`), then the last committed position is read with
//!   `read_committed` and every record at or before it is skipped. So a
//!   `read_committed` consumer sees each change exactly once, whatever the
//!   pipeline replays.
//! - With `exactly_once = false` the idempotent producer is used and every
//!   batch is flushed before `apply` returns: at-least-once (a replay after
//!   a crash publishes again), which the sink logs at start.
//! - All Kafka calls block (librdkafka's transaction API, flushes, admin
//!   requests): they run on a blocking thread, never on the executor.
//! - Errors: an unreachable or slow cluster is transient (retried by the
//!   pipeline); fenced, not authorised and a record too large are fatal with
//!   the fix. Sizes are checked against `message.max.bytes` before
//!   producing.
//! - Topics are created with the admin API (`create_topics`, default on)
//!   the first time they are used, with `partitions` and
//!   `replication_factor` (the brokers' defaults when unset), rather than
//!   relying on broker auto-creation, which production clusters often
//!   disable and which cannot make the position topic compacted.

mod config;
mod position;
mod sink;

pub use config::{is_secret, KafkaConfig, KafkaTableConfig, PropValue};
pub use sink::{classify, probe, KafkaSink};
