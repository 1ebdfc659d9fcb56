//! The Elasticsearch/OpenSearch sink end to end: a real Postgres, the real
//! pgferry binary and a real OpenSearch 2.19 node (one per test binary, see
//! `support::opensearch`). The index is compared with the table: every row
//! equals its document's `_source` (as `to_jsonb(row)`), and nothing else is
//! in the index.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::fault_proxy::{Fault, FaultProxy};
use support::ferry::{kill9, terminate, wait_active, FerryDir, Guard};
use support::opensearch::{node, Node};
use support::pg::TestPg;
use support::tls_proxy::TlsProxy;

const T: Duration = Duration::from_secs(120);

/// A table of the test and the index it goes to.
struct Table {
    name: String,
    keys: &'static [&'static str],
    index: String,
    /// Extra lines for `[sink.tables."public.NAME"]`.
    extra: String,
    /// SQL for the expected document of row `t`.
    doc: &'static str,
}

impl Table {
    fn new(name: &str, keys: &'static [&'static str], index: &str) -> Table {
        Table {
            name: name.to_string(),
            keys,
            index: index.to_string(),
            extra: String::new(),
            doc: "to_jsonb(t)",
        }
    }

    /// Only part of the row goes into the document: `doc` is its SQL.
    fn projected(mut self, extra: &str, doc: &'static str) -> Table {
        self.extra = extra.to_string();
        self.doc = doc;
        self
    }

    fn with(mut self, extra: &str) -> Table {
        self.extra = extra.to_string();
        self
    }
}

/// Writes `pgferry.toml` with one search sink for `tables`.
fn write_config(
    pg: &TestPg,
    f: &FerryDir,
    node: &Node,
    tables: &[Table],
    slot: &str,
    sink_extra: &str,
    top_extra: &str,
) {
    let names: Vec<String> = tables
        .iter()
        .map(|t| format!("\"public.{}\"", t.name))
        .collect();
    let mut text = format!(
        "[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"pgferry\"\ntables = [{}]\n\n\
         [checkpoint]\ndir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n{top_extra}\n\n\
         [[sink]]\nname = \"search\"\ntype = \"elasticsearch\"\nurl = \"{}\"\n{sink_extra}\n",
        pg.url(),
        names.join(", "),
        f.path("state").display(),
        node.url(),
    );
    for t in tables {
        text += &format!(
            "\n[sink.tables.\"public.{}\"]\nindex = \"{}\"\n{}\n",
            t.name, t.index, t.extra
        );
    }
    std::fs::write(f.path("pgferry.toml"), text).unwrap();
}

