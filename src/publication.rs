//! What the publications must hold before a session streams, checked (and
//! repaired, when pgferry manages them) at every start.
//!
//! A table of `source.tables` that its publication lacks is the quietest
//! loss there is: the stream runs, the table's changes never come, and the
//! slot moves past them. So every session starts with [`ensure`]:
//!
//! - every table of `source.tables` exists;
//! - a table whose updates and deletes are published has a replica
//!   identity (a primary key, a `USING INDEX` identity or `FULL`). Without
//!   one, Postgres refuses the application's own `UPDATE` and `DELETE` on a
//!   table once it is in a publication that publishes them, so pgferry never
//!   puts it there: it refuses to start, naming the fix, unless the table is
//!   configured insert-only (`source.publish`);
//! - the main publication (`source.publication`) publishes inserts,
//!   updates, deletes and truncates, and holds every table that is not
//!   insert-only; the insert-only tables are in `<publication>_insert`,
//!   which publishes inserts and truncates only;
//! - when pgferry manages the publications (`source.create_publication`),
//!   what is missing is created or added, in one transaction; otherwise
//!   pgferry refuses to start and names the statements to run.
//!
//! Postgres decodes the WAL with the catalog of the time the WAL was
//! written: a publication created after the slot's position makes decoding
//! fail ("publication does not exist"). So `<publication>_insert` is created
//! together with the main publication (empty when no table is insert-only),
//! before the slot, and a later insert-only table only needs `ALTER
//! PUBLICATION … ADD TABLE`. Adding a table to an existing publication is
//! safe at any time: its changes flow from that point of the WAL on, and the
//! rows it already holds need a backfill (the session requests or
//! recommends one, see `source`).

use crate::config::{sql_ident, sql_table, Config, PublishOps};

/// Why the publications cannot be used, or a database error.
#[derive(Debug, thiserror::Error)]
pub enum PublicationError {
    /// The operator must act; the message names what and how.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// A publication as `pg_publication` shows it.
#[derive(Debug, Clone, Default)]
pub struct PubState {
    pub name: String,
    pub exists: bool,
    pub all_tables: bool,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
    /// `schema.table` of its tables (from `pg_publication_tables`).
    pub tables: Vec<String>,
}

impl PubState {
    fn has(&self, table: &str) -> bool {
        self.all_tables || self.tables.iter().any(|t| t == table)
    }
}

/// What makes a table's updates and deletes publishable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    PrimaryKey,
    Index,
    Full,
    /// None usable: `REPLICA IDENTITY DEFAULT` without a primary key,
    /// `NOTHING`, or `USING INDEX` of a dropped index.
    Missing(&'static str),
}

/// One table of `source.tables`.
#[derive(Debug, Clone)]
pub struct TableState {
    pub schema: String,
    pub table: String,
    /// `schema.table`, canonical.
    pub name: String,
    pub exists: bool,
    pub identity: Identity,
    pub ops: PublishOps,
}

impl TableState {
    /// The name as SQL needs it (`public."Products"`).
    pub fn sql(&self) -> String {
        sql_table(&self.schema, &self.table)
    }
}

/// The publications and tables, as the server has them.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub main: PubState,
    pub insert: PubState,
    pub tables: Vec<TableState>,
}

/// Something the publications or tables lack.
#[derive(Debug, Clone)]
pub struct Finding {
    /// What is wrong, for the operator.
    pub what: String,
    /// How to fix it (SQL where there is a statement).
    pub fix: String,
    /// The statement pgferry runs itself when it manages the publications
    /// (`source.create_publication`); `None`: only the operator can fix it.
    pub repair: Option<String>,
    /// Tables the repair adds to a publication: their rows need a backfill.
    pub adds: Vec<String>,
}

