//! TLS to Postgres, end to end, against a real server with `ssl = on` whose
//! pg_hba.conf has `hostssl` lines only (the harness itself uses the Unix
//! socket): certificates made with `openssl` in the test (a CA, a server
//! certificate for `localhost` and `127.0.0.1`, a client certificate for
//! `certuser`, and an unrelated CA).
//!
//! - `sslmode=verify-full` with `sslrootcert`: an initial snapshot and the
//!   stream under a workload, over TLS on every connection (replication,
//!   SQL, snapshot workers), end in the JSONL file equal to `to_jsonb()` of
//!   the table, and the change trace equals the server's own `test_decoding`
//!   oracle; both connections authenticate with SCRAM-SHA-256-PLUS
//!   (`channel_binding=require`).
//! - `cert` authentication with a client certificate (`[source.tls]` keys).
//! - A wrong CA and a wrong host name each stop with an error naming the
//!   check; `require` without verification connects; `disable` gets the
//!   server's refusal and a hint. `pgferry check` shows each connection's
//!   TLS (protocol, verified server name) and fails with the fix.

mod support;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use support::ferry::{wait_active, wait_timeout, FerryDir, Guard};
use support::pg::{PgOptions, TestPg};

const PASSWORD: &str = "tls-secret-pw";

/// A server with `ssl = on`; TCP only through `hostssl` lines: `postgres`
/// by trust (for nothing but psql over TLS), `certuser` by client
/// certificate, everyone else by scram-sha-256.
fn tls_cluster() -> TestPg {
    let pg = TestPg::start_with(PgOptions {
        conf: String::new(),
        hba: Some(
            "local all all trust\n\
             hostssl all certuser 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n"
                .into(),
        ),
        ssl: true,
    });
    pg.sql(&format!(
        "CREATE ROLE ferry LOGIN SUPERUSER PASSWORD '{PASSWORD}'; CREATE ROLE certuser LOGIN SUPERUSER;"
    ));
    pg.sql(
        "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL, note text, price numeric(12,2), tags text[], seen timestamptz)",
    );
    pg
}

/// `postgres://ferry:…@HOST:PORT/postgres?QUERY`
fn url(pg: &TestPg, host: &str, query: &str) -> String {
    format!(
        "postgres://ferry:{PASSWORD}@{host}:{}/postgres?{query}",
        pg.port
    )
}

/// `pgferry check` with `url` and `[source.tls]` keys `tls`.
fn check(pg: &TestPg, url: &str, tls: &str) -> (bool, String) {
    let _ = pg;
    let f = FerryDir::new();
    let tls = if tls.is_empty() {
        String::new()
    } else {
        format!("\n[source.tls]\n{tls}\n")
    };
    f.write_config(url, &["public.items"], &tls, "");
    let out = f.command(&["check"], &[]);
    assert!(
        !out.stdout.contains(PASSWORD) && !out.stderr.contains(PASSWORD),
        "the password reached the output:\n{}{}",
        out.stdout,
        out.stderr
    );
    (
        out.status.success(),
        format!("{}{}", out.stdout, out.stderr),
    )
}

/// `pgferry run` with `url`, which must stop by itself: its log.
fn run_stops(url: &str) -> String {
    let f = FerryDir::new();
    f.write_config(url, &["public.items"], "", "");
    let mut child = f.run();
    let status = wait_timeout(&mut child, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("pgferry kept running:\n{}", f.log()));
    assert!(!status.success(), "pgferry exited 0:\n{}", f.log());
    f.log()
}

