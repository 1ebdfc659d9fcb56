//! Snapshots and backfills end to end: a real Postgres, the real binary, a
//! real redis-server and a real OpenSearch node.
//!
//! Each test loads rows that existed before pgferry streamed them, while
//! other sessions keep changing the table, and then checks that every row of
//! the table, as `to_jsonb(row)`, equals:
//! - the row rebuilt from the JSONL events (reads, inserts, updates with
//!   unchanged TOAST columns merged, deletes, truncates, in file order),
//! - its Redis value (json mode),
//! - its document in the search index,
//!
//! and that none of them holds anything else.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::ferry::{kill9, read_jsonl, terminate, wait_active, FerryDir, Guard};
use support::opensearch::{node, Node};
use support::pg::TestPg;
use support::redis::TestRedis;

/// How long a wait for a snapshot or for the stores to catch up may go
/// without progress (rows done, rows equal) before the test fails.
const T: Duration = Duration::from_secs(300);

/// `body` is stored out of line; every 500th row has a 9.6 kB one, which
/// the workload leaves unchanged while it updates other columns.
const DDL: &str = "CREATE TABLE items (
    id bigint PRIMARY KEY, n int NOT NULL, note text, price numeric(12,2),
    tags text[], body text, seen timestamptz);
    ALTER TABLE items ALTER COLUMN body SET STORAGE EXTERNAL;";

const BIG: &str =
    "(SELECT string_agg(md5(random()::text || g), '') FROM generate_series(1, 300) g)";

fn fill(pg: &TestPg, from: i64, to: i64) {
    pg.sql(&format!(
        "INSERT INTO items SELECT i, 0, 'row ' || i, (i % 997) + 0.25, ARRAY['t' || (i % 7), NULL],
                CASE WHEN i % 500 = 0 THEN {BIG} END,
                '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 second'
         FROM generate_series({from}, {to}) i;
         ANALYZE items;"
    ));
}

/// The stores a test feeds.
struct Stores<'a> {
    redis: Option<TestRedis>,
    node: Option<&'a Node>,
    index: String,
}

/// Writes the config: JSONL sink `changes`, and when given a Redis sink
/// `cache` (`item:{id}`, json) and a search sink `search`.
fn write_config(pg: &TestPg, f: &FerryDir, s: &Stores, snapshot: &str, extra: &str) {
    let mut text = format!(
        r#"[source]
url = "{pg}"
slot = "pgferry"
publication = "pgferry"
tables = ["public.items"]
snapshot = "{snapshot}"

[checkpoint]
dir = "{state}"

[snapshot]
{extra}

[metrics]
listen = "127.0.0.1:0"

[[sink]]
name = "changes"
type = "jsonl"
path = "{jsonl}"
"#,
        pg = pg.url(),
        state = f.path("state").display(),
        jsonl = f.jsonl().display(),
    );
    if let Some(r) = &s.redis {
        text += &format!(
            r#"
[[sink]]
name = "cache"
type = "redis"
url = "{}"
[sink.tables."public.items"]
key = "item:{{id}}"
mode = "json"
"#,
            r.url()
        );
    }
    if let Some(n) = s.node {
        text += &format!(
            r#"
[[sink]]
name = "search"
type = "elasticsearch"
url = "{}"
request_timeout_secs = 30
[sink.tables."public.items"]
index = "{}"
"#,
            n.url(),
            s.index
        );
    }
    std::fs::write(f.path("pgferry.toml"), text).unwrap();
}

/// Every row as `to_jsonb(row)`, by id.
fn pg_rows(pg: &TestPg) -> BTreeMap<String, Value> {
    support::oracle::table_rows(pg, "items")
}

