//! The position topic `__pgferry_position.<sink>` and topic creation.
//!
//! Invariants:
//! - The position topic has one partition, is compacted, and every record
//!   in it has the sink's name as key. The sink writes one record per Kafka
//!   transaction, inside that transaction, so the last record a
//!   `read_committed` consumer sees is the position of the last committed
//!   transaction, and of nothing an aborted one held.
//! - The last offsets of a transactional partition are commit or abort
//!   markers, which consumers never receive; [`read_last`] therefore reads a
//!   window before the end (the read_committed end: the last stable offset)
//!   and widens it ×4 until a record turns up or the window reaches the
//!   partition's start.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::sink::eventlog::Position;

/// The value of a position record: where the sink is, and whose stream it
/// follows (so that another pgferry's position is never taken for ours).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PositionRecord {
    /// `X/Y:index` ([`Position::to_text`]).
    pub position: String,
    pub system_identifier: String,
    pub slot: String,
}

impl PositionRecord {
    pub fn parsed(&self) -> Option<Position> {
        Position::parse(&self.position)
    }
}

/// Creates `topic` unless it exists. `partitions`/`replication` `None`:
/// the brokers' defaults (`-1` in the CreateTopics request).
pub fn create_topic(
    admin: &AdminClient<DefaultClientContext>,
    rt: &tokio::runtime::Handle,
    topic: &str,
    partitions: Option<u32>,
    replication: Option<u32>,
    configs: &[(&str, &str)],
    timeout: Duration,
) -> KafkaResult<()> {
    let mut new = NewTopic::new(
        topic,
        partitions.map_or(-1, |p| p as i32),
        TopicReplication::Fixed(replication.map_or(-1, |r| r as i32)),
    );
    for (k, v) in configs {
        new = new.set(k, v);
    }
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let results = rt.block_on(admin.create_topics([&new], &opts))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// The last committed position record of `topic` (partition 0), read with
/// `isolation.level=read_committed`; `None` when there is none.
pub fn read_last(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> KafkaResult<Option<PositionRecord>> {
    let (low, high) = consumer.fetch_watermarks(topic, 0, timeout)?;
    if high <= low {
        return Ok(None);
    }
    let mut window = 2i64;
    loop {
        let start = (high - window).max(low);
        if let Some(found) = read_range(consumer, topic, start, high, timeout)? {
            return Ok(Some(found));
        }
        if start == low {
            return Ok(None);
        }
        window = window.saturating_mul(4);
    }
}

/// The last position record in `[start, end)`.
fn read_range(
    consumer: &BaseConsumer,
    topic: &str,
    start: i64,
    end: i64,
    timeout: Duration,
) -> KafkaResult<Option<PositionRecord>> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(start))?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if Instant::now() > deadline {
            return Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::OperationTimedOut,
            ));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(e),
            Some(Ok(m)) => {
                if let Some(v) = m.payload() {
                    let rec: PositionRecord = serde_json::from_slice(v).map_err(|e| {
                        KafkaError::MessageConsumption(bad_record(topic, m.offset(), &e))
                    })?;
                    last = Some(rec);
                }
                if m.offset() + 1 >= end {
                    break;
                }
            }
        }
    }
    consumer.unassign()?;
    Ok(last)
}

/// A position record pgferry cannot read is no transient condition; it is
/// reported (with its offset) and treated as a failed read.
fn bad_record(topic: &str, offset: i64, e: &serde_json::Error) -> RDKafkaErrorCode {
    tracing::error!(topic, offset, error = %e, "unreadable position record");
    RDKafkaErrorCode::InvalidRecord
}

/// The consumer that reads the position topic: `read_committed`, partition
/// end reported, no group offsets.
pub fn consumer_config(base: &ClientConfig) -> ClientConfig {
    let mut c = base.clone();
    c.set("group.id", "pgferry-position-reader")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_record_round_trips() {
        let r = PositionRecord {
            position: "0/16B3F40:12".into(),
            system_identifier: "7".into(),
            slot: "pgferry".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        let back: PositionRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.parsed().unwrap().index, 12);
    }
}
