//! Loading: `${VAR}` substitution, TOML parsing with every error naming its
//! key path, relative paths resolved against the file's directory, table
//! names made canonical, and the validation that names the key and the fix.

use super::*;

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
        if self.pipeline.worker_threads > 64 {
            return Err(key_err(
                "pipeline.worker_threads",
                "must be at most 64 (0, the default: one per CPU)",
            ));
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
pub(super) fn deserialize_at<T: serde::de::DeserializeOwned>(
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
pub(super) fn push_key(path: &mut String, key: &str) {
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
pub(super) fn substitute(
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

pub(super) fn expand(
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
