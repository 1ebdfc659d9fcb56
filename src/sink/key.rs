//! Keys and document ids built from a row: templates such as
//! `"product:{id}"` or `"{tenant_id}:{id}"`.
//!
//! Collision-freedom: a column value is inserted as it is, except for a few
//! percent-encoded characters (their UTF-8 bytes: `:` → `%3A`, `%` →
//! `%25`): `%` itself, every character of the template's literal text that
//! is not a letter or digit (the separators: `:` in `product:{id}`), and
//! the first character of each literal that follows a column. A value can
//! therefore never produce the literal that ends it, and two different value
//! tuples always give two different keys: `{a}:{b}` with (`x:y`, `z`) gives
//! `x%3Ay:z`, with (`x`, `y:z`) gives `x:y%3Az`. Letters and digits of a
//! prefix stay as they are (`s1:{id}` gives `s1:1`), so ordinary keys stay
//! readable. Two columns must be separated by literal text: `{a}{b}` could
//! give `abc` for (`ab`, `c`) and for (`a`, `bc`).
//!
//! A value is its text: a JSON string's content (unescaped), or the JSON text
//! of anything else (`42`, `true`, `1.50`).
//!
//! Between two templates (two tables in one Redis database), collisions are
//! possible whenever their languages intersect: `k:{id}` and `k:{code}`
//! both render `k:5`. [`KeyTemplate::collision`] decides this exactly (a
//! search over the product of the two templates' automata) and returns an
//! example key, so the config is refused with a concrete explanation.

use std::borrow::Cow;

use crate::event::{Cell, RelationInfo, Row};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Col(String),
}

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
    /// Characters to escape in values: `%` plus those of the literal parts.
    special: Vec<char>,
}

/// Why a key could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key template {template:?}: {reason}")]
    Template { template: String, reason: String },
    #[error("column {column:?} of {table} is not in the table")]
    NoColumn { column: String, table: String },
    #[error("key column {column:?} of {table} is NULL")]
    Null { column: String, table: String },
    #[error(
        "key column {column:?} of {table} is an unchanged TOAST value that the server did not send"
    )]
    Unchanged { column: String, table: String },
}

