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
        ssl: false,
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
    let st = support::ferry::wait_or_kill(&mut child, T)
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

/// The FAIL lines (with their fix) of a `check` run, as one text.
fn fails(out: &CommandOutput) -> String {
    let all: Vec<&str> = out.stdout.lines().collect();
    let mut text = String::new();
    for (i, l) in all.iter().enumerate() {
        if l.starts_with("FAIL") {
            text += l;
            text += "\n";
            text += all.get(i + 1).copied().unwrap_or_default();
            text += "\n";
        }
    }
    text
}

/// `check` connects to every sink: an unreachable Redis, a wrong password,
/// a key template naming a missing or non-key column, and a JSONL path that
/// cannot be written all fail, with rc 1; a good config passes.
#[test]
fn check_connects_to_every_sink_and_checks_key_columns() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE products (id int PRIMARY KEY, sku text, name text)");
    let r = support::redis::TestRedis::new();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right")
        .query(&mut r.conn())
        .unwrap();
    let f = FerryDir::new();
    let redis = |url: &str, key: &str| {
        format!(
            "\n[[sink]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"{url}\"\ntimeout_secs = 5\n\
             [sink.tables.\"public.products\"]\nkey = \"{key}\"\n"
        )
    };
    let good = format!("redis://:right@127.0.0.1:{}", r.port);
    let cases = [
        (
            redis(&format!("redis://127.0.0.1:{}", support::pg::free_port()), "p:{id}"),
            "sink cache",
        ),
        (
            redis(&format!("redis://:wrong@127.0.0.1:{}", r.port), "p:{id}"),
            "sink cache",
        ),
        (redis(&good, "p:{nope}"), "does not have"),
        (redis(&good, "p:{sku}"), "not in the table's replica identity"),
        (
            "\n[[sink]]\nname = \"search\"\ntype = \"elasticsearch\"\nurl = \"http://127.0.0.1:1\"\n\
             [sink.tables.\"public.products\"]\nindex = \"products\"\n"
                .to_string(),
            "sink search",
        ),
    ];
    for (sink, needle) in &cases {
        f.write_config(&pg.url(), &["public.products"], "", sink);
        let out = f.command(&["check"], &[]);
        assert!(!out.status.success(), "{needle}: {out:?}");
        let text = fails(&out);
        assert!(text.contains(needle), "{needle}:\n{}", out.stdout);
        assert!(!text.contains("right") && !text.contains("wrong"), "{text}");
    }
    // A JSONL path whose directory cannot be made (a regular file is in the way).
    std::fs::write(f.path("file"), "").unwrap();
    f.write_config(&pg.url(), &["public.products"], "", "");
    let cfg = std::fs::read_to_string(f.path("pgferry.toml"))
        .unwrap()
        .replace(
            &f.jsonl().display().to_string(),
            &f.path("file/sub/out.jsonl").display().to_string(),
        );
    std::fs::write(f.path("pgferry.toml"), cfg).unwrap();
    let out = f.command(&["check"], &[]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        fails(&out).contains("sink changes: cannot write"),
        "{}",
        out.stdout
    );
    // All good.
    f.write_config(&pg.url(), &["public.products"], "", &redis(&good, "p:{id}"));
    let out = f.command(&["check"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(has_ok(&out, "sink cache: Redis"), "{}", out.stdout);
    assert!(
        has_ok(
            &out,
            "key template \"p:{id}\" of public.products uses replica identity columns"
        ),
        "{}",
        out.stdout
    );
    assert!(has_ok(&out, "sink changes:"), "{}", out.stdout);
}

/// Slots `run` cannot use: every slot taken when ours must be created, a
/// slot of another database, a slot of another plugin. `check` fails each,
/// and `run` stops at once instead of retrying forever.
#[test]
fn check_and_run_refuse_slots_they_cannot_use() {
    let pg = TestPg::start_with(PgOptions {
        conf: "max_replication_slots = 1\n".into(),
        hba: None,
        ssl: false,
    });
    pg.sql("CREATE TABLE items (id int PRIMARY KEY)");
    pg.sql("CREATE DATABASE other");
    let f = FerryDir::new();
    f.write_config(&pg.url(), &["public.items"], "", "");
    let refused = |needle: &str| {
        let out = f.command(&["check"], &[]);
        assert!(!out.status.success(), "{out:?}");
        assert!(fails(&out).contains(needle), "{needle}:\n{}", out.stdout);
        let mut child = f.run();
        let st = support::ferry::wait_or_kill(&mut child, T)
            .unwrap_or_else(|| panic!("run kept retrying ({needle}):\n{}", f.log()));
        assert!(!st.success());
        assert!(
            f.log().replace("\\\"", "\"").contains(needle),
            "{needle}:\n{}",
            f.log()
        );
    };
    pg.sql_in(
        "other",
        "SELECT pg_create_logical_replication_slot('taken', 'pgoutput')",
    );
    refused("max_replication_slots");
    pg.sql("SELECT pg_drop_replication_slot('taken')");
    pg.sql_in(
        "other",
        "SELECT pg_create_logical_replication_slot('pgferry', 'pgoutput')",
    );
    refused("belongs to database \"other\"");
    pg.sql("SELECT pg_drop_replication_slot('pgferry')");
    pg.sql("SELECT pg_create_logical_replication_slot('pgferry', 'test_decoding')");
    refused("uses the plugin test_decoding, not pgoutput");
}

/// Suggested statements quote what needs quotes, and connection strings are
/// redacted by parsing (a password with a space).
#[test]
fn check_quotes_mixed_case_names_and_never_shows_a_password() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE \"Products\" (id int PRIMARY KEY); CREATE PUBLICATION pgferry");
    let f = FerryDir::new();
    let url = format!(
        "host=127.0.0.1 port={} user=postgres password='Sup3r Secret' dbname=postgres",
        pg.port
    );
    f.write_config(&url, &["public.Products"], "create_publication = false", "");
    let out = f.command(&["check"], &[]);
    assert!(!out.status.success(), "{out:?}");
    let fix = fix_for(&out, "public.Products is not in publication pgferry");
    assert!(
        fix.contains("ALTER PUBLICATION pgferry ADD TABLE public.\"Products\";"),
        "{fix}"
    );
    assert!(out.stdout.contains("password=***"), "{}", out.stdout);
    assert!(
        !out.stdout.contains("Secret") && !out.stderr.contains("Secret"),
        "{out:?}"
    );
}

