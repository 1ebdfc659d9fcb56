//! From committed transactions to sinks, and acknowledgements back.
//!
//! ```text
//! source task ──Item──▶ bounded channel ──▶ sink task (one per sink) ──▶ Sink::apply
//!                                             │ durably applied
//!                                             ▼
//!                                checkpoint file (per sink) ──▶ Progress ──▶ feedback to Postgres
//! ```
//!
//! Invariants:
//! - every sink sees every transaction (those of its tables) once per run, in
//!   commit order; transactions at or below the sink's checkpoint are skipped,
//!   so a transaction sent again after a reconnect or restart is not applied
//!   twice by the pipeline;
//! - a sink's checkpoint is written only after `apply` returned `Ok`, and the
//!   flush position told to Postgres is the minimum over all sinks;
//! - channels are bounded, and committed transactions held in memory are
//!   bounded by a byte budget, so a slow sink slows the source down
//!   (backpressure) instead of growing memory;
//! - nothing flows backwards but acknowledgements, through [`Progress`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};

use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::event::Transaction;
use crate::lsn::Lsn;
use crate::sink::{Sink, SinkError};

/// What flows from the source to each sink task.
#[derive(Debug, Clone)]
pub enum Item {
    /// A committed transaction.
    Txn(Arc<Transaction>),
    /// Every commit up to this position has been sent and no transaction is
    /// open: once everything before it is applied, the sink may checkpoint it.
    Idle(Lsn),
}

/// Positions shared between the source, the sinks and the feedback task.
#[derive(Debug)]
pub struct Progress {
    /// End of the last WAL data received (the write position).
    pub received: AtomicU64,
    /// Per sink: its durable checkpoint.
    sinks: Vec<AtomicU64>,
    /// Woken whenever a checkpoint moves.
    pub changed: tokio::sync::Notify,
}

impl Progress {
    pub fn new(checkpoints: &[Lsn]) -> Arc<Progress> {
        Arc::new(Progress {
            received: AtomicU64::new(0),
            sinks: checkpoints.iter().map(|l| AtomicU64::new(l.0)).collect(),
            changed: tokio::sync::Notify::new(),
        })
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

    fn set_sink(&self, i: usize, lsn: Lsn) {
        self.sinks[i].fetch_max(lsn.0, Ordering::AcqRel);
        self.changed.notify_waiters();
    }
}

/// Memory budget for committed transactions on their way to the sinks.
#[derive(Debug, Clone)]
pub struct Budget {
    sem: Arc<Semaphore>,
    /// Total permits, in KiB.
    total_kib: u32,
}

impl Budget {
    pub fn new(bytes: u64) -> Budget {
        let total_kib = (bytes / 1024).clamp(1, Semaphore::MAX_PERMITS as u64 / 2) as u32;
        Budget {
            sem: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Waits until `txn` fits in the budget and attaches the permit to it, so
    /// the memory is released when the last sink drops the transaction.
    pub async fn admit(&self, txn: &mut Transaction) {
        let kib = ((txn.mem_bytes / 1024) as u32).clamp(1, self.total_kib);
        if let Ok(p) = self.sem.clone().acquire_many_owned(kib).await {
            txn._budget = Some(p);
        }
    }
}

/// Settings of one sink task.
pub struct SinkTask {
    pub index: usize,
    pub name: String,
    pub sink: Box<dyn Sink>,
    pub rx: mpsc::Receiver<Item>,
    pub store: CheckpointStore,
    pub slot: String,
    pub system_identifier: String,
    /// The sink's checkpoint at start.
    pub checkpoint: Lsn,
    pub progress: Arc<Progress>,
    pub batch_max_events: usize,
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

impl SinkTask {
    /// Applies items until the channel closes (clean shutdown) or a fatal error.
    pub async fn run(mut self) -> Result<(), String> {
        let mut applied = self.checkpoint;
        let mut durable = self.checkpoint;
        let mut batch: Vec<Arc<Transaction>> = Vec::new();
        loop {
            let Some(first) = self.rx.recv().await else {
                break;
            };
            let mut idle = None;
            let mut events = 0usize;
            let mut push =
                |item: Item, batch: &mut Vec<Arc<Transaction>>, events: &mut usize| match item {
                    Item::Txn(t) => {
                        if t.meta.end_lsn > applied {
                            *events += match &t.changes {
                                crate::event::Changes::Memory(v) => v.len(),
                                crate::event::Changes::Spilled { reader, .. } => {
                                    reader.len() as usize
                                }
                            };
                            batch.push(t);
                        }
                    }
                    Item::Idle(l) => idle = Some(l),
                };
            push(first, &mut batch, &mut events);
            while events < self.batch_max_events {
                match self.rx.try_recv() {
                    Ok(item) => push(item, &mut batch, &mut events),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.apply_with_retry(&batch).await?;
                if let Some(last) = batch.last() {
                    applied = applied.max(last.meta.end_lsn);
                }
                batch.clear();
            }
            if let Some(l) = idle {
                applied = applied.max(l);
            }
            if applied > durable {
                self.store
                    .save(&Checkpoint {
                        sink: self.name.clone(),
                        slot: self.slot.clone(),
                        system_identifier: self.system_identifier.clone(),
                        lsn: applied,
                    })
                    .map_err(|e| format!("sink {:?}: {e}", self.name))?;
                durable = applied;
                self.progress.set_sink(self.index, durable);
            }
        }
        self.sink
            .close()
            .await
            .map_err(|e| format!("sink {:?}: closing failed: {e}", self.name))
    }

    async fn apply_with_retry(&mut self, batch: &[Arc<Transaction>]) -> Result<(), String> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut attempt = 0u32;
        loop {
            match self.sink.apply(batch).await {
                Ok(()) => return Ok(()),
                Err(SinkError::Fatal(m)) => return Err(format!("sink {:?}: {m}", self.name)),
                Err(SinkError::Transient(m)) => {
                    attempt += 1;
                    let delay = backoff.next_delay();
                    tracing::warn!(sink = %self.name, attempt, error = %m, retry_in_ms = delay.as_millis() as u64, "sink batch failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        for (d, base) in delays.iter().zip([100u128, 200, 400, 800, 800, 800]) {
            assert!(*d >= base * 3 / 4 && *d <= base * 5 / 4, "{delays:?}");
        }
    }

    #[test]
    fn confirmed_is_the_minimum_over_sinks() {
        let p = Progress::new(&[Lsn(10), Lsn(5)]);
        assert_eq!(p.confirmed(), Lsn(5));
        p.set_sink(1, Lsn(20));
        assert_eq!(p.confirmed(), Lsn(10));
        p.set_sink(0, Lsn(3)); // never goes backwards
        assert_eq!(p.sink(0), Lsn(10));
    }
}
