//! The subjects a NATS sink publishes to, as stream filters: the template
//! with each token that holds a placeholder turned into `*`, plus each
//! per-table override the template's filter does not already cover.
//!
//! Invariant: every subject the sink's router can produce matches one of
//! [`filters`], so the stream created with them stores every message, and
//! the last message on them is the last one this sink published (when it is
//! the only publisher to them).

use std::collections::BTreeMap;

/// The filters covering every subject of `template` and `overrides`.
pub fn filters(template: &str, overrides: &BTreeMap<String, String>) -> Vec<String> {
    let wild = template
        .split('.')
        .map(|t| {
            if t.contains("{schema}") || t.contains("{table}") {
                "*"
            } else {
                t
            }
        })
        .collect::<Vec<_>>()
        .join(".");
    let mut out = vec![wild];
    for s in overrides.values() {
        if !out.iter().any(|f| covers(f, s)) {
            out.push(s.clone());
        }
    }
    out
}

/// Whether every subject matching `inner` also matches `outer` (both may
/// hold the wildcards `*` and `>`).
pub fn covers(outer: &str, inner: &str) -> bool {
    let o: Vec<&str> = outer.split('.').collect();
    let i: Vec<&str> = inner.split('.').collect();
    for (k, ot) in o.iter().enumerate() {
        if *ot == ">" {
            return i.len() > k;
        }
        let Some(it) = i.get(k) else {
            return false;
        };
        match (*ot, *it) {
            (_, ">") => return false,
            ("*", _) => {}
            (a, b) if a == b && b != "*" => {}
            _ => return false,
        }
    }
    o.len() == i.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_becomes_a_wildcard_and_covered_overrides_are_dropped() {
        let mut o = BTreeMap::new();
        o.insert("public.a".into(), "pgferry.x.y".into());
        o.insert("public.b".into(), "orders".into());
        assert_eq!(
            filters("pgferry.{schema}.{table}", &o),
            vec!["pgferry.*.*".to_string(), "orders".into()]
        );
        assert_eq!(
            filters("cdc.{schema}_{table}", &BTreeMap::new()),
            vec!["cdc.*"]
        );
    }

    #[test]
    fn coverage() {
        assert!(covers("pgferry.>", "pgferry.*.*"));
        assert!(covers("pgferry.*.*", "pgferry.a.b"));
        assert!(covers(">", "a"));
        assert!(!covers("pgferry.*.*", "pgferry.>"));
        assert!(!covers("pgferry.a.*", "pgferry.*.*"));
        assert!(!covers("pgferry.*", "pgferry.a.b"));
        assert!(!covers("pgferry.>", "pgferry"));
        assert!(covers("orders", "orders"));
    }
}
