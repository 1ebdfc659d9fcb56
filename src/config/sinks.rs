//! `[[sink]]` entries: the `type` key picks the variant, then the other keys
//! are read with their full path (`sink[2].tables`) in every error.

use super::*;

/// One `[[sink]]`. The `type` key picks the variant.
#[derive(Debug)]
pub enum SinkConfig {
    /// JSON lines to a file or stdout.
    Jsonl(crate::sink::jsonl::JsonlConfig),
    /// Discards everything (benchmarks).
    Null(crate::sink::null::NullConfig),
    /// Keeps Redis keys in step with the tables (json, hash or invalidate).
    Redis(crate::sink::redis::RedisConfig),
    /// Documents in Elasticsearch or OpenSearch indices (`type =
    /// "elasticsearch"` or `"opensearch"`).
    Elasticsearch(crate::sink::elasticsearch::ElasticsearchConfig),
    /// An append-only Apache Iceberg change log per table (built with
    /// `--features iceberg`).
    #[cfg(feature = "iceberg")]
    Iceberg(crate::sink::iceberg::IcebergConfig),
    /// Publishes the change events to NATS JetStream.
    Nats(crate::sink::nats::NatsConfig),
    /// Change events on Kafka topics (effectively-once with transactions).
    Kafka(crate::sink::kafka::KafkaConfig),
}

impl SinkConfig {
    /// Reads `sink[i]`: its `type` picks the variant, and the other keys
    /// are read with their full path in errors.
    pub(super) fn from_toml(i: usize, item: toml::Value) -> Result<SinkConfig, ConfigError> {
        let at = format!("sink[{i}]");
        let toml::Value::Table(mut table) = item else {
            return Err(key_err(
                at,
                "must be a table: write [[sink]] and its keys below it",
            ));
        };
        const TYPES: &str = "jsonl, redis, elasticsearch, opensearch, kafka, nats, iceberg or null";
        let kind = match table.remove("type") {
            Some(toml::Value::String(s)) => s,
            Some(_) => {
                return Err(key_err(
                    format!("{at}.type"),
                    format!("must be a string: one of {TYPES}"),
                ))
            }
            None => {
                return Err(key_err(
                    format!("{at}.type"),
                    format!("is missing; set it to one of {TYPES}"),
                ))
            }
        };
        let value = toml::Value::Table(table);
        Ok(match kind.as_str() {
            "jsonl" => SinkConfig::Jsonl(deserialize_at(&at, value)?),
            "null" => SinkConfig::Null(deserialize_at(&at, value)?),
            "redis" => SinkConfig::Redis(deserialize_at(&at, value)?),
            "nats" => SinkConfig::Nats(deserialize_at(&at, value)?),
            "kafka" => SinkConfig::Kafka(deserialize_at(&at, value)?),
            "elasticsearch" | "opensearch" => {
                SinkConfig::Elasticsearch(deserialize_at(&at, value)?)
            }
            #[cfg(feature = "iceberg")]
            "iceberg" => SinkConfig::Iceberg(deserialize_at(&at, value)?),
            #[cfg(not(feature = "iceberg"))]
            "iceberg" => {
                return Err(key_err(
                    format!("{at}.type"),
                    "\"iceberg\": this pgferry was built without the Iceberg sink; \
                     build it with `cargo build --release --features iceberg`",
                ))
            }
            other => {
                return Err(key_err(
                    format!("{at}.type"),
                    format!("unknown sink type {other:?}; use one of {TYPES}"),
                ))
            }
        })
    }

    /// Calls `f` on every file or directory path of the sink's config.
    pub(super) fn for_each_path(&mut self, f: &impl Fn(&mut PathBuf)) {
        match self {
            SinkConfig::Jsonl(c) => f(&mut c.path),
            SinkConfig::Null(_) | SinkConfig::Kafka(_) => {}
            SinkConfig::Redis(c) => c.tls_ca_file.iter_mut().for_each(f),
            SinkConfig::Nats(c) => {
                let files = [
                    &mut c.tls_ca_file,
                    &mut c.credentials_file,
                    &mut c.nkey_seed_file,
                ];
                files.into_iter().for_each(|p| p.iter_mut().for_each(f));
            }
            SinkConfig::Elasticsearch(c) => {
                c.ca_file.iter_mut().for_each(f);
                c.dead_letter_path.iter_mut().for_each(f);
                c.mapping_file.iter_mut().for_each(f);
                for t in c.tables.values_mut() {
                    t.mapping_file.iter_mut().for_each(f);
                }
            }
            #[cfg(feature = "iceberg")]
            SinkConfig::Iceberg(c) => {
                f(&mut c.warehouse);
                if let Some(cat) = &mut c.catalog {
                    let mut p = crate::sink::iceberg::config::catalog_file(&cat.uri);
                    f(&mut p);
                    cat.uri = p.display().to_string();
                }
            }
        }
    }

