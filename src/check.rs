//! `pgferry check` and `pgferry slot status|drop`: operator tools that talk
//! to the source over ordinary SQL and print one line per finding.
//!
//! Every failed check prints the fix next to it. Nothing here changes the
//! server except `slot drop`.

use std::io::Write;

use crate::checkpoint::CheckpointStore;
use crate::config::{Config, SinkConfig};
use crate::conn::tls::{self, TlsInfo};
use crate::pg::{self, slot_info};

struct Report<'a, W: Write> {
    out: &'a mut W,
    ok: bool,
}

impl<W: Write> Report<'_, W> {
    fn pass(&mut self, what: impl AsRef<str>) {
        let _ = writeln!(self.out, "OK   {}", what.as_ref());
    }
    /// A finding that does not stop pgferry from working.
    fn warn(&mut self, what: impl AsRef<str>, fix: impl AsRef<str>) {
        let _ = writeln!(
            self.out,
            "WARN {}\n     fix: {}",
            what.as_ref(),
            fix.as_ref()
        );
    }
    fn fail(&mut self, what: impl AsRef<str>, fix: impl AsRef<str>) {
        self.ok = false;
        let _ = writeln!(
            self.out,
            "FAIL {}\n     fix: {}",
            what.as_ref(),
            fix.as_ref()
        );
    }
}

/// Runs every check; returns true when all passed.
pub async fn run<W: Write>(config: &Config, out: &mut W) -> bool {
    let mut r = Report { out, ok: true };
    r.pass("config is valid");
    if config.metrics.enabled {
        let addr = &config.metrics.listen;
        match tokio::net::TcpListener::bind(addr).await {
            Ok(_) => r.pass(format!("metrics.listen {addr} is free")),
            Err(e) => r.fail(
                format!("cannot listen on metrics.listen {addr}: {e}"),
                "choose a free address for metrics.listen (is a pgferry already running with it?), or set metrics.enabled = false",
            ),
        }
    }
    let client = match pg::sql_connect_tls(&config.source.url, &config.source.network).await {
        Ok((c, _, info)) => {
            r.pass(format!("connected to {}", config.source.redacted_url()));
            tls_line(&mut r, "SQL connection", &config.source.url, info.as_ref());
            c
        }
        Err(e) => {
            let msg = e.to_string();
            r.fail(
                format!("cannot connect to {}: {msg}", config.source.redacted_url()),
                tls::fix_for(&msg)
                    .unwrap_or("check source.url, that the server runs, and pg_hba.conf"),
            );
            return false;
        }
    };
    checks(&client, config, &mut r).await;
    r.ok
}

/// One line on a connection's TLS: on (protocol, verified name) or off.
fn tls_line<W: Write>(r: &mut Report<'_, W>, which: &str, url: &str, info: Option<&TlsInfo>) {
    let mode = tls::split_url(url)
        .map(|(_, p)| p.mode())
        .unwrap_or_default();
    match info {
        Some(i) if matches!(i.mode, tls::SslMode::VerifyFull) => {
            r.pass(format!("{which}: {}", i.describe()))
        }
        Some(i) => r.warn(
            format!("{which}: {}", i.describe()),
            "set sslmode=verify-full and sslrootcert (a CA file, or system) so that pgferry checks whom it talks to",
        ),
        None if mode == tls::SslMode::Disable => r.warn(
            format!("{which}: TLS off (sslmode=disable)"),
            "outside one trusted network, set sslmode=verify-full and sslrootcert",
        ),
        None => r.warn(
            format!("{which}: TLS off (sslmode={}: the server offered no TLS, refused the login over TLS, or the TLS handshake failed (logged above), and the connection fell back to plain as libpq does; or it is a Unix socket)", mode.as_str()),
            "turn on ssl on the server and set sslmode=verify-full and sslrootcert",
        ),
    }
}

