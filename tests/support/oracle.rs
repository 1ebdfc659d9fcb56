//! An independent oracle for the change stream: a second slot, `oracle`,
//! read through the server's own `test_decoding` plugin, against which the
//! JSON-lines output is compared change by change.

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
