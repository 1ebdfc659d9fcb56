//! Availability under routine faults, each reproduced for real: a fast
//! restart of Postgres, a network path that hangs (our own proxy), RST
//! cuts and a slot still held by the server, a Redis that freezes
//! (SIGSTOP) or goes down while Postgres shuts down, a Redis restarted
//! empty, a full spill directory (tmpfs), SIGTERM while a sink hangs, and
//! a dropped slot. pgferry must keep running (or stop within its bound),
//! never hold Postgres, and every case ends with the full comparison:
//! the JSON-lines trace equals an independent oracle (a `test_decoding`
//! slot: nothing lost, nothing duplicated, same order), the rows rebuilt
//! from it equal `to_jsonb()` of the table, and Redis, when present,
//! holds exactly the table's rows.
//!
//! Every cluster runs with `wal_sender_timeout = 5s`.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::ferry::{terminate, wait_or_kill, FerryDir, Guard};
use support::pg::{free_port, PgOptions, TestPg};
use support::proxy::Proxy;
use support::redis::TestRedis;

/// The clusters' `wal_sender_timeout`.
const WST: Duration = Duration::from_secs(5);

const DDL: &str =
    "CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL, n int NOT NULL DEFAULT 0)";

/// One test's servers and pgferry directory.
struct Rig {
    pg: TestPg,
    f: FerryDir,
    redis: Option<TestRedis>,
    metrics: u16,
    /// Between pgferry and Postgres, or between pgferry and Redis.
    proxy: Option<Proxy>,
}

/// What a rig is made of.
#[derive(Default)]
struct Setup<'a> {
    /// pgferry reaches Postgres through the rig's proxy.
    pg_proxy: bool,
    /// A Redis sink `cache` (json mode, `item:{id}`).
    redis: bool,
    /// pgferry reaches Redis through the rig's proxy.
    redis_proxy: bool,
    /// Extra lines for the Redis sink, `[pipeline]` and the file.
    redis_extra: &'a str,
    pipeline: &'a str,
    extra: &'a str,
}

fn rig(s: Setup) -> Rig {
    let pg = TestPg::start_with(PgOptions {
        conf: format!("wal_sender_timeout = {}s\n", WST.as_secs()),
        ..Default::default()
    });
    pg.sql(DDL);
    support::oracle::create(&pg);
    let redis = s.redis.then(TestRedis::new);
    let proxy = match (s.pg_proxy, &redis) {
        (true, _) => Some(Proxy::start(pg.port)),
        (false, Some(redis)) if s.redis_proxy => Some(Proxy::start(redis.port)),
        _ => None,
    };
    let rig = Rig {
        pg,
        f: FerryDir::new(),
        redis,
        metrics: free_port(),
        proxy,
    };
    write_config(&rig, &s);
    rig
}

/// A rig with pgferry streaming and the workload running.
fn running(s: Setup) -> (Rig, Guard, Load) {
    let r = rig(s);
    let g = start(&r);
    let load = start_load(&r.pg);
    (r, g, load)
}

fn write_config(r: &Rig, s: &Setup) {
    let proxied = |on: bool| r.proxy.as_ref().filter(|_| on).map(|p| p.port);
    let pg_port = proxied(s.pg_proxy).unwrap_or(r.pg.port);
    let mut text = format!(
        "[source]\nurl = \"postgres://postgres@127.0.0.1:{pg_port}/postgres\"\nslot = \"pgferry\"\npublication = \"pgferry\"\n\
         tables = [\"public.items\"]\n\n[checkpoint]\ndir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{}\"\n\n\
         [pipeline]\n{}\n\n[[sink]]\nname = \"changes\"\ntype = \"jsonl\"\npath = \"{}\"\n",
        r.f.path("state").display(),
        r.metrics,
        s.pipeline,
        r.f.jsonl().display(),
    );
    if let Some(redis) = &r.redis {
        let port = proxied(s.redis_proxy).unwrap_or(redis.port);
        text += &format!(
            "\n[[sink]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\n{}\n\
             [sink.tables.\"public.items\"]\nkey = \"item:{{id}}\"\nmode = \"json\"\n",
            s.redis_extra
        );
    }
    text += s.extra;
    std::fs::write(r.f.path("pgferry.toml"), text).unwrap();
}

