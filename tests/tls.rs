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
//!   `sslrootcert=system` reads the system store (`SSL_CERT_FILE`).
//! - `sslmode=prefer` falls back to plain as libpq does: server answers `N`,
//!   a failed handshake (a cipher policy rustls cannot meet), a login
//!   refused over TLS (`hostnossl`); snapshot and stream included.
//! - `sslpassword` with a PKCS#8 encrypted client key; `sslcrl` with a CRL
//!   that revokes the server's certificate.

mod support;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use support::ferry::{wait_active, wait_or_kill, FerryDir, Guard};
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

/// Waits (on progress) until the JSONL replayed equals `items`: its rows.
fn wait_equal(pg: &TestPg, f: &FerryDir) -> usize {
    support::progress::wait_for(
        Duration::from_secs(120),
        || {
            let rows = support::oracle::table_rows(pg, "items");
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
    let status = wait_or_kill(&mut child, Duration::from_secs(60))
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

    // sslrootcert=system: the system trust store, which rustls-native-certs
    // reads from SSL_CERT_FILE when set (here: the test CA). Without it the
    // system store does not know the test CA.
    let system = FerryDir::new();
    system.write_config(
        &url(&pg, "localhost", "sslmode=verify-full&sslrootcert=system"),
        &["public.items"],
        "",
        "",
    );
    let ca_file = pg.tls_file("ca.pem");
    let out = system.command(&["check"], &[("SSL_CERT_FILE", ca_file.to_str().unwrap())]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("OK   replication connection: TLS on (TLSv1.3), certificate verified for server name localhost"),
        "{}",
        out.stdout
    );
    let out = system.command(&["check"], &[]);
    assert!(!out.status.success(), "{}", out.stdout);

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

    let n = wait_equal(&pg, &f);
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
    // The one-shot commands take the same settings: the server has no
    // line for a plain TCP connection, so each one that works used TLS.
    let out = f.command(&["slot", "status"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("active:              true"), "{out:?}");
    let low_reads = || {
        f.events()
            .iter()
            .filter(|e| e["op"] == "read" && e["key"]["id"].as_i64().is_some_and(|i| i <= 100))
            .count()
    };
    let before = low_reads();
    let out = f.command(
        &[
            "backfill",
            "--table",
            "public.items",
            "--where",
            "id <= 100",
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let present: usize = pg
        .sql("SELECT count(*) FROM items WHERE id <= 100")
        .trim()
        .parse()
        .unwrap();
    support::progress::wait_for(
        Duration::from_secs(120),
        || {
            let now = low_reads();
            if now >= before + present {
                Ok(())
            } else {
                Err(now)
            }
        },
        || format!("the backfill over TLS did not arrive\n{}", f.log()),
    );
    let log = f.log();
    assert!(!log.contains(PASSWORD), "the password reached the log");
    assert!(!out.stderr.contains(PASSWORD) && !out.stdout.contains(PASSWORD));
}

/// psql over TCP as `user` with `sslmode`: `ssl|cipher` of its own
/// connection, or the error.
fn psql_tls(pg: &TestPg, user: &str, sslmode: &str) -> Result<String, String> {
    let out = std::process::Command::new(support::pg::pg_bin_dir().join("psql"))
        .args([
            "-X",
            "-At",
            &format!(
                "host=127.0.0.1 port={} user={user} dbname=postgres sslmode={sslmode}",
                pg.port
            ),
            "-c",
            "SELECT ssl, coalesce(cipher, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// `pgferry run` with `url` and `slot`: an initial snapshot of `items` in
/// chunks (snapshot workers), then the stream (replication connection),
/// until the JSONL equals the table; pgferry's connections are all plain.
/// Its log.
fn snapshot_and_stream_plain(pg: &TestPg, url: &str, slot: &str) -> String {
    let f = FerryDir::new();
    f.write_config_slot(
        url,
        slot,
        &["public.items"],
        "snapshot = \"initial\"",
        "[snapshot]\nchunk_rows = 500\n",
    );
    let _g = Guard(f.run());
    wait_active(pg, &f, slot);
    pg.sql("UPDATE items SET n = n + 1, note = 'changed' WHERE id % 7 = 0; DELETE FROM items WHERE id % 11 = 0; INSERT INTO items SELECT m + i, 1, 'late', 2.5, NULL, now() FROM generate_series(1, 200) i, (SELECT max(id) m FROM items) x");
    let n = wait_equal(pg, &f);
    assert!(n > 2000, "{n} rows");
    let reads = f.events().iter().filter(|e| e["op"] == "read").count();
    assert!(reads >= 2000, "the snapshot read {reads} rows");
    let conns = pg.sql(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'ferry'",
    );
    let (tls, all) = conns.trim().split_once('|').unwrap();
    assert_eq!(tls, "0", "a connection of pgferry's is over TLS");
    assert_ne!(all, "0", "pgferry holds no connection");
    f.log()
}

/// `sslmode=prefer` (also the default) does what libpq does: TLS when it
/// works, and plain otherwise, on every connection (SQL, replication,
/// snapshot workers). One server, three cases in turn:
/// - TLS on, but the server's TLS is one rustls cannot speak (TLS 1.2 with
///   CBC cipher suites only; libpq's OpenSSL can, which the test shows):
///   the handshake fails and pgferry connects again without TLS;
/// - TLS off: the server answers the SSLRequest with `N`;
/// - TLS on, but pg_hba.conf has `hostnossl` for the role: the server
///   refuses the login over TLS and pgferry logs in again without.
///
/// `require` fails in each case, naming the reason.
#[test]
fn prefer_falls_back_to_plain_like_libpq() {
    let pg = TestPg::start_with(PgOptions {
        conf: String::new(),
        hba: Some("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n".into()),
        ssl: true,
    });
    pg.sql("ALTER SYSTEM SET ssl_max_protocol_version = 'TLSv1.2'");
    pg.sql("ALTER SYSTEM SET ssl_ciphers = 'ECDHE-ECDSA-AES128-SHA256'");
    pg.sql("SELECT pg_reload_conf()");
    pg.sql(&format!(
        "CREATE ROLE ferry LOGIN SUPERUSER PASSWORD '{PASSWORD}'; \
         CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL, note text, price numeric(12,2), tags text[], seen timestamptz); \
         INSERT INTO items SELECT i, 0, 'row ' || i, i % 97, ARRAY['t'], now() FROM generate_series(1, 3000) i"
    ));
    // The server's TLS works: libpq negotiates its one cipher suite.
    support::progress::wait_for(
        Duration::from_secs(30),
        || match psql_tls(&pg, "ferry", "require") {
            Ok(s) if s == "t|ECDHE-ECDSA-AES128-SHA256" => Ok(()),
            other => Err(other),
        },
        || pg.log(),
    );

    // 1. The handshake fails. require: stopped, with the reason.
    let (ok, out) = check(&pg, &url(&pg, "localhost", "sslmode=require"), "");
    assert!(!ok, "{out}");
    assert!(
        out.contains("share no TLS cipher suite") && out.contains("ssl_ciphers"),
        "{out}"
    );
    // prefer: both connections fall back to plain.
    let (ok, out) = check(&pg, &url(&pg, "localhost", "sslmode=prefer"), "");
    assert!(ok, "{out}");
    for which in ["SQL connection", "replication connection"] {
        assert!(
            out.contains(&format!("WARN {which}: TLS off (sslmode=prefer")),
            "{which}:\n{out}"
        );
    }
    // The default is prefer: snapshot workers and the stream fall back too.
    let log = snapshot_and_stream_plain(&pg, &url(&pg, "localhost", ""), "pgferry");
    assert!(
        log.contains("the TLS handshake failed; connecting again without TLS")
            && log.contains("share no TLS cipher suite"),
        "{log}"
    );
    assert!(!log.contains(PASSWORD), "the password reached the log");

    // 2. TLS off: the server answers N.
    pg.sql("ALTER SYSTEM SET ssl = off");
    pg.sql("SELECT pg_reload_conf()");
    support::progress::wait_for(
        Duration::from_secs(30),
        || match psql_tls(&pg, "ferry", "prefer") {
            Ok(s) if s.starts_with('f') => Ok(()),
            other => Err(other),
        },
        || pg.log(),
    );
    let (ok, out) = check(&pg, &url(&pg, "localhost", "sslmode=prefer"), "");
    assert!(ok, "{out}");
    assert!(
        out.contains("WARN replication connection: TLS off (sslmode=prefer"),
        "{out}"
    );
    let (ok, out) = check(&pg, &url(&pg, "localhost", "sslmode=require"), "");
    assert!(!ok && out.contains("does not accept TLS"), "{out}");

    // 3. TLS works, but pg_hba.conf allows this role only without it.
    pg.sql("ALTER SYSTEM RESET ssl_max_protocol_version");
    pg.sql("ALTER SYSTEM RESET ssl_ciphers");
    pg.sql("ALTER SYSTEM SET ssl = on");
    std::fs::write(
        pg.data_dir().join("pg_hba.conf"),
        "local all all trust\nhostnossl all ferry 127.0.0.1/32 scram-sha-256\n\
         hostssl all postgres 127.0.0.1/32 trust\n",
    )
    .unwrap();
    pg.sql("SELECT pg_reload_conf()");
    support::progress::wait_for(
        Duration::from_secs(30),
        || match psql_tls(&pg, "postgres", "require") {
            Ok(s) if s.starts_with("t|TLS_") => Ok(()),
            other => Err(other),
        },
        || pg.log(),
    );
    assert!(
        psql_tls(&pg, "ferry", "require").is_err_and(|e| e.contains("SSL encryption")),
        "the server lets ferry in over TLS"
    );
    let (ok, out) = check(&pg, &url(&pg, "localhost", "sslmode=require"), "");
    assert!(!ok && out.contains("SSL encryption"), "{out}");
    let (ok, out) = check(&pg, &url(&pg, "localhost", "sslmode=prefer"), "");
    assert!(ok, "{out}");
    assert!(
        out.contains("WARN SQL connection: TLS off (sslmode=prefer"),
        "{out}"
    );
    let log = snapshot_and_stream_plain(&pg, &url(&pg, "localhost", "sslmode=prefer"), "pgferry2");
    assert!(
        log.contains("the server refused the login over TLS; connecting again without TLS")
            || log.contains("the connection over TLS failed; connecting again without TLS"),
        "{log}"
    );
}

/// `cert` authentication with a PKCS#8 encrypted client key (made by
/// `openssl pkcs8 -topk8 -v2 aes-256-cbc`) and `sslpassword`, from
/// `[source.tls]` and from the URL. A missing or wrong password, or a key
/// in OpenSSL's legacy encrypted format, is refused at config load naming
/// the key; the password reaches neither the output nor the log.
#[test]
fn an_encrypted_client_key_is_read_with_sslpassword() {
    const KEY_PW: &str = "k3y-pass phrase";
    let pg = tls_cluster();
    let dir = pg.tls_file("");
    let enc = pg.tls_file("client-enc.key");
    support::pg::openssl(
        &dir,
        &[
            "pkcs8",
            "-topk8",
            "-v2",
            "aes-256-cbc",
            "-in",
            "client.key",
            "-out",
            "client-enc.key",
            "-passout",
            &format!("pass:{KEY_PW}"),
        ],
    );
    let legacy = pg.tls_file("client-legacy.key");
    support::pg::openssl(
        &dir,
        &[
            "ec",
            "-in",
            "client.key",
            "-aes256",
            "-out",
            "client-legacy.key",
            "-passout",
            &format!("pass:{KEY_PW}"),
        ],
    );
    assert!(std::fs::read_to_string(&enc)
        .unwrap()
        .contains("BEGIN ENCRYPTED PRIVATE KEY"));
    assert!(std::fs::read_to_string(&legacy)
        .unwrap()
        .contains("Proc-Type: 4,ENCRYPTED"));
    let ca = pg.tls_file("ca.pem");
    let cert = pg.tls_file("client.pem");
    let cert_url = format!("postgres://certuser@localhost:{}/postgres", pg.port);
    let tls = |key: &std::path::Path, pw: Option<&str>| {
        format!(
            "sslmode = \"verify-full\"\nsslrootcert = \"{}\"\nsslcert = \"{}\"\nsslkey = \"{}\"\n{}",
            ca.display(),
            cert.display(),
            key.display(),
            pw.map(|p| format!("sslpassword = \"{p}\"")).unwrap_or_default()
        )
    };
    let no_secret = |out: &str| {
        assert!(
            !out.contains(KEY_PW) && !out.contains("k3y"),
            "the key's password reached the output:\n{out}"
        );
    };

    // [source.tls]: both connections log in with the client certificate.
    let (ok, out) = check(&pg, &cert_url, &tls(&enc, Some(KEY_PW)));
    assert!(ok, "{out}");
    assert!(
        out.contains("OK   SQL connection: TLS on")
            && out.contains("OK   replication connection works"),
        "{out}"
    );
    no_secret(&out);
    // The URL form, percent-encoded; pgferry run streams with it.
    let url = format!(
        "{cert_url}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}&sslpassword={}",
        ca.display(),
        cert.display(),
        enc.display(),
        KEY_PW.replace(' ', "%20")
    );
    let (ok, out) = check(&pg, &url, "");
    assert!(ok, "{out}");
    no_secret(&out);
    let f = FerryDir::new();
    f.write_config(&url, &["public.items"], "", "");
    let _g = Guard(f.run());
    wait_active(&pg, &f, "pgferry");
    pg.sql("INSERT INTO items VALUES (1, 1, 'over a client certificate', 1, NULL, now())");
    let events = f.wait_events(1, Duration::from_secs(60));
    assert_eq!(events[0]["after"]["note"], "over a client certificate");
    no_secret(&f.log());

    // No password, a wrong one, the legacy format: each named at load.
    for (key, pw, want) in [
        (&enc, None, "source.tls.sslpassword"),
        (&enc, Some("wrong"), "source.tls.sslpassword"),
        (&legacy, Some(KEY_PW), "source.tls.sslkey"),
    ] {
        let (ok, out) = check(&pg, &cert_url, &tls(key, pw));
        assert!(!ok, "{out}");
        assert!(out.contains(want), "{want}:\n{out}");
        no_secret(&out);
    }
    let (_, out) = check(&pg, &cert_url, &tls(&enc, Some("wrong")));
    assert!(out.contains("the password is wrong"), "{out}");
    let (_, out) = check(&pg, &cert_url, &tls(&legacy, Some(KEY_PW)));
    assert!(out.contains("openssl pkcs8 -topk8"), "{out}");
}

/// `sslcrl`: with a CRL of the server's CA that revokes nothing, verify-full
/// connects; with one that revokes the server's certificate (both made by
/// `openssl ca` in the test), `check` and `run` stop with the CRL check
/// named, and the CRL file. `sslcrl` where nothing is verified is a config
/// error.
#[test]
fn a_revoked_server_certificate_is_refused_with_sslcrl() {
    let pg = tls_cluster();
    let dir = pg.tls_file("");
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("crlnumber"), "1000\n").unwrap();
    std::fs::write(
        dir.join("ca.cnf"),
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\ncrlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 2\n",
    )
    .unwrap();
    let ca_cmd = |extra: &[&str]| {
        let mut a = vec![
            "ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.pem",
        ];
        a.extend_from_slice(extra);
        support::pg::openssl(&dir, &a);
    };
    ca_cmd(&["-gencrl", "-out", "empty.crl"]);
    ca_cmd(&["-revoke", "server.pem"]);
    ca_cmd(&["-gencrl", "-out", "revoked.crl"]);
    let ca = pg.tls_file("ca.pem");
    let with_crl = |crl: &str| {
        url(
            &pg,
            "localhost",
            &format!(
                "sslmode=verify-full&sslrootcert={}&sslcrl={}",
                ca.display(),
                pg.tls_file(crl).display()
            ),
        )
    };

    let (ok, out) = check(&pg, &with_crl("empty.crl"), "");
    assert!(ok, "{out}");
    assert!(out.contains("OK   replication connection: TLS on"), "{out}");

    let revoked = with_crl("revoked.crl");
    let (ok, out) = check(&pg, &revoked, "");
    assert!(!ok, "{out}");
    assert!(
        out.contains("CRL check") && out.contains("revoked") && out.contains("revoked.crl"),
        "{out}"
    );
    let log = run_stops(&revoked);
    assert!(
        log.contains("CRL check") && log.contains("revoked.crl"),
        "{log}"
    );

    // sslcrl without verification would check nothing: refused at load.
    let (ok, out) = check(
        &pg,
        &url(
            &pg,
            "localhost",
            &format!(
                "sslmode=require&sslcrl={}",
                pg.tls_file("revoked.crl").display()
            ),
        ),
        "",
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("sslcrl") && out.contains("verify-full"),
        "{out}"
    );
}
