//! The Iceberg sink against real files and real readers: a concurrent
//! workload on a table of every type family (with TOAST) and a table with key
//! changes, an ADD COLUMN and a truncate, while pgferry is killed with -9 five
//! times. The tables are then read by pyiceberg (through the sqlite catalog)
//! and by DuckDB over the data files, and compared with the JSONL sink of
//! the same run (change counts per op) and with `to_jsonb()` of every row
//! (the "current state" query documented in docs/iceberg-sink.md).
//!
//! Built only with `--features iceberg` (see Cargo.toml).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::ferry::{kill9, terminate, FerryDir, Guard};
use support::pg::TestPg;

const MARKER: i64 = 2_000_000_000;
const META: &str = "_op, _lsn, _commit_lsn, _commit_time, _xid, _unchanged";

/// The transactions of one workload session: sessions 0 and 1 write
/// `typed`, session 2 writes `ledger` (with key changes).
fn session(w: u32) -> impl FnMut(&mut support::rng::XorShift, u32) -> Vec<String> + Send {
    let mut next = i64::from(w) * 1_000_000;
    move |rng, _| {
        let first = next + 1;
        let mut sql = String::from("BEGIN;");
        let n = 1 + i64::from(rng.below(3));
        next += n;
        let pick = |rng: &mut support::rng::XorShift| first - i64::from(rng.below(40));
        if w < 2 {
            if rng.below(8) == 0 {
                sql += &format!("INSERT INTO typed (id) VALUES ({first});");
            } else {
                sql += &format!(
                    "INSERT INTO typed SELECT {TYPED_ROW} FROM generate_series({first}, {}) i;",
                    next
                );
            }
            // Leaves `doc` (TOASTed) unchanged.
            sql += &format!(
                "UPDATE typed SET i8 = i8 + 1, f8 = f8 * 2, amount = amount + 0.0001, t = t || '!', tags = tags || 'u'::text WHERE id = {};",
                pick(rng)
            );
            if rng.below(4) == 0 {
                sql += &format!(
                    "UPDATE typed SET doc = md5(random()::text) WHERE id = {};",
                    pick(rng)
                );
            }
            if rng.below(5) == 0 {
                sql += &format!("DELETE FROM typed WHERE id = {};", pick(rng));
            }
        } else {
            sql += &format!(
                "INSERT INTO ledger (id, v, n) SELECT i, md5(i::text), 0 FROM generate_series({first}, {next}) i;"
            );
            sql += &format!("UPDATE ledger SET n = n + 1 WHERE id = {};", pick(rng));
            if rng.below(4) == 0 {
                sql += &format!(
                    "UPDATE ledger SET id = -id WHERE id = {} AND id > 0;",
                    pick(rng)
                );
            }
            if rng.below(5) == 0 {
                sql += &format!("DELETE FROM ledger WHERE id = {};", pick(rng));
            }
        }
        sql += "COMMIT;";
        vec![sql]
    }
}

/// A row of `typed` for `i`: every type family, and a 3200-byte `doc`
/// stored out of line.
const TYPED_ROW: &str = "i, (i % 30000)::smallint, i::bigint * 1000003, ((i % 1000) / 7.0)::real, i / 3.0::float8, \
    round((i * 1.2345)::numeric, 4), i::numeric * 1000000000000000000000000000000 + 0.000001, \
    'row ' || i || E' \\u00e9 \"q\"', i % 2 = 0, date '2000-01-01' + (i % 10000)::int, \
    time '00:00:00' + (i % 86400) * interval '1 second' + interval '0.25 s', \
    timestamp '2020-01-01' + i * interval '1.000001 s', timestamptz '2020-01-01 00:00:00+02' + i * interval '1 minute', \
    md5(i::text)::uuid, decode(md5(i::text), 'hex'), jsonb_build_object('i', i, 'a', jsonb_build_array(1, 'x', null)), \
    ARRAY['a' || i, NULL, 'b'], ARRAY[i, -i]::int[], ('10.0.' || (i % 256) || '.1')::inet, \
    (SELECT string_agg(md5(i::text || g), '') FROM generate_series(1, 100) g)";

fn setup(pg: &TestPg) {
    pg.sql("ALTER DATABASE postgres SET timezone TO 'UTC'");
    pg.sql(
        "CREATE TABLE typed (id int PRIMARY KEY, i2 smallint, i8 bigint, f4 real, f8 double precision, \
         amount numeric(20,4), big numeric, t text, b boolean, d date, tm time, ts timestamp, tstz timestamptz, \
         u uuid, raw bytea, j jsonb, tags text[], nums int[], addr inet, doc text)",
    );
    pg.sql("ALTER TABLE typed ALTER COLUMN doc SET STORAGE EXTERNAL");
    pg.sql("CREATE TABLE ledger (id int PRIMARY KEY, v text, n int)");
}

