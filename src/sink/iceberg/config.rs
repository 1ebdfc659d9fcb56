use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `[[sink]] type = "iceberg"` (build with `cargo build --features iceberg`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcebergConfig {
    /// Unique sink name; names its checkpoint file.
    pub name: String,
    /// Directory of the table data and metadata files (a local path; it is
    /// created when missing). Paths in the metadata are absolute `file://`.
    pub warehouse: PathBuf,
    /// The catalog. Default: the SQL catalog in `{warehouse}/catalog.db`.
    #[serde(default)]
    pub catalog: Option<CatalogConfig>,
    /// The Iceberg namespace of the tables (default `pgferry`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The table name template: `{schema}` and `{table}` are replaced
    /// (default `{schema}_{table}`).
    #[serde(default = "default_table")]
    pub table: String,
    /// Commit (and then checkpoint) at least this often, in seconds
    /// (default 10). Each commit is one Iceberg snapshot per table written.
    #[serde(default = "default_interval")]
    pub commit_interval_secs: u64,
    /// Commit earlier once this many change rows are buffered over all
    /// tables (default 500000).
    #[serde(default = "default_max_rows")]
    pub commit_max_rows: usize,
    /// Stop pgferry with an error once the sink has been failing (retrying)
    /// this many seconds. Default: keep retrying forever.
    #[serde(default)]
    pub max_failure_secs: Option<u64>,
    /// Only these `schema.table`s (default: all of `source.tables`).
    #[serde(default)]
    pub tables: Option<Vec<String>>,
}

/// `catalog = { type = "sql", uri = "…" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// `sql` (the only one in this build): the JDBC-style SQL catalog in a
    /// sqlite file. Its catalog name is always `pgferry`.
    #[serde(rename = "type")]
    pub kind: CatalogKind,
    /// The sqlite file: a plain path, or `sqlite:///abs/path` (sqlx's form)
    /// or `sqlite:////abs/path` (SQLAlchemy's form). Created when missing.
    pub uri: String,
}

/// The catalog kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatalogKind {
    Sql,
}

/// The fixed catalog name readers must use (`SqlCatalog("pgferry", …)`).
pub const CATALOG_NAME: &str = "pgferry";

fn default_namespace() -> String {
    "pgferry".into()
}
fn default_table() -> String {
    "{schema}_{table}".into()
}
fn default_interval() -> u64 {
    10
}
fn default_max_rows() -> usize {
    500_000
}

impl IcebergConfig {
    /// The sqlite catalog file.
    pub fn catalog_path(&self) -> PathBuf {
        match &self.catalog {
            Some(c) => catalog_file(&c.uri),
            None => self.warehouse.join("catalog.db"),
        }
    }

    /// Checks the options. The error is `(key below the sink, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.commit_interval_secs == 0 {
            return Err((
                "commit_interval_secs".into(),
                "must be at least 1 (every commit is a snapshot: commit every few seconds)".into(),
            ));
        }
        if self.commit_max_rows == 0 {
            return Err(("commit_max_rows".into(), "must be at least 1".into()));
        }
        if self.namespace.is_empty() || self.namespace.contains('.') {
            return Err((
                "namespace".into(),
                format!(
                    "{:?} is not a namespace: one non-empty name without dots",
                    self.namespace
                ),
            ));
        }
        if !self.table.contains("{table}") {
            return Err((
                "table".into(),
                "must contain {table} (e.g. \"{schema}_{table}\"), or every source table would write into one Iceberg table".into(),
            ));
        }
        if let Some(c) = &self.catalog {
            if !catalog_file(&c.uri).is_absolute() && c.uri.starts_with("sqlite:") {
                return Err((
                    "catalog.uri".into(),
                    format!("{:?}: write sqlite:///abs/path or a plain path", c.uri),
                ));
            }
        }
        Ok(())
    }
}

/// The file of a catalog `uri`: `sqlite:` and any run of slashes before an
/// absolute path is one slash; a `?query` is dropped; anything else is a path.
pub fn catalog_file(uri: &str) -> PathBuf {
    let Some(rest) = uri.strip_prefix("sqlite:") else {
        return PathBuf::from(uri);
    };
    let rest = rest.split('?').next().unwrap_or_default();
    if rest.starts_with("//") {
        let trimmed = rest.trim_start_matches('/');
        return Path::new("/").join(trimmed);
    }
    PathBuf::from(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_uris_of_sqlx_and_sqlalchemy_and_plain_paths_name_the_same_file() {
        for uri in [
            "sqlite:///var/lake/catalog.db",
            "sqlite:////var/lake/catalog.db",
            "sqlite:/var/lake/catalog.db",
            "sqlite:///var/lake/catalog.db?mode=rwc",
            "/var/lake/catalog.db",
        ] {
            assert_eq!(
                catalog_file(uri),
                Path::new("/var/lake/catalog.db"),
                "{uri}"
            );
        }
        assert_eq!(
            catalog_file("lake/catalog.db"),
            Path::new("lake/catalog.db")
        );
    }
}
