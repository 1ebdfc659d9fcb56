//! The Apache Iceberg sink: an append-only change log per source table,
//! in Parquet files committed through iceberg-rust's SQL catalog (a sqlite
//! file that pyiceberg's `SqlCatalog` and JDBC-catalog readers open too).
//!
//! Each source table `schema.table` gets the Iceberg table
//! `{namespace}.{template}` (default `pgferry.{schema}_{table}`, format v2)
//! with the source columns, typed by [`types`], and the change-log columns
//! `_op`, `_lsn`, `_commit_lsn`, `_commit_time`, `_xid`, `_unchanged`.
//! A change is one row: the new image for insert, update and read, the old
//! one (often just the key) for delete, no values for truncate. An update
//! that moves a row to a new key is a delete of the old key followed by an
//! insert of the new one (the log has no old-key columns), as in the event
//! log ([`crate::sink::eventlog`]).
//!
//! Invariants:
//! - Effectively-once: each commit's snapshot carries `pgferry.position`
//!   (`X/Y:index`: the commit LSN of the last row's transaction and the
//!   row's index among that transaction's rows for the table). Positions
//!   increase strictly from snapshot to snapshot of a table. At start the
//!   sink reads the current snapshot's position and skips every row at or
//!   before it, so a replay after a crash adds nothing twice (see [`table`]).
//! - Rows are buffered per table and committed by `flush` (the pipeline
//!   calls it before each checkpoint, at most every `commit_interval_secs`
//!   for this sink) or once `commit_max_rows` rows or [`MAX_BUFFER_BYTES`]
//!   are buffered: the checkpoint always follows the commit.
//! - The sink never rewrites or deletes its files and writes no delete
//!   files; compaction and snapshot expiry are left to the engines.

mod batch;
pub mod config;
mod table;
pub mod types;

use std::collections::HashMap;
use std::sync::Arc;

use iceberg::io::LocalFsStorageFactory;
use iceberg::{Catalog, CatalogBuilder, NamespaceIdent, TableCreation, TableIdent};
use iceberg_catalog_sql::{SqlCatalog, SqlCatalogBuilder};

pub use config::{IcebergConfig, CATALOG_NAME};

use crate::event::{Change, Op, RelationInfo, Transaction};
use crate::sink::eventlog::{moved_key, Position};
use crate::sink::{SinkError, TableFilter};
use batch::BufferedRow;
use table::{transient, IceTable};

/// Buffered row bytes over all tables that trigger a commit.
pub const MAX_BUFFER_BYTES: usize = 64 << 20;

/// The Iceberg sink.
pub struct IcebergSink {
    catalog: SqlCatalog,
    namespace: NamespaceIdent,
    template: String,
    filter: TableFilter,
    max_rows: usize,
    /// By source `schema.table`.
    tables: HashMap<String, IceTable>,
}

impl IcebergSink {
    /// Opens the catalog (creating the sqlite file, the warehouse directory
    /// and the namespace when missing).
    pub async fn open(cfg: &IcebergConfig) -> Result<IcebergSink, SinkError> {
        let abs = |p: &std::path::Path| {
            std::path::absolute(p).map_err(|e| {
                SinkError::fatal(format!("sink {}: path {}: {e}", cfg.name, p.display()))
            })
        };
        let warehouse = abs(&cfg.warehouse)?;
        let catalog_file = abs(&cfg.catalog_path())?;
        for dir in [Some(warehouse.as_path()), catalog_file.parent()]
            .into_iter()
            .flatten()
        {
            std::fs::create_dir_all(dir).map_err(|e| SinkError::io("creating", dir, e))?;
        }
        let props = HashMap::from([
            // sqlx's form (three slashes before the absolute path); mode=rwc creates the file.
            (
                "uri".to_string(),
                format!("sqlite://{}?mode=rwc", catalog_file.display()),
            ),
            (
                "warehouse".to_string(),
                format!("file://{}", warehouse.display()),
            ),
            ("sql_bind_style".to_string(), "QMark".to_string()),
            ("pool.max-connections".to_string(), "1".to_string()),
        ]);
        let catalog = SqlCatalogBuilder::default()
            .with_storage_factory(Arc::new(LocalFsStorageFactory))
            .load(CATALOG_NAME, props)
            .await
            .map_err(|e| {
                transient(
                    &format!("opening the catalog {}", catalog_file.display()),
                    e,
                )
            })?;
        let namespace = NamespaceIdent::new(cfg.namespace.clone());
        let exists = catalog
            .namespace_exists(&namespace)
            .await
            .map_err(|e| transient("reading the namespace", e))?;
        if !exists {
            catalog
                .create_namespace(&namespace, HashMap::new())
                .await
                .map_err(|e| transient("creating the namespace", e))?;
        }
        Ok(IcebergSink {
            catalog,
            namespace,
            template: cfg.table.clone(),
            filter: TableFilter::new(cfg.tables.clone()),
            max_rows: cfg.commit_max_rows,
            tables: HashMap::new(),
        })
    }