/// Reads `pgferry.public_<table>` with pyiceberg and runs `sql` in DuckDB.
fn read(f: &FerryDir, table: &str, sql: &str) -> Value {
    support::iceberg::read_table(
        &f.path("lake/catalog.db"),
        "pgferry",
        &format!("pgferry.public_{table}"),
        sql,
    )
}

/// Counts per op from the JSONL file, with each key change as a delete
/// and an insert (how the change log writes it).
fn jsonl_counts(events: &[Value], table: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for e in events.iter().filter(|e| e["table"] == table) {
        let op = e["op"].as_str().unwrap();
        let moved = op == "update" && !e["before"].is_null() && e["before"]["id"] != e["key"]["id"];
        if moved {
            *out.entry("delete".to_string()).or_insert(0) += 1;
            *out.entry("insert".to_string()).or_insert(0) += 1;
        } else {
            *out.entry(op.to_string()).or_insert(0) += 1;
        }
    }
    out
}

/// The documented current-state query (docs/iceberg-sink.md) for `t`,
/// with `doc` (TOASTed) taken from the latest row that sent it.
fn current_state_sql(toast: bool) -> String {
    let live = "live AS (SELECT * FROM t WHERE _lsn > coalesce((SELECT max(_lsn) FROM t WHERE _op = 'truncate'), 0)), \
                latest AS (SELECT * FROM live QUALIFY row_number() OVER (PARTITION BY id ORDER BY _lsn DESC) = 1)";
    if toast {
        format!(
            "WITH {live}, sent AS (SELECT id, doc FROM live WHERE _op <> 'delete' \
               AND (_unchanged IS NULL OR NOT list_contains(_unchanged, 'doc')) \
               QUALIFY row_number() OVER (PARTITION BY id ORDER BY _lsn DESC) = 1) \
             SELECT latest.* EXCLUDE (doc, tstz, {META}), sent.doc, latest.tstz AT TIME ZONE 'UTC' AS tstz \
             FROM latest LEFT JOIN sent USING (id) WHERE latest._op <> 'delete'"
        )
    } else {
        format!("WITH {live} SELECT * EXCLUDE ({META}) FROM latest WHERE _op <> 'delete'")
    }
}

/// A decimal's digits without trailing fraction zeros (`12.3400` → `12.34`).
fn decimal(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A time or timestamp without trailing fraction zeros and without a UTC offset.
fn clock(v: &Value) -> String {
    let s = v.as_str().unwrap().trim_end_matches("+00:00").to_string();
    match s.split_once('.') {
        Some((a, b)) => {
            let b = b.trim_end_matches('0');
            if b.is_empty() {
                a.to_string()
            } else {
                format!("{a}.{b}")
            }
        }
        None => s,
    }
}

/// Whether the lake's value `got` is `to_jsonb()`'s `want` for `col`.
fn same(col: &str, want: &Value, got: &Value) -> bool {
    if want.is_null() || got.is_null() {
        return want.is_null() && got.is_null();
    }
    let f = |v: &Value| -> f64 { v.to_string().trim_matches('"').parse().unwrap() };
    match col {
        "f4" => (f(want) as f32) == (f(got) as f32),
        "f8" => f(want) == f(got),
        "amount" | "big" => decimal(want) == decimal(got),
        "tm" | "ts" | "tstz" => clock(want) == clock(got),
        "u" => want.as_str().unwrap().replace('-', "") == got.as_str().unwrap(),
        "raw" => want.as_str().unwrap().trim_start_matches("\\x") == got.as_str().unwrap(),
        "j" => {
            serde_json::from_str::<Value>(got.as_str().unwrap())
                .ok()
                .as_ref()
                == Some(want)
        }
        // Numbers compare by their digits (serde_json's arbitrary_precision).
        _ => want == got,
    }
}

/// The current state read from the lake equals `to_jsonb()` of every row.
fn assert_current_state(pg: &TestPg, f: &FerryDir, table: &str, toast: bool) {
    // `r`, not `t`: `typed` has a column named `t`.
    let expected: BTreeMap<String, Value> = pg
        .sql(&format!("SELECT to_jsonb(r) FROM {table} r"))
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].to_string(), v)
        })
        .collect();
    let lake = read(f, table, &current_state_sql(toast));
    let rows = lake["sql"].as_array().unwrap();
    let got: BTreeMap<String, &Value> = rows.iter().map(|r| (r["id"].to_string(), r)).collect();
    assert_eq!(got.len(), rows.len(), "{table}: one current row per key");
    let missing: Vec<&String> = expected
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(20)
        .collect();
    let extra: Vec<&String> = got
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .take(20)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{table}: keys missing from the lake {missing:?}, keys only in the lake {extra:?}"
    );
    for (id, want) in &expected {
        let got = got[id];
        for (col, w) in want.as_object().unwrap() {
            let g = &got[col.as_str()];
            assert!(
                same(col, w, g),
                "{table} id {id} column {col}: to_jsonb {w} vs lake {g}"
            );
        }
    }
    assert!(expected.len() > 10, "{table}: only {} rows", expected.len());
}

