//! Decoder benchmarks over captured pgoutput streams (protocol 2).
//!
//! - `decode/parse`, `decode/parse-msgs`: [`pgoutput::parse`] of every message
//!   (tracking stream blocks as the source does), in bytes/s and messages/s.
//! - `decode/assemble`, `decode/assemble-msgs`: parse plus
//!   [`Assembler::handle`] with the builtin type registry, so every value is
//!   rendered to its `to_jsonb()` text; bytes/s and messages/s.
//! - `decode/assemble+jsonl`: the above plus [`Change::write_json`] of every
//!   change of every committed transaction into one reused buffer, as the
//!   JSONL sink does; events (changes) per second.
//!
//! Bytes are the pgoutput message bytes (the XLogData payloads), without the
//! capture's framing. Each is run on two streams:
//!
//! - `fixture`: `tests/fixtures/pgoutput_v2.bin`, small and made to cover
//!   every message kind (mostly tiny rows, streamed transactions included);
//! - `products`: an OLTP-shaped capture of ~75k row changes made by
//!   `capture.rs` with the test harness on the first run and cached. Without
//!   PostgreSQL it is skipped with a message, and only `fixture` runs.
//!
//! Everything runs on one thread. `cargo bench --bench decoder`.
//!
//! [`Change::write_json`]: pgferry::event::Change::write_json

#[allow(dead_code)]
#[path = "../tests/support/pg.rs"]
mod pg;

mod capture;

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgferry::decode::assembler::Assembler;
use pgferry::decode::types::TypeRegistry;
use pgferry::lsn::Lsn;
use pgferry::protocol::pgoutput::{self, split_capture, ParseContext};

/// The protocol version both captures were made with.
const PROTO: u32 = 2;
/// Memory for open transactions: large enough that nothing spills.
const MEM_LIMIT: usize = 1 << 30;
/// The JSONL sink hands its buffer to the writer at 1 MiB; so does the bench.
const JSONL_FLUSH: usize = 1 << 20;

struct Stream {
    name: &'static str,
    records: Vec<(Lsn, Bytes)>,
    /// Sum of the message lengths.
    bytes: u64,
    /// Row changes in committed transactions (events the JSONL sink writes).
    events: u64,
    /// Bytes of JSON lines those events make.
    jsonl_bytes: u64,
}

impl Stream {
    fn new(name: &'static str, records: Vec<(Lsn, Bytes)>) -> Stream {
        let bytes = records.iter().map(|(_, m)| m.len() as u64).sum();
        let mut s = Stream {
            name,
            records,
            bytes,
            events: 0,
            jsonl_bytes: 0,
        };
        let spill = tempfile::tempdir().expect("spill dir");
        let mut asm = assembler(spill.path().into());
        let (events, jsonl_bytes) = assemble_jsonl(&s, &mut asm, &mut Vec::new());
        (s.events, s.jsonl_bytes) = (events, jsonl_bytes);
        assert!(
            asm.is_idle(),
            "{name}: the stream ends inside a transaction"
        );
        assert_eq!(asm.spilled_txns, 0, "{name}: a transaction spilled");
        eprintln!(
            "{name}: {} messages, {} bytes, {events} events, {jsonl_bytes} bytes of JSON lines",
            s.records.len(),
            s.bytes
        );
        s
    }

    fn msgs(&self) -> u64 {
        self.records.len() as u64
    }
}

fn fixture() -> Stream {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pgoutput_v2.bin");
    let raw = std::fs::read(&path).expect("read the committed fixture");
    Stream::new(
        "fixture",
        split_capture(&Bytes::from(raw)).expect("fixture framing"),
    )
}

fn streams() -> Vec<Stream> {
    let mut v = vec![fixture()];
    match capture::load() {
        Some(records) => v.push(Stream::new("products", records)),
        None => eprintln!("products stream unavailable: only the fixture is benchmarked"),
    }
    v
}

fn assembler(spill_dir: PathBuf) -> Assembler {
    Assembler::new(TypeRegistry::builtin(), MEM_LIMIT, spill_dir)
}

