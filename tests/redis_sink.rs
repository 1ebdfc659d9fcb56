//! End-to-end: a real Postgres, the real pgferry binary, a real Redis.
//! After each workload every Postgres row must equal its Redis value, and no
//! other key may be left (pgferry's own `pgferry:*` keys aside).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::ferry::{kill9, terminate, FerryDir, Guard};
use support::pg::TestPg;
use support::redis::TestRedis;

const T: Duration = Duration::from_secs(90);

/// (table, key template, mode, ttl_seconds) of a redis sink's table.
type TableSpec<'a> = (&'a str, &'a str, &'a str, Option<u64>);
/// (table, its Redis key from a `to_jsonb` row, how it is stored).
type Expect<'a> = (&'a str, &'a dyn Fn(&Value) -> String, Mode);

const PRODUCTS: &str = "CREATE TABLE products (
    id int PRIMARY KEY, name text, price numeric(10,2), big numeric,
    body text, attrs jsonb, note text);
    ALTER TABLE products ALTER COLUMN body SET STORAGE EXTERNAL;
    CREATE TABLE other (id int PRIMARY KEY, v text);";

/// A `[[sink]]` of type redis named `cache`, with `tables` as
/// (table, key, mode, ttl) and `extra` lines.
fn redis_sink(url: &str, tables: &[TableSpec], extra: &str) -> String {
    let mut s =
        format!("\n[[sink]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"{url}\"\n{extra}\n");
    for (t, key, mode, ttl) in tables {
        s += &format!("[sink.tables.\"{t}\"]\nkey = \"{key}\"\nmode = \"{mode}\"\n");
        if let Some(ttl) = ttl {
            s += &format!("ttl_seconds = {ttl}\n");
        }
    }
    s
}

fn setup(
    pg: &TestPg,
    r: &TestRedis,
    ddl: &str,
    tables: &[TableSpec],
    extra_source: &str,
) -> FerryDir {
    pg.sql(ddl);
    let f = FerryDir::new();
    let names: Vec<&str> = tables.iter().map(|t| t.0).collect();
    f.write_config(
        &pg.url(),
        &names,
        extra_source,
        &redis_sink(&r.url(), tables, ""),
    );
    f
}

/// Every row of `table` as `to_jsonb`, by its key under `key`.
fn pg_rows(pg: &TestPg, table: &str, key: impl Fn(&Value) -> String) -> BTreeMap<String, Value> {
    pg.sql(&format!("SELECT to_jsonb(t) FROM {table} t"))
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (key(&v), v)
        })
        .collect()
}

fn id_key(prefix: &'static str) -> impl Fn(&Value) -> String {
    move |v| format!("{prefix}{}", v["id"])
}

/// The text pgferry writes to a hash field for a JSON value.
fn field_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Json,
    Hash,
}

