//! The session's [`RowSource`]: current rows read by key over an ordinary
//! SQL connection, for sinks that must complete a change their own store
//! cannot complete (see [`crate::sink::rows`]).
//!
//! One connection, shared by the sinks, opened on first use with the
//! replication connection's value settings (so `to_jsonb` renders values
//! byte for byte as the stream does) and read-only, and opened again after
//! it fails. Reads are rare: the search sink asks only when its index holds
//! no trustworthy document to complete an update from.
//!
//! Visibility: the walsender sends a transaction once its commit record is
//! in the WAL, which can be a moment before other sessions see it (with
//! synchronous replication, until the standby confirms). Each read returns
//! its own snapshot (`txid_current_snapshot()`, the same statement), and is
//! repeated until every transaction it must see (`RowQuery::xids`) is
//! visible in it.

use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::conn::quote_ident;
use crate::sink::rows::{CurrentRow, RowError, RowQuery, RowSource};

/// How long a read waits for a streamed transaction to become visible
/// before the sink is told to retry later.
const VISIBLE_WITHIN: Duration = Duration::from_secs(30);

pub struct PgRows {
    url: String,
    net: crate::config::NetworkConfig,
    conn: Mutex<Option<Client>>,
}

impl PgRows {
    /// Reads with `url` (`source.url`) over `net`'s socket settings;
    /// connects on first use.
    pub fn new(url: &str, net: &crate::config::NetworkConfig) -> PgRows {
        PgRows {
            url: url.to_string(),
            net: *net,
            conn: Mutex::new(None),
        }
    }
}

async fn connect(url: &str, net: &crate::config::NetworkConfig) -> Result<Client, RowError> {
    let client = crate::pg::sql_connect_url(url, net)
        .await
        .map_err(|e| RowError::Transient(format!("connecting: {e}")))?;
    let settings = format!(
        "{}SET application_name = 'pgferry-rows'; SET default_transaction_read_only = on;",
        crate::snapshot::table::session_sql()
    );
    client
        .batch_execute(&settings)
        .await
        .map_err(|e| classify(&e))?;
    Ok(client)
}

/// Errors of the table itself (privileges, a table or key column gone, a
/// key value its type does not take) are refusals; the rest is transient.
fn classify(e: &tokio_postgres::Error) -> RowError {
    match e.as_db_error() {
        Some(db) => {
            let msg = format!("Postgres error {}: {}", db.code().code(), db.message());
            let class = &db.code().code()[..2];
            if class == "42" || class == "22" {
                RowError::Refused(msg)
            } else {
                RowError::Transient(msg)
            }
        }
        None => RowError::Transient(format!("Postgres connection error: {e}")),
    }
}

/// The statement: the snapshot, and `[ordinal, to_jsonb(row), xmin]` for
/// each key of `$1` (a JSON array of objects of the key columns) that has a
/// row.
fn select_sql(schema: &str, table: &str, key_columns: &[String]) -> String {
    let t = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let on: Vec<String> = key_columns
        .iter()
        .map(|c| {
            let c = quote_ident(c);
            format!("pgferry_t.{c} = pgferry_r.{c}")
        })
        .collect();
    format!(
        "SELECT txid_current_snapshot()::text, \
           (SELECT coalesce(jsonb_agg(jsonb_build_array(pgferry_k.n, to_jsonb(pgferry_t.*), pgferry_t.xmin::text)), '[]')::text \
              FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS pgferry_k(key, n) \
              CROSS JOIN LATERAL jsonb_populate_record(NULL::{t}, pgferry_k.key) AS pgferry_r \
              JOIN {t} AS pgferry_t ON {})",
        on.join(" AND ")
    )
}

/// True when `xid` is still in progress in `snapshot`
/// (`txid_current_snapshot()` text, `xmin:xmax:xip,…`, 64-bit xids): at or
/// past its `xmax`, or listed. Compared on the low 32 bits, as the stream
/// gives them.
fn in_progress(snapshot: &str, xid: u32) -> bool {
    let mut parts = snapshot.splitn(3, ':');
    let _xmin = parts.next();
    let Some(xmax) = parts.next().and_then(|x| x.trim().parse::<u64>().ok()) else {
        return false;
    };
    if ((xmax as u32).wrapping_sub(xid) as i32) <= 0 {
        return true;
    }
    parts
        .next()
        .unwrap_or("")
        .split(',')
        .filter_map(|x| x.trim().parse::<u64>().ok())
        .any(|x| x as u32 == xid)
}

