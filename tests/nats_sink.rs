//! The NATS JetStream sink against Debian's real `nats-server -js`: a
//! concurrent workload with kill -9s of pgferry and faults of the server
//! (a SIGKILL and restart, a SIGSTOP), after which the whole stream is read
//! back, the tables are rebuilt from it and compared with `to_jsonb()`:
//! nothing lost, nothing duplicated (every position once, in order), every
//! key's changes in commit order.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::ferry::{kill9, terminate, FerryDir, Guard};
use support::nats::{Msg, TestNats};
use support::pg::TestPg;

const TABLES: [&str; 2] = ["public.items", "public.other"];

fn setup(pg: &TestPg, n: &TestNats, format: &str, extra_source: &str) -> FerryDir {
    pg.sql(
        "CREATE TABLE items (id int PRIMARY KEY, grp int, v text, amount numeric, doc jsonb);
         CREATE TABLE other (id int PRIMARY KEY, v text);",
    );
    let f = FerryDir::new();
    let sink = format!(
        "\n[[sink]]\nname = \"bus\"\ntype = \"nats\"\nurl = \"{}\"\nformat = \"{format}\"\n\
         timeout_secs = 2\nmax_in_flight = 64\n[sink.tables.\"public.items\"]\n\
         [sink.tables.\"public.other\"]\nsubject = \"side.other\"\n",
        n.url()
    );
    f.write_config(&pg.url(), &TABLES, extra_source, &sink);
    f
}

/// Three sessions: inserts, updates, deletes, key changes and a few
/// truncate-free multi-row transactions, on both tables.
fn workload(
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
            seed: 0x5EED_0016,
            pause: Duration::from_millis(5),
            on_error: support::workload::OnError::Rollback,
        },
        |w| {
            let base = (w as i32 + 1) * 1_000_000;
            let mut next = base;
            move |rng, _| {
                let mut rnd = |n: u32| rng.below(n) as i32;
                let rows = if rnd(40) == 0 { 300 } else { 1 + rnd(4) };
                let mut sql = format!(
                    "BEGIN; INSERT INTO items SELECT i, i % 7, 'v' || i, i * 1.25, \
                     jsonb_build_object('i', i, 'w', {w}) FROM generate_series({}, {}) i;",
                    next + 1,
                    next + rows
                );
                next += rows;
                let some = |r: i32| base + 1 + r;
                let span = next - base;
                sql += &format!(
                    "UPDATE items SET v = v || 'u', amount = amount + 0.01 WHERE id = {};",
                    some(rnd(span as u32))
                );
                if rnd(3) == 0 {
                    sql += &format!("DELETE FROM items WHERE id = {};", some(rnd(span as u32)));
                }
                if rnd(5) == 0 {
                    // A key change: delete of the old key + insert of the new one.
                    let id = some(rnd(span as u32));
                    sql += &format!(
                        "UPDATE items SET id = id + 500000 WHERE id = {id} AND id < {};",
                        base + 500_000
                    );
                }
                if rnd(4) == 0 {
                    let o = rnd(50);
                    sql += &format!(
                        "INSERT INTO other VALUES ({}, 'o') ON CONFLICT (id) DO UPDATE SET v = other.v || 'x';",
                        w as i32 * 100 + o
                    );
                }
                sql += "COMMIT;";
                vec![sql]
            }
        },
    )
}

/// The position `(commit_lsn, index)` of a `slot:X/Y:index` message id.
fn position(id: &str) -> (u64, u64) {
    let mut parts = id.split(':');
    assert_eq!(parts.next(), Some("pgferry"), "{id}");
    let (hi, lo) = parts.next().unwrap().split_once('/').unwrap();
    let lsn = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    (lsn, parts.next().unwrap().parse().unwrap())
}

/// Zero duplicates and order: positions strictly increase along the stream
/// (one publisher, so every key's changes are in commit order too).
fn check_positions(msgs: &[Msg]) {
    let mut seen = BTreeSet::new();
    let mut last = (0, 0);
    for (i, m) in msgs.iter().enumerate() {
        let p = position(&m.id);
        assert!(seen.insert(p), "message {i} ({}) is a duplicate", m.id);
        assert!(
            p > last,
            "message {i} ({}) comes after {last:?}: out of order",
            m.id
        );
        last = p;
    }
}