/// An error is printed once, and text logs carry no colour codes into a file.
#[test]
fn errors_are_printed_once_and_text_logs_have_no_ansi_codes() {
    let f = FerryDir::new();
    write_raw(
        &f,
        "url = \"postgres://postgres@127.0.0.1:1/postgres\"\nslott = \"x\"",
        "path = \"out.jsonl\"",
    );
    for format in ["auto", "text", "json"] {
        let out = f.command(&["--log-format", format, "check"], &[]);
        assert!(!out.status.success());
        assert_eq!(
            out.stderr.matches("source.slott").count(),
            1,
            "{format}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains('\x1b'), "{format}: {:?}", out.stderr);
    }
    let pg = TestPg::start();
    pg.sql("CREATE TABLE items (id int PRIMARY KEY)");
    f.write_config(&pg.url(), &["public.items"], "", "");
    let mut g = Guard(f.spawn(&["--log-format", "text", "run"]));
    wait_active(&pg, &f, "pgferry");
    terminate(&mut g.0);
    assert!(f.log().contains("pgferry streaming"), "{}", f.log());
    assert!(!f.log().contains('\x1b'), "{:?}", f.log());
}

/// Relative paths in the config are relative to the config file, whatever
/// the current directory of the command.
#[test]
fn relative_paths_resolve_against_the_config_file() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE items (id int PRIMARY KEY)");
    let f = FerryDir::new();
    std::fs::write(
        f.path("pgferry.toml"),
        format!(
            "[source]\nurl = \"{}\"\nslot = \"pgferry\"\npublication = \"pgferry\"\ntables = [\"public.items\"]\n\n\
             [checkpoint]\ndir = \"state\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n\
             [[sink]]\nname = \"changes\"\ntype = \"jsonl\"\npath = \"out/changes.jsonl\"\n",
            pg.url()
        ),
    )
    .unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_pgferry"));
        c.args(args)
            .arg("--config")
            .arg(f.path("pgferry.toml"))
            .current_dir(elsewhere.path());
        c
    };
    let log = std::fs::File::create(f.path("pgferry.log")).unwrap();
    let mut g = Guard(cmd(&["run"]).stderr(log).spawn().unwrap());
    wait_active(&pg, &f, "pgferry");
    pg.sql("INSERT INTO items VALUES (1)");
    support::progress::wait_for(
        T,
        || {
            let n = support::ferry::read_jsonl(&f.path("out/changes.jsonl")).len();
            if n == 1 {
                Ok(())
            } else {
                Err(n)
            }
        },
        || f.log(),
    );
    terminate(&mut g.0);
    let out = cmd(&["slot", "status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sink changes: checkpoint"), "{text}");
    assert_eq!(
        std::fs::read_dir(elsewhere.path()).unwrap().count(),
        0,
        "files created in the current directory"
    );
}
