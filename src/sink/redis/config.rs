use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::sink::key::KeyTemplate;

/// `[[sink]] type = "redis"`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Unique sink name; names its checkpoint file and, by default, the
    /// prefix of pgferry's own keys in Redis (`pgferry:<name>:…`).
    pub name: String,
    /// `redis://[user[:password]@]host[:port][/db]`, or `rediss://…` for TLS.
    /// The ACL user, password and database number are taken from the URL.
    pub url: String,
    /// PEM file of the CA certificate(s) to trust for `rediss://`, instead of
    /// the system's trust store (for a private CA).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// The tables to cache, by `schema.table`, each with its key and mode.
    /// Only these tables reach Redis; each must also be in `source.tables`.
    pub tables: BTreeMap<String, RedisTableConfig>,
    /// Prefix of pgferry's own bookkeeping keys: `<prefix>:position` (what
    /// Redis already holds, and which pgferry it belongs to) and
    /// `<prefix>:keys:<schema.table>` (the key set of a table, for TRUNCATE).
    /// Default `pgferry:<source.slot>:<name>`, so that two pgferry instances
    /// (two slots) never share it; a position written by another instance
    /// stops the sink instead of being trusted.
    #[serde(default)]
    pub state_prefix: Option<String>,
    /// Set when `state_prefix` is left out: the default of pgferry before
    /// the slot was part of it (`pgferry:<name>`), where an older pgferry may
    /// have left this sink's position.
    #[serde(skip)]
    pub legacy_state_prefix: Option<String>,
    /// Seconds to wait to connect and for each reply before the attempt
    /// counts as failed and is retried. Default 30.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Stop pgferry with an error once the sink has been failing (retrying)
    /// this many seconds. Default: keep retrying forever.
    #[serde(default)]
    pub max_failure_secs: Option<u64>,
    /// What to do when, at start, the sink has a checkpoint but Redis no
    /// longer holds `<state_prefix>:position` (it restarted empty, was
    /// flushed, or failed over to a replica that was behind): `"warn"`
    /// (default: log, count and report on `/readyz`), `"backfill"` (the
    /// same, then reload this sink's tables into Redis alone, online) or
    /// `"stop"` (stop pgferry with the operator's options).
    #[serde(default)]
    pub on_data_loss: crate::config::OnDataLoss,
}

/// `[sink.tables."schema.table"]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTableConfig {
    /// Key template, e.g. `"product:{id}"` or `"acct:{tenant_id}:{id}"`.
    /// Required. Its columns must belong to the table's replica identity
    /// (normally the primary key), so that pgferry sees the old key of an
    /// update or delete. Values are escaped so keys never collide; use a
    /// distinct literal prefix per table so tables do not share keys.
    pub key: String,
    /// `json` (default): the row as a JSON string, exactly the event's
    /// `after` object. `hash`: a hash of column → text, NULL columns absent.
    /// `invalidate`: the key is deleted on any change (cache-aside: the
    /// application fills it).
    #[serde(default)]
    pub mode: Mode,
    /// Expire written keys after this many seconds (refreshed by every
    /// write). Default: no expiry. Not allowed with `invalidate`.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

/// How a table's rows are kept in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Json,
    Hash,
    Invalidate,
}

fn default_timeout() -> u64 {
    30
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("name", &self.name)
            .field("url", &self.redacted_url())
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tables", &self.tables)
            .field("state_prefix", &self.state_prefix)
            .field("legacy_state_prefix", &self.legacy_state_prefix)
            .field("timeout_secs", &self.timeout_secs)
            .field("max_failure_secs", &self.max_failure_secs)
            .field("on_data_loss", &self.on_data_loss)
            .finish()
    }
}

impl RedisConfig {
    /// The URL with any password replaced by `***`, safe for logs.
    pub fn redacted_url(&self) -> String {
        redact_redis_url(&self.url)
    }

    /// The prefix of pgferry's own keys (`pgferry:<name>` when built
    /// without [`RedisConfig::default_state_prefix`], as in unit tests).
    pub fn state_prefix(&self) -> String {
        self.state_prefix
            .clone()
            .unwrap_or_else(|| format!("pgferry:{}", self.name))
    }

    /// Fills in the default `state_prefix`, `pgferry:<slot>:<name>`.
    pub fn default_state_prefix(&mut self, slot: &str) {
        if self.state_prefix.is_none() {
            self.state_prefix = Some(format!("pgferry:{slot}:{}", self.name));
            self.legacy_state_prefix = Some(format!("pgferry:{}", self.name));
        }
    }