/// `[[ordinal, row, xmin], …]` → one entry per key.
fn parse_rows(text: &str, keys: usize) -> Result<Vec<Option<CurrentRow>>, RowError> {
    let bad = |e: String| RowError::Transient(format!("unexpected rows from Postgres: {e}"));
    let found: Vec<(usize, Map<String, Value>, String)> =
        serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let mut out = vec![None; keys];
    for (n, values, xmin) in found {
        let xmin = xmin.parse().map_err(|_| bad(format!("xmin {xmin:?}")))?;
        if let Some(slot) = n.checked_sub(1).and_then(|i| out.get_mut(i)) {
            *slot = Some(CurrentRow { values, xmin });
        }
    }
    Ok(out)
}

#[async_trait::async_trait]
impl RowSource for PgRows {
    async fn fetch(&self, q: &RowQuery<'_>) -> Result<Vec<Option<CurrentRow>>, RowError> {
        let sql = select_sql(q.schema, q.table, q.key_columns);
        let keys: Vec<Value> = q
            .keys
            .iter()
            .map(|k| {
                Value::Object(
                    q.key_columns
                        .iter()
                        .cloned()
                        .zip(k.iter().cloned())
                        .collect(),
                )
            })
            .collect();
        let keys = Value::Array(keys).to_string();
        let mut conn = self.conn.lock().await;
        let deadline = Instant::now() + VISIBLE_WITHIN;
        loop {
            if conn.is_none() {
                *conn = Some(connect(&self.url, &self.net).await?);
            }
            let Some(client) = conn.as_ref() else {
                continue;
            };
            let row = match client.query_one(&sql, &[&keys]).await {
                Ok(row) => row,
                Err(e) => {
                    if e.as_db_error().is_none() || client.is_closed() {
                        *conn = None;
                    }
                    return Err(classify(&e));
                }
            };
            let snapshot: String = row.get(0);
            let Some(x) = q.xids.iter().find(|x| in_progress(&snapshot, **x)) else {
                return parse_rows(&row.get::<_, String>(1), q.keys.len());
            };
            if Instant::now() > deadline {
                return Err(RowError::Transient(format!(
                    "transaction {x} was streamed but is still not visible to other sessions (a synchronous standby not answering?)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_transactions_are_visible_once_out_of_the_snapshot() {
        assert!(!in_progress("100:105:101,103", 102));
        assert!(in_progress("100:105:101,103", 103));
        assert!(in_progress("100:105:", 105));
        assert!(in_progress("100:105:", 106));
        assert!(!in_progress("100:105:", 99));
        // 64-bit xids: the low 32 bits are compared.
        assert!(in_progress("4294967296:4294967306:4294967301", 5));
        assert!(!in_progress("4294967296:4294967306:", 5));
        assert!(!in_progress("4294967290:4294967306:", 4294967295));
    }

    #[test]
    fn rows_are_matched_to_their_keys() {
        let got = parse_rows(
            r#"[[2, {"id": 2, "v": 1.50}, "731"], [3, {"id": 3}, "4294967295"]]"#,
            3,
        )
        .unwrap();
        assert_eq!(got[0], None);
        let row = got[1].clone().unwrap();
        assert_eq!(
            Value::Object(row.values).to_string(),
            r#"{"id":2,"v":1.50}"#
        );
        assert_eq!(row.xmin, 731);
        assert_eq!(got[2].as_ref().unwrap().xmin, u32::MAX);
        assert!(parse_rows("nonsense", 1).is_err());
        assert!(parse_rows(r#"[[1, {}, "x"]]"#, 1).is_err());
    }

    #[test]
    fn the_statement_quotes_names_and_joins_every_key_column() {
        let sql = select_sql("s\"x", "t", &["a".into(), "b c".into()]);
        assert!(sql.contains("NULL::\"s\"\"x\".\"t\""), "{sql}");
        assert!(
            sql.contains(
                "pgferry_t.\"a\" = pgferry_r.\"a\" AND pgferry_t.\"b c\" = pgferry_r.\"b c\""
            ),
            "{sql}"
        );
    }
}
