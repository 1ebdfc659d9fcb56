//! The merger: the stream side of the watermark protocol (see the module
//! docs of [`super`]). It sees every transaction the stream delivers, opens
//! a chunk's window at its low watermark, replays the window's changes onto
//! the chunk's rows, and turns them into `read` events of the high
//! watermark's transaction.
//!
//! Invariants:
//! - a window's rows become read events exactly at their high watermark,
//!   in stream order, so sinks see them where the read belongs;
//! - a chunk whose read snapshot misses a transaction committed before its
//!   low watermark is refused and read again, never trusted;
//! - an exported-snapshot copy is delivered as one transaction at its
//!   consistent point, after everything that commits before it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::oneshot;

use super::merge::Window;
use super::{
    ChunkData, Refused, Registered, Request, Shared, BACKFILL_PREFIX, RECENT_XIDS, WATERMARK_PREFIX,
};
use crate::event::{Changes, RelationInfo, Transaction, TxnMeta};
use crate::lsn::Lsn;
use crate::pg::SourceError;
use crate::spill::SpillReader;

/// An exported-snapshot copy waiting for the stream to reach its point.
pub(super) struct PendingCopy {
    point: Lsn,
    data: oneshot::Receiver<(SpillReader, u64)>,
    done: oneshot::Sender<Result<Lsn, Refused>>,
    only: Option<Vec<String>>,
}

/// A chunk whose low watermark the stream passed.
pub(super) struct OpenWindow {
    id: String,
    state: WinState,
    done: oneshot::Sender<Result<Lsn, Refused>>,
    /// The job's sinks (`None`: all).
    only: Option<Vec<String>>,
}

pub(super) enum WinState {
    /// The worker is still reading: the window's changes to the table are
    /// kept (copies, outside the memory budget, so that they can never hold
    /// the budget the stream waits for) and replayed when the rows come.
    /// The stream does not wait. Past `max_buffer` bytes the chunk is given
    /// up and read again, so memory stays bounded.
    Pending {
        oid: u32,
        rows: oneshot::Receiver<ChunkData>,
        /// Commit sequence number at the low watermark.
        low_seq: u64,
        buffered: Vec<crate::event::Change>,
        bytes: usize,
        overflow: bool,
    },
    Active(Window),
}

/// The stream side.
pub(super) struct Merger {
    pub(super) shared: Arc<Shared>,
    pub(super) open: Vec<OpenWindow>,
    pub(super) copies: Vec<PendingCopy>,
    /// Commit sequence numbers of recently committed xids (oldest first).
    pub(super) recent: VecDeque<u32>,
    pub(super) recent_set: HashMap<u32, u64>,
    pub(super) seq: u64,
    /// Bytes of changes a pending window may keep before its chunk is read again.
    pub(super) max_buffer: usize,
    /// Highest end position handed to the sinks.
    pub(super) delivered: Lsn,
    /// End positions of transactions that carry the rows of a job for some
    /// sinks only, with those sinks (see [`Snapshots::only_for`]).
    pub(super) targets: HashMap<Lsn, Vec<String>>,
}

impl Merger {
    pub(super) fn remember(&mut self, xid: u32) {
        self.seq += 1;
        self.recent.push_back(xid);
        self.recent_set.insert(xid, self.seq);
        if self.recent.len() > RECENT_XIDS {
            if let Some(old) = self.recent.pop_front() {
                if self
                    .recent_set
                    .get(&old)
                    .is_some_and(|s| *s + RECENT_XIDS as u64 <= self.seq)
                {
                    self.recent_set.remove(&old);
                }
            }
        }
    }

    /// Turns a pending window active once its rows are in: checks the read's
    /// snapshot, then replays the transactions that committed since the low
    /// watermark. `None`: the chunk was refused or its worker went away.
    pub(super) fn activate(&mut self, w: OpenWindow, data: ChunkData) -> Option<OpenWindow> {
        let WinState::Pending {
            low_seq,
            buffered,
            overflow,
            ..
        } = w.state
        else {
            return Some(w);
        };
        if overflow {
            tracing::debug!(chunk = %w.id, "too many changes to the table while the chunk was read: reading it again");
            let _ = w.done.send(Err(Refused::Race));
            return None;
        }
        let raced = data
            .xip
            .iter()
            .find(|x| self.recent_set.get(x).is_some_and(|s| *s <= low_seq))
            .copied();
        if let Some(x) = raced {
            tracing::debug!(chunk = %w.id, xid = x, "a transaction committed before the low watermark was invisible to the read: reading the chunk again");
            let _ = w.done.send(Err(Refused::Race));
            return None;
        }
        let mut window = Window::new(
            w.id.clone(),
            data.info.rel.clone(),
            &data.info.key_cols,
            data.rows,
        );
        for c in &buffered {
            window.apply(c);
        }
        Some(OpenWindow {
            id: w.id,
            state: WinState::Active(window),
            done: w.done,
            only: w.only,
        })
    }

