//! The `pgferry` command line. The only place that uses `anyhow`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use pgferry::config::Config;
use pgferry::flow::Backoff;
use pgferry::pg::SourceError;
use pgferry::source;

#[derive(Parser)]
#[command(
    name = "pgferry",
    version,
    about = "Postgres logical-replication CDC: pgoutput to sinks, checkpointed"
)]
struct Cli {
    /// Log format: `auto` is human-readable on a terminal and JSON otherwise.
    /// Default: the config file's `log.format`, else `auto`.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Stream changes to the configured sinks until SIGTERM or SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Stop cleanly once every sink has applied everything up to this
        /// LSN (X/Y). For benchmarks and scripts.
        #[arg(long)]
        until: Option<pgferry::lsn::Lsn>,
        /// Stop cleanly once the snapshot (initial or backfill) has been
        /// delivered to every sink. For benchmarks and scripts.
        #[arg(long)]
        exit_after_snapshot: bool,
    },
    /// Re-load a table (or the rows matching --where) into every sink while
    /// the stream keeps flowing. The request travels through the WAL, so the
    /// running pgferry picks it up (or the next one to start). Also lists
    /// the snapshot jobs (--list) and cancels one (--cancel ID), which
    /// acknowledges a failed one.
    Backfill {
        #[arg(long, short)]
        config: PathBuf,
        /// `schema.table`, one of source.tables.
        #[arg(long, required_unless_present_any = ["list", "cancel"], conflicts_with_all = ["list", "cancel"])]
        table: Option<String>,
        /// SQL condition on the table's columns, e.g. "updated_at > now() - interval '1 day'".
        #[arg(long = "where", requires = "table")]
        filter: Option<String>,
        /// List the snapshot jobs: running, failed (with the error) and recently finished.
        #[arg(long, conflicts_with = "cancel")]
        list: bool,
        /// Cancel a running or failed job (the ID that --list shows).
        #[arg(long, value_name = "ID")]
        cancel: Option<u64>,
    },
    /// Validate the config and the source server; print every check as OK or FAIL.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create (or with --print, print) what pgferry needs on the source as a
    /// least-privilege role: the user of source.url with LOGIN REPLICATION,
    /// SELECT on the tables, the publications and EXECUTE on
    /// pg_logical_emit_message; advice for tables without a replica
    /// identity. Idempotent.
    Setup {
        #[arg(long, short)]
        config: PathBuf,
        /// Print the SQL instead of running it.
        #[arg(long)]
        print: bool,
        /// A superuser's (or the tables' owner's) connection string, which
        /// runs the statements. Default: source.url.
        #[arg(long, env = "PGFERRY_ADMIN_URL", hide_env_values = true)]
        admin_url: Option<String>,
    },
    /// Inspect or drop the replication slot.
    Slot {
        #[command(subcommand)]
        action: SlotAction,
    },
}

#[derive(Subcommand)]
enum SlotAction {
    /// Show the slot's positions, retained WAL and the sinks' checkpoints.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Drop the slot (the server then frees the WAL it retained).
    Drop {
        #[arg(long, short)]
        config: PathBuf,
    },
}

impl Command {
    /// The config file the command reads.
    fn config_path(&self) -> &std::path::Path {
        match self {
            Command::Run { config, .. }
            | Command::Check { config }
            | Command::Backfill { config, .. } => config,
            Command::Setup { config, .. } => config,
            Command::Slot { action } => match action {
                SlotAction::Status { config } | SlotAction::Drop { config } => config,
            },
        }
    }
}

/// `--log-format`, else the config file's `log.format` (a config that does
/// not load is reported once logging is set up), else `auto`.
fn log_format(cli: &Cli) -> LogFormat {
    use pgferry::config::LogFormat as C;
    cli.log_format.unwrap_or_else(|| {
        match Config::load(cli.command.config_path()).map(|c| c.log.format) {
            Ok(C::Text) => LogFormat::Text,
            Ok(C::Json) => LogFormat::Json,
            Ok(C::Auto) | Err(_) => LogFormat::Auto,
        }
    })
}

/// `pipeline.worker_threads` of the config file (a config that does not
/// load is reported once the runtime runs), else 0 (one per CPU).
fn worker_threads(cli: &Cli) -> usize {
    Config::load(cli.command.config_path()).map_or(0, |c| c.pipeline.worker_threads)
}

