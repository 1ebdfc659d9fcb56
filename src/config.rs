//! The TOML configuration.
//!
//! Files: this one holds the structs (one doc comment per key: the user
//! docs); `load` reads and validates a file, `sinks` reads `[[sink]]`
//! entries, `names` makes table names canonical, `redact` keeps secrets out
//! of what is printed.
//!
//! Invariants:
//! - every table of the file is `deny_unknown_fields`: a misspelt key is an
//!   error that names its full path (`source.slott`), never silently ignored;
//! - `${ENV_VAR}` in any string value is replaced by the variable's value
//!   before the file is interpreted; a missing variable is an error naming the
//!   key and the variable;
//! - secrets (the connection password) never reach `Debug` or logs: the source
//!   URL is only ever printed through [`SourceConfig::redacted_url`], which
//!   parses the URL or key=value string rather than matching a pattern;
//! - every table name is canonical after loading: `schema.table`, a bare
//!   `table` meaning `public.table`, in `source.tables`, `source.publish` and
//!   every sink's `tables`, so a name matches the stream's names whatever way
//!   it was written; a sink table that is not in `source.tables` is an error;
//! - relative paths (`checkpoint.dir`, `pipeline.spill_dir`, a JSONL `path`,
//!   CA, mapping and dead-letter files) are relative to the config file's
//!   directory, not to the current directory, so every command finds the
//!   same state wherever it is run from.

mod load;
mod names;
mod redact;
mod sinks;

pub use load::*;
pub use names::*;
pub use redact::*;
pub use sinks::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration problem, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

fn key_err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The Postgres server to replicate from.
    pub source: SourceConfig,
    /// Where per-sink progress is stored.
    pub checkpoint: CheckpointConfig,
    /// Tuning of the in-process pipeline.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Tuning of snapshots and backfills.
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    /// The destinations (`[[sink]]`). At least one. Read by
    /// [`SinkConfig::from_toml`], one at a time, so errors name their path.
    #[serde(skip)]
    pub sinks: Vec<SinkConfig>,
    /// The `/metrics`, `/healthz` and `/readyz` endpoints, lag and slot polling.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Periodic `pg_logical_emit_message` so the slot advances on an idle database.
    #[serde(default)]
    pub heartbeat: HeartbeatConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[log]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `auto` (human-readable on a terminal, JSON otherwise), `text` or
    /// `json`. The `--log-format` option overrides it. Default `auto`.
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Auto,
    Text,
    Json,
}

/// `[source]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq-style URL or key=value string: `postgres://user:pass@host:port/db`.
    pub url: String,
    /// The logical replication slot (created when missing and `create_slot`).
    pub slot: String,
    /// The publication (created for `tables` when missing and `create_publication`).
    pub publication: String,
    /// `schema.table` names to replicate (a bare `table` means `public.table`).
    pub tables: Vec<String>,
    /// Per table, which changes are published: `"all"` (default: inserts,
    /// updates, deletes and truncates) or `"insert"` (inserts and truncates
    /// only). A table without a primary key, replica identity index or
    /// `REPLICA IDENTITY FULL` must be `"insert"`: publishing its updates and
    /// deletes would make Postgres refuse the application's own `UPDATE` and
    /// `DELETE` on it, so pgferry refuses to start instead. Insert-only tables
    /// go to a second publication, `<publication>_insert`.
    #[serde(default)]
    pub publish: BTreeMap<String, PublishOps>,
    /// Create the slot when it does not exist. Default true.
    #[serde(default = "yes")]
    pub create_slot: bool,
    /// pgferry manages the publication (default true): it creates it when it
    /// does not exist, together with `<publication>_insert` for insert-only
    /// tables, and adds the tables of `tables` that it lacks (a table added
    /// there later then needs a backfill, which pgferry requests itself with
    /// `source.snapshot = "initial"`). With false, pgferry refuses to start
    /// until the publication covers `tables`, and names the statement to run.
    #[serde(default = "yes")]
    pub create_publication: bool,
    /// Ask for in-progress transactions to be streamed (protocol 2, PostgreSQL 14+). Default true.
    #[serde(default = "yes")]
    pub streaming: bool,
    /// Seconds between standby status updates sent on pgferry's own initiative.
    /// Capped to half of the server's `wal_sender_timeout`. Default 10.
    #[serde(default = "ten")]
    pub status_interval_secs: u64,
    /// Socket receive buffer of the replication connection, in KiB (default:
    /// the kernel's autotuning). A bounded buffer lets the walsender batch its
    /// writes when pgferry reads in bursts.
    #[serde(default)]
    pub recv_buffer_kb: Option<u32>,
    /// After a short read, wait this many microseconds before the next read,
    /// so the server's small writes are received together (default 0: off).
    #[serde(default)]
    pub read_coalesce_us: u64,
    /// Adaptive read pacing: after a read that found at least 64 KiB waiting
    /// (a thick stream), wait this many microseconds before the next read,
    /// so that the server's socket fills and the walsender sends fewer,
    /// larger segments, which costs it less CPU. After a shorter read (a
    /// thin stream) pgferry reads again at once, so latency is unchanged.
    /// 0: off.
    #[serde(default = "default_read_pace_us")]
    pub read_pace_us: u64,
    /// `"initial"`: on the first start (no sink has a checkpoint yet), load
    /// every table of `tables` into every sink, online, while the stream
    /// runs (see `[snapshot]`). `"never"` (default): start at the slot's
    /// position and deliver only changes.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Liveness of the connections to the server (`[source.network]`).
    #[serde(default)]
    pub network: NetworkConfig,
    /// TLS to the server (`[source.tls]`): the same keys as in `source.url`.
    #[serde(default)]
    pub tls: TlsConfig,
}

