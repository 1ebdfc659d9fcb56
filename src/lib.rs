//! pgferry: a native Postgres logical-replication CDC engine.
//!
//! # Layout
//!
//! Data flows one way: wire → decode → transactions → pipeline → sinks →
//! acknowledgements → checkpoints; only acknowledgements travel back (as
//! the flush position). Imports follow the same order, from the ground up
//! (a module imports only modules at or below its layer, and
//! `tests/module_graph.rs` fails on an import circle or an upward import):
//!
//! - ground, imported by anything:
//!   - [`lsn`]: WAL positions.
//!   - [`config`]: the TOML configuration (each sink's section lives with its sink).
//!   - [`disk`]: full disks, recognised and reported the same way everywhere.
//!   - [`json_write`]: JSON strings escaped as Postgres does, and calendar dates.
//!   - [`flow`]: the small shared state of the flow: [`flow::Progress`]
//!     (positions), [`flow::SinkState`] (sink health), the clock they are
//!     stamped with, and [`flow::Backoff`], the one retry delay policy.
//! - what travels:
//!   - [`event`]: transactions and change events, the public output format
//!     (the row-change half in `event::change`, below [`spill`]).
//!   - [`spill`]: spill files that keep large transactions out of memory.
//!   - [`checkpoint`]: per-sink progress, persisted atomically.
//! - [`protocol`]: pure parsers of the replication and pgoutput messages (no I/O).
//! - connections:
//!   - [`conn`]: the replication connection (startup, auth, commands, CopyBoth).
//!   - [`pg`]: ordinary SQL connections to the source (every one applies
//!     `source.network`), slot reads, and the session error
//!     [`pg::SourceError`] (it sits here so that the session and the
//!     snapshot both return it without importing each other).
//! - [`decode`]: type registry, `to_jsonb()`-exact values, transaction assembly.
//! - observability, which reads state through the types of [`flow`] and
//!   imports nothing above it:
//!   - [`metrics`]: the Prometheus registry, and what `/readyz` says.
//!   - [`endpoints`]: `/metrics`, `/healthz` and `/readyz`, served with hyper.
//!   - [`observe`]: heartbeat, lag and slot polling, progress log lines (once
//!     per process).
//! - [`sink`]: the `Sink` trait, [`sink::SinkError`] (one classification,
//!   `is_transient()`, and the typed cause), and the sinks, one folder
//!   each: `jsonl`, `redis`, `elasticsearch` (request building, client,
//!   retry classification, dead letters, merge), `nats` and `kafka` (their
//!   shared envelope in `eventlog`), `iceberg` (feature `iceberg`), `null`;
//!   beside them `key` (key templates) and `rows` (reading rows back). A
//!   sink imports only `event` (and `spill`), its config, the ground and
//!   the metrics counters; never the pipeline or the session. Their file
//!   I/O runs off the executor.
//! - [`pipeline`]: sink tasks, batching, backpressure, the memory budget,
//!   acknowledgements, and the one retry layer: it drives the sinks through
//!   the `Sink` trait and retries a batch when `SinkError::is_transient()`.
//! - the session:
//!   - [`source`]: one replication session, wiring the stages together
//!     (preflight, sinks, the stream loop, schema follow-up, feedback and
//!     drain); it ends with a [`pg::SourceError`], whose `is_transient()`
//!     says whether `main` starts another session.
//!   - [`snapshot`]: initial snapshots and backfills (watermarked chunks):
//!     the merger, workers, coordinator, planning, `snapshot.json` and the
//!     backfill commands. The stream talks to it through one narrow
//!     interface, [`snapshot::Snapshots::seen`] and
//!     [`snapshot::Snapshots::delivered`].
//!   - [`publication`]: what the publications must hold before a session
//!     streams; created, completed or refused at every start.
//!   - [`check`]: `pgferry check`, the preflight of a configuration.
//!   - [`setup`]: `pgferry setup`, the SQL that gives pgferry's role what it
//!     needs (never a superuser).

pub mod check;
pub mod checkpoint;
pub mod config;
pub mod conn;
pub mod decode;
pub mod disk;
pub mod endpoints;
pub mod event;
pub mod flow;
pub mod json_write;
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