/// The document id the sink gives a row: key values as text, `%` and `:`
/// percent-encoded, joined by `:`.
fn doc_id(row: &Value, keys: &[&str]) -> String {
    keys.iter()
        .map(|k| {
            let text = match &row[*k] {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            text.replace('%', "%25").replace(':', "%3A")
        })
        .collect::<Vec<_>>()
        .join(":")
}

/// The expected document of every row of `table` (`to_jsonb(row)` unless
/// projected), by document id.
fn rows(pg: &TestPg, t: &Table, filter: &str) -> BTreeMap<String, Value> {
    pg.sql(&format!(
        "SELECT jsonb_build_array(to_jsonb(t), {}) FROM public.{} t {filter}",
        t.doc, t.name
    ))
    .lines()
    .map(|l| {
        let v: Value = serde_json::from_str(l).unwrap();
        (doc_id(&v[0], t.keys), v[1].clone())
    })
    .collect()
}

/// `None` when the index equals the table (`filter` limits the rows), or what differs.
fn diff(pg: &TestPg, node: &Node, t: &Table, filter: &str) -> Option<String> {
    let want = rows(pg, t, filter);
    let docs = node.docs(&t.index);
    let got: BTreeMap<String, Value> = docs.iter().cloned().collect();
    let mut problems = Vec::new();
    if got.len() != docs.len() {
        problems.push(format!("{} duplicate ids", docs.len() - got.len()));
    }
    for (id, row) in &want {
        match got.get(id) {
            None => problems.push(format!("missing {id}")),
            Some(doc) if doc != row => {
                problems.push(format!("{id}: doc {} vs row {}", short(doc), short(row)))
            }
            _ => {}
        }
    }
    for id in got.keys().filter(|id| !want.contains_key(*id)) {
        problems.push(format!("extra {id}"));
    }
    let count = node.count(&t.index);
    if count as usize != want.len() {
        problems.push(format!("_count {count} vs {} rows", want.len()));
    }
    if problems.is_empty() {
        return None;
    }
    let n = problems.len();
    problems.truncate(8);
    Some(format!(
        "{}: {n} differences, e.g.\n  {}",
        t.name,
        problems.join("\n  ")
    ))
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 300 {
        format!("{}… ({} bytes)", &s[..300], s.len())
    } else {
        s
    }
}

/// Waits until every table equals its index. Fails only when the
/// differences stopped changing for `T`.
fn wait_equal(pg: &TestPg, node: &Node, f: &FerryDir, tables: &[&Table]) -> Duration {
    let start = Instant::now();
    let diffs = || -> Vec<String> {
        tables
            .iter()
            .filter_map(|t| diff(pg, node, t, ""))
            .collect()
    };
    support::progress::wait_for(
        T,
        || match diffs() {
            d if d.is_empty() => Ok(()),
            d => Err(d),
        },
        || {
            format!(
                "the index never matched the table:\n{}\n--- pgferry log (end) ---\n{}",
                diffs().join("\n"),
                tail(&f.log(), 60)
            )
        },
    );
    start.elapsed()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The search sink's checkpoint, once it has one.
fn checkpoint(f: &FerryDir) -> Option<pgferry::lsn::Lsn> {
    std::fs::read_to_string(f.path("state/search.checkpoint.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v["lsn"].as_str().and_then(|l| l.parse().ok()))
}

/// Waits until the sink has checkpointed everything written so far; fails
/// only when its checkpoint stops moving for `T` (a long catch-up on a
/// loaded machine is progress, not a failure).
fn wait_applied(pg: &TestPg, f: &FerryDir) {
    let end: pgferry::lsn::Lsn = pg
        .sql("SELECT pg_current_wal_lsn()")
        .trim()
        .parse()
        .unwrap();
    let mut deadline = Instant::now() + T;
    let mut last = checkpoint(f);
    while last.is_none_or(|cp| cp < end) {
        assert!(
            Instant::now() < deadline,
            "the sink never reached {end} (stuck at {last:?}):\n{}",
            tail(&f.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(100));
        let now = checkpoint(f);
        if now > last {
            deadline = Instant::now() + T;
            last = now;
        }
    }
}

fn start(pg: &TestPg, f: &FerryDir) -> Guard {
    let g = Guard(f.run());
    wait_active(pg, f, "pgferry");
    g
}

#[test]
fn mixed_workload_ends_with_every_row_equal_to_its_document() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    pg.sql(
        "CREATE TABLE products (id int PRIMARY KEY, name text, price numeric(10,2), tags text[],
                                body text, n int, meta jsonb, seen timestamptz, ok boolean, f float8);
         ALTER TABLE products ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE TABLE pairs (a text, b int, v text, PRIMARY KEY (a, b));
         CREATE TABLE events (id bigint PRIMARY KEY, v text);",
    );
    let f = FerryDir::new();
    let tables = [
        Table::new("products", &["id"], "mixed_products"),
        // The document leaves out `v` and the key column `b` (still in the id).
        Table::new("pairs", &["a", "b"], "mixed_pairs").projected(
            "columns = [\"a\", \"v\"]\nexclude_columns = [\"v\"]",
            "jsonb_build_object('a', a)",
        ),
        Table::new("events", &["id"], "mixed_events"),
    ];
    // A 1 MiB memory limit spills the big transaction below; 50 documents a
    // request makes many requests.
    write_config(
        &pg,
        &f,
        node,
        &tables,
        "pgferry",
        "batch_max_docs = 50",
        "[pipeline]\nmemory_limit_mb = 1",
    );
    let mut g = start(&pg, &f);

    pg.sql(
        "INSERT INTO products
         SELECT i, 'p' || i, i * 1.25, ARRAY['a', 'b:' || i],
                CASE WHEN i % 10 = 0 THEN repeat(md5(i::text), 1000) ELSE 'short ' || i END,
                i, jsonb_build_object('k', i, 'nested', jsonb_build_object('p', 1.50, 'l', 'x:' || i, 'z', null), 'list', jsonb_build_array(1.5, 2.5, i + 0.5)),
                CASE WHEN i % 3 = 0 THEN NULL ELSE '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 hour 1.5 second' END,
                i % 2 = 0, i / 7.0
         FROM generate_series(1, 300) i",
    );
    // Unchanged TOAST bodies (every tenth row): completed from the index.
    pg.sql("UPDATE products SET n = n + 1, name = name || '!' WHERE id % 10 = 0");
    pg.sql("UPDATE products SET body = repeat('z', 5000) WHERE id = 20");
    pg.sql("DELETE FROM products WHERE id % 7 = 0");
    // Key changes, one of them with an unchanged TOAST body.
    pg.sql("UPDATE products SET id = id + 1000 WHERE id IN (10, 11)");
    // Several changes of the same rows in one transaction.
    pg.sql(
        "BEGIN;
         INSERT INTO products (id, name, body, n) VALUES (5000, 'new', repeat('q', 9000), 1);
         UPDATE products SET n = 2 WHERE id = 5000;
         UPDATE products SET price = 9.99 WHERE id = 30;
         UPDATE products SET price = 10.99 WHERE id = 30;
         DELETE FROM products WHERE id = 31;
         INSERT INTO products (id, name) VALUES (31, 'again');
         UPDATE products SET id = 6000 WHERE id = 5000;
         COMMIT;",
    );
    // Composite keys whose values hold the separator and the escape character.
    pg.sql(
        "INSERT INTO pairs VALUES ('x:y', 1, 'a'), ('x', 2, 'b'), ('50%', 3, 'c'), ('a%3Ab', 4, 'd'), ('x', 1, 'e');
         UPDATE pairs SET b = 10 WHERE a = 'x' AND b = 2;
         DELETE FROM pairs WHERE a = '50%';",
    );
    // Truncate, then new rows (some with the old ids).
    pg.sql("INSERT INTO events SELECT i, 'before' FROM generate_series(1, 120) i");
    pg.sql("TRUNCATE events");
    pg.sql("INSERT INTO events SELECT i, 'after' FROM generate_series(1, 5) i");
    // A transaction larger than the memory limit: spilled to disk.
    pg.sql("INSERT INTO events SELECT i, repeat('e', 300) FROM generate_series(1000, 6000) i");
    pg.sql("UPDATE events SET v = 'updated' WHERE id BETWEEN 1000 AND 1100");

    let took = wait_equal(&pg, node, &f, &tables.iter().collect::<Vec<_>>());
    eprintln!("converged {took:?} after the last change");
    // Nothing was rejected.
    assert!(
        !f.path("state/search.dead-letter.jsonl").exists(),
        "{}",
        std::fs::read_to_string(f.path("state/search.dead-letter.jsonl")).unwrap_or_default()
    );
    // The TOASTed body of a merged, re-keyed row is whole.
    let (_, doc) = node.req("GET", "/mixed_products/_doc/1010", None);
    assert_eq!(doc["_source"]["body"].as_str().unwrap().len(), 32_000);
    assert_eq!(doc["_source"]["n"], json!(11));
    let st = terminate(&mut g.0);
    assert!(st.success(), "{}", f.log());
    assert!(
        f.log().contains("elasticsearch sink closed"),
        "{}",
        tail(&f.log(), 20)
    );
}

fn create_workload_tables(pg: &TestPg) {
    pg.sql(
        "CREATE TABLE ledger (id int PRIMARY KEY, v text, n int, body text);
         ALTER TABLE ledger ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE TABLE tr (id int PRIMARY KEY, v text);",
    );
}

/// A steady workload on `ledger` (TOASTed bodies, updates that leave them
/// unchanged, deletes, key changes) and `tr` (inserts and truncates), from
/// three sessions, until `stop`.
fn start_workload(
    pg: &TestPg,
    rt: &tokio::runtime::Runtime,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u32>> {
    support::workload::spawn(
        pg,
        rt,
        stop,
        support::workload::Sessions {
            count: 3,
            seed: 0x2545_F491,
            pause: Duration::from_millis(5),
            on_error: support::workload::OnError::Panic,
        },
        |w| {
            let w = w as i32;
            let base = w * 10_000_000;
            let mut next = base;
            move |rng, txns| {
                let mut rnd = |n: u32| rng.below(n);
                let mut sql = String::from("BEGIN;");
                let rows = 1 + rnd(4) as i32;
                sql += &format!(
                    "INSERT INTO ledger SELECT i, md5(i::text), 0,
                    CASE WHEN i % 3 = 0 THEN repeat(md5(i::text), 100) ELSE 'b' || i END
                 FROM generate_series({}, {}) i;",
                    next + 1,
                    next + rows
                );
                next += rows;
                let some = |r: u32| base + 1 + (r as i32 % (next - base));
                if rnd(2) == 0 {
                    sql += &format!(
                        "UPDATE ledger SET n = n + 1 WHERE id = {};",
                        some(rnd(1 << 30))
                    );
                }
                if rnd(4) == 0 {
                    sql += &format!(
                        "UPDATE ledger SET v = 'v' || n, n = n + 1 WHERE id BETWEEN {} AND {};",
                        next - 10,
                        next
                    );
                }
                if rnd(4) == 0 {
                    sql += &format!("DELETE FROM ledger WHERE id = {};", some(rnd(1 << 30)));
                }
                if rnd(20) == 0 {
                    sql += &format!(
                        "UPDATE ledger SET id = id + 50000000, n = n + 1 WHERE id = {};",
                        some(rnd(1 << 30))
                    );
                }
                sql += &format!(
                "INSERT INTO tr VALUES ({}, 'w{w}') ON CONFLICT (id) DO UPDATE SET v = 'again';",
                w * 1_000_000 + txns as i32 % 5000
            );
                sql += "COMMIT;";
                let mut statements = vec![sql];
                if w == 0 && txns % 150 == 149 {
                    statements.push("TRUNCATE tr".into());
                }
                statements
            }
        },
    )
}

fn workload_tables(prefix: &str) -> [Table; 2] {
    [
        Table::new("ledger", &["id"], &format!("{prefix}_ledger")),
        Table::new("tr", &["id"], &format!("{prefix}_tr")),
    ]
}

#[test]
fn unchanged_toast_values_come_from_the_old_row_or_else_from_postgres() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    pg.sql(
        "CREATE TABLE notes (id int PRIMARY KEY, body text, n int);
         ALTER TABLE notes ALTER COLUMN body SET STORAGE EXTERNAL;
         ALTER TABLE notes REPLICA IDENTITY FULL;
         CREATE TABLE plain (id int PRIMARY KEY, body text, n int);
         ALTER TABLE plain ALTER COLUMN body SET STORAGE EXTERNAL;
         INSERT INTO notes SELECT i, repeat(md5(i::text), 300), 0 FROM generate_series(1, 20) i;
         INSERT INTO plain SELECT i, repeat(md5(i::text), 300), 0 FROM generate_series(1, 20) i;",
    );
    // The rows predate the slot: the index has no document to complete.
    let f = FerryDir::new();
    let tables = [
        Table::new("notes", &["id"], "full_notes").with("id_columns = [\"id\"]"),
        Table::new("plain", &["id"], "full_plain"),
    ];
    write_config(&pg, &f, node, &tables, "pgferry", "", "");
    let mut g = start(&pg, &f);
    pg.sql("UPDATE notes SET n = 1; UPDATE plain SET n = 1;");
    pg.sql("UPDATE notes SET id = 100 WHERE id = 1; DELETE FROM notes WHERE id = 2;");
    // With REPLICA IDENTITY FULL the old row carries the body: whole documents.
    wait_equal(&pg, node, &f, &[&tables[0]]);
    // Without it, the index has nothing to complete from: the rows are read
    // from Postgres, whole.
    wait_equal(&pg, node, &f, &[&tables[1]]);
    assert!(
        f.log().contains("from the rows in Postgres"),
        "{}",
        tail(&f.log(), 20)
    );
    assert!(!f.path("state/search.dead-letter.jsonl").exists());
    assert!(terminate(&mut g.0).success(), "{}", f.log());
}

#[test]
fn kill_9_twice_during_a_workload_then_every_row_equals_its_document() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    let f = FerryDir::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let tables = workload_tables("kill");
    create_workload_tables(&pg);
    write_config(&pg, &f, node, &tables, "pgferry", "", "");
    let mut ferry = start(&pg, &f);
    let workers = start_workload(&pg, &rt, &stop);
    for (round, wait) in [1800u64, 2300].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(wait));
        kill9(&mut ferry.0);
        eprintln!(
            "round {round}: killed after {wait} ms; {} ledger documents",
            node.count("kill_ledger")
        );
        ferry = Guard(f.run());
    }
    std::thread::sleep(Duration::from_millis(1500));
    let txns = support::workload::stop(&rt, &stop, workers);
    assert!(txns > 100, "the workload ran only {txns} transactions");
    let took = wait_equal(&pg, node, &f, &tables.iter().collect::<Vec<_>>());
    eprintln!("{txns} transactions; converged {took:?} after the last one");
    assert!(terminate(&mut ferry.0).success(), "{}", f.log());
}