/// `[source.tls]`: libpq's TLS keys, as an alternative to writing them in
/// `source.url`. At load they are folded into `source.url` (a key may be
/// set in one place only), so every connection pgferry opens (replication,
/// SQL, snapshot workers, observer, `check`) has the same TLS. Relative
/// paths are relative to the config file. The same struct as the URL's
/// keys (`conn::tls::TlsParams`): `sslpassword` is `***` in `Debug`.
pub type TlsConfig = crate::conn::tls::TlsParams;

/// What a sink does when, at start, its store no longer holds pgferry's
/// state although the sink has a checkpoint (`on_data_loss`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDataLoss {
    /// Log it (WARN), count it and report it on `/readyz`; go on.
    #[default]
    Warn,
    /// As `warn`, then reload the sink's tables into this sink alone.
    Backfill,
    /// Stop pgferry with the operator's options.
    Stop,
}

/// `[source.network]`: how pgferry notices a dead or hung connection to the
/// server. TCP keepalive finds a peer that vanished (a host or NAT state
/// gone); the stream's read deadline (the server's `wal_sender_timeout`
/// plus a margin, see `proto-notes/replication.md`) finds a path that stays
/// open but carries nothing.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Seconds a connection is idle before the first TCP keepalive probe. Default 30.
    #[serde(default = "default_keepalive_idle")]
    pub tcp_keepalive_idle_secs: u64,
    /// Seconds between two unanswered keepalive probes. Default 10.
    #[serde(default = "ten")]
    pub tcp_keepalive_interval_secs: u64,
    /// Unanswered probes after which the kernel drops the connection. Default 3.
    #[serde(default = "default_keepalive_count")]
    pub tcp_keepalive_count: u32,
    /// Seconds to connect, log in and get each answer before streaming starts
    /// (creating the slot excepted: it waits for running transactions).
    /// Default 10.
    #[serde(default = "ten")]
    pub connect_timeout_secs: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            tcp_keepalive_idle_secs: default_keepalive_idle(),
            tcp_keepalive_interval_secs: 10,
            tcp_keepalive_count: default_keepalive_count(),
            connect_timeout_secs: 10,
        }
    }
}

impl NetworkConfig {
    /// [`Self::connect_timeout_secs`] as a duration.
    pub fn connect_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.connect_timeout_secs)
    }

    /// Checks the values; the error is `(key below source.network, message)`.
    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        for (key, v) in [
            ("tcp_keepalive_idle_secs", self.tcp_keepalive_idle_secs),
            (
                "tcp_keepalive_interval_secs",
                self.tcp_keepalive_interval_secs,
            ),
            ("tcp_keepalive_count", u64::from(self.tcp_keepalive_count)),
            ("connect_timeout_secs", self.connect_timeout_secs),
        ] {
            if v == 0 {
                return Err((key, "must be at least 1"));
            }
        }
        Ok(())
    }
}

fn default_keepalive_idle() -> u64 {
    30
}
fn default_keepalive_count() -> u32 {
    3
}

/// `source.publish`: which changes of a table are published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishOps {
    /// Inserts, updates, deletes and truncates.
    #[default]
    All,
    /// Inserts and truncates: for tables without a replica identity, whose
    /// updates and deletes cannot be published.
    Insert,
}

/// `source.snapshot`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    Initial,
    #[default]
    Never,
}

/// `[snapshot]`: how snapshots and backfills read tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Tables (or key ranges of a large table) read at the same time, each on
    /// its own connection. Default 2.
    #[serde(default = "default_snapshot_workers")]
    pub workers: usize,
    /// Rows per chunk: one short read between two watermarks. Memory holds at
    /// most `workers` chunks. Default 10000.
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: usize,
    /// Seconds between two progress lines in the log. Default 10.
    #[serde(default = "ten")]
    pub progress_log_secs: u64,
    /// Show a progress bar on stderr when it is a terminal. Default true.
    #[serde(default = "yes")]
    pub progress_bar: bool,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            workers: default_snapshot_workers(),
            chunk_rows: default_chunk_rows(),
            progress_log_secs: 10,
            progress_bar: true,
        }
    }
}

