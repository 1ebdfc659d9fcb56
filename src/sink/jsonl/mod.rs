//! The JSON-lines sink: one change event per line, to a file or stdout.
//!
//! Effectively-once into a file. The file is its own source of truth: at
//! start the sink cuts a torn last line (a crash in mid-write), then reads the
//! last transaction it holds (`commit_lsn`) and how many of that
//! transaction's events made it. A transaction delivered again is skipped if
//! it is older, and only its missing tail is written if it is the same. So
//! after any crash the file has no gap and no duplicate, whatever the
//! checkpoint says. Each batch is written with one `write`; `flush` makes the
//! file durable with `fsync` before the pipeline checkpoints it.
//!
//! Schema events: before the first change of a table with a schema version
//! it has not written since it started, the sink writes an `op:"schema"`
//! line (see [`crate::event::schema`]). Those lines are **not counted**
//! among a transaction's events, neither when writing nor when reading the
//! file's tail back, so they never shift which changes a replay skips. After
//! a start (and after a failed write) each table's first change gets its
//! schema line again: a schema line may repeat (same table and
//! `schema_version`, `previous_version` `null`), but a change is never
//! without a schema line of its version before it.
//!
//! DDL events: `pgferry.ddl` messages of the event trigger in
//! `sql/capture_ddl.sql` (kept by the assembler only when they name a
//! configured table) are written as `op:"ddl"` lines at their place among
//! the changes (a message's LSN is the end of its record, so it goes before
//! a change at the same LSN). They come from the WAL, so they **are**
//! counted like changes: effectively-once.

mod config;
mod sink;

pub use config::JsonlConfig;
pub use sink::JsonlSink;
