//! Background workloads: sessions that run transactions as tasks on a
//! test's own tokio runtime until told to stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::pg::TestPg;
use super::rng::XorShift;

/// What a session does when a statement fails.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The test fails.
    Panic,
    /// Roll back and go on (deadlocks between sessions are expected).
    Rollback,
    /// Roll back and go on, and when the connection is gone, connect again
    /// (every 100 ms until the server is back): for tests that restart or
    /// stop the server. Only committed transactions matter to them, as they
    /// compare with the server's state.
    Reconnect,
}

/// A new connection to `url` (its driver on the current runtime).
async fn connect(url: &str) -> Option<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(c)
}

/// How many sessions, and how they behave.
pub struct Sessions {
    pub count: u32,
    /// Seed of the sessions' random sources (each session varies it).
    pub seed: u32,
    /// Sleep between two transactions of a session.
    pub pause: Duration,
    pub on_error: OnError,
}

/// Starts the sessions, each on its own connection. `make(session)`
/// gives each one its transaction builder, called with the session's random
/// source and the number of transactions run so far; the statements it
/// returns run in order, then the session sleeps `pause`. The tasks return
/// how many transactions they ran (see [`stop`]).
pub fn spawn<F>(
    pg: &TestPg,
    rt: &tokio::runtime::Runtime,
    stop: &Arc<AtomicBool>,
    sessions: Sessions,
    make: impl Fn(u32) -> F,
) -> Vec<tokio::task::JoinHandle<u32>>
where
    F: FnMut(&mut XorShift, u32) -> Vec<String> + Send + 'static,
{
    let Sessions {
        count,
        seed,
        pause,
        on_error,
    } = sessions;
    (0..count)
        .map(|w| {
            let stop = stop.clone();
            let url = pg.admin_url();
            let mut client = rt.block_on(pg.client());
            let mut txn = make(w);
            rt.spawn(async move {
                let mut rng = XorShift::new(seed ^ (w * 7919 + 1));
                let mut txns = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    if on_error == OnError::Reconnect && client.is_closed() {
                        match connect(&url).await {
                            Some(c) => client = c,
                            None => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        }
                    }
                    for sql in txn(&mut rng, txns) {
                        if let Err(e) = client.batch_execute(&sql).await {
                            assert!(on_error != OnError::Panic, "{sql}: {e}");
                            let _ = client.batch_execute("ROLLBACK").await;
                            break;
                        }
                    }
                    txns += 1;
                    tokio::time::sleep(pause).await;
                }
                txns
            })
        })
        .collect()
}

/// A one-worker runtime for the workload's tasks.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Stops the workload tasks and returns the transactions they ran.
pub fn stop(
    rt: &tokio::runtime::Runtime,
    stop: &AtomicBool,
    workers: Vec<tokio::task::JoinHandle<u32>>,
) -> u32 {
    stop.store(true, Ordering::Relaxed);
    workers.into_iter().map(|w| rt.block_on(w).unwrap()).sum()
}