/// Ok when Redis holds exactly the rows of `tables` (table, key fn, mode)
/// and nothing else outside `pgferry:*`; Err describes the first difference.
fn compare(pg: &TestPg, r: &TestRedis, tables: &[Expect]) -> Result<(), String> {
    let mut c = r.conn();
    let mut expected_keys = BTreeSet::new();
    for (table, key, mode) in tables {
        let rows = pg_rows(pg, table, key);
        for (k, row) in &rows {
            expected_keys.insert(k.clone());
            match mode {
                Mode::Json => {
                    let got: Option<String> = ::redis::cmd("GET").arg(k).query(&mut c).unwrap();
                    let got = got.ok_or_else(|| format!("{k} is missing; expected {row}"))?;
                    let got: Value = serde_json::from_str(&got)
                        .map_err(|e| format!("{k} is not JSON ({e}): {got:.200}"))?;
                    if &got != row {
                        return Err(format!(
                            "{k}: Redis has\n{got:.400}\nPostgres has\n{row:.400}"
                        ));
                    }
                }
                Mode::Hash => {
                    let got: BTreeMap<String, String> =
                        ::redis::cmd("HGETALL").arg(k).query(&mut c).unwrap();
                    let obj = row.as_object().unwrap();
                    let want: BTreeMap<String, String> = obj
                        .iter()
                        .filter_map(|(f, v)| field_text(v).map(|t| (f.clone(), t)))
                        .collect();
                    if got.keys().ne(want.keys()) {
                        return Err(format!(
                            "{k}: fields {:?}, expected {:?}",
                            got.keys(),
                            want.keys()
                        ));
                    }
                    for (f, w) in &want {
                        let g = &got[f];
                        let same = match &obj[f] {
                            // json(b) text: compare as JSON.
                            Value::Object(_) | Value::Array(_) => {
                                serde_json::from_str::<Value>(g).ok().as_ref() == Some(&obj[f])
                            }
                            _ => g == w,
                        };
                        if !same {
                            return Err(format!("{k}.{f}: Redis has {g:.200}, Postgres {w:.200}"));
                        }
                    }
                }
            }
        }
        // The key set pgferry keeps for TRUNCATE holds exactly the table's keys.
        let members: BTreeSet<String> = ::redis::cmd("SMEMBERS")
            .arg(format!("pgferry:pgferry:cache:keys:{table}"))
            .query(&mut c)
            .unwrap();
        let keys: BTreeSet<String> = rows.keys().cloned().collect();
        if members != keys {
            return Err(format!(
                "key set of {table}: {members:?}, expected {keys:?}"
            ));
        }
    }
    let actual: BTreeSet<String> = r
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with("pgferry:"))
        .collect();
    if actual != expected_keys {
        let extra: Vec<_> = actual.difference(&expected_keys).collect();
        let missing: Vec<_> = expected_keys.difference(&actual).collect();
        return Err(format!("keys differ: extra {extra:?}, missing {missing:?}"));
    }
    Ok(())
}

/// Waits until [`compare`] holds. Fails only when the differences stopped
/// changing for `T` (progress, not wall time).
fn wait_synced(pg: &TestPg, r: &TestRedis, f: &FerryDir, tables: &[Expect]) {
    support::progress::wait_for(
        T,
        || compare(pg, r, tables),
        || {
            let log = f.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            format!("Redis never matched Postgres\n--- pgferry log (tail) ---\n{tail}")
        },
    )
}

/// Inserts, updates, deletes, a primary-key change, TOASTed values left
/// unchanged by updates (with and without a key change), NULLs, and a
/// TRUNCATE followed by inserts in the same transaction.
fn workload(pg: &TestPg) {
    pg.sql(
        "INSERT INTO products SELECT i, 'name ' || i, i + 0.5, 12345678901234567890.123456789000 * i,
                'short body ' || i, jsonb_build_object('n', i, 'tags', jsonb_build_array('a', i)), 'note'
         FROM generate_series(1, 40) i",
    );
    pg.sql("INSERT INTO other SELECT i, 'v' || i FROM generate_series(1, 10) i");
    pg.sql("UPDATE products SET price = price * 3, name = 'triple \"quoted\" \\ name' WHERE id % 3 = 0");
    pg.sql("DELETE FROM products WHERE id % 7 = 0");
    pg.sql("UPDATE products SET id = 1001 WHERE id = 1");
    // A large incompressible TOASTed value, then updates that do not send it.
    pg.sql(
        "INSERT INTO products VALUES (2000, 'big', 1.50, 0.000000000000000000001,
            (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 8000) i), '{\"k\": [1, 2.50]}', 'n')",
    );
    pg.sql("UPDATE products SET price = 10.10, big = 98765432109876543210.000000000001 WHERE id = 2000");
    pg.sql("UPDATE products SET id = 2001, note = NULL WHERE id = 2000");
    pg.sql("UPDATE products SET price = 3.30, note = 'back' WHERE id = 2001");
    pg.sql("UPDATE products SET note = NULL, attrs = NULL WHERE id = 2");
    pg.sql("BEGIN; TRUNCATE other; INSERT INTO other VALUES (100, 'after truncate'), (101, 'x'); COMMIT");
    pg.sql("BEGIN; INSERT INTO products VALUES (3000, 'in txn', 0.01, 1, 'b', NULL, NULL);
            UPDATE products SET name = 'moved' WHERE id = 2; DELETE FROM products WHERE id = 4; COMMIT");
}

