//! Which relations of the stream are configured tables, followed by OID.
//!
//! The publication may carry more tables than `source.tables` (an operator
//! ran `ALTER PUBLICATION … ADD TABLE`, or the publication is `FOR ALL
//! TABLES`): only the configured ones may reach a sink. And a configured
//! table may change its name while pgferry streams (`ALTER TABLE … RENAME
//! TO`): sinks are configured by name, so routing by the name of each
//! Relation message would silently stop a sink from receiving the table.
//!
//! The rule, applied to every Relation message in stream order:
//!
//! - a relation whose OID is bound to a configured name keeps that name,
//!   whatever the Relation message calls it: a configured name follows its
//!   table through renames. Its events carry the configured name (the
//!   identity the sinks and their keys are configured with), and the
//!   divergence is logged once per Relation message, with the fix;
//! - a relation whose OID is not bound, but whose name (at that point of
//!   the WAL) is a configured name, takes that name over. If the name was
//!   bound to another relation already *seen in this stream*, that relation
//!   is gone or renamed away (two relations cannot hold one name at the same
//!   WAL position): the old binding ends, and the new relation's first change
//!   is preceded by a synthetic TRUNCATE of the name, because none of the old
//!   relation's rows belong to the new one (DROP TABLE + CREATE TABLE);
//! - anything else is skipped: its changes are never rendered nor delivered.
//!
//! A dropped table also leaves a `FOR TABLE` publication, so the table
//! created again under its name is not published at all: no Relation
//! message ever comes. The session notices that while the stream is idle,
//! adds the table back, and emits a transactional logical message with
//! prefix [`REPLACED_PREFIX`] before it requests the table's backfill. At
//! that message ([`Routes::replaced`]) the name is bound to the new
//! relation and its old rows are cleared (a TRUNCATE), so that the
//! backfill that follows in the WAL lands on an empty table.
//!
//! At session start the names are bound to the OIDs the catalog gives them
//! now ([`Routes::bind_initial`]). A replay from an older checkpoint may
//! first meet a dropped predecessor under the same name: when the session
//! finds that relation gone from the catalog ([`Routes::note_gone`]) and the
//! name's binding was not seen in the stream yet, it rebinds without a
//! truncate (the sink holds that predecessor's rows, as of the checkpoint).

use std::collections::{HashMap, HashSet};

/// Prefix of the logical message that says a configured table was replaced
/// by a new relation (content: JSON `{"schema","table","oid"}`).
pub const REPLACED_PREFIX: &str = "pgferry.replaced";

/// The prefix of the transactional messages of the DDL event trigger
/// (`sql/capture_ddl.sql`).
pub const DDL_PREFIX: &str = "pgferry.ddl";

/// What to do with a relation described by a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Deliver its changes under this `(schema, table)` (the configured name).
    To { schema: String, table: String },
    /// Not a configured table: skip its changes.
    Skip,
}

#[derive(Debug)]
struct Binding {
    oid: u32,
    /// A Relation message for `oid` under this binding was seen in the stream.
    seen: bool,
}

/// The configured tables and the relations they are bound to.
#[derive(Debug, Default)]
pub struct Routes {
    /// `None`: every relation is taken, under its own name (tests, benches).
    configured: Option<HashSet<(String, String)>>,
    by_name: HashMap<(String, String), Binding>,
    by_oid: HashMap<u32, (String, String)>,
    /// Relations whose first change must be preceded by a TRUNCATE.
    truncate_first: HashSet<u32>,
    /// Relations of the stream that the catalog no longer has.
    gone: HashSet<u32>,
}

impl Routes {
    /// Every relation, under its own name.
    pub fn all() -> Routes {
        Routes::default()
    }

    /// Only `tables` (`(schema, table)` pairs).
    pub fn only(tables: impl IntoIterator<Item = (String, String)>) -> Routes {
        Routes {
            configured: Some(tables.into_iter().collect()),
            ..Routes::default()
        }
    }

    /// Binds a configured name to the OID the catalog gives it at start.
    pub fn bind_initial(&mut self, schema: &str, table: &str, oid: u32) {
        let name = (schema.to_string(), table.to_string());
        self.by_oid.insert(oid, name.clone());
        self.by_name.insert(name, Binding { oid, seen: false });
    }

    /// The relation `oid` no longer exists in the catalog (dropped).
    pub fn note_gone(&mut self, oid: u32) {
        self.gone.insert(oid);
    }

    /// Whether a Relation message would bind a configured name to a new
    /// relation (the session then checks whether it still exists).
    pub fn would_rebind(&self, oid: u32, schema: &str, table: &str) -> bool {
        let name = (schema.to_string(), table.to_string());
        self.configured.as_ref().is_some_and(|c| c.contains(&name))
            && !self.by_oid.contains_key(&oid)
            && self.by_name.contains_key(&name)
    }

    /// The route of a relation, without changing anything: for the session
    /// to decide whether a relation's types are worth loading.
    pub fn peek(&self, oid: u32, schema: &str, table: &str) -> bool {
        match &self.configured {
            None => true,
            Some(c) => {
                self.by_oid.contains_key(&oid)
                    || c.contains(&(schema.to_string(), table.to_string()))
            }
        }
    }

    /// The configured name of relation `oid` (called `schema.table` in the
    /// catalog now), or `None` when it is not a configured table.
    pub fn configured_name(&self, oid: u32, schema: &str, table: &str) -> Option<String> {
        let name = (schema.to_string(), table.to_string());
        match (&self.configured, self.by_oid.get(&oid)) {
            (_, Some((s, t))) => Some(format!("{s}.{t}")),
            (None, None) => Some(format!("{schema}.{table}")),
            (Some(c), None) if c.contains(&name) => Some(format!("{schema}.{table}")),
            _ => None,
        }
    }

