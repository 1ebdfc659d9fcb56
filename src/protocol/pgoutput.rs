//! pgoutput logical replication messages (protocol versions 1 to 4).
//!
//! CONTRACT: the types and signatures below are fixed (other code is written
//! against them). The bodies marked `todo!()` are to be implemented.

use bytes::Bytes;

use super::DecodeError;
use crate::lsn::Lsn;

/// Microseconds since 2000-01-01 00:00:00 UTC, as Postgres sends timestamps.
pub type PgTimestamp = i64;

/// What the parser must know that the bytes alone do not say.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseContext {
    /// Between Stream Start and Stream Stop: Relation, Type, Insert, Update,
    /// Delete, Truncate and Message then carry a leading transaction id.
    pub in_stream: bool,
    /// The negotiated `proto_version` (1..=4). Version 4 adds the abort LSN and
    /// time to Stream Abort when parallel streaming is on; pass
    /// `parallel_stream_abort` to say whether those fields are present.
    pub proto_version: u32,
    /// `streaming 'parallel'` was requested (v4): Stream Abort carries abort_lsn and abort_time.
    pub parallel_stream_abort: bool,
}

/// One pgoutput message.
#[derive(Debug, Clone)]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMessage),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
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
    /// The final LSN of the transaction (its commit record's end... as sent by the server).
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

#[derive(Debug, Clone)]
pub struct Insert {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    pub new: TupleData,
}

#[derive(Debug, Clone)]
pub struct Update {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    /// The old tuple: `K` (key columns only) or `O` (the whole old row), if sent.
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

#[derive(Debug, Clone)]
pub struct Delete {
    pub xid: Option<u32>,
    pub relation_oid: u32,
    /// A delete always carries `K` or `O`.
    pub old: OldTuple,
}

#[derive(Debug, Clone)]
pub enum OldTuple {
    /// `K`: only the replica identity columns carry values; others are null.
    Key(TupleData),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

impl OldTuple {
    pub fn tuple(&self) -> &TupleData {
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
/// slice of the input. Iterating it allocates nothing.
#[derive(Debug, Clone)]
pub struct TupleData {
    /// Number of columns (Int16 on the wire, never negative after validation).
    ncols: u16,
    /// The bytes of the column entries, right after the Int16 count.
    data: Bytes,
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

impl TupleData {
    pub fn len(&self) -> usize {
        self.ncols as usize
    }

    pub fn is_empty(&self) -> bool {
        self.ncols == 0
    }

    /// The columns in order. Infallible: the layout was validated by the parser.
    pub fn iter(&self) -> TupleIter<'_> {
        todo!()
    }
}

/// Iterator over the columns of a [`TupleData`].
pub struct TupleIter<'a> {
    _rest: &'a [u8],
    _left: u16,
}

impl<'a> Iterator for TupleIter<'a> {
    type Item = TupleValue<'a>;
    fn next(&mut self) -> Option<TupleValue<'a>> {
        todo!()
    }
}

/// Parses one pgoutput message: the payload of one XLogData.
pub fn parse(buf: &Bytes, ctx: ParseContext) -> Result<LogicalMessage, DecodeError> {
    let _ = (buf, ctx);
    todo!()
}
