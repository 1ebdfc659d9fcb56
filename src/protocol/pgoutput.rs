//! pgoutput logical replication messages (protocol versions 1 to 4).
//!
//! [`parse`] turns the payload of one XLogData (one pgoutput message) into a
//! [`LogicalMessage`]. It does no I/O and keeps no state: what the bytes alone
//! cannot say (whether we are inside a stream block, which protocol version and
//! streaming mode were negotiated) comes in a [`ParseContext`], which the caller
//! keeps up to date with [`ParseContext::observe`].
//!
//! # Invariants
//!
//! - **Total.** `parse` never panics: every field is read through a
//!   bounds-checked cursor, every wire count and length is checked against the
//!   bytes really left before it is trusted, and nothing is allocated from a
//!   wire length. A `Vec` sized from a wire count (Relation columns, Truncate
//!   relation ids) is only reserved after checking that the rest of the message
//!   can hold that many entries.
//! - **Exact.** A message must be consumed completely: trailing bytes, an
//!   unknown tag, an unknown tuple column kind or an unexpected tuple marker
//!   (`N`, `K`, `O`) are errors. Reserved flag bytes are *not* checked, so a
//!   future server that sets new flags still parses.
//! - **Errors name the place.** A [`DecodeError`] carries the message kind (the
//!   variant name, such as `"Insert"`; `"unknown"` for a bad or missing tag) and
//!   the byte offset in the message where parsing failed.
//! - **Zero-copy, and no refcount per row.** Tuple bytes (the payload of
//!   Insert, Update and Delete, by far the most frequent messages) are plain
//!   `&'a [u8]` borrows of the input, so parsing a row message touches no
//!   atomic reference count: a [`LogicalMessage`] borrows the buffer it was
//!   parsed from. Names, prefixes, origin names, GIDs and message contents of
//!   the rarer messages are [`Bytes::slice`]s of the input: they share its
//!   buffer and may outlive the borrow.
//! - **Tuples are validated once.** A [`TupleData`] holds the column entries
//!   after the Int16 count as one slice, fully checked by the parser. Walking it
//!   with [`TupleData::iter`] re-reads those bytes without allocating and without
//!   slicing per column (values are `&[u8]`); it still uses only checked reads
//!   and simply stops if the bytes were ever short, so it cannot panic either.
//!   A `TupleData` can only be made by this parser, so in practice the iterator
//!   yields exactly [`TupleData::len`] values.
//! - **Stream blocks.** Inside a block (between Stream Start and Stream Stop),
//!   Relation, Type, Insert, Update, Delete, Truncate and Message carry the
//!   streamed transaction's xid right after the tag; their `xid` field is then
//!   `Some`, and `None` outside. Everything else is laid out the same in and out
//!   of a block.

use bytes::Bytes;

use super::cursor::Cursor;
use super::DecodeError;
use crate::lsn::Lsn;

/// Microseconds since 2000-01-01 00:00:00 UTC, as Postgres sends timestamps.
pub type PgTimestamp = i64;

/// What the parser must know that the bytes alone do not say.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseContext {
    /// Between Stream Start and Stream Stop: Relation, Type, Insert, Update,
    /// Delete, Truncate and Message then carry a leading transaction id (that
    /// of the change's own subtransaction, which may differ from the xid in
    /// Stream Start). Keep it current with [`ParseContext::observe`].
    pub in_stream: bool,
    /// The negotiated `proto_version` (1..=4). Version 4 adds the abort LSN and
    /// time to Stream Abort when parallel streaming is on; pass
    /// `parallel_stream_abort` to say whether those fields are present.
    pub proto_version: u32,
    /// `streaming 'parallel'` was requested (v4): Stream Abort carries abort_lsn and abort_time.
    /// Ignored when `proto_version` is below 4.
    pub parallel_stream_abort: bool,
}

/// One pgoutput message. Row messages borrow the input buffer (`'a`).
#[derive(Debug, Clone)]
pub enum LogicalMessage<'a> {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMessage),
    Insert(Insert<'a>),
    Update(Update<'a>),
    Delete(Delete<'a>),
    Truncate(Truncate),
    Message(Message),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    BeginPrepare(BeginPrepare),
    Prepare(Prepare),
    CommitPrepared(CommitPrepared),
    RollbackPrepared(RollbackPrepared),
    StreamPrepare(Prepare),
}

#[derive(Debug, Clone)]
pub struct Begin {
    /// The final LSN of the transaction: where its commit record starts (the
    /// same value as [`Commit::commit_lsn`]; observed on PostgreSQL 15).
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
}

#[derive(Debug, Clone)]
pub struct Commit {
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the transaction: where decoding resumes after it.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

#[derive(Debug, Clone)]
pub struct Origin {
    pub commit_lsn: Lsn,
    /// The origin name, without its terminating NUL.
    pub name: Bytes,
}

#[derive(Debug, Clone)]
pub struct Relation {
    /// Present only inside a stream block.
    pub xid: Option<u32>,
    pub oid: u32,
    pub namespace: Bytes,
    pub name: Bytes,
    /// pg_class.relreplident: b'd' default, b'n' nothing, b'f' full, b'i' index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone)]
pub struct RelationColumn {
    /// Bit 0 set: the column is part of the replica identity key.
    pub flags: u8,
    pub name: Bytes,
    pub type_oid: u32,
    pub type_modifier: i32,
}

impl RelationColumn {
    /// True when the column belongs to the replica identity.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

#[derive(Debug, Clone)]
pub struct TypeMessage {
    pub xid: Option<u32>,
    pub oid: u32,
    pub namespace: Bytes,
    pub name: Bytes,
}

#[derive(Debug, Clone, Copy)]
pub struct Insert<'a> {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    pub new: TupleData<'a>,
}

#[derive(Debug, Clone, Copy)]
pub struct Update<'a> {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    /// The old tuple: `K` (key columns only) or `O` (the whole old row), if sent.
    pub old: Option<OldTuple<'a>>,
    pub new: TupleData<'a>,
}

#[derive(Debug, Clone, Copy)]
pub struct Delete<'a> {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    /// A delete always carries `K` or `O`.
    pub old: OldTuple<'a>,
}

#[derive(Debug, Clone, Copy)]
pub enum OldTuple<'a> {
    /// `K`: only the replica identity columns carry values; others are null.
    Key(TupleData<'a>),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData<'a>),
}

impl<'a> OldTuple<'a> {
    pub fn tuple(&self) -> &TupleData<'a> {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Truncate {
    pub xid: Option<u32>,
    /// Bit 0: CASCADE, bit 1: RESTART IDENTITY.
    pub options: u8,
    pub relation_oids: Vec<u32>,
}

/// A logical decoding message from `pg_logical_emit_message`.
#[derive(Debug, Clone)]
pub struct Message {
    pub xid: Option<u32>,
    /// Bit 0 set: transactional.
    pub flags: u8,
    pub lsn: Lsn,
    pub prefix: Bytes,
    pub content: Bytes,
}

impl Message {
    pub fn is_transactional(&self) -> bool {
        self.flags & 1 != 0
    }
}

#[derive(Debug, Clone)]
pub struct StreamStart {
    pub xid: u32,
    /// 1 when this is the first block streamed for this transaction.
    pub first_segment: bool,
}

#[derive(Debug, Clone)]
pub struct StreamCommit {
    pub xid: u32,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

#[derive(Debug, Clone)]
pub struct StreamAbort {
    /// The top-level transaction.
    pub xid: u32,
    /// The aborted (sub)transaction; equal to `xid` when the whole transaction aborts.
    pub subxid: u32,
    /// Only with protocol 4 and parallel streaming.
    pub abort_lsn: Option<Lsn>,
    pub abort_time: Option<PgTimestamp>,
}

#[derive(Debug, Clone)]
pub struct BeginPrepare {
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub xid: u32,
    pub gid: Bytes,
}

/// Prepare and Stream Prepare share one layout.
#[derive(Debug, Clone)]
pub struct Prepare {
    pub flags: u8,
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub xid: u32,
    pub gid: Bytes,
}

#[derive(Debug, Clone)]
pub struct CommitPrepared {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
    pub gid: Bytes,
}

#[derive(Debug, Clone)]
pub struct RollbackPrepared {
    pub flags: u8,
    pub prepare_end_lsn: Lsn,
    pub rollback_end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub rollback_time: PgTimestamp,
    pub xid: u32,
    pub gid: Bytes,
}

/// The column values of one tuple, validated at parse time and kept as one
/// borrowed slice of the input. Making, copying and iterating it allocates
/// nothing and touches no reference count.
#[derive(Debug, Clone, Copy)]
pub struct TupleData<'a> {
    /// Number of columns (Int16 on the wire, never negative after validation).
    ncols: u16,
    /// The bytes of the column entries, right after the Int16 count.
    data: &'a [u8],
}

/// One column of a [`TupleData`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TupleValue<'a> {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value that the server did not send.
    Unchanged,
    /// `t`: the value in the type's text output form.
    Text(&'a [u8]),
    /// `b`: the value in the type's binary send form.
    Binary(&'a [u8]),
}

impl<'a> TupleData<'a> {
    pub fn len(&self) -> usize {
        self.ncols as usize
    }

    pub fn is_empty(&self) -> bool {
        self.ncols == 0
    }

    /// The columns in order. Infallible: the layout was validated by the parser.
    #[inline]
    pub fn iter(&self) -> TupleIter<'a> {
        TupleIter {
            rest: self.data,
            left: self.ncols,
        }
    }

    /// The raw column entries as sent (after the Int16 count): one
    /// `Byte1 kind [Int32 len, bytes]` per column.
    pub fn raw(&self) -> &'a [u8] {
        self.data
    }
}