/// Starts `pgferry run` and waits until it streams.
fn start(r: &Rig) -> Guard {
    let g = Guard(r.f.run());
    wait_streaming(r, Duration::from_secs(60));
    g
}

/// `GET path` on the metrics endpoint: (status, body).
fn get(r: &Rig, path: &str) -> Option<(u16, String)> {
    support::http::get(r.metrics, path)
}

/// The value of one series (name with labels, exactly as exposed).
fn metric(r: &Rig, series: &str) -> Option<f64> {
    support::http::value(&get(r, "/metrics")?.1, series)
}

/// `/readyz` says ready and `pgferry_streaming` is 1.
fn streaming(r: &Rig) -> bool {
    metric(r, "pgferry_streaming") == Some(1.0)
}

fn wait_streaming(r: &Rig, limit: Duration) -> Duration {
    let started = Instant::now();
    while !streaming(r) {
        assert!(
            started.elapsed() < limit,
            "pgferry is not streaming after {limit:?}:\n{}",
            tail(&r.f.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The messages pgferry logged (JSON log lines), with their fields.
fn log_lines(f: &FerryDir) -> Vec<Value> {
    f.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

fn count_messages(f: &FerryDir, message: &str) -> usize {
    log_lines(f)
        .iter()
        .filter(|v| v["fields"]["message"] == message)
        .count()
}

/// A steady workload on `items` from three sessions, each on its own id
/// range: inserts, updates and deletes. The sessions reconnect when the
/// server goes away.
struct Load {
    rt: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<u32>>,
}

fn start_load(pg: &TestPg) -> Load {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = support::workload::spawn(
        pg,
        &rt,
        &stop,
        support::workload::Sessions {
            count: 3,
            seed: 0x1F2E_3D4C,
            pause: Duration::from_millis(10),
            on_error: support::workload::OnError::Reconnect,
        },
        |w| {
            let base = w as i32 * 10_000_000;
            let mut next = base;
            move |rng, _| {
                let rows = 1 + rng.below(3) as i32;
                let mut sql = format!(
                    "BEGIN; INSERT INTO items SELECT i, md5(i::text), 0 FROM generate_series({}, {}) i;",
                    next + 1,
                    next + rows
                );
                next += rows;
                let some = |r: u32| base + 1 + (r as i32 % (next - base));
                if rng.below(2) == 0 {
                    sql += &format!(
                        "UPDATE items SET n = n + 1, v = v || 'u' WHERE id = {};",
                        some(rng.below(1 << 30))
                    );
                }
                if rng.below(4) == 0 {
                    sql += &format!("DELETE FROM items WHERE id = {};", some(rng.below(1 << 30)));
                }
                sql += "COMMIT;";
                vec![sql]
            }
        },
    );
    Load { rt, stop, workers }
}

impl Load {
    fn stop(self) -> u32 {
        support::workload::stop(&self.rt, &self.stop, self.workers)
    }
}

/// The rows of `items` as the JSON-lines events leave them.
fn jsonl_rows(f: &FerryDir) -> BTreeMap<i64, Value> {
    let mut rows = BTreeMap::new();
    for e in f.events().iter().filter(|e| e["table"] == "items") {
        let id = e["key"]["id"].as_i64().unwrap();
        match e["op"].as_str().unwrap() {
            "delete" => {
                rows.remove(&id);
            }
            "truncate" => rows.clear(),
            _ => {
                rows.insert(id, e["after"].clone());
            }
        }
    }
    rows
}

/// `to_jsonb()` of every row, by id.
fn pg_rows(pg: &TestPg) -> BTreeMap<i64, Value> {
    pg.sql("SELECT to_jsonb(t) FROM items t")
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_i64().unwrap(), v)
        })
        .collect()
}

/// What differs between the rows and Redis (`item:{id}`, nothing else).
fn redis_diff(rows: &BTreeMap<i64, Value>, r: &TestRedis) -> Vec<String> {
    let mut problems = Vec::new();
    let mut c = r.conn();
    let ids: Vec<&i64> = rows.keys().collect();
    for chunk in ids.chunks(500) {
        let keys: Vec<String> = chunk.iter().map(|id| format!("item:{id}")).collect();
        let got: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut c).unwrap();
        for ((id, key), got) in chunk.iter().zip(&keys).zip(got) {
            match got.map(|g| serde_json::from_str::<Value>(&g).unwrap()) {
                None => problems.push(format!("{key} missing")),
                Some(v) if v != rows[*id] => problems.push(format!("{key}: {v} vs {}", rows[*id])),
                Some(_) => {}
            }
        }
    }
    let extra = r
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with("pgferry:"))
        .filter(|k| {
            k.strip_prefix("item:")
                .and_then(|i| i.parse::<i64>().ok())
                .is_none_or(|i| !rows.contains_key(&i))
        })
        .count();
    if extra > 0 {
        problems.push(format!("{extra} keys for rows that do not exist"));
    }
    problems
}

