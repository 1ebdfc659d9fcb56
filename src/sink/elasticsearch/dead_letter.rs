//! Dead letters: the changes the cluster (or the sink) refuses for good.
//!
//! Invariants:
//! - A rejected change is either stopped on (`on_error = "stop"`: a
//!   [`SinkError::Fatal`] that says what to fix) or written to the
//!   dead-letter file as one JSON line: time, sink, index, id, action,
//!   status, the cluster's error and the change as a JSON event.
//! - Lines are buffered and made durable ([`DeadLetters::sync`], `fsync`)
//!   before the operations they belong to are acknowledged; the sink calls
//!   it at the end of every chunk. Lines of a chunk that failed are dropped
//!   ([`DeadLetters::discard`]) when the chunk is built again, so a retry
//!   does not write them twice; a replay after a restart can (dead letters
//!   are at-least-once).
//! - A write or `fsync` failure is transient: the batch is retried.
//! - The file I/O runs on the blocking pool, never on the async executor:
//!   a chunk's lines are handed over at once (one write and one `fsync`).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use serde_json::Value;

use super::client::describe_error;
use super::config::OnError;
use crate::sink::SinkError;

/// One refused operation, as the dead-letter line names it.
pub(super) struct Rejection<'a> {
    pub index: &'a str,
    /// `None` when no id could be made.
    pub id: Option<&'a str>,
    /// `index`, `delete` or `truncate`.
    pub action: &'a str,
    /// The item's HTTP status, when the cluster refused it.
    pub status: Option<u16>,
    pub error: &'a Value,
    /// The change as a JSON event (the JSONL format).
    pub event: &'a [u8],
}

/// The dead-letter file of one sink, and its unsynced lines.
pub(super) struct DeadLetters {
    sink: String,
    on_error: OnError,
    path: PathBuf,
    file: Option<File>,
    buf: Vec<u8>,
    /// Changes dead-lettered since start (for the log).
    pub count: u64,
}

impl DeadLetters {
    pub fn new(sink: &str, on_error: OnError, path: PathBuf) -> DeadLetters {
        DeadLetters {
            sink: sink.to_string(),
            on_error,
            path,
            file: None,
            buf: Vec::new(),
            count: 0,
        }
    }

    /// Drops the lines not yet synced (their chunk is built again).
    pub fn discard(&mut self) {
        self.buf.clear();
    }

    /// A change refused for good: a dead letter, or with `on_error = "stop"`
    /// a fatal error.
    pub fn reject(&mut self, r: Rejection<'_>) -> Result<(), SinkError> {
        let what = describe_error(r.error);
        if self.on_error == OnError::Stop {
            return Err(SinkError::fatal(format!(
                "sink {:?}: {} of document {:?} in index {:?} was rejected ({}{what}). on_error = \"stop\": fix the mapping or the data \
                 (or set on_error = \"dead_letter\"), then start pgferry again; it resumes from the sink's checkpoint",
                self.sink,
                r.action,
                r.id.unwrap_or("?"),
                r.index,
                r.status.map(|s| format!("{s} ")).unwrap_or_default(),
            )));
        }
        self.count += 1;
        crate::metrics::global().sink(&self.sink).dead_letter();
        tracing::warn!(
            sink = %self.sink, index = r.index, id = r.id.unwrap_or(""), action = r.action, status = r.status.unwrap_or(0), error = %what,
            dead_letters = self.count, path = %self.path.display(),
            "change rejected: written to the dead-letter file"
        );
        write_line(&self.sink, &r, &mut self.buf);
        Ok(())
    }

    /// Makes the dead letters written so far durable: the lines are
    /// appended and synced on the blocking pool, all at once. The lines are
    /// gone from the buffer either way: after a failure the batch is built
    /// again (and its lines with it).
    pub async fn sync(&mut self) -> Result<(), SinkError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let lines = std::mem::take(&mut self.buf);
        let (path, file) = (self.path.clone(), self.file.take());
        let (file, res) = tokio::task::spawn_blocking(move || append(&path, file, &lines))
            .await
            .map_err(|e| {
                let m = format!("the dead-letter writer failed: {e}");
                SinkError::transient(m).caused_by(e)
            })?;
        // Kept open for the next chunk (opened again when a write failed).
        self.file = file;
        res
    }
}

/// Appends `lines` to the file at `path` (opened, with its directory, when
/// `file` is `None`) and syncs it. Blocking. Returns the file when it is
/// still good to append to.
fn append(
    path: &std::path::Path,
    file: Option<File>,
    lines: &[u8],
) -> (Option<File>, Result<(), SinkError>) {
    let io = |e: std::io::Error| {
        let m = format!(
            "dead-letter file {}: {e}; check that its directory is writable",
            path.display()
        );
        SinkError::transient(m).caused_by(e)
    };
    let open = || {
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    };
    let mut f = match file.map_or_else(open, Ok) {
        Ok(f) => f,
        Err(e) => return (None, Err(io(e))),
    };
    match f.write_all(lines).and_then(|_| f.sync_data()) {
        Ok(()) => (Some(f), Ok(())),
        Err(e) => (None, Err(io(e))),
    }
}

/// One dead-letter line.
fn write_line(sink: &str, r: &Rejection<'_>, line: &mut Vec<u8>) {
    use crate::json_write::write_json_string;
    line.reserve(r.event.len() + 256);
    line.extend_from_slice(b"{\"time\":\"");
    crate::event::write_pg_timestamp(crate::event::pg_now(), line);
    line.extend_from_slice(b"\",\"sink\":");
    write_json_string(sink.as_bytes(), line);
    line.extend_from_slice(b",\"index\":");
    write_json_string(r.index.as_bytes(), line);
    line.extend_from_slice(b",\"id\":");
    match r.id {
        Some(id) => write_json_string(id.as_bytes(), line),
        None => line.extend_from_slice(b"null"),
    }
    line.extend_from_slice(b",\"action\":\"");
    line.extend_from_slice(r.action.as_bytes());
    line.extend_from_slice(b"\",\"status\":");
    match r.status {
        Some(s) => line.extend_from_slice(itoa::Buffer::new().format(s).as_bytes()),
        None => line.extend_from_slice(b"null"),
    }
    line.extend_from_slice(b",\"error\":");
    line.extend_from_slice(r.error.to_string().as_bytes());
    line.extend_from_slice(b",\"event\":");
    line.extend_from_slice(r.event);
    line.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn a_dead_letter_is_one_json_line_made_durable_by_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dead.jsonl");
        let mut d = DeadLetters::new("s", OnError::DeadLetter, path.clone());
        let error = json!({"type": "mapper_parsing_exception", "reason": "r"});
        let r = |id| Rejection {
            index: "i",
            id,
            action: "index",
            status: Some(400),
            error: &error,
            event: br#"{"op":"insert"}"#,
        };
        d.reject(r(Some("1"))).unwrap();
        d.discard();
        d.reject(r(None)).unwrap();
        d.sync().await.unwrap();
        assert!(d.sync().await.is_ok(), "nothing more to write");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "a discarded line is never written");
        assert_eq!(lines[0]["id"], Value::Null);
        assert_eq!(lines[0]["status"], 400);
        assert_eq!(lines[0]["event"], json!({"op": "insert"}));
        let mut stop = DeadLetters::new("s", OnError::Stop, path);
        match stop.reject(r(Some("1"))) {
            Err(SinkError::Fatal { message: m, .. }) => assert!(m.contains("on_error"), "{m}"),
            _ => panic!("on_error = stop stops"),
        }
    }
}
