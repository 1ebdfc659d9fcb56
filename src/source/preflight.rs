//! Preflight: everything a session checks and opens before it streams.
//!
//! It connects (bounded by `source.network.connect_timeout_secs`), checks the
//! server and the publication, reads the sinks' checkpoints, and finds or
//! creates the slot. The gap check runs before a slot is created, so a
//! dropped slot never leaves a new one behind that holds WAL for nothing, and
//! a checkpoint the slot cannot serve stops pgferry instead of skipping data.

use super::*;

/// What [`prepare`] found and opened.
pub(super) struct Prepared {
    pub(super) client: tokio_postgres::Client,
    pub(super) sql_end: oneshot::Receiver<Option<String>>,
    pub(super) repl: conn::ReplicationConn,
    pub(super) system: conn::SystemInfo,
    pub(super) version: u32,
    /// Per sink: its checkpoint, if it has one.
    pub(super) checkpoints: Vec<Option<Lsn>>,
    /// The slot's confirmed position (or its consistent point when created).
    pub(super) slot_pos: Lsn,
    pub(super) store: CheckpointStore,
    /// The server's `wal_sender_timeout` (`None`: disabled).
    pub(super) wal_sender_timeout: Option<Duration>,
    /// Tables just added to the publication (their old rows need a backfill).
    pub(super) added: Vec<String>,
}

/// Runs `f` within `source.network.connect_timeout_secs`.
pub(super) async fn within<T>(
    config: &Config,
    what: &str,
    f: impl std::future::Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    let t = config.source.network.connect_timeout();
    tokio::time::timeout(t, f).await.map_err(|_| {
        SourceError::transient(format!(
            "{what}: no answer from Postgres within {} s (source.network.connect_timeout_secs)",
            t.as_secs()
        ))
    })?
}

/// Connects, checks the publication, reads the checkpoints and finds (or
/// creates) the slot. The gap check runs before a slot is created, so a
/// dropped slot never leaves a new one behind that holds WAL for nothing.
pub(super) async fn prepare(config: &Config) -> Result<Prepared, SourceError> {
    let s = &config.source;
    let (client, sql_end) = within(
        config,
        "connecting",
        sql_connect_watched(&s.url, &s.network),
    )
    .await?;
    let slot = within(config, "reading the slot", slot_info(&client, &s.slot)).await?;
    let added = within(config, "checking the publication", async {
        Ok(crate::publication::ensure(&client, config, slot.is_some()).await?)
    })
    .await?;
    let recv_buffer = s.recv_buffer_kb.map(|k| k.saturating_mul(1024));
    let mut repl = conn::connect_url(&s.url, recv_buffer, &s.network).await?;
    let system = repl.identify_system().await?;
    let version = repl.server_version_num().unwrap_or(0);
    if version < 100000 {
        return Err(fatal(format!(
            "server version {version} is too old: logical replication with pgoutput needs PostgreSQL 10 or later"
        )));
    }
    let shown = match repl.show("wal_sender_timeout").await {
        Ok(v) => v,
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(_) => None,
    };
    let wal_sender_timeout = shown
        .and_then(|t| parse_duration_ms(&t))
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    WAL_SENDER_TIMEOUT_MS.store(
        wal_sender_timeout.map_or(0, |t| t.as_millis() as u64),
        Ordering::Release,
    );
    let store = CheckpointStore::open(&config.checkpoint.dir).map_err(|e| fatal(e.to_string()))?;
    let mut checkpoints = Vec::new();
    for sink in &config.sinks {
        let cp = store.load(sink.name()).map_err(|e| fatal(e.to_string()))?;
        if let Some(cp) = &cp {
            if cp.system_identifier != system.system_id || cp.slot != s.slot {
                return Err(fatal(format!(
                    "the checkpoint of sink {:?} belongs to slot {:?} on system {}, but this is slot {:?} on system {}; point checkpoint.dir at the right directory, or remove the file to start that sink afresh",
                    sink.name(), cp.slot, cp.system_identifier, s.slot, system.system_id
                )));
            }
        }
        checkpoints.push(cp.map(|c| c.lsn));
    }
    let (slot_pos, created) = match &slot {
        None => {
            if let Some((sink, lsn)) = config
                .sinks
                .iter()
                .zip(&checkpoints)
                .find_map(|(c, l)| l.map(|l| (c.name(), l)))
            {
                return Err(fatal(format!(
                    "changes were lost: replication slot {:?} does not exist, but sink {sink:?} has a checkpoint at {lsn}. \
                     The slot was dropped, so the changes after that checkpoint are gone for the sinks, and a new slot would start after the gap; pgferry creates none. \
                     Re-load the sinks from the tables (source.snapshot = \"initial\"), then remove the checkpoint files in {} so that pgferry starts afresh with a new slot",
                    s.slot,
                    config.checkpoint.dir.display()
                )));
            }
            if !s.create_slot {
                return Err(fatal(format!(
                    "replication slot {:?} does not exist and source.create_slot is false; create it with SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
                    s.slot, s.slot
                )));
            }
            let lsn = repl.create_slot(&s.slot).await.map_err(slot_create_error)?;
            tracing::info!(slot = %s.slot, consistent_point = %lsn, "created replication slot");
            (lsn, true)
        }
        Some(info) => {
            check_slot(config, info, system.dbname.as_deref())?;
            (info.confirmed_flush.unwrap_or(Lsn::ZERO), false)
        }
    };
    gap_check(config, &checkpoints, slot_pos, created)?;
    Ok(Prepared {
        client,
        sql_end,
        repl,
        system,
        version,
        checkpoints,
        slot_pos,
        store,
        wal_sender_timeout,
        added,
    })
}

