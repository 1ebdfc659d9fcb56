//! The JSONL sink's writer. All its file I/O (the writes, the `fsync`s, the
//! recovery of the file's tail, and the reads of spilled transactions it
//! encodes) runs on the blocking pool, never on the async executor: each
//! `apply`, `flush` or `close` hands the whole batch to one blocking task
//! (one hand-off per batch, none per event).
//!
//! Invariants:
//! - at most one blocking task works on the file at a time: the [`Writer`]
//!   moves into it and comes back with its result; a task the pipeline
//!   stopped waiting for (the session ended) is awaited by the next call,
//!   so two tasks never write the file at once;
//! - the counters of what the file holds move only once a write succeeded.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use super::JsonlConfig;
use crate::event::{LogicalMessage, SchemaTracker, Transaction};
use crate::lsn::Lsn;
use crate::sink::{Sink, SinkError, TableFilter};

enum Out {
    Stdout(std::io::Stdout),
    File(File),
}

/// Writes change events as JSON lines (see the module docs).
pub struct JsonlSink {
    /// `None` while a blocking task has it.
    writer: Option<Writer>,
    /// The blocking task that has the writer, if the call that started it
    /// was abandoned before it ended.
    pending: Option<tokio::task::JoinHandle<Done>>,
}

/// A blocking task's end: the writer, given back, and what it reports.
type Done = (Writer, Result<(), SinkError>);

/// The file (or stdout) and what it holds: everything a blocking task needs.
struct Writer {
    out: Out,
    /// The file (`-`: stdout), for messages.
    path: std::path::PathBuf,
    fsync: bool,
    filter: TableFilter,
    /// The newest transaction in the file and how many of its events it holds.
    last_commit: Lsn,
    last_count: u64,
    buf: Vec<u8>,
    /// A write failed: re-read the file's tail before writing again.
    needs_recovery: bool,
    /// The schema versions written (`op:"schema"` lines, not counted).
    schemas: SchemaTracker,
}

impl JsonlSink {
    /// Opens the file and recovers what it holds. Called once per session,
    /// while the sinks are built.
    pub fn open(cfg: &JsonlConfig) -> Result<JsonlSink, SinkError> {
        Ok(JsonlSink {
            writer: Some(Writer::open(cfg)?),
            pending: None,
        })
    }

    /// Runs `op` on the writer in a blocking task. A task left from an
    /// abandoned call is waited for first.
    async fn run(
        &mut self,
        op: impl FnOnce(&mut Writer) -> Result<(), SinkError> + Send + 'static,
    ) -> Result<(), SinkError> {
        if let Some(task) = self.pending.as_mut() {
            // The abandoned call's outcome: its batch is sent again anyway.
            let joined = task.await;
            self.pending = None;
            self.writer = Some(settled(joined)?.0);
        }
        let Some(mut w) = self.writer.take() else {
            return Err(SinkError::fatal(
                "the jsonl writer was lost in a failed task; start pgferry again",
            ));
        };
        let task = tokio::task::spawn_blocking(move || {
            let res = op(&mut w);
            (w, res)
        });
        // Should this call be abandoned, the next one waits for the task.
        let joined = self.pending.insert(task).await;
        self.pending = None;
        let (w, res) = settled(joined)?;
        self.writer = Some(w);
        res
    }
}

/// A blocking task's end; it panicked: fatal (the writer is gone with it).
fn settled(joined: Result<Done, tokio::task::JoinError>) -> Result<Done, SinkError> {
    joined.map_err(|e| {
        let m = format!("the jsonl writer task failed: {e}");
        SinkError::fatal(m).caused_by(e)
    })
}

