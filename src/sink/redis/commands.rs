//! From change events to Redis commands: one [`Unit`] is one `MULTI … EXEC`
//! that ends by recording the position it brings Redis to.

use std::collections::HashMap;
use std::sync::Arc;

use super::config::{Mode, RedisConfig};
pub use super::position::Position;
use super::position::{encode, position_key};
use crate::event::{BeforeKind, Cell, Change, Op, RelationInfo, Row};
use crate::sink::key::{KeyError, KeyTemplate};
use crate::sink::{SinkError, StreamOwner};

/// A unit closes after a whole transaction once it holds this many bytes of
/// arguments or this many commands: transactions are never split below it.
const SOFT_BYTES: usize = 1 << 20;
const SOFT_COMMANDS: usize = 4096;
/// A transaction larger than this is split into several units (each still
/// atomic), so memory stays bounded whatever its size.
pub(super) const HARD_BYTES: usize = 8 << 20;
pub(super) const HARD_COMMANDS: usize = 32768;

/// One table's rule.
#[derive(Debug)]
pub struct TableRule {
    pub qualified: String,
    pub template: KeyTemplate,
    pub mode: Mode,
    pub ttl: Option<u64>,
    /// The set of keys written for this table (json and hash modes).
    pub set_key: String,
}

/// Everything the command builder needs, shared with the producer thread.
#[derive(Debug)]
pub struct Rules {
    pub tables: HashMap<String, Arc<TableRule>>,
    pub position_key: String,
    /// The stream whose position this sink records.
    pub owner: StreamOwner,
}

impl Rules {
    pub fn new(cfg: &RedisConfig, owner: StreamOwner) -> Result<Rules, SinkError> {
        let prefix = cfg.state_prefix();
        let mut tables = HashMap::new();
        for (name, t) in &cfg.tables {
            let (schema, table) = crate::config::split_table(name).ok_or_else(|| {
                SinkError::fatal(format!("sink {:?}: {name:?} is not schema.table", cfg.name))
            })?;
            let qualified = format!("{schema}.{table}");
            let template = KeyTemplate::parse(&t.key)
                .map_err(|e| SinkError::fatal(format!("sink {:?}: {e}", cfg.name)))?;
            tables.insert(
                qualified.clone(),
                Arc::new(TableRule {
                    set_key: format!("{prefix}:keys:{qualified}"),
                    qualified,
                    template,
                    mode: t.mode,
                    ttl: t.ttl_seconds,
                }),
            );
        }
        Ok(Rules {
            tables,
            position_key: position_key(&prefix),
            owner,
        })
    }
}

/// What a command of a unit is, to read its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Plain,
    /// A merge script: replies 0 when the stored row was missing and the
    /// key was deleted instead.
    Merge,
}

/// One atomic unit: `MULTI`, the commands, `SET <position>`, `EXEC`.
pub struct Unit {
    pub pipe: redis::Pipeline,
    /// Per command between MULTI and EXEC (the position SET included).
    pub kinds: Vec<Kind>,
    /// Invalidate-mode truncates: keys matching these templates are deleted
    /// (SCAN) before the unit is executed.
    pub scans: Vec<Arc<TableRule>>,
    /// Where Redis stands once the unit is applied.
    pub position: Position,
    /// Row changes in the unit.
    pub changes: u64,
}

/// Accumulates commands into units.
pub struct Builder {
    rules: Arc<Rules>,
    pipe: redis::Pipeline,
    kinds: Vec<Kind>,
    scans: Vec<Arc<TableRule>>,
    bytes: usize,
    changes: u64,
    /// Relations whose columns were checked against the key templates.
    checked: Vec<Arc<RelationInfo>>,
    buf: Vec<u8>,
}

const MERGE_JSON: &str = include_str!("merge_json.lua");
const MERGE_HASH: &str = include_str!("merge_hash.lua");
const TRUNCATE: &str = include_str!("truncate.lua");

impl Builder {
    pub fn new(rules: Arc<Rules>) -> Builder {
        let mut b = Builder {
            rules,
            pipe: redis::pipe(),
            kinds: Vec::new(),
            scans: Vec::new(),
            bytes: 0,
            changes: 0,
            checked: Vec::new(),
            buf: Vec::new(),
        };
        b.reset();
        b
    }