async fn checks<W: Write>(client: &tokio_postgres::Client, config: &Config, r: &mut Report<'_, W>) {
    let s = &config.source;
    let q = |sql: &'static str| async move { client.query_one(sql, &[]).await };

    match pg::server_version(client).await {
        Ok(v) if v >= 140000 => r.pass(format!("server version {v} (streaming of large transactions available)")),
        Ok(v) if v >= 100000 => r.pass(format!("server version {v} (before 14: large transactions are not streamed, pgferry spills them)")),
        Ok(v) => r.fail(format!("server version {v} is too old"), "upgrade to PostgreSQL 10 or later (14+ recommended)"),
        Err(e) => r.fail(format!("cannot read server version: {e}"), "check the connection"),
    }
    match q("SELECT current_setting('wal_level')").await {
        Ok(row) if row.get::<_, String>(0) == "logical" => r.pass("wal_level = logical"),
        Ok(row) => r.fail(
            format!("wal_level = {}", row.get::<_, String>(0)),
            "ALTER SYSTEM SET wal_level = logical; then restart Postgres",
        ),
        Err(e) => r.fail(
            format!("cannot read wal_level: {e}"),
            "check the connection",
        ),
    }
    match q("SELECT current_setting('max_replication_slots')::int, current_setting('max_wal_senders')::int").await {
        Ok(row) if row.get::<_, i32>(0) > 0 && row.get::<_, i32>(1) > 0 => {
            r.pass(format!("max_replication_slots = {}, max_wal_senders = {}", row.get::<_, i32>(0), row.get::<_, i32>(1)))
        }
        Ok(_) => r.fail(
            "max_replication_slots or max_wal_senders is 0",
            "ALTER SYSTEM SET max_replication_slots = 10; ALTER SYSTEM SET max_wal_senders = 10; then restart",
        ),
        Err(e) => r.fail(format!("cannot read replication settings: {e}"), "check the connection"),
    }
    match q("SELECT current_user::text, rolreplication OR rolsuper OR EXISTS (SELECT FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid WHERE g.rolname = 'rds_replication' AND m.member = r.oid) FROM pg_roles r WHERE rolname = current_user").await {
        Ok(row) if row.get::<_, bool>(1) => r.pass(format!("role {} has the REPLICATION privilege", row.get::<_, String>(0))),
        Ok(row) => {
            let user: String = row.get(0);
            r.fail(format!("role {user} lacks the REPLICATION privilege"), format!("ALTER ROLE {user} REPLICATION;"))
        }
        Err(e) => r.fail(format!("cannot read role attributes: {e}"), "check the connection"),
    }
    let mut sys_id = String::new();
    match crate::conn::connect_url(&s.url, None, &s.network).await {
        Ok(mut c) => {
            tls_line(r, "replication connection", &s.url, c.tls());
            match c.identify_system().await {
                Ok(sys) => {
                    r.pass(format!(
                        "replication connection works (system {}, timeline {}, WAL at {})",
                        sys.system_id, sys.timeline, sys.xlogpos
                    ));
                    sys_id = sys.system_id;
                }
                Err(e) => r.fail(
                    format!("IDENTIFY_SYSTEM failed: {e}"),
                    "check the REPLICATION privilege",
                ),
            }
        }
        Err(e) => {
            let msg = e.to_string();
            r.fail(
                format!("replication connection refused: {msg}"),
                tls::fix_for(&msg).unwrap_or("allow it in pg_hba.conf (a line for database 'replication' is not needed for logical replication, but the role needs REPLICATION and the database must be allowed)"),
            )
        }
    }

    let database = match q("SELECT current_database()::text").await {
        Ok(row) => row.get::<_, String>(0),
        Err(_) => String::new(),
    };
    let slot = slot_info(client, &s.slot).await.ok().flatten();
    publication_checks(client, config, slot.is_some(), r).await;
    if config.heartbeat.enabled {
        match q("SELECT has_function_privilege('pg_logical_emit_message(boolean, text, text)', 'EXECUTE'), current_user::text").await {
            Ok(row) if row.get::<_, bool>(0) => r.pass("heartbeat: pg_logical_emit_message is allowed"),
            Ok(row) => r.warn(
                "heartbeat: pg_logical_emit_message is not allowed for this role; an idle database can then hold WAL behind the slot",
                format!(
                    "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO {}; (or set heartbeat.enabled = false)",
                    row.get::<_, String>(1)
                ),
            ),
            Err(e) => r.fail(format!("cannot check the heartbeat's privilege: {e}"), "check the connection"),
        }
    }
    privilege_checks(client, config, r).await;
    slot_checks(client, config, &database, r).await;
    let owner = crate::sink::StreamOwner {
        system_identifier: sys_id,
        database,
        slot: s.slot.clone(),
    };
    for sink in &config.sinks {
        sink_checks(client, config, sink, &owner, r).await;
    }
}