impl<'a> IntoIterator for &TupleData<'a> {
    type Item = TupleValue<'a>;
    type IntoIter = TupleIter<'a>;
    fn into_iter(self) -> TupleIter<'a> {
        self.iter()
    }
}

impl<'a> IntoIterator for TupleData<'a> {
    type Item = TupleValue<'a>;
    type IntoIter = TupleIter<'a>;
    fn into_iter(self) -> TupleIter<'a> {
        self.iter()
    }
}

/// Iterator over the columns of a [`TupleData`].
pub struct TupleIter<'a> {
    /// Column entries not yet yielded.
    rest: &'a [u8],
    /// Columns not yet yielded.
    left: u16,
}

impl<'a> TupleIter<'a> {
    /// Ends the iteration: the bytes did not hold what the count promised.
    /// Unreachable for a `TupleData` made by [`parse`].
    #[cold]
    fn stop(&mut self) -> Option<TupleValue<'a>> {
        self.left = 0;
        self.rest = &[];
        None
    }
}

impl<'a> Iterator for TupleIter<'a> {
    type Item = TupleValue<'a>;

    #[inline]
    fn next(&mut self) -> Option<TupleValue<'a>> {
        if self.left == 0 {
            return None;
        }
        let Some((&kind, tail)) = self.rest.split_first() else {
            return self.stop();
        };
        let value = match kind {
            COLUMN_NULL => {
                self.rest = tail;
                TupleValue::Null
            }
            COLUMN_UNCHANGED => {
                self.rest = tail;
                TupleValue::Unchanged
            }
            COLUMN_TEXT | COLUMN_BINARY => {
                let Some((len, tail)) = tail.split_first_chunk::<4>() else {
                    return self.stop();
                };
                let len = i32::from_be_bytes(*len);
                if len < 0 || len as usize > tail.len() {
                    return self.stop();
                }
                let (value, tail) = tail.split_at(len as usize);
                self.rest = tail;
                if kind == COLUMN_TEXT {
                    TupleValue::Text(value)
                } else {
                    TupleValue::Binary(value)
                }
            }
            _ => return self.stop(),
        };
        self.left -= 1;
        Some(value)
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left as usize))
    }
}

impl std::iter::FusedIterator for TupleIter<'_> {}

/// The Byte1 tags that open each pgoutput message.
pub mod tag {
    pub const BEGIN: u8 = b'B';
    pub const COMMIT: u8 = b'C';
    pub const ORIGIN: u8 = b'O';
    pub const RELATION: u8 = b'R';
    pub const TYPE: u8 = b'Y';
    pub const INSERT: u8 = b'I';
    pub const UPDATE: u8 = b'U';
    pub const DELETE: u8 = b'D';
    pub const TRUNCATE: u8 = b'T';
    pub const MESSAGE: u8 = b'M';
    pub const STREAM_START: u8 = b'S';
    pub const STREAM_STOP: u8 = b'E';
    pub const STREAM_COMMIT: u8 = b'c';
    pub const STREAM_ABORT: u8 = b'A';
    pub const BEGIN_PREPARE: u8 = b'b';
    pub const PREPARE: u8 = b'P';
    pub const COMMIT_PREPARED: u8 = b'K';
    pub const ROLLBACK_PREPARED: u8 = b'r';
    pub const STREAM_PREPARE: u8 = b'p';
}

/// Tuple column kinds.
const COLUMN_NULL: u8 = b'n';
const COLUMN_UNCHANGED: u8 = b'u';
const COLUMN_TEXT: u8 = b't';
const COLUMN_BINARY: u8 = b'b';

/// Tuple markers inside Insert, Update and Delete.
const TUPLE_NEW: u8 = b'N';
const TUPLE_KEY: u8 = b'K';
const TUPLE_OLD: u8 = b'O';

/// The message kind for a tag, as named in errors and by [`LogicalMessage::kind`].
fn kind_of_tag(t: u8) -> Option<&'static str> {
    Some(match t {
        tag::BEGIN => "Begin",
        tag::COMMIT => "Commit",
        tag::ORIGIN => "Origin",
        tag::RELATION => "Relation",
        tag::TYPE => "Type",
        tag::INSERT => "Insert",
        tag::UPDATE => "Update",
        tag::DELETE => "Delete",
        tag::TRUNCATE => "Truncate",
        tag::MESSAGE => "Message",
        tag::STREAM_START => "StreamStart",
        tag::STREAM_STOP => "StreamStop",
        tag::STREAM_COMMIT => "StreamCommit",
        tag::STREAM_ABORT => "StreamAbort",
        tag::BEGIN_PREPARE => "BeginPrepare",
        tag::PREPARE => "Prepare",
        tag::COMMIT_PREPARED => "CommitPrepared",
        tag::ROLLBACK_PREPARED => "RollbackPrepared",
        tag::STREAM_PREPARE => "StreamPrepare",
        _ => return None,
    })
}