impl Writer {
    fn open(cfg: &JsonlConfig) -> Result<Writer, SinkError> {
        let filter = TableFilter::new(cfg.tables.clone());
        if cfg.path.as_os_str() == "-" {
            return Ok(Writer {
                out: Out::Stdout(std::io::stdout()),
                path: cfg.path.clone(),
                fsync: false,
                filter,
                last_commit: Lsn::ZERO,
                last_count: 0,
                buf: Vec::new(),
                needs_recovery: false,
                schemas: SchemaTracker::default(),
            });
        }
        let fatal = |e: std::io::Error| {
            SinkError::fatal(format!(
                "sink {:?}: cannot open {}: {e}; check that the directory exists and is writable",
                cfg.name,
                cfg.path.display()
            ))
        };
        if let Some(parent) = cfg.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(fatal)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&cfg.path)
            .map_err(fatal)?;
        let (last_commit, last_count) = recover(&mut file).map_err(fatal)?;
        file.seek(SeekFrom::End(0)).map_err(fatal)?;
        Ok(Writer {
            out: Out::File(file),
            path: cfg.path.clone(),
            fsync: cfg.fsync,
            filter,
            last_commit,
            last_count,
            buf: Vec::with_capacity(1 << 20),
            needs_recovery: false,
            schemas: SchemaTracker::default(),
        })
    }

    /// Writes what is buffered (one write call).
    fn flush_buf(&mut self) -> Result<(), SinkError> {
        let stdout = matches!(self.out, Out::Stdout(_));
        write_out(&mut self.out, &mut self.buf).map_err(|e| write_err(&self.path, e, stdout))
    }

    /// Writes the batch. The counters of what the output holds move only
    /// once the write succeeded: a failed write never counts as written, so
    /// the retry (or the next start, from the checkpoint) writes it again.
    fn write_batch(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        let stdout = matches!(self.out, Out::Stdout(_));
        let (mut last_commit, mut last_count) = (self.last_commit, self.last_count);
        for txn in batch {
            let commit = txn.meta.commit_lsn;
            if commit < last_commit {
                continue;
            }
            let mut skip = if commit == last_commit { last_count } else { 0 };
            let mut written = 0u64;
            let (filter, buf, out) = (&self.filter, &mut self.buf, &mut self.out);
            let schemas = &mut self.schemas;
            let tail = txn.meta.json_tail();
            let mut ddls = txn
                .messages
                .iter()
                .filter(|m| m.prefix == DDL_PREFIX && ddl_accepted(filter, m))
                .peekable();
            txn.for_each_change(|c| {
                if !filter.accepts(&c.rel.qualified) {
                    return Ok(());
                }
                // DDL events at their place among the changes (counted). A
                // message's LSN is the *end* of its record (the start of the
                // next one), so it goes before a change at the same LSN.
                while let Some(m) = ddls.next_if(|m| m.lsn <= c.lsn) {
                    written += 1;
                    match skip {
                        0 => write_ddl(m, &tail, buf),
                        _ => skip -= 1,
                    }
                }
                written += 1;
                if skip > 0 {
                    skip -= 1;
                    return Ok(());
                }
                schemas.write_if_new(c, &tail, buf);
                c.write_json_with(&tail, buf);
                buf.push(b'\n');
                // Memory stays bounded for huge transactions: write as we go.
                if buf.len() >= 4 << 20 {
                    write_out(out, buf)?;
                }
                Ok(())
            })
            .map_err(|e| write_err(&self.path, e, stdout))?;
            for m in ddls {
                written += 1;
                match skip {
                    0 => write_ddl(m, &tail, &mut self.buf),
                    _ => skip -= 1,
                }
            }
            if written > 0 {
                if commit == last_commit {
                    last_count = last_count.max(written);
                } else {
                    last_commit = commit;
                    last_count = written;
                }
            }
        }
        self.flush_buf()?;
        self.last_commit = last_commit;
        self.last_count = last_count;
        Ok(())
    }
}

/// The prefix of DDL messages (see `sql/capture_ddl.sql`).
const DDL_PREFIX: &str = "pgferry.ddl";

/// Whether a DDL message names a table this sink takes.
fn ddl_accepted(filter: &TableFilter, m: &LogicalMessage) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.content) else {
        return false;
    };
    v["tables"].as_array().is_some_and(|t| {
        t.iter()
            .filter_map(|t| t.as_str())
            .any(|t| filter.accepts(t))
    })
}