fn default_snapshot_workers() -> usize {
    2
}
fn default_chunk_rows() -> usize {
    10_000
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("url", &self.redacted_url())
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("tables", &self.tables)
            .field("publish", &self.publish)
            .field("create_slot", &self.create_slot)
            .field("create_publication", &self.create_publication)
            .field("streaming", &self.streaming)
            .field("snapshot", &self.snapshot)
            .field("status_interval_secs", &self.status_interval_secs)
            .field("recv_buffer_kb", &self.recv_buffer_kb)
            .field("read_coalesce_us", &self.read_coalesce_us)
            .field("read_pace_us", &self.read_pace_us)
            .field("network", &self.network)
            .field("tls", &self.tls)
            .finish()
    }
}

impl SourceConfig {
    /// The URL with any password replaced by `***`, safe for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// The tables as (schema, table) pairs, validated by [`Config::validate`].
    pub fn table_names(&self) -> Vec<(String, String)> {
        self.tables.iter().filter_map(|t| split_table(t)).collect()
    }

    /// What is published of `table` (a canonical `schema.table`).
    pub fn publish_ops(&self, table: &str) -> PublishOps {
        self.publish.get(table).copied().unwrap_or_default()
    }

    /// The publication of the insert-only tables (`source.publish = "insert"`).
    pub fn insert_publication(&self) -> String {
        format!("{}_insert", self.publication)
    }
}

/// `[checkpoint]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Directory for per-sink checkpoint files (created when missing).
    pub dir: PathBuf,
}

/// `[pipeline]`: optional tuning.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Memory for assembling transactions, in MiB. A transaction that would go
    /// over it is spilled to disk, so memory stays bounded whatever its size.
    /// The same amount again bounds committed transactions waiting for sinks.
    #[serde(default = "default_memory_mb")]
    pub memory_limit_mb: u64,
    /// Where spill files go. Default: `<checkpoint.dir>/spill`.
    #[serde(default)]
    pub spill_dir: Option<PathBuf>,
    /// Largest number of change events handed to a sink in one batch.
    #[serde(default = "default_batch_events")]
    pub batch_max_events: usize,
    /// Least milliseconds between two checkpoints of a sink. Each checkpoint
    /// makes the sink durable (e.g. an fsync) and lets the slot advance.
    #[serde(default = "default_checkpoint_ms")]
    pub checkpoint_interval_ms: u64,
    /// A sink whose queue stays full this many milliseconds while the others
    /// wait is detached, failing or not, so that it holds them back at most
    /// this long; it is replayed from its checkpoint once it drains.
    /// Default 5000.
    #[serde(default = "default_slow_sink_detach_ms")]
    pub slow_sink_detach_ms: u64,
    /// Threads of the async runtime that runs the stream, the sinks and the
    /// snapshot workers. 0 (default): one per CPU. 1: one thread for
    /// everything (a current-thread runtime), which measured 0.76-0.83x the
    /// CPU per change and 1.07-1.14x the speed into JSONL, but a 2x worse
    /// commit-to-Redis p99 on an oversubscribed machine (benches/RESULTS.md,
    /// issue 14): use it where pgferry's CPU matters more than its latency
    /// under CPU contention. Blocking work (checkpoint files, producers of
    /// some sinks) has its own threads either way.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
}

fn default_read_pace_us() -> u64 {
    0
}

fn default_worker_threads() -> usize {
    0
}

fn default_slow_sink_detach_ms() -> u64 {
    5000
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            memory_limit_mb: default_memory_mb(),
            spill_dir: None,
            batch_max_events: default_batch_events(),
            checkpoint_interval_ms: default_checkpoint_ms(),
            slow_sink_detach_ms: default_slow_sink_detach_ms(),
            worker_threads: default_worker_threads(),
        }
    }
}

/// `[metrics]`: observability. Lag and slot polling, the retained-WAL
/// warning and the progress log lines run whether or not the HTTP endpoint
/// is enabled.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` (Prometheus text), `/healthz` and `/readyz`. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `host:port` the HTTP endpoint listens on. Default `127.0.0.1:9187`.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
    /// Seconds between two progress log lines (events/s, lag, sink states); 0: none. Default 30.
    #[serde(default = "default_progress_log_secs")]
    pub progress_log_secs: u64,
    /// Seconds between two polls of the server's WAL position and the slot
    /// (replication lag, retained WAL, `wal_status`). Default 5.
    #[serde(default = "default_poll_secs")]
    pub poll_interval_secs: u64,
    /// Retained WAL (bytes the slot holds back on the server) above which
    /// pgferry warns in its log and `/readyz` reports not ready; 0: never.
    /// Default 1073741824 (1 GiB).
    #[serde(default = "default_wal_warn_bytes")]
    pub wal_warn_bytes: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: default_metrics_listen(),
            progress_log_secs: default_progress_log_secs(),
            poll_interval_secs: default_poll_secs(),
            wal_warn_bytes: default_wal_warn_bytes(),
        }
    }
}

