//! A snapshot worker: takes a key range (or a whole key-less table), reads
//! it chunk by chunk between watermarks on its own SQL connection, and
//! hands the rows to the stream side. At most one chunk per worker is in
//! memory at a time: the next read starts once the stream side took the
//! previous chunk at its high watermark.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use tokio::sync::oneshot;

use super::copy::RowParser;
use super::state::{Job, Method};
use super::table::{self, TableInfo};
use super::{ChunkData, Completion, Mark, Refused, Registered, Shared, WATERMARK_PREFIX};
use crate::decode::types::TypeRegistry;
use crate::event::Row;
use crate::event::{Change, Op};
use crate::flow::Backoff;

type Client = tokio_postgres::Client;

/// Why a unit of snapshot work stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Worth retrying: a lost connection, the session ending.
    Retry(String),
    /// Postgres refused the read for good (see [`super::is_definite`]).
    Definite(String),
    /// The job was cancelled or failed meanwhile.
    Gone,
}

impl From<String> for ReadError {
    fn from(e: String) -> Self {
        ReadError::Retry(e)
    }
}

impl From<&str> for ReadError {
    fn from(e: &str) -> Self {
        ReadError::Retry(e.to_string())
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Retry(e) | ReadError::Definite(e) => f.write_str(e),
            ReadError::Gone => f.write_str("the job was cancelled"),
        }
    }
}

