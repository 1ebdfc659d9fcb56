//! Schema changes while pgferry streams (issue 15): a real Postgres, the
//! real binary, a real Redis. Each test ends with the full comparison of
//! the sinks against `to_jsonb()` of the rows as they are then.
//!
//! pgoutput never sends DDL; it sends a new Relation message before the next
//! change of an altered table, and nothing at all for `ALTER TYPE` (see
//! proto-notes/schema-changes.md). Sinks follow rows as they change: a row
//! that did not change since a DDL keeps its old shape in Redis, so each
//! phase touches every row before it compares.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::ferry::{start_streaming, FerryDir};
use support::pg::TestPg;
use support::redis::TestRedis;
use support::workload::{self, OnError, Sessions};

const STALL: Duration = Duration::from_secs(90);

/// The JSONL events of `table` replayed into rows, by `id`.
fn jsonl_rows(f: &FerryDir, table: &str) -> BTreeMap<String, Value> {
    let events: Vec<Value> = f
        .events()
        .into_iter()
        .filter(|e| e["table"] == table)
        .collect();
    support::oracle::replay(&events)
}

/// Like [`wait_equal`] for JSONL alone, comparing only the rows whose `id`
/// `keep` selects (rows a running workload does not touch).
fn wait_equal_rows(pg: &TestPg, f: &FerryDir, table: &str, keep: impl Fn(i64) -> bool) {
    wait_shaped(pg, f, table, keep, |_, _| {})
}

/// [`wait_equal_rows`] with the Postgres rows passed through `shape` first
/// (what the row looked like when its last change was made).
fn wait_shaped(
    pg: &TestPg,
    f: &FerryDir,
    table: &str,
    keep: impl Fn(i64) -> bool,
    shape: impl Fn(i64, &mut serde_json::Map<String, Value>),
) {
    support::progress::wait_for(
        STALL,
        || {
            let mut want = support::oracle::table_rows(pg, table);
            want.retain(|k, _| keep(k.parse().unwrap()));
            for (k, v) in want.iter_mut() {
                shape(k.parse().unwrap(), v.as_object_mut().unwrap());
            }
            let mut got = jsonl_rows(f, table);
            got.retain(|k, _| keep(k.parse().unwrap()));
            let diff: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(*v))
                .take(3)
                .map(|(k, v)| format!("{k}: want {v}, got {:?}", got.get(k)))
                .collect();
            if diff.is_empty() && got.len() == want.len() {
                return Ok(());
            }
            Err(format!(
                "{} of {} rows, e.g. {diff:?}",
                got.len(),
                want.len()
            ))
        },
        || format!("--- pgferry log ---\n{}", f.log()),
    )
}

/// Redis json values of the keys `{prefix}{id}`, by `id`.
fn redis_rows(r: &TestRedis, prefix: &str) -> BTreeMap<String, Value> {
    let mut c = r.conn();
    r.keys()
        .into_iter()
        .filter_map(|k| k.strip_prefix(prefix).map(|id| (id.to_string(), k.clone())))
        .map(|(id, k)| {
            let v: String = ::redis::cmd("GET").arg(&k).query(&mut c).unwrap();
            (id, serde_json::from_str(&v).unwrap())
        })
        .collect()
}

/// Waits until the JSONL replay (configured name `table`) and, when given,
/// the Redis keys under `redis_prefix` equal `to_jsonb()` of `pg_table`.
fn wait_equal(
    pg: &TestPg,
    f: &FerryDir,
    r: Option<(&TestRedis, &str)>,
    table: &str,
    pg_table: &str,
) {
    support::progress::wait_for(
        STALL,
        || {
            let want = support::oracle::table_rows(pg, pg_table);
            let got = jsonl_rows(f, table);
            if got != want {
                return Err(format!("jsonl {table}: {got:?}\nwant {want:?}"));
            }
            if let Some((r, prefix)) = r {
                let got = redis_rows(r, prefix);
                if got != want {
                    return Err(format!("redis {prefix}: {got:?}\nwant {want:?}"));
                }
            }
            Ok(())
        },
        || format!("--- pgferry log ---\n{}", f.log()),
    )
}

