//! Issue 10: ordinary operator mistakes that used to lose changes or
//! overwrite rows without a word. Each test makes the mistake against a
//! real Postgres (and a real Redis where it matters), with the real binary,
//! and shows the refusal or the correct result.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::ferry::{start_streaming, terminate, wait_active, wait_or_kill, FerryDir, Guard};
use support::pg::TestPg;
use support::redis::TestRedis;

/// How long pgferry may take to refuse a config or a server state.
const REFUSE: Duration = Duration::from_secs(60);
/// How long a wait may go without any new event before it fails.
const STALL: Duration = Duration::from_secs(60);

/// Writes `pgferry.toml`: `[source]` with `source_extra`, a checkpoint dir,
/// metrics on an ephemeral port, then `sinks` (TOML text).
fn write(f: &FerryDir, pg: &TestPg, slot: &str, tables: &[&str], source_extra: &str, sinks: &str) {
    let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
    let text = format!(
        "[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"{slot}\"\ntables = [{}]\n{source_extra}\n\n\
         [checkpoint]\ndir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n{sinks}\n",
        pg.url(),
        tables.join(", "),
        f.path("state").display()
    );
    std::fs::write(f.path("pgferry.toml"), text).unwrap();
}

/// [`write`] for slot `pgferry` with the JSONL sink of [`jsonl`].
fn write_jsonl(f: &FerryDir, pg: &TestPg, tables: &[&str], source_extra: &str, sink_extra: &str) {
    write(
        f,
        pg,
        "pgferry",
        tables,
        source_extra,
        &jsonl(f, sink_extra),
    );
}

/// A JSONL sink named `changes` into `f.jsonl()`, with `extra` lines.
fn jsonl(f: &FerryDir, extra: &str) -> String {
    format!(
        "[[sink]]\nname = \"changes\"\ntype = \"jsonl\"\npath = \"{}\"\n{extra}\n",
        f.jsonl().display()
    )
}

/// The log with JSON's escaped quotes unescaped, to search it for text.
fn log_text(f: &FerryDir) -> String {
    f.log().replace("\\\"", "\"")
}

/// Runs `pgferry run` until it exits by itself (it must, within `REFUSE`);
/// returns its log.
fn run_refused(f: &FerryDir) -> String {
    let mut child = f.run();
    let st = wait_or_kill(&mut child, REFUSE)
        .unwrap_or_else(|| panic!("pgferry kept running instead of refusing:\n{}", f.log()));
    assert!(
        !st.success(),
        "pgferry must exit non-zero: {st:?}\n{}",
        f.log()
    );
    log_text(f)
}

fn ids_of(events: &[Value], table: &str) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e["table"] == table)
        .filter_map(|e| e["after"]["id"].as_i64())
        .collect()
}