    /// Activates the pending windows whose rows arrived.
    pub(super) fn poll_pending(&mut self) {
        let open = std::mem::take(&mut self.open);
        for mut w in open {
            let got = match &mut w.state {
                WinState::Pending { rows, .. } => match rows.try_recv() {
                    Ok(d) => Some(Some(d)),
                    Err(oneshot::error::TryRecvError::Empty) => None,
                    Err(oneshot::error::TryRecvError::Closed) => Some(None),
                },
                WinState::Active(_) => None,
            };
            match got {
                None => self.open.push(w),
                Some(None) => {}
                Some(Some(d)) => {
                    if let Some(w) = self.activate(w, d) {
                        self.open.push(w);
                    }
                }
            }
        }
    }

    /// Keeps the changes of a delivered transaction that the windows still
    /// waiting for rows will need.
    pub(super) fn buffer(&mut self, txn: &Transaction) -> Result<(), SourceError> {
        if txn.is_empty()
            || !self
                .open
                .iter()
                .any(|w| matches!(w.state, WinState::Pending { .. }))
        {
            return Ok(());
        }
        let max = self.max_buffer;
        let open = &mut self.open;
        txn.for_each_change(|c| {
            if c.op == crate::event::Op::Read {
                return Ok(());
            }
            for w in open.iter_mut() {
                if let WinState::Pending {
                    oid,
                    buffered,
                    bytes,
                    overflow,
                    ..
                } = &mut w.state
                {
                    if *oid != c.rel.oid || *overflow {
                        continue;
                    }
                    *bytes += c.mem_size();
                    if *bytes > max {
                        *overflow = true;
                        *buffered = Vec::new();
                    } else {
                        buffered.push(c.clone());
                    }
                }
            }
            Ok(())
        })
        .map_err(|e| SourceError::fatal(format!("reading a spilled transaction: {e}")))
    }

    /// Picks up copy registrations, and delivers the copies whose point the
    /// stream reaches: the next commit at `commit`, or an idle `wal_end`.
    pub(super) async fn cross(
        &mut self,
        commit: Option<Lsn>,
        idle: Option<Lsn>,
    ) -> Result<Vec<Transaction>, SourceError> {
        let regs: Vec<(String, Registered)> = {
            let mut reg = self
                .shared
                .registry
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> = reg
                .iter()
                .filter(|(_, r)| matches!(r, Registered::Copy { .. }))
                .map(|(k, _)| k.clone())
                .collect();
            ids.into_iter()
                .filter_map(|k| reg.remove(&k).map(|r| (k, r)))
                .collect()
        };
        for (_, r) in regs {
            let Registered::Copy {
                paused,
                point,
                data,
                done,
                only,
            } = r
            else {
                continue;
            };
            // Nothing is delivered while the worker creates its slot, so
            // the slot's point cannot be passed unseen.
            if paused.send(()).is_err() {
                continue;
            }
            let Ok(p) = point.await else { continue };
            if self.delivered >= p {
                let _ = done.send(Err(Refused::Passed));
                continue;
            }
            self.copies.push(PendingCopy {
                point: p,
                data,
                done,
                only,
            });
        }
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.copies.len() {
            let p = self.copies[i].point;
            let reached = commit.is_some_and(|c| c >= p) || idle.is_some_and(|w| w >= p);
            if !reached {
                i += 1;
                continue;
            }
            let c = self.copies.remove(i);
            let Ok((reader, rows)) = c.data.await else {
                // The worker failed; it will try again with a new slot.
                continue;
            };
            tracing::info!(at = %p, rows, "exported-snapshot copy delivered");
            if let Some(only) = c.only {
                self.targets.insert(p, only);
            }
            out.push(Transaction::new(
                TxnMeta {
                    xid: 0,
                    commit_lsn: p,
                    end_lsn: p,
                    commit_time: crate::event::pg_now(),
                },
                Changes::Spilled {
                    reader,
                    tail: Vec::new(),
                },
            ));
            self.delivered = self.delivered.max(p);
            let _ = c.done.send(Ok(p));
        }
        Ok(out)
    }