/// Sets up logging to stderr. Colours only on a terminal: never ANSI codes
/// in a file or a pipe.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGFERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(terminal && !json);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(log_format(&cli));
    // One thread (`pipeline.worker_threads = 1`): the stream, the sinks and
    // the feedback task share this thread and hand each other work without
    // waking another one. 0 (default): one worker per CPU.
    let threads = worker_threads(&cli);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgferry: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            // Once, as a log line in the chosen format (JSON or text).
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    // Tasks still running (a sink hung on its destination) must not hold
    // the exit up.
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn dispatch(cmd: Command) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        Command::Run {
            config,
            until,
            exit_after_snapshot,
        } => {
            let opts = source::RunOptions {
                until,
                exit_after_snapshot,
            };
            run(&load(&config)?, &opts).await
        }
        Command::Backfill {
            config,
            table,
            filter,
            list,
            cancel,
        } => {
            let cfg = load(&config)?;
            if list {
                pgferry::snapshot::list_backfills(&cfg, &mut std::io::stdout())
                    .map_err(anyhow::Error::msg)?;
            } else if let Some(id) = cancel {
                let lsn = pgferry::snapshot::cancel_backfill(&cfg, id)
                    .await
                    .map_err(anyhow::Error::msg)?;
                println!(
                    "cancel of job {id} requested at {lsn}; the pgferry streaming slot {} applies it from the stream",
                    cfg.source.slot
                );
            } else if let Some(table) = table {
                let lsn = pgferry::snapshot::request_backfill(&cfg, &table, filter.as_deref())
                    .await
                    .map_err(anyhow::Error::msg)?;
                println!(
                    "backfill of {table} requested at {lsn}; the pgferry streaming slot {} picks it up from the stream (progress in its log and metrics, and in pgferry backfill --list)",
                    cfg.source.slot
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let cfg = load(&config)?;
            let ok = pgferry::check::run(&cfg, &mut std::io::stdout()).await;
            Ok(if ok {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
        Command::Setup {
            config,
            print,
            admin_url,
        } => {
            let cfg = load(&config)?;
            let admin = admin_url.unwrap_or_else(|| cfg.source.url.clone());
            pgferry::setup::run(&cfg, &admin, print, &mut std::io::stdout())
                .await
                .map_err(|e| anyhow::anyhow!("setup failed: {e}"))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Slot { action } => match action {
            SlotAction::Status { config } => {
                pgferry::check::slot_status(&load(&config)?, &mut std::io::stdout()).await?;
                Ok(std::process::ExitCode::SUCCESS)
            }
            SlotAction::Drop { config } => {
                pgferry::check::slot_drop(&load(&config)?, &mut std::io::stdout()).await?;
                Ok(std::process::ExitCode::SUCCESS)
            }
        },
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).with_context(|| format!("invalid configuration in {}", path.display()))
}

/// The first delay before reconnecting after a session ended, and the
/// longest: a restarted server is picked up within seconds of being back.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// While the slot is still held by the walsender of a connection the server
/// has not noticed gone (55006), it is asked again this often, for up to
/// the server's `wal_sender_timeout` plus [`SLOT_MARGIN`].
const SLOT_RETRY: Duration = Duration::from_millis(500);
const SLOT_MARGIN: Duration = Duration::from_secs(10);
/// The longest wait between two attempts while a disk is full.
const DISK_RETRY_MAX: Duration = Duration::from_secs(10);
/// Longest time from SIGTERM or SIGINT to the exit, whatever a sink does
/// (the batches not checkpointed by then are replayed at the next start).
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(8);

async fn run(config: &Config, opts: &source::RunOptions) -> anyhow::Result<std::process::ExitCode> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop_tx.send(true);
    });
    // Once per process: the metrics endpoint, heartbeat and slot watching.
    let mut observer = pgferry::observe::start(config)
        .await
        .map_err(anyhow::Error::msg)?;
    let metrics = pgferry::metrics::global();
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
    let mut disk_backoff = Backoff::new(Duration::from_secs(1), DISK_RETRY_MAX);
    let mut slot_busy_since: Option<std::time::Instant> = None;
    loop {
        let streamed_before = metrics.sessions_streamed.load(Ordering::Relaxed);
        let session = tokio::select! {
            r = source::run(config, stop_rx.clone(), opts) => r,
            msg = observer.fatal() => Err(SourceError::fatal(msg)),
            _ = shutdown_deadline(stop_rx.clone()) => {
                tracing::warn!(limit_secs = SHUTDOWN_LIMIT.as_secs(), "the session did not end in time after the signal: exiting now; what was not checkpointed is replayed at the next start");
                return Ok(std::process::ExitCode::SUCCESS);
            }
        };
        // The backoff starts over once a session has really streamed.
        if metrics.sessions_streamed.load(Ordering::Relaxed) > streamed_before {
            backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
            slot_busy_since = None;
            if !matches!(session, Err(SourceError::DiskFull { .. })) {
                disk_backoff = Backoff::new(Duration::from_secs(1), DISK_RETRY_MAX);
            }
        }
        let (delay, msg) = match session {
            Ok(()) => {
                tracing::info!("stopped cleanly");
                return Ok(std::process::ExitCode::SUCCESS);
            }
            // The message is complete (the fix included): no chain to add.
            Err(e) if !e.is_transient() => anyhow::bail!(e.to_string()),
            Err(SourceError::Rejoin) => {
                tracing::info!("restarting the session so a recovered sink catches up");
                continue;
            }
            Err(_) if *stop_rx.borrow() => return Ok(std::process::ExitCode::SUCCESS),
            Err(SourceError::SlotActive { message: msg, .. }) => {
                let since = *slot_busy_since.get_or_insert_with(std::time::Instant::now);
                let window =
                    source::wal_sender_timeout().unwrap_or(Duration::from_secs(60)) + SLOT_MARGIN;
                if since.elapsed() < window {
                    (SLOT_RETRY, msg)
                } else {
                    let msg = format!("{msg}; the slot has been in use for {} s: another process (another pgferry?) streams from it", since.elapsed().as_secs());
                    (backoff.next_delay(), msg)
                }
            }
            Err(SourceError::DiskFull { message, .. }) => (disk_backoff.next_delay(), message),
            Err(e) => {
                slot_busy_since = None;
                (backoff.next_delay(), e.to_string())
            }
        };
        tracing::warn!(error = %msg, retry_in_ms = delay.as_millis() as u64, "replication session ended; resuming from the checkpoints");
        let mut stop = stop_rx.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return Ok(std::process::ExitCode::SUCCESS),
            msg = observer.fatal() => anyhow::bail!(msg),
        }
    }
}

/// Resolves [`SHUTDOWN_LIMIT`] after the stop signal.
async fn shutdown_deadline(mut stop: watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(SHUTDOWN_LIMIT).await;
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