#[test]
fn node_outage_under_load_then_pgferry_catches_up() {
    let node = node();
    let _exclusive = node.exclusive();
    let pg = TestPg::start();
    let f = FerryDir::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let tables = workload_tables("outage");
    create_workload_tables(&pg);
    write_config(&pg, &f, node, &tables, "pgferry", "", "");
    let mut ferry = start(&pg, &f);
    let workers = start_workload(&pg, &rt, &stop);
    // The outage comes once the sink is writing (a wait on progress: the
    // first batch can take seconds on a loaded machine).
    let deadline = Instant::now() + T;
    while node.count("outage_ledger") == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing indexed before the outage:\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1000));
    node.kill();
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        node.try_req("GET", "/", None).is_err(),
        "the node is still answering"
    );
    node.start();
    std::thread::sleep(Duration::from_millis(2000));
    let txns = support::workload::stop(&rt, &stop, workers);
    // The backlog of the outage takes a while on a loaded machine.
    wait_applied(&pg, &f);
    let took = wait_equal(&pg, node, &f, &tables.iter().collect::<Vec<_>>());
    eprintln!("{txns} transactions; converged {took:?} after the last one");
    let log = f.log();
    assert!(
        log.contains("retrying") || log.contains("sending them again"),
        "the outage was not noticed:\n{}",
        tail(&log, 30)
    );
    assert!(terminate(&mut ferry.0).success(), "{}", f.log());
}

