//! The backfill commands (`pgferry backfill`): a request, or a cancel,
//! travels through the stream as a transactional logical message with
//! prefix [`BACKFILL_PREFIX`], so it is ordered with the changes and
//! survives a crash once committed; `--list` reads `snapshot.json`.

use super::plan::{check_filter, FilterError};
use super::state::StateFile;
use super::BACKFILL_PREFIX;
use crate::config::Config;
use crate::lsn::Lsn;
use crate::pg::{fatal, SourceError};

/// `pgferry backfill`: asks the running pgferry (through the stream) to
/// re-load a table. Returns the request's LSN.
pub async fn request_backfill(
    config: &Config,
    table: &str,
    filter: Option<&str>,
) -> Result<Lsn, SourceError> {
    let table = crate::config::canonical_table(table)
        .filter(|t| config.source.tables.contains(t))
        .ok_or_else(|| {
            fatal(format!(
                "{table} is not in source.tables ({}); only replicated tables can be backfilled",
                config.source.tables.join(", ")
            ))
        })?;
    let client = crate::pg::sql_connect(config).await?;
    if let Some(f) = filter {
        // Check the condition now rather than in the running pgferry's log.
        let (schema, name) = crate::config::split_table(&table).unwrap_or_default();
        let sql_name = format!(
            "{}.{}",
            crate::conn::quote_ident(&schema),
            crate::conn::quote_ident(&name)
        );
        check_filter(&client, &sql_name, f).await.map_err(|e| {
            let refused = |why| format!("--where {f:?} is not a valid condition on {table}: {why}");
            match e {
                FilterError::Refused(m) => fatal(refused(m)),
                FilterError::Other(e) => fatal(refused(e.to_string())).caused_by(e),
            }
        })?;
    }
    emit_backfill_request(&client, config, &table, filter).await
}

/// Emits a backfill request for `table` into the WAL (the running pgferry
/// of `source.slot` acts on it from the stream). Returns its LSN.
pub async fn emit_backfill_request(
    client: &tokio_postgres::Client,
    config: &Config,
    table: &str,
    filter: Option<&str>,
) -> Result<Lsn, SourceError> {
    let body = serde_json::json!({"table": table, "where": filter, "slot": config.source.slot});
    emit_request(client, &body).await
}

/// `pgferry backfill --cancel ID`: asks the running pgferry (through the
/// stream) to cancel a snapshot job, running or failed. Returns the
/// request's LSN.
pub async fn cancel_backfill(config: &Config, id: u64) -> Result<Lsn, SourceError> {
    let st = load(config)?;
    if !st.jobs.iter().any(|j| j.id == id) && !st.failed.iter().any(|j| j.id == id) {
        return Err(fatal(format!(
            "there is no snapshot job {id} in {}; pgferry backfill --list shows them",
            StateFile::new(&config.checkpoint.dir).path().display()
        )));
    }
    let client = crate::pg::sql_connect(config).await?;
    let body = serde_json::json!({"cancel": id, "slot": config.source.slot});
    emit_request(&client, &body).await
}

async fn emit_request(
    client: &tokio_postgres::Client,
    body: &serde_json::Value,
) -> Result<Lsn, SourceError> {
    let row = client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1::text, $2::text)::text",
            &[&BACKFILL_PREFIX, &body.to_string()],
        )
        .await
        .map_err(|e| {
            fatal(format!(
                "emitting the request failed: {}; the role needs EXECUTE on pg_logical_emit_message (GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO <role>)",
                e.as_db_error().map(|d| d.message().to_string()).unwrap_or(e.to_string())
            ))
            .caused_by(e)
        })?;
    let lsn: String = row.get(0);
    lsn.parse()
        .map_err(|_| fatal(format!("unexpected LSN {lsn:?}")))
}

/// `snapshot.json`, for the commands.
fn load(config: &Config) -> Result<super::state::State, SourceError> {
    StateFile::new(&config.checkpoint.dir)
        .load()
        .map_err(|e| fatal(e.to_string()).caused_by(e))
}

/// `pgferry backfill --list`: the snapshot jobs in `snapshot.json`, one
/// per line: running, failed (with the error), and the last finished.
pub fn list_backfills<W: std::io::Write>(config: &Config, out: &mut W) -> Result<(), SourceError> {
    let file = StateFile::new(&config.checkpoint.dir);
    let st = load(config)?;
    let io = |e: std::io::Error| fatal(format!("writing the list: {e}")).caused_by(e);
    let filter = |f: &Option<String>| {
        f.as_ref()
            .map(|f| format!(" where {f:?}"))
            .unwrap_or_default()
    };
    if st.jobs.is_empty() && st.failed.is_empty() {
        writeln!(
            out,
            "no snapshot job is running or failed ({})",
            file.path().display()
        )
        .map_err(io)?;
    }
    for j in &st.jobs {
        let ranges_done = j.ranges.iter().filter(|r| r.done).count();
        writeln!(
            out,
            "job {} {} {}{}: running, {} of ~{} rows, {ranges_done}/{} ranges done",
            j.id,
            j.kind,
            j.table,
            filter(&j.filter),
            j.rows_done,
            j.rows_estimate,
            j.ranges.len()
        )
        .map_err(io)?;
    }
    for f in &st.failed {
        writeln!(
            out,
            "job {} {} {}{}: FAILED: {} (cancel with pgferry backfill --cancel {})",
            f.id,
            f.kind,
            f.table,
            filter(&f.filter),
            f.error,
            f.id
        )
        .map_err(io)?;
    }
    for f in st.finished.iter().rev().take(10) {
        writeln!(
            out,
            "finished: {} {} ({} rows, {} s)",
            f.kind, f.table, f.rows, f.seconds
        )
        .map_err(io)?;
    }
    Ok(())
}
