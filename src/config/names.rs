//! Table names: the one canonical `schema.table` form (a bare name means
//! `public.name`), and identifiers quoted for SQL the way `quote_ident`
//! quotes them.

/// Splits `schema.table`; a bare `table` means `public.table`.
pub fn split_table(name: &str) -> Option<(String, String)> {
    let (schema, table) = match name.split_once('.') {
        Some((s, t)) => (s, t),
        None => ("public", name),
    };
    if schema.is_empty() || table.is_empty() || table.contains('.') {
        return None;
    }
    Some((schema.to_string(), table.to_string()))
}

/// The one spelling of a table name used everywhere: `schema.table`, with
/// `public` for a bare `table`. `None`: not a table name.
pub fn canonical_table(name: &str) -> Option<String> {
    split_table(name).map(|(s, t)| format!("{s}.{t}"))
}

/// An identifier as SQL needs it: bare when it is a lower-case name that
/// needs no quotes, else double-quoted (`Products` → `"Products"`).
pub fn sql_ident(s: &str) -> String {
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain && !is_reserved(s) {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

/// `schema.table` as SQL needs it, each part quoted when needed.
pub fn sql_table(schema: &str, table: &str) -> String {
    format!("{}.{}", sql_ident(schema), sql_ident(table))
}

/// Reserved words that cannot be bare identifiers (the common ones; an
/// unlisted one only makes a suggested statement fail, never a wrong one).
pub(super) fn is_reserved(s: &str) -> bool {
    const WORDS: &[&str] = &[
        "all",
        "analyse",
        "analyze",
        "and",
        "any",
        "array",
        "as",
        "asc",
        "both",
        "case",
        "cast",
        "check",
        "collate",
        "column",
        "constraint",
        "create",
        "default",
        "desc",
        "distinct",
        "do",
        "else",
        "end",
        "except",
        "false",
        "for",
        "foreign",
        "from",
        "grant",
        "group",
        "having",
        "in",
        "initially",
        "intersect",
        "into",
        "leading",
        "limit",
        "not",
        "null",
        "offset",
        "on",
        "only",
        "or",
        "order",
        "primary",
        "references",
        "select",
        "some",
        "table",
        "then",
        "to",
        "trailing",
        "true",
        "union",
        "unique",
        "user",
        "using",
        "when",
        "where",
        "with",
    ];
    WORDS.contains(&s)
}
