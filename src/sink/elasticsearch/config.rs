use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// `[[sink]] type = "elasticsearch"` (alias `"opensearch"`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElasticsearchConfig {
    /// Unique sink name; names its checkpoint file and the default dead-letter file.
    pub name: String,
    /// The cluster's base URL, `http://host:9200` or `https://host:9200`. A path
    /// (behind a proxy) is kept. Credentials in the URL are used as basic auth
    /// and never logged; prefer `username`/`password`.
    pub url: String,
    /// Basic-auth user (with `password`).
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password; use `${ENV_VAR}`. Never logged.
    #[serde(default)]
    pub password: Option<String>,
    /// API key, sent as `Authorization: ApiKey …`: the base64 "encoded" form
    /// Elasticsearch returns, or `id:key` (encoded for you). Never logged.
    #[serde(default)]
    pub api_key: Option<String>,
    /// PEM file with the CA certificate(s) to trust for `https` (in addition
    /// to the built-in web roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Most documents in one `_bulk` request (default 1000).
    #[serde(default = "default_docs")]
    pub batch_max_docs: usize,
    /// Most bytes in one `_bulk` request body (default 5 MiB). A single larger
    /// document is sent alone.
    #[serde(default = "default_bytes")]
    pub batch_max_bytes: usize,
    /// How long the sink waits for more transactions to fill a `_bulk`
    /// request when fewer than `batch_max_docs` changes are waiting
    /// (default 100 ms; 0 sends at once). Nothing is acknowledged before it
    /// is sent, so this only trades latency for fewer, larger requests.
    #[serde(default = "default_ms")]
    pub batch_max_ms: u64,
    /// What to do with a change the cluster rejects for good (a mapping
    /// error, an invalid document): `"dead_letter"` (default) writes it to
    /// `dead_letter_path` and goes on; `"stop"` stops pgferry.
    #[serde(default)]
    pub on_error: OnError,
    /// JSON-lines file for rejected changes (default
    /// `<checkpoint.dir>/<name>.dead-letter.jsonl`).
    #[serde(default)]
    pub dead_letter_path: Option<PathBuf>,
    /// JSON body used to create an index that does not exist yet: a create-index
    /// body (`{"settings": …, "mappings": …}`) or just a mapping
    /// (`{"properties": …}`). Default: the cluster's dynamic mapping. A table's
    /// own `mapping_file` takes precedence.
    #[serde(default)]
    pub mapping_file: Option<PathBuf>,
    /// Seconds before one HTTP request is abandoned and retried (default 60).
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
    /// Stop pgferry with an error once the sink has been failing (retrying)
    /// this many seconds. Default: keep retrying forever.
    #[serde(default)]
    pub max_failure_secs: Option<u64>,
    /// What to do when, at start, the sink has a checkpoint but one of its
    /// indices is missing: `"warn"` (default: log, count and report on
    /// `/readyz`), `"backfill"` (the same, then reload this sink's tables
    /// into it alone, online) or `"stop"`.
    #[serde(default)]
    pub on_data_loss: crate::config::OnDataLoss,
    /// The tables this sink indexes, by `schema.table`, each with its options.
    pub tables: BTreeMap<String, TableConfig>,
}

/// `[sink.tables."schema.table"]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Index name; `{schema}` and `{table}` are replaced, and the result is
    /// lower-cased. Default `"{schema}.{table}"`.
    #[serde(default)]
    pub index: Option<String>,
    /// Only these columns go into the document (default: all).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// These columns are left out of the document.
    #[serde(default)]
    pub exclude_columns: Vec<String>,
    /// The columns whose values make the document id (joined by `:`, escaped).
    /// Default: the table's replica identity key (its primary key). Required
    /// for a table with `REPLICA IDENTITY FULL`, where every column is key.
    #[serde(default)]
    pub id_columns: Option<Vec<String>>,
    /// Create-index body for this table's index (overrides the sink's `mapping_file`).
    #[serde(default)]
    pub mapping_file: Option<PathBuf>,
}

/// `on_error`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Write the change and the error to the dead-letter file; go on.
    #[default]
    DeadLetter,
    /// Stop pgferry (it resumes from the checkpoint once the cause is fixed).
    Stop,
}

fn default_docs() -> usize {
    1000
}
fn default_bytes() -> usize {
    5 << 20
}
fn default_ms() -> u64 {
    100
}
fn default_timeout() -> u64 {
    60
}

impl std::fmt::Debug for ElasticsearchConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("ElasticsearchConfig")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("username", &self.username)
            .field("password", &secret(&self.password))
            .field("api_key", &secret(&self.api_key))
            .field("ca_file", &self.ca_file)
            .field("batch_max_docs", &self.batch_max_docs)
            .field("batch_max_bytes", &self.batch_max_bytes)
            .field("batch_max_ms", &self.batch_max_ms)
            .field("on_error", &self.on_error)
            .field("dead_letter_path", &self.dead_letter_path)
            .field("mapping_file", &self.mapping_file)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("max_failure_secs", &self.max_failure_secs)
            .field("on_data_loss", &self.on_data_loss)
            .field("tables", &self.tables)
            .finish()
    }
}

