//! End-to-end: a real Postgres, the real pgferry binary, a real Kafka broker
//! (`support::kafka`, KRaft, one JVM for this test binary). After a
//! concurrent workload with kill -9s of pgferry and a broker restart, a
//! `read_committed` consumer reads every topic and the tables rebuilt from
//! it must equal `to_jsonb()` of every row, with no change missing (counted
//! against the JSONL sink of the same run, itself effectively-once), none
//! twice and each key's changes in order.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::ferry::{kill9, wait_or_kill, FerryDir, Guard};
use support::kafka::{read_topics, Rec};
use support::nats::TestNats;
use support::pg::TestPg;
use support::redis::TestRedis;
use support::workload::{self, OnError, Sessions};

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, grp int, v text, n numeric);
    CREATE TABLE accounts (id int PRIMARY KEY, balance numeric, note text);
    INSERT INTO accounts SELECT g, 100, 'a' || g FROM generate_series(1, 20) g;";

const TABLES: [&str; 2] = ["public.items", "public.accounts"];

/// A `[[sink]]` of type kafka named `name`, topics `<prefix>.{schema}.{table}`.
fn kafka_sink(name: &str, prefix: &str, extra: &str) -> String {
    format!(
        "\n[[sink]]\nname = \"{name}\"\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{prefix}.{{schema}}.{{table}}\"\ntimeout_secs = 10\n{extra}\n\
         [sink.kafka]\n\"linger.ms\" = 5\n\"transaction.timeout.ms\" = 20000\n",
        support::kafka::broker().bootstrap()
    )
}

/// A Postgres with the test tables, and a pgferry directory whose config
/// has the JSONL sink and a kafka sink named `name` (topics `name.…`) with
/// `extra` lines.
fn setup(name: &str, extra: &str) -> (TestPg, FerryDir) {
    let pg = TestPg::start();
    pg.sql(DDL);
    let f = FerryDir::new();
    f.write_config(&pg.url(), &TABLES, "", &kafka_sink(name, name, extra));
    (pg, f)
}

/// The rows of one table rebuilt from its records, key by key, in each
/// partition's order; fails on a duplicate or a key's changes out of order.
fn rebuild(recs: &[Rec], table: &str, debezium: bool) -> Result<BTreeMap<String, Value>, String> {
    let mut rows = BTreeMap::new();
    let mut seen = HashSet::new();
    let mut last_lsn: HashMap<String, (u64, u64)> = HashMap::new();
    for r in recs.iter().filter(|r| r.headers["table"] == table) {
        let key = r
            .key
            .clone()
            .ok_or("a record without key (no truncate ran)")?;
        let id: Value = serde_json::from_str(&key).unwrap();
        let id = id["id"].to_string();
        let Some(v) = &r.value else {
            if rows.contains_key(&id) {
                return Err(format!("a tombstone for {key} while the row is there"));
            }
            continue;
        };
        let lsn = (
            lsn_num(&r.headers["commit_lsn"]),
            lsn_num(&r.headers["lsn"]),
        );
        let ident = (r.topic.clone(), key.clone(), lsn, r.headers["op"].clone());
        if !seen.insert(ident.clone()) {
            return Err(format!("duplicate record {ident:?}"));
        }
        if let Some(prev) = last_lsn.insert(key.clone(), lsn) {
            if prev >= lsn {
                return Err(format!(
                    "key {key} in partition {}: {prev:?} came before {lsn:?}",
                    r.partition
                ));
            }
        }
        let (op, after) = if debezium {
            let op = match v["op"].as_str().unwrap() {
                "c" => "insert",
                "u" => "update",
                "d" => "delete",
                "r" => "read",
                o => return Err(format!("unexpected Debezium op {o}")),
            };
            if v["source"]["connector"] != "postgresql"
                || v["source"]["table"] != table.split('.').nth(1).unwrap()
            {
                return Err(format!("bad Debezium source in {v}"));
            }
            (op, &v["after"])
        } else {
            (v["op"].as_str().unwrap(), &v["after"])
        };
        if op != r.headers["op"] {
            return Err(format!("op header {} for a {op} event", r.headers["op"]));
        }
        match op {
            "insert" | "update" | "read" => {
                let row_id = after["id"].to_string();
                if row_id != id {
                    return Err(format!("record of key {key} holds row {after}"));
                }
                rows.insert(id, after.clone());
            }
            "delete" => {
                rows.remove(&id);
            }
            o => return Err(format!("unexpected op {o}")),
        }
    }
    Ok(rows)
}

