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
            let client = rt.block_on(pg.client());
            let mut txn = make(w);
            rt.spawn(async move {
                let mut rng = XorShift::new(seed ^ (w * 7919 + 1));
                let mut txns = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    for sql in txn(&mut rng, txns) {
                        if let Err(e) = client.batch_execute(&sql).await {
                            assert!(on_error == OnError::Rollback, "{sql}: {e}");
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

/// Like [`spawn`], for tests that restart or stop the server: a session
/// whose statement fails rolls back, and when its connection is gone it
/// connects again (every 100 ms until the server is back). Only committed
/// transactions matter to the tests, which compare with the server's state.
pub fn spawn_reconnecting<F>(
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
        count, seed, pause, ..
    } = sessions;
    (0..count)
        .map(|w| {
            let stop = stop.clone();
            let url = pg.url();
            let mut txn = make(w);
            rt.spawn(async move {
                let mut rng = XorShift::new(seed ^ (w * 7919 + 1));
                let mut txns = 0u32;
                let mut client: Option<tokio_postgres::Client> = None;
                while !stop.load(Ordering::Relaxed) {
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                            Ok((c, conn)) => {
                                tokio::spawn(async move {
                                    let _ = conn.await;
                                });
                                Some(c)
                            }
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        };
                    }
                    let Some(c) = &client else { continue };
                    for sql in txn(&mut rng, txns) {
                        if c.batch_execute(&sql).await.is_err() {
                            let _ = c.batch_execute("ROLLBACK").await;
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

/// Stops the workload tasks and returns the transactions they ran.
pub fn stop(
    rt: &tokio::runtime::Runtime,
    stop: &AtomicBool,
    workers: Vec<tokio::task::JoinHandle<u32>>,
) -> u32 {
    stop.store(true, Ordering::Relaxed);
    workers.into_iter().map(|w| rt.block_on(w).unwrap()).sum()
}
