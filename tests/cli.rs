//! The operator commands of the real binary: `check`, `slot status`,
//! `slot drop`, configuration errors, and stopping `run` with SIGINT.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::ferry::{interrupt, terminate, wait_active, CommandOutput, FerryDir, Guard};
use support::pg::{PgOptions, TestPg};

const T: Duration = Duration::from_secs(60);

/// The lines of `out.stdout` that start with `prefix` (`OK` or `FAIL`).
fn lines<'a>(out: &'a CommandOutput, prefix: &str) -> Vec<&'a str> {
    out.stdout
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(prefix))
        .collect()
}

fn has_ok(out: &CommandOutput, needle: &str) -> bool {
    lines(out, "OK").iter().any(|l| l.contains(needle))
}

/// The line after the FAIL line that contains `needle`, which must be its fix.
fn fix_for<'a>(out: &'a CommandOutput, needle: &str) -> &'a str {
    let all: Vec<&str> = out.stdout.lines().collect();
    let i = all
        .iter()
        .position(|l| l.starts_with("FAIL") && l.contains(needle))
        .unwrap_or_else(|| panic!("no FAIL line with {needle:?}:\n{}", out.stdout));
    let fix = all.get(i + 1).copied().unwrap_or_default().trim();
    assert!(
        fix.starts_with("fix: "),
        "no fix after the FAIL line:\n{}",
        out.stdout
    );
    fix
}

