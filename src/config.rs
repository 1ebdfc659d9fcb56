//! The TOML configuration.
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

/// Splits `schema.table`; a bare `table` means `public.table`.
pub fn split_table(name: &str) -> Option<(String, String)> {
    let (schema, table) = match name.split_once('.') {
        Some((s, t)) => (s, t),
        None => ("public", name),
    };
    if schema.is_empty() || table.is_empty() || table.contains('.') {
        return None;
    }
    Some((schema.to_string(), table.to_string()))
}

/// The one spelling of a table name used everywhere: `schema.table`, with
/// `public` for a bare `table`. `None`: not a table name.
pub fn canonical_table(name: &str) -> Option<String> {
    split_table(name).map(|(s, t)| format!("{s}.{t}"))
}

/// An identifier as SQL needs it: bare when it is a lower-case name that
/// needs no quotes, else double-quoted (`Products` → `"Products"`).
pub fn sql_ident(s: &str) -> String {
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain && !is_reserved(s) {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

/// `schema.table` as SQL needs it, each part quoted when needed.
pub fn sql_table(schema: &str, table: &str) -> String {
    format!("{}.{}", sql_ident(schema), sql_ident(table))
}

/// Reserved words that cannot be bare identifiers (the common ones; an
/// unlisted one only makes a suggested statement fail, never a wrong one).
fn is_reserved(s: &str) -> bool {
    const WORDS: &[&str] = &[
        "all",
        "analyse",
        "analyze",
        "and",
        "any",
        "array",
        "as",
        "asc",
        "both",
        "case",
        "cast",
        "check",
        "collate",
        "column",
        "constraint",
        "create",
        "default",
        "desc",
        "distinct",
        "do",
        "else",
        "end",
        "except",
        "false",
        "for",
        "foreign",
        "from",
        "grant",
        "group",
        "having",
        "in",
        "initially",
        "intersect",
        "into",
        "leading",
        "limit",
        "not",
        "null",
        "offset",
        "on",
        "only",
        "or",
        "order",
        "primary",
        "references",
        "select",
        "some",
        "table",
        "then",
        "to",
        "trailing",
        "true",
        "union",
        "unique",
        "user",
        "using",
        "when",
        "where",
        "with",
    ];
    WORDS.contains(&s)
}

/// Replaces the password of a Postgres connection string with `***`, by
/// parsing it: the `user:password@` of a URL and a `password` query
/// parameter, or the `password` key of a key=value string (quoted values,
/// spaces, `=` and `&` included). A string that does not parse is redacted
/// from its `password` on.
pub fn redact_url(url: &str) -> String {
    for scheme in ["postgres://", "postgresql://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            return format!("{scheme}{}", redact_uri_rest(rest));
        }
    }
    redact_conninfo(url)
}

/// Redacts the password of an URL's `user:password@` (everything between
/// `scheme://` and the last `@`), keeping the user: `rest` is the URL after
/// `scheme://`. Used for Postgres, Redis and search URLs alike.
pub fn redact_userinfo(rest: &str) -> String {
    // The last '@' ends the user info: a password may hold '@', '/', '?'.
    let Some(at) = rest.rfind('@') else {
        return rest.to_string();
    };
    let (userinfo, host) = rest.split_at(at);
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***{host}"),
        // A user alone is no secret; `redis://password@host` is handled by
        // its caller.
        None => format!("{userinfo}{host}"),
    }
}