fn redis_tables(url: &str, tables: &[&str]) -> String {
    let mut s = format!("\n[[sink]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"{url}\"\n");
    for t in tables {
        s += &format!("[sink.tables.\"public.{t}\"]\nkey = \"{t}:{{id}}\"\nmode = \"json\"\n");
    }
    s
}

/// A background workload on `w` (inserts, updates, deletes) that runs
/// through every DDL of a test.
fn background(
    pg: &TestPg,
    rt: &tokio::runtime::Runtime,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u32>> {
    workload::spawn(
        pg,
        rt,
        stop,
        Sessions {
            count: 2,
            seed: 15,
            pause: Duration::from_millis(10),
            on_error: OnError::Rollback,
        },
        |s| {
            move |rng: &mut support::rng::XorShift, n: u32| {
                let id = (s * 1_000_000 + n) as i64;
                let old = (s * 1_000_000 + rng.below(n + 1)) as i64;
                vec![format!(
                    "BEGIN; INSERT INTO w VALUES ({id}, 'w{id}');
                     UPDATE w SET v = v || '+' WHERE id = {old};
                     DELETE FROM w WHERE id = {};
                     COMMIT",
                    old / 2
                )]
            }
        },
    )
}

/// The three silent failures of issue 15: a renamed table, a table dropped
/// and created again, a table added to the publication that is not in
/// `source.tables`, and a composite type altered while streaming.
#[test]
fn renames_recreated_tables_foreign_tables_and_altered_types_reach_the_sinks_right() {
    let pg = TestPg::start();
    let r = TestRedis::new();
    pg.sql(
        "CREATE TABLE s1 (id int PRIMARY KEY, a2 int);
         CREATE TABLE d1 (id int PRIMARY KEY, v text);
         CREATE TABLE d2 (id int PRIMARY KEY, v text);
         CREATE TYPE pair AS (a int, b text);
         CREATE TABLE tc (id int PRIMARY KEY, c pair);
         CREATE TABLE extra (id int PRIMARY KEY, v text);
         CREATE TABLE w (id bigint PRIMARY KEY, v text);
         INSERT INTO s1 SELECT i, i * 10 FROM generate_series(1, 5) i;
         INSERT INTO d1 SELECT i, 'old ' || i FROM generate_series(1, 5) i;
         INSERT INTO d2 SELECT i, 'old ' || i FROM generate_series(1, 5) i;",
    );
    let f = FerryDir::new();
    f.write_config(
        &pg.url(),
        &[
            "public.s1",
            "public.d1",
            "public.d2",
            "public.tc",
            "public.w",
        ],
        "snapshot = \"initial\"",
        &redis_tables(&r.url(), &["s1", "d1", "d2", "tc", "w"]),
    );
    let _g = start_streaming(&pg, &f);
    let rt = workload::runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = background(&pg, &rt, &stop);
    pg.sql("INSERT INTO tc VALUES (1, ROW(1, 'x'))");
    wait_equal(&pg, &f, Some((&r, "s1:")), "s1", "s1");
    wait_equal(&pg, &f, Some((&r, "tc:")), "tc", "tc");

    // A table the publication gains but pgferry was not asked for.
    pg.sql("ALTER PUBLICATION pgferry ADD TABLE extra");
    pg.sql("INSERT INTO extra VALUES (1, 'not configured')");

    // RENAME TABLE: the sinks follow the table under its configured name.
    pg.sql("ALTER TABLE s1 RENAME TO s1_renamed");
    pg.sql("UPDATE s1_renamed SET a2 = a2 + 1 WHERE id = 2");
    pg.sql("INSERT INTO s1_renamed (id, a2) VALUES (6, 60)");

    // DROP + CREATE under the same name: the old rows are gone. The new
    // table is not in the publication: pgferry adds it back by itself (d1),
    // or an operator does (d2, as with a FOR ALL TABLES publication).
    pg.sql("DROP TABLE d1; CREATE TABLE d1 (id int PRIMARY KEY, v text, n int)");
    pg.sql("INSERT INTO d1 VALUES (3, 'new 3', 3), (10, 'new 10', 10)");
    pg.sql(
        "DROP TABLE d2; CREATE TABLE d2 (id int PRIMARY KEY, v text, n int);
         ALTER PUBLICATION pgferry ADD TABLE d2",
    );
    pg.sql("INSERT INTO d2 VALUES (3, 'new 3', 3), (10, 'new 10', 10)");

    // ALTER TYPE ADD ATTRIBUTE: pgoutput sends nothing for it.
    pg.sql("ALTER TYPE pair ADD ATTRIBUTE z int");
    pg.sql("INSERT INTO tc VALUES (2, ROW(2, 'y', 9))");
    wait_equal(&pg, &f, Some((&r, "s1:")), "s1", "s1_renamed");
    wait_equal(&pg, &f, Some((&r, "d1:")), "d1", "d1");
    wait_equal(&pg, &f, Some((&r, "d2:")), "d2", "d2");
    pg.sql("UPDATE d1 SET n = n + 1 WHERE id = 10; INSERT INTO d1 VALUES (11, 'after', 0)");
    pg.sql("UPDATE tc SET id = id");
    wait_equal(&pg, &f, Some((&r, "tc:")), "tc", "tc");

    // RENAME ATTRIBUTE shows nowhere in the stream: pgferry reloads the
    // composite types it uses while the stream is caught up, and says so.
    let noticed = || f.log().matches("a composite type changed").count();
    let before = noticed();
    pg.sql("ALTER TYPE pair RENAME ATTRIBUTE b TO renamed");
    support::progress::wait_for(
        STALL,
        || {
            if noticed() > before {
                Ok(())
            } else {
                Err(f.events().len())
            }
        },
        || format!("the rename was never noticed:\n{}", f.log()),
    );
    pg.sql("INSERT INTO tc VALUES (3, ROW(3, 'q', 1)); UPDATE tc SET id = id WHERE id < 3");
    wait_equal(&pg, &f, Some((&r, "tc:")), "tc", "tc");

    let txns = workload::stop(&rt, &stop, workers);
    assert!(txns > 10, "the workload ran only {txns} transactions");
    wait_equal(&pg, &f, Some((&r, "w:")), "w", "w");
    wait_equal(&pg, &f, Some((&r, "s1:")), "s1", "s1_renamed");
    wait_equal(&pg, &f, Some((&r, "d1:")), "d1", "d1");
    wait_equal(&pg, &f, Some((&r, "d2:")), "d2", "d2");

    let events = f.events();
    let leaked: Vec<&Value> = events.iter().filter(|e| e["table"] == "extra").collect();
    assert!(
        leaked.is_empty(),
        "an unconfigured table reached the sink: {leaked:?}"
    );
    assert!(
        events.iter().all(|e| e["table"] != "s1_renamed"),
        "events of the renamed table keep the configured name"
    );
    assert!(
        r.keys().iter().all(|k| !k.starts_with("extra")),
        "an unconfigured table reached Redis"
    );
    let log = f.log();
    assert!(log.contains("has another name in the stream"), "{log}");
    assert!(
        log.contains("replaced by another table of the same name"),
        "{log}"
    );
    assert!(log.contains("added it back"), "{log}");
}

/// Each kind of ALTER TABLE, mid-stream under a concurrent workload, and
/// one inside a streamed (protocol 2) transaction that pgferry spills: after
/// each, every row touched since equals `to_jsonb()` of the row as it is.
#[test]
fn each_alter_table_kind_mid_stream_including_one_in_a_spilled_streamed_transaction() {
    let pg = TestPg::start();
    pg.sql(
        "CREATE TABLE k (id int PRIMARY KEY, a int, tx text, n numeric(6,2));
         INSERT INTO k SELECT i, i, 'text ' || i, i / 7.0 FROM generate_series(1, 50) i;",
    );
    let f = FerryDir::new();
    f.write_config(
        &pg.url(),
        &["public.k"],
        "snapshot = \"initial\"",
        "\n[pipeline]\nmemory_limit_mb = 1\n",
    );
    let _g = start_streaming(&pg, &f);
    let rt = workload::runtime();
    let stop = Arc::new(AtomicBool::new(false));
    // Statements that hold whatever the columns become: they name `id` only.
    let workers = workload::spawn(
        &pg,
        &rt,
        &stop,
        Sessions {
            count: 2,
            seed: 51,
            pause: Duration::from_millis(50),
            on_error: OnError::Rollback,
        },
        |s| {
            move |rng: &mut support::rng::XorShift, n: u32| {
                // At most 100 live rows per session: a ring of ids.
                let base = 1_000_000 * (s as i64 + 1);
                let id = base + (n % 100) as i64;
                let other = base + rng.below(100) as i64;
                vec![format!(
                    "BEGIN; DELETE FROM k WHERE id = {id}; INSERT INTO k (id) VALUES ({id});
                     UPDATE k SET id = id WHERE id = {other};
                     COMMIT"
                )]
            }
        },
    );
    // The workload's rows (ids from 1 000 000 on) change all the time: each
    // phase compares the others, and everything once the workload stopped.
    let quiet = |id: i64| !(1_000_000..10_000_000).contains(&id);
    wait_equal_rows(&pg, &f, "k", quiet);
    for ddl in [
        "ALTER TABLE k ADD COLUMN c1 int",
        "ALTER TABLE k ADD COLUMN c2 text DEFAULT 'dflt'",
        // A volatile default rewrites the table.
        "ALTER TABLE k ADD COLUMN c3 float8 DEFAULT random()",
        "ALTER TABLE k DROP COLUMN c1",
        "ALTER TABLE k RENAME COLUMN tx TO t2",
        "ALTER TABLE k ALTER COLUMN a TYPE bigint",
        "ALTER TABLE k ALTER COLUMN t2 TYPE int USING length(t2)",
        "ALTER TABLE k ALTER COLUMN n TYPE numeric(10,4)",
    ] {
        pg.sql(ddl);
        // Rows change as the sinks see them: every row once after the DDL.
        pg.sql("UPDATE k SET id = id");
        wait_equal_rows(&pg, &f, "k", quiet);
    }
    // A DDL inside a transaction too large for logical_decoding_work_mem
    // (streamed) and for pipeline.memory_limit_mb (spilled).
    pg.sql(
        "BEGIN;
         INSERT INTO k (id, a, t2) SELECT 10000000 + i, i, i FROM generate_series(1, 8000) i;
         ALTER TABLE k ADD COLUMN c4 int DEFAULT 7;
         UPDATE k SET c4 = id % 5 WHERE id > 10000000 AND id % 3 = 0;
         ALTER TABLE k RENAME COLUMN c2 TO c2r;
         INSERT INTO k (id, c2r) SELECT 20000000 + i, 'late' FROM generate_series(1, 2000) i;
         COMMIT",
    );
    // Each change of that transaction has the columns of its place in it:
    // the first inserts have no c4 and c2 under its old name, the updates
    // (after ADD COLUMN, before the RENAME) have c4 and c2, the last
    // inserts have c4 and c2r.
    wait_shaped(
        &pg,
        &f,
        "k",
        |id| id >= 10_000_000,
        |id, row| {
            if id < 20_000_000 {
                let c2 = row.remove("c2r").unwrap();
                row.insert("c2".into(), c2);
                if id % 3 != 0 {
                    row.remove("c4");
                }
            }
        },
    );
    pg.sql("UPDATE k SET id = id");
    let txns = workload::stop(&rt, &stop, workers);
    assert!(txns > 10, "the workload ran only {txns} transactions");
    wait_equal(&pg, &f, None, "k", "k");
    let streamed: i64 = pg
        .sql("SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = 'pgferry'")
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(streamed > 0, "the large transaction was not streamed");
    assert!(
        f.log().contains("transaction spilled to disk"),
        "the large transaction was not spilled:\n{}",
        f.log()
    );
}

/// The versions of `table` as its schema events announce them: checks that
/// every change event is preceded by a schema event of its table with its
/// `schema_version`, that a non-null `previous_version` is the version of
/// the table's change before it, and that the same columns always have the
/// same version (and other columns another one). Returns the versions in
/// order of first appearance with their columns as `name type` strings.
fn check_schema_events(all: &[Value], table: &str) -> Vec<(String, Vec<String>)> {
    let mut current: Option<String> = None;
    let mut last_change: Option<String> = None;
    let mut versions: Vec<(String, Vec<String>)> = Vec::new();
    for (i, e) in all.iter().enumerate().filter(|(_, e)| e["table"] == table) {
        let v = e["schema_version"].as_str().map(str::to_string);
        assert!(
            v.as_ref().is_some_and(|v| v.len() == 16),
            "line {i} has no schema_version: {e}"
        );
        match e["op"].as_str() {
            Some("schema") => {
                let prev = &e["previous_version"];
                assert!(
                    prev.is_null() || prev.as_str() == last_change.as_deref(),
                    "line {i}: previous_version {prev} but the change before it had {last_change:?}"
                );
                let cols: Vec<String> = e["columns"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| {
                        format!(
                            "{} {}",
                            c["name"].as_str().unwrap(),
                            c["type"].as_str().unwrap()
                        )
                    })
                    .collect();
                let v = v.unwrap();
                match versions.iter().find(|(known, _)| *known == v) {
                    Some((_, known_cols)) => assert_eq!(
                        known_cols, &cols,
                        "line {i}: version {v} with other columns"
                    ),
                    None => {
                        assert!(
                            versions.iter().all(|(_, c)| *c != cols),
                            "line {i}: columns {cols:?} got a second version {v}"
                        );
                        versions.push((v.clone(), cols));
                    }
                }
                current = Some(v);
            }
            Some("truncate") => {}
            _ => {
                assert_eq!(
                    v, current,
                    "line {i}: a change without a schema event of its version before it: {e}"
                );
                last_change = v;
            }
        }
    }
    versions
}

/// kill -9 between a DDL and the first change after it, right after that
/// first change, and at a random moment after a DDL made under the load,
/// with a workload on the same table; restarted each time. The JSONL
/// changes equal the server's own decoding (test_decoding) change by change
/// and, replayed, `to_jsonb()` of the rows; every schema version is
/// announced before its first change; a restart with the same columns
/// gives the same version.
#[test]
fn kill_9_around_ddl_loses_nothing_and_announces_every_schema_version() {
    use std::sync::atomic::Ordering;
    let pg = TestPg::start();
    pg.sql("CREATE TABLE v (id int PRIMARY KEY, a int)");
    support::oracle::create(&pg);
    let f = FerryDir::new();
    f.write_config(&pg.url(), &["public.v"], "", "");
    let mut ferry = start_streaming(&pg, &f);
    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let rt = workload::runtime();
    let workers = {
        let paused = paused.clone();
        workload::spawn(
            &pg,
            &rt,
            &stop,
            Sessions {
                count: 2,
                seed: 0x5151,
                pause: Duration::from_millis(5),
                on_error: OnError::Panic,
            },
            move |w| {
                let paused = paused.clone();
                let mut next = (w as i64 + 1) * 1_000_000;
                move |rng, _| {
                    if paused.load(Ordering::SeqCst) {
                        return vec![];
                    }
                    next += 1;
                    let old = next - 1 - rng.below(50) as i64;
                    vec![format!(
                        "BEGIN; INSERT INTO v(id, a) VALUES ({next}, 0); \
                         UPDATE v SET a = a + 1 WHERE id = {old}; COMMIT;"
                    )]
                }
            },
        )
    };
    let restart = |ferry: &mut support::ferry::Guard| {
        support::ferry::kill9(&mut ferry.0);
        *ferry = support::ferry::Guard(f.run());
    };
    // Progress: the JSONL file grows.
    let let_it_run = |more: usize| {
        let n = f.events().len();
        f.wait_events(n + more, STALL);
    };
    let_it_run(50);
    // A restart with no DDL: the table is announced again with the same version.
    restart(&mut ferry);
    let_it_run(50);
    let ddls = [
        "ALTER TABLE v ADD COLUMN c1 int",
        "ALTER TABLE v ADD COLUMN c2 text DEFAULT 'x'",
        "ALTER TABLE v ALTER COLUMN c1 TYPE bigint",
        "ALTER TABLE v DROP COLUMN c2",
        "ALTER TABLE v RENAME COLUMN c1 TO c1r",
        "ALTER TABLE v ALTER COLUMN a TYPE numeric(10,2)",
    ];
    for (i, ddl) in ddls.iter().enumerate() {
        match i % 3 {
            0 => {
                // Between the DDL and the first change after it: the
                // workload is paused, pgferry has streamed past the DDL.
                paused.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
                pg.sql(ddl);
                let at = pg.sql("SELECT pg_current_wal_lsn()").trim().to_string();
                support::progress::wait_for(
                    STALL,
                    || {
                        let q = format!(
                            "SELECT confirmed_flush_lsn >= '{at}' FROM pg_replication_slots WHERE slot_name = 'pgferry'"
                        );
                        if pg.sql(&q).trim() == "t" {
                            Ok(())
                        } else {
                            Err(())
                        }
                    },
                    || f.log(),
                );
                restart(&mut ferry);
                paused.store(false, Ordering::SeqCst);
            }
            1 => {
                // Right after the first change after the DDL.
                paused.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
                pg.sql(ddl);
                pg.sql("UPDATE v SET a = a + 1 WHERE id = 1000001");
                restart(&mut ferry);
                paused.store(false, Ordering::SeqCst);
            }
            _ => {
                // A DDL under the load, killed at a moment after it.
                pg.sql(ddl);
                std::thread::sleep(Duration::from_millis(100 + 150 * i as u64));
                restart(&mut ferry);
            }
        }
        let_it_run(50);
    }
    let txns = workload::stop(&rt, &stop, workers);
    assert!(txns > 200, "the workload ran only {txns} transactions");
    // Every row in its latest shape, then a marker.
    pg.sql("UPDATE v SET a = a + 1");
    pg.sql("INSERT INTO v(id, a) VALUES (-1, 0)");
    let expected = support::oracle::read(&pg, "v");
    support::progress::wait_for(
        STALL,
        || match support::oracle::jsonl(&f, "v").len() {
            n if n >= expected.len() => Ok(()),
            n => Err(n),
        },
        || f.log(),
    );
    support::ferry::terminate(&mut ferry.0);
    // Nothing lost, nothing duplicated, in order.
    let got = support::oracle::jsonl(&f, "v");
    assert_eq!(got.len(), expected.len(), "same number of changes");
    if let Some(i) = got.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "first difference at change {i}: pgferry {:?} vs oracle {:?}",
            got[i], expected[i]
        );
    }
    assert_eq!(
        jsonl_rows(&f, "v"),
        support::oracle::table_rows(&pg, "public.v")
    );
    // One version per column set, each announced before its first change.
    let all = f.all_events();
    let versions = check_schema_events(&all, "v");
    let cols: Vec<&Vec<String>> = versions.iter().map(|(_, c)| c).collect();
    assert_eq!(versions.len(), ddls.len() + 1, "{cols:#?}");
    assert_eq!(versions[0].1, ["id integer", "a integer"], "{cols:#?}");
    assert_eq!(
        versions.last().unwrap().1,
        ["id integer", "a numeric(10,2)", "c1r bigint"],
        "{cols:#?}"
    );
    // Each start announced the table again (8 starts), and the version of
    // the columns before the first restart came back unchanged after it.
    // Without the DDL trigger (sql/capture_ddl.sql) there are no ddl events.
    assert!(all.iter().all(|e| e["op"] != "ddl"));
    let schema_lines = all.iter().filter(|e| e["op"] == "schema").count();
    assert!(schema_lines >= 8, "{schema_lines} schema events");
    let first: Vec<&Value> = all.iter().filter(|e| e["op"] == "schema").take(2).collect();
    assert_eq!(
        first[0]["schema_version"], first[1]["schema_version"],
        "{first:?}"
    );
}