/// The publications and tables: what `run` would refuse, what it would
/// create or add itself, and the replica identity of each table.
async fn publication_checks<W: Write>(
    client: &tokio_postgres::Client,
    config: &Config,
    slot_exists: bool,
    r: &mut Report<'_, W>,
) {
    let insp = match crate::publication::inspect(client, config).await {
        Ok(i) => i,
        Err(e) => {
            return r.fail(
                format!("cannot read the publications and tables: {e}"),
                "check the connection and privileges",
            )
        }
    };
    for t in &insp.tables {
        use crate::publication::Identity;
        let what = match t.identity {
            Identity::PrimaryKey => "replica identity is the primary key",
            Identity::Index => "replica identity is a unique index",
            Identity::Full => "replica identity FULL (before-images carry the whole row)",
            Identity::Missing(_) if t.exists && t.ops == crate::config::PublishOps::Insert => {
                "no replica identity, replicated insert-only (source.publish)"
            }
            Identity::Missing(_) => continue,
        };
        r.pass(format!("{}: {what}", t.name));
    }
    let managed = config.source.create_publication;
    let found = crate::publication::findings(&insp, slot_exists);
    for f in &found {
        match &f.repair {
            Some(sql) if managed && f.adds.is_empty() => {
                r.pass(format!("{}; pgferry run does: {sql}", f.what))
            }
            Some(sql) if managed && insp.main.exists => r.warn(
                format!("{}; pgferry run adds it: {sql}", f.what),
                format!(
                    "nothing for the changes; the rows it already holds need a backfill (pgferry backfill --table {}; automatic with source.snapshot = \"initial\")",
                    f.adds.join(", ")
                ),
            ),
            Some(sql) if managed => r.pass(format!("{}; pgferry run does: {sql}", f.what)),
            _ => r.fail(&f.what, &f.fix),
        }
    }
    for p in [&insp.main, &insp.insert] {
        if p.exists
            && !found
                .iter()
                .any(|f| f.what.contains(&format!("publication {}", p.name)))
        {
            r.pass(format!("publication {} exists", p.name));
        }
    }
}

/// SELECT on every table (snapshots and backfills read them), and the
/// bound on the WAL a slot may hold (`max_slot_wal_keep_size`, 13+).
async fn privilege_checks<W: Write>(
    client: &tokio_postgres::Client,
    config: &Config,
    r: &mut Report<'_, W>,
) {
    let initial = config.source.snapshot == crate::config::SnapshotMode::Initial;
    for (schema, table) in config.source.table_names() {
        let name = crate::config::sql_table(&schema, &table);
        let row = client
            .query_one(
                "SELECT has_table_privilege(to_regclass($1), 'SELECT'), current_user::text",
                &[&name],
            )
            .await;
        match row {
            Ok(row) => {
                match row.get::<_, Option<bool>>(0) {
                    Some(true) => r.pass(format!(
                        "{schema}.{table}: SELECT allowed (snapshots and backfills)"
                    )),
                    Some(false) => {
                        let what = format!("{schema}.{table}: no SELECT privilege; snapshots and backfills of it fail");
                        let fix = format!(
                            "GRANT SELECT ON {name} TO {}; (pgferry setup does it)",
                            crate::config::sql_ident(&row.get::<_, String>(1))
                        );
                        if initial {
                            r.fail(what, fix)
                        } else {
                            r.warn(what, fix)
                        }
                    }
                    None => {} // a missing table is reported with the publications
                }
            }
            Err(e) => r.fail(
                format!("cannot check SELECT on {name}: {e}"),
                "check the connection",
            ),
        }
    }
    match client
        .query_one("SELECT current_setting('max_slot_wal_keep_size', true)", &[])
        .await
    {
        Ok(row) => match row.get::<_, Option<String>>(0).as_deref() {
            None => {}
            Some("-1") => r.warn(
                "max_slot_wal_keep_size = -1: a slot that falls behind (pgferry stopped) retains WAL without bound and can fill the server's disk",
                "ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf(); (size it above the WAL of the longest pgferry outage; past it the slot is invalidated and pgferry needs a new snapshot)",
            ),
            Some(v) => r.pass(format!(
                "max_slot_wal_keep_size = {v} (past it the slot is invalidated; pgferry then needs a new snapshot)"
            )),
        },
        Err(e) => r.fail(format!("cannot read max_slot_wal_keep_size: {e}"), "check the connection"),
    }
}

