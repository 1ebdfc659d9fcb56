//! Following the source's schema while streaming: type reloads before a
//! Relation message is used, the periodic composite-type refresh, and
//! configured tables dropped and created again (re-added to the publication
//! and backfilled). See `proto-notes/schema-changes.md`.

use super::*;

impl Session<'_> {
    /// Prepares for a Relation message. It comes at each session's first
    /// change of a table and after its columns changed: the user types it
    /// uses are (re)loaded, as they may have changed too (tables that are
    /// not delivered are left alone). When it would bind a configured name
    /// to a new relation, the routes learn whether that relation is gone
    /// (a replay meeting a dropped predecessor, see `decode::routes`).
    pub(super) async fn before_relation(
        &mut self,
        r: &pgoutput::Relation,
    ) -> Result<(), SourceError> {
        let schema = String::from_utf8_lossy(&r.namespace);
        let table = String::from_utf8_lossy(&r.name);
        if self
            .assembler
            .routes_mut()
            .would_rebind(r.oid, &schema, &table)
        {
            let q = "SELECT 1 FROM pg_catalog.pg_class WHERE oid = $1";
            if self.client.query_opt(q, &[&r.oid]).await?.is_none() {
                self.assembler.routes_mut().note_gone(r.oid);
            }
        }
        if self.assembler.takes(r.oid, &schema, &table) {
            let oids: Vec<u32> = r.columns.iter().map(|c| c.type_oid).collect();
            let user = self.assembler.types_mut().loaded(&oids);
            self.assembler.types_mut().load(&self.client, &user).await?;
            // The names its schema events show (the version does not use them).
            let types: Vec<(u32, i32)> = r
                .columns
                .iter()
                .map(|c| (c.type_oid, c.type_modifier))
                .collect();
            self.assembler
                .types_mut()
                .load_names(&self.client, &types)
                .await?;
        }
        Ok(())
    }

    /// `ALTER TYPE … RENAME ATTRIBUTE` shows nowhere in the stream (no
    /// Relation message, and the values parse as before), so while the
    /// stream is caught up the composite types in use are reloaded now and
    /// then. Changes decoded between the rename and the next refresh keep
    /// the old name (see proto-notes/schema-changes.md).
    pub(super) async fn refresh_composites(&mut self) -> Result<(), SourceError> {
        if self.types_refreshed.elapsed() < COMPOSITE_REFRESH {
            return Ok(());
        }
        self.types_refreshed = Instant::now();
        let user: Vec<u32> = (self.assembler.types_mut().composites().into_iter())
            .filter(|o| *o >= crate::decode::types::FIRST_NORMAL_OID)
            .collect();
        let types = self.assembler.types_mut();
        let before: Vec<_> = user.iter().map(|o| types.kind(*o).cloned()).collect();
        types.load(&self.client, &user).await?;
        for (oid, old) in user.iter().zip(before) {
            if types.kind(*oid) != old.as_ref() {
                tracing::warn!(type_oid = oid, "a composite type changed (ALTER TYPE … RENAME ATTRIBUTE shows nowhere in the stream): reloaded; changes decoded from here on use its new attribute names");
            }
        }
        Ok(())
    }

    /// A table dropped and created again under its name is not in a `FOR
    /// TABLE` publication, and nothing in the stream shows it: while the
    /// stream is idle, the publications are checked now and then. A
    /// configured table they lack is added back (when pgferry manages them),
    /// its old rows are cleared in the sinks (a `pgferry.replaced` message,
    /// see `decode::routes`) and its backfill is requested (with
    /// `source.snapshot = "initial"`; otherwise the log names the command).
    pub(super) async fn check_publication(&mut self) -> Result<(), SourceError> {
        if self.publication_checked.elapsed() < PUBLICATION_CHECK {
            return Ok(());
        }
        self.publication_checked = Instant::now();
        let insp = crate::publication::inspect(&self.client, self.config).await?;
        if !insp.main.exists || !insp.insert.exists {
            // A dropped publication ends the stream with its own error;
            // re-creating it here would hide that.
            return Ok(());
        }
        let found = crate::publication::findings(&insp, true);
        let adds: Vec<&crate::publication::Finding> = found
            .iter()
            .filter(|f| !f.adds.is_empty() && f.repair.is_some())
            .collect();
        if adds.is_empty() {
            return Ok(());
        }
        if !self.config.source.create_publication {
            for f in adds {
                tracing::error!(what = %f.what, fix = %f.fix, "a configured table is not published (dropped and created again, or removed from the publication): its changes do not reach the sinks. Run the fix, then load its rows with pgferry backfill --table");
            }
            return Ok(());
        }
        for f in adds {
            let sql = f.repair.as_deref().unwrap_or_default();
            self.client.batch_execute(sql).await?;
            tracing::warn!(statement = %sql, tables = ?f.adds, "a configured table was not published any more (dropped and created again, or removed from the publication): added it back");
            for table in &f.adds {
                self.replace_table(table).await?;
            }
        }
        Ok(())
    }

    /// Clears a replaced table's old rows in the sinks at this point of the
    /// WAL, then requests its backfill (or names the command).
    pub(super) async fn replace_table(&mut self, table: &str) -> Result<(), SourceError> {
        let Some(t) = self
            .config
            .source
            .table_names()
            .into_iter()
            .find(|(s, t)| format!("{s}.{t}") == table)
        else {
            return Ok(());
        };
        let sql = crate::config::sql_table(&t.0, &t.1);
        let row = self
            .client
            .query_one("SELECT pg_catalog.to_regclass($1)::pg_catalog.oid", &[&sql])
            .await?;
        let Some(oid) = row.get::<_, Option<u32>>(0) else {
            return Ok(());
        };
        let body = serde_json::json!({"schema": t.0, "table": t.1, "oid": oid}).to_string();
        self.client
            .execute(
                "SELECT pg_catalog.pg_logical_emit_message(true, $1, $2::text)",
                &[&crate::decode::routes::REPLACED_PREFIX, &body],
            )
            .await?;
        backfill_added_tables(&self.client, self.config, &[table.to_string()], false).await;
        Ok(())
    }
}
