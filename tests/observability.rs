//! Observability end to end: the real binary's `/metrics`, `/healthz` and
//! `/readyz` while a workload runs, a sink that goes down and comes back,
//! and the heartbeat that moves the slot when only unpublished tables are
//! written.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::ferry::{FerryDir, Guard};
use support::http::{get, value};
use support::pg::{free_port, TestPg};
use support::redis::TestRedis;

const T: Duration = Duration::from_secs(30);

fn scrape(port: u16) -> String {
    let (status, body) = get(port, "/metrics").expect("scrape /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Scrapes until `ok` holds for the exposition, or panics with it.
fn wait_metrics(port: u16, f: &FerryDir, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + T;
    loop {
        let text = get(port, "/metrics").map(|r| r.1).unwrap_or_default();
        if ok(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}\n--- pgferry log ---\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `/readyz` answers `status`; returns its JSON body.
fn wait_ready(port: u16, f: &FerryDir, status: u16) -> Value {
    let deadline = Instant::now() + T;
    loop {
        if let Some((s, body)) = get(port, "/readyz") {
            if s == status {
                return serde_json::from_str(&body).expect("readyz body is JSON");
            }
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {status}: {:?}\n--- pgferry log ---\n{}",
            get(port, "/readyz"),
            f.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn observability(port: u16, heartbeat_secs: u64) -> String {
    format!(
        "\n[metrics]\nlisten = \"127.0.0.1:{port}\"\npoll_interval_secs = 1\nprogress_log_secs = 1\n\n\
         [heartbeat]\ninterval_secs = {heartbeat_secs}\n"
    )
}

fn lsn(s: String) -> pgferry::lsn::Lsn {
    s.trim().parse().unwrap()
}

fn confirmed_flush(pg: &TestPg) -> pgferry::lsn::Lsn {
    lsn(pg.sql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name='pgferry'"))
}

#[test]
fn metrics_move_as_a_workload_runs() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE products (id int PRIMARY KEY, name text)");
    let f = FerryDir::new();
    let port = free_port();
    f.write_config(
        &pg.url(),
        &["public.products"],
        "",
        &observability(port, 60),
    );
    let _g = support::ferry::start_streaming(&pg, &f);
    let (status, body) = get(port, "/healthz").expect("/healthz answers");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "alive"
    );
    let before = scrape(port);
    let bytes_before = value(&before, "pgferry_bytes_received_total").unwrap();
    let txns_before = value(&before, "pgferry_transactions_total").unwrap();

    // 200 inserts, 50 updates, 10 deletes, then 20 one-row transactions: 280 events, 23 transactions.
    pg.sql("INSERT INTO products SELECT g, 'p' || g FROM generate_series(1, 200) g");
    pg.sql("UPDATE products SET name = name || '!' WHERE id <= 50");
    pg.sql("DELETE FROM products WHERE id > 190");
    for i in 0..20 {
        pg.sql(&format!("INSERT INTO products VALUES ({}, 'x')", 1000 + i));
    }
    let end = lsn(pg.sql("SELECT pg_current_wal_lsn()"));
    f.wait_events(280, T);

    let text = wait_metrics(
        port,
        &f,
        "280 applied events and the slot confirmed past the workload",
        |t| {
            value(
                t,
                "pgferry_events_applied_total{sink=\"changes\",table=\"public.products\"}",
            )
            .is_some_and(|v| v >= 280.0)
                && value(t, "pgferry_lsn{kind=\"confirmed\"}").is_some_and(|v| v >= end.0 as f64)
        },
    );
    let received = value(
        &text,
        "pgferry_events_received_total{table=\"public.products\"}",
    )
    .unwrap();
    assert!(received >= 280.0, "{text}");
    assert!(
        value(&text, "pgferry_transactions_total").unwrap() - txns_before >= 23.0,
        "{text}"
    );
    assert!(
        value(&text, "pgferry_bytes_received_total").unwrap() - bytes_before >= 280.0 * 20.0,
        "{text}"
    );
    // Positions: everything received is checkpointed and confirmed.
    let received_lsn = value(&text, "pgferry_lsn{kind=\"received\"}").unwrap();
    let checkpointed = value(&text, "pgferry_lsn{kind=\"checkpointed\"}").unwrap();
    assert!(
        received_lsn >= end.0 as f64 && checkpointed >= end.0 as f64,
        "{text}"
    );
    assert!(value(&text, "pgferry_lsn{kind=\"server\"}").unwrap() >= end.0 as f64);
    assert!(
        value(&text, "pgferry_sink_checkpoint_lsn{sink=\"changes\"}").unwrap() >= end.0 as f64,
        "{text}"
    );
    // Lag: series present; caught up, so no time lag.
    let lag_bytes = value(&text, "pgferry_replication_lag_bytes").expect("lag bytes");
    assert!(lag_bytes >= 0.0);
    assert_eq!(
        value(&text, "pgferry_replication_lag_seconds"),
        Some(0.0),
        "{text}"
    );
    // Sink batches were timed.
    let batches = value(&text, "pgferry_sink_batch_seconds_count{sink=\"changes\"}").unwrap();
    assert!(batches > 0.0, "{text}");
    assert_eq!(
        value(
            &text,
            "pgferry_sink_batch_seconds_bucket{le=\"+Inf\",sink=\"changes\"}"
        ),
        Some(batches)
    );
    assert_eq!(
        value(&text, "pgferry_sink_errors_total{sink=\"changes\"}"),
        Some(0.0)
    );
    // The slot.
    assert!(
        value(&text, "pgferry_slot_retained_wal_bytes").unwrap() > 0.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "pgferry_slot_wal_status{status=\"reserved\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "pgferry_slot_retained_wal_over_threshold"),
        Some(0.0)
    );
    assert_eq!(value(&text, "pgferry_streaming"), Some(1.0));
    // Progress lines in the log.
    let deadline = Instant::now() + T;
    while !f.log().contains("events_per_sec") {
        assert!(Instant::now() < deadline, "no progress line:\n{}", f.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The start-up line names the version, slot, start position and sinks.
    let log = f.log();
    let start = log
        .lines()
        .find(|l| l.contains("pgferry streaming"))
        .expect("start-up line");
    for want in ["version", "slot", "start", "changes"] {
        assert!(start.contains(want), "{start}");
    }
}

#[test]
fn readyz_turns_unhealthy_while_the_redis_sink_is_down_and_recovers() {
    let pg = TestPg::start();
    let mut r = TestRedis::new();
    pg.sql("CREATE TABLE products (id int PRIMARY KEY, name text)");
    let f = FerryDir::new();
    let port = free_port();
    let extra = format!(
        "{}\n[[sink]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"{}\"\ntimeout_secs = 2\n\
         [sink.tables.\"public.products\"]\nkey = \"product:{{id}}\"\nmode = \"json\"\n",
        observability(port, 60),
        r.url()
    );
    f.write_config(&pg.url(), &["public.products"], "", &extra);
    let _g = support::ferry::start_streaming(&pg, &f);
    pg.sql("INSERT INTO products VALUES (1, 'pen')");
    let deadline = Instant::now() + T;
    while !r.keys().contains(&"product:1".to_string()) {
        assert!(Instant::now() < deadline, "{}", f.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let ready = wait_ready(port, &f, 200);
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["sinks"]["cache"]["state"], "ok", "{ready}");

    // Redis goes away; a change for it makes the sink fail and retry.
    r.stop();
    pg.sql("INSERT INTO products VALUES (2, 'ink')");
    let down = wait_ready(port, &f, 503);
    assert_eq!(down["status"], "not ready", "{down}");
    let reasons: Vec<&str> = down["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("sink cache is failing")),
        "{down}"
    );
    assert!(
        ["failing", "detached"].contains(&down["sinks"]["cache"]["state"].as_str().unwrap()),
        "{down}"
    );
    assert_eq!(down["sinks"]["changes"]["state"], "ok", "{down}");
    let text = wait_metrics(port, &f, "sink retries", |t| {
        value(t, "pgferry_sink_retries_total{sink=\"cache\"}").is_some_and(|v| v >= 1.0)
    });
    assert!(value(&text, "pgferry_sink_errors_total{sink=\"cache\"}").unwrap() >= 1.0);
    assert_eq!(
        value(&text, "pgferry_sink_healthy{sink=\"cache\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "pgferry_sink_healthy{sink=\"changes\"}"),
        Some(1.0),
        "{text}"
    );

    // Back: the sink catches up and pgferry is ready again.
    r.start();
    let deadline = Instant::now() + T;
    while !r.keys().contains(&"product:2".to_string()) {
        assert!(Instant::now() < deadline, "{}", f.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let again = wait_ready(port, &f, 200);
    assert_eq!(again["sinks"]["cache"]["state"], "ok", "{again}");
}

#[test]
fn the_heartbeat_advances_the_slot_while_only_unpublished_tables_are_written() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE published (id int PRIMARY KEY); CREATE TABLE other (id int PRIMARY KEY);");
    let f = FerryDir::new();
    let port = free_port();
    f.write_config(
        &pg.url(),
        &["public.published"],
        "",
        &observability(port, 1),
    );
    let _g = support::ferry::start_streaming(&pg, &f);
    let first = confirmed_flush(&pg);
    let before = scrape(port);
    let beats_before = value(&before, "pgferry_heartbeats_total").unwrap();
    let txns_before = value(&before, "pgferry_transactions_total").unwrap();

    for i in 0..15 {
        pg.sql(&format!("INSERT INTO other VALUES ({i})"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let end = lsn(pg.sql("SELECT pg_current_wal_lsn()"));
    let text = wait_metrics(port, &f, "heartbeats and the slot past the writes", |t| {
        value(t, "pgferry_heartbeats_total").is_some_and(|v| v >= beats_before + 2.0)
            && value(t, "pgferry_lsn{kind=\"confirmed\"}").is_some_and(|v| v >= end.0 as f64)
    });
    let confirmed = confirmed_flush(&pg);
    assert!(
        confirmed >= end && confirmed > first,
        "{confirmed} {end} {first}"
    );
    // The heartbeats arrived through the stream as transactions without
    // changes (PostgreSQL 15+ does not send the empty transactions of the
    // unpublished writes), and no sink wrote anything for them.
    assert!(
        value(&text, "pgferry_transactions_total").unwrap() - txns_before >= 2.0,
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "pgferry_events_received_total{table=\"public.published\"}"
        ),
        None,
        "{text}"
    );
    assert_eq!(value(&text, "pgferry_heartbeat_errors_total"), Some(0.0));

    // Nothing written at all: the slot still follows the heartbeats' WAL.
    let quiet = lsn(pg.sql("SELECT pg_current_wal_lsn()"));
    std::thread::sleep(Duration::from_millis(2500));
    let deadline = Instant::now() + T;
    loop {
        let c = confirmed_flush(&pg);
        if c > quiet {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot stayed at {c} while idle (heartbeats should move it)\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(f.events().is_empty(), "{:?}", f.events());
}

#[test]
fn a_heartbeat_without_permission_warns_with_the_grant_and_streaming_goes_on() {
    // A locked-down server: the function is not executable by everyone.
    let pg = TestPg::start();
    pg.sql(
        "CREATE ROLE app LOGIN REPLICATION; \
         CREATE TABLE products (id int PRIMARY KEY); ALTER TABLE products OWNER TO app; \
         GRANT CREATE ON DATABASE postgres TO app; \
         REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC;",
    );
    let f = FerryDir::new();
    let port = free_port();
    f.write_config(
        &pg.url_for("app", "postgres"),
        &["public.products"],
        "",
        &observability(port, 1),
    );
    // `check` says so beforehand, as a warning.
    let out = f.command(&["check"], &[]);
    assert!(
        out.stdout
            .contains("WARN heartbeat: pg_logical_emit_message is not allowed")
            && out.stdout.contains(
                "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO app;"
            ),
        "{out:?}"
    );
    assert!(!out.stdout.contains("FAIL heartbeat"), "{out:?}");
    let g = Guard(f.run());
    support::ferry::wait_active(&pg, &f, "pgferry");
    let deadline = Instant::now() + T;
    while !f
        .log()
        .contains("GRANT EXECUTE ON FUNCTION pg_logical_emit_message")
    {
        assert!(Instant::now() < deadline, "no GRANT advice:\n{}", f.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    pg.sql("INSERT INTO products VALUES (1)");
    f.wait_events(1, T);
    let text = scrape(port);
    assert!(value(&text, "pgferry_heartbeat_errors_total").unwrap() >= 1.0);
    assert_eq!(value(&text, "pgferry_heartbeats_total"), Some(0.0));
    // One warning, not one per attempt.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        f.log()
            .matches("GRANT EXECUTE ON FUNCTION pg_logical_emit_message")
            .count(),
        1,
        "{}",
        f.log()
    );
    drop(g);
}

#[test]
fn a_taken_metrics_address_is_a_clear_start_up_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let pg = TestPg::start();
    pg.sql("CREATE TABLE products (id int PRIMARY KEY)");
    let f = FerryDir::new();
    f.write_config(
        &pg.url(),
        &["public.products"],
        "",
        &observability(port, 10),
    );
    let out = f.command(&["run"], &[]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("metrics.listen") && out.stderr.contains(&port.to_string()),
        "{}",
        out.stderr
    );
    let out = f.command(&["check"], &[]);
    assert!(!out.status.success());
    assert!(
        out.stdout.contains(&format!(
            "FAIL cannot listen on metrics.listen 127.0.0.1:{port}"
        )),
        "{out:?}"
    );
}

#[test]
fn retained_wal_warns_then_a_lost_slot_stops_pgferry_with_the_recovery_steps() {
    let pg = TestPg::start_with(support::pg::PgOptions {
        conf: "max_slot_wal_keep_size = '32MB'\nwal_keep_size = 0\n".into(),
        hba: None,
        ssl: false,
    });
    let mut r = TestRedis::new();
    pg.sql("CREATE TABLE products (id int PRIMARY KEY); CREATE TABLE other (id int, pad text);");
    let f = FerryDir::new();
    let port = free_port();
    let extra = format!(
        "\n[metrics]\nlisten = \"127.0.0.1:{port}\"\npoll_interval_secs = 1\nwal_warn_bytes = 4194304\n\n\
         [[sink]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"{}\"\ntimeout_secs = 2\n\
         [sink.tables.\"public.products\"]\nkey = \"product:{{id}}\"\nmode = \"json\"\n",
        r.url()
    );
    f.write_config(&pg.url(), &["public.products"], "", &extra);
    let mut g = support::ferry::start_streaming(&pg, &f);
    pg.sql("INSERT INTO products VALUES (1)");
    f.wait_events(1, T);
    wait_ready(port, &f, 200);

    // The Redis sink fails, so the slot holds the WAL from its checkpoint on.
    r.stop();
    pg.sql("INSERT INTO products VALUES (2)");
    pg.sql("INSERT INTO other SELECT g, repeat('x', 200) FROM generate_series(1, 40000) g");
    let deadline = Instant::now() + T;
    let body = loop {
        let (status, body) = get(port, "/readyz").unwrap_or_default();
        if body.contains("above warning threshold 4.0 MiB (metrics.wal_warn_bytes)") {
            assert_eq!(status, 503);
            break serde_json::from_str::<Value>(&body).unwrap();
        }
        assert!(Instant::now() < deadline, "{body}\n{}", f.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(body["status"], "not ready");
    let text = scrape(port);
    assert_eq!(
        value(&text, "pgferry_slot_retained_wal_over_threshold"),
        Some(1.0),
        "{text}"
    );
    assert!(value(&text, "pgferry_slot_retained_wal_bytes").unwrap() > 4194304.0);
    let deadline = Instant::now() + T;
    while !f
        .log()
        .contains("the slot retains more WAL than metrics.wal_warn_bytes")
    {
        assert!(Instant::now() < deadline, "no WAL warning:\n{}", f.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    // Far past max_slot_wal_keep_size: the server invalidates the slot.
    for _ in 0..4 {
        pg.sql("INSERT INTO other SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g");
        pg.sql("SELECT pg_switch_wal()");
    }
    // The checkpoint invalidates the slot; one that runs while the walsender
    // is still being terminated can leave it for the next checkpoint.
    let wal_status =
        || pg.sql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'pgferry'");
    let deadline = Instant::now() + T;
    loop {
        pg.sql("SELECT pg_switch_wal()");
        pg.sql("CHECKPOINT");
        if wal_status().trim() == "lost" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server never invalidated the slot: {}\n{}",
            wal_status(),
            pg.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = support::ferry::wait_or_kill(&mut g.0, T).expect("pgferry stops");
    assert!(!status.success());
    // JSON lines: quotes in messages are escaped.
    let log = f.log().replace("\\\"", "\"");
    for want in [
        "wal_status = lost",
        "pgferry slot drop",
        "remove the checkpoint files",
        "source.snapshot = \"initial\"",
    ] {
        assert!(log.contains(want), "missing {want:?}:\n{log}");
    }
}

#[test]
fn the_log_format_can_be_set_in_the_config_and_the_option_overrides_it() {
    let f = FerryDir::new();
    // A server that is not there: `slot status` fails and logs the error.
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    f.write_config(&url, &["public.t"], "", "\n[log]\nformat = \"text\"\n");
    let out = f.command(&["slot", "status"], &[]);
    assert!(!out.status.success());
    let line = out.stderr.lines().next().unwrap_or_default();
    assert!(
        line.contains("ERROR") && !line.starts_with('{'),
        "{}",
        out.stderr
    );
    let out = f.command(&["--log-format", "json", "slot", "status"], &[]);
    let line = out.stderr.lines().next().unwrap_or_default();
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {}", out.stderr));
    assert_eq!(v["level"], "ERROR");
}
