//! Routing: which index a table's rows go to, which columns make the
//! document and which make its id, and the body an index is created with.
//!
//! Invariants:
//! - Every configured table has exactly one [`Route`]; a table not in the
//!   config is not the sink's ([`Routes::takes`]).
//! - A [`Plan`] is built for a relation on first sight and again after a
//!   schema change (names or key flags of its columns changed); the id of a
//!   document never comes from a `REPLICA IDENTITY FULL` key (every column)
//!   unless `id_columns` says which columns make it.
//! - Configuration mistakes found here are fatal and say what to change.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::complete::Shape;
use super::config::{render_index, ElasticsearchConfig};
use crate::event::RelationInfo;
use crate::sink::key::KeyTemplate;
use crate::sink::SinkError;

/// Where one configured table goes.
pub(super) struct Route {
    pub index: Arc<str>,
    id_columns: Option<Vec<String>>,
    columns: Option<Vec<String>>,
    exclude: Vec<String>,
    /// Other configured tables that write to the same index.
    pub shared_with: Vec<String>,
}

/// A route applied to one version of a relation.
pub(super) struct Plan {
    pub index: Arc<str>,
    pub key: KeyTemplate,
    /// The relation, its document columns and its id columns.
    pub shape: Arc<Shape>,
}

/// The routes of one sink, and the plans built from them.
pub(super) struct Routes {
    sink: String,
    /// By `schema.table`.
    by_table: HashMap<String, Route>,
    /// By relation oid.
    plans: HashMap<u32, Arc<Plan>>,
    /// Create-index body per index.
    create_bodies: HashMap<String, Value>,
    default_body: Value,
}

