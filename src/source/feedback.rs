//! The stream's two clocks: the feedback task that reports durable positions
//! to the server (standby status updates, on a timer, on request and when a
//! checkpoint moves), the read deadline that finds a hung path, and the end
//! of a session (closing the copy and draining the sink tasks, both bounded
//! in time so a hung path or a hung sink never holds the server back).

use super::*;

/// Consecutive keepalives that ask for a reply: the walsender asks again
/// at once after each answer only when it is shutting down and waits for
/// the client to confirm everything it sent (see proto-notes/replication.md).
#[derive(Default)]
pub(super) struct Pings {
    count: u32,
    last: Option<Instant>,
}

impl Pings {
    /// Notes one; true once they have come back to back long enough.
    pub(super) fn note(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(500))
        {
            self.count += 1;
        } else {
            self.count = 1;
        }
        self.last = Some(now);
        self.count >= 20
    }
}

/// The stream's read deadline: the server answers every status update
/// pgferry sends (they ask for a reply) and sends keepalives of its own, so
/// silence for the server's own `wal_sender_timeout` (at least two status
/// intervals) plus a margin means the path is hung.
pub(super) fn stream_deadline(
    wal_sender_timeout: Option<Duration>,
    interval: Duration,
) -> Duration {
    const MARGIN: Duration = Duration::from_secs(5);
    wal_sender_timeout
        .unwrap_or(Duration::from_secs(60))
        .max(interval * 2)
        + MARGIN
}

/// The session's SQL connection ended; `code` is the SQLSTATE the server
/// ended it with. A fast or immediate shutdown ends every SQL session
/// first (57P01, 57P02), before the walsender is asked to stop: closing the
/// replication session then means the server never waits for pgferry.
pub(super) fn server_shutting_down(code: Option<String>) -> Result<(), SourceError> {
    match code.as_deref() {
        Some(c @ ("57P01" | "57P02")) => Err(SourceError::transient(format!(
            "the server is shutting down (it ended pgferry's SQL connection with {c}): closing the replication session at once so that the server is not held up; resuming from the checkpoints"
        ))),
        other => {
            tracing::debug!(code = ?other, "the session's SQL connection ended");
            Ok(())
        }
    }
}

/// Stops the feedback task (a last status update and CopyDone, bounded in
/// time: the path may be hung).
pub(super) async fn close_stream(
    stop: &watch::Sender<bool>,
    feedback: Option<tokio::task::JoinHandle<()>>,
) {
    let Some(feedback) = feedback else { return };
    let _ = stop.send(true);
    let abort = feedback.abort_handle();
    if tokio::time::timeout(Duration::from_secs(1), feedback)
        .await
        .is_err()
    {
        abort.abort();
    }
}

/// Waits for the sink tasks (healthy sinks finish and checkpoint what they
/// hold; a failing or hung one gives up after [`crate::pipeline::STOP_GRACE`]),
/// but no longer than [`DRAIN_LIMIT`]. Returns a sink's fatal error.
pub(super) async fn drain(
    tasks: Vec<tokio::task::JoinHandle<Result<(), crate::sink::SinkError>>>,
) -> Option<crate::sink::SinkError> {
    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
    let mut sink_error = None;
    for t in tasks {
        let abort = t.abort_handle();
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => sink_error = Some(e),
            Ok(Err(e)) => {
                let m = format!("a sink task panicked: {e}");
                sink_error = Some(crate::sink::SinkError::fatal(m).caused_by(e))
            }
            Err(_) => {
                tracing::warn!("a sink did not finish in time at the end of the session: abandoned, its batch is replayed");
                abort.abort();
            }
        }
    }
    sink_error
}

/// Longest wait for the sinks at the end of a session.
pub(super) const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Sends standby status updates: on a timer, when the server asks, and when
/// a checkpoint moves; a last one at shutdown, followed by CopyDone.
///
/// Those sent on the timer ask for a reply, so the server answers each with
/// a keepalive: a healthy stream is never silent for longer than the
/// interval plus a round trip, which the read deadline relies on.
pub(super) async fn feedback_loop(
    mut w: WriteSide,
    progress: Arc<Progress>,
    interval: Duration,
    mut reply_rx: mpsc::Receiver<()>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent_flush = Lsn::ZERO;
    let mut buf = BytesMut::new();
    loop {
        let ask = tokio::select! {
            _ = tick.tick() => true,
            r = reply_rx.recv() => if r.is_none() { break } else { false },
            _ = progress.changed.notified() => {
                // Tell the server promptly, but not more than ~10 times a second.
                if progress.confirmed() == sent_flush { continue; }
                tokio::time::sleep(Duration::from_millis(100)).await;
                false
            }
            _ = stop.changed() => break,
        };
        let flush = progress.confirmed();
        let write = Lsn(progress.received.load(Ordering::Acquire)).max(flush);
        buf.clear();
        replication::write_standby_status_update(write, flush, flush, pg_now(), ask, &mut buf);
        if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
            return;
        }
        sent_flush = flush;
    }
    // Final report of what is durable, then end the copy.
    let flush = progress.confirmed();
    let write = Lsn(progress.received.load(Ordering::Acquire)).max(flush);
    buf.clear();
    replication::write_standby_status_update(write, flush, flush, pg_now(), false, &mut buf);
    postgres_protocol::message::frontend::copy_done(&mut buf);
    let _ = w.write_all(&buf).await;
    let _ = w.flush().await;
    tracing::info!(flush = %flush, "final position reported to the server");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_to_back_reply_requests_mean_the_server_waits_to_shut_down() {
        let mut p = Pings::default();
        for _ in 0..19 {
            assert!(!p.note());
        }
        assert!(p.note());
        // Apart, as the walsender asks while it runs: never.
        let mut p = Pings {
            count: 0,
            last: Some(Instant::now() - Duration::from_secs(3)),
        };
        assert!(!p.note());
        assert_eq!(p.count, 1);
    }

    #[test]
    fn the_stream_deadline_follows_wal_sender_timeout() {
        let s = Duration::from_secs;
        assert_eq!(
            stream_deadline(Some(s(5)), Duration::from_millis(2500)),
            s(10)
        );
        assert_eq!(stream_deadline(Some(s(60)), s(10)), s(65));
        assert_eq!(stream_deadline(None, s(10)), s(65));
        assert_eq!(stream_deadline(Some(s(1)), s(10)), s(25));
    }
}