#[test]
fn certificate_checks_modes_and_client_certificates() {
    let pg = tls_cluster();
    let ca = pg.tls_file("ca.pem");
    let ca = ca.display();
    let other = pg.tls_file("other-ca.pem");

    // verify-full: both connections say TLS, the protocol and the name.
    let (ok, out) = check(
        &pg,
        &url(
            &pg,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        "",
    );
    assert!(ok, "{out}");
    for which in ["SQL connection", "replication connection"] {
        assert!(
            out.contains(&format!("OK   {which}: TLS on (TLSv1.3), certificate verified for server name localhost (sslmode=verify-full)")),
            "{which}:\n{out}"
        );
    }

    // SCRAM-SHA-256-PLUS: channel binding required, over TLS.
    let (ok, out) = check(
        &pg,
        &url(
            &pg,
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca}&channel_binding=require"),
        ),
        "",
    );
    assert!(ok, "channel_binding=require:\n{out}");
    assert!(out.contains("server name 127.0.0.1"), "{out}");

    // A wrong CA: the CA check fails, check names the fix, run stops.
    let wrong_ca = url(
        &pg,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", other.display()),
    );
    let (ok, out) = check(&pg, &wrong_ca, "");
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL") && out.contains("CA check") && out.contains("unknown CA"),
        "{out}"
    );
    assert!(out.contains("fix: set sslrootcert"), "{out}");
    let log = run_stops(&wrong_ca);
    assert!(
        log.contains("CA check") && log.contains("unknown CA"),
        "{log}"
    );

    // A wrong host name (hostaddr gives the address, host the name).
    let wrong_host = format!(
        "host=db.invalid hostaddr=127.0.0.1 port={} user=ferry password={PASSWORD} dbname=postgres sslmode=verify-full sslrootcert={ca}",
        pg.port
    );
    let (ok, out) = check(&pg, &wrong_host, "");
    assert!(!ok, "{out}");
    assert!(
        out.contains("hostname check failed") && out.contains("db.invalid"),
        "{out}"
    );
    let log = run_stops(&wrong_host);
    assert!(log.contains("hostname check failed"), "{log}");
    // verify-ca accepts the same server: the chain is right.
    let (ok, out) = check(&pg, &wrong_host.replace("verify-full", "verify-ca"), "");
    assert!(ok, "{out}");
    assert!(
        out.contains("certificate chain verified, server name db.invalid not checked"),
        "{out}"
    );

    // require without a root certificate: encrypted, not verified.
    let (ok, out) = check(&pg, &url(&pg, "localhost", "sslmode=require"), "");
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "WARN SQL connection: TLS on (TLSv1.3), certificate NOT verified (sslmode=require"
        ),
        "{out}"
    );
    assert!(out.contains("WARN replication connection: TLS on"), "{out}");

    // disable against hostssl lines: the server's refusal, and the hint.
    let plain = url(&pg, "127.0.0.1", "sslmode=disable");
    let (ok, out) = check(&pg, &plain, "");
    assert!(!ok, "{out}");
    assert!(
        out.contains("no encryption") && out.contains("fix: set sslmode=verify-full"),
        "{out}"
    );
    let log = run_stops(&plain);
    assert!(
        log.contains("no encryption") && log.contains("only over TLS"),
        "{log}"
    );

    // cert authentication: the client certificate, [source.tls] keys.
    let cert_url = format!("postgres://certuser@localhost:{}/postgres", pg.port);
    let (ok, out) = check(
        &pg,
        &cert_url,
        &format!(
            "sslmode = \"verify-full\"\nsslrootcert = \"{ca}\"\nsslcert = \"{}\"\nsslkey = \"{}\"",
            pg.tls_file("client.pem").display(),
            pg.tls_file("client.key").display()
        ),
    );
    assert!(ok, "cert auth:\n{out}");
    assert!(out.contains("OK   replication connection works"), "{out}");
    // Without it, the server refuses.
    let (ok, out) = check(
        &pg,
        &cert_url,
        &format!("sslmode = \"verify-full\"\nsslrootcert = \"{ca}\""),
    );
    assert!(!ok, "{out}");
    assert!(out.contains("certificate"), "{out}");

    // A missing file is named at config load, with its key.
    let (ok, out) = check(
        &pg,
        &cert_url,
        "sslmode = \"verify-full\"\nsslrootcert = \"/no/such/ca.pem\"",
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("source.tls.sslrootcert") && out.contains("/no/such/ca.pem"),
        "{out}"
    );
}

