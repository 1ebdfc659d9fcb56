//! The module graph of `src/` runs one way: no import circles, and every
//! module imports only modules at or below its layer.
//!
//! Reads every `crate::a::b` path (in `use` lines, in code and in doc links,
//! including `use crate::{a, b::c}` groups) and every `super::` path that
//! leaves its folder, maps each to the file that defines the module, and
//! checks the file graph. As in `import-circles.py`, unit tests (everything
//! after the first `#[cfg(test)]`) may import freely, and a folder's
//! `mod.rs` and its own submodules are one folder's layout, not a circle.
//!
//! The layers, from the ground up (imports point down or sideways):
//!
//! ```text
//! ground         lsn, config, disk, json_write, flow
//! event          event, spill, checkpoint
//! protocol       protocol
//! conn           conn, pg
//! decode         decode
//! observability  metrics, endpoints, observe
//! sinks          sink
//! pipeline       pipeline
//! session        source, snapshot, publication, check
//! ```
//!
//! This is the data flow `lsn/config → protocol → conn → decode → event/spill
//! → pipeline → sinks → session` read as imports, with two differences that
//! follow from it: the types that travel (events, spill files, the flow's
//! shared state) sit low because every stage names them, and the pipeline
//! sits above the sinks because it drives them through the `Sink` trait,
//! while a sink never names the pipeline. Observability sits below everything
//! that reports to it and reads state through the small types of `flow`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layer of each top-level module, from the ground up.
const LAYERS: &[(&str, &[&str])] = &[
    ("ground", &["lsn", "config", "disk", "json_write", "flow"]),
    ("event", &["event", "spill", "checkpoint"]),
    ("protocol", &["protocol"]),
    ("conn", &["conn", "pg"]),
    ("decode", &["decode"]),
    ("observability", &["metrics", "endpoints", "observe"]),
    ("sinks", &["sink"]),
    ("pipeline", &["pipeline"]),
    (
        "session",
        &["source", "snapshot", "publication", "check", "setup"],
    ),
];

/// What a sink (any file under `src/sink/`) must never import: a sink
/// depends on `event`, its config and the shared retry policy, nothing of the
/// session around it.
const SINK_FORBIDDEN: &[&str] = &[
    "pipeline",
    "source",
    "snapshot",
    "check",
    "observe",
    "publication",
];

/// Known exceptions, each (importing file, imported top-level module, why).
const EXCEPTIONS: &[(&str, &str, &str)] = &[
    (
        "config/sinks.rs",
        "sink",
        "the configuration holds each sink's section, whose type lives with its sink",
    ),
    (
        // To be moved: the pure half of conn/tls.rs (sslmode, URL parameters)
        // belongs in the ground layer; the load-time check that builds the
        // shared rustls setup (so a bad certificate file is refused at load,
        // naming its key) would then move to the loader.
        "config/load.rs",
        "conn",
        "TLS settings are parsed and their files checked at config load by conn::tls",
    ),
    (
        "config.rs",
        "conn",
        "`[source.tls]` is conn::tls's own settings type",
    ),
];

/// A module path (`["sink", "redis"]`) for each `.rs` file, keyed by its
/// path relative to `src/` (`sink/redis/mod.rs`).
fn module_of(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    if parts == ["lib"] || parts == ["main"] {
        parts.clear();
    }
    parts
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Expands the use tree that starts at `s[i..]` (just after `prefix::`)
/// into full paths.
fn expand(s: &[u8], mut i: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    loop {
        if s.get(i) == Some(&b'{') {
            i += 1;
            loop {
                while i < s.len() && (s[i].is_ascii_whitespace() || s[i] == b',') {
                    i += 1;
                }
                if i >= s.len() || s[i] == b'}' {
                    return i + 1;
                }
                let before = i;
                i = expand(s, i, &path, out);
                if i == before {
                    i += 1; // `*` or `self`-less junk: skip it
                }
            }
        }
        let start = i;
        while i < s.len() && is_ident(s[i]) {
            i += 1;
        }
        if i == start {
            break;
        }
        let seg = String::from_utf8_lossy(&s[start..i]).into_owned();
        if seg != "self" {
            path.push(seg);
        }
        if s[i..].starts_with(b"::") {
            i += 2;
        } else {
            break;
        }
    }
    if path.len() > prefix.len() {
        out.push(path);
    }
    i
}

/// Every crate path `text` names, outside its unit tests.
fn crate_paths(module: &[String], text: &str) -> Vec<Vec<String>> {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    let s = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let word_start = i == 0 || !is_ident(s[i - 1]);
        if word_start && s[i..].starts_with(b"crate::") {
            i = expand(s, i + 7, &[], &mut out);
            continue;
        }
        if word_start && s[i..].starts_with(b"super::") {
            // `super` of `a/b.rs` is `a`; a run of `super::` climbs on.
            let mut base = module.to_vec();
            let mut j = i;
            while s[j..].starts_with(b"super::") {
                base.pop();
                j += 7;
            }
            i = expand(s, j, &base, &mut out);
            continue;
        }
        i += 1;
    }
    out
}

/// The file graph: for each file (relative to `src/`), the files it imports
/// and one path naming each import.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn graph(files: &BTreeMap<String, String>) -> Graph {
    let modules: BTreeMap<Vec<String>, String> = files
        .keys()
        .map(|rel| (module_of(rel), rel.clone()))
        .collect();
    let mut g = Graph::new();
    for (rel, text) in files {
        let from = module_of(rel);
        let edges = g.entry(rel.clone()).or_default();
        if from.is_empty() {
            continue; // lib.rs and main.rs: the crate root
        }
        for path in crate_paths(&from, text) {
            let Some(to) = (1..=path.len())
                .rev()
                .map(|n| &path[..n])
                .find(|p| modules.contains_key(*p))
            else {
                continue;
            };
            if to.starts_with(&from) || from.starts_with(to) {
                continue; // a folder and its own submodules
            }
            edges
                .entry(modules[to].clone())
                .or_insert_with(|| format!("crate::{}", path.join("::")));
        }
    }
    g
}