/// Reads the publications and the tables of `source.tables`.
pub async fn inspect(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<Inspection, tokio_postgres::Error> {
    let s = &config.source;
    let mut tables = Vec::new();
    for (schema, table) in s.table_names() {
        let name = format!("{schema}.{table}");
        let row = client
            .query_opt(
                "SELECT c.relreplident::text, \
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &table],
            )
            .await?;
        let identity = match &row {
            None => Identity::Missing("the table does not exist"),
            Some(r) => identity(&r.get::<_, String>(0), r.get(1), r.get(2)),
        };
        tables.push(TableState {
            ops: s.publish_ops(&name),
            exists: row.is_some(),
            schema,
            table,
            name,
            identity,
        });
    }
    Ok(Inspection {
        main: publication(client, &s.publication).await?,
        insert: publication(client, &s.insert_publication()).await?,
        tables,
    })
}

fn identity(replident: &str, has_pk: bool, has_index: bool) -> Identity {
    match (replident, has_pk, has_index) {
        ("f", _, _) => Identity::Full,
        ("d", true, _) => Identity::PrimaryKey,
        ("d", false, _) => Identity::Missing("it has no primary key and REPLICA IDENTITY DEFAULT"),
        ("i", _, true) => Identity::Index,
        ("i", _, false) => {
            Identity::Missing("its REPLICA IDENTITY USING INDEX names an index that is gone")
        }
        _ => Identity::Missing("it has REPLICA IDENTITY NOTHING"),
    }
}

async fn publication(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<PubState, tokio_postgres::Error> {
    // pubtruncate exists from PostgreSQL 11 on.
    let v: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let truncate = if v >= 110000 { "pubtruncate" } else { "true" };
    let row = client
        .query_opt(
            &format!(
                "SELECT puballtables, pubinsert, pubupdate, pubdelete, {truncate} FROM pg_publication WHERE pubname = $1"
            ),
            &[&name],
        )
        .await?;
    let Some(r) = row else {
        return Ok(PubState {
            name: name.to_string(),
            ..PubState::default()
        });
    };
    let tables = client
        .query(
            "SELECT schemaname::text || '.' || tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    Ok(PubState {
        name: name.to_string(),
        exists: true,
        all_tables: r.get(0),
        insert: r.get(1),
        update: r.get(2),
        delete: r.get(3),
        truncate: r.get(4),
        tables,
    })
}

const ALL_OPS: &str = "insert, update, delete, truncate";
const INSERT_OPS: &str = "insert, truncate";

/// Everything the publications and tables lack. `slot_exists`:
/// the replication slot exists already (a publication created now would
/// postdate its position).
pub fn findings(insp: &Inspection, slot_exists: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let refuse = |what: String, fix: String| Finding {
        what,
        fix,
        repair: None,
        adds: Vec::new(),
    };
    let mut all_ops = Vec::new();
    let mut insert_only = Vec::new();
    for t in &insp.tables {
        if !t.exists {
            out.push(refuse(
                format!("table {} does not exist", t.name),
                "create it, or remove it from source.tables".into(),
            ));
            continue;
        }
        match (t.ops, &t.identity) {
            (PublishOps::All, Identity::Missing(why)) => out.push(refuse(
                format!(
                    "{} cannot be published: {why}. Publishing its updates and deletes would make Postgres refuse the application's own UPDATE and DELETE on it",
                    t.name
                ),
                format!(
                    "ALTER TABLE {} REPLICA IDENTITY FULL; (or add a primary key, or REPLICA IDENTITY USING INDEX on a unique index), \
                     or replicate its inserts only: [source.publish] \"{}\" = \"insert\"",
                    t.sql(),
                    t.name
                ),
            )),
            (PublishOps::All, _) => all_ops.push(t),
            (PublishOps::Insert, _) => insert_only.push(t),
        }
    }
    main_findings(&insp.main, &all_ops, &insert_only, &mut out);
    insert_findings(insp, &insert_only, slot_exists, &mut out);
    out
}

/// The main publication: all changes, every table that is not insert-only.
fn main_findings(
    p: &PubState,
    all_ops: &[&TableState],
    insert_only: &[&TableState],
    out: &mut Vec<Finding>,
) {
    let pubname = sql_ident(&p.name);
    if !p.exists {
        let list: Vec<String> = all_ops.iter().map(|t| t.sql()).collect();
        let sql = if list.is_empty() {
            format!("CREATE PUBLICATION {pubname}")
        } else {
            format!("CREATE PUBLICATION {pubname} FOR TABLE {}", list.join(", "))
        };
        out.push(Finding {
            what: format!("publication {} does not exist", p.name),
            fix: format!("{sql};"),
            repair: Some(sql),
            adds: all_ops.iter().map(|t| t.name.clone()).collect(),
        });
        return;
    }
    let needed_all = !all_ops.is_empty();
    if (needed_all && !(p.insert && p.update && p.delete && p.truncate))
        || !(p.insert && p.truncate)
    {
        let missing: Vec<&str> = [
            ("insert", p.insert),
            ("update", p.update || !needed_all),
            ("delete", p.delete || !needed_all),
            ("truncate", p.truncate),
        ]
        .iter()
        .filter(|(_, on)| !on)
        .map(|(op, _)| *op)
        .collect();
        out.push(Finding {
            what: format!(
                "publication {} does not publish {}: those changes of its tables would never reach the sinks",
                p.name,
                missing.join(", ")
            ),
            fix: format!("ALTER PUBLICATION {pubname} SET (publish = '{ALL_OPS}');"),
            repair: None,
            adds: Vec::new(),
        });
    }
    missing_tables(p, all_ops, "changes", out);
    if p.update || p.delete {
        for t in insert_only.iter().filter(|t| p.has(&t.name)) {
            let (fix, repair) = if p.all_tables {
                (
                    format!("publication {} is FOR ALL TABLES, so it publishes the updates and deletes of {} too: use a publication FOR TABLE, or give the table a replica identity and remove it from source.publish", p.name, t.name),
                    None,
                )
            } else {
                let sql = format!("ALTER PUBLICATION {pubname} DROP TABLE {}", t.sql());
                (format!("{sql};"), Some(sql))
            };
            out.push(Finding {
                what: format!(
                    "{} is insert-only (source.publish), but publication {} publishes its updates and deletes",
                    t.name, p.name
                ),
                fix,
                repair,
                adds: Vec::new(),
            });
        }
    }
}

/// `<publication>_insert`: inserts and truncates of the insert-only tables.
fn insert_findings(
    insp: &Inspection,
    insert_only: &[&TableState],
    slot_exists: bool,
    out: &mut Vec<Finding>,
) {
    let p = &insp.insert;
    let pubname = sql_ident(&p.name);
    if !p.exists {
        let list: Vec<String> = insert_only.iter().map(|t| t.sql()).collect();
        let sql = match list.is_empty() {
            true => format!("CREATE PUBLICATION {pubname} WITH (publish = '{INSERT_OPS}')"),
            false => format!(
                "CREATE PUBLICATION {pubname} FOR TABLE {} WITH (publish = '{INSERT_OPS}')",
                list.join(", ")
            ),
        };
        if insert_only.is_empty() {
            // Not needed yet: created with the main publication, before the
            // slot, so that an insert-only table can be added later.
            if !insp.main.exists {
                out.push(Finding {
                    what: format!("publication {} does not exist", p.name),
                    fix: format!("{sql};"),
                    repair: Some(sql),
                    adds: Vec::new(),
                });
            }
            return;
        }
        let names: Vec<&str> = insert_only.iter().map(|t| t.name.as_str()).collect();
        if slot_exists {
            out.push(Finding {
                what: format!(
                    "the insert-only tables ({}) need publication {}, which does not exist, and the slot exists already: \
                     Postgres cannot decode the slot's WAL with a publication created after it",
                    names.join(", "),
                    p.name
                ),
                fix: "give the tables a replica identity (ALTER TABLE … REPLICA IDENTITY FULL) and remove them from source.publish; \
                      or stop pgferry, drop the slot (pgferry slot drop), remove the checkpoint files and start again with source.snapshot = \"initial\""
                    .into(),
                repair: None,
                adds: Vec::new(),
            });
        } else {
            out.push(Finding {
                what: format!("publication {} does not exist", p.name),
                fix: format!("{sql};"),
                repair: Some(sql),
                adds: names.iter().map(|n| n.to_string()).collect(),
            });
        }
        return;
    }
    if insert_only.is_empty() {
        return;
    }
    if p.all_tables || p.update || p.delete || !p.insert || !p.truncate {
        out.push(Finding {
            what: format!(
                "publication {} must publish only inserts and truncates of the insert-only tables (source.publish)",
                p.name
            ),
            fix: if p.all_tables {
                format!("DROP PUBLICATION {pubname}; CREATE PUBLICATION {pubname} WITH (publish = '{INSERT_OPS}');  (before the slot is created)")
            } else {
                format!("ALTER PUBLICATION {pubname} SET (publish = '{INSERT_OPS}');")
            },
            repair: None,
            adds: Vec::new(),
        });
    }
    missing_tables(p, insert_only, "inserts", out);
}

/// The columns of `schema.table` (not dropped, in order), each with whether
/// it is part of the replica identity (all of them with `FULL`). `None`:
/// no such table.
pub async fn identity_columns(
    client: &tokio_postgres::Client,
    schema: &str,
    table: &str,
) -> Result<Option<Vec<(String, bool)>>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, CASE c.relreplident \
                 WHEN 'f' THEN true \
                 WHEN 'd' THEN coalesce(a.attnum = ANY (pk.indkey), false) \
                 WHEN 'i' THEN coalesce(a.attnum = ANY (ri.indkey), false) \
                 ELSE false END \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_index pk ON pk.indrelid = c.oid AND pk.indisprimary \
             LEFT JOIN pg_index ri ON ri.indrelid = c.oid AND ri.indisreplident \
             LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        rows.iter()
            .filter_map(|r| {
                Some((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, Option<bool>>(1).unwrap_or(false),
                ))
            })
            .collect(),
    ))
}