/// The table rebuilt from its messages: `pgferry` events or Debezium envelopes.
fn rebuild(msgs: &[Msg], table: &str, debezium: bool) -> BTreeMap<String, Value> {
    let mut rows = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.table == table) {
        let v = &m.value;
        if debezium {
            assert_eq!(v["source"]["connector"], "postgresql");
            assert_eq!(v["source"]["table"], table.split('.').nth(1).unwrap());
            let key: Value = serde_json::from_str(m.key.as_deref().unwrap_or("null")).unwrap();
            match v["op"].as_str().unwrap() {
                "c" | "u" | "r" => {
                    assert_eq!(key["id"], v["after"]["id"], "the key is the row's id");
                    rows.insert(v["after"]["id"].to_string(), v["after"].clone());
                }
                "d" => {
                    rows.remove(&v["before"]["id"].to_string());
                }
                "t" => rows.clear(),
                op => panic!("unexpected op {op}"),
            }
        } else {
            match v["op"].as_str().unwrap() {
                "read" | "insert" | "update" => {
                    assert!(
                        v["before"].is_null() || v["before"]["id"] == v["after"]["id"],
                        "a key change is a delete and an insert: {v}"
                    );
                    rows.insert(v["after"]["id"].to_string(), v["after"].clone());
                }
                "delete" => {
                    rows.remove(&v["key"]["id"].to_string());
                }
                "truncate" => rows.clear(),
                op => panic!("unexpected op {op}"),
            }
        }
    }
    rows
}

/// Waits until the stream rebuilds both tables as Postgres holds them, then
/// checks positions and subjects.
fn compare_until_equal(pg: &TestPg, n: &TestNats, f: &FerryDir, debezium: bool) -> Vec<Msg> {
    let expected: Vec<BTreeMap<String, Value>> = ["items", "other"]
        .iter()
        .map(|t| support::oracle::table_rows(pg, t))
        .collect();
    let msgs = support::progress::wait_for(
        Duration::from_secs(120),
        || {
            let msgs = n.read_stream("PGFERRY");
            let diff: usize = TABLES
                .iter()
                .zip(&expected)
                .map(|(t, e)| {
                    let got = rebuild(&msgs, t, debezium);
                    e.iter().filter(|(k, v)| got.get(*k) != Some(v)).count()
                        + got.keys().filter(|k| !e.contains_key(*k)).count()
                })
                .sum();
            if diff == 0 {
                Ok(msgs)
            } else {
                Err((msgs.len(), diff))
            }
        },
        || format!("the stream never matched Postgres\n{}", f.log()),
    );
    check_positions(&msgs);
    for m in &msgs {
        let want = if m.table == "public.other" {
            "side.other"
        } else {
            "pgferry.public.items"
        };
        assert_eq!(m.subject, want);
    }
    msgs
}

#[test]
fn kill9_of_pgferry_and_a_server_crash_lose_and_duplicate_nothing() {
    let pg = TestPg::start();
    let mut n = TestNats::new();
    let f = setup(&pg, &n, "pgferry", "");
    let mut g = support::ferry::start_streaming(&pg, &f);
    let stop = Arc::new(AtomicBool::new(false));
    let rt = support::workload::runtime();
    let workers = workload(&pg, &rt, &stop);
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(1200 + 700 * round));
        if round == 2 {
            // The server crashes and comes back with its store.
            n.kill();
            std::thread::sleep(Duration::from_secs(3));
            n.start();
            continue;
        }
        kill9(&mut g.0);
        g = Guard(f.run());
    }
    std::thread::sleep(Duration::from_secs(2));
    let txns = support::workload::stop(&rt, &stop, workers);
    assert!(txns > 100, "the workload ran only {txns} transactions");
    let msgs = compare_until_equal(&pg, &n, &f, false);
    assert!(terminate(&mut g.0).success(), "{}", f.log());
    let log = f.log();
    assert!(
        log.contains("sink batch failed; retrying"),
        "the server's crash was noticed:\n{log}"
    );
    assert!(log.contains("position read back from the stream"), "{log}");
    eprintln!("{txns} transactions, {} messages", msgs.len());
}