    /// Loads (or creates) the table of `rel` on its first use.
    async fn open_table(&mut self, rel: &RelationInfo) -> Result<(), SinkError> {
        if !self.tables.contains_key(&rel.qualified) {
            let name = self
                .template
                .replace("{schema}", &rel.schema)
                .replace("{table}", &rel.table);
            let ident = TableIdent::new(self.namespace.clone(), name.clone());
            let exists = self
                .catalog
                .table_exists(&ident)
                .await
                .map_err(|e| transient(&format!("looking up {ident}"), e))?;
            let t = if exists {
                self.catalog.load_table(&ident).await
            } else {
                let creation = TableCreation::builder()
                    .name(name)
                    .schema(table::new_schema(rel)?)
                    .build();
                self.catalog.create_table(&self.namespace, creation).await
            }
            .map_err(|e| transient(&format!("opening {ident}"), e))?;
            let t = IceTable::new(ident, t)?;
            tracing::info!(table = %t.ident, position = ?t.committed.map(Position::to_text), "Iceberg table open");
            self.tables.insert(rel.qualified.clone(), t);
        }
        Ok(())
    }

    /// Buffers the rows of one transaction, skipping those already taken.
    async fn take(&mut self, txn: &Transaction) -> Result<(), SinkError> {
        let read_err = |e: std::io::Error| {
            SinkError::transient(format!(
                "reading the spilled changes of transaction {} back: {e}",
                txn.meta.xid
            ))
        };
        // First the relations: their tables and schema changes need the catalog.
        let mut rels: Vec<Arc<RelationInfo>> = Vec::new();
        txn.for_each_change(|c| {
            if self.filter.accepts(&c.rel.qualified) && !rels.iter().any(|r| Arc::ptr_eq(r, &c.rel))
            {
                rels.push(c.rel.clone());
            }
            Ok(())
        })
        .map_err(read_err)?;
        let mut maps = Vec::with_capacity(rels.len());
        for rel in &rels {
            self.open_table(rel).await?;
            let t = self.tables.get_mut(&rel.qualified).expect("opened above");
            maps.push(t.map_for(rel, &self.catalog).await?);
        }
        let mut index: HashMap<&str, u64> = HashMap::new();
        let meta = txn.meta;
        txn.for_each_change(|c| {
            let Some(at) = rels.iter().position(|r| Arc::ptr_eq(r, &c.rel)) else {
                return Ok(());
            };
            let t = self.tables.get_mut(&c.rel.qualified).expect("opened above");
            let i = index.entry(rels[at].qualified.as_str()).or_insert(0);
            for (op, row) in images(c) {
                let pos = Position {
                    commit_lsn: meta.commit_lsn,
                    index: *i,
                };
                *i += 1;
                if t.high.is_some_and(|h| pos <= h) {
                    continue;
                }
                let r = BufferedRow {
                    op,
                    row,
                    map: maps[at].clone(),
                    rel: c.rel.clone(),
                    lsn: c.lsn,
                    commit_lsn: meta.commit_lsn,
                    commit_time: meta.commit_time,
                    xid: meta.xid,
                };
                t.bytes += r.mem_size();
                t.rows.push(r);
                t.high = Some(pos);
            }
            Ok(())
        })
        .map_err(read_err)
    }

    /// Commits every table with buffered rows.
    async fn commit_all(&mut self) -> Result<(), SinkError> {
        for t in self.tables.values_mut() {
            let n = t.commit(&self.catalog).await?;
            if n > 0 {
                tracing::debug!(table = %t.ident, rows = n, position = ?t.committed.map(Position::to_text), "Iceberg commit");
            }
        }
        Ok(())
    }
}

/// The change-log rows of one change: a key change is a delete of the old
/// key and an insert of the new one.
fn images(c: &Change) -> Vec<(Op, Option<crate::event::Row>)> {
    if let Some((_, old)) = moved_key(c) {
        return vec![(Op::Delete, Some(old)), (Op::Insert, c.after.clone())];
    }
    match c.op {
        Op::Insert | Op::Update | Op::Read => vec![(c.op, c.after.clone())],
        Op::Delete => vec![(c.op, c.before.as_ref().map(|(_, r)| r.clone()))],
        Op::Truncate => vec![(c.op, None)],
    }
}

#[async_trait::async_trait]
impl crate::sink::Sink for IcebergSink {
    async fn apply(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        for txn in batch {
            self.take(txn).await?;
            let rows: usize = self.tables.values().map(|t| t.rows.len()).sum();
            let bytes: usize = self.tables.values().map(|t| t.bytes).sum();
            if rows >= self.max_rows || bytes >= MAX_BUFFER_BYTES {
                self.commit_all().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.commit_all().await
    }
}

#[cfg(test)]
mod tests;
