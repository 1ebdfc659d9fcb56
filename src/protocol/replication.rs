//! CONTRACT STUB for the CopyBoth replication sub-protocol.

use bytes::{Bytes, BytesMut};

use super::DecodeError;
use crate::lsn::Lsn;

/// A message the walsender sends inside CopyData.
#[derive(Debug, Clone)]
pub enum ReplicationMessage {
    /// `w`: a chunk of WAL; for logical replication, exactly one pgoutput message.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        send_time: i64,
        data: Bytes,
    },
    /// `k`: the server's position; when `reply_requested`, answer at once.
    PrimaryKeepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

/// Parses the payload of one CopyData message from the walsender.
pub fn parse_copy_data(buf: Bytes) -> Result<ReplicationMessage, DecodeError> {
    let _ = buf;
    todo!()
}

/// Appends a complete CopyData('d') frame holding a Standby Status Update (`r`).
/// `now` is microseconds since 2000-01-01 UTC.
pub fn write_standby_status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now: i64,
    reply_requested: bool,
    out: &mut BytesMut,
) {
    let _ = (write, flush, apply, now, reply_requested, out);
    todo!()
}
