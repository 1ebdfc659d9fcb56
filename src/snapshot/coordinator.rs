//! The coordinator: a task that moves chunks into `snapshot.json` once
//! every sink has checkpointed their high watermark, logs progress, draws
//! the progress bar, and reports jobs that failed for good.
//!
//! Invariants:
//! - a chunk counts as done only once the confirmed (every-sink) position
//!   passed its high watermark: a crash before that reads it again;
//! - `snapshot.json` is written whole and atomically; a full disk is
//!   retried like a full spill directory, other write errors stop pgferry.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::state::{self, Job};
use super::{Completion, Shared};
use crate::flow::Progress;
use crate::pg::SourceError;

/// Saves the shared state (see [`Shared::persist`]); a full disk is
/// retried from the checkpoints, like a full spill directory, and any other
/// write error stops pgferry.
pub(super) async fn file_save(shared: &Shared) -> Result<(), SourceError> {
    shared.persist().await.map_err(|e| {
        let m = e.to_string();
        if e.is_disk_full() {
            crate::metrics::global().disk_full(shared.file.path(), &m);
            SourceError::disk_full(m).caused_by(e)
        } else {
            SourceError::fatal(format!("{m}; check that checkpoint.dir is writable")).caused_by(e)
        }
    })?;
    crate::metrics::global().disk_ok(shared.file.path());
    Ok(())
}

/// Logs a job that failed for good and shows it in the metrics and `/readyz`.
/// `now`: it failed just now (counted), rather than in an earlier run.
pub(super) fn report_failure(id: u64, table: &str, kind: &str, error: &str, now: bool) {
    if now {
        tracing::error!(job = id, table = %table, kind = %kind, error = %error,
            "snapshot job failed, and retrying cannot help: fix the cause and request it again; acknowledge with pgferry backfill --cancel {id}");
    }
    crate::metrics::global().snapshot_job_failed(id, table, error, now);
}

/// Reports the sinks whose reload (after a data loss) is now complete.
pub(super) fn repaired(done: &[Job], open: &[Job]) {
    for sink in done.iter().flat_map(|j| j.sinks.iter().flatten()) {
        let pending = open
            .iter()
            .any(|o| o.sinks.as_ref().is_some_and(|s| s.contains(sink)));
        if !pending {
            tracing::info!(sink = %sink, "the sink's tables are reloaded: its data loss is repaired");
            crate::metrics::global().data_restored(sink);
        }
    }
}

/// One open job's progress, for the metrics, the log and the bars.
struct Line {
    id: u64,
    table: String,
    done: u64,
    estimate: u64,
    /// Rows a second read this session.
    rate: f64,
}

/// Moves durable chunks into `snapshot.json`, logs progress, draws the bars.
pub(super) async fn coordinate(shared: Arc<Shared>, progress: Arc<Progress>) {
    let log_every = Duration::from_secs(shared.config.progress_log_secs);
    let mut bars = Bars::new(shared.config.progress_bar);
    let mut last_log = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let confirmed = progress.confirmed();
        let ready: Vec<Completion> = {
            let mut c = shared.completions.lock().unwrap_or_else(|p| p.into_inner());
            let (ready, rest): (Vec<_>, Vec<_>) = c.drain(..).partition(|x| x.end <= confirmed);
            *c = rest;
            ready
        };
        if !ready.is_empty() {
            absorb(&shared, &ready);
            if let Err(e) = shared.persist().await {
                tracing::error!(error = %e, "could not record snapshot progress; chunks will be read again after a restart");
            }
            progress.changed.notify_waiters();
        }
        let lines = open_jobs(&shared);
        for l in &lines {
            crate::metrics::global().snapshot_progress(&l.table, l.done, l.estimate, false);
        }
        if !lines.is_empty() && last_log.elapsed() >= log_every {
            last_log = Instant::now();
            for l in &lines {
                let eta = (l.rate > 0.0 && l.estimate > l.done)
                    .then(|| ((l.estimate - l.done) as f64 / l.rate).round() as u64);
                tracing::info!(table = %l.table, rows_done = l.done, rows_estimate = l.estimate,
                    rows_per_sec = l.rate.round() as u64, eta_secs = ?eta, "snapshot progress");
            }
        }
        if let Some(b) = bars.as_mut() {
            b.show(&lines);
        }
    }
}

/// Records the chunks every sink has checkpointed: their ranges move on,
/// and finished jobs leave the state (logged, kept in `finished`); the
/// caller saves it.
fn absorb(shared: &Shared, ready: &[Completion]) {
    // Under the lock throughout: the stream side and the workers change
    // the state too (requests, cancels, failures).
    let mut st = shared.lock_state();
    for c in ready {
        let Some(j) = st.jobs.iter_mut().find(|j| j.id == c.job) else {
            continue;
        };
        j.rows_done += c.rows;
        if let Some(r) = j.ranges.get_mut(c.range) {
            if c.after.is_some() {
                r.after = c.after.clone();
            }
            r.chunks_done += 1;
            r.done |= c.range_done;
        }
    }
    let (done, open): (Vec<Job>, Vec<Job>) = st.jobs.drain(..).partition(|j| j.is_done());
    st.jobs = open;
    repaired(&done, &st.jobs);
    for j in done {
        let secs = state::unix_now().saturating_sub(j.planned_at);
        tracing::info!(table = %j.table, kind = %j.kind, rows = j.rows_done, seconds = secs, "snapshot of table finished");
        crate::metrics::global().snapshot_progress(&j.table, j.rows_done, j.rows_estimate, true);
        st.finished.push(state::Finished {
            table: j.table.clone(),
            kind: j.kind.clone(),
            rows: j.rows_done,
            seconds: secs,
        });
        if st.finished.len() > 50 {
            st.finished.remove(0);
        }
    }
}

/// The open jobs: rows durably done, or read this session when more.
fn open_jobs(shared: &Shared) -> Vec<Line> {
    let jobs = shared.lock_state().jobs.clone();
    let live = shared
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    jobs.iter()
        .map(|j| {
            let l = live.get(&j.id).cloned().unwrap_or_default();
            let rate = l
                .since
                .map(|s| l.rows_read as f64 / s.elapsed().as_secs_f64().max(0.001))
                .unwrap_or(0.0);
            Line {
                id: j.id,
                table: j.table.clone(),
                done: j.rows_done.max(l.rows_read),
                estimate: j.rows_estimate,
                rate,
            }
        })
        .collect()
}

/// One progress bar per open job (indicatif), when `snapshot.progress_bar`
/// is on and stderr is a terminal.
struct Bars {
    multi: MultiProgress,
    bars: HashMap<u64, ProgressBar>,
    style: ProgressStyle,
}

impl Bars {
    fn new(on: bool) -> Option<Bars> {
        if !on || !std::io::stderr().is_terminal() {
            return None;
        }
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {percent:>3}% {pos}/{len} rows {msg} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("#>-");
        Some(Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: HashMap::new(),
            style,
        })
    }

    fn show(&mut self, lines: &[Line]) {
        self.bars.retain(|id, b| {
            let open = lines.iter().any(|l| l.id == *id);
            if !open {
                b.finish_and_clear();
            }
            open
        });
        for l in lines {
            let b = self.bars.entry(l.id).or_insert_with(|| {
                let b = self.multi.add(ProgressBar::new(l.estimate));
                b.set_style(self.style.clone());
                b.set_prefix(l.table.clone());
                b
            });
            b.set_length(l.estimate.max(l.done));
            b.set_position(l.done);
            b.set_message(format!("{:.0} rows/s", l.rate));
        }
    }
}
