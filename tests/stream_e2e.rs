//! End-to-end: a real Postgres, the real pgferry binary, the JSONL output.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::ferry::{terminate, FerryDir, Guard};
use support::pg::TestPg;

const T: Duration = Duration::from_secs(60);

fn setup(pg: &TestPg, ddl: &str, tables: &[&str], extra_source: &str) -> FerryDir {
    pg.sql(ddl);
    let f = FerryDir::new();
    f.write_config(&pg.url(), tables, extra_source, "");
    f
}

fn start(pg: &TestPg, f: &FerryDir) -> Guard {
    support::ferry::start_streaming(pg, f)
}

fn ops(ev: &[Value]) -> Vec<&str> {
    ev.iter().map(|e| e["op"].as_str().unwrap()).collect()
}

#[test]
fn insert_update_delete_truncate_reach_the_jsonl_file() {
    let pg = TestPg::start();
    let f = setup(
        &pg,
        "CREATE TABLE products (id int PRIMARY KEY, name text, price numeric(10,2))",
        &["public.products"],
        "",
    );
    let mut g = start(&pg, &f);
    pg.sql("INSERT INTO products VALUES (1, 'pen', 1.50), (2, 'ink', 12.00)");
    pg.sql("UPDATE products SET price = 2.25 WHERE id = 1");
    pg.sql("DELETE FROM products WHERE id = 2");
    pg.sql("TRUNCATE products");
    let ev = f.wait_events(5, T);
    assert_eq!(
        ops(&ev),
        ["insert", "insert", "update", "delete", "truncate"]
    );

    let ins = &ev[0];
    assert_eq!(ins["schema"], "public");
    assert_eq!(ins["table"], "products");
    assert_eq!(ins["key"], json!({"id": 1}));
    assert_eq!(ins["before"], Value::Null);
    assert_eq!(
        ins["after"],
        serde_json::from_str::<Value>(r#"{"id":1,"name":"pen","price":1.50}"#).unwrap()
    );
    assert!(
        ins.get("unchanged").is_none(),
        "unchanged is omitted when empty"
    );
    // Both inserts share one transaction; LSNs are X/Y and grow in WAL order.
    assert_eq!(ev[0]["xid"], ev[1]["xid"]);
    assert_eq!(ev[0]["commit_lsn"], ev[1]["commit_lsn"]);
    let lsn = |v: &Value| v.as_str().unwrap().parse::<pgferry::lsn::Lsn>().unwrap();
    assert!(lsn(&ev[0]["lsn"]) < lsn(&ev[1]["lsn"]));
    assert!(lsn(&ev[1]["lsn"]) < lsn(&ev[1]["commit_lsn"]));
    assert!(ev[0]["commit_time"].as_str().unwrap().ends_with('Z'));

    let upd = &ev[2];
    assert_eq!(upd["key"], json!({"id": 1}));
    assert_eq!(
        upd["before"],
        Value::Null,
        "default replica identity and unchanged key: no old row"
    );
    assert_eq!(
        upd["after"]["price"],
        serde_json::from_str::<Value>("2.25").unwrap()
    );

    let del = &ev[3];
    assert_eq!(del["key"], json!({"id": 2}));
    assert_eq!(del["before"], json!({"id": 2}));
    assert_eq!(del["after"], Value::Null);

    let tr = &ev[4];
    assert_eq!(
        (tr["table"].as_str(), &tr["key"], &tr["after"]),
        (Some("products"), &Value::Null, &Value::Null)
    );

    let st = terminate(&mut g.0);
    assert!(st.success(), "SIGTERM must exit 0: {st:?}\n{}", f.log());
    // The checkpoint covers the last transaction.
    let cp: Value = serde_json::from_str(
        &std::fs::read_to_string(f.path("state/changes.checkpoint.json")).unwrap(),
    )
    .unwrap();
    assert!(
        lsn(&cp["lsn"]) > lsn(&ev[4]["commit_lsn"]),
        "checkpoint {cp} is past the last commit"
    );
    // And the server was told.
    let confirmed: pgferry::lsn::Lsn = pg
        .sql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name='pgferry'")
        .trim()
        .parse()
        .unwrap();
    assert!(
        confirmed >= lsn(&cp["lsn"]),
        "confirmed_flush_lsn {confirmed} vs checkpoint {cp}"
    );
}

#[test]
fn unchanged_toast_full_identity_and_key_change() {
    let pg = TestPg::start();
    let f = setup(
        &pg,
        "CREATE TABLE docs (id int PRIMARY KEY, body text, n int);
         CREATE TABLE full_t (id int PRIMARY KEY, a text, b int);
         ALTER TABLE full_t REPLICA IDENTITY FULL;",
        &["public.docs", "public.full_t"],
        "",
    );
    let _g = start(&pg, &f);
    pg.sql("INSERT INTO docs SELECT 1, string_agg(md5(i::text), '') , 1 FROM generate_series(1, 1000) i");
    pg.sql("UPDATE docs SET n = 2 WHERE id = 1");
    pg.sql("UPDATE docs SET id = 10 WHERE id = 1");
    pg.sql("INSERT INTO full_t VALUES (1, 'x', 1)");
    pg.sql("UPDATE full_t SET b = 2 WHERE id = 1");
    pg.sql("DELETE FROM full_t WHERE id = 1");
    let ev = f.wait_events(6, T);
    assert_eq!(
        ops(&ev),
        ["insert", "update", "update", "insert", "update", "delete"]
    );

    // The TOASTed body was not sent: absent from `after`, listed in `unchanged`, never null.
    let body_len = ev[0]["after"]["body"].as_str().unwrap().len();
    assert_eq!(body_len, 32_000);
    let toast = &ev[1];
    assert_eq!(toast["unchanged"], json!(["body"]), "{toast}");
    assert!(toast["after"].get("body").is_none(), "{toast}");
    assert_eq!(toast["after"], json!({"id": 1, "n": 2}));

    // Primary-key change: key is the new one, before holds the old key columns.
    let pk = &ev[2];
    assert_eq!(pk["key"], json!({"id": 10}));
    assert_eq!(pk["before"], json!({"id": 1}));

    // REPLICA IDENTITY FULL: the whole old row.
    assert_eq!(ev[4]["before"], json!({"id": 1, "a": "x", "b": 1}));
    assert_eq!(ev[4]["after"], json!({"id": 1, "a": "x", "b": 2}));
    assert_eq!(ev[5]["before"], json!({"id": 1, "a": "x", "b": 2}));
    assert_eq!(ev[5]["after"], Value::Null);
}

#[test]
fn concurrent_sessions_come_out_in_commit_order() {
    let pg = TestPg::start();
    let f = setup(
        &pg,
        "CREATE TABLE ev (id int PRIMARY KEY, session int)",
        &["public.ev"],
        "",
    );
    let _g = start(&pg, &f);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let expected: Vec<i64> = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(pg.client().await);
        }
        let mut expected = Vec::new();
        let mut next_id = 0i32;
        for round in 0..10 {
            for c in &clients {
                c.batch_execute("BEGIN").await.unwrap();
            }
            // Interleave the writes of the four open transactions.
            let mut per_session: Vec<Vec<i32>> = vec![Vec::new(); 4];
            for _ in 0..3 {
                for (s, c) in clients.iter().enumerate() {
                    next_id += 1;
                    c.execute("INSERT INTO ev VALUES ($1, $2)", &[&next_id, &(s as i32)])
                        .await
                        .unwrap();
                    per_session[s].push(next_id);
                }
            }
            // Commit in an order that differs from the begin order.
            let order: Vec<usize> = match round % 3 {
                0 => vec![3, 1, 0, 2],
                1 => vec![2, 0, 3, 1],
                _ => vec![1, 3, 2, 0],
            };
            for s in order {
                clients[s].batch_execute("COMMIT").await.unwrap();
                expected.extend(per_session[s].iter().map(|&i| i as i64));
            }
        }
        expected
    });
    let ev = f.wait_events(expected.len(), T);
    let got: Vec<i64> = ev
        .iter()
        .map(|e| e["key"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        got, expected,
        "events must follow commit order, WAL order within a transaction"
    );
    // Transactions are contiguous and commit LSNs grow.
    let commits: Vec<&str> = ev
        .iter()
        .map(|e| e["commit_lsn"].as_str().unwrap())
        .collect();
    let mut seen = std::collections::HashSet::new();
    for w in commits.windows(2) {
        if w[0] != w[1] {
            assert!(seen.insert(w[0]), "transaction {} is split", w[0]);
        }
    }
}