#[test]
fn failed_bulk_items_are_sent_again_until_they_succeed() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    pg.sql("CREATE TABLE blocked (id int PRIMARY KEY, v text)");
    let f = FerryDir::new();
    let tables = [Table::new("blocked", &["id"], "retry_blocked")];
    write_config(&pg, &f, node, &tables, "pgferry", "", "");
    let mut g = start(&pg, &f);
    pg.sql("INSERT INTO blocked VALUES (1, 'before')");
    wait_equal(&pg, node, &f, &[&tables[0]]);
    // A write block makes every item fail with 403 cluster_block_exception.
    let block = |on: bool| {
        let (st, body) = node.req(
            "PUT",
            "/retry_blocked/_settings",
            Some(&json!({"index": {"blocks": {"write": on}}})),
        );
        assert_eq!(st, 200, "{body}");
    };
    block(true);
    pg.sql("INSERT INTO blocked SELECT i, 'during' FROM generate_series(2, 50) i");
    pg.sql("UPDATE blocked SET v = 'changed' WHERE id = 1");
    let deadline = Instant::now() + T;
    while !f.log().contains("sending them again") {
        assert!(Instant::now() < deadline, "{}", tail(&f.log(), 20));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(node.count("retry_blocked"), 1, "nothing passes the block");
    block(false);
    wait_equal(&pg, node, &f, &[&tables[0]]);
    assert!(!f.path("state/search.dead-letter.jsonl").exists());
    assert!(terminate(&mut g.0).success(), "{}", f.log());
}

#[test]
fn https_with_a_custom_ca_and_basic_auth_and_a_wrong_password_stops() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    pg.sql("CREATE TABLE secure (id int PRIMARY KEY, v text)");
    let f = FerryDir::new();
    // "pgferry:s3cret-pw"
    let proxy = TlsProxy::start(f.dir.path(), node.port, "Basic cGdmZXJyeTpzM2NyZXQtcHc=");
    let tables = [Table::new("secure", &["id"], "tls_secure")];
    let sink = format!(
        "username = \"pgferry\"\npassword = \"${{SEARCH_PASSWORD}}\"\nca_file = \"{}\"",
        proxy.ca_file.display()
    );
    write_config(&pg, &f, node, &tables, "pgferry", &sink, "");
    let cfg = std::fs::read_to_string(f.path("pgferry.toml")).unwrap();
    let cfg = cfg.replace(
        &format!("url = \"{}\"", node.url()),
        &format!("url = \"https://localhost:{}\"", proxy.port),
    );
    std::fs::write(f.path("pgferry.toml"), cfg).unwrap();
    let run = |password: &str| Guard(f.spawn_env(&["run"], &[("SEARCH_PASSWORD", password)]));

    let mut g = run("s3cret-pw");
    wait_active(&pg, &f, "pgferry");
    pg.sql("INSERT INTO secure SELECT i, 'v' || i FROM generate_series(1, 20) i");
    wait_equal(&pg, node, &f, &[&tables[0]]);
    assert!(terminate(&mut g.0).success(), "{}", f.log());
    assert!(proxy.authorized.load(Ordering::Relaxed) > 0);
    assert_eq!(proxy.refused.load(Ordering::Relaxed), 0);

    // A wrong password: pgferry stops and says what to check.
    let mut g = run("wrong-pw");
    wait_active(&pg, &f, "pgferry");
    pg.sql("INSERT INTO secure VALUES (21, 'v21')");
    let st = support::ferry::wait_or_kill(&mut g.0, T).expect("pgferry stops");
    assert!(!st.success());
    let log = f.log();
    assert!(
        log.contains("authentication failed") && log.contains("username/password"),
        "{}",
        tail(&log, 10)
    );
    assert!(proxy.refused.load(Ordering::Relaxed) > 0);
    assert!(!log.contains("s3cret-pw") && !log.contains("wrong-pw"));
}