/// Case 1: the publication exists but lacks a configured table.
#[test]
fn a_publication_lacking_a_configured_table_is_completed_or_refused() {
    let pg = TestPg::start();
    pg.sql(
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text);
         CREATE PUBLICATION pgferry FOR TABLE b;
         INSERT INTO a VALUES (1, 'before');",
    );
    // Not managed: refused, naming the table and the statement.
    let f = FerryDir::new();
    write_jsonl(&f, &pg, &["public.a"], "create_publication = false", "");
    let log = run_refused(&f);
    assert!(
        log.contains("public.a is not in publication pgferry")
            && log.contains("ALTER PUBLICATION pgferry ADD TABLE public.a"),
        "{log}"
    );
    // Managed (the default): pgferry adds the table, and a's changes arrive.
    write_jsonl(&f, &pg, &["public.a"], "", "");
    let mut g = start_streaming(&pg, &f);
    pg.sql("INSERT INTO a VALUES (2, 'after'); INSERT INTO b VALUES (1, 'b')");
    let ev = f.wait_events(1, STALL);
    assert_eq!(ids_of(&ev, "a"), [2], "{ev:?}");
    assert!(pg
        .sql("SELECT tablename FROM pg_publication_tables WHERE pubname = 'pgferry'")
        .lines()
        .any(|t| t == "a"));
    terminate(&mut g.0);

    // A table added to source.tables after the first run: added to the
    // publication, and (source.snapshot = "initial") backfilled, so its
    // existing rows arrive too.
    pg.sql(
        "CREATE TABLE c (id int PRIMARY KEY, v text);
         INSERT INTO c VALUES (10, 'old'), (11, 'old');",
    );
    write_jsonl(
        &f,
        &pg,
        &["public.a", "public.c"],
        "snapshot = \"initial\"",
        "",
    );
    let mut g = start_streaming(&pg, &f);
    pg.sql("INSERT INTO c VALUES (12, 'new')");
    // The backfill may read row 12 too, when its chunk runs after the insert
    // (at-least-once, as documented): what counts is that every row arrives,
    // and the rows older than the run as reads.
    let distinct = |ev: &[Value]| {
        let mut c = ids_of(ev, "c");
        c.sort();
        c.dedup();
        c
    };
    let ev = f.wait_events_until(STALL, "c's rows", |ev| distinct(ev).len() >= 3);
    assert_eq!(distinct(&ev), [10, 11, 12], "{ev:?}");
    for id in [10, 11] {
        assert!(
            ev.iter()
                .any(|e| e["table"] == "c" && e["op"] == "read" && e["after"]["id"] == id),
            "row {id} of c was not read by the backfill: {ev:?}"
        );
    }
    assert!(
        log_text(&f).contains("a backfill of its rows was requested"),
        "{}",
        f.log()
    );
    terminate(&mut g.0);

    // With source.snapshot = "never", pgferry says what to run.
    pg.sql("CREATE TABLE d (id int PRIMARY KEY); INSERT INTO d VALUES (1)");
    write_jsonl(&f, &pg, &["public.a", "public.c", "public.d"], "", "");
    let mut g = start_streaming(&pg, &f);
    assert!(
        log_text(&f).contains("pgferry backfill --config <this config> --table public.d"),
        "{}",
        f.log()
    );
    terminate(&mut g.0);
}

/// Case 2: bare table names in `source.tables` and in a sink's filter.
#[test]
fn bare_table_names_in_a_sink_filter_match_the_stream() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE products (id int PRIMARY KEY, name text)");
    let f = FerryDir::new();
    write_jsonl(&f, &pg, &["products"], "", "tables = [\"products\"]");
    let mut g = start_streaming(&pg, &f);
    pg.sql("INSERT INTO products VALUES (1, 'a'), (2, 'b')");
    let ev = f.wait_events(2, STALL);
    assert_eq!(ids_of(&ev, "products"), [1, 2], "{ev:?}");
    assert!(ev.iter().all(|e| e["schema"] == "public"), "{ev:?}");
    terminate(&mut g.0);
    // A filter that matches no table of source.tables is refused at load.
    write_jsonl(&f, &pg, &["products"], "", "tables = [\"prodcts\"]");
    let log = run_refused(&f);
    assert!(
        log.contains("sink[0].tables") && log.contains("public.prodcts"),
        "{log}"
    );
}

/// Case 3: the stdout JSONL sink's reader exits (`pgferry run | head -n 2`).
#[test]
fn a_stdout_reader_that_exits_loses_no_event() {
    let pg = TestPg::start();
    pg.sql("CREATE TABLE items (id int PRIMARY KEY)");
    let f = FerryDir::new();
    write(
        &f,
        &pg,
        "pgferry",
        &["public.items"],
        "",
        "[[sink]]\nname = \"changes\"\ntype = \"jsonl\"\npath = \"-\"\n",
    );
    let log = std::fs::File::create(f.path("pgferry.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(["run", "--config"])
        .arg(f.path("pgferry.toml"))
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut g = Guard(child);
    wait_active(&pg, &f, "pgferry");
    pg.sql("INSERT INTO items VALUES (1)");
    pg.sql("INSERT INTO items VALUES (2)");
    // The reader takes two change lines (after the table's schema line) and exits.
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"op\":\"schema\""), "{line}");
    for _ in 0..2 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("\"op\":\"insert\""), "{line}");
    }
    drop(reader);
    for i in 3..=5 {
        pg.sql(&format!("INSERT INTO items VALUES ({i})"));
    }
    let st = wait_or_kill(&mut g.0, REFUSE)
        .unwrap_or_else(|| panic!("pgferry went on writing into a closed pipe:\n{}", f.log()));
    assert!(!st.success(), "{st:?}\n{}", f.log());
    assert!(
        f.log().contains("Broken pipe") || f.log().contains("broken pipe"),
        "{}",
        f.log()
    );
    // Started again with a reader (a file here), it sends events 3 to 5:
    // the failed writes were never counted as written.
    write_jsonl(&f, &pg, &["public.items"], "", "");
    let mut g = Guard(f.run());
    let ev = f.wait_events_until(STALL, "events 3 to 5", |ev| {
        let ids = ids_of(ev, "items");
        (3..=5).all(|i| ids.contains(&i))
    });
    assert!(
        ids_of(&ev, "items").iter().all(|i| (1..=5).contains(i)),
        "{ev:?}"
    );
    terminate(&mut g.0);
}