    /// Replays the transaction's changes onto the active windows.
    pub(super) fn replay(&mut self, txn: &Transaction) -> Result<(), SourceError> {
        if txn.is_empty()
            || !self
                .open
                .iter()
                .any(|w| matches!(w.state, WinState::Active(_)))
        {
            return Ok(());
        }
        let open = &mut self.open;
        txn.for_each_change(|c| {
            for w in open.iter_mut() {
                if let WinState::Active(win) = &mut w.state {
                    win.apply(c);
                }
            }
            Ok(())
        })
        .map_err(|e| SourceError::fatal(format!("reading a spilled transaction: {e}")))
    }

    /// Acts on the watermarks in the transaction; returns backfill requests.
    pub(super) async fn watermarks(
        &mut self,
        txn: &mut Transaction,
        relation: &(dyn Fn(u32) -> Option<Arc<RelationInfo>> + Sync),
    ) -> Result<Vec<(Lsn, Request)>, SourceError> {
        let mut requests = Vec::new();
        if txn.messages.is_empty() {
            return Ok(requests);
        }
        let messages = std::mem::take(&mut txn.messages);
        for m in &messages {
            if m.prefix == BACKFILL_PREFIX {
                match serde_json::from_slice::<Request>(&m.content) {
                    Ok(r) if r.slot.as_ref().is_none_or(|s| *s == self.shared.slot) => {
                        requests.push((m.lsn, r))
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(at = %m.lsn, error = %e, "malformed backfill request ignored; the content must be JSON like {{\"table\": \"public.products\", \"where\": \"id < 100\"}}")
                    }
                }
                continue;
            }
            if m.prefix != WATERMARK_PREFIX {
                continue;
            }
            let Ok(mark) = serde_json::from_slice::<Mark>(&m.content) else {
                continue;
            };
            match mark.mark.as_str() {
                "low" => {
                    let reg = self
                        .shared
                        .registry
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&mark.id);
                    let Some(Registered::Chunk {
                        oid,
                        rows,
                        done,
                        only,
                    }) = reg
                    else {
                        // Another session's or process's watermark.
                        continue;
                    };
                    self.open.push(OpenWindow {
                        id: mark.id.clone(),
                        state: WinState::Pending {
                            oid,
                            rows,
                            low_seq: self.seq,
                            buffered: Vec::new(),
                            bytes: 0,
                            overflow: false,
                        },
                        done,
                        only,
                    });
                }
                "high" => {
                    let Some(i) = self.open.iter().position(|w| w.id == mark.id) else {
                        continue;
                    };
                    let mut w = self.open.remove(i);
                    if let WinState::Pending { rows, .. } = &mut w.state {
                        // The rows were sent before this watermark was written.
                        let Ok(data) = rows.await else { continue };
                        match self.activate(w, data) {
                            Some(a) => w = a,
                            None => continue,
                        }
                    }
                    let WinState::Active(window) = w.state else {
                        continue;
                    };
                    let chunk_rel = window.rel.clone();
                    // The stream's own relation when it matches, so sinks
                    // see one relation per table.
                    let rel = relation(chunk_rel.oid)
                        .filter(|r| same_columns(r, &chunk_rel))
                        .unwrap_or(chunk_rel);
                    let changes = window.into_changes(rel, txn.meta.commit_lsn, txn.meta.xid);
                    // The high watermark is a transaction of its own, so it
                    // normally holds no change for any other sink.
                    let had_changes = !txn.is_empty();
                    let bytes: usize = changes.iter().map(|c| c.mem_size()).sum();
                    match &mut txn.changes {
                        Changes::Memory(v) => v.extend(changes),
                        Changes::Spilled { tail, .. } => tail.extend(changes),
                    }
                    txn.mem_bytes += bytes;
                    if let Some(only) = w.only {
                        if had_changes {
                            tracing::warn!(chunk = %w.id, "a chunk for some sinks only closed in a transaction with changes of its own: every sink gets its rows");
                        } else {
                            self.targets.insert(txn.meta.end_lsn, only);
                        }
                    }
                    let _ = w.done.send(Ok(txn.meta.end_lsn));
                }
                _ => {}
            }
        }
        txn.messages = messages;
        Ok(requests)
    }
}

pub(super) fn same_columns(a: &RelationInfo, b: &RelationInfo) -> bool {
    a.columns.len() == b.columns.len()
        && a.columns
            .iter()
            .zip(&b.columns)
            .all(|(x, y)| x.name == y.name && x.type_oid == y.type_oid && x.is_key == y.is_key)
}

