//! pgferry: a native Postgres logical-replication CDC engine.
//!
//! # Layout
//!
//! Data flows one way: wire → decode → transactions → sinks → checkpoints,
//! and only acknowledgements travel back (as the flush position).
//!
//! - [`conn`]: the replication connection (startup, auth, commands, CopyBoth).
//! - [`protocol`]: pure parsers of the replication and pgoutput messages (no I/O).
//! - [`decode`]: type registry, `to_jsonb()`-exact values, transaction assembly.
//! - [`spill`]: spill files that keep large transactions out of memory.
//! - [`disk`]: full disks, recognised and reported the same way everywhere.
//! - [`event`]: change events, the public output format.
//! - [`pipeline`]: sink tasks, batching, backpressure, acknowledgements.
//! - [`checkpoint`]: per-sink progress, persisted atomically.
//! - [`sink`]: the sinks (`jsonl`, `redis`, `elasticsearch`, `null`).
//! - [`snapshot`]: initial snapshots and backfills (watermarked chunks).
//! - [`pg`]: ordinary SQL connections to the source (every one applies
//!   `source.network`), slot reads, and the session error [`pg::SourceError`].
//! - [`source`]: one replication session, wiring the stages together.
//! - [`publication`]: what the publications must hold before a session
//!   streams; created, completed or refused at every start.
//! - [`config`]: the TOML configuration.
//! - [`metrics`]: the Prometheus registry and the `/metrics`, `/healthz`, `/readyz` endpoints.
//! - [`observe`]: heartbeat, lag and slot polling, progress log lines (once per process).
//! - [`lsn`]: WAL positions.

pub mod check;
pub mod checkpoint;
pub mod config;
pub mod conn;
pub mod decode;
pub mod disk;
pub mod event;
pub mod lsn;
pub mod metrics;
pub mod observe;
pub mod pg;
pub mod pipeline;
pub mod protocol;
pub mod publication;
pub mod setup;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod spill;
