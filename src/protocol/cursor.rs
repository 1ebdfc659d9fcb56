//! Bounds-checked reading of big-endian wire fields, and [`DecodeError`].
//!
//! A [`Cursor`] walks one message from front to back. Every read first checks
//! that the bytes it needs are really there, so a short or lying message turns
//! into a [`DecodeError`] (naming the message kind and the offset of the field
//! that did not fit) and never into a panic or an out-of-bounds access.
//!
//! Strings and byte runs come back as [`Bytes`] slices of the message the
//! cursor was built over: the payload is shared, never copied. A cursor built
//! over a plain `&[u8]` has no buffer to share and copies instead.

use bytes::Bytes;

use crate::lsn::Lsn;

/// A message could not be parsed. Names the message kind and the byte offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {kind} message at byte {offset}: {reason}")]
pub struct DecodeError {
    /// The message kind, such as "Insert" or "XLogData" ("unknown" if the tag itself is bad).
    pub kind: &'static str,
    /// Offset into the message where the problem was found.
    pub offset: usize,
    /// What was wrong.
    pub reason: String,
}

impl DecodeError {
    /// Builds an error. Kept out of line: errors are the cold path.
    #[cold]
    #[inline(never)]
    pub(crate) fn new(kind: &'static str, offset: usize, reason: impl Into<String>) -> DecodeError {
        DecodeError {
            kind,
            offset,
            reason: reason.into(),
        }
    }
}