#[derive(Debug, Deserialize, serde::Serialize)]
pub(super) struct Mark {
    pub(super) id: String,
    pub(super) mark: String,
}

#[cfg(test)]
mod tests {
    //! The merger's state machine without a server: a chunk registered by a
    //! "worker", its watermarks and the stream's changes fed as the session
    //! feeds them (the order of `Snapshots::seen` with a commit, then `delivered`).
    use super::*;
    use crate::event::{Change, LogicalMessage, Op, Row};
    use crate::snapshot::state::StateFile;
    use crate::snapshot::table::TableInfo;

    const OID: u32 = 16400;

    fn shared() -> Arc<Shared> {
        let text = r#"
[source]
url = "postgres://u@h/db"
slot = "pgferry"
publication = "p"
tables = ["public.items"]

[checkpoint]
dir = "state"

[[sink]]
name = "null"
type = "null"
"#;
        let dir = std::env::temp_dir();
        let config = crate::config::Config::parse(text, &dir.join("t.toml"), |_| None).unwrap();
        let progress = crate::flow::Progress::new(&[Lsn::ZERO]);
        Arc::new(Shared::new(&config, StateFile::new(&dir), progress))
    }

    fn merger(max_buffer: usize) -> Merger {
        Merger {
            shared: shared(),
            open: Vec::new(),
            copies: Vec::new(),
            recent: VecDeque::new(),
            recent_set: HashMap::new(),
            seq: 0,
            max_buffer,
            delivered: Lsn::ZERO,
            targets: HashMap::new(),
        }
    }

    fn rel() -> Arc<RelationInfo> {
        crate::event::fixtures::relation(
            OID,
            "public",
            "items",
            &[("id", 23, true), ("v", 23, false)],
        )
    }

    fn row(id: i32, v: i32) -> Row {
        Row::from_values(&[Some(&id.to_string()), Some(&v.to_string())])
    }

    fn txn(xid: u32, commit: u64, changes: Vec<Change>, marks: &[(&str, &str)]) -> Transaction {
        let mut t = crate::event::fixtures::txn(xid, commit, commit + 8, changes);
        t.messages = marks
            .iter()
            .map(|(mark, id)| LogicalMessage {
                lsn: Lsn(commit - 1),
                prefix: WATERMARK_PREFIX.into(),
                content: serde_json::to_vec(&Mark {
                    id: id.to_string(),
                    mark: mark.to_string(),
                })
                .unwrap()
                .into(),
            })
            .collect();
        t
    }

    fn update(xid: u32, id: i32, v: i32) -> Change {
        Change {
            op: Op::Update,
            rel: rel(),
            lsn: Lsn(1),
            xid,
            before: None,
            after: Some(row(id, v)),
        }
    }

    /// A worker's chunk: registered, its rows sent on demand.
    struct Chunk {
        rows: Option<oneshot::Sender<ChunkData>>,
        done: oneshot::Receiver<Result<Lsn, Refused>>,
    }

