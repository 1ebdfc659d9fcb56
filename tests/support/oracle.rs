//! An independent oracle for the change stream: a second slot, `oracle`,
//! read through the server's own `test_decoding` plugin, against which the
//! JSON-lines output is compared change by change.

use std::collections::BTreeMap;

use serde_json::Value;

use super::ferry::FerryDir;
use super::pg::TestPg;

/// (xid, op, id) of every row change, in commit order.
pub type Trace = Vec<(u64, String, i64)>;

/// Creates the oracle slot (before the changes it is to see).
pub fn create(pg: &TestPg) {
    pg.sql("SELECT pg_create_logical_replication_slot('oracle', 'test_decoding')");
}

/// Reads (and consumes) the oracle slot's changes of `public.<table>`,
/// whose key is the integer column `id`: test_decoding prints committed
/// transactions in commit order, e.g. `table public.t: INSERT: id[integer]:5 ...`.
pub fn read(pg: &TestPg, table: &str) -> Trace {
    let out = pg.sql(
        "SELECT data FROM pg_logical_slot_get_changes('oracle', NULL, NULL, 'include-xids', '1', 'skip-empty-xacts', '1')",
    );
    let prefix = format!("table public.{table}: ");
    let mut xid = 0u64;
    let mut trace = Vec::new();
    for line in out.lines() {
        if let Some(x) = line.strip_prefix("BEGIN ") {
            xid = x.trim().parse().unwrap();
        } else if let Some(rest) = line.strip_prefix(prefix.as_str()) {
            let (op, cols) = rest.split_once(": ").unwrap();
            let cols = cols.split("new-tuple: ").last().unwrap();
            let id = cols
                .strip_prefix("id[integer]:")
                .and_then(|r| r.split(' ').next())
                .unwrap_or_else(|| panic!("no id in {line:?}"))
                .parse()
                .unwrap();
            trace.push((xid, op.to_lowercase(), id));
        }
    }
    trace
}

/// The same trace from the JSON-lines file (snapshot reads left out).
pub fn jsonl(f: &FerryDir, table: &str) -> Trace {
    f.events()
        .iter()
        .filter(|e| e["table"] == table && e["op"] != "read")
        .map(|e| {
            (
                e["xid"].as_u64().unwrap(),
                e["op"].as_str().unwrap().to_string(),
                e["key"]["id"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// `to_jsonb()` of every row of `table`, by its `id`.
pub fn table_rows(pg: &TestPg, table: &str) -> BTreeMap<String, Value> {
    pg.sql(&format!("SELECT to_jsonb(t) FROM {table} t"))
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].to_string(), v)
        })
        .collect()
}

/// The table rebuilt from the JSONL events (no TOAST here: every update
/// carries the whole row); a truncate empties it.
pub fn replay(events: &[Value]) -> BTreeMap<String, Value> {
    let mut rows = BTreeMap::new();
    for e in events {
        match e["op"].as_str().unwrap() {
            "read" | "insert" => {
                rows.insert(e["after"]["id"].to_string(), e["after"].clone());
            }
            "update" => {
                if e["before"]["id"].is_number() {
                    rows.remove(&e["before"]["id"].to_string());
                }
                rows.insert(e["after"]["id"].to_string(), e["after"].clone());
            }
            "delete" => {
                rows.remove(&e["key"]["id"].to_string());
            }
            "truncate" => rows.clear(),
            op => panic!("unexpected op {op}"),
        }
    }
    rows
}
