//! One Iceberg table of the change log: its handle, its committed position
//! and its buffered rows, and the commit that moves rows into a snapshot.
//!
//! Invariants:
//! - `committed` is the `pgferry.position` of the table's current snapshot
//!   as this sink last saw or wrote it; `high` is the position of the last
//!   row taken (buffered or committed). A row at or below `high` is skipped,
//!   so a batch applied again (a retry, a replay after a restart) adds
//!   nothing twice.
//! - Before each commit the table is reloaded and its current position
//!   compared with `committed`. Iceberg itself does not fence writers (a
//!   commit from a stale handle is re-applied on top of the newer snapshot),
//!   so this check is what stops a second writer from interleaving. A
//!   current position equal to `high` means the previous commit went through
//!   although its answer was lost: the buffer is dropped, not written again.
//! - A commit writes one Parquet data file set and one `fast_append`
//!   snapshot carrying the position of its last row. A crash between the two
//!   leaves only unreferenced data files.

use std::collections::HashMap;
use std::sync::Arc;

use iceberg::arrow::schema_to_arrow_schema;
use iceberg::spec::{DataFileFormat, NestedField, PrimitiveType, Schema, Type};
use iceberg::table::Table;
use iceberg::transaction::{AddColumn, ApplyTransactionAction, Transaction};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator,
};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use iceberg::{Catalog, TableIdent};
use iceberg_catalog_sql::SqlCatalog;
use parquet::file::properties::WriterProperties;

use super::batch::{self, BufferedRow, META_COLUMNS};
use super::types;
use crate::event::RelationInfo;
use crate::sink::eventlog::Position;
use crate::sink::SinkError;

/// The snapshot summary key holding the sink's position.
pub const POSITION_KEY: &str = "pgferry.position";

/// An Iceberg error as a sink error: commit conflicts and I/O are worth a
/// retry; the rest too, since the catalog is a local file that a retry may
/// find readable again (a fatal condition is raised by the sink itself).
pub fn transient(what: &str, e: iceberg::Error) -> SinkError {
    SinkError::transient(format!("{what}: {e}")).caused_by(e)
}

/// Source field `i` of the Iceberg schema is relation column `map[i]`.
type FieldMap = Arc<[Option<usize>]>;

/// One table of the change log.
pub struct IceTable {
    pub ident: TableIdent,
    table: Table,
    pub committed: Option<Position>,
    pub high: Option<Position>,
    pub rows: Vec<BufferedRow>,
    pub bytes: usize,
    /// The relation the last map was made for, and the map.
    map: Option<(Arc<RelationInfo>, FieldMap)>,
}

/// The position in a table's current snapshot summary.
fn current_position(table: &Table) -> Result<Option<Position>, SinkError> {
    let Some(snap) = table.metadata().current_snapshot() else {
        return Ok(None);
    };
    match snap.summary().additional_properties.get(POSITION_KEY) {
        None => Err(SinkError::fatal(format!(
            "Iceberg table {}: its current snapshot {} has no {POSITION_KEY}: another program \
             wrote it. Give pgferry its own table (change the sink's `table` or `namespace`)",
            table.identifier(),
            snap.snapshot_id()
        ))),
        Some(p) => Position::parse(p).map(Some).ok_or_else(|| {
            SinkError::fatal(format!(
                "Iceberg table {}: {POSITION_KEY} = {p:?} is not X/Y:index",
                table.identifier()
            ))
        }),
    }
}