/// The slot: its plugin, database and state, or that it can be created.
async fn slot_checks<W: Write>(
    client: &tokio_postgres::Client,
    config: &Config,
    database: &str,
    r: &mut Report<'_, W>,
) {
    let s = &config.source;
    match slot_info(client, &s.slot).await {
        Ok(Some(info)) => {
            if let Some(why) = pg::slot_mismatch(&info, &s.slot, Some(database).filter(|d| !d.is_empty())) {
                r.fail(why, "see above");
            } else if info.wal_status.as_deref() == Some("lost") {
                r.fail(
                    format!("slot {} is invalidated (wal_status = lost)", s.slot),
                    format!(
                        "drop it (pgferry slot drop), remove the checkpoint files in {}, and start with source.snapshot = \"initial\" to reload every table",
                        config.checkpoint.dir.display()
                    ),
                );
            } else {
                r.pass(format!(
                    "slot {} exists (pgoutput, database {}, confirmed_flush_lsn {}, {})",
                    s.slot,
                    info.database.as_deref().unwrap_or("-"),
                    info.confirmed_flush.map(|l| l.to_string()).unwrap_or("-".into()),
                    if info.active { "in use" } else { "not in use" }
                ));
            }
        }
        Ok(None) if s.create_slot => {
            let used = client
                .query_one(
                    "SELECT (SELECT count(*) FROM pg_replication_slots)::int, current_setting('max_replication_slots')::int",
                    &[],
                )
                .await;
            match used {
                Ok(row) if row.get::<_, i32>(0) >= row.get::<_, i32>(1) => r.fail(
                    format!(
                        "slot {} is missing and cannot be created: all {} replication slots are taken (max_replication_slots)",
                        s.slot,
                        row.get::<_, i32>(1)
                    ),
                    "drop an unused slot (SELECT slot_name, active FROM pg_replication_slots; then SELECT pg_drop_replication_slot('…')), or raise max_replication_slots (ALTER SYSTEM SET max_replication_slots = …; restart Postgres)",
                ),
                _ => r.pass(format!("slot {} is missing and will be created", s.slot)),
            }
        }
        Ok(None) => r.fail(
            format!("slot {} does not exist", s.slot),
            format!("SELECT pg_create_logical_replication_slot('{}', 'pgoutput'); (or set source.create_slot = true)", s.slot),
        ),
        Err(e) => r.fail(format!("cannot read pg_replication_slots: {e}"), "check privileges"),
    }
}

