use std::path::PathBuf;

use serde::Deserialize;

/// `[[sink]] type = "jsonl"`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// Unique sink name; names its checkpoint file.
    pub name: String,
    /// Output file, or `-` for stdout.
    pub path: PathBuf,
    /// `fsync` after each batch (default true). Without it a power loss can
    /// lose acknowledged lines; a process crash cannot.
    #[serde(default = "yes")]
    pub fsync: bool,
    /// Stop pgferry with an error once the sink has been failing (retrying)
    /// this many seconds. Default: keep retrying forever.
    #[serde(default)]
    pub max_failure_secs: Option<u64>,
    /// Only these `schema.table`s (default: all of `source.tables`).
    #[serde(default)]
    pub tables: Option<Vec<String>>,
}

fn yes() -> bool {
    true
}