    fn reset(&mut self) {
        self.pipe = redis::pipe();
        self.pipe.ignore_errors();
        self.pipe.cmd("MULTI");
        self.kinds.clear();
        self.scans.clear();
        self.bytes = 0;
        self.changes = 0;
    }

    /// True when the unit holds nothing to do.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty() && self.scans.is_empty()
    }

    /// Past the size at which a unit closes between transactions.
    pub fn soft_full(&self) -> bool {
        self.bytes >= SOFT_BYTES || self.kinds.len() >= SOFT_COMMANDS
    }

    /// Past the size at which a unit closes even inside a transaction.
    pub fn hard_full(&self) -> bool {
        self.bytes >= HARD_BYTES || self.kinds.len() >= HARD_COMMANDS
    }

    /// Closes the unit: it will bring Redis to `position`.
    pub fn take(&mut self, position: Position) -> Unit {
        self.pipe
            .cmd("SET")
            .arg(&self.rules.position_key)
            .arg(encode(position, &self.rules.owner));
        self.kinds.push(Kind::Plain);
        self.pipe.cmd("EXEC");
        let unit = Unit {
            pipe: std::mem::take(&mut self.pipe),
            kinds: std::mem::take(&mut self.kinds),
            scans: std::mem::take(&mut self.scans),
            position,
            changes: self.changes,
        };
        self.reset();
        unit
    }

    fn cmd(&mut self, name: &str, args: &[&[u8]]) {
        self.pipe.cmd(name);
        for a in args {
            self.bytes += a.len();
            self.pipe.arg(*a);
        }
        self.kinds.push(Kind::Plain);
    }

    /// Adds the commands for one change. Changes of tables without a rule are ignored.
    pub fn add(&mut self, c: &Change) -> Result<(), SinkError> {
        let Some(rule) = self.rules.tables.get(&c.rel.qualified).cloned() else {
            return Ok(());
        };
        if c.op == Op::Read && rule.mode == Mode::Invalidate {
            // A loaded row changes nothing: there is nothing to invalidate.
            return Ok(());
        }
        self.changes += 1;
        if c.op == Op::Truncate {
            self.truncate(rule);
            return Ok(());
        }
        self.check(&rule, &c.rel)?;
        if c.op == Op::Delete {
            return self.delete(&rule, c);
        }
        let Some(after) = &c.after else {
            return Err(SinkError::fatal(format!(
                "an {} on {} came without its new row",
                c.op.as_str(),
                rule.qualified
            )));
        };
        let (key, old_key) = keys(&rule, c, after)?;
        let partial = after.cells.contains(&Cell::Unchanged);
        match rule.mode {
            Mode::Invalidate => {
                self.cmd("DEL", &[key.as_bytes()]);
                if let Some(old) = &old_key {
                    self.cmd("DEL", &[old.as_bytes()]);
                }
            }
            Mode::Json if partial => {
                self.merge_json(&rule, &c.rel, after, &key, old_key.as_deref())
            }
            Mode::Hash if partial => {
                self.merge_hash(&rule, &c.rel, after, &key, old_key.as_deref())
            }
            Mode::Json => self.set_json(&rule, &c.rel, after, &key, old_key.as_deref()),
            Mode::Hash => self.set_hash(&rule, &c.rel, after, &key, old_key.as_deref()),
        }
        Ok(())
    }

    fn truncate(&mut self, rule: Arc<TableRule>) {
        match rule.mode {
            Mode::Invalidate => self.scans.push(rule),
            Mode::Json | Mode::Hash => {
                self.pipe
                    .cmd("EVAL")
                    .arg(TRUNCATE)
                    .arg(1)
                    .arg(&rule.set_key);
                self.kinds.push(Kind::Plain);
            }
        }
    }

    fn delete(&mut self, rule: &TableRule, c: &Change) -> Result<(), SinkError> {
        let Some((_, before)) = &c.before else {
            return Err(SinkError::fatal(format!(
                "a delete on {} came without its old key; check the table's replica identity",
                rule.qualified
            )));
        };
        let key = rule
            .template
            .render(&c.rel, before)
            .map_err(|e| key_fatal(rule, c, e))?;
        self.cmd("DEL", &[key.as_bytes()]);
        if rule.mode != Mode::Invalidate {
            self.cmd("SREM", &[rule.set_key.as_bytes(), key.as_bytes()]);
        }
        Ok(())
    }

    /// The whole row as a JSON string.
    fn set_json(
        &mut self,
        rule: &TableRule,
        rel: &RelationInfo,
        after: &Row,
        key: &str,
        old_key: Option<&str>,
    ) {
        self.buf.clear();
        crate::event::write_row(rel, after, false, &mut self.buf);
        let doc = std::mem::take(&mut self.buf);
        match rule.ttl {
            Some(ttl) => self.cmd(
                "SET",
                &[
                    key.as_bytes(),
                    &doc,
                    b"EX",
                    itoa::Buffer::new().format(ttl).as_bytes(),
                ],
            ),
            None => self.cmd("SET", &[key.as_bytes(), &doc]),
        }
        self.buf = doc;
        self.written(rule, key, old_key);
    }

    /// The whole row as a hash, its non-NULL columns as fields.
    fn set_hash(
        &mut self,
        rule: &TableRule,
        rel: &RelationInfo,
        after: &Row,
        key: &str,
        old_key: Option<&str>,
    ) {
        self.cmd("DEL", &[key.as_bytes()]);
        let mut hset = redis::cmd("HSET");
        hset.arg(key);
        let mut fields = 0;
        for (i, col) in rel.columns.iter().enumerate() {
            if let Some(text) = after.text(i) {
                self.bytes += col.name.len() + text.len();
                hset.arg(&col.name).arg(text.as_bytes());
                fields += 1;
            }
        }
        // A row of NULLs only (never with a key column) has no hash.
        if fields > 0 {
            self.pipe.add_command(hset);
            self.kinds.push(Kind::Plain);
        }
        if let Some(ttl) = rule.ttl {
            self.cmd(
                "EXPIRE",
                &[key.as_bytes(), itoa::Buffer::new().format(ttl).as_bytes()],
            );
        }
        self.written(rule, key, old_key);
    }

    /// Bookkeeping after a full write of `key`: the key set, and the old key
    /// of a key change.
    fn written(&mut self, rule: &TableRule, key: &str, old_key: Option<&str>) {
        self.cmd("SADD", &[rule.set_key.as_bytes(), key.as_bytes()]);
        if let Some(old) = old_key {
            self.cmd("DEL", &[old.as_bytes()]);
            self.cmd("SREM", &[rule.set_key.as_bytes(), old.as_bytes()]);
        }
    }

    /// An update that did not send some TOASTed values: the row is rebuilt
    /// from the new values and the stored document's unchanged ones.
    fn merge_json(
        &mut self,
        rule: &TableRule,
        rel: &RelationInfo,
        after: &Row,
        key: &str,
        old_key: Option<&str>,
    ) {
        // The full row in column order, cut at each unchanged value:
        // piece0 value1 piece1 value2 piece2 …
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let mut names: Vec<&[u8]> = Vec::new();
        let mut cur = vec![b'{'];
        for (i, col) in rel.columns.iter().enumerate() {
            if i > 0 {
                cur.push(b',');
            }
            cur.extend_from_slice(col.json_name.as_bytes());
            cur.push(b':');
            match after.cell(i) {
                Cell::Unchanged => {
                    pieces.push(std::mem::take(&mut cur));
                    names.push(col.json_name.as_bytes());
                }
                _ => cur.extend_from_slice(after.json(i).unwrap_or(b"null")),
            }
        }
        cur.push(b'}');
        pieces.push(cur);
        let ttl = rule.ttl.unwrap_or(0);
        self.pipe
            .cmd("EVAL")
            .arg(MERGE_JSON)
            .arg(3)
            .arg(key)
            .arg(old_key.unwrap_or(key))
            .arg(&rule.set_key)
            .arg(ttl)
            .arg(&pieces[0]);
        self.bytes += pieces[0].len();
        for (name, piece) in names.iter().zip(&pieces[1..]) {
            self.bytes += name.len() + piece.len();
            self.pipe.arg(*name).arg(piece);
        }
        self.kinds.push(Kind::Merge);
    }

    /// The hash form of [`Builder::merge_json`].
    fn merge_hash(
        &mut self,
        rule: &TableRule,
        rel: &RelationInfo,
        after: &Row,
        key: &str,
        old_key: Option<&str>,
    ) {
        let mut unchanged = Vec::new();
        let mut set = Vec::new();
        let mut null = Vec::new();
        for (i, col) in rel.columns.iter().enumerate() {
            match after.cell(i) {
                Cell::Unchanged => unchanged.push(col.name.as_str()),
                Cell::Null => null.push(col.name.as_str()),
                Cell::Value { .. } => {
                    if let Some(text) = after.text(i) {
                        set.push((col.name.as_str(), text));
                    }
                }
            }
        }
        self.pipe
            .cmd("EVAL")
            .arg(MERGE_HASH)
            .arg(3)
            .arg(key)
            .arg(old_key.unwrap_or(key))
            .arg(&rule.set_key)
            .arg(rule.ttl.unwrap_or(0))
            .arg(unchanged.len())
            .arg(set.len());
        for n in &unchanged {
            self.pipe.arg(*n);
        }
        for (n, v) in &set {
            self.bytes += n.len() + v.len();
            self.pipe.arg(*n).arg(v.as_bytes());
        }
        for n in &null {
            self.pipe.arg(*n);
        }
        self.kinds.push(Kind::Merge);
    }

    /// The template's columns must be replica identity columns: only those
    /// are in the old row of an update or delete, so only then can the old
    /// key be found and removed.
    fn check(&mut self, rule: &TableRule, rel: &Arc<RelationInfo>) -> Result<(), SinkError> {
        if self.checked.iter().any(|r| Arc::ptr_eq(r, rel)) {
            return Ok(());
        }
        for name in rule.template.columns() {
            let Some(col) = rel.columns.iter().find(|c| c.name == name) else {
                return Err(SinkError::fatal(format!(
                    "the key template of {} names the column {name:?}, which the table does not have; \
                     fix sink.tables.\"{}\".key and start pgferry again",
                    rule.qualified, rule.qualified
                )));
            };
            if !col.is_key {
                return Err(SinkError::fatal(format!(
                    "the key template of {} uses the column {name:?}, which is not part of the table's replica identity \
                     (its primary key), so updates and deletes do not carry its old value and old keys would be left behind. \
                     Build the key from primary-key columns, or run ALTER TABLE {} REPLICA IDENTITY FULL, then start pgferry again",
                    rule.qualified, rule.qualified
                )));
            }
        }
        self.checked.push(rel.clone());
        Ok(())
    }
}