    /// Rewrites the sink's table names into canonical `schema.table`. The
    /// error is `(key below the sink, message)`.
    pub(super) fn canonicalize_tables(&mut self) -> Result<(), (String, String)> {
        let list = |tables: &mut Option<Vec<String>>| -> Result<(), (String, String)> {
            for (i, t) in tables.iter_mut().flatten().enumerate() {
                *t = canonical_table(t).ok_or_else(|| {
                    (
                        format!("tables[{i}]"),
                        format!("{t:?} is not a table name; write schema.table, e.g. \"public.products\""),
                    )
                })?;
            }
            Ok(())
        };
        let keyed = |e: (String, String)| (format!("tables.{:?}", e.0), e.1);
        match self {
            SinkConfig::Jsonl(c) => list(&mut c.tables),
            SinkConfig::Null(c) => list(&mut c.tables),
            #[cfg(feature = "iceberg")]
            SinkConfig::Iceberg(c) => list(&mut c.tables),
            SinkConfig::Redis(c) => {
                c.tables = canonical_keys(std::mem::take(&mut c.tables)).map_err(keyed)?;
                Ok(())
            }
            SinkConfig::Nats(c) => {
                c.tables = canonical_keys(std::mem::take(&mut c.tables)).map_err(keyed)?;
                Ok(())
            }
            SinkConfig::Kafka(c) => {
                c.tables = canonical_keys(std::mem::take(&mut c.tables)).map_err(keyed)?;
                Ok(())
            }
            SinkConfig::Elasticsearch(c) => {
                c.tables = canonical_keys(std::mem::take(&mut c.tables)).map_err(keyed)?;
                Ok(())
            }
        }
    }

    pub fn name(&self) -> &str {
        match self {
            SinkConfig::Jsonl(c) => &c.name,
            SinkConfig::Null(c) => &c.name,
            SinkConfig::Redis(c) => &c.name,
            SinkConfig::Nats(c) => &c.name,
            SinkConfig::Kafka(c) => &c.name,
            SinkConfig::Elasticsearch(c) => &c.name,
            #[cfg(feature = "iceberg")]
            SinkConfig::Iceberg(c) => &c.name,
        }
    }

    /// Stop pgferry when the sink has been failing this long (`None`: retry forever).
    pub fn max_failure_secs(&self) -> Option<u64> {
        match self {
            SinkConfig::Jsonl(c) => c.max_failure_secs,
            SinkConfig::Null(_) => None,
            SinkConfig::Redis(c) => c.max_failure_secs,
            SinkConfig::Nats(c) => c.max_failure_secs,
            SinkConfig::Kafka(c) => c.max_failure_secs,
            SinkConfig::Elasticsearch(c) => c.max_failure_secs,
            #[cfg(feature = "iceberg")]
            SinkConfig::Iceberg(c) => c.max_failure_secs,
        }
    }

    /// What to do when the sink's store lost pgferry's state (`on_data_loss`).
    pub fn on_data_loss(&self) -> OnDataLoss {
        match self {
            SinkConfig::Jsonl(_)
            | SinkConfig::Null(_)
            | SinkConfig::Nats(_)
            | SinkConfig::Kafka(_) => OnDataLoss::Warn,
            #[cfg(feature = "iceberg")]
            SinkConfig::Iceberg(_) => OnDataLoss::Warn,
            SinkConfig::Redis(c) => c.on_data_loss,
            SinkConfig::Elasticsearch(c) => c.on_data_loss,
        }
    }

    /// How long the sink's task waits for more transactions to fill a batch,
    /// and the batch size (in change events) that ends the wait early.
    /// `None`: no waiting, a batch is what is queued.
    pub fn linger(&self) -> Option<(std::time::Duration, usize)> {
        match self {
            SinkConfig::Elasticsearch(c) if c.batch_max_ms > 0 => Some((
                std::time::Duration::from_millis(c.batch_max_ms),
                c.batch_max_docs,
            )),
            _ => None,
        }
    }

    /// The least time between two checkpoints of this sink, when it wants
    /// more than `pipeline.checkpoint_interval_ms` (each checkpoint flushes
    /// the sink: for Iceberg, a commit).
    pub fn checkpoint_interval(&self) -> Option<std::time::Duration> {
        #[cfg(feature = "iceberg")]
        if let SinkConfig::Iceberg(c) = self {
            return Some(std::time::Duration::from_secs(c.commit_interval_secs));
        }
        None
    }

    /// The tables this sink receives (`None`: all of `[source].tables`).
    /// Sinks with per-table options return the keys of their `tables` map.
    pub fn tables(&self) -> Option<Vec<String>> {
        match self {
            SinkConfig::Jsonl(c) => c.tables.clone(),
            SinkConfig::Null(c) => c.tables.clone(),
            SinkConfig::Redis(c) => Some(c.tables.keys().cloned().collect()),
            SinkConfig::Nats(c) => c.table_names(),
            SinkConfig::Kafka(c) => c.table_names(),
            SinkConfig::Elasticsearch(c) => Some(c.table_names()),
            #[cfg(feature = "iceberg")]
            SinkConfig::Iceberg(c) => c.tables.clone(),
        }
    }

    /// Checks a sink's own options. The error is `(key below the sink, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        match self {
            SinkConfig::Redis(c) => c.validate(),
            SinkConfig::Nats(c) => c.validate(),
            SinkConfig::Kafka(c) => c.validate(),
            SinkConfig::Elasticsearch(c) => c.validate(),
            #[cfg(feature = "iceberg")]
            SinkConfig::Iceberg(c) => c.validate(),
            SinkConfig::Jsonl(_) | SinkConfig::Null(_) => Ok(()),
        }
    }
}
