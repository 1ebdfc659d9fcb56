//! `pgferry setup`: the least-privilege role it makes runs pgferry's main
//! scenario (initial snapshot, stream under a workload, heartbeat, backfill)
//! without ever being a superuser, and setup is idempotent.

mod support;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use support::ferry::{wait_active, FerryDir, Guard};
use support::pg::{PgOptions, TestPg};

const PASSWORD: &str = "setup-pw-7x";

fn count_reads(f: &FerryDir) -> usize {
    f.events().iter().filter(|e| e["op"] == "read").count()
}

#[test]
fn the_role_setup_makes_runs_snapshot_stream_heartbeat_and_backfill_without_superuser() {
    let pg = TestPg::start_with(PgOptions {
        hba: Some(
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
                .into(),
        ),
        ..Default::default()
    });
    pg.sql(
        "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL, note text);
         INSERT INTO items SELECT i, 0, 'row ' || i FROM generate_series(1, 3000) i;
         CREATE TABLE nopk (v text);",
    );
    let admin = pg.url();
    let f = FerryDir::new();
    f.write_config(
        &format!("postgres://ferry:{PASSWORD}@127.0.0.1:{}/postgres", pg.port),
        &["public.items"],
        "snapshot = \"initial\"",
        "[heartbeat]\ninterval_secs = 1\n",
    );
    let setup = |extra: &[&str]| {
        let mut args = vec!["setup", "--admin-url", admin.as_str()];
        args.extend_from_slice(extra);
        let out = f.command(&args, &[]);
        assert!(out.status.success(), "setup {extra:?}: {out:?}");
        assert!(!out.stdout.contains(PASSWORD), "the password was printed");
        out.stdout
    };

    // --print changes nothing and names every statement.
    let script = setup(&["--print"]);
    for want in [
        "CREATE ROLE ferry",
        "ALTER ROLE ferry LOGIN;",
        "ALTER ROLE ferry REPLICATION;",
        "GRANT SELECT ON public.items TO ferry;",
        "ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public GRANT SELECT ON TABLES TO ferry;",
        "CREATE PUBLICATION pgferry FOR TABLE public.items;",
        "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO ferry;",
    ] {
        assert!(script.contains(want), "{want} missing:\n{script}");
    }
    assert_eq!(
        pg.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'ferry'")
            .trim(),
        "0"
    );

    // Runs, and again: nothing left to do but the same grants.
    let first = setup(&[]);
    assert!(
        first.contains("done: CREATE PUBLICATION pgferry"),
        "{first}"
    );
    assert!(first.contains("PASSWORD '***'"), "{first}");
    let second = setup(&[]);
    assert!(!second.contains("CREATE PUBLICATION"), "{second}");
    // A table created later in the schema is readable by the role.
    pg.sql("CREATE TABLE later (id int PRIMARY KEY)");
    assert_eq!(
        pg.sql("SELECT has_table_privilege('ferry', 'public.later', 'SELECT')")
            .trim(),
        "t"
    );
    assert_eq!(
        pg.sql(
            "SELECT rolsuper, rolreplication, rolcanlogin FROM pg_roles WHERE rolname = 'ferry'"
        )
        .trim(),
        "f|t|t"
    );

    // check agrees: SELECT and the heartbeat's function are allowed.
    let out = f.command(&["check"], &[]);
    assert!(out.status.success(), "{}", out.stdout);
    assert!(
        out.stdout.contains("OK   public.items: SELECT allowed"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("OK   heartbeat: pg_logical_emit_message is allowed"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("max_slot_wal_keep_size = -1"),
        "{}",
        out.stdout
    );

    // The main scenario as that role.
    let _g = Guard(f.run());
    wait_active(&pg, &f, "pgferry");
    let rt = support::workload::runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = support::workload::spawn(
        &pg,
        &rt,
        &stop,
        support::workload::Sessions {
            count: 2,
            seed: 0x00c0_ffee,
            pause: Duration::from_millis(5),
            on_error: support::workload::OnError::Rollback,
        },
        |w| {
            let mut next = 1_000_000 * (w as i64 + 1);
            move |rng, _| {
                let id = 1 + rng.below(3000) as i64;
                next += 1;
                vec![format!(
                    "BEGIN; UPDATE items SET n = n + 1, note = 'w{w}' WHERE id = {id};
                     DELETE FROM items WHERE id = {};
                     INSERT INTO items VALUES ({next}, 1, 'new'); COMMIT;",
                    1 + rng.below(3000)
                )]
            }
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let out = f.command(&["backfill", "--table", "public.items"], &[]);
    assert!(out.status.success(), "backfill request: {out:?}");
    std::thread::sleep(Duration::from_secs(1));
    support::workload::stop(&rt, &stop, workers);

    let rows = support::progress::wait_for(
        Duration::from_secs(120),
        || {
            let rows = support::oracle::table_rows(&pg, "items");
            let reads = count_reads(&f);
            // The initial snapshot and the backfill both read every row.
            if reads >= 2 * 2900 && support::oracle::replay(&f.events()) == rows {
                Ok(rows.len())
            } else {
                Err((reads, f.events().len()))
            }
        },
        || f.log(),
    );
    assert!(rows > 2900, "{rows}");
    // The heartbeat ran as that role: the slot's position moves while idle.
    let before =
        pg.sql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'pgferry'");
    pg.sql("SELECT pg_switch_wal()");
    support::progress::wait_for(
        Duration::from_secs(30),
        || {
            let now = pg.sql(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'pgferry'",
            );
            if now != before {
                Ok(())
            } else {
                Err(now)
            }
        },
        || f.log(),
    );
    let log = f.log();
    assert!(!log.contains("permission denied"), "{log}");
    assert!(!log.contains(PASSWORD), "the password reached the log");
}

#[test]
fn setup_advises_a_table_without_replica_identity() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE nopk (v text)");
    let f = FerryDir::new();
    f.write_config(
        &format!("postgres://ferry@127.0.0.1:{}/postgres", pg.port),
        &["public.nopk"],
        "",
        "",
    );
    let out = f.command(&["setup", "--print", "--admin-url", &pg.url()], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout
            .contains("-- advice: public.nopk cannot be published")
            && out.stdout.contains("REPLICA IDENTITY FULL"),
        "{}",
        out.stdout
    );
}