/// The schema of a new change-log table for `rel`.
pub fn new_schema(rel: &RelationInfo) -> Result<Schema, SinkError> {
    let n = (rel.columns.len() + META_COLUMNS.len()) as i32;
    let mut fields: Vec<iceberg::spec::NestedFieldRef> = Vec::new();
    for (i, c) in rel.columns.iter().enumerate() {
        let t = types::iceberg_type(c.type_oid, c.type_mod, n + 1 + i as i32);
        fields.push(NestedField::optional(i as i32 + 1, &c.name, t).into());
    }
    let base = rel.columns.len() as i32;
    let long = || Type::Primitive(PrimitiveType::Long);
    let meta: [(&str, Type, bool); 6] = [
        ("_op", Type::Primitive(PrimitiveType::String), true),
        ("_lsn", long(), true),
        ("_commit_lsn", long(), true),
        (
            "_commit_time",
            Type::Primitive(PrimitiveType::Timestamptz),
            true,
        ),
        ("_xid", long(), true),
        (
            "_unchanged",
            types::iceberg_type(1009, -1, 2 * n + 1),
            false,
        ),
    ];
    for (j, (name, t, required)) in meta.into_iter().enumerate() {
        let id = base + j as i32 + 1;
        fields.push(if required {
            NestedField::required(id, name, t).into()
        } else {
            NestedField::optional(id, name, t).into()
        });
    }
    Schema::builder()
        .with_fields(fields)
        .build()
        .map_err(|e| SinkError::fatal(format!("the schema of {}: {e}", rel.qualified)))
}

impl IceTable {
    pub fn new(ident: TableIdent, table: Table) -> Result<IceTable, SinkError> {
        let committed = current_position(&table)?;
        Ok(IceTable {
            ident,
            table,
            committed,
            high: committed,
            rows: Vec::new(),
            bytes: 0,
            map: None,
        })
    }

    /// The map from the table's source fields to `rel`'s columns, adding
    /// the columns the table lacks first (optional, null in earlier rows).
    /// A column whose type changed in a way Iceberg cannot follow stops the
    /// sink with the fix.
    pub async fn map_for(
        &mut self,
        rel: &Arc<RelationInfo>,
        catalog: &SqlCatalog,
    ) -> Result<Arc<[Option<usize>]>, SinkError> {
        if let Some((r, m)) = &self.map {
            if Arc::ptr_eq(r, rel) {
                return Ok(m.clone());
            }
        }
        let mut add = Vec::new();
        {
            let schema = self.table.metadata().current_schema();
            for c in &rel.columns {
                let want = types::iceberg_type(c.type_oid, c.type_mod, 0);
                match schema.field_by_name(&c.name) {
                    None => add.push(AddColumn::optional(&c.name, want)),
                    Some(f) if !types::compatible(&f.field_type, &want) => {
                        return Err(SinkError::fatal(format!(
                            "{}: column {:?} changed from Iceberg {} to {want}, a change Iceberg \
                             tables cannot take in place. Fix: write this table to a new Iceberg \
                             table (rename or drop {}, or change the sink's `table` template), \
                             then restart pgferry",
                            rel.qualified, c.name, f.field_type, self.ident
                        )))
                    }
                    Some(_) => {}
                }
            }
        }
        if !add.is_empty() {
            let names: Vec<String> = rel.columns.iter().map(|c| c.name.clone()).collect();
            tracing::info!(table = %self.ident, columns = ?names, "adding the new source columns to the Iceberg table");
            let tx = Transaction::new(&self.table);
            let mut action = tx.update_schema();
            for a in add {
                action = action.add_column(a);
            }
            let tx = action
                .apply(tx)
                .map_err(|e| transient("evolving the schema", e))?;
            self.table = tx
                .commit(catalog)
                .await
                .map_err(|e| transient(&format!("evolving the schema of {}", self.ident), e))?;
        }
        let map: Arc<[Option<usize>]> = self
            .source_fields()
            .iter()
            .map(|name| rel.columns.iter().position(|c| &c.name == name))
            .collect();
        self.map = Some((rel.clone(), map.clone()));
        Ok(map)
    }

    /// The names of the source fields, in schema order.
    fn source_fields(&self) -> Vec<String> {
        self.table
            .metadata()
            .current_schema()
            .as_struct()
            .fields()
            .iter()
            .filter(|f| !META_COLUMNS.contains(&f.name.as_str()))
            .map(|f| f.name.clone())
            .collect()
    }

