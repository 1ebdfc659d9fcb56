//! The README's cache-aside setup end to end, with both sinks in one pgferry:
//! a real Postgres, the real binary, a real redis-server and a real
//! OpenSearch node (one per test binary, see `support::opensearch`).
//!
//! `products` goes to Redis as `product:{id}` (json mode) and to a search
//! index. After each workload every row, as `to_jsonb(row)`, equals both its
//! Redis value and its document, and neither store holds anything else. The
//! outage tests also check that the sinks are isolated: while one store is
//! down the other keeps receiving new rows, and the failing sink is detached
//! and later replayed from its checkpoint.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::ferry::{kill9, terminate, wait_active, FerryDir, Guard};
use support::opensearch::{node, Node};
use support::pg::TestPg;
use support::redis::TestRedis;

/// Longest wait for the stores to catch up with Postgres.
const T: Duration = Duration::from_secs(180);

/// `body` is stored out of line (TOAST) whatever its content; the workload
/// puts >8 kB of random hex in it and updates other columns of those rows.
const DDL: &str = "CREATE TABLE products (
    id int PRIMARY KEY, name text NOT NULL, price numeric(10,2), big numeric,
    tags text[], attrs jsonb, body text, seen timestamptz);
    ALTER TABLE products ALTER COLUMN body SET STORAGE EXTERNAL;";

/// An incompressible text of 9600 characters (random md5s).
const BIG: &str =
    "(SELECT string_agg(md5(random()::text || g), '') FROM generate_series(1, 300) g)";

/// One test's servers and pgferry directory.
struct Setup {
    pg: TestPg,
    redis: TestRedis,
    f: FerryDir,
    index: String,
}

/// Starts Postgres and Redis, creates `products` and writes `pgferry.toml`
/// with the Redis sink `cache` and the search sink `search` (index `index`),
/// and a transaction memory budget of `memory_limit_mb`.
fn setup(node: &Node, index: &str, memory_limit_mb: u64) -> Setup {
    let pg = TestPg::start();
    let redis = TestRedis::new();
    pg.sql(DDL);
    let f = FerryDir::new();
    let text = format!(
        r#"[source]
url = "{pg}"
slot = "pgferry"
publication = "pgferry"
tables = ["public.products"]

[checkpoint]
dir = "{state}"

[metrics]
listen = "127.0.0.1:0"

[pipeline]
memory_limit_mb = {memory_limit_mb}

[[sink]]
name = "cache"
type = "redis"
url = "{redis}"
timeout_secs = 2
[sink.tables."public.products"]
key = "product:{{id}}"
mode = "json"

[[sink]]
name = "search"
type = "elasticsearch"
url = "{search}"
request_timeout_secs = 10
[sink.tables."public.products"]
index = "{index}"
"#,
        pg = pg.url(),
        state = f.path("state").display(),
        redis = redis.url(),
        search = node.url(),
    );
    std::fs::write(f.path("pgferry.toml"), text).unwrap();
    Setup {
        pg,
        redis,
        f,
        index: index.to_string(),
    }
}

fn start(s: &Setup) -> Guard {
    let g = Guard(s.f.run());
    wait_active(&s.pg, &s.f, "pgferry");
    g
}

/// Every row as `to_jsonb(row)`, by id.
fn pg_rows(pg: &TestPg) -> BTreeMap<String, Value> {
    support::oracle::table_rows(pg, "products")
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 300 {
        format!("{}… ({} bytes)", &s[..300], s.len())
    } else {
        s
    }
}