pub(super) fn read_mapping(path: &std::path::Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("mapping_file {}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format!("mapping_file {}: not valid JSON: {e}", path.display()))?;
    let Value::Object(m) = &v else {
        return Err(format!(
            "mapping_file {}: must hold a JSON object",
            path.display()
        ));
    };
    // A bare mapping (`{"properties": …}`) is wrapped into a create-index body.
    if m.contains_key("mappings") || m.contains_key("settings") || m.contains_key("aliases") {
        Ok(v)
    } else {
        Ok(json!({ "mappings": v }))
    }
}

impl Routes {
    /// The routes of the configured tables. `Err`: what to fix in the config.
    pub fn new(cfg: &ElasticsearchConfig) -> Result<Routes, String> {
        let default_body = match &cfg.mapping_file {
            Some(p) => read_mapping(p)?,
            None => json!({}),
        };
        let mut by_table = HashMap::new();
        let mut create_bodies = HashMap::new();
        for (name, t) in &cfg.tables {
            let (schema, table) = crate::config::split_table(name)
                .ok_or_else(|| format!("{name:?} is not a table name"))?;
            let qualified = format!("{schema}.{table}");
            let index: Arc<str> = render_index(
                t.index.as_deref().unwrap_or("{schema}.{table}"),
                &schema,
                &table,
            )
            .into();
            if let Some(p) = &t.mapping_file {
                create_bodies.insert(index.to_string(), read_mapping(p)?);
            }
            let route = Route {
                index,
                id_columns: t.id_columns.clone(),
                columns: t.columns.clone(),
                exclude: t.exclude_columns.clone(),
                shared_with: Vec::new(),
            };
            by_table.insert(qualified, route);
        }
        let by_index: Vec<(String, Arc<str>)> = by_table
            .iter()
            .map(|(q, r)| (q.clone(), r.index.clone()))
            .collect();
        for (q, r) in by_table.iter_mut() {
            r.shared_with = by_index
                .iter()
                .filter(|(o, i)| o != q && *i == r.index)
                .map(|(o, _)| o.clone())
                .collect();
        }
        Ok(Routes {
            sink: cfg.name.clone(),
            by_table,
            plans: HashMap::new(),
            create_bodies,
            default_body,
        })
    }

    /// Whether the table `schema.table` goes to this sink.
    pub fn takes(&self, qualified: &str) -> bool {
        self.by_table.contains_key(qualified)
    }

    /// The route of a table the sink [takes](Routes::takes).
    pub fn route(&self, qualified: &str) -> &Route {
        &self.by_table[qualified]
    }

    /// The sink's indices (sorted, once each).
    pub fn indices(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .by_table
            .values()
            .map(|r| r.index.to_string())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The body to create `index` with.
    pub fn create_body(&self, index: &str) -> &Value {
        self.create_bodies.get(index).unwrap_or(&self.default_body)
    }

    /// The plan for a relation, built on first sight and after a schema change.
    pub fn plan(&mut self, rel: &Arc<RelationInfo>) -> Result<Arc<Plan>, SinkError> {
        if let Some(p) = self.plans.get(&rel.oid) {
            if Arc::ptr_eq(&p.shape.rel, rel) || same_shape(&p.shape.rel, rel) {
                return Ok(p.clone());
            }
        }
        let route = &self.by_table[&rel.qualified];
        let fatal = |m: String| {
            SinkError::fatal(format!(
                "sink {:?}: table {}: {m}",
                self.sink, rel.qualified
            ))
        };
        let key = key_template(route, rel).map_err(fatal)?;
        let include: Vec<bool> = rel
            .columns
            .iter()
            .map(|c| {
                route.columns.as_ref().is_none_or(|l| l.contains(&c.name))
                    && !route.exclude.contains(&c.name)
            })
            .collect();
        for name in route.columns.iter().flatten().chain(&route.exclude) {
            if !rel.columns.iter().any(|c| &c.name == name) {
                tracing::warn!(sink = %self.sink, table = %rel.qualified, column = %name, "a configured column is not in the table; ignored");
            }
        }
        let plan = Arc::new(Plan {
            index: route.index.clone(),
            shape: Arc::new(Shape {
                rel: rel.clone(),
                include,
                key_columns: key.columns().map(str::to_string).collect(),
            }),
            key,
        });
        self.plans.insert(rel.oid, plan.clone());
        Ok(plan)
    }
}

/// How a table's document ids are made. `Err`: what to change.
fn key_template(route: &Route, rel: &RelationInfo) -> Result<KeyTemplate, String> {
    match &route.id_columns {
        Some(cols) => {
            if let Some(c) = cols
                .iter()
                .find(|c| !rel.columns.iter().any(|rc| &rc.name == *c))
            {
                return Err(format!(
                    "id_columns names {c:?}, which is not a column of the table"
                ));
            }
            KeyTemplate::for_columns(cols).map_err(|e| e.to_string())
        }
        None if rel.replica_identity == b'f' => Err(
            "it has REPLICA IDENTITY FULL, so every column is part of its replication key and cannot make a document id; \
             set id_columns (its primary key) in [sink.tables.\"{table}\"]"
                .replace("{table}", &rel.qualified),
        ),
        None => KeyTemplate::for_key_columns(rel).map_err(|e| {
            format!(
                "{e}. Documents need an id: give the table a primary key (or REPLICA IDENTITY USING INDEX), set id_columns, or remove it from the sink's tables"
            )
        }),
    }
}

fn same_shape(a: &RelationInfo, b: &RelationInfo) -> bool {
    a.qualified == b.qualified
        && a.columns.len() == b.columns.len()
        && a.columns
            .iter()
            .zip(&b.columns)
            .all(|(x, y)| x.name == y.name && x.is_key == y.is_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Row;

    #[test]
    fn id_columns_escape_like_the_default_key() {
        let rel = super::super::merge::tests::rel();
        let t = KeyTemplate::for_columns(&["body", "id"]).unwrap();
        let r = Row::from_values(&[Some("7"), Some("\"a:b%\""), None]);
        assert_eq!(t.render(&rel, &r).unwrap(), "a%3Ab%25:7");
        let t = KeyTemplate::for_columns(&["id"]).unwrap();
        let r = Row::from_values(&[Some("\"x:y\""), None, None]);
        assert_eq!(t.render(&rel, &r).unwrap(), "x%3Ay");
    }

    #[test]
    fn a_full_identity_table_needs_id_columns() {
        let cfg: ElasticsearchConfig = toml::from_str(
            "name = \"s\"\nurl = \"http://127.0.0.1:1\"\n[tables.\"public.docs\"]\n[tables.\"public.other\"]\nid_columns = [\"n\", \"id\"]\n",
        )
        .unwrap();
        let mut routes = Routes::new(&cfg).unwrap();
        let cols = || {
            vec![
                ("id".to_string(), 23, true),
                ("body".to_string(), 25, true),
                ("n".to_string(), 23, true),
            ]
        };
        let full = Arc::new(RelationInfo::new(
            1,
            "public".into(),
            "docs".into(),
            b'f',
            cols(),
        ));
        match routes.plan(&full) {
            Err(SinkError::Fatal { message: m, .. }) => {
                assert!(m.contains("id_columns") && m.contains("FULL"), "{m}")
            }
            _ => panic!("a FULL table without id_columns must stop"),
        }
        let other = Arc::new(RelationInfo::new(
            2,
            "public".into(),
            "other".into(),
            b'f',
            cols(),
        ));
        let plan = routes.plan(&other).unwrap();
        let r = Row::from_values(&[Some("7"), Some("\"b\""), Some("3")]);
        assert_eq!(plan.key.render(&other, &r).unwrap(), "3:7");
        assert_eq!(&*plan.index, "public.other");
    }

    #[test]
    fn mapping_files_may_hold_a_bare_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        std::fs::write(&p, r#"{"properties":{"n":{"type":"integer"}}}"#).unwrap();
        assert_eq!(
            read_mapping(&p).unwrap(),
            json!({"mappings": {"properties": {"n": {"type": "integer"}}}})
        );
        std::fs::write(&p, r#"{"settings":{"number_of_shards":1}}"#).unwrap();
        assert_eq!(
            read_mapping(&p).unwrap(),
            json!({"settings": {"number_of_shards": 1}})
        );
        std::fs::write(&p, "[1]").unwrap();
        assert!(read_mapping(&p).is_err());
    }
}