    /// Writes the buffered rows and commits them as one snapshot carrying
    /// the position of the last one.
    pub async fn commit(&mut self, catalog: &SqlCatalog) -> Result<usize, SinkError> {
        if self.rows.is_empty() {
            return Ok(0);
        }
        let table = catalog
            .load_table(&self.ident)
            .await
            .map_err(|e| transient(&format!("loading {}", self.ident), e))?;
        let now = current_position(&table)?;
        if now != self.committed {
            if now.is_some() && now == self.high {
                // The previous commit went through; its answer was lost.
                self.table = table;
                return Ok(self.committed_buffer());
            }
            let show = |p: Option<Position>| p.map_or("none".to_string(), Position::to_text);
            return Err(SinkError::fatal(format!(
                "Iceberg table {}: its current snapshot has {POSITION_KEY} {}, but this sink \
                 last committed {}: another writer commits to it. Iceberg does not fence \
                 writers: stop the other pgferry (or give each its own table), then restart",
                self.ident,
                show(now),
                show(self.committed)
            )));
        }
        self.table = table;
        let files = self.write_files().await?;
        let position = self.high.expect("rows imply a position").to_text();
        let tx = Transaction::new(&self.table);
        let action = tx
            .fast_append()
            // File names are unique: skip re-reading every manifest (that
            // check makes each commit slower than the last).
            .with_check_duplicate(false)
            .add_data_files(files)
            .set_snapshot_properties(HashMap::from([(POSITION_KEY.to_string(), position)]));
        let tx = action.apply(tx).map_err(|e| transient("appending", e))?;
        self.table = tx
            .commit(catalog)
            .await
            .map_err(|e| transient(&format!("committing to {}", self.ident), e))?;
        Ok(self.committed_buffer())
    }

    /// Marks the buffer committed; returns how many rows it held.
    fn committed_buffer(&mut self) -> usize {
        self.committed = self.high;
        self.bytes = 0;
        std::mem::take(&mut self.rows).len()
    }

    /// The Parquet data files of the buffered rows (Iceberg field ids on every column).
    async fn write_files(&self) -> Result<Vec<iceberg::spec::DataFile>, SinkError> {
        let schema = self.table.metadata().current_schema().clone();
        let arrow = Arc::new(
            schema_to_arrow_schema(&schema).map_err(|e| transient("the Arrow schema", e))?,
        );
        let sources = self.source_fields();
        let fields: Vec<Option<usize>> = arrow
            .fields()
            .iter()
            .map(|f| sources.iter().position(|n| n == f.name()))
            .collect();
        let batch = batch::build(arrow, &fields, &self.rows).map_err(|e| {
            SinkError::fatal(format!(
                "Iceberg table {}: {e}. Fix: leave the table out of the sink (`tables`), or \
                 change the source column to a type that holds the value",
                self.ident
            ))
        })?;
        let location = DefaultLocationGenerator::new(self.table.metadata())
            .map_err(|e| transient("the data location", e))?;
        let prefix = format!(
            "pgferry-{}-{:016x}",
            self.high.map_or(0, |p| p.commit_lsn.0),
            rand::random::<u64>()
        );
        let names = DefaultFileNameGenerator::new(prefix, None, DataFileFormat::Parquet);
        let parquet = ParquetWriterBuilder::new(WriterProperties::default(), schema);
        let rolling = RollingFileWriterBuilder::new_with_default_file_size(
            parquet,
            self.table.file_io().clone(),
            location,
            names,
        );
        let what = format!("writing the data files of {}", self.ident);
        let mut w = DataFileWriterBuilder::new(rolling)
            .build(None)
            .await
            .map_err(|e| transient(&what, e))?;
        w.write(batch).await.map_err(|e| transient(&what, e))?;
        w.close().await.map_err(|e| transient(&what, e))
    }
}