fn dead_letters(path: &PathBuf) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_mapping_error_goes_to_the_dead_letter_file_and_later_changes_still_arrive() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    pg.sql("CREATE TABLE items (id int PRIMARY KEY, code text, name text)");
    let f = FerryDir::new();
    let mapping = f.path("items-mapping.json");
    std::fs::write(
        &mapping,
        r#"{"properties": {"code": {"type": "integer"}, "name": {"type": "keyword"}}}"#,
    )
    .unwrap();
    let dead = f.path("rejected/items.jsonl");
    let tables = [Table::new("items", &["id"], "dl_items")
        .with(&format!("mapping_file = \"{}\"", mapping.display()))];
    write_config(
        &pg,
        &f,
        node,
        &tables,
        "pgferry",
        &format!("dead_letter_path = \"{}\"", dead.display()),
        "",
    );
    let mut g = start(&pg, &f);
    // One step at a time, so that no batch folds two changes of a row into one.
    let wait = |dead_count: usize| {
        let deadline = Instant::now() + T;
        loop {
            let d = diff(&pg, node, &tables[0], "WHERE code ~ '^[0-9]+$'");
            let n = dead_letters(&dead).len();
            if d.is_none() && n >= dead_count {
                assert_eq!(n, dead_count, "{:?}", dead_letters(&dead));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{d:?}\n{:?}\n{}",
                dead_letters(&dead),
                tail(&f.log(), 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    pg.sql("INSERT INTO items VALUES (1, '12', 'a'), (2, 'abc', 'b'), (3, '7', 'c')");
    wait(1);
    pg.sql("UPDATE items SET name = 'B' WHERE id = 2");
    wait(2);
    pg.sql("UPDATE items SET code = '5' WHERE id = 2");
    wait(2);
    pg.sql("INSERT INTO items VALUES (4, 'x', 'd')");
    pg.sql("INSERT INTO items VALUES (5, '9', 'e')");
    wait(3);
    // The index was created from the mapping file.
    let (_, m) = node.req("GET", "/dl_items/_mapping", None);
    assert_eq!(
        m["dl_items"]["mappings"]["properties"]["code"]["type"],
        "integer"
    );
    // Each rejected change is there, with its event and the cluster's error.
    let dl = dead_letters(&dead);
    assert_eq!(dl.len(), 3, "{dl:?}");
    let expect = [
        (2, "abc", "insert"),
        (2, "abc", "update"),
        (4, "x", "insert"),
    ];
    for (line, (id, code, op)) in dl.iter().zip(expect) {
        assert_eq!(line["sink"], "search");
        assert_eq!(line["index"], "dl_items");
        assert_eq!(line["id"], id.to_string());
        assert_eq!(line["action"], "index");
        assert_eq!(line["status"], 400);
        assert_eq!(line["error"]["type"], "mapper_parsing_exception", "{line}");
        assert_eq!(line["event"]["op"], op);
        assert_eq!(line["event"]["table"], "items");
        assert_eq!(line["event"]["key"], json!({ "id": id }));
        assert_eq!(line["event"]["after"]["code"], code);
        assert!(line["event"]["commit_lsn"].is_string());
    }
    assert!(f.log().contains("dead-letter"), "{}", tail(&f.log(), 20));
    assert!(terminate(&mut g.0).success(), "{}", f.log());
}

#[test]
fn on_error_stop_stops_pgferry_and_says_what_to_do() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    pg.sql("CREATE TABLE strict_items (id int PRIMARY KEY, code text)");
    let f = FerryDir::new();
    let (st, body) = node.req(
        "PUT",
        "/stop_items",
        Some(&json!({"mappings": {"properties": {"code": {"type": "integer"}}}})),
    );
    assert_eq!(st, 200, "{body}");
    let tables = [Table::new("strict_items", &["id"], "stop_items")];
    write_config(&pg, &f, node, &tables, "pgferry", "on_error = \"stop\"", "");
    let mut g = start(&pg, &f);
    pg.sql("INSERT INTO strict_items VALUES (1, '1')");
    pg.sql("INSERT INTO strict_items VALUES (2, 'two')");
    let st = support::ferry::wait_or_kill(&mut g.0, T).expect("pgferry stops");
    assert!(!st.success());
    let log = f.log();
    assert!(
        log.contains("on_error") && log.contains("mapper_parsing_exception"),
        "{}",
        tail(&log, 20)
    );
    // What was before the bad change is in.
    assert_eq!(node.count("stop_items"), 1);
}

#[test]
fn replaying_old_transactions_never_overwrites_newer_documents() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    pg.sql(
        "CREATE TABLE counters (id int PRIMARY KEY, n int, body text);
         ALTER TABLE counters ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE TABLE logs (id int PRIMARY KEY, v text);",
    );
    let f = FerryDir::new();
    // Deletes keep their version for an hour, longer than this test.
    let settings = f.path("settings.json");
    std::fs::write(
        &settings,
        r#"{"settings": {"index": {"gc_deletes": "1h"}}}"#,
    )
    .unwrap();
    let tables = [
        Table::new("counters", &["id"], "replay_counters"),
        Table::new("logs", &["id"], "replay_logs"),
    ];
    let sink = format!("mapping_file = \"{}\"", settings.display());
    write_config(&pg, &f, node, &tables, "pgferry", &sink, "");
    let mut g = start(&pg, &f);
    pg.sql(
        "INSERT INTO counters SELECT i, 0, CASE WHEN i % 2 = 0 THEN repeat(md5(i::text), 200) END
         FROM generate_series(1, 50) i;
         INSERT INTO logs SELECT i, 'old' FROM generate_series(1, 50) i;",
    );
    wait_equal(&pg, node, &f, &tables.iter().collect::<Vec<_>>());
    assert!(terminate(&mut g.0).success(), "{}", f.log());
    // A second slot at this point: reading it later replays everything after.
    pg.sql("SELECT pg_copy_logical_replication_slot('pgferry', 'replay')");

    let mut g = start(&pg, &f);
    for round in 1..=10 {
        // Counters only go up; unchanged TOAST bodies on even ids.
        pg.sql(&format!(
            "UPDATE counters SET n = {round} WHERE id % 3 <> 0 OR {round} < 5"
        ));
        if round == 4 {
            pg.sql("DELETE FROM counters WHERE id > 45");
            pg.sql("UPDATE counters SET id = id + 100 WHERE id IN (1, 2)");
            pg.sql("TRUNCATE logs");
            pg.sql("INSERT INTO logs SELECT i, 'new' FROM generate_series(40, 60) i");
        }
        pg.sql(&format!("UPDATE logs SET v = 'new {round}' WHERE id = 50"));
    }
    wait_equal(&pg, node, &f, &tables.iter().collect::<Vec<_>>());
    assert!(terminate(&mut g.0).success(), "{}", f.log());
    let newest: Vec<Vec<(String, Value)>> = tables
        .iter()
        .map(|t| {
            let mut d = node.docs(&t.index);
            d.sort_by(|a, b| a.0.cmp(&b.0));
            d
        })
        .collect();

    // Replay from the old slot, with no checkpoint: every change since is sent again.
    std::fs::remove_file(f.path("state/search.checkpoint.json")).unwrap();
    write_config(&pg, &f, node, &tables, "replay", &sink, "");
    let end: pgferry::lsn::Lsn = pg
        .sql("SELECT pg_current_wal_lsn()")
        .trim()
        .parse()
        .unwrap();
    let mut g = Guard(f.run());
    let deadline = Instant::now() + T;
    let mut samples = 0;
    loop {
        // While it replays, every document stays at its newest state.
        for (t, want) in tables.iter().zip(&newest) {
            let mut d = node.docs(&t.index);
            d.sort_by(|a, b| a.0.cmp(&b.0));
            assert!(
                d == *want,
                "{} changed during the replay (sample {samples})",
                t.name
            );
        }
        samples += 1;
        if checkpoint(&f).is_some_and(|cp| cp >= end) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replay never finished:\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(terminate(&mut g.0).success(), "{}", f.log());
    // It did replay: the cluster answered "older version" for the writes of
    // transactions older than a document's last one; the last transaction
    // of each document is written again with the same values (its version is
    // equal, and versions are `external_gte`), which the samples above show
    // changed nothing.
    let closed = f
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("elasticsearch sink closed"))
        .map(|l| l.to_string())
        .unwrap_or_default();
    let field = |k: &str| {
        serde_json::from_str::<Value>(&closed)
            .ok()
            .and_then(|v| v["fields"][k].as_u64())
            .unwrap_or(0)
    };
    let older = field("older_skipped");
    let rewritten = field("indexed") + field("deleted");
    assert!(
        older >= 40 && older + rewritten >= 100,
        "replayed writes: {older} skipped as older, {rewritten} written again\n{closed}"
    );
    for (t, want) in tables.iter().zip(&newest) {
        let mut d = node.docs(&t.index);
        d.sort_by(|a, b| a.0.cmp(&b.0));
        assert!(d == *want, "{} changed by the replay", t.name);
        assert!(diff(&pg, node, t, "").is_none());
    }
    eprintln!("{samples} samples during the replay; {older} writes skipped as older");
}

/// Points the sink of `pgferry.toml` at the fault proxy instead of the node.
fn via_proxy(f: &FerryDir, node: &Node, proxy: &FaultProxy) {
    let cfg = std::fs::read_to_string(f.path("pgferry.toml")).unwrap();
    let cfg = cfg.replace(
        &format!("url = \"{}\"", node.url()),
        &format!("url = \"{}\"", proxy.url()),
    );
    std::fs::write(f.path("pgferry.toml"), cfg).unwrap();
}

/// Issue 9's reproduction. 700 rows with a 10 kB body stored out of line;
/// one transaction updates every row without touching the body, the next
/// moves 50 rows to new ids. pgferry is down meanwhile, so both reach the
/// sink as one batch, whose documents need two `_bulk` requests (5 MiB
/// each); the second one fails with a 502 and the batch is retried. Every
/// moved document must keep its body.
#[test]
fn a_key_change_keeps_its_unchanged_toast_value_when_a_bulk_request_fails() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    pg.sql(
        "CREATE TABLE moved (id int PRIMARY KEY, n int, body text);
         ALTER TABLE moved ALTER COLUMN body SET STORAGE EXTERNAL;",
    );
    let f = FerryDir::new();
    let proxy = FaultProxy::start(node.port);
    let tables = [Table::new("moved", &["id"], "repro_moved")];
    write_config(&pg, &f, node, &tables, "pgferry", "batch_max_ms = 2000", "");
    via_proxy(&f, node, &proxy);
    let mut g = start(&pg, &f);
    pg.sql(
        "INSERT INTO moved SELECT i, 0, repeat(md5(i::text), 320) FROM generate_series(1, 700) i",
    );
    wait_equal(&pg, node, &f, &[&tables[0]]);
    assert!(terminate(&mut g.0).success(), "{}", f.log());

    pg.sql("UPDATE moved SET n = n + 1");
    pg.sql("UPDATE moved SET id = id + 1000 WHERE id <= 50");
    proxy.arm(2, Fault::Refuse);
    let mut g = start(&pg, &f);
    wait_applied(&pg, &f);
    assert_eq!(proxy.pending(), 0, "the 502 was never injected");
    let bodies = (1001..=1050)
        .filter(|id| {
            let (_, doc) = node.req("GET", &format!("/repro_moved/_doc/{id}"), None);
            doc["_source"]["body"].as_str().map(str::len) == Some(10240)
        })
        .count();
    assert_eq!(
        bodies,
        50,
        "moved documents with their body: {bodies} of 50\n{}",
        tail(&f.log(), 30)
    );
    if let Some(d) = diff(&pg, node, &tables[0], "") {
        panic!("{d}\n{}", tail(&f.log(), 30));
    }
    assert!(!f.path("state/search.dead-letter.jsonl").exists());
    assert!(terminate(&mut g.0).success(), "{}", f.log());
    node.req("DELETE", "/repro_moved", None);
}

