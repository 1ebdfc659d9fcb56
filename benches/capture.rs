//! A larger, more representative pgoutput capture for the decoder benchmark.
//!
//! The committed fixture (`tests/fixtures/pgoutput_v2.bin`) is small and made
//! to cover every message kind. This one is a plain OLTP-shaped stream: one
//! `products` table of 8 columns (int key, text, numeric, int, text[], jsonb,
//! timestamptz), a bulk load of 20k rows then a mix of inserts, updates and
//! purges in transactions of 1 to 1000 rows. On PostgreSQL 15 that is ~75.4k
//! row changes (30.1k inserts, 41.4k updates, 3.9k deletes) in 795
//! transactions: 77k messages, 19 MB, rows of ~260 bytes. It is captured from
//! a throwaway server started with the test harness (`tests/support/pg.rs`)
//! and read through `pg_logical_slot_peek_binary_changes` with protocol 2 and
//! streaming on; `logical_decoding_work_mem` is the server default (64MB), so
//! no transaction of this workload is streamed. Values are deterministic
//! (`setseed`, no clock), xids, LSNs and commit times are not.
//!
//! The capture does not fit the 3 MB budget for committed fixtures (3.9 MB
//! with gzip -9), so it is made on the first run (about 3 s) and cached under
//! the target directory (`$CARGO_TARGET_DIR/pgferry-bench/`). Its format is
//! the fixture format: repeated `[u64 BE lsn][u32 BE len][len bytes]`.
//!
//! [`load`] never panics: without PostgreSQL server binaries (see
//! `pg_bin_dir` in the harness), with `PGFERRY_BENCH_NO_CAPTURE` set, or
//! when capturing fails, it says why and returns `None`, and the benchmark
//! runs on the committed fixture alone.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use pgferry::lsn::Lsn;
use pgferry::protocol::pgoutput::{parse, split_capture, LogicalMessage, ParseContext};

use crate::pg::{PgOptions, TestPg};

/// Bump when the workload changes, so a stale cache is not reused.
const CACHE_NAME: &str = "products-v1.bin";

/// Rows inserted by the initial bulk load (in transactions of 1000).
const INITIAL_ROWS: u32 = 20_000;
/// Row changes the mixed workload stops after (the load included).
const TARGET_CHANGES: u32 = 75_000;

const SCHEMA: &str = "
CREATE TABLE products (
    id int PRIMARY KEY,
    sku text NOT NULL,
    name text NOT NULL,
    price numeric(10,2),
    stock int,
    tags text[],
    attrs jsonb,
    updated_at timestamptz
);
CREATE PUBLICATION pub FOR TABLE products;
";

/// `products` rows for ids `lo + 1 ..= hi` (a SELECT list over `g`).
const ROW: &str = "
SELECT g,
       'SKU-' || lpad(g::text, 8, '0'),
       (ARRAY['Organic','Steel','Wooden','Smart','Compact','Deluxe','Eco','Vintage'])[1 + g % 8]
         || ' ' || (ARRAY['Chair','Lamp','Kettle','Backpack','Headphones','Mug','Desk',
                          'Jacket','Sneakers','Blender'])[1 + (g / 8) % 10]
         || ' ' || substr(md5(g::text), 1, 6),
       round((random() * 500 + 1)::numeric, 2),
       (random() * 1000)::int,
       ARRAY['cat-' || (g % 23), 'brand-' || (g % 101)]
         || CASE WHEN g % 3 = 0 THEN ARRAY['sale'] ELSE ARRAY[]::text[] END,
       jsonb_build_object(
         'color', (ARRAY['red','green','blue','black','white'])[1 + g % 5],
         'weight_kg', round((random() * 20)::numeric, 3),
         'dimensions', jsonb_build_object('w', g % 100, 'h', g % 37, 'd', g % 11),
         'warehouse', 'WH-' || (g % 7),
         'fragile', g % 4 = 0),
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute'
         + random() * interval '1 hour'
FROM generate_series(lo + 1, hi) g";

/// The mixed workload: one transaction per loop turn (COMMIT inside DO).
fn workload() -> String {
    format!(
        "
DO $$
DECLARE
  -- Transaction sizes, cycled: mostly single rows, some batches, a few bulk ones.
  sizes int[] := ARRAY[1,1,1,2,1,3,1,1,5,1,10,1,2,1,25,1,1,100,1,1,500,1,2,1,1000];
  total int := 0;   -- row changes so far
  next_id int := 0; -- highest id inserted
  low_id int := 0;  -- ids up to this one were deleted
  i int := 0;
  s int;
  a int;
  n int;
  lo int;
  hi int;
BEGIN
  PERFORM setseed(0.42);
  WHILE next_id < {INITIAL_ROWS} LOOP
    lo := next_id; hi := next_id + 1000;
    INSERT INTO products {ROW};
    next_id := hi; total := total + 1000;
    COMMIT;
  END LOOP;
  WHILE total < {TARGET_CHANGES} LOOP
    s := sizes[1 + i % array_length(sizes, 1)];
    CASE i % 10
      WHEN 0, 1, 2, 3 THEN
        lo := next_id; hi := next_id + s;
        INSERT INTO products {ROW};
        next_id := hi; total := total + s;
      WHEN 4, 5, 6, 7 THEN
        a := low_id + (random() * greatest(next_id - low_id - s, 0))::int;
        IF i % 20 = 5 THEN
          UPDATE products
             SET tags = tags || ARRAY['promo-' || (i % 9)],
                 attrs = attrs || jsonb_build_object(
                           'last_restock', (timestamptz '2024-06-01 00:00:00+00'
                                            + i * interval '1 hour')::text,
                           'restocked', stock + 50),
                 stock = stock + 50,
                 updated_at = updated_at + (1 + i % 90) * interval '1 day'
           WHERE id > a AND id <= a + s;
        ELSE
          UPDATE products
             SET price = round(price * (0.9 + random() * 0.2)::numeric, 2),
                 stock = greatest(stock - 1 - (random() * 3)::int, 0),
                 updated_at = updated_at + random() * interval '10 days'
           WHERE id > a AND id <= a + s;
        END IF;
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
      WHEN 8 THEN
        -- A purge of the 50 oldest products.
        DELETE FROM products WHERE id > low_id AND id <= low_id + 50;
        GET DIAGNOSTICS n = ROW_COUNT;
        low_id := low_id + 50; total := total + n;
      ELSE
        -- One order: a new product, stock taken from others, one retired.
        lo := next_id; hi := next_id + 1;
        INSERT INTO products {ROW};
        next_id := hi;
        a := low_id + (random() * greatest(next_id - low_id - s, 0))::int;
        UPDATE products SET stock = greatest(stock - 1, 0), updated_at = updated_at + interval '1 hour'
         WHERE id > a AND id <= a + s;
        GET DIAGNOSTICS n = ROW_COUNT;
        DELETE FROM products WHERE id = low_id + 1;
        low_id := low_id + 1;
        total := total + 2 + n;
    END CASE;
    i := i + 1;
    COMMIT;
  END LOOP;
END $$;"
    )
}