fn lsn_num(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// How many value records the JSONL sink's events make on Kafka: a key
/// change is a delete plus an insert there.
fn expected_records(events: &[Value], table: &str) -> usize {
    let t = table.split('.').nth(1).unwrap();
    events
        .iter()
        .filter(|e| e["table"] == t && e["schema"] == "public")
        .map(|e| {
            let moved = e["op"] == "update"
                && e["before"].is_object()
                && e["before"]["id"] != e["after"]["id"];
            if moved {
                2
            } else {
                1
            }
        })
        .sum()
}

/// Compares every table rebuilt from Kafka with Postgres, and the number of
/// records with the JSONL sink's events.
fn compare(pg: &TestPg, f: &FerryDir, prefix: &str, debezium: bool) -> Result<(), String> {
    let recs = read_topics(prefix);
    let events = f.events();
    for t in TABLES {
        let want = support::oracle::table_rows(pg, t);
        let got = rebuild(&recs, t, debezium)?;
        if got != want {
            let diff: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(v))
                .take(3)
                .collect();
            return Err(format!(
                "{t}: {} rows in Kafka, {} in Postgres; first differences {diff:?}",
                got.len(),
                want.len()
            ));
        }
        if support::oracle::replay(
            &events
                .iter()
                .filter(|e| e["table"] == t.split('.').nth(1).unwrap())
                .cloned()
                .collect::<Vec<_>>(),
        ) != want
        {
            return Err(format!("{t}: the JSONL sink has not caught up yet"));
        }
        let values = recs
            .iter()
            .filter(|r| r.headers["table"] == t && r.value.is_some())
            .count();
        let expected = expected_records(&events, t);
        if values != expected {
            return Err(format!(
                "{t}: {values} records on Kafka, {expected} expected from the JSONL sink's events"
            ));
        }
    }
    Ok(())
}