impl KeyTemplate {
    /// Parses `text`; `{{` and `}}` stand for literal braces.
    pub fn parse(text: &str) -> Result<KeyTemplate, KeyError> {
        let err = |reason: &str| KeyError::Template {
            template: text.to_string(),
            reason: reason.to_string(),
        };
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(err("a '{' is not closed")),
                        }
                    }
                    if name.is_empty() {
                        return Err(err("empty column name in {}"));
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Col(name));
                }
                '}' => return Err(err("a '}' without '{' (write '}}' for a literal brace)")),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        if !parts.iter().any(|p| matches!(p, Part::Col(_))) {
            return Err(err("names no column; use e.g. \"product:{id}\""));
        }
        if parts
            .windows(2)
            .any(|w| matches!(w, [Part::Col(_), Part::Col(_)]))
        {
            return Err(err(
                "two columns follow each other without text between them, so two rows could get the same key; separate them, e.g. \"{a}:{b}\"",
            ));
        }
        let mut special = vec!['%'];
        let mut add = |c: char| {
            if !special.contains(&c) {
                special.push(c);
            }
        };
        for (i, p) in parts.iter().enumerate() {
            if let Part::Lit(l) = p {
                l.chars()
                    .filter(|c| !c.is_alphanumeric())
                    .for_each(&mut add);
                // The literal that ends a column's value.
                if i > 0 {
                    if let Some(first) = l.chars().next() {
                        add(first);
                    }
                }
            }
        }
        Ok(KeyTemplate { parts, special })
    }

    /// The default: the relation's key columns joined by `:`.
    pub fn for_key_columns(rel: &RelationInfo) -> Result<KeyTemplate, KeyError> {
        let cols: Vec<&str> = rel
            .columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| c.name.as_str())
            .collect();
        if cols.is_empty() {
            return Err(KeyError::Template {
                template: String::new(),
                reason: format!(
                    "{} has no replica identity key; give it a primary key or configure a key template",
                    rel.qualified
                ),
            });
        }
        Self::for_columns(&cols)
    }

    /// The named columns joined by `:`, each value with `%` and `:` escaped
    /// (also for a single column), as [`for_key_columns`](Self::for_key_columns) does.
    pub fn for_columns<S: AsRef<str>>(names: &[S]) -> Result<KeyTemplate, KeyError> {
        let cols: Vec<String> = names
            .iter()
            .map(|c| format!("{{{}}}", c.as_ref().replace('{', "{{").replace('}', "}}")))
            .collect();
        let mut t = Self::parse(&cols.join(":"))?;
        if !t.special.contains(&':') {
            t.special.push(':');
        }
        Ok(t)
    }

    /// The column names the template uses.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Col(c) => Some(c.as_str()),
            Part::Lit(_) => None,
        })
    }

    /// The literal text before the first column (`"product:"` for
    /// `"product:{id}"`); empty when the template starts with a column.
    pub fn literal_prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Lit(l)) => l,
            _ => "",
        }
    }

    /// A Redis `SCAN MATCH` glob that matches every key the template can
    /// render: literal text escaped, each column a `*`. It can match other
    /// keys too; confirm with [`KeyTemplate::matches`].
    pub fn glob(&self) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => {
                    for c in l.chars() {
                        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                }
                Part::Col(_) => out.push('*'),
            }
        }
        out
    }

    /// True when `key` has the shape of a key this template renders: its
    /// literal parts in order, and between them escaped values (no
    /// character of the literal text, `%` only as a `%XX` escape).
    pub fn matches(&self, key: &str) -> bool {
        let mut rest = key;
        for p in &self.parts {
            match p {
                Part::Lit(l) => match rest.strip_prefix(l.as_str()) {
                    Some(r) => rest = r,
                    None => return false,
                },
                Part::Col(_) => {
                    let b = rest.as_bytes();
                    let mut i = 0;
                    loop {
                        match rest[i..].chars().next() {
                            None => break,
                            Some('%') => {
                                if b.len() >= i + 3
                                    && b[i + 1].is_ascii_hexdigit()
                                    && b[i + 2].is_ascii_hexdigit()
                                {
                                    i += 3;
                                } else {
                                    break;
                                }
                            }
                            Some(c) if self.special.contains(&c) => break,
                            Some(c) => i += c.len_utf8(),
                        }
                    }
                    rest = &rest[i..];
                }
            }
        }
        rest.is_empty()
    }

    /// Renders the key for `row` of `rel`.
    pub fn render(&self, rel: &RelationInfo, row: &Row) -> Result<String, KeyError> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Col(name) => {
                    let i = rel
                        .columns
                        .iter()
                        .position(|c| &c.name == name)
                        .ok_or_else(|| KeyError::NoColumn {
                            column: name.clone(),
                            table: rel.qualified.clone(),
                        })?;
                    match row.cell(i) {
                        Cell::Null => {
                            return Err(KeyError::Null {
                                column: name.clone(),
                                table: rel.qualified.clone(),
                            })
                        }
                        Cell::Unchanged => {
                            return Err(KeyError::Unchanged {
                                column: name.clone(),
                                table: rel.qualified.clone(),
                            })
                        }
                        Cell::Value { .. } => {
                            let text = row.text(i).unwrap_or(Cow::Borrowed(""));
                            escape_into(&text, &self.special, &mut out);
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// One template as an automaton over characters: a state is a part index
/// and a position inside it. A column part reads values as [`escape_into`]
/// writes them: characters outside `special`, and `%XX` escapes of the
/// special characters' UTF-8 bytes.
struct Automaton<'a> {
    t: &'a KeyTemplate,
    /// The escape sequences a column value can contain (`%3A` for `:`).
    escapes: Vec<Vec<char>>,
}

/// Where an automaton is: `part == parts.len()` is the end. In a literal
/// part `pos` is the offset; in a column part, `esc` is the escape being
/// read (`None`: between characters) and `pos` its offset, and `filled`
/// whether the value has a character yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct State {
    part: usize,
    pos: usize,
    esc: Option<usize>,
    filled: bool,
}

impl<'a> Automaton<'a> {
    fn new(t: &'a KeyTemplate) -> Self {
        let escapes = t
            .special
            .iter()
            .map(|c| {
                let mut s = String::new();
                escape_into(&c.to_string(), &t.special, &mut s);
                s.chars().collect()
            })
            .collect();
        Automaton { t, escapes }
    }

    fn start(&self) -> State {
        State {
            part: 0,
            pos: 0,
            esc: None,
            filled: false,
        }
    }

    fn at_end(&self, s: State) -> bool {
        s.part == self.t.parts.len()
    }

    /// The states reachable without reading: the end of a literal, or the
    /// end of a column value (a non-empty one unless `empty_values`).
    fn closure(&self, s: State, empty_values: bool, out: &mut Vec<State>) {
        let mut s = s;
        loop {
            if out.contains(&s) {
                return;
            }
            out.push(s);
            let next = State {
                part: s.part + 1,
                pos: 0,
                esc: None,
                filled: false,
            };
            match self.t.parts.get(s.part) {
                Some(Part::Lit(l)) if s.pos == l.chars().count() => s = next,
                Some(Part::Col(_)) if s.esc.is_none() && (s.filled || empty_values) => s = next,
                _ => return,
            }
        }
    }

    /// The states after reading `c` from `s` (before their closure).
    fn step(&self, s: State, c: char) -> Vec<State> {
        match self.t.parts.get(s.part) {
            None => Vec::new(),
            Some(Part::Lit(l)) => match l.chars().nth(s.pos) {
                Some(x) if x == c => vec![State {
                    pos: s.pos + 1,
                    ..s
                }],
                _ => Vec::new(),
            },
            Some(Part::Col(_)) => match s.esc {
                None if !self.t.special.contains(&c) => vec![State { filled: true, ..s }],
                None => (0..self.escapes.len())
                    .filter(|&e| self.escapes[e][0] == c)
                    .map(|e| self.after_escape_char(s, e, 1))
                    .collect(),
                Some(e) if self.escapes[e].get(s.pos) == Some(&c) => {
                    vec![self.after_escape_char(s, e, s.pos + 1)]
                }
                Some(_) => Vec::new(),
            },
        }
    }

    fn after_escape_char(&self, s: State, e: usize, pos: usize) -> State {
        if pos == self.escapes[e].len() {
            State {
                esc: None,
                pos: 0,
                filled: true,
                ..s
            }
        } else {
            State {
                esc: Some(e),
                pos,
                ..s
            }
        }
    }
}

impl KeyTemplate {
    /// A key that both templates can render (from some values of their
    /// columns), or `None` when no key of one can ever equal a key of the
    /// other. Exact: it searches the product of the two templates' automata.
    pub fn collision(&self, other: &KeyTemplate) -> Option<String> {
        // An example with non-empty values reads better; empty values
        // (e.g. '' text) can collide too.
        self.collision_with(other, false)
            .or_else(|| self.collision_with(other, true))
    }

    fn collision_with(&self, other: &KeyTemplate, empty_values: bool) -> Option<String> {
        use std::collections::{HashMap, VecDeque};
        let (a, b) = (Automaton::new(self), Automaton::new(other));
        // Every character that behaves differently somewhere, plus one that
        // is special nowhere (all such characters behave alike).
        let mut alphabet: Vec<char> = Vec::new();
        for t in [self, other] {
            for p in &t.parts {
                if let Part::Lit(l) = p {
                    alphabet.extend(l.chars());
                }
            }
            alphabet.extend(t.special.iter().copied());
        }
        alphabet.extend("0123456789ABCDEF%".chars());
        if let Some(plain) = "abcdefghijklmnopqrstuvwxyz0123456789"
            .chars()
            .find(|c| !alphabet.contains(c))
        {
            alphabet.push(plain);
        }
        alphabet.sort_unstable();
        alphabet.dedup();
        // Each pair of states reached, with the pair and character it was
        // reached from (to spell the example key).
        type Pair = (State, State);
        let mut seen: HashMap<Pair, Option<(Pair, char)>> = HashMap::new();
        let mut queue = VecDeque::new();
        let pairs = |sa: State, sb: State| {
            let (mut ca, mut cb) = (Vec::new(), Vec::new());
            a.closure(sa, empty_values, &mut ca);
            b.closure(sb, empty_values, &mut cb);
            let mut out = Vec::new();
            for x in &ca {
                for y in &cb {
                    out.push((*x, *y));
                }
            }
            out
        };
        for p in pairs(a.start(), b.start()) {
            if seen.insert(p, None).is_none() {
                queue.push_back(p);
            }
        }
        while let Some(p) = queue.pop_front() {
            if a.at_end(p.0) && b.at_end(p.1) {
                let mut key = Vec::new();
                let mut cur = p;
                while let Some(Some((prev, c))) = seen.get(&cur) {
                    key.push(*c);
                    cur = *prev;
                }
                return Some(key.into_iter().rev().collect());
            }
            for &c in &alphabet {
                for na in a.step(p.0, c) {
                    for nb in b.step(p.1, c) {
                        for q in pairs(na, nb) {
                            if let std::collections::hash_map::Entry::Vacant(v) = seen.entry(q) {
                                v.insert(Some((p, c)));
                                queue.push_back(q);
                            }
                        }
                    }
                }
            }
        }
        None
    }
}

fn escape_into(value: &str, special: &[char], out: &mut String) {
    for c in value.chars() {
        if special.contains(&c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel() -> RelationInfo {
        RelationInfo::new(
            1,
            "public".into(),
            "t".into(),
            b'd',
            vec![
                ("tenant".into(), 25, true),
                ("id".into(), 23, true),
                ("v".into(), 25, false),
            ],
        )
    }

    fn row(vals: &[Option<&str>]) -> Row {
        Row::from_values(vals)
    }

    #[test]
    fn renders_composite_keys_without_collisions() {
        let t = KeyTemplate::parse("{tenant}:{id}").unwrap();
        let a = t
            .render(&rel(), &row(&[Some("\"x:y\""), Some("1"), None]))
            .unwrap();
        let b = t
            .render(&rel(), &row(&[Some("\"x\""), Some("\"y:1\""), None]))
            .unwrap();
        assert_eq!(a, "x%3Ay:1");
        assert_eq!(b, "x:y%3A1");
        assert_ne!(a, b);
        let c = t
            .render(&rel(), &row(&[Some("\"50%\""), Some("2"), None]))
            .unwrap();
        assert_eq!(c, "50%25:2");
        let p = KeyTemplate::parse("product:{id}").unwrap();
        assert_eq!(
            p.render(&rel(), &row(&[Some("\"a\""), Some("42"), None]))
                .unwrap(),
            "product:42"
        );
    }

    #[test]
    fn globs_and_structural_matches() {
        let t = KeyTemplate::parse("p[1]:{tenant}:{id}").unwrap();
        assert_eq!(t.literal_prefix(), "p[1]:");
        assert_eq!(t.glob(), "p\\[1\\]:*:*");
        let key = t
            .render(&rel(), &row(&[Some("\"x:y%\""), Some("7"), None]))
            .unwrap();
        assert!(t.matches(&key), "{key}");
        assert!(t.matches("p[1]::"));
        assert!(!t.matches("p[1]:a:b:c"));
        assert!(!t.matches("p[1]:a%zz:b"));
        assert!(!t.matches("q[1]:a:b"));
        assert_eq!(KeyTemplate::parse("{id}").unwrap().literal_prefix(), "");
    }

    #[test]
    fn default_template_joins_key_columns() {
        let t = KeyTemplate::for_key_columns(&rel()).unwrap();
        assert_eq!(
            t.render(&rel(), &row(&[Some("\"a:b\""), Some("7"), None]))
                .unwrap(),
            "a%3Ab:7"
        );
    }

    #[test]
    fn bad_templates_and_missing_values_are_errors() {
        assert!(KeyTemplate::parse("product:").is_err());
        assert!(KeyTemplate::parse("{a}{b}").is_err());
        assert!(KeyTemplate::parse("{id").is_err());
        assert!(KeyTemplate::parse("id}").is_err());
        assert_eq!(
            KeyTemplate::parse("{{x}}:{id}")
                .unwrap()
                .columns()
                .collect::<Vec<_>>(),
            ["id"]
        );
        let t = KeyTemplate::parse("{nope}").unwrap();
        assert!(matches!(
            t.render(&rel(), &row(&[None, None, None])),
            Err(KeyError::NoColumn { .. })
        ));
        let t = KeyTemplate::parse("{id}").unwrap();
        assert!(matches!(
            t.render(&rel(), &row(&[None, None, None])),
            Err(KeyError::Null { .. })
        ));
    }

    #[test]
    fn templates_that_can_render_the_same_key_collide() {
        let t = |s: &str| KeyTemplate::parse(s).unwrap();
        let collide = |x: &str, y: &str| t(x).collision(&t(y));
        // The case: the same prefix and shape.
        assert_eq!(collide("k:{id}", "k:{code}").as_deref(), Some("k:0"));
        assert!(collide("product:{id}", "product:{id}").is_some());
        // A literal the other's values can hold: "ab5" is both a+"b5" and ab+"5".
        let e = collide("a{id}", "ab{id}").unwrap();
        assert!(t("a{id}").matches(&e) && t("ab{id}").matches(&e), "{e}");
        // Escapes count: {x}:{y} renders "%3A" only as an escape, which {z} can too.
        assert!(collide("{x}:{y}", "{z}").is_some());
        // Distinct prefixes, and a separator the other template escapes, never collide.
        assert_eq!(collide("product:{id}", "item:{id}"), None);
        assert_eq!(collide("p:{id}", "p:x:{id}"), None);
        assert_eq!(collide("p:{id}", "q:{id}"), None);
        assert_eq!(collide("acct:{tenant}:{id}", "acct:{id}"), None);
        // Every example is a key both can really render.
        for (x, y) in [("k:{id}", "k:{code}"), ("{a}-{b}", "{c}"), ("x{a}", "{b}y")] {
            let key = collide(x, y).unwrap();
            assert!(t(x).matches(&key) && t(y).matches(&key), "{x} {y} {key}");
        }
    }

    #[test]
    fn only_separators_are_escaped_so_ordinary_keys_stay_readable() {
        let one = |t: &str, v: &str| {
            KeyTemplate::parse(t)
                .unwrap()
                .render(&rel(), &row(&[Some(v), Some("1"), None]))
                .unwrap()
        };
        // The letters and digits of a prefix are not escaped in values.
        assert_eq!(one("s1:{id}", "\"x\""), "s1:1");
        assert_eq!(
            one("user:{tenant}", "\"user@example.com\""),
            "user:user@example.com"
        );
        // Separators are, and so is the first character after a column.
        assert_eq!(one("t:{tenant}:x", "\"a:b\""), "t:a%3Ab:x");
        assert_eq!(one("{tenant}x{id}", "\"axb\""), "a%78bx1");
        // Hierarchical keys sharing a prefix cannot collide.
        let a = KeyTemplate::parse("product:{id}").unwrap();
        let b = KeyTemplate::parse("product:{id}:detail").unwrap();
        assert_eq!(a.collision(&b), None);
    }
}
