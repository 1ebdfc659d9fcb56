//! Independent readers of an Iceberg table (see `tests/iceberg/`): pyiceberg's
//! `SqlCatalog` over the sqlite catalog file and duckdb over the current
//! snapshot's Parquet data files, in a Python venv that
//! `tests/iceberg/setup-venv.sh` makes once (pinned versions from the Python
//! package registry).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/iceberg")
}

/// The venv's python, the venv being made on first use.
pub fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new(here().join("setup-venv.sh"))
            .output()
            .expect("run tests/iceberg/setup-venv.sh (needs python3 with venv)");
        assert!(
            out.status.success(),
            "tests/iceberg/setup-venv.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// `tests/iceberg/read_table.py` on `table` (`namespace.table`) of the catalog
/// `catalog_name` in the sqlite file `catalog_db` (an absolute path): format
/// version, schema with field ids, snapshot summaries, data files, every row
/// (pyiceberg) and the rows of `sql` over a view `t` of the data files (duckdb).
pub fn read_table(catalog_db: &Path, catalog_name: &str, table: &str, sql: &str) -> Value {
    let out = Command::new(python())
        .arg(here().join("read_table.py"))
        .arg(catalog_db)
        .arg(catalog_name)
        .arg(table)
        .args(["--sql", sql])
        .output()
        .expect("run read_table.py");
    assert!(
        out.status.success(),
        "read_table.py {table}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("read_table.py prints one JSON document")
}
