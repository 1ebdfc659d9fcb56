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
//! - a sink's checkpoint is written only after `apply` and then `flush`
//!   returned `Ok`, at most every `checkpoint_interval` (and when the session
//!   ends), and the flush position told to Postgres is the minimum over all
//!   sinks;
//! - channels are bounded, and committed transactions held in memory are
//!   bounded by a byte budget, so a slow sink slows the source down
//!   (backpressure) instead of growing memory;
//! - nothing flows backwards but acknowledgements, through [`Progress`];
//! - sinks are isolated: a sink that is failing (retrying) and whose channel
//!   is full, or that is failing while the source waits for memory, is
//!   *detached* instead of blocking the others. The slot keeps the WAL from
//!   that sink's checkpoint (the flush position is the minimum), so nothing is
//!   lost: a detached sink drops its queue and lets its batch stop counting
//!   against the memory budget (it cannot hold up the others through the
//!   budget either), and once that batch applies it asks for a *rejoin*: the
//!   session restarts from the minimum checkpoint, and the sinks that are
//!   ahead skip what they already applied. The WAL retained by the slot is
//!   the detached sink's queue; no other disk queue is needed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};

use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointStore};
use crate::event::Transaction;
use crate::flow::{clock_ms, Backoff, Progress, SinkState};
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
    ///
    /// A failing or stuck sink holds the transactions it has queued, and
    /// with large transactions those can be the whole budget before its
    /// queue is full. So while this waits, every sink that is failing is
    /// detached, and so is every sink that holds queued transactions while
    /// one `apply` has run longer than its `slow_after`: it then releases
    /// what it holds, and the others keep flowing.
    pub async fn admit(&self, txn: &mut Transaction, links: &[SinkLink]) {
        let kib = ((txn.mem_bytes / 1024) as u32).clamp(1, self.total_kib);
        let acquire = self.sem.clone().acquire_many_owned(kib);
        tokio::pin!(acquire);
        loop {
            tokio::select! {
                p = &mut acquire => {
                    if let Ok(p) = p {
                        txn._budget = Some(p);
                    }
                    return;
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    for link in links {
                        if link.state.detached.load(Ordering::Acquire) {
                            continue;
                        }
                        if link.state.failing.load(Ordering::Acquire) {
                            link.detach("sink is failing and the source waits for the memory it holds");
                        } else if link.holds_items()
                            && link.state.busy_for() >= link.slow_after
                            && !link.progress.snapshot_open()
                        {
                            link.detach_slow(&format!(
                                "sink has spent over {} ms on one batch (pipeline.slow_sink_detach_ms) while the source waits for the memory its queue holds",
                                link.slow_after.as_millis()
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// The longest a sink found slow (not hung) is allowed to hold the others
/// back after its bound has grown (see [`slow_bound`]).
pub const SLOW_BOUND_MAX: Duration = Duration::from_secs(60);

fn slow_bounds() -> std::sync::MutexGuard<'static, std::collections::HashMap<String, Duration>> {
    static B: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Duration>>> =
        std::sync::OnceLock::new();
    B.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// How long `sink`'s queue may stay full before it is detached: the
/// configured `pipeline.slow_sink_detach_ms`, doubled (up to
/// [`SLOW_BOUND_MAX`], for the life of the process) each time the sink,
/// detached for slowness, caught up within that bound. Such a sink was slow,
/// not hung (a large transaction, a loaded destination), and every detach
/// costs a replay: this keeps a steadily slow sink from restarting the
/// session over and over, while a hung one is still detached in bounded time.
pub fn slow_bound(sink: &str, configured: Duration) -> Duration {
    slow_bounds()
        .get(sink)
        .copied()
        .unwrap_or(configured)
        .max(configured)
}

fn grow_slow_bound(sink: &str, now: Duration) -> Duration {
    let next = (now * 2).min(SLOW_BOUND_MAX).max(now);
    slow_bounds().insert(sink.to_string(), next);
    next
}

/// The source's end of one sink task.
#[derive(Debug, Clone)]
pub struct SinkLink {
    pub name: String,
    pub tx: mpsc::Sender<Item>,
    pub state: Arc<SinkState>,
    /// `pipeline.slow_sink_detach_ms`: how long a full queue may hold the
    /// others back before the sink is detached, failing or not.
    pub slow_after: Duration,
    /// The session's positions, and whether snapshot jobs are open.
    pub progress: Arc<Progress>,
}

impl SinkLink {
    /// Detaches a slow sink (its queue full, or a batch running, too long).
    fn detach_slow(&self, why: &str) {
        self.state.slow.store(true, Ordering::Release);
        self.detach(why);
    }

    fn detach(&self, why: &str) {
        self.state
            .detached_at_ms
            .store(clock_ms(), Ordering::Release);
        *self
            .state
            .detach_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = why.to_string();
        self.state.detached.store(true, Ordering::Release);
        self.state.on_detach.notify_one();
        tracing::warn!(sink = %self.name, "{why}: detached; the other sinks go on, and it will be replayed from its checkpoint when it catches up");
    }

    /// The queue holds items (and so, memory of the budget).
    fn holds_items(&self) -> bool {
        self.tx.capacity() < self.tx.max_capacity()
    }
}

/// The channel to a sink task is closed: the task stopped.
#[derive(Debug)]
pub struct SinkGone(pub String);

/// Hands `item` to every attached sink. Waits while a healthy sink is busy
/// (backpressure), but detaches a sink that is failing and full, or whose
/// queue stays full for longer than its `slow_after`, so the others keep
/// flowing: a slow sink holds them back for a bounded time.
pub async fn fan_out(links: &[SinkLink], item: Item) -> Result<(), SinkGone> {
    fan_out_to(links, item, None).await
}

/// [`fan_out`] to the sinks named in `only` (`None`: all of them).
pub async fn fan_out_to(
    links: &[SinkLink],
    item: Item,
    only: Option<&[String]>,
) -> Result<(), SinkGone> {
    for link in links {
        if link.state.detached.load(Ordering::Acquire)
            || only.is_some_and(|o| !o.contains(&link.name))
        {
            continue;
        }
        match link.tx.try_send(item.clone()) {
            Ok(()) => continue,
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(SinkGone(link.name.clone())),
            Err(mpsc::error::TrySendError::Full(_)) => {}
        }
        let full_since = tokio::time::Instant::now();
        loop {
            if link.state.failing.load(Ordering::Acquire) {
                link.detach("sink is failing and its queue is full");
                break;
            }
            let waited = full_since.elapsed();
            if waited >= link.slow_after && !link.progress.snapshot_open() {
                link.detach_slow(&format!(
                    "sink queue has been full for {} ms (pipeline.slow_sink_detach_ms) while the other sinks wait",
                    waited.as_millis()
                ));
                break;
            }
            let tick = link
                .slow_after
                .saturating_sub(waited)
                .clamp(Duration::from_millis(1), Duration::from_millis(200));
            tokio::select! {
                r = link.tx.send(item.clone()) => {
                    r.map_err(|_| SinkGone(link.name.clone()))?;
                    break;
                }
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }
    Ok(())
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
    /// Least time between two checkpoints (each one flushes the sink).
    pub checkpoint_interval: Duration,
    /// Time-based batching: how long to wait for more transactions after the
    /// first one of a batch while the batch holds fewer than `.1` events.
    /// `None`: a batch is what is already queued (no waiting).
    pub linger: Option<(Duration, usize)>,
    pub state: Arc<SinkState>,
    /// Stop pgferry when the sink has failed for this long (`None`: retry forever).
    pub max_failure: Option<Duration>,
    /// Turns true when the session ends: a sink that is retrying gives up
    /// (its batch is not checkpointed, so it is replayed next session).
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// Set when the sink has a checkpoint: before its first batch the task
    /// asks the sink whether its store still holds pgferry's state
    /// ([`Sink::lost_state`]) and reports a loss here.
    pub loss: Option<mpsc::UnboundedSender<DataLoss>>,
    /// The path of the sink's last full-disk error, until a write succeeds.
    pub disk_full_path: Option<std::path::PathBuf>,
    /// Its link's `slow_after` (see [`slow_bound`]).
    pub slow_after: Duration,
}

/// A sink's store lost pgferry's state (reported once, at start).
#[derive(Debug)]
pub struct DataLoss {
    pub index: usize,
    pub sink: String,
    /// What the store lost, in the sink's words.
    pub what: String,
    /// Sent by the session once it acted (a reload is planned and
    /// persisted): only then does the sink apply anything, since its first
    /// write would hide the loss from the next start.
    pub go_on: tokio::sync::oneshot::Sender<()>,
}

/// How long a batch under way may still take once the session ends,
/// before it is abandoned (and replayed next session): a hung destination
/// must not hold up a shutdown.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// Publishes a full disk reported by a sink (see [`crate::disk`]).
fn note_disk(e: &SinkError) {
    if let Some(path) = e.disk_full() {
        crate::metrics::global().disk_full(path, e.message());
    }
}

impl SinkTask {
    /// Applies items until the channel closes (clean shutdown) or a fatal
    /// error, which it returns with the sink's name in its message.
    pub async fn run(mut self) -> Result<(), SinkError> {
        let mut applied = self.checkpoint;
        let mut durable = self.checkpoint;
        let mut last_checkpoint = tokio::time::Instant::now();
        let mut batch: Vec<Arc<Transaction>> = Vec::new();
        if !self.check_state().await? {
            // Not even `close`: a flush could write the state whose absence
            // is the loss, and hide it from the next start.
            return Ok(());
        }
        if self.state.detached.load(Ordering::Acquire) {
            // Detached while its store did not answer: replay from here.
            self.rejoin(durable).await;
        }
        loop {
            // With progress not yet checkpointed, wait for more only until
            // the checkpoint is due.
            let next = if applied > durable {
                let due = last_checkpoint + self.checkpoint_interval;
                match tokio::time::timeout_at(due, self.rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => {
                        if !self.checkpoint(applied).await? {
                            break;
                        }
                        durable = applied;
                        last_checkpoint = tokio::time::Instant::now();
                        continue;
                    }
                }
            } else {
                self.rx.recv().await
            };
            let Some(first) = next else { break };
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
            // Time-based batching: nothing is acknowledged before `apply`
            // returns, so waiting here only delays this batch (bounded by
            // the linger time) to send fewer, fuller requests.
            if let Some((linger, target)) = self.linger {
                let deadline = tokio::time::Instant::now() + linger;
                let target = target.min(self.batch_max_events);
                while !batch.is_empty() && events < target {
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(item)) => push(item, &mut batch, &mut events),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            if !batch.is_empty() {
                if !self.apply_with_retry(&mut batch).await? {
                    break;
                }
                if let Some(last) = batch.last() {
                    applied = applied.max(last.meta.end_lsn);
                }
                batch.clear();
            }
            if let Some(l) = idle {
                applied = applied.max(l);
            }
            if applied > durable && last_checkpoint.elapsed() >= self.checkpoint_interval {
                if !self.checkpoint(applied).await? {
                    break;
                }
                durable = applied;
                last_checkpoint = tokio::time::Instant::now();
            }
            if self.state.detached.load(Ordering::Acquire) && self.rx.is_empty() {
                if applied > durable && self.checkpoint(applied).await? {
                    durable = applied;
                }
                self.rejoin(durable).await;
                break;
            }
        }
        // Clean end of the session: make the rest durable and checkpoint it.
        // A sink that still fails gives up at once (`stop` is set by then).
        if applied > durable {
            self.checkpoint(applied).await?;
        }
        self.close().await
    }

    /// Closes the sink at the end of the session. A store that cannot be
    /// reached now (the usual reason a session ends with a sink failing)
    /// fails its close too: that loses nothing, since what the sink did not
    /// checkpoint is replayed, so only a fatal error ends pgferry.
    async fn close(&mut self) -> Result<(), SinkError> {
        match self.sink.close().await {
            Ok(()) => Ok(()),
            Err(e) if !e.is_transient() => {
                Err(e.context(format_args!("sink {:?}: closing failed", self.name)))
            }
            Err(e) => {
                tracing::warn!(sink = %self.name, error = %e, "closing the sink failed; what it did not checkpoint is replayed in the next session");
                Ok(())
            }
        }
    }

    /// A detached sink caught up: asks for a replay from its checkpoint and
    /// waits for the end of the session (nothing more arrives for it).
    async fn rejoin(&mut self, durable: Lsn) {
        let st = &self.state;
        let detached_for = clock_ms().saturating_sub(st.detached_at_ms.load(Ordering::Acquire));
        if st.slow.load(Ordering::Acquire) && detached_for < self.slow_after.as_millis() as u64 {
            let next = grow_slow_bound(&self.name, self.slow_after);
            tracing::info!(sink = %self.name, caught_up_after_ms = detached_for, slow_sink_detach_ms = next.as_millis() as u64,
                "the sink caught up soon after it was detached for being slow: it is slow, not hung, so from now on it is detached only after its queue stays full this long");
        }
        tracing::info!(sink = %self.name, at = %durable, "detached sink recovered; asking for a replay from its checkpoint");
        self.progress.rejoin.notify_one();
        while self.rx.recv().await.is_some() {}
    }

    /// When the sink has a checkpoint, asks it whether its store still holds
    /// pgferry's state (retrying while the store does not answer) and
    /// reports a loss to the session. `Ok(false)`: the session ended first.
    async fn check_state(&mut self) -> Result<bool, SinkError> {
        let Some(report) = self.loss.take() else {
            return Ok(true);
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            let e = match self.sink.lost_state().await {
                Ok(lost) => {
                    self.state.failing.store(false, Ordering::Release);
                    let Some(what) = lost else {
                        return Ok(true);
                    };
                    let (go_on, answer) = tokio::sync::oneshot::channel();
                    let _ = report.send(DataLoss {
                        index: self.index,
                        sink: self.name.clone(),
                        what,
                        go_on,
                    });
                    // No answer: the session stops (on_data_loss = "stop").
                    return Ok(tokio::select! {
                        r = answer => r.is_ok(),
                        _ = self.stop.wait_for(|s| *s) => false,
                    });
                }
                Err(e) if !e.is_transient() => return Err(self.named(e)),
                Err(e) => e,
            };
            let m = e.to_string();
            crate::metrics::global().sink(&self.name).failed(&m, true);
            self.state.failing.store(true, Ordering::Release);
            let delay = backoff.next_delay();
            tracing::warn!(sink = %self.name, error = %m, retry_in_ms = delay.as_millis() as u64, "cannot check whether the sink's store still holds pgferry's state; retrying");
            if !self.wait_to_retry(delay, &mut []).await {
                return Ok(false);
            }
        }
    }

    /// Flushes the sink (retrying transient failures) and saves the
    /// checkpoint. `Ok(false)`: the session ended while the flush was failing.
    async fn checkpoint(&mut self, lsn: Lsn) -> Result<bool, SinkError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            match self.sink.flush().await {
                Ok(()) => break,
                Err(e) if !e.is_transient() => {
                    crate::metrics::global()
                        .sink(&self.name)
                        .failed(e.message(), false);
                    return Err(self.named(e));
                }
                Err(e) => {
                    let m = e.to_string();
                    if let Some(path) = e.disk_full() {
                        self.disk_full_path = Some(path.to_path_buf());
                    }
                    note_disk(&e);
                    crate::metrics::global().sink(&self.name).failed(&m, true);
                    self.state.failing.store(true, Ordering::Release);
                    let delay = backoff.next_delay();
                    tracing::warn!(sink = %self.name, error = %m, retry_in_ms = delay.as_millis() as u64, "sink flush failed; retrying");
                    if !self.wait_to_retry(delay, &mut []).await {
                        return Ok(false);
                    }
                }
            }
        }
        self.state.failing.store(false, Ordering::Release);
        self.sink_disk_ok();
        let cp = Checkpoint {
            sink: self.name.clone(),
            slot: self.slot.clone(),
            system_identifier: self.system_identifier.clone(),
            lsn,
        };
        // A full checkpoint directory is retried like any full disk; other
        // errors (permissions, a corrupt directory) need the operator.
        let path = self.store.path_of(&self.name);
        loop {
            match self.store.save_off_executor(&cp).await {
                Ok(()) => {
                    crate::metrics::global().disk_ok(&path);
                    break;
                }
                Err(CheckpointError::Io { path, source }) if crate::disk::is_full(&source) => {
                    let m =
                        crate::disk::full_message("writing the checkpoint file", &path, &source);
                    crate::metrics::global().disk_full(&path, &m);
                    let delay = backoff.next_delay();
                    tracing::warn!(sink = %self.name, path = %path.display(), retry_in_ms = delay.as_millis() as u64, "{m}");
                    if !self.wait_to_retry(delay, &mut []).await {
                        return Ok(false);
                    }
                }
                Err(e) => {
                    let m = format!("sink {:?}: {e}", self.name);
                    return Err(SinkError::fatal(m).caused_by(e));
                }
            }
        }
        self.progress.set_sink(self.index, lsn);
        Ok(true)
    }

    /// A fatal error of this sink, as the session reports it (its name first).
    fn named(&self, e: SinkError) -> SinkError {
        e.context(format_args!("sink {:?}", self.name))
    }

    /// A write of the sink succeeded: its disk (if it has one) is not full.
    fn sink_disk_ok(&mut self) {
        if let Some(p) = self.disk_full_path.take() {
            crate::metrics::global().disk_ok(&p);
        }
    }

    /// Waits `delay` before the next attempt. `false`: the session ended.
    ///
    /// A detached sink is replayed from its checkpoint, so what it holds is
    /// only needed to find out when the destination is back: meanwhile it
    /// drops its queue, and the transactions of its batch stop counting
    /// against the memory budget once no other sink holds them.
    async fn wait_to_retry(&mut self, delay: Duration, batch: &mut [Arc<Transaction>]) -> bool {
        let retry_at = tokio::time::Instant::now() + delay;
        loop {
            let detached = self.state.detached.load(Ordering::Acquire);
            if detached {
                while self.rx.try_recv().is_ok() {}
                for t in batch.iter_mut() {
                    if let Some(t) = Arc::get_mut(t) {
                        t._budget = None;
                    }
                }
            }
            // Another sink may still hold some of them: look again soon.
            let holding = detached && batch.iter().any(|t| t._budget.is_some());
            tokio::select! {
                _ = tokio::time::sleep_until(retry_at) => return true,
                _ = self.state.on_detach.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)), if holding => {}
                _ = self.stop.wait_for(|s| *s) => return false,
            }
        }
    }

    /// One `apply`. While it runs, the task notes when it started (a batch
    /// that takes too long while the source waits for memory gets the sink
    /// detached) and, once detached, drops what is queued at once, so that
    /// the memory it holds is released even while the destination hangs.
    /// `None`: the session ended and the batch was still not applied
    /// [`STOP_GRACE`] later (a hung destination): it is abandoned, not
    /// checkpointed, and replayed next time.
    async fn apply_once(&mut self, batch: &[Arc<Transaction>]) -> Option<Result<(), SinkError>> {
        let (sink, rx, state, stop) = (&mut self.sink, &mut self.rx, &self.state, &mut self.stop);
        state.busy_since_ms.store(clock_ms(), Ordering::Release);
        let apply = sink.apply(batch);
        tokio::pin!(apply);
        let give_up = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(STOP_GRACE).await;
        };
        tokio::pin!(give_up);
        let res = loop {
            tokio::select! {
                r = &mut apply => break Some(r),
                _ = state.on_detach.notified() => {
                    while rx.try_recv().is_ok() {}
                }
                _ = &mut give_up => break None,
            }
        };
        state.busy_since_ms.store(0, Ordering::Release);
        if state.detached.load(Ordering::Acquire) {
            // Detached while the batch ran: drop what was queued meanwhile.
            while rx.try_recv().is_ok() {}
        }
        res
    }

    /// `Ok(true)`: applied. `Ok(false)`: the session ended while retrying.
    async fn apply_with_retry(
        &mut self,
        batch: &mut [Arc<Transaction>],
    ) -> Result<bool, SinkError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut attempt = 0u32;
        let mut failing_since: Option<std::time::Instant> = None;
        let metrics = crate::metrics::global().sink(&self.name);
        loop {
            let started = std::time::Instant::now();
            let Some(res) = self.apply_once(batch).await else {
                tracing::warn!(sink = %self.name, "session ended while a batch was still under way: abandoned, it will be replayed");
                return Ok(false);
            };
            match &res {
                Ok(()) => metrics.applied(batch, started.elapsed().as_secs_f64()),
                Err(e) => metrics.failed(e.message(), e.is_transient()),
            }
            match res {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(sink = %self.name, attempts = attempt + 1, "sink recovered");
                    }
                    self.state.failing.store(false, Ordering::Release);
                    self.sink_disk_ok();
                    return Ok(true);
                }
                Err(e) if !e.is_transient() => return Err(self.named(e)),
                Err(e) => {
                    if let Some(path) = e.disk_full() {
                        self.disk_full_path = Some(path.to_path_buf());
                    }
                    note_disk(&e);
                    let m = e.to_string();
                    attempt += 1;
                    self.state.failing.store(true, Ordering::Release);
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if let Some(max) = self.max_failure {
                        if since.elapsed() >= max {
                            return Err(SinkError::fatal(format!(
                                "sink {:?} has been failing for {} s (last error: {m}); it is configured to stop after max_failure_secs = {}. \
                                 Fix the destination and start pgferry again: it resumes from the sink's checkpoint",
                                self.name,
                                since.elapsed().as_secs(),
                                max.as_secs()
                            ))
                            .caused_by(e));
                        }
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(sink = %self.name, attempt, error = %m, retry_in_ms = delay.as_millis() as u64, "sink batch failed; retrying");
                    if !self.wait_to_retry(delay, batch).await {
                        tracing::warn!(sink = %self.name, "session ending while the sink is failing: its batch will be replayed");
                        return Ok(false);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    /// An in-memory sink: records applied end LSNs; fails while `broken` is
    /// set, and does not answer while `hung` is set.
    struct MemSink {
        applied: Arc<Mutex<Vec<Lsn>>>,
        broken: Arc<AtomicBool>,
        hung: Arc<AtomicBool>,
    }

    #[async_trait::async_trait]
    impl Sink for MemSink {
        async fn apply(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
            while self.hung.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if self.broken.load(Ordering::Acquire) {
                return Err(SinkError::transient("down"));
            }
            let mut a = self.applied.lock().unwrap();
            a.extend(batch.iter().map(|t| t.meta.end_lsn));
            Ok(())
        }

        /// A store that is down fails its close too.
        async fn close(&mut self) -> Result<(), SinkError> {
            if self.broken.load(Ordering::Acquire) {
                return Err(SinkError::transient("down"));
            }
            Ok(())
        }
    }

    fn txn(end: u64) -> Arc<Transaction> {
        Arc::new(txn_of(end, 0))
    }

    fn txn_of(end: u64, mem_bytes: usize) -> Transaction {
        Transaction {
            mem_bytes,
            ..crate::event::fixtures::txn(end as u32, end - 1, end, Vec::new())
        }
    }

    struct Harness {
        links: Vec<SinkLink>,
        applied: Vec<Arc<Mutex<Vec<Lsn>>>>,
        broken: Vec<Arc<AtomicBool>>,
        hung: Vec<Arc<AtomicBool>>,
        progress: Arc<Progress>,
        tasks: Vec<tokio::task::JoinHandle<Result<(), SinkError>>>,
        stop: tokio::sync::watch::Sender<bool>,
        _dir: tempfile::TempDir,
    }

    fn harness(n: usize, max_failure: Option<Duration>) -> Harness {
        harness_with(n, max_failure, Duration::from_secs(3600))
    }

    fn harness_with(n: usize, max_failure: Option<Duration>, slow_after: Duration) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path()).unwrap();
        let progress = Progress::new(&vec![Lsn::ZERO; n]);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut h = Harness {
            links: vec![],
            applied: vec![],
            broken: vec![],
            hung: vec![],
            progress: progress.clone(),
            tasks: vec![],
            stop,
            _dir: dir,
        };
        for i in 0..n {
            let (tx, rx) = mpsc::channel(4);
            let state = Arc::new(SinkState::default());
            let applied = Arc::new(Mutex::new(Vec::new()));
            let broken = Arc::new(AtomicBool::new(false));
            let hung = Arc::new(AtomicBool::new(false));
            h.links.push(SinkLink {
                name: format!("s{i}"),
                tx,
                state: state.clone(),
                slow_after,
                progress: progress.clone(),
            });
            let task = SinkTask {
                index: i,
                name: format!("s{i}"),
                sink: Box::new(MemSink {
                    applied: applied.clone(),
                    broken: broken.clone(),
                    hung: hung.clone(),
                }),
                rx,
                store: store.clone(),
                slot: "slot".into(),
                system_identifier: "1".into(),
                checkpoint: Lsn::ZERO,
                progress: progress.clone(),
                batch_max_events: 8,
                checkpoint_interval: Duration::from_millis(20),
                linger: None,
                state,
                max_failure,
                stop: stop_rx.clone(),
                loss: None,
                disk_full_path: None,
                slow_after,
            };
            h.tasks.push(tokio::spawn(task.run()));
            h.applied.push(applied);
            h.broken.push(broken);
            h.hung.push(hung);
        }
        h
    }

    #[tokio::test]
    async fn a_failing_sink_is_detached_while_the_others_flow_then_asks_to_rejoin() {
        let h = harness(2, None);
        h.broken[1].store(true, Ordering::Release);
        for end in 1..=200u64 {
            tokio::time::timeout(
                Duration::from_secs(10),
                fan_out(&h.links, Item::Txn(txn(end))),
            )
            .await
            .expect("a failing sink must not block the healthy one")
            .unwrap();
        }
        // The healthy sink got everything, in order; the broken one was detached.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.progress.sink(0) < Lsn(200) {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            *h.applied[0].lock().unwrap(),
            (1..=200).map(Lsn).collect::<Vec<_>>()
        );
        assert!(h.links[1].state.detached.load(Ordering::Acquire));
        assert!(h.applied[1].lock().unwrap().is_empty());
        // The flush position waits for the slowest sink: WAL is kept for it.
        assert_eq!(h.progress.confirmed(), Lsn::ZERO);
        // It recovers, drains what it holds, and asks for a replay.
        h.broken[1].store(false, Ordering::Release);
        tokio::time::timeout(Duration::from_secs(40), h.progress.rejoin.notified())
            .await
            .expect("the recovered sink asks to rejoin");
        let got = h.applied[1].lock().unwrap().clone();
        assert!(!got.is_empty() && got.len() < 200, "{got:?}");
        assert_eq!(got, (1..=got.len() as u64).map(Lsn).collect::<Vec<_>>());
        assert_eq!(h.progress.confirmed(), Lsn(got.len() as u64));
        drop(h.links);
        let _ = h.stop.send(true);
        for t in h.tasks {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_failing_sink_that_holds_the_memory_budget_is_detached_and_releases_it() {
        let h = harness(2, None);
        h.broken[1].store(true, Ordering::Release);
        // 8 KiB of budget, 3 KiB a transaction: the failing sink's batch and
        // queue hold the whole budget long before its queue (4) is full.
        let budget = Budget::new(8 * 1024);
        for end in 1..=200u64 {
            let mut t = txn_of(end, 3 * 1024);
            tokio::time::timeout(Duration::from_secs(10), async {
                budget.admit(&mut t, &h.links).await;
                fan_out(&h.links, Item::Txn(Arc::new(t))).await
            })
            .await
            .expect("a failing sink must not hold the budget from the healthy one")
            .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.progress.sink(0) < Lsn(200) {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            *h.applied[0].lock().unwrap(),
            (1..=200).map(Lsn).collect::<Vec<_>>()
        );
        assert!(h.links[1].state.detached.load(Ordering::Acquire));
        // The detached sink still holds its batch, but not its memory.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while budget.sem.available_permits() < 8 {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Once back, it applies that batch and asks for a replay.
        h.broken[1].store(false, Ordering::Release);
        tokio::time::timeout(Duration::from_secs(40), h.progress.rejoin.notified())
            .await
            .expect("the recovered sink asks to rejoin");
        let got = h.applied[1].lock().unwrap().clone();
        assert!(!got.is_empty() && got.len() < 200, "{got:?}");
        assert_eq!(got, (1..=got.len() as u64).map(Lsn).collect::<Vec<_>>());
        drop(h.links);
        let _ = h.stop.send(true);
        for t in h.tasks {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_hung_sink_is_detached_after_the_slow_bound_without_failing() {
        let slow = Duration::from_millis(300);
        let h = harness_with(2, None, slow);
        h.hung[1].store(true, Ordering::Release);
        let mut worst = Duration::ZERO;
        for end in 1..=200u64 {
            let started = std::time::Instant::now();
            fan_out(&h.links, Item::Txn(txn(end))).await.unwrap();
            worst = worst.max(started.elapsed());
        }
        // The healthy sink was held back once, for the bound, then never.
        assert!(worst >= slow && worst < slow * 3, "{worst:?}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.progress.sink(0) < Lsn(200) {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let s1 = &h.links[1].state;
        assert!(s1.detached.load(Ordering::Acquire) && !s1.failing.load(Ordering::Acquire));
        assert!(s1
            .detached_because()
            .unwrap()
            .contains("slow_sink_detach_ms"));
        // Its queue was dropped at once, while the batch still hangs.
        assert_eq!(h.links[1].tx.capacity(), h.links[1].tx.max_capacity());
        // Released, it finishes its batch and asks to be replayed.
        h.hung[1].store(false, Ordering::Release);
        tokio::time::timeout(Duration::from_secs(10), h.progress.rejoin.notified())
            .await
            .expect("the released sink asks to rejoin");
        assert!(h.progress.confirmed() < Lsn(200));
        drop(h.links);
        let _ = h.stop.send(true);
        for t in h.tasks {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_sink_hung_at_shutdown_is_abandoned_after_the_grace() {
        let h = harness(1, None);
        h.hung[0].store(true, Ordering::Release);
        fan_out(&h.links, Item::Txn(txn(1))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = h.stop.send(true);
        drop(h.links);
        let started = std::time::Instant::now();
        let mut tasks = h.tasks;
        tokio::time::timeout(STOP_GRACE * 2, tasks.pop().unwrap())
            .await
            .expect("gives up after the grace")
            .unwrap()
            .unwrap();
        assert!(started.elapsed() >= STOP_GRACE);
        assert_eq!(h.progress.confirmed(), Lsn::ZERO);
    }

    #[tokio::test]
    async fn a_sink_failing_past_its_bound_stops_with_a_clear_error() {
        let h = harness(1, Some(Duration::from_millis(300)));
        h.broken[0].store(true, Ordering::Release);
        fan_out(&h.links, Item::Txn(txn(1))).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), async {
            let mut tasks = h.tasks;
            tasks.pop().unwrap().await.unwrap()
        })
        .await
        .unwrap()
        .unwrap_err();
        assert!(!err.is_transient());
        let err = err.to_string();
        assert!(
            err.contains("has been failing") && err.contains("max_failure_secs"),
            "{err}"
        );
    }

    /// The session ends while the sink's store is down (the walsender was
    /// terminated, say): the sink gives up, its close fails, and the task
    /// still ends cleanly so that the next session replays (a failed close
    /// once made pgferry exit).
    #[tokio::test]
    async fn a_retrying_sink_gives_up_when_the_session_ends_without_checkpointing() {
        let h = harness(1, None);
        h.broken[0].store(true, Ordering::Release);
        fan_out(&h.links, Item::Txn(txn(1))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = h.stop.send(true);
        drop(h.links);
        let mut tasks = h.tasks;
        tokio::time::timeout(Duration::from_secs(5), tasks.pop().unwrap())
            .await
            .expect("stops promptly")
            .unwrap()
            .unwrap();
        assert_eq!(h.progress.confirmed(), Lsn::ZERO);
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        for (d, base) in delays.iter().zip([100u128, 200, 400, 800, 800, 800]) {
            assert!(*d >= base * 3 / 4 && *d <= base * 5 / 4, "{delays:?}");
        }
    }

    #[test]
    fn a_sink_found_slow_not_hung_gets_a_longer_bound_up_to_the_cap() {
        let name = "slow-bound-test-sink";
        let five = Duration::from_secs(5);
        assert_eq!(slow_bound(name, five), five);
        assert_eq!(grow_slow_bound(name, five), five * 2);
        assert_eq!(slow_bound(name, five), five * 2);
        // A larger configured value wins.
        assert_eq!(slow_bound(name, five * 4), five * 4);
        let mut b = five;
        for _ in 0..10 {
            b = grow_slow_bound(name, b);
        }
        assert_eq!(b, SLOW_BOUND_MAX);
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
