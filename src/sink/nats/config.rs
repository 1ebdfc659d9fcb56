//! `[[sink]] type = "nats"`: the keys, their defaults and the checks serde
//! cannot make. Secrets (password, token, a password in the URL) never reach
//! `Debug` output or logs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::sink::eventlog::route::{check_nats_subject, check_template};
use crate::sink::eventlog::Format;

/// `[[sink]] type = "nats"`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Unique sink name; names its checkpoint file and is Debezium's
    /// `source.name`.
    pub name: String,
    /// `nats://host:port`, or `tls://host:port` for TLS; several servers of
    /// one cluster separated by commas. `nats://user:password@host:port`
    /// also works (the password is never logged).
    pub url: String,
    /// The subject of each table's messages: `{schema}` and `{table}` are
    /// replaced by the table's names (characters a subject token cannot hold,
    /// `.` included, become `_`). Default `"pgferry.{schema}.{table}"`.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// The JetStream stream that stores the subjects. Default `"PGFERRY"`.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Create the stream when it is missing, covering the sink's subjects
    /// (file storage, `duplicate_window_secs`). With `false` the stream must
    /// exist and cover them. Default true.
    #[serde(default = "yes")]
    pub create_stream: bool,
    /// `"pgferry"` (default): each message is the change event of the
    /// `jsonl` sink. `"debezium"`: Debezium's PostgreSQL envelope
    /// (`schemas.enable=false`); see docs/nats-sink.md for the differences.
    #[serde(default)]
    pub format: Format,
    /// The tables published, by `schema.table`, each with an optional
    /// `subject` that overrides the template. Left out: every table of
    /// `source.tables`, on the template's subject.
    #[serde(default)]
    pub tables: BTreeMap<String, NatsTableConfig>,
    /// JetStream's duplicate window, in seconds, for a stream pgferry
    /// creates: a message published again within it (same `Nats-Msg-Id`) is
    /// stored once. It is the longest outage that re-publishing after a
    /// failure is guaranteed to cover without duplicates. Default 120.
    #[serde(default = "default_window")]
    pub duplicate_window_secs: u64,
    /// The most messages published and not yet acknowledged by the server.
    /// Default 1024.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Seconds to wait to connect and for each acknowledgement or
    /// JetStream request before the attempt counts as failed and is retried.
    /// Default 10.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// User name, with `password`.
    #[serde(default)]
    pub user: Option<String>,
    /// Password of `user`.
    #[serde(default)]
    pub password: Option<String>,
    /// An authentication token.
    #[serde(default)]
    pub token: Option<String>,
    /// A `.creds` file (user JWT and NKey seed, as `nsc` writes it).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// A file holding an NKey seed (`SU…`), for NKey authentication.
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// PEM file of the CA certificate(s) to trust for `tls://`, instead of
    /// the system's trust store (for a private CA).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Stop pgferry with an error once the sink has been failing (retrying)
    /// this many seconds. Default: keep retrying forever.
    #[serde(default)]
    pub max_failure_secs: Option<u64>,
}

/// `[sink.tables."schema.table"]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTableConfig {
    /// The table's subject, over the sink's `subject` template.
    #[serde(default)]
    pub subject: Option<String>,
}

fn default_subject() -> String {
    "pgferry.{schema}.{table}".into()
}
fn default_stream() -> String {
    "PGFERRY".into()
}
fn yes() -> bool {
    true
}
fn default_window() -> u64 {
    120
}
fn default_in_flight() -> usize {
    1024
}
fn default_timeout() -> u64 {
    10
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("NatsConfig")
            .field("name", &self.name)
            .field("url", &self.redacted_url())
            .field("subject", &self.subject)
            .field("stream", &self.stream)
            .field("create_stream", &self.create_stream)
            .field("format", &self.format)
            .field("tables", &self.tables)
            .field("duplicate_window_secs", &self.duplicate_window_secs)
            .field("max_in_flight", &self.max_in_flight)
            .field("timeout_secs", &self.timeout_secs)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("credentials_file", &self.credentials_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("max_failure_secs", &self.max_failure_secs)
            .finish()
    }
}