/// The row's key, and its old key when the change moved it.
fn keys(rule: &TableRule, c: &Change, after: &Row) -> Result<(String, Option<String>), SinkError> {
    let render = |row: &Row| rule.template.render(&c.rel, row);
    let fatal = |e: KeyError| key_fatal(rule, c, e);
    let old = c.before.as_ref().map(|(_, row)| render(row));
    let key = match render(after) {
        Ok(k) => k,
        // A TOASTed key column that did not change: the old row has it.
        Err(KeyError::Unchanged { .. }) if matches!(old, Some(Ok(_))) => {
            old.clone().and_then(Result::ok).unwrap_or_default()
        }
        Err(e) => return Err(fatal(e)),
    };
    let old_key = match old {
        Some(Ok(k)) if k != key => Some(k),
        Some(Ok(_)) | None => None,
        // The old key could not be rendered from a full old row (an
        // unchanged TOASTed value): it is then the same as the new one.
        Some(Err(KeyError::Unchanged { .. }))
            if c.before.as_ref().map(|b| b.0) == Some(BeforeKind::Full) =>
        {
            None
        }
        Some(Err(e)) => return Err(fatal(e)),
    };
    Ok((key, old_key))
}

fn key_fatal(rule: &TableRule, c: &Change, e: KeyError) -> SinkError {
    SinkError::fatal(format!(
        "cannot build the Redis key of a {} on {}: {e}; fix sink.tables.\"{}\".key and start pgferry again",
        c.op.as_str(),
        rule.qualified,
        rule.qualified
    ))
}