    /// Checks what serde cannot. The error is `(key below the sink, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let info = redis::IntoConnectionInfo::into_connection_info(self.url.as_str()).map_err(|e| {
            (
                "url".to_string(),
                format!(
                    "{:?} is not a valid Redis URL ({e}); use redis://[user:password@]host:port[/db] or rediss://… for TLS",
                    self.redacted_url()
                ),
            )
        })?;
        if self.tls_ca_file.is_some()
            && !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. })
        {
            return Err((
                "tls_ca_file".into(),
                "is only used with TLS; write the url as rediss://…".into(),
            ));
        }
        if self.timeout_secs == 0 {
            return Err(("timeout_secs".into(), "must be at least 1".into()));
        }
        if self.state_prefix.as_deref() == Some("") {
            return Err((
                "state_prefix".into(),
                "is empty; leave it out for the default pgferry:<name>".into(),
            ));
        }
        if self.tables.is_empty() {
            return Err((
                "tables".into(),
                "is empty; add e.g. [sink.tables.\"public.products\"] with key = \"product:{id}\""
                    .into(),
            ));
        }
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        let mut templates: Vec<(&str, KeyTemplate)> = Vec::new();
        let prefix = self.state_prefix();
        for (name, t) in &self.tables {
            let at = |k: &str| format!("tables.{name:?}.{k}");
            let Some((schema, table)) = crate::config::split_table(name) else {
                return Err((
                    format!("tables.{name:?}"),
                    format!("{name:?} is not a table name; write schema.table"),
                ));
            };
            if let Some(prev) = seen.insert(format!("{schema}.{table}"), name) {
                return Err((
                    format!("tables.{name:?}"),
                    format!("names the same table as {prev:?}"),
                ));
            }
            let template = KeyTemplate::parse(&t.key).map_err(|e| (at("key"), e.to_string()))?;
            for (prev, other) in &templates {
                if let Some(example) = template.collision(other) {
                    return Err((
                        at("key"),
                        format!("{:?} can produce the same keys as the key of {prev:?} (both can write {example:?}): a row of one table would overwrite, and its delete remove, a row of the other. Give each table its own literal prefix, e.g. \"{table}:{{id}}\"", t.key),
                    ));
                }
            }
            templates.push((name, template.clone()));
            if t.mode == Mode::Invalidate {
                if template.literal_prefix().is_empty() {
                    return Err((
                        at("key"),
                        format!("must start with a literal prefix in invalidate mode (e.g. \"{table}:{{id}}\"): a TRUNCATE deletes the keys matching the template's pattern, and without a prefix that pattern would match other keys"),
                    ));
                }
                if t.ttl_seconds.is_some() {
                    return Err((
                        at("ttl_seconds"),
                        "has no effect in invalidate mode (pgferry only deletes keys); remove it"
                            .into(),
                    ));
                }
            }
            if t.ttl_seconds == Some(0) {
                return Err((
                    at("ttl_seconds"),
                    "must be at least 1; leave it out for no expiry".into(),
                ));
            }
            for own in [
                format!("{prefix}:position"),
                format!("{prefix}:keys:{name}"),
            ] {
                if template.matches(&own) {
                    return Err((
                        at("key"),
                        format!("can produce {own:?}, one of pgferry's own keys (state_prefix {prefix:?}); choose another prefix for the template or for state_prefix"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Replaces the password of a `redis://user:password@host` URL (or a lone
/// `redis://password@host`) with `***`.
pub fn redact_redis_url(url: &str) -> String {
    crate::config::redact_service_url(url, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_redis_url("redis://app:s3cr3t@cache:6379/2"),
            "redis://app:***@cache:6379/2"
        );
        assert_eq!(
            redact_redis_url("rediss://:s3cr3t@cache"),
            "rediss://:***@cache"
        );
        assert_eq!(
            redact_redis_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        // Characters that end an authority elsewhere stay inside the secret.
        for pw in ["pa/ss", "p?w", "a@b", "x y", "k=v&w"] {
            let r = redact_redis_url(&format!("redis://app:{pw}@cache:6379/2"));
            assert_eq!(r, "redis://app:***@cache:6379/2", "{pw}");
        }
        assert_eq!(
            redact_redis_url("redis://s3cr3t@cache"),
            "redis://***@cache"
        );
    }
}