fn redact_uri_rest(rest: &str) -> String {
    let redacted = redact_userinfo(rest);
    // A password can also be a query parameter (percent-encoded key).
    let Some(q) = redacted.find('?') else {
        return redacted;
    };
    let (head, query) = redacted.split_at(q + 1);
    let mut out = head.to_string();
    let mut secret = false;
    for (i, kv) in query.split('&').enumerate() {
        let key = kv.split('=').next().unwrap_or("");
        let key = percent_decode(key);
        if i > 0 {
            out.push('&');
        }
        if key == "password" || key == "sslpassword" {
            out.push_str(&kv[..kv.find('=').map_or(kv.len(), |e| e + 1)]);
            out.push_str("***");
            secret = true;
        } else if secret && !kv.contains('=') {
            // A raw '&' inside the password: the rest of it.
            out.push_str("***");
        } else {
            secret = false;
            out.push_str(kv);
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Redacts the `password` of a libpq key=value string: `key = value` pairs,
/// a value either bare (up to white space, `\` escapes) or single-quoted
/// (`\'` and `\\` escapes).
fn redact_conninfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let ws = |c: u8| c.is_ascii_whitespace();
    while i < b.len() {
        // White space between pairs is kept as it is.
        let start = i;
        while i < b.len() && ws(b[i]) {
            i += 1;
        }
        out.push_str(&s[start..i]);
        if i >= b.len() {
            break;
        }
        let key_start = i;
        while i < b.len() && b[i] != b'=' && !ws(b[i]) {
            i += 1;
        }
        let key = &s[key_start..i];
        while i < b.len() && ws(b[i]) {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            // Not key=value: redact from a password on, keep the rest.
            return redact_tail(s, &out, key_start);
        }
        i += 1;
        while i < b.len() && ws(b[i]) {
            i += 1;
        }
        let value_start = i;
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            loop {
                match b.get(i) {
                    None => return redact_tail(s, &out, key_start),
                    Some(b'\\') => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
        } else {
            while i < b.len() && !ws(b[i]) {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
        }
        let i_end = i.min(b.len());
        out.push_str(&s[key_start..value_start]);
        if key == "password" || key == "sslpassword" {
            out.push_str("***");
        } else {
            out.push_str(&s[value_start..i_end]);
        }
        i = i_end;
    }
    out
}

/// `s` could not be parsed from `from` on: keep what was parsed, and the
/// rest only when it holds no password.
fn redact_tail(s: &str, parsed: &str, from: usize) -> String {
    let rest = &s[from..];
    match rest.find("password") {
        Some(p) => format!("{parsed}{}password=***", &rest[..p]),
        None => format!("{parsed}{rest}"),
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
    /// Change events on Kafka topics (effectively-once with transactions).
    Kafka(crate::sink::kafka::KafkaConfig),
}

impl SinkConfig {
    /// Reads `sink[i]`: its `type` picks the variant, and the other keys
    /// are read with their full path in errors.
    fn from_toml(i: usize, item: toml::Value) -> Result<SinkConfig, ConfigError> {
        let at = format!("sink[{i}]");
        let toml::Value::Table(mut table) = item else {
            return Err(key_err(
                at,
                "must be a table: write [[sink]] and its keys below it",
            ));
        };
        const TYPES: &str = "jsonl, redis, elasticsearch, opensearch, kafka or null";
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
            "kafka" => SinkConfig::Kafka(deserialize_at(&at, value)?),
            "elasticsearch" | "opensearch" => {
                SinkConfig::Elasticsearch(deserialize_at(&at, value)?)
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
    fn for_each_path(&mut self, f: &impl Fn(&mut PathBuf)) {
        match self {
            SinkConfig::Jsonl(c) => f(&mut c.path),
            SinkConfig::Null(_) | SinkConfig::Kafka(_) => {}
            SinkConfig::Redis(c) => c.tls_ca_file.iter_mut().for_each(f),
            SinkConfig::Elasticsearch(c) => {
                c.ca_file.iter_mut().for_each(f);
                c.dead_letter_path.iter_mut().for_each(f);
                c.mapping_file.iter_mut().for_each(f);
                for t in c.tables.values_mut() {
                    t.mapping_file.iter_mut().for_each(f);
                }
            }
        }
    }

    /// Rewrites the sink's table names into canonical `schema.table`. The
    /// error is `(key below the sink, message)`.
    fn canonicalize_tables(&mut self) -> Result<(), (String, String)> {
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
            SinkConfig::Redis(c) => {
                c.tables = canonical_keys(std::mem::take(&mut c.tables)).map_err(keyed)?;
                Ok(())
            }
            SinkConfig::Elasticsearch(c) => {
                c.tables = canonical_keys(std::mem::take(&mut c.tables)).map_err(keyed)?;
                Ok(())
            }
            SinkConfig::Kafka(c) => {
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
            SinkConfig::Elasticsearch(c) => &c.name,
            SinkConfig::Kafka(c) => &c.name,
        }
    }

    /// Stop pgferry when the sink has been failing this long (`None`: retry forever).
    pub fn max_failure_secs(&self) -> Option<u64> {
        match self {
            SinkConfig::Jsonl(c) => c.max_failure_secs,
            SinkConfig::Null(_) => None,
            SinkConfig::Redis(c) => c.max_failure_secs,
            SinkConfig::Elasticsearch(c) => c.max_failure_secs,
            SinkConfig::Kafka(c) => c.max_failure_secs,
        }
    }

    /// What to do when the sink's store lost pgferry's state (`on_data_loss`).
    pub fn on_data_loss(&self) -> OnDataLoss {
        match self {
            SinkConfig::Jsonl(_) | SinkConfig::Null(_) | SinkConfig::Kafka(_) => OnDataLoss::Warn,
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

    /// The tables this sink receives (`None`: all of `[source].tables`).
    /// Sinks with per-table options return the keys of their `tables` map.
    pub fn tables(&self) -> Option<Vec<String>> {
        match self {
            SinkConfig::Jsonl(c) => c.tables.clone(),
            SinkConfig::Null(c) => c.tables.clone(),
            SinkConfig::Redis(c) => Some(c.tables.keys().cloned().collect()),
            SinkConfig::Elasticsearch(c) => Some(c.table_names()),
            SinkConfig::Kafka(_) => None,
        }
    }

    /// Checks a sink's own options. The error is `(key below the sink, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        match self {
            SinkConfig::Redis(c) => c.validate(),
            SinkConfig::Elasticsearch(c) => c.validate(),
            SinkConfig::Kafka(c) => c.validate(),
            SinkConfig::Jsonl(_) | SinkConfig::Null(_) => Ok(()),
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

impl Config {
    /// Reads, substitutes `${VAR}`s, parses and validates a config file.
    /// Relative paths in it are taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Self::parse(&text, &path, |name| std::env::var(name).ok())
    }

    /// Parses config text; `env` resolves `${VAR}` references. Relative
    /// paths are resolved against `path`'s directory.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        substitute(&mut value, &mut Vec::new(), &env)?;
        // Each `[[sink]]` is read on its own, so that errors inside it name
        // their full path (serde loses it inside an internally tagged enum).
        let sinks = match value.as_table_mut().and_then(|t| t.remove("sink")) {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => items,
            Some(_) => {
                return Err(key_err(
                    "sink",
                    "must be a list of tables: write each sink as [[sink]], with two brackets",
                ))
            }
        };
        let mut config: Config = deserialize_at("", value)?;
        for (i, item) in sinks.into_iter().enumerate() {
            config.sinks.push(SinkConfig::from_toml(i, item)?);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            config.resolve_paths(dir);
        }
        config.canonicalize_tables()?;
        config.fold_tls()?;
        config.resolve_defaults();
        config.validate()?;
        Ok(config)
    }

    /// Makes every relative path relative to `dir` (the config file's).
    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && p.as_os_str() != "-" {
                *p = dir.join(&*p);
            }
        };
        fix(&mut self.checkpoint.dir);
        let tls = &mut self.source.tls;
        for p in [
            &mut tls.sslrootcert,
            &mut tls.sslcert,
            &mut tls.sslkey,
            &mut tls.sslcrl,
        ]
        .into_iter()
        .flatten()
        {
            if p != "system" && Path::new(p.as_str()).is_relative() {
                *p = dir.join(p.as_str()).to_string_lossy().into_owned();
            }
        }
        if let Some(p) = &mut self.pipeline.spill_dir {
            fix(p);
        }
        for sink in &mut self.sinks {
            sink.for_each_path(&fix);
        }
    }

    /// Adds the keys of `[source.tls]` to `source.url`; a key set in both
    /// places is an error.
    fn fold_tls(&mut self) -> Result<(), ConfigError> {
        let s = &mut self.source;
        let (_, in_url) =
            crate::conn::tls::split_url(&s.url).map_err(|e| key_err("source.url", e))?;
        for (key, value) in s.tls.entries() {
            if in_url.is_set(key) {
                return Err(key_err(
                    format!("source.tls.{key}"),
                    format!("is also set in source.url; set {key} in one place only"),
                ));
            }
            s.url = crate::conn::tls::add_param(&s.url, key, &value);
        }
        Ok(())
    }

    /// Rewrites every table name into its canonical `schema.table`.
    fn canonicalize_tables(&mut self) -> Result<(), ConfigError> {
        let s = &mut self.source;
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (i, t) in s.tables.iter_mut().enumerate() {
            let c = canonical_table(t).ok_or_else(|| {
                key_err(
                    format!("source.tables[{i}]"),
                    format!(
                        "{t:?} is not a table name; write schema.table, e.g. \"public.products\""
                    ),
                )
            })?;
            if let Some(j) = seen.insert(c.clone(), i) {
                return Err(key_err(
                    format!("source.tables[{i}]"),
                    format!("{t:?} names the same table as source.tables[{j}] ({c})"),
                ));
            }
            *t = c;
        }
        s.publish = canonical_keys(std::mem::take(&mut s.publish))
            .map_err(|(k, m)| key_err(format!("source.publish.{k:?}"), m))?;
        for (i, sink) in self.sinks.iter_mut().enumerate() {
            sink.canonicalize_tables()
                .map_err(|(k, m)| key_err(format!("sink[{i}].{k}"), m))?;
        }
        Ok(())
    }

    /// Fills in defaults that depend on other keys.
    fn resolve_defaults(&mut self) {
        for sink in &mut self.sinks {
            match sink {
                SinkConfig::Elasticsearch(c) if c.dead_letter_path.is_none() => {
                    c.dead_letter_path = Some(
                        self.checkpoint
                            .dir
                            .join(format!("{}.dead-letter.jsonl", c.name)),
                    );
                }
                SinkConfig::Redis(c) => c.default_state_prefix(&self.source.slot),
                _ => {}
            }
        }
    }

    /// Checks what serde cannot: names, uniqueness, value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_connection()?;
        self.validate_tables()?;
        self.validate_settings()?;
        self.validate_sinks()
    }

    /// `source.url` and the TLS keys, wherever they were set.
    fn validate_connection(&self) -> Result<(), ConfigError> {
        let s = &self.source;
        if s.url.trim().is_empty() {
            return Err(key_err(
                "source.url",
                "is empty; set it to postgres://user@host:port/db",
            ));
        }
        let (rest, tls) =
            crate::conn::tls::split_url(&s.url).map_err(|e| key_err("source.url", e))?;
        rest.parse::<tokio_postgres::Config>().map_err(|e| {
            key_err(
                "source.url",
                format!("is not a valid Postgres connection string ({e}); use postgres://user:password@host:port/dbname"),
            )
        })?;
        // A TLS key is named where it was set: [source.tls] or the URL (a
        // key set nowhere, as [source.tls] would have it).
        let tls_key = |k: &str| {
            if !s.tls.is_set(k) && tls.is_set(k) {
                format!("source.url ({k})")
            } else {
                format!("source.tls.{k}")
            }
        };
        tls.validate().map_err(|(k, m)| key_err(tls_key(k), m))?;
        crate::conn::tls::TlsSetup::shared(&tls).map_err(|e| {
            let k = ["sslrootcert", "sslcert", "sslkey", "sslpassword", "sslcrl"]
                .into_iter()
                .find(|k| e.starts_with(k))
                .unwrap_or("sslmode");
            key_err(tls_key(k), e)
        })?;
        Ok(())
    }

    /// Slot and publication names, the tables and what is published of them.
    fn validate_tables(&self) -> Result<(), ConfigError> {
        let s = &self.source;
        for (key, v) in [
            ("source.slot", &s.slot),
            ("source.publication", &s.publication),
        ] {
            if v.is_empty()
                || v.len() > 63
                || !v
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(key_err(
                    key,
                    format!("{v:?} is not a valid name: use 1 to 63 lower-case letters, digits or underscores"),
                ));
            }
        }
        if s.tables.is_empty() {
            return Err(key_err(
                "source.tables",
                "is empty; list the tables to replicate, e.g. [\"public.products\"]",
            ));
        }
        for (i, t) in s.tables.iter().enumerate() {
            if split_table(t).is_none() {
                return Err(key_err(
                    format!("source.tables[{i}]"),
                    format!(
                        "{t:?} is not a table name; write schema.table, e.g. \"public.products\""
                    ),
                ));
            }
        }
        for t in s.publish.keys() {
            if !s.tables.contains(t) {
                return Err(key_err(
                    format!("source.publish.{t:?}"),
                    format!("{t:?} is not in source.tables; add it there or remove it here"),
                ));
            }
        }
        if s.publish.values().any(|p| *p == PublishOps::Insert) && s.publication.len() > 56 {
            return Err(key_err(
                "source.publication",
                "is longer than 56 characters: insert-only tables (source.publish) need a second publication named <publication>_insert, which Postgres limits to 63",
            ));
        }
        if s.status_interval_secs == 0 {
            return Err(key_err("source.status_interval_secs", "must be at least 1"));
        }
        s.network
            .validate()
            .map_err(|(k, m)| key_err(format!("source.network.{k}"), m))?;
        Ok(())
    }

    /// The numeric and address settings of the other sections.
    fn validate_settings(&self) -> Result<(), ConfigError> {
        if self.pipeline.slow_sink_detach_ms < 100 {
            return Err(key_err(
                "pipeline.slow_sink_detach_ms",
                "must be at least 100 (milliseconds)",
            ));
        }
        if self.snapshot.workers == 0 || self.snapshot.workers > 64 {
            return Err(key_err("snapshot.workers", "must be between 1 and 64"));
        }
        if self.snapshot.chunk_rows == 0 {
            return Err(key_err("snapshot.chunk_rows", "must be at least 1"));
        }
        if self.snapshot.progress_log_secs == 0 {
            return Err(key_err("snapshot.progress_log_secs", "must be at least 1"));
        }
        if self.pipeline.memory_limit_mb == 0 {
            return Err(key_err("pipeline.memory_limit_mb", "must be at least 1"));
        }
        if self.pipeline.batch_max_events == 0 {
            return Err(key_err("pipeline.batch_max_events", "must be at least 1"));
        }
        if self.metrics.enabled && self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(key_err(
                "metrics.listen",
                format!(
                    "{:?} is not an address; write host:port with an IP address, e.g. \"127.0.0.1:9187\" or \"0.0.0.0:9187\"",
                    self.metrics.listen
                ),
            ));
        }
        if self.metrics.poll_interval_secs == 0 {
            return Err(key_err("metrics.poll_interval_secs", "must be at least 1"));
        }
        if self.heartbeat.enabled && self.heartbeat.interval_secs == 0 {
            return Err(key_err(
                "heartbeat.interval_secs",
                "must be at least 1 (or set heartbeat.enabled = false)",
            ));
        }
        Ok(())
    }

    /// Each sink: a unique valid name, its own section, and tables that are
    /// in `source.tables`.
    fn validate_sinks(&self) -> Result<(), ConfigError> {
        let s = &self.source;
        if self.sinks.is_empty() {
            return Err(key_err(
                "sink",
                "no [[sink]] is configured; add at least one, e.g. type = \"jsonl\"",
            ));
        }
        let mut seen = BTreeMap::new();
        for (i, sink) in self.sinks.iter().enumerate() {
            let name = sink.name();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(key_err(
                    format!("sink[{i}].name"),
                    format!("{name:?} is not a valid sink name: use letters, digits, '-' or '_'"),
                ));
            }
            if let Some(prev) = seen.insert(name.to_string(), i) {
                return Err(key_err(
                    format!("sink[{i}].name"),
                    format!(
                        "{name:?} is already the name of sink[{prev}]; sink names must be unique"
                    ),
                ));
            }
            sink.validate()
                .map_err(|(k, m)| key_err(format!("sink[{i}].{k}"), m))?;
            if let Some(tables) = sink.tables() {
                // A filter that matches nothing would let the sink's
                // checkpoint advance over every change unwritten.
                if tables.is_empty() {
                    return Err(key_err(
                        format!("sink[{i}].tables"),
                        "is empty, so the sink would receive nothing; list tables of source.tables, or leave the key out for all of them",
                    ));
                }
                for t in &tables {
                    if !s.tables.contains(t) {
                        return Err(key_err(
                            format!("sink[{i}].tables.{t:?}"),
                            format!(
                                "{t:?} is not in source.tables ({}); add it there or remove it here",
                                s.tables.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The spill directory.
    pub fn spill_dir(&self) -> PathBuf {
        self.pipeline
            .spill_dir
            .clone()
            .unwrap_or_else(|| self.checkpoint.dir.join("spill"))
    }
}

/// Deserializes `value` (found at `prefix`, e.g. `sink[0]`) and names the
/// full path of any error: `sink[0].tables."public.products".keyy`.
fn deserialize_at<T: serde::de::DeserializeOwned>(
    prefix: &str,
    value: toml::Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut key = prefix.to_string();
        for seg in e.path().iter() {
            use serde_path_to_error::Segment;
            match seg {
                Segment::Seq { index } => key.push_str(&format!("[{index}]")),
                Segment::Map { key: k } | Segment::Enum { variant: k } => push_key(&mut key, k),
                Segment::Unknown => {}
            }
        }
        // The message alone: the error's Display repeats the key.
        let message = e.into_inner().message().to_string();
        let quoted = |prefix: &str| {
            message
                .strip_prefix(prefix)
                .and_then(|r| r.split('`').next())
                .map(str::to_string)
        };
        if let Some(field) = quoted("unknown field `") {
            // The path ends at the unknown key, or at its table.
            let mut own = String::new();
            push_key(&mut own, &field);
            if !key.ends_with(&format!(".{own}")) && key != own {
                push_key(&mut key, &field);
            }
            let expected = message.split_once(", expected ").map(|(_, e)| e);
            let hint = expected.map_or(String::new(), |e| format!("; expected {e}"));
            return key_err(key, format!("is not a known key{hint}"));
        }
        if let Some(field) = quoted("missing field `") {
            push_key(&mut key, &field);
            return key_err(key, "is missing; it is required");
        }
        if key.is_empty() {
            key = "(top level)".into();
        }
        key_err(key, message)
    })
}

/// Appends one key to a path, quoted when it is not a bare key.
fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        path.push_str(key);
    } else {
        path.push_str(&format!("{key:?}"));
    }
}

/// Re-keys a map of tables by canonical names. The error is (the key as
/// written, message).
pub fn canonical_keys<V>(
    map: BTreeMap<String, V>,
) -> Result<BTreeMap<String, V>, (String, String)> {
    let mut out = BTreeMap::new();
    let mut written: BTreeMap<String, String> = BTreeMap::new();
    for (name, v) in map {
        let c = canonical_table(&name).ok_or_else(|| {
            (
                name.clone(),
                format!(
                    "{name:?} is not a table name; write schema.table, e.g. \"public.products\""
                ),
            )
        })?;
        if let Some(prev) = written.insert(c.clone(), name.clone()) {
            return Err((name, format!("names the same table as {prev:?} ({c})")));
        }
        out.insert(c, v);
    }
    Ok(out)
}

/// Replaces `${VAR}` in every string of the document.
fn substitute(
    value: &mut toml::Value,
    path: &mut Vec<String>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains("${") => {
            *s = expand(s, &path.join("."), env)?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let last = path.pop();
                let base = last.clone().unwrap_or_default();
                path.push(format!("{base}[{i}]"));
                substitute(item, path, env)?;
                path.pop();
                if let Some(l) = last {
                    path.push(l);
                }
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                path.push(k.clone());
                substitute(v, path, env)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand(
    s: &str,
    key: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| key_err(key, "has an unterminated ${ reference; write ${VAR_NAME}"))?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(key_err(
                key,
                format!("${{{name}}} is not a valid environment variable reference"),
            ));
        }
        let val = env(name).ok_or_else(|| {
            key_err(key, format!("refers to the environment variable {name}, which is not set; export it or remove the reference"))
        })?;
        out.push_str(&val);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
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
                SinkConfig::Kafka(_) => "kafka",
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