    fn register(m: &Merger, id: &str) -> Chunk {
        let (rows_tx, rows_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        m.shared.registry.lock().unwrap().insert(
            id.into(),
            Registered::Chunk {
                oid: OID,
                rows: rows_rx,
                done: done_tx,
                only: None,
            },
        );
        Chunk {
            rows: Some(rows_tx),
            done: done_rx,
        }
    }

    fn send_rows(c: &mut Chunk, rows: Vec<Row>, xip: Vec<u32>) {
        let info = Arc::new(TableInfo {
            schema: "public".into(),
            table: "items".into(),
            rel: rel(),
            key_cols: vec![0],
            key_types: vec!["integer".into()],
            rows_estimate: 0,
        });
        let _ = c.rows.take().unwrap().send(ChunkData { info, rows, xip });
    }

    /// What the session does with each committed transaction.
    async fn commit(m: &mut Merger, t: &mut Transaction) {
        m.poll_pending();
        m.replay(t).unwrap();
        m.watermarks(t, &|_| Some(rel())).await.unwrap();
        m.remember(t.meta.xid);
        m.buffer(t).unwrap();
    }

    /// The read events of a transaction, as (id, v).
    fn reads(t: &Transaction) -> Vec<(String, String)> {
        let Changes::Memory(v) = &t.changes else {
            panic!("spilled")
        };
        v.iter()
            .filter(|c| c.op == Op::Read)
            .map(|c| {
                let r = c.after.as_ref().unwrap();
                (r.text(0).unwrap().into(), r.text(1).unwrap().into())
            })
            .collect()
    }

    #[tokio::test]
    async fn changes_between_the_watermarks_land_on_the_rows_read_events_at_the_high_one() {
        let mut m = merger(1 << 20);
        let mut c = register(&m, "c1");
        commit(&mut m, &mut txn(100, 0x100, vec![], &[("low", "c1")])).await;
        // The stream changes row 1 before the worker's rows arrive (buffered)...
        commit(&mut m, &mut txn(101, 0x200, vec![update(101, 1, 11)], &[])).await;
        send_rows(&mut c, vec![row(1, 10), row(2, 20)], vec![]);
        // ... and row 2 after (replayed onto the active window).
        commit(&mut m, &mut txn(102, 0x300, vec![update(102, 2, 22)], &[])).await;
        let mut high = txn(103, 0x400, vec![], &[("high", "c1")]);
        commit(&mut m, &mut high).await;
        assert_eq!(
            reads(&high),
            vec![("1".into(), "11".into()), ("2".into(), "22".into())],
            "the rows as of the high watermark"
        );
        assert_eq!(c.done.await.unwrap().unwrap(), Lsn(0x408));
        assert!(m.open.is_empty());
    }

    #[tokio::test]
    async fn a_read_that_missed_a_transaction_committed_before_the_low_watermark_is_refused() {
        let mut m = merger(1 << 20);
        let mut c = register(&m, "c1");
        commit(&mut m, &mut txn(55, 0x100, vec![update(55, 1, 11)], &[])).await;
        commit(&mut m, &mut txn(56, 0x200, vec![], &[("low", "c1")])).await;
        // The read's snapshot still saw xid 55 in progress: its row 1 is stale.
        send_rows(&mut c, vec![row(1, 10)], vec![55]);
        let mut high = txn(57, 0x300, vec![], &[("high", "c1")]);
        commit(&mut m, &mut high).await;
        assert!(
            reads(&high).is_empty(),
            "nothing of a refused chunk is delivered"
        );
        assert!(matches!(c.done.await.unwrap(), Err(Refused::Race)));
    }

    #[tokio::test]
    async fn a_transaction_in_progress_that_commits_after_the_low_watermark_is_no_race() {
        let mut m = merger(1 << 20);
        let mut c = register(&m, "c1");
        commit(&mut m, &mut txn(60, 0x100, vec![], &[("low", "c1")])).await;
        // xid 61 was in progress for the read and commits inside the window:
        // its change is replayed onto the rows.
        commit(&mut m, &mut txn(61, 0x200, vec![update(61, 1, 11)], &[])).await;
        send_rows(&mut c, vec![row(1, 10)], vec![61]);
        let mut high = txn(62, 0x300, vec![], &[("high", "c1")]);
        commit(&mut m, &mut high).await;
        assert_eq!(reads(&high), vec![("1".into(), "11".into())]);
        assert!(c.done.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_window_that_buffers_too_much_is_given_up_and_read_again() {
        let mut m = merger(1);
        let mut c = register(&m, "c1");
        commit(&mut m, &mut txn(70, 0x100, vec![], &[("low", "c1")])).await;
        commit(&mut m, &mut txn(71, 0x200, vec![update(71, 1, 11)], &[])).await;
        send_rows(&mut c, vec![row(1, 10)], vec![]);
        let mut high = txn(72, 0x300, vec![], &[("high", "c1")]);
        commit(&mut m, &mut high).await;
        assert!(reads(&high).is_empty());
        assert!(matches!(c.done.await.unwrap(), Err(Refused::Race)));
    }

    #[tokio::test]
    async fn watermarks_of_other_sessions_are_ignored() {
        let mut m = merger(1 << 20);
        let mut t = txn(
            80,
            0x100,
            vec![],
            &[("low", "someone-else"), ("high", "nope")],
        );
        commit(&mut m, &mut t).await;
        assert!(m.open.is_empty());
        assert_eq!(
            t.messages.len(),
            2,
            "the messages stay with their transaction"
        );
    }

    #[test]
    fn remembered_commits_are_bounded() {
        let mut m = merger(0);
        for xid in 0..(RECENT_XIDS as u32 + 10) {
            m.remember(xid);
        }
        assert_eq!(m.recent.len(), RECENT_XIDS);
        assert!(m.recent_set.len() <= RECENT_XIDS);
        assert!(!m.recent_set.contains_key(&0));
    }
}