/// What differs between the rows and Redis: every row's `product:{id}`
/// holds it as JSON, pgferry's key set for TRUNCATE holds exactly those
/// keys, and there is no other key outside `pgferry:*`.
fn redis_diff(rows: &BTreeMap<String, Value>, r: &TestRedis) -> Vec<String> {
    let mut problems = Vec::new();
    let mut c = r.conn();
    let ids: Vec<&String> = rows.keys().collect();
    for chunk in ids.chunks(500) {
        let keys: Vec<String> = chunk.iter().map(|id| format!("product:{id}")).collect();
        let got: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut c).unwrap();
        for ((id, key), got) in chunk.iter().zip(&keys).zip(got) {
            let row = &rows[*id];
            match got.map(|g| serde_json::from_str::<Value>(&g)) {
                None => problems.push(format!("{key} missing")),
                Some(Err(e)) => problems.push(format!("{key} is not JSON: {e}")),
                Some(Ok(v)) if &v != row => {
                    problems.push(format!("{key}: Redis {} vs row {}", short(&v), short(row)))
                }
                Some(Ok(_)) => {}
            }
        }
    }
    let want: BTreeSet<String> = rows.keys().map(|id| format!("product:{id}")).collect();
    let members: BTreeSet<String> = redis::cmd("SMEMBERS")
        .arg("pgferry:pgferry:cache:keys:public.products")
        .query(&mut c)
        .unwrap();
    if members != want {
        problems.push(format!(
            "key set: {} members, {} rows",
            members.len(),
            want.len()
        ));
    }
    let actual: BTreeSet<String> = r
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with("pgferry:"))
        .collect();
    for k in actual.difference(&want) {
        problems.push(format!("extra key {k}"));
    }
    problems
}

/// What differs between the rows and the index: every row is the `_source`
/// of the document with its id, and there is no other document.
fn index_diff(rows: &BTreeMap<String, Value>, node: &Node, index: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let docs = node.docs(index);
    let got: BTreeMap<String, Value> = docs.iter().cloned().collect();
    if got.len() != docs.len() {
        problems.push(format!("{} duplicate ids", docs.len() - got.len()));
    }
    for (id, row) in rows {
        match got.get(id) {
            None => problems.push(format!("document {id} missing")),
            Some(doc) if doc != row => problems.push(format!(
                "document {id}: {} vs row {}",
                short(doc),
                short(row)
            )),
            Some(_) => {}
        }
    }
    for id in got.keys().filter(|id| !rows.contains_key(*id)) {
        problems.push(format!("extra document {id}"));
    }
    problems
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until Redis and the index both equal the table; returns how long
/// it took. Fails only when the differences stopped changing for `T`.
fn wait_both_equal(s: &Setup, node: &Node) -> Duration {
    let started = Instant::now();
    let problems = || {
        let rows = pg_rows(&s.pg);
        let mut problems = redis_diff(&rows, &s.redis);
        let in_redis = problems.len();
        problems.extend(index_diff(&rows, node, &s.index));
        (rows.len(), in_redis, problems)
    };
    support::progress::wait_for(
        T,
        || match problems() {
            (_, _, p) if p.is_empty() => Ok(()),
            (_, _, p) => Err(p),
        },
        || {
            let (rows, in_redis, mut p) = problems();
            let n = p.len();
            p.truncate(12);
            format!(
                "{rows} rows; {in_redis} differences in Redis, {} in the index, e.g.\n  {}\n--- pgferry log (end) ---\n{}",
                n - in_redis,
                p.join("\n  "),
                tail(&s.f.log(), 60)
            )
        },
    );
    started.elapsed()
}

/// Waits until both Redis and the index hold something; fails only when
/// neither moved for `T`.
fn wait_replicating(s: &Setup, node: &Node) {
    support::progress::wait_for(
        T,
        || {
            let dbsize: i64 = redis::cmd("DBSIZE").query(&mut s.redis.conn()).unwrap();
            let indexed = node.count(&s.index);
            if dbsize > 0 && indexed > 0 {
                Ok(())
            } else {
                Err((dbsize, indexed))
            }
        },
        || format!("nothing replicated yet:\n{}", tail(&s.f.log(), 30)),
    )
}

/// The messages (JSON log lines) pgferry logged for `sink` (any sink: `None`).
fn messages(f: &FerryDir, sink: Option<&str>) -> Vec<String> {
    f.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| sink.is_none_or(|s| v["fields"]["sink"] == s))
        .filter_map(|v| v["fields"]["message"].as_str().map(String::from))
        .collect()
}

