//! Background workloads run as tasks on a test's own tokio runtime.

use std::sync::atomic::{AtomicBool, Ordering};

/// Stops the workload tasks and returns the transactions they ran.
pub fn stop(
    rt: &tokio::runtime::Runtime,
    stop: &AtomicBool,
    workers: Vec<tokio::task::JoinHandle<u32>>,
) -> u32 {
    stop.store(true, Ordering::Relaxed);
    workers.into_iter().map(|w| rt.block_on(w).unwrap()).sum()
}
