//! Authentication end to end: one cluster whose pg_hba.conf asks a different
//! method of each role (cleartext `password`, `md5`, `scram-sha-256`), the
//! password supplied through `${PGFERRY_TEST_PASSWORD}` in `source.url`.
//! Both of pgferry's connections authenticate: the SQL one (tokio-postgres)
//! and the replication one (pgferry's own `conn::wire`).

mod support;

use std::time::Duration;

use support::ferry::{terminate, wait_active, wait_or_kill, FerryDir, Guard};
use support::pg::{PgOptions, TestPg};

const T: Duration = Duration::from_secs(60);

/// (role, pg_hba method, password_encryption used to store its password)
const ROLES: &[(&str, &str, &str)] = &[
    ("clear_user", "password", "scram-sha-256"),
    ("md5_user", "md5", "md5"),
    ("scram_user", "scram-sha-256", "scram-sha-256"),
];

fn password(role: &str) -> String {
    format!("pw-{role}-Zq9")
}

/// The cluster, the roles and `public.items` in publication `pgferry`.
fn auth_cluster() -> TestPg {
    let mut hba = String::from(
        "local all postgres trust\n\
         host all postgres 127.0.0.1/32 trust\n",
    );
    for (role, method, _) in ROLES {
        hba.push_str(&format!("host all {role} 127.0.0.1/32 {method}\n"));
    }
    let pg = TestPg::start_with(PgOptions {
        // So that the server log says which method authenticated each connection.
        conf: "log_connections = on\n".into(),
        hba: Some(hba),
        ssl: false,
    });
    pg.sql("CREATE TABLE items (id int PRIMARY KEY, name text)");
    pg.sql("CREATE PUBLICATION pgferry FOR TABLE items");
    for (role, _, encryption) in ROLES {
        pg.sql(&format!(
            "SET password_encryption = '{encryption}'; \
             CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{}'; \
             GRANT SELECT ON items TO {role};",
            password(role)
        ));
    }
    // The passwords are stored as intended.
    for (role, _, encryption) in ROLES {
        let stored = pg.sql(&format!(
            "SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = '{role}'"
        ));
        let prefix = if *encryption == "md5" { "md5" } else { "SCR" };
        assert_eq!(stored.trim(), prefix, "{role}");
    }
    pg
}

/// A config for `role` with the password taken from the environment.
fn config_for(pg: &TestPg, role: &str) -> FerryDir {
    let f = FerryDir::new();
    let url = format!(
        "postgres://{role}:${{PGFERRY_TEST_PASSWORD}}@127.0.0.1:{}/postgres",
        pg.port
    );
    f.write_config_slot(&url, &format!("slot_{role}"), &["public.items"], "", "");
    f
}

#[test]
fn password_md5_and_scram_roles_stream_and_the_password_is_never_logged() {
    let pg = auth_cluster();
    for (i, (role, method, _)) in ROLES.iter().enumerate() {
        let pw = password(role);
        let f = config_for(&pg, role);
        let mut g = Guard(f.spawn_env(&["run"], &[("PGFERRY_TEST_PASSWORD", &pw)]));
        wait_active(&pg, &f, &format!("slot_{role}"));
        // Streaming under this role's identity.
        let user = pg.sql(&format!(
            "SELECT usename FROM pg_stat_replication WHERE application_name = 'pgferry' \
             AND pid = (SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'slot_{role}')"
        ));
        assert_eq!(user.trim(), *role);

        let id = 100 + i;
        pg.sql(&format!("INSERT INTO items VALUES ({id}, '{role}')"));
        let ev = f.wait_events(1, T);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0]["op"], "insert");
        assert_eq!(ev[0]["after"]["id"], id);
        assert_eq!(ev[0]["after"]["name"], *role);

        let st = terminate(&mut g.0);
        assert!(
            st.success(),
            "{role}: SIGTERM must exit 0: {st:?}\n{}",
            f.log()
        );
        let log = f.log();
        assert!(!log.is_empty(), "pgferry logged nothing");
        assert!(
            !log.contains(&pw),
            "{role}: the password appears in the log:\n{log}"
        );
        // The server authenticated both connections (SQL and replication)
        // with the method under test.
        let line = format!("identity=\"{role}\" method={method}");
        let n = pg.log().matches(&line).count();
        assert!(
            n >= 2,
            "{role}: {n} connection(s) with {line}:\n{}",
            pg.log()
        );
    }
}

#[test]
fn a_wrong_password_stops_pgferry_with_authentication_failed() {
    let pg = auth_cluster();
    for (role, _, _) in ROLES {
        let pw = format!("{}-wrong", password(role));
        let f = config_for(&pg, role);
        let mut child = f.spawn_env(&["run"], &[("PGFERRY_TEST_PASSWORD", &pw)]);
        let st = wait_or_kill(&mut child, T).unwrap_or_else(|| {
            panic!(
                "{role}: pgferry kept running with a wrong password:\n{}",
                f.log()
            )
        });
        let log = f.log();
        assert!(!st.success(), "{role}: {st:?}\n{log}");
        assert!(
            log.contains("authentication failed"),
            "{role}: no 'authentication failed' in:\n{log}"
        );
        assert!(!log.contains(&pw), "{role}: the password is in:\n{log}");
        assert!(
            !log.contains(&password(role)),
            "{role}: the password is in:\n{log}"
        );
        // `check` says the same, and names no password either.
        let out = f.command(&["check"], &[("PGFERRY_TEST_PASSWORD", &pw)]);
        assert!(!out.status.success(), "{out:?}");
        assert!(out.stdout.contains("FAIL"), "{out:?}");
        assert!(out.stdout.contains("authentication failed"), "{out:?}");
        assert!(
            !out.stdout.contains(&pw) && !out.stderr.contains(&pw),
            "{out:?}"
        );
    }
}

#[test]
fn a_missing_password_stops_pgferry_and_says_so() {
    let pg = auth_cluster();
    for (role, _, _) in ROLES {
        let f = FerryDir::new();
        f.write_config_slot(
            &pg.url_for(role, "postgres"),
            &format!("slot_{role}"),
            &["public.items"],
            "",
            "",
        );
        let mut child = f.run();
        let st = wait_or_kill(&mut child, T).unwrap_or_else(|| {
            panic!(
                "{role}: pgferry kept running without a password:\n{}",
                f.log()
            )
        });
        let log = f.log();
        assert!(!st.success(), "{role}: {st:?}\n{log}");
        assert!(log.contains("password missing"), "{role}: {log}");
    }
}