#[test]
fn large_transactions_are_streamed_aborts_dropped_and_spilled_to_disk() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE big (id int PRIMARY KEY, pad text)");
    let f = FerryDir::new();
    // 1 MiB of memory: the 20k-row transaction must go to disk.
    f.write_config(&pg.url(), &["public.big"], "", "");
    let cfg = std::fs::read_to_string(f.path("pgferry.toml")).unwrap();
    std::fs::write(
        f.path("pgferry.toml"),
        format!("{cfg}\n[pipeline]\nmemory_limit_mb = 1\n"),
    )
    .unwrap();
    let _g = start(&pg, &f);
    pg.sql("INSERT INTO big SELECT i, repeat('x', 200) FROM generate_series(1, 20000) i");
    pg.sql("BEGIN; INSERT INTO big SELECT i, repeat('y', 200) FROM generate_series(100001, 110000) i; ROLLBACK;");
    pg.sql(
        "BEGIN;
         INSERT INTO big SELECT i, 'keep' FROM generate_series(200001, 203000) i;
         SAVEPOINT s1;
         INSERT INTO big SELECT i, 'drop' FROM generate_series(300001, 303000) i;
         ROLLBACK TO SAVEPOINT s1;
         INSERT INTO big SELECT i, 'keep' FROM generate_series(400001, 400010) i;
         COMMIT;",
    );
    pg.sql("INSERT INTO big VALUES (0, 'marker')");
    let ev = f.wait_events(20000 + 3010 + 1, T);
    assert_eq!(
        ev.len(),
        23011,
        "nothing of the aborted transaction or the rolled-back savepoint"
    );
    let ids: Vec<i64> = ev
        .iter()
        .map(|e| e["key"]["id"].as_i64().unwrap())
        .collect();
    let mut expected: Vec<i64> = (1..=20000).collect();
    expected.extend(200001..=203000);
    expected.extend(400001..=400010);
    expected.push(0);
    assert_eq!(ids, expected);
    assert!(ev[..20000].iter().all(|e| e["xid"] == ev[0]["xid"]));
    let streamed: i64 = pg
        .sql("SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = 'pgferry'")
        .trim()
        .parse()
        .unwrap();
    assert!(streamed >= 2, "the server must have streamed the large transactions (protocol v2), stream_txns = {streamed}");
    assert!(
        f.log().contains("transaction spilled to disk"),
        "{}",
        f.log()
    );
    // Spill files are gone once the sinks are done.
    let spill: Vec<_> = std::fs::read_dir(f.path("state/spill")).unwrap().collect();
    assert!(spill.is_empty(), "{spill:?}");
}