/// The worker loop: one unit of work after another until the session ends.
pub(crate) async fn run(shared: Arc<Shared>, n: usize) {
    let mut client: Option<Client> = None;
    let mut types = TypeRegistry::builtin();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let Some((job, range)) = shared.take_unit() else {
            let notified = shared.work.notified();
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        let res = async {
            if client.is_none() {
                client = Some(connect(&shared).await?);
            }
            let c = client.as_ref().expect("connected above");
            let info = table_info(&shared, c, &job).await?;
            let missing = types.missing(&info.type_oids());
            if !missing.is_empty() {
                types.load(c, &missing).await.map_err(|e| e.to_string())?;
            }
            match job.method {
                Method::Keyset => keyset(&shared, c, &types, &job, range, info).await,
                Method::Copy => copy_whole(&shared, c, &types, &job, range, info).await,
            }
        }
        .await;
        match res {
            // The range stays taken: it is done once durable (the
            // coordinator marks it), and must not be read again meanwhile.
            Ok(()) => backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            Err(ReadError::Gone) => shared.release(job.id, range),
            Err(ReadError::Definite(e)) => {
                shared.release(job.id, range);
                shared.fail_job(job.id, &e).await;
                client = None;
            }
            Err(ReadError::Retry(e)) => {
                shared.release(job.id, range);
                if shared.stopping.load(Ordering::Acquire) {
                    return;
                }
                let delay = backoff.next_delay();
                tracing::warn!(worker = n, table = %job.table, error = %e, retry_in_ms = delay.as_millis() as u64, "snapshot read failed; retrying");
                client = None;
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn connect(shared: &Shared) -> Result<Client, String> {
    let client = crate::pg::sql_connect_url(&shared.sql_url, &shared.network)
        .await
        .map_err(|e| format!("snapshot connection: {e}"))?;
    client
        .batch_execute(&table::session_sql())
        .await
        .map_err(|e| format!("snapshot connection settings: {e}"))?;
    Ok(client)
}

async fn table_info(shared: &Shared, c: &Client, job: &Job) -> Result<Arc<TableInfo>, String> {
    if let Some(i) = shared
        .infos
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&job.id)
    {
        return Ok(i.clone());
    }
    let (schema, name) = crate::config::split_table(&job.table).unwrap_or_default();
    let info = table::describe(c, &schema, &name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("table {} does not exist", job.table))?;
    let info = Arc::new(info);
    shared
        .infos
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(job.id, info.clone());
    Ok(info)
}

async fn emit(c: &Client, id: &str, mark: &str) -> Result<(), String> {
    let body = serde_json::to_string(&Mark {
        id: id.to_string(),
        mark: mark.to_string(),
    })
    .unwrap_or_default();
    c.execute(
        "SELECT pg_logical_emit_message(true, $1::text, $2::text)",
        &[&WATERMARK_PREFIX, &body],
    )
    .await
    .map_err(|e| {
        format!(
            "writing a watermark failed: {}; the role needs EXECUTE on pg_logical_emit_message (GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO <role>)",
            e.as_db_error().map(|d| d.message().to_string()).unwrap_or(e.to_string())
        )
    })?;
    Ok(())
}

/// Runs a COPY and parses its rows; returns the row count and the last line.
async fn copy_rows(
    c: &Client,
    sql: &str,
    parser: &mut RowParser<'_>,
    mut each: impl FnMut(Row) -> Result<(), String>,
) -> Result<(u64, Vec<u8>), ReadError> {
    let stream = c.copy_out(sql).await.map_err(|e| db(&e))?;
    futures_util::pin_mut!(stream);
    let mut buf = BytesMut::new();
    let mut last = Vec::new();
    let mut n = 0u64;
    let mut line_done = |line: &[u8], last: &mut Vec<u8>| -> Result<(), String> {
        each(parser.parse_line(line)?)?;
        last.clear();
        last.extend_from_slice(line);
        Ok(())
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| db(&e))?;
        // Postgres sends one row per CopyData: parse it in place.
        if buf.is_empty()
            && chunk.last() == Some(&b'\n')
            && memchr::memchr(b'\n', &chunk) == Some(chunk.len() - 1)
        {
            line_done(&chunk[..chunk.len() - 1], &mut last)?;
            n += 1;
            continue;
        }
        buf.extend_from_slice(&chunk);
        while let Some(end) = memchr::memchr(b'\n', &buf) {
            let line = buf.split_to(end + 1);
            line_done(&line[..end], &mut last)?;
            n += 1;
        }
    }
    if buf.has_remaining() {
        return Err("COPY output ended in the middle of a row".into());
    }
    Ok((n, last))
}

/// A Postgres error of a read, classified.
fn db(e: &tokio_postgres::Error) -> ReadError {
    match e.as_db_error() {
        Some(d) if super::is_definite(d.code().code()) => {
            ReadError::Definite(format!("{}: {}", d.code().code(), d.message()))
        }
        Some(d) => ReadError::Retry(format!("{}: {}", d.code().code(), d.message())),
        None => ReadError::Retry(e.to_string()),
    }
}

/// A chunk read and handed over, waiting for the stream side.
struct InFlight {
    done: oneshot::Receiver<Result<crate::lsn::Lsn, Refused>>,
    /// The chunk's bounds: `(after, last]`.
    after: Option<Vec<String>>,
    last: Option<Vec<String>>,
    rows: u64,
    /// The last chunk of the range.
    last_of_range: bool,
}

/// Chunks a worker may have handed over and not yet seen taken: reading the
/// next chunk overlaps with the stream delivering the previous one.
const PIPELINE: usize = 2;

/// Reads one key range in watermarked chunks.
async fn keyset(
    shared: &Shared,
    c: &Client,
    types: &TypeRegistry,
    job: &Job,
    range: usize,
    info: Arc<TableInfo>,
) -> Result<(), ReadError> {
    let limit = shared.config.chunk_rows;
    let mut after = job.ranges[range].after.clone();
    let upper = job.ranges[range].upper.clone();
    let mut inflight: std::collections::VecDeque<InFlight> = Default::default();
    let mut exhausted = false;
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return Err("session ended".into());
        }
        if !shared.job_active(job.id) {
            return Err(ReadError::Gone);
        }
        while inflight.len() >= PIPELINE || (exhausted && !inflight.is_empty()) {
            let Some(mut f) = inflight.pop_front() else {
                break;
            };
            let end = match (&mut f.done).await {
                Ok(Ok(end)) => end,
                Ok(Err(_)) => {
                    // Refused (the read may have missed a transaction):
                    // read exactly its key interval again, before anything
                    // after it can be recorded as done.
                    repair(shared, c, types, job, &info, &f).await?
                }
                Err(_) => return Err("session ended".into()),
            };
            shared.complete(Completion {
                end,
                job: job.id,
                range,
                after: f.last.clone().or(f.after.clone()),
                rows: f.rows,
                range_done: f.last_of_range,
            });
        }
        if exhausted {
            return Ok(());
        }
        let upper_now = upper.as_deref();
        let (rx, rows, last) = read_chunk(
            shared,
            c,
            types,
            job,
            &info,
            after.as_deref(),
            upper_now,
            Some(limit),
        )
        .await?;
        shared.count_read(job.id, rows);
        exhausted = (rows as usize) < limit;
        inflight.push_back(InFlight {
            done: rx,
            after: after.clone(),
            last: last.clone(),
            rows,
            last_of_range: exhausted,
        });
        if last.is_some() {
            after = last;
        }
    }
}