fn mode_test(mode: &str, m: Mode) {
    let pg = TestPg::start();
    let r = TestRedis::new();
    let f = setup(
        &pg,
        &r,
        PRODUCTS,
        &[
            ("public.products", "product:{id}", mode, None),
            ("public.other", "other:{id}", mode, None),
        ],
        "",
    );
    let mut g = support::ferry::start_streaming(&pg, &f);
    workload(&pg);
    let tables: [Expect; 2] = [
        ("public.products", &id_key("product:"), m),
        ("public.other", &id_key("other:"), m),
    ];
    wait_synced(&pg, &r, &f, &tables);
    // The TOASTed body survived the updates that did not send it.
    let n: String = pg.sql("SELECT length(body) FROM products WHERE id = 2001");
    assert_eq!(n.trim(), "256000");
    // TRUNCATE removed the old keys of `other`.
    assert!(!r.keys().contains(&"other:1".to_string()));
    // Then truncate the big table too.
    pg.sql("TRUNCATE products");
    wait_synced(&pg, &r, &f, &tables);
    assert!(r.keys().iter().all(|k| !k.starts_with("product:")));
    let st = terminate(&mut g.0);
    assert!(st.success(), "{}", f.log());
    assert!(
        !f.log()
            .contains("were deleted rather than stored incomplete"),
        "{}",
        f.log()
    );
}

#[test]
fn json_mode_keeps_every_row_equal_to_postgres() {
    mode_test("json", Mode::Json);
}

#[test]
fn hash_mode_keeps_every_row_equal_to_postgres() {
    mode_test("hash", Mode::Hash);
}

/// `products` (and `other`) in Postgres, `products` cached in json mode as
/// `product:{id}`, pgferry streaming.
fn json_products(pg: &TestPg, r: &TestRedis) -> (FerryDir, Guard) {
    let f = setup(
        pg,
        r,
        PRODUCTS,
        &[("public.products", "product:{id}", "json", None)],
        "",
    );
    let g = support::ferry::start_streaming(pg, &f);
    (f, g)
}

/// Waits until `key` holds a value that contains `text`, and returns it.
fn wait_value(r: &TestRedis, f: &FerryDir, key: &str, text: &str) -> String {
    let deadline = Instant::now() + T;
    let mut c = r.conn();
    loop {
        let got: Option<String> = ::redis::cmd("GET").arg(key).query(&mut c).unwrap();
        if let Some(v) = got.filter(|v| v.contains(text)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{key} never held {text}:\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn json_mode_keeps_numbers_byte_exact_through_a_toast_merge() {
    let pg = TestPg::start();
    let r = TestRedis::new();
    let (f, _g) = json_products(&pg, &r);
    pg.sql(
        "INSERT INTO products VALUES (1, 'a', 1.50, 123456789012345678901234567890.000000000000000000000001,
            (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 4000) i), '{\"x\": 1.10}', 'n')",
    );
    pg.sql("UPDATE products SET name = 'b' WHERE id = 1");
    let doc = wait_value(&r, &f, "product:1", "\"name\":\"b\"");
    // Byte-level: the stored text is exactly the event's `after` format.
    assert!(doc.starts_with("{\"id\":1,\"name\":\"b\",\"price\":1.50,\"big\":123456789012345678901234567890.000000000000000000000001,\"body\":\"c4ca4238"), "{doc:.300}");
    assert!(
        doc.ends_with(",\"attrs\":{\"x\": 1.10},\"note\":\"n\"}"),
        "{}",
        &doc[doc.len() - 80..]
    );
}

/// The search sink's issue 9 property, checked here: a key change that
/// leaves a TOASTed value unsent, while Redis no longer holds the row
/// (evicted, expired), leaves no incomplete value under either key. The
/// merge script writes the new key and deletes the old one atomically, or
/// drops both: a miss, which readers fill from Postgres. The next change that
/// carries the whole row stores it again.
#[test]
fn a_key_change_without_its_stored_row_drops_it_instead_of_storing_it_incomplete() {
    let pg = TestPg::start();
    let r = TestRedis::new();
    let (f, _g) = json_products(&pg, &r);
    let tables: [Expect; 1] = [("public.products", &id_key("product:"), Mode::Json)];
    pg.sql(
        "INSERT INTO products VALUES
            (1, 'a', 1.50, 1, (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 4000) i), NULL, 'n'),
            (2, 'b', 2.50, 2, 'short', NULL, 'n')",
    );
    wait_synced(&pg, &r, &f, &tables);
    let _: i64 = ::redis::cmd("DEL")
        .arg("product:1")
        .query(&mut r.conn())
        .unwrap();
    pg.sql("UPDATE products SET id = 101 WHERE id = 1");
    // Applied after the key change: once it is there, so is the key change.
    pg.sql("UPDATE products SET name = 'after' WHERE id = 2");
    wait_value(&r, &f, "product:2", "\"after\"");
    let keys = r.keys();
    assert!(
        !keys.iter().any(|k| k == "product:1" || k == "product:101"),
        "{keys:?}"
    );
    assert!(
        f.log().contains("deleted rather than stored incomplete"),
        "{}",
        f.log()
    );
    // A change that carries the whole row brings it back.
    pg.sql("UPDATE products SET body = body || 'x' WHERE id = 101");
    wait_synced(&pg, &r, &f, &tables);
}