/// A read position inside one message.
///
/// Invariant: `rest` is always a suffix of the message, so the current offset
/// is `len - rest.len()` and can never run past the end.
#[derive(Debug, Clone)]
pub(crate) struct Cursor<'a> {
    /// The message being read, when it is a shared buffer (for zero-copy slices).
    owner: Option<&'a Bytes>,
    /// Total length of the message.
    len: usize,
    /// The bytes not read yet.
    rest: &'a [u8],
    /// The message kind named in errors.
    kind: &'static str,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`; byte runs it returns share `buf`.
    #[inline]
    pub(crate) fn new(buf: &'a Bytes, kind: &'static str) -> Cursor<'a> {
        Cursor {
            owner: Some(buf),
            len: buf.len(),
            rest: buf.as_ref(),
            kind,
        }
    }

    /// A cursor over a plain slice; byte runs it returns are copies.
    #[allow(dead_code)] // the crate's parsers all hold `Bytes`; kept for slice callers and tests
    pub(crate) fn from_slice(buf: &'a [u8], kind: &'static str) -> Cursor<'a> {
        Cursor {
            owner: None,
            len: buf.len(),
            rest: buf,
            kind,
        }
    }

    /// Changes the kind named in later errors (once the tag is known).
    #[inline]
    pub(crate) fn set_kind(&mut self, kind: &'static str) {
        self.kind = kind;
    }

    /// Offset of the next unread byte.
    #[inline]
    pub(crate) fn offset(&self) -> usize {
        self.len - self.rest.len()
    }

    /// The bytes not read yet, without consuming them.
    #[inline]
    pub(crate) fn remaining(&self) -> &'a [u8] {
        self.rest
    }

    /// An error of this message's kind at `offset`.
    #[cold]
    #[inline(never)]
    pub(crate) fn error_at(&self, offset: usize, reason: impl Into<String>) -> DecodeError {
        DecodeError::new(self.kind, offset, reason)
    }

    /// An error of this message's kind at the current offset.
    #[cold]
    #[inline(never)]
    pub(crate) fn error(&self, reason: impl Into<String>) -> DecodeError {
        self.error_at(self.offset(), reason)
    }

    #[cold]
    #[inline(never)]
    fn truncated(&self, what: &str, need: usize) -> DecodeError {
        self.error(format!(
            "truncated: {what} needs {need} bytes, {} left",
            self.rest.len()
        ))
    }

    #[inline]
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            None => Err(self.truncated(what, N)),
        }
    }

    /// A Byte1 / Int8.
    #[inline]
    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        match self.rest.split_first() {
            Some((&b, tail)) => {
                self.rest = tail;
                Ok(b)
            }
            None => Err(self.truncated(what, 1)),
        }
    }

    /// A signed Int16.
    #[inline]
    pub(crate) fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        self.array(what).map(i16::from_be_bytes)
    }

    /// A signed Int32.
    #[inline]
    pub(crate) fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    /// An Int32 read as unsigned (OIDs, transaction ids).
    #[inline]
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    /// A signed Int64 (timestamps).
    #[inline]
    pub(crate) fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    /// An Int64 WAL position.
    #[inline]
    pub(crate) fn lsn(&mut self, what: &str) -> Result<Lsn, DecodeError> {
        self.array(what).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// An Int32 length that must be non-negative and fit in what is left.
    #[inline]
    pub(crate) fn len_i32(&mut self, what: &str) -> Result<usize, DecodeError> {
        let at = self.offset();
        let n = self.i32(what)?;
        if n < 0 {
            return Err(self.error_at(at, format!("negative {what} {n}")));
        }
        let n = n as usize;
        if n > self.rest.len() {
            return Err(self.error_at(
                at,
                format!("{what} {n} exceeds the {} bytes left", self.rest.len()),
            ));
        }
        Ok(n)
    }

    /// The next `n` bytes, borrowed.
    #[inline]
    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if n > self.rest.len() {
            return Err(self.truncated(what, n));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// The next `n` bytes as a slice of the message (a copy for slice cursors).
    #[inline]
    pub(crate) fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes, DecodeError> {
        let start = self.offset();
        let raw = self.take(n, what)?;
        Ok(self.share(start, raw))
    }

    /// A NUL-terminated string, without its NUL, borrowed.
    #[inline]
    pub(crate) fn cstr_raw(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let Some(nul) = memchr::memchr(0, self.rest) else {
            return Err(self.error(format!("{what} has no terminating NUL")));
        };
        let (Some(s), Some(tail)) = (self.rest.get(..nul), self.rest.get(nul + 1..)) else {
            return Err(self.error(format!("{what} has no terminating NUL")));
        };
        self.rest = tail;
        Ok(s)
    }

    /// A NUL-terminated string, without its NUL, as a slice of the message.
    #[inline]
    pub(crate) fn cstr(&mut self, what: &str) -> Result<Bytes, DecodeError> {
        let start = self.offset();
        let raw = self.cstr_raw(what)?;
        Ok(self.share(start, raw))
    }

    /// Everything not read yet, as a slice of the message; the cursor ends up empty.
    #[inline]
    pub(crate) fn rest_bytes(&mut self) -> Bytes {
        let start = self.offset();
        let raw = std::mem::take(&mut self.rest);
        self.share(start, raw)
    }

    #[inline]
    fn share(&self, start: usize, raw: &[u8]) -> Bytes {
        match self.owner {
            Some(owner) => owner.slice(start..start + raw.len()),
            None => Bytes::copy_from_slice(raw),
        }
    }

    /// Succeeds only if the whole message was consumed.
    #[inline]
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.error(format!(
                "{} trailing bytes after a complete message",
                self.rest.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_big_endian_fields_in_order() {
        let mut v = vec![7u8];
        v.extend_from_slice(&(-2i16).to_be_bytes());
        v.extend_from_slice(&(-3i32).to_be_bytes());
        v.extend_from_slice(&0xDEAD_BEEFu32.to_be_bytes());
        v.extend_from_slice(&(-4i64).to_be_bytes());
        v.extend_from_slice(&0x16_B374_D848u64.to_be_bytes());
        v.extend_from_slice(b"name\0");
        v.extend_from_slice(&3i32.to_be_bytes());
        v.extend_from_slice(b"xyz");
        v.extend_from_slice(b"tail");
        let buf = Bytes::from(v);
        let mut c = Cursor::new(&buf, "Test");
        assert_eq!(c.u8("a").unwrap(), 7);
        assert_eq!(c.i16("b").unwrap(), -2);
        assert_eq!(c.i32("c").unwrap(), -3);
        assert_eq!(c.u32("d").unwrap(), 0xDEAD_BEEF);
        assert_eq!(c.i64("e").unwrap(), -4);
        assert_eq!(c.lsn("f").unwrap(), Lsn(0x16_B374_D848));
        let name = c.cstr("g").unwrap();
        assert_eq!(&name[..], b"name");
        // Zero-copy: the string points into the original buffer.
        assert_eq!(name.as_ptr(), buf[27..].as_ptr());
        let n = c.len_i32("h").unwrap();
        assert_eq!(&c.bytes(n, "i").unwrap()[..], b"xyz");
        assert!(c.finish().is_err());
        assert_eq!(&c.rest_bytes()[..], b"tail");
        c.finish().unwrap();
    }

    #[test]
    fn short_reads_fail_with_kind_and_offset() {
        let buf = Bytes::from_static(&[1, 2, 3]);
        let mut c = Cursor::new(&buf, "Insert");
        c.u8("tag").unwrap();
        let e = c.i32("oid").unwrap_err();
        assert_eq!(e.kind, "Insert");
        assert_eq!(e.offset, 1);
        assert!(e.reason.contains("oid"), "{}", e.reason);
        // A failed read consumes nothing.
        assert_eq!(c.i16("x").unwrap(), 0x0203);
        assert!(c.u8("y").is_err());
        assert!(c.i64("z").is_err());
        assert!(c.take(1, "w").is_err());
        assert!(c.take(0, "w").is_ok());
    }

    #[test]
    fn lengths_are_checked_against_what_is_left() {
        let buf = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]);
        let e = Cursor::new(&buf, "Message").len_i32("length").unwrap_err();
        assert!(e.reason.contains("negative"), "{}", e.reason);
        let buf = Bytes::from_static(&[0, 0, 0, 2, b'a']);
        let e = Cursor::new(&buf, "Message").len_i32("length").unwrap_err();
        assert!(e.reason.contains("exceeds"), "{}", e.reason);
        assert_eq!(e.offset, 0);
    }

    #[test]
    fn strings_need_their_nul() {
        let buf = Bytes::from_static(b"abc");
        assert!(Cursor::new(&buf, "Relation").cstr("name").is_err());
        let buf = Bytes::from_static(b"\0");
        let mut c = Cursor::new(&buf, "Relation");
        assert!(c.cstr("name").unwrap().is_empty());
        c.finish().unwrap();
    }

    #[test]
    fn slice_cursor_copies() {
        let raw = b"ab\0cd";
        let mut c = Cursor::from_slice(raw, "Origin");
        assert_eq!(&c.cstr("name").unwrap()[..], b"ab");
        assert_eq!(c.cstr_raw("x").unwrap_err().offset, 3);
        c.set_kind("Other");
        assert_eq!(c.take(9, "x").unwrap_err().kind, "Other");
        assert_eq!(&c.bytes(2, "rest").unwrap()[..], b"cd");
        c.finish().unwrap();
    }
}
