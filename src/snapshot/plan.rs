//! Planning a job: the table described, a backfill's condition checked
//! without reading a row, and the table cut into key ranges that the
//! workers read in parallel.
//!
//! Invariants:
//! - a `Fatal` error here is definite (no such table, a condition Postgres
//!   refuses): the job is marked failed rather than retried;
//! - ranges cover the whole key space, in order, without overlap: each
//!   range's lower bound is the previous one's upper bound.

use super::state::{self, Job, Method, Range, State};
use super::table::{self, TableInfo};
use super::Shared;
use crate::pg::SourceError;

/// Describes the table, checks the filter, and cuts the table into ranges.
/// A `Fatal` error is definite (no such table, a condition Postgres
/// refuses); the caller inserts the returned info into `shared.infos`.
pub(super) async fn plan_job(
    shared: &Shared,
    client: &tokio_postgres::Client,
    st: &mut State,
    qualified: &str,
    filter: Option<String>,
    kind: &str,
) -> Result<(Job, TableInfo), SourceError> {
    let Some((schema, table)) = crate::config::split_table(qualified) else {
        return Err(SourceError::fatal(format!(
            "{qualified:?} is not schema.table"
        )));
    };
    let info = table::describe(client, &schema, &table)
        .await?
        .ok_or_else(|| {
            SourceError::fatal(format!(
                "table {qualified} does not exist; remove it from source.tables or create it"
            ))
        })?;
    if let Some(f) = &filter {
        check_filter(client, &info.qualified_sql(), f)
            .await
            .map_err(|e| match e {
                FilterError::Refused(m) => SourceError::fatal(format!(
                    "the condition {f:?} cannot be used on {qualified}: {m}"
                )),
                FilterError::Other(e) => e.into(),
            })?;
    }
    let method = if info.key_cols.is_empty() {
        tracing::info!(table = qualified, "no primary key or replica identity index: the table will be copied in an exported snapshot");
        Method::Copy
    } else {
        Method::Keyset
    };
    let chunk = shared.config.chunk_rows as u64;
    let parts = if method == Method::Keyset && info.rows_estimate > chunk * 4 {
        ((info.rows_estimate / (chunk * 2)) as usize)
            .min(shared.config.workers * 2)
            .clamp(1, 32)
    } else {
        1
    };
    let points = if parts > 1 && filter.is_none() {
        table::split_points(client, &info, parts).await?
    } else {
        Vec::new()
    };
    let mut ranges = Vec::new();
    let mut lower: Option<Vec<String>> = None;
    for p in points
        .iter()
        .cloned()
        .map(Some)
        .chain(std::iter::once(None))
    {
        ranges.push(Range {
            after: lower.clone(),
            upper: p.clone(),
            done: false,
            chunks_done: 0,
        });
        lower = p;
    }
    st.next_job += 1;
    let job = Job {
        id: st.next_job,
        table: qualified.to_string(),
        filter,
        kind: kind.to_string(),
        sinks: None,
        method,
        rows_estimate: info.rows_estimate,
        rows_done: 0,
        planned_at: state::unix_now(),
        ranges,
    };
    Ok((job, info))
}

/// Why a backfill condition cannot be used.
pub(crate) enum FilterError {
    /// Postgres refused it for good (syntax, unknown column, permission).
    Refused(String),
    Other(tokio_postgres::Error),
}

/// SQLSTATEs that no retry can fix in a snapshot read: syntax errors and
/// access rules (42), data exceptions (22), unsupported features (0A),
/// and writing in a read-only transaction (25006).
pub(crate) fn is_definite(code: &str) -> bool {
    code.starts_with("42") || code.starts_with("22") || code.starts_with("0A") || code == "25006"
}

/// Checks a `--where` condition on `table` (SQL name) without reading a
/// row, in a read-only transaction, as one statement (the extended
/// protocol runs no second statement smuggled in with `;`).
pub(crate) async fn check_filter(
    client: &tokio_postgres::Client,
    table: &str,
    filter: &str,
) -> Result<(), FilterError> {
    let sql = format!("SELECT 1 FROM {table} WHERE ({filter}) LIMIT 0");
    client
        .batch_execute("BEGIN READ ONLY")
        .await
        .map_err(FilterError::Other)?;
    let res = client.query(sql.as_str(), &[]).await.map(|_| ());
    let _ = client.batch_execute("ROLLBACK").await;
    res.map_err(|e| match e.as_db_error() {
        Some(d) if is_definite(d.code().code()) => {
            FilterError::Refused(format!("{}: {}", d.code().code(), d.message()))
        }
        _ => FilterError::Other(e),
    })
}
