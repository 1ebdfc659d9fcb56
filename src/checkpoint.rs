//! Per-sink checkpoints, persisted atomically.
//!
//! A checkpoint is the `end_lsn` of the last transaction a sink reported as
//! durably applied (or a later idle position, when every received commit was
//! applied). It is written to `<dir>/<sink>.checkpoint.json` through a
//! temporary file, `fsync`, `rename` and an `fsync` of the directory, so a
//! crash leaves either the old or the new checkpoint, never a torn one.
//!
//! Restart safety rests on one rule: a checkpoint is written only after the
//! sink's data is durable, and Postgres is told (as the flush position) only
//! the minimum checkpoint across all sinks. Restarting from a sink's
//! checkpoint therefore never loses a transaction; transactions after it may
//! be sent again, and each sink skips those at or below its own checkpoint.
//!
//! The file also records the slot and the server's system identifier, so a
//! checkpoint is never applied to a different cluster or slot by mistake.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;

/// What is stored for one sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub sink: String,
    pub slot: String,
    pub system_identifier: String,
    /// Every transaction with `end_lsn <= lsn` is durably applied by the sink.
    pub lsn: Lsn,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint file {path} is corrupt ({message}); restore it from a backup, or remove it to start that sink from the slot's position")]
    Corrupt { path: PathBuf, message: String },
}

/// The checkpoint directory.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
}

impl CheckpointStore {
    pub fn open(dir: &Path) -> Result<CheckpointStore, CheckpointError> {
        std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(CheckpointStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, sink: &str) -> PathBuf {
        self.dir.join(format!("{sink}.checkpoint.json"))
    }

    /// The file of `sink`'s checkpoint (errors of [`Self::save`] name it).
    pub fn path_of(&self, sink: &str) -> PathBuf {
        self.path(sink)
    }

    /// The sink's checkpoint, or `None` if it never checkpointed.
    pub fn load(&self, sink: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        let path = self.path(sink);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CheckpointError::Io { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| CheckpointError::Corrupt {
                path,
                message: e.to_string(),
            })
    }

    /// Durably replaces the sink's checkpoint.
    pub fn save(&self, cp: &Checkpoint) -> Result<(), CheckpointError> {
        let path = self.path(&cp.sink);
        let tmp = self.dir.join(format!(".{}.checkpoint.tmp", cp.sink));
        let io = |source| CheckpointError::Io {
            path: path.clone(),
            source,
        };
        let mut body = serde_json::to_vec_pretty(cp).map_err(|e| io(e.into()))?;
        body.push(b'\n');
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    /// [`Self::save`] on tokio's blocking pool: its two `fsync`s can take
    /// long on a busy disk and must not stall the async workers that carry
    /// the stream and the other sinks.
    pub async fn save_off_executor(&self, cp: &Checkpoint) -> Result<(), CheckpointError> {
        let (store, owned) = (self.clone(), cp.clone());
        tokio::task::spawn_blocking(move || store.save(&owned))
            .await
            .unwrap_or_else(|e| {
                Err(CheckpointError::Io {
                    path: self.path(&cp.sink),
                    source: std::io::Error::other(format!("the checkpoint writer died: {e}")),
                })
            })
    }

    /// Removes a sink's checkpoint (used when the slot is dropped on purpose).
    pub fn remove(&self, sink: &str) -> Result<(), CheckpointError> {
        let path = self.path(sink);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CheckpointError::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_and_overwrites_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path()).unwrap();
        assert_eq!(store.load("a").unwrap(), None);
        let mut cp = Checkpoint {
            sink: "a".into(),
            slot: "s".into(),
            system_identifier: "1".into(),
            lsn: Lsn(42),
        };
        store.save(&cp).unwrap();
        cp.lsn = Lsn(43);
        store.save(&cp).unwrap();
        assert_eq!(store.load("a").unwrap(), Some(cp));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["a.checkpoint.json".to_string()]);
    }

    #[test]
    fn a_corrupt_file_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.checkpoint.json"), "{not json").unwrap();
        let store = CheckpointStore::open(dir.path()).unwrap();
        let e = store.load("a").unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("remove it"), "{e}");
    }
}
