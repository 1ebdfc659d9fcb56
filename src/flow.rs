//! The small shared state of the flow: what the session, the sink tasks and
//! observability read and write without knowing one another.
//!
//! - [`Progress`]: the positions that travel back (received, and each sink's
//!   durable checkpoint; their minimum is the flush position told to Postgres),
//!   and whether snapshot jobs are open (no slow-sink detach meanwhile);
//! - [`SinkState`]: one sink's health (failing, detached, busy since);
//! - [`clock_ms`]: the monotonic clock those states are stamped with;
//! - [`Backoff`]: the one retry delay policy of pgferry.
//!
//! Invariants: this module imports nothing but [`crate::lsn`], so the
//! pipeline, the snapshot and the metrics can all share these types without
//! importing each other; a sink's checkpoint position only moves forward
//! (`fetch_max`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::lsn::Lsn;

/// Positions shared between the source, the sinks and the feedback task.
#[derive(Debug)]
pub struct Progress {
    /// End of the last WAL data received (the write position).
    pub received: AtomicU64,
    /// Per sink: its durable checkpoint.
    sinks: Vec<AtomicU64>,
    /// Woken whenever a checkpoint moves.
    pub changed: tokio::sync::Notify,
    /// A detached sink recovered and wants the session replayed from its checkpoint.
    pub rejoin: tokio::sync::Notify,
    /// Whether snapshot jobs are open: set by the snapshot side each time
    /// it saves its state. While they are, a sink is not detached for being
    /// slow (only for failing): a snapshot chunk is done only once every
    /// sink has applied it, so detaching a sink that is slow under the
    /// snapshot's load would make the session restart and read the
    /// unfinished chunks again, and a sink steadily slower than the
    /// snapshot would keep it from ever finishing.
    snapshot_open: AtomicBool,
}

impl Progress {
    pub fn new(checkpoints: &[Lsn]) -> Arc<Progress> {
        Arc::new(Progress {
            received: AtomicU64::new(0),
            sinks: checkpoints.iter().map(|l| AtomicU64::new(l.0)).collect(),
            changed: tokio::sync::Notify::new(),
            rejoin: tokio::sync::Notify::new(),
            snapshot_open: AtomicBool::new(false),
        })
    }

    /// See the field's docs.
    pub fn set_snapshot_open(&self, open: bool) {
        self.snapshot_open.store(open, Ordering::Release);
    }

    pub fn snapshot_open(&self) -> bool {
        self.snapshot_open.load(Ordering::Acquire)
    }

    /// The position every sink has durably applied: the flush LSN for Postgres.
    pub fn confirmed(&self) -> Lsn {
        Lsn(self
            .sinks
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .min()
            .unwrap_or(0))
    }

    pub fn sink(&self, i: usize) -> Lsn {
        Lsn(self.sinks[i].load(Ordering::Acquire))
    }

    pub(crate) fn set_sink(&self, i: usize, lsn: Lsn) {
        self.sinks[i].fetch_max(lsn.0, Ordering::AcqRel);
        self.changed.notify_waiters();
    }
}

/// Health of one sink, shared by its task and the fan-out.
#[derive(Debug, Default)]
pub struct SinkState {
    /// The sink's last attempt failed and it is retrying.
    pub failing: AtomicBool,
    /// The fan-out stopped feeding it; it will be replayed from its checkpoint.
    pub detached: AtomicBool,
    /// Woken on detach, so that the sink releases what it holds at once.
    pub on_detach: tokio::sync::Notify,
    /// Why it was detached (for logs and `/readyz`).
    pub detach_reason: std::sync::Mutex<String>,
    /// When the `apply` under way started ([`clock_ms`]); 0: none under way.
    pub busy_since_ms: AtomicU64,
    /// Detached for being slow (not failing), and when ([`clock_ms`]).
    pub slow: AtomicBool,
    pub detached_at_ms: AtomicU64,
}

impl SinkState {
    /// Why the sink was detached, if it is.
    pub fn detached_because(&self) -> Option<String> {
        self.detached.load(Ordering::Acquire).then(|| {
            self.detach_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
    }

    /// How long the `apply` under way has been running.
    pub(crate) fn busy_for(&self) -> Duration {
        match self.busy_since_ms.load(Ordering::Acquire) {
            0 => Duration::ZERO,
            t => Duration::from_millis(clock_ms().saturating_sub(t)),
        }
    }
}

/// Milliseconds on a monotonic clock that starts at 1 (0 means "never").
pub fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

/// One exponential backoff with jitter, used for every retry in pgferry.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { next: first, max }
    }

    /// The next delay: doubles up to `max`, with ±25% jitter.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        base.mul_f64(jitter)
    }
}