/// With `sql/capture_ddl.sql` installed, each DDL on a configured table is
/// an `op:"ddl"` event at its place among the changes of its transaction,
/// also when no row changes after it; DDL on other tables gives none; a
/// kill -9 and restart neither loses nor repeats one.
#[test]
fn captured_ddl_is_an_event_at_its_place_in_the_transaction() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE t (id int PRIMARY KEY, a int); CREATE TABLE other (id int PRIMARY KEY)");
    let trigger =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/capture_ddl.sql"))
            .unwrap();
    pg.sql(&trigger);
    let f = FerryDir::new();
    f.write_config(&pg.url(), &["public.t"], "", "");
    let mut ferry = start_streaming(&pg, &f);
    pg.sql(
        "BEGIN; INSERT INTO t VALUES (1, 1); ALTER TABLE t ADD COLUMN c int; \
         INSERT INTO t VALUES (2, 2, 2); COMMIT;",
    );
    pg.sql("ALTER TABLE other ADD COLUMN z int");
    // No row of t changes after this one: only the ddl event tells.
    pg.sql("ALTER TABLE t ADD COLUMN d int");
    let ddls = |all: &[Value]| {
        all.iter()
            .filter(|e| e["op"] == "ddl")
            .cloned()
            .collect::<Vec<_>>()
    };
    support::progress::wait_for(
        STALL,
        || match ddls(&f.all_events()).len() {
            2 => Ok(()),
            n => Err(n),
        },
        || f.log(),
    );
    support::ferry::kill9(&mut ferry.0);
    ferry = support::ferry::Guard(f.run());
    pg.sql("INSERT INTO t VALUES (3, 3, 3, 3)");
    // Every row in its latest shape for the final comparison.
    pg.sql("UPDATE t SET a = a");
    f.wait_events(6, STALL);
    support::ferry::terminate(&mut ferry.0);
    let all = f.all_events();
    let ops: Vec<String> = all
        .iter()
        .map(|e| format!("{} {}", e["op"].as_str().unwrap(), e["key"]["id"]))
        .collect();
    // The first transaction: insert 1, the ALTER, (the new schema), insert 2.
    let first: Vec<&str> = ops.iter().take(5).map(String::as_str).collect();
    assert_eq!(
        first,
        [
            "schema null",
            "insert 1",
            "ddl null",
            "schema null",
            "insert 2"
        ],
        "{all:#?}"
    );
    let d = ddls(&all);
    assert_eq!(d.len(), 2, "{all:#?}");
    assert_eq!(d[0]["tag"], "ALTER TABLE");
    assert_eq!(d[0]["tables"], serde_json::json!(["public.t"]));
    assert!(
        d[0]["statement"].as_str().unwrap().contains("ADD COLUMN c"),
        "{}",
        d[0]
    );
    assert_eq!(d[0]["commit_lsn"], all[1]["commit_lsn"]);
    assert!(
        d[1]["statement"].as_str().unwrap().contains("ADD COLUMN d"),
        "{}",
        d[1]
    );
    // The ddl event's position lies between the changes around it (a
    // logical message's LSN is the end of its record: the next change's
    // start at most).
    let lsn = |v: &Value| {
        let (hi, lo) = v.as_str().unwrap().split_once('/').unwrap();
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    };
    assert!(lsn(&all[1]["lsn"]) < lsn(&d[0]["lsn"]) && lsn(&d[0]["lsn"]) <= lsn(&all[4]["lsn"]));
    assert_eq!(
        jsonl_rows(&f, "t"),
        support::oracle::table_rows(&pg, "public.t")
    );
}