/// Stops the workload, writes a last row, and waits until every sink
/// holds exactly the source: the JSON-lines trace equals the oracle's
/// (nothing lost, duplicated or reordered), the rows rebuilt from it equal
/// `to_jsonb()` of the table, and Redis (when there) holds the same rows.
fn assert_equal(r: &Rig, load: Load) {
    let txns = load.stop();
    assert!(txns > 50, "the workload ran only {txns} transactions");
    r.pg.sql("INSERT INTO items VALUES (-1, 'last', 0)");
    let expected = support::oracle::read(&r.pg, "items");
    assert_eq!(expected.last().map(|t| t.2), Some(-1));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut got = support::oracle::jsonl(&r.f, "items");
    while got.len() < expected.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        got = support::oracle::jsonl(&r.f, "items");
    }
    if let Some(i) = got.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "first difference at change {i}: pgferry {:?} vs oracle {:?}\n{}",
            got[i],
            expected[i],
            tail(&r.f.log(), 40)
        );
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "changes in the JSON-lines file vs the oracle:\n{}",
        tail(&r.f.log(), 40)
    );
    let rows = pg_rows(&r.pg);
    assert_eq!(jsonl_rows(&r.f), rows, "rows rebuilt from the JSON lines");
    if let Some(redis) = &r.redis {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let problems = redis_diff(&rows, redis);
            if problems.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} rows; {} differences in Redis, e.g. {:?}\n{}",
                rows.len(),
                problems.len(),
                &problems[..problems.len().min(10)],
                tail(&r.f.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    eprintln!(
        "{txns} transactions, {} changes, {} rows: every sink equals the source",
        expected.len(),
        rows.len()
    );
}

/// Inserts row `id` and returns when it committed.
fn insert_marker(pg: &tokio_postgres::Client, rt: &tokio::runtime::Runtime, id: i32) -> Instant {
    rt.block_on(pg.batch_execute(&format!("INSERT INTO items VALUES ({id}, 'marker', 0)")))
        .unwrap();
    Instant::now()
}