/// One sink: that it can be reached with its credentials, and that its key
/// templates (or id columns) use columns of each table's replica identity.
async fn sink_checks<W: Write>(
    client: &tokio_postgres::Client,
    config: &Config,
    sink: &SinkConfig,
    owner: &crate::sink::StreamOwner,
    r: &mut Report<'_, W>,
) {
    let name = sink.name();
    match sink {
        SinkConfig::Jsonl(c) if c.path.as_os_str() == "-" => {
            r.pass(format!("sink {name}: writes to stdout"))
        }
        SinkConfig::Jsonl(c) => match writable_dir(&c.path) {
            Ok(dir) => r.pass(format!(
                "sink {name}: {} is writable ({})",
                dir.display(),
                c.path.display()
            )),
            Err(e) => r.fail(
                format!("sink {name}: cannot write {}: {e}", c.path.display()),
                "create the directory, or fix its permissions, or change the sink's path",
            ),
        },
        SinkConfig::Null(_) => r.pass(format!("sink {name}: discards everything")),
        SinkConfig::Redis(c) => {
            match crate::sink::redis::RedisSink::open(c, owner.clone()).await {
                Ok(mut sink) => match sink.probe().await {
                    Ok(what) => r.pass(format!("sink {name}: {what}")),
                    Err(e) => r.fail(
                        format!("sink {name}: {e}"),
                        "check the sink's url (host, port, user, password, database), that Redis runs, and its TLS settings",
                    ),
                },
                Err(e) => r.fail(format!("sink {name}: {e}"), "fix the sink's config"),
            }
            for (table, t) in &c.tables {
                let cols: Vec<String> = crate::sink::key::KeyTemplate::parse(&t.key)
                    .map(|k| k.columns().map(str::to_string).collect())
                    .unwrap_or_default();
                key_columns_check(
                    client,
                    config,
                    name,
                    table,
                    &format!("key template {:?}", t.key),
                    &cols,
                    r,
                )
                .await;
            }
        }
        SinkConfig::Nats(c) => match crate::sink::nats::NatsSink::open(c, owner.clone()) {
            Ok(mut sink) => match sink.probe().await {
                Ok(what) => r.pass(format!("sink {name}: {what}")),
                Err(e) => r.fail(
                    format!("sink {name}: {e}"),
                    "check the sink's url, credentials and TLS settings, that nats-server runs with JetStream (-js), and the stream",
                ),
            },
            Err(e) => r.fail(format!("sink {name}: {e}"), "fix the sink's config"),
        },
        SinkConfig::Elasticsearch(c) => {
            match crate::sink::elasticsearch::probe(c).await {
                Ok((version, indices)) => {
                    r.pass(format!("sink {name}: {version}"));
                    for (index, exists) in indices {
                        r.pass(format!(
                            "sink {name}: index {index} {}",
                            if exists { "exists and is readable" } else { "does not exist yet (created on first use)" }
                        ));
                    }
                }
                Err(e) => r.fail(
                    format!("sink {name}: {e}"),
                    "check the sink's url, credentials (username/password or api_key), ca_file, and that the user may read and write the indices",
                ),
            }
            for (table, t) in &c.tables {
                if let Some(cols) = &t.id_columns {
                    key_columns_check(client, config, name, table, "id_columns", cols, r).await;
                }
            }
        }
        SinkConfig::Kafka(c) => match crate::sink::kafka::probe(c).await {
            Ok(what) => r.pass(format!("sink {name}: {what}")),
            Err(e) => r.fail(
                format!("sink {name}: {e}"),
                "check the sink's brokers, the security settings in [sink.kafka], and that the brokers run",
            ),
        },
        #[cfg(feature = "iceberg")]
        SinkConfig::Iceberg(c) => match crate::sink::iceberg::IcebergSink::open(c).await {
            Ok(_) => r.pass(format!(
                "sink {name}: the Iceberg catalog {} opens (warehouse {})",
                c.catalog_path().display(),
                c.warehouse.display()
            )),
            Err(e) => r.fail(
                format!("sink {name}: {e}"),
                "check that the warehouse directory and the catalog file are writable",
            ),
        },
    }
}

/// A key template's (or id's) columns must exist, and be part of the
/// replica identity unless the table is insert-only: otherwise an update or
/// delete does not carry the old key, and the sink stops at the first one.
async fn key_columns_check<W: Write>(
    client: &tokio_postgres::Client,
    config: &Config,
    sink: &str,
    table: &str,
    what: &str,
    columns: &[String],
    r: &mut Report<'_, W>,
) {
    let Some((schema, tbl)) = crate::config::split_table(table) else {
        return;
    };
    let cols = match crate::publication::identity_columns(client, &schema, &tbl).await {
        Ok(Some(c)) => c,
        Ok(None) => return, // reported with the publication checks
        Err(e) => {
            return r.fail(
                format!("cannot read the columns of {table}: {e}"),
                "check privileges",
            )
        }
    };
    let insert_only = config.source.publish_ops(table) == crate::config::PublishOps::Insert;
    let identity: Vec<&str> = cols
        .iter()
        .filter(|(_, k)| *k)
        .map(|(n, _)| n.as_str())
        .collect();
    for c in columns {
        match cols.iter().find(|(n, _)| n == c) {
            None => {
                return r.fail(
                    format!("sink {sink}: {what} of {table} names column {c:?}, which {table} does not have"),
                    format!("use columns of the table (its replica identity: {})", identity.join(", ")),
                )
            }
            Some((_, false)) if !insert_only => {
                return r.fail(
                    format!(
                        "sink {sink}: {what} of {table} uses column {c:?}, which is not in the table's replica identity ({}): updates and deletes would not carry its old value",
                        identity.join(", ")
                    ),
                    format!(
                        "build the key from the replica identity columns, or ALTER TABLE {} REPLICA IDENTITY FULL;",
                        crate::config::sql_table(&schema, &tbl)
                    ),
                )
            }
            Some(_) => {}
        }
    }
    r.pass(format!(
        "sink {sink}: {what} of {table} uses replica identity columns"
    ));
}

