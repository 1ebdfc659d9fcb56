use std::collections::BTreeMap;

use serde::Deserialize;

use crate::sink::eventlog::route::{check_kafka_topic, check_template};
use crate::sink::eventlog::Format;

/// `[[sink]] type = "kafka"`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Unique sink name; names its checkpoint file, its position topic
    /// (`__pgferry_position.<name>`) and its `transactional.id`
    /// (`pgferry.<name>`). Two running pgferry processes must not share it:
    /// the one that starts last fences the other.
    pub name: String,
    /// The bootstrap brokers, comma-separated `host:port` (librdkafka's
    /// `bootstrap.servers`).
    pub brokers: String,
    /// The topic of each table: `{schema}` and `{table}` are replaced by the
    /// table's names (characters a topic may not hold become `_`). Default
    /// `pgferry.{schema}.{table}`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// `pgferry` (default): the change event JSON of the `jsonl` sink.
    /// `debezium`: Debezium's PostgreSQL envelope without schema (see
    /// docs/kafka-sink.md for where the values differ from Debezium's).
    #[serde(default)]
    pub format: Format,
    /// `true` (default): effectively-once. Each batch of whole transactions
    /// is one Kafka transaction, together with the sink's position; a
    /// `read_committed` consumer sees every change exactly once across
    /// crashes. `false`: the idempotent producer, at-least-once (a restart
    /// can publish the transactions after the last checkpoint again).
    #[serde(default = "yes")]
    pub exactly_once: bool,
    /// A record with a null value after each delete (default true), so that
    /// log compaction removes deleted keys.
    #[serde(default = "yes")]
    pub tombstones: bool,
    /// Create missing topics with the Kafka admin API (default true), with
    /// `partitions` and `replication_factor`. With `false`, topics must exist
    /// (or the brokers must auto-create them); the position topic too.
    #[serde(default = "yes")]
    pub create_topics: bool,
    /// Partitions of the topics pgferry creates. Default: the brokers'
    /// `num.partitions`. The position topic always has one.
    #[serde(default)]
    pub partitions: Option<u32>,
    /// Replication factor of the topics pgferry creates (the position topic
    /// too). Default: the brokers' `default.replication.factor`.
    #[serde(default)]
    pub replication_factor: Option<u32>,
    /// Seconds each blocking Kafka call may take (connecting, initialising
    /// and committing a transaction, flushing) before the attempt counts as
    /// failed and is retried. Default 30.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Stop pgferry with an error once the sink has been failing (retrying)
    /// this many seconds. Default: keep retrying forever.
    #[serde(default)]
    pub max_failure_secs: Option<u64>,
    /// Any librdkafka producer property, passed through as given
    /// (`security.protocol`, `sasl.*`, `ssl.*`, `compression.type`,
    /// `linger.ms`, `message.max.bytes`, …). pgferry sets
    /// `bootstrap.servers`, `transactional.id` and `enable.idempotence`
    /// itself; those are refused here.
    #[serde(default)]
    pub kafka: BTreeMap<String, PropValue>,
    /// The tables published, by `schema.table`, each with its options. When
    /// the map is present only the listed tables are published (each must be
    /// in `source.tables`); absent: every table of `source.tables`. The same
    /// rule as the NATS sink's `tables`.
    #[serde(default)]
    pub tables: BTreeMap<String, KafkaTableConfig>,
}

/// `[sink.tables."schema.table"]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTableConfig {
    /// The table's topic, instead of the `topic` template.
    #[serde(default)]
    pub topic: Option<String>,
}

/// A librdkafka property value: TOML strings, integers, floats and
/// booleans are all passed as their text.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PropValue {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl PropValue {
    pub fn text(&self) -> String {
        match self {
            PropValue::Text(s) => s.clone(),
            PropValue::Int(i) => i.to_string(),
            PropValue::Float(f) => f.to_string(),
            PropValue::Bool(b) => b.to_string(),
        }
    }
}

/// Properties pgferry sets from its own keys.
const OWNED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set `brokers` instead"),
    (
        "transactional.id",
        "it is derived from the sink name; rename the sink instead",
    ),
    (
        "enable.idempotence",
        "pgferry always uses the idempotent producer; `exactly_once` picks transactions",
    ),
];

fn default_topic() -> String {
    "pgferry.{schema}.{table}".into()
}

fn default_timeout() -> u64 {
    30
}

fn yes() -> bool {
    true
}

impl KafkaConfig {
    /// `pgferry.<name>`.
    pub fn transactional_id(&self) -> String {
        format!("pgferry.{}", self.name)
    }

    /// `__pgferry_position.<name>`.
    pub fn position_topic(&self) -> String {
        format!("__pgferry_position.{}", self.name)
    }

    /// The tables published (`None`: all of `source.tables`).
    pub fn table_names(&self) -> Option<Vec<String>> {
        (!self.tables.is_empty()).then(|| self.tables.keys().cloned().collect())
    }

    /// Per-table topic overrides, by `schema.table`.
    pub fn overrides(&self) -> BTreeMap<String, String> {
        self.tables
            .iter()
            .filter_map(|(t, c)| Some((t.clone(), c.topic.clone()?)))
            .collect()
    }

    /// The largest record the producer accepts (`message.max.bytes`,
    /// librdkafka's default 1,000,000).
    pub fn max_message_bytes(&self) -> usize {
        self.kafka
            .get("message.max.bytes")
            .and_then(|v| v.text().parse().ok())
            .unwrap_or(1_000_000)
    }