/// What a fault run injects into the batch of the workload.
#[derive(Clone, Copy, Debug)]
enum Inject {
    Nothing,
    /// This fault on this `_bulk` request of the batch.
    At(u64, Fault),
    /// A 502 at each of the first N request boundaries, one per attempt.
    Walk(u64),
}

/// The workload of the fault runs on table `t`, one transaction per
/// statement: inserts, updates that keep the out-of-line body, key changes
/// (also rotated within a transaction, and an old key taken by a new row),
/// deletes, and a body change.
fn fault_workload(t: &str) -> Vec<String> {
    let body = |i: &str| format!("repeat(md5({i}::text), 100)");
    vec![
        format!(
            "INSERT INTO {t} SELECT i, 0, {} FROM generate_series(81, 100) i",
            body("i")
        ),
        format!("UPDATE {t} SET n = n + 1 WHERE id % 2 = 0"),
        format!(
            "UPDATE {t} SET id = id + 1000, n = n + 10 WHERE id % 10 = 3;
             DELETE FROM {t} WHERE id % 10 = 7"
        ),
        format!(
            "UPDATE {t} SET n = n + 100 WHERE id = 1013;
             UPDATE {t} SET id = -5 WHERE id = 5;
             UPDATE {t} SET id = 5 WHERE id = 6;
             UPDATE {t} SET id = 6 WHERE id = -5;
             INSERT INTO {t} VALUES (13, 7, 'a new row under a moved row''s old key');
             UPDATE {t} SET id = id + 2000 WHERE id IN (21, 22);
             UPDATE {t} SET body = repeat('x', 9000) WHERE id = 2021"
        ),
        format!(
            "DELETE FROM {t} WHERE id IN (1033, 2022);
             UPDATE {t} SET n = n + 1 WHERE id BETWEEN 1 AND 40 OR id > 1000"
        ),
    ]
}

