//! `pgferry check` and `pgferry slot status|drop`: operator tools that talk
//! to the source over ordinary SQL and print one line per finding.
//!
//! Every failed check prints the fix next to it. Nothing here changes the
//! server except `slot drop`.

use std::io::Write;

use crate::checkpoint::CheckpointStore;
use crate::config::Config;
use crate::source::{self, slot_info};

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
    let client = match source::sql_connect(config).await {
        Ok(c) => {
            r.pass(format!("connected to {}", config.source.redacted_url()));
            c
        }
        Err(e) => {
            r.fail(
                format!("cannot connect to {}: {e}", config.source.redacted_url()),
                "check source.url, that the server runs, and pg_hba.conf",
            );
            return false;
        }
    };
    checks(&client, config, &mut r).await;
    r.ok
}

async fn checks<W: Write>(client: &tokio_postgres::Client, config: &Config, r: &mut Report<'_, W>) {
    let s = &config.source;
    let q = |sql: &'static str| async move { client.query_one(sql, &[]).await };

    match source::server_version(client).await {
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
    match q("SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user").await {
        Ok(row) if row.get::<_, bool>(1) => r.pass(format!("role {} has the REPLICATION privilege", row.get::<_, String>(0))),
        Ok(row) => {
            let user: String = row.get(0);
            r.fail(format!("role {user} lacks the REPLICATION privilege"), format!("ALTER ROLE {user} REPLICATION;"))
        }
        Err(e) => r.fail(format!("cannot read role attributes: {e}"), "check the connection"),
    }
    match s.url.parse::<tokio_postgres::Config>() {
        Ok(pg) => match crate::conn::connect(&pg).await {
            Ok(mut c) => match c.identify_system().await {
                Ok(sys) => r.pass(format!("replication connection works (system {}, timeline {}, WAL at {})", sys.system_id, sys.timeline, sys.xlogpos)),
                Err(e) => r.fail(format!("IDENTIFY_SYSTEM failed: {e}"), "check the REPLICATION privilege"),
            },
            Err(e) => r.fail(
                format!("replication connection refused: {e}"),
                "allow it in pg_hba.conf (a line for database 'replication' is not needed for logical replication, but the role needs REPLICATION and the database must be allowed)",
            ),
        },
        Err(e) => r.fail(format!("source.url: {e}"), "fix source.url"),
    }

    let publication_exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&s.publication],
        )
        .await
        .map(|r| r.is_some())
        .unwrap_or(false);
    if publication_exists {
        r.pass(format!("publication {} exists", s.publication));
    } else if s.create_publication {
        r.pass(format!(
            "publication {} is missing and will be created for source.tables",
            s.publication
        ));
    } else {
        r.fail(
            format!("publication {} does not exist", s.publication),
            format!(
                "CREATE PUBLICATION {} FOR TABLE {};  (or set source.create_publication = true)",
                s.publication,
                s.tables.join(", ")
            ),
        );
    }
    for (schema, table) in s.table_names() {
        let name = format!("{schema}.{table}");
        let row = client
            .query_opt(
                "SELECT c.relreplident::text, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &table],
            )
            .await;
        match row {
            Ok(None) => r.fail(
                format!("table {name} does not exist"),
                "create it, or remove it from source.tables",
            ),
            Err(e) => r.fail(
                format!("cannot inspect {name}: {e}"),
                "check the connection and privileges",
            ),
            Ok(Some(row)) => {
                let ident: String = row.get(0);
                let has_pk: bool = row.get(1);
                match (ident.as_str(), has_pk) {
                    ("d", true) => r.pass(format!("{name}: replica identity is the primary key")),
                    ("d", false) => r.fail(
                        format!("{name} has no primary key: updates and deletes cannot be replicated (Postgres refuses them once published)"),
                        format!("add a primary key, or ALTER TABLE {name} REPLICA IDENTITY FULL;"),
                    ),
                    ("f", _) => r.pass(format!("{name}: replica identity FULL (before-images carry the whole row)")),
                    ("i", _) => r.pass(format!("{name}: replica identity is a unique index")),
                    _ => r.fail(
                        format!("{name} has REPLICA IDENTITY NOTHING: updates and deletes carry no key"),
                        format!("ALTER TABLE {name} REPLICA IDENTITY DEFAULT; (with a primary key) or FULL"),
                    ),
                }
                if publication_exists {
                    let published = client
                        .query_opt(
                            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                            &[&s.publication, &schema, &table],
                        )
                        .await
                        .map(|r| r.is_some())
                        .unwrap_or(false);
                    if published {
                        r.pass(format!("{name} is in publication {}", s.publication));
                    } else {
                        r.fail(
                            format!("{name} is not in publication {}", s.publication),
                            format!("ALTER PUBLICATION {} ADD TABLE {name};", s.publication),
                        );
                    }
                }
            }
        }
    }
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
    match slot_info(client, &s.slot).await {
        Ok(Some(info)) => {
            if info.plugin.as_deref() != Some("pgoutput") {
                r.fail(
                    format!("slot {} uses plugin {:?}", s.slot, info.plugin),
                    "drop it (pgferry slot drop) or choose another source.slot",
                );
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
                    "slot {} exists (pgoutput, confirmed_flush_lsn {}, {})",
                    s.slot,
                    info.confirmed_flush.map(|l| l.to_string()).unwrap_or("-".into()),
                    if info.active { "in use" } else { "not in use" }
                ));
            }
        }
        Ok(None) if s.create_slot => r.pass(format!("slot {} is missing and will be created", s.slot)),
        Ok(None) => r.fail(
            format!("slot {} does not exist", s.slot),
            format!("SELECT pg_create_logical_replication_slot('{}', 'pgoutput'); (or set source.create_slot = true)", s.slot),
        ),
        Err(e) => r.fail(format!("cannot read pg_replication_slots: {e}"), "check privileges"),
    }
}

/// Prints the slot's state and each sink's checkpoint.
pub async fn slot_status<W: Write>(config: &Config, out: &mut W) -> anyhow::Result<()> {
    let client = source::sql_connect(config).await?;
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
    let client = source::sql_connect(config).await?;
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