/// Strongly connected groups of more than one file (Tarjan).
fn circles(g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g[v].keys() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let m = t.low[v].min(t.low[w]);
                t.low.insert(v, m);
            } else if t.on.contains(w) {
                let m = t.low[v].min(t.index[w]);
                t.low.insert(v, m);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().expect("on the stack");
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// Describes each circle with the imports that close it.
fn describe_circles(g: &Graph) -> Vec<String> {
    circles(g)
        .into_iter()
        .map(|comp| {
            let mut s = format!("import circle: {}", comp.join(" <-> "));
            for from in &comp {
                for (to, via) in &g[from] {
                    if comp.contains(to) {
                        s.push_str(&format!("\n    src/{from} -> src/{to} (`{via}`)"));
                    }
                }
            }
            s
        })
        .collect()
}

fn top(rel: &str) -> &str {
    rel.split('/').next().unwrap_or(rel).trim_end_matches(".rs")
}

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

/// Imports that go up a layer, sinks that reach the session, and modules
/// with no layer.
fn layer_violations(g: &Graph) -> Vec<String> {
    let mut bad = Vec::new();
    for (from, edges) in g {
        let from_top = top(from);
        if from_top == "lib" || from_top == "main" {
            continue;
        }
        let Some(fl) = layer(from_top) else {
            bad.push(format!(
                "src/{from}: module `{from_top}` has no layer; add it to LAYERS in tests/module_graph.rs"
            ));
            continue;
        };
        for (to, via) in edges {
            let to_top = top(to);
            if EXCEPTIONS
                .iter()
                .any(|(f, t, _)| *f == from && *t == to_top)
            {
                continue;
            }
            let Some(tl) = layer(to_top) else {
                continue; // reported as a module without a layer
            };
            if tl > fl {
                bad.push(format!(
                    "src/{from} ({}) imports src/{to} ({}), a layer above it: `{via}`",
                    LAYERS[fl].0, LAYERS[tl].0
                ));
            } else if from_top == "sink" && SINK_FORBIDDEN.contains(&to_top) {
                bad.push(format!(
                    "src/{from} is a sink and imports `{to_top}`: `{via}`; a sink depends only on event, its config and the shared retry policy"
                ));
            }
        }
    }
    bad
}

fn read_src() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let p = entry.expect("dir entry").path();
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p
                    .strip_prefix(root)
                    .expect("under src")
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, std::fs::read_to_string(&p).expect("read source"));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

#[test]
fn src_has_no_import_circles() {
    let g = graph(&read_src());
    assert!(g.len() > 40, "read only {} files of src/", g.len());
    let found = describe_circles(&g);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn src_imports_point_down_the_layers() {
    let g = graph(&read_src());
    let bad = layer_violations(&g);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn every_exception_is_still_needed() {
    let g = graph(&read_src());
    for (from, to, why) in EXCEPTIONS {
        let used = g
            .get(*from)
            .is_some_and(|edges| edges.keys().any(|t| top(t) == *to));
        // The search sink's exception goes away on its own branch; keep the
        // list honest once it has.
        assert!(
            used || *from == "sink/elasticsearch/sink.rs",
            "exception src/{from} -> {to} ({why}) is no longer needed: remove it"
        );
    }
}

fn files(list: &[(&str, &str)]) -> BTreeMap<String, String> {
    list.iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect()
}

/// The checker itself finds what it must: a circle through grouped imports,
/// `super::` paths and doc links, but not through unit tests or a folder's
/// own submodules.
#[test]
fn the_checker_finds_circles_and_upward_imports() {
    let tree = files(&[
        ("lib.rs", "pub mod event; pub mod spill; pub mod sink;"),
        ("event.rs", "use crate::{lsn::Lsn, spill::SpillReader};"),
        ("spill.rs", "//! Holds [`crate::event::Change`]s.\n"),
        (
            "lsn.rs",
            "#[cfg(test)]\nmod tests { use crate::event::Change; }",
        ),
        (
            "sink/mod.rs",
            "pub use redis::RedisSink; use crate::sink::redis::x;",
        ),
        (
            "sink/redis/mod.rs",
            "use super::super::pipeline::Backoff; use crate::sink::Sink;",
        ),
        ("pipeline.rs", "use crate::sink::Sink;"),
    ]);
    let g = graph(&tree);
    // sink/redis -> pipeline -> sink/mod.rs is no circle: sink/mod.rs
    // reaches sink/redis only as its own submodule.
    assert_eq!(
        describe_circles(&g),
        vec!["import circle: event.rs <-> spill.rs\n    \
              src/event.rs -> src/spill.rs (`crate::spill::SpillReader`)\n    \
              src/spill.rs -> src/event.rs (`crate::event::Change`)"
            .to_string()]
    );
    assert!(
        !g["lsn.rs"].contains_key("event.rs"),
        "unit tests import freely"
    );
    let bad = layer_violations(&g);
    assert!(
        bad.iter()
            .any(|b| b
                .starts_with("src/sink/redis/mod.rs (sinks) imports src/pipeline.rs (pipeline)")),
        "{bad:?}"
    );
}
