//! The CopyBoth sub-protocol a walsender speaks after `START_REPLICATION`.
//!
//! Once streaming starts, both sides exchange CopyData (`d`) messages. Each
//! one the server sends starts with a Byte1 tag:
//!
//! - `w` XLogData: Int64 WAL start, Int64 WAL end, Int64 send time, then the
//!   data. For logical replication the data is exactly one pgoutput message
//!   (see [`super::pgoutput`]).
//! - `k` Primary keepalive: Int64 WAL end, Int64 send time, Byte1 "reply
//!   requested" (1 means answer at once or risk a `wal_sender_timeout`).
//!
//! The client answers with a Standby Status Update (`r`) inside its own
//! CopyData frame, written by [`write_standby_status_update`].
//!
//! Times are microseconds since 2000-01-01 00:00:00 UTC. All integers are
//! big-endian.
//!
//! Invariants: [`parse_copy_data`] never panics, checks every field against the
//! bytes really there, rejects trailing bytes and unknown tags with a
//! [`DecodeError`] naming the message kind and offset, and hands out the
//! XLogData payload as a zero-copy slice of the CopyData payload.

use bytes::{BufMut, Bytes, BytesMut};

use super::cursor::Cursor;
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

/// Tag of XLogData.
pub const TAG_XLOG_DATA: u8 = b'w';
/// Tag of Primary keepalive.
pub const TAG_PRIMARY_KEEPALIVE: u8 = b'k';
/// Tag of Standby Status Update.
pub const TAG_STANDBY_STATUS_UPDATE: u8 = b'r';

/// Bytes before the payload of an XLogData: tag and three Int64s.
pub const XLOG_DATA_HEADER_LEN: usize = 1 + 8 + 8 + 8;

/// Length of a whole CopyData frame holding a Standby Status Update:
/// `d`, Int32 length, `r`, four Int64s, Byte1.
pub const STANDBY_STATUS_UPDATE_FRAME_LEN: usize = 1 + 4 + 1 + 8 * 4 + 1;

/// Parses the payload of one CopyData message from the walsender.
pub fn parse_copy_data(buf: Bytes) -> Result<ReplicationMessage, DecodeError> {
    let mut c = Cursor::new(&buf, "unknown");
    let t = c.u8("tag")?;
    let msg = match t {
        TAG_XLOG_DATA => {
            c.set_kind("XLogData");
            ReplicationMessage::XLogData {
                wal_start: c.lsn("WAL start")?,
                wal_end: c.lsn("WAL end")?,
                send_time: c.i64("send time")?,
                data: c.rest_bytes(),
            }
        }
        TAG_PRIMARY_KEEPALIVE => {
            c.set_kind("PrimaryKeepalive");
            ReplicationMessage::PrimaryKeepalive {
                wal_end: c.lsn("WAL end")?,
                send_time: c.i64("send time")?,
                reply_requested: c.u8("reply requested")? != 0,
            }
        }
        other => {
            return Err(c.error_at(
                0,
                format!(
                    "unknown replication message tag {:?} (0x{other:02x})",
                    other as char
                ),
            ))
        }
    };
    c.finish()?;
    Ok(msg)
}