/// One `op:"ddl"` line: the message's fields (`statement`, `tables`,
/// `tag`), its own `lsn`, and the transaction's fields.
fn write_ddl(m: &LogicalMessage, txn_tail: &[u8], out: &mut Vec<u8>) {
    let body = m
        .content
        .get(1..m.content.len().saturating_sub(1))
        .unwrap_or_default();
    out.extend_from_slice(b"{\"op\":\"ddl\",");
    out.extend_from_slice(body);
    out.extend_from_slice(b",\"lsn\":\"");
    out.extend_from_slice(m.lsn.to_string().as_bytes());
    out.extend_from_slice(txn_tail);
    out.push(b'\n');
}

/// A failed write: retried (a full disk as such, with its path), except
/// when stdout's reader is gone (a broken pipe): no retry can deliver to
/// it, and going on would drop the events.
fn write_err(path: &std::path::Path, e: std::io::Error, stdout: bool) -> SinkError {
    if stdout && e.kind() == std::io::ErrorKind::BrokenPipe {
        return SinkError::fatal(format!(
            "jsonl write to stdout failed: {e}: the program reading pgferry's output exited. \
             The events not written are not checkpointed: they are sent again when pgferry starts with a reader"
        ));
    }
    SinkError::io("jsonl write failed:", path, e)
}

/// Writes `buf`, and clears it once written.
fn write_out(out: &mut Out, buf: &mut Vec<u8>) -> std::io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    match out {
        Out::Stdout(s) => s.write_all(buf).and_then(|_| s.flush()),
        Out::File(f) => f.write_all(buf),
    }?;
    buf.clear();
    Ok(())
}

/// Cuts a torn last line; returns the newest transaction's `commit_lsn` in the
/// file and how many events of it are there.
fn recover(file: &mut File) -> std::io::Result<(Lsn, u64)> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok((Lsn::ZERO, 0));
    }
    // Read ever larger tails until the tail holds a line of an older
    // transaction (or the whole file).
    let mut window = 1u64 << 20;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::with_capacity((len - start) as usize);
        file.take(len - start).read_to_end(&mut tail)?;
        // Cut a torn last line.
        let complete = match tail.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if start == 0 => 0,
            None => {
                window *= 2;
                continue;
            }
        };
        if complete < tail.len() {
            file.set_len(start + complete as u64)?;
            file.sync_all()?;
            tail.truncate(complete);
        }
        // Whole lines only: skip a leading partial line unless at file start.
        let body: &[u8] = if start == 0 {
            &tail
        } else {
            match tail.iter().position(|&b| b == b'\n') {
                Some(i) => &tail[i + 1..],
                None => &[],
            }
        };
        let mut lines = body.split(|&b| b == b'\n').filter(|l| !l.is_empty()).rev();
        let Some(last) = lines.next() else {
            if start == 0 {
                return Ok((Lsn::ZERO, 0));
            }
            window *= 2;
            continue;
        };
        let newest = commit_lsn_of(last).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the last line has no commit_lsn: this file was not written by pgferry; move it away",
            )
        })?;
        let mut count = counted(last) as u64;
        let mut found_older = false;
        for line in lines {
            if commit_lsn_of(line) == Some(newest) {
                count += counted(line) as u64;
            } else {
                found_older = true;
                break;
            }
        }
        if found_older || start == 0 {
            return Ok((newest, count));
        }
        window *= 2;
    }
}

/// Whether a line counts as one of its transaction's events: `op:"schema"`
/// lines do not (they are derived from the changes, see
/// [`crate::event::schema`], and written again after a start).
fn counted(line: &[u8]) -> bool {
    !line.starts_with(b"{\"op\":\"schema\"")
}