/// The URL with the password of any `user:password@` replaced by `***`.
pub fn redact_url(url: &str) -> String {
    crate::config::redact_service_url(url, false)
}

impl ElasticsearchConfig {
    /// The table names, normalised to `schema.table`.
    pub fn table_names(&self) -> Vec<String> {
        self.tables.keys().cloned().collect()
    }

    /// The index a table's changes go to.
    pub fn index_for(&self, qualified: &str) -> Option<String> {
        let t = self.tables.get(qualified)?;
        let (schema, table) = crate::config::split_table(qualified)?;
        Some(render_index(
            t.index.as_deref().unwrap_or(DEFAULT_INDEX),
            &schema,
            &table,
        ))
    }

    /// Checks what serde cannot; `Err` is (key suffix, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let e = |k: &str, m: String| Err((k.to_string(), m));
        let url = match reqwest::Url::parse(&self.url) {
            Ok(u) => u,
            Err(err) => {
                return e(
                    "url",
                    format!(
                        "{:?} is not a URL ({err}); write e.g. \"http://127.0.0.1:9200\"",
                        redact_url(&self.url)
                    ),
                )
            }
        };
        if url.scheme() != "http" && url.scheme() != "https" {
            return e(
                "url",
                format!(
                    "scheme {:?} is not supported; use http or https",
                    url.scheme()
                ),
            );
        }
        if url.query().is_some() || url.fragment().is_some() {
            return e("url", "must not have a query string or fragment".into());
        }
        if self.password.is_some() && self.username.is_none() {
            return e("password", "is set without username; set both".into());
        }
        if self.username.is_some() && self.password.is_none() {
            return e(
                "username",
                "is set without password; set both (use ${ENV_VAR} for the password)".into(),
            );
        }
        if !url.username().is_empty() && (self.username.is_some() || self.password.is_some()) {
            return e(
                "url",
                "holds credentials and username/password are set too; keep them in one place"
                    .into(),
            );
        }
        if self.api_key.is_some() && (self.username.is_some() || !url.username().is_empty()) {
            return e(
                "api_key",
                "is set together with basic-auth credentials; use one of them".into(),
            );
        }
        if self.batch_max_docs == 0 {
            return e("batch_max_docs", "must be at least 1".into());
        }
        if self.batch_max_bytes < 1024 {
            return e("batch_max_bytes", "must be at least 1024".into());
        }
        if self.request_timeout_secs == 0 {
            return e("request_timeout_secs", "must be at least 1".into());
        }
        if self.tables.is_empty() {
            return e(
                "tables",
                "is empty; add e.g. [sink.tables.\"public.products\"] with index = \"products\""
                    .into(),
            );
        }
        for (name, t) in &self.tables {
            let key = |k: &str| format!("tables.{name:?}.{k}");
            let Some((schema, table)) = crate::config::split_table(name) else {
                return e(
                    &format!("tables.{name:?}"),
                    format!("{name:?} is not a table name; write schema.table"),
                );
            };
            let template = t.index.as_deref().unwrap_or(DEFAULT_INDEX);
            if let Err(m) = check_template(template) {
                return e(&key("index"), m);
            }
            let index = render_index(template, &schema, &table);
            if let Err(m) = check_index_name(&index) {
                return e(
                    &key("index"),
                    format!("gives index name {index:?}, which {m}"),
                );
            }
            if let Some(cols) = &t.id_columns {
                if cols.is_empty() {
                    return e(
                        &key("id_columns"),
                        "is empty; list the columns of the document id, or remove it to use the key"
                            .into(),
                    );
                }
            }
            if let Some(cols) = &t.columns {
                if cols.is_empty() {
                    return e(
                        &key("columns"),
                        "is empty; list the columns to index, or remove it to index them all"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }
}

const DEFAULT_INDEX: &str = "{schema}.{table}";

/// Replaces `{schema}` and `{table}` and lower-cases.
pub fn render_index(template: &str, schema: &str, table: &str) -> String {
    template
        .replace("{schema}", schema)
        .replace("{table}", table)
        .to_lowercase()
}

fn check_template(t: &str) -> Result<(), String> {
    let stripped = t.replace("{schema}", "").replace("{table}", "");
    if stripped.contains('{') || stripped.contains('}') {
        return Err(format!(
            "{t:?} has an unknown placeholder; only {{schema}} and {{table}} are replaced"
        ));
    }
    Ok(())
}

/// Elasticsearch's index-name rules (the same in OpenSearch).
pub fn check_index_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name == "." || name == ".." {
        return Err("is not allowed".into());
    }
    if name.len() > 255 {
        return Err("is longer than 255 bytes".into());
    }
    if name.starts_with(['-', '_', '+']) {
        return Err("starts with '-', '_' or '+'".into());
    }
    if let Some(c) = name.chars().find(|c| {
        matches!(
            c,
            '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':'
        )
    }) {
        return Err(format!("contains {c:?}, which index names cannot hold"));
    }
    Ok(())
}
