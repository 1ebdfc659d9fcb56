//! The coordinator: a task that moves chunks into `snapshot.json` once
//! every sink has checkpointed their high watermark, logs progress, draws
//! the progress bar, and reports jobs that failed for good.
//!
//! Invariants:
//! - a chunk counts as done only once the confirmed (every-sink) position
//!   passed its high watermark: a crash before that reads it again;
//! - `snapshot.json` is written whole and atomically; a full disk is
//!   retried like a full spill directory, other write errors stop pgferry.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::{self, Job, State};
use super::{Completion, Shared};
use crate::flow::Progress;
use crate::pg::SourceError;

pub(super) fn file_save(shared: &Shared, st: &State) -> Result<(), SourceError> {
    crate::flow::set_snapshot_open(!st.jobs.is_empty());
    shared.save(st).map_err(|e| {
        if e.starts_with("disk full") {
            // Retried from the checkpoints, like a full spill directory.
            crate::metrics::global().disk_full(shared.file.path(), &e);
            SourceError::DiskFull(e)
        } else {
            SourceError::Fatal(format!("{e}; check that checkpoint.dir is writable"))
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

/// Moves durable chunks into `snapshot.json`, logs progress, draws the bar.
pub(super) async fn coordinate(shared: Arc<Shared>, progress: Arc<Progress>) {
    let log_every = Duration::from_secs(shared.config.progress_log_secs);
    let bar = shared.config.progress_bar && std::io::stderr().is_terminal();
    let mut last_log = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(if bar { 250 } else { 200 }));
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
            // Under the lock throughout: the stream side and the workers
            // change the state too (requests, cancels, failures).
            let mut st = shared.lock_state();
            for c in &ready {
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
                crate::metrics::global().snapshot_progress(
                    &j.table,
                    j.rows_done,
                    j.rows_estimate,
                    true,
                );
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
            if let Err(e) = shared.save(&st) {
                tracing::error!(error = %e, "could not record snapshot progress; chunks will be read again after a restart");
            }
            drop(st);
            progress.changed.notify_waiters();
        }
        let st = shared.lock_state().clone();
        if st.jobs.is_empty() {
            if bar {
                eprint!("\r\x1b[K");
            }
            continue;
        }
        let live = shared
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let lines: Vec<(String, u64, u64, f64)> = st
            .jobs
            .iter()
            .map(|j| {
                let l = live.get(&j.id).cloned().unwrap_or_default();
                let rate = l
                    .since
                    .map(|s| l.rows_read as f64 / s.elapsed().as_secs_f64().max(0.001))
                    .unwrap_or(0.0);
                (
                    j.table.clone(),
                    j.rows_done.max(l.rows_read),
                    j.rows_estimate,
                    rate,
                )
            })
            .collect();
        for (table, done, est, _) in &lines {
            crate::metrics::global().snapshot_progress(table, *done, *est, false);
        }
        if last_log.elapsed() >= log_every {
            last_log = Instant::now();
            for (table, done, est, rate) in &lines {
                let eta = if *rate > 0.0 && est > done {
                    Some(((est - done) as f64 / rate).round() as u64)
                } else {
                    None
                };
                tracing::info!(table = %table, rows_done = done, rows_estimate = est, rows_per_sec = rate.round() as u64, eta_secs = ?eta, "snapshot progress");
            }
        }
        if bar {
            let (table, done, est, rate) = &lines[0];
            let frac = if *est > 0 {
                (*done as f64 / *est as f64).min(1.0)
            } else {
                0.0
            };
            let filled = (frac * 30.0) as usize;
            eprint!(
                "\r\x1b[K{table} [{}{}] {:>3}% {done}/{est} rows {:.0} rows/s{}",
                "#".repeat(filled),
                "-".repeat(30 - filled),
                (frac * 100.0) as u32,
                rate,
                if lines.len() > 1 {
                    format!(" (+{} tables)", lines.len() - 1)
                } else {
                    String::new()
                }
            );
        }
    }
}