/// The table's snapshots all carry a position, and positions increase
/// strictly along the parent chain; returns the snapshot count.
fn assert_positions(table: &str, lake: &Value) -> usize {
    let snaps = lake["snapshots"].as_array().unwrap();
    let by_id: BTreeMap<i64, &Value> = snaps
        .iter()
        .map(|s| (s["id"].as_i64().unwrap(), s))
        .collect();
    let pos = |s: &Value| -> (u64, u64) {
        let p = s["summary"]["pgferry.position"]
            .as_str()
            .unwrap_or_else(|| panic!("{table}: snapshot without pgferry.position: {s}"));
        let (lsn, i) = p.rsplit_once(':').unwrap();
        let (hi, lo) = lsn.split_once('/').unwrap();
        let lsn = u64::from_str_radix(hi, 16).unwrap() << 32 | u64::from_str_radix(lo, 16).unwrap();
        (lsn, i.parse().unwrap())
    };
    let mut at = lake["current"]["id"].as_i64();
    let mut chain = 0;
    let mut later: Option<(u64, u64)> = None;
    while let Some(id) = at {
        let s = by_id[&id];
        let p = pos(s);
        if let Some(l) = later {
            assert!(
                p < l,
                "{table}: position {p:?} of snapshot {id} is not below its child's {l:?}"
            );
        }
        later = Some(p);
        chain += 1;
        at = s["parent"].as_i64();
    }
    assert_eq!(
        chain,
        snaps.len(),
        "{table}: every snapshot is on the current chain"
    );
    assert_eq!(lake["current"]["summary"]["pgferry.position"], {
        let s = by_id[&lake["current"]["id"].as_i64().unwrap()];
        s["summary"]["pgferry.position"].clone()
    });
    chain
}

fn ice_sink(f: &FerryDir) -> String {
    format!(
        "\n[[sink]]\nname = \"lake\"\ntype = \"iceberg\"\nwarehouse = \"{}\"\n\
         catalog = {{ type = \"sql\", uri = \"sqlite://{}\" }}\ncommit_interval_secs = 1\ncommit_max_rows = 300\n",
        f.path("lake").display(),
        f.path("lake/catalog.db").display()
    )
}

/// Waits until the lake holds the marker row of `table`.
fn wait_marker(f: &FerryDir, table: &str) {
    let sql = format!("SELECT count(*) AS n FROM t WHERE id = {MARKER}");
    support::progress::wait_for(
        Duration::from_secs(180),
        || {
            if !Path::new(&f.path("lake/catalog.db")).exists() {
                return Err(-1);
            }
            let out = std::process::Command::new(support::iceberg::python())
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/iceberg/read_table.py"))
                .arg(f.path("lake/catalog.db"))
                .args(["pgferry", &format!("pgferry.public_{table}"), "--sql", &sql])
                .output()
                .unwrap();
            if !out.status.success() {
                return Err(-2);
            }
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            match v["sql"][0]["n"].as_i64() {
                Some(1) => Ok(()),
                _ => Err(v["snapshots"].as_array().map_or(0, |s| s.len() as i64)),
            }
        },
        || f.log(),
    );
}