/// The directory `path` goes into, once it is checked writable (by creating
/// and removing a file in it, or in the nearest existing parent when it
/// does not exist yet: pgferry creates it).
fn writable_dir(path: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let mut dir = path.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    if dir.as_os_str().is_empty() {
        dir = ".".into();
    }
    let mut probe_dir = dir.clone();
    while !probe_dir.exists() {
        match probe_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => probe_dir = p.to_path_buf(),
            _ => {
                probe_dir = ".".into();
                break;
            }
        }
    }
    if !probe_dir.is_dir() {
        return Err(format!("{} is not a directory", probe_dir.display()));
    }
    let probe = probe_dir.join(format!(".pgferry-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| format!("{}: {e}", probe_dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(dir)
}

/// Prints the slot's state and each sink's checkpoint.
pub async fn slot_status<W: Write>(config: &Config, out: &mut W) -> anyhow::Result<()> {
    let client = pg::sql_connect(config).await?;
    let s = &config.source;
    match slot_info(&client, &s.slot).await? {
        None => writeln!(out, "slot {}: does not exist", s.slot)?,
        Some(info) => {
            let retained = client
                .query_one(
                    "SELECT pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&s.slot],
                )
                .await
                .ok()
                .and_then(|r| r.get::<_, Option<String>>(0));
            writeln!(out, "slot {}", s.slot)?;
            writeln!(
                out,
                "  plugin:              {}",
                info.plugin.unwrap_or_default()
            )?;
            writeln!(
                out,
                "  database:            {}",
                info.database.unwrap_or_default()
            )?;
            writeln!(out, "  active:              {}", info.active)?;
            writeln!(
                out,
                "  confirmed_flush_lsn: {}",
                info.confirmed_flush
                    .map(|l| l.to_string())
                    .unwrap_or("-".into())
            )?;
            writeln!(
                out,
                "  restart_lsn:         {}",
                info.restart_lsn
                    .map(|l| l.to_string())
                    .unwrap_or("-".into())
            )?;
            writeln!(
                out,
                "  wal_status:          {}",
                info.wal_status.unwrap_or("-".into())
            )?;
            writeln!(
                out,
                "  retained WAL:        {}",
                retained.unwrap_or("-".into())
            )?;
        }
    }
    let store = CheckpointStore::open(&config.checkpoint.dir)?;
    for sink in &config.sinks {
        match store.load(sink.name())? {
            Some(cp) => writeln!(out, "sink {}: checkpoint {}", sink.name(), cp.lsn)?,
            None => writeln!(out, "sink {}: no checkpoint", sink.name())?,
        }
    }
    Ok(())
}

/// Drops the slot.
pub async fn slot_drop<W: Write>(config: &Config, out: &mut W) -> anyhow::Result<()> {
    let client = pg::sql_connect(config).await?;
    let s = &config.source;
    match slot_info(&client, &s.slot).await? {
        None => writeln!(out, "slot {} does not exist; nothing to drop", s.slot)?,
        Some(info) if info.active => anyhow::bail!(
            "slot {} is in use by a running consumer; stop pgferry first",
            s.slot
        ),
        Some(_) => {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&s.slot])
                .await?;
            writeln!(out, "dropped slot {}", s.slot)?;
            writeln!(
                out,
                "the checkpoints in {} are kept: a new slot starts later in the WAL, so pgferry will refuse to run over the gap until you remove them (after re-loading the sinks)",
                config.checkpoint.dir.display()
            )?;
        }
    }
    Ok(())
}