/// Appends a complete CopyData('d') frame holding a Standby Status Update (`r`).
/// `now` is microseconds since 2000-01-01 UTC.
///
/// `write`, `flush` and `apply` are the positions received, durably stored and
/// applied downstream; the server may recycle WAL up to `flush`.
pub fn write_standby_status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now: i64,
    reply_requested: bool,
    out: &mut BytesMut,
) {
    out.reserve(STANDBY_STATUS_UPDATE_FRAME_LEN);
    out.put_u8(b'd');
    // The CopyData length counts itself but not the 'd'.
    out.put_i32((STANDBY_STATUS_UPDATE_FRAME_LEN - 1) as i32);
    out.put_u8(TAG_STANDBY_STATUS_UPDATE);
    out.put_u64(write.0);
    out.put_u64(flush.0);
    out.put_u64(apply.0);
    out.put_i64(now);
    out.put_u8(reply_requested as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xlog_data(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![b'w'];
        v.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        v.extend_from_slice(&0x1_0000_0020u64.to_be_bytes());
        v.extend_from_slice(&777i64.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn keepalive(reply: u8) -> Vec<u8> {
        let mut v = vec![b'k'];
        v.extend_from_slice(&0x2_0000_0000u64.to_be_bytes());
        v.extend_from_slice(&(-5i64).to_be_bytes());
        v.push(reply);
        v
    }

    #[test]
    fn xlog_data_payload_is_a_zero_copy_slice() {
        let buf = Bytes::from(xlog_data(b"Bpayload"));
        let ptr = buf.as_ptr();
        match parse_copy_data(buf).unwrap() {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            } => {
                assert_eq!(wal_start, Lsn(0x1_0000_0010));
                assert_eq!(wal_end, Lsn(0x1_0000_0020));
                assert_eq!(send_time, 777);
                assert_eq!(&data[..], b"Bpayload");
                assert_eq!(data.as_ptr(), ptr.wrapping_add(XLOG_DATA_HEADER_LEN));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn xlog_data_may_be_empty() {
        let buf = Bytes::from(xlog_data(b""));
        match parse_copy_data(buf).unwrap() {
            ReplicationMessage::XLogData { data, .. } => assert!(data.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keepalive_round_trip() {
        for (byte, want) in [(0u8, false), (1, true)] {
            match parse_copy_data(Bytes::from(keepalive(byte))).unwrap() {
                ReplicationMessage::PrimaryKeepalive {
                    wal_end,
                    send_time,
                    reply_requested,
                } => {
                    assert_eq!(wal_end, Lsn(0x2_0000_0000));
                    assert_eq!(send_time, -5);
                    assert_eq!(reply_requested, want);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let x = xlog_data(b"");
        for n in 0..x.len() {
            let e = parse_copy_data(Bytes::copy_from_slice(&x[..n])).unwrap_err();
            if n > 0 {
                assert_eq!(e.kind, "XLogData");
                assert!(e.offset <= n && e.offset >= 1, "{e}");
            }
        }
        let k = keepalive(1);
        for n in 0..k.len() {
            let e = parse_copy_data(Bytes::copy_from_slice(&k[..n])).unwrap_err();
            if n > 0 {
                assert_eq!(e.kind, "PrimaryKeepalive");
            }
        }
    }

    #[test]
    fn keepalive_with_trailing_bytes_is_an_error() {
        let mut k = keepalive(0);
        k.push(9);
        let e = parse_copy_data(Bytes::from(k)).unwrap_err();
        assert_eq!(e.kind, "PrimaryKeepalive");
        assert_eq!(e.offset, 18);
        assert!(e.reason.contains("trailing"), "{}", e.reason);
    }

    #[test]
    fn unknown_and_empty_are_errors() {
        let e = parse_copy_data(Bytes::from_static(b"zzz")).unwrap_err();
        assert_eq!((e.kind, e.offset), ("unknown", 0));
        let e = parse_copy_data(Bytes::new()).unwrap_err();
        assert_eq!((e.kind, e.offset), ("unknown", 0));
    }

    #[test]
    fn standby_status_update_frame_layout() {
        let mut out = BytesMut::from(&b"prefix"[..]);
        write_standby_status_update(
            Lsn(0x0102_0304_0506_0708),
            Lsn(0x10),
            Lsn(0x20),
            0x7766_5544_3322_1100,
            true,
            &mut out,
        );
        let mut want = b"prefix".to_vec();
        want.push(b'd');
        want.extend_from_slice(&38i32.to_be_bytes());
        want.push(b'r');
        want.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        want.extend_from_slice(&0x10u64.to_be_bytes());
        want.extend_from_slice(&0x20u64.to_be_bytes());
        want.extend_from_slice(&0x7766_5544_3322_1100i64.to_be_bytes());
        want.push(1);
        assert_eq!(&out[..], &want[..]);
        assert_eq!(out.len() - 6, STANDBY_STATUS_UPDATE_FRAME_LEN);

        let mut out = BytesMut::new();
        write_standby_status_update(Lsn::ZERO, Lsn::ZERO, Lsn::ZERO, 0, false, &mut out);
        assert_eq!(out.last(), Some(&0));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let bases = [xlog_data(b"Bxyz"), keepalive(1)];
        for i in 0..20_000 {
            let mut m = bases[i % 2].clone();
            let r = next();
            match r % 3 {
                0 => {
                    let at = (next() as usize) % m.len();
                    m[at] = next() as u8;
                }
                1 => m.truncate((next() as usize) % (m.len() + 1)),
                _ => m.push(next() as u8),
            }
            let _ = parse_copy_data(Bytes::from(m));
        }
    }
}