#[test]
fn kill_9_during_a_typed_workload_leaves_an_exact_change_log() {
    let pg = TestPg::start();
    setup(&pg);
    let f = FerryDir::new();
    f.write_config(
        &pg.url(),
        &["public.typed", "public.ledger"],
        "",
        &ice_sink(&f),
    );
    let mut ferry = support::ferry::start_streaming(&pg, &f);

    let stop = Arc::new(AtomicBool::new(false));
    let rt = support::workload::runtime();
    let workers = support::workload::spawn(
        &pg,
        &rt,
        &stop,
        support::workload::Sessions {
            count: 3,
            seed: 0x01CE_BE12,
            pause: Duration::from_millis(10),
            on_error: support::workload::OnError::Panic,
        },
        session,
    );

    let mut seed = 0x5EED_u64;
    for round in 0..5 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait = 500 + (seed >> 33) % 2500;
        std::thread::sleep(Duration::from_millis(wait));
        match round {
            // ADD COLUMN mid-stream, then values in it.
            1 => {
                pg.sql("ALTER TABLE ledger ADD COLUMN note text");
                pg.sql("UPDATE ledger SET note = 'noted ' || id WHERE id % 3 = 0");
            }
            3 => {
                pg.sql("TRUNCATE ledger");
            }
            _ => {}
        }
        kill9(&mut ferry.0);
        eprintln!("round {round}: killed after {wait} ms");
        ferry = Guard(f.run());
    }
    std::thread::sleep(Duration::from_millis(1500));
    let txns = support::workload::stop(&rt, &stop, workers);
    assert!(txns > 100, "the workload ran only {txns} transactions");
    pg.sql(&format!(
        "INSERT INTO ledger (id, v, n) VALUES ({MARKER}, 'marker', 0)"
    ));
    pg.sql(&format!(
        "INSERT INTO typed (id, t) VALUES ({MARKER}, 'marker')"
    ));
    wait_marker(&f, "ledger");
    wait_marker(&f, "typed");
    assert!(terminate(&mut ferry.0).success(), "{}", f.log());
    let events = f.events();

    for (table, toast) in [("typed", true), ("ledger", false)] {
        let lake = read(
            &f,
            table,
            "SELECT _op, count(*) AS n, count(DISTINCT (_lsn, id)) AS distinct_pairs FROM t GROUP BY _op ORDER BY _op",
        );
        assert_eq!(lake["format_version"], 2);
        let got: BTreeMap<String, u64> = lake["sql"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["_op"].as_str().unwrap().to_string(),
                    r["n"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            jsonl_counts(&events, table),
            "{table}: change rows per op (lake vs JSONL)"
        );
        for r in lake["sql"].as_array().unwrap() {
            if r["_op"] != "truncate" {
                assert_eq!(
                    r["n"], r["distinct_pairs"],
                    "{table}: duplicate (_lsn, key) pairs: {r}"
                );
            }
        }
        let total: u64 = got.values().sum();
        assert_eq!(
            lake["rows"].as_array().unwrap().len() as u64,
            total,
            "{table}: pyiceberg's scan and DuckDB agree"
        );
        let snapshots = assert_positions(table, &lake);
        eprintln!("{table}: {total} change rows in {snapshots} snapshots, {got:?}");
        assert!(snapshots > 5, "{table}: only {snapshots} commits");
        assert_current_state(&pg, &f, table, toast);
    }

    // The workload did what it is meant to cover: key changes, and updates
    // that left the TOASTed `doc` unsent.
    let moved = events
        .iter()
        .filter(|e| e["table"] == "ledger" && e["op"] == "update" && !e["before"].is_null())
        .filter(|e| e["before"]["id"] != e["key"]["id"])
        .count();
    assert!(moved > 0, "no key change in the workload");
    let toast = read(
        &f,
        "typed",
        "SELECT count(*) AS n FROM t WHERE list_contains(_unchanged, 'doc') AND doc IS NULL",
    );
    assert!(
        toast["sql"][0]["n"].as_u64().unwrap() > 0,
        "no unchanged TOAST value: {}",
        toast["sql"]
    );

    // ADD COLUMN: a new optional column, null in the rows before it.
    let lake = read(
        &f,
        "ledger",
        "SELECT count(*) FILTER (WHERE note IS NOT NULL) AS noted, \
         min(_lsn) FILTER (WHERE note IS NOT NULL) > min(_lsn) AS later, \
         count(*) FILTER (WHERE _op = 'truncate') AS truncates FROM t",
    );
    let note = lake["schema"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "note");
    assert_eq!(
        note.map(|c| c["required"].clone()),
        Some(Value::Bool(false)),
        "{}",
        lake["schema"]
    );
    assert!(
        lake["sql"][0]["noted"].as_u64().unwrap() > 0,
        "{}",
        lake["sql"]
    );
    assert_eq!(lake["sql"][0]["later"], true);
    assert_eq!(lake["sql"][0]["truncates"], 1);
}