/// One fault run, on a table, slot, publication and index of its own:
/// 80 rows with out-of-line bodies are indexed, pgferry stops, the workload
/// runs, `inject` is armed and pgferry starts again (through the fault
/// proxy). A held request is answered by kill -9 and a restart. Once the sink
/// has applied everything, every document must equal its row. With
/// `no_tombstones` the index forgets deletes at once (`index.gc_deletes:
/// 0s`), as after an outage longer than `gc_deletes`: replayed writes of
/// deleted documents are then accepted. Returns the number of `_bulk`
/// requests the workload's batch took.
fn fault_run(pg: &TestPg, node: &Node, run: &str, inject: Inject, no_tombstones: bool) -> u64 {
    let t = format!("mix_{run}");
    pg.sql(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, n int, body text);
         ALTER TABLE {t} ALTER COLUMN body SET STORAGE EXTERNAL;"
    ));
    let f = FerryDir::new();
    let proxy = FaultProxy::start(node.port);
    let table = Table::new(&t, &["id"], &format!("fault_{t}"));
    let slot = format!("slot_{run}");
    // About 40 documents a request, one batch for the whole workload.
    write_config(
        pg,
        &f,
        node,
        std::slice::from_ref(&table),
        &slot,
        "batch_max_bytes = 131072\nbatch_max_ms = 2000",
        "",
    );
    via_proxy(&f, node, &proxy);
    let mut cfg = std::fs::read_to_string(f.path("pgferry.toml"))
        .unwrap()
        .replace(
            "publication = \"pgferry\"",
            &format!("publication = \"pub_{run}\""),
        );
    if no_tombstones {
        let m = f.path("settings.json");
        std::fs::write(&m, r#"{"settings": {"index": {"gc_deletes": "0s"}}}"#).unwrap();
        cfg = cfg.replace(
            "batch_max_ms = 2000",
            &format!("batch_max_ms = 2000\nmapping_file = \"{}\"", m.display()),
        );
    }
    std::fs::write(f.path("pgferry.toml"), cfg).unwrap();
    let run_ferry = || {
        let g = Guard(f.run());
        wait_active(pg, &f, &slot);
        g
    };
    let mut g = run_ferry();
    pg.sql(&format!(
        "INSERT INTO {t} SELECT i, 0, repeat(md5(i::text), 100) FROM generate_series(1, 80) i"
    ));
    wait_equal(pg, node, &f, &[&table]);
    assert!(terminate(&mut g.0).success(), "{}", f.log());
    for sql in fault_workload(&t) {
        pg.sql(&sql);
    }
    let before = proxy.bulk_requests();
    match inject {
        Inject::Nothing => {}
        Inject::At(n, fault) => proxy.arm(n, fault),
        Inject::Walk(n) => proxy.walk(n, Fault::Refuse),
    }
    let mut g = run_ferry();
    if let Inject::At(_, Fault::Hold) = inject {
        assert!(
            proxy.wait_held(T),
            "the request was never held\n{}",
            tail(&f.log(), 20)
        );
        kill9(&mut g.0);
        proxy.release();
        g = run_ferry();
    }
    wait_applied(pg, &f);
    assert_eq!(
        proxy.pending(),
        0,
        "{run}: not every fault happened ({inject:?}); the batch took {} requests",
        proxy.bulk_requests() - before
    );
    if let Some(d) = diff(pg, node, &table, "") {
        panic!("{run} ({inject:?}): {d}\n{}", tail(&f.log(), 40));
    }
    assert!(
        !f.path("state/search.dead-letter.jsonl").exists(),
        "{run}: {}",
        std::fs::read_to_string(f.path("state/search.dead-letter.jsonl")).unwrap_or_default()
    );
    assert!(terminate(&mut g.0).success(), "{}", f.log());
    pg.sql(&format!("SELECT pg_drop_replication_slot('{slot}')"));
    // Dozens of runs: their indices would slow a restart of the shared node.
    node.req("DELETE", &format!("/{}", table.index), None);
    proxy.bulk_requests() - before
}

/// Runs `runs` (name, what to inject, without tombstones) side by side, a
/// few at a time (each has its own table, slot, index, proxy and pgferry).
fn fault_runs(pg: &TestPg, node: &Node, runs: Vec<(String, Inject, bool)>) {
    for group in runs.chunks(4) {
        std::thread::scope(|s| {
            for (name, inject, no_tombstones) in group {
                s.spawn(move || fault_run(pg, node, name, *inject, *no_tombstones));
            }
        });
    }
}

/// A 502 at each request boundary of a multi-request batch (a request that
/// never reaches the node, and the batch retried), with the index keeping
/// delete tombstones (the default) and without them; and at every boundary
/// in turn within one run: every document equals `to_jsonb(row)`.
#[test]
fn a_failed_request_at_each_boundary_of_a_batch_leaves_every_document_whole() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    let started = Instant::now();
    let requests = fault_run(&pg, node, "clean", Inject::Nothing, false);
    assert!(requests >= 4, "the batch took only {requests} requests");
    eprintln!(
        "the batch takes {requests} requests ({:?})",
        started.elapsed()
    );
    let mut runs: Vec<(String, Inject, bool)> = Vec::new();
    for n in 1..=requests {
        let at = Inject::At(n, Fault::Refuse);
        runs.push((format!("refuse{n}"), at, false));
        runs.push((format!("refuse{n}_gc"), at, true));
    }
    // The pipeline's backoff doubles with each failure: six keep it short.
    runs.push(("walk".into(), Inject::Walk(requests.min(6)), true));
    let count = runs.len();
    fault_runs(&pg, node, runs);
    eprintln!("{} runs in {:?}", count + 1, started.elapsed());
}

/// The node dies in the middle of a request (the first half of its
/// operations applied, then a 502; the index without delete tombstones),
/// and pgferry is killed (-9) while a request is in flight, at each request
/// of the batch: every document equals `to_jsonb(row)`.
#[test]
fn a_half_applied_request_or_a_kill_9_inside_a_batch_leaves_every_document_whole() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    let started = Instant::now();
    let requests = fault_run(&pg, node, "clean", Inject::Nothing, false);
    let runs: Vec<(String, Inject, bool)> = (1..=requests)
        .flat_map(|n| {
            [
                (format!("half{n}"), Inject::At(n, Fault::Partial), true),
                (format!("kill{n}"), Inject::At(n, Fault::Hold), false),
            ]
        })
        .collect();
    let count = runs.len();
    fault_runs(&pg, node, runs);
    eprintln!("{} runs in {:?}", count + 1, started.elapsed());
}