/// Asserts that `sink` was detached, asked for a replay, and that the
/// session was restarted for it.
fn assert_detached_and_replayed(f: &FerryDir, sink: &str) {
    let own = messages(f, Some(sink));
    let all = messages(f, None);
    let has = |msgs: &[String], needle: &str| msgs.iter().any(|m| m.contains(needle));
    for m in own.iter().filter(|m| m.contains(": detached;")) {
        eprintln!("{sink}: {m}");
    }
    assert!(
        has(&own, "sink batch failed; retrying"),
        "{sink} never failed:\n{}",
        tail(&f.log(), 40)
    );
    assert!(
        has(&own, ": detached;"),
        "{sink} was never detached:\n{}",
        tail(&f.log(), 40)
    );
    assert!(
        has(&own, "detached sink recovered; asking for a replay"),
        "{sink} never asked for a replay:\n{}",
        tail(&f.log(), 40)
    );
    assert!(
        has(
            &all,
            "restarting the session so a recovered sink catches up"
        ),
        "the session was never restarted for {sink}:\n{}",
        tail(&f.log(), 40)
    );
    // The next session replayed from that sink's checkpoint.
    let lines: Vec<Value> = f
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let asked = lines
        .iter()
        .position(|v| {
            v["fields"]["sink"] == sink
                && v["fields"]["message"]
                    == "detached sink recovered; asking for a replay from its checkpoint"
        })
        .unwrap();
    let at = &lines[asked]["fields"]["at"];
    let next = lines[asked..]
        .iter()
        .find(|v| v["fields"]["message"] == "pgferry streaming")
        .unwrap_or_else(|| panic!("no session after the rejoin:\n{}", tail(&f.log(), 40)));
    assert_eq!(&next["fields"]["start"], at, "{next}");
    eprintln!("{sink}: replayed from {at}");
}

/// What the workload does besides its usual changes.
#[derive(Clone, Copy)]
struct Workload {
    /// Session 0 truncates the table now and then.
    truncate: bool,
    /// Every n-th row gets a >8 kB body (1: every row, ~20 kB a transaction).
    big_every: i32,
}

/// A steady workload from three sessions until `stop`: inserts (some rows
/// with a >8 kB body), updates of other columns of TOASTed rows (Postgres
/// does not send the unchanged body), body rewrites, NULLs, deletes and key
/// changes, each session on its own id range. Returns the transactions run.
fn start_workload(
    pg: &TestPg,
    rt: &tokio::runtime::Runtime,
    stop: &Arc<AtomicBool>,
    load: Workload,
) -> Vec<tokio::task::JoinHandle<u32>> {
    support::workload::spawn(
        pg,
        rt,
        stop,
        support::workload::Sessions {
            count: 3,
            seed: 0x2545_F491,
            pause: Duration::from_millis(10),
            on_error: support::workload::OnError::Panic,
        },
        |w| {
            let w = w as i32;
            let base = w * 10_000_000;
            let mut next = base;
            move |rng, txns| {
                let mut rnd = |n: u32| rng.below(n);
                let rows = 1 + rnd(3) as i32;
                let mut sql = format!(
                "BEGIN;
                 INSERT INTO products
                 SELECT i, 'p' || i, i % 1000 + 0.5, 12345678901234567890.000000000001 * i,
                        ARRAY['w{w}', 'n:' || i], jsonb_build_object('n', i, 'price', 1.50, 'l', jsonb_build_array(i, null)),
                        CASE WHEN i % {big_every} = 0 THEN {BIG} ELSE 'short ' || i END,
                        '2024-01-01 00:00:00+00'::timestamptz + i * interval '1.5 second'
                 FROM generate_series({}, {}) i;",
                next + 1,
                next + rows,
                big_every = load.big_every,
            );
                next += rows;
                let some = |r: u32| base + 1 + (r as i32 % (next - base));
                // Other columns of rows that may hold a TOASTed body.
                for _ in 0..2 {
                    if rnd(2) == 0 {
                        let id = some(rnd(1 << 30));
                        sql += &format!(
                        "UPDATE products SET price = price + 1, name = name || '+' WHERE id = {};",
                        id + (3 - id % 3) % 3
                    );
                    }
                }
                if rnd(4) == 0 {
                    sql += &format!(
                        "UPDATE products SET attrs = NULL, tags = NULL, seen = NULL WHERE id = {};",
                        some(rnd(1 << 30))
                    );
                }
                if rnd(8) == 0 {
                    sql += &format!(
                        "UPDATE products SET body = {BIG} WHERE id = {};",
                        some(rnd(1 << 30))
                    );
                }
                if rnd(4) == 0 {
                    sql += &format!("DELETE FROM products WHERE id = {};", some(rnd(1 << 30)));
                }
                if rnd(10) == 0 {
                    // A key change, often of a row with a TOASTed body left unchanged.
                    sql += &format!(
                        "UPDATE products SET id = id + 50000000, name = 'moved' WHERE id = {};",
                        some(rnd(1 << 30))
                    );
                }
                sql += "COMMIT;";
                let mut statements = vec![sql];
                if load.truncate && w == 0 && txns % 200 == 199 {
                    statements.push("TRUNCATE products".into());
                }
                statements
            }
        },
    )
}