fn redis_cache(url: &str, table: &str, key: &str, extra: &str) -> String {
    format!(
        "[[sink]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"{url}\"\n{extra}\n[sink.tables.\"{table}\"]\nkey = \"{key}\"\n"
    )
}

fn redis_get(r: &TestRedis, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query(&mut r.conn()).unwrap()
}

/// Waits until `key` holds a value for which `ok` is true (or it stayed
/// the same for `STALL`).
fn wait_key(r: &TestRedis, f: &FerryDir, key: &str, ok: impl Fn(&Option<String>) -> bool) {
    support::progress::wait_for(
        STALL,
        || match redis_get(r, key) {
            v if ok(&v) => Ok(()),
            v => Err(v),
        },
        || format!("{key}\n--- pgferry log ---\n{}", f.log()),
    )
}

/// Case 4: two pgferry instances (two slots) with Redis sinks of the same name.
#[test]
fn two_instances_with_same_named_redis_sinks_do_not_skip_each_others_changes() {
    let pg = TestPg::start();
    let r = TestRedis::new();
    pg.sql(
        "CREATE TABLE ta (id int PRIMARY KEY, v text);
         CREATE TABLE tb (id int PRIMARY KEY, v text);",
    );
    let (fa, fb) = (FerryDir::new(), FerryDir::new());
    write(
        &fa,
        &pg,
        "sa",
        &["public.ta"],
        "",
        &redis_cache(&r.url(), "public.ta", "ta:{id}", ""),
    );
    write(
        &fb,
        &pg,
        "sb",
        &["public.tb"],
        "",
        &redis_cache(&r.url(), "public.tb", "tb:{id}", ""),
    );
    let mut a = Guard(fa.run());
    wait_active(&pg, &fa, "sa");
    let mut b = Guard(fb.run());
    wait_active(&pg, &fb, "sb");
    pg.sql("INSERT INTO ta VALUES (1, 'a1'); INSERT INTO tb VALUES (1, 'b1')");
    wait_key(&r, &fb, "tb:1", |v| {
        v.as_deref().is_some_and(|v| v.contains("b1"))
    });
    // Stop B, change a row of B's table, let A apply a later change, restart B.
    terminate(&mut b.0);
    pg.sql("UPDATE tb SET v = 'b2' WHERE id = 1");
    pg.sql("UPDATE ta SET v = 'a2' WHERE id = 1");
    wait_key(&r, &fa, "ta:1", |v| {
        v.as_deref().is_some_and(|v| v.contains("a2"))
    });
    let mut b = Guard(fb.run());
    wait_key(&r, &fb, "tb:1", |v| {
        v.as_deref().is_some_and(|v| v.contains("b2"))
    });
    // Each position names its owner, under a prefix of its own.
    for (slot, f) in [("sa", &fa), ("sb", &fb)] {
        let pos = redis_get(&r, &format!("pgferry:{slot}:cache:position"))
            .unwrap_or_else(|| panic!("no position for {slot}:\n{}", f.log()));
        assert!(pos.contains(&format!("\"slot\":\"{slot}\"")), "{pos}");
    }
    terminate(&mut b.0);

    // The same state_prefix set by hand: B refuses A's position instead of
    // trusting it.
    write(
        &fb,
        &pg,
        "sb",
        &["public.tb"],
        "",
        &redis_cache(
            &r.url(),
            "public.tb",
            "tb:{id}",
            "state_prefix = \"pgferry:sa:cache\"",
        ),
    );
    pg.sql("UPDATE tb SET v = 'b3' WHERE id = 1");
    let log = run_refused(&fb);
    assert!(
        log.contains("another pgferry stream") && log.contains("state_prefix"),
        "{log}"
    );
    assert!(redis_get(&r, "tb:1").unwrap().contains("b2"));
    terminate(&mut a.0);
}