/// `[heartbeat]`: keeps the slot advancing when the database is idle or
/// writes only to tables outside the publication.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Emit a transactional logical message (`pg_logical_emit_message`) every
    /// `interval_secs`. Needs superuser or `GRANT EXECUTE ON FUNCTION
    /// pg_logical_emit_message(boolean, text, text)`. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Seconds between two heartbeats. Default 10.
    #[serde(default = "ten")]
    pub interval_secs: u64,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            enabled: true,
            interval_secs: 10,
        }
    }
}

fn yes() -> bool {
    true
}
fn ten() -> u64 {
    10
}
fn default_memory_mb() -> u64 {
    16
}
fn default_checkpoint_ms() -> u64 {
    100
}
fn default_batch_events() -> usize {
    8192
}
fn default_metrics_listen() -> String {
    "127.0.0.1:9187".into()
}
fn default_progress_log_secs() -> u64 {
    30
}
fn default_poll_secs() -> u64 {
    5
}
fn default_wal_warn_bytes() -> u64 {
    1 << 30
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[source]
url = "postgres://postgres@127.0.0.1:5432/app"
slot = "pgferry"
publication = "pgferry"
tables = ["public.products"]     # the publication is created for these when missing

[checkpoint]
dir = "pgferry-state"

[[sink]]
name = "changes"
type = "jsonl"
path = "changes.jsonl"           # "-" for stdout
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"), |name| {
            (name == "PG_PASSWORD").then(|| "s3cr3t".to_string())
        })
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.source.slot, "pgferry");
        assert_eq!(c.sinks.len(), 1);
        assert_eq!(c.sinks[0].name(), "changes");
        assert_eq!(c.spill_dir(), PathBuf::from("pgferry-state/spill"));
    }

    #[test]
    fn tls_keys_fold_into_the_url_and_name_their_key() {
        let with = |url: &str, tls: &str| {
            EXAMPLE
                .replace(
                    "url = \"postgres://postgres@127.0.0.1:5432/app\"",
                    &format!("url = \"{url}\""),
                )
                .replace(
                    "[checkpoint]",
                    &format!("[source.tls]\n{tls}\n\n[checkpoint]"),
                )
        };
        let c = parse(&with("postgres://u@h/app", "sslmode = \"require\"")).unwrap();
        assert_eq!(c.source.url, "postgres://u@h/app?sslmode=require");
        let e = parse(&with(
            "postgres://u@h/app?sslmode=disable",
            "sslmode = \"require\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("source.tls.sslmode") && e.contains("one place"),
            "{e}"
        );
        let e = parse(&with("postgres://u@h/app", "sslmode = \"verify-full\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("source.tls.sslrootcert") || e.contains("sslrootcert"),
            "{e}"
        );
        let e = parse(&with(
            "postgres://u@h/app?sslmode=verify-ca&sslrootcert=/no/ca.pem",
            "",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("source.url (sslrootcert)") && e.contains("/no/ca.pem"),
            "{e}"
        );
        let e = parse(&with(
            "postgres://u@h/app",
            "sslkey = \"/k.pem\"\nsslcert = \"/c.pem\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("source.tls.sslrootcert") || e.contains("source.tls.ssl"),
            "{e}"
        );
        let dbg = format!(
            "{:?}",
            parse(&with("postgres://u:pw@h/app", "")).unwrap().source
        );
        assert!(!dbg.contains("pw@"), "{dbg}");
        // sslpassword without sslkey is named; its value is never shown.
        let e = parse(&with("postgres://u@h/app", "sslpassword = \"hush-1\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("source.tls.sslpassword") && !e.contains("hush-1"),
            "{e}"
        );
        let t = TlsConfig {
            sslpassword: Some("hush-1".into()),
            ..Default::default()
        };
        assert!(!format!("{t:?}").contains("hush-1"));
    }

    #[test]
    fn an_iceberg_sink_is_read_with_the_feature_and_named_without_it() {
        let text = format!(
            "{EXAMPLE}\n[[sink]]\nname = \"lake\"\ntype = \"iceberg\"\nwarehouse = \"/tmp/lake\"\n\
             catalog = {{ type = \"sql\", uri = \"sqlite:////tmp/lake/c.db\" }}\n"
        );
        let r = parse(&text);
        #[cfg(feature = "iceberg")]
        {
            let c = r.unwrap();
            let SinkConfig::Iceberg(ice) = &c.sinks[1] else {
                panic!("not an iceberg sink")
            };
            assert_eq!(ice.catalog_path(), PathBuf::from("/tmp/lake/c.db"));
            assert_eq!(
                (ice.namespace.as_str(), ice.table.as_str()),
                ("pgferry", "{schema}_{table}")
            );
            assert_eq!(
                c.sinks[1].checkpoint_interval(),
                Some(std::time::Duration::from_secs(10))
            );
            let typo = parse(&text.replace("warehouse =", "warehous ="))
                .unwrap_err()
                .to_string();
            assert!(typo.contains("warehous"), "{typo}");
        }
        #[cfg(not(feature = "iceberg"))]
        {
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("sink[1].type") && e.contains("--features iceberg"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_docker_example_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker");
        let path = dir.join("pgferry.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::parse(&text, &path, |name| {
            (name == "PGPASSWORD").then(|| "pw".to_string())
        })
        .unwrap();
        let kinds: Vec<&str> = c
            .sinks
            .iter()
            .map(|s| match s {
                SinkConfig::Jsonl(_) => "jsonl",
                SinkConfig::Redis(_) => "redis",
                SinkConfig::Elasticsearch(_) => "elasticsearch",
                SinkConfig::Null(_) => "null",
                SinkConfig::Nats(_) => "nats",
                SinkConfig::Kafka(_) => "kafka",
                #[cfg(feature = "iceberg")]
                SinkConfig::Iceberg(_) => "iceberg",
            })
            .collect();
        assert_eq!(kinds, ["jsonl", "redis", "elasticsearch"]);
        // The index body it mounts is a JSON object.
        let mapping = std::fs::read_to_string(dir.join("products-index.json")).unwrap();
        let mapping: serde_json::Value = serde_json::from_str(&mapping).unwrap();
        assert!(mapping["mappings"]["properties"].is_object());
    }

    #[test]
    fn the_readme_worked_example_is_the_docker_config() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let section = &readme[readme.find("## Worked example").unwrap()..];
        let start = section.find("```toml\n").unwrap() + "```toml\n".len();
        let block = &section[start..start + section[start..].find("```").unwrap()];
        let docker = std::fs::read_to_string(root.join("docker/pgferry.toml")).unwrap();
        let env = |name: &str| (name == "PGPASSWORD").then(|| "pw".to_string());
        let p = Path::new("x.toml");
        let a = Config::parse(block, p, env).unwrap();
        let b = Config::parse(&docker, p, env).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        let bad = EXAMPLE.replace("slot = \"pgferry\"", "slott = \"pgferry\"");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("`source.slott`"), "{e}");
        let bad = EXAMPLE.replace("path = ", "paht = ");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("`sink[0].paht`"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn env_vars_are_substituted_and_missing_ones_named() {
        let t = EXAMPLE.replace("postgres@", "postgres:${PG_PASSWORD}@");
        let c = parse(&t).unwrap();
        assert!(c.source.url.contains("s3cr3t"));
        let t = EXAMPLE.replace("postgres@", "postgres:${NOPE}@");
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("source.url") && e.contains("NOPE"), "{e}");
    }

    #[test]
    fn passwords_never_reach_debug_output() {
        let t = EXAMPLE.replace("postgres@", "postgres:${PG_PASSWORD}@");
        let c = parse(&t).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(dbg.contains("postgres:***@127.0.0.1"), "{dbg}");
        assert_eq!(
            redact_url("host=h user=u password=p dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(
            redact_url("postgres://u@h/d?password=p&sslmode=disable"),
            "postgres://u@h/d?password=***&sslmode=disable"
        );
    }

    #[test]
    fn the_documented_redis_sink_parses() {
        let t = EXAMPLE.replace(
            "tables = [\"public.products\"]",
            "tables = [\"public.products\", \"public.accounts\"]",
        ) + r#"
[[sink]]
name = "cache"
type = "redis"
url = "redis://app:${PG_PASSWORD}@127.0.0.1:6379/2"
max_failure_secs = 600
[sink.tables."public.products"]
key = "product:{id}"
mode = "json"            # json | hash | invalidate
ttl_seconds = 3600       # optional
[sink.tables."public.accounts"]
key = "acct:{tenant_id}:{id}"
mode = "hash"
"#;
        let c = parse(&t).unwrap();
        let s = &c.sinks[1];
        assert_eq!(s.name(), "cache");
        assert_eq!(s.max_failure_secs(), Some(600));
        assert_eq!(
            s.tables(),
            Some(vec![
                "public.accounts".to_string(),
                "public.products".to_string()
            ])
        );
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("s3cr3t") && dbg.contains("redis://app:***@127.0.0.1:6379/2"),
            "{dbg}"
        );
        // Errors name the key below the sink.
        let e = parse(&t.replace("key = \"product:{id}\"", "key = \"product:{id\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sink[1].tables.\"public.products\".key"), "{e}");
        let e = parse(&t.replace("mode = \"json\"", "mode = \"list\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sink[1]") && e.contains("list"), "{e}");
        let e = parse(&t.replace("ttl_seconds", "ttl_secs"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ttl_secs"), "{e}");
        let e = parse(&t.replace(
            "[sink.tables.\"public.accounts\"]",
            "[sink.tables.\"public.nope\"]",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("public.nope") && e.contains("source.tables"),
            "{e}"
        );
    }

    #[test]
    fn invalid_values_name_the_key_and_the_fix() {
        let e = parse(&EXAMPLE.replace("\"public.products\"", "\"a.b.c\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("source.tables[0]") && e.contains("schema.table"),
            "{e}"
        );
        let e = parse(&EXAMPLE.replace("slot = \"pgferry\"", "slot = \"Bad-Name\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("source.slot"), "{e}");
        let e = parse(&EXAMPLE.replace("type = \"jsonl\"", "type = \"kafka\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sink[0]") && e.contains("kafka"), "{e}");
    }

    #[test]
    fn metrics_and_heartbeat_have_defaults_and_name_their_keys() {
        let c = parse(EXAMPLE).unwrap();
        assert!(c.metrics.enabled && c.heartbeat.enabled);
        assert_eq!(c.metrics.listen, "127.0.0.1:9187");
        assert_eq!(c.metrics.wal_warn_bytes, 1 << 30);
        assert_eq!(c.heartbeat.interval_secs, 10);
        let c = parse(&format!(
            "{EXAMPLE}\n[metrics]\nlisten = \"0.0.0.0:9999\"\nprogress_log_secs = 0\nwal_warn_bytes = 5\n\n[heartbeat]\nenabled = false\n"
        ))
        .unwrap();
        assert_eq!(c.metrics.listen, "0.0.0.0:9999");
        assert_eq!(c.metrics.progress_log_secs, 0);
        assert!(!c.heartbeat.enabled);
        let e = parse(&format!("{EXAMPLE}\n[metrics]\nlisten = \"localhost\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`metrics.listen`") && e.contains("host:port"),
            "{e}"
        );
        let e = parse(&format!("{EXAMPLE}\n[heartbeat]\ninterval_secs = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`heartbeat.interval_secs`"), "{e}");
        let e = parse(&format!("{EXAMPLE}\n[heartbeat]\nintervall = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`heartbeat.intervall`"), "{e}");
        let c = parse(&format!("{EXAMPLE}\n[log]\nformat = \"json\"\n")).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let e = parse(&format!("{EXAMPLE}\n[log]\nformat = \"xml\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`log.format`") && e.contains("json"), "{e}");
    }

    const SEARCH: &str = r#"
[[sink]]
name = "search"
type = "elasticsearch"
url = "http://127.0.0.1:9200"
[sink.tables."public.products"]
index = "products"
"#;

    #[test]
    fn the_documented_search_sink_parses_with_defaults() {
        let c = parse(&format!("{EXAMPLE}{SEARCH}")).unwrap();
        let SinkConfig::Elasticsearch(es) = &c.sinks[1] else {
            panic!("{:?}", c.sinks[1]);
        };
        assert_eq!(c.sinks[1].name(), "search");
        assert_eq!(
            c.sinks[1].tables(),
            Some(vec!["public.products".to_string()])
        );
        assert_eq!(es.index_for("public.products").as_deref(), Some("products"));
        assert_eq!(es.batch_max_docs, 1000);
        assert_eq!(
            es.dead_letter_path.as_deref(),
            Some(Path::new("pgferry-state/search.dead-letter.jsonl"))
        );
        assert_eq!(
            c.sinks[1].linger(),
            Some((std::time::Duration::from_millis(100), 1000))
        );
        assert_eq!(c.sinks[0].linger(), None);
        let os = parse(&format!(
            "{EXAMPLE}{}",
            SEARCH
                .replace("\"elasticsearch\"", "\"opensearch\"")
                .replace("index = \"products\"\n", "")
        ))
        .unwrap();
        let SinkConfig::Elasticsearch(es) = &os.sinks[1] else {
            panic!("the opensearch alias");
        };
        assert_eq!(
            es.index_for("public.products").as_deref(),
            Some("public.products")
        );
    }

    #[test]
    fn search_sink_secrets_never_reach_debug_output() {
        let t = format!(
            "{EXAMPLE}{}",
            SEARCH.replace(
                "url = \"http://127.0.0.1:9200\"",
                "url = \"https://u:urlpass@h:9200\"\npassword = \"${PG_PASSWORD}\"\nusername = \"elastic\""
            )
        );
        let e = parse(&t).unwrap_err().to_string();
        assert!(
            e.contains("sink[1].url") && !e.contains("urlpass") && !e.contains("s3cr3t"),
            "{e}"
        );
        let t = format!(
            "{EXAMPLE}{}",
            SEARCH.replace(
                "url = \"http://127.0.0.1:9200\"",
                "url = \"https://h:9200\"\npassword = \"${PG_PASSWORD}\"\nusername = \"elastic\""
            )
        );
        let dbg = format!("{:?}", parse(&t).unwrap());
        assert!(!dbg.contains("s3cr3t") && dbg.contains("elastic"), "{dbg}");
        let t = format!(
            "{EXAMPLE}{}",
            SEARCH.replace(
                "url = \"http://127.0.0.1:9200\"",
                "url = \"https://u:urlpass@h:9200\"\napi_key = \"${PG_PASSWORD}\""
            )
        );
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("api_key") && !e.contains("urlpass"), "{e}");
        let t = format!(
            "{EXAMPLE}{}",
            SEARCH.replace(
                "url = \"http://127.0.0.1:9200\"",
                "url = \"https://u:urlpass@h:9200\""
            )
        );
        let dbg = format!("{:?}", parse(&t).unwrap());
        assert!(!dbg.contains("urlpass") && dbg.contains("***@h"), "{dbg}");
        let t = format!(
            "{EXAMPLE}{}",
            SEARCH.replace(
                "url = \"http://127.0.0.1:9200\"",
                "url = \"https://h:9200\"\napi_key = \"${PG_PASSWORD}\""
            )
        );
        let dbg = format!("{:?}", parse(&t).unwrap());
        assert!(
            !dbg.contains("s3cr3t") && dbg.contains("api_key: Some(\"***\")"),
            "{dbg}"
        );
    }

    #[test]
    fn search_sink_mistakes_name_the_key() {
        let bad = |from: &str, to: &str| {
            parse(&format!("{EXAMPLE}{}", SEARCH.replace(from, to)))
                .unwrap_err()
                .to_string()
        };
        let e = bad("index = \"products\"", "index = \"Pro ducts\"");
        assert!(
            e.contains("sink[1].tables.\"public.products\".index"),
            "{e}"
        );
        let e = bad("index = \"products\"", "index = \"{db}_x\"");
        assert!(e.contains("placeholder"), "{e}");
        let e = bad("index = \"products\"", "indx = \"products\"");
        assert!(e.contains("indx"), "{e}");
        let e = bad("public.products\"]\n", "public.orders\"]\n");
        assert!(e.contains("not in source.tables"), "{e}");
        let e = bad(
            "url = \"http://127.0.0.1:9200\"",
            "url = \"127.0.0.1:9200\"",
        );
        assert!(e.contains("sink[1].url"), "{e}");
        let e = bad(
            "url = \"http://127.0.0.1:9200\"",
            "url = \"http://h:9200\"\nusername = \"u\"",
        );
        assert!(e.contains("sink[1].username"), "{e}");
        let e = bad(
            "url = \"http://127.0.0.1:9200\"",
            "url = \"http://h:9200\"\non_error = \"ignore\"",
        );
        assert!(e.contains("sink[1]") && e.contains("ignore"), "{e}");
        let e = bad(
            "url = \"http://127.0.0.1:9200\"",
            "url = \"http://h:9200\"\nbatch_max_docs = 0",
        );
        assert!(e.contains("sink[1].batch_max_docs"), "{e}");
    }

    /// Issue 10, case 2: one canonical spelling of table names everywhere,
    /// and a filter that matches nothing is refused.
    #[test]
    fn table_names_are_canonical_everywhere_and_empty_filters_are_refused() {
        let bare = EXAMPLE
            .replace("\"public.products\"", "\"products\"")
            .replace("path = ", "tables = [\"products\"]\npath = ");
        let c = parse(&bare).unwrap();
        assert_eq!(c.source.tables, ["public.products"]);
        assert_eq!(
            c.sinks[0].tables(),
            Some(vec!["public.products".to_string()])
        );
        let redis = format!(
            "{bare}\n[[sink]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"redis://127.0.0.1\"\n[sink.tables.products]\nkey = \"p:{{id}}\"\n"
        );
        let c = parse(&redis).unwrap();
        assert_eq!(
            c.sinks[1].tables(),
            Some(vec!["public.products".to_string()])
        );
        let e = parse(&EXAMPLE.replace("path = ", "tables = []\npath = "))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sink[0].tables") && e.contains("is empty"),
            "{e}"
        );
        let e = parse(&EXAMPLE.replace("path = ", "tables = [\"public.other\"]\npath = "))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in source.tables"), "{e}");
        let e = parse(&EXAMPLE.replace(
            "[\"public.products\"]",
            "[\"public.products\", \"products\"]",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("source.tables[1]") && e.contains("same table"),
            "{e}"
        );
        let c = parse(&EXAMPLE.replace(
            "tables = [\"public.products\"]",
            "tables = [\"products\"]\npublish = { products = \"insert\" }",
        ))
        .unwrap();
        assert_eq!(c.source.publish_ops("public.products"), PublishOps::Insert);
        let e = parse(&EXAMPLE.replace(
            "tables = [\"public.products\"]",
            "tables = [\"products\"]\npublish = { other = \"insert\" }",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("source.publish") && e.contains("public.other"),
            "{e}"
        );
    }

    #[test]
    fn errors_inside_a_sink_and_missing_keys_name_their_full_path() {
        let no_sink = &EXAMPLE[..EXAMPLE.find("[[sink]]").unwrap()];
        let e = parse(no_sink).unwrap_err().to_string();
        assert!(e.contains("`sink`") && !e.contains("`.`"), "{e}");
        let e = parse(&EXAMPLE.replace("slot = \"pgferry\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`source.slot`") && e.contains("missing"), "{e}");
        let e = parse(&EXAMPLE.replace("path = ", "fsync = \"yes\"\npath = "))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`sink[0].fsync`"), "{e}");
        let redis = format!(
            "{EXAMPLE}\n[[sink]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"redis://h\"\n[sink.tables.\"public.products\"]\nkey = \"p:{{id}}\"\nkeyy = 1\n"
        );
        let e = parse(&redis).unwrap_err().to_string();
        assert!(
            e.contains("`sink[1].tables.\"public.products\".keyy`"),
            "{e}"
        );
        let e = parse(&redis.replace("keyy = 1", "ttl_seconds = \"x\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`sink[1].tables.\"public.products\".ttl_seconds`"),
            "{e}"
        );
        let e = parse(&EXAMPLE.replace("type = \"jsonl\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`sink[0].type`") && e.contains("missing"), "{e}");
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let c = Config::parse(EXAMPLE, Path::new("/etc/pgferry/pgferry.toml"), |_| None).unwrap();
        assert_eq!(
            c.checkpoint.dir,
            PathBuf::from("/etc/pgferry/pgferry-state")
        );
        assert_eq!(
            c.spill_dir(),
            PathBuf::from("/etc/pgferry/pgferry-state/spill")
        );
        let SinkConfig::Jsonl(j) = &c.sinks[0] else {
            panic!()
        };
        assert_eq!(j.path, PathBuf::from("/etc/pgferry/changes.jsonl"));
        let abs = EXAMPLE.replace("\"pgferry-state\"", "\"/var/lib/x\"");
        let c = Config::parse(&abs, Path::new("/etc/pgferry/pgferry.toml"), |_| None).unwrap();
        assert_eq!(c.checkpoint.dir, PathBuf::from("/var/lib/x"));
        let stdout = EXAMPLE.replace("\"changes.jsonl\"", "\"-\"");
        let c = Config::parse(&stdout, Path::new("/etc/pgferry/pgferry.toml"), |_| None).unwrap();
        let SinkConfig::Jsonl(j) = &c.sinks[0] else {
            panic!()
        };
        assert_eq!(j.path, PathBuf::from("-"));
    }

    /// Issue 10, case 5: templates whose keys can collide are refused;
    /// the default state prefix includes the slot (case 4).
    #[test]
    fn colliding_redis_key_templates_are_refused_and_the_prefix_names_the_slot() {
        let two = EXAMPLE.replace(
            "tables = [\"public.products\"]",
            "tables = [\"public.products\", \"public.items\"]",
        ) + "\n[[sink]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"redis://h\"\n\
             [sink.tables.\"public.products\"]\nkey = \"k:{id}\"\n[sink.tables.\"public.items\"]\nkey = \"k:{code}\"\n";
        let e = parse(&two).unwrap_err().to_string();
        assert!(
            e.contains("sink[1].tables.\"public.products\".key")
                && e.contains("public.items")
                && e.contains("k:0")
                && e.contains("own literal prefix"),
            "{e}"
        );
        let ok = parse(&two.replace("k:{code}", "item:{code}")).unwrap();
        let SinkConfig::Redis(r) = &ok.sinks[1] else {
            panic!()
        };
        assert_eq!(r.state_prefix(), "pgferry:pgferry:cache");
        // A bare column can render "pgferry:pgferry:cache:position".
        let e = parse(&two.replace("k:{code}", "{code}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pgferry's own keys"), "{e}");
    }

    #[test]
    fn passwords_are_redacted_by_parsing_in_both_forms() {
        for pw in ["Sup3r Secret", "a=b", "x&y", "it's", "back\\slash", "@t"] {
            let quoted = pw.replace('\\', "\\\\").replace('\'', "\\'");
            let kv = format!("host=h user=u password='{quoted}' dbname=d");
            let r = redact_url(&kv);
            assert_eq!(r, "host=h user=u password=*** dbname=d", "{pw}");
            let kv = format!("password = '{quoted}' host=h");
            assert_eq!(redact_url(&kv), "password = *** host=h", "{pw}");
            for url in [
                format!("postgres://u:{pw}@h:5432/d"),
                format!("postgresql://u:{pw}@h/d?sslmode=disable"),
            ] {
                let r = redact_url(&url);
                assert!(!r.contains(pw) && r.contains("u:***@h"), "{url} -> {r}");
            }
            let q = format!("postgres://u@h/d?sslmode=disable&password={pw}&application_name=x");
            let r = redact_url(&q);
            assert!(
                !r.contains(&format!("password={pw}"))
                    && r.contains("password=***&")
                    && r.ends_with("&application_name=x"),
                "{q} -> {r}"
            );
        }
        assert_eq!(redact_url("host=h password=p"), "host=h password=***");
        assert_eq!(redact_url("password=p"), "password=***");
        // sslpassword (an encrypted client key's) alike, in both forms.
        assert_eq!(
            redact_url("host=h sslpassword='k ey' sslkey=/k.pem"),
            "host=h sslpassword=*** sslkey=/k.pem"
        );
        assert_eq!(
            redact_url("postgres://u@h/d?sslkey=%2Fk.pem&sslpassword=k%20ey&sslmode=require"),
            "postgres://u@h/d?sslkey=%2Fk.pem&sslpassword=***&sslmode=require"
        );
        // Unparseable: redacted from the password on.
        assert_eq!(redact_url("host=h password='open"), "host=h password=***");
    }
}