/// Asserts that some rows hold a TOASTed body, so that the comparison
/// covered values Postgres stores out of line.
fn assert_toasted_rows(pg: &TestPg) {
    let n: i64 = pg
        .sql("SELECT count(*) FROM products WHERE length(body) > 8000")
        .trim()
        .parse()
        .unwrap();
    assert!(n > 0, "no row with a large body is left");
    let toast = pg.sql(
        "SELECT count(*) FROM pg_class c JOIN pg_class t ON t.oid = c.reltoastrelid
         WHERE c.relname = 'products' AND pg_relation_size(t.oid) > 0",
    );
    assert_eq!(toast.trim(), "1", "the bodies are not in the TOAST table");
}

/// Asserts that no TOAST merge lacked the stored row (in either sink).
fn assert_merges_found_their_rows(f: &FerryDir) {
    let log = f.log();
    assert!(
        !log.contains("were deleted rather than stored incomplete")
            && !log.contains("found no document to complete"),
        "a TOAST merge found nothing to complete:\n{}",
        tail(&log, 40)
    );
}

#[test]
fn mixed_workload_keeps_redis_and_the_index_equal_to_postgres() {
    let node = node();
    let _shared = node.shared();
    let s = setup(node, "products", 16);
    let mut g = start(&s);
    let pg = &s.pg;

    // Three concurrent sessions, with truncates.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = Workload {
        truncate: true,
        big_every: 3,
    };
    let workers = start_workload(pg, &rt, &stop, load);
    std::thread::sleep(Duration::from_secs(8));
    let txns = support::workload::stop(&rt, &stop, workers);
    assert!(txns > 100, "the workload ran only {txns} transactions");

    // Then each kind of change once more, in a known order.
    // Not [1, 2.50]: the index's dynamic mapping refuses an array that
    // mixes integers and decimals in a field it has not mapped yet.
    pg.sql(&format!(
        "INSERT INTO products VALUES (900000001, 'big', 1.50, 0.000000000000000000001, '{{a,b}}', '{{\"k\": [1.25, 2.50]}}', {BIG}, now())"
    ));
    pg.sql("UPDATE products SET price = 10.10, big = 98765432109876543210.000000000001 WHERE id = 900000001");
    pg.sql("UPDATE products SET id = 900000002, attrs = NULL WHERE id = 900000001");
    pg.sql("UPDATE products SET name = 'back', price = 3.30 WHERE id = 900000002");
    pg.sql(&format!(
        "BEGIN;
         INSERT INTO products (id, name, body) VALUES (900000003, 'in txn', {BIG});
         UPDATE products SET name = 'changed in txn' WHERE id = 900000003;
         UPDATE products SET id = 900000004 WHERE id = 900000003;
         INSERT INTO products (id, name) VALUES (900000003, 'same id again');
         DELETE FROM products WHERE id = 900000002;
         INSERT INTO products (id, name, price) VALUES (900000002, 'recreated', 2.00);
         COMMIT"
    ));
    pg.sql("UPDATE products SET name = name || ' (last)', price = 7.77 WHERE id % 3 = 0");
    let took = wait_both_equal(&s, node);
    eprintln!("{txns} transactions; both equal {took:?} after the last change");
    assert_toasted_rows(pg);
    let body = pg.sql("SELECT length(body) FROM products WHERE id = 900000004");
    assert_eq!(body.trim(), "9600");

    // A truncate and new rows in one transaction, then a plain truncate.
    pg.sql(&format!(
        "BEGIN; TRUNCATE products;
         INSERT INTO products (id, name, body) VALUES (1, 'after truncate', {BIG}), (2, 'x', 'y');
         UPDATE products SET name = 'after truncate, updated' WHERE id = 1;
         COMMIT"
    ));
    wait_both_equal(&s, node);
    assert_eq!(pg_rows(pg).len(), 2);
    pg.sql("TRUNCATE products");
    wait_both_equal(&s, node);
    assert_eq!(node.count(&s.index), 0);
    assert!(
        s.redis.keys().iter().all(|k| k.starts_with("pgferry:")),
        "{:?}",
        s.redis.keys()
    );

    assert_merges_found_their_rows(&s.f);
    assert!(
        !s.f.path("state/search.dead-letter.jsonl").exists(),
        "{}",
        std::fs::read_to_string(s.f.path("state/search.dead-letter.jsonl")).unwrap_or_default()
    );
    assert!(terminate(&mut g.0).success(), "{}", tail(&s.f.log(), 40));
}