/// Reads a refused chunk's interval again until the stream side takes it.
async fn repair(
    shared: &Shared,
    c: &Client,
    types: &TypeRegistry,
    job: &Job,
    info: &Arc<TableInfo>,
    f: &InFlight,
) -> Result<crate::lsn::Lsn, ReadError> {
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return Err("session ended".into());
        }
        if !shared.job_active(job.id) {
            return Err(ReadError::Gone);
        }
        // An empty chunk's interval reaches to the range's end: nothing
        // was read, so there is nothing to repair but the order.
        let upper = f.last.as_deref();
        let (rx, _, _) =
            read_chunk(shared, c, types, job, info, f.after.as_deref(), upper, None).await?;
        match rx.await {
            Ok(Ok(end)) => return Ok(end),
            Ok(Err(_)) => continue,
            Err(_) => return Err("session ended".into()),
        }
    }
}

/// One chunk: low watermark, read in a REPEATABLE READ transaction, rows
/// handed over, high watermark. Returns the receiver of the stream side's
/// answer, the row count and the last row's key.
#[allow(clippy::too_many_arguments)]
async fn read_chunk(
    shared: &Shared,
    c: &Client,
    types: &TypeRegistry,
    job: &Job,
    info: &Arc<TableInfo>,
    after: Option<&[String]>,
    upper: Option<&[String]>,
    limit: Option<usize>,
) -> Result<
    (
        oneshot::Receiver<Result<crate::lsn::Lsn, Refused>>,
        u64,
        Option<Vec<String>>,
    ),
    ReadError,
> {
    let id = shared.chunk_id();
    let (rows_tx, rows_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    shared
        .registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id.clone(),
            Registered::Chunk {
                oid: info.rel.oid,
                rows: rows_rx,
                done: done_tx,
                only: job.sinks.clone(),
            },
        );
    let oids = info.type_oids();
    let read = async {
        emit(c, &id, "low").await?;
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| db(&e))?;
        let snap = c
            .query_one("SELECT txid_current_snapshot()::text", &[])
            .await
            .map_err(|e| db(&e))?;
        let xip = parse_xip(&snap.get::<_, String>(0));
        let sql = info.chunk_copy(after, upper, job.filter.as_deref(), limit);
        let mut parser = RowParser::new(types, &oids, &info.key_cols);
        let mut rows = Vec::new();
        let (_, last_line) = copy_rows(c, &sql, &mut parser, |r| {
            rows.push(r);
            Ok(())
        })
        .await?;
        let last = if rows.is_empty() {
            None
        } else {
            Some(parser.key_text(&last_line)?)
        };
        c.batch_execute("COMMIT").await.map_err(|e| db(&e))?;
        Ok::<_, ReadError>((rows, xip, last))
    }
    .await;
    let (rows, xip, last) = match read {
        Ok(x) => x,
        Err(e) => {
            let _ = c.batch_execute("ROLLBACK").await;
            shared
                .registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(e);
        }
    };
    let count = rows.len() as u64;
    let _ = rows_tx.send(ChunkData {
        info: info.clone(),
        rows,
        xip,
    });
    emit(c, &id, "high").await?;
    Ok((done_rx, count, last))
}

