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

mod config;
mod sink;

pub use config::JsonlConfig;
pub use sink::JsonlSink;
