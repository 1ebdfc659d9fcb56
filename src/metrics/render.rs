//! The exposition of [`Metrics`]: at each scrape the values are gathered
//! into [`Family`]s (cheap: atomics and short locked lists), and
//! prometheus-client writes them as OpenMetrics text.
//!
//! Invariants:
//! - names are stable: a counter is declared without its `_total`, which
//!   the encoder adds, so every series reads as it always did;
//! - label values are escaped here (the encoder writes them as given);
//! - a family is declared even when it has no series yet, so its `HELP`
//!   and `TYPE` are there from the first scrape.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{label, lock, Metrics, SinkHealth, SinkMetrics, BUCKETS};
use crate::lsn::Lsn;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

enum Value {
    Int(u64),
    Float(f64),
    /// Per-bucket counts (not cumulative), `+Inf` last, and the sum.
    Histogram {
        buckets: Vec<(f64, u64)>,
        sum: f64,
    },
}

type Labels = Vec<(&'static str, String)>;

/// One metric and its series.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    series: Vec<(Labels, Value)>,
}

/// What one scrape gathered.
#[derive(Default)]
struct Scrape(Vec<Family>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrape({} families)", self.0.len())
    }
}

impl Scrape {
    fn family(&mut self, name: &'static str, kind: MetricType, help: &'static str) -> &mut Family {
        self.0.push(Family {
            name,
            help,
            kind,
            series: Vec::new(),
        });
        self.0.last_mut().expect("just pushed")
    }

    fn counter(&mut self, name: &'static str, help: &'static str, v: u64) {
        self.family(name, MetricType::Counter, help)
            .add(vec![], Value::Int(v));
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, v: u64) {
        self.family(name, MetricType::Gauge, help)
            .add(vec![], Value::Int(v));
    }
}

impl Family {
    fn add(&mut self, labels: Labels, v: Value) -> &mut Family {
        self.series.push((labels, v));
        self
    }
}

fn encode_value(m: &mut MetricEncoder<'_>, kind: MetricType, v: &Value) -> std::fmt::Result {
    match (kind, v) {
        (MetricType::Counter, Value::Int(n)) => m.encode_counter::<NoLabelSet, _, u64>(n, None),
        (MetricType::Counter, Value::Float(x)) => m.encode_counter::<NoLabelSet, _, u64>(x, None),
        (_, Value::Int(n)) => m.encode_gauge(n),
        (_, Value::Float(x)) => m.encode_gauge(x),
        (_, Value::Histogram { buckets, sum }) => {
            let count = buckets.iter().map(|b| b.1).sum();
            m.encode_histogram::<NoLabelSet>(*sum, count, buckets, None)
        }
    }
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        for f in &self.0 {
            let name = match f.kind {
                MetricType::Counter => f.name.strip_suffix("_total").unwrap_or(f.name),
                _ => f.name,
            };
            let mut m = e.encode_descriptor(name, f.help, None, f.kind)?;
            for (labels, v) in &f.series {
                if labels.is_empty() {
                    encode_value(&mut m, f.kind, v)?;
                } else {
                    encode_value(&mut m.encode_family(labels)?, f.kind, v)?;
                }
            }
        }
        Ok(())
    }
}

