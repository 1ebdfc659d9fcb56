//! Building the sinks of a session: each sink, its task and the link the
//! stream feeds it through. A sink that cannot be built stops pgferry with
//! its own message; sinks with a checkpoint check their store first.

use super::*;
use crate::sink::SinkError;

/// A sink that failed for good (or could not be built) ends the session
/// with its message; the sink's error is kept as the cause.
pub(super) fn sink_fatal(e: SinkError) -> SourceError {
    fatal(e.to_string()).caused_by(e)
}

/// The sink tasks of a session, and their ends.
pub(super) struct Sinks {
    pub(super) senders: Vec<SinkLink>,
    pub(super) tasks: Vec<tokio::task::JoinHandle<Result<(), SinkError>>>,
    pub(super) stop: watch::Sender<bool>,
    pub(super) loss_rx: mpsc::UnboundedReceiver<DataLoss>,
}

/// Builds every sink and starts its task; the sinks with a checkpoint
/// check first that their store still holds pgferry's state.
pub(super) async fn start_sinks(
    config: &Config,
    p: &Prepared,
    starts: &[Lsn],
    progress: &Arc<Progress>,
) -> Result<Sinks, SourceError> {
    let s = &config.source;
    let (stop, stop_rx) = watch::channel(false);
    let (loss_tx, loss_rx) = mpsc::unbounded_channel();
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    let owner = crate::sink::StreamOwner {
        system_identifier: p.system.system_id.clone(),
        database: p.system.dbname.clone().unwrap_or_default(),
        slot: s.slot.clone(),
    };
    let row_source: Arc<dyn crate::sink::rows::RowSource> = Arc::new(rows::PgRows::new(
        &config.source.url,
        &config.source.network,
    ));
    for (i, sc) in config.sinks.iter().enumerate() {
        let sink = crate::sink::build(sc, &owner, row_source.clone())
            .await
            .map_err(sink_fatal)?;
        let (tx, rx) = mpsc::channel(64);
        let state = Arc::new(SinkState::default());
        let slow_after = crate::pipeline::slow_bound(
            sc.name(),
            Duration::from_millis(config.pipeline.slow_sink_detach_ms),
        );
        senders.push(SinkLink {
            name: sc.name().to_string(),
            tx,
            state: state.clone(),
            slow_after,
            progress: progress.clone(),
        });
        let task = SinkTask {
            index: i,
            name: sc.name().to_string(),
            sink,
            rx,
            store: p.store.clone(),
            slot: s.slot.clone(),
            system_identifier: p.system.system_id.clone(),
            checkpoint: starts[i],
            progress: progress.clone(),
            batch_max_events: config.pipeline.batch_max_events,
            checkpoint_interval: Duration::from_millis(config.pipeline.checkpoint_interval_ms)
                .max(sc.checkpoint_interval().unwrap_or_default()),
            linger: sc.linger(),
            state,
            max_failure: sc.max_failure_secs().map(Duration::from_secs),
            stop: stop_rx.clone(),
            loss: p.checkpoints[i].is_some().then(|| loss_tx.clone()),
            disk_full_path: None,
            slow_after,
        };
        tasks.push(tokio::spawn(task.run()));
    }

    Ok(Sinks {
        senders,
        tasks,
        stop,
        loss_rx,
    })
}
