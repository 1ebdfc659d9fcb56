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
