//! Spill files: the changes of a transaction too large to keep in memory.
//!
//! The assembler appends changes to a [`SpillWriter`] once a transaction's
//! memory would pass the configured limit; at commit the writer becomes a
//! [`SpillReader`], which the sinks read sequentially, one change at a time,
//! as often as they need (each sink reads it independently). The file is
//! removed when the reader is dropped, i.e. when the last sink is done.
//!
//! Spill files are private scratch space: they live only as long as the
//! process and are not a checkpoint. After a crash the transaction is sent
//! again by the server (its commit is past the checkpoint), so leftover files
//! are deleted at start-up.
//!
//! Record layout (little-endian): `u32 len`, then `op u8`, `rel u32` (index
//! into the relation table), `lsn u64`, `xid u32`, `before u8` (0 none, 1 key,
//! 2 full), `[row]`, `after u8` (0/1), `[row]`. A row is `u32 buf_len`, the
//! JSON bytes, `u32 ncells`, then per cell `tag u8` (0 null, 1 unchanged,
//! 2 value + `u32 start`, `u32 end`).

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::event::change::{BeforeKind, Cell, Change, Op, RelationInfo, Row};
use crate::lsn::Lsn;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Deletes spill files left by an earlier process.
pub fn clean_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|e| e == "spill") {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Appends changes of one transaction to its spill file.
#[derive(Debug)]
pub struct SpillWriter {
    path: PathBuf,
    out: BufWriter<File>,
    rels: Vec<Arc<RelationInfo>>,
    count: u64,
    bytes: u64,
    scratch: Vec<u8>,
}

impl SpillWriter {
    pub fn create(dir: &Path, xid: u32) -> io::Result<SpillWriter> {
        std::fs::create_dir_all(dir)?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("txn-{xid}-{}-{id}.spill", std::process::id()));
        let file = File::create(&path)?;
        Ok(SpillWriter {
            path,
            out: BufWriter::with_capacity(1 << 18, file),
            rels: Vec::new(),
            count: 0,
            bytes: 0,
            scratch: Vec::new(),
        })
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn append(&mut self, c: &Change) -> io::Result<()> {
        let rel = match self.rels.iter().rposition(|r| Arc::ptr_eq(r, &c.rel)) {
            Some(i) => i,
            None => {
                self.rels.push(c.rel.clone());
                self.rels.len() - 1
            }
        };
        let s = &mut self.scratch;
        s.clear();
        s.push(c.op.to_u8());
        s.extend_from_slice(&(rel as u32).to_le_bytes());
        s.extend_from_slice(&c.lsn.0.to_le_bytes());
        s.extend_from_slice(&c.xid.to_le_bytes());
        match &c.before {
            None => s.push(0),
            Some((kind, row)) => {
                s.push(if *kind == BeforeKind::Key { 1 } else { 2 });
                encode_row(row, s);
            }
        }
        match &c.after {
            None => s.push(0),
            Some(row) => {
                s.push(1);
                encode_row(row, s);
            }
        }
        self.out.write_all(&(s.len() as u32).to_le_bytes())?;
        self.out.write_all(s)?;
        self.count += 1;
        self.bytes += 4 + s.len() as u64;
        Ok(())
    }

    /// Flushes the file and hands it over for reading. No fsync: the file
    /// never outlives the process.
    pub fn finish(mut self) -> io::Result<SpillReader> {
        self.out.flush()?;
        Ok(SpillReader {
            path: std::mem::take(&mut self.path),
            rels: std::mem::take(&mut self.rels),
            count: self.count,
        })
    }
}

impl Drop for SpillWriter {
    fn drop(&mut self) {
        // An aborted transaction: nothing will read the file.
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn encode_row(row: &Row, s: &mut Vec<u8>) {
    s.extend_from_slice(&(row.buf.len() as u32).to_le_bytes());
    s.extend_from_slice(&row.buf);
    s.extend_from_slice(&(row.cells.len() as u32).to_le_bytes());
    for cell in &row.cells {
        match cell {
            Cell::Null => s.push(0),
            Cell::Unchanged => s.push(1),
            Cell::Value { start, end } => {
                s.push(2);
                s.extend_from_slice(&start.to_le_bytes());
                s.extend_from_slice(&end.to_le_bytes());
            }
        }
    }
}

/// A finished spill file; read it with [`SpillReader::for_each`].
#[derive(Debug)]
pub struct SpillReader {
    path: PathBuf,
    rels: Vec<Arc<RelationInfo>>,
    count: u64,
}

impl SpillReader {
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Reads every change in order and hands it to `f`.
    pub fn for_each(&self, mut f: impl FnMut(Change) -> io::Result<()>) -> io::Result<()> {
        let mut input = BufReader::with_capacity(1 << 18, File::open(&self.path)?);
        let mut rec = Vec::new();
        for _ in 0..self.count {
            let mut len = [0u8; 4];
            input.read_exact(&mut len)?;
            let len = u32::from_le_bytes(len) as usize;
            rec.clear();
            rec.resize(len, 0);
            input.read_exact(&mut rec)?;
            f(self.decode(&rec).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("corrupt spill file {}", self.path.display()),
                )
            })?)?;
        }
        Ok(())
    }

    fn decode(&self, rec: &[u8]) -> Option<Change> {
        let mut r = Reader(rec);
        let op = Op::from_u8(r.u8()?)?;
        let rel = self.rels.get(r.u32()? as usize)?.clone();
        let lsn = Lsn(r.u64()?);
        let xid = r.u32()?;
        let before = match r.u8()? {
            0 => None,
            1 => Some((BeforeKind::Key, r.row()?)),
            2 => Some((BeforeKind::Full, r.row()?)),
            _ => return None,
        };
        let after = match r.u8()? {
            0 => None,
            1 => Some(r.row()?),
            _ => return None,
        };
        Some(Change {
            op,
            rel,
            lsn,
            xid,
            before,
            after,
        })
    }
}