#[test]
fn debezium_format_rides_out_a_frozen_server() {
    let pg = TestPg::start();
    let n = TestNats::new();
    // Rows from before the start come as snapshot reads (`r`).
    let f = setup(&pg, &n, "debezium", "snapshot = \"initial\"");
    let port = support::http::fix_metrics_port(&f.path("pgferry.toml"));
    pg.sql("INSERT INTO items SELECT i, 0, 'snap', 1, NULL FROM generate_series(1, 20) i");
    let mut g = support::ferry::start_streaming(&pg, &f);
    let stop = Arc::new(AtomicBool::new(false));
    let rt = support::workload::runtime();
    let workers = workload(&pg, &rt, &stop);
    std::thread::sleep(Duration::from_secs(2));
    n.pause();
    // While the server is frozen, /readyz says the sink is not healthy.
    let frozen = std::time::Instant::now();
    let t = Duration::from_secs(120);
    let body = support::http::wait_readyz(port, 503, "sink bus", t, || f.log());
    assert!(body.contains("not ready"), "{body}");
    std::thread::sleep(Duration::from_secs(6).saturating_sub(frozen.elapsed()));
    n.resume();
    std::thread::sleep(Duration::from_secs(2));
    support::workload::stop(&rt, &stop, workers);
    pg.sql("TRUNCATE other");
    let msgs = compare_until_equal(&pg, &n, &f, true);
    // ... and ready again once it is back and caught up.
    support::http::wait_readyz(port, 200, "\"ready\"", t, || f.log());
    assert!(terminate(&mut g.0).success(), "{}", f.log());
    assert!(
        f.log().contains("sink batch failed; retrying"),
        "the freeze was noticed:\n{}",
        f.log()
    );
    assert!(
        msgs.iter().any(|m| m.value["op"] == "t"),
        "the truncate was published"
    );
    assert_eq!(
        msgs.iter().filter(|m| m.value["op"] == "r").count(),
        20,
        "the snapshot's reads"
    );
}

#[test]
fn an_oversized_message_and_a_denied_subject_stop_pgferry_with_the_fix() {
    let pg = TestPg::start();
    let n = TestNats::with_config(
        "max_payload: 4096\nauthorization {\n  users = [\n    {user: pgferry, password: \"secret-pw\", \
         permissions: {publish: {deny: [\"pgferry.public.secret\"]}}}\n  ]\n}\n",
    );
    pg.sql("CREATE TABLE big (id int PRIMARY KEY, body text); CREATE TABLE secret (id int PRIMARY KEY);");
    let cases = [
        (
            "p1",
            "public.big",
            "INSERT INTO big VALUES (1, repeat('x', 10000))",
            "max_payload in nats-server's config",
        ),
        (
            "p2",
            "public.secret",
            "INSERT INTO secret VALUES (1)",
            "refused to let pgferry publish",
        ),
    ];
    for (slot, table, change, fix) in cases {
        let f = FerryDir::new();
        let sink = format!(
            "\n[[sink]]\nname = \"bus\"\ntype = \"nats\"\nurl = \"{}\"\nuser = \"pgferry\"\n\
             password = \"secret-pw\"\ntimeout_secs = 2\n",
            n.url()
        );
        f.write_config_slot(&pg.url(), slot, &[table], "", &sink);
        let mut g = Guard(f.run());
        support::ferry::wait_active(&pg, &f, slot);
        pg.sql(change);
        let st = support::ferry::wait_or_kill(&mut g.0, Duration::from_secs(90))
            .unwrap_or_else(|| panic!("pgferry kept running:\n{}", f.log()));
        let log = f.log();
        assert!(!st.success(), "{log}");
        assert!(log.contains(fix), "{table}: no {fix:?} in:\n{log}");
        assert!(
            !log.contains("secret-pw"),
            "the password reached the log:\n{log}"
        );
    }
}