impl LogicalMessage<'_> {
    /// The variant name, such as `"Insert"` (the same name [`DecodeError::kind`] uses).
    pub fn kind(&self) -> &'static str {
        match self {
            LogicalMessage::Begin(_) => "Begin",
            LogicalMessage::Commit(_) => "Commit",
            LogicalMessage::Origin(_) => "Origin",
            LogicalMessage::Relation(_) => "Relation",
            LogicalMessage::Type(_) => "Type",
            LogicalMessage::Insert(_) => "Insert",
            LogicalMessage::Update(_) => "Update",
            LogicalMessage::Delete(_) => "Delete",
            LogicalMessage::Truncate(_) => "Truncate",
            LogicalMessage::Message(_) => "Message",
            LogicalMessage::StreamStart(_) => "StreamStart",
            LogicalMessage::StreamStop => "StreamStop",
            LogicalMessage::StreamCommit(_) => "StreamCommit",
            LogicalMessage::StreamAbort(_) => "StreamAbort",
            LogicalMessage::BeginPrepare(_) => "BeginPrepare",
            LogicalMessage::Prepare(_) => "Prepare",
            LogicalMessage::CommitPrepared(_) => "CommitPrepared",
            LogicalMessage::RollbackPrepared(_) => "RollbackPrepared",
            LogicalMessage::StreamPrepare(_) => "StreamPrepare",
        }
    }
}

impl ParseContext {
    /// A context for `proto_version`, outside any stream block.
    pub fn new(proto_version: u32) -> ParseContext {
        ParseContext {
            in_stream: false,
            proto_version,
            parallel_stream_abort: false,
        }
    }

    /// Updates the context after `msg` was parsed: Stream Start opens a stream
    /// block, Stream Stop closes it. Call it for every message, in order.
    #[inline]
    pub fn observe(&mut self, msg: &LogicalMessage<'_>) {
        match msg {
            LogicalMessage::StreamStart(_) => self.in_stream = true,
            LogicalMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
    }

    /// Whether a Stream Abort carries `abort_lsn` and `abort_time`.
    fn abort_has_position(&self) -> bool {
        self.proto_version >= 4 && self.parallel_stream_abort
    }
}

/// Parses one pgoutput message: the payload of one XLogData.
///
/// The row messages (Insert, Update, Delete) borrow `buf`; every other field
/// is owned or a [`Bytes`] slice of it.
pub fn parse<'a>(buf: &'a Bytes, ctx: ParseContext) -> Result<LogicalMessage<'a>, DecodeError> {
    let Some(&t) = buf.first() else {
        return Err(DecodeError::new("unknown", 0, "empty message"));
    };
    let Some(kind) = kind_of_tag(t) else {
        return Err(DecodeError::new(
            "unknown",
            0,
            format!("unknown message tag {:?} (0x{t:02x})", t as char),
        ));
    };
    let mut c = Cursor::new(buf, kind);
    c.u8("tag")?;
    let msg = match t {
        tag::INSERT => LogicalMessage::Insert(insert(&mut c, ctx)?),
        tag::UPDATE => LogicalMessage::Update(update(&mut c, ctx)?),
        tag::DELETE => LogicalMessage::Delete(delete(&mut c, ctx)?),
        tag::BEGIN => LogicalMessage::Begin(Begin {
            final_lsn: c.lsn("final LSN")?,
            commit_time: c.i64("commit time")?,
            xid: c.u32("xid")?,
        }),
        tag::COMMIT => LogicalMessage::Commit(Commit {
            flags: c.u8("flags")?,
            commit_lsn: c.lsn("commit LSN")?,
            end_lsn: c.lsn("end LSN")?,
            commit_time: c.i64("commit time")?,
        }),
        tag::ORIGIN => LogicalMessage::Origin(Origin {
            commit_lsn: c.lsn("origin commit LSN")?,
            name: c.cstr("origin name")?,
        }),
        tag::RELATION => LogicalMessage::Relation(relation(&mut c, ctx)?),
        tag::TYPE => LogicalMessage::Type(TypeMessage {
            xid: stream_xid(&mut c, ctx)?,
            oid: c.u32("type oid")?,
            namespace: c.cstr("namespace")?,
            name: c.cstr("type name")?,
        }),
        tag::TRUNCATE => LogicalMessage::Truncate(truncate(&mut c, ctx)?),
        tag::MESSAGE => LogicalMessage::Message(message(&mut c, ctx)?),
        tag::STREAM_START => LogicalMessage::StreamStart(StreamStart {
            xid: c.u32("xid")?,
            first_segment: c.u8("first segment")? == 1,
        }),
        tag::STREAM_STOP => LogicalMessage::StreamStop,
        tag::STREAM_COMMIT => LogicalMessage::StreamCommit(StreamCommit {
            xid: c.u32("xid")?,
            flags: c.u8("flags")?,
            commit_lsn: c.lsn("commit LSN")?,
            end_lsn: c.lsn("end LSN")?,
            commit_time: c.i64("commit time")?,
        }),
        tag::STREAM_ABORT => {
            let xid = c.u32("xid")?;
            let subxid = c.u32("subtransaction xid")?;
            let (abort_lsn, abort_time) = if ctx.abort_has_position() {
                (Some(c.lsn("abort LSN")?), Some(c.i64("abort time")?))
            } else {
                (None, None)
            };
            LogicalMessage::StreamAbort(StreamAbort {
                xid,
                subxid,
                abort_lsn,
                abort_time,
            })
        }
        tag::BEGIN_PREPARE => LogicalMessage::BeginPrepare(BeginPrepare {
            prepare_lsn: c.lsn("prepare LSN")?,
            end_lsn: c.lsn("end LSN")?,
            prepare_time: c.i64("prepare time")?,
            xid: c.u32("xid")?,
            gid: c.cstr("gid")?,
        }),
        tag::PREPARE => LogicalMessage::Prepare(prepare(&mut c)?),
        tag::STREAM_PREPARE => LogicalMessage::StreamPrepare(prepare(&mut c)?),
        tag::COMMIT_PREPARED => LogicalMessage::CommitPrepared(CommitPrepared {
            flags: c.u8("flags")?,
            commit_lsn: c.lsn("commit LSN")?,
            end_lsn: c.lsn("end LSN")?,
            commit_time: c.i64("commit time")?,
            xid: c.u32("xid")?,
            gid: c.cstr("gid")?,
        }),
        tag::ROLLBACK_PREPARED => LogicalMessage::RollbackPrepared(RollbackPrepared {
            flags: c.u8("flags")?,
            prepare_end_lsn: c.lsn("prepare end LSN")?,
            rollback_end_lsn: c.lsn("rollback end LSN")?,
            prepare_time: c.i64("prepare time")?,
            rollback_time: c.i64("rollback time")?,
            xid: c.u32("xid")?,
            gid: c.cstr("gid")?,
        }),
        // kind_of_tag accepted exactly the tags matched above.
        _ => return Err(c.error_at(0, "unhandled tag")),
    };
    c.finish()?;
    Ok(msg)
}

/// The leading xid of a message inside a stream block.
#[inline(always)]
fn stream_xid(c: &mut Cursor<'_>, ctx: ParseContext) -> Result<Option<u32>, DecodeError> {
    if ctx.in_stream {
        c.u32("xid").map(Some)
    } else {
        Ok(None)
    }
}

#[inline(always)]
fn insert<'a>(c: &mut Cursor<'a>, ctx: ParseContext) -> Result<Insert<'a>, DecodeError> {
    let xid = stream_xid(c, ctx)?;
    let relation_oid = c.u32("relation oid")?;
    expect_marker(c, &[TUPLE_NEW])?;
    let new = tuple(c)?;
    Ok(Insert {
        xid,
        relation_oid,
        new,
    })
}

