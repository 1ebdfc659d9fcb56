//! The value renderer against a real server: for every column of every row of
//! the types fixture, `render(type, text output)` must be exactly what the
//! server's `to_jsonb()` gives — byte for byte against `to_jsonb(col)::text`,
//! and as a JSON value against the column's key in `to_jsonb(row)`.

mod support;

use pgferry::decode::types::{TypeKind, TypeRegistry};
use pgferry::decode::value::render;
use support::pg::TestPg;
use support::types_fixture::{ROWS_SQL, ROW_COUNT, SETUP_SQL};
use tokio_postgres::SimpleQueryMessage;

/// The walsender's session settings, which decide the text output format.
const WALSENDER_SETTINGS: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex';";

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn simple_rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Starts a server with the fixture loaded; returns it with a client that has
/// the walsender's settings, the table's columns and a loaded registry.
async fn setup() -> (
    TestPg,
    tokio_postgres::Client,
    Vec<(String, u32)>,
    TypeRegistry,
) {
    let pg = TestPg::start();
    let client = pg.client().await;
    client
        .batch_execute(SETUP_SQL)
        .await
        .expect("fixture setup");
    client.batch_execute(ROWS_SQL).await.expect("fixture rows");
    client
        .batch_execute(WALSENDER_SETTINGS)
        .await
        .expect("session settings");
    let columns: Vec<(String, u32)> = client
        .query(
            "SELECT attname::text, atttypid FROM pg_attribute \
             WHERE attrelid = 'public.all_types'::regclass AND attnum > 0 AND NOT attisdropped \
             ORDER BY attnum",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut reg = TypeRegistry::builtin();
    let oids: Vec<u32> = columns.iter().map(|c| c.1).collect();
    let missing = reg.missing(&oids);
    assert!(!missing.is_empty(), "the fixture has user types");
    reg.load(&client, &missing).await.expect("load user types");
    (pg, client, columns, reg)
}

#[tokio::test]
async fn every_column_matches_to_jsonb() {
    let (_pg, client, columns, reg) = setup().await;
    assert!(
        reg.missing(&columns.iter().map(|c| c.1).collect::<Vec<_>>())
            .is_empty(),
        "load left column types unknown"
    );

    let names: Vec<String> = columns.iter().map(|c| quote_ident(&c.0)).collect();
    let texts = simple_rows(
        &client,
        &format!(
            "SELECT {} FROM public.all_types ORDER BY id",
            names.join(", ")
        ),
    )
    .await;
    let theirs_sql = format!(
        "SELECT {}, to_jsonb(t)::text FROM public.all_types t ORDER BY id",
        names
            .iter()
            .map(|n| format!("to_jsonb({n})::text"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let theirs = simple_rows(&client, &theirs_sql).await;
    assert_eq!(texts.len(), ROW_COUNT as usize);
    assert_eq!(theirs.len(), texts.len());

    let mut failures = Vec::new();
    let mut checked = 0;
    for (row_texts, row_theirs) in texts.iter().zip(&theirs) {
        let id = row_texts[0].clone().unwrap_or_default();
        let row_json: serde_json::Value =
            serde_json::from_str(row_theirs[columns.len()].as_deref().expect("row json"))
                .expect("to_jsonb(row) parses");
        for (i, (name, oid)) in columns.iter().enumerate() {
            let text = row_texts[i].as_deref();
            let their_text = row_theirs[i].as_deref().unwrap_or("null");
            let mut ours = Vec::new();
            let rendered = match text {
                None => {
                    ours.extend_from_slice(b"null");
                    Ok(())
                }
                Some(t) => render(&reg, *oid, t.as_bytes(), &mut ours),
            };
            let ours = String::from_utf8(ours).expect("output is UTF-8");
            let their_value = &row_json[name.as_str()];
            let ok = match &rendered {
                Ok(()) => {
                    let our_value: Result<serde_json::Value, _> = serde_json::from_str(&ours);
                    ours == their_text && our_value.as_ref().ok() == Some(their_value)
                }
                Err(_) => false,
            };
            checked += 1;
            if !ok {
                failures.push(format!(
                    "row {id} column {name} (type {oid}):\n  text:   {text:?}\n  ours:   {}\n  theirs: {their_text}\n  row value: {their_value}",
                    match &rendered {
                        Ok(()) => ours.clone(),
                        Err(e) => format!("error: {e}"),
                    }
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} values differ from to_jsonb:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(checked, columns.len() * ROW_COUNT as usize);
}

#[tokio::test]
async fn registry_load_resolves_user_types() {
    let (_pg, client, columns, reg) = setup().await;
    let oid_of = |name: &str| columns.iter().find(|c| c.0 == name).unwrap().1;
    let type_oid = |name: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one("SELECT $1::text::regtype::oid", &[&name])
                .await
                .unwrap();
            row.get::<_, u32>(0)
        }
    };
    let posint = type_oid("public.posint").await;
    let pair = type_oid("public.pair").await;
    let inner = type_oid("public.inner_t").await;
    let boxdom = type_oid("public.boxdom").await;

    assert_eq!(reg.kind(oid_of("c_mood")), Some(&TypeKind::String));
    assert_eq!(reg.kind(oid_of("c_floatrange")), Some(&TypeKind::String));
    assert_eq!(reg.kind(posint), Some(&TypeKind::Domain { base: 23 }));
    assert_eq!(
        reg.kind(oid_of("c_intlist")),
        Some(&TypeKind::Domain { base: 1007 })
    );
    assert_eq!(
        reg.kind(oid_of("a_pair")),
        Some(&TypeKind::Array {
            elem: pair,
            delim: b','
        })
    );
    assert_eq!(
        reg.kind(oid_of("a_boxdom")),
        Some(&TypeKind::Array {
            elem: boxdom,
            delim: b';'
        })
    );
    assert_eq!(reg.kind(boxdom), Some(&TypeKind::Domain { base: 603 }));
    match reg.kind(pair) {
        Some(TypeKind::Composite(c)) => {
            let names: Vec<&str> = c.fields.iter().map(|f| f.0.as_str()).collect();
            assert_eq!(
                names,
                [
                    "label",
                    "num",
                    "at",
                    "tags",
                    "inner_v",
                    "m",
                    "j",
                    "d",
                    "Weird \"Key\", too",
                    "f",
                    "js"
                ]
            );
            assert_eq!(c.fields[4].1, inner);
            assert_eq!(c.fields[7].1, posint);
        }
        other => panic!("pair is {other:?}"),
    }
    match reg.kind(oid_of("c_dropped")) {
        Some(TypeKind::Composite(c)) => {
            assert_eq!(c.fields, vec![("a".to_string(), 23), ("c".to_string(), 23)])
        }
        other => panic!("dropped_t is {other:?}"),
    }
    // Loading again (e.g. after ALTER TYPE) replaces entries and keeps built-ins.
    let mut reg2 = reg.clone();
    reg2.load(&client, &[pair, 1007]).await.unwrap();
    assert_eq!(reg2.kind(pair), reg.kind(pair));
    assert_eq!(reg2.kind(1007), reg.kind(1007));
}

/// Server-generated values (seeded random floats, numerics, json numbers,
/// dates, timestamps, strings and arrays of them): the rendering of each
/// value's text must be byte for byte `to_jsonb(value)::text`.
#[tokio::test]
async fn generated_values_match_to_jsonb() {
    let pg = TestPg::start();
    let client = pg.client().await;
    client
        .batch_execute(WALSENDER_SETTINGS)
        .await
        .expect("session settings");
    let reg = TypeRegistry::builtin();
    let n = 2000;
    let cases: &[(&str, u32, &str)] = &[
        ("float8", 701, "((random() - 0.5) * 10 ^ (random() * 616 - 308))::float8"),
        ("float8 subnormal", 701, "(random() * 1e-310)::float8"),
        ("float8 integer", 701, "round((random() - 0.5) * 10 ^ (random() * 20))::float8"),
        ("float4", 700, "((random() - 0.5) * 10 ^ (random() * 76 - 38))::float4"),
        ("float4 subnormal", 700, "(random() * 1e-39)::float4"),
        (
            "numeric",
            1700,
            "round(((random() - 0.5) * 10 ^ (random() * 40 - 20))::numeric, (random() * 30)::int)",
        ),
        (
            "json number",
            114,
            "format('%s%se%s', CASE WHEN random() < 0.5 THEN '-' ELSE '' END, \
             round((random() * 1000)::numeric, (random() * 5)::int), (random() * 60 - 30)::int)::json",
        ),
        (
            "date",
            1082,
            "'4713-01-01 BC'::date + (random() * ('5874897-12-31'::date - '4713-01-01 BC'::date))::int",
        ),
        (
            "timestamp",
            1114,
            "to_timestamp(-210866803200 + random() * 9.4e12) AT TIME ZONE 'UTC'",
        ),
        (
            "timestamptz",
            1184,
            "to_timestamp(-210866803200 + random() * 9.4e12)",
        ),
        (
            "text",
            25,
            "(SELECT string_agg(chr(1 + (random() * 400)::int), '') \
             FROM generate_series(1, (random() * 20)::int + g * 0))",
        ),
        (
            "text[]",
            1009,
            "(SELECT array_agg(CASE WHEN random() < 0.1 THEN NULL ELSE \
               (SELECT string_agg(chr(1 + (random() * 130)::int), '') \
                FROM generate_series(1, (random() * 6)::int + h * 0)) END) \
             FROM generate_series(1, (random() * 5)::int + 1 + g * 0) h)",
        ),
        (
            "float8[]",
            1022,
            "(SELECT array_agg((random() - 0.5) * 10 ^ (random() * 600 - 300)) \
             FROM generate_series(1, 3 + g * 0))",
        ),
    ];
    client.batch_execute("SELECT setseed(0.42)").await.unwrap();
    let mut failures = Vec::new();
    for &(label, oid, expr) in cases {
        let sql = format!(
            "SELECT v::text, to_jsonb(v)::text FROM \
             (SELECT {expr} AS v FROM generate_series(1, {n}) g) s"
        );
        let rows = simple_rows(&client, &sql).await;
        assert_eq!(rows.len(), n, "{label}");
        for row in rows {
            let (Some(text), Some(theirs)) = (&row[0], &row[1]) else {
                continue;
            };
            let mut ours = Vec::new();
            let res = render(&reg, oid, text.as_bytes(), &mut ours);
            let ours = String::from_utf8_lossy(&ours);
            if res.is_err() || ours != theirs.as_str() {
                failures.push(format!(
                    "{label}: text {text:?}\n  ours:   {} \n  theirs: {theirs}",
                    match res {
                        Ok(()) => ours.into_owned(),
                        Err(e) => format!("error: {e}"),
                    }
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} generated values differ:\n{}",
        failures.len(),
        failures[..failures.len().min(30)].join("\n")
    );
}