/// Publishes ten inserts through a pgferry whose NATS sink connects to `url`
/// with `keys` (auth/TLS lines of the sink), reads them back with `reader`,
/// and checks that none of `secrets` reached pgferry's log.
fn publish_with(
    pg: &TestPg,
    slot: &str,
    url: &str,
    keys: &str,
    reader: impl Fn() -> async_nats::ConnectOptions,
    secrets: &[&str],
) {
    let f = FerryDir::new();
    let sink = format!(
        "\n[[sink]]\nname = \"bus\"\ntype = \"nats\"\nurl = \"{url}\"\nstream = \"AUTH\"\n\
         timeout_secs = 5\n{keys}\n"
    );
    f.write_config_slot(&pg.url(), slot, &["public.items"], "", &sink);
    let mut g = Guard(f.run());
    support::ferry::wait_active(pg, &f, slot);
    pg.sql("INSERT INTO items SELECT i, 0, 'v' || i, i, NULL FROM generate_series(1, 10) i");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let msgs = loop {
        let stream_exists = f.log().contains("created the JetStream stream");
        if stream_exists {
            let msgs = support::nats::read_stream_as(url, &reader, "AUTH");
            if msgs.len() >= 10 {
                break msgs;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{slot}: the ten inserts never reached the stream:\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let ids: BTreeSet<i64> = msgs
        .iter()
        .map(|m| m.value["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=10).collect(), "{slot}: {msgs:?}");
    assert_eq!(msgs.len(), 10, "{slot}: no duplicates");
    assert!(terminate(&mut g.0).success(), "{}", f.log());
    let log = f.log();
    for s in secrets {
        assert!(
            !log.contains(s),
            "{slot}: a secret ({s:.6}…) reached the log:\n{log}"
        );
    }
    pg.sql("DELETE FROM items");
}

/// A token, an NKey seed file, a `.creds` file (operator mode: JWTs signed
/// with NKeys, made here as `nsc` would) and `tls://` with a CA file, each
/// against a real nats-server that demands it: the changes arrive, and no
/// secret reaches pgferry's log.
#[test]
fn token_nkey_creds_and_tls_each_publish_and_keep_their_secrets() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE items (id int PRIMARY KEY, grp int, v text, amount numeric, doc jsonb)");
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);

    let token = "tok-0f1e2d3c4b5a";
    let n = TestNats::with_config(&format!("authorization {{ token: \"{token}\" }}\n"));
    let t = token.to_string();
    publish_with(
        &pg,
        "tok",
        &n.url(),
        &format!("token = \"{token}\""),
        || async_nats::ConnectOptions::new().token(t.clone()),
        &[token],
    );
    drop(n);

    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    std::fs::write(path("user.nk"), format!("{seed}\n")).unwrap();
    let n = TestNats::with_config(&format!(
        "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
        user.public_key()
    ));
    let s = seed.clone();
    publish_with(
        &pg,
        "nk",
        &n.url(),
        &format!("nkey_seed_file = {:?}", path("user.nk")),
        || async_nats::ConnectOptions::new().nkey(s.clone()),
        &[&seed],
    );
    drop(n);

    let (conf, creds) = support::nats::operator_mode();
    std::fs::write(path("user.creds"), &creds).unwrap();
    let creds_seed = creds
        .lines()
        .find(|l| l.starts_with("SU"))
        .unwrap()
        .to_string();
    let n = TestNats::with_config(&conf);
    let c = creds.clone();
    publish_with(
        &pg,
        "creds",
        &n.url(),
        &format!("credentials_file = {:?}", path("user.creds")),
        || async_nats::ConnectOptions::with_credentials(&c).unwrap(),
        &[&creds_seed],
    );
    drop(n);

    support::pg::make_certs(dir.path());
    let n = TestNats::with_config(&format!(
        "tls {{ cert_file: {:?}, key_file: {:?} }}\nauthorization {{ user: pgferry, password: \"pw-9a8b7c6d\" }}\n",
        path("server.pem"), path("server.key")
    ));
    let url = format!("tls://127.0.0.1:{}", n.port);
    let ca = path("ca.pem");
    publish_with(
        &pg,
        "tls",
        &url,
        &format!("tls_ca_file = {ca:?}\nuser = \"pgferry\"\npassword = \"pw-9a8b7c6d\""),
        || {
            async_nats::ConnectOptions::new()
                .require_tls(true)
                .add_root_certificates(ca.clone())
                .user_and_password("pgferry".into(), "pw-9a8b7c6d".into())
        },
        &["pw-9a8b7c6d"],
    );
}