/// Reads the JSON-lines file as it grows and notes when rows arrive.
struct Tail {
    path: std::path::PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    fn new(f: &FerryDir) -> Tail {
        Tail {
            path: f.jsonl(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// Ids of `items` inserts added since the last call.
    fn inserted(&mut self) -> Vec<i64> {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        file.seek(SeekFrom::Start(self.offset)).unwrap();
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).unwrap();
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let lines: Vec<u8> = self.partial.drain(..=end).collect();
        lines
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
            .filter(|e| e["op"] == "insert")
            .filter_map(|e| e["key"]["id"].as_i64())
            .collect()
    }
}

/// Finding 1: `pg_ctl restart -m fast` ended pgferry with code 1 ("unexpected
/// message 'C'"). Three restarts: the same process keeps running and
/// streams again within 5 s of the server being up.
#[test]
fn fast_restarts_keep_the_same_process_streaming() {
    let (r, mut g, load) = running(Setup::default());
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        let before = r.pg.slot_pid("pgferry");
        r.pg.restart_fast();
        let up = Instant::now();
        loop {
            let pid = r.pg.slot_pid("pgferry");
            if pid.is_some() && pid != before {
                break;
            }
            assert!(
                g.0.try_wait().unwrap().is_none(),
                "pgferry exited on a fast restart:\n{}",
                tail(&r.f.log(), 30)
            );
            assert!(
                up.elapsed() < Duration::from_secs(5),
                "round {round}: not streaming 5 s after the server was up:\n{}",
                tail(&r.f.log(), 30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "round {round}: streaming again {:?} after the server was up",
            up.elapsed()
        );
    }
    assert!(g.0.try_wait().unwrap().is_none(), "pgferry exited");
    assert!(!r.f.log().contains("unexpected message"));
    assert_equal(&r, load);
    assert!(terminate(&mut g.0).success());
}

/// Finding 3: a path that stops carrying anything (sockets open) was never
/// noticed. A hang of 3 × wal_sender_timeout: detected (`/readyz` 503,
/// `pgferry_streaming` 0) without a reconnect storm, and streaming again
/// within wal_sender_timeout + 10 s of the path coming back.
#[test]
fn a_hung_network_path_is_detected_and_streaming_resumes() {
    let (r, mut g, load) = running(Setup {
        pg_proxy: true,
        ..Default::default()
    });
    let proxy = r.proxy.as_ref().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(get(&r, "/readyz").map(|x| x.0), Some(200));

    proxy.hang();
    let hung = Instant::now();
    let before = proxy.connections();
    // Detected: not streaming, not ready.
    loop {
        let ready = get(&r, "/readyz").map(|x| x.0);
        if !streaming(&r) && ready == Some(503) {
            break;
        }
        assert!(
            hung.elapsed() < WST + Duration::from_secs(10),
            "the hang was not detected after {:?}:\n{}",
            hung.elapsed(),
            tail(&r.f.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let detected = hung.elapsed();
    while hung.elapsed() < WST * 3 {
        assert!(!streaming(&r), "streaming while the path is hung");
        std::thread::sleep(Duration::from_millis(200));
    }
    let attempts = proxy.connections() - before;
    proxy.pass();
    let back = Instant::now();
    let took = wait_streaming(&r, WST + Duration::from_secs(10));
    eprintln!(
        "hang detected after {detected:?}; {attempts} connection attempts during the {:?} hang; streaming again {took:?} after the path came back",
        WST * 3
    );
    assert!(
        attempts <= 6,
        "{attempts} connection attempts during the hang"
    );
    // And data flows: a row written now arrives.
    let c = r.rt_client();
    let mut tail_ = Tail::new(&r.f);
    let _ = tail_.inserted();
    insert_marker(&c.0, &c.1, 900_000_001);
    let deadline = back + WST + Duration::from_secs(10);
    while !tail_.inserted().contains(&900_000_001) {
        assert!(Instant::now() < deadline, "{}", tail(&r.f.log(), 30));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        r.f.log().contains("no answer from Postgres"),
        "{}",
        tail(&r.f.log(), 30)
    );
    assert_equal(&r, load);
    assert!(terminate(&mut g.0).success());
}

impl Rig {
    /// An SQL client on a runtime of its own (direct, not through a proxy).
    fn rt_client(&self) -> (tokio_postgres::Client, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let c = rt.block_on(self.pg.client());
        (c, rt)
    }
}

/// Finding 4: retry delays grew across short sessions (up to 16 s after six
/// RST cuts), "slot is active" was retried every 2–36 s, and each failed
/// attempt logged "pgferry streaming". Six RST cuts, then a cut of
/// pgferry's side only (the server keeps the slot until its
/// wal_sender_timeout): each time pgferry streams again at once, and
/// within a second of the slot being free.
#[test]
fn rst_cuts_and_a_busy_slot_are_retried_quickly() {
    let (r, mut g, load) = running(Setup {
        pg_proxy: true,
        ..Default::default()
    });
    let proxy = r.proxy.as_ref().unwrap();
    let mut delays = Vec::new();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(800));
        let before = r.pg.slot_pid("pgferry");
        proxy.cut();
        let cut = Instant::now();
        loop {
            let pid = r.pg.slot_pid("pgferry");
            if pid.is_some() && pid != before {
                break;
            }
            assert!(
                cut.elapsed() < Duration::from_secs(10),
                "{}",
                tail(&r.f.log(), 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        delays.push(cut.elapsed());
    }
    eprintln!("streaming again after each RST cut: {delays:?}");
    assert!(
        delays.iter().all(|d| *d < Duration::from_secs(3)),
        "{delays:?}"
    );

    // pgferry's side is reset; the server keeps the slot until it times out.
    std::thread::sleep(Duration::from_millis(800));
    let old = r.pg.slot_pid("pgferry").expect("streaming");
    proxy.cut_client();
    let cut = Instant::now();
    let freed = loop {
        if r.pg.slot_pid("pgferry") != Some(old) {
            break Instant::now();
        }
        assert!(cut.elapsed() < WST * 4, "the server never let the slot go");
        std::thread::sleep(Duration::from_millis(20));
    };
    loop {
        if r.pg.slot_pid("pgferry").is_some_and(|p| p != old) {
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(3),
            "not streaming 3 s after the slot was free:\n{}",
            tail(&r.f.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let again = freed.elapsed();
    eprintln!(
        "slot held {:?} after the cut; streaming again {again:?} after it was free",
        freed - cut
    );
    // Asked every 0.5 s, plus the time to connect on a loaded machine.
    assert!(again < Duration::from_millis(2500), "{again:?}");
    assert!(
        r.f.log().contains("55006"),
        "the slot was never found busy:\n{}",
        tail(&r.f.log(), 30)
    );
    // "pgferry streaming" only for sessions that really streamed: the first,
    // one per cut, one after the busy slot.
    assert_eq!(
        count_messages(&r.f, "pgferry streaming"),
        8,
        "{}",
        tail(&r.f.log(), 60)
    );
    assert_equal(&r, load);
    assert!(terminate(&mut g.0).success());
}

/// Finding 5: a frozen Redis (SIGSTOP) held the JSON-lines sink back until
/// Redis's 30 s reply timeout. With `slow_sink_detach_ms = 2000` the other
/// sink's lag stays under 4 s throughout; after SIGCONT Redis catches up.
#[test]
fn a_frozen_redis_does_not_hold_back_the_other_sink() {
    let (r, mut g, load) = running(Setup {
        redis: true,
        pipeline: "slow_sink_detach_ms = 2000",
        ..Default::default()
    });
    let redis = r.redis.as_ref().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let c = r.rt_client();
    let mut tail_ = Tail::new(&r.f);
    let _ = tail_.inserted();
    redis.pause();
    let paused = Instant::now();
    let mut lags = Vec::new();
    let mut readyz_detached = false;
    let mut k = 0;
    while paused.elapsed() < Duration::from_secs(12) {
        k += 1;
        let id = 900_000_000 + k;
        let at = insert_marker(&c.0, &c.1, id);
        loop {
            if tail_.inserted().contains(&(id as i64)) {
                break;
            }
            assert!(
                at.elapsed() < Duration::from_secs(4),
                "marker {k} is not in the JSON-lines file {:?} after its commit ({:?} into the freeze):\n{}",
                at.elapsed(),
                paused.elapsed(),
                tail(&r.f.log(), 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        lags.push(at.elapsed());
        if let Some((503, body)) = get(&r, "/readyz") {
            readyz_detached |= body.contains("detached");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    redis.resume();
    let worst = lags.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} markers during a 12 s freeze of Redis; worst JSON-lines lag {worst:?}",
        lags.len()
    );
    assert!(readyz_detached, "/readyz never said the cache was detached");
    assert!(
        r.f.log().contains("slow_sink_detach_ms"),
        "{}",
        tail(&r.f.log(), 30)
    );
    assert_equal(&r, load);
    assert!(terminate(&mut g.0).success());
}

/// Finding 2: with a sink down, `pg_ctl stop -m fast` waited 91 s (pgferry
/// kept confirming a stale position, so the walsender never finished).
/// Now the server stops within wal_sender_timeout + 10 s; afterwards
/// everything is delivered.
#[test]
fn a_sink_down_does_not_hold_up_a_fast_shutdown() {
    let (mut r, mut g, load) = running(Setup {
        redis: true,
        redis_extra: "timeout_secs = 2",
        ..Default::default()
    });
    std::thread::sleep(Duration::from_secs(2));
    r.redis.as_mut().unwrap().stop();
    std::thread::sleep(Duration::from_secs(3));
    let limit = WST + Duration::from_secs(10);
    let (stopped, took) = r.pg.stop_fast(limit.as_secs() as u32 + 5);
    eprintln!("pg_ctl stop -m fast with Redis down took {took:?}");
    assert!(
        stopped && took <= limit,
        "stop took {took:?}:\n{}",
        tail(&r.f.log(), 30)
    );
    assert!(g.0.try_wait().unwrap().is_none(), "pgferry exited");
    std::thread::sleep(Duration::from_secs(1));
    r.pg.start_server();
    r.redis.as_mut().unwrap().start();
    wait_streaming(&r, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    assert_equal(&r, load);
    assert!(terminate(&mut g.0).success());
}

/// Finding 6: a Redis restarted empty while pgferry was down went
/// unnoticed. Now the loss is found at start: with `on_data_loss = "stop"`
/// pgferry stops and says why; with `"backfill"` it logs and counts it and
/// reloads the table into Redis alone (the JSON-lines sink gets no rows
/// again), until Redis equals the source.
#[test]
fn a_redis_restarted_empty_is_refilled_by_a_backfill_into_it_alone() {
    let (mut r, mut g, load) = running(Setup {
        redis: true,
        redis_extra: "on_data_loss = \"stop\"",
        ..Default::default()
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(terminate(&mut g.0).success());
    r.redis.as_mut().unwrap().restart_empty();

    // "stop": pgferry names the sink and the loss, and exits.
    let mut stopped = r.f.run();
    let status = wait_or_kill(&mut stopped, Duration::from_secs(30)).expect("pgferry exits");
    assert!(!status.success());
    let log = r.f.log();
    assert!(
        log.contains("sink \\\"cache\\\" lost its data")
            || log.contains("sink \"cache\" lost its data"),
        "{}",
        tail(&log, 20)
    );

    write_config(
        &r,
        &Setup {
            redis: true,
            redis_extra: "on_data_loss = \"backfill\"",
            ..Default::default()
        },
    );
    let mut g = start(&r);
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&r, "pgferry_sink_data_loss_total{sink=\"cache\"}") != Some(1.0) {
        assert!(Instant::now() < deadline, "the loss was not counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    let warned = log_lines(&r.f).into_iter().any(|v| {
        v["level"] == "WARN"
            && v["fields"]["sink"] == "cache"
            && v["fields"]["lost"]
                .as_str()
                .is_some_and(|l| l.contains(":position"))
            && v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("reloading its tables into this sink alone"))
    });
    assert!(
        warned,
        "no WARN names the sink and the loss:\n{}",
        tail(&r.f.log(), 30)
    );
    assert_equal(&r, load);
    let reads = r.f.events().iter().filter(|e| e["op"] == "read").count();
    assert_eq!(reads, 0, "the JSON-lines sink was sent rows again");
    // Repaired: ready again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&r, "/readyz").map(|x| x.0) != Some(200) {
        assert!(Instant::now() < deadline, "{:?}", get(&r, "/readyz"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(terminate(&mut g.0).success());
}

/// A tmpfs mounted for the test (unmounted on drop).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0777"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill a disk for real, and needs root with CAP_SYS_ADMIN: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Finding 7: a full spill directory was reported as a bug and killed
/// pgferry. On a 16 MB tmpfs, filled up but for 200 kB, a transaction of
/// 40,000 rows (about 6 MB of spill) must spill: pgferry says "disk full" with the path, shows
/// it on `/readyz` and in `pgferry_disk_full`, retries, and recovers once
/// space is freed.
#[test]
fn a_full_spill_directory_is_retried_and_recovers() {
    let spill = tempfile::Builder::new()
        .prefix("pgferry-spill-")
        .tempdir()
        .unwrap();
    let fs = Tmpfs::mount(spill.path(), "16m");
    let filler = fs.0.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![7u8; 64 * 1024];
        let mut written = 0;
        while written < 16 * 1024 * 1024 - 200 * 1024 {
            f.write_all(&block).unwrap();
            written += block.len();
        }
        f.sync_all().unwrap();
    }
    let pipeline = format!("memory_limit_mb = 1\nspill_dir = \"{}\"", fs.0.display());
    let (r, mut g, load) = running(Setup {
        pipeline: &pipeline,
        ..Default::default()
    });
    std::thread::sleep(Duration::from_secs(1));
    r.pg.sql("INSERT INTO items SELECT i, repeat('x', 60) || i, 0 FROM generate_series(50000001, 50040000) i");
    let path = fs.0.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let full = metric(&r, &format!("pgferry_disk_full{{path=\"{path}\"}}")) == Some(1.0);
        let readyz = get(&r, "/readyz").unwrap_or_default();
        if full && readyz.0 == 503 && readyz.1.contains("disk full") && readyz.1.contains(&path) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no disk full reported:\n{readyz:?}\n{}",
            tail(&r.f.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Retried, while the process keeps running.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        g.0.try_wait().unwrap().is_none(),
        "pgferry exited:\n{}",
        tail(&r.f.log(), 30)
    );
    let log = r.f.log();
    let retries = log_lines(&r.f)
        .iter()
        .filter(|v| {
            v["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("disk full") && e.contains(&path))
        })
        .count();
    assert!(retries >= 2, "{retries} retries:\n{}", tail(&log, 30));
    assert!(!log.contains("this is a bug"), "{}", tail(&log, 30));

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&r, &format!("pgferry_disk_full{{path=\"{path}\"}}")).is_some() {
        assert!(
            Instant::now() < deadline,
            "still full:\n{}",
            tail(&r.f.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_equal(&r, load);
    assert!(terminate(&mut g.0).success());
}

/// Finding 8: SIGTERM while a sink hung took 55 s. Redis behind our proxy
/// hangs (30 s reply timeout): pgferry exits within 10 s with code 0, and
/// the next run loses nothing.
#[test]
fn sigterm_during_a_sink_hang_exits_within_ten_seconds() {
    let (r, mut g, load) = running(Setup {
        redis: true,
        redis_proxy: true,
        ..Default::default()
    });
    let proxy = r.proxy.as_ref().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    proxy.hang();
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &g.0.id().to_string()])
        .status();
    let status = wait_or_kill(&mut g.0, Duration::from_secs(30)).expect("pgferry exits");
    let took = t.elapsed();
    eprintln!("SIGTERM with Redis hung: exit {status} after {took:?}");
    assert!(status.success(), "{}", tail(&r.f.log(), 30));
    assert!(
        took <= Duration::from_secs(10),
        "{took:?}:\n{}",
        tail(&r.f.log(), 30)
    );
    proxy.pass();
    let mut g = start(&r);
    std::thread::sleep(Duration::from_secs(2));
    assert_equal(&r, load);
    assert!(terminate(&mut g.0).success());
}

/// Finding 9: `create_slot = true` after the slot was dropped created a new
/// slot, then stopped with the gap error; the orphan slot held WAL. Now
/// the gap is found first and no slot is created. The documented way out
/// (remove the checkpoints, load the table again) then gives the source.
#[test]
fn a_dropped_slot_is_not_created_again_over_the_gap() {
    let (r, mut g, load) = running(Setup::default());
    std::thread::sleep(Duration::from_secs(2));
    assert!(terminate(&mut g.0).success());
    r.pg.sql("SELECT pg_drop_replication_slot('pgferry')");
    std::thread::sleep(Duration::from_millis(500));

    let mut again = r.f.run();
    let status = wait_or_kill(&mut again, Duration::from_secs(30)).expect("pgferry exits");
    assert!(!status.success());
    assert!(
        r.f.log().contains("changes were lost"),
        "{}",
        tail(&r.f.log(), 20)
    );
    let slots =
        r.pg.sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgferry'");
    assert_eq!(slots.trim(), "0", "an orphan slot was left behind");

    // The way out the message gives: start afresh with the initial snapshot.
    let txns = load.stop();
    std::fs::remove_dir_all(r.f.path("state")).unwrap();
    std::fs::remove_file(r.f.jsonl()).unwrap();
    write_config(
        &r,
        &Setup {
            extra: "",
            ..Default::default()
        },
    );
    let text = std::fs::read_to_string(r.f.path("pgferry.toml"))
        .unwrap()
        .replace(
            "tables = [\"public.items\"]\n",
            "tables = [\"public.items\"]\nsnapshot = \"initial\"\n",
        );
    std::fs::write(r.f.path("pgferry.toml"), text).unwrap();
    let mut g = start(&r);
    let rows = pg_rows(&r.pg);
    let deadline = Instant::now() + Duration::from_secs(60);
    while jsonl_rows(&r.f) != rows {
        assert!(Instant::now() < deadline, "{}", tail(&r.f.log(), 20));
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{txns} transactions; {} rows reloaded", rows.len());
    assert!(terminate(&mut g.0).success());
}