    /// Applies the rule of the module docs to a Relation message.
    pub fn on_relation(&mut self, oid: u32, schema: &str, table: &str) -> Route {
        let Some(configured) = &self.configured else {
            return Route::To {
                schema: schema.to_string(),
                table: table.to_string(),
            };
        };
        if let Some(name) = self.by_oid.get(&oid).cloned() {
            if let Some(b) = self.by_name.get_mut(&name) {
                b.seen = true;
            }
            if (name.0.as_str(), name.1.as_str()) != (schema, table) {
                tracing::warn!(
                    configured = %format!("{}.{}", name.0, name.1),
                    now = %format!("{schema}.{table}"),
                    oid,
                    "a configured table has another name in the stream (renamed): pgferry follows it by its OID, and its events keep the configured name. \
                     Put the table's current name in source.tables and in the sinks' tables before the next start (pgferry refuses to start while a configured table does not exist)"
                );
            }
            return Route::To {
                schema: name.0,
                table: name.1,
            };
        }
        let name = (schema.to_string(), table.to_string());
        if !configured.contains(&name) {
            return Route::Skip;
        }
        let new = Binding { oid, seen: true };
        if let Some(old) = self.by_name.insert(name.clone(), new) {
            self.by_oid.remove(&old.oid);
            self.truncate_first.remove(&old.oid);
            if old.seen || !self.gone.contains(&oid) {
                tracing::warn!(
                    table = %format!("{schema}.{table}"),
                    old_oid = old.oid,
                    new_oid = oid,
                    "a configured table was replaced by another table of the same name (dropped and created again, or renamed away): \
                     its rows in the sinks are cleared (a TRUNCATE) before the new table's first change"
                );
                self.truncate_first.insert(oid);
            }
        }
        self.by_oid.insert(oid, name.clone());
        Route::To {
            schema: name.0,
            table: name.1,
        }
    }

    /// A [`REPLACED_PREFIX`] message: binds the configured name to `oid`.
    /// Returns the relation bound before (if any), or `None` when the name
    /// is not configured here.
    pub fn replaced(&mut self, oid: u32, schema: &str, table: &str) -> Option<Option<u32>> {
        let name = (schema.to_string(), table.to_string());
        if !self.configured.as_ref().is_some_and(|c| c.contains(&name)) {
            return None;
        }
        let old = self
            .by_name
            .insert(name.clone(), Binding { oid, seen: true });
        if let Some(old) = &old {
            self.by_oid.remove(&old.oid);
        }
        self.truncate_first.remove(&oid);
        self.by_oid.insert(oid, name);
        Some(old.map(|b| b.oid))
    }

    /// True once for a relation whose first change needs a TRUNCATE first.
    pub fn take_truncate_first(&mut self, oid: u32) -> bool {
        self.truncate_first.remove(&oid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(s: &str, t: &str) -> Route {
        Route::To {
            schema: s.into(),
            table: t.into(),
        }
    }

    fn only(t: &[&str]) -> Routes {
        Routes::only(t.iter().map(|t| ("public".to_string(), t.to_string())))
    }

    #[test]
    fn unconfigured_tables_are_skipped_even_when_published() {
        let mut r = only(&["a"]);
        assert_eq!(r.on_relation(10, "public", "extra"), Route::Skip);
        assert!(!r.peek(10, "public", "extra"));
        assert_eq!(r.on_relation(11, "public", "a"), to("public", "a"));
    }

    #[test]
    fn a_renamed_table_is_followed_under_its_configured_name() {
        let mut r = only(&["s1"]);
        r.bind_initial("public", "s1", 7);
        assert_eq!(r.on_relation(7, "public", "s1"), to("public", "s1"));
        assert_eq!(r.on_relation(7, "public", "s1_renamed"), to("public", "s1"));
        assert!(!r.take_truncate_first(7));
    }

    #[test]
    fn a_recreated_table_takes_the_name_over_after_a_truncate() {
        let mut r = only(&["d"]);
        r.bind_initial("public", "d", 5);
        assert_eq!(r.on_relation(9, "public", "d"), to("public", "d"));
        // Even when the old one had no change in this session.
        assert!(r.take_truncate_first(9));
        let mut r = only(&["d"]);
        r.bind_initial("public", "d", 5);
        r.on_relation(5, "public", "d");
        assert_eq!(r.on_relation(9, "public", "d"), to("public", "d"));
        assert!(r.take_truncate_first(9));
        assert!(!r.take_truncate_first(9));
        // The old relation is no longer routed.
        assert_eq!(r.on_relation(5, "public", "d_old"), Route::Skip);
    }

    #[test]
    fn a_replaced_message_rebinds_without_a_second_truncate() {
        let mut r = only(&["d"]);
        r.bind_initial("public", "d", 5);
        assert_eq!(r.replaced(9, "public", "d"), Some(Some(5)));
        assert_eq!(r.on_relation(9, "public", "d"), to("public", "d"));
        assert!(!r.take_truncate_first(9));
        assert_eq!(r.replaced(9, "public", "other"), None);
    }

    #[test]
    fn a_replay_meeting_the_dropped_predecessor_first_does_not_truncate() {
        // The catalog binds the name to the new table (9); the replay from
        // an older checkpoint meets the old table (5) first, then the new.
        let mut r = only(&["d"]);
        r.bind_initial("public", "d", 9);
        assert!(r.would_rebind(5, "public", "d"));
        r.note_gone(5);
        assert_eq!(r.on_relation(5, "public", "d"), to("public", "d"));
        assert!(!r.take_truncate_first(5));
        assert_eq!(r.on_relation(9, "public", "d"), to("public", "d"));
        assert!(r.take_truncate_first(9));
    }
}