/// The `commit_lsn` of one of our lines. Our own fields come last in a line,
/// after all row data, so the last occurrence is ours.
fn commit_lsn_of(line: &[u8]) -> Option<Lsn> {
    const KEY: &[u8] = b"\"commit_lsn\":\"";
    let at = memchr::memmem::rfind(line, KEY)? + KEY.len();
    let rest = line.get(at..)?;
    let end = memchr::memchr(b'"', rest)?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

impl Writer {
    /// `apply`'s work: after a failed write, re-reads the file's tail to
    /// learn what it holds, then writes the batch.
    fn apply(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        if self.needs_recovery {
            // A write failed part-way: the file, not our counters, says what
            // it holds now.
            if let Out::File(f) = &mut self.out {
                let (commit, count) = recover(f)
                    .and_then(|r| f.seek(SeekFrom::End(0)).map(|_| r))
                    .map_err(|e| {
                        let m = format!("jsonl recovery after a failed write: {e}");
                        SinkError::transient(m).caused_by(e)
                    })?;
                self.last_commit = commit;
                self.last_count = count;
            }
            // On stdout the counters still say what was written before the
            // failed batch: the batch is written again (at-least-once).
            self.buf.clear();
            // The schema lines noted may not be out: announce them again.
            self.schemas.reset();
            self.needs_recovery = false;
        }
        let res = self.write_batch(batch);
        if res.is_err() {
            self.needs_recovery = true;
        }
        res
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.flush_buf()?;
        if self.fsync {
            if let Out::File(f) = &self.out {
                f.sync_data()
                    .map_err(|e| SinkError::io("jsonl fsync failed:", &self.path, e))?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), SinkError> {
        self.flush_buf()?;
        if let Out::File(f) = &self.out {
            f.sync_all()
                .map_err(|e| SinkError::io("jsonl fsync failed:", &self.path, e))?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Sink for JsonlSink {
    async fn apply(&mut self, batch: &[Arc<Transaction>]) -> Result<(), SinkError> {
        let batch = batch.to_vec();
        self.run(move |w| w.apply(&batch)).await
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.run(Writer::flush).await
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        self.run(Writer::close).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(commit: &str, n: u32) -> String {
        format!("{{\"op\":\"insert\",\"after\":{{\"commit_lsn\":\"9/9\"}},\"lsn\":\"0/{n:X}\",\"commit_lsn\":\"{commit}\",\"xid\":1,\"commit_time\":\"x\"}}\n")
    }

    #[test]
    fn recovery_cuts_a_torn_line_and_counts_the_last_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.jsonl");
        let mut text = String::new();
        text += &line("0/10", 1);
        text += &line("0/20", 2);
        text += &line("0/20", 3);
        let whole = text.len() as u64;
        text += "{\"op\":\"ins"; // torn
        std::fs::write(&path, &text).unwrap();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert_eq!(recover(&mut f).unwrap(), (Lsn(0x20), 2));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
    }

    #[test]
    fn recovery_does_not_count_schema_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.jsonl");
        let schema = |commit: &str| {
            format!("{{\"op\":\"schema\",\"columns\":[],\"lsn\":\"0/1\",\"commit_lsn\":\"{commit}\",\"xid\":1,\"commit_time\":\"x\"}}\n")
        };
        let f = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap()
        };
        // Killed after a transaction's schema line, before its first change.
        std::fs::write(&path, line("0/10", 1) + &schema("0/20")).unwrap();
        assert_eq!(recover(&mut f()).unwrap(), (Lsn(0x20), 0));
        // A schema line in the middle of a transaction.
        let text = line("0/10", 1) + &line("0/20", 2) + &schema("0/20") + &line("0/20", 3);
        std::fs::write(&path, text).unwrap();
        assert_eq!(recover(&mut f()).unwrap(), (Lsn(0x20), 2));
    }

    #[test]
    fn recovery_of_an_empty_or_foreign_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.jsonl");
        std::fs::write(&path, "").unwrap();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert_eq!(recover(&mut f).unwrap(), (Lsn::ZERO, 0));
        std::fs::write(&path, "hello\n").unwrap();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert!(recover(&mut f).is_err());
    }

    #[test]
    fn recovery_reads_past_the_first_window_when_one_transaction_is_huge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.jsonl");
        let mut text = line("0/10", 1);
        let mut n = 0;
        while text.len() < 3 << 20 {
            text += &line("1/0", n);
            n += 1;
        }
        std::fs::write(&path, &text).unwrap();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert_eq!(recover(&mut f).unwrap(), (Lsn(1 << 32), n as u64));
    }

    fn txn(commit: u64, n: usize) -> Arc<Transaction> {
        use crate::event::fixtures::{insert, relation, row, txn};
        let rel = relation(1, "public", "t", &[("id", 23, true)]);
        let changes = (0..n)
            .map(|i| insert(&rel, commit - 100 + i as u64, row(&[Some(&i.to_string())])))
            .collect();
        Arc::new(txn(9, commit, commit + 8, changes))
    }

    fn ids(path: &std::path::Path) -> Vec<(String, u64)> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["op"] != "schema")
            .map(|v| {
                (
                    v["commit_lsn"].as_str().unwrap().to_string(),
                    v["key"]["id"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    fn file_config(path: &std::path::Path) -> JsonlConfig {
        JsonlConfig {
            name: "j".into(),
            path: path.to_path_buf(),
            fsync: true,
            max_failure_secs: None,
            tables: None,
        }
    }

    #[tokio::test]
    async fn ddl_events_sit_between_their_changes_and_count_on_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let cfg = file_config(&path);
        let mut t = Arc::try_unwrap(txn(1000, 2)).unwrap();
        // Changes at 900 and 901; the message ends where the second starts.
        t.messages.push(LogicalMessage {
            lsn: Lsn(901),
            prefix: DDL_PREFIX.into(),
            content: r#"{"statement":"ALTER TABLE t …","tables":["public.t"],"tag":"ALTER TABLE"}"#
                .into(),
        });
        t.messages.push(LogicalMessage {
            lsn: Lsn(902),
            prefix: DDL_PREFIX.into(),
            content: r#"{"statement":"x","tables":["public.other"],"tag":"ALTER TABLE"}"#.into(),
        });
        let t = Arc::new(t);
        let ops = || -> String {
            std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["op"]
                        .as_str()
                        .unwrap()[..1]
                        .to_string()
                })
                .collect()
        };
        let mut sink = JsonlSink::open(&cfg).unwrap();
        sink.apply(std::slice::from_ref(&t)).await.unwrap();
        sink.flush().await.unwrap();
        drop(sink);
        // Both go to a sink without a table filter, in LSN order.
        assert_eq!(ops(), "sidid");
        // Killed after the first DDL event: the replay writes the rest once.
        let text = std::fs::read_to_string(&path).unwrap();
        let keep: Vec<&str> = text.lines().take(3).collect();
        std::fs::write(&path, keep.join("\n") + "\n").unwrap();
        let mut sink = JsonlSink::open(&cfg).unwrap();
        sink.apply(std::slice::from_ref(&t)).await.unwrap();
        sink.flush().await.unwrap();
        assert_eq!(ops(), "sidsid");
    }

    #[tokio::test]
    async fn replays_after_a_crash_leave_no_gap_and_no_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let cfg = file_config(&path);
        let (a, b, c) = (txn(1000, 3), txn(2000, 4), txn(3000, 2));
        let mut sink = JsonlSink::open(&cfg).unwrap();
        sink.apply(&[a.clone(), b.clone()]).await.unwrap();
        sink.flush().await.unwrap();
        drop(sink);
        // A crash in the middle of transaction b: only two of its four lines
        // made it, the third is torn.
        let text = std::fs::read_to_string(&path).unwrap();
        // (The first line is the table's schema line.)
        let keep: Vec<&str> = text.lines().take(6).collect();
        std::fs::write(&path, format!("{}\n{{\"op\":\"ins", keep.join("\n"))).unwrap();
        // The server sends a, b and c again (the checkpoint was behind).
        let mut sink = JsonlSink::open(&cfg).unwrap();
        sink.apply(std::slice::from_ref(&a)).await.unwrap();
        sink.apply(&[b.clone(), c.clone()]).await.unwrap();
        sink.apply(&[c]).await.unwrap();
        sink.flush().await.unwrap();
        let got = ids(&path);
        let want: Vec<(String, u64)> = [("0/3E8", 3), ("0/7D0", 4), ("0/BB8", 2)]
            .iter()
            .flat_map(|(l, n)| (0..*n).map(move |i| (l.to_string(), i)))
            .collect();
        assert_eq!(got, want);
        // One schema line per start, before the first change written, and
        // not counted: the replay above skipped exactly the changes on file.
        let text = std::fs::read_to_string(&path).unwrap();
        let ops: Vec<&str> = text
            .lines()
            .map(|l| {
                if l.starts_with("{\"op\":\"schema\"") {
                    "s"
                } else {
                    "c"
                }
            })
            .collect();
        assert_eq!(ops.concat(), "scccccscccc");
    }
}