/// `txid_current_snapshot()` text `xmin:xmax:xip,…` → the in-progress xids (low 32 bits).
fn parse_xip(s: &str) -> Vec<u32> {
    s.splitn(3, ':')
        .nth(2)
        .unwrap_or("")
        .split(',')
        .filter_map(|x| x.trim().parse::<u64>().ok())
        .map(|x| x as u32)
        .collect()
}

/// Copies a key-less table whole inside the exported snapshot of a
/// temporary slot, spilling it to disk, and hands it to the stream side
/// to deliver at the slot's consistent point.
async fn copy_whole(
    shared: &Shared,
    c: &Client,
    types: &TypeRegistry,
    job: &Job,
    range: usize,
    info: Arc<TableInfo>,
) -> Result<(), ReadError> {
    let (paused_tx, paused_rx) = oneshot::channel();
    let (point_tx, point_rx) = oneshot::channel();
    let (data_tx, data_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    let id = shared.chunk_id();
    shared
        .registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id,
            Registered::Copy {
                paused: paused_tx,
                point: point_rx,
                data: data_rx,
                done: done_tx,
                only: job.sinks.clone(),
            },
        );
    shared.pickup.notify_one();
    paused_rx
        .await
        .map_err(|_| "session ended before the copy could start".to_string())?;
    let mut repl = crate::conn::connect_url(&shared.sql_url, None, &shared.network)
        .await
        .map_err(|e| format!("replication connection for the copy: {e}"))?;
    let slot = format!(
        "pgferry_copy_{}_{}",
        std::process::id(),
        rand::random::<u32>()
    );
    let (point, snapshot) = repl
        .create_exported_slot(&slot)
        .await
        .map_err(|e| format!("creating temporary slot {slot}: {e}"))?;
    let _ = point_tx.send(point);
    tracing::info!(table = %job.table, at = %point, "copying the table in an exported snapshot (it has no key for chunked reads)");
    let res = async {
        c.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            crate::conn::quote_literal(&snapshot)
        ))
        .await
        .map_err(|e| db(&e))?;
        let oids = info.type_oids();
        let mut parser = RowParser::new(types, &oids, &[]);
        let mut w = crate::spill::SpillWriter::create(&shared.spill_dir, 0)
            .map_err(|e| format!("spill file: {e}"))?;
        let rel = info.rel.clone();
        let (n, _) = copy_rows(
            c,
            &info.full_copy(job.filter.as_deref()),
            &mut parser,
            |r| {
                w.append(&Change {
                    op: Op::Read,
                    rel: rel.clone(),
                    lsn: point,
                    xid: 0,
                    before: None,
                    after: Some(r),
                })
                .map_err(|e| format!("spill file: {e}"))
            },
        )
        .await?;
        c.batch_execute("COMMIT").await.map_err(|e| db(&e))?;
        let reader = w.finish().map_err(|e| format!("spill file: {e}"))?;
        Ok::<_, ReadError>((reader, n))
    }
    .await;
    drop(repl);
    let (reader, n) = match res {
        Ok(x) => x,
        Err(e) => {
            let _ = c.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    };
    shared.count_read(job.id, n);
    let _ = data_tx.send((reader, n));
    match done_rx.await {
        Ok(Ok(end)) => {
            shared.complete(Completion {
                end,
                job: job.id,
                range,
                after: None,
                rows: n,
                range_done: true,
            });
            Ok(())
        }
        Ok(Err(_)) => Err(ReadError::Retry(
            "the stream passed the copy's point before it was registered; copying again".into(),
        )),
        Err(_) => Err("session ended".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xip_lists_parse() {
        assert_eq!(parse_xip("100:105:101,103"), vec![101, 103]);
        assert!(parse_xip("100:100:").is_empty());
        // xid8 with an epoch: the low 32 bits, as the stream shows them.
        assert_eq!(parse_xip("1:2:4294967301"), vec![5]);
    }
}