/// Where the capture is cached.
fn cache_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("pgferry-bench").join(CACHE_NAME)
}

/// True when the harness can find `initdb` (it panics otherwise).
fn server_binaries_found() -> bool {
    if let Some(dir) = std::env::var_os("PGFERRY_PG_BIN") {
        return Path::new(&dir).join("initdb").exists();
    }
    std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(Result::ok)
                .any(|e| e.path().join("bin").join("initdb").exists())
        })
        .unwrap_or(false)
}

/// Runs the workload on a throwaway server and returns the capture bytes.
fn capture() -> Vec<u8> {
    let pg = TestPg::start_with(PgOptions {
        // The server default: only transactions over 64MB would be streamed.
        conf: "logical_decoding_work_mem = '64MB'\n".to_string(),
        ..PgOptions::default()
    });
    pg.sql(SCHEMA);
    pg.sql("SELECT pg_create_logical_replication_slot('bench', 'pgoutput')");
    pg.sql(&workload());
    let out = pg.sql(
        "SELECT lsn, encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('bench', NULL, NULL, \
         'proto_version', '2', 'publication_names', 'pub', 'streaming', 'on')",
    );
    let mut bytes = Vec::new();
    for line in out.lines().filter(|l| !l.is_empty()) {
        let (lsn, hex) = line.split_once('|').expect("lsn|data");
        let lsn: Lsn = lsn.parse().expect("lsn");
        let data = unhex(hex);
        bytes.extend_from_slice(&lsn.0.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&data);
    }
    bytes
}

fn unhex(s: &str) -> Vec<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => panic!("bad hex digit {c}"),
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| (digit(p[0]) << 4) | digit(p[1]))
        .collect()
}

/// Checks that every record parses (protocol 2) and counts the row changes.
fn check(records: &[(Lsn, Bytes)]) -> Result<usize, String> {
    let mut ctx = ParseContext::new(2);
    let mut rows = 0;
    for (i, (lsn, data)) in records.iter().enumerate() {
        let m = parse(data, ctx).map_err(|e| format!("record {i} at {lsn}: {e}"))?;
        ctx.observe(&m);
        if matches!(
            m,
            LogicalMessage::Insert(_) | LogicalMessage::Update(_) | LogicalMessage::Delete(_)
        ) {
            rows += 1;
        }
    }
    Ok(rows)
}

/// The products capture: from the cache, else captured now (and cached).
/// `None`, with the reason printed, when neither works.
pub fn load() -> Option<Vec<(Lsn, Bytes)>> {
    let path = cache_path();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(_) => {
            if std::env::var_os("PGFERRY_BENCH_NO_CAPTURE").is_some() {
                eprintln!("products stream: PGFERRY_BENCH_NO_CAPTURE is set; benchmarking the committed fixture only");
                return None;
            }
            if !server_binaries_found() {
                eprintln!(
                    "products stream: no PostgreSQL server binaries (set PGFERRY_PG_BIN or install \
                     the postgresql package); benchmarking the committed fixture only"
                );
                return None;
            }
            eprintln!(
                "products stream: capturing ~{TARGET_CHANGES} row changes from a throwaway server \
                 (once; cached in {})",
                path.display()
            );
            let started = std::time::Instant::now();
            let bytes = match catch_unwind(AssertUnwindSafe(capture)) {
                Ok(b) => b,
                Err(_) => {
                    eprintln!("products stream: capture failed (see the panic above); benchmarking the committed fixture only");
                    return None;
                }
            };
            eprintln!(
                "products stream: captured {} bytes in {:.1?}",
                bytes.len(),
                started.elapsed()
            );
            let written = std::fs::create_dir_all(path.parent().expect("cache dir"))
                .and_then(|_| std::fs::write(&path, &bytes));
            if let Err(e) = written {
                eprintln!(
                    "products stream: cannot cache it in {}: {e}",
                    path.display()
                );
            }
            bytes
        }
    };
    let records = match split_capture(&Bytes::from(bytes)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "products stream: {} is not a capture ({e}); delete it to capture again",
                path.display()
            );
            return None;
        }
    };
    match check(&records) {
        Ok(rows) => {
            eprintln!(
                "products stream: {} messages, {rows} row changes",
                records.len()
            );
            Some(records)
        }
        Err(e) => {
            eprintln!(
                "products stream: {} does not parse ({e}); delete it to capture again",
                path.display()
            );
            None
        }
    }
}