/// The outage tests' workload: transactions of ~20 kB. The failing sink is
/// detached when its queue (64 transactions) is full, or earlier when what
/// it holds is the whole memory budget: the Redis outage runs with the
/// default 16 MiB (the queue fills first), the search outage with 1 MiB
/// (the budget runs out first).
const OUTAGE_LOAD: Workload = Workload {
    truncate: false,
    big_every: 1,
};

/// Ids of the rows a test inserts itself during an outage.
const MARKER: i32 = 800_000_000;

/// Inserts marker `k` (a row with id `MARKER + k`).
fn insert_marker(pg: &TestPg, k: i32) {
    pg.sql(&format!(
        "INSERT INTO products (id, name, body) VALUES ({}, 'marker {k}', {BIG})",
        MARKER + k
    ));
}

/// During an outage of one store, inserts a marker row every second for
/// `secs` seconds, then waits (the store still down) until `arrived(k)`
/// holds for the last marker in the other store. Returns the markers that
/// had arrived in the other store one second after each insert.
fn markers_during_outage(
    pg: &TestPg,
    secs: i32,
    arrived: impl Fn(i32) -> bool,
    f: &FerryDir,
) -> Vec<i32> {
    let mut seen = Vec::new();
    for k in 0..secs {
        insert_marker(pg, k);
        std::thread::sleep(Duration::from_secs(1));
        if arrived(k) {
            seen.push(k);
        }
    }
    let last = secs - 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !arrived(last) {
        assert!(
            Instant::now() < deadline,
            "a row inserted {last} s into the outage never reached the other store:\n{}",
            tail(&f.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    seen
}

#[test]
fn a_redis_outage_does_not_stop_the_index() {
    let node = node();
    let _shared = node.shared();
    let mut s = setup(node, "products_redis_outage", 16);
    let mut g = start(&s);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = start_workload(&s.pg, &rt, &stop, OUTAGE_LOAD);
    // Both stores have started (waits on progress, not on a fixed time).
    wait_replicating(&s, node);
    let before = node.count(&s.index);

    s.redis.stop();
    let down = Instant::now();
    let index_has = |k: i32| {
        let (st, doc) = node.req("GET", &format!("/{}/_doc/{}", s.index, MARKER + k), None);
        st == 200 && doc["found"] == true
    };
    let seen = markers_during_outage(&s.pg, 9, index_has, &s.f);
    let during = node.count(&s.index);
    let outage = down.elapsed();
    // Redis really was down all along.
    assert!(
        redis::Client::open(s.redis.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(1))
            .is_err(),
        "Redis is answering"
    );
    eprintln!(
        "Redis down for {outage:?}: the index went from {before} to {during} documents; markers indexed within 1 s: {seen:?}"
    );
    assert!(outage >= Duration::from_secs(8));
    assert!(
        during > before,
        "the index got nothing while Redis was down"
    );
    assert!(
        messages(&s.f, Some("cache"))
            .iter()
            .any(|m| m.contains(": detached;")),
        "Redis was not detached while it was down:\n{}",
        tail(&s.f.log(), 40)
    );

    s.redis.start();
    std::thread::sleep(Duration::from_secs(2));
    let txns = support::workload::stop(&rt, &stop, workers);
    let took = wait_both_equal(&s, node);
    eprintln!("{txns} transactions; both equal {took:?} after the last one");
    assert_detached_and_replayed(&s.f, "cache");
    assert_merges_found_their_rows(&s.f);
    assert!(terminate(&mut g.0).success(), "{}", tail(&s.f.log(), 40));
}

#[test]
fn a_search_outage_does_not_stop_redis() {
    let node = node();
    // It stops the node: no other test of this binary runs meanwhile.
    let _exclusive = node.exclusive();
    let s = setup(node, "products_search_outage", 1);
    let mut g = start(&s);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = start_workload(&s.pg, &rt, &stop, OUTAGE_LOAD);
    wait_replicating(&s, node);
    let keys = |r: &TestRedis| -> i64 { redis::cmd("DBSIZE").query(&mut r.conn()).unwrap() };
    let before = keys(&s.redis);

    node.kill();
    let down = Instant::now();
    let redis_has = |k: i32| {
        redis::cmd("EXISTS")
            .arg(format!("product:{}", MARKER + k))
            .query::<i64>(&mut s.redis.conn())
            .unwrap()
            == 1
    };
    let seen = markers_during_outage(&s.pg, 9, redis_has, &s.f);
    let during = keys(&s.redis);
    let outage = down.elapsed();
    assert!(
        node.try_req("GET", "/", None).is_err(),
        "the node is answering"
    );
    eprintln!(
        "search node down for {outage:?}: Redis went from {before} to {during} keys; markers cached within 1 s: {seen:?}"
    );
    assert!(outage >= Duration::from_secs(8));
    assert!(
        during > before,
        "Redis got nothing while the index was down"
    );
    assert!(
        messages(&s.f, Some("search"))
            .iter()
            .any(|m| m.contains(": detached;")),
        "the search sink was not detached while the node was down:\n{}",
        tail(&s.f.log(), 40)
    );

    node.start();
    std::thread::sleep(Duration::from_secs(2));
    let txns = support::workload::stop(&rt, &stop, workers);
    let took = wait_both_equal(&s, node);
    eprintln!("{txns} transactions; both equal {took:?} after the last one");
    assert_detached_and_replayed(&s.f, "search");
    assert_merges_found_their_rows(&s.f);
    assert!(terminate(&mut g.0).success(), "{}", tail(&s.f.log(), 40));
}

#[test]
fn kill_9_twice_during_the_workload_then_both_equal_postgres() {
    let node = node();
    let _shared = node.shared();
    let s = setup(node, "products_kill", 16);
    let mut g = start(&s);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = Workload {
        truncate: true,
        big_every: 3,
    };
    let workers = start_workload(&s.pg, &rt, &stop, load);
    for (round, wait) in [2000u64, 2700].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(wait));
        kill9(&mut g.0);
        eprintln!(
            "round {round}: killed after {wait} ms; {} documents, {} Redis keys",
            node.count(&s.index),
            s.redis.keys().len()
        );
        std::thread::sleep(Duration::from_millis(300));
        g = Guard(s.f.run());
    }
    std::thread::sleep(Duration::from_secs(2));
    let txns = support::workload::stop(&rt, &stop, workers);
    assert!(txns > 200, "the workload ran only {txns} transactions");
    let took = wait_both_equal(&s, node);
    eprintln!("{txns} transactions; both equal {took:?} after the last one");
    assert_toasted_rows(&s.pg);
    // Three processes ran: each of the last two resumed from the checkpoints.
    let starts = messages(&s.f, None)
        .iter()
        .filter(|m| *m == "pgferry streaming")
        .count();
    assert!(starts >= 3, "{starts} sessions:\n{}", tail(&s.f.log(), 40));
    assert!(terminate(&mut g.0).success(), "{}", tail(&s.f.log(), 40));
}
