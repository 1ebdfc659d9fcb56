//! Per-table destinations: a topic or subject from the `{schema}`/`{table}`
//! template, or the table's override.
//!
//! Invariants:
//! - A table's destination is computed once per relation and reused; it
//!   changes only when the relation's name does (a RENAME followed under its
//!   configured name keeps its name, so its destination too).
//! - Characters the transport does not allow in a name (say a space in a
//!   NATS subject, or `.` inside a schema name where `.` separates subject
//!   tokens) are replaced by `_` in what `{schema}` and `{table}` insert; the
//!   template's and overrides' own text is validated by the sink's config.

use std::collections::{BTreeMap, HashMap};

use crate::event::RelationInfo;

/// Destinations by relation.
pub struct Router {
    template: String,
    overrides: BTreeMap<String, String>,
    valid_char: fn(char) -> bool,
    /// `schema.table` → destination.
    cache: HashMap<String, String>,
}

impl Router {
    pub fn new(
        template: &str,
        overrides: BTreeMap<String, String>,
        valid_char: fn(char) -> bool,
    ) -> Router {
        Router {
            template: template.to_string(),
            overrides,
            valid_char,
            cache: HashMap::new(),
        }
    }

    /// The destination of `rel`'s records.
    pub fn dest(&mut self, rel: &RelationInfo) -> &str {
        if !self.cache.contains_key(&rel.qualified) {
            let d = self.compute(&rel.schema, &rel.table, &rel.qualified);
            self.cache.insert(rel.qualified.clone(), d);
        }
        &self.cache[&rel.qualified]
    }

    /// The destination of `schema.table`, without caching (for checks and docs).
    pub fn compute(&self, schema: &str, table: &str, qualified: &str) -> String {
        if let Some(d) = self.overrides.get(qualified) {
            return d.clone();
        }
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if (self.valid_char)(c) && c != '.' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        self.template
            .replace("{schema}", &clean(schema))
            .replace("{table}", &clean(table))
    }
}

/// Characters Kafka allows in a topic name: ASCII letters, digits, `.`, `_`, `-`.
pub fn kafka_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Characters a NATS subject token may hold: printable, no whitespace, no
/// `.` (the token separator) and no wildcards `*` and `>`.
pub fn nats_subject_char(c: char) -> bool {
    !c.is_whitespace() && !c.is_control() && !matches!(c, '.' | '*' | '>')
}

/// Why `name` is no valid Kafka topic name, if it is not.
pub fn check_kafka_topic(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err(format!("{name:?} must be 1 to 249 characters long"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not allowed as a topic name"));
    }
    if let Some(c) = name.chars().find(|c| !kafka_topic_char(*c)) {
        return Err(format!(
            "{name:?} holds {c:?}; a Kafka topic name may only hold ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Why `name` is no valid NATS subject to publish to, if it is not.
pub fn check_nats_subject(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a subject must not be empty".into());
    }
    for token in name.split('.') {
        if token.is_empty() {
            return Err(format!(
                "{name:?} has an empty token (two dots in a row, or a dot at an end)"
            ));
        }
        if let Some(c) = token.chars().find(|c| !nats_subject_char(*c)) {
            return Err(format!(
                "{name:?} holds {c:?}; a subject to publish to may not hold whitespace or the wildcards '*' and '>'"
            ));
        }
    }
    Ok(())
}

/// Checks a template with sample names: what `{schema}` and `{table}` insert
/// is always valid, so only the template's own text can make it invalid.
pub fn check_template(template: &str, check: fn(&str) -> Result<(), String>) -> Result<(), String> {
    check(&template.replace("{schema}", "s").replace("{table}", "t"))
}