/// The tables of `tables` that publication `p` lacks: pgferry adds them
/// (when it manages `p`), and their rows then need a backfill.
fn missing_tables(p: &PubState, tables: &[&TableState], what: &str, out: &mut Vec<Finding>) {
    for t in tables.iter().filter(|t| !p.has(&t.name)) {
        let sql = format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            sql_ident(&p.name),
            t.sql()
        );
        out.push(Finding {
            what: format!(
                "{} is not in publication {}: its {what} would never reach the sinks",
                t.name, p.name
            ),
            fix: format!(
                "{sql};  (then pgferry backfill --table {} for the rows it holds)",
                t.name
            ),
            repair: Some(sql),
            adds: vec![t.name.clone()],
        });
    }
}

/// The publications a session streams: the main one, and the insert-only
/// one when a table is insert-only.
pub fn stream_publications(config: &Config) -> Vec<String> {
    let s = &config.source;
    let mut out = vec![s.publication.clone()];
    if s.publish.values().any(|p| *p == PublishOps::Insert) {
        out.push(s.insert_publication());
    }
    out
}

/// Makes the publications cover `source.tables`: repairs what pgferry may
/// repair (when it manages them) in one transaction, and refuses, naming
/// every problem and its fix, when anything else is wrong. Returns the
/// tables added to a publication.
pub async fn ensure(
    client: &tokio_postgres::Client,
    config: &Config,
    slot_exists: bool,
) -> Result<Vec<String>, PublicationError> {
    let insp = inspect(client, config).await?;
    let found = findings(&insp, slot_exists);
    let managed = config.source.create_publication;
    let blocking: Vec<&Finding> = found
        .iter()
        .filter(|f| f.repair.is_none() || !managed)
        .collect();
    if !blocking.is_empty() {
        let list: Vec<String> = blocking
            .iter()
            .map(|f| format!("{} (fix: {})", f.what, f.fix))
            .collect();
        let how = if managed {
            ""
        } else {
            " pgferry does not change publications itself because source.create_publication is false."
        };
        return Err(PublicationError::Refused(format!(
            "the publications do not fit source.tables, and starting would lose changes or break the application's writes: {}.{how}",
            list.join("; ")
        )));
    }
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let sql: Vec<String> = found.iter().filter_map(|f| f.repair.clone()).collect();
    let batch = format!("BEGIN; {}; COMMIT", sql.join("; "));
    if let Err(e) = client.batch_execute(&batch).await {
        let _ = client.batch_execute("ROLLBACK").await;
        let msg = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string());
        return Err(PublicationError::Refused(format!(
            "updating the publications failed ({msg}) running: {}; check that the user owns the tables (or is superuser)",
            sql.join("; ")
        )));
    }
    for s in &sql {
        tracing::info!(statement = %s, "publication updated");
    }
    Ok(found.into_iter().flat_map(|f| f.adds).collect())
}

impl From<PublicationError> for crate::pg::SourceError {
    fn from(e: PublicationError) -> Self {
        match e {
            PublicationError::Refused(m) => crate::pg::SourceError::fatal(m),
            PublicationError::Postgres(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities() {
        assert_eq!(identity("d", true, false), Identity::PrimaryKey);
        assert!(matches!(identity("d", false, false), Identity::Missing(_)));
        assert!(matches!(identity("n", true, false), Identity::Missing(_)));
        assert_eq!(identity("f", false, false), Identity::Full);
        assert_eq!(identity("i", false, true), Identity::Index);
        assert!(matches!(identity("i", true, false), Identity::Missing(_)));
    }
}