#[inline(always)]
fn update<'a>(c: &mut Cursor<'a>, ctx: ParseContext) -> Result<Update<'a>, DecodeError> {
    let xid = stream_xid(c, ctx)?;
    let relation_oid = c.u32("relation oid")?;
    let old = match expect_marker(c, &[TUPLE_KEY, TUPLE_OLD, TUPLE_NEW])? {
        TUPLE_KEY => Some(OldTuple::Key(tuple(c)?)),
        TUPLE_OLD => Some(OldTuple::Full(tuple(c)?)),
        _ => None,
    };
    if old.is_some() {
        expect_marker(c, &[TUPLE_NEW])?;
    }
    let new = tuple(c)?;
    Ok(Update {
        xid,
        relation_oid,
        old,
        new,
    })
}

#[inline(always)]
fn delete<'a>(c: &mut Cursor<'a>, ctx: ParseContext) -> Result<Delete<'a>, DecodeError> {
    let xid = stream_xid(c, ctx)?;
    let relation_oid = c.u32("relation oid")?;
    let old = if expect_marker(c, &[TUPLE_KEY, TUPLE_OLD])? == TUPLE_KEY {
        OldTuple::Key(tuple(c)?)
    } else {
        OldTuple::Full(tuple(c)?)
    };
    Ok(Delete {
        xid,
        relation_oid,
        old,
    })
}

/// Reads a tuple marker byte and checks it is one of `allowed`.
#[inline(always)]
fn expect_marker(c: &mut Cursor<'_>, allowed: &[u8]) -> Result<u8, DecodeError> {
    let at = c.offset();
    let m = c.u8("tuple marker")?;
    if allowed.contains(&m) {
        Ok(m)
    } else {
        Err(bad_marker(c, at, m, allowed))
    }
}

#[cold]
#[inline(never)]
fn bad_marker(c: &Cursor<'_>, at: usize, got: u8, allowed: &[u8]) -> DecodeError {
    let want: Vec<String> = allowed
        .iter()
        .map(|&b| format!("{:?}", b as char))
        .collect();
    c.error_at(
        at,
        format!(
            "expected tuple marker {}, got {:?} (0x{got:02x})",
            want.join(" or "),
            got as char
        ),
    )
}

/// Why a tuple's column entries did not validate (turned into a message only on error).
enum TupleFault {
    Truncated,
    TruncatedLength,
    NegativeLength(i32),
    LongLength(usize, usize),
    UnknownKind(u8),
}

/// Reads an Int16 column count and validates the column entries that follow.
#[inline(always)]
fn tuple<'a>(c: &mut Cursor<'a>) -> Result<TupleData<'a>, DecodeError> {
    let count_at = c.offset();
    let ncols = c.i16("column count")?;
    if ncols < 0 {
        return Err(c.error_at(count_at, format!("negative column count {ncols}")));
    }
    let ncols = ncols as u16;
    let body_at = c.offset();
    let used = match scan_tuple(c.remaining(), ncols) {
        Ok(used) => used,
        Err((rel, fault)) => return Err(tuple_error(c, body_at + rel, fault)),
    };
    let data = c.take(used, "tuple data")?;
    Ok(TupleData { ncols, data })
}

/// Walks `ncols` column entries at the front of `buf`; returns how many bytes
/// they take, or the offset (relative to `buf`) and kind of the first fault.
#[inline(always)]
fn scan_tuple(buf: &[u8], ncols: u16) -> Result<usize, (usize, TupleFault)> {
    let mut rest = buf;
    for _ in 0..ncols {
        let at = buf.len() - rest.len();
        let Some((&kind, tail)) = rest.split_first() else {
            return Err((at, TupleFault::Truncated));
        };
        match kind {
            COLUMN_NULL | COLUMN_UNCHANGED => rest = tail,
            COLUMN_TEXT | COLUMN_BINARY => {
                let Some((len, tail)) = tail.split_first_chunk::<4>() else {
                    return Err((at + 1, TupleFault::TruncatedLength));
                };
                let len = i32::from_be_bytes(*len);
                if len < 0 {
                    return Err((at + 1, TupleFault::NegativeLength(len)));
                }
                let Some(after) = tail.get(len as usize..) else {
                    return Err((at + 1, TupleFault::LongLength(len as usize, tail.len())));
                };
                rest = after;
            }
            other => return Err((at, TupleFault::UnknownKind(other))),
        }
    }
    Ok(buf.len() - rest.len())
}

#[cold]
#[inline(never)]
fn tuple_error(c: &Cursor<'_>, at: usize, fault: TupleFault) -> DecodeError {
    let reason = match fault {
        TupleFault::Truncated => "truncated tuple: a column kind byte is missing".to_string(),
        TupleFault::TruncatedLength => {
            "truncated tuple: a column value length is missing".to_string()
        }
        TupleFault::NegativeLength(n) => format!("negative column value length {n}"),
        TupleFault::LongLength(n, left) => {
            format!("column value length {n} exceeds the {left} bytes left")
        }
        TupleFault::UnknownKind(k) => {
            format!("unknown column kind {:?} (0x{k:02x})", k as char)
        }
    };
    c.error_at(at, reason)
}

