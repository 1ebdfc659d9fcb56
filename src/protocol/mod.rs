//! Wire formats, parsed without I/O.
//!
//! Everything here is a pure function over [`bytes::Bytes`]: no sockets, no
//! files, no clocks. That keeps the parsers unit-testable on captured byte
//! fixtures, fuzzable and benchmarkable.
//!
//! - [`replication`]: the CopyBoth sub-protocol of a walsender (XLogData,
//!   primary keepalive, standby status update).
//! - [`pgoutput`]: the logical replication messages of the `pgoutput` plugin,
//!   protocol versions 1 to 4.
//!
//! Invariants every parser here keeps:
//! - it never panics on any input;
//! - every length read from the wire is checked against the bytes really left
//!   before it is used, and nothing is allocated from a wire length;
//! - payloads (tuple values, prefixes, names) are slices of the input, not copies;
//! - an error names the message kind and the byte offset where parsing failed.

pub mod pgoutput;
pub mod replication;

mod cursor;

pub use cursor::DecodeError;
