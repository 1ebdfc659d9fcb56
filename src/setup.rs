//! `pgferry setup`: the SQL a DBA runs once so that pgferry works as a
//! least-privilege role, never as a superuser.
//!
//! The role is the user of `source.url`. It gets `LOGIN REPLICATION` (slots
//! and the stream; on RDS and Aurora membership in `rds_replication`), `USAGE` on the schemas and `SELECT` on the tables of
//! `source.tables` (snapshots and backfills), default privileges so that
//! tables created later in those schemas (by the tables' owners, or by the
//! admin) are readable too (a table added to `source.tables` later is
//! backfilled), and `EXECUTE` on
//! `pg_logical_emit_message(boolean, text, text)` (heartbeat, snapshot
//! watermarks, backfill requests). The publications are created or
//! completed as `pgferry run` would (see `publication`), by the admin
//! connection, so the role needs to own no table. What only the table's
//! owner can decide (a table without a replica identity) is printed as
//! advice. Every statement is idempotent: running setup again changes
//! nothing.

use std::io::Write;

use crate::config::{sql_ident, sql_table, Config};
use crate::pg::{self, SourceError};

/// The statements, and the advice that needs a person.
#[derive(Debug, Default)]
pub struct Plan {
    pub role: String,
    pub statements: Vec<String>,
    pub advice: Vec<String>,
}

/// `'…'` with quotes doubled.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Reads what the server has (through `admin`) and plans the statements.
/// `with_password`: set the role's password from `source.url` (never when
/// printing, so the password stays out of the output).
pub async fn plan(
    admin: &tokio_postgres::Client,
    config: &Config,
    with_password: bool,
) -> Result<Plan, SourceError> {
    let s = &config.source;
    let (url, _) =
        crate::conn::tls::parse_url(&s.url).map_err(|e| pg::fatal(format!("source.url: {e}")))?;
    let role = url
        .get_user()
        .ok_or_else(|| pg::fatal("source.url names no user: setup grants to that user"))?
        .to_string();
    let r = sql_ident(&role);
    let mut st = vec![
        format!(
            "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {}) THEN CREATE ROLE {r}; END IF; END$$",
            literal(&role)
        ),
        format!("ALTER ROLE {r} LOGIN"),
    ];
    // RDS and Aurora grant replication through the rds_replication role;
    // the REPLICATION attribute is reserved there.
    let rds = admin
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rds_replication')",
            &[],
        )
        .await?
        .get::<_, bool>(0);
    st.push(if rds {
        format!("GRANT rds_replication TO {r}")
    } else {
        format!("ALTER ROLE {r} REPLICATION")
    });
    let mut advice = Vec::new();
    match url.get_password() {
        Some(pw) if with_password => st.push(format!(
            "ALTER ROLE {r} PASSWORD {}",
            literal(&String::from_utf8_lossy(pw))
        )),
        Some(_) => advice.push(format!(
            "set the password of source.url: ALTER ROLE {r} PASSWORD '…';"
        )),
        None => advice.push(format!(
            "give {r} a way to log in (a password, ALTER ROLE {r} PASSWORD '…';, or a client certificate), and a pg_hba.conf line (hostssl … scram-sha-256 or cert)"
        )),
    }
    let mut schemas: Vec<String> = s.table_names().into_iter().map(|(s, _)| s).collect();
    schemas.sort();
    schemas.dedup();
    for schema in &schemas {
        st.push(format!(
            "GRANT USAGE ON SCHEMA {} TO {r}",
            sql_ident(schema)
        ));
    }
    for (schema, table) in s.table_names() {
        st.push(format!(
            "GRANT SELECT ON {} TO {r}",
            sql_table(&schema, &table)
        ));
    }
    st.extend(default_privileges(admin, config, &role).await?);
    let insp = crate::publication::inspect(admin, config).await?;
    let slot_exists = pg::slot_info(admin, &s.slot).await?.is_some();
    for f in crate::publication::findings(&insp, slot_exists) {
        match f.repair {
            Some(sql) => st.push(sql),
            None => advice.push(format!("{}: {}", f.what, f.fix)),
        }
    }
    st.push(format!(
        "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO {r}"
    ));
    Ok(Plan {
        role,
        statements: st,
        advice,
    })
}

/// `ALTER DEFAULT PRIVILEGES … GRANT SELECT ON TABLES` for each schema of
/// `source.tables` and each role that creates tables there: the owners of
/// the configured tables and the admin itself, those the admin may act for.
async fn default_privileges(
    admin: &tokio_postgres::Client,
    config: &Config,
    role: &str,
) -> Result<Vec<String>, SourceError> {
    let (schemas, tables): (Vec<String>, Vec<String>) =
        config.source.table_names().into_iter().unzip();
    let rows = admin
        .query(
            "SELECT DISTINCT t.schema, o.owner FROM unnest($1::text[], $2::text[]) t(schema, name)              CROSS JOIN LATERAL (SELECT tableowner::text FROM pg_tables p WHERE p.schemaname = t.schema AND p.tablename = t.name                                  UNION SELECT current_user::text) o(owner)              WHERE o.owner <> $3 AND pg_has_role(current_user, o.owner, 'MEMBER')              ORDER BY 1, 2",
            &[&schemas, &tables, &role],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            format!(
                "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON TABLES TO {}",
                sql_ident(row.get(1)),
                sql_ident(row.get(0)),
                sql_ident(role)
            )
        })
        .collect())
}

/// Prints the plan as a SQL script (advice as comments).
pub fn print<W: Write>(plan: &Plan, out: &mut W) -> std::io::Result<()> {
    writeln!(
        out,
        "-- pgferry setup for role {}: run as a superuser (or the tables' owner with CREATEROLE). Idempotent.",
        plan.role
    )?;
    for s in &plan.statements {
        writeln!(out, "{s};")?;
    }
    for a in &plan.advice {
        writeln!(out, "-- advice: {a}")?;
    }
    Ok(())
}

/// Connects with `admin_url` (a superuser's, or the tables' owner's), plans
/// and runs the statements in one transaction, or with `print_only` prints
/// them. Returns the plan.
pub async fn run<W: Write>(
    config: &Config,
    admin_url: &str,
    print_only: bool,
    out: &mut W,
) -> Result<Plan, SourceError> {
    let admin = pg::sql_connect_url(admin_url, &config.source.network).await?;
    let plan = plan(&admin, config, !print_only).await?;
    if print_only {
        print(&plan, out).map_err(|e| pg::fatal(format!("writing the script: {e}")))?;
        return Ok(plan);
    }
    let batch = format!("BEGIN; {}; COMMIT", plan.statements.join("; "));
    if let Err(e) = admin.batch_execute(&batch).await {
        let _ = admin.batch_execute("ROLLBACK").await;
        return Err(SourceError::from(e));
    }
    let w = |e: std::io::Error| pg::fatal(format!("writing the report: {e}"));
    for s in &plan.statements {
        // The password is never printed.
        let shown = if s.contains(" PASSWORD ") {
            format!("ALTER ROLE {} PASSWORD '***'", sql_ident(&plan.role))
        } else {
            s.clone()
        };
        writeln!(out, "done: {shown}").map_err(w)?;
    }
    for a in &plan.advice {
        writeln!(out, "advice: {a}").map_err(w)?;
    }
    Ok(plan)
}