fn relation(c: &mut Cursor<'_>, ctx: ParseContext) -> Result<Relation, DecodeError> {
    let xid = stream_xid(c, ctx)?;
    let oid = c.u32("relation oid")?;
    let namespace = c.cstr("namespace")?;
    let name = c.cstr("relation name")?;
    let replica_identity = c.u8("replica identity")?;
    let count_at = c.offset();
    let ncols = c.i16("column count")?;
    if ncols < 0 {
        return Err(c.error_at(count_at, format!("negative column count {ncols}")));
    }
    // Each column takes at least 10 bytes: flags, an empty name's NUL, type
    // oid and type modifier. Check before reserving anything.
    const MIN_COLUMN: usize = 1 + 1 + 4 + 4;
    let ncols = ncols as usize;
    if ncols * MIN_COLUMN > c.remaining().len() {
        return Err(c.error_at(
            count_at,
            format!(
                "{ncols} columns cannot fit in the {} bytes left",
                c.remaining().len()
            ),
        ));
    }
    let mut columns = Vec::with_capacity(ncols);
    for _ in 0..ncols {
        columns.push(RelationColumn {
            flags: c.u8("column flags")?,
            name: c.cstr("column name")?,
            type_oid: c.u32("column type oid")?,
            type_modifier: c.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        xid,
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn truncate(c: &mut Cursor<'_>, ctx: ParseContext) -> Result<Truncate, DecodeError> {
    let xid = stream_xid(c, ctx)?;
    let count_at = c.offset();
    let n = c.i32("relation count")?;
    let options = c.u8("options")?;
    if n < 0 {
        return Err(c.error_at(count_at, format!("negative relation count {n}")));
    }
    let n = n as usize;
    let fits = matches!(n.checked_mul(4), Some(b) if b <= c.remaining().len());
    if !fits {
        return Err(c.error_at(
            count_at,
            format!(
                "{n} relation oids cannot fit in the {} bytes left",
                c.remaining().len()
            ),
        ));
    }
    let mut relation_oids = Vec::with_capacity(n);
    for _ in 0..n {
        relation_oids.push(c.u32("relation oid")?);
    }
    Ok(Truncate {
        xid,
        options,
        relation_oids,
    })
}

fn message(c: &mut Cursor<'_>, ctx: ParseContext) -> Result<Message, DecodeError> {
    let xid = stream_xid(c, ctx)?;
    let flags = c.u8("flags")?;
    let lsn = c.lsn("message LSN")?;
    let prefix = c.cstr("prefix")?;
    let len = c.len_i32("content length")?;
    let content = c.bytes(len, "content")?;
    Ok(Message {
        xid,
        flags,
        lsn,
        prefix,
        content,
    })
}

fn prepare(c: &mut Cursor<'_>) -> Result<Prepare, DecodeError> {
    Ok(Prepare {
        flags: c.u8("flags")?,
        prepare_lsn: c.lsn("prepare LSN")?,
        end_lsn: c.lsn("end LSN")?,
        prepare_time: c.i64("prepare time")?,
        xid: c.u32("xid")?,
        gid: c.cstr("gid")?,
    })
}

/// Splits a captured stream in the fixture format pgferry's tests and benches
/// use: repeated `[u64 BE lsn][u32 BE len][len bytes]`. The messages are
/// slices of `buf`.
pub fn split_capture(buf: &Bytes) -> Result<Vec<(Lsn, Bytes)>, DecodeError> {
    let mut c = Cursor::new(buf, "capture");
    let mut out = Vec::new();
    while !c.remaining().is_empty() {
        let lsn = c.lsn("record LSN")?;
        let len = c.u32("record length")? as usize;
        out.push((lsn, c.bytes(len, "record")?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds wire bytes by hand.
    #[derive(Default, Clone)]
    struct W(Vec<u8>);

    impl W {
        fn tag(t: u8) -> W {
            W(vec![t])
        }
        fn u8(mut self, v: u8) -> W {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(self, v: u32) -> W {
            self.i32(v as i32)
        }
        fn i64(mut self, v: i64) -> W {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn lsn(self, v: u64) -> W {
            self.i64(v as i64)
        }
        fn cstr(mut self, s: &str) -> W {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        fn raw(mut self, b: &[u8]) -> W {
            self.0.extend_from_slice(b);
            self
        }
        fn xid_if(self, in_stream: bool, xid: u32) -> W {
            if in_stream {
                self.u32(xid)
            } else {
                self
            }
        }
        /// A tuple: id as text, NULL, unchanged TOAST, binary bytes.
        fn tuple4(self, id: &str) -> W {
            self.i16(4)
                .u8(b't')
                .i32(id.len() as i32)
                .raw(id.as_bytes())
                .u8(b'n')
                .u8(b'u')
                .u8(b'b')
                .i32(3)
                .raw(&[0, 1, 2])
        }
        fn bytes(&self) -> Bytes {
            Bytes::copy_from_slice(&self.0)
        }
    }

    fn v2(in_stream: bool) -> ParseContext {
        ParseContext {
            in_stream,
            proto_version: 2,
            parallel_stream_abort: false,
        }
    }

    fn v4_parallel() -> ParseContext {
        ParseContext {
            in_stream: false,
            proto_version: 4,
            parallel_stream_abort: true,
        }
    }

    const XID: u32 = 0xABCD_0123;

    fn insert_bytes(s: bool) -> W {
        W::tag(b'I').xid_if(s, XID).u32(16384).u8(b'N').tuple4("42")
    }

    fn relation_bytes(s: bool) -> W {
        W::tag(b'R')
            .xid_if(s, XID)
            .u32(16384)
            .cstr("public")
            .cstr("items")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .cstr("id")
            .u32(23)
            .i32(-1)
            .u8(0)
            .cstr("price")
            .u32(1700)
            .i32(655366)
    }

    /// One valid sample of every message kind, with the context to parse it in.
    fn samples() -> Vec<(ParseContext, W)> {
        let mut v = Vec::new();
        for s in [false, true] {
            let c = v2(s);
            v.push((c, relation_bytes(s)));
            v.push((
                c,
                W::tag(b'Y').xid_if(s, XID).u32(99999).cstr("").cstr("mood"),
            ));
            v.push((c, insert_bytes(s)));
            v.push((
                c,
                W::tag(b'U').xid_if(s, XID).u32(16384).u8(b'N').tuple4("1"),
            ));
            v.push((
                c,
                W::tag(b'U')
                    .xid_if(s, XID)
                    .u32(16384)
                    .u8(b'K')
                    .tuple4("1")
                    .u8(b'N')
                    .tuple4("2"),
            ));
            v.push((
                c,
                W::tag(b'U')
                    .xid_if(s, XID)
                    .u32(16384)
                    .u8(b'O')
                    .tuple4("1")
                    .u8(b'N')
                    .tuple4("2"),
            ));
            v.push((
                c,
                W::tag(b'D').xid_if(s, XID).u32(16384).u8(b'K').tuple4("7"),
            ));
            v.push((
                c,
                W::tag(b'D').xid_if(s, XID).u32(16384).u8(b'O').tuple4("7"),
            ));
            v.push((
                c,
                W::tag(b'T')
                    .xid_if(s, XID)
                    .i32(2)
                    .u8(3)
                    .u32(16384)
                    .u32(16390),
            ));
            v.push((
                c,
                W::tag(b'M')
                    .xid_if(s, XID)
                    .u8(1)
                    .lsn(0x1_2345)
                    .cstr("pfx")
                    .i32(2)
                    .raw(b"hi"),
            ));
        }
        let c = v2(false);
        v.push((c, W::tag(b'B').lsn(0x16_B374_D848).i64(123_456).u32(777)));
        v.push((c, W::tag(b'C').u8(0).lsn(0x10).lsn(0x20).i64(-1_000_000)));
        v.push((c, W::tag(b'O').lsn(0xABC).cstr("origin1")));
        v.push((c, W::tag(b'S').u32(XID).u8(1)));
        v.push((v2(true), W::tag(b'E')));
        v.push((c, W::tag(b'c').u32(XID).u8(0).lsn(0x30).lsn(0x40).i64(5)));
        v.push((c, W::tag(b'A').u32(XID).u32(XID + 1)));
        v.push((
            v4_parallel(),
            W::tag(b'A').u32(XID).u32(XID).lsn(0x50).i64(6),
        ));
        v.push((
            c,
            W::tag(b'b')
                .lsn(0x60)
                .lsn(0x70)
                .i64(7)
                .u32(XID)
                .cstr("gid-1"),
        ));
        v.push((
            c,
            W::tag(b'P')
                .u8(0)
                .lsn(0x60)
                .lsn(0x70)
                .i64(7)
                .u32(XID)
                .cstr("gid-1"),
        ));
        v.push((
            c,
            W::tag(b'K')
                .u8(0)
                .lsn(0x80)
                .lsn(0x90)
                .i64(8)
                .u32(XID)
                .cstr("gid-1"),
        ));
        v.push((
            c,
            W::tag(b'r')
                .u8(0)
                .lsn(0x70)
                .lsn(0xA0)
                .i64(7)
                .i64(9)
                .u32(XID)
                .cstr("gid-2"),
        ));
        v.push((
            c,
            W::tag(b'p')
                .u8(0)
                .lsn(0x60)
                .lsn(0x70)
                .i64(7)
                .u32(XID)
                .cstr("gid-3"),
        ));
        v
    }

    /// Parses `w`; the message borrows a buffer leaked for the test's sake.
    fn ok(w: &W, ctx: ParseContext) -> LogicalMessage<'static> {
        let buf: &'static Bytes = Box::leak(Box::new(w.bytes()));
        match parse(buf, ctx) {
            Ok(m) => m,
            Err(e) => panic!("{e} for {:?}", w.0),
        }
    }

    fn err(w: &W, ctx: ParseContext) -> DecodeError {
        match parse(&w.bytes(), ctx) {
            Ok(m) => panic!("{:?} parsed as {m:?}", w.0),
            Err(e) => e,
        }
    }

    fn check_tuple4(t: &TupleData, id: &str) {
        assert_eq!(t.len(), 4);
        assert!(!t.is_empty());
        let cols: Vec<_> = t.iter().collect();
        assert_eq!(
            cols,
            vec![
                TupleValue::Text(id.as_bytes()),
                TupleValue::Null,
                TupleValue::Unchanged,
                TupleValue::Binary(&[0, 1, 2]),
            ]
        );
    }

    #[test]
    fn every_sample_parses_to_its_kind() {
        for (ctx, w) in samples() {
            let m = ok(&w, ctx);
            let tag = w.0[0];
            assert_eq!(Some(m.kind()), kind_of_tag(tag), "{m:?}");
        }
    }

    #[test]
    fn begin_and_commit() {
        let LogicalMessage::Begin(b) = ok(
            &W::tag(b'B').lsn(0x16_B374_D848).i64(123_456).u32(777),
            v2(false),
        ) else {
            panic!()
        };
        assert_eq!(b.final_lsn, Lsn(0x16_B374_D848));
        assert_eq!((b.commit_time, b.xid), (123_456, 777));

        let LogicalMessage::Commit(c) =
            ok(&W::tag(b'C').u8(0).lsn(0x10).lsn(0x20).i64(-1), v2(false))
        else {
            panic!()
        };
        assert_eq!(c.flags, 0);
        assert_eq!((c.commit_lsn, c.end_lsn), (Lsn(0x10), Lsn(0x20)));
        assert_eq!(c.commit_time, -1);
    }

    #[test]
    fn origin_name_is_a_slice_of_the_input() {
        let buf = W::tag(b'O').lsn(0xABC).cstr("origin1").bytes();
        let LogicalMessage::Origin(o) = parse(&buf, v2(false)).unwrap() else {
            panic!()
        };
        assert_eq!(o.commit_lsn, Lsn(0xABC));
        assert_eq!(&o.name[..], b"origin1");
        assert_eq!(o.name.as_ptr(), buf[9..].as_ptr());
    }

    #[test]
    fn relation_in_and_out_of_stream() {
        for s in [false, true] {
            let buf = relation_bytes(s).bytes();
            let LogicalMessage::Relation(r) = parse(&buf, v2(s)).unwrap() else {
                panic!()
            };
            assert_eq!(r.xid, s.then_some(XID));
            assert_eq!(r.oid, 16384);
            assert_eq!(&r.namespace[..], b"public");
            assert_eq!(&r.name[..], b"items");
            assert_eq!(r.replica_identity, b'd');
            assert_eq!(r.columns.len(), 2);
            assert!(r.columns[0].is_key());
            assert_eq!(&r.columns[0].name[..], b"id");
            assert_eq!(
                (r.columns[0].type_oid, r.columns[0].type_modifier),
                (23, -1)
            );
            assert!(!r.columns[1].is_key());
            assert_eq!(&r.columns[1].name[..], b"price");
            assert_eq!(r.columns[1].type_modifier, 655366);
            // Zero-copy names.
            let base = buf.as_ptr() as usize;
            let end = base + buf.len();
            for b in [&r.namespace, &r.name, &r.columns[1].name] {
                let p = b.as_ptr() as usize;
                assert!(p >= base && p < end);
            }
        }
    }

    #[test]
    fn type_message() {
        let LogicalMessage::Type(t) = ok(
            &W::tag(b'Y').u32(XID).u32(99999).cstr("").cstr("mood"),
            v2(true),
        ) else {
            panic!()
        };
        assert_eq!(t.xid, Some(XID));
        assert_eq!(t.oid, 99999);
        assert!(
            t.namespace.is_empty(),
            "pg_catalog is sent as an empty name"
        );
        assert_eq!(&t.name[..], b"mood");
    }

    #[test]
    fn insert_in_and_out_of_stream() {
        for s in [false, true] {
            let LogicalMessage::Insert(i) = ok(&insert_bytes(s), v2(s)) else {
                panic!()
            };
            assert_eq!(i.xid, s.then_some(XID));
            assert_eq!(i.relation_oid, 16384);
            check_tuple4(&i.new, "42");
        }
    }

    #[test]
    fn stream_context_changes_the_layout() {
        // An Insert sent inside a stream block read as if outside: the xid is
        // taken for the relation oid and the marker check fails.
        let e = err(&insert_bytes(true), v2(false));
        assert_eq!((e.kind, e.offset), ("Insert", 5));
        // And the other way round.
        let e = err(&insert_bytes(false), v2(true));
        assert_eq!(e.kind, "Insert");
    }

    #[test]
    fn update_forms() {
        let LogicalMessage::Update(u) =
            ok(&W::tag(b'U').u32(16384).u8(b'N').tuple4("1"), v2(false))
        else {
            panic!()
        };
        assert!(u.old.is_none());
        assert_eq!(u.xid, None);
        check_tuple4(&u.new, "1");

        for (marker, full) in [(b'K', false), (b'O', true)] {
            let LogicalMessage::Update(u) = ok(
                &W::tag(b'U')
                    .u32(XID)
                    .u32(16384)
                    .u8(marker)
                    .tuple4("old")
                    .u8(b'N')
                    .tuple4("new"),
                v2(true),
            ) else {
                panic!()
            };
            assert_eq!(u.xid, Some(XID));
            let old = u.old.expect("old tuple");
            assert_eq!(matches!(old, OldTuple::Full(_)), full);
            check_tuple4(old.tuple(), "old");
            check_tuple4(&u.new, "new");
        }
    }

    #[test]
    fn delete_forms() {
        for (marker, full) in [(b'K', false), (b'O', true)] {
            let LogicalMessage::Delete(d) =
                ok(&W::tag(b'D').u32(16384).u8(marker).tuple4("9"), v2(false))
            else {
                panic!()
            };
            assert_eq!(matches!(d.old, OldTuple::Full(_)), full);
            check_tuple4(d.old.tuple(), "9");
        }
    }

    #[test]
    fn wrong_tuple_markers_are_errors() {
        let cases = [
            W::tag(b'I').u32(1).u8(b'K').tuple4("1"),
            W::tag(b'U').u32(1).u8(b'X').tuple4("1"),
            W::tag(b'U')
                .u32(1)
                .u8(b'K')
                .tuple4("1")
                .u8(b'K')
                .tuple4("1"),
            W::tag(b'D').u32(1).u8(b'N').tuple4("1"),
        ];
        for w in cases {
            let e = err(&w, v2(false));
            assert!(e.reason.contains("tuple marker"), "{e}");
        }
    }

    #[test]
    fn truncate_message() {
        let LogicalMessage::Truncate(t) = ok(
            &W::tag(b'T').u32(XID).i32(2).u8(3).u32(16384).u32(16390),
            v2(true),
        ) else {
            panic!()
        };
        assert_eq!(t.xid, Some(XID));
        assert_eq!(t.options, 3);
        assert_eq!(t.relation_oids, vec![16384, 16390]);

        let LogicalMessage::Truncate(t) = ok(&W::tag(b'T').i32(0).u8(0), v2(false)) else {
            panic!()
        };
        assert!(t.relation_oids.is_empty());
    }

    #[test]
    fn logical_message_content_is_zero_copy() {
        let w = W::tag(b'M')
            .u8(1)
            .lsn(0x1_2345)
            .cstr("pfx")
            .i32(2)
            .raw(b"hi");
        let buf = w.bytes();
        let LogicalMessage::Message(m) = parse(&buf, v2(false)).unwrap() else {
            panic!()
        };
        assert_eq!(m.xid, None);
        assert!(m.is_transactional());
        assert_eq!(m.lsn, Lsn(0x1_2345));
        assert_eq!(&m.prefix[..], b"pfx");
        assert_eq!(&m.content[..], b"hi");
        assert_eq!(m.content.as_ptr(), buf[buf.len() - 2..].as_ptr());

        let LogicalMessage::Message(m) =
            ok(&W::tag(b'M').u32(5).u8(0).lsn(1).cstr("").i32(0), v2(true))
        else {
            panic!()
        };
        assert_eq!(m.xid, Some(5));
        assert!(!m.is_transactional());
        assert!(m.prefix.is_empty() && m.content.is_empty());
    }

    #[test]
    fn stream_control_messages() {
        let LogicalMessage::StreamStart(s) = ok(&W::tag(b'S').u32(XID).u8(1), v2(false)) else {
            panic!()
        };
        assert_eq!((s.xid, s.first_segment), (XID, true));
        let LogicalMessage::StreamStart(s) = ok(&W::tag(b'S').u32(XID).u8(0), v2(false)) else {
            panic!()
        };
        assert!(!s.first_segment);

        assert!(matches!(
            ok(&W::tag(b'E'), v2(true)),
            LogicalMessage::StreamStop
        ));

        let LogicalMessage::StreamCommit(c) = ok(
            &W::tag(b'c').u32(XID).u8(0).lsn(0x30).lsn(0x40).i64(5),
            v2(false),
        ) else {
            panic!()
        };
        assert_eq!(c.xid, XID);
        assert_eq!(
            (c.commit_lsn, c.end_lsn, c.commit_time),
            (Lsn(0x30), Lsn(0x40), 5)
        );
    }

    #[test]
    fn stream_abort_layout_depends_on_version_and_mode() {
        let short = W::tag(b'A').u32(XID).u32(XID + 1);
        let long = W::tag(b'A').u32(XID).u32(XID).lsn(0x50).i64(6);

        // v2, v3, and v4 without parallel streaming: xid and subxid only.
        for ctx in [
            v2(false),
            ParseContext {
                proto_version: 3,
                parallel_stream_abort: true,
                ..v2(false)
            },
            ParseContext::new(4),
        ] {
            let LogicalMessage::StreamAbort(a) = ok(&short, ctx) else {
                panic!()
            };
            assert_eq!((a.xid, a.subxid), (XID, XID + 1));
            assert_eq!((a.abort_lsn, a.abort_time), (None, None));
            assert!(err(&long, ctx).reason.contains("trailing"));
        }

        let LogicalMessage::StreamAbort(a) = ok(&long, v4_parallel()) else {
            panic!()
        };
        assert_eq!((a.xid, a.subxid), (XID, XID));
        assert_eq!((a.abort_lsn, a.abort_time), (Some(Lsn(0x50)), Some(6)));
        assert_eq!(err(&short, v4_parallel()).kind, "StreamAbort");
    }

    #[test]
    fn two_phase_messages() {
        let LogicalMessage::BeginPrepare(b) = ok(
            &W::tag(b'b')
                .lsn(0x60)
                .lsn(0x70)
                .i64(7)
                .u32(XID)
                .cstr("gid-1"),
            ParseContext::new(3),
        ) else {
            panic!()
        };
        assert_eq!((b.prepare_lsn, b.end_lsn), (Lsn(0x60), Lsn(0x70)));
        assert_eq!((b.prepare_time, b.xid), (7, XID));
        assert_eq!(&b.gid[..], b"gid-1");

        for t in [b'P', b'p'] {
            let m = ok(
                &W::tag(t)
                    .u8(0)
                    .lsn(0x60)
                    .lsn(0x70)
                    .i64(7)
                    .u32(XID)
                    .cstr("g"),
                ParseContext::new(3),
            );
            let p = match (t, m) {
                (b'P', LogicalMessage::Prepare(p)) => p,
                (b'p', LogicalMessage::StreamPrepare(p)) => p,
                (_, m) => panic!("{m:?}"),
            };
            assert_eq!(
                (p.flags, p.prepare_lsn, p.end_lsn),
                (0, Lsn(0x60), Lsn(0x70))
            );
            assert_eq!((p.prepare_time, p.xid, &p.gid[..]), (7, XID, &b"g"[..]));
        }

        let LogicalMessage::CommitPrepared(c) = ok(
            &W::tag(b'K')
                .u8(0)
                .lsn(0x80)
                .lsn(0x90)
                .i64(8)
                .u32(XID)
                .cstr("gid-1"),
            ParseContext::new(3),
        ) else {
            panic!()
        };
        assert_eq!(
            (c.commit_lsn, c.end_lsn, c.commit_time),
            (Lsn(0x80), Lsn(0x90), 8)
        );
        assert_eq!((c.xid, &c.gid[..]), (XID, &b"gid-1"[..]));

        let LogicalMessage::RollbackPrepared(r) = ok(
            &W::tag(b'r')
                .u8(0)
                .lsn(0x70)
                .lsn(0xA0)
                .i64(7)
                .i64(9)
                .u32(XID)
                .cstr("gid-2"),
            ParseContext::new(3),
        ) else {
            panic!()
        };
        assert_eq!(
            (r.prepare_end_lsn, r.rollback_end_lsn),
            (Lsn(0x70), Lsn(0xA0))
        );
        assert_eq!((r.prepare_time, r.rollback_time), (7, 9));
        assert_eq!((r.xid, &r.gid[..]), (XID, &b"gid-2"[..]));
    }

    #[test]
    fn every_truncation_of_every_kind_is_an_error() {
        for (ctx, w) in samples() {
            let kind = kind_of_tag(w.0[0]).unwrap();
            for n in 0..w.0.len() {
                let buf = Bytes::copy_from_slice(&w.0[..n]);
                let e = match parse(&buf, ctx) {
                    Ok(m) => panic!("{kind} prefix of {n} bytes parsed as {m:?}"),
                    Err(e) => e,
                };
                if n == 0 {
                    assert_eq!(e.kind, "unknown");
                } else {
                    assert_eq!(e.kind, kind, "{e}");
                    assert!(e.offset <= n, "{e} (prefix {n})");
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for (ctx, w) in samples() {
            let e = err(&w.clone().u8(0), ctx);
            assert_eq!(e.offset, w.0.len(), "{e}");
            assert!(e.reason.contains("trailing"), "{e}");
            assert_eq!(Some(e.kind), kind_of_tag(w.0[0]));
        }
    }

    #[test]
    fn unknown_tag_and_empty_message() {
        let e = err(&W::tag(b'Z').u32(1), v2(false));
        assert_eq!((e.kind, e.offset), ("unknown", 0));
        assert!(e.reason.contains("'Z'"), "{e}");
        let e = err(&W::default(), v2(false));
        assert_eq!((e.kind, e.offset), ("unknown", 0));
    }

    #[test]
    fn negative_column_count() {
        let e = err(&W::tag(b'I').u32(1).u8(b'N').i16(-1), v2(false));
        assert_eq!((e.kind, e.offset), ("Insert", 6));
        assert!(e.reason.contains("negative column count"), "{e}");

        let e = err(
            &W::tag(b'R')
                .u32(1)
                .cstr("s")
                .cstr("t")
                .u8(b'd')
                .i16(i16::MIN),
            v2(false),
        );
        assert_eq!(e.kind, "Relation");
        assert!(e.reason.contains("negative column count"), "{e}");
    }

    #[test]
    fn negative_and_oversized_lengths() {
        for kind in [b't', b'b'] {
            let e = err(
                &W::tag(b'I').u32(1).u8(b'N').i16(1).u8(kind).i32(-1),
                v2(false),
            );
            assert_eq!((e.kind, e.offset), ("Insert", 9));
            assert!(e.reason.contains("negative"), "{e}");

            for len in [4, 1000, i32::MAX] {
                let e = err(
                    &W::tag(b'I')
                        .u32(1)
                        .u8(b'N')
                        .i16(1)
                        .u8(kind)
                        .i32(len)
                        .raw(b"abc"),
                    v2(false),
                );
                assert_eq!((e.kind, e.offset), ("Insert", 9));
                assert!(e.reason.contains("exceeds"), "{e}");
            }
        }

        let e = err(&W::tag(b'M').u8(0).lsn(1).cstr("p").i32(-5), v2(false));
        assert_eq!((e.kind, e.offset), ("Message", 12));
        assert!(e.reason.contains("negative"), "{e}");
        let e = err(
            &W::tag(b'M').u8(0).lsn(1).cstr("p").i32(i32::MAX).raw(b"x"),
            v2(false),
        );
        assert!(e.reason.contains("exceeds"), "{e}");

        let e = err(&W::tag(b'T').i32(-1).u8(0), v2(false));
        assert_eq!((e.kind, e.offset), ("Truncate", 1));
        assert!(e.reason.contains("negative"), "{e}");
    }

    #[test]
    fn huge_counts_are_rejected_before_allocating() {
        let e = err(&W::tag(b'T').i32(i32::MAX).u8(0).u32(1), v2(false));
        assert!(e.reason.contains("cannot fit"), "{e}");
        let e = err(
            &W::tag(b'R')
                .u32(1)
                .cstr("s")
                .cstr("t")
                .u8(b'd')
                .i16(i16::MAX)
                .u8(0)
                .cstr("a")
                .u32(23)
                .i32(-1),
            v2(false),
        );
        assert!(e.reason.contains("cannot fit"), "{e}");
        // A tuple claiming 32767 columns over 3 bytes.
        let e = err(
            &W::tag(b'I').u32(1).u8(b'N').i16(i16::MAX).raw(b"nnn"),
            v2(false),
        );
        assert_eq!((e.kind, e.offset), ("Insert", 11));
    }

    #[test]
    fn unknown_column_kind() {
        let e = err(
            &W::tag(b'I').u32(1).u8(b'N').i16(2).u8(b'n').u8(b'x'),
            v2(false),
        );
        assert_eq!((e.kind, e.offset), ("Insert", 9));
        assert!(e.reason.contains("unknown column kind"), "{e}");
    }

    #[test]
    fn missing_nul_is_an_error() {
        let e = err(&W::tag(b'O').lsn(1).raw(b"abc"), v2(false));
        assert_eq!((e.kind, e.offset), ("Origin", 9));
        assert!(e.reason.contains("NUL"), "{e}");
    }

    #[test]
    fn empty_tuple() {
        let LogicalMessage::Insert(i) = ok(&W::tag(b'I').u32(1).u8(b'N').i16(0), v2(false)) else {
            panic!()
        };
        assert!(i.new.is_empty());
        assert_eq!(i.new.iter().count(), 0);
        assert!(i.new.raw().is_empty());
    }

    #[test]
    fn tuple_iter_is_fused_and_borrows_the_input() {
        let buf = insert_bytes(false).bytes();
        let LogicalMessage::Insert(i) = parse(&buf, v2(false)).unwrap() else {
            panic!()
        };
        let mut it = i.new.iter();
        assert_eq!(it.size_hint(), (0, Some(4)));
        let Some(TupleValue::Text(v)) = it.next() else {
            panic!()
        };
        assert_eq!(v.as_ptr(), buf[13..].as_ptr());
        assert_eq!(it.by_ref().count(), 3);
        assert_eq!(it.next(), None);
        assert_eq!((&i.new).into_iter().count(), 4);
    }

    #[test]
    fn tuple_iter_stops_on_short_bytes() {
        // TupleData can only come from the parser, but the iterator must not
        // panic even if its bytes were short or wrong.
        for data in [
            &b""[..],
            b"t\0\0",
            b"t\0\0\0\x09abc",
            b"t\xff\xff\xff\xffabc",
            b"n?",
        ] {
            let t = TupleData { ncols: 3, data };
            assert!(t.iter().count() < 3);
            let mut it = t.iter();
            while it.next().is_some() {}
            assert_eq!(it.next(), None);
        }
    }

    #[test]
    fn observe_tracks_stream_blocks() {
        let mut ctx = ParseContext::new(2);
        let start = ok(&W::tag(b'S').u32(XID).u8(1), ctx);
        ctx.observe(&start);
        assert!(ctx.in_stream);
        let ins = ok(&insert_bytes(true), ctx);
        ctx.observe(&ins);
        assert!(ctx.in_stream);
        ctx.observe(&ok(&W::tag(b'E'), ctx));
        assert!(!ctx.in_stream);
    }

    #[test]
    fn split_capture_reads_records() {
        let mut v = Vec::new();
        for (lsn, msg) in [(1u64, &b"E"[..]), (2, b"")] {
            v.extend_from_slice(&lsn.to_be_bytes());
            v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            v.extend_from_slice(msg);
        }
        let buf = Bytes::from(v);
        let recs = split_capture(&buf).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!((recs[0].0, &recs[0].1[..]), (Lsn(1), &b"E"[..]));
        assert!(recs[1].1.is_empty());
        for n in 1..buf.len() {
            if n == 13 {
                continue; // a whole first record
            }
            assert!(split_capture(&buf.slice(..n)).is_err(), "{n}");
        }
    }

    /// Deterministic xorshift64.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_mutations_never_panic() {
        let samples = samples();
        let ctxs = [
            v2(false),
            v2(true),
            ParseContext::new(1),
            ParseContext::new(3),
            v4_parallel(),
        ];
        let interesting = [
            0u8, 0xff, 0x7f, 0x80, b'n', b'u', b't', b'b', b'N', b'K', b'O',
        ];
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let mut parsed = 0usize;
        for _ in 0..300_000 {
            let (_, w) = &samples[rng.below(samples.len())];
            let mut m = w.0.clone();
            for _ in 0..1 + rng.below(3) {
                match rng.below(6) {
                    0 | 1 if !m.is_empty() => {
                        let at = rng.below(m.len());
                        m[at] = rng.next() as u8;
                    }
                    2 if !m.is_empty() => {
                        let at = rng.below(m.len());
                        m[at] = interesting[rng.below(interesting.len())];
                    }
                    3 => m.truncate(rng.below(m.len() + 1)),
                    4 => {
                        let at = rng.below(m.len() + 1);
                        m.insert(at, rng.next() as u8);
                    }
                    _ if !m.is_empty() => {
                        let at = rng.below(m.len());
                        m.remove(at);
                    }
                    _ => {}
                }
            }
            let ctx = ctxs[rng.below(ctxs.len())];
            let buf = Bytes::from(m);
            if let Ok(msg) = parse(&buf, ctx) {
                parsed += 1;
                // Whatever parsed must iterate to exactly its column count.
                let tuples: Vec<&TupleData> = match &msg {
                    LogicalMessage::Insert(i) => vec![&i.new],
                    LogicalMessage::Update(u) => {
                        let mut v = vec![&u.new];
                        v.extend(u.old.as_ref().map(OldTuple::tuple));
                        v
                    }
                    LogicalMessage::Delete(d) => vec![d.old.tuple()],
                    _ => vec![],
                };
                for t in tuples {
                    assert_eq!(t.iter().count(), t.len(), "{msg:?}");
                }
            }
        }
        // The mutations must not be so wild that nothing ever parses.
        assert!(parsed > 1000, "only {parsed} mutants parsed");
    }
}