    /// Checks what serde cannot. The error is `(key below the sink, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.brokers.trim().is_empty() {
            return Err((
                "brokers".into(),
                "is empty; list the bootstrap brokers, e.g. \"127.0.0.1:9092\"".into(),
            ));
        }
        check_template(&self.topic, check_kafka_topic).map_err(|m| ("topic".into(), m))?;
        check_kafka_topic(&self.position_topic()).map_err(|m| {
            (
                "name".into(),
                format!("names the position topic, which is no valid topic name: {m}"),
            )
        })?;
        for (t, c) in &self.tables {
            if let Some(topic) = &c.topic {
                check_kafka_topic(topic).map_err(|m| (format!("tables.{t:?}.topic"), m))?;
            }
        }
        for (key, why) in OWNED {
            if self.kafka.contains_key(*key) {
                return Err((
                    format!("kafka.{key:?}"),
                    format!("is set by pgferry: {why}"),
                ));
            }
        }
        if self.timeout_secs == 0 {
            return Err(("timeout_secs".into(), "must be at least 1".into()));
        }
        for (key, value) in [
            ("partitions", self.partitions),
            ("replication_factor", self.replication_factor),
        ] {
            if value == Some(0) || value.is_some_and(|v| v > i32::MAX as u32) {
                return Err((key.into(), "must be at least 1".into()));
            }
        }
        Ok(())
    }

    /// The passthrough properties with secrets replaced by `***`, for logs.
    pub fn redacted_properties(&self) -> BTreeMap<&str, String> {
        self.kafka
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret(k) { "***".into() } else { v.text() };
                (k.as_str(), shown)
            })
            .collect()
    }
}

/// Whether a librdkafka property holds a secret (a password, a key, a
/// token).
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "oauthbearer.config",
        "key.pem",
        "token",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("name", &self.name)
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("format", &self.format)
            .field("exactly_once", &self.exactly_once)
            .field("tombstones", &self.tombstones)
            .field("create_topics", &self.create_topics)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("timeout_secs", &self.timeout_secs)
            .field("max_failure_secs", &self.max_failure_secs)
            .field("kafka", &self.redacted_properties())
            .field("tables", &self.tables)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, SinkConfig};

    const SOURCE: &str = "[source]\nurl = \"postgres://u@h/db\"\nslot = \"s\"\npublication = \"p\"\ntables = [\"public.products\"]\n[checkpoint]\ndir = \"st\"\n";

    fn parse(sink: &str) -> Result<Config, String> {
        let text = format!("{SOURCE}\n[[sink]]\nname = \"events\"\ntype = \"kafka\"\n{sink}");
        Config::parse(&text, Path::new("t.toml"), |_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn the_issue_example_parses_with_its_defaults() {
        let c = parse(
            "brokers = \"127.0.0.1:9092\"\n[sink.kafka]\n\"security.protocol\" = \"sasl_ssl\"\n\"sasl.password\" = \"hunter2\"\n\"linger.ms\" = 5\n\
             [sink.tables.\"public.products\"]\ntopic = \"products\"\n",
        )
        .unwrap();
        let SinkConfig::Kafka(k) = &c.sinks[0] else {
            panic!("not a kafka sink")
        };
        assert_eq!(k.topic, "pgferry.{schema}.{table}");
        assert!(k.exactly_once && k.tombstones && k.create_topics);
        assert_eq!(k.format, crate::sink::eventlog::Format::Pgferry);
        assert_eq!(k.transactional_id(), "pgferry.events");
        assert_eq!(k.position_topic(), "__pgferry_position.events");
        assert_eq!(k.overrides()["public.products"], "products");
        assert_eq!(k.kafka["linger.ms"].text(), "5");
        assert_eq!(k.max_message_bytes(), 1_000_000);
        let shown = format!("{k:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("sasl_ssl"),
            "{shown}"
        );
        assert_eq!(c.sinks[0].tables(), Some(vec!["public.products".into()]));
        let all = parse("brokers = \"b:9092\"\n").unwrap();
        assert!(all.sinks[0].tables().is_none());
    }

    #[test]
    fn tables_filter_and_must_be_in_source_tables() {
        let e = parse("brokers = \"b:9092\"\n[sink.tables.\"public.orders\"]\n").unwrap_err();
        assert!(
            e.contains("sink[0].tables.\"public.orders\"") && e.contains("source.tables"),
            "{e}"
        );
        let e = parse("brokers = \"b:9092\"\n[sink.tables.\"a.b.c\"]\n").unwrap_err();
        assert!(e.contains("tables") && e.contains("schema.table"), "{e}");
    }

    #[test]
    fn mistakes_name_the_key_and_the_fix() {
        let e = parse("brokers = \"b:9092\"\nexactly_one = true\n").unwrap_err();
        assert!(e.contains("exactly_one"), "{e}");
        let e = parse("brokers = \"b:9092\"\n[sink.kafka]\n\"transactional.id\" = \"x\"\n")
            .unwrap_err();
        assert!(
            e.contains("transactional.id") && e.contains("sink name"),
            "{e}"
        );
        let e = parse("brokers = \"b:9092\"\ntopic = \"cdc/{table}\"\n").unwrap_err();
        assert!(e.contains("sink[0].topic") && e.contains('/'), "{e}");
        let e = parse("brokers = \"b:9092\"\nformat = \"avro\"\n").unwrap_err();
        assert!(e.contains("format"), "{e}");
        let e = parse("brokers = \"\"\n").unwrap_err();
        assert!(e.contains("brokers"), "{e}");
        let e = parse("brokers = \"b:9092\"\npartitions = 0\n").unwrap_err();
        assert!(e.contains("partitions"), "{e}");
        let e = parse("brokers = \"b:9092\"\n[sink.tables.\"public.products\"]\ntopic = \"a b\"\n")
            .unwrap_err();
        assert!(e.contains("topic"), "{e}");
    }
}