#[test]
fn a_slot_recreated_behind_pgferrys_back_stops_it_with_a_clear_error() {
    let pg = TestPg::start();
    let f = setup(
        &pg,
        "CREATE TABLE g (id int PRIMARY KEY)",
        &["public.g"],
        "",
    );
    let mut g = start(&pg, &f);
    pg.sql("INSERT INTO g VALUES (1)");
    f.wait_events(1, T);
    assert!(terminate(&mut g.0).success());
    pg.sql("SELECT pg_drop_replication_slot('pgferry')");
    pg.sql("INSERT INTO g VALUES (2)");
    pg.sql("SELECT pg_create_logical_replication_slot('pgferry', 'pgoutput')");
    pg.sql("INSERT INTO g VALUES (3)");
    let mut again = Guard(f.run());
    let st = support::ferry::wait_or_kill(&mut again.0, T).expect("pgferry must stop by itself");
    assert!(!st.success());
    let log = f.log();
    assert!(log.contains("changes were lost"), "{log}");
    assert!(log.contains("ahead of the checkpoint"), "{log}");
    assert_eq!(f.events().len(), 1, "nothing streamed over the gap");
}

/// Every value that crosses the replication stream equals `to_jsonb()` of
/// the same row on the server, for every built-in type family.
#[test]
fn streamed_values_equal_to_jsonb_for_every_type() {
    use support::types_fixture::{ROWS_SQL, ROW_COUNT, SETUP_SQL};
    let pg = TestPg::start();
    let f = setup(
        &pg,
        &format!("{SETUP_SQL}; CREATE TABLE public.marker (id int PRIMARY KEY);"),
        &["public.all_types", "public.marker"],
        "",
    );
    let _g = start(&pg, &f);
    let mut markers = 0;
    // Runs `sql`, then waits for its events and returns them.
    let mut step = |sql: &str| -> Vec<Value> {
        let before = f.events().len();
        pg.sql(sql);
        markers += 1;
        pg.sql(&format!("INSERT INTO public.marker VALUES ({markers})"));
        let ev = f.wait_events_until(T, &format!("marker {markers}"), |ev| {
            ev.iter()
                .any(|e| e["table"] == "marker" && e["key"]["id"] == markers)
        });
        let end = ev
            .iter()
            .position(|e| e["table"] == "marker" && e["key"]["id"] == markers)
            .unwrap_or(ev.len());
        ev[before..end].to_vec()
    };
    let reference = |pg: &TestPg| -> std::collections::BTreeMap<i64, Value> {
        pg.sql("SELECT to_jsonb(t) FROM public.all_types t")
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (v["id"].as_i64().unwrap(), v)
            })
            .collect()
    };
    let same = |what: &str, got: &Value, want: &Value| {
        let (g, w) = (got.as_object().unwrap(), want.as_object().unwrap());
        for (col, wv) in w {
            let gv = g
                .get(col)
                .unwrap_or_else(|| panic!("{what}: column {col} missing in {got}"));
            assert_eq!(
                gv, wv,
                "{what}, column {col}: pgferry {gv} vs to_jsonb {wv}"
            );
        }
        assert_eq!(g.len(), w.len(), "{what}: column count");
    };

    // Inserts and updates: replay the events into a table image.
    let ev = step(ROWS_SQL);
    let mut image: std::collections::BTreeMap<i64, Value> = Default::default();
    for e in &ev {
        let id = e["key"]["id"].as_i64().unwrap();
        let row = image.entry(id).or_insert_with(|| serde_json::json!({}));
        for (k, v) in e["after"].as_object().unwrap() {
            row[k] = v.clone();
        }
    }
    let want = reference(&pg);
    assert_eq!(want.len(), ROW_COUNT as usize);
    assert_eq!(
        image.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (id, w) in &want {
        same(
            &format!("row {id} after inserts and updates"),
            &image[id],
            w,
        );
    }

    // With REPLICA IDENTITY FULL the old rows come whole: they too must match.
    pg.sql("ALTER TABLE public.all_types REPLICA IDENTITY FULL");
    let ev = step("UPDATE public.all_types SET id = id + 100");
    assert_eq!(ev.len(), ROW_COUNT as usize);
    for e in &ev {
        let id = e["before"]["id"].as_i64().unwrap();
        same(
            &format!("before-image of row {id}"),
            &e["before"],
            &want[&id],
        );
    }
    let ev = step("DELETE FROM public.all_types");
    let want = reference(&pg);
    assert_eq!(want.len(), 0);
    assert_eq!(ev.len(), ROW_COUNT as usize);
    for e in &ev {
        let id = e["before"]["id"].as_i64().unwrap();
        let mut w = image[&(id - 100)].clone();
        w["id"] = Value::from(id);
        same(
            &format!("delete before-image of row {id}"),
            &e["before"],
            &w,
        );
    }
}