/// The slot exists: it must be ours to use.
pub(super) fn check_slot(
    config: &Config,
    info: &SlotInfo,
    database: Option<&str>,
) -> Result<(), SourceError> {
    let s = &config.source;
    if let Some(why) = slot_mismatch(info, &s.slot, database) {
        return Err(fatal(why));
    }
    if info.wal_status.as_deref() == Some("lost") {
        return Err(fatal(crate::observe::lost_slot_message(
            &s.slot,
            &config.checkpoint.dir,
        )));
    }
    Ok(())
}

/// No sink may start behind the slot: the changes in between are gone.
pub(super) fn gap_check(
    config: &Config,
    checkpoints: &[Option<Lsn>],
    slot_pos: Lsn,
    created: bool,
) -> Result<(), SourceError> {
    let s = &config.source;
    for (sink, cp) in config.sinks.iter().zip(checkpoints) {
        match cp {
            Some(cp) if slot_pos > *cp => {
                return Err(fatal(format!(
                    "changes were lost: slot {:?} has confirmed_flush_lsn {slot_pos}, ahead of the checkpoint {cp} of sink {:?}. \
                     The slot was dropped and recreated, or another consumer advanced it, so the changes in between are gone for this sink. \
                     pgferry will not stream on over the gap. Re-load the sink from the table (snapshot), then remove {} to resume from the slot's position",
                    s.slot,
                    sink.name(),
                    config.checkpoint.dir.join(format!("{}.checkpoint.json", sink.name())).display()
                )));
            }
            Some(_) => {}
            None if !created => {
                tracing::warn!(sink = sink.name(), slot = %s.slot, position = %slot_pos, "sink has no checkpoint; it starts at the slot's confirmed position");
            }
            None => {}
        }
    }
    Ok(())
}

/// Creating the slot failed: all slots in use is the operator's to fix,
/// not something a retry can.
pub(super) fn slot_create_error(e: ConnError) -> SourceError {
    match &e {
        ConnError::Server { code, .. } if code == "53400" => fatal(format!(
            "cannot create the replication slot: {e}. Every slot is taken (max_replication_slots): drop an unused one \
             (SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active AND …), \
             or raise max_replication_slots (ALTER SYSTEM SET max_replication_slots = …; then restart Postgres)"
        )),
        _ => e.into(),
    }
}

/// Tables just added to a publication start with their changes only: the
/// rows they already hold need a backfill. With `source.snapshot =
/// "initial"` pgferry requests it itself (through the stream, like `pgferry
/// backfill`); otherwise it says so, with the command. On the very first
/// start (`fresh`) the initial snapshot, if any, covers them.
pub(super) async fn backfill_added_tables(
    client: &tokio_postgres::Client,
    config: &Config,
    added: &[String],
    fresh: bool,
) {
    if fresh || added.is_empty() {
        return;
    }
    let auto = config.source.snapshot == crate::config::SnapshotMode::Initial;
    for table in added {
        if auto {
            match crate::snapshot::emit_backfill_request(client, config, table, None).await {
                Ok(lsn) => {
                    tracing::warn!(table = %table, at = %lsn, "table added to the publication: its changes are replicated from now on, and a backfill of its rows was requested (source.snapshot = \"initial\")");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(table = %table, error = %e, "could not request a backfill of the added table")
                }
            }
        }
        tracing::warn!(table = %table, "table added to the publication: its changes are replicated from now on, but the rows it already holds are not in the sinks; load them with: pgferry backfill --config <this config> --table {table}");
    }
}

/// The configured tables, each bound to the relation the catalog gives its
/// name now (see `decode::routes`: a configured name then follows its
/// table by OID through renames).
pub(super) async fn table_routes(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<Routes, SourceError> {
    let names = config.source.table_names();
    let mut routes = Routes::only(names.iter().cloned());
    let sql: Vec<String> = names
        .iter()
        .map(|(s, t)| crate::config::sql_table(s, t))
        .collect();
    let rows = client
        .query(
            "SELECT n.i::int, pg_catalog.to_regclass(n.name)::pg_catalog.oid \
             FROM unnest($1::pg_catalog.text[]) WITH ORDINALITY AS n(name, i)",
            &[&sql],
        )
        .await?;
    for row in rows {
        let i: i32 = row.get(0);
        let oid: Option<u32> = row.get(1);
        if let (Some((schema, table)), Some(oid)) = (names.get(i as usize - 1), oid) {
            routes.bind_initial(schema, table, oid);
        }
    }
    Ok(routes)
}

/// The server's `wal_sender_timeout` as last read (0: disabled or unknown).
pub(super) static WAL_SENDER_TIMEOUT_MS: AtomicU64 = AtomicU64::new(0);

/// The server's `wal_sender_timeout`, as the last session read it (`None`:
/// disabled, or no session got that far yet).
pub fn wal_sender_timeout() -> Option<Duration> {
    match WAL_SENDER_TIMEOUT_MS.load(Ordering::Acquire) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

/// Parses a GUC duration as SHOW prints it (`60s`, `500ms`, `1min`, `0`).
pub(super) fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    Some(match unit.trim() {
        "" | "ms" => n,
        "s" => n * 1000,
        "min" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guc_durations() {
        assert_eq!(parse_duration_ms("60s"), Some(60_000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("2min"), Some(120_000));
        assert_eq!(parse_duration_ms("0"), Some(0));
        assert_eq!(parse_duration_ms("x"), None);
    }
}