/// Case 5: key templates of two tables that can produce the same key.
#[test]
fn key_templates_that_can_collide_are_refused() {
    let pg = TestPg::start();
    let r = TestRedis::new();
    pg.sql(
        "CREATE TABLE products (id int PRIMARY KEY, name text);
         CREATE TABLE items (code text PRIMARY KEY, name text);",
    );
    let f = FerryDir::new();
    let sink = |items_key: &str| {
        format!(
            "[[sink]]\nname = \"cache\"\ntype = \"redis\"\nurl = \"{}\"\n\
             [sink.tables.\"public.products\"]\nkey = \"k:{{id}}\"\n[sink.tables.\"public.items\"]\nkey = \"{items_key}\"\n",
            r.url()
        )
    };
    write(
        &f,
        &pg,
        "pgferry",
        &["public.products", "public.items"],
        "",
        &sink("k:{code}"),
    );
    let log = run_refused(&f);
    assert!(
        log.contains("public.items")
            && log.contains("public.products")
            && log.contains("k:0")
            && log.contains("own literal prefix"),
        "{log}"
    );
    let out = f.command(&["check"], &[]);
    assert!(
        !out.status.success() && out.stderr.contains("own literal prefix"),
        "{out:?}"
    );
    // With distinct prefixes, item '5' and product 5 live side by side, and
    // deleting the item leaves the product.
    write(
        &f,
        &pg,
        "pgferry",
        &["public.products", "public.items"],
        "",
        &sink("item:{code}"),
    );
    let mut g = start_streaming(&pg, &f);
    pg.sql("INSERT INTO products VALUES (5, 'product'); INSERT INTO items VALUES ('5', 'item')");
    wait_key(&r, &f, "item:5", |v| v.is_some());
    pg.sql("DELETE FROM items WHERE code = '5'");
    wait_key(&r, &f, "item:5", |v| v.is_none());
    assert!(redis_get(&r, "k:5").unwrap().contains("product"));
    terminate(&mut g.0);
}

/// Case 6: a table without a primary key and with REPLICA IDENTITY DEFAULT.
#[test]
fn a_table_without_replica_identity_is_never_published_with_its_updates() {
    let pg = TestPg::start();
    pg.sql(
        "CREATE TABLE events (at timestamptz DEFAULT now(), what text);
         INSERT INTO events (what) VALUES ('first');",
    );
    let f = FerryDir::new();
    write_jsonl(&f, &pg, &["public.events"], "", "");
    let log = run_refused(&f);
    assert!(
        log.contains("public.events cannot be published")
            && log.contains("REPLICA IDENTITY FULL")
            && log.contains("\"public.events\" = \"insert\""),
        "{log}"
    );
    assert_eq!(
        pg.sql("SELECT count(*) FROM pg_publication_tables").trim(),
        "0"
    );
    // The application's own writes still work.
    pg.sql("UPDATE events SET what = 'edited'; DELETE FROM events WHERE what = 'x'");

    // Insert-only, as configured: inserts arrive, and the application's
    // updates and deletes keep working.
    write_jsonl(
        &f,
        &pg,
        &["public.events"],
        "publish = { \"public.events\" = \"insert\" }",
        "",
    );
    let mut g = start_streaming(&pg, &f);
    pg.sql("INSERT INTO events (what) VALUES ('second')");
    pg.sql("UPDATE events SET what = 'edited again'; DELETE FROM events WHERE what = 'second'");
    pg.sql("INSERT INTO events (what) VALUES ('third')");
    let ev = f.wait_events_until(STALL, "two inserts", |ev| ev.len() >= 2);
    let whats: Vec<&str> = ev
        .iter()
        .filter_map(|e| e["after"]["what"].as_str())
        .collect();
    assert_eq!(whats, ["second", "third"], "{ev:?}");
    assert!(ev.iter().all(|e| e["op"] == "insert"), "{ev:?}");
    assert_eq!(
        pg.sql("SELECT pubname FROM pg_publication_tables WHERE tablename = 'events'")
            .trim(),
        "pgferry_insert"
    );
    terminate(&mut g.0);
}