/// The table rebuilt from the JSONL events, by id.
fn jsonl_rows(events: &[Value]) -> BTreeMap<String, Value> {
    let mut rows: BTreeMap<String, Value> = BTreeMap::new();
    for e in events {
        match e["op"].as_str().unwrap() {
            "read" | "insert" => {
                rows.insert(e["after"]["id"].to_string(), e["after"].clone());
            }
            "update" => {
                let id = e["after"]["id"].to_string();
                let old_id = if e["before"]["id"].is_number() {
                    e["before"]["id"].to_string()
                } else {
                    id.clone()
                };
                let old = rows.remove(&old_id);
                let mut row = e["after"].clone();
                if let (Some(Value::Object(old)), Some(unchanged)) =
                    (old, e["unchanged"].as_array())
                {
                    for c in unchanged {
                        let c = c.as_str().unwrap();
                        row[c] = old
                            .get(c)
                            .cloned()
                            .unwrap_or(Value::String("<MISSING>".into()));
                    }
                }
                rows.insert(id, row);
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

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 200 {
        format!("{}… ({} bytes)", &s[..200], s.len())
    } else {
        s
    }
}

fn map_diff(
    what: &str,
    want: &BTreeMap<String, Value>,
    got: &BTreeMap<String, Value>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (id, row) in want {
        match got.get(id) {
            None => out.push(format!("{what}: {id} missing")),
            Some(v) if v != row => {
                out.push(format!("{what}: {id}: {} vs row {}", short(v), short(row)))
            }
            Some(_) => {}
        }
    }
    for id in got.keys().filter(|k| !want.contains_key(*k)) {
        out.push(format!("{what}: extra {id}"));
    }
    out
}

fn redis_rows(r: &TestRedis) -> BTreeMap<String, Value> {
    let mut c = r.conn();
    let keys: Vec<String> = r
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("item:"))
        .collect();
    let mut out = BTreeMap::new();
    for chunk in keys.chunks(1000) {
        let got: Vec<Option<String>> = redis::cmd("MGET").arg(chunk).query(&mut c).unwrap();
        for (k, v) in chunk.iter().zip(got) {
            if let Some(v) = v {
                out.insert(
                    k.trim_start_matches("item:").to_string(),
                    serde_json::from_str(&v).unwrap_or(Value::String(v)),
                );
            }
        }
    }
    out
}

/// Differences between the table and every store.
fn differences(pg: &TestPg, f: &FerryDir, s: &Stores) -> (usize, Vec<String>) {
    let rows = pg_rows(pg);
    let mut problems = map_diff("jsonl", &rows, &jsonl_rows(&f.events()));
    if let Some(r) = &s.redis {
        problems.extend(map_diff("redis", &rows, &redis_rows(r)));
    }
    if let Some(n) = s.node {
        let docs: BTreeMap<String, Value> = n.docs(&s.index).into_iter().collect();
        problems.extend(map_diff("index", &rows, &docs));
    }
    (rows.len(), problems)
}

/// Waits until every store equals the table. Fails only when the stores
/// made no progress (rows held, differences left) for `T`.
fn wait_equal(pg: &TestPg, f: &FerryDir, s: &Stores) -> usize {
    // Cheap first: the stores hold as many rows as the table (the full
    // comparison below parses every event and document).
    support::progress::wait_for(
        T,
        || {
            let rows: usize = pg.sql("SELECT count(*) FROM items").trim().parse().unwrap();
            let redis = s
                .redis
                .as_ref()
                .map(|r| r.keys().iter().filter(|k| k.starts_with("item:")).count());
            let index = s.node.map(|n| n.count(&s.index) as usize);
            if redis.is_none_or(|n| n == rows) && index.is_none_or(|n| n == rows) {
                Ok(())
            } else {
                Err((redis, index))
            }
        },
        || tail(&f.log(), 40),
    );
    support::progress::wait_for(
        T,
        || {
            let (n, problems) = differences(pg, f, s);
            if problems.is_empty() {
                Ok(n)
            } else {
                Err(problems)
            }
        },
        || {
            let (n, mut problems) = differences(pg, f, s);
            let k = problems.len();
            problems.truncate(12);
            format!(
                "{n} rows, {k} differences, e.g.\n  {}\n--- pgferry log (end) ---\n{}",
                problems.join("\n  "),
                tail(&f.log(), 40)
            )
        },
    )
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `snapshot.json`.
fn state(f: &FerryDir) -> Value {
    std::fs::read_to_string(f.path("state/snapshot.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

/// Waits until `snapshot.json` shows `finished` jobs for `n` tables and no
/// open job. Fails only when no row was done for `T`.
fn wait_snapshot_done(f: &FerryDir, n: usize) -> Value {
    support::progress::wait_for(
        T,
        || {
            let st = state(f);
            let open = st["jobs"].as_array().map_or(usize::MAX, Vec::len);
            let done = st["finished"].as_array().map_or(0, Vec::len);
            if open == 0 && done >= n {
                return Ok(st);
            }
            let rows: u64 = st["jobs"].as_array().map_or(0, |j| {
                j.iter().filter_map(|j| j["rows_done"].as_u64()).sum()
            });
            Err((done, rows))
        },
        || {
            format!(
                "the snapshot did not finish: {}\n{}",
                state(f),
                tail(&f.log(), 30)
            )
        },
    )
}

/// Three sessions changing `items` until `stop`: updates of `n` and `note`
/// (rows with a TOASTed body keep it unchanged), deletes, inserts of new
/// ids, a key change now and then. Ids stay below `max_id` except inserts.
///
/// Each session pauses [`WORKLOAD_PAUSE`] between transactions: about 100
/// transactions (800 changes) a second in all, well under what the search
/// sink absorbs on a busy 2-core machine. Without a pause the three sessions
/// wrote about 3,600 changes a second, more than the OpenSearch node could
/// index there (about 2,300 a second), so the snapshot got only what the
/// stream left over and took from 3 to 24 minutes depending on the machine's
/// other load: the test timed a race, not pgferry.
const WORKLOAD_PAUSE: Duration = Duration::from_millis(25);

fn start_workload(
    pg: &TestPg,
    rt: &tokio::runtime::Runtime,
    stop: &Arc<AtomicBool>,
    max_id: i64,
) -> Vec<tokio::task::JoinHandle<u32>> {
    // A deadlock between sessions is possible and harmless: roll back, go on.
    support::workload::spawn(
        pg,
        rt,
        stop,
        support::workload::Sessions {
            count: 3,
            seed: 0x9E37_79B9,
            pause: WORKLOAD_PAUSE,
            on_error: support::workload::OnError::Rollback,
        },
        |w| {
            let w = w as i64;
            let mut next = 10_000_000 * (w + 1);
            move |rng, txns| {
                let mut id = || 1 + (rng.below(1 << 30) as i64 % max_id);
                let mut sql = String::from("BEGIN;");
                for _ in 0..5 {
                    let i = id();
                    sql +=
                        &format!("UPDATE items SET n = n + 1, note = 'w{w} ' || n WHERE id = {i};");
                }
                // A row with a TOASTed body: other columns change, the body is not sent.
                let i = id() / 500 * 500;
                sql += &format!(
                    "UPDATE items SET n = n + 1, price = price + 1 WHERE id = {};",
                    i.max(500)
                );
                let i = id();
                sql += &format!("DELETE FROM items WHERE id = {i};");
                next += 1;
                sql += &format!(
                    "INSERT INTO items VALUES ({next}, 1, 'new', 1.5, ARRAY['x'], NULL, now());"
                );
                if txns % 10 == 9 {
                    let i = id();
                    sql += &format!(
                        "UPDATE items SET id = id + 50000000 * {}, note = 'moved' WHERE id = {i};",
                        w + 1
                    );
                }
                sql += "COMMIT;";
                vec![sql]
            }
        },
    )
}

fn reads(events: &[Value]) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for e in events.iter().filter(|e| e["op"] == "read") {
        *n.entry(e["after"]["id"].to_string()).or_insert(0) += 1;
    }
    n
}

#[test]
fn initial_snapshot_of_500k_rows_under_a_workload_equals_the_table_in_every_sink() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    pg.sql(DDL);
    fill(&pg, 1, 500_000);
    let s = Stores {
        redis: Some(TestRedis::new()),
        node: Some(node),
        index: "snap_initial".into(),
    };
    let f = FerryDir::new();
    write_config(&pg, &f, &s, "initial", "chunk_rows = 10000\nworkers = 2");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let _g = Guard(f.run());
    wait_active(&pg, &f, "pgferry");
    let workers = start_workload(&pg, &rt, &stop, 500_000);
    let st = wait_snapshot_done(&f, 1);
    let txns = support::workload::stop(&rt, &stop, workers);
    let n = wait_equal(&pg, &f, &s);
    let events = f.events();
    let r = reads(&events);
    eprintln!(
        "{n} rows, {txns} workload transactions, {} read events, {} events; {st}",
        r.values().sum::<usize>(),
        events.len()
    );
    assert!(txns > 50, "the workload hardly ran ({txns} transactions)");
    assert!(r.len() >= 490_000, "only {} rows were read", r.len());
    // Split into ranges and read in parallel.
    assert!(f.log().contains("initial snapshot planned"));
    // Read events carry the stream position of their chunk.
    let e = events.iter().find(|e| e["op"] == "read").unwrap();
    assert_eq!(e["lsn"], e["commit_lsn"], "{e}");
    assert!(e["before"].is_null(), "{e}");
}

#[test]
fn kill_9_mid_snapshot_resumes_without_reading_finished_chunks_again() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    pg.sql(DDL);
    fill(&pg, 1, 100_000);
    let s = Stores {
        redis: Some(TestRedis::new()),
        node: Some(node),
        index: "snap_kill".into(),
    };
    let f = FerryDir::new();
    write_config(&pg, &f, &s, "initial", "chunk_rows = 2000\nworkers = 2");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut g = Guard(f.run());
    wait_active(&pg, &f, "pgferry");
    let workers = start_workload(&pg, &rt, &stop, 100_000);
    // Kill once a good part, but not all, is durably done.
    support::progress::wait_for(
        T,
        || {
            let st = state(&f);
            let done = st["jobs"][0]["rows_done"].as_u64().unwrap_or(0);
            if done >= 20_000 {
                return Ok(());
            }
            assert!(
                st["finished"].as_array().is_none_or(|a| a.is_empty()),
                "the snapshot finished before it could be killed: {st}"
            );
            Err(done)
        },
        || format!("{}\n{}", state(&f), tail(&f.log(), 30)),
    );
    kill9(&mut g.0);
    let st = state(&f);
    let job = &st["jobs"][0];
    assert!(job.is_object(), "the job is gone after the kill: {st}");
    // The keys below each range's durable lower bound were delivered before the kill.
    let ranges: Vec<(Option<i64>, Option<i64>)> = job["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let k = |v: &Value| {
                v.as_array()
                    .and_then(|a| a[0].as_str())
                    .map(|s| s.parse().unwrap())
            };
            (k(&r["after"]), k(&r["upper"]))
        })
        .collect();
    let lows: Vec<Option<i64>> = std::iter::once(None)
        .chain(ranges.iter().map(|r| r.1).take(ranges.len() - 1))
        .collect();
    let durable = |id: i64| {
        ranges
            .iter()
            .zip(&lows)
            .any(|((after, _), low)| after.is_some_and(|a| id <= a) && low.is_none_or(|l| id > l))
    };
    let done_before = job["rows_done"].as_u64().unwrap();
    eprintln!("killed with {done_before} rows durably done; ranges {ranges:?}");

    let _g = Guard(f.run());
    wait_snapshot_done(&f, 1);
    let txns = support::workload::stop(&rt, &stop, workers);
    wait_equal(&pg, &f, &s);
    assert!(
        f.log().contains("resuming snapshot jobs"),
        "{}",
        tail(&f.log(), 30)
    );
    let r = reads(&read_jsonl(&f.jsonl()));
    let durable_ids: Vec<(&String, &usize)> = r
        .iter()
        .filter(|(id, _)| id.parse::<i64>().is_ok_and(|i| i <= 100_000 && durable(i)))
        .collect();
    assert!(
        durable_ids.len() as u64 >= done_before * 9 / 10,
        "{} rows below the durable bounds were read, {done_before} reported done",
        durable_ids.len()
    );
    let again: Vec<_> = durable_ids
        .iter()
        .filter(|(_, n)| **n > 1)
        .take(5)
        .collect();
    assert!(
        again.is_empty(),
        "rows of finished chunks were read again: {again:?}"
    );
    eprintln!(
        "{txns} workload transactions; {} rows read once before the kill",
        durable_ids.len()
    );
}

#[test]
fn a_backfill_requested_from_sql_while_the_stream_is_busy_loads_every_row() {
    let node = node();
    let _shared = node.shared();
    let pg = TestPg::start();
    pg.sql(DDL);
    // Rows that exist before the slot: the stream alone never delivers them.
    fill(&pg, 1, 60_000);
    let s = Stores {
        redis: Some(TestRedis::new()),
        node: Some(node),
        index: "snap_backfill".into(),
    };
    let f = FerryDir::new();
    write_config(&pg, &f, &s, "never", "chunk_rows = 5000");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let _g = Guard(f.run());
    wait_active(&pg, &f, "pgferry");
    let workers = start_workload(&pg, &rt, &stop, 60_000);
    std::thread::sleep(Duration::from_secs(2));
    assert!(reads(&f.events()).is_empty(), "reads before any request");
    pg.sql(
        r#"SELECT pg_logical_emit_message(true, 'pgferry.backfill', '{"table": "public.items"}')"#,
    );
    wait_snapshot_done(&f, 1);
    std::thread::sleep(Duration::from_secs(1));
    let txns = support::workload::stop(&rt, &stop, workers);
    let n = wait_equal(&pg, &f, &s);
    let st = state(&f);
    assert_eq!(st["finished"][0]["kind"], "backfill", "{st}");
    eprintln!("{n} rows after a backfill under {txns} workload transactions");
}

#[test]
fn cli_backfill_with_where_loads_only_the_matching_rows() {
    let pg = TestPg::start();
    pg.sql(DDL);
    fill(&pg, 1, 3_000);
    let s = Stores {
        redis: None,
        node: None,
        index: String::new(),
    };
    let f = FerryDir::new();
    write_config(&pg, &f, &s, "never", "chunk_rows = 500");
    let _g = Guard(f.run());
    wait_active(&pg, &f, "pgferry");
    let bad = f.command(&["backfill", "--table", "public.nope"], &[]);
    assert!(!bad.status.success());
    assert!(
        bad.stderr.contains("not in source.tables"),
        "{}",
        bad.stderr
    );
    let bad = f.command(
        &[
            "backfill",
            "--table",
            "public.items",
            "--where",
            "no_such_column > 1",
        ],
        &[],
    );
    assert!(!bad.status.success());
    assert!(
        bad.stderr.contains("not a valid condition"),
        "{}",
        bad.stderr
    );
    let ok = f.command(
        &[
            "backfill",
            "--table",
            "public.items",
            "--where",
            "id % 10 = 3",
        ],
        &[],
    );
    assert!(ok.status.success(), "{}", ok.stderr);
    assert!(
        ok.stdout.contains("backfill of public.items requested"),
        "{}",
        ok.stdout
    );
    wait_snapshot_done(&f, 1);
    let ev = f.wait_events_until(T, "300 reads", |ev| reads(ev).len() >= 300);
    let r = reads(&ev);
    assert_eq!(r.len(), 300, "reads: {}", r.len());
    assert!(r.keys().all(|id| id.parse::<i64>().unwrap() % 10 == 3));
    assert!(r.values().all(|n| *n == 1));
}

#[test]
fn a_table_without_a_key_is_copied_in_an_exported_snapshot() {
    let pg = TestPg::start();
    pg.sql(
        "CREATE TABLE nokey (a int, b text);
         ALTER TABLE nokey REPLICA IDENTITY FULL;
         INSERT INTO nokey SELECT i % 5000, 'v' || i FROM generate_series(1, 20000) i;",
    );
    let f = FerryDir::new();
    f.write_config(&pg.url(), &["public.nokey"], "snapshot = \"initial\"", "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let _g = Guard(f.run());
    wait_active(&pg, &f, "pgferry");
    // The workload starts once the copy's point is fixed (the temporary
    // slot exists), so that every change comes after the copied rows: on
    // a loaded machine the first changes could otherwise precede the point.
    support::progress::wait_for(
        T,
        || match f.log() {
            l if l.contains("copying the table in an exported snapshot") => Ok(()),
            l => Err(l.len()),
        },
        || tail(&f.log(), 20),
    );
    // A workload on the table while it is copied.
    let client = rt.block_on(pg.client());
    let stop2 = stop.clone();
    let work = rt.spawn(async move {
        let mut i = 0;
        while !stop2.load(Ordering::Relaxed) {
            i += 1;
            client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO nokey VALUES ({i}, 'new {i}');
                     UPDATE nokey SET b = b || '+' WHERE a = {};
                     DELETE FROM nokey WHERE a = {}; COMMIT;",
                    i * 7 % 5000,
                    (i * 13 + 1) % 5000
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        i
    });
    wait_snapshot_done(&f, 1);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let txns = rt.block_on(work).unwrap();
    assert!(
        f.log()
            .contains("copying the table in an exported snapshot"),
        "{}",
        tail(&f.log(), 20)
    );
    // The table as a multiset of rows, against the events replayed as one.
    let want = || {
        let mut v: Vec<String> = pg
            .sql("SELECT to_jsonb(t)::text FROM nokey t")
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    // The events replayed as a multiset of rows, against the table.
    let rebuilt = || {
        let mut got: Vec<String> = Vec::new();
        for e in f.events() {
            let take = |got: &mut Vec<String>, row: &Value| {
                let row_text = row.to_string();
                if let Some(p) = got.iter().position(|r| *r == row_text) {
                    got.swap_remove(p);
                } else {
                    got.push(format!("<unmatched {row}>"));
                }
            };
            match e["op"].as_str().unwrap() {
                "read" | "insert" => got.push(e["after"].to_string()),
                "update" => {
                    take(&mut got, &e["before"]);
                    got.push(e["after"].to_string());
                }
                "delete" => take(&mut got, &e["before"]),
                op => panic!("{op}"),
            }
        }
        got.sort();
        got
    };
    let n = support::progress::wait_for(
        T,
        || {
            let (got, w) = (rebuilt(), want());
            if got == w {
                Ok(w.len())
            } else {
                Err(f.events().len())
            }
        },
        || {
            let (got, w) = (rebuilt(), want());
            format!(
                "{} rows rebuilt, {} in the table; first differences: {:?}\n{}",
                got.len(),
                w.len(),
                got.iter()
                    .filter(|r| !w.contains(r))
                    .take(3)
                    .collect::<Vec<_>>(),
                tail(&f.log(), 20)
            )
        },
    );
    eprintln!("{n} rows after the copy and {txns} workload transactions");
}

/// The chunks of two workers go through a memory budget smaller than one
/// chunk, with no other traffic: the stream must never wait for memory that
/// only its own progress can free (a window waiting for its rows once held
/// the other chunks' transactions, and the snapshot stalled for good).
#[test]
fn a_snapshot_through_a_budget_smaller_than_a_chunk_finishes() {
    let pg = TestPg::start();
    pg.sql(DDL);
    fill(&pg, 1, 100_000);
    let s = Stores {
        redis: None,
        node: None,
        index: String::new(),
    };
    let f = FerryDir::new();
    write_config(
        &pg,
        &f,
        &s,
        "initial",
        "chunk_rows = 5000\nworkers = 2\n\n[pipeline]\nmemory_limit_mb = 1",
    );
    let _g = Guard(f.run());
    wait_snapshot_done(&f, 1);
    let n = wait_equal(&pg, &f, &s);
    assert_eq!(n, 100_000);
    assert_eq!(reads(&f.events()).len(), 100_000);
}

/// `pgferry backfill --list` until a line starts with `job ` and holds
/// `needle`; returns that job's id.
fn wait_listed(f: &FerryDir, needle: &str) -> u64 {
    support::progress::wait_for(
        T,
        || {
            let out = f.command(&["backfill", "--list"], &[]);
            assert!(out.status.success(), "{out:?}");
            out.stdout
                .lines()
                .find(|l| l.starts_with("job ") && l.contains(needle))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .ok_or(())
        },
        || {
            format!(
                "no job {needle:?} in backfill --list\n{}",
                tail(&f.log(), 30)
            )
        },
    )
}

/// Issue 10: a backfill requested through SQL with a bad `where` is marked
/// failed once (not retried forever), logged, counted, shown by `/readyz`
/// until cancelled, and makes `--exit-after-snapshot` end with an error. A
/// condition that only fails while rows are read fails the same way.
#[test]
fn a_backfill_that_cannot_run_fails_once_is_shown_until_cancelled() {
    let pg = TestPg::start();
    pg.sql(DDL);
    pg.sql("CREATE TABLE canary (x int); INSERT INTO canary VALUES (1)");
    fill(&pg, 1, 3_000);
    let s = Stores {
        redis: None,
        node: None,
        index: String::new(),
    };
    let f = FerryDir::new();
    write_config(&pg, &f, &s, "never", "chunk_rows = 500");
    let port = support::pg::free_port();
    let cfg = std::fs::read_to_string(f.path("pgferry.toml"))
        .unwrap()
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(f.path("pgferry.toml"), cfg).unwrap();
    let ready = |want: u16| {
        support::progress::wait_for(
            T,
            || match support::http::get(port, "/readyz") {
                Some((st, body)) if st == want => Ok(body),
                other => Err(other.map(|o| o.0)),
            },
            || tail(&f.log(), 30),
        )
    };
    let mut g = Guard(f.run());
    wait_active(&pg, &f, "pgferry");
    ready(200);
    let emit = |body: &str| {
        pg.sql(&format!(
            "SELECT pg_logical_emit_message(true, 'pgferry.backfill', '{}')",
            body.replace('\'', "''")
        ))
    };
    emit(r#"{"table":"public.items","where":"true; DROP TABLE canary; --"}"#);
    let id = wait_listed(&f, "FAILED");
    let list = f.command(&["backfill", "--list"], &[]).stdout;
    assert!(list.contains("syntax error"), "{list}");
    let body = ready(503);
    assert!(
        body.contains(&format!("snapshot job {id} of public.items failed"))
            && body.contains(&format!("--cancel {id}")),
        "{body}"
    );
    let metrics = support::http::get(port, "/metrics").unwrap().1;
    assert!(
        metrics.contains("pgferry_snapshot_failures_total 1"),
        "{metrics}"
    );
    assert_eq!(pg.sql("SELECT count(*) FROM canary").trim(), "1");
    // Not retried: one failure in the log, however long it runs.
    std::thread::sleep(Duration::from_secs(3));
    let failures = |f: &FerryDir| f.log().matches("snapshot job failed").count();
    assert_eq!(failures(&f), 1, "{}", f.log());

    // A condition that fails only while rows are read (division by zero
    // at id 2000) fails the same way, from the worker.
    emit(r#"{"table":"public.items","where":"1 / (id - 2000) IS NOT NULL"}"#);
    let id2 = wait_listed(&f, "division by zero");
    assert_ne!(id, id2);
    terminate(&mut g.0);

    // --exit-after-snapshot ends with an error naming the failed jobs.
    let out = f.command(&["run", "--exit-after-snapshot"], &[]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains(&format!("job {id} (public.items)")),
        "{out:?}"
    );

    // Cancelling acknowledges: /readyz is ready again, the list is empty.
    let mut g = Guard(f.run());
    wait_active(&pg, &f, "pgferry");
    for j in [id, id2] {
        let out = f.command(&["backfill", "--cancel", &j.to_string()], &[]);
        assert!(out.status.success(), "{out:?}");
    }
    ready(200);
    let list = f.command(&["backfill", "--list"], &[]).stdout;
    assert!(
        list.contains("no snapshot job is running or failed"),
        "{list}"
    );
    let out = f.command(&["backfill", "--cancel", "999"], &[]);
    assert!(
        !out.status.success() && out.stderr.contains("no snapshot job 999"),
        "{out:?}"
    );
    terminate(&mut g.0);
}
