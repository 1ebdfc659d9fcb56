//! The Elasticsearch / OpenSearch sink: each row of a configured table is a
//! document, and the index follows the table.
//!
//! Plain REST over HTTP(S) (`reqwest`, rustls): `_bulk` with NDJSON, `_mget`,
//! `HEAD`/`PUT /{index}`, `_refresh` and scroll searches. No mapping types, so
//! the same requests work on Elasticsearch 7/8 and OpenSearch 1/2.
//!
//! - **Document id**: the table's key columns through
//!   [`KeyTemplate::for_key_columns`](crate::sink::key::KeyTemplate): one key
//!   column gives its value as text (`42`, `abc`); a composite key joins the
//!   values with `:`, each value with `%` and `:` percent-encoded (`a:b` and
//!   `c` give `a%3Ab:c`), so two keys never share an id. `id_columns` picks
//!   other columns; a `REPLICA IDENTITY FULL` table needs it (every column
//!   is key there).
//! - **Document**: the row as `to_jsonb(row)` gives it, limited to the
//!   table's `columns` / `exclude_columns`.
//! - **Versions**: every write is an `index` or `delete` with
//!   `version_type=external_gte` and `version` = the commit LSN of the
//!   change's transaction. Commit LSNs follow the stream's order, which is
//!   the order the sinks apply, so a snapshot's read events (which carry the
//!   commit LSN of their high watermark) sort correctly against changes: a
//!   change's own record LSN would not, since a transaction that commits
//!   after a watermark can have written its rows before it. `_gte` lets the
//!   later changes of one transaction to the same document land after the
//!   earlier ones (they share the version), and makes the replay of a whole
//!   transaction a re-write of the same values. The cluster refuses a lower
//!   version with a 409, which counts as success: the index holds newer data.
//! - **Key change**: `index` of the new id, then `delete` of the old one,
//!   which waits until the new document is acknowledged (see below).
//! - **Unchanged TOAST columns** (an update that did not send a large value):
//!   the sink puts the sent columns over a base that holds the others (the
//!   current document, read with `_mget` in real time; the old id's for a
//!   key change) and indexes the whole document with the change's version;
//!   where the index cannot be trusted to hold the row as it was, the row is
//!   read from Postgres through a [`RowSource`](crate::sink::rows::RowSource)
//!   the session provides; where nothing can complete it, the change is
//!   dead-lettered and `/readyz` says so. A partial document is never
//!   indexed. The rules, and why a row read from Postgres gets a marked
//!   version, are in `complete.rs`. Not a partial `update`: the cluster
//!   refuses versions on bulk updates, and an unversioned update replayed
//!   over a newer document would both overwrite newer values and raise the
//!   document's version so that the newer write, replayed next, is refused
//!   as a conflict. The cost is one `_mget` per bulk request that holds such
//!   updates, and it assumes pgferry is the only writer of these documents.
//!   With `REPLICA IDENTITY FULL` none of this is needed: the old row, sent
//!   whole, fills them in.
//! - **Key changes under failures**: each chunk of operations is sent in two
//!   phases, the writes to the documents that key changes complete from
//!   (their old ids) last, once everything else is acknowledged. A failure
//!   at any point (a failed or half-applied request, a node outage, kill -9
//!   between requests) leaves those documents in place, so the retry or the
//!   replay completes the new documents again. The argument over every
//!   split and failure point is in `docs/search-sink.md`, "Key changes and
//!   failures".
//! - **Truncate**: `_delete_by_query` is not everywhere (OpenSearch without
//!   the reindex module lacks it), and dropping the index would lose its
//!   mapping, settings and aliases and leave searches failing meanwhile. The
//!   sink refreshes the index, scrolls over every id and deletes each with the
//!   truncate's commit LSN as external version, so rows written after the truncate
//!   (newer versions) stay even during a replay. An index shared by several
//!   tables cannot be truncated this way: that truncate is rejected
//!   (`on_error`).
//! - **Batching**: a batch from the pipeline is cut into chunks of at most
//!   `batch_max_docs` documents and about `batch_max_bytes` bytes, each sent
//!   as `_bulk` requests of at most `batch_max_bytes`; only the last
//!   operation per document in a chunk is sent. `batch_max_ms` is the
//!   pipeline's linger time for this sink: after the first transaction of a
//!   batch arrives, its task waits up to that long for more while the batch
//!   holds fewer than `batch_max_docs` changes. Nothing is acknowledged before
//!   it is applied, so this never weakens the guarantee.
//! - **Errors**: one retry layer, the pipeline's. A failed request
//!   (unreachable, timeout, 429, 5xx) and failed items of a bulk answer
//!   with 429 or 5xx (or a missing index, created again) are transient: the
//!   batch goes back to the pipeline, which retries it with backoff; after
//!   failed items, the retry of the same batch sends only them and what
//!   came after them (`retry.rs`). Any other item error (a mapping error, an invalid
//!   document), and a change the sink cannot make a whole document of, is
//!   final: the change and the error go to the dead-letter file (JSON
//!   lines, `fsync`ed before the batch is acknowledged) and the sink goes
//!   on, or pgferry stops with `on_error = "stop"`. 401, 403 and 413 stop
//!   pgferry with what to fix.
//! - **Indices** are created on first use (`mapping_file` as the body when
//!   set), or used as they are when they exist.
//!
//! Delivery guarantee: effectively-once per document. A replay can re-send
//! changes after the checkpoint, and the external versions make each of them
//! a no-op, so the index converges to the table. Dead letters are
//! at-least-once (a replayed rejected change is written again).
//!
//! Files, along the work:
//! - `config.rs`: the TOML config; `route.rs`: table → index, document
//!   columns, id columns, create-index bodies.
//! - `stream.rs`: a batch's changes in WAL order (spilled ones streamed).
//! - `request.rs`: operations, chunks and `_bulk` NDJSON.
//! - `merge.rs` and `complete.rs`: updates without their TOAST values.
//! - `client.rs`: the HTTP calls and their error classes.
//! - `retry.rs`: bulk item classification and where a failed batch resumes.
//! - `dead_letter.rs`: the dead-letter file.
//! - `sink.rs`: the [`Sink`](crate::sink::Sink) that drives them.

mod client;
mod complete;
mod config;
mod dead_letter;
mod merge;
mod request;
mod retry;
mod route;
mod sink;
mod stream;

pub use config::{ElasticsearchConfig, OnError, TableConfig};
pub use sink::ElasticsearchSink;

/// For `pgferry check`: the cluster's product and version (`GET /`, which
/// verifies the address, TLS and credentials), and for each index of the
/// sink whether it exists (`HEAD`, which a user without rights on it is
/// refused). Writes nothing.
pub async fn probe(cfg: &ElasticsearchConfig) -> Result<(String, Vec<(String, bool)>), String> {
    let client = client::Client::new(cfg)?;
    let root = client
        .json(reqwest::Method::GET, &[], &[], None)
        .await
        .map_err(|e| e.to_string())?;
    let product = root["version"]["distribution"]
        .as_str()
        .unwrap_or("elasticsearch");
    let version = root["version"]["number"].as_str().unwrap_or("?");
    let mut indices = Vec::new();
    for table in cfg.tables.keys() {
        if let Some(index) = cfg.index_for(table) {
            if indices.iter().any(|(i, _)| *i == index) {
                continue;
            }
            let exists = client
                .index_exists(&index)
                .await
                .map_err(|e| format!("index {index}: {e}"))?;
            indices.push((index, exists));
        }
    }
    Ok((format!("{product} {version}"), indices))
}
