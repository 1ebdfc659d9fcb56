//! Snapshot progress on disk: `<checkpoint.dir>/snapshot.json`.
//!
//! Invariants:
//! - a range's `after` (its lower bound, exclusive) only moves past a chunk
//!   once every sink has durably applied that chunk's high watermark, so a
//!   restart never skips rows, and re-reads at most the chunks that were in
//!   flight;
//! - a backfill request seen in the stream is written here before the
//!   transaction that carried it can be checkpointed, so a request is never
//!   lost; `last_request_lsn` makes a replayed request a no-op;
//! - a job that failed with a definite error (a bad `--where`, a missing
//!   column, no permission) moves to `failed`: it is not retried, and stays
//!   there (shown by `/readyz` and `pgferry backfill --list`) until the
//!   operator cancels it (`pgferry backfill --cancel ID`);
//! - the file is replaced atomically (temporary file, fsync, rename, fsync
//!   of the directory), like the checkpoints; the session's saves run on
//!   the blocking pool ([`StateFile::save_off_executor`]), never on the
//!   async executor.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// Set once the initial snapshot has been planned (its jobs may still run).
    #[serde(default)]
    pub initial_planned: bool,
    /// Position of the last backfill request acted upon.
    #[serde(default)]
    pub last_request_lsn: Option<String>,
    #[serde(default)]
    pub next_job: u64,
    #[serde(default)]
    pub jobs: Vec<Job>,
    /// The last finished jobs (newest last), for `pgferry` logs and checks.
    #[serde(default)]
    pub finished: Vec<Finished>,
    /// Jobs that failed for good, until cancelled.
    #[serde(default)]
    pub failed: Vec<FailedJob>,
}

/// A job that failed with an error no retry can fix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedJob {
    pub id: u64,
    pub table: String,
    #[serde(default)]
    pub filter: Option<String>,
    pub kind: String,
    pub error: String,
    /// Unix seconds.
    pub failed_at: u64,
    /// Rows delivered before it failed.
    #[serde(default)]
    pub rows_done: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Watermarked chunks in key order.
    Keyset,
    /// One copy in an exported snapshot (tables without a usable key).
    Copy,
}

/// One table to load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    /// `schema.table`.
    pub table: String,
    /// Extra SQL condition (backfill `--where`).
    #[serde(default)]
    pub filter: Option<String>,
    /// `initial`, `backfill` or `data-loss`.
    pub kind: String,
    /// Only these sinks get the rows (`None`: every sink). A sink whose
    /// store lost its data is reloaded alone (`on_data_loss = "backfill"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sinks: Option<Vec<String>>,
    pub method: Method,
    pub rows_estimate: u64,
    /// Rows durably delivered.
    pub rows_done: u64,
    /// Unix seconds when the job was planned.
    pub planned_at: u64,
    pub ranges: Vec<Range>,
}

impl Job {
    pub fn is_done(&self) -> bool {
        self.ranges.iter().all(|r| r.done)
    }
}

/// A key range `(after, upper]` of a job; `None` bounds are open.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Range {
    /// Text of the key columns of the last durably delivered row.
    pub after: Option<Vec<String>>,
    pub upper: Option<Vec<String>>,
    pub done: bool,
    /// Chunks durably delivered (for tests and logs).
    #[serde(default)]
    pub chunks_done: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finished {
    pub table: String,
    pub kind: String,
    pub rows: u64,
    pub seconds: u64,
}

impl State {
    pub fn last_request(&self) -> Lsn {
        self.last_request_lsn
            .as_deref()
            .and_then(|s| s.parse().ok())
            .unwrap_or(Lsn::ZERO)
    }

    /// Active (unfinished) jobs exist.
    pub fn active(&self) -> bool {
        self.jobs.iter().any(|j| !j.is_done())
    }

    /// Moves job `id` to `failed`; false when it is not an active job.
    pub fn fail(&mut self, id: u64, error: &str) -> bool {
        let Some(i) = self.jobs.iter().position(|j| j.id == id) else {
            return false;
        };
        let j = self.jobs.remove(i);
        self.failed.push(FailedJob {
            id: j.id,
            table: j.table,
            filter: j.filter,
            kind: j.kind,
            error: error.to_string(),
            failed_at: unix_now(),
            rows_done: j.rows_done,
        });
        true
    }

    /// Removes job `id`, active or failed; false when there is none.
    pub fn cancel(&mut self, id: u64) -> bool {
        let before = self.jobs.len() + self.failed.len();
        self.jobs.retain(|j| j.id != id);
        self.failed.retain(|j| j.id != id);
        self.jobs.len() + self.failed.len() != before
    }
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> StateFile {
        StateFile {
            path: dir.join("snapshot.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Result<State, StateError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| StateError::Damaged {
                path: self.path.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(StateError::Io {
                what: "reading",
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Replaces the file atomically with `s`. Blocking file I/O (an fsync):
    /// async callers use [`StateFile::save_off_executor`].
    pub fn save(&self, s: &State) -> Result<(), StateError> {
        let body = serde_json::to_vec_pretty(s)?;
        self.write(&body)
    }

    /// [`StateFile::save`] on the blocking pool: the state is serialized
    /// here (cheap), and the write and fsyncs, all of one save, are handed
    /// over at once.
    pub async fn save_off_executor(&self, s: &State) -> Result<(), StateError> {
        let body = serde_json::to_vec_pretty(s)?;
        let file = self.clone();
        tokio::task::spawn_blocking(move || file.write(&body))
            .await
            .unwrap_or_else(|e| {
                Err(StateError::Io {
                    what: "writing",
                    path: self.path.clone(),
                    source: std::io::Error::other(format!("the state writer died: {e}")),
                })
            })
    }

    fn write(&self, body: &[u8]) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            what: "writing",
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(body).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// Why `snapshot.json` could not be read or written; the cause is kept.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("snapshot state {} is damaged ({source}); remove it to forget unfinished snapshots and backfills", path.display())]
    Damaged {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding the snapshot state: {0}")]
    Encode(#[from] serde_json::Error),
    /// A full disk reads "disk full: …" (see [`crate::disk::full_message`]).
    #[error("{}", io_message(what, path, source))]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StateError {
    /// The disk (or quota) is full: retried, like a full spill directory.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StateError::Io { source, .. } if crate::disk::is_full(source))
    }
}

fn io_message(what: &str, path: &Path, e: &std::io::Error) -> String {
    if crate::disk::is_full(e) {
        crate::disk::full_message(what, path, e)
    } else {
        format!("{what} {}: {e}", path.display())
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path());
        assert!(f.load().unwrap().jobs.is_empty());
        let mut s = State::default();
        s.jobs.push(Job {
            id: 1,
            table: "public.t".into(),
            filter: Some("id > 5".into()),
            kind: "backfill".into(),
            sinks: Some(vec!["cache".into()]),
            method: Method::Keyset,
            rows_estimate: 10,
            rows_done: 3,
            planned_at: 1,
            ranges: vec![Range {
                after: Some(vec!["3".into()]),
                upper: None,
                done: false,
                chunks_done: 1,
            }],
        });
        f.save(&s).unwrap();
        let back = f.load().unwrap();
        assert_eq!(back.jobs[0].ranges[0].after, Some(vec!["3".to_string()]));
        assert!(back.active());
        std::fs::write(f.path(), b"{oops").unwrap();
        assert!(f.load().unwrap_err().to_string().contains("remove it"));
    }
}