/// Waits until [`compare`] holds (what pgferry still has to publish), as
/// long as pgferry makes progress (its slot's confirmed position moves): a
/// loaded machine can take long, a stuck sink (or a `read_committed` end
/// held back by a transaction left open) fails after two stalled minutes.
fn wait_synced(pg: &TestPg, f: &FerryDir, prefix: &str, debezium: bool) {
    let flushed = || {
        pg.sql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'pgferry'")
    };
    let mut last = flushed();
    let mut stalled_since = Instant::now();
    let give_up = Instant::now() + Duration::from_secs(900);
    loop {
        match compare(pg, f, prefix, debezium) {
            Ok(()) => return,
            Err(e) if e.starts_with("duplicate") || e.contains("came before") => {
                panic!("{e}\n{}", f.log())
            }
            Err(e) => {
                let now = flushed();
                if now != last {
                    last = now;
                    stalled_since = Instant::now();
                }
                let stalled = stalled_since.elapsed() > Duration::from_secs(120);
                assert!(
                    !stalled && Instant::now() < give_up,
                    "{e}\n(slot confirmed at {last})\n{}\nbroker:\n{}",
                    f.log(),
                    support::kafka::broker().log_tail()
                );
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
}

/// Transactions of several sessions: inserts, updates, deletes and key
/// changes on `items`, transfers between `accounts`.
fn start_workload(
    pg: &TestPg,
    rt: &tokio::runtime::Runtime,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u32>> {
    workload::spawn(
        pg,
        rt,
        stop,
        Sessions {
            count: 3,
            seed: 16,
            pause: Duration::from_millis(10),
            on_error: OnError::Rollback,
        },
        |w| {
            move |rng: &mut support::rng::XorShift, n: u32| {
                let id = (w * 1_000_000 + n) as i64;
                let other = rng.below(n + 1) as i64 + (w * 1_000_000) as i64;
                let a = rng.below(20) as i64 + 1;
                let b = rng.below(20) as i64 + 1;
                vec![format!(
                    "BEGIN;
                     INSERT INTO items VALUES ({id}, {w}, 'v{n}', {n}.5);
                     UPDATE items SET v = v || 'u', n = n + 1 WHERE id = {other};
                     UPDATE accounts SET balance = balance - 1 WHERE id = {a};
                     UPDATE accounts SET balance = balance + 1, note = 'n{n}' WHERE id = {b};
                     {}
                     COMMIT",
                    match n % 5 {
                        0 => format!("DELETE FROM items WHERE id = {};", other - 1),
                        1 => format!("UPDATE items SET id = id + 500000 WHERE id = {} AND id < 500000 * ({w} + 1);", other - 2),
                        _ => String::new(),
                    }
                )]
            }
        },
    )
}

/// 5 × kill -9 of pgferry and one broker stop/start under a concurrent
/// workload, then the full comparison.
fn crash_run(prefix: &str, format: &str) {
    let broker = support::kafka::broker();
    let _x = broker.exclusive();
    let (pg, f) = setup(prefix, &format!("format = \"{format}\""));
    let rt = workload::runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let mut g = support::ferry::start_streaming(&pg, &f);
    // Every account row is then on Kafka (they were inserted before the slot).
    pg.sql("UPDATE accounts SET note = note || '.'");
    let workers = start_workload(&pg, &rt, &stop);
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(2000 + 700 * i));
        if i == 2 {
            broker.stop();
            std::thread::sleep(Duration::from_secs(3));
            broker.start();
        }
        kill9(&mut g.0);
        g = Guard(f.run());
    }
    std::thread::sleep(Duration::from_secs(2));
    let n = workload::stop(&rt, &stop, workers);
    assert!(n > 50, "the workload ran only {n} transactions");
    wait_synced(&pg, &f, prefix, format == "debezium");
    let log = f.log();
    assert!(
        log.contains("records at or before the committed position are skipped"),
        "{log}"
    );
    drop(g);
}

#[test]
fn kill9_and_a_broker_restart_lose_and_duplicate_nothing() {
    crash_run("crash", "pgferry");
}

#[test]
fn debezium_format_survives_kill9_and_a_broker_restart() {
    crash_run("dbz", "debezium");
}

/// Two pgferry processes with the same sink name: the second one's
/// `init_transactions` fences the first, which stops with the reason; the
/// second takes over and nothing is published twice.
#[test]
fn a_second_pgferry_with_the_same_sink_name_fences_the_first() {
    let _s = support::kafka::broker().shared();
    let (pg, f) = setup("fence", "");
    let f2 = FerryDir::new();
    f2.write_config(&pg.url(), &TABLES, "", &kafka_sink("fence", "fence", ""));
    let rt = workload::runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let mut first = support::ferry::start_streaming(&pg, &f);
    pg.sql("UPDATE accounts SET note = note || '.'");
    let workers = start_workload(&pg, &rt, &stop);
    std::thread::sleep(Duration::from_secs(3));
    let second = Guard(f2.run());
    let status = wait_or_kill(&mut first.0, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("the first pgferry was not fenced:\n{}", f.log()));
    assert!(!status.success(), "{}", f.log());
    assert!(f.log().contains("fenced"), "{}", f.log());
    std::thread::sleep(Duration::from_secs(2));
    workload::stop(&rt, &stop, workers);
    // The second pgferry's own JSONL file only holds what it streamed, so
    // compare the Kafka side with Postgres alone (and for duplicates).
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let recs = read_topics("fence");
        let mut res = Ok(());
        for t in TABLES {
            match rebuild(&recs, t, false) {
                Ok(rows) if rows == support::oracle::table_rows(&pg, t) => {}
                Ok(rows) => res = Err(format!("{t}: {} rows in Kafka", rows.len())),
                Err(e) => panic!("{e}\n{}\n{}", f.log(), f2.log()),
            }
        }
        match res {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "{e}\n{}", f2.log()),
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    drop(second);
}

/// `exactly_once = false`: the idempotent producer; pgferry says at start
/// that it is at-least-once, and what it publishes arrives. `pgferry check`
/// reaches the broker without fencing anyone.
#[test]
fn at_least_once_mode_says_so_and_publishes_everything() {
    let _s = support::kafka::broker().shared();
    let (pg, f) = setup("alo", "exactly_once = false\nformat = \"debezium\"");
    let check = f.command(&["check"], &[]);
    assert!(
        check.stdout.contains("broker(s) reachable"),
        "{}\n{}",
        check.stdout,
        check.stderr
    );
    let g = support::ferry::start_streaming(&pg, &f);
    pg.sql(
        "INSERT INTO items SELECT g, 1, 'x' || g, g FROM generate_series(1, 200) g;
         UPDATE items SET v = 'y' WHERE id % 3 = 0; DELETE FROM items WHERE id % 7 = 0;
         UPDATE items SET id = id + 1000 WHERE id = 5; UPDATE accounts SET note = 'z';",
    );
    wait_synced(&pg, &f, "alo", true);
    assert!(f.log().contains("AT-LEAST-ONCE"), "{}", f.log());
    drop(g);
}

/// A row whose record exceeds `message.max.bytes` stops pgferry with the
/// key to raise, checked before producing; nothing of its transaction is
/// published.
#[test]
fn a_record_over_message_max_bytes_is_fatal_with_the_fix() {
    let _s = support::kafka::broker().shared();
    let (pg, f) = setup("big", "");
    let cfg = std::fs::read_to_string(f.path("pgferry.toml")).unwrap();
    let cfg = cfg.replace(
        "[sink.kafka]\n",
        "[sink.kafka]\n\"message.max.bytes\" = 4000\n",
    );
    std::fs::write(f.path("pgferry.toml"), cfg).unwrap();
    let mut g = support::ferry::start_streaming(&pg, &f);
    pg.sql("INSERT INTO items VALUES (1, 1, 'small', 1)");
    // Published on its own (a batch is one Kafka transaction).
    let deadline = Instant::now() + Duration::from_secs(120);
    while read_topics("big").is_empty() {
        assert!(Instant::now() < deadline, "nothing published:\n{}", f.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    pg.sql("INSERT INTO items VALUES (2, 1, repeat('x', 6000), 2)");
    let status = wait_or_kill(&mut g.0, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("pgferry did not stop:\n{}", f.log()));
    assert!(!status.success());
    let log = f.log();
    assert!(
        log.contains("over message.max.bytes = 4000") && log.contains("public.items"),
        "{log}"
    );
    let recs = read_topics("big");
    let ids: Vec<_> = recs.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(ids, ["{\"id\":1}"], "only the first row is published");
}

/// The three sinks of [`log_sinks_and_redis_do_not_wait_for_each_other`]:
/// Redis (`item:{id}`, json), Kafka (topics `iso.*`) and NATS (stream `PGFERRY`).
fn three_sinks(redis: &TestRedis, nats: &TestNats) -> String {
    format!(
        "\n[[sink]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"{}\"\ntimeout_secs = 2\n\
         [sink.tables.\"public.items\"]\nkey = \"item:{{id}}\"\nmode = \"json\"\n\
         [sink.tables.\"public.accounts\"]\nkey = \"account:{{id}}\"\nmode = \"json\"\n\
         \n[[sink]]\nname = \"bus\"\ntype = \"nats\"\nurl = \"{}\"\ntimeout_secs = 2\n{}",
        redis.url(),
        nats.url(),
        kafka_sink("iso", "iso", ""),
    )
}

/// Which stores differ from Postgres (empty: all three equal it, with no
/// duplicate on the logs). `kafka`/`nats`: whether that store can be read now.
fn behind(
    pg: &TestPg,
    redis: &TestRedis,
    nats: &TestNats,
    kafka: bool,
    read_nats: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    for (table, prefix) in [("public.items", "item"), ("public.accounts", "account")] {
        let rows = support::oracle::table_rows(pg, table);
        let mut c = redis.conn();
        let keys: Vec<String> = rows.keys().map(|id| format!("{prefix}:{id}")).collect();
        let got: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut c).unwrap();
        let cached: Vec<Option<Value>> = got
            .into_iter()
            .map(|g| g.map(|g| serde_json::from_str(&g).unwrap()))
            .collect();
        if cached
            .iter()
            .zip(rows.values())
            .any(|(c, r)| c.as_ref() != Some(r))
        {
            out.push(format!("redis {table}"));
        }
        if kafka {
            match rebuild(&read_topics("iso"), table, false) {
                Ok(r) if r == rows => {}
                Ok(_) => out.push(format!("kafka {table}")),
                Err(e) => panic!("kafka {table}: {e}"),
            }
        }
        if read_nats {
            let msgs = nats.read_stream("PGFERRY");
            let ids: HashSet<&String> = msgs.iter().map(|m| &m.id).collect();
            assert_eq!(ids.len(), msgs.len(), "a message twice on NATS");
            let events: Vec<Value> = msgs
                .iter()
                .filter(|m| m.table == table)
                .map(|m| m.value.clone())
                .collect();
            if support::oracle::replay(&events) != rows {
                out.push(format!("nats {table}"));
            }
        }
    }
    out
}

/// Waits until `behind` reports nothing, while pgferry runs.
fn wait_caught_up(what: &str, f: &FerryDir, mut behind: impl FnMut() -> Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let b = behind();
        if b.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still behind: {b:?}\n{}",
            tail(&f.log())
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(4000)..]
}

/// Ten transactions of inserts and updates on both tables, ids from `from`.
fn some_changes(pg: &TestPg, from: i32) {
    for i in from..from + 10 {
        pg.sql(&format!(
            "BEGIN; INSERT INTO items VALUES ({i}, {i} % 3, 'v{i}', {i}.5);
             UPDATE accounts SET balance = balance + {i} WHERE id = {};
             UPDATE items SET v = v || '!' WHERE id = {}; COMMIT;",
            i % 20 + 1,
            from
        ));
    }
}

#[test]
fn log_sinks_and_redis_do_not_wait_for_each_other() {
    let broker = support::kafka::broker();
    let _x = broker.exclusive();
    let pg = TestPg::start();
    pg.sql(DDL);
    let redis = TestRedis::new();
    let mut nats = TestNats::new();
    let f = FerryDir::new();
    f.write_config(&pg.url(), &TABLES, "", &three_sinks(&redis, &nats));
    let port = support::http::fix_metrics_port(&f.path("pgferry.toml"));
    let mut g = Guard(f.run());
    support::ferry::wait_active(&pg, &f, "pgferry");
    // The accounts were inserted before pgferry started: one update of
    // each brings its whole row to every sink.
    pg.sql("UPDATE accounts SET note = note || '.'");
    some_changes(&pg, 1000);
    wait_caught_up("all three at start", &f, || {
        behind(&pg, &redis, &nats, true, true)
    });

    // NATS down: Redis and Kafka keep receiving every change.
    nats.stop();
    some_changes(&pg, 2000);
    wait_caught_up("redis and kafka while nats is down", &f, || {
        behind(&pg, &redis, &nats, true, false)
    });

    // Kafka frozen (SIGSTOP: connections hang), NATS back: Redis and NATS
    // keep up, NATS replays what it missed.
    broker.pause();
    nats.start();
    some_changes(&pg, 3000);
    let t = Duration::from_secs(120);
    // /readyz names the frozen broker's sink while it cannot publish.
    let body = support::http::wait_readyz(port, 503, "sink iso", t, || tail(&f.log()).into());
    wait_caught_up("redis and nats while kafka is frozen", &f, || {
        behind(&pg, &redis, &nats, false, true)
    });
    assert!(
        g.0.try_wait().unwrap().is_none(),
        "pgferry exited while a sink's store was down:\n{}",
        tail(&f.log())
    );

    assert!(body.contains("not ready"), "{body}");

    broker.resume();
    some_changes(&pg, 4000);
    wait_caught_up("all three after both outages", &f, || {
        behind(&pg, &redis, &nats, true, true)
    });
    support::http::wait_readyz(port, 200, "\"ready\"", t, || tail(&f.log()).into());
}