impl NatsConfig {
    /// The URL with any password (or token) in it replaced by `***`.
    pub fn redacted_url(&self) -> String {
        self.url
            .split(',')
            .map(|u| redact_userinfo(u.trim()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The per-table subject overrides.
    pub fn overrides(&self) -> BTreeMap<String, String> {
        self.tables
            .iter()
            .filter_map(|(t, c)| Some((t.clone(), c.subject.clone()?)))
            .collect()
    }

    /// The tables published (`None`: all of `source.tables`).
    pub fn table_names(&self) -> Option<Vec<String>> {
        (!self.tables.is_empty()).then(|| self.tables.keys().cloned().collect())
    }

    /// Checks what serde cannot. The error is `(key below the sink, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        for u in self.url.split(',') {
            let u = u.trim();
            if !(u.starts_with("nats://") || u.starts_with("tls://")) {
                return err(
                    "url",
                    format!(
                        "{:?} must start with nats:// (or tls:// for TLS), e.g. nats://127.0.0.1:4222",
                        redact_userinfo(u)
                    ),
                );
            }
            if u.parse::<async_nats::ServerAddr>().is_err() {
                return err(
                    "url",
                    format!(
                        "{:?} is not a valid server address; write nats://host:port",
                        redact_userinfo(u)
                    ),
                );
            }
        }
        if let Err(m) = check_template(&self.subject, check_nats_subject) {
            return err(
                "subject",
                format!("{m}; e.g. \"pgferry.{{schema}}.{{table}}\""),
            );
        }
        for (t, c) in &self.tables {
            if let Some(s) = &c.subject {
                if let Err(m) = check_nats_subject(s) {
                    return err(&format!("tables.{t:?}.subject"), m);
                }
            }
        }
        if self.stream.is_empty()
            || self.stream.chars().any(|c| {
                c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\')
            })
        {
            return err(
                "stream",
                format!(
                    "{:?} is not a valid stream name: it must be non-empty, without whitespace, '.', '*', '>', '/' or '\\'",
                    self.stream
                ),
            );
        }
        self.validate_numbers()?;
        self.validate_auth()
    }

    fn validate_numbers(&self) -> Result<(), (String, String)> {
        if self.duplicate_window_secs == 0 {
            return Err(("duplicate_window_secs".into(), "must be at least 1".into()));
        }
        if self.max_in_flight == 0 {
            return Err(("max_in_flight".into(), "must be at least 1".into()));
        }
        if self.timeout_secs == 0 {
            return Err(("timeout_secs".into(), "must be at least 1".into()));
        }
        Ok(())
    }

    /// One way to authenticate at most; `user` and `password` go together.
    fn validate_auth(&self) -> Result<(), (String, String)> {
        if self.user.is_some() != self.password.is_some() {
            let missing = if self.user.is_some() {
                "password"
            } else {
                "user"
            };
            return Err((
                missing.into(),
                "is missing: user and password go together".into(),
            ));
        }
        let ways = [
            self.user.is_some(),
            self.token.is_some(),
            self.credentials_file.is_some(),
            self.nkey_seed_file.is_some(),
        ];
        if ways.iter().filter(|w| **w).count() > 1 {
            return Err((
                "user".into(),
                "user/password, token, credentials_file and nkey_seed_file are exclusive: set one of them".into(),
            ));
        }
        if self.tls_ca_file.is_some()
            && !self.url.split(',').any(|u| u.trim().starts_with("tls://"))
        {
            return Err((
                "tls_ca_file".into(),
                "is only used with TLS; write the url as tls://…".into(),
            ));
        }
        Ok(())
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`; a lone token,
/// `scheme://token@host`, becomes `scheme://***@host`.
fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rfind('@') {
        Some(at) if at > 0 && !rest[..at].contains(':') => format!("{scheme}://***{}", &rest[at..]),
        _ => format!("{scheme}://{}", crate::config::redact_userinfo(rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> NatsConfig {
        toml::from_str(&format!(
            "name = \"bus\"\nurl = \"nats://127.0.0.1:4222\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn defaults_and_a_valid_config() {
        let c = parse("");
        assert_eq!(c.subject, "pgferry.{schema}.{table}");
        assert_eq!(c.stream, "PGFERRY");
        assert!(c.create_stream);
        assert_eq!(c.duplicate_window_secs, 120);
        assert_eq!(c.table_names(), None);
        c.validate().unwrap();
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let mut c = parse("user = \"u\"\npassword = \"hunter2\"");
        c.url = "nats://u:hunter2@h:4222,tls://tok3n@h2:4222".into();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok3n"),
            "{shown}"
        );
        let t = parse("token = \"s3cret\"");
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn mistakes_name_their_key() {
        let key = |c: NatsConfig| c.validate().unwrap_err().0;
        assert_eq!(key(parse("subject = \"a..{table}\"")), "subject");
        assert_eq!(key(parse("subject = \"a.>.{table}\"")), "subject");
        assert_eq!(key(parse("stream = \"A.B\"")), "stream");
        assert_eq!(key(parse("user = \"u\"")), "password");
        assert_eq!(key(parse("token = \"t\"\nnkey_seed_file = \"/x\"")), "user");
        assert_eq!(key(parse("tls_ca_file = \"/ca.pem\"")), "tls_ca_file");
        assert_eq!(
            key(parse("[tables.\"public.a\"]\nsubject = \"x y\"")),
            "tables.\"public.a\".subject"
        );
        let mut c = parse("");
        c.url = "http://h:1".into();
        assert_eq!(key(c), "url");
        assert!(toml::from_str::<NatsConfig>("name=\"b\"\nurl=\"nats://h:1\"\nbogus=1").is_err());
    }
}