/// Parses every message, as the source does before handing it on.
#[inline(never)]
fn parse_all(s: &Stream) {
    let mut ctx = ParseContext::new(PROTO);
    for (_, data) in &s.records {
        let m = pgoutput::parse(data, ctx).expect("parse");
        ctx.observe(&m);
        black_box(&m);
    }
}

/// Parses and assembles every message; committed transactions are dropped.
#[inline(never)]
fn assemble(s: &Stream, asm: &mut Assembler) {
    for (lsn, data) in &s.records {
        let m = pgoutput::parse(data, asm.parse_context(PROTO)).expect("parse");
        if let Some(txn) = asm.handle(*lsn, m).expect("assemble") {
            black_box(txn);
        }
    }
}

/// Parses, assembles and writes every committed change as a JSON line into
/// `out`, cleared whenever it reaches [`JSONL_FLUSH`]. Returns the events and
/// the bytes of JSON lines written.
#[inline(never)]
fn assemble_jsonl(s: &Stream, asm: &mut Assembler, out: &mut Vec<u8>) -> (u64, u64) {
    let (mut events, mut written) = (0u64, 0u64);
    for (lsn, data) in &s.records {
        let m = pgoutput::parse(data, asm.parse_context(PROTO)).expect("parse");
        let Some(txn) = asm.handle(*lsn, m).expect("assemble") else {
            continue;
        };
        txn.for_each_change(|c| {
            let before = out.len();
            c.write_json(&txn.meta, out);
            out.push(b'\n');
            events += 1;
            written += (out.len() - before) as u64;
            if out.len() >= JSONL_FLUSH {
                black_box(&out[..]);
                out.clear();
            }
            Ok(())
        })
        .expect("in-memory transaction");
    }
    black_box(&out[..]);
    (events, written)
}

fn configure(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    s: &Stream,
) {
    if s.bytes > 1_000_000 {
        // Tens to hundreds of milliseconds per iteration.
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(20));
    }
}

fn benches(c: &mut Criterion) {
    let streams = streams();
    let spill = tempfile::tempdir().expect("spill dir");

    let mut g = c.benchmark_group("decode/parse");
    for s in &streams {
        configure(&mut g, s);
        g.throughput(Throughput::Bytes(s.bytes));
        g.bench_function(s.name, |b| b.iter(|| parse_all(s)));
    }
    g.finish();

    let mut g = c.benchmark_group("decode/parse-msgs");
    for s in &streams {
        configure(&mut g, s);
        g.throughput(Throughput::Elements(s.msgs()));
        g.bench_function(s.name, |b| b.iter(|| parse_all(s)));
    }
    g.finish();

    // One assembler per stream, kept across iterations: a stream ends with
    // every transaction committed or aborted, so each pass starts idle, with
    // the relations already known (as on a long-running source).
    let mut g = c.benchmark_group("decode/assemble");
    for s in &streams {
        configure(&mut g, s);
        g.throughput(Throughput::Bytes(s.bytes));
        let mut asm = assembler(spill.path().into());
        g.bench_function(s.name, |b| b.iter(|| assemble(s, &mut asm)));
    }
    g.finish();

    let mut g = c.benchmark_group("decode/assemble-msgs");
    for s in &streams {
        configure(&mut g, s);
        g.throughput(Throughput::Elements(s.msgs()));
        let mut asm = assembler(spill.path().into());
        g.bench_function(s.name, |b| b.iter(|| assemble(s, &mut asm)));
    }
    g.finish();

    let mut g = c.benchmark_group("decode/assemble+jsonl");
    for s in &streams {
        configure(&mut g, s);
        g.throughput(Throughput::Elements(s.events));
        let mut asm = assembler(spill.path().into());
        let mut out = Vec::with_capacity(2 * JSONL_FLUSH);
        g.bench_function(s.name, |b| b.iter(|| assemble_jsonl(s, &mut asm, &mut out)));
    }
    g.finish();
}

criterion_group!(decoder, benches);
criterion_main!(decoder);