impl Metrics {
    /// The exposition, as OpenMetrics text ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut s = Scrape::default();
        self.gather_stream(&mut s);
        self.gather_positions(&mut s);
        self.gather_slot(&mut s);
        self.gather_sinks(&mut s);
        self.gather_disks(&mut s);
        self.gather_snapshots(&mut s);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(s));
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    fn gather_stream(&self, s: &mut Scrape) {
        s.gauge("pgferry_up", "1 while the process runs.", 1);
        s.gauge(
            "pgferry_streaming",
            "1 while a replication session streams.",
            self.streaming() as u64,
        );
        let f = s.family(
            "pgferry_events_received_total",
            MetricType::Counter,
            "Row changes received from the replication stream, per table.",
        );
        for (t, c) in lock(&self.received).iter() {
            f.add(
                vec![("table", label(t))],
                Value::Int(c.load(Ordering::Relaxed)),
            );
        }
        s.counter(
            "pgferry_transactions_total",
            "Committed transactions received.",
            self.transactions.load(Ordering::Relaxed),
        );
        s.counter(
            "pgferry_bytes_received_total",
            "Bytes of replication data (CopyData) received.",
            self.bytes_received.load(Ordering::Relaxed),
        );
        s.counter(
            "pgferry_heartbeats_total",
            "Heartbeat messages emitted (pg_logical_emit_message).",
            self.heartbeats.load(Ordering::Relaxed),
        );
        s.counter(
            "pgferry_heartbeat_errors_total",
            "Heartbeats that failed.",
            self.heartbeat_errors.load(Ordering::Relaxed),
        );
    }

    /// Received and checkpointed positions, of the session that streams or
    /// (between sessions) the last one seen; each sink's checkpoint.
    fn positions(&self) -> (u64, u64, Vec<(String, Lsn)>) {
        match lock(&self.session).as_ref() {
            Some(s) => {
                let r = s.progress.received.load(Ordering::Acquire);
                let c = s.progress.confirmed().0;
                self.last_received.store(r, Ordering::Release);
                self.last_checkpointed.store(c, Ordering::Release);
                let per = s
                    .sinks
                    .iter()
                    .enumerate()
                    .map(|(i, (n, _))| (n.clone(), s.progress.sink(i)))
                    .collect();
                (r, c, per)
            }
            None => (
                self.last_received.load(Ordering::Acquire),
                self.last_checkpointed.load(Ordering::Acquire),
                Vec::new(),
            ),
        }
    }

    fn gather_positions(&self, s: &mut Scrape) {
        let (received, checkpointed, per_sink) = self.positions();
        let srv = &self.server;
        let f = s.family(
            "pgferry_lsn",
            MetricType::Gauge,
            "WAL positions as byte offsets: received (end of the data received), checkpointed (durable in every sink; the flush position sent to the server), confirmed (the slot's confirmed_flush_lsn on the server), server (the server's current WAL position).",
        );
        let kind = |k: &str| vec![("kind", k.to_string())];
        f.add(kind("received"), Value::Int(received));
        f.add(kind("checkpointed"), Value::Int(checkpointed));
        if srv.polled.load(Ordering::Acquire) {
            f.add(
                kind("server"),
                Value::Int(srv.current_wal.load(Ordering::Acquire)),
            );
            if srv.slot_present.load(Ordering::Acquire) {
                let c = srv.confirmed_flush.load(Ordering::Acquire);
                f.add(kind("confirmed"), Value::Int(c));
            }
        }
        let f = s.family(
            "pgferry_sink_checkpoint_lsn",
            MetricType::Gauge,
            "Each sink's durable checkpoint, as a byte offset.",
        );
        for (n, l) in &per_sink {
            f.add(vec![("sink", label(n))], Value::Int(l.0));
        }
        let f = s.family(
            "pgferry_replication_lag_bytes",
            MetricType::Gauge,
            "The server's current WAL position minus the slot's confirmed_flush_lsn.",
        );
        if let Some(l) = srv.lag_bytes() {
            f.add(vec![], Value::Int(l));
        }
        let f = s.family(
            "pgferry_replication_lag_seconds",
            MetricType::Gauge,
            "Now minus the commit time of the last transaction applied, for the sink furthest behind; 0 when every sink applied every transaction received.",
        );
        if let Some(l) = self.lag_seconds() {
            f.add(vec![], Value::Float(l));
        }
    }

    fn gather_slot(&self, s: &mut Scrape) {
        let srv = &self.server;
        let present = srv.slot_present.load(Ordering::Acquire);
        let f = s.family(
            "pgferry_slot_retained_wal_bytes",
            MetricType::Gauge,
            "WAL the slot keeps on the server: current WAL position minus the slot's restart_lsn.",
        );
        if present {
            f.add(vec![], Value::Int(srv.retained_wal.load(Ordering::Acquire)));
        }
        s.gauge(
            "pgferry_slot_retained_wal_warn_bytes",
            "The retained WAL warning threshold (metrics.wal_warn_bytes; 0: none).",
            self.wal_warn_bytes.load(Ordering::Acquire),
        );
        s.gauge(
            "pgferry_slot_retained_wal_over_threshold",
            "1 while the retained WAL is above metrics.wal_warn_bytes.",
            self.wal_over_threshold().is_some() as u64,
        );
        let f = s.family(
            "pgferry_slot_wal_status",
            MetricType::Gauge,
            "The slot's wal_status (PostgreSQL 13+): 1 for the current one.",
        );
        let status = lock(&srv.wal_status).clone();
        if let Some(st) = status.as_deref().filter(|_| present) {
            const KNOWN: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];
            for k in KNOWN {
                f.add(
                    vec![("status", k.to_string())],
                    Value::Int((k == st) as u64),
                );
            }
            if !KNOWN.contains(&st) {
                f.add(vec![("status", label(st))], Value::Int(1));
            }
        }
    }
}

/// A per-sink series that reads one number of [`SinkMetrics`]: name, type,
/// help, and the read.
type SinkSeries = (
    &'static str,
    MetricType,
    &'static str,
    fn(&SinkMetrics) -> u64,
);

const SINK_SERIES: [SinkSeries; 5] = [
    (
        "pgferry_sink_errors_total",
        MetricType::Counter,
        "Failed sink attempts (apply or flush).",
        |s| s.errors.load(Ordering::Relaxed),
    ),
    (
        "pgferry_sink_retries_total",
        MetricType::Counter,
        "Sink attempts retried after a transient failure.",
        |s| s.retries.load(Ordering::Relaxed),
    ),
    (
        "pgferry_dead_letters_total",
        MetricType::Counter,
        "Changes a sink refused for good and wrote to its dead-letter file.",
        |s| s.dead_letters.load(Ordering::Relaxed),
    ),
    (
        "pgferry_sink_incomplete_rows",
        MetricType::Gauge,
        "Rows a sink could not write whole (their changes are dead letters), until a later write repairs them; /readyz is not ready meanwhile.",
        |s| s.incomplete.load(Ordering::Relaxed),
    ),
    (
        "pgferry_sink_data_loss_total",
        MetricType::Counter,
        "Times the sink had a checkpoint but its store no longer held pgferry's state at start (it restarted empty, was flushed, or lost an index).",
        |s| s.data_losses.load(Ordering::Relaxed),
    ),
];