/// Applies `edits` (text, replacement) to `pgferry.toml` and gives its
/// metrics endpoint a fixed free port, which it returns (for `/readyz`).
fn edit_config(f: &FerryDir, edits: &[(&str, &str)]) -> u16 {
    let port = support::pg::free_port();
    let mut cfg = std::fs::read_to_string(f.path("pgferry.toml")).unwrap();
    for (from, to) in edits {
        cfg = cfg.replace(from, to);
    }
    cfg = cfg.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(f.path("pgferry.toml"), cfg).unwrap();
    port
}

/// When the index has nothing to complete an update from and Postgres
/// refuses the read (the source role may not SELECT the table), no partial
/// document is indexed: the change is dead-lettered with the reason,
/// counted, and `/readyz` says so until a later write repairs the rows.
#[test]
fn an_update_that_cannot_be_completed_is_dead_lettered_and_keeps_readyz_down_until_repaired() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    // The rows predate the slot, so the index has nothing to complete from.
    pg.sql(
        "CREATE TABLE secret (id int PRIMARY KEY, n int, body text);
         ALTER TABLE secret ALTER COLUMN body SET STORAGE EXTERNAL;
         INSERT INTO secret SELECT i, 0, repeat(md5(i::text), 100) FROM generate_series(1, 5) i;
         CREATE ROLE ferry LOGIN REPLICATION;
         GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO ferry;
         CREATE PUBLICATION pgferry FOR TABLE secret;",
    );
    let f = FerryDir::new();
    let tables = [Table::new("secret", &["id"], "refused_secret")];
    write_config(&pg, &f, node, &tables, "pgferry", "", "");
    let port = edit_config(&f, &[(&pg.url(), &pg.url_for("ferry", "postgres"))]);
    let mut g = start(&pg, &f);
    pg.sql("UPDATE secret SET n = 1 WHERE id <= 3");
    let dead = f.path("state/search.dead-letter.jsonl");
    let deadline = Instant::now() + T;
    while dead_letters(&dead).len() < 3 {
        assert!(Instant::now() < deadline, "{}", tail(&f.log(), 30));
        std::thread::sleep(Duration::from_millis(100));
    }
    for (line, id) in dead_letters(&dead).iter().zip(1..) {
        assert_eq!(line["id"], id.to_string(), "{line}");
        assert_eq!(line["status"], Value::Null);
        assert_eq!(
            line["error"]["type"], "pgferry_incomplete_document",
            "{line}"
        );
        let reason = line["error"]["reason"].as_str().unwrap();
        assert!(
            reason.contains("body") && reason.contains("permission denied"),
            "{reason}"
        );
        assert_eq!(line["event"]["op"], "update");
    }
    // Nothing partial was indexed.
    assert_eq!(node.count("refused_secret"), 0);
    let (status, body) = support::http::get(port, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("incompletely"), "{body}");
    let (_, metrics) = support::http::get(port, "/metrics").unwrap();
    assert!(
        metrics.contains("pgferry_sink_incomplete_rows{sink=\"search\"} 3"),
        "{metrics}"
    );
    // Changes that carry the whole rows repair them, and /readyz recovers.
    pg.sql("UPDATE secret SET body = body || 'x' WHERE id <= 3");
    let deadline = Instant::now() + T;
    loop {
        let ready = support::http::get(port, "/readyz");
        if diff(&pg, node, &tables[0], "WHERE id <= 3").is_none()
            && ready.as_ref().is_some_and(|r| r.0 == 200)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ready:?}\n{}",
            tail(&f.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(terminate(&mut g.0).success(), "{}", f.log());
}

/// The index is deleted while pgferry is down (an operator's cleanup, a
/// restored cluster): at start the sink has a checkpoint but no index, which
/// is a loss. With `on_data_loss = "backfill"` it is logged and counted, the
/// sink's tables are reloaded into it, so the index equals the table again
/// (changes made meanwhile included), and `/readyz` is ready afterwards.
#[test]
fn an_index_deleted_while_pgferry_is_down_is_noticed_and_reloaded() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    pg.sql(
        "CREATE TABLE lost (id int PRIMARY KEY, body text, n int);
         INSERT INTO lost SELECT i, md5(i::text), 0 FROM generate_series(1, 300) i;",
    );
    let f = FerryDir::new();
    let tables = [Table::new("lost", &["id"], "lost_items")];
    write_config(
        &pg,
        &f,
        node,
        &tables,
        "pgferry",
        "on_data_loss = \"backfill\"",
        "",
    );
    let port = edit_config(&f, &[("[source]\n", "[source]\nsnapshot = \"initial\"\n")]);
    let mut g = start(&pg, &f);
    pg.sql("UPDATE lost SET n = 1 WHERE id <= 100");
    wait_equal(&pg, node, &f, &[&tables[0]]);
    wait_applied(&pg, &f);
    assert!(terminate(&mut g.0).success(), "{}", f.log());

    let (status, _) = node.req("DELETE", "/lost_items", None);
    assert_eq!(status, 200);
    pg.sql("UPDATE lost SET n = 2 WHERE id > 250; DELETE FROM lost WHERE id = 7;");
    let log_before = f.log().len();
    let mut g = start(&pg, &f);
    let deadline = Instant::now() + T;
    loop {
        let m = support::http::get(port, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default();
        if support::http::value(&m, "pgferry_sink_data_loss_total{sink=\"search\"}") == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the loss was not counted:\n{}",
            tail(&f.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = f.log();
    let after = &log[log_before.min(log.len())..];
    assert!(
        after.contains("WARN") && after.contains("search") && after.contains("lost_items"),
        "no WARN names the sink and its lost index:\n{}",
        tail(&log, 30)
    );
    wait_equal(&pg, node, &f, &[&tables[0]]);
    let deadline = Instant::now() + T;
    while support::http::get(port, "/readyz").map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            support::http::get(port, "/readyz")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(terminate(&mut g.0).success(), "{}", f.log());
}