#[test]
fn invalidate_mode_deletes_the_keys_of_changed_rows() {
    let pg = TestPg::start();
    let r = TestRedis::new();
    let f = setup(
        &pg,
        &r,
        PRODUCTS,
        &[("public.products", "product:{id}", "invalidate", None)],
        "",
    );
    let _g = support::ferry::start_streaming(&pg, &f);
    let mut c = r.conn();
    let set = |c: &mut ::redis::Connection, k: &str| {
        ::redis::cmd("SET")
            .arg(k)
            .arg("cached")
            .query::<()>(c)
            .unwrap()
    };
    let exists = |c: &mut ::redis::Connection, k: &str| -> bool {
        ::redis::cmd("EXISTS").arg(k).query::<i64>(c).unwrap() == 1
    };
    // A key pgferry deletes once it has applied everything before it.
    let mut barrier_id = 900;
    let mut barrier = |c: &mut ::redis::Connection| {
        barrier_id += 1;
        let k = format!("product:{barrier_id}");
        set(c, &k);
        pg.sql(&format!("INSERT INTO products (id) VALUES ({barrier_id})"));
        let deadline = Instant::now() + T;
        while exists(c, &k) {
            assert!(
                Instant::now() < deadline,
                "barrier never passed:\n{}",
                f.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    pg.sql(
        "INSERT INTO products SELECT i, 'n', 1.00, 1, CASE WHEN i = 10 THEN (SELECT string_agg(md5(j::text), '') FROM generate_series(1, 4000) j) ELSE 'b' END, NULL, NULL
         FROM generate_series(1, 20) i",
    );
    barrier(&mut c);
    // The application caches every row, plus keys of other shapes.
    for i in 1..=20 {
        set(&mut c, &format!("product:{i}"));
    }
    for k in ["product:109", "unrelated:1", "products:1", "product:a:b"] {
        set(&mut c, k);
    }
    pg.sql("UPDATE products SET name = 'x' WHERE id <= 5");
    pg.sql("DELETE FROM products WHERE id IN (6, 7, 8)");
    pg.sql("UPDATE products SET id = 109 WHERE id = 9");
    pg.sql("UPDATE products SET price = 2.00 WHERE id = 10");
    barrier(&mut c);
    for i in 1..=10 {
        assert!(
            !exists(&mut c, &format!("product:{i}")),
            "product:{i} should be invalidated"
        );
    }
    assert!(!exists(&mut c, "product:109"));
    for i in 11..=20 {
        assert!(
            exists(&mut c, &format!("product:{i}")),
            "product:{i} was not changed"
        );
    }
    pg.sql("TRUNCATE products");
    let deadline = Instant::now() + T;
    while (11..=20).any(|i| exists(&mut c, &format!("product:{i}"))) {
        assert!(
            Instant::now() < deadline,
            "TRUNCATE never invalidated:\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Keys the template cannot produce survive the TRUNCATE.
    for k in ["unrelated:1", "products:1", "product:a:b"] {
        assert!(exists(&mut c, k), "{k} must survive");
    }
    // Invalidate mode keeps no key set.
    assert!(
        r.keys()
            .iter()
            .all(|k| !k.starts_with("pgferry:pgferry:cache:keys:")),
        "{:?}",
        r.keys()
    );
}

#[test]
fn composite_keys_with_separators_in_values_do_not_collide_and_ttl_is_set() {
    let pg = TestPg::start();
    let r = TestRedis::new();
    let f = setup(
        &pg,
        &r,
        "CREATE TABLE accounts (tenant_id text, id text, name text, PRIMARY KEY (tenant_id, id))",
        &[("public.accounts", "{tenant_id}:{id}", "json", Some(3600))],
        "",
    );
    let _g = support::ferry::start_streaming(&pg, &f);
    pg.sql("INSERT INTO accounts VALUES ('x:y', 'z', 'first'), ('x', 'y:z', 'second'), ('50%', '1', 'pct')");
    let key = |v: &Value| {
        let esc = |s: &str| s.replace('%', "%25").replace(':', "%3A");
        format!(
            "{}:{}",
            esc(v["tenant_id"].as_str().unwrap()),
            esc(v["id"].as_str().unwrap())
        )
    };
    let tables: [Expect; 1] = [("public.accounts", &key, Mode::Json)];
    wait_synced(&pg, &r, &f, &tables);
    let keys = r.keys();
    for k in ["x%3Ay:z", "x:y%3Az", "50%25:1"] {
        assert!(keys.contains(&k.to_string()), "{k} in {keys:?}");
    }
    let mut c = r.conn();
    for k in ["x%3Ay:z", "x:y%3Az", "50%25:1"] {
        let ttl: i64 = ::redis::cmd("TTL").arg(k).query(&mut c).unwrap();
        assert!(ttl > 0 && ttl <= 3600, "TTL of {k} is {ttl}");
    }
    // A change keeps the TTL in place.
    pg.sql("UPDATE accounts SET name = 'renamed' WHERE tenant_id = 'x'");
    wait_synced(&pg, &r, &f, &tables);
    let ttl: i64 = ::redis::cmd("TTL").arg("x:y%3Az").query(&mut c).unwrap();
    assert!(ttl > 0, "{ttl}");
}

#[test]
fn a_transaction_lands_as_one_multi_exec() {
    let pg = TestPg::start();
    let r = TestRedis::new();
    let f = setup(
        &pg,
        &r,
        PRODUCTS,
        &[("public.products", "product:{id}", "json", None)],
        "",
    );
    let _g = support::ferry::start_streaming(&pg, &f);
    let (mut mon, path) = r.monitor();
    std::thread::sleep(Duration::from_millis(300));
    pg.sql("BEGIN; INSERT INTO products (id, name) VALUES (1, 'one'), (2, 'two'); UPDATE products SET name = 'uno' WHERE id = 1; COMMIT");
    let tables: [Expect; 1] = [("public.products", &id_key("product:"), Mode::Json)];
    wait_synced(&pg, &r, &f, &tables);
    std::thread::sleep(Duration::from_millis(300));
    let _ = mon.kill();
    let _ = mon.wait();
    let log = std::fs::read_to_string(&path).unwrap();
    // MONITOR lists the commands of a MULTI between "MULTI" and "EXEC".
    let lines: Vec<&str> = log.lines().collect();
    let find = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} not in MONITOR output:\n{log}"))
    };
    let first = find("\"SET\" \"product:1\"");
    let second = find("\"SET\" \"product:2\"");
    let multi = lines[..first.min(second)]
        .iter()
        .rposition(|l| l.contains("\"MULTI\""))
        .unwrap_or_else(|| panic!("no MULTI before the writes:\n{log}"));
    let exec = multi
        + lines[multi..]
            .iter()
            .position(|l| l.contains("\"EXEC\""))
            .unwrap_or_else(|| panic!("no EXEC after the writes:\n{log}"));
    assert!(
        first.max(second) < exec,
        "both writes in one MULTI/EXEC:\n{log}"
    );
    // …which also records the position.
    assert!(
        lines[multi..exec]
            .iter()
            .any(|l| l.contains("\"pgferry:pgferry:cache:position\"")),
        "{log}"
    );
}

/// Keeps writing transactions until `stop` is set; returns how many ran.
fn background_workload(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                n += 1;
                let i = n as i32;
                client
                    .batch_execute(&format!(
                        "BEGIN;
                         INSERT INTO products (id, name, price, body) VALUES ({i}, 'p{i}', {i}.25, 'body {i}');
                         UPDATE products SET price = price + 1 WHERE id = {};
                         DELETE FROM products WHERE id = {};
                         UPDATE products SET id = id + 100000 WHERE id = {};
                         COMMIT",
                        i / 2,
                        i / 3,
                        i / 5
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    })
}

#[test]
fn a_redis_outage_is_caught_up_without_loss() {
    let pg = TestPg::start();
    let mut r = TestRedis::new();
    let f = setup(
        &pg,
        &r,
        PRODUCTS,
        &[("public.products", "product:{id}", "json", None)],
        "",
    );
    // Short timeouts so that the outage is noticed quickly.
    let cfg = std::fs::read_to_string(f.path("pgferry.toml")).unwrap();
    std::fs::write(
        f.path("pgferry.toml"),
        cfg.replace("type = \"redis\"\n", "type = \"redis\"\ntimeout_secs = 2\n"),
    )
    .unwrap();
    let _g = support::ferry::start_streaming(&pg, &f);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = background_workload(pg.url(), stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    r.stop();
    std::thread::sleep(Duration::from_secs(5));
    r.start();
    std::thread::sleep(Duration::from_secs(2));
    // And a freeze: replies stop while the connection stays open.
    r.pause();
    std::thread::sleep(Duration::from_secs(4));
    r.resume();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let n = w.join().unwrap();
    assert!(n > 20, "workload ran {n} transactions");
    let tables: [Expect; 1] = [("public.products", &id_key("product:"), Mode::Json)];
    wait_synced(&pg, &r, &f, &tables);
    assert!(
        f.log().contains("sink batch failed; retrying"),
        "the outage was noticed:\n{}",
        f.log()
    );
}

#[test]
fn kill9_twice_during_a_workload_then_restart_converges() {
    let pg = TestPg::start();
    let r = TestRedis::new();
    let f = setup(
        &pg,
        &r,
        PRODUCTS,
        &[("public.products", "product:{id}", "hash", None)],
        "",
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut g = support::ferry::start_streaming(&pg, &f);
    let w = background_workload(pg.url(), stop.clone());
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(2500));
        kill9(&mut g.0);
        std::thread::sleep(Duration::from_millis(500));
        g = Guard(f.run());
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Release);
    w.join().unwrap();
    let tables: [Expect; 1] = [("public.products", &id_key("product:"), Mode::Hash)];
    wait_synced(&pg, &r, &f, &tables);
    drop(g);
}

#[test]
fn a_spilled_transaction_is_split_and_resumes_after_kill9() {
    let pg = TestPg::start();
    let r = TestRedis::new();
    let f = setup(
        &pg,
        &r,
        PRODUCTS,
        &[("public.products", "product:{id}", "json", None)],
        "\n[pipeline]\nmemory_limit_mb = 1\n",
    );
    let mut g = support::ferry::start_streaming(&pg, &f);
    // ~80k changes in one transaction: several units of at most 32768 commands.
    pg.sql("INSERT INTO products (id, name, price) SELECT i, 'n' || i, i / 100.0 FROM generate_series(1, 40000) i");
    pg.sql("UPDATE products SET name = 'u' || id");
    // Kill pgferry as soon as the first units of the update land.
    let mut c = r.conn();
    let deadline = Instant::now() + T;
    let mut positions = BTreeSet::new();
    loop {
        let p: Option<String> = ::redis::cmd("GET")
            .arg("pgferry:pgferry:cache:position")
            .query(&mut c)
            .unwrap();
        let u: Option<String> = ::redis::cmd("GET").arg("product:1").query(&mut c).unwrap();
        if let Some(p) = p {
            positions.insert(p);
        }
        if u.is_some_and(|d| d.contains("\"u1\"")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the update never started:\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    kill9(&mut g.0);
    // The transactions were applied in several units, each recording a
    // position inside its transaction.
    assert!(
        f.log().contains("\"changes\":16384"),
        "no unit ended inside a transaction: {positions:?}\n{}",
        f.log()
    );
    let _g = Guard(f.run());
    let tables: [Expect; 1] = [("public.products", &id_key("product:"), Mode::Json)];
    wait_synced(&pg, &r, &f, &tables);
}

#[test]
fn bad_redis_configs_are_rejected_at_load_naming_the_key() {
    // Nothing is started: the config is refused before any connection.
    let f = FerryDir::new();
    let cases: [(&[TableSpec], &str, &str); 4] = [
        (
            &[("public.products", "product:{id", "json", None)],
            "",
            "tables.\"public.products\".key",
        ),
        (
            &[("public.products", "{id}", "invalidate", None)],
            "",
            "literal prefix",
        ),
        (
            &[("public.products", "p:{id}", "json", Some(0))],
            "",
            "ttl_seconds",
        ),
        (
            &[("public.products", "p:{id}", "json", None)],
            "tls_ca_file = \"/x.pem\"",
            "rediss://",
        ),
    ];
    for (tables, extra, want) in cases {
        f.write_config(
            "postgres://postgres@127.0.0.1:1/postgres",
            &["public.products"],
            "",
            &redis_sink("redis://127.0.0.1:1", tables, extra),
        );
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgferry"))
            .args(["run", "--config"])
            .arg(f.path("pgferry.toml"))
            .output()
            .unwrap();
        // One JSON log line: quotes in its message are escaped.
        let err = String::from_utf8_lossy(&out.stderr).replace("\\\"", "\"");
        assert!(!out.status.success(), "{want}: {err}");
        assert!(
            err.contains(want) && err.contains("sink[1]"),
            "{want}: {err}"
        );
    }
}

#[test]
fn rediss_with_a_private_ca_an_acl_user_and_a_database_number() {
    let pg = TestPg::start();
    let r = TestRedis::tls_with_acl(3);
    pg.sql(PRODUCTS);
    let f = FerryDir::new();
    let ca = r.ca_pem.clone().unwrap();
    f.write_config(
        &pg.url(),
        &["public.products"],
        "",
        &redis_sink(
            &r.url(),
            &[("public.products", "product:{id}", "json", None)],
            &format!("tls_ca_file = \"{}\"", ca.display()),
        ),
    );
    let mut g = support::ferry::start_streaming(&pg, &f);
    pg.sql("INSERT INTO products (id, name, price) VALUES (1, 'tls', 1.50), (2, 'x', 2)");
    pg.sql("DELETE FROM products WHERE id = 2");
    // The harness connection uses the same URL, so it reads database 3.
    let tables: [Expect; 1] = [("public.products", &id_key("product:"), Mode::Json)];
    wait_synced(&pg, &r, &f, &tables);
    let mut c = r.conn();
    let _: () = ::redis::cmd("SELECT").arg(0).query(&mut c).unwrap();
    let in_db0: i64 = ::redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(in_db0, 0, "everything went to database 3");
    let st = terminate(&mut g.0);
    assert!(st.success());
    assert!(
        !f.log().contains("s3cret"),
        "the password never reaches the log"
    );
}