#[test]
fn check_passes_good_tables_and_fails_a_table_without_primary_key() {
    let pg = TestPg::start();
    pg.sql(
        "CREATE TABLE good (id int PRIMARY KEY, v text);
         CREATE TABLE nopk (a int, b text);",
    );

    let f = FerryDir::new();
    f.write_config(&pg.url(), &["public.good", "public.nopk"], "", "");
    let out = f.command(&["check"], &[]);
    assert!(!out.status.success(), "a FAIL must exit non-zero: {out:?}");
    for needle in [
        "wal_level = logical",
        "REPLICATION privilege",
        "replication connection works",
        "public.good: replica identity is the primary key",
    ] {
        assert!(has_ok(&out, needle), "no OK line with {needle:?}:\n{out:?}");
    }
    let fails = lines(&out, "FAIL");
    assert_eq!(fails.len(), 1, "{out:?}");
    assert!(fails[0].contains("public.nopk"), "{out:?}");
    assert!(fails[0].contains("no primary key"), "{out:?}");
    let fix = fix_for(&out, "public.nopk");
    assert!(
        fix.contains("ALTER TABLE public.nopk REPLICA IDENTITY FULL"),
        "{fix}"
    );
    // check changes nothing on the server.
    assert_eq!(pg.sql("SELECT count(*) FROM pg_publication").trim(), "0");
    assert_eq!(
        pg.sql("SELECT count(*) FROM pg_replication_slots").trim(),
        "0"
    );

    let f = FerryDir::new();
    f.write_config(&pg.url(), &["public.good"], "", "");
    let out = f.command(&["check"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(lines(&out, "FAIL").is_empty(), "{out:?}");
    assert!(has_ok(&out, "public.good"), "{out:?}");
}

#[test]
fn check_fails_wal_level_replica_with_the_alter_system_fix() {
    // Appended after the harness's `wal_level = logical`: the last one wins.
    let pg = TestPg::start_with(PgOptions {
        conf: "wal_level = replica\n".into(),
        hba: None,
    });
    assert_eq!(pg.sql("SHOW wal_level").trim(), "replica");
    pg.sql("CREATE TABLE good (id int PRIMARY KEY)");
    let f = FerryDir::new();
    f.write_config(&pg.url(), &["public.good"], "", "");
    let out = f.command(&["check"], &[]);
    assert!(!out.status.success(), "{out:?}");
    let fails = lines(&out, "FAIL");
    assert_eq!(fails.len(), 1, "{out:?}");
    assert!(fails[0].contains("wal_level = replica"), "{out:?}");
    let fix = fix_for(&out, "wal_level");
    assert!(
        fix.contains("ALTER SYSTEM SET wal_level = logical") && fix.contains("restart"),
        "{fix}"
    );
    // And `run` stops by itself, saying why.
    let mut child = f.run();
    let st = support::ferry::wait_timeout(&mut child, T)
        .unwrap_or_else(|| panic!("pgferry kept running on wal_level=replica:\n{}", f.log()));
    assert!(!st.success(), "{st:?}\n{}", f.log());
    assert!(f.log().contains("wal_level"), "{}", f.log());
}

/// A config file with `[source]` keys `source` and nothing to connect to.
fn write_raw(f: &FerryDir, source: &str, sink: &str) {
    let text = format!(
        "[source]\n{source}\npublication = \"pgferry\"\ntables = [\"public.t\"]\n\n\
         [checkpoint]\ndir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[[sink]]\nname = \"changes\"\ntype = \"jsonl\"\n{sink}\n",
        f.path("state").display()
    );
    std::fs::write(f.path("pgferry.toml"), text).unwrap();
}

#[test]
fn config_errors_name_the_key_and_the_variable() {
    let url = "url = \"postgres://postgres@127.0.0.1:1/postgres\"";
    let path = "path = \"out.jsonl\"";
    let f = FerryDir::new();
    for cmd in [
        &["run"][..],
        &["check"],
        &["slot", "status"],
        &["slot", "drop"],
    ] {
        write_raw(&f, &format!("{url}\nslott = \"pgferry\""), path);
        let out = f.command(cmd, &[]);
        assert!(!out.status.success(), "{cmd:?}: {out:?}");
        assert!(out.stderr.contains("source.slott"), "{cmd:?}: {out:?}");

        write_raw(&f, &format!("{url}\nslot = \"pgferry\""), "paht = \"x\"");
        let out = f.command(cmd, &[]);
        assert!(!out.status.success(), "{cmd:?}: {out:?}");
        assert!(out.stderr.contains("sink[0].paht"), "{cmd:?}: {out:?}");

        write_raw(
            &f,
            "url = \"postgres://postgres:${PGFERRY_NO_SUCH_VAR}@127.0.0.1:1/postgres\"\nslot = \"pgferry\"",
            path,
        );
        let out = f.command(cmd, &[]);
        assert!(!out.status.success(), "{cmd:?}: {out:?}");
        assert!(
            out.stderr.contains("source.url") && out.stderr.contains("PGFERRY_NO_SUCH_VAR"),
            "{cmd:?}: {out:?}"
        );
    }
}

fn lsn(s: &str) -> pgferry::lsn::Lsn {
    s.trim().parse().unwrap()
}

#[test]
fn slot_status_shows_positions_and_slot_drop_refuses_while_running() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE items (id int PRIMARY KEY, v text)");
    let f = FerryDir::new();
    f.write_config(&pg.url(), &["public.items"], "", "");

    let out = f.command(&["slot", "status"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout.contains("slot pgferry: does not exist"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("sink changes: no checkpoint"),
        "{out:?}"
    );

    let mut g = support::ferry::start_streaming(&pg, &f);
    for i in 0..5 {
        pg.sql(&format!("INSERT INTO items VALUES ({i}, 'v{i}')"));
    }
    let ev = f.wait_events(5, T);
    let last_commit = lsn(ev[4]["commit_lsn"].as_str().unwrap());

    // Running: status says active, drop refuses and the slot stays.
    let out = f.command(&["slot", "status"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("active:              true"), "{out:?}");
    let out = f.command(&["slot", "drop"], &[]);
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("in use"), "{out:?}");
    assert_eq!(
        pg.sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgferry'")
            .trim(),
        "1"
    );

    let st = terminate(&mut g.0);
    assert!(st.success(), "{st:?}\n{}", f.log());

    let out = f.command(&["slot", "status"], &[]);
    assert!(out.status.success(), "{out:?}");
    let confirmed =
        pg.sql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'pgferry'");
    let cp: Value = serde_json::from_str(
        &std::fs::read_to_string(f.path("state/changes.checkpoint.json")).unwrap(),
    )
    .unwrap();
    let cp_lsn = lsn(cp["lsn"].as_str().unwrap());
    assert!(cp_lsn > last_commit, "{cp} vs {last_commit}");
    assert!(lsn(&confirmed) >= cp_lsn, "{confirmed} vs {cp}");
    let expected = [
        "slot pgferry".to_string(),
        "  plugin:              pgoutput".to_string(),
        "  database:            postgres".to_string(),
        format!("  confirmed_flush_lsn: {}", lsn(&confirmed)),
        format!("sink changes: checkpoint {cp_lsn}"),
    ];
    for line in &expected {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "no line {line:?} in:\n{}",
            out.stdout
        );
    }

    // Stopped: drop works.
    let out = f.command(&["slot", "drop"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("dropped slot pgferry"), "{out:?}");
    assert_eq!(
        pg.sql("SELECT count(*) FROM pg_replication_slots").trim(),
        "0"
    );
    // The checkpoint is kept, and a second drop has nothing to do.
    assert!(f.path("state/changes.checkpoint.json").exists());
    let out = f.command(&["slot", "drop"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("does not exist"), "{out:?}");
}

#[test]
fn sigint_stops_run_cleanly() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE items (id int PRIMARY KEY, v text)");
    let f = FerryDir::new();
    f.write_config(&pg.url(), &["public.items"], "", "");
    let mut g = Guard(f.run());
    wait_active(&pg, &f, "pgferry");
    pg.sql("INSERT INTO items VALUES (1, 'a')");
    f.wait_events(1, T);
    let st = interrupt(&mut g.0);
    assert!(st.success(), "SIGINT must exit 0: {st:?}\n{}", f.log());
    assert!(f.log().contains("stopped cleanly"), "{}", f.log());
    assert!(f.path("state/changes.checkpoint.json").exists());
}