impl Drop for SpillReader {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn row(&mut self) -> Option<Row> {
        let n = self.u32()? as usize;
        let buf = self.take(n)?.to_vec();
        let ncells = self.u32()? as usize;
        // Each cell takes at least one byte: bound the allocation by what is left.
        if ncells > self.0.len() {
            return None;
        }
        let mut cells = Vec::with_capacity(ncells);
        for _ in 0..ncells {
            cells.push(match self.u8()? {
                0 => Cell::Null,
                1 => Cell::Unchanged,
                2 => Cell::Value {
                    start: self.u32()?,
                    end: self.u32()?,
                },
                _ => return None,
            });
        }
        Some(Row { buf, cells })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_through_a_spill_file_and_the_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let rel = Arc::new(RelationInfo::new(
            1,
            "public".into(),
            "t".into(),
            b'd',
            vec![("id".into(), 23, true), ("v".into(), 25, false)],
        ));
        let mut w = SpillWriter::create(dir.path(), 7).unwrap();
        let mut expected = Vec::new();
        for i in 0..1000u32 {
            let buf = format!("{i}\"x\"").into_bytes();
            let n = i.to_string().len() as u32;
            let row = Row {
                cells: vec![
                    Cell::Value { start: 0, end: n },
                    if i % 3 == 0 {
                        Cell::Unchanged
                    } else {
                        Cell::Value {
                            start: n,
                            end: n + 3,
                        }
                    },
                ],
                buf,
            };
            let c = Change {
                op: if i % 2 == 0 { Op::Insert } else { Op::Update },
                rel: rel.clone(),
                lsn: Lsn(i as u64),
                xid: 7 + i % 2,
                before: (i % 5 == 0).then(|| (BeforeKind::Key, row.clone())),
                after: Some(row),
            };
            w.append(&c).unwrap();
            expected.push(c);
        }
        let r = w.finish().unwrap();
        let mut got = Vec::new();
        r.for_each(|c| {
            got.push(c);
            Ok(())
        })
        .unwrap();
        assert_eq!(got.len(), expected.len());
        for (a, b) in got.iter().zip(&expected) {
            assert_eq!((a.op, a.lsn, a.xid), (b.op, b.lsn, b.xid));
            assert_eq!(a.after, b.after);
            assert_eq!(a.before, b.before);
            assert!(Arc::ptr_eq(&a.rel, &rel));
        }
        drop(r);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