#[test]
fn snapshot_and_stream_over_verify_full_equal_the_table_and_the_oracle() {
    let pg = tls_cluster();
    pg.sql(
        "INSERT INTO items SELECT i, 0, 'row ' || i, (i % 997) + 0.25, ARRAY['t' || (i % 7), NULL],
                '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 second'
         FROM generate_series(1, 20000) i",
    );
    let f = FerryDir::new();
    let ca = pg.tls_file("ca.pem");
    f.write_config(
        &url(&pg, "localhost", "channel_binding=require"),
        &["public.items"],
        "snapshot = \"initial\"\n\n[source.tls]\nsslmode = \"verify-full\"\nsslrootcert = \"ca.pem\"",
        "[snapshot]\nchunk_rows = 2000\n",
    );
    // A relative path in [source.tls] is the config file's directory's.
    std::fs::copy(&ca, f.path("ca.pem")).unwrap();
    let _g = Guard(f.run());
    wait_active(&pg, &f, "pgferry");
    support::oracle::create(&pg);

    let rt = support::workload::runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = support::workload::spawn(
        &pg,
        &rt,
        &stop,
        support::workload::Sessions {
            count: 2,
            seed: 0x5eed_7150,
            pause: Duration::from_millis(5),
            on_error: support::workload::OnError::Rollback,
        },
        |w| {
            let w = w as i64;
            let mut next = 10_000_000 * (w + 1);
            move |rng, txns| {
                let mut id = || 1 + (rng.below(1 << 30) as i64 % 20000);
                let mut sql = String::from("BEGIN;");
                for _ in 0..4 {
                    sql += &format!(
                        "UPDATE items SET n = n + 1, note = 'w{w} ' || n, price = price + 1 WHERE id = {};",
                        id()
                    );
                }
                sql += &format!("DELETE FROM items WHERE id = {};", id());
                next += 1;
                sql += &format!(
                    "INSERT INTO items VALUES ({next}, 1, 'new', 1.5, ARRAY['x'], now());"
                );
                if txns % 10 == 9 {
                    sql += &format!(
                        "UPDATE items SET id = id + 50000000 * {}, note = 'moved' WHERE id = {};",
                        w + 1,
                        id()
                    );
                }
                sql += "COMMIT;";
                vec![sql]
            }
        },
    );
    std::thread::sleep(Duration::from_secs(4));
    let txns = support::workload::stop(&rt, &stop, workers);
    assert!(txns > 20, "the workload ran only {txns} transactions");

    let n = support::progress::wait_for(
        Duration::from_secs(120),
        || {
            let rows = support::oracle::table_rows(&pg, "items");
            let got = support::oracle::replay(&f.events());
            if rows == got {
                Ok(rows.len())
            } else {
                let diff = rows.iter().filter(|(k, v)| got.get(*k) != Some(*v)).count()
                    + got.keys().filter(|k| !rows.contains_key(*k)).count();
                Err(diff)
            }
        },
        || f.log(),
    );
    assert!(n > 19000, "{n} rows");
    let reads = f.events().iter().filter(|e| e["op"] == "read").count();
    assert!(reads >= 19000, "the snapshot read {reads} rows");
    // Change by change, the stream equals the server's own decoding.
    assert_eq!(
        support::oracle::jsonl(&f, "items"),
        support::oracle::read(&pg, "items")
    );
    // Every connection was TLS: the server saw no plain one from pgferry.
    let plain = pg.sql("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'ferry' AND NOT s.ssl");
    assert_eq!(plain.trim(), "0");
    let log = f.log();
    assert!(!log.contains(PASSWORD), "the password reached the log");
}