/// Standby status updates keep the walsender from timing pgferry out, and
/// while only unpublished tables are written the slot still advances (idle
/// positions are checkpointed), so WAL does not pile up behind it.
#[test]
fn feedback_keeps_the_session_alive_and_the_slot_advancing_when_idle() {
    let pg = TestPg::start_with(support::pg::PgOptions {
        conf: "wal_sender_timeout = '2s'\n".into(),
        hba: None,
        ssl: false,
    });
    let f = setup(
        &pg,
        "CREATE TABLE published (id int PRIMARY KEY); CREATE TABLE other (id int PRIMARY KEY);",
        &["public.published"],
        "",
    );
    let _g = start(&pg, &f);
    pg.sql("INSERT INTO published VALUES (1)");
    f.wait_events(1, T);
    let pid = pg.sql("SELECT pid FROM pg_stat_replication");
    let lsn = |s: String| s.trim().parse::<pgferry::lsn::Lsn>().unwrap();
    let first =
        lsn(pg
            .sql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name='pgferry'"));
    // Three walsender timeouts of writes to an unpublished table only.
    for i in 0..30 {
        pg.sql(&format!("INSERT INTO other VALUES ({i})"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let end = lsn(pg.sql("SELECT pg_current_wal_lsn()"));
    let deadline = std::time::Instant::now() + T;
    loop {
        let confirmed = lsn(pg
            .sql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name='pgferry'"));
        if confirmed >= end {
            assert!(confirmed > first);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot stayed at {confirmed} (start {first}) while the WAL moved to {end}\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        pg.sql("SELECT pid FROM pg_stat_replication"),
        pid,
        "the walsender was replaced: pgferry was timed out\n{}",
        f.log()
    );
    assert!(!pg.log().contains("replication timeout"), "{}", pg.log());
    assert_eq!(f.events().len(), 1);
}