impl Metrics {
    fn gather_sinks(&self, s: &mut Scrape) {
        let sinks: Vec<Arc<SinkMetrics>> = lock(&self.sinks).values().cloned().collect();
        let sink = |s: &SinkMetrics| vec![("sink", label(&s.name))];
        let f = s.family(
            "pgferry_events_applied_total",
            MetricType::Counter,
            "Row changes applied by each sink, per table (changes of transactions spilled to disk count under table=\"_spilled\").",
        );
        for m in &sinks {
            for (t, c) in lock(&m.applied).iter() {
                let labels = vec![("sink", label(&m.name)), ("table", label(t))];
                f.add(labels, Value::Int(c.load(Ordering::Relaxed)));
            }
        }
        let f = s.family(
            "pgferry_sink_batch_seconds",
            MetricType::Histogram,
            "Time each sink took to apply a batch (successful attempts).",
        );
        for m in &sinks {
            let count = |i: usize| m.batch.counts[i].load(Ordering::Relaxed);
            let mut buckets: Vec<(f64, u64)> = BUCKETS
                .iter()
                .enumerate()
                .map(|(i, b)| (*b, count(i)))
                .collect();
            buckets.push((f64::MAX, count(BUCKETS.len())));
            let sum = m.batch.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            f.add(sink(m), Value::Histogram { buckets, sum });
        }
        for (name, kind, help, get) in SINK_SERIES {
            let f = s.family(name, kind, help);
            for m in &sinks {
                f.add(sink(m), Value::Int(get(m)));
            }
        }
        let end = self.last_txn_end.load(Ordering::Acquire);
        let f = s.family(
            "pgferry_sink_lag_seconds",
            MetricType::Gauge,
            "Per sink: now minus the commit time of the last transaction it applied; 0 when it applied every transaction received.",
        );
        for m in &sinks {
            if let Some(l) = m.lag_seconds(end) {
                f.add(sink(m), Value::Float(l));
            }
        }
        let health: HashMap<String, SinkHealth> = self.sink_health().into_iter().collect();
        let f = s.family(
            "pgferry_sink_healthy",
            MetricType::Gauge,
            "1 while the sink is neither failing nor detached (current session only).",
        );
        for (n, h) in &health {
            let ok = (*h == SinkHealth::Ok) as u64;
            f.add(vec![("sink", label(n))], Value::Int(ok));
        }
    }

    /// `pgferry_disk_full{path}` and `pgferry_disk_full_errors_total`.
    fn gather_disks(&self, s: &mut Scrape) {
        let f = s.family(
            "pgferry_disk_full",
            MetricType::Gauge,
            "1 per path where the last write failed because the disk is full (spill, checkpoint or JSON-lines file); gone once a write there succeeds.",
        );
        for (path, _) in self.disks_full() {
            f.add(vec![("path", label(&path))], Value::Int(1));
        }
        s.counter(
            "pgferry_disk_full_errors_total",
            "Writes that failed because a disk was full (each is retried).",
            self.disk_full_errors.load(Ordering::Relaxed),
        );
    }

    fn gather_snapshots(&self, s: &mut Scrape) {
        let snaps = lock(&self.snapshots).clone();
        type Get = fn(&super::SnapshotProgress) -> u64;
        let series: [(&str, &str, Get); 3] = [
            (
                "pgferry_snapshot_rows_done",
                "Rows copied by the snapshot, per table.",
                |p| p.done,
            ),
            (
                "pgferry_snapshot_rows_estimate",
                "Estimated rows to copy, per table (0: unknown).",
                |p| p.estimate,
            ),
            (
                "pgferry_snapshot_active",
                "1 while the table's snapshot runs.",
                |p| !p.finished as u64,
            ),
        ];
        for (name, help, get) in series {
            let f = s.family(name, MetricType::Gauge, help);
            for (t, p) in &snaps {
                f.add(vec![("table", label(t))], Value::Int(get(p)));
            }
        }
        s.counter(
            "pgferry_snapshot_failures_total",
            "Snapshot and backfill jobs that failed with an error no retry can fix.",
            self.snapshot_failures.load(Ordering::Relaxed),
        );
        s.gauge(
            "pgferry_snapshot_failed_jobs",
            "Failed snapshot jobs not cancelled yet (pgferry backfill --cancel ID).",
            lock(&self.failed_jobs).len() as u64,
        );
    }
}
